"""The shell tool with real processes: cancellation and timeouts end the whole process group."""

import json
import os
import signal
import sys
import threading
import time

import pytest
import trio
from agent_helpers import alive

from agents.tools import ToolContext, build_registry
from agents.tools.shell import (
    PUMP_BURST,
    READ_CHUNK,
    SPARE_MAX_COMMAND_BYTES,
    SpareShells,
    _Output,
    run_shell,
)


async def wait_for_pids(path, n: int) -> list[int]:
    """The pids a command wrote to `path`, once there are `n` of them (real time)."""
    while True:
        if path.exists():
            pids = [int(x) for x in path.read_text().split()]
            if len(pids) >= n:
                return pids
        await trio.sleep(0.01)


def kill_leftovers(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def make_ctx(tmp_path, **kw) -> ToolContext:
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    kw.setdefault("env", {"PATH": "/usr/bin:/bin"})
    return ToolContext(workspace=ws, **kw)


# Grandchildren and great-grandchildren that ignore SIGTERM; each writes its pid to `pids`.
STUBBORN = (
    "for i in 1 2 3; do sh -c 'trap \"\" TERM; echo $$ >> pids; while :; do sleep 1; done' & done; "
    "sh -c 'trap \"\" TERM; sh -c \"trap \\\"\\\" TERM; echo \\$\\$ >> pids; sleep 60\" & "
    "echo $$ >> pids; wait' & "
    "echo $$ >> pids; wait"
)


async def warmed(registry, warm: bool):
    """The registry, its shell's spare started (warm: the next command runs in it)."""
    if warm:
        assert (await registry.call("shell", args(cmd="true"))).ok
    return registry


@pytest.mark.parametrize("warm", [False, True], ids=["own-shell", "spare-shell"])
async def test_cancel_kills_grandchildren_that_ignore_sigterm_within_a_second(tmp_path, warm):
    ctx = make_ctx(tmp_path, cancel_grace_s=0.3)
    registry = await warmed(build_registry(["shell"], ctx), warm)
    pidfile = ctx.workspace / "pids"
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(registry.call, "shell", args(cmd=STUBBORN))
                pids = await wait_for_pids(pidfile, 6)
                assert all(alive(p) for p in pids)
                t0 = time.monotonic()
                scope.cancel()
        took = time.monotonic() - t0
    try:
        survivors = [p for p in pids if alive(p)]
        assert survivors == [], f"processes outlived the cancel: {survivors}"
        assert took < 1.0, f"cancel took {took:.2f}s"
    finally:
        kill_leftovers(pids)


async def test_cancelled_propagates_out_of_the_tool(tmp_path):
    ctx = make_ctx(tmp_path, cancel_grace_s=0.2)
    registry = build_registry(["shell"], ctx)
    with trio.fail_after(5):
        with trio.move_on_after(0.2) as scope:
            await registry.call("shell", '{"cmd": "sleep 30"}')
    assert scope.cancelled_caught


@pytest.mark.parametrize("warm", [False, True], ids=["own-shell", "spare-shell"])
async def test_timeout_terms_then_kills_the_group_and_reports_an_error(tmp_path, warm):
    ctx = make_ctx(tmp_path, shell_timeout_s=0.3, kill_grace_s=0.2)
    registry = await warmed(build_registry(["shell"], ctx), warm)
    pidfile = ctx.workspace / "pids"
    cmd = "echo started; sh -c 'trap \"\" TERM; echo $$ >> pids; sleep 60' & echo $$ >> pids; wait"
    t0 = time.monotonic()
    with trio.fail_after(5):
        res = await registry.call("shell", args(cmd=cmd))
    took = time.monotonic() - t0
    pids = [int(x) for x in pidfile.read_text().split()]
    try:
        assert not res.ok
        assert "timed out after 0.3s" in res.error
        assert "started" in res.output
        assert 0.3 <= took < 1.5
        assert [p for p in pids if alive(p)] == []
    finally:
        kill_leftovers(pids)


async def test_model_can_shorten_but_not_extend_the_timeout(tmp_path):
    ctx = make_ctx(tmp_path, shell_timeout_s=0.3, kill_grace_s=0.1)
    registry = build_registry(["shell"], ctx)
    with trio.fail_after(5):
        res = await registry.call("shell", '{"cmd": "sleep 5", "timeout_s": 100}')
        assert not res.ok and "timed out after 0.3s" in res.error
        res = await registry.call("shell", '{"cmd": "sleep 5", "timeout_s": 0.1}')
        assert not res.ok and "timed out after 0.1s" in res.error
        res = await registry.call("shell", '{"cmd": "true", "timeout_s": -1}')
        assert not res.ok and "positive" in res.error


async def test_huge_output_is_capped_head_and_tail_and_returns_quickly(tmp_path):
    ctx = make_ctx(tmp_path)
    registry = build_registry(["shell"], ctx)
    cmd = "echo FIRST; yes | head -c 50000000; echo LAST"
    t0 = time.monotonic()
    with trio.fail_after(10):
        res = await registry.call("shell", args(cmd=cmd))
    assert time.monotonic() - t0 < 5
    assert res.ok, res.error
    assert res.output.startswith("FIRST\n")
    assert "LAST" in res.output[-200:]
    assert res.truncated_bytes > 50_000_000 - 17 * 1024
    assert "bytes cut from the middle" in res.output
    assert len(res.output.encode()) < ctx.max_output_bytes + 1024
    assert "[exit code 0; 50000011 bytes of output" in res.output


async def test_binary_output_is_decoded_with_replacement_and_marked(tmp_path):
    ctx = make_ctx(tmp_path)
    registry = build_registry(["shell"], ctx)
    with trio.fail_after(5):
        res = await registry.call("shell", r'{"cmd": "printf \"ok\\377\\000\\376end\""}')
    assert res.ok
    assert res.output.startswith("[binary output")
    assert "ok\ufffd\\0\ufffdend" in res.output


async def test_multibyte_text_cut_in_the_middle_is_not_called_binary(tmp_path):
    ctx = make_ctx(tmp_path, max_output_bytes=1001)
    registry = build_registry(["shell"], ctx)
    cmd = "i=0; while [ $i -lt 2000 ]; do printf 'é'; i=$((i+1)); done"
    with trio.fail_after(5):
        res = await registry.call("shell", args(cmd=cmd))
    assert res.ok
    assert "[binary output" not in res.output
    assert "\ufffd" not in res.output
    assert res.truncated_bytes > 0


async def test_exit_code_and_stderr_are_reported(tmp_path):
    ctx = make_ctx(tmp_path)
    registry = build_registry(["shell"], ctx)
    with trio.fail_after(5):
        res = await registry.call("shell", '{"cmd": "echo out; echo err >&2; exit 3"}')
    assert not res.ok
    assert res.error == "command failed (exit code 3); output is below"
    assert res.output == "out\nerr\n[exit code 3]"
    with trio.fail_after(5):
        res = await registry.call("shell", '{"cmd": "kill -9 $$"}')
    assert not res.ok and "killed by SIGKILL" in res.output


async def test_runs_in_the_workspace_with_only_the_explicit_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHBOARD_TEST_SECRET", "hunter2")
    ctx = make_ctx(tmp_path, env={"GREETING": "hi"})
    registry = build_registry(["shell"], ctx)
    with trio.fail_after(5):
        res = await registry.call(
            "shell", '{"cmd": "pwd; echo $GREETING-$SWITCHBOARD_TEST_SECRET-; ls /bin/sh"}')
    assert res.ok, res.error
    lines = res.output.splitlines()
    assert lines[0] == str(ctx.workspace.resolve())
    assert lines[1] == "hi--"  # the secret in the worker's environment was not passed
    assert lines[2] == "/bin/sh"  # PATH defaults to the standard dirs when the env names none


@pytest.mark.parametrize("warm", [False, True], ids=["own-shell", "spare-shell"])
async def test_background_processes_are_ended_when_the_command_exits(tmp_path, warm):
    ctx = make_ctx(tmp_path, kill_grace_s=0.2)
    registry = await warmed(build_registry(["shell"], ctx), warm)
    cmd = "sh -c 'trap \"\" TERM; echo $$ > pids; exec sleep 60' & sleep 0.1; echo done"
    t0 = time.monotonic()
    with trio.fail_after(5):
        res = await registry.call("shell", args(cmd=cmd))
    pids = [int(x) for x in (ctx.workspace / "pids").read_text().split()]
    try:
        assert res.ok and res.output.startswith("done")
        assert time.monotonic() - t0 < 1.5
        assert [p for p in pids if alive(p)] == []
    finally:
        kill_leftovers(pids)


async def test_a_process_that_escapes_with_setsid_does_not_hang_the_tool(tmp_path):
    # The documented limit: setsid leaves the group. The tool still returns and says so.
    ctx = make_ctx(tmp_path, kill_grace_s=0.2)
    registry = build_registry(["shell"], ctx)
    cmd = "setsid sh -c 'echo $$ > pids; exec sleep 30' & sleep 0.1; echo done"
    pids: list[int] = []
    try:
        with trio.fail_after(5):
            res = await registry.call("shell", args(cmd=cmd))
        pids = [int(x) for x in (ctx.workspace / "pids").read_text().split()]
        assert res.ok
        assert "outside the command's process group" in res.output
    finally:
        kill_leftovers(pids)


async def test_run_shell_reports_total_bytes_and_returncode(tmp_path):
    with trio.fail_after(5):
        out = await run_shell("printf abc; exit 7", cwd=tmp_path, env={}, timeout_s=5)
    assert (out.returncode, out.output, out.total_bytes, out.timed_out) == (7, "abc", 3, False)


@pytest.mark.slow
async def test_a_hundred_concurrent_commands_are_all_gone_within_a_second_of_cancel(tmp_path):
    ctx = make_ctx(tmp_path)  # the default cancel grace, 0.5 s
    registry = build_registry(["shell"], ctx)
    cmd = "sh -c 'trap \"\" TERM; echo $$ >> pids; sleep 60' & echo $$ >> pids; wait"
    with trio.fail_after(10):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                for _ in range(100):
                    nursery.start_soon(registry.call, "shell", args(cmd=cmd))
                pids = await wait_for_pids(ctx.workspace / "pids", 200)
                t0 = time.monotonic()
                scope.cancel()
        took = time.monotonic() - t0
    try:
        assert [p for p in pids if alive(p)] == []
        assert took < 1.0, f"cancelling 100 commands took {took:.2f}s"
    finally:
        kill_leftovers(pids)


def args(**kw) -> str:
    return json.dumps(kw)


def test_zombies_do_not_count_as_a_live_group():
    # An unreaped child is a zombie: killpg still finds its group, but nothing runs there.
    import subprocess

    from agents.tools.shell import group_alive

    proc = subprocess.Popen(["/bin/sh", "-c", "exit 0"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, 0)  # the zombie keeps the group id in use ...
        assert not group_alive(proc.pid)  # ... yet the group counts as gone
    finally:
        proc.wait()
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert group_alive(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


async def test_stdin_is_empty_so_commands_reading_it_do_not_hang(tmp_path):
    ctx = make_ctx(tmp_path)
    registry = build_registry(["shell"], ctx)
    with trio.fail_after(5):
        res = await registry.call("shell", args(cmd="cat; echo read-nothing"))
    assert res.ok and res.output == "read-nothing\n[exit code 0]"


async def test_background_leftovers_that_obey_sigterm_do_not_cost_the_whole_grace(tmp_path):
    # Even where PID 1 reaps orphans late (their zombies keep the group id in use), the call
    # returns as soon as every live member is gone, not after kill_grace_s.
    ctx = make_ctx(tmp_path)  # kill_grace_s = 2.0
    registry = build_registry(["shell"], ctx)
    t0 = time.monotonic()
    with trio.fail_after(5):
        res = await registry.call("shell", args(cmd="sleep 60 & sleep 60 & echo hi"))
    assert res.ok and res.output.startswith("hi")
    assert time.monotonic() - t0 < 1.0


async def test_a_cancelled_caller_starts_no_process(tmp_path):
    with trio.fail_after(5):
        with trio.CancelScope() as scope:
            scope.cancel()
            await run_shell("echo ran > ran", cwd=tmp_path, env={}, timeout_s=5)
    assert scope.cancelled_caught
    assert not (tmp_path / "ran").exists()


async def test_endless_output_still_times_out(tmp_path):
    with trio.fail_after(10):
        out = await run_shell("yes", cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, timeout_s=0.3,
                              kill_grace_s=0.2)
    assert out.timed_out
    assert out.total_bytes > 0 and out.output.startswith("y\ny\n")


async def test_the_output_pump_lets_other_tasks_run_while_data_keeps_coming(tmp_path):
    # A regular file never says "no data yet": the pump's own schedule points are all there is.
    big = tmp_path / "big"
    big.write_bytes(b"x" * (4 * PUMP_BURST * READ_CHUNK))
    out, turns = _Output(os.open(big, os.O_RDONLY), 1024), 0
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out.pump)
                while not out.eof:
                    await trio.lowlevel.checkpoint()
                    turns += 1
    finally:
        out.close()
    assert out.cap.total == 4 * PUMP_BURST * READ_CHUNK
    assert turns >= 4  # this task ran between the pump's bursts


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in its own process, which the test then kills with SIGKILL: two commands run, each with a
# background sleep (pids in `pids`), and a group that was watched and then forgotten while
# still running (its pid in `spared`).
GUARDED_OWNER = """
import subprocess, trio
from agents.tools.shell import GUARDIAN, SpareShells, run_shell

async def main():
    GUARDIAN.start()
    spares = SpareShells(".", {"PATH": "/usr/bin:/bin"})  # the first command runs in a spare
    spares.refill()
    await run_shell("true", cwd=".", env={}, timeout_s=10)
    spared = subprocess.Popen(["sleep", "60"], start_new_session=True)
    GUARDIAN.watch(spared.pid)
    GUARDIAN.forget(spared.pid)
    with open("spared", "w") as f:
        f.write(str(spared.pid))
    cmd = "sleep 60 & echo $$ $! >> pids; wait"
    async with trio.open_nursery() as nursery:
        for s in (spares, None):
            nursery.start_soon(lambda s=s: run_shell(cmd, cwd=".", env={"PATH": "/usr/bin:/bin"},
                                                     timeout_s=100, spares=s))

trio.run(main)
"""


async def test_guardian_ends_the_groups_of_an_owner_killed_with_sigkill_and_spares_the_rest(
        tmp_path):
    import subprocess
    import sys

    pids: list[int] = []
    spared = 0
    owner = await trio.lowlevel.open_process(
        [sys.executable, "-c", GUARDED_OWNER], cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO},
        stdin=subprocess.DEVNULL)
    try:
        with trio.fail_after(10):
            pids = await wait_for_pids(tmp_path / "pids", 4)
            spared = int((tmp_path / "spared").read_text())
            assert all(alive(p) for p in [*pids, spared])
            owner.kill()
            await owner.wait()
            while any(alive(p) for p in pids):  # noqa: ASYNC110 (nothing to wait on but /proc)
                await trio.sleep(0.01)
        assert alive(spared)  # crossed out of the list: not the guardian's to end
    finally:
        if owner.returncode is None:
            owner.kill()
        kill_leftovers([*pids, spared] if spared else pids)


@pytest.mark.parametrize("pidfd", [True, False], ids=["pidfd", "polled"])
async def test_exit_is_seen_while_reading_with_or_without_a_pidfd(tmp_path, monkeypatch, pidfd):
    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError("pidfd_open: not here")

    if not pidfd:
        monkeypatch.setattr(os, "pidfd_open", no_pidfd)  # as on an old kernel or not Linux
    env = {"PATH": "/usr/bin:/bin"}
    with trio.fail_after(10):
        out = await run_shell("printf abc; exit 7", cwd=tmp_path, env=env, timeout_s=5)
        assert (out.returncode, out.output, out.timed_out) == (7, "abc", False)
        # the shell exits while its background sleep still holds the pipe open
        out = await run_shell("sleep 60 & echo $! > pids; echo hi; sleep 0.1", cwd=tmp_path,
                              env=env, timeout_s=5, kill_grace_s=0.2)
        pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
        try:
            assert out.output == "hi\n" and not out.timed_out
            assert [p for p in pids if alive(p)] == []
        finally:
            kill_leftovers(pids)
        out = await run_shell("echo started; sleep 5", cwd=tmp_path, env=env, timeout_s=0.2,
                              kill_grace_s=0.2)
        assert out.timed_out and out.output == "started\n" and out.returncode == -signal.SIGTERM


# ---------------------------------------------------------------- spare shells

SAME_AS_SH_C = [
    "echo hi", "echo hi\n", "  echo '  spaced  '\necho b", "printf '%s\\n' 'a\\b' \"c\\\\d\"",
    'echo $0 $# "$@"', "cat; echo read-nothing", "x=1\necho $x\\\ncontinued",
    "cat <<EOF\nline1\n  line2\nEOF\necho done", "echo trailing\\", "echo 'ünïcode'",
    "trap 'echo bye' EXIT; echo in", "set -e; false; echo not-reached", "exit 5",
    "\n\necho blank-lines-first", "f() { return 3; }; f; echo $?", "echo a; exit",
]


def _spare_pid(spares: SpareShells) -> int:
    assert spares._spare is not None, "a spare is waiting"
    return spares._spare.popen.pid


async def _next_spare_pid(spares: SpareShells) -> int:
    """The spare a command's end started (in a thread), once it is waiting."""
    with trio.fail_after(5):
        while not spares.ready():  # noqa: ASYNC110 - a start in a worker thread
            await trio.sleep(0.001)
    return _spare_pid(spares)


@pytest.mark.parametrize("cmd", SAME_AS_SH_C)
async def test_a_spare_shell_runs_a_command_exactly_as_sh_c_does(tmp_path, cmd):
    env = {"PATH": "/usr/bin:/bin"}
    plain = await run_shell(cmd, cwd=tmp_path, env=env, timeout_s=5)
    spares = SpareShells(str(tmp_path), env)
    spares.refill()
    spare = _spare_pid(spares)
    try:
        warm = await run_shell(cmd, cwd=tmp_path, env=env, timeout_s=5, spares=spares)
        assert await _next_spare_pid(spares) != spare, "the spare took the command; a new one"
    finally:
        spares.close()
    assert (warm.returncode, warm.output) == (plain.returncode, plain.output)


async def test_the_command_runs_in_the_spare_and_the_next_spare_starts_after_it(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    spares = SpareShells(str(tmp_path), env)
    try:
        first = await run_shell("echo $$", cwd=tmp_path, env=env, timeout_s=5, spares=spares)
        waiting = await _next_spare_pid(spares)  # started when the first command ended
        assert int(first.output) != waiting
        second = await run_shell("echo $$; pwd", cwd=tmp_path, env=env, timeout_s=5,
                                 spares=spares)
        assert second.output.split() == [str(waiting), str(tmp_path)]
        assert not alive(waiting), "the spare ran the command and was reaped"
    finally:
        spares.close()


async def test_shell_errors_from_a_spare_name_eval_but_keep_the_exit_code(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    spares = SpareShells(str(tmp_path), env)
    spares.refill()
    try:
        out = await run_shell("no-such-command", cwd=tmp_path, env=env, timeout_s=5,
                              spares=spares)
    finally:
        spares.close()
    assert out.returncode == 127
    assert out.output == "/bin/sh: 1: eval: no-such-command: not found\n"


def test_a_spare_runs_nothing_without_its_end_line(tmp_path):
    """An owner that dies (or gives up) mid-write leaves a cut command: it never runs."""
    from agents.tools.shell import _Spare

    for cut in (b"touch ran\n", b"touch ran", b""):
        spare = _Spare(str(tmp_path), {"PATH": "/usr/bin:/bin"})
        assert spare.cmd is not None
        os.write(spare.cmd, cut)
        popen = spare.popen
        spare.close()
        assert popen.wait(timeout=5) == 0
        assert not (tmp_path / "ran").exists()


async def test_a_spare_exits_when_its_owner_is_killed(tmp_path):
    code = ("import os, signal, sys\n"
            "from agents.tools.shell import SpareShells\n"
            "s = SpareShells(sys.argv[1], {'PATH': '/usr/bin:/bin'})\n"
            "s.refill()\n"
            "print(s._spare.popen.pid, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = await trio.run_process([sys.executable, "-c", code, str(tmp_path)],
                                  capture_stdout=True, check=False,
                                  env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == -signal.SIGKILL
    spare = int(proc.stdout)
    with trio.fail_after(5):
        while alive(spare):  # noqa: ASYNC110 - another process's exit
            await trio.sleep(0.01)


async def test_a_spare_in_a_directory_made_again_is_not_used(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    ws = tmp_path / "ws"
    ws.mkdir()
    spares = SpareShells(str(ws), env)
    spares.refill()
    stale = _spare_pid(spares)
    ws.rmdir()
    ws.mkdir()
    try:
        out = await run_shell("echo $$; ls -di .", cwd=ws, env=env, timeout_s=5, spares=spares)
    finally:
        spares.close()
    pid, inode, _ = out.output.split()
    assert int(pid) != stale and int(inode) == ws.stat().st_ino
    with trio.fail_after(5):
        while alive(stale):  # noqa: ASYNC110 - let go of: it exits at EOF
            await trio.sleep(0.01)


async def test_a_long_command_gets_its_own_shell_and_the_spare_keeps_waiting(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    spares = SpareShells(str(tmp_path), env)
    spares.refill()
    spare = _spare_pid(spares)
    cmd = ": " + "x" * SPARE_MAX_COMMAND_BYTES + "; echo $$"
    try:
        out = await run_shell(cmd, cwd=tmp_path, env=env, timeout_s=5, spares=spares)
        assert int(out.output) != spare and _spare_pid(spares) == spare
    finally:
        spares.close()


async def test_closing_the_registry_ends_the_shells_spare(tmp_path):
    ctx = make_ctx(tmp_path)
    registry = build_registry(["shell"], ctx)
    assert (await registry.call("shell", args(cmd="true"))).ok
    spare = int((await registry.call("shell", args(cmd="echo $$"))).output.split()[0])
    assert alive(spare) is False  # that one ran the command; the next is waiting
    tool = registry._tools["shell"]
    assert tool.close is not None
    with trio.fail_after(5):
        while not (waiting := _spares_of_this_process()):  # noqa: ASYNC110 - in a thread
            await trio.sleep(0.001)
    assert len(waiting) == 1
    registry.close()
    with trio.fail_after(5):
        while alive(waiting[0]):  # noqa: ASYNC110 - let go of: it exits at EOF
            await trio.sleep(0.01)


def _spares_of_this_process() -> list[int]:
    return [p for p in (int(x) for x in os.listdir("/proc") if x.isdigit())
            if p != os.getpid() and _is_spare_of(p, os.getpid())]


async def test_a_command_returns_without_waiting_for_the_next_spare(tmp_path):
    """The next spare starts in a thread: a command's result goes back while it starts."""
    env = {"PATH": "/usr/bin:/bin"}
    spares = SpareShells(str(tmp_path), env)
    release = threading.Event()
    real_start = spares._start

    def slow_start():  # the real start, held until the command has returned
        assert release.wait(10), "the command did not return while the spare was starting"
        return real_start()

    spares._start = slow_start  # type: ignore[method-assign]
    try:
        out = await run_shell("echo $$", cwd=tmp_path, env=env, timeout_s=5, spares=spares)
        assert out.returncode == 0 and not spares.ready()
        release.set()
        assert await _next_spare_pid(spares) != int(out.output)
    finally:
        release.set()
        spares.close()


async def test_a_spare_still_starting_when_the_tool_closes_is_let_go_of(tmp_path):
    env = {"PATH": "/usr/bin:/bin"}
    spares = SpareShells(str(tmp_path), env)
    release = threading.Event()
    started: list[int] = []
    real_start = spares._start

    def held_start():
        release.wait(10)
        spare = real_start()
        if spare is not None:
            started.append(spare.popen.pid)
        return spare

    spares._start = held_start  # type: ignore[method-assign]
    spares.refill_soon()
    spares.close()  # the session ends while the spare is still starting
    release.set()
    with trio.fail_after(5):
        while not started:  # noqa: ASYNC110 - the thread's start
            await trio.sleep(0.001)
        while alive(started[0]):  # noqa: ASYNC110 - let go of at once: it exits at EOF
            await trio.sleep(0.01)
    assert not spares.ready()
    spares.refill_soon()  # a closed tool starts no more
    spares.refill()
    assert not spares.ready()


def _is_spare_of(pid: int, parent: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    ppid = int(stat[stat.rfind(")") + 2:].split()[1])
    return ppid == parent and len(argv) > 2 and argv[2].startswith(b"_sb_c=")
