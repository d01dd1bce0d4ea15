"""End to end in a real browser: Debian's Chromium driven by Playwright.

Fails (does not skip) when Chromium cannot start: scripts/test installs it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from vsearch import Engine

from .api_helpers import build_small_index, jpeg

CHROMIUM = os.environ.get("VSEARCH_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots" / "browser-e2e.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    index = build_small_index(tmp_path_factory.mktemp("browser"))
    with Engine.open(index) as engine:  # attributes for the facet chips: even products dark, odd light
        for pid in sorted(engine.catalog.product_ids()):
            product = engine.product(pid).product
            shade = "dark" if int(pid[-2:]) % 2 == 0 else "light"
            engine.put_product(pid, title=product.title, category=product.category, attributes={"shade": shade})
        [p02] = [engine.product(pid).product for pid in engine.catalog.product_ids() if pid.endswith("p02")]
        for n, quality in ((1, 60), (2, 40)):  # re-encoded copies of p02's picture: its variant group
            engine.put_product(f"p02-variant-{n}", title="p02", category=p02.category, images=[jpeg(2, quality=quality)])
    port = free_port()
    cmd = [sys.executable, "-m", "vsearch", "serve", "--index", str(index), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=1) as r:  # noqa: S310 - loopback
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode() if proc.stdout else ""
                    pytest.fail(f"vsearch serve did not become ready:\n{out}")
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_shopper_flow_in_chromium(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg(2, size=(240, 200)))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 860})
            outside: list[str] = []
            page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else outside.append(r.url))
            page.goto(server + "/")
            expect(page.locator("#categories .chip").first).to_be_visible()

            page.set_input_files("#file", str(photo))
            cards = page.locator("#results .card")
            expect(cards.first).to_be_visible()
            expect(cards.first.locator(".title")).to_have_text("p02")
            expect(cards.first.locator(".variants")).to_have_text("3 variants")  # p02 and its two copies: one card
            assert cards.locator(".title").all_inner_texts().count("p02") == 1
            expect(page.locator("#suggested .chip").first).to_be_visible()

            page.locator("#categories .chip", has_text="Fruit").click()
            expect(page.locator("#categories .chip", has_text="Apple")).to_be_visible()  # sub-categories open
            expect(cards.first.locator(".category")).to_contain_text("Fruit/")
            categories = cards.locator(".category").all_inner_texts()
            assert categories and all(c.startswith("Fruit/") for c in categories)

            page.locator("#categories .chip", has_text="All").click()
            shade = page.locator("#facets [data-field=shade]")
            expect(shade.locator(".chip", has_text="dark (13)")).to_be_visible()  # 13 of the 25 products
            shade.locator(".chip", has_text="dark").click()
            expect(shade.locator(".chip[aria-pressed=true]")).to_have_text("dark (13)")
            expect(page.locator("#status")).to_contain_text("12 products")
            titles = cards.locator(".title").all_inner_texts()
            assert titles and all(int(t[-2:]) % 2 == 0 for t in titles), titles
            shade.locator(".chip", has_text="dark").click()  # off again

            first_title = cards.first.locator(".title").inner_text()
            cards.first.get_by_role("button", name="More like").click()
            expect(page.locator("#preview-label")).to_have_text(f"More like: {first_title}")
            expect(page.locator("#status")).to_contain_text("products")
            assert first_title not in cards.locator(".title").all_inner_texts()

            page.get_by_role("button", name="New search").click()
            page.fill("#url", "http://127.0.0.1:1/secret.jpg")
            page.get_by_role("button", name="Search", exact=True).click()
            expect(page.locator("#error")).to_contain_text("not public")

            # words alone: a keyword search (titles are the file names); then beside the photo, fused
            page.get_by_role("button", name="New search").click()
            page.fill("#words", "p07")
            page.get_by_role("button", name="Find").click()
            expect(cards.first.locator(".title")).to_have_text("p07")
            expect(cards.first.locator(".score")).to_have_text("words match 100%")
            page.set_input_files("#file", str(photo))  # p02's picture: p02 first by the photo alone
            expect(cards.first.locator(".score")).to_have_text("photo + words")
            assert cards.locator(".title").all_inner_texts()[:2] == ["p07", "p02"]
            page.fill("#words", "")
            page.get_by_role("button", name="Find").click()  # the words gone: the photo alone
            expect(cards.first.locator(".title")).to_have_text("p02")

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.set_input_files("#file", str(photo))
            expect(cards.first).to_be_visible()
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            assert not outside, f"the page made external requests: {outside}"
        finally:
            browser.close()
