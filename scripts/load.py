#!/usr/bin/env python3
"""Load tool (not a test): many shoppers uploading real photos to a running server.

N clients upload photos (default: the grocery-store val photos) to /v1/search for D
seconds, each on its own keep-alive connection; optionally one writer client adds and
deletes products through the API (needs the server's write key), and more clients
upload photos beside a hostile payload (--also-photos); a poller calls /healthz,
/readyz, /v1/categories and the page throughout. Prints requests, answers by status,
p50/p99 latency of the 200s, dropped connections, 429/503s without Retry-After, the
polled endpoints' worst latency, and the server's RSS at the start, at its peak, at
the end and after a quiet period (read from /proc/PID/status).

Either point it at a server (``--url``, with ``--server-pid`` for RSS) or let it start
one (``--index DIR``; it then owns the write key):

    python scripts/load.py --index /tmp/loadidx --clients 8 --seconds 60 --writer
    python scripts/load.py --url http://127.0.0.1:8000 --server-pid 1234 --clients 32

``--payload`` replays issue 9's hostile traffic instead of photos: ``huge-jpeg`` (a
620 KB JPEG of 39.7 megapixels), ``huge-png`` (a PNG of 36 megapixels, a few KB) or
``slow-url`` (image_url searches of a local server dripping a byte every 5 s; a
server this tool starts is configured to allow private URLs).

Clients honour Retry-After (sleep that long, at most 2 s) unless --no-backoff.
Exit status 0 whatever the figures; read them.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "grocery-store" / "dataset"
WRITE_KEY = "load-test-key"
POLLED = ("/healthz", "/readyz", "/v1/categories", "/")  # a load balancer's checks, a catalog read, the page


@dataclass
class Tally:
    """What the clients saw; every field is updated under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    dropped: int = 0  # connection refused, reset or closed mid-answer, timeouts
    no_retry_after: int = 0  # 429/503 without a Retry-After header
    writes: Counter[str] = field(default_factory=Counter)
    health_max: dict[str, float] = field(default_factory=lambda: dict.fromkeys(POLLED, 0.0))
    health_failures: Counter[str] = field(default_factory=Counter)
    rss_peak_kb: int = 0


def multipart(fields: dict[str, str], image: bytes, name: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\nContent-Type: image/jpeg\r\n\r\n'
    body = b"".join(parts) + head.encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Client:
    """One keep-alive connection; a dropped one is counted and reopened."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        """(status, headers, seconds), or None when the connection dropped."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        start = time.perf_counter()
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            return None
        if response.getheader("Connection", "").lower() == "close":
            self.conn.close()
            self.conn = None
        return response.status, response, time.perf_counter() - start


def backoff(response: http.client.HTTPResponse, enabled: bool) -> None:
    if enabled:
        try:
            time.sleep(min(2.0, float(response.getheader("Retry-After") or 1)))
        except ValueError:
            time.sleep(1.0)


def searcher(args: argparse.Namespace, photos: list[bytes], tally: Tally, seed: int, until: float) -> None:
    rnd = random.Random(seed)
    client = Client(args.host, args.port, args.timeout)
    while time.monotonic() < until:
        if args.slow_url:
            body, ctype = json.dumps({"image_url": args.slow_url}).encode(), "application/json"
        else:
            body, ctype = multipart({}, photos[rnd.randrange(len(photos))], "q.jpg")
        answer = client.request("POST", "/v1/search?k=10", body, {"Content-Type": ctype})
        with tally.lock:
            if answer is None:
                tally.dropped += 1
                continue
            status, response, seconds = answer
            tally.statuses[str(status)] += 1
            if status == 200:
                tally.latencies.append(seconds)
            elif status in (429, 503) and not response.getheader("Retry-After"):
                tally.no_retry_after += 1
        if answer[0] in (429, 503):
            backoff(answer[1], not args.no_backoff)


def writer(args: argparse.Namespace, photos: list[bytes], tally: Tally, until: float) -> None:
    """Adds a product with one photo, then deletes it, over and over."""
    client = Client(args.host, args.port, args.timeout)
    key = {"Authorization": f"Bearer {args.key}"}
    n = 0
    while time.monotonic() < until:
        pid = f"load-{os.getpid()}-{n}"
        n += 1
        body, ctype = multipart({"id": pid, "title": pid, "category": "Load/Test"}, photos[n % len(photos)], "p.jpg")
        for method, path, payload, headers in (
            ("POST", "/v1/products", body, {**key, "Content-Type": ctype}),
            ("DELETE", f"/v1/products/{pid}", None, key),
        ):
            answer = client.request(method, path, payload, headers)
            with tally.lock:
                if answer is None:
                    tally.dropped += 1
                else:
                    tally.writes[f"{method} {answer[0]}"] += 1
                    if answer[0] in (429, 503) and not answer[1].getheader("Retry-After"):
                        tally.no_retry_after += 1
            if answer is None or answer[0] >= 300:
                break
        time.sleep(args.write_pause)


def poller(args: argparse.Namespace, tally: Tally, pid: int | None, stop: threading.Event) -> None:
    """POLLED every 0.25 s on fresh connections (as a load balancer would), and the
    server's RSS."""
    while not stop.wait(0.25):
        for path in POLLED:
            answer = Client(args.host, args.port, args.timeout).request("GET", path)
            with tally.lock:
                if answer is None or answer[0] != 200:
                    tally.health_failures[f"{path} {answer[0] if answer else 'dropped'}"] += 1
                if answer is not None:
                    tally.health_max[path] = max(tally.health_max[path], answer[2])
        if pid is not None:
            tally.rss_peak_kb = max(tally.rss_peak_kb, rss_kb(pid))


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def hostile_photo(kind: str) -> bytes:
    """Issue 9's small files that decode to hundreds of megabytes."""
    from PIL import Image, ImageDraw

    size = (7700, 5160) if kind == "huge-jpeg" else (6000, 6000)
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), fill="red")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=50) if kind == "huge-jpeg" else image.save(buffer, format="PNG")
    return buffer.getvalue()


def dripping_server() -> str:
    """A loopback server answering every GET with one byte every 5 s, for a minute."""

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(12):
                try:
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(5)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/slow.jpg"


def start_server(index: Path, config: dict[str, object]) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "VSEARCH_API_KEY": WRITE_KEY}
    cmd = [sys.executable, "-m", "vsearch", "serve", "--index", str(index), "--port", str(port)]
    if config:
        path = Path(f"/tmp/vsearch-load-{port}.json")
        path.write_text(json.dumps(config))
        cmd += ["--config", str(path)]
    proc = subprocess.Popen(cmd, env=env)
    for _ in range(1200):
        answer = Client("127.0.0.1", port, 2).request("GET", "/readyz")
        if answer is not None and answer[0] == 200:
            return proc, port
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not become ready")


def report(args: argparse.Namespace, tally: Tally, wall: float, rss: dict[str, int]) -> dict[str, object]:
    ms = sorted(x * 1000 for x in tally.latencies)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p / 100 * len(ms)))], 1) if ms else float("nan")

    total = sum(tally.statuses.values())
    return {
        "payload": args.payload,
        "clients": args.clients,
        "also_photos": args.also_photos,
        "seconds": round(wall, 1),
        "requests": total,
        "ok_per_s": round(len(ms) / wall, 2),
        "statuses": dict(sorted(tally.statuses.items())),
        "errors": total - tally.statuses.get("200", 0),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "dropped_connections": tally.dropped,
        "refusals_without_retry_after": tally.no_retry_after,
        "writes": dict(sorted(tally.writes.items())),
        "health_max_ms": {k: round(v * 1000, 1) for k, v in tally.health_max.items()},
        "health_failures": dict(tally.health_failures),
        "rss_mb": {k: round(v / 1024, 1) for k, v in rss.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--server-pid", type=int, help="its process id, for RSS")
    parser.add_argument("--index", type=Path, help="start `vsearch serve` on this index instead")
    parser.add_argument("--config", default="{}", help="serve config JSON for a server this tool starts")
    parser.add_argument("--key", default=os.environ.get("VSEARCH_API_KEY", WRITE_KEY), help="write key (--writer)")
    parser.add_argument("--photos", type=Path, default=DATA / "val")
    parser.add_argument("--payload", choices=("photos", "huge-jpeg", "huge-png", "slow-url"), default="photos")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--writer", action="store_true", help="one more client adding and deleting products")
    parser.add_argument("--also-photos", type=int, default=0, help="clients uploading photos beside --payload's")
    parser.add_argument("--write-pause", type=float, default=0.5, help="seconds between the writer's products")
    parser.add_argument("--warmup", type=float, default=5, help="seconds of load before RSS at start is read")
    parser.add_argument("--settle", type=float, default=30, help="quiet seconds before the last RSS reading")
    parser.add_argument("--timeout", type=float, default=60, help="client socket timeout")
    parser.add_argument("--no-backoff", action="store_true", help="retry 429/503 at once instead of after Retry-After")
    args = parser.parse_args()

    photos = [p.read_bytes() for p in sorted(args.photos.rglob("*.jpg"))[:300]]
    if not photos:
        print(f"no photos under {args.photos}", file=sys.stderr)
        return 1
    args.slow_url = dripping_server() if args.payload == "slow-url" else None
    hostile = [hostile_photo(args.payload)] if args.payload in ("huge-jpeg", "huge-png") else None
    config = json.loads(args.config)
    if args.slow_url:
        config.setdefault("allow_private_urls", True)
    proc = None
    if args.index:
        proc, args.port = start_server(args.index, config)
        args.host, pid = "127.0.0.1", proc.pid
        args.key = WRITE_KEY
    elif args.url:
        parts = urlsplit(args.url)
        args.host, args.port, pid = parts.hostname or "127.0.0.1", parts.port or 80, args.server_pid
    else:
        parser.error("give --url or --index")
    try:
        rss: dict[str, int] = {}
        if pid is not None:
            rss["idle_before"] = rss_kb(pid)
        if args.warmup > 0:
            warm = Tally()
            until = time.monotonic() + args.warmup
            threads = [
                threading.Thread(target=searcher, args=(args, photos, warm, i, until)) for i in range(min(2, args.clients))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if pid is not None:
            rss["start"] = rss_kb(pid)
        tally, stop = Tally(), threading.Event()
        health = threading.Thread(target=poller, args=(args, tally, pid, stop))
        health.start()
        begin = time.monotonic()
        until = begin + args.seconds
        payload = hostile or photos
        threads = [threading.Thread(target=searcher, args=(args, payload, tally, 1000 + i, until)) for i in range(args.clients)]
        plain, side = argparse.Namespace(**{**vars(args), "slow_url": None}), Tally()
        threads += [
            threading.Thread(target=searcher, args=(plain, photos, side, 2000 + i, until)) for i in range(args.also_photos)
        ]
        if args.writer:
            threads.append(threading.Thread(target=writer, args=(args, photos, tally, until)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - begin
        if pid is not None:
            rss["end"] = rss_kb(pid)
        time.sleep(args.settle)
        stop.set()
        health.join()
        if pid is not None:
            rss["peak"], rss["after_settle"] = tally.rss_peak_kb, rss_kb(pid)
        result = report(args, tally, wall, rss)
        if args.also_photos:
            beside = report(args, side, wall, {})
            result["also_photos_result"] = {k: beside[k] for k in ("statuses", "p50_ms", "p99_ms", "dropped_connections")}
        if rss.get("start"):
            for when in ("end", "after_settle"):
                result[f"rss_growth_pct_{when}"] = round(100 * (rss[when] - rss["start"]) / rss["start"], 1)
        print(json.dumps(result, indent=1))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
