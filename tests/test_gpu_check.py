"""scripts/gpu_check.py on the CPU: its --cpu run, and that its comparisons fail
when the other side is wrong (so a PASS on a GPU means something)."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from vsearch.index import VectorIndex, gpu_available
from vsearch.projection import l2_normalize

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


def test_cpu_run_runs_every_check_and_writes_the_summary(gpu_check: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--cpu", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    checks = {c["name"]: c for c in summary["checks"]}
    assert list(checks) == ["env", "images", "search_equal", "ivf_train", "ingest_rate", "batching"]
    assert summary["mode"] == "cpu" and summary["ok"] and not summary["expired_during"]
    assert {c["status"] for c in checks.values()} == {"SKIP", "PASS"}  # nothing on a GPU: SKIP, not PASS
    assert checks["images"]["status"] == "PASS"

    search = checks["search_equal"]["numbers"]  # compared against a CPU copy: identical
    assert search["flat_ids_equal"] == 1.0 and search["flat_unexplained"] == 0 and search["flat_max_score_diff"] == 0.0
    assert search["ivf_overlap"] == 1.0 and search["ivf_recall_cpu"] == search["ivf_recall_other"]
    for kind in ("flat", "ivf"):
        assert search[f"{kind}_filtered_unexplained"] == 0 and search[f"{kind}_filtered_recall_min"] > 0.5
        assert set(search[f"{kind}_filtered"]) == {"one", "half", "all_but_one"}
        assert all(f["ids_equal"] == 1.0 and f["outside"] == 0 and f["allowed"] > 0 for f in search[f"{kind}_filtered"].values())
        assert sum(search[f"{kind}_paths"].values()) > 0
    assert search["flat_paths"]["exact"] > 0 and search["ivf_paths"]["all"] > 0

    train = checks["ivf_train"]["numbers"]
    assert abs(train["recall_other"] - train["recall_cpu"]) <= 0.01 and train["recall_cpu"] > 0.5

    ingest = checks["ingest_rate"]["numbers"]
    sizes = gpu_check.CPU
    assert ingest["not_embedded"] == 0 and ingest["vectors"] == sizes.warm_images + sizes.images
    assert ingest["default_img_s"] > 0 and ingest["fwd_fp32_b8"] > 0 and ingest["autocast"] == "off (fp32)"

    batching = checks["batching"]["numbers"]
    assert batching["off_batch_max"] == 1 and batching["on_batch_max"] == 16
    assert batching["off_mean_batch"] == 1.0 and batching["off_errors"] == batching["on_errors"] == 0
    assert batching["ratio"] > 0


def test_the_search_comparison_fails_on_a_wrong_index(gpu_check: ModuleType) -> None:
    sizes = replace(gpu_check.CPU, vectors=2000, queries=40)

    def shifted(index: VectorIndex) -> VectorIndex:
        wrong = gpu_check.copy_index(index)
        wrong.remove(np.arange(5, 5 + 2 * sizes.vectors, 20))  # every tenth vector gone
        return wrong

    result = gpu_check.check_search(sizes, shifted, gpu=False)
    assert result.status == "FAIL"
    assert result.numbers["flat_unexplained"] > 0 and "flat results differ" in result.note
    assert "filtered" in result.note


def test_the_search_comparison_catches_hits_outside_the_filter(gpu_check: ModuleType) -> None:
    sizes = replace(gpu_check.CPU, vectors=2000, queries=40)

    class Unfiltered(VectorIndex):  # answers filtered searches without the filter
        def search(self, xq, k, blocks=None, cache=None):  # type: ignore[no-untyped-def]
            return super().search(xq, k)

    def unfiltered(index: VectorIndex) -> VectorIndex:
        return Unfiltered(gpu_check.copy_index(index).index, index.factory, index.nprobe)

    result = gpu_check.check_search(sizes, unfiltered, gpu=False)
    assert result.status == "FAIL" and "hits outside the filter" in result.note
    assert result.numbers["flat_ids_equal"] == 1.0 and "flat results differ" not in result.note  # unfiltered: agree


def test_the_training_comparison_fails_on_a_badly_trained_ivf(gpu_check: ModuleType) -> None:
    def on_noise(index: VectorIndex, xt: np.ndarray) -> None:
        noise = np.random.default_rng(5).standard_normal(xt.shape).astype(np.float32)
        index.train(l2_normalize(noise))

    result = gpu_check.check_ivf_training(gpu_check.CPU, on_noise, gpu=False)
    assert result.status == "FAIL"
    assert result.numbers["recall_other"] < result.numbers["recall_cpu"] - 0.01


def test_the_cpu_stand_in_trainer_matches_the_cpu(gpu_check: ModuleType) -> None:
    result = gpu_check.check_ivf_training(gpu_check.CPU, gpu_check.cpu_stand_in(gpu_check.CPU.dim), gpu=False)
    assert result.status == "SKIP" and "no GPU" in result.note


def test_verdicts_and_lines(gpu_check: ModuleType) -> None:
    assert [gpu_check.verdict(ok, gpu) for ok, gpu in ((True, True), (True, False), (False, True), (False, False))] == [
        "PASS",
        "SKIP",
        "FAIL",
        "FAIL",
    ]
    line = gpu_check.Result("batching", "PASS", {"ratio": 1.23456, "paths": {"all": 3}}, "note").line()
    assert line.startswith("PASS batching") and "ratio=1.235" in line and "paths" not in line and line.endswith("-- note")


@pytest.mark.skipif(gpu_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_gpu_run_stops_at_once(gpu_check: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    summary = json.loads(out.read_text())
    assert [(c["name"], c["status"]) for c in summary["checks"]] == [("env", "FAIL")]
    assert "no GPU visible" in summary["checks"][0]["note"] and not summary["ok"]


def test_equal_results_forgive_only_near_ties(gpu_check: ModuleType) -> None:
    D = np.array([[0.9, 0.8, 0.80001, 0.5]], dtype=np.float32)
    I = np.array([[1, 2, 3, 4]])
    assert gpu_check.compare_equal((D, I), (D, I)) == {"ids_equal": 1.0, "unexplained": 0, "max_score_diff": 0.0}
    swapped_tie = gpu_check.compare_equal((D, I), (D, np.array([[1, 3, 2, 4]])))
    assert swapped_tie["ids_equal"] == 0.5 and swapped_tie["unexplained"] == 0
    assert gpu_check.compare_equal((D, I), (D, np.array([[2, 1, 3, 4]])))["unexplained"] == 2  # 0.9 vs 0.8: no tie
    last_tie = (np.array([[0.9, 0.8, 0.80001, 0.50002]], dtype=np.float32), np.array([[1, 2, 3, 9]]))
    assert gpu_check.compare_equal((D, I), last_tie)["unexplained"] == 0  # the 5th hit, as good, took 4th place
    padded = (np.array([[0.9, -np.inf]], dtype=np.float32), np.array([[1, -1]]))
    assert gpu_check.compare_equal(padded, padded)["unexplained"] == 0
    assert gpu_check.compare_equal(padded, (np.array([[0.9, 0.1]], dtype=np.float32), np.array([[1, 7]])))["unexplained"] == 1
