"""Owns the embedded sim model server's own process: how `orchestrator run` starts it, learns
its URL, gathers its log lines into the run's log, tells when it exits, and stops it.

Why a process of its own: in the orchestrator's process the sim shared one event loop with the
hub, the scheduler and the journal, and took ~45% of it on a run of one-turn tasks (py-spy,
bench/orchestrator.py), so that loop was the run's bottleneck. As a child it runs on another
core where there is one: 10-18% less wall time per task on the 2-core bench box (six pairs
of runs, see the README), more where cores are free. The child is `orchestrator model-server --parent-pid`:
it stops when the orchestrator is gone (even after SIGKILL), and it has a process group of its
own, so a terminal's Ctrl-C reaches it only through the orchestrator, which stops it last.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Callable

import attrs
import trio

from modellink.sim import SimConfig
from orchestrator.serving import read_lines

START_TIMEOUT_S = 30.0  # from spawn to its URL: ~0.5 s here (Python start-up, imports, tokenizer)
STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this
STDERR_TAIL_LINES = 20  # lines that are not JSON log lines (tracebacks) kept to explain an exit
_PACKAGE_ROOT = str(pathlib.Path(__file__).resolve().parent.parent)  # holds orchestrator/
LINE_MAX = 64 * 1024  # longer log lines are cut (the run's log is one JSON object per line)


class SimStartError(Exception):
    """The sim's process did not come up (it exited first, or said nothing in time)."""


def sim_to_json(sim: SimConfig) -> str:
    return json.dumps(attrs.asdict(sim), separators=(",", ":"))


def sim_from_json(text: str) -> SimConfig:
    """The SimConfig `sim_to_json` wrote. Raises ValueError naming what is wrong."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        if "models" in data:
            data["models"] = tuple(data["models"])
        return SimConfig(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"--sim-json is not a sim configuration ({exc}); it is written by "
                         "`orchestrator run`: leave it out and use --zero, --ttft, --prefill "
                         "and --decode") from None


ExitCallback = Callable[[int, list[str]], Awaitable[None]]


@attrs.define
class SimProcess:
    """A running sim child. `base_url` is where it listens (its /v1 base)."""

    proc: trio.Process
    base_url: str
    stopping: bool = False

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM, SIGKILL after `grace` seconds; shielded, so it runs while the run is
        cancelled. Its exit is then not reported as a crash."""
        self.stopping = True
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                try:
                    self.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                with trio.move_on_after(grace):
                    await self.proc.wait()
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


async def start_sim_process(nursery: trio.Nursery, *, host: str, token: str, sim: SimConfig,
                            log_level: str, run_id: str, sink: Callable[[bytes], None] | None,
                            on_exit: ExitCallback, cwd: str | os.PathLike[str] | None = None,
                            start_timeout: float = START_TIMEOUT_S) -> SimProcess:
    """Start the sim on `host` (a port it picks) and return once it listens. `cwd`: its
    working directory (the run's state dir, so the process table ties it to the run).

    Its JSON log lines go to `sink` (the run's log.jsonl) with `run_id` on them; other stderr
    lines are kept for the exit message. `on_exit(code, tail)` is awaited if it exits before
    `stop()` was called. Raises SimStartError if it does not come up within `start_timeout`.
    """
    env = dict(os.environ)
    env["SWITCHBOARD_TOKEN"] = token  # its bearer token, never on the command line
    env.setdefault("PYTHONUNBUFFERED", "1")
    # it starts in `cwd`, so it finds this package where we did, installed or not
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "orchestrator", "model-server", "--host", host, "--port", "0",
           "--parent-pid", str(os.getpid()), "--log-level", log_level, "--run-id", run_id,
           "--sim-json", sim_to_json(sim), "--announce"]
    proc = await trio.lowlevel.open_process(cmd, env=env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            start_new_session=os.name == "posix", cwd=cwd)
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    async def read_stderr() -> None:
        assert proc.stderr is not None
        await read_lines(proc.stderr, lambda lines: _route(lines, sink, tail), max_line=LINE_MAX)

    async def watch() -> None:
        try:
            async with trio.open_nursery() as n:
                n.start_soon(read_stderr)
                code = await proc.wait()
                n.cancel_scope.deadline = trio.current_time() + 0.5  # the last lines, bounded
        finally:
            if proc.returncode is None:  # the run's nursery is ending: so does the sim
                await child.stop()
        if not child.stopping:
            await on_exit(code, list(tail))

    child = SimProcess(proc=proc, base_url="")
    try:
        with trio.fail_after(start_timeout):
            child.base_url = await _read_url(proc)
    except (trio.TooSlowError, SimStartError) as exc:
        await child.stop(grace=0.5)
        with trio.move_on_after(1.0):  # what it said on the way out (its error line)
            await read_stderr()
        why = (str(exc) if isinstance(exc, SimStartError)
               else f"it did not listen within {start_timeout:g}s")
        last = f": {tail[-1]}" if tail else ""
        raise SimStartError(f"the embedded sim model server did not start ({why}){last}") \
            from None
    except BaseException:  # cancelled while it starts (Ctrl-C): it must not outlive us
        await child.stop(grace=0.5)
        raise
    nursery.start_soon(watch)
    return child


async def _read_url(proc: trio.Process) -> str:
    """The first stdout line of `model-server --announce`: {"base_url": ...}."""
    assert proc.stdout is not None
    buf = b""
    async for chunk in proc.stdout:
        buf += chunk
        if b"\n" in buf:
            break
    line = buf.split(b"\n", 1)[0].strip()
    if not line:
        raise SimStartError(f"it exited with {await proc.wait()} before listening")
    try:
        url = json.loads(line)["base_url"]
    except (ValueError, KeyError, TypeError):
        url = None
    if not isinstance(url, str):
        raise SimStartError(f"it printed {line[:200]!r} instead of its URL")
    return url


def _route(lines: list[bytes], sink: Callable[[bytes], None] | None, tail: deque[str]) -> None:
    """JSON log lines to the run's log (its own level filter already applied); the rest
    (a traceback, an interpreter error) into `tail` for the exit message."""
    good: list[bytes] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line.startswith(b"{") and line.endswith(b"}"):
            good.append(line)
        else:
            tail.append(line.decode(errors="replace")[:2000])
    if good and sink is not None:
        sink(b"\n".join(good))


__all__ = ["SimProcess", "SimStartError", "start_sim_process", "sim_to_json", "sim_from_json"]
