"""The official openai SDK against our server: WebSocket mode and HTTP (plain and streaming).

The sync SDK runs in a worker thread while the server runs in the test's trio loop; no network
beyond 127.0.0.1 is needed.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import openai
import pytest
import trio
from openai import OpenAI

from modellink.server import ModelServerConfig, ModelServerInfo, serve_model
from modellink.sim import SimConfig

T = TypeVar("T")

TOOLS: list[Any] = [{
    "type": "function", "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}]
SCRIPT = json.dumps([
    {"call": {"name": "get_weather", "arguments": {"city": "Paris"}}},
    {"text": "It is sunny in Paris."},
    {"calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}},
               {"name": "get_weather", "arguments": {"city": "Rome"}}]},
    {"text": "Oslo is cold, Rome is warm."},
])
META = {"sim_script": SCRIPT}


@asynccontextmanager
async def running(**kw: Any) -> AsyncIterator[ModelServerInfo]:
    async with trio.open_nursery() as nursery:
        kw.setdefault("sim", SimConfig.zero())
        info = await nursery.start(serve_model, ModelServerConfig(**kw))
        yield info
        nursery.cancel_scope.cancel()


async def in_thread(fn: Callable[[], T]) -> T:
    with trio.fail_after(20):
        return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)


def client(info: ModelServerInfo, key: str = "x") -> OpenAI:
    return OpenAI(api_key=key, base_url=info.base_url, max_retries=0, timeout=10)


def run_turn(conn: Any, **kw: Any) -> tuple[Any, list[str]]:
    conn.response.create(**{"model": "sim", "tools": TOOLS, "metadata": META, "store": False,
                            **kw})
    types: list[str] = []
    for ev in conn:
        types.append(ev.type)
        if ev.type in ("response.completed", "response.incomplete", "response.failed",
                       "error"):
            return ev, types
    raise AssertionError("the connection ended before a terminal event")


async def test_sdk_websocket_conversation_with_function_calls_and_previous_response_id():
    def conversation() -> list[Any]:
        results = []
        with client(info).responses.connect() as conn:
            ev, types = run_turn(conn, input="What is the weather in Paris?",
                                 instructions="Use tools.")
            assert types[:2] == ["response.created", "response.in_progress"], types
            r1 = ev.response
            call = r1.output[0]
            assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
            results.append(r1)

            ev, types = run_turn(conn, previous_response_id=r1.id, instructions="Use tools.",
                                 input=[{"type": "function_call_output", "call_id": call.call_id,
                                         "output": "sunny"}])
            assert "response.output_text.delta" in types
            r2 = ev.response
            assert r2.output_text == "It is sunny in Paris."
            results.append(r2)

            ev, _ = run_turn(conn, previous_response_id=r2.id, instructions="Use tools.",
                             input=[{"role": "user", "content": "And Oslo and Rome?"}])
            assert ev.type == "response.completed", ev
            r3 = ev.response
            assert [o.name for o in r3.output] == ["get_weather", "get_weather"]
            outs = [{"type": "function_call_output", "call_id": o.call_id, "output": "ok"}
                    for o in r3.output]
            ev, _ = run_turn(conn, previous_response_id=r3.id, instructions="Use tools.",
                             input=outs)
            results.append(ev.response)
        return results

    async with running() as info:
        r1, r2, r4 = await in_thread(conversation)
        assert r4.output_text == "Oslo is cold, Rome is warm."
        assert r1.usage.model_extra["x_switchboard"]["context_source"] == "request"
        for r in (r2, r4):
            xs = r.usage.model_extra["x_switchboard"]
            assert xs["context_source"] == "connection_cache"
            assert xs["tokens_rendered"] < r.usage.input_tokens / 2
            assert r.usage.input_tokens_details.cached_tokens > 0
        s = info.server.statistics()
        assert (s["responses_completed"], s["ws_connections_total"]) == (4, 1)


async def test_sdk_websocket_sees_errors_in_band_and_keeps_the_connection():
    def session() -> tuple[Any, Any, Any]:
        with client(info).responses.connect() as conn:
            err, _ = run_turn(conn, input="x", previous_response_id="resp_missing")
            bad, _ = run_turn(conn, input="x", previous_response_id=None,
                              metadata={"sim_script": "nope"})
            ok, _ = run_turn(conn, input="hello")
            return err, bad, ok

    async with running() as info:
        err, bad, ok = await in_thread(session)
        assert err.type == "error" and err.error.code == "previous_response_not_found"
        assert err.error.param == "previous_response_id"
        assert bad.type == "error" and bad.error.param == "metadata.sim_script"
        assert ok.type == "response.completed"


async def test_sdk_websocket_can_cancel_with_our_extension_event():
    def session() -> Any:
        with client(info).responses.connect() as conn:
            conn.response.create(model="sim", input="go", store=False, metadata={
                "sim_script": json.dumps([{"text": "", "output_tokens": 100_000}])})
            for ev in conn:
                if ev.type == "response.output_text.delta":
                    conn.send({"type": "response.cancel"})  # type: ignore[arg-type, typeddict-item]
                    break
            for ev in conn:
                if ev.type in ("response.incomplete", "response.completed", "error"):
                    return ev
        raise AssertionError("no terminal event")

    async with running(sim=SimConfig(ttft_s=0.0, prefill_s_per_token=0.0,
                                     decode_s_per_token=0.0001)) as info:
        ev = await in_thread(session)
        assert ev.type == "response.incomplete"
        assert ev.response.status == "incomplete"
        s = info.server.statistics()
        assert s["responses_cancelled"] == 1 and s["output_tokens"] < 100_000


async def test_sdk_http_create_plain_and_streaming_with_a_stored_chain():
    def calls() -> tuple[Any, Any, list[str], Any]:
        c = client(info)
        r1 = c.responses.create(model="sim", input="Weather in Paris?", tools=TOOLS,
                                metadata=META)
        call = r1.output[0]
        r2 = c.responses.create(model="sim", tools=TOOLS, metadata=META,
                                previous_response_id=r1.id,
                                input=[{"type": "function_call_output", "call_id": call.call_id,
                                        "output": "sunny"}])
        types = []
        final = None
        with c.responses.create(model="sim", input="Stream please", stream=True,
                                metadata={"sim_script": json.dumps([{"text": "Streamed."}])}
                                ) as stream:
            for ev in stream:
                types.append(ev.type)
                if ev.type == "response.completed":
                    final = ev.response
        return r1, r2, types, final

    async with running() as info:
        r1, r2, types, final = await in_thread(calls)
        assert r1.output[0].type == "function_call" and r1.status == "completed"
        assert r2.output_text == "It is sunny in Paris."
        assert r2.usage.model_extra["x_switchboard"]["context_source"] == "store"
        assert types[0] == "response.created" and types[-1] == "response.completed"
        assert "response.output_text.delta" in types
        assert final is not None and final.output_text == "Streamed."


async def test_sdk_with_the_wrong_key_is_refused_on_both_transports():
    def attempts() -> tuple[Exception, Exception, str]:
        errors: list[Exception] = []
        try:
            client(info, "wrong").responses.create(model="sim", input="x")
        except openai.AuthenticationError as exc:
            errors.append(exc)
        try:
            with client(info, "wrong").responses.connect() as conn:
                conn.response.create(model="sim", input="x")
                next(iter(conn))
        except Exception as exc:  # the SDK raises its own connection error type
            errors.append(exc)
        good = client(info, "tok").responses.create(model="sim", input="x")
        return errors[0], errors[1], good.status

    async with running(token="tok") as info:
        http_err, ws_err, status = await in_thread(attempts)
        assert isinstance(http_err, openai.AuthenticationError)
        assert "401" in str(ws_err) or "invalid_api_key" in str(ws_err), repr(ws_err)
        assert status == "completed"
        assert info.server.statistics()["ws_connections_total"] == 0


@pytest.mark.parametrize("model", ["gpt-unknown"])
async def test_sdk_http_errors_are_openai_exceptions_with_code_and_param(model: str):
    def call() -> Exception:
        try:
            client(info).responses.create(model=model, input="x")
        except openai.BadRequestError as exc:
            return exc
        raise AssertionError("no error")

    async with running() as info:
        exc: Any = await in_thread(call)
        assert exc.code == "model_not_found" and exc.param == "model"
