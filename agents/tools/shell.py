"""Owns the shell tool: one command in the workspace, in its own process group, ended as a group.

Invariant: when `run_shell` returns or raises (trio.Cancelled included), no process of the
command's process group is left running: SIGTERM to the group, up to a grace, SIGKILL to the
group, and the leader reaped. Limit: a descendant that calls setsid() (or setpgid) itself leaves
the group and is beyond reach; so do processes it hands work to (daemons). Use a container or
cgroup if commands must be fully contained.

If the process running the tool dies without running that cleanup (SIGKILL, OOM kill), a
guardian ends the groups: the first command starts one small helper process per process
(`_Guardian`) in its own session, holding the read end of a pipe nobody writes to and a file
shared with its owner (a memfd); each command's group id is listed in the file when the command
starts and crossed out when its group is gone (one pwrite each: the guardian sleeps through it).
The pipe's write end closes when its owner dies however it dies, and the guardian then reads the
file, SIGTERMs every group still listed, SIGKILLs them after GUARDIAN_GRACE_S, and exits.
Limits: a group started in the microseconds between fork and the listing is missed; killing the
guardian itself too (a kill of every process of the user) leaves the groups; setsid escapes as
above.
"""

from __future__ import annotations

import math
import os
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any

import attrs
import trio

from agents.tools.registry import Tool, ToolContext, ToolResult, render_bytes
from agents.tools.schema import object_schema

POLL_S = 0.01  # how often a dying group is checked
KILL_WAIT_S = 1.0  # after SIGKILL, how long to wait for the kernel to finish the group
DRAIN_S = 0.5  # after the command ended, how long to wait for the output pipe to close
READ_CHUNK = 65536
PUMP_BURST = 16  # reads in a row (at most 1 MiB) before the output pump lets other tasks run
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


GUARDIAN_GRACE_S = 0.5  # guardian: SIGTERM -> SIGKILL for the groups of a dead owner

# The owner's list of groups: one 8-byte slot per running command, (pgid, pgid ^ _SLOT_CHECK) as
# two little-endian uint32, all zeros when free. A slot names a group iff its check matches, so
# a slot half written when the owner died can never name a stranger's group.
_SLOT = struct.Struct("<II")
_SLOT_CHECK = 0x5A5A5A5A
_FREE_SLOT = bytes(_SLOT.size)

# The guardian: blocks reading fd argv[1] until EOF (its owner is gone; the owner never writes
# there), then reads the owner's list of groups from fd argv[2] (argv[4] is _SLOT_CHECK) and
# ends every group listed.
# Ignores SIGINT/SIGTERM/SIGHUP: only its owner's death (EOF) ends it, so it outlives a signal
# that kills its owner. Asleep until then: a command costs it nothing.
_GUARDIAN_CODE = """
import os, signal, struct, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
alive_fd, list_fd, grace, mask = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                                  int(sys.argv[4]))
while os.read(alive_fd, 4096):
    pass
data = b""
while True:
    chunk = os.pread(list_fd, 1 << 20, len(data))
    if not chunk:
        break
    data += chunk
data = data[:len(data) // 8 * 8]
groups = {g for g, check in struct.iter_unpack("<II", data) if g > 1 and check == g ^ mask}
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


def _list_file() -> int:
    """A new, unnamed, non-inheritable file for the list of groups."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("switchboard-guardian")
    fd, path = tempfile.mkstemp(prefix="switchboard-guardian-")
    os.unlink(path)
    return fd


class _Guardian:
    """This process's guardian of tool process groups (see the module docstring). Started on
    first use; after a fork the child starts its own.

    A command costs one pwrite to watch its group and one to forget it: no pipe write, so the
    guardian is never woken before its owner dies.
    """

    def __init__(self) -> None:
        self._owner = 0
        self._list: int | None = None  # fd of the list file; None if there is no guardian
        self._failed = False
        self._slots: dict[int, int] = {}  # pgid -> its slot in the list
        self._free: list[int] = []  # slots below self._end that are all zeros
        self._end = 0  # slots from here on have never been written
        self._proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> int | None:
        if self._owner == os.getpid():
            return self._list
        self._owner, self._list = os.getpid(), None
        self._slots, self._free, self._end = {}, [], 0
        if self._failed:
            return None
        try:
            listing = _list_file()
        except OSError:
            self._failed = True
            return None
        r, w = os.pipe()  # all non-inheritable: tool processes never hold the write end
        try:
            # Kept: a dropped Popen still running joins subprocess._active, polled by every Popen.
            self._proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _GUARDIAN_CODE, str(r), str(listing),
                 str(GUARDIAN_GRACE_S), str(_SLOT_CHECK)], pass_fds=(r, listing),
                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL)
        except OSError:
            self._failed = True  # the in-process cleanup still runs; only SIGKILL escapes
            os.close(w)
            os.close(listing)
            return None
        finally:
            os.close(r)
        # `w` stays open, unwritten, for the life of this process: its closing is the death
        # notice.
        self._list = listing
        return listing

    def start(self) -> None:
        """Start this process's guardian now rather than at its first command: the helper is a
        Python process (~15 ms of CPU to start), which a worker can pay before taking work."""
        self._start()

    def watch(self, pgid: int) -> None:
        listing = self._start()
        if listing is None or pgid in self._slots:
            return
        if self._free:
            slot = self._free.pop()
        else:
            slot, self._end = self._end, self._end + 1
        try:
            os.pwrite(listing, _SLOT.pack(pgid, pgid ^ _SLOT_CHECK), slot * _SLOT.size)
        except OSError:  # out of memory for the file: this group goes unguarded
            self._free.append(slot)
            return
        self._slots[pgid] = slot

    def forget(self, pgid: int) -> None:
        slot = self._slots.pop(pgid, None)
        if slot is None or self._owner != os.getpid() or self._list is None:
            return
        try:
            os.pwrite(self._list, _FREE_SLOT, slot * _SLOT.size)
        except OSError:  # overwriting written bytes allocates nothing: not seen to happen
            return  # the slot is never reused; the guardian may signal its stale group id
        self._free.append(slot)


GUARDIAN = _Guardian()


class _Leader:
    """The command's shell, our child. `poll` and `wait` reap it; it is waited on through a
    pidfd (Linux 5.3+), else by polling."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):  # not Linux, an old kernel, or reaped already
            pass

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        """The exit status, reaping the shell; None while it runs."""
        code = self.popen.poll()
        if code is not None:
            self.close()
        return code

    async def wait(self) -> int:
        """Wait until the shell exits and reap it. Raises trio.Cancelled."""
        delay = 0.001
        while (code := self.poll()) is None:
            if self._pidfd is not None:
                try:
                    await trio.lowlevel.wait_readable(self._pidfd)
                except trio.ClosedResourceError:
                    pass  # closed by a poll() that reaped the shell
            else:
                await trio.sleep(delay)
                delay = min(2 * delay, POLL_S)
        return code

    def watch_with(self, fd: int) -> select.epoll | None:
        """A new epoll set that is readable iff `fd` is readable or the shell has exited; None
        without a pidfd or epoll. The caller closes it."""
        if self._pidfd is None or not hasattr(select, "epoll"):
            return None
        ep = select.epoll(2)  # close-on-exec
        try:
            ep.register(fd, select.EPOLLIN)
            ep.register(self._pidfd, select.EPOLLIN)
        except BaseException:
            ep.close()
            raise
        return ep

    def close(self) -> None:
        """Release the pidfd (the shell itself is not touched)."""
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def _spawn(cmd: str, cwd: str, env: dict[str, str]) -> tuple[_Leader, int]:
    """Start `/bin/sh -c cmd` as the leader of a new session and process group, stdout and
    stderr into one pipe; returns the shell and the pipe's read end (non-blocking, ours alone).

    Called in the event loop, not a worker thread as trio.lowlevel.open_process does: Popen
    forks with vfork here, so it blocks only until the child has exec'd (~0.2 ms), while the
    hand-off to a thread and back cost ~0.3 ms of wall time and ~0.4 ms of CPU per command.
    Raises OSError if the shell cannot be started.
    """
    r, w = os.pipe()  # both non-inheritable; Popen dup2s `w` onto the child's 1 and 2
    try:
        popen = subprocess.Popen(["/bin/sh", "-c", cmd], cwd=cwd, env=env,
                                 stdin=subprocess.DEVNULL, stdout=w, stderr=w,
                                 start_new_session=True)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    os.set_blocking(r, False)
    return _Leader(popen), r


# A spare shell: /bin/sh started ahead of its command, which it reads from its stdin (a pipe of
# ours) line by line with the `read` builtin, up to an end line ($1, a random token the command
# cannot know); then stdin becomes /dev/null, the token is dropped, and the command runs with
# `eval`: as `sh -c` would run it (tests compare the two), except that the shell's own error
# messages say `eval:` (`/bin/sh: 1: eval: nosuch: not found`). Without the end line (its owner
# died or gave up mid-write, or closed the pipe) it runs nothing and exits 0: a spare never
# outlives its owner, and a cut command never runs.
_SPARE_SCRIPT = (
    "_sb_c= _sb_s=\n"
    "while IFS= read -r _sb_l; do\n"
    "  if [ \"$_sb_l\" = \"$1\" ]; then\n"
    "    exec </dev/null; set --; unset _sb_l _sb_s; eval \"$_sb_c\"; exit\n"
    "  fi\n"
    "  _sb_c=\"$_sb_c$_sb_s$_sb_l\" _sb_s='\n'\n"
    "done\n"
    "exit 0\n")
# `read` takes a byte per system call, so a long command is quicker through `sh -c`; longer
# than this, a command starts a shell of its own and the spare waits for the next one.
SPARE_MAX_COMMAND_BYTES = 2048


class _Spare:
    """One spare shell: our child, leader of its own session and process group, in `cwd`."""

    def __init__(self, cwd: str, env: dict[str, str]) -> None:
        st = os.stat(cwd)
        self.cwd_id = (st.st_dev, st.st_ino)  # a workspace made again is another directory
        self.token = os.urandom(16).hex()
        out_r, out_w = os.pipe()  # all four non-inheritable: no later child holds one
        cmd_r, cmd_w = os.pipe()
        try:
            self.popen = subprocess.Popen(
                ["/bin/sh", "-c", _SPARE_SCRIPT, "/bin/sh", self.token], cwd=cwd, env=env,
                stdin=cmd_r, stdout=out_w, stderr=out_w, start_new_session=True)
        except BaseException:
            os.close(out_r)
            os.close(cmd_w)
            raise
        finally:
            os.close(out_w)
            os.close(cmd_r)
        self.out: int | None = out_r
        self.cmd: int | None = cmd_w
        # Let go of with its owner if nobody hands it a command or closes it.
        self._finalizer = weakref.finalize(self, _let_go, out_r, cmd_w, self.popen)

    def hand(self, data: bytes, cwd: str) -> tuple[_Leader, int] | None:
        """Give the spare its command (bytes, without the end line); returns the shell and its
        output's read end, as _spawn does, or None if this spare cannot take it (it is gone,
        or `cwd` is no longer the directory it started in). Either way the spare is used up."""
        out, cmd = self.out, self.cmd
        assert out is not None and cmd is not None, "a spare is handed one command"
        try:
            st = os.stat(cwd)
            usable = (st.st_dev, st.st_ino) == self.cwd_id and self.popen.poll() is None
            if usable:
                # Fits the empty pipe's buffer (64 KiB on Linux, never below 4 KiB): written
                # whole at once, never blocking.
                os.write(cmd, data + b"\n" + self.token.encode() + b"\n")
        except OSError:  # the workspace is gone, or so is the spare (EPIPE)
            usable = False
        if not usable:
            self.close()
            return None
        self.out = self.cmd = None
        self._finalizer.detach()
        os.close(cmd)
        os.set_blocking(out, False)
        return _Leader(self.popen), out

    def close(self) -> None:
        """Let the spare go unused: at EOF on its stdin it exits 0 having run nothing."""
        self.out = self.cmd = None
        self._finalizer()  # once only


def _let_go(out: int, cmd: int, popen: subprocess.Popen[bytes]) -> None:
    os.close(out)
    os.close(cmd)
    _retire(popen)


# Spare shells let go of: our children until reaped. Each has been told to exit (EOF on its
# stdin), so each is reaped within moments: here, when another is let go of or started. Spares
# start in worker threads too (SpareShells.refill_soon), hence the lock; reentrant, because a
# spare's finalizer (-> _retire) may run from a garbage collection inside _retire itself.
_retired: list[subprocess.Popen[bytes]] = []
_retired_lock = threading.RLock()


def _retire(popen: subprocess.Popen[bytes] | None = None) -> None:
    with _retired_lock:
        if popen is not None:
            _retired.append(popen)
        _retired[:] = [p for p in _retired if p.poll() is None]


class SpareShells:
    """At most one spare shell for commands in `cwd` with `env` (one tool of one session).

    Starting /bin/sh costs ~1 ms of wall time (fork, exec, dynamic loading); a spare started
    before the next command arrives takes that off its path. A spare is idle in `read`, holds
    nothing, and exits when let go of or when its owner dies (its stdin closes).

    Used from the event loop; only a start begun by refill_soon runs in a worker thread, so
    the state it touches is behind a lock.
    """

    def __init__(self, cwd: str, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self._lock = threading.Lock()
        self._spare: _Spare | None = None
        self._starting = False  # a refill_soon thread is starting one
        self._closed = False

    def take(self, cmd: str) -> tuple[_Leader, int] | None:
        """The spare started on `cmd` (see _Spare.hand), or None to start a shell for it."""
        data = os.fsencode(cmd)
        with self._lock:
            spare = self._spare
            if spare is None:
                return None
            if len(data) > SPARE_MAX_COMMAND_BYTES or b"\0" in data:
                return None  # `sh -c` runs it, or refuses it as before; keep the spare
            self._spare = None
        return spare.hand(data, self.cwd)

    def refill(self) -> None:
        """Start a spare now unless one is waiting or starting. Blocks the caller until the
        shell has exec'd (~0.3 ms). Never raises: without one (out of processes or
        descriptors) the next command starts its own shell, and reports the error."""
        if self._claim():
            self._install(self._start())

    def refill_soon(self) -> None:
        """Start a spare in a worker thread, unless one is waiting or starting, and return at
        once. The thread's fork and exec (~0.3 ms, the GIL released) then overlap with what
        the event loop does next (a command's result going back to the model) instead of
        delaying it; a command that comes before the spare is ready starts its own shell."""
        if not self._claim():
            return
        try:
            trio.lowlevel.start_thread_soon(self._start, self._delivered)
        except BaseException:
            with self._lock:
                self._starting = False
            raise

    def _claim(self) -> bool:
        """True iff a spare is to be started (none waiting or starting, not closed): the
        caller then starts one and hands it to _install."""
        with self._lock:
            if self._spare is not None or self._starting or self._closed:
                return False
            self._starting = True
            return True

    def _start(self) -> _Spare | None:
        if _retired:
            _retire()
        try:
            return _Spare(self.cwd, self.env)
        except (OSError, subprocess.SubprocessError):
            return None

    def _delivered(self, result: Any) -> None:  # an outcome.Outcome of _start
        """In the thread: keep what it started (deliver callbacks must not raise)."""
        try:
            spare = result.unwrap()
        except Exception:  # a bug in _start: no spare; the next command starts its own shell
            spare = None
        self._install(spare)

    def _install(self, spare: _Spare | None) -> None:
        with self._lock:
            self._starting = False
            if spare is not None and self._spare is None and not self._closed:
                self._spare, spare = spare, None
        if spare is not None:  # closed meanwhile (the session ended): let it go at once
            spare.close()

    def ready(self) -> bool:
        """True iff a spare is waiting (tests; a start in a thread may still be under way)."""
        with self._lock:
            return self._spare is not None

    def close(self) -> None:
        """Let the waiting spare go; one still starting is let go of when it has started."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()


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


class _Output:
    """The read end of the command's output pipe (non-blocking, ours alone), read into a
    _Capture. Reads the fd directly rather than through a trio stream, whose every read is a
    schedule point: here the only ones are waits for data, plus one per PUMP_BURST reads in a
    row so that a writer keeping the pipe full cannot starve the other tasks."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd = fd
        self.cap = _Capture(limit)
        self.eof = False  # True iff the pipe reported EOF: every writer has closed it

    def read_some(self) -> bool:
        """Read what the pipe holds, up to PUMP_BURST reads. True iff the burst ran out (more
        may be waiting)."""
        for _ in range(PUMP_BURST):
            try:
                data = os.read(self.fd, READ_CHUNK)
            except BlockingIOError:
                return False
            except OSError:  # not seen from a pipe; the output so far is kept
                data = b""
            if not data:
                self.eof = True
                return False
            self.cap.feed(data)
        return True

    async def pump(self) -> None:
        """Read until EOF. Raises trio.Cancelled."""
        while not self.eof:
            if self.read_some():
                await trio.lowlevel.checkpoint()
            elif not self.eof:
                await trio.lowlevel.wait_readable(self.fd)

    async def read_until_exit(self, leader: _Leader) -> None:
        """Read until the shell has exited (and is reaped). Raises trio.Cancelled.

        One task waits for both events: through an epoll set of the pipe and the shell's pidfd
        where there is one (a second task costs ~60 us of CPU per command), else by waking
        every POLL_S to check on the shell.
        """
        both = leader.watch_with(self.fd)
        try:
            while leader.poll() is None:
                if self.eof:
                    await leader.wait()
                elif self.read_some():
                    await trio.lowlevel.checkpoint()
                elif self.eof:
                    continue  # the pipe closed first: only the exit is left to wait for
                elif both is not None:
                    await trio.lowlevel.wait_readable(both.fileno())
                else:
                    with trio.move_on_after(POLL_S):
                        await trio.lowlevel.wait_readable(self.fd)
        finally:
            if both is not None:
                trio.lowlevel.notify_closing(both.fileno())
                both.close()

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.fd)
        os.close(self.fd)


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


def _group_exists(pgid: int, leader: _Leader | None) -> bool:
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


async def terminate_group(pgid: int, grace_s: float, leader: _Leader | None = None) -> bool:
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


async def _members_gone(pgid: int, leader: _Leader | None, signalled_at: float) -> bool:
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
    spares: SpareShells | None = None,
) -> ShellOutcome:
    """Run `/bin/sh -c cmd` in `cwd` with exactly `env`, stdout and stderr captured together.

    With `spares` (made for this `cwd` and `env`), the command goes to its waiting spare shell
    if there is one, and the next spare starts (in a thread) once the command has ended.

    On timeout the process group gets SIGTERM, then SIGKILL after `kill_grace_s`. When the
    command's shell exits, processes it left in the background are ended the same way. Raises
    trio.Cancelled when cancelled, after ending the group (SIGTERM, `cancel_grace_s`, SIGKILL);
    raises OSError if the shell cannot be started.
    """
    await trio.lowlevel.checkpoint()  # a cancelled caller starts nothing
    started = spares.take(cmd) if spares is not None else None
    proc, fd = started if started is not None else _spawn(cmd, os.fspath(cwd), env)
    pgid = proc.pid  # start_new_session: the shell leads a new session and process group
    GUARDIAN.watch(pgid)  # ends the group if this process dies before the finally below
    out = _Output(fd, max_output_bytes)
    timed_out = False
    note: str | None = None
    finished = False
    try:
        with trio.move_on_after(timeout_s) as scope:
            await out.read_until_exit(proc)
        timed_out = scope.cancelled_caught
        if _group_exists(pgid, proc):
            # Out of time, or the shell left processes behind: end them, reading meanwhile so
            # that one writing as it dies does not block on a full pipe.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out.pump)
                await terminate_group(pgid, kill_grace_s, proc)
                await proc.wait()
                nursery.cancel_scope.cancel()
        # The group is gone (or past every wait): the pipe is at EOF unless a process outside
        # the group holds it open.
        out.read_some()
        if not out.eof:
            with trio.move_on_after(DRAIN_S):
                await out.pump()
        if not out.eof:
            note = ("the output pipe was still held open by a process outside the command's "
                    "process group (it called setsid); stopped reading")
        finished = True
    finally:
        with trio.CancelScope(shield=True):
            if not finished:  # cancelled or crashed: nothing of the group may outlive this call
                await terminate_group(pgid, cancel_grace_s, proc)
                with trio.move_on_after(KILL_WAIT_S):
                    await proc.wait()
            out.close()
            proc.close()
            GUARDIAN.forget(pgid)
    if spares is not None:
        # The next command's shell, started in a thread while this result goes back to the
        # model. Started here, not while the command runs: a command quicker than the start
        # (~0.3 ms) then waited for it, and the three processes shared two cores.
        spares.refill_soon()
    text, binary, cut = out.cap.render()
    return ShellOutcome(returncode=proc.returncode, output=text, total_bytes=out.cap.total,
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
    spares = SpareShells(os.fspath(ctx.workspace), env)

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
                              kill_grace_s=ctx.kill_grace_s, cancel_grace_s=ctx.cancel_grace_s,
                              spares=spares)
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
        close=spares.close,
    )
