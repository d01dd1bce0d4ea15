"""Near-duplicate grouping (vsearch.duplicates): pure, seeded, no model."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from vsearch.duplicates import DuplicateConfig, VariantGroups, hamming, merge, near_duplicates, phash, product_links, regroup
from vsearch.errors import ConfigError


def from_scratch(groups: VariantGroups) -> dict[str, str]:
    return regroup(groups.images_of, groups.product_neighbours)


def check(groups: VariantGroups) -> None:
    """The incremental state equals a from-scratch grouping and is self-consistent."""
    assert groups.group == from_scratch(groups)
    members: dict[str, set[str]] = {}
    for product, group in groups.group.items():
        members.setdefault(group, set()).add(product)
    assert groups.members == members
    assert all(group == min(ms) for group, ms in members.items())


def smooth_image(seed: int, size: tuple[int, int] = (240, 180)) -> Image.Image:
    """A seeded photo-like image: coarse random colour blobs, bicubic-upsampled."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def reencoded(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_config_validates() -> None:
    assert DuplicateConfig().threshold <= 1
    for bad in ({"threshold": 0}, {"threshold": 1.01}, {"k": 0}, {"phash_distance": -1}, {"phash_distance": 65}):
        with pytest.raises(ConfigError):
            DuplicateConfig(**bad)  # type: ignore[arg-type]


def test_matches_is_embedding_or_hash() -> None:
    config = DuplicateConfig(threshold=0.97, phash_distance=8)
    assert config.matches(0.97) and config.matches(0.5, 8) and config.matches(0.99, 40)
    assert not config.matches(0.969) and not config.matches(0.969, 10)
    assert not DuplicateConfig(threshold=0.97, phash_distance=None).matches(0.5, 0)


def test_near_duplicates_filters_hits() -> None:
    config = DuplicateConfig(threshold=0.9, phash_distance=None)
    hits = near_duplicates(7, [7, 3, 9, -1, 4], [1.0, 0.95, 0.9, 2.0, 0.89], config)
    assert hits == [3, 9]
    hashed = DuplicateConfig(threshold=0.9, phash_distance=4)
    assert near_duplicates(7, [3, 4, 5], [0.95, 0.5, 0.5], hashed, distances=[30, 4, 6]) == [3, 4]


def test_phash_survives_reencoding_and_separates_images() -> None:
    image = smooth_image(0)
    h = phash(image)
    assert 0 <= h < 2**64 and h.bit_count() == 32  # 64 coefficients split at their median
    assert phash(image) == h
    assert hamming(h, phash(reencoded(image, 60))) <= 4
    assert hamming(h, phash(image.resize((120, 90), Image.Resampling.BICUBIC))) <= 4
    others = [hamming(h, phash(smooth_image(seed))) for seed in range(1, 11)]
    assert min(others) > 8


def test_phash_equals_imagehash() -> None:
    imagehash = pytest.importorskip("imagehash")
    for seed in range(5):
        image = smooth_image(seed, (200 + 17 * seed, 150))
        assert phash(image) == int(str(imagehash.phash(image)), 16)


def test_product_links_drop_same_product_pairs() -> None:
    product = {1: "a", 2: "a", 3: "b", 4: "c"}
    links = product_links({1: [2, 3], 4: [3]}, product.__getitem__)
    assert links == {"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}


def test_merge_joins_groups_under_smallest_id() -> None:
    stored = {"b": "b", "d": "b", "c": "c", "e": "c"}
    members = {"b": ["b", "d"], "c": ["c", "e"]}
    changes = merge({"f": ["d", "e"]}, stored.get, lambda g: members.get(g, []))
    assert changes == {"c": "b", "e": "b", "f": "b"}
    assert merge({"a": ["e"]}, stored.get, lambda g: members.get(g, [])) == {"a": "a", "c": "a", "e": "a"}


def test_merge_with_unstored_singletons() -> None:
    """A catalog may store no group for a singleton: group_of None, members_of empty."""
    changes = merge({"x": ["y"], "z": []}, lambda n: None, lambda g: [])
    assert changes == {"x": "x", "y": "x", "z": "z"}
    assert merge({"y": []}, lambda n: None, lambda g: []) == {"y": "y"}


def test_regroup_splits_into_components() -> None:
    edges = {"a": {"c"}, "c": {"a"}, "b": {"d", "z"}, "d": {"b"}, "e": set()}
    assert regroup(["e", "d", "c", "b", "a"], lambda n: edges[n]) == {"a": "a", "c": "a", "b": "b", "d": "b", "e": "e"}


def test_removing_the_bridge_splits_a_group() -> None:
    groups = VariantGroups()
    groups.add_image(1, "p1", [])
    groups.add_image(2, "p2", [1])
    assert groups.add_image(3, "p0", [2]) == {"p0": "p0", "p1": "p0", "p2": "p0"}
    assert groups.remove_image(2) == {"p1": "p1", "p2": "p2"}
    assert groups.group == {"p0": "p0", "p1": "p1", "p2": "p2"}
    check(groups)


def test_group_ids_do_not_depend_on_insert_order() -> None:
    rng = random.Random(3)
    images = [(i, f"p{rng.randrange(12):02d}") for i in range(40)]
    pairs = {(a, b) for a in range(40) for b in range(a) if rng.random() < 0.02}
    results = []
    for _ in range(3):
        order = images[:]
        rng.shuffle(order)
        position = {image: n for n, (image, _) in enumerate(order)}
        groups = VariantGroups()
        for image, product in order:
            earlier = [o for a, b in pairs for me, o in ((a, b), (b, a)) if me == image and position[o] < position[image]]
            groups.add_image(image, product, earlier)
        results.append(groups.group)
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("seed", range(6))
def test_incremental_equals_from_scratch(seed: int) -> None:
    """Random inserts (each linked to a few existing images) and removals of images
    and products: after every step, the groups equal a grouping from scratch."""
    rng = random.Random(seed)
    groups = VariantGroups()
    next_image = 0
    for _ in range(300):
        roll = rng.random()
        if roll < 0.65 or not groups.product_of:
            product = f"p{rng.randrange(30):02d}"
            known = sorted(groups.product_of)
            neighbours = rng.sample(known, min(len(known), rng.choice((0, 0, 1, 1, 2, 3))))
            changes = groups.add_image(next_image, product, neighbours)
            assert changes.get(product, groups.group[product]) == groups.group[product]
            next_image += 1
        elif roll < 0.9:
            groups.remove_image(rng.choice(sorted(groups.product_of)))
        else:
            groups.remove_product(rng.choice(sorted(groups.images_of)))
        check(groups)


def test_changes_are_exactly_what_moved() -> None:
    """Each call reports every product whose group changed, and only those."""
    rng = random.Random(11)
    groups = VariantGroups()
    for image in range(200):
        before = dict(groups.group)
        if image % 4 == 3 and groups.product_of:
            changes = groups.remove_image(rng.choice(sorted(groups.product_of)))
        else:
            known = sorted(groups.product_of)
            changes = groups.add_image(image, f"p{rng.randrange(25)}", rng.sample(known, min(len(known), 2)))
        moved = {p: g for p, g in groups.group.items() if before.get(p) != g}
        assert changes == moved
