"""The orchestrator end to end with real processes on loopback: `orchestrator run` (and
`resume`, `scale`, `cancel`, `worker`) as subprocesses, real worker processes, the journal and
the process table read afterwards.

Pins: a worker killed with SIGKILL loses its attempts to other workers and its late result is
refused; scale up/down mid-run (a draining worker finishes what it holds); a subtree cancel;
SIGINT/SIGTERM leave no process behind; a killed orchestrator resumes without repeating
finished tasks; bad workers are cut off while the run goes on; remote workers need the token;
bad graphs and startup errors never leave a run "running".

Timing: tasks take their time from the sim's decode rate (e.g. 300 tokens at 5 ms), leases
expire after 2 s (workers heartbeat every second). Every wait is a poll under `fail_after`,
so a slow machine makes a test slower, never wrong.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import trio
from agent_helpers import alive

from agents import protocol as P
from bus.client import open_bus_client
from orchestrator.journal import Journal, JournalError

REPO = pathlib.Path(__file__).resolve().parent.parent
TOKEN = "e2e-token-0123456789abcdef"
GUARD_S = 40
SIM = ("--sim-ttft", "0", "--sim-prefill", "0", "--sim-decode", "0.005")


def _env(token: str | None = TOKEN) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SWITCHBOARD_TOKEN", None)
    if token is not None:
        env["SWITCHBOARD_TOKEN"] = token
    return env


def _orch(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def graph(n: int, *, tokens: int = 300, extra: str = "", policy: str = "stop",
          timeout: str = "60s") -> str:
    """n independent tasks t0..t{n-1}, each generating `tokens` output tokens."""
    tasks = "".join(f'\n[[tasks]]\nid = "t{i}"\nagent = "slow"\nprompt = "task {i}"\n'
                    for i in range(n))
    return (f'[run]\nmax_concurrent = 16\nfailure_policy = "{policy}"\ntimeout = "{timeout}"\n'
            f'[agents.slow]\ninstructions = "x"\n'
            f'script = [{{text = "done", output_tokens = {tokens}}}]\n' + extra + tasks)


def procs_touching(needle: str) -> list[int]:
    """Live processes whose command line or working directory contains `needle` (a test's
    unique state dir): workers (--state-dir) and tool processes (cwd in a workspace)."""
    out = []
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        if (needle in cmd or needle in cwd) and alive(int(d.name)):
            out.append(int(d.name))
    return out


def worker_pid(worker_id: str) -> int | None:
    for d in pathlib.Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--worker-id" in cmd and worker_id.encode() in cmd and b"worker" in cmd:
                return int(d.name)
    return None


async def until(pred: Any, poll_s: float = 0.05) -> Any:
    """Poll `pred` until it returns something truthy (the caller's fail_after bounds it)."""
    while True:
        v = pred()
        if v:
            return v
        await trio.sleep(poll_s)


class Run:
    """One `orchestrator run` subprocess on its own state dir, and views of its journal."""

    def __init__(self, tmp: pathlib.Path, text: str | None = None) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.graph = tmp / "graph.toml"
        if text is not None:
            self.graph.write_text(text)
        self.proc: trio.Process | None = None
        self.err_path = tmp / "run.stderr"
        self.out_path = tmp / "run.stdout"
        self.code: int | None = None

    async def start(self, *args: str, cmd: tuple[str, ...] | None = None) -> None:
        argv = cmd or ("run", str(self.graph))
        self.err = open(self.err_path, "ab")  # noqa: SIM115, ASYNC230 - closed in wait()
        self.out = open(self.out_path, "ab")  # noqa: SIM115, ASYNC230 - closed in wait()
        self.proc = await trio.lowlevel.open_process(
            _orch(*argv, "--state-dir", str(self.state), "--progress", "plain",
                  "--lease-ttl", "2", *SIM, *args),
            env=_env(), stdin=subprocess.DEVNULL, stdout=self.out, stderr=self.err)

    async def wait(self) -> int:
        assert self.proc is not None
        self.code = await self.proc.wait()
        self.err.close()
        self.out.close()
        return self.code

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def journal(self) -> Journal | None:
        try:
            return Journal.open_readonly(self.state / "journal.sqlite")
        except JournalError:
            return None

    def run_id(self) -> str | None:
        j = self.journal()
        if j is None:
            return None
        try:
            r = j.latest_run()
            return None if r is None else str(r["run_id"])
        finally:
            j.close()

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        j, rid = self.journal(), self.run_id()
        if j is None or rid is None:
            return []
        try:
            return [e for e in j.events(rid) if kind is None or e["kind"] == kind]
        finally:
            j.close()

    def attempts(self) -> list[dict[str, Any]]:
        j, rid = self.journal(), self.run_id()
        if j is None or rid is None:
            return []
        try:
            return j.attempts(rid)
        finally:
            j.close()

    def tasks(self) -> dict[str, dict[str, Any]]:
        j, rid = self.journal(), self.run_id()
        assert j is not None and rid is not None
        try:
            return {t["task_id"]: t for t in j.task_rows(rid)}
        finally:
            j.close()

    def run_row(self) -> dict[str, Any]:
        j, rid = self.journal(), self.run_id()
        assert j is not None and rid is not None
        try:
            row = j.get_run(rid)
            assert row is not None
            return row
        finally:
            j.close()

    def bus_url(self) -> str | None:
        ev = self.events("run.endpoints")
        return str(ev[0]["data"]["local_bus"]) if ev else None

    def running_on(self) -> dict[str, list[str]]:
        """worker id -> task ids of attempts running on it now (per the journal)."""
        out: dict[str, list[str]] = {}
        for a in self.attempts():
            if a["state"] == "running" and a["worker_id"]:
                out.setdefault(a["worker_id"], []).append(a["task_id"])
        return out

    def log_lines(self) -> str:
        rid = self.run_id()
        return (self.state / "runs" / str(rid) / "log.jsonl").read_text(errors="replace")

    async def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return await trio.run_process(_orch(*args, "--state-dir", str(self.state)),
                                      env=_env(), capture_stdout=True, capture_stderr=True,
                                      check=False)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


def by_task(attempts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for a in attempts:
        out.setdefault(a["task_id"], []).append(a)
    return out


def assert_never_twice_at_once(attempts: list[dict[str, Any]]) -> None:
    """Per task: attempts numbered 1..n, at most one succeeded, and each attempt ended before
    the next one started (no two attempts of a task ran at the same time)."""
    for tid, atts in by_task(attempts).items():
        atts.sort(key=lambda a: a["attempt"])
        assert [a["attempt"] for a in atts] == list(range(1, len(atts) + 1)), tid
        assert sum(a["state"] == "succeeded" for a in atts) <= 1, (tid, atts)
        for prev, nxt in zip(atts, atts[1:], strict=False):
            assert prev["ended"] is not None and nxt["started"] is not None, (tid, atts)
            assert prev["ended"] <= nxt["started"], (tid, prev, nxt)


@pytest.fixture
def run(tmp_path):
    r = Run(tmp_path)
    yield r
    r.kill()
    for pid in procs_touching(str(r.state)):  # never leave anything behind, even on failure
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ fast: bad input, startup


def test_a_bad_graph_never_starts_a_run_exit_2_and_no_state(tmp_path):
    g = tmp_path / "bad.toml"
    g.write_text('[run]\nmax_concurent = 2\n[[tasks]]\nid = "a"\nagent = "nobody"\n')
    state = tmp_path / "state"
    p = subprocess.run(_orch("run", str(g), "--state-dir", str(state)), env=_env(),
                       capture_output=True, timeout=60, check=False)
    assert p.returncode == 2
    err = p.stderr.decode()
    assert "bad.toml:2:" in err and "max_concurrent" in err  # did-you-mean, on its line
    assert "nobody" in err
    assert not state.exists()  # no state dir, so no journal and no run row


def test_local_workers_without_the_models_key_start_nothing_exit_2(tmp_path):
    """A graph whose agents read a key the local workers would not have: refused before any
    run row (each of their tasks would fail at its first turn)."""
    g = tmp_path / "g.toml"
    g.write_text('[model]\nprovider = "openai"\n[agents.a]\n'
                 '[[tasks]]\nid = "t"\nagent = "a"\nprompt = "hi"\n')
    state = tmp_path / "state"
    env = {k: v for k, v in _env().items() if k != "OPENAI_API_KEY"}
    p = subprocess.run(_orch("run", str(g), "--state-dir", str(state)), env=env,
                       capture_output=True, timeout=60, check=False)
    assert p.returncode == 2, p.stderr
    err = p.stderr.decode()
    assert err.startswith("error: $OPENAI_API_KEY is not set here, and agent a reads")
    assert "nothing was started" in err and "--workers 0" in err
    assert not state.exists()


def test_a_port_in_use_exits_3_with_one_line_and_the_run_row_failed(tmp_path):
    g = tmp_path / "g.toml"
    g.write_text(graph(1, tokens=1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        state = tmp_path / "state"
        p = subprocess.run(_orch("run", str(g), "--state-dir", str(state), "--bus-port",
                                 str(port), "--progress", "none"),
                           env=_env(), capture_output=True, timeout=60, check=False)
    err = p.stderr.decode()
    assert p.returncode == 3, err
    assert "Traceback" not in err
    assert f"cannot start the bus on 127.0.0.1:{port}" in err
    j = Journal.open_readonly(state / "journal.sqlite")
    row = j.latest_run()
    assert row is not None and row["status"] == "failed"
    assert "cannot start the bus" in row["reason"]


# ------------------------------------------------------------------ workers die, scale, cancel


@pytest.mark.slow
async def test_kill_9_a_worker_mid_task_requeues_its_attempts_and_refuses_its_late_result(run):
    run.graph.write_text(graph(6, tokens=300))
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "2", "--capacity", "2")
        on = await until(lambda: (lambda r: r if len(r) == 2 and all(len(v) == 2 for v in
                                                                       r.values()) else None)(
            run.running_on()))
        victim = sorted(on)[0]
        pid = await until(lambda: worker_pid(victim))
        os.kill(pid, signal.SIGKILL)
        # the dead worker's attempts are re-queued (process exit, or lease expiry)
        await until(lambda: {a["task_id"] for a in run.attempts()
                             if a["state"] == "lost"} >= set(on[victim]))
        # a late result for a dead attempt, sent as the dead worker: refused
        url = run.bus_url()
        assert url is not None
        dead_task = on[victim][0]
        async with open_bus_client(url, token=TOKEN, endpoint_id=P.worker_endpoint(victim)) as c:
            await c.send(P.ORCHESTRATOR_ID, P.to_wire(P.Result(
                run_id=str(run.run_id()), task_id=dead_task, attempt=1, worker_id=victim,
                status="succeeded", text="FORGED LATE RESULT")))
            await until(lambda: run.events("result.refused"))
        code = await run.wait()
    assert code == 0, run.stderr()
    tasks = run.tasks()
    assert all(t["state"] == "succeeded" for t in tasks.values())
    assert "FORGED" not in str(tasks[dead_task]["result"])
    atts = run.attempts()
    assert_never_twice_at_once(atts)
    per = by_task(atts)
    for tid in on[victim]:
        states = [a["state"] for a in sorted(per[tid], key=lambda a: a["attempt"])]
        assert states == ["lost", "succeeded"], (tid, states)
        assert per[tid][1]["worker_id"] != victim
    refused = run.events("result.refused")[0]["data"]
    assert refused["attempt"] == 1 and refused["worker_id"] == victim
    assert refused["reported"] == "succeeded"
    # resume would not take it for a success either: its attempt row stays "lost"
    assert next(a for a in per[dead_task] if a["attempt"] == 1)["result"] is None
    assert not procs_touching(str(run.state))


@pytest.mark.slow
async def test_a_local_worker_that_stops_answering_is_killed_before_its_work_runs_again(run):
    """SIGSTOP a worker mid-tool: when its heartbeats stop, its attempt runs again elsewhere,
    and the stopped worker and its tool are gone rather than waking up to run beside it."""
    marks = run.tmp / "marks"
    run.graph.write_text(f'''
[run]
timeout = "60s"
[agents.a]
tools = ["shell"]
script = [{{call = {{name = "shell", arguments = {{cmd = "echo $$ >> {marks}; sleep 30"}}}}}},
          {{text = "done"}}]
[[tasks]]
id = "t"
agent = "a"
''')
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "1")
        victim = (await until(run.running_on)).popitem()[0]
        pid = await until(lambda: worker_pid(victim))
        tool = int(await until(lambda: marks.exists() and marks.read_text().split()[0]))
        os.kill(pid, signal.SIGSTOP)
        await until(lambda: any(a["state"] == "lost" for a in run.attempts()))
        await until(lambda: not alive(pid) and not alive(tool))
        # the second attempt runs on the replacement, and it alone
        await until(lambda: len(marks.read_text().split()) == 2)
        second = int(marks.read_text().split()[1])
        assert alive(second) and not alive(tool)
        run.proc.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        await run.wait()
    assert not procs_touching(str(run.state))


@pytest.mark.slow
async def test_scale_up_adds_workers_and_scale_down_drains_without_losing_work(run):
    run.graph.write_text(graph(14, tokens=300))
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "1", "--capacity", "2")
        await until(lambda: len(run.running_on()) == 1)
        rid = str(run.run_id())
        p = await run.cli("scale", "3", "--run", rid)
        assert p.returncode == 0, p.stderr
        await until(lambda: len(run.running_on()) == 3)
        workers = sorted(run.running_on())
        p = await run.cli("scale", "1", "--run", rid)
        assert p.returncode == 0, p.stderr
        # two workers drain: they finish what they hold, then their processes exit
        await until(lambda: sum(worker_pid(w) is not None for w in workers) == 1, poll_s=0.1)
        code = await run.wait()
    assert code == 0, run.stderr()
    atts = run.attempts()
    assert {a["state"] for a in atts} == {"succeeded"}  # draining lost or cancelled nothing
    assert_never_twice_at_once(atts)
    assert len({a["worker_id"] for a in atts}) == 3
    log = run.log_lines()
    assert log.count('"worker.draining"') == 2 and log.count('"worker.spawned"') == 3
    # drained ones and the last one stopped at the run's end were asked to go: no warning
    exits = [json.loads(ln) for ln in log.splitlines() if '"worker.exited"' in ln]
    assert len(exits) == 3 and {e["level"] for e in exits} == {"info"}, exits


@pytest.mark.slow
async def test_cancel_a_subtree_cancels_children_and_marks_dependents_not_run(run):
    run.graph.write_text('''
[run]
failure_policy = "continue"
[agents.planner]
script = [{text = '{"files": ["a", "b", "c"]}'}]
[agents.slow]
script = [{text = "done", output_tokens = 2000}]
[agents.quick]
script = [{text = "ok", output_tokens = 100}]
[[tasks]]
id = "plan"
agent = "planner"
[[tasks]]
id = "code"
agent = "slow"
needs = ["plan"]
fan_out = "plan.outputs.files"
prompt = "write {{ item }}"
[[tasks]]
id = "review"
agent = "quick"
needs = ["code"]
[[tasks]]
id = "other"
agent = "quick"
''')
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "2", "--capacity", "4")
        await until(lambda: sum(a["task_id"].startswith("code[") and a["state"] == "running"
                                for a in run.attempts()) == 3)
        p = await run.cli("cancel", str(run.run_id()), "code")
        assert p.returncode == 0, p.stderr
        code = await run.wait()
    assert code == 130, run.stderr()  # something was cancelled, nothing failed
    tasks = run.tasks()
    assert {t: tasks[t]["state"] for t in tasks} == {
        "plan": "succeeded", "other": "succeeded", "code": "cancelled",
        "code[0]": "cancelled", "code[1]": "cancelled", "code[2]": "cancelled",
        "review": "not_run"}
    assert "needs code, which was cancelled" in tasks["review"]["reason"]
    kids = [a for a in run.attempts() if a["task_id"].startswith("code[")]
    assert {a["state"] for a in kids} == {"cancelled"} and len(kids) == 3
    assert all(a["error"] == "cancelled by request" for a in kids)
    assert not procs_touching(str(run.state))


async def test_a_parent_that_times_out_takes_its_spawned_child_with_it(run):
    run.graph.write_text('''
[run]
failure_policy = "continue"
timeout = "10m"
[agents.talker]
script = [{text = "long", output_tokens = 100000}]
[agents.boss]
tools = ["spawn", "wait"]
script = [
  {call = {name = "spawn", arguments = {prompt = "talk a lot", agent = "talker"}}},
  {call = {name = "wait", arguments = {children = ["boss/1"]}}},
  {text = "never"},
]
[[tasks]]
id = "boss"
agent = "boss"
timeout = "2s"
''')
    with trio.fail_after(GUARD_S):  # the child alone would talk for 500 s
        await run.start("--workers", "1", "--capacity", "4")
        code = await run.wait()
    assert code == 1, run.stderr()  # boss failed; its child was cancelled, not left running
    tasks = run.tasks()
    assert (tasks["boss"]["state"], tasks["boss"]["error"]) == ("failed", "timed out after 2s")
    assert "  failed boss: timed out after 2s" in run.stderr().splitlines()  # says why at once
    assert tasks["boss/1"]["state"] == "cancelled"
    assert tasks["boss/1"]["reason"] == (
        "superseded: parent boss's attempt 1 timed out after 2s")
    [child] = [a for a in run.attempts() if a["task_id"] == "boss/1"]
    assert child["state"] == "cancelled" and child["stopped_at"] == "turn 1: model"
    # the timeout is a warning (what `logs --level warning` shows); the child's cancel is not
    cancels = {(r["task_id"], r["level"]) for r in map(json.loads, run.log_lines().splitlines())
               if r.get("event") == "attempt.cancel"}
    assert cancels == {("boss", "warning"), ("boss/1", "info")}, cancels


SIGNAL_GRAPH = graph(2, tokens=5000, extra='''
[agents.sleeper]
tools = ["shell"]
script = [{call = {name = "shell", arguments = {cmd = "sleep 60 & sleep 60"}}}, {text = "x"}]
[[tasks]]
id = "nap"
agent = "sleeper"
''')


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_cancels_the_run_exit_130_and_leaves_no_process(run, sig):
    run.graph.write_text(SIGNAL_GRAPH)
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "2", "--capacity", "2")
        await until(lambda: len([a for a in run.attempts() if a["state"] == "running"]) == 3)
        # the tool's processes are up (their cwd is the task's workspace in the state dir)
        await until(lambda: len([p for p in procs_touching(str(run.state / "workspaces"))]) >= 2)
        assert run.proc is not None
        run.proc.send_signal(sig)
        code = await run.wait()
        # everything the run started is gone (the workers were waited for before exit)
        await until(lambda: not procs_touching(str(run.state)), poll_s=0.1)
    assert code == 130, run.stderr()
    row = run.run_row()
    assert row["status"] == "cancelled" and signal.Signals(sig).name in row["reason"]
    assert {t["state"] for t in run.tasks().values()} == {"cancelled"}
    assert {a["state"] for a in run.attempts()} == {"cancelled"}


async def kill_9_and_resume(run: Run, *, busy_port_first: bool = False) -> tuple[int, str]:
    """kill -9 the orchestrator mid-run, wait until its workers (and their tools) noticed and
    stopped, check the journal still says running, then `orchestrator resume` it with one
    worker. With `busy_port_first`, a resume on a port in use comes first: it fails (exit 3)
    and must leave the run resumable. Returns the resume's exit code and stderr."""
    rid = str(run.run_id())

    async def orch(*argv: str) -> Any:
        return await trio.run_process(_orch(*argv, rid, "--state-dir", str(run.state)),
                                      env=_env(), capture_stdout=True, capture_stderr=True,
                                      check=False)

    assert run.proc is not None
    # while the orchestrator lives, a resume would run its tasks a second time: refused
    states = sorted((a["task_id"], a["attempt"], a["state"]) for a in run.attempts())
    early = await orch("resume")
    assert early.returncode == 2, early.stderr
    assert f"run {rid} is still running: its orchestrator (pid {run.proc.pid})" in \
        early.stderr.decode()
    assert "lost" not in {a["state"] for a in run.attempts()}, states
    assert b"orchestrator: not running" not in (await orch("status")).stdout
    run.proc.kill()
    await run.wait()
    await until(lambda: not procs_touching(str(run.state)), poll_s=0.1)
    assert run.run_row()["status"] == "running"
    assert b"orchestrator: not running" in (await orch("status")).stdout
    if busy_port_first:
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            busy = await orch("resume", "--bus-port", str(held.getsockname()[1]))
        assert busy.returncode == 3 and b"was not changed" in busy.stderr, busy.stderr
        assert run.run_row()["status"] == "running"  # it used to be marked failed for good
    resumed = Run(run.tmp)
    resumed.err_path = run.tmp / "resume.stderr"
    await resumed.start("--workers", "1", cmd=("resume", rid))
    code = await resumed.wait()
    return code, resumed.stderr()


@pytest.mark.slow
async def test_kill_9_the_orchestrator_then_resume_finishes_without_repeating_tasks(run):
    run.graph.write_text('''
[agents.quick]
script = [{text = "ok", output_tokens = 10}]
[agents.slow]
script = [{text = "slow done", output_tokens = 600}]
[[tasks]]
id = "a"
agent = "quick"
[[tasks]]
id = "b"
agent = "quick"
[[tasks]]
id = "c"
agent = "slow"
needs = ["a", "b"]
[[tasks]]
id = "d"
agent = "quick"
needs = ["c"]
''')
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "2")
        await until(lambda: any(a["task_id"] == "c" and a["state"] == "running"
                                for a in run.attempts()))
        code, err = await kill_9_and_resume(run, busy_port_first=True)
    assert code == 0, err
    assert run.run_row()["status"] == "succeeded"
    per = by_task(run.attempts())
    assert [a["state"] for a in per["a"]] == ["succeeded"]  # finished before: not repeated
    assert [a["state"] for a in per["b"]] == ["succeeded"]
    assert [a["state"] for a in sorted(per["c"], key=lambda a: a["attempt"])] == [
        "lost", "succeeded"]
    assert [a["state"] for a in per["d"]] == ["succeeded"]
    assert_never_twice_at_once(run.attempts())
    assert run.events("resumed")[0]["data"]["closed_attempts"] == 1


def sim_pids(run_id: str) -> list[int]:
    """The run's embedded sim process(es): `orchestrator model-server ... --run-id RUN`."""
    out = []
    for pid in procs_touching(run_id):
        try:
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"model-server" in cmd:
            out.append(pid)
    return out


@pytest.mark.slow
async def test_the_sims_process_dying_stops_the_run_resumably_and_loses_no_task(run):
    """The embedded sim runs in a child process of its own (in the run's state dir). kill -9
    it mid-turn: the run stops (exit 3, 'stopped', the reason in the journal), the attempt in
    flight is lost, not failed (retries = 0 here, so a failure would have been final), and
    nothing is left running; `resume` starts a new sim and finishes without repeating what
    had finished."""
    run.graph.write_text('''
[run]
retries = 0
[agents.quick]
script = [{text = "ok", output_tokens = 10}]
[agents.slow]
script = [{text = "slow done", output_tokens = 2000}]
[[tasks]]
id = "a"
agent = "quick"
[[tasks]]
id = "c"
agent = "slow"
needs = ["a"]
''')
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "1")
        await until(lambda: any(a["task_id"] == "c" and a["state"] == "running"
                                for a in run.attempts()))
        rid = str(run.run_id())
        [sim] = sim_pids(rid)
        assert os.readlink(f"/proc/{sim}/cwd") == str(run.state)
        os.kill(sim, signal.SIGKILL)
        code = await run.wait()
        await until(lambda: not procs_touching(str(run.state)), poll_s=0.1)
        assert code == 3, run.stderr()
        row = run.run_row()
        assert row["status"] == "stopped", row
        assert "embedded sim model server's process was killed by SIGKILL" in row["reason"]
        assert f"orchestrator resume {rid}" in run.stderr()
        per = by_task(run.attempts())
        # the one that ran, and the next one queued as the run stopped: lost, neither failed
        assert {a["state"] for a in per["c"]} == {"lost"}, per["c"]
        tried = len(per["c"])
        resumed = Run(run.tmp)
        resumed.err_path = run.tmp / "resume.stderr"
        await resumed.start("--workers", "1", cmd=("resume", rid))
        code = await resumed.wait()
        await until(lambda: not procs_touching(str(run.state)), poll_s=0.1)
    assert code == 0, resumed.stderr()
    assert run.run_row()["status"] == "succeeded"
    per = by_task(run.attempts())
    assert [a["state"] for a in per["a"]] == ["succeeded"]  # finished before: not repeated
    assert [a["state"] for a in sorted(per["c"], key=lambda a: a["attempt"])] == [
        "lost"] * tried + ["succeeded"]


@pytest.mark.slow
async def test_resume_gives_a_rerun_parent_the_child_it_had_spawned_instead_of_a_new_one(run):
    run.graph.write_text('''
[agents.boss]
tools = ["spawn", "wait"]
script = [
  {call = {name = "spawn", arguments = {prompt = "the sub job", agent = "helper"}}},
  {call = {name = "wait", arguments = {children = ["boss/1"]}}},
  {text = "boss done", output_tokens = 1500},
]
[agents.helper]
script = [{text = "sub done", output_tokens = 10}]
[[tasks]]
id = "boss"
agent = "boss"
''')
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "1")
        # the child finished and the parent is in its long last turn: kill the orchestrator
        await until(lambda: any(a["task_id"] == "boss/1" and a["state"] == "succeeded"
                                for a in run.attempts()))
        code, err = await kill_9_and_resume(run)
    assert code == 0, err
    per = by_task(run.attempts())
    assert sorted(per) == ["boss", "boss/1"]  # the re-run's spawn took boss/1 back
    assert [a["state"] for a in per["boss/1"]] == ["succeeded"]  # and it did not run again
    assert [a["state"] for a in sorted(per["boss"], key=lambda a: a["attempt"])] == [
        "lost", "succeeded"]
    spawned = run.events("spawned")
    assert [e["data"]["adopted"] for e in spawned] == [False, True]


# ------------------------------------------------------------------ bad and remote workers


@pytest.mark.slow
async def test_bad_workers_are_cut_off_and_logged_while_the_run_goes_on(run):
    run.graph.write_text(graph(4, tokens=200))
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "0", "--capacity", "4")  # no real worker yet
        url = await until(run.bus_url)
        rid = await until(run.run_id)

        async with open_bus_client(url, token=TOKEN, endpoint_id="worker.nonsense") as a, \
                open_bus_client(url, token=TOKEN, endpoint_id="worker.quitter") as b:
            # a: says hello, then sends nonsense
            await a.send(P.ORCHESTRATOR_ID, P.hello("nonsense", 1, 1, "h"))
            await a.send(P.ORCHESTRATOR_ID, {"t": "heartbeat", "held": "everything"})
            await a.send(P.ORCHESTRATOR_ID, b"\x00garbage")
            # b: takes leases (it offers the most slots), then vanishes mid-task
            await b.send(P.ORCHESTRATOR_ID, P.hello("quitter", 100, 2, "h"))
            lease = await b.receive()
            taken = P.parse_message(lease.payload())
            assert isinstance(taken, P.Lease)
        # a worker that never held the attempt returns a result for it
        async with open_bus_client(url, token=TOKEN, endpoint_id="worker.forger2") as c:
            await c.send(P.ORCHESTRATOR_ID, P.hello("forger2", 1, 3, "h"))
            await c.send(P.ORCHESTRATOR_ID, P.to_wire(P.Result(
                run_id=rid, task_id=taken.task_id, attempt=taken.attempt, worker_id="forger2",
                status="succeeded", text="FORGED")))
            await until(lambda: len(run.events("worker.cut_off")) >= 2)
        # a real worker joins and runs everything, the quitter's attempts once its leases expire
        p = await run.cli("scale", "1", "--run", rid)
        assert p.returncode == 0, p.stderr
        code = await run.wait()
    assert code == 0, run.stderr()
    cut = {e["data"]["source"]: e["data"]["why"] for e in run.events("worker.cut_off")}
    assert "protocol error" in cut["worker.nonsense"]
    assert "does not hold" in cut["worker.forger2"]
    tasks = run.tasks()
    assert all(t["state"] == "succeeded" for t in tasks.values())
    assert "FORGED" not in str(tasks[taken.task_id]["result"])
    per = by_task(run.attempts())
    quit_att = next(a for a in per[taken.task_id] if a["worker_id"] == "quitter")
    assert quit_att["state"] == "lost" and "quitter" in quit_att["error"]
    assert_never_twice_at_once(run.attempts())
    log = run.log_lines()
    assert '"worker.cut_off"' in log and '"attempt.lost"' in log


@pytest.mark.slow
async def test_remote_workers_need_the_token_and_a_killed_one_loses_its_leases(run):
    run.graph.write_text(graph(4, tokens=300))
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "0")
        url = await until(run.bus_url)

        def remote(wid: str) -> list[str]:
            return _orch("worker", "--connect", url, "--worker-id", wid, "--capacity", "4",
                         "--state-dir", str(run.state))

        # the run says how workers join it (the token is the run's, set in _env); the line
        # comes after the endpoints are journaled, so wait for it rather than read it at once
        await until(lambda: f"orchestrator worker --connect {url}" in run.stderr())
        bad = await trio.run_process(remote("intruder"), env=_env("wrong-token"),
                                     capture_stderr=True, check=False)
        assert bad.returncode == 2
        assert b"refused this worker's token" in bad.stderr
        started: list[trio.Process] = []
        r2_err = open(run.tmp / "r2.stderr", "wb")  # noqa: SIM115, ASYNC230 - closed below
        try:
            r1 = await trio.lowlevel.open_process(remote("r1"), env=_env(),
                                                  stderr=subprocess.DEVNULL)
            started.append(r1)
            await until(lambda: len(run.running_on().get("r1", [])) == 4)
            r1.kill()  # no bye, no process exit the orchestrator could see: leases expire
            await r1.wait()
            r2 = await trio.lowlevel.open_process(remote("r2"), env=_env(), stderr=r2_err)
            started.append(r2)
            code = await run.wait()
            # the run's embedded hub stopped with it: its remote worker exits, and says why
            assert await r2.wait() == 0
        finally:
            r2_err.close()
            for p in started:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
    assert code == 0, run.stderr()
    assert "shut down (its run ended, or its hub stopped)" in (
        run.tmp / "r2.stderr").read_text()
    per = by_task(run.attempts())
    for tid, atts in per.items():
        atts.sort(key=lambda a: a["attempt"])
        assert [(a["worker_id"], a["state"]) for a in atts] == [
            ("r1", "lost"), ("r2", "succeeded")], tid
        assert "lease expired" in atts[0]["error"] or "no heartbeat" in atts[0]["error"]
    assert_never_twice_at_once(run.attempts())
    assert "intruder" not in run.log_lines()


# ------------------------------------------------------------------ in process: crash loop


@pytest.mark.slow
async def test_workers_that_keep_crashing_stop_being_respawned_and_the_run_stops_clearly(
        tmp_path):
    from orchestrator import scheduler as S
    from orchestrator import supervisor as SV
    from orchestrator.graph import GraphSpec

    g = GraphSpec.from_text(graph(1, tokens=1), "g.toml")
    j = Journal.open(tmp_path / "journal.sqlite")
    j.create_run("r1", graph_path="g.toml", graph_text=g.source_text)
    lines: list[bytes] = []
    opts = SV.RunOptions(state_dir=tmp_path, workers=1, progress="none", token=TOKEN,
                         worker_args=("--capacity", "0"))  # every worker exits with 2 at once
    sup = SV.Supervisor(graph=g, journal=j, run_id="r1", opts=opts, scheduler=S.Scheduler(g),
                        sink=lines.append)
    with trio.fail_after(GUARD_S):
        outcome = await sup.run()
    assert outcome.status == "stopped" and outcome.fatal is not None
    assert outcome.fatal.startswith(f"no workers left: {SV.CRASH_LIMIT} local workers exited")
    assert "--capacity must be at least 1" in outcome.fatal  # the last stderr line says why
    assert sup.procs is not None and sup.procs.counter == SV.CRASH_LIMIT
    row = j.get_run("r1")
    assert row is not None and row["status"] == "stopped" and "no workers left" in row["reason"]
    # nothing ran and nothing was cancelled: a resume has the whole graph still to run
    assert not {t["state"] for t in j.task_rows("r1")} & {"cancelled", "not_run", "failed"}


@pytest.mark.slow
async def test_a_run_stopped_by_crashing_workers_resumes_without_repeating_what_finished(
        tmp_path):
    """Task b's tool kills its worker (kill -9) until a file exists: the respawned workers die
    one after another, the run stops with a finished first; once "fixed", `orchestrator resume`
    runs b and never runs a again."""
    from orchestrator import scheduler as S
    from orchestrator import supervisor as SV
    from orchestrator.graph import GraphSpec

    fixed = tmp_path / "fixed"
    text = ('[run]\nmax_concurrent = 4\ntimeout = "60s"\n'
            '[agents.ok]\ninstructions = "x"\nscript = [{text = "first"}]\n'
            '[agents.crashy]\ninstructions = "x"\ntools = ["shell"]\nscript = [\n'
            f'  {{call = {{name = "shell", arguments = {{cmd = "test -e {fixed} || '
            'kill -9 $PPID"}}},\n  {text = "second"}]\n'
            '[[tasks]]\nid = "a"\nagent = "ok"\nprompt = "go"\n'
            '[[tasks]]\nid = "b"\nagent = "crashy"\nneeds = ["a"]\nprompt = "then"\n')
    g = GraphSpec.from_text(text, "g.toml")
    j = Journal.open(tmp_path / "journal.sqlite")
    j.create_run("r1", graph_path="g.toml", graph_text=g.source_text)
    opts = SV.RunOptions(state_dir=tmp_path, workers=1, progress="none", token=TOKEN)
    sup = SV.Supervisor(graph=g, journal=j, run_id="r1", opts=opts, scheduler=S.Scheduler(g),
                        sink=lambda line: None)
    with trio.fail_after(GUARD_S):
        outcome = await sup.run()
    assert outcome.status == "stopped", outcome
    assert outcome.fatal is not None and "no workers left" in outcome.fatal
    assert outcome.fatal.endswith("last: it was killed by SIGKILL")  # the tool's kill -9
    states = {t["task_id"]: t["state"] for t in j.task_rows("r1")}
    assert states["a"] == "succeeded" and states["b"] in ("ready", "queued"), states
    lost_b = [a for a in j.attempts("r1") if a["task_id"] == "b"]
    assert len(lost_b) >= SV.CRASH_LIMIT and {a["state"] for a in lost_b} == {"lost"}
    j.close()

    # the run cannot be cancelled or scaled (nothing runs it): those say to resume it
    ctl = await trio.run_process(
        [sys.executable, "-m", "orchestrator", "cancel", "r1", "--state-dir", str(tmp_path)],
        capture_stdout=True, capture_stderr=True, check=False, env=_env())
    assert ctl.returncode == 2 and b"orchestrator resume r1" in ctl.stderr

    fixed.touch()
    with trio.fail_after(GUARD_S):
        done = await trio.run_process(
            [sys.executable, "-m", "orchestrator", "resume", "r1", "--state-dir", str(tmp_path),
             "--workers", "1", "--progress", "plain"],
            capture_stdout=True, capture_stderr=True, check=False, env=_env())
    assert done.returncode == 0, done.stderr.decode()
    j = Journal.open(tmp_path / "journal.sqlite")
    row = j.get_run("r1")
    assert row is not None and row["status"] == "succeeded" and row["reason"] is None
    per_task = {t: [a for a in j.attempts("r1") if a["task_id"] == t] for t in ("a", "b")}
    assert [a["state"] for a in per_task["a"]] == ["succeeded"]  # not run again
    assert per_task["b"][-1]["state"] == "succeeded"
    kinds = [e["kind"] for e in j.events("r1") if e["kind"].startswith("run.")]
    assert kinds[kinds.index("run.fatal"):] == [
        "run.fatal", "run.ended", "run.reopened", "run.endpoints", "run.ended"], kinds
    j.close()


@pytest.mark.slow
def test_a_disk_that_refuses_writes_stops_the_run_resumably_and_resume_finishes_it(tmp_path):
    """The state dir's files may not grow past 230 KB (a file-size limit: a full disk's
    refusal without a disk to fill). The run stops saying why and what to do, leaves no
    process behind, and once writes work `orchestrator resume` finishes it without running
    again what had finished."""
    import resource

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (230_000, 230_000))

    state = tmp_path / "state"
    out = subprocess.run(_orch("run", str(REPO / "examples" / "quickstart.toml"),
                               "--state-dir", str(state), "--progress", "plain"),
                         capture_output=True, text=True, env=_env(), preexec_fn=limited,
                         timeout=GUARD_S)
    assert out.returncode == 3, out.stderr
    said = re.search(r"could not write to (\S+): .*`orchestrator resume (\S+)` goes on",
                     out.stderr)
    assert said is not None and said.group(1) == str(state), out.stderr
    run_id = said.group(2)
    assert procs_touching(str(state)) == []
    j = Journal.open(state / "journal.sqlite")
    finished = {t["task_id"] for t in j.task_rows(run_id) if t["state"] == "succeeded"}
    # a fan-out parent ("write") has no attempt of its own: its children run
    before = {t: [a["state"] for a in j.attempts(run_id) if a["task_id"] == t]
              for t in finished}
    j.close()
    assert "plan" in finished  # the journal outgrew the limit after the first task
    assert before["plan"] == ["succeeded"]

    res = subprocess.run(_orch("resume", run_id, "--state-dir", str(state), "--progress",
                               "plain"), capture_output=True, text=True, env=_env(),
                         timeout=GUARD_S)
    assert res.returncode == 0, res.stderr
    j = Journal.open(state / "journal.sqlite")
    row = j.get_run(run_id)
    assert row is not None and row["status"] == "succeeded"
    for task_id in finished:  # what had finished did not run again
        assert [a["state"] for a in j.attempts(run_id) if a["task_id"] == task_id] \
            == before[task_id], task_id
    j.close()


def test_writes_refused_for_space_are_told_apart_from_other_errors():
    import errno
    import sqlite3

    from orchestrator.runner import _out_of_space

    assert _out_of_space(sqlite3.OperationalError("database or disk is full"))
    assert _out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert _out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not _out_of_space(sqlite3.OperationalError("no such table: runs"))
    assert not _out_of_space(OSError(errno.EACCES, "Permission denied"))


async def test_no_progress_line_is_drawn_while_the_workers_stop(tmp_path, monkeypatch):
    """Once the graph is settled the workers stop; a progress line drawn then said "workers 0"
    right before the last line's count of them (seen at the end of the quickstart)."""
    import io

    from orchestrator import scheduler as S
    from orchestrator import supervisor as SV
    from orchestrator.graph import GraphSpec
    from orchestrator.progress import Progress

    out = io.StringIO()

    def make(mode: str, *, total: int, stream: Any = None) -> Progress:
        p = Progress(tty=False, total=total, stream=out)
        p.interval = 0.001  # a line whenever anything changes, shutdown included
        return p

    monkeypatch.setattr(SV.Progress, "make", make)
    g = GraphSpec.from_text(graph(2, tokens=1), "g.toml")
    j = Journal.open(tmp_path / "journal.sqlite")
    j.create_run("r1", graph_path="g.toml", graph_text=g.source_text)
    opts = SV.RunOptions(state_dir=tmp_path, workers=1, progress="plain", token=TOKEN)
    sup = SV.Supervisor(graph=g, journal=j, run_id="r1", opts=opts, scheduler=S.Scheduler(g))
    with trio.fail_after(GUARD_S):
        outcome = await sup.run()
    assert outcome.status == "succeeded"
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("tasks 2/2 done, 0 running, 0 failed | workers 1 |"), lines
    assert not [ln for ln in lines if ln.startswith("tasks 2/2 done") and "workers 0" in ln], \
        lines


async def test_workers_on_a_standalone_hub_serve_runs_that_start_later_one_run_at_a_time(
        tmp_path):
    """The Kubernetes shape (deploy/k8s): a long-lived hub and workers, runs started against
    it with --bus-url. Workers that said hello before a run existed join it by heartbeat
    (they used to be ignored: the run waited for a worker forever); a second run while one
    holds the hub is refused (it used to take the hub over and cut the first run off)."""
    from bus.config import HubConfig
    from bus.hub import serve_bus

    state = tmp_path / "state"
    g = tmp_path / "g.toml"
    g.write_text(graph(2, tokens=200))  # 200 tokens at 5 ms: about a second per task
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve_bus, HubConfig(port=0, token=TOKEN))
        worker = await trio.lowlevel.open_process(
            _orch("worker", "--connect", info.url, "--state-dir", str(state), "--worker-id",
                  "early", "--quiet"), env=_env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            with trio.fail_after(GUARD_S):
                await until(lambda: "worker.early" in info.hub.routes)

                async def run(out: pathlib.Path) -> int:
                    with out.open("wb") as f:  # noqa: ASYNC230 - a local file, opened once
                        done = await trio.run_process(
                            _orch("run", str(g), "--bus-url", info.url, "--workers", "0",
                                  "--state-dir", str(state), "--progress", "none", *SIM),
                            env=_env(), stdout=f, stderr=f, check=False)
                    return done.returncode

                codes: dict[str, int] = {}

                async def first() -> None:
                    codes["first"] = await run(tmp_path / "first.out")

                async with trio.open_nursery() as runs:
                    runs.start_soon(first)
                    await until(lambda: "orchestrator" in info.hub.routes)
                    codes["second"] = await run(tmp_path / "second.out")
                codes["third"] = await run(tmp_path / "third.out")
        finally:
            worker.kill()
            await worker.wait()
            nursery.cancel_scope.cancel()
    assert codes["first"] == 0, (tmp_path / "first.out").read_text()
    assert codes["third"] == 0, (tmp_path / "third.out").read_text()
    second = (tmp_path / "second.out").read_text()
    assert codes["second"] == 3 and "is in use by run" in second, second
    j = Journal.open_readonly(state / "journal.sqlite")
    runs_ok = [r for r in j.list_runs() if r["status"] == "succeeded"]
    assert len(runs_ok) == 2
    for r in runs_ok:  # every task of both runs ran on the worker that was there first
        assert {a["worker_id"] for a in j.attempts(r["run_id"])} == {"early"}


async def test_the_compose_shape_workers_elsewhere_reach_the_embedded_bus_and_sim(tmp_path):
    """deploy/compose.yaml: `run --bus-host 0.0.0.0 --advertise-host NAME --workers 0`, and
    workers started by hand with the bus URL the run prints. The embedded sim listens on every
    interface too and leases name it by NAME (127.0.0.2 here: loopback, but not the address
    the servers were told), so workers need no model sidecar that may not be up yet."""
    state = tmp_path / "state"
    g = tmp_path / "g.toml"
    g.write_text(graph(3, tokens=20))
    out = tmp_path / "run.out"
    workers: list[trio.Process] = []
    with out.open("wb") as f:  # noqa: ASYNC230 - a local file, opened once
        orch = await trio.lowlevel.open_process(
            _orch("run", str(g), "--bus-host", "0.0.0.0", "--advertise-host", "127.0.0.2",
                  "--workers", "0", "--state-dir", str(state), "--progress", "plain", *SIM),
            env=_env(), stdout=f, stderr=f)
    try:
        with trio.fail_after(GUARD_S):
            said = await until(lambda: re.search(r"worker --connect (\S+)", out.read_text()))
            url = said.group(1)
            assert url.startswith("ws://127.0.0.2:"), out.read_text()
            for n in (1, 2):
                workers.append(await trio.lowlevel.open_process(
                    _orch("worker", "--connect", url, "--worker-id", f"far{n}", "--quiet"),
                    env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            assert await orch.wait() == 0, out.read_text()
            # a run's embedded hub shuts down with it: its workers exit 0; one that started
            # after the (short) run ended found nothing to dial: 3
            codes = {f"far{n}": await w.wait() for n, w in enumerate(workers, start=1)}
    finally:
        for p in (orch, *workers):
            if p.returncode is None:
                p.kill()
                await p.wait()
    j = Journal.open_readonly(state / "journal.sqlite")
    (run,) = j.list_runs()
    ends = [e["data"] for e in j.events(run["run_id"]) if e["kind"] == "run.endpoints"]
    assert ends[0]["model"].startswith("http://127.0.0.2:"), ends
    served = {a["worker_id"] for a in j.attempts(run["run_id"])}
    assert served and served <= {"far1", "far2"}
    assert all(codes[w] == 0 for w in served) and set(codes.values()) <= {0, 3}, codes
    assert run["status"] == "succeeded"


async def test_a_worker_whose_hub_restarted_exits_3_saying_to_start_it_again(tmp_path):
    """kill -9 of a standalone hub, and a new one on the same port: the worker's resume is
    refused (4001). It exits 3 for its supervisor (compose, Kubernetes) to restart it, with a
    message that says so, not a library's "open a new client" twice over."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub_cmd = _orch("bus", "--port", str(port))
    procs: list[trio.Process] = []

    async def hub() -> trio.Process:
        p = await trio.lowlevel.open_process(hub_cmd, env=_env(), stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL)
        procs.append(p)
        assert p.stdout is not None
        buf = b""
        while b"listening on" not in buf:
            chunk = await p.stdout.receive_some(4096)
            assert chunk, buf
            buf += chunk
        return p

    try:
        with trio.fail_after(GUARD_S):
            first = await hub()
            worker = await trio.lowlevel.open_process(
                _orch("worker", "--connect", f"ws://127.0.0.1:{port}/bus"),
                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            procs.append(worker)
            assert worker.stderr is not None
            log = b""
            while b'"worker.ready"' not in log:  # connected, said hello (no run to join)
                chunk = await worker.stderr.receive_some(65536)
                assert chunk, log
                log += chunk
            first.kill()
            await first.wait()
            await hub()
            while chunk := await worker.stderr.receive_some(65536):
                log += chunk
            assert await worker.wait() == 3
            err = log.decode().splitlines()[-1]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    assert "no longer knows this worker" in err and "Start the worker again" in err, err
    assert err.count("open a new client") == 0, err


async def test_ctrl_c_after_every_task_ended_keeps_the_runs_outcome(run):
    """SIGINT while the workers stop after the last task: the run succeeded, and stays so
    (it used to be journaled or reported as cancelled, exit 130, depending on the moment)."""
    run.graph.write_text(graph(3, tokens=5))
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "2")
        await until(lambda: [a["state"] for a in run.attempts()] == ["succeeded"] * 3,
                    poll_s=0.01)
        assert run.proc is not None
        if run.proc.returncode is None:
            run.proc.send_signal(signal.SIGINT)
        code = await run.wait()
    assert code == 0, run.stderr()
    assert run.run_row()["status"] == "succeeded", run.run_row()


ANSWERS = """
[run]
failure_policy = "continue"
timeout = "20s"
[agents.plan]
script = [{text = '{"parts": 2}'}]
[agents.ok]
script = [{text = "x is\\nwritten"}]
[agents.broken]
script = [{fail = "the model broke"}]
[[tasks]]
id = "plan"
agent = "plan"
[[tasks]]
id = "x"
agent = "ok"
needs = ["plan"]
[[tasks]]
id = "y"
agent = "broken"
needs = ["plan"]
[[tasks]]
id = "z"
agent = "ok"
"""


async def test_run_prints_the_final_tasks_answers_on_stdout_and_the_rest_on_stderr(run):
    """The run's product: each final task's answer (one no task needs), in file order, on
    stdout; a final task that failed has none. Progress and summary stay on stderr."""
    run.graph.write_text(ANSWERS)
    with trio.fail_after(GUARD_S):
        await run.start("--workers", "1")
        code = await run.wait()
    assert code == 1, run.stderr()  # y failed
    assert run.stdout() == "== x ==\nx is\nwritten\n== z ==\nx is\nwritten\n"
    assert "== " not in run.stderr() and "failed y: " in run.stderr()


@pytest.mark.slow
def test_sigterm_as_the_run_starts_cancels_it_in_the_journal(tmp_path):
    """SIGTERM the moment `orchestrator run` has journaled its run (it says so on stderr, just
    before its event loop starts and listens for signals): the run ends "cancelled" with exit
    130 and nothing left running, as Ctrl-C does; it used to die of the signal (exit -15) with
    its run left "running"."""
    r = Run(tmp_path, graph(2))
    proc = subprocess.Popen(
        _orch("run", str(r.graph), "--state-dir", str(r.state), "--progress", "plain", *SIM),
        env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    try:
        first = proc.stderr.readline()
        assert b"logs: orchestrator logs" in first, first
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        code = proc.wait(timeout=GUARD_S)
    finally:
        proc.kill()
    assert code == 130, (first + rest).decode(errors="replace")
    row = r.run_row()
    assert row["status"] == "cancelled", row
    t_end = time.monotonic() + 10
    while procs_touching(str(r.state)) and time.monotonic() < t_end:
        time.sleep(0.05)
    assert not procs_touching(str(r.state))
