"""Worker: the protocol values it accepts (plain tests), then a Worker in process on a real bus
hub and sim server, with the test playing the orchestrator: topics, model auth, scripted
failures per attempt, cancel messages."""

from __future__ import annotations

import json
import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from agent_helpers import parent_of, procs_mentioning, until

from agents import protocol as P
from agents.bustools import BusTools
from agents.worker import Worker, WorkerConfig, model_token, workspace_dir
from bus.client import open_bus_client
from bus.config import HubConfig
from bus.hub import serve_bus
from modellink.server import ModelServerConfig, serve_model
from modellink.sim import SimConfig

GUARD_S = 15
REPO = str(pathlib.Path(__file__).resolve().parents[1])
BUS_TOKEN = "bus-secret"

# ------------------------------------------------------------------ protocol (no I/O)


def test_spawn_wait_and_topic_messages_are_accepted_with_their_fields_checked():
    spawn = {"t": "spawn", "run_id": "r", "parent": "plan", "attempt": 1, "prompt": "p",
             "agent": None}
    assert P.parse_message(spawn) == spawn
    wait = {"t": "wait", "run_id": "r", "parent": "plan", "children": ["plan/1"]}
    assert P.parse_message(wait) == wait
    topic = {"t": "topic", "from": "a", "topic": "news.x", "text": "hi"}
    assert P.parse_message(topic) == topic
    for bad, field in [({**spawn, "attempt": "1"}, "attempt"), ({**spawn, "prompt": 3}, "prompt"),
                       ({**wait, "children": [1]}, "children"), ({**topic, "text": None}, "text"),
                       ({**spawn, "agent": 7}, "agent")]:
        with pytest.raises(P.WorkerProtocolError, match=field):
            P.parse_message(bad)


def test_a_result_round_trips_with_per_turn_tokens_and_cost():
    res = P.Result(run_id="r", task_id="t", attempt=2, worker_id="w", status="cancelled",
                   error="cancelled", stopped_at="turn 2: model", cost_usd=0.5,
                   turns=(P.TurnRecord(turn=1, input_tokens=10, cached_tokens=4,
                                       output_tokens=3, model_s=0.1, tools_s=0.2,
                                       tool_calls=("shell",), cost_usd=0.5),))
    assert P.parse_message(P.to_wire(res)) == res
    wire = P.to_wire(res)
    wire["turns"][0]["output_tokens"] = "3"
    with pytest.raises(P.WorkerProtocolError, match=r"turns\[0\].*output_tokens"):
        P.parse_message(wire)
    wire["turns"][0] = {"turn": 1, "surprise": 1}
    with pytest.raises(P.WorkerProtocolError, match="unknown fields"):
        P.parse_message(wire)


def test_a_child_workspace_is_a_sibling_of_its_parents():
    root = pathlib.Path("/ws")
    assert workspace_dir(root, "run1", "plan") == root / "run1" / "plan"
    assert workspace_dir(root, "run1", "plan/1") == root / "run1" / "plan%2F1"
    assert workspace_dir(root, "run1", "write[0]") == root / "run1" / "write[0]"
    assert workspace_dir(root, "run1", "a%2Fb") != workspace_dir(root, "run1", "a/b")


def test_model_token_falls_back_to_the_environment():
    assert model_token("cfg", {"SWITCHBOARD_MODEL_TOKEN": "env"}) == "cfg"
    assert model_token(None, {"SWITCHBOARD_MODEL_TOKEN": "env"}) == "env"
    assert model_token(None, {}) is None


# ------------------------------------------------------------------ a worker in process


@attrs.define
class Harness:
    orch: Any  # the test's bus client, endpoint "orchestrator"
    worker: Worker
    model_url: str
    model: Any
    results: list[P.Result] = attrs.Factory(list)

    async def lease(self, task_id: str, agent: P.AgentSpec, *, attempt: int = 1,
                    timeout_s: float | None = 10.0, reachable: bool = True) -> None:
        await self.orch.send(P.worker_endpoint("w1"), P.to_wire(P.Lease(
            run_id="run1", task_id=task_id, attempt=attempt, agent=agent, prompt="go",
            timeout_s=timeout_s, model_base_url=agent.model.base_url or self.model_url,
            reachable=reachable)))  # as the supervisor fills it in

    async def result(self) -> P.Result:
        async for msg in self.orch:
            body = P.parse_message(msg.payload())
            if isinstance(body, P.Result):
                return body
        raise AssertionError("bus closed")


@asynccontextmanager
async def harness(tmp_path: pathlib.Path, *, sim: SimConfig | None = None,
                  server_token: str | None = None, worker_token: str | None = None
                  ) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        hub = await nursery.start(serve_bus, HubConfig(token=BUS_TOKEN))
        model = await nursery.start(serve_model, ModelServerConfig(
            host="127.0.0.1", port=0, token=server_token, sim=sim or SimConfig.zero()))
        async with open_bus_client(hub.url, token=BUS_TOKEN,
                                   endpoint_id=P.ORCHESTRATOR_ID) as orch:
            worker = Worker(config=WorkerConfig(
                url=hub.url, token=BUS_TOKEN, worker_id="w1", capacity=4, heartbeat_s=5.0,
                workspace_root=tmp_path / "ws", model_token=worker_token))
            async with trio.open_nursery() as inner:  # the worker stops before the hub
                inner.start_soon(worker.run)
                hello = P.parse_message((await orch.receive()).payload())
                assert hello["t"] == "hello" and hello["worker_id"] == "w1"
                yield Harness(orch=orch, worker=worker, model_url=model.base_url, model=model)
                inner.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


def _agent(name: str, script: list[Any], tools: list[str], **kw: Any) -> P.AgentSpec:
    return P.AgentSpec(name=name, tools=tuple(tools), script=tuple(script), **kw)


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"call": {"name": name, "arguments": arguments}}


def _wait_for(path: str) -> str:
    return (f"i=0; while [ ! -e {path} ] && [ $i -lt 300 ]; do i=$((i+1)); sleep 0.02; done; "
            f"[ -e {path} ]")


async def test_a_publish_reaches_tasks_subscribed_to_a_matching_pattern_only(
        tmp_path, monkeypatch):
    reads: list[tuple[str, str]] = []
    original = BusTools.read_messages

    async def spy(self: BusTools) -> str:
        out = await original(self)
        reads.append((self.task_id, out))
        return out

    monkeypatch.setattr(BusTools, "read_messages", spy)
    reader_script = [_call("shell", cmd="touch ready; " + _wait_for("../pub/published")),
                     _call("read_topic"), {"text": "read"}]
    publisher = _agent("pub", [
        _call("shell", cmd=_wait_for("../sub/ready") + " && " + _wait_for("../other/ready")),
        _call("publish", topic="news.build", text="build is green"),
        _call("shell", cmd="touch published"),
        {"text": "published"}], ["shell", "publish"], subscribe=("news.*",))
    sub = _agent("sub", reader_script, ["shell", "read_topic"], subscribe=("news.*",))
    other = _agent("other", reader_script, ["shell", "read_topic"], subscribe=("alerts.*",))
    unsubscribed: list[str] = []
    with trio.fail_after(GUARD_S):
        async with harness(tmp_path) as h:
            real_unsubscribe = h.worker.bus.unsubscribe

            async def unsub(pattern: str) -> None:
                unsubscribed.append(pattern)
                await real_unsubscribe(pattern)

            h.worker.bus.unsubscribe = unsub
            for tid, agent in (("sub", sub), ("other", other), ("pub", publisher)):
                await h.lease(tid, agent)
            results = {r.task_id: r for r in [await h.result() for _ in range(3)]}
            subs_left = dict(h.worker.subs)
    assert {t: r.status for t, r in results.items()} == dict.fromkeys(
        ("sub", "other", "pub"), "succeeded"), results
    got = dict(reads)
    assert got["sub"] == "[news.build] from pub: build is green"
    assert got["other"] == "no new messages"
    # pub is subscribed to news.* too, but does not get its own publish; every subscription
    # was dropped once no running attempt needed it (news.* once, after its last holder)
    assert subs_left == {}
    assert sorted(unsubscribed) == ["alerts.*", "news.*"]


async def test_workers_send_a_model_token_to_a_protected_model_server(tmp_path, monkeypatch):
    agent = _agent("a", [{"text": "hello"}], [])
    with trio.fail_after(GUARD_S):
        async with harness(tmp_path, server_token="model-secret",
                           worker_token="model-secret") as h:
            await h.lease("with_config", agent)
            ok = await h.result()
        monkeypatch.delenv("SWITCHBOARD_MODEL_TOKEN", raising=False)
        async with harness(tmp_path, server_token="model-secret") as h:
            await h.lease("without", agent)
            refused = await h.result()
            monkeypatch.setenv("SWITCHBOARD_MODEL_TOKEN", "model-secret")
            await h.lease("from_env", agent)
            from_env = await h.result()
    assert ok.status == "succeeded" and ok.text == "hello"
    assert refused.status == "failed" and "refused the credentials" in (refused.error or "")
    assert from_env.status == "succeeded"


async def test_the_model_token_goes_to_sim_endpoints_only_and_keys_are_trimmed(
        tmp_path, monkeypatch):
    """The sim server's token is ours: a foreign url (Ollama, a remote https server) is not
    sent it. A key from a file-made Secret or a CRLF .env ends in a line break: trimmed, not
    sent as an illegal header whose error would write the key into the journal and logs."""
    with trio.fail_after(GUARD_S):
        async with harness(tmp_path, server_token="model-secret",
                           worker_token="model-secret") as h:
            foreign = P.ModelRef(base_url=h.model_url, model="sim", transport="http",
                                 encoding="json", sim=False)
            await h.lease("foreign", _agent("a", [], [], model=foreign))
            foreign_result = await h.result()
            monkeypatch.setenv("MY_KEY", "model-secret\r\n")
            await h.lease("keyed", _agent("a", [], [], model=attrs.evolve(
                foreign, api_key_env="MY_KEY")))
            keyed = await h.result()
            monkeypatch.setenv("MY_KEY", "model-\nsecret")
            await h.lease("broken", _agent("a", [], [], model=attrs.evolve(
                foreign, api_key_env="MY_KEY")))
            broken = await h.result()
    assert foreign_result.status == "failed", foreign_result
    assert "refused the credentials" in (foreign_result.error or "")
    assert keyed.status == "succeeded", keyed.error
    assert broken.status == "failed" and not broken.retryable
    assert "control character" in (broken.error or "") and "secret" not in (broken.error or "")


async def test_an_agents_turn_retries_decide_how_often_a_rate_limited_turn_is_sent(tmp_path):
    """turn_retries (graph [model] -> lease -> worker -> ModelEndpoint.retries): three 429s
    fail a turn allowed two retries and pass one allowed three, without a task retry."""
    from test_model_client import DONE, JSON, _err_body, _serve_answers

    limited = (429, [*JSON, ("retry-after-ms", "1")], _err_body("rate_limit_exceeded", "wait"))
    targets: list[bytes] = []
    with trio.fail_after(GUARD_S):
        async with harness(tmp_path) as h, trio.open_nursery() as nursery:
            base = await _serve_answers(nursery, [limited] * 3 + [(200, JSON, DONE)], targets)
            model = P.ModelRef(base_url=base, model="m", transport="http", encoding="json",
                               sim=False, turn_retries=2)
            await h.lease("two", _agent("a", [], [], model=model))
            two = await h.result()
            sent_for_two = len(targets)
            targets.clear()  # the server's answers start over
            await h.lease("three", _agent("a", [], [], model=attrs.evolve(model,
                                                                          turn_retries=3)))
            three = await h.result()
            nursery.cancel_scope.cancel()
    assert two.status == "failed" and "429" in (two.error or "") and sent_for_two == 3
    assert three.status == "succeeded" and three.text == "at last" and len(targets) == 4


def test_turn_retries_travel_in_the_lease_and_a_bad_value_is_refused():
    agent = _agent("a", [], [], model=P.ModelRef(turn_retries=7))
    lease = P.Lease(run_id="r", task_id="t", attempt=1, agent=agent, prompt="p", timeout_s=None,
                    model_base_url=None)
    assert P.parse_message(P.to_wire(lease)).agent.model.turn_retries == 7
    for bad in (-1, P.TURN_RETRIES_MAX + 1):
        wire = P.to_wire(lease)
        agent_map = {**wire["agent"], "model": {**wire["agent"]["model"], "turn_retries": bad}}
        wire = {**wire, "agent": agent_map, "agent_key": f"other-{bad}"}  # not seen before
        with pytest.raises(P.WorkerProtocolError, match="turn_retries"):
            P.parse_message(wire)


def test_a_worker_parses_each_agent_once_by_the_key_its_lease_names():
    """The orchestrator names each agent's content (agent_key, a digest of its map): a worker
    parses and checks the map the first time, and every later lease with that key gets the
    same spec. A lease without a key (an older orchestrator) is parsed in full each time."""
    agent = _agent("a", [{"text": "ok"}], [])
    lease = P.Lease(run_id="r", task_id="t", attempt=1, agent=agent, prompt="p", timeout_s=None,
                    model_base_url=None)
    wire = P.to_wire(lease)
    other = P.to_wire(attrs.evolve(lease, agent=attrs.evolve(agent, instructions="other")))
    assert wire["agent_key"] != other["agent_key"]  # the key follows the content
    first, again = P.parse_message(wire), P.parse_message({**wire, "task_id": "u"})
    assert first.agent == agent and again.agent is first.agent
    assert P.parse_message(other).agent.instructions == "other"
    keyless = {k: v for k, v in wire.items() if k != "agent_key"}
    assert P.parse_message(keyless).agent == agent
    assert P.parse_message(keyless).agent is not P.parse_message(keyless).agent


def test_the_wire_maps_carry_every_field_of_a_lease_a_result_and_a_turn():
    """to_wire writes the maps out field by field (asdict was slow): a field added to one of
    these values must be added there too, or it would not travel."""
    turn = P.TurnRecord(turn=1)
    res = P.Result(run_id="r", task_id="t", attempt=1, worker_id="w", status="failed",
                   turns=(turn,))
    lease = P.Lease(run_id="r", task_id="t", attempt=1, agent=_agent("a", [], []), prompt="p",
                    timeout_s=None, model_base_url=None)
    assert set(P.to_wire(res)) == set(attrs.fields_dict(P.Result)) | {"t"}
    assert set(P.to_wire(res)["turns"][0]) == set(attrs.fields_dict(P.TurnRecord))
    assert set(P.to_wire(lease)) == set(attrs.fields_dict(P.Lease)) | {"t", "agent_key"}


async def test_only_a_sim_endpoint_is_sent_the_agents_script(tmp_path):
    """A real provider is not sent the sim script (OpenAI caps a metadata value at 512
    characters): the same server, reached as a foreign OpenAI-compatible url, then answers
    with its default instead of the script."""
    script = [{"text": "SCRIPTED"}]
    with trio.fail_after(GUARD_S):
        async with harness(tmp_path) as h:
            foreign = P.ModelRef(base_url=h.model_url, model="sim", transport="http",
                                 encoding="json", sim=False)
            await h.lease("real", _agent("a", script, [], model=foreign))
            real = await h.result()
            await h.lease("sim", _agent("a", script, [],
                                        model=attrs.evolve(foreign, sim=True)))
            sim = await h.result()
    assert sim.status == "succeeded" and sim.text == "SCRIPTED"
    assert real.status == "succeeded" and real.text and "SCRIPTED" not in real.text


def test_failures_a_retry_cannot_mend_are_told_apart():
    from agents.tools import ToolSpecError
    from agents.worker import MissingModelKeyError, retryable
    from modellink.turns import (
        ModelAuthError,
        ModelConnectionError,
        ModelRequestError,
        ModelServerError,
    )

    never = [ModelAuthError("401"), MissingModelKeyError("no $KEY"), ToolSpecError("no module"),
             ModelRequestError("no such model", status=400, code="model_not_found"),
             ModelRequestError("too long", status=413)]
    later = [ModelRequestError("slow down", status=429, code="rate_limit_exceeded"),
             ModelRequestError("timeout", status=408), ModelRequestError("?", status=None),
             ModelServerError("boom", status=500), ModelConnectionError("reset"),
             OSError("disk"), ValueError("bad output")]
    assert [retryable(e) for e in never] == [False] * len(never)
    assert [retryable(e) for e in later] == [True] * len(later)


async def test_a_missing_key_or_an_unknown_model_is_reported_as_not_worth_retrying(
        tmp_path, monkeypatch):
    monkeypatch.delenv("SB_TEST_NO_SUCH_KEY", raising=False)
    with trio.fail_after(GUARD_S):
        async with harness(tmp_path) as h:
            keyed = P.ModelRef(base_url=h.model_url, api_key_env="SB_TEST_NO_SUCH_KEY")
            await h.lease("nokey", _agent("a", [{"text": "x"}], [], model=keyed))
            nokey = await h.result()
            other = P.ModelRef(base_url=h.model_url, model="no-such-model")
            await h.lease("nomodel", _agent("a", [{"text": "x"}], [], model=other))
            nomodel = await h.result()
            await h.lease("flaky", _agent("a", [{"fail": "upstream 503"}], []))
            flaky = await h.result()
    assert nokey.status == "failed" and not nokey.retryable
    assert "$SB_TEST_NO_SUCH_KEY, which is not set on worker w1" in (nokey.error or "")
    assert nomodel.status == "failed" and not nomodel.retryable
    assert "model_not_found" in (nomodel.error or "")
    assert flaky.status == "failed" and flaky.retryable  # a failed response may pass next time


async def test_a_scripted_failure_fails_only_the_attempts_it_names(tmp_path):
    agent = _agent("a", [{"fail": "upstream 503", "attempts": [1, 2]}, {"text": "third time"}],
                   [])
    with trio.fail_after(GUARD_S):
        async with harness(tmp_path) as h:
            got = []
            for attempt in (1, 2, 3):
                await h.lease("t", agent, attempt=attempt)
                got.append(await h.result())
    assert [r.status for r in got] == ["failed", "failed", "succeeded"]
    assert "upstream 503" in (got[0].error or "") and got[0].stopped_at == "turn 1: model"
    assert got[2].text == "third time" and got[2].stopped_at is None


async def test_a_cancel_message_ends_the_attempt_where_it_is_and_reports_its_turns(tmp_path):
    sim = SimConfig(ttft_s=0.0, prefill_s_per_token=0.0, decode_s_per_token=0.001)
    agent = _agent("a", [_call("shell", cmd="true"), {"text": "x", "output_tokens": 100_000}],
                   ["shell"])
    with trio.fail_after(GUARD_S):
        async with harness(tmp_path, sim=sim) as h:
            await h.lease("t", agent)
            stats = h.model.server.statistics
            await until(lambda: stats()["output_tokens"] > 100)
            await h.orch.send(P.worker_endpoint("w1"), P.cancel("t", 1, "cancelled by test"))
            res = await h.result()
            assert stats()["in_flight"] == 0 and stats()["responses_cancelled"] == 1
    assert res.status == "cancelled" and res.error == "cancelled by test"
    assert res.stopped_at == "turn 2: model"
    assert len(res.turns) == 1 and res.turns[0].tool_calls == ("shell",)
    assert json.dumps(P.to_wire(res))  # plain values only


async def test_stop_cancels_running_attempts_which_report_then_the_worker_says_bye(tmp_path):
    sim = SimConfig(ttft_s=0.0, prefill_s_per_token=0.0, decode_s_per_token=0.001)
    agent = _agent("a", [{"text": "x", "output_tokens": 100_000}], [])
    with trio.fail_after(GUARD_S):
        async with harness(tmp_path, sim=sim) as h:
            assert Worker(config=h.worker.config).stop() is False  # not serving: nothing to do
            await h.lease("t", agent)
            stats = h.model.server.statistics
            await until(lambda: stats()["output_tokens"] > 100)
            assert h.worker.stop("received SIGTERM")
            res = await h.result()
            bye = None
            async for msg in h.orch:
                body = P.parse_message(msg.payload())
                if isinstance(body, dict) and body["t"] == "bye":
                    bye = body
                    break
            await until(lambda: stats()["in_flight"] == 0)
    assert (res.status, res.error, res.stopped_at) == (
        "cancelled", "worker shutting down", "turn 1: model")
    assert bye == {"t": "bye", "worker_id": "w1", "reason": "received SIGTERM"}


async def test_only_a_reachable_lease_claims_its_task_endpoint(tmp_path):
    from bus.errors import BusNoRouteError, BusRemoteError

    sim = SimConfig(ttft_s=0.0, prefill_s_per_token=0.0, decode_s_per_token=0.001)
    agent = _agent("a", [{"text": "x", "output_tokens": 100_000}], ["read_topic"])
    deaf = _agent("d", [{"text": "x", "output_tokens": 100_000}], [])
    lease = P.Lease(run_id="r", task_id="t", attempt=1, agent=agent, prompt="p",
                    timeout_s=None, model_base_url=None, reachable=False)
    assert P.parse_message(P.to_wire(lease)) == lease
    assert P.parse_message({**P.to_wire(lease), "reachable": None}).reachable  # default
    with trio.fail_after(GUARD_S):
        async with harness(tmp_path, sim=sim) as h:
            stats = h.model.server.statistics
            await h.lease("alone", agent, reachable=False)
            await h.lease("asked", agent)
            await h.lease("deaf", deaf)
            await until(lambda: stats()["in_flight"] == 3)
            with pytest.raises(BusNoRouteError):
                await h.orch.request(P.task_endpoint("alone"), {"t": "message", "from": "x",
                                                                 "text": "hi"}, timeout=5)
            reply = await h.orch.request(P.task_endpoint("asked"), {
                "t": "message", "from": "x", "text": "hi"}, timeout=5)
            assert reply == {"ok": True}
            # a task without read_topic could never read it: the sender hears so
            with pytest.raises(BusRemoteError, match="cannot_read: task deaf cannot read"):
                await h.orch.request(P.task_endpoint("deaf"), {
                    "t": "message", "from": "x", "text": "hi"}, timeout=5)
            for tid in ("alone", "asked", "deaf"):
                await h.orch.send(P.worker_endpoint("w1"), P.cancel(tid, 1, "done"))
            assert {(await h.result()).status for _ in range(3)} == {"cancelled"}
    assert not (tmp_path / "ws" / "run1" / "alone").exists()  # no local tools: no workspace


def _children_running(ppid: int, needle: str) -> list[int]:
    """pids of live children of `ppid` whose command line contains `needle`."""
    return [pid for pid in procs_mentioning(needle) if parent_of(pid) == ppid]


@pytest.mark.slow
async def test_a_worker_killed_with_sigkill_mid_tool_leaves_no_tool_process(tmp_path):
    import os
    import random
    import signal
    import subprocess
    import sys

    needle = f"60.{random.randrange(10**6):06d}"
    started = tmp_path / "workspaces" / "run1" / "t" / "started"
    # a grandchild (not the group leader) that would outlive its worker without the guardian
    agent = _agent("a", [_call("shell", cmd=f"sleep {needle} & touch started; wait"),
                         {"text": "done"}], ["shell"])
    env = {**os.environ, "SWITCHBOARD_TOKEN": BUS_TOKEN,
           "PYTHONPATH": REPO}
    try:
        with trio.fail_after(GUARD_S):
            async with trio.open_nursery() as nursery:
                hub = await nursery.start(serve_bus, HubConfig(token=BUS_TOKEN))
                model = await nursery.start(serve_model, ModelServerConfig(
                    host="127.0.0.1", port=0, sim=SimConfig.zero()))
                async with open_bus_client(hub.url, token=BUS_TOKEN,
                                           endpoint_id=P.ORCHESTRATOR_ID) as orch:
                    proc = await trio.lowlevel.open_process(
                        [sys.executable, "-m", "orchestrator", "worker", "--connect", hub.url,
                         "--worker-id", "w1", "--state-dir", str(tmp_path), "--quiet"],
                        env=env, stderr=subprocess.DEVNULL, cwd=tmp_path)
                    try:
                        async for msg in orch:
                            if P.parse_message(msg.payload())["t"] == "hello":
                                break
                        # the guardian is up before the worker takes work (not in a task)
                        assert _children_running(proc.pid, "alive_fd")
                        h = Harness(orch=orch, worker=None, model_url=model.base_url,
                                    model=model)
                        await h.lease("t", agent, timeout_s=60.0)
                        await until(started.exists)
                        assert procs_mentioning(needle)  # the tool runs
                        proc.send_signal(signal.SIGKILL)
                        await proc.wait()
                        await until(lambda: not procs_mentioning(needle), poll_s=0.05)
                    finally:
                        if proc.returncode is None:
                            proc.kill()
                nursery.cancel_scope.cancel()
    finally:
        for pid in procs_mentioning(needle):  # a failed test must not leak a process
            os.kill(pid, signal.SIGKILL)


def test_worker_model_token_comes_from_the_file_else_the_environment(tmp_path):
    from bus.tokens import TokenError
    from orchestrator.cmd_worker import load_model_token

    f = tmp_path / "model-token"
    f.write_text("s3cret\n")
    env = {"SWITCHBOARD_MODEL_TOKEN": "from-env", "SWITCHBOARD_TOKEN": "bus"}
    assert load_model_token(str(f), env=env) == "s3cret"  # a file wins
    assert load_model_token(None, env=env) == "from-env"
    assert load_model_token(None, env={"SWITCHBOARD_TOKEN": "bus"}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(TokenError, match="empty"):
        load_model_token(str(tmp_path / "empty"), env=env)
    with pytest.raises(TokenError, match="--model-token-file or set SWITCHBOARD_MODEL_TOKEN"):
        load_model_token(str(tmp_path / "missing"), env=env)


def test_worker_cli_passes_the_model_token_file_to_the_worker_config(tmp_path, monkeypatch):
    from orchestrator import cli, cmd_worker

    f = tmp_path / "model-token"
    f.write_text("s3cret")
    seen = {}

    class Stop(Exception):
        pass

    def fake_worker(*, config, shipper):
        seen["cfg"] = config
        raise Stop

    monkeypatch.setattr("agents.worker.Worker", fake_worker)
    monkeypatch.setattr("bus.logs.configure_logging", lambda **kw: None)
    monkeypatch.delenv("SWITCHBOARD_TOKEN", raising=False)
    args = cli.build_parser().parse_args(
        ["worker", "--connect", "ws://127.0.0.1:1/bus", "--model-token-file", str(f),
         "--state-dir", str(tmp_path)])
    with pytest.raises(Stop):
        cmd_worker.run(args)
    assert seen["cfg"].model_token == "s3cret"
