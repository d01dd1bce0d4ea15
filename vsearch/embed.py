"""The embedding extractor: images in, float32 L2-normalised vectors out.

A vector is the concatenation of the configured intermediate layers, each pooled
(mean or GeM) and L2-normalised. Centring/PCA is applied later by
:class:`vsearch.projection.Projection`, fitted on data and saved with the index.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbones import Backbone
from .config import ModelConfig
from .duplicates import phash
from .errors import ImageError
from .families import build_backbone, has_text
from .images import DEFAULT_MAX_PIXELS, decode, read_source, sha256_bytes
from .malloc import tune_malloc

__all__ = ["Embedder", "Preprocess", "LoadedImage", "decode_side", "load_images", "pick_device", "pool", "raw_dim"]


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


MAX_CANVAS_SIDE = 4096  # a padded canvas at most 4096^2 RGB pixels (50 MB), whatever the image
DETAIL = 4  # images are decoded with at most DETAIL x the model's input side (see Preprocess.max_side)


class Preprocess:
    """PIL RGB image -> normalised CHW float tensor of the model's input size."""

    def __init__(self, config: ModelConfig) -> None:
        self.size = config.image_size
        self.resize = config.resize
        self.mean = torch.tensor(config.mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)

    @property
    def max_side(self) -> int:
        """The most pixels on an image's long side worth decoding for this model: 4x its
        input side. The input is a bicubic resize, so more only costs memory and time
        (a 40-megapixel photo decodes at 1/4 or 1/8 scale instead); 4x leaves room for
        the 0.8 query crop and a clean anti-aliased resize. Photos this small or
        smaller are untouched, so their vectors do not change."""
        return decode_side(self.size)

    def input_box(self, size: tuple[int, int], box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """Where a box (fractions of an image of ``size``) lands in the model's input."""
        x, y, w, h = box
        width, height = size
        if self.resize == "pad":
            side = max(width, height)
            ox, oy = (side - width) / 2 / side, (side - height) / 2 / side
            return ox + x * width / side, oy + y * height / side, w * width / side, h * height / side
        if self.resize == "crop":
            short = min(width, height)
            fx, fy = width / short, height / short  # the input shows the central 1/fx x 1/fy
            cx, cy = (x - (1 - 1 / fx) / 2) * fx, (y - (1 - 1 / fy) / 2) * fy
            x0, y0 = min(max(cx, 0.0), 1.0), min(max(cy, 0.0), 1.0)
            x1, y1 = min(max(cx + w * fx, 0.0), 1.0), min(max(cy + h * fy, 0.0), 1.0)
            return x0, y0, max(x1 - x0, 1e-3), max(y1 - y0, 1e-3)
        return box

    def __call__(self, image: Image.Image) -> torch.Tensor:
        size = self.size
        image = self._bounded(image)
        if self.resize == "pad":
            # Catalog shots sit on white; padding keeps the whole product and its shape.
            side = max(image.size)
            canvas = Image.new("RGB", (side, side), (255, 255, 255))
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas.resize((size, size), Image.Resampling.BICUBIC)
        elif self.resize == "crop":
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
        else:
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        array = np.array(image, dtype=np.float32)  # a writable copy
        tensor = torch.from_numpy(array).permute(2, 0, 1).div_(255.0)
        return (tensor - self.mean) / self.std

    def _bounded(self, image: Image.Image) -> Image.Image:
        """``image``, shrunk first where preparing it as is would cost far more than the
        model's input: a padded canvas past MAX_CANVAS_SIDE (a 60000x1 PNG would pad to
        3.6 G pixels) or a crop-mode resize past 4x the input's pixels. Ordinary photos
        pass untouched, so their vectors do not change."""
        width, height = image.size
        if self.resize == "pad" and max(width, height) > MAX_CANVAS_SIDE:
            scale = MAX_CANVAS_SIDE / max(width, height)
            return image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
        if self.resize == "crop" and max(width, height) > 4 * min(width, height):
            short = min(width, height)  # the central square is all that crop mode keeps
            left, top = (width - short) // 2, (height - short) // 2
            return image.crop((left, top, left + short, top + short))
        return image


def decode_side(image_size: int) -> int:
    """:attr:`Preprocess.max_side` for a model whose input is ``image_size`` square."""
    return DETAIL * image_size


def pool(feature: torch.Tensor, how: str, p: float) -> torch.Tensor:
    """NCHW map -> NC vector by ``how`` ("mean" or "gem" with exponent ``p``); NC passes through."""
    if feature.ndim == 2:
        return feature
    if how == "gem":
        return feature.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
    return feature.mean(dim=(2, 3))


def center_crop(image: Image.Image, fraction: float) -> Image.Image:
    w, h = image.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def raw_dim(config: ModelConfig) -> int:
    """The length of ``config``'s raw vectors, from its architecture with random
    weights: nothing is loaded or downloaded (a second or so for the presets)."""
    return Embedder(replace(config, pretrained=""), device="cpu").dim


class Embedder:
    """Runs a backbone and turns its intermediate layers into one vector per image."""

    def __init__(self, config: ModelConfig, device: str | None = None) -> None:
        tune_malloc()
        self.config = config
        self.device = pick_device(device)
        self.backbone: Backbone = build_backbone(config).to(self.device)
        self.preprocess = Preprocess(config)
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        if self._dim is None:
            probe = torch.zeros(1, 3, self.config.image_size, self.config.image_size)
            self._dim = int(self.embed_tensor(probe).shape[1])
        return self._dim

    @property
    def has_text(self) -> bool:
        """Whether :meth:`embed_text` gives vectors comparable to this embedder's image vectors."""
        return has_text(self.config)

    def embed_tensor(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed NCHW batch; returns (n, dim) float32, rows L2-normalised."""
        with torch.inference_mode(), self._autocast():
            maps = self.backbone(batch.to(self.device, non_blocking=True), self.config.layers)
            parts = [F.normalize(pool(m.float(), how, self.config.gem_p), dim=1) for m, how in zip(maps, self.config.poolings)]
            vectors = F.normalize(torch.cat(parts, dim=1), dim=1)
        return vectors.cpu().numpy().astype(np.float32, copy=False)

    def embed_images(self, images: list[Image.Image], *, tta: bool = False) -> np.ndarray:
        """Embed RGB images; ``tta`` averages each with its 0.8 centre crop (queries)."""
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        tensors = [self.preprocess(im) for im in images]
        if tta:  # one forward for the photos and their crops together
            tensors += [self.preprocess(center_crop(im, 0.8)) for im in images]
        vectors = self.embed_tensor(torch.stack(tensors))
        if tta:
            vectors = vectors[: len(images)] + vectors[len(images) :]
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors

    def embed_regions(self, image: Image.Image, boxes: list[tuple[float, float, float, float]]) -> np.ndarray:
        """One vector per box ``(x, y, w, h)`` (fractions of ``image``), all pooled from
        the feature maps of a single forward pass. Returns (len(boxes), dim)."""
        batch = self.preprocess(image)[None]
        inner = [self.preprocess.input_box(image.size, box) for box in boxes]
        with torch.inference_mode(), self._autocast():
            maps = self.backbone(batch.to(self.device), self.config.layers)
            per_layer = []
            for feature, how in zip(maps, self.config.poolings):
                feature = feature.float()
                if feature.ndim == 2:  # a vector layer has no regions: every box gets it
                    per_layer.append(F.normalize(feature.expand(len(boxes), -1), dim=1))
                    continue
                h, w = feature.shape[2:]
                pooled = []
                for x, y, bw, bh in inner:
                    top, left = min(int(y * h), h - 1), min(int(x * w), w - 1)
                    bottom, right = max(top + 1, round((y + bh) * h)), max(left + 1, round((x + bw) * w))
                    pooled.append(pool(feature[:, :, top:bottom, left:right], how, self.config.gem_p))
                per_layer.append(F.normalize(torch.cat(pooled), dim=1))
            vectors = F.normalize(torch.cat(per_layer, dim=1), dim=1)
        return vectors.cpu().numpy().astype(np.float32, copy=False)

    def embed_text(self, texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            vectors = F.normalize(self.backbone.encode_text(texts).float(), dim=1)
        return vectors.cpu().numpy()

    def _autocast(self) -> torch.autocast:
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast("cpu", enabled=False)


@dataclass
class LoadedImage:
    """One source after reading and decoding: a tensor ready for the model, or an error."""

    key: object
    source: str
    sha256: str = ""
    width: int = 0
    height: int = 0
    tensor: torch.Tensor | None = None
    error: str = ""
    unchanged: bool = False  # content hash matched the caller's; not decoded
    phash: int | None = None  # perceptual hash of the decoded image (vsearch.duplicates)


class _SourceDataset(torch.utils.data.Dataset[LoadedImage]):
    def __init__(self, items: list[tuple[object, str, str]], preprocess: Preprocess, max_pixels: int) -> None:
        self.items = items
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> LoadedImage:
        key, source, known_sha256 = self.items[i]
        loaded = LoadedImage(key=key, source=source)
        try:
            data = read_source(source)
            loaded.sha256 = sha256_bytes(data)
            if loaded.sha256 == known_sha256:
                loaded.unchanged = True
                return loaded
            # Waits for decode memory as long as it takes: nothing competes in a worker.
            decoded = decode(data, source, max_pixels=self.max_pixels, max_side=self.preprocess.max_side, wait_s=math.inf)
            loaded.width, loaded.height = decoded.width, decoded.height
            loaded.phash = phash(decoded.image)
            loaded.tensor = self.preprocess(decoded.image)
        except ImageError as exc:
            loaded.error = exc.reason
        return loaded


def _collate(batch: list[LoadedImage]) -> list[LoadedImage]:
    return batch


def default_workers(device: torch.device | None = None) -> int:
    """Decoding worker processes that help rather than hurt.

    With the model on a GPU the CPU only decodes, so use most cores. With the model
    on the CPU, torch's threads already use every core, and a decoding process steals
    from them: on a 2-core machine one worker made ingestion 30% slower than decoding
    in-process (scripts/bench_embed.py). Decoding costs ~1/10 of a CPU forward, so
    give it one process per 8 cores.
    """
    cores = os.cpu_count() or 1
    if device is not None and device.type in ("cuda", "mps"):
        return max(1, min(8, cores - 1))
    return cores // 8


def load_images(
    items: Iterable[tuple[object, str, str]],
    preprocess: Preprocess,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    device: torch.device | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[list[LoadedImage]]:
    """Read, hash, decode and preprocess ``(key, source, known_sha256)`` in worker
    processes, a batch at a time. A source whose hash equals ``known_sha256`` comes
    back ``unchanged`` without being decoded.

    Workers run ahead of the caller (prefetch), so decoding overlaps the model forward.
    """
    dataset = _SourceDataset(list(items), preprocess, max_pixels)
    if len(dataset) == 0:
        return
    n_workers = default_workers(device) if workers is None else workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=n_workers,
        collate_fn=_collate,
        prefetch_factor=4 if n_workers > 0 else None,
        persistent_workers=False,
    )
    yield from loader
