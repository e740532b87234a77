"""Owns `orchestrator validate FILE`: check a graph file and print every problem with its line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from orchestrator.graph import GraphError, GraphFileError, GraphSpec

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "validate", help="check a task graph file and report every problem",
        description="Check a task graph (TOML). Prints 'OK: N tasks, M agents', or every problem "
        "as FILE:LINE: message with a hint, and exits 2.")
    p.add_argument("file", metavar="FILE", help="the task graph (TOML)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        graph = GraphSpec.from_toml(args.file)
    except GraphError as exc:
        print(exc.render(), file=sys.stderr)
        n = len(exc.problems)
        print(f"{n} problem{'s' if n != 1 else ''} in {args.file}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except GraphFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"OK: {len(graph.tasks)} tasks, {len(graph.agents)} agents")
    # not problems: remote workers may have what this environment lacks
    for line in graph.unset_keys(os.environ) + graph.unimportable_tools():
        print(f"note: {line}", file=sys.stderr)
    return EXIT_OK
