"""The supervisor's bus input, driven by a scripted bus: what arrives in one pass is applied in
order, results in one journal transaction, and a rule-breaking worker is cut off at once."""

from __future__ import annotations

from typing import Any

import trio

from agents import protocol as P
from bus import codec as C
from bus.client import Message
from bus.errors import BusClosedError
from orchestrator import scheduler as S
from orchestrator import supervisor as SV
from orchestrator.graph import GraphSpec
from orchestrator.journal import Journal

GRAPH = "[run]\nfailure_policy = \"continue\"\n[agents.a]\n" + "".join(
    f'[[tasks]]\nid = "{t}"\nagent = "a"\n' for t in ("x", "y", "z"))


class ScriptedBus:
    """Delivers `messages` (all already waiting), then says the bus closed; records sends."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = list(messages)
        self.sent: list[tuple[str, Any]] = []

    async def receive(self) -> Message:
        await trio.lowlevel.checkpoint()
        return self.receive_nowait()

    def receive_nowait(self) -> Message:
        if not self.messages:
            raise BusClosedError("closed")
        return self.messages.pop(0)

    async def send(self, dest: str, body: Any) -> None:
        self.sent.append((dest, body))


def msg(source: str, body: Any) -> Message:
    return Message(kind="send", source=source, dest=P.ORCHESTRATOR_ID, correlation_id=0,
                   body=C.pack_body(body))


def result(task_id: str, worker: str, status: str = "succeeded", **kw: Any) -> Message:
    return msg(f"worker.{worker}", P.to_wire(P.Result(
        run_id="r1", task_id=task_id, attempt=1, worker_id=worker, status=status,
        text=f"{task_id} done", **kw)))


def started(tmp_path, text: str = GRAPH) -> SV.Supervisor:
    g = GraphSpec.from_text(text, "g.toml")
    j = Journal.open(tmp_path / "journal.sqlite")
    j.create_run("r1", graph_path="g.toml", graph_text=text)
    sup = SV.Supervisor(graph=g, journal=j, run_id="r1", scheduler=S.Scheduler(g),
                        opts=SV.RunOptions(state_dir=tmp_path, progress="none"))
    now = trio.current_time()
    for w in ("w1", "w2"):
        sup.table.hello(w, 4, None, "", now)
    for act, w in zip(sup.sched.next_actions(now), ("w1", "w1", "w2"), strict=True):
        j.attempt_queued("r1", act.task_id, act.attempt)
        j.attempt_started("r1", act.task_id, act.attempt, w)
        sup.table.grant(act.task_id, act.attempt, w, now)
        sup.sched.on_started(act.task_id, act.attempt, now)
    return sup


async def test_results_then_a_bye_in_one_pass_are_applied_before_the_worker_is_forgotten(
        tmp_path):
    sup = started(tmp_path)
    commits = []
    sup.journal.conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT"
                                        else None)
    sup.bus = ScriptedBus([result("x", "w1"), result("y", "w1", "failed"),
                           msg("worker.w1", P.bye("w1", "drained"))])
    with trio.fail_after(5):
        await sup._receive_loop()
    states = {t: v.state for t, v in sup.sched.task_states().items()}
    # nothing was lost to the bye: x succeeded, y failed (no retries), z still runs on w2
    assert states == {"x": "succeeded", "y": "failed", "z": "running"}
    assert "w1" not in sup.table.workers
    assert {a["task_id"]: a["state"] for a in sup.journal.attempts("r1")} == {
        "x": "succeeded", "y": "failed", "z": "running"}
    assert len(commits) == 1  # both results in one transaction (the bye writes nothing)


async def test_a_result_for_an_attempt_it_does_not_hold_cuts_the_worker_off_at_once(tmp_path):
    sup = started(tmp_path)
    # w2 claims x (w1's), then reports its own z in the same pass: ignored, it is cut off
    sup.bus = ScriptedBus([result("x", "w2"), result("z", "w2"), result("x", "w1")])
    with trio.fail_after(5):
        await sup._receive_loop()
    states = {t: v.state for t, v in sup.sched.task_states().items()}
    assert states["x"] == "succeeded"  # w1's real result, after the forged one
    assert "w2" in sup.banned and "w2" not in sup.table.workers
    assert states["z"] == "ready"  # w2's attempt was lost with it: it runs again
    assert (P.worker_endpoint("w2"), P.drain()) in sup.bus.sent


async def test_a_failure_another_attempt_would_repeat_does_not_spend_the_retries(tmp_path):
    sup = started(tmp_path, GRAPH.replace("[run]\n", "[run]\nretries = 3\n"))
    sup.bus = ScriptedBus([
        result("x", "w1", "failed", error="ModelAuthError: refused the credentials",
               retryable=False),
        result("y", "w1", "failed", error="ModelConnectionError: reset")])
    with trio.fail_after(5):
        await sup._receive_loop()
    views = sup.sched.task_states()
    assert views["x"].state == "failed" and views["x"].attempt == 1
    assert "not retried: another attempt would fail the same way" in (views["x"].error or "")
    assert views["y"].state == "backoff"  # a network break may pass next time


async def test_after_a_resume_a_result_the_dead_orchestrator_leased_is_refused_not_banned(
        tmp_path):
    # a resume closes the dead orchestrator's attempts as lost; their worker, still running,
    # reports one: it was cut off ("does not hold") and so never served the resumed run
    sup = started(tmp_path)
    sup.table.remove_worker("w1")
    sup.table.retired.clear()  # a new orchestrator remembers nothing of the old leases
    sup._lost("x", 1, "the orchestrator that leased it died (resume)")
    sup.bus = ScriptedBus([result("x", "w1"), msg("worker.w1", P.heartbeat(
        "w1", [], False, joins=P.hello("w1", 4, 1, "h")))])
    with trio.fail_after(5):
        await sup._receive_loop()
    assert "w1" not in sup.banned and "w1" in sup.table.workers  # joined by its heartbeat
    assert sup.sched.task_states()["x"].state in ("ready", "backoff")  # to run again
    refused = [a for a in sup.journal.attempts("r1") if a["task_id"] == "x"]
    assert refused[0]["state"] == "lost"


async def test_shipped_log_lines_reach_the_run_log_whole_in_one_write(tmp_path):
    sup = started(tmp_path)
    writes: list[bytes] = []
    sup.sink = writes.append  # the run's sink: it ends each write with a newline
    sup.bus = ScriptedBus([
        msg("worker.w1", P.logs("w1", [b'{"event": "a"}', b'{"event": "b\nc"}', "not bytes"])),
        msg("worker.w1", P.logs("w1", []))])
    with trio.fail_after(5):
        await sup._receive_loop()
    # one write per shipped batch, a line per entry, an embedded newline cannot split a line
    assert writes == [b'{"event": "a"}\n{"event": "b c"}']


async def test_a_run_stopping_for_its_dead_sim_leases_nothing_more(tmp_path):
    """The sim's process died: its attempts are lost and queued again, but the run is
    stopping, so none is leased (a worker would only fail it against the dead sim, and a
    failure costs a retry): each stays queued and is closed as never started."""
    sup = started(tmp_path, GRAPH.replace("[run]\n", "[run]\nretries = 0\n"))
    # their workers report the broken turns before the dispatcher's next step: the capacity
    # is free again
    sup.bus = ScriptedBus([result(t, w, "failed", error="ModelConnectionError: refused")
                           for t, w in (("x", "w1"), ("y", "w1"), ("z", "w2"))])
    with trio.fail_after(5):
        await sup._on_sim_exit(-9, [])
        await sup._receive_loop()
        await sup._dispatch_loop()
    assert sup.fatal is not None and "killed by SIGKILL" in sup.fatal
    sent = [body for _dest, body in sup.bus.sent]
    assert [b["t"] for b in sent] == ["cancel"] * 3  # its workers are told; no lease follows
    attempts = {(a["task_id"], a["attempt"]): a["state"] for a in sup.journal.attempts("r1")}
    assert attempts == {(t, 1): "lost" for t in "xyz"} | {(t, 2): "queued" for t in "xyz"}
