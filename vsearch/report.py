"""An evaluation as one self-contained HTML page: the page a merchant opens to decide
whether fine-tuning is worth it.

Numbers say *how often* retrieval fails; the page shows *how*: Recall@k per category
(which part of the catalog is weak), the product pairs confused most often (what the
model mistakes for what), and the worst misses as pictures (the query photo, its top
results and the product it should have found). The page makes no request at all: the
CSS is inline and every image is a small base64 JPEG thumbnail, so it can be mailed,
archived or opened offline. Every text from the data is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, VsearchError
from .fsutil import atomic_write
from .images import decode_image

if TYPE_CHECKING:
    from PIL import Image

    from .engine import Engine
    from .evaluate import QueryResult

__all__ = ["report_folder", "write_report", "render_report", "confused_pairs", "worst_misses", "recall_by_category"]

THUMB_SIDE = 128  # pixels on the long side: enough to recognise a product, ~4 kB each
MAX_MISSES = 20
MAX_PAIRS = 20
TOP_HITS = 5
RECALL_AT = (1, 5, 10)


def report_folder(directory: Path) -> Path:
    """Create ``directory`` (a ConfigError if it cannot be) and return the page's
    path in it, ``DIR/index.html``; called before the evaluation so that a bad path
    fails at once instead of after the slow part."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"--report {directory}: not a folder") from None
    except OSError as exc:
        raise ConfigError(f"--report {directory}: cannot create it: {exc.strerror}") from None
    return directory / "index.html"


def write_report(directory: Path, metrics: Mapping[str, Any], results: Sequence[QueryResult], engine: Engine) -> Path:
    """Write the page for ``results`` (searched in ``engine``'s index, which is read
    for the catalog's images and categories) atomically to ``DIR/index.html``."""
    path = report_folder(directory)
    data = render_report(metrics, results, engine).encode("utf-8")

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)
        os.chmod(tmp, 0o644)  # a page to share, not the 0600 of a temporary file

    atomic_write(path, write)
    return path


def render_report(metrics: Mapping[str, Any], results: Sequence[QueryResult], engine: Engine) -> str:
    """The page's HTML: summary, Recall@k per category, confused pairs, worst misses."""
    images = _Images(engine)
    shown = {r.query.expected_id for r in results if r.query.expected_id}
    shown |= {h.product_id for r in results for h in r.hits[:TOP_HITS]}
    products = engine.catalog.products(sorted(shown))
    titles = {pid: p.title for pid, p in products.items() if p.title and p.title != pid}
    body = [
        "<h1>vsearch evaluation</h1>",
        _summary_section(metrics),
        _category_section(recall_by_category(results, {pid: p.category for pid, p in products.items()})),
        _pairs_section(confused_pairs(results)[:MAX_PAIRS], titles),
        _misses_section(worst_misses(results, MAX_MISSES), images, titles),
    ]
    return _page("\n".join(body))


def confused_pairs(results: Sequence[QueryResult]) -> list[tuple[str, str, int]]:
    """(expected product, product ranked first instead, how many queries), most
    frequent first: the model's systematic mistakes, which fine-tuning can fix."""
    pairs = Counter(
        (r.query.expected_id, r.hits[0].product_id)
        for r in results
        if r.query.expected_id and r.hits and r.hits[0].product_id != r.query.expected_id
    )
    return [(e, f, n) for (e, f), n in sorted(pairs.items(), key=lambda item: (-item[1], item[0]))]


def worst_misses(results: Sequence[QueryResult], limit: int = MAX_MISSES) -> list[QueryResult]:
    """Up to ``limit`` queries whose expected product was not ranked first, the
    lowest-ranked first (not found at all is lowest); ties keep the queries' order."""
    missed = [r for r in results if r.query.expected_id and r.rank != 1]
    return sorted(missed, key=lambda r: (r.rank is not None, -(r.rank or 0)))[:limit]


def recall_by_category(results: Sequence[QueryResult], categories: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per category, the queries with an expected product and their Recall@1/5/10.

    A query's category is its own ``category`` column, else its expected product's
    catalog category (``categories``: product id to category)."""
    ranks: dict[str, list[int | None]] = {}
    for r in results:
        if r.query.expected_id:
            name = r.query.category or categories.get(r.query.expected_id) or "(none)"
            ranks.setdefault(name, []).append(r.rank)
    table = {}
    for name in sorted(ranks):
        found = ranks[name]
        row: dict[str, Any] = {"queries": len(found)}
        for k in RECALL_AT:
            row[f"recall@{k}"] = round(sum(1 for rank in found if rank is not None and rank <= k) / len(found), 4)
        table[name] = row
    return table


# sections ----------------------------------------------------------------------


def _summary_section(metrics: Mapping[str, Any]) -> str:
    rows = "".join(
        f'<tr data-metric="{_e(key)}"><th>{_e(key)}</th><td>{_e(_value(value))}</td></tr>' for key, value in metrics.items()
    )
    return f'<h2>Summary</h2>\n<table id="summary"><tbody>{rows}</tbody></table>'


def _category_section(table: Mapping[str, Mapping[str, Any]]) -> str:
    if not table:
        return "<h2>Recall@k per category</h2>\n<p>No query names an expected product.</p>"
    head = "<tr><th>category</th><th>queries</th>" + "".join(f"<th>recall@{k}</th>" for k in RECALL_AT) + "</tr>"
    rows = "".join(
        f'<tr data-category="{_e(name)}"><td>{_e(name)}</td><td class="num">{row["queries"]}</td>'
        + "".join(f'<td class="num">{row[f"recall@{k}"]:.4f}</td>' for k in RECALL_AT)
        + "</tr>"
        for name, row in table.items()
    )
    return f'<h2>Recall@k per category</h2>\n<table id="categories"><thead>{head}</thead><tbody>{rows}</tbody></table>'


def _pairs_section(pairs: Sequence[tuple[str, str, int]], titles: Mapping[str, str]) -> str:
    title = "<h2>Most confused products</h2>"
    if not pairs:
        return f"{title}\n<p>Every query with an expected product found it first.</p>"
    head = "<tr><th>expected product</th><th>ranked first instead</th><th>queries</th></tr>"
    rows = "".join(
        f'<tr data-expected="{_e(e)}" data-first="{_e(f)}"><td>{_label(e, titles)}</td><td>{_label(f, titles)}</td>'
        f'<td class="num">{n}</td></tr>'
        for e, f, n in pairs
    )
    return f'{title}\n<table id="confused"><thead>{head}</thead><tbody>{rows}</tbody></table>'


def _misses_section(misses: Sequence[QueryResult], images: _Images, titles: Mapping[str, str]) -> str:
    title = f"<h2>Worst misses (up to {MAX_MISSES}, lowest-ranked first)</h2>"
    if not misses:
        return f"{title}\n<p>No misses: every expected product was ranked first.</p>"
    return f'{title}\n<div id="misses">' + "".join(_miss(r, images, titles) for r in misses) + "</div>"


def _miss(result: QueryResult, images: _Images, titles: Mapping[str, str]) -> str:
    """One miss: the query photo, its top results, and the expected product's image."""
    query, rank = result.query, result.rank
    if rank is not None:
        where = f"ranked {rank}"
    else:
        where = f"not in the top {len(result.hits)}" if result.hits else "no results (unreadable query photo?)"
    cells = [_figure(images.query(query.image), "query", _e(query.image))]
    cells += [
        _figure(
            images.catalog(h.image_id),
            f"{n}. {_label(h.product_id, titles)}",
            f"{h.score:.4f}",
            h.product_id == query.expected_id,
        )
        for n, h in enumerate(result.hits[:TOP_HITS], start=1)
    ]
    cells.append(_figure(images.expected(query.expected_id), f"expected: {_label(query.expected_id, titles)}", _e(where), True))
    return f'<div class="miss" data-expected="{_e(query.expected_id)}">' + "".join(cells) + "</div>"


def _figure(thumb: str | None, caption: str, detail: str, expected: bool = False) -> str:
    """A thumbnail with its caption and detail (HTML, escaped by the caller)."""
    picture = f'<img class="thumb" alt="" src="{thumb}">' if thumb else '<div class="noimg">no image</div>'
    cls = "expected" if expected else ""
    return f'<figure class="{cls}">{picture}<figcaption>{caption}<br><small>{detail}</small></figcaption></figure>'


def _page(body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>vsearch evaluation</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.miss { display: flex; gap: 8px; align-items: flex-start; border-top: 1px solid #ddd; padding: 8px 0; }
figure { margin: 0; width: 136px; font-size: 12px; word-break: break-all; }
figure.expected img, figure.expected .noimg { outline: 3px solid #2a8; }
.title { color: #666; }
.thumb { max-width: 128px; max-height: 128px; display: block; }
.noimg { width: 128px; height: 64px; background: #eee; color: #888; display: flex; align-items: center; justify-content: center; }
"""


# images --------------------------------------------------------------------------


class _Images:
    """Thumbnails as data: URIs, each image decoded once; None for one that cannot
    be read (a moved file, an unreachable URL): the page still shows the rest."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cache: dict[str | int, str | None] = {}

    def query(self, source: str) -> str | None:
        if source not in self.cache:
            self.cache[source] = self._thumb(lambda: self.engine.load_query(source))
        return self.cache[source]

    def catalog(self, image_id: int) -> str | None:
        if image_id not in self.cache:

            def load() -> Image.Image:
                row = self.engine.image(image_id)
                return decode_image(self.engine.image_bytes(row), row.source, max_side=THUMB_SIDE * 2)

            self.cache[image_id] = self._thumb(load)
        return self.cache[image_id]

    def expected(self, product_id: str) -> str | None:
        """The expected product's first catalog image."""
        try:
            images = self.engine.product(product_id).images
        except VsearchError:  # not in the catalog: the query file names an unknown product
            return None
        return self.catalog(images[0].id) if images else None

    @staticmethod
    def _thumb(load: Callable[[], Image.Image]) -> str | None:
        try:
            image = load().convert("RGB")
        except (VsearchError, OSError, ValueError):
            return None
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=75)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _label(product_id: str, titles: Mapping[str, str]) -> str:
    """A product id, with its title where the catalog has one, as escaped HTML."""
    title = titles.get(product_id)
    return _e(product_id) + (f' <span class="title">{_e(title)}</span>' if title else "")


def _value(value: Any) -> str:
    return "-" if value is None else str(value)


def _e(text: str) -> str:
    return html.escape(text, quote=True)
