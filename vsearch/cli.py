"""The ``vsearch`` command: parse arguments, call one library function, print.

User errors print one line and exit 1; usage errors exit 2 (argparse).

Each command's arguments and implementation live in a module by noun: ``cli_catalog``
(ingest, import, export, dups, info), ``cli_search`` (search, eval), ``cli_models``
(finetune, reindex, refit, model, models) and ``cli_serve`` (serve, demo). Heavy
libraries (torch, faiss, uvicorn) are imported inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import cli_catalog, cli_models, cli_search, cli_serve
from .cli_common import Run
from .errors import VsearchError
from .settings import settings

__all__ = ["main", "build_parser"]

# The order `vsearch --help` lists the commands in.
_COMMANDS = (
    cli_catalog.add_ingest,
    cli_catalog.add_import,
    cli_catalog.add_export,
    cli_search.add_search,
    cli_catalog.add_dups,
    cli_catalog.add_info,
    cli_search.add_eval,
    cli_models.add_finetune,
    cli_models.add_reindex,
    cli_models.add_refit,
    cli_models.add_model,
    cli_models.add_models,
    cli_serve.add_serve,
    cli_serve.add_demo,
)


def main(argv: Sequence[str] | None = None) -> int:
    from .malloc import tune_malloc

    tune_malloc()  # before torch allocates anything; see vsearch/malloc.py
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "search" and args.image is None and not args.text:  # a usage error: exit 2
        parser.error("search needs an image, --text WORDS, or both")
    try:
        code: int = args.run(args)
        return code
    except VsearchError as exc:
        print(f"vsearch: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vsearch: interrupted; committed work is kept, re-run to resume", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    env = settings()
    parser = argparse.ArgumentParser(prog="vsearch", description="Visual similarity search for product catalogs.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Run, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(run=run)
        return p

    for add in _COMMANDS:
        add(command, env)
    return parser


def _version() -> str:
    from .version import __version__

    return f"vsearch {__version__}"
