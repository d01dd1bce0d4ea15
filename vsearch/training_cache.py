"""The activation cache of fine-tuning: the frozen trunk's output for every
augmented view of every training sample, computed once.

Training then runs only the tail, which is what makes a CPU run take minutes
rather than hours. The cache is saved in the run's work folder, so a resumed run
skips this step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .adapter import AdaptedNet
from .config import FinetuneConfig
from .embed import Preprocess, center_crop
from .fsutil import atomic_write
from .training_data import TrainingData, load_image

__all__ = ["load_or_build_cache"]


def load_or_build_cache(
    work: Path, net: AdaptedNet, data: TrainingData, config: FinetuneConfig, device: torch.device, quiet: bool
) -> dict[str, torch.Tensor]:
    """Trunk activations (``*_x``), zero-shot vectors (``*_z``) and product numbers
    (``*_y``) of the training views, the validation photos and their centre crops,
    and the catalog images."""
    path = work / "cache.pt"
    if path.exists():
        cache: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
        return cache
    preprocess = Preprocess(net.config.base)
    augmented = _augmented(net, config.hue_for(data.level))

    def cropped(image: Image.Image) -> torch.Tensor:
        return preprocess(center_crop(image, 0.8))

    index = {pid: i for i, pid in enumerate(data.products)}
    # Product level: the catalog images tie each proxy to what the gallery shows. Class
    # level: the gallery is only a validation sample; the labelled photos define the classes.
    repeat = config.catalog_repeat if data.level == "product" else 0
    samples: list[tuple[str | bytes, str]] = list(data.train) + [g for g in data.gallery for _ in range(repeat)]
    jobs = [(src, augmented) for _ in range(config.views) for src, _ in samples]
    labels = [index[pid] for _ in range(config.views) for _, pid in samples]
    total = len(jobs) + 2 * len(data.val) + len(data.gallery)
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(gen.get_state())  # torchvision draws its augmentations from torch's RNG
        with tqdm(total=total, unit="img", desc="caching", disable=quiet or not sys.stderr.isatty()) as bar:
            train_x, train_z = _encode(net, jobs, device, bar)
            val_x, val_z = _encode(net, [(s, preprocess) for s, _ in data.val], device, bar)
            crop_x, crop_z = _encode(net, [(s, cropped) for s, _ in data.val], device, bar)
            gal_x, gal_z = _encode(net, [(b, preprocess) for b, _ in data.gallery], device, bar)
    cache = {
        "train_x": train_x,
        "train_z": train_z,
        "train_y": torch.tensor(labels, dtype=torch.long),
        "val_x": val_x,
        "val_z": val_z,
        "crop_x": crop_x,
        "crop_z": crop_z,
        "val_y": torch.tensor([index[pid] for _, pid in data.val], dtype=torch.long),
        "gal_x": gal_x,
        "gal_z": gal_z,
        "gal_y": torch.tensor([index[pid] for _, pid in data.gallery], dtype=torch.long),
    }
    atomic_write(path, lambda tmp: torch.save(cache, tmp))
    return cache


def _augmented(net: AdaptedNet, hue: float) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop 0.4-1, flip, colour jitter (hue by up to ``hue`` of the
    colour circle), +-10 degree rotation, then the base model's normalisation (the
    crop replaces its resize)."""
    from torchvision import transforms as T

    base = net.config.base
    augment = T.Compose(
        [
            T.RandomResizedCrop(base.image_size, scale=(0.4, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.3, 0.3, 0.3, hue),
            T.RandomRotation(10),
        ]
    )
    mean = torch.tensor(base.mean).view(3, 1, 1)
    std = torch.tensor(base.std).view(3, 1, 1)

    def augmented(image: Image.Image) -> torch.Tensor:
        array = np.array(augment(image), dtype=np.float32)
        return (torch.from_numpy(array).permute(2, 0, 1) / 255.0 - mean) / std

    return augmented


def _encode(
    net: AdaptedNet,
    images: Sequence[tuple[str | bytes, Callable[[Image.Image], torch.Tensor]]],
    device: torch.device,
    bar: tqdm,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trunk activations (fp16) and zero-shot vectors for images, 32 at a time."""
    if not images:  # e.g. no validation photos: empty tensors of the right shapes
        size = net.config.base.image_size
        with torch.inference_mode():
            trunk, zero = net.encode_trunk(torch.zeros(1, 3, size, size, device=device))
        return trunk[:0].half().cpu(), zero[:0].float().cpu()
    trunks, zeros = [], []
    for start in range(0, len(images), 32):
        batch = torch.stack([prep(load_image(src)) for src, prep in images[start : start + 32]]).to(device)
        with torch.inference_mode():
            trunk, zero = net.encode_trunk(batch)
        trunks.append(trunk.half().cpu())
        zeros.append(zero.float().cpu())
        bar.update(len(batch))
    return torch.cat(trunks), torch.cat(zeros)
