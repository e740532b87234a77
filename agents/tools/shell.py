"""Owns the shell tool: one command in the workspace, in its own process group, ended as a group.

Invariant: when `run_shell` returns or raises (trio.Cancelled included), no process of the
command's process group is left running: SIGTERM to the group, up to a grace, SIGKILL to the
group, and the leader reaped. Limit: a descendant that calls setsid() (or setpgid) itself leaves
the group and is beyond reach; so do processes it hands work to (daemons). Use a container or
cgroup if commands must be fully contained.

If the process running the tool dies without running that cleanup (SIGKILL, OOM kill), a
guardian ends the groups: the first command starts one small helper process per process
(`_Guardian`) in its own session, holding the read end of a pipe; each command's group id is
written to it when the command starts and crossed out when its group is gone. The pipe's write
end closes when its owner dies however it dies, and the guardian then SIGTERMs every group still
listed, SIGKILLs them after GUARDIAN_GRACE_S, and exits. Limits: a group started in the
microseconds between fork and the write is missed; killing the guardian itself too (a kill of
every process of the user) leaves the groups; setsid escapes as above.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from typing import Any

import attrs
import trio

from agents.tools.registry import Tool, ToolContext, ToolResult, render_bytes
from agents.tools.schema import object_schema

POLL_S = 0.01  # how often a dying group is checked
KILL_WAIT_S = 1.0  # after SIGKILL, how long to wait for the kernel to finish the group
DRAIN_S = 0.5  # after the command ended, how long to wait for the output pipe to close
READ_CHUNK = 65536
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


GUARDIAN_GRACE_S = 0.5  # guardian: SIGTERM -> SIGKILL for the groups of a dead owner

# The guardian: reads "+PGID" / "-PGID" lines from fd argv[1] until EOF (its owner is gone),
# then ends every group still listed. Ignores SIGINT/SIGTERM/SIGHUP: only its owner's death
# (EOF) ends it, so it outlives a signal that kills its owner.
_GUARDIAN_CODE = """
import os, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
fd, grace, groups, buf = int(sys.argv[1]), float(sys.argv[2]), set(), b""
while True:
    data = os.read(fd, 65536)
    if not data:
        break
    *lines, buf = (buf + data).split(b"\\n")
    for ln in lines:
        if ln[:1] == b"+":
            groups.add(int(ln[1:]))
        elif ln[:1] == b"-":
            groups.discard(int(ln[1:]))
def send(sig):
    alive = set()
    for g in groups:
        try:
            os.killpg(g, sig)
            alive.add(g)
        except OSError:
            pass
    return alive
left, end = send(signal.SIGTERM), time.monotonic() + grace
while left and time.monotonic() < end:
    time.sleep(0.02)
    left = send(0)
send(signal.SIGKILL)
"""


class _Guardian:
    """This process's guardian of tool process groups (see the module docstring). Started on
    first use; after a fork the child starts its own."""

    def __init__(self) -> None:
        self._owner = 0
        self._fd: int | None = None
        self._failed = False

    def _start(self) -> int | None:
        if self._owner == os.getpid():
            return self._fd
        self._owner, self._fd = os.getpid(), None
        if self._failed:
            return None
        r, w = os.pipe()  # both non-inheritable: tool processes never hold the write end
        try:
            subprocess.Popen([sys.executable, "-S", "-c", _GUARDIAN_CODE, str(r),
                              str(GUARDIAN_GRACE_S)], pass_fds=(r,), start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        except OSError:
            self._failed = True  # the in-process cleanup still runs; only SIGKILL escapes
            os.close(w)
            return None
        finally:
            os.close(r)
        self._fd = w
        return w

    def _write(self, line: bytes) -> None:
        fd = self._start()
        if fd is not None:
            try:
                os.write(fd, line)
            except OSError:
                self._fd = None

    def watch(self, pgid: int) -> None:
        self._write(b"+%d\n" % pgid)

    def forget(self, pgid: int) -> None:
        self._write(b"-%d\n" % pgid)


GUARDIAN = _Guardian()


@attrs.frozen(kw_only=True)
class ShellOutcome:
    """What a command did. returncode < 0 means killed by that signal."""

    returncode: int | None
    output: str  # head and tail of stdout+stderr, with a note if bytes were cut
    total_bytes: int
    truncated_bytes: int
    binary: bool
    timed_out: bool
    note: str | None = None  # something the model should know (e.g. a process escaped)


class _Capture:
    """Keeps the first `limit // 2` and the last `limit - limit // 2` bytes of a stream."""

    def __init__(self, limit: int) -> None:
        self.head_max = max(limit // 2, 0)
        self.tail_max = max(limit - self.head_max, 0)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes | bytearray) -> None:
        self.total += len(data)
        room = self.head_max - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data and self.tail_max:
            if len(data) >= self.tail_max:
                self.tail[:] = data[-self.tail_max:]
            else:
                self.tail += data
                over = len(self.tail) - self.tail_max
                if over > 0:
                    del self.tail[:over]

    def render(self) -> tuple[str, bool, int]:
        cut = self.total - len(self.head) - len(self.tail)
        return render_bytes(bytes(self.head), bytes(self.tail), cut)


def _read_stat(pid: int | str) -> tuple[bytes, int] | None:
    """(state, pgrp) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    if len(fields) < 3:
        return None
    return fields[0], int(fields[2])


def _live_member(pid: int, pgid: int) -> bool:
    """True iff process `pid` exists, is not a zombie, and is still in group `pgid`."""
    st = _read_stat(pid)
    return st is not None and st[0] != b"Z" and st[1] == pgid


class _ProcessTable:
    """Live (non-zombie) pids by process group, from a /proc scan shared by all who ask at once.

    A scan reads one file per process (milliseconds); a hundred tools killed at once, each
    scanning for itself, would block the event loop for a second. A caller says how fresh the
    answer must be: a scan begun after `newer_than`.
    """

    def __init__(self) -> None:
        self.started = -math.inf
        self.groups: dict[int, set[int]] = {}

    def members(self, pgid: int, newer_than: float) -> set[int] | None:
        """Live pids of group `pgid`; None where there is no /proc (not Linux)."""
        if not sys.platform.startswith("linux"):
            return None
        if self.started < newer_than:
            started = time.monotonic()
            try:
                entries = os.listdir("/proc")
            except OSError:
                return None
            groups: dict[int, set[int]] = {}
            for name in entries:
                if name.isdigit():
                    st = _read_stat(name)
                    if st is not None and st[0] != b"Z":
                        groups.setdefault(st[1], set()).add(int(name))
            self.started, self.groups = started, groups
        return set(self.groups.get(pgid, ()))


_table = _ProcessTable()


def group_members(pgid: int) -> set[int] | None:
    """Live (non-zombie) pids of group `pgid` from one /proc scan; None without /proc.

    Zombies do not count: they hold nothing, and orphans under a PID 1 that does not reap
    (a container without an init) stay zombies, so `killpg(pgid, 0)` alone would never report
    the group gone. A scan reads one file per process, so it is the slow path (milliseconds
    each): used once when the cheap check keeps saying "alive" after SIGKILL.
    """
    return _table.members(pgid, time.monotonic())


def group_alive(pgid: int) -> bool:
    """True iff some process of group `pgid` is alive (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    members = group_members(pgid)
    return True if members is None else bool(members)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_exists(pgid: int, leader: trio.Process | None) -> bool:
    """Cheap check: True iff the kernel still knows group `pgid` (zombies included)."""
    if leader is not None:
        leader.poll()  # reap our own child, so its zombie does not keep the group id alive
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def terminate_group(pgid: int, grace_s: float, leader: trio.Process | None = None) -> bool:
    """End every process of group `pgid`: SIGTERM, up to `grace_s`, then SIGKILL.

    `leader` is the group leader if it is our child (it is reaped on the way). Returns True iff
    SIGKILL was needed. Takes at most grace_s + KILL_WAIT_S. Raises trio.Cancelled if
    cancelled; run it shielded when it must finish.
    """
    if not _group_exists(pgid, leader):
        return False
    if leader is not None and leader.returncode is not None and not group_members(pgid):
        return False  # only zombies left (a PID 1 that does not reap): nothing to end
    term_at = time.monotonic()
    _signal_group(pgid, signal.SIGTERM)
    _signal_group(pgid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once resumed
    with trio.move_on_after(grace_s):
        if await _members_gone(pgid, leader, term_at):
            return False
    # Past the grace, or every member seen at SIGTERM has exited but the id lingers (zombies
    # nobody reaped yet, or a child forked after the scan): SIGKILL settles it either way.
    # Past the grace. The kernel refuses fork() to a process with SIGKILL pending, so after
    # this no member can be added: the group only shrinks.
    killed_at = time.monotonic()
    _signal_group(pgid, signal.SIGKILL)
    with trio.move_on_after(KILL_WAIT_S):
        # Any scan begun after SIGKILL is complete: no member can be added any more.
        await _members_gone(pgid, leader, killed_at)
    return True


async def _members_gone(pgid: int, leader: trio.Process | None, signalled_at: float) -> bool:
    """Wait until the group is gone (True), or until every member a /proc scan begun after
    `signalled_at` listed has exited while the group id lingers (False). Runs until cancelled
    otherwise.

    Zombies nobody reaps yet keep the id alive, so after a few cheap checks the live members
    are listed (one scan, shared by groups signalled together) and only their own /proc
    entries are polled.
    """
    for _ in range(5):  # where PID 1 reaps at once, the group id is gone within ms
        if not _group_exists(pgid, leader):
            return True
        await trio.sleep(POLL_S)
    members = _table.members(pgid, signalled_at)
    if members is None:  # no /proc: the cheap check is all there is
        while _group_exists(pgid, leader):  # noqa: ASYNC110
            await trio.sleep(POLL_S)
        return True
    while any(_live_member(pid, pgid) for pid in members):  # noqa: ASYNC110
        await trio.sleep(POLL_S)
    return not _group_exists(pgid, leader)


async def run_shell(
    cmd: str,
    *,
    cwd: os.PathLike[str] | str,
    env: dict[str, str],
    timeout_s: float,
    max_output_bytes: int = 16 * 1024,
    kill_grace_s: float = 2.0,
    cancel_grace_s: float = 0.5,
) -> ShellOutcome:
    """Run `/bin/sh -c cmd` in `cwd` with exactly `env`, stdout and stderr captured together.

    On timeout the process group gets SIGTERM, then SIGKILL after `kill_grace_s`. When the
    command's shell exits, processes it left in the background are ended the same way. Raises
    trio.Cancelled when cancelled, after ending the group (SIGTERM, `cancel_grace_s`, SIGKILL);
    raises OSError if the shell cannot be started.
    """
    proc = await trio.lowlevel.open_process(
        ["/bin/sh", "-c", cmd], cwd=os.fspath(cwd), env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    pgid = proc.pid  # start_new_session: the shell leads a new session and process group
    GUARDIAN.watch(pgid)  # ends the group if this process dies before the finally below
    assert proc.stdout is not None
    stdout = proc.stdout
    cap = _Capture(max_output_bytes)
    eof = trio.Event()
    timed_out = False
    note: str | None = None
    finished = False

    async def pump() -> None:
        try:
            while True:
                data = await stdout.receive_some(READ_CHUNK)
                if not data:
                    break
                cap.feed(data)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        eof.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            with trio.move_on_after(timeout_s) as scope:
                await proc.wait()
            timed_out = scope.cancelled_caught
            # The shell is done or out of time: end it and whatever it left in the background.
            await terminate_group(pgid, kill_grace_s, proc)
            await proc.wait()
            with trio.move_on_after(DRAIN_S) as drain:
                await eof.wait()
            if drain.cancelled_caught:
                note = ("the output pipe was still held open by a process outside the command's "
                        "process group (it called setsid); stopped reading")
            nursery.cancel_scope.cancel()
        finished = True
    finally:
        with trio.CancelScope(shield=True):
            if not finished:  # cancelled or crashed: nothing of the group may outlive this call
                await terminate_group(pgid, cancel_grace_s, proc)
                with trio.move_on_after(KILL_WAIT_S):
                    await proc.wait()
            await stdout.aclose()
            GUARDIAN.forget(pgid)
    text, binary, cut = cap.render()
    return ShellOutcome(returncode=proc.returncode, output=text, total_bytes=cap.total,
                        truncated_bytes=cut, binary=binary, timed_out=timed_out, note=note)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exit code {code}"


def shell_tool(ctx: ToolContext) -> Tool:
    """The `shell` tool bound to one task's workspace and environment."""
    env = dict(ctx.env)
    env.setdefault("PATH", DEFAULT_PATH)  # not a secret, and sh cannot find `ls` without it

    async def shell(cmd: str, timeout_s: float | None = None) -> ToolResult:
        limit = ctx.shell_timeout_s
        if timeout_s is not None:
            if not timeout_s > 0:
                return ToolResult(ok=False, output="",
                                  error=f"timeout_s must be a positive number, got {timeout_s}")
            limit = min(float(timeout_s), ctx.shell_timeout_s)
        if not ctx.workspace.is_dir():
            return ToolResult(ok=False, output="",
                              error=f"the workspace {ctx.workspace} does not exist")
        out = await run_shell(cmd, cwd=ctx.workspace, env=env, timeout_s=limit,
                              max_output_bytes=ctx.max_output_bytes,
                              kill_grace_s=ctx.kill_grace_s, cancel_grace_s=ctx.cancel_grace_s)
        status = _describe_exit(out.returncode)
        footer = f"[{status}"
        if out.truncated_bytes:
            footer += f"; {out.total_bytes} bytes of output, {out.truncated_bytes} cut"
        footer += "]"
        if out.note:
            footer += f"\n[{out.note}]"
        text = out.output
        text = f"{text}\n{footer}" if text and not text.endswith("\n") else text + footer
        error: str | None = None
        if out.timed_out:
            error = (f"command timed out after {limit:g}s; its process group was terminated "
                     f"({status}); output so far is below")
        elif out.returncode != 0:
            error = f"command failed ({status}); output is below"
        return ToolResult(ok=error is None, output=text, error=error,
                          truncated_bytes=out.truncated_bytes)

    params: dict[str, Any] = {
        "cmd": {"type": "string", "description": "The command, run by /bin/sh -c in the "
                "workspace directory. stdout and stderr are captured together."},
        "timeout_s": {"type": "number", "description": "Seconds before the command is killed "
                      f"(default and maximum {ctx.shell_timeout_s:g})."},
    }
    return Tool(
        name="shell",
        description=("Run a shell command in the task's workspace directory and return its "
                     f"output and exit code. Output beyond {ctx.max_output_bytes} bytes is cut "
                     "from the middle. Background processes are ended when the command exits."),
        parameters=object_schema(params, ["cmd"]),
        fn=shell,
    )
