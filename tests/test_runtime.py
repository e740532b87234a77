"""The process-wide settings long-running commands apply before their event loop: the
collector and the open-files limit."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bus.runtime import GC_GEN0_THRESHOLD, raise_open_files_limit, tune_gc

resource = pytest.importorskip("resource")  # POSIX

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_gc_freezes_start_up_objects_and_raises_only_the_young_threshold(
        restore_gc: None) -> None:
    gc.set_threshold(700, 10, 10)
    tune_gc()
    assert gc.get_freeze_count() > 1000  # the imported modules, classes and functions
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD, 10, 10)


def test_tune_gc_leaves_a_higher_threshold_and_disabled_collection_alone(
        restore_gc: None) -> None:
    gc.set_threshold(50_000, 5, 5)
    tune_gc()
    assert gc.get_threshold() == (50_000, 5, 5)
    gc.set_threshold(0, 10, 10)
    tune_gc()
    assert gc.get_threshold()[0] == 0


def _limits() -> tuple[int, int]:
    return resource.getrlimit(resource.RLIMIT_NOFILE)  # type: ignore[no-any-return]


def _wanted(hard: int) -> int:
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def test_the_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = _limits()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_open_files_limit() == _wanted(hard) == _limits()[0]
        assert raise_open_files_limit() == _wanted(hard)  # again: nothing to do
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("command", ["worker", "bus", "model-server", "run"])
def test_long_running_commands_tune_the_process_before_their_loop(command: str,
                                                                   tmp_path: Any) -> None:
    # Each command module calls tune_process() just before trio.run: stop it there and look.
    # The process starts with 256 open files allowed, as a tight default would give it.
    code = (
        "import sys, gc, resource, trio\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "def stop(*a, **k):\n"
        "    print(gc.get_threshold()[0], gc.get_freeze_count() > 1000,\n"
        "          resource.getrlimit(resource.RLIMIT_NOFILE)[0]); sys.exit(0)\n"
        "trio.run = stop\n"
        "from orchestrator.cli import main\n"
        f"main([{command!r}] + {_args(command, tmp_path)!r})\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=_env())
    assert out.stdout.split() == [str(GC_GEN0_THRESHOLD), "True",
                                  str(_wanted(_limits()[1]))], out.stderr


def _args(command: str, tmp_path: Any) -> list[str]:
    if command == "run":
        return [str(EXAMPLES / "quickstart.toml"), "--state-dir", str(tmp_path)]
    return {"worker": ["--connect", "ws://127.0.0.1:1/bus"], "bus": ["--port", "0"],
            "model-server": ["--port", "0"]}[command]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["SWITCHBOARD_TOKEN"] = "t"
    return env
