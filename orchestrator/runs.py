"""Owns where a run's files live under the state directory, and resolving a RUN argument."""

from __future__ import annotations

import os
import pathlib


class RunNotFound(LookupError):
    """No run matches what the user typed (their input: the message lists what exists)."""


def state_dir(value: str | None = None) -> pathlib.Path:
    return pathlib.Path(value or os.environ.get("SWITCHBOARD_HOME", ".switchboard"))


def journal_path(state: pathlib.Path) -> pathlib.Path:
    """The run journal (SQLite) every command of one state directory shares."""
    return state / "journal.sqlite"


def runs_dir(state: pathlib.Path) -> pathlib.Path:
    return state / "runs"


def run_dir(state: pathlib.Path, run_id: str) -> pathlib.Path:
    return runs_dir(state) / run_id


def resolve_run_dir(state: pathlib.Path, spec: str) -> pathlib.Path:
    """A run's directory from its id, a unique prefix, or 'latest' (the newest)."""
    root = runs_dir(state)
    runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name) \
        if root.is_dir() else []
    if not runs:
        raise RunNotFound(f"no runs under {root}: start one with `orchestrator run FILE`, "
                          "or pass --state-dir where your runs are")
    if spec == "latest":
        return max(runs, key=lambda p: p.stat().st_mtime)
    exact = [p for p in runs if p.name == spec]
    if exact:
        return exact[0]
    matches = [p for p in runs if p.name.startswith(spec)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        recent = ", ".join(p.name for p in runs[-5:])
        raise RunNotFound(f"no run {spec!r} under {root}; recent runs: {recent}")
    raise RunNotFound(f"{spec!r} matches {len(matches)} runs: "
                      f"{', '.join(p.name for p in matches[:5])}; type more of the id")
