"""``vsearch serve`` and ``demo``: run the HTTP API and web page on an index."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_common import Command, index_arg

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["add_demo", "add_serve"]


def add_serve(command: Command, env: Settings) -> None:
    p = command("serve", _serve, "Serve the HTTP API (/v1), the web page (/) and the OpenAPI docs (/docs).")
    index_arg(p, env.index_dir)
    _serve_args(p)


def add_demo(command: Command, env: Settings) -> None:
    p = command("demo", _demo, "Build a demo index from a product-image folder, then serve it.")
    p.add_argument("--data", default=env.demo_data, help="data folder, e.g. ../shared/datasets/grocery-store")
    index_arg(p, "indexes/demo")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-serve", action="store_true", help="build the index and exit")
    _serve_args(p)


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--config", help="JSON file of serve settings (API keys, limits); env VSEARCH_CONFIG")
    p.add_argument(
        "--batch-max", type=int, help="micro-batch size: concurrent queries share a forward (1: off; default 16 on GPU, 1 on CPU)"
    )


def _demo(args: argparse.Namespace) -> int:
    from .demo import build_demo

    build_demo(args.data, args.index, quiet=args.quiet).close()
    return 0 if args.no_serve else _serve(args)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api import create_app
    from .settings import serve_config

    config = serve_config(args.config, index_dir=str(args.index), batch_max=args.batch_max)
    if not Path(config.index_dir, "manifest.json").exists():
        from .errors import IndexNotFoundError

        raise IndexNotFoundError(
            f"no index at {config.index_dir} (build one with: vsearch ingest SOURCE --index {config.index_dir})"
        )
    print(f"vsearch: serving {config.index_dir} at http://{args.host}:{args.port}/ (API docs at /docs)", flush=True)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0
