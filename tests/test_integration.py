"""A few tests on the real, offline EfficientNet-Lite weights and ../shared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vsearch import Engine
from vsearch.embed import Preprocess
from vsearch.families import build_backbone
from vsearch.images import decode_image, read_source
from vsearch.presets import resolve_model

from .conftest import shared_dataset

pytestmark = pytest.mark.integration

BANANA, GRANNY_SMITH = 954, 948  # ImageNet class ids


def test_wheel_weights_map_onto_timm_and_classify_correctly() -> None:
    grocery = shared_dataset("grocery-store") / "dataset/iconic-images-and-descriptions/Fruit"
    config = resolve_model("efficientnet-lite0")
    model = build_backbone(config).model  # type: ignore[attr-defined]
    preprocess = Preprocess(config)
    for path, label in [("Banana/Banana_Iconic.jpg", BANANA), ("Apple/Granny-Smith/Granny-Smith_Iconic.jpg", GRANNY_SMITH)]:
        source = str(grocery / path)
        x = preprocess(decode_image(read_source(source), source))[None]
        with torch.inference_mode():
            assert int(model(x).argmax()) == label


def test_grocery_iconic_catalog_finds_in_store_photos(tmp_path: Path) -> None:
    dataset = shared_dataset("grocery-store") / "dataset"
    lines = (dataset / "val.txt").read_text().splitlines()[::30]
    with Engine.open(tmp_path / "idx", model="efficientnet-lite0", create=True) as engine:
        engine.ingest(dataset / "iconic-images-and-descriptions", quiet=True, workers=1)
        assert engine.info()["vectors"] == 81
        hits_at_10 = []
        for line in lines:
            path = dataset / line.split(",")[0].strip()
            hits = engine.search(path, k=10)
            hits_at_10.append(any(h.category == str(path.parent.relative_to(dataset / "val")) for h in hits))
    # zero-shot Lite0 finds the product in the top 10 for ~80% of photos; 10 photos
    assert np.mean(hits_at_10) >= 0.5
