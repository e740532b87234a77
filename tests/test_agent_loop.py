"""Agent loop: turns, tools, errors, deadlines and cancellation, in process against the real sim
server (a nursery) with the real model client and the real tool registry."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import structlog
import trio
from agent_helpers import alive, until

from agents.loop import LoopState, parse_outputs, run_agent_loop, turn_cost
from agents.protocol import AgentSpec, ModelRef, TurnRecord
from agents.tools import ToolContext, build_registry
from modellink.client import ModelEndpoint, fetch_server_stats, open_model_session
from modellink.server import ModelServerConfig, serve_model
from modellink.sim import SimConfig

GUARD_S = 15  # every test is bounded by this


@attrs.frozen
class Env:
    base_url: str
    server: Any
    workspace: pathlib.Path


@asynccontextmanager
async def sim_server(tmp_path: pathlib.Path, sim: SimConfig | None = None
                     ) -> AsyncIterator[Env]:
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve_model, ModelServerConfig(
            host="127.0.0.1", port=0, token=None, sim=sim or SimConfig.zero()))
        ws = tmp_path / "ws"
        ws.mkdir()
        yield Env(base_url=info.base_url, server=info.server, workspace=ws)
        nursery.cancel_scope.cancel()


def _agent(script: list[Any], tools: list[str], **kw: Any) -> AgentSpec:
    return AgentSpec(name="a", instructions="Do it.", tools=tuple(tools), script=tuple(script),
                     **kw)


async def _run(env: Env, agent: AgentSpec, *, state: LoopState | None = None,
               deadline: float | None = None, transport: str = "ws", attempt: int = 1,
               shell_timeout_s: float = 10.0, **ctx: Any) -> Any:
    registry = build_registry(list(agent.tools), ToolContext(
        workspace=env.workspace, env={"PATH": os.environ["PATH"]},
        shell_timeout_s=shell_timeout_s, **ctx))
    endpoint = ModelEndpoint(base_url=env.base_url, model="sim", transport=transport,
                             encoding="msgpack" if transport == "ws" else "json")
    metadata = {"sim_script": json.dumps(list(agent.script or ())), "sim_attempt": str(attempt)}
    state = state if state is not None else LoopState()
    async with open_model_session(endpoint, instructions=agent.instructions,
                                  tools=registry.schemas(), metadata=metadata) as session:
        out = await run_agent_loop(agent=agent, prompt="go", session=session,
                                   registry=registry, state=state, deadline=deadline)
        return out, list(session.items)


def _outputs_seen(items: list[dict[str, Any]]) -> list[str]:
    return [i["output"] for i in items if i.get("type") == "function_call_output"]


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"call": {"name": name, "arguments": arguments}}


# ------------------------------------------------------------------ pure parts


def test_outputs_are_the_final_answer_parsed_as_a_json_object():
    assert parse_outputs('{"files": ["a.py"]}') == {"files": ["a.py"]}
    assert parse_outputs('```json\n{"x": 1}\n```') == {"x": 1}
    assert parse_outputs("plain text") == {}
    assert parse_outputs("[1, 2]") == {}
    assert parse_outputs(' \n {"y": 2} ') == {"y": 2} and parse_outputs("{not json") == {}


def test_turn_cost_prices_uncached_cached_and_output_tokens():
    rec = TurnRecord(turn=1, input_tokens=1_000_000, cached_tokens=400_000,
                     output_tokens=100_000)
    # gpt-4.1-mini: $0.40 uncached, $0.10 cached, $1.60 output per million
    openai = ModelRef(base_url="https://api.openai.com/v1", model="gpt-4.1-mini", sim=False)
    assert turn_cost(openai, rec) == pytest.approx(0.24 + 0.04 + 0.16)
    assert turn_cost(ModelRef(), rec) == 0.0
    assert turn_cost(attrs.evolve(openai, model="unknown-model"), rec) == 0.0
    # the sim answers to any model name; a priced name on it costs nothing (it said $0.0002)
    assert turn_cost(ModelRef(model="gpt-4.1-mini"), rec) == 0.0


def test_where_names_the_turn_and_the_running_tools():
    st = LoopState(turn=3, phase="tools", running_tools=("shell", "read_file"))
    assert st.where() == "turn 3: running tools shell, read_file"
    assert LoopState(turn=2, phase="model").where() == "turn 2: model"


# ------------------------------------------------------------------ turns


async def test_loop_runs_tools_until_an_answer_without_calls_sending_only_new_items(tmp_path):
    script = [
        _call("shell", cmd="head -c 6000 /dev/zero | tr '\\0' x"),
        _call("write_file", path="notes/a.txt", content="xyz"),
        {"text": '{"chars": 6000, "ok": true}'},
    ]
    with trio.fail_after(GUARD_S):
        async with sim_server(tmp_path) as env:
            out, items = await _run(env, _agent(script, ["write_file", "shell"]))
    assert out.status == "succeeded", out.error
    assert out.text == '{"chars": 6000, "ok": true}'
    assert out.outputs == {"chars": 6000, "ok": True}
    assert (env.workspace / "notes" / "a.txt").read_text() == "xyz"
    assert [t.tool_calls for t in out.turns] == [("shell",), ("write_file",), ()]
    # each result went back as a function_call_output for the call it answers
    calls = [i["call_id"] for i in items if i.get("type") == "function_call"]
    answered = [i["call_id"] for i in items if i.get("type") == "function_call_output"]
    assert calls == answered and len(calls) == 2
    assert _outputs_seen(items)[0].startswith("x" * 6000)
    # the 6 KB shell output was sent once, on turn 2; turn 3 sends only write_file's short
    # result (every request repeats the instructions and tool schemas: OpenAI's rule)
    t1, t2, t3 = out.turns
    assert t2.bytes_sent > t1.bytes_sent + 5000
    assert t3.bytes_sent < t1.bytes_sent + 500
    assert not any(t.resent_full_context for t in out.turns)
    # per-turn accounting: tokens, cached prefix, bytes, model and tool time
    assert all(t.input_tokens > 0 and t.output_tokens > 0 and t.bytes_received > 0
               for t in out.turns)
    assert t3.input_tokens > t2.input_tokens > t1.input_tokens
    assert t3.cached_tokens > 0
    assert t1.tools_s > 0 and t2.tools_s > 0 and t3.tools_s == 0
    assert all(t.model_s >= 0 for t in out.turns)
    stats = env.server.statistics()
    assert stats["responses_completed"] == 3
    assert stats["output_tokens"] == sum(t.output_tokens for t in out.turns)


async def test_http_transport_sends_the_full_context_every_turn(tmp_path):
    script = [_call("write_file", path="a.txt", content="y" * 6000), {"text": "done"}]
    with trio.fail_after(GUARD_S):
        async with sim_server(tmp_path) as env:
            out, _ = await _run(env, _agent(script, ["write_file"]), transport="http")
    assert out.status == "succeeded" and out.text == "done"
    assert len(out.turns) == 2


async def test_several_calls_in_one_turn_run_concurrently(tmp_path):
    # each command waits for the file the other one creates: both finish only if they overlap
    def rendezvous(mine: str, theirs: str) -> str:
        return (f"touch {mine}; i=0; while [ ! -e {theirs} ]; do i=$((i+1)); "
                f"[ $i -gt 100 ] && exit 7; sleep 0.02; done; echo met {theirs}")

    script = [{"calls": [{"name": "shell", "arguments": {"cmd": rendezvous("a", "b")}},
                         {"name": "shell", "arguments": {"cmd": rendezvous("b", "a")}}]},
              {"text": "both met"}]
    with trio.fail_after(GUARD_S):
        async with sim_server(tmp_path) as env:
            out, items = await _run(env, _agent(script, ["shell"]))
    assert out.status == "succeeded"
    seen = _outputs_seen(items)
    assert seen[0].startswith("met b") and seen[1].startswith("met a")  # in the calls' order
    assert out.turns[0].tool_calls == ("shell", "shell")


async def test_max_turns_ends_the_loop_with_a_failure_that_says_what_to_change(tmp_path):
    script = [_call("shell", cmd="true")] * 5 + [{"text": "never"}]
    with trio.fail_after(GUARD_S):
        async with sim_server(tmp_path) as env:
            state = LoopState()
            out, _ = await _run(env, _agent(script, ["shell"], max_turns=3), state=state)
    assert out.status == "failed"
    assert "max_turns=3" in out.error and "raise max_turns" in out.error
    assert len(out.turns) == 3
    assert state.where() == "turn 3: max_turns reached, no final answer"  # not "done"


async def test_deadline_stops_a_long_response_and_the_server_stops_generating(tmp_path):
    sim = SimConfig(ttft_s=0.0, prefill_s_per_token=0.0, decode_s_per_token=0.001)
    script = [{"text": "long", "output_tokens": 200_000}]  # 200 s at this rate
    with trio.fail_after(GUARD_S):
        async with sim_server(tmp_path, sim) as env:
            out, _ = await _run(env, _agent(script, []),
                                deadline=trio.current_time() + 0.3)
            # The client's response.cancel (on the model WebSocket) and this stats request
            # (its own HTTP connection) race to the server: wait for the response to end there
            # rather than read the counters before the cancel arrived (it failed ~1 run in 3).
            # Polled: the server says so only in its counters.
            stats = await fetch_server_stats(env.base_url)
            while stats["in_flight"]:  # noqa: ASYNC110
                await trio.sleep(0.01)
                stats = await fetch_server_stats(env.base_url)
    assert out.status == "failed"
    assert out.error.startswith("deadline reached at turn 1: model")
    assert stats["responses_cancelled"] == 1 and stats["in_flight"] == 0
    assert stats["output_tokens"] < 200_000


async def test_a_failed_response_fails_the_attempt_and_a_later_attempt_skips_the_step(tmp_path):
    script = [{"fail": "flaky upstream", "attempts": [1]}, {"text": "second time lucky"}]
    with trio.fail_after(GUARD_S):
        async with sim_server(tmp_path) as env:
            first, _ = await _run(env, _agent(script, []), attempt=1)
            second, _ = await _run(env, _agent(script, []), attempt=2)
    assert first.status == "failed"
    assert "model response failed at turn 1" in first.error and "flaky upstream" in first.error
    assert len(first.turns) == 1
    assert second.status == "succeeded" and second.text == "second time lucky"
    assert env.server.statistics()["responses_failed"] == 1


# ------------------------------------------------------------------ bad input


async def test_bad_tool_input_becomes_an_error_result_the_model_sees_logged_once(tmp_path):
    script = [
        {"calls": [
            {"name": "no_such_tool", "arguments": {}},
            {"name": "shell", "arguments": {"command": "ls"}},  # not in the schema
            {"name": "shell", "arguments": {"cmd": "head -c 100000 /dev/zero | tr '\\0' a"}},
            {"name": "shell", "arguments": {"cmd": "printf 'bin\\000\\001\\002'"}},
            {"name": "shell", "arguments": {"cmd": "sleep 60", "timeout_s": 0.3}},
            {"name": "read_file", "arguments": {"path": "../outside.txt"}},
            {"name": "read_file", "arguments": {"path": "/etc/passwd"}},
            {"name": "read_file", "arguments": {"path": "link/passwd"}},
            {"name": "write_file", "arguments": {"path": "link/x", "content": "no"}},
        ]},
        {"text": "carried on"},
    ]
    (tmp_path / "outside.txt").write_text("secret")
    with trio.fail_after(GUARD_S):
        async with sim_server(tmp_path) as env:
            (env.workspace / "link").symlink_to("/etc")
            with structlog.testing.capture_logs() as logs:
                out, items = await _run(env, _agent(script, ["shell", "read_file",
                                                             "write_file"]))
    assert out.status == "succeeded" and out.text == "carried on"
    seen = _outputs_seen(items)
    assert len(seen) == 9
    assert seen[0].startswith("ERROR: unknown tool 'no_such_tool'") and "shell" in seen[0]
    assert seen[1].startswith("ERROR: invalid arguments for 'shell'")
    assert "cut" in seen[2] and len(seen[2]) < 20_000  # head and tail of 100 KB
    assert "binary output" in seen[3]
    assert seen[4].startswith("ERROR: command timed out after 0.3s")
    for escaped in seen[5:]:
        assert escaped.startswith("ERROR:") and "workspace" in escaped
    assert "secret" not in "".join(seen)
    assert not (pathlib.Path("/etc") / "x").exists()
    errors = [e for e in logs if e["event"] == "tool.error"]
    # each bad call logged once (the huge and binary outputs are successful calls)
    assert len(errors) == 7
    assert {e["tool"] for e in errors} == {"no_such_tool", "shell", "read_file", "write_file"}


# ------------------------------------------------------------------ cancellation




async def test_cancel_during_a_model_response_stops_it_at_the_server(tmp_path):
    sim = SimConfig(ttft_s=0.0, prefill_s_per_token=0.0, decode_s_per_token=0.0005)
    script = [_call("shell", cmd="true"), {"text": "long", "output_tokens": 400_000}]
    state = LoopState()
    with trio.fail_after(GUARD_S):
        async with sim_server(tmp_path, sim) as env:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: _run(env, _agent(script, ["shell"]),
                                                    state=state))
                    # generation of turn 2 is under way
                    await until(lambda: env.server.statistics()["output_tokens"] > 200)
                    t0 = trio.current_time()
                    scope.cancel()
            assert trio.current_time() - t0 < 1.0
            # The response.cancel (on the model WebSocket) and the stats request (its own HTTP
            # connection) race to the server: wait until it has ended the response, as above.
            stats = await fetch_server_stats(env.base_url)
            while stats["in_flight"]:  # noqa: ASYNC110
                await trio.sleep(0.01)
                stats = await fetch_server_stats(env.base_url)
            await trio.sleep(0.2)
            later = await fetch_server_stats(env.base_url)
    assert stats["responses_cancelled"] == 1 and stats["in_flight"] == 0
    assert later["output_tokens"] == stats["output_tokens"] < 400_000
    assert state.where() == "turn 2: model"
    assert len(state.turns) == 1 and state.turns[0].output_tokens > 0  # turn 1 kept


async def test_cancel_during_tools_kills_grandchildren_that_ignore_sigterm(tmp_path):
    cmd = ("sh -c 'trap \"\" TERM; sleep 60' & echo $! >> pids; "
           "sh -c 'trap \"\" TERM; sleep 60 & echo $! >> pids; wait' & "
           "trap '' TERM; echo $$ >> pids; sleep 60")
    script: list[dict[str, Any]] = [{"calls": [{"name": "shell", "arguments": {"cmd": cmd}},
                         {"name": "shell", "arguments": {"cmd": "sleep 60"}}]},
              {"text": "never"}]
    state = LoopState()
    with trio.fail_after(GUARD_S):
        async with sim_server(tmp_path) as env:
            pids_file = env.workspace / "pids"
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: _run(env, _agent(script, ["shell"]),
                                                    state=state))
                    await until(lambda: pids_file.exists()
                                and len(pids_file.read_text().split()) >= 3)
                    await trio.sleep(0.1)  # the grandchildren have set their traps
                    pids = [int(p) for p in pids_file.read_text().split()]
                    assert all(alive(p) for p in pids)
                    t0 = trio.current_time()
                    scope.cancel()
            took = trio.current_time() - t0
    assert took < 1.0
    assert not [p for p in pids if alive(p)]
    assert state.where() == "turn 1: running tools shell, shell"
    assert len(state.turns) == 1 and state.turns[0].input_tokens > 0  # the model part counted
