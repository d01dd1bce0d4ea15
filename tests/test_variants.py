"""Near-duplicate links and variant groups kept by the write path (vsearch.variants)."""

from __future__ import annotations

import io
import json
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageEnhance

from tests.conftest import make_image, write_catalog
from tests.test_finetune import product_id
from vsearch import Engine, linking
from vsearch.api import create_app
from vsearch.cli import main
from vsearch.config import ServeConfig
from vsearch.duplicates import regroup
from vsearch.errors import ConfigError
from vsearch.query import SearchOptions


def jpeg(image: Image.Image, quality: int = 60) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def copies(n: int) -> list[bytes]:
    """Near-duplicates of catalog product ``n``'s picture: re-encoded, resized, lighter."""
    picture = make_image(n)
    w, h = picture.size
    return [
        jpeg(picture, 50),
        jpeg(picture.resize((w // 2, h // 2))),
        jpeg(ImageEnhance.Brightness(picture).enhance(1.08)),
    ]


def groups(engine: Engine) -> dict[str, str]:
    return dict(engine.catalog.db.execute("SELECT product_id, group_id FROM variant_groups"))


def from_scratch(engine: Engine) -> dict[str, str]:
    """The groups the stored links imply, computed over the whole catalog."""
    db = engine.catalog.db
    product_of = dict(db.execute("SELECT id, product_id FROM images"))
    edges: dict[str, set[str]] = {}
    for a, b in db.execute("SELECT a, b FROM image_links"):
        p, q = product_of[a], product_of[b]
        if p != q:
            edges.setdefault(p, set()).add(q)
            edges.setdefault(q, set()).add(p)
    fresh = regroup(sorted(product_of.values()), lambda p: edges.get(p, set()))
    sizes: dict[str, int] = {}
    for g in fresh.values():
        sizes[g] = sizes.get(g, 0) + 1
    return {p: g for p, g in fresh.items() if sizes[g] > 1}


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = Engine.open(tmp_path / "index", model="tiny-test", create=True)
    engine.ingest(write_catalog(tmp_path / "catalog"), quiet=True)
    yield engine
    engine.close()


def test_distinct_products_are_not_grouped_and_every_image_is_linked(engine: Engine) -> None:
    db = engine.catalog.db
    assert groups(engine) == {} and db.execute("SELECT count(*) FROM image_links").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM variant_pending").fetchone()[0] == 0  # the first ingest linked its images
    assert db.execute("SELECT count(phash) FROM images").fetchone()[0] == 25


def test_copies_join_their_original_and_leave_again(engine: Engine) -> None:
    original, twin = product_id(3), product_id(5)
    for i, data in enumerate(copies(3)):
        engine.put_product(f"copy-{i}", images=[data])
    engine.put_product("same-bytes", images=[(engine.paths.root.parent / "catalog" / f"{twin}.jpg").read_bytes()])
    found = groups(engine)
    group = {p for p in found if found[p] == found[original]}
    assert group == {original, "copy-0", "copy-1", "copy-2"} and found[original] == min(group)
    assert found["same-bytes"] == found[twin] == min(twin, "same-bytes")
    assert found == from_scratch(engine)

    engine.remove_products(["copy-0", "copy-1"])
    assert groups(engine)["copy-2"] == groups(engine)[original] == min(original, "copy-2")
    engine.put_product("copy-2", images=[jpeg(make_image(40))])  # its image replaced by one of no other product
    assert original not in groups(engine) and "copy-2" not in groups(engine)
    assert groups(engine) == from_scratch(engine)


def test_random_writes_keep_groups_equal_to_a_from_scratch_grouping(engine: Engine) -> None:
    rng = random.Random(0)
    alive: set[str] = set()
    for step in range(30):
        if alive and rng.random() < 0.3:
            gone = rng.sample(sorted(alive), k=min(len(alive), rng.randint(1, 2)))
            engine.remove_products(gone)
            alive -= set(gone)
        else:
            n, kind = rng.randrange(6), rng.randrange(3)
            pid = f"v{step}"
            engine.put_product(pid, images=[copies(n)[kind]])
            alive.add(pid)
        assert groups(engine) == from_scratch(engine), f"step {step}"
    assert groups(engine)  # the sequence did form groups


@pytest.mark.parametrize("center_on", [False, True])
def test_images_stored_before_there_was_an_index_are_linked_when_it_is_built(tmp_path: Path, center_on: bool) -> None:
    folder = write_catalog(tmp_path / "catalog")
    first = sorted(folder.rglob("*.jpg"))[0]
    dup = first.with_name("dup-of-first.jpg")
    shutil.copy(first, dup)
    pid = {path: str(path.relative_to(folder).with_suffix("")) for path in (first, dup)}
    with Engine.open(tmp_path / "index", model="tiny-test", create=True) as engine:
        engine.ingest(folder, quiet=True, center_on=folder if center_on else None)  # the demo centres on photos
        assert groups(engine) == {pid[first]: min(pid.values()), pid[dup]: min(pid.values())}
        assert engine.catalog.db.execute("SELECT count(*) FROM variant_pending").fetchone()[0] == 0


def pending(engine: Engine) -> int:
    return int(engine.catalog.db.execute("SELECT count(*) FROM variant_pending").fetchone()[0])


def test_writes_linked_in_the_background_join_their_group_in_batches(engine: Engine) -> None:
    engine.link_in_background = True  # what a server does: the write skips its own k-NN search
    for i, data in enumerate(copies(3)):
        engine.put_product(f"copy-{i}", images=[data])
    assert groups(engine) == {} and pending(engine) == 3 and engine.images_not_linked() == 3
    calls = iter([False, True])
    assert engine.link_variants(batch=2, until=lambda: next(calls)) is False  # one batch, then asked to stop
    assert pending(engine) == 1
    assert engine.link_variants(batch=2) is True and pending(engine) == 0
    assert set(groups(engine)) == {product_id(3), "copy-0", "copy-1", "copy-2"} and groups(engine) == from_scratch(engine)
    engine.remove_products(["copy-0"])  # a removal's regrouping still happens in the write; its relinking waits
    assert pending(engine) > 0 and groups(engine) == from_scratch(engine)
    engine.link_variants()
    assert set(groups(engine)) == {product_id(3), "copy-1", "copy-2"} and groups(engine) == from_scratch(engine)


def test_background_linking_never_deadlocks_with_reads_and_writes(engine: Engine) -> None:
    engine.link_in_background = True
    for i in range(12):
        engine.put_product(f"queued-{i}", images=[copies(i % 6)[i % 3]])
    errors: list[BaseException] = []

    def link() -> None:
        try:
            while engine.images_not_linked() and not errors:
                engine.link_variants(batch=1)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def requests() -> None:  # reads and writes interleaved with the batches (each takes both locks)
        for i in range(12):
            engine.product(product_id(i))
            engine.put_product(f"more-{i}", images=[copies(i % 6)[(i + 1) % 3]])

    threads = [threading.Thread(target=link, daemon=True), threading.Thread(target=requests, daemon=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "the background linker and a request deadlocked"
    assert not errors
    engine.link_variants()
    assert engine.images_not_linked() == 0 and groups(engine) == from_scratch(engine)


def test_a_server_links_api_writes_from_its_background_thread(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    index = engine.paths.root
    engine.close()
    callers: list[str] = []
    link_pending = linking.link_pending

    def recording(*args: Any, **kwargs: Any) -> int:
        callers.append(threading.current_thread().name)
        return link_pending(*args, **kwargs)

    monkeypatch.setattr(linking, "link_pending", recording)
    config = ServeConfig(index_dir=str(index), api_key="k", reload_interval_s=0.05)
    with TestClient(create_app(config)) as client:
        for i, data in enumerate(copies(3)[:2]):
            files = {"image": (f"{i}.jpg", data, "image/jpeg")}
            answer = client.post("/v1/products", data={"id": f"copy-{i}"}, files=files, headers={"X-API-Key": "k"})
            assert answer.status_code == 201, answer.text
        query = {"image": ("q.jpg", jpeg(make_image(3), 95), "image/jpeg")}
        deadline = time.monotonic() + 20
        found: list[str] = []
        while time.monotonic() < deadline and len(found) < 3:
            found = client.post("/v1/search?k=1", files=query).json()["results"][0]["variants"]
            time.sleep(0.05)
        assert sorted(found) == sorted([product_id(3), "copy-0", "copy-1"])
    assert callers and set(callers) == {"vsearch-reload"}  # never inside a request's write


def test_a_large_first_build_leaves_its_backlog_to_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("vsearch.refit.LINK_INLINE_MAX", 10)  # the catalog's 25 images are "many"
    folder = write_catalog(tmp_path / "catalog")
    shutil.copy(sorted(folder.rglob("*.jpg"))[0], folder / "dup.jpg")
    assert main(["ingest", str(folder), "--index", str(tmp_path / "index"), "--quiet"]) == 0
    assert "26 images not linked to their near-duplicates yet: vsearch serve links them" in capsys.readouterr().out
    assert main(["dups", "--index", str(tmp_path / "index"), "--link"]) == 0
    out = capsys.readouterr().out
    assert "1 variant group," in out and "not linked" not in out


def test_collapse_returns_one_result_per_variant_group_with_its_members(engine: Engine) -> None:
    original = product_id(3)
    for i, data in enumerate(copies(3)):
        engine.put_product(f"copy-{i}", images=[data])
    group = sorted([original, "copy-0", "copy-1", "copy-2"])
    plain = engine.search(make_image(3), k=6)
    assert {h.product_id for h in plain[:4]} == set(group)  # the copies crowd the first places
    assert all(h.variants == group and h.variant_group == group[0] for h in plain[:4])
    assert plain[4].variants == [] and plain[4].variant_group == ""
    collapsed = engine.search(make_image(3), k=6, collapse="variant_group")
    assert collapsed[0].product_id in group and collapsed[0].variants == group
    assert [h.product_id for h in collapsed[1:]] == [h.product_id for h in plain[4:]] + [
        h.product_id for h in engine.search(make_image(3), k=9)[6:9]
    ]
    keyword = engine.search(make_image(3), text="nothing-matches-this", k=3, collapse="variant_group")
    assert [h.product_id for h in keyword][:1] == [collapsed[0].product_id]
    with pytest.raises(ConfigError, match="collapse must be one of"):
        engine.search(make_image(3), collapse="brand")


def test_cli_dups_and_search_collapse(engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = product_id(3)
    for i, data in enumerate(copies(3)[:2]):
        engine.put_product(f"copy-{i}", images=[data])
    photo = engine.paths.root.parent / "again.jpg"
    photo.write_bytes(copies(7)[0])
    engine.put_product(product_id(7), images=[str(photo), str(engine.paths.root.parent / "catalog" / f"{product_id(7)}.jpg")])
    index = str(engine.paths.root)
    engine.close()
    assert main(["dups", "--index", index, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    [group] = out["groups"]
    assert group["group_id"] == min(original, "copy-0") and group["products"] == sorted([original, "copy-0", "copy-1"])
    assert len(group["links"]) >= 2 and out["images_not_yet_linked"] == 0
    assert [w["product_id"] for w in out["within_products"]] == [product_id(7)]
    assert main(["dups", "--index", index]) == 0
    text = capsys.readouterr().out
    assert f"{min(original, 'copy-0')}: 3 products" in text and "1 variant group, 1 repeated image within products" in text
    query = tmp_path / "q.png"
    make_image(3).save(query)
    assert main(["search", str(query), "--index", index, "--k", "2", "--collapse", "variant_group"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(+2 variants)" in lines[0] and "variant" not in lines[1]


def test_api_collapse_and_variant_fields(engine: Engine) -> None:
    for i, data in enumerate(copies(3)[:2]):
        engine.put_product(f"copy-{i}", images=[data])
    index = engine.paths.root
    engine.close()
    config = ServeConfig(index_dir=str(index))
    with TestClient(create_app(config)) as client:
        data = jpeg(make_image(3), 95)
        files = {"image": ("q.jpg", data, "image/jpeg")}
        plain = client.post("/v1/search?k=4", files=files).json()["results"]
        collapsed = client.post("/v1/search?k=4&collapse=variant_group", files=files).json()["results"]
        assert len(plain[0]["variants"]) == 3 and plain[0]["variant_group"] == min(plain[0]["variants"])
        assert [r["product_id"] for r in collapsed[1:]] == [r["product_id"] for r in plain[3:]] + [
            r["product_id"] for r in client.post("/v1/search?k=6", files=files).json()["results"][4:6]
        ]
        like = client.post("/v1/search?k=5&collapse=variant_group", data={"product_id": product_id(3)}).json()["results"]
        assert not {r["product_id"] for r in like} & {product_id(3), "copy-0", "copy-1"}  # "more like this": not its variants
        bad = client.post("/v1/search?collapse=brand", files=files)
        assert bad.status_code == 422, bad.text


def test_the_rule_is_the_manifests_and_a_reingest_gives_the_same_groups(tmp_path: Path) -> None:
    folder = write_catalog(tmp_path / "catalog")
    for i, data in enumerate(copies(4)):
        (folder / f"copy-{i}.jpg").write_bytes(data)
    rows = ["id,image"] + [f"{p.relative_to(folder).with_suffix('')},{p}" for p in sorted(folder.rglob("*.jpg"))]
    forward, backward = tmp_path / "forward.csv", tmp_path / "backward.csv"
    forward.write_text("\n".join(rows) + "\n")
    backward.write_text("\n".join([rows[0], *reversed(rows[1:])]) + "\n")
    found = []
    for name, manifest in (("a", forward), ("b", backward)):
        with Engine.open(tmp_path / name, model="tiny-test", create=True) as engine:
            engine.ingest(manifest, quiet=True)
            found.append(groups(engine))
    assert found[0] == found[1] and len(found[0]) == 4  # the original and its 3 copies, whatever the order

    manifest_path = tmp_path / "strict" / "manifest.json"
    with Engine.open(tmp_path / "strict", model="tiny-test", create=True) as engine:
        engine.ingest(write_catalog(tmp_path / "catalog2"), quiet=True)
    data = json.loads(manifest_path.read_text())
    data["duplicates"] = {"threshold": 1.0, "phash_distance": None, "k": 10}  # the same bytes only
    manifest_path.write_text(json.dumps(data))
    with Engine.open(tmp_path / "strict") as engine:
        assert engine.info()["duplicates"] == {**data["duplicates"], "images_not_linked": 0}
        for i, copy in enumerate(copies(4)):
            engine.put_product(f"copy-{i}", images=[copy])
        assert groups(engine) == {}


def test_products_sharing_one_picture_stay_grouped_when_the_first_ones_go(engine: Engine) -> None:
    picture = jpeg(make_image(40), 90)
    for n in range(14):  # each new image is linked to its k = 10 nearest only
        engine.put_product(f"same-{n:02d}", images=[picture])
    engine.remove_products([f"same-{n:02d}" for n in range(12)])
    assert groups(engine) == {"same-12": "same-12", "same-13": "same-12"}
    assert groups(engine) == from_scratch(engine)


def test_collapsed_keyword_and_region_searches(engine: Engine) -> None:
    for i, data in enumerate(copies(3)):
        engine.put_product(f"copy-{i}", title="red apple", images=[data])
    engine.put_product("solo", title="apple", images=[jpeg(make_image(40))])
    hits = engine.search(text="apple", k=2, collapse="variant_group")
    assert len(hits) == 2 and "solo" in {h.product_id for h in hits}  # the 3 copies are one result, not the first 2
    assert sorted(h.variant_count for h in hits) == [1, 4]
    regions = engine.search_regions(make_image(3), SearchOptions(k=5, collapse="variant_group"))
    groups_seen = [h.variant_group or h.product_id for h in regions]
    assert len(groups_seen) == len(set(groups_seen)) == 5
