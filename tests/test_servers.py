"""Several servers on one index directory (issue 10 §5): two `vsearch serve`
processes answer from the saved index plus the catalog's change log while a third
process writes; each follows the writer and they answer identically."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from .api_helpers import build_small_index
from .conftest import make_image
from .test_browser import free_port

WRITER = textwrap.dedent(
    """
    import sys
    from vsearch import Engine
    index, folder = sys.argv[1], sys.argv[2]
    with Engine.open(index) as engine:
        for line in sys.stdin:
            verb, *names = line.split()
            for name in names:
                if verb == "put":
                    engine.put_product(name, category="Written", images=[f"{folder}/{name}.png"])
                else:
                    engine.delete_product(name)
            print(engine.catalog.generation, flush=True)
    """
)


@contextmanager
def server(index: Path, config: Path) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "vsearch", "serve", "--index", str(index), "--port", str(port), "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                get(base, "/readyz")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(20)


def get(base: str, path: str) -> dict[str, object]:
    with urllib.request.urlopen(base + path, timeout=30) as r:  # noqa: S310 - loopback
        return json.loads(r.read())  # type: ignore[no-any-return]


def similar(base: str, product_id: str = "", photo: Path | None = None) -> list[tuple[str, float]]:
    query = {"image_base64": base64.b64encode(photo.read_bytes()).decode()} if photo else {"product_id": product_id}
    body = json.dumps({**query, "k": 8}).encode()
    request = urllib.request.Request(base + "/v1/search", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 - loopback
        return [(hit["product_id"], round(hit["score"], 5)) for hit in json.loads(r.read())["results"]]


def wait_for_generation(servers: list[str], generation: int) -> None:
    deadline = time.monotonic() + 60
    while any(get(base, "/v1/info")["catalog_generation"] != generation for base in servers):
        assert time.monotonic() < deadline, "a server did not follow the writer"
        time.sleep(0.1)


def test_two_servers_follow_a_third_process_writing_and_answer_identically(tmp_path: Path) -> None:
    index = build_small_index(tmp_path)
    folder = tmp_path / "new"
    folder.mkdir()
    rounds = [[f"w{r}{i}" for i in range(4)] for r in range(2)]
    for n, name in enumerate(name for names in rounds for name in names):
        make_image(700 + n).save(folder / f"{name}.png")
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"reload_interval_s": 0.2}))
    old = ["Fruit/Apple/p00", "Bakery/p04", "Dairy/Milk/p12"]
    with ExitStack() as stack:
        servers = [stack.enter_context(server(index, config)) for _ in range(2)]
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(index), str(folder)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdin is not None and writer.stdout is not None

        def command(line: str) -> int:
            writer.stdin.write(line + "\n")  # type: ignore[union-attr]
            writer.stdin.flush()  # type: ignore[union-attr]
            return int(writer.stdout.readline())  # type: ignore[union-attr]

        try:
            written: list[str] = []
            for names in rounds:
                generation = command("put " + " ".join(names))
                written += names
                wait_for_generation(servers, generation)
                for base in servers:
                    assert get(base, "/v1/info")["vectors"] == 25 + len(written)
                for product_id in old + written:
                    first, second = (similar(base, product_id) for base in servers)
                    assert first == second, product_id
                for base in servers:  # the new products are found by their own photos
                    assert similar(base, photo=folder / f"{names[0]}.png")[0][0] == names[0]
            generation = command("delete " + " ".join(rounds[0]))
            wait_for_generation(servers, generation)
            for product_id in old + rounds[1]:
                first, second = (similar(base, product_id) for base in servers)
                assert first == second
                assert not {pid for pid, _ in first} & set(rounds[0])
        finally:
            writer.stdin.close()
            writer.wait(30)
