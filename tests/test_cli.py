from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vsearch.cli import build_parser, main

from .conftest import committed_images, make_image

ROOT = Path(__file__).resolve().parents[1]
N_KILL = 240  # images in the kill -9 test: enough that the kill lands mid-run


def commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[arg-type]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_every_command_is_documented_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [c for c in commands() if not re.search(rf"vsearch {c}\b", readme)]
    assert not missing, f"README.md does not document: {missing}"


@pytest.mark.parametrize("command", commands())
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: vsearch {command}" in capsys.readouterr().out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["search"])
    assert exc.value.code == 2


def test_user_error_is_one_line_and_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "info", "--index", str(tmp_path / "nope"))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("vsearch: error: no index at")
    (tmp_path / "m.csv").write_text("sku,image\n")
    code, _, err = run(capsys, "ingest", str(tmp_path / "m.csv"), "--index", str(tmp_path / "i"), "--model", "tiny-test")
    assert code == 1 and "missing column(s) id" in err


def test_ingest_search_info_json(catalog_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = str(tmp_path / "idx")
    code, out, _ = run(
        capsys, "ingest", str(catalog_folder), "--index", index, "--model", "tiny-test", "--quiet", "--workers", "0"
    )
    assert code == 0 and "25 embedded" in out
    code, out, _ = run(capsys, "info", "--index", index, "--json")
    info = json.loads(out)
    assert (info["products"], info["images"], info["vectors"]) == (25, 25, 25)
    query = str(catalog_folder / "Fruit/Banana/p01.jpg")
    code, out, _ = run(capsys, "search", query, "--index", index, "--k", "3", "--category", "Fruit", "--json")
    results = json.loads(out)["results"]
    assert code == 0 and len(results) == 3 and results[0]["product_id"] == "Fruit/Banana/p01"
    code, _, err = run(capsys, "search", query, "--index", index, "--category", "Nope")
    assert code == 1 and "no category matches 'Nope'" in err


def test_kill_9_mid_ingest_then_rerun_gives_one_vector_per_image(tmp_path: Path) -> None:
    source = tmp_path / "many"
    for n in range(N_KILL):
        folder = source / f"c{n % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        make_image(n, size=(160, 160)).save(folder / f"{n}.png")
    index = tmp_path / "idx"
    cmd = [sys.executable, "-m", "vsearch", "ingest", str(source), "--index", str(index), "--model", "tiny-test"]
    cmd += ["--quiet", "--batch-size", "4", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None:
        committed = committed_images(index / "catalog.db")
        if committed >= 8:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < committed_images(index / "catalog.db") < N_KILL, "the kill must land mid-run for this test to mean anything"
    done = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, check=True)
    report = json.loads(done.stdout)
    assert report["embedded"] + report["unchanged"] == N_KILL
    assert report["index"]["images"] == report["index"]["vectors"] == N_KILL
    with sqlite3.connect(index / "catalog.db") as db:
        assert db.execute("SELECT count(DISTINCT sha256) FROM images").fetchone()[0] == N_KILL
