"""What the ``vsearch`` command modules share: the registration signature and small formatters."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Command", "Run", "index_arg", "plural", "print_json", "verb"]

Run = Callable[[argparse.Namespace], int]
Command = Callable[[str, Run, str], argparse.ArgumentParser]
"""``command(name, run, help)``: add a subcommand that calls ``run(args)``; returns its parser."""


def index_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--index", default=default, type=Path, help=f"index directory (default: {default}; env VSEARCH_INDEX)")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def verb(n: int, verb: str) -> str:
    return f"{verb}s" if n == 1 else verb


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))
