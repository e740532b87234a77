"""Owns the lock that says a run's orchestrator is alive: `runs/RUN/orchestrator.lock`.

The process running (or resuming) a run holds an exclusive flock on it for as long as it lives
and writes its pid into it; the kernel drops the lock when that process dies, kill -9 and a
closed terminal included. So `resume` refuses a run whose orchestrator still runs (resuming it
would run its tasks a second time, next to the first), and `status`, `logs --follow`, `cancel`
and `scale` can tell a live run from one whose orchestrator is gone. Not inherited by the
workers: Python opens files non-inheritable and spawns children with close_fds.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import time
from typing import IO

LOCK_NAME = "orchestrator.lock"
# How long `hold` keeps trying: a `status` probing the lock holds it (shared) for a moment.
HOLD_WAIT_S = 1.0
# How often the holder stamps the lock file's mtime (stamp): a dead holder stopped within this
# long after last_alive().
ALIVE_EVERY_S = 2.0


class RunLocked(Exception):
    """Another live process holds the run (its pid, 0 when it could not be read)."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"held by pid {pid}")
        self.pid = pid


def lock_path(run_dir: pathlib.Path) -> pathlib.Path:
    return run_dir / LOCK_NAME


def hold(run_dir: pathlib.Path, *, wait_s: float = HOLD_WAIT_S) -> IO[str]:
    """Take the run's lock for this process and write our pid in it; keep the returned file
    open for as long as the run is ours. Raises RunLocked when another live process holds it,
    OSError when the file cannot be made."""
    f = open(lock_path(run_dir), "a+")  # noqa: SIM115 - held for the run's lifetime
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                pid = _read_pid(f)
                f.close()
                raise RunLocked(pid) from None
            time.sleep(0.05)
        except BaseException:
            f.close()
            raise
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def stamp(run_dir: pathlib.Path) -> None:
    """Mark the run's orchestrator alive now (the lock file's mtime); nothing if the file is
    gone (a run driven as a library has none). The holder calls it every ALIVE_EVERY_S."""
    try:
        os.utime(lock_path(run_dir))
    except OSError:
        pass


def last_alive(run_dir: pathlib.Path) -> float | None:
    """When the run's orchestrator was last known alive (wall time: its last stamp, or when
    it took the lock), None without a lock file. For a run whose orchestrator is gone: it
    stopped within ALIVE_EVERY_S after this."""
    try:
        return lock_path(run_dir).stat().st_mtime
    except OSError:
        return None


def holder(run_dir: pathlib.Path) -> int | None:
    """The pid of the live process holding the run (0 if unreadable), or None when nobody
    does: its orchestrator has ended or died (or the run predates the lock)."""
    try:
        f = open(lock_path(run_dir))  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(f)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return None


def _read_pid(f: IO[str]) -> int:
    try:
        f.seek(0)
        return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def gone_note(run_dir: pathlib.Path, run_id: str, until: str) -> str | None:
    """For a run the journal says is running: a note when no orchestrator holds it (it was
    killed, or its terminal closed), ending "`until` `orchestrator resume RUN`"; None when one
    does."""
    if holder(run_dir) is not None:
        return None
    return (f"note: run {run_id}'s orchestrator is not running (killed, or its terminal "
            f"closed); {until} `orchestrator resume {run_id}`")
