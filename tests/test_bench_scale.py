"""scripts/bench_scale.py at a tiny size, so the benchmark cannot rot: it imports,
builds raw faiss, searches, writes, kills a writer and reopens, and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_scale.py"


def test_bench_scale_runs(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(SCRIPT), "--sizes", "3000", "--queries", "20", "--writes", "10", "--crashes", "1"]
    done = subprocess.run(
        [*cmd, "--fill-store", "--out", str(out), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "### 3,000 images" in done.stdout and "### Targets" in done.stdout
    result = json.loads(out.read_text())["results"][0]
    assert result["images"] == 3000 and result["factory"] == "IDMap2,Flat"
    for mode in ("all", "c01", "c10", "c50"):
        row = result["search"][mode]
        assert row["engine"]["recall_at_10"] > 0.99  # a Flat index is exact
        assert row["faiss"]["recall_at_10"] > 0.99
    assert result["crashes"]["lost"] == 0 and result["crashes"]["acked"] > 0
    assert result["writes"]["filled_store"]["files"] == 3000
    assert not list(tmp_path.glob("bench_scale-*")), "the work directory is removed"
