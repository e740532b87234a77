"""Owns the `orchestrator` console script: argument parsing and dispatch to one module per command.

Each command lives in `orchestrator/cmd_<name>.py` exposing `add_parser(subparsers)` and
`run(args) -> int`. Exit codes are shared by every command (see EXIT_* below).
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import traceback
from types import FrameType

# Exit codes that say what happened; documented in README and `orchestrator --help`.
EXIT_OK = 0
EXIT_TASK_FAILED = 1  # the run finished but some task failed
EXIT_BAD_INPUT = 2  # bad graph file, CLI arguments, config, token
EXIT_INTERNAL = 3  # a bug or an environment problem we could not handle
EXIT_CANCELLED = 130  # cancelled by SIGINT/SIGTERM or `orchestrator cancel`

# (command name, module) in the order --help lists them (`resume` lives in cmd_run). A module
# missing on disk is skipped so the CLI keeps working while commands are added.
COMMANDS = [
    ("run", "orchestrator.cmd_run"),
    ("validate", "orchestrator.cmd_validate"),
    ("status", "orchestrator.cmd_status"),
    ("logs", "orchestrator.cmd_logs"),
    ("scale", "orchestrator.cmd_scale"),
    ("cancel", "orchestrator.cmd_cancel"),
    ("worker", "orchestrator.cmd_worker"),
    ("bus", "orchestrator.cmd_bus"),
    ("model-server", "orchestrator.cmd_model"),
]

EPILOG = (
    "exit codes: 0 success, 1 a task failed, 2 bad input (graph, arguments, config, token), "
    "3 internal error, 130 cancelled"
)


def _version() -> str:
    """The installed distribution's version (a source tree run without installing: unknown)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{version('switchboard')} (switchboard)"
    except PackageNotFoundError:
        return "(switchboard, not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Switchboard: run multi-agent task graphs over a message bus and persistent model links.",
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true",
                        help="print full tracebacks for internal errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, modname in COMMANDS:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue
            raise
        mod.add_parser(sub)
    return parser


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, depth first; [exc] for a plain one.
    trio's strict exception groups wrap whatever escapes a nursery, so `except X` alone never
    matches an X raised in a task: callers classify the leaves instead."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaves(e)]
    return [exc]


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM before a command listens for it: what Ctrl-C does at that moment. Through the
    SIGINT handler when there is one (inside trio.run that is trio's, which raises
    KeyboardInterrupt only where it is safe to); else KeyboardInterrupt here."""
    if callable(signal.getsignal(signal.SIGINT)):
        signal.raise_signal(signal.SIGINT)
    else:  # SIGINT ignored (a job started with `&` by a script) or not Python's to handle
        raise KeyboardInterrupt


def sigterm_as_interrupt() -> object:
    """Make SIGTERM act as SIGINT (KeyboardInterrupt) until a command installs its own
    receiver (trio.open_signal_receiver restores this one when it ends). Without it a SIGTERM
    in a command's first moments (imports, opening the journal, trio starting) killed the
    process outright: `orchestrator run` then left its run "running" with nothing running.
    Returns the handler to restore (None: not the main thread, nothing installed)."""
    try:
        return signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    except ValueError:  # not the main thread (main() called from a test's thread)
        return None


def main(argv: list[str] | None = None) -> int:
    previous = sigterm_as_interrupt()
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]


def _main(argv: list[str] | None) -> int:
    try:
        parser = build_parser()  # imports every command: a Ctrl-C may land here
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args))
    except BaseException as exc:  # noqa: BLE001 - map to an exit code, one line unless --debug
        found = leaves(exc)
        if any(isinstance(e, KeyboardInterrupt) for e in found):
            return EXIT_CANCELLED
        if any(isinstance(e, SystemExit) for e in found):
            raise
        first = found[0] if found else exc
        if args.debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        print(f"error: internal error in `orchestrator {args.command}`: "
              f"{type(first).__name__}: {first}"
              + ("" if args.debug else " (rerun with --debug for the traceback)"),
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
