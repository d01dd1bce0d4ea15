from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from vsearch import families
from vsearch.adapter import AdaptedNet, AdapterConfig
from vsearch.backbones import lukemelas_to_timm
from vsearch.config import ModelConfig
from vsearch.embed import Embedder, pool
from vsearch.errors import ConfigError, ModelError
from vsearch.families import build_backbone
from vsearch.presets import preset_names, resolve_model
from vsearch.projection import Projection

from .conftest import make_image


def test_vectors_are_float32_unit_norm_and_deterministic() -> None:
    embedder = Embedder(resolve_model("tiny-test"), device="cpu")
    images = [make_image(i) for i in range(3)]
    a = embedder.embed_images(images)
    b = embedder.embed_images(images)
    assert a.dtype == np.float32 and a.shape == (3, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(a, b)
    tta = embedder.embed_images(images, tta=True)
    np.testing.assert_allclose(np.linalg.norm(tta, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(tta, a)


def test_layers_and_per_layer_pooling_shape_the_vector() -> None:
    head = Embedder(resolve_model("tiny-test", layers=["head"], pooling="mean"), device="cpu")
    both = Embedder(resolve_model("tiny-test", layers=["stage3", "head"], pooling=["gem", "mean"]), device="cpu")
    assert both.dim > head.dim
    gem = Embedder(resolve_model("tiny-test", layers=["head"], pooling="gem"), device="cpu")
    x = make_image(5)
    assert not np.allclose(gem.embed_images([x]), head.embed_images([x]))


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown model"):
        resolve_model("no-such-model")
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        resolve_model("NoSuchArch:laion")
    with pytest.raises(ConfigError, match="pooling"):
        resolve_model("tiny-test", pooling="max")
    with pytest.raises(ConfigError, match="need 2 poolings"):
        resolve_model("tiny-test", layers=["stage3", "head"], pooling=["gem", "mean", "mean"])
    with pytest.raises(ModelError, match="no layer"):
        build_backbone(resolve_model("tiny-test", layers=["stage9"]))


def test_model_config_round_trips_through_json_dicts() -> None:
    config = resolve_model("tiny-test", layers=["stage2", "head"], pooling=["gem", "mean"])
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert {"efficientnet-lite0", "efficientnet-lite2", "tiny-test"} <= set(preset_names())


def test_lukemelas_mapping_checks_every_shape() -> None:
    model = torch.nn.Sequential(OrderedDict(conv=torch.nn.Conv2d(3, 4, 3), bn=torch.nn.BatchNorm2d(4)))
    source = OrderedDict((f"_x{i}", v.clone()) for i, v in enumerate(model.state_dict().values()))
    mapped = lukemelas_to_timm(source, model)
    assert list(mapped) == list(model.state_dict())
    source["_x0"] = torch.zeros(5, 3, 3, 3)
    with pytest.raises(ModelError, match="does not fit conv.weight"):
        lukemelas_to_timm(source, model)


def test_open_clip_path_with_a_tiny_random_model() -> None:
    config = resolve_model("tiny-clip:random")
    assert config.image_size == 32 and config.layers == ("embed",)
    embedder = Embedder(config, device="cpu")
    assert embedder.has_text
    image_vectors = embedder.embed_images([make_image(1), make_image(2)])
    text_vectors = embedder.embed_text(["a red shirt"])
    assert image_vectors.shape == (2, 32) and text_vectors.shape == (1, 32)
    np.testing.assert_allclose(np.linalg.norm(text_vectors, axis=1), 1.0, rtol=1e-5)
    blocks = Embedder(resolve_model("tiny-clip:random", layers=["block1", "embed"]), device="cpu")
    assert blocks.dim == 64 + 32


def test_text_on_an_image_only_model_says_which_model_to_use() -> None:
    embedder = Embedder(resolve_model("tiny-test"), device="cpu")
    with pytest.raises(ModelError, match="ViT-B-32"):
        embedder.embed_text(["shirt"])


def test_open_clip_local_checkpoint(tmp_path) -> None:  # type: ignore[no-untyped-def]
    reference = Embedder(resolve_model("tiny-clip:random"), device="cpu")
    state = reference.backbone.model.state_dict()  # type: ignore[attr-defined]
    state = {k: v + 0.01 for k, v in state.items()}
    torch.save(state, tmp_path / "tiny.pt")
    loaded = Embedder(resolve_model(f"tiny-clip:{tmp_path / 'tiny.pt'}"), device="cpu")
    for key, value in loaded.backbone.model.state_dict().items():  # type: ignore[attr-defined]
        torch.testing.assert_close(value, state[key])


def test_the_family_registry_says_what_each_family_can_do() -> None:
    assert families.family_names() == ["open_clip", "timm-efficientnet-lite"]
    effnet, clip = resolve_model("tiny-test"), resolve_model("tiny-clip:random")
    assert not families.has_text(effnet)
    assert families.has_text(clip)
    # text vectors live in the space of the image embedding alone, not of block features
    assert not families.has_text(resolve_model("tiny-clip:random", layers=["block1", "embed"]))
    assert not families.has_text(ModelConfig(name="x", family="no-such-family", arch="x"))
    assert families.can_finetune(effnet) and not families.can_finetune(clip)
    with pytest.raises(ModelError, match="unknown model family 'no-such-family'"):
        families.get_family("no-such-family")
    with pytest.raises(ModelError, match="registered already"):
        families.register_family(families.get_family("open_clip"))


def test_embedders_answer_has_text_from_the_registry() -> None:
    assert not Embedder(resolve_model("tiny-test"), device="cpu").has_text
    assert not Embedder(resolve_model("tiny-clip:random", layers=["block1", "embed"]), device="cpu").has_text


def test_fine_tuning_split_is_refused_for_open_clip_with_a_clear_message() -> None:
    config = AdapterConfig(base=resolve_model("tiny-clip:random"))
    with pytest.raises(ModelError, match=r"fine-tuning supports timm-efficientnet-lite models, not 'open_clip' \(tiny-clip"):
        AdaptedNet(config, Projection())
    with pytest.raises(ModelError, match="fine-tuning supports"):
        families.split_for_training(config.base, "stage4")


def test_efficientnet_split_cuts_before_the_asked_stage() -> None:
    config = resolve_model("tiny-test")
    split = families.split_for_training(config, "stage3")
    assert split.stage_names == ["stage0", "stage1", "stage2", "stage3", "stage4"]
    assert len(split.trunk) == split.stage_ends[2] + 1 and split.head_name == "head"
    assert len(families.split_for_training(config, "head").tail) == 0
    with pytest.raises(ConfigError, match="train_from must be one of stage1, stage2, stage3, stage4 or head"):
        families.split_for_training(config, "stage0")


def test_pool_is_mean_or_gem_and_passes_vectors_through() -> None:
    feature = torch.rand(2, 3, 4, 5) + 0.1
    torch.testing.assert_close(pool(feature, "mean", 3.0), feature.mean(dim=(2, 3)))
    torch.testing.assert_close(pool(feature, "gem", 1.0), feature.mean(dim=(2, 3)))
    assert (pool(feature, "gem", 3.0) > pool(feature, "mean", 3.0)).all()  # GeM leans to the largest activations
    vector = torch.rand(2, 3)
    assert pool(vector, "gem", 3.0) is vector
