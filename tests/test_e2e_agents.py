"""Agents end to end: `orchestrator run` as a subprocess with 2 worker processes, a sim model
server in the test's nursery (so the test reads its stats), the journal read afterwards.

Pins: `ask` between agents on different workers, spawn and wait, accounting that sums across
attempts, tasks, subtrees and the run, and cancellation (run cancel, subtree cancel, timeout,
SIGINT) reaching the model server and every tool process.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from agent_helpers import alive, procs_mentioning, until

from modellink.client import fetch_server_stats
from modellink.server import ModelServerConfig, serve_model
from modellink.sim import SimConfig
from orchestrator.journal import Journal

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).resolve().parent.parent
GUARD_S = 30


def _orch(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SWITCHBOARD_TOKEN", None)
    return env


@asynccontextmanager
async def sim_server(sim: SimConfig) -> AsyncIterator[Any]:
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve_model, ModelServerConfig(
            host="127.0.0.1", port=0, token=None, sim=sim))
        yield info
        nursery.cancel_scope.cancel()





class Run:
    """One `orchestrator run` subprocess on a graph written to tmp_path."""

    def __init__(self, tmp_path: pathlib.Path, graph: str) -> None:
        self.dir = tmp_path
        self.state = tmp_path / "state"
        self.graph = tmp_path / "graph.toml"
        self.graph.write_text(graph)
        self.err = tmp_path / "run.err"
        self.proc: Any = None

    async def start(self, *args: str) -> None:
        with self.err.open("wb") as err:  # noqa: ASYNC230 - a local file, opened once
            self.proc = await trio.lowlevel.open_process(
                _orch("run", str(self.graph), "--state-dir", str(self.state), "--progress",
                      "none", "--workers", "2", *args),
                env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)

    def run_id(self) -> str | None:
        first = self.err.read_text().split("\n", 1)[0] if self.err.exists() else ""
        return first.split()[1].rstrip(":") if first.startswith("run ") else None

    async def wait(self) -> int:
        return int(await self.proc.wait())

    async def cli(self, *args: str) -> str:
        done = await trio.run_process(_orch(*args, "--state-dir", str(self.state)), env=_env(),
                                      capture_stdout=True, capture_stderr=True, check=False)
        assert done.returncode == 0, done.stderr.decode()
        return str(done.stdout.decode())

    def journal(self) -> Journal:
        return Journal.open_readonly(self.state / "journal.sqlite")

    def stderr(self) -> str:
        return self.err.read_text()


def _log(run: Run, rid: str) -> list[dict[str, Any]]:
    text = (run.state / "runs" / rid / "log.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _stopped_at(run: Run, rid: str) -> dict[str, str]:
    """Where each attempt's session stopped, as its worker reported it (Result.stopped_at)."""
    return {e["task_id"]: e["stopped_at"] for e in _log(run, rid)
            if e.get("event") == "task.end" and e.get("stopped_at")}


async def _status(run: Run) -> dict[str, Any]:
    return dict(json.loads(await run.cli("status", "--json")))


# ------------------------------------------------------------------ ask, spawn, accounting

TEAM = """
[run]
name = "e2e"
timeout = "20s"

[agents.coder]
instructions = "code"
tools = ["shell"]
script = [
  {call = {name = "shell", arguments = {cmd = "touch started; i=0; while [ ! -e done ] && [ $i -lt 400 ]; do i=$((i+1)); sleep 0.02; done; echo waited"}}},
  {text = '{"code": "written"}'},
]
answers = [{text = "I used a dict."}]

[agents.reviewer]
instructions = "review"
tools = ["shell", "ask"]
script = [
  {call = {name = "shell", arguments = {cmd = "i=0; while [ ! -e ../coder/started ] && [ $i -lt 400 ]; do i=$((i+1)); sleep 0.02; done"}}},
  {call = {name = "ask", arguments = {task = "coder", question = "What data structure?"}}},
  {call = {name = "ask", arguments = {task = "nobody", question = "Anyone?"}}},
  {call = {name = "shell", arguments = {cmd = "touch ../coder/done"}}},
  {text = '{"review": "ok"}'},
]

[agents.boss]
instructions = "boss"
tools = ["spawn", "wait"]
script = [
  {call = {name = "spawn", arguments = {prompt = "do the sub job", agent = "helper"}}},
  {call = {name = "wait", arguments = {children = ["boss/1"]}}},
  {text = '{"boss": "done"}'},
]

[agents.helper]
instructions = "help"
tools = ["write_file"]
script = [{call = {name = "write_file", arguments = {path = "out.txt", content = "sub"}}},
          {text = '{"sub": "done"}'}]

[[tasks]]
id = "coder"
agent = "coder"

[[tasks]]
id = "reviewer"
agent = "reviewer"

[[tasks]]
id = "boss"
agent = "boss"
needs = ["reviewer"]
"""


def _usage_sum(usages: list[dict[str, Any]]) -> dict[str, int]:
    keys = ("turns", "input_tokens", "cached_tokens", "output_tokens")
    return {k: sum(int(u.get(k) or 0) for u in usages) for k in keys}


async def test_ask_across_workers_spawn_wait_and_accounting_sums_across_levels(tmp_path):
    run = Run(tmp_path, TEAM)
    with trio.fail_after(GUARD_S):
        async with sim_server(SimConfig.zero()) as model:
            await run.start("--capacity", "1", "--model-url", model.base_url)
            code = await run.wait()
            server = model.server.statistics()
        status = await _status(run)
    err = run.stderr()
    assert code == 0, err
    rid = run.run_id()
    assert rid is not None
    j = run.journal()
    attempts = {a["task_id"]: a for a in j.attempts(rid)}
    assert set(attempts) == {"coder", "reviewer", "boss", "boss/1"}
    # coder and reviewer ran at once on different worker processes (capacity 1 each)
    assert attempts["coder"]["worker_id"] != attempts["reviewer"]["worker_id"]
    # the answer is the coder's spending: one extra model turn on its attempt
    assert attempts["coder"]["usage"]["turns"] == 3
    assert attempts["reviewer"]["usage"]["turns"] == 5
    log = _log(run, rid)
    answered = [e for e in log if e.get("event") == "ask.answered"]
    assert len(answered) == 1 and answered[0]["task_id"] == "coder"
    assert answered[0]["asker"] == "reviewer"
    tool_errors = [e for e in log if e.get("event") == "tool.error"]
    assert len(tool_errors) == 1 and "no running task named 'nobody'" in tool_errors[0]["error"]
    # at info, the inter-agent steps are in the asking task's lines: the ask with its answer,
    # the spawn with the child's id, the wait with how the children ended
    asked = [e for e in log if e.get("event") == "ask"]
    assert [(e["task_id"], e["task"], e["question"], e["answer"]) for e in asked] == [
        ("reviewer", "coder", "What data structure?", "I used a dict.")]
    assert [e["level"] for e in asked] == ["info"]
    spawned = [e for e in log if e.get("event") == "spawn"]
    assert [(e["task_id"], e["child"], e["agent"]) for e in spawned] == [
        ("boss", "boss/1", "helper")]
    waited = [e for e in log if e.get("event") == "wait"]
    assert [(e["task_id"], e["states"]) for e in waited] == [
        ("boss", {"boss/1": "succeeded"})]
    # spawn + wait: boss/1 is boss's dynamic child, with its own (escaped) workspace
    assert attempts["boss/1"]["state"] == "succeeded"
    assert attempts["boss"]["result"]["outputs"] == {"boss": "done"}
    ws = run.state / "workspaces" / rid
    assert (ws / "boss%2F1" / "out.txt").read_text() == "sub"
    assert not (ws / "boss" / "1").exists()
    # accounting: every level is the sum of the one below
    tasks = {t["task_id"]: t for t in status["tasks"]}
    for tid, a in attempts.items():
        assert _usage_sum([tasks[tid]["usage"]]) == _usage_sum([a["usage"]]), tid
    assert tasks["boss"]["children"] == ["boss/1"]
    assert _usage_sum([tasks["boss"]["total_usage"]]) == _usage_sum(
        [attempts["boss"]["usage"], attempts["boss/1"]["usage"]])
    run_total = _usage_sum([a["usage"] for a in attempts.values()])
    assert _usage_sum([status["run"]["usage"]]) == run_total
    assert run_total["output_tokens"] == server["output_tokens"]  # what the server produced
    assert run_total["input_tokens"] == server["input_tokens"]
    assert (f"tokens: input {run_total['input_tokens']} (cached {run_total['cached_tokens']}), "
            f"output {run_total['output_tokens']}") in err


# ------------------------------------------------------------------ guards

GUARDS = """
[run]
name = "guards"
timeout = "20s"
failure_policy = "continue"
max_spawn_depth = 2

[agents.huge]
instructions = "answer at length"
script = [{text = "x", output_tokens = 400000}]

[agents.long]
instructions = "answer at some length"
script = [{text = "y", output_tokens = 150000}]

[agents.echo]
instructions = "echo"

[agents.deep]
instructions = "delegate"
tools = ["spawn"]
script = [{call = {name = "spawn", arguments = {prompt = "delegate again"}}}, {text = "done"}]

[agents.waiter]
instructions = "wait"
tools = ["wait"]
script = [{call = {name = "wait", arguments = {children = ["waiter"], timeout_s = 5}}},
          {text = "went on"}]

[[tasks]]
id = "huge"
agent = "huge"
retries = 2

[[tasks]]
id = "long"
agent = "long"

[[tasks]]
id = "twice"
agent = "echo"
needs = ["long"]
retries = 2
prompt = "{{ long.text }} and again {{ long.text }}"

[[tasks]]
id = "deep"
agent = "deep"

[[tasks]]
id = "waiter"
agent = "waiter"
"""


async def test_oversize_messages_runaway_spawns_and_bad_waits_fail_their_task_not_the_run(
        tmp_path):
    """A result or a lease over the bus's 1 MiB message limit fails its task at once (not
    retried: the next attempt would be as large) and no process dies; spawning stops at
    [run] max_spawn_depth; wait on a task that is not a child is a tool error."""
    run = Run(tmp_path, GUARDS)
    with trio.fail_after(GUARD_S):
        async with sim_server(SimConfig.zero()) as model:
            await run.start("--model-url", model.base_url)
            code = await run.wait()
    assert code == 1, run.stderr()  # tasks failed; the run itself ended normally
    rid = run.run_id()
    assert rid is not None
    j = run.journal()
    attempts: dict[str, list[dict[str, Any]]] = {}
    for a in j.attempts(rid):
        attempts.setdefault(a["task_id"], []).append(a)
    # the oversize result: one attempt, failed, saying why and what to do
    assert [a["state"] for a in attempts["huge"]] == ["failed"]
    assert "over the bus's message limit" in attempts["huge"][0]["error"]
    # the oversize lease (an upstream output brought in twice): failed before any worker
    assert attempts["long"][0]["state"] == "succeeded"
    assert [a["state"] for a in attempts["twice"]] == ["failed"]
    assert "lease is" in attempts["twice"][0]["error"]
    assert "references" in attempts["twice"][0]["error"]
    # spawning: deep -> deep/1 -> deep/1/1, whose own spawn is refused; all three answer
    assert {t for t in attempts if t.startswith("deep")} == {"deep", "deep/1", "deep/1/1"}
    assert all(attempts[t][0]["state"] == "succeeded" for t in ("deep", "deep/1", "deep/1/1"))
    log = _log(run, rid)
    errors = [e for e in log if e.get("event") == "tool.error"]
    assert any(e.get("task_id") == "deep/1/1" and "max_spawn_depth" in e["error"]
               for e in errors), errors
    # wait on itself: a tool error at once, and the agent went on
    assert attempts["waiter"][0]["state"] == "succeeded"
    assert any(e.get("task_id") == "waiter" and "not a child of waiter" in e["error"]
               for e in errors), errors
    # no worker died or lost an attempt over any of it: the two exits are the run's end
    assert not [e for e in log if e.get("event") == "attempt.lost"]
    exits = [e for e in log if e.get("event") == "worker.exited"]
    assert len(exits) == 2 and all(e["code"] in (0, 130) for e in exits), exits


# ------------------------------------------------------------------ cancellation

LONG = 100_000  # output tokens: 100 s at the tests' decode rate (the sim pads it up front)
CANCEL_GRAPH = f"""
[run]
name = "cancel"
timeout = "60s"
failure_policy = "continue"

[agents.talker]
instructions = "talk"
tools = ["shell"]
script = [{{call = {{name = "shell", arguments = {{cmd = "true"}}}}}},
          {{text = "long", output_tokens = {LONG}}}]

[agents.sleeper]
instructions = "sleep"
tools = ["shell"]
script = [{{call = {{name = "shell", arguments = {{cmd = "sh -c 'trap \\"\\" TERM; sleep 60' & echo $! >> PIDS; trap '' TERM; echo $$ >> PIDS; sleep 60"}}}}}},
          {{text = "never"}}]

[agents.boss]
instructions = "boss"
tools = ["spawn", "wait"]
script = [
  {{call = {{name = "spawn", arguments = {{prompt = "talk a lot", agent = "talker"}}}}}},
  {{call = {{name = "wait", arguments = {{children = ["boss/1"]}}}}}},
  {{text = "never"}},
]

[[tasks]]
id = "talker"
agent = "talker"

[[tasks]]
id = "sleeper"
agent = "sleeper"

[[tasks]]
id = "boss"
agent = "boss"
"""


@pytest.mark.parametrize("how", ["cancel", "sigint"])
async def test_cancelling_a_run_stops_model_responses_at_the_server_and_every_process(
        tmp_path, how):
    pids_file = tmp_path / "pids"
    run = Run(tmp_path, CANCEL_GRAPH.replace("PIDS", str(pids_file)))
    sim = SimConfig(ttft_s=0.0, prefill_s_per_token=0.0, decode_s_per_token=0.001)
    with trio.fail_after(GUARD_S):
        async with sim_server(sim) as model:
            st = model.server.statistics
            await run.start("--capacity", "4", "--model-url", model.base_url)
            # talker and boss/1 are both generating, sleeper's processes are up
            await until(lambda: st()["in_flight"] == 2 and st()["output_tokens"] > 400
                        and pids_file.exists() and len(pids_file.read_text().split()) == 2)
            await trio.sleep(0.1)  # the grandchild has set its trap
            pids = [int(p) for p in pids_file.read_text().split()]
            assert all(alive(p) for p in pids)
            assert procs_mentioning(str(run.state))  # the workers
            if how == "cancel":
                rid = run.run_id()
                assert rid is not None
                await run.cli("cancel", rid)
            else:
                run.proc.send_signal(signal.SIGINT)
            code = await run.wait()
            await until(lambda: not [p for p in pids if alive(p)])
            stats = await fetch_server_stats(model.base_url)
            await trio.sleep(0.2)
            later = await fetch_server_stats(model.base_url)
    assert code == 130, run.stderr()
    assert not procs_mentioning(str(run.state))  # no worker left behind
    # talker and boss/1 were cut off mid-response; boss may have started one more turn when
    # the answer to its `wait` (children cancelled) overtook its own cancel: cut off too
    assert stats["in_flight"] == 0 and stats["responses_failed"] == 0
    assert stats["responses_started"] == stats["responses_completed"] + stats[
        "responses_cancelled"]
    assert 2 <= stats["responses_cancelled"] <= 3
    assert later["output_tokens"] == stats["output_tokens"] < 2 * LONG
    rid = run.run_id()
    assert rid is not None
    status = await _status(run)
    assert {t["task_id"]: t["state"] for t in status["tasks"]} == dict.fromkeys(
        ("talker", "sleeper", "boss", "boss/1"), "cancelled")
    attempts = {a["task_id"]: a for a in run.journal().attempts(rid)}
    stopped = _stopped_at(run, rid)
    assert stopped.pop("boss") in ("turn 2: running tools wait", "turn 3: model")
    assert stopped == {"talker": "turn 2: model", "sleeper": "turn 1: running tools shell",
                       "boss/1": "turn 2: model"}
    # the turns that finished before the cancel are counted
    assert attempts["talker"]["usage"]["turns"] == 1
    assert attempts["talker"]["usage"]["input_tokens"] > 0


SUBTREE = """
[run]
name = "subtree"
timeout = "60s"
failure_policy = "continue"

[agents.talker]
instructions = "talk"
tools = []
script = [{text = "long", output_tokens = 100000}]

[agents.boss]
instructions = "boss"
tools = ["spawn", "wait"]
script = [
  {call = {name = "spawn", arguments = {prompt = "talk a lot", agent = "talker"}}},
  {call = {name = "wait", arguments = {children = ["boss/1"]}}},
  {text = "never"},
]

[agents.other]
instructions = "other"
tools = ["shell"]
script = [{call = {name = "shell", arguments = {cmd = "i=0; while [ ! -e RELEASE ] && [ $i -lt 1000 ]; do i=$((i+1)); sleep 0.02; done"}}},
          {text = "other done"}]

[[tasks]]
id = "boss"
agent = "boss"

[[tasks]]
id = "other"
agent = "other"

[[tasks]]
id = "slow"
agent = "talker"
timeout = "1s"
"""


async def test_subtree_cancel_and_timeout_stop_their_responses_while_the_rest_goes_on(tmp_path):
    release = tmp_path / "release"
    run = Run(tmp_path, SUBTREE.replace("RELEASE", str(release)))
    sim = SimConfig(ttft_s=0.0, prefill_s_per_token=0.0, decode_s_per_token=0.001)
    with trio.fail_after(GUARD_S):
        async with sim_server(sim) as model:
            st = model.server.statistics
            await run.start("--capacity", "4", "--model-url", model.base_url)
            # boss/1 and slow are generating; slow's 1 s timeout cancels it on its own
            await until(lambda: st()["in_flight"] == 2)
            await until(lambda: st()["responses_cancelled"] == 1 and st()["in_flight"] == 1)
            rid = run.run_id()
            assert rid is not None
            await run.cli("cancel", rid, "boss")
            await until(lambda: st()["in_flight"] == 0)
            # boss/1 cut off mid-response (and boss's next turn, when the answer to its wait
            # overtook its own cancel: see the cancel test)
            assert 2 <= st()["responses_cancelled"] <= 3
            release.touch()  # `other` was not touched by the subtree cancel: let it finish
            code = await run.wait()
    assert code == 1, run.stderr()  # slow failed (timed out)
    attempts = {a["task_id"]: a for a in run.journal().attempts(rid)}
    assert attempts["other"]["state"] == "succeeded"
    status = {t["task_id"]: t["state"] for t in (await _status(run))["tasks"]}
    assert status == {"boss": "cancelled", "boss/1": "cancelled", "other": "succeeded",
                      "slow": "failed"}
    stopped = _stopped_at(run, rid)
    assert stopped["boss/1"] == "turn 1: model" and stopped["slow"] == "turn 1: model"
    assert stopped["boss"] in ("turn 2: running tools wait", "turn 3: model")
    assert "timed out after 1s" in attempts["slow"]["error"]


# ------------------------------------------------------------------ the example


async def test_the_team_example_runs_green(tmp_path):
    run = Run(tmp_path, (REPO / "examples" / "team.toml").read_text())
    with trio.fail_after(GUARD_S):
        await run.start()
        code = await run.wait()
        status = await _status(run)
    assert code == 0, run.stderr()
    rid = run.run_id()
    assert rid is not None
    states = {t["task_id"]: (t["state"], t["attempts"]) for t in status["tasks"]}
    assert states == {"plan": ("succeeded", 1), "code": ("succeeded", 0),
                      "code[0]": ("succeeded", 1), "code[1]": ("succeeded", 1),
                      "review": ("succeeded", 1), "review/1": ("succeeded", 2),
                      "ship": ("succeeded", 1)}
    log = _log(run, rid)
    assert [(e["task_id"], e["asker"]) for e in log if e.get("event") == "ask.answered"] == [
        ("code[0]", "review")]
    assert not [e for e in log if e.get("event") == "tool.error"]
    ws = run.state / "workspaces" / rid
    assert (ws / "code[1]" / "module.py").exists() and (ws / "review" / "asked").exists()


async def test_a_retry_waits_until_the_timed_out_attempt_has_stopped(tmp_path):
    """A timed-out attempt's tool ignores SIGTERM, so it lives through the cancel grace
    (0.5 s) until SIGKILL. The retry (backoff 0) used to start at once in the same workspace
    beside it; it now waits until the first attempt's worker reports it stopped."""
    cmd = ("if [ -f pid ] && kill -0 $(cat pid) 2>/dev/null; then echo OVERLAP >> seen; fi; "
           "echo $$ > pid; echo start >> seen; trap '' TERM; sleep 5")
    graph = f"""
[run]
backoff = "0ms"
jitter = 0.0

[agents.stubborn]
instructions = "x"
tools = ["shell"]
script = [{{call = {{name = "shell", arguments = {{cmd = "{cmd}"}}}}}}, {{text = "done"}}]

[[tasks]]
id = "t"
agent = "stubborn"
prompt = "go"
timeout = "1s"
retries = 1
"""
    run = Run(tmp_path, graph)
    with trio.fail_after(GUARD_S):
        await run.start("--sim-zero")
        assert await run.wait() == 1, run.stderr()
    seen = (tmp_path / "state" / "workspaces").rglob("seen")
    lines = [ln for f in seen for ln in f.read_text().split()]
    assert lines.count("start") == 2, lines
    assert "OVERLAP" not in lines, lines


async def test_the_log_says_what_the_scheduler_decided_and_what_a_failed_tool_was_asked(
        tmp_path):
    """`logs --level warning` is where the run's summary sends a user: it must hold the
    retry (and when), the final failure, the task not run for it, and a failed tool call's
    arguments and the end of its output."""
    graph = """
[run]
backoff = "0ms"
jitter = 0.0
failure_policy = "continue"

[agents.shaky]
instructions = "x"
tools = ["shell"]
script = [{call = {name = "shell", arguments = {cmd = "echo oops >&2; exit 3"}}},
          {fail = "upstream exploded"}]

[[tasks]]
id = "flaky"
agent = "shaky"
prompt = "go"
retries = 1

[[tasks]]
id = "after"
agent = "shaky"
prompt = "{{ flaky.text }}"
needs = ["flaky"]
"""
    run = Run(tmp_path, graph)
    with trio.fail_after(GUARD_S):
        await run.start("--sim-zero")
        assert await run.wait() == 1, run.stderr()
    rid = run.run_id()
    assert rid is not None
    lines = _log(run, rid)

    def one(event: str, **match: Any) -> dict[str, Any]:
        found = [e for e in lines if e.get("event") == event
                 and all(e.get(k) == v for k, v in match.items())]
        assert len(found) == 1, (event, match, [e.get("event") for e in lines])
        return found[0]

    retry = one("task.retry", task_id="flaky")
    assert retry["attempt"] == 1 and retry["retry"] == "1 of 1" and retry["level"] == "warning"
    assert "upstream exploded" in retry["error"]
    failed = one("task.failed", task_id="flaky")
    assert failed["attempts"] == 2 and failed["level"] == "error"
    assert one("task.not_run", task_id="after")["reason"] == "needs flaky, which failed"
    tool = [e for e in lines if e.get("event") == "tool.error"]
    assert len(tool) == 2 and all("exit 3" in e["arguments"] for e in tool), tool
    assert all(e["output_tail"].startswith("oops") for e in tool), tool
