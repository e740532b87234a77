"""Model link client: session bookkeeping (plain tests), then turns against the real sim server."""

from __future__ import annotations

import contextlib
import html
import http.server
import json
import shutil
import ssl
import subprocess
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import h11
import msgpack
import pytest
import trio
import trio.testing

from bus.ws import WsClosed, serve_ws
from modellink.chat import chat_messages, chat_tools, response_from_chat
from modellink.client import (
    RETRY_BASE_S,
    FunctionCall,
    ModelAuthError,
    ModelConnectionError,
    ModelEndpoint,
    ModelError,
    ModelRequestError,
    ModelServerError,
    fetch_server_stats,
    open_model_session,
)
from modellink.httpclient import HttpConnection, HttpError, Origin
from modellink.server import ModelServerConfig, ModelServerInfo, serve_model
from modellink.sim import SimConfig
from modellink.turns import (
    EXCERPT_CHARS,
    ContextBook,
    body_excerpt,
    context_item,
    error_from_event,
    error_from_http,
    parse_retry_after,
    read_response,
    transient,
)

# ------------------------------------------------------------------ no I/O


def _user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


def test_book_sends_only_items_the_server_has_not_seen():
    book = ContextBook()
    book.add_new([_user("a")])
    assert book.request() == ([_user("a")], None)
    book.mark_sent()
    book.complete("resp_1", [{"type": "message", "role": "assistant", "content": "b"}])
    book.add_new([_user("c")])
    items, prev = book.request()
    assert (items, prev) == ([_user("c")], "resp_1")
    assert not book.would_resend()


def test_book_keeps_one_list_and_resends_it_whole_after_the_server_forgets():
    book = ContextBook()
    ctx = book.items
    book.add_new([_user("a")])
    book.mark_sent()
    book.complete("resp_1", [_user("b")])
    book.add_new([_user("c")])
    book.forget_server()
    items, prev = book.request()
    assert items is ctx and prev is None  # the context itself, not a copy
    assert book.would_resend()
    assert [i["content"] for i in items] == ["a", "b", "c"]


def test_first_turn_is_not_a_resend():
    book = ContextBook()
    book.add_new([_user("a")])
    assert not book.would_resend()


def test_context_items_drop_ids_and_unreplayable_reasoning():
    item = {"id": "fc_1", "type": "function_call", "call_id": "c", "name": "n", "arguments": "{}"}
    assert context_item(item) == {"type": "function_call", "call_id": "c", "name": "n",
                                  "arguments": "{}"}
    assert context_item({"type": "reasoning", "id": "rs_1", "summary": []}) is None
    kept = context_item({"type": "reasoning", "encrypted_content": "x", "summary": []})
    assert kept is not None and kept["encrypted_content"] == "x"


def test_read_response_collects_text_calls_and_usage():
    resp = {
        "id": "resp_9", "status": "completed",
        "output": [
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "hi "}, {"type": "output_text",
                                                                  "text": "there"}]},
            {"type": "function_call", "call_id": "call_1", "name": "grep", "arguments": "{}"},
        ],
        "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4},
                  "output_tokens": 3},
    }
    r = read_response(resp)
    assert r.text == "hi there"
    assert r.function_calls == [FunctionCall(call_id="call_1", name="grep", arguments="{}")]
    assert (r.usage.input_tokens, r.usage.cached_tokens, r.usage.output_tokens) == (10, 4, 3)


def test_read_response_refuses_what_is_not_a_response():
    with pytest.raises(ModelConnectionError):
        read_response({"no": "id"})


def test_errors_say_whose_fault():
    def ev(status: int, code: str) -> dict[str, Any]:
        return {"type": "error", "status": status,
                "error": {"code": code, "message": "m", "param": "input[0]"}}
    assert isinstance(error_from_event(ev(401, "invalid_api_key")), ModelAuthError)
    server = error_from_event(ev(500, "server_error"))
    assert isinstance(server, ModelServerError)
    req = error_from_event(ev(400, "invalid_value"))
    assert type(req) is ModelRequestError
    assert (req.code, req.param, req.status) == ("invalid_value", "input[0]", 400)
    # OpenAI's HTTP error body has no status of its own.
    http = error_from_event({"error": {"code": "x", "message": "m"}}, http_status=404)
    assert isinstance(http, ModelRequestError) and http.status == 404


def test_origin_maps_base_urls_to_targets_and_websocket_urls():
    o = Origin.from_url("https://api.openai.com/v1/")
    assert (o.host, o.port, o.target("/responses")) == ("api.openai.com", 443, "/v1/responses")
    assert o.ws_url("/responses") == "wss://api.openai.com/v1/responses"
    local = Origin.from_url("http://127.0.0.1:8000/v1")
    assert local.ws_url("/responses") == "ws://127.0.0.1:8000/v1/responses"
    with pytest.raises(ValueError, match="http"):
        Origin.from_url("ftp://x/v1")


def test_endpoint_refuses_unknown_transport_and_encoding():
    with pytest.raises(ValueError, match="transport"):
        ModelEndpoint(base_url="http://x/v1", transport="grpc")
    with pytest.raises(ValueError, match="encoding"):
        ModelEndpoint(base_url="http://x/v1", encoding="xml")


async def test_unreachable_endpoint_is_a_connection_error():
    with trio.fail_after(5):
        # the cause is named, not a bare HandshakeError()
        with pytest.raises(ModelConnectionError, match="127.0.0.1:1.*connection refused"):
            async with open_model_session(ModelEndpoint(base_url="http://127.0.0.1:1/v1")):
                pass
        ep = ModelEndpoint(base_url="http://127.0.0.1:1/v1", transport="http")
        async with open_model_session(ep) as s:
            with pytest.raises(ModelConnectionError, match="connection refused"):
                await s.turn([_user("hi")])



# ------------------------------------------------------------------ against the sim server

TOOLS = [{"type": "function", "name": "read_file", "description": "Read a file.",
          "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                         "required": ["path"]}}]
TRANSPORTS = [
    pytest.param({"transport": "ws", "encoding": "msgpack"}, id="ws-msgpack"),
    pytest.param({"transport": "ws", "encoding": "json"}, id="ws-json"),
    pytest.param({"transport": "http"}, id="http-keepalive"),
    pytest.param({"transport": "http", "keepalive": False}, id="http-new-connection"),
    pytest.param({"transport": "http", "stream": True}, id="http-sse"),
]


async def _serve(nursery: trio.Nursery, **kw: Any) -> ModelServerInfo:
    kw.setdefault("sim", SimConfig.zero())
    info: ModelServerInfo = await nursery.start(serve_model, ModelServerConfig(
        host="127.0.0.1", port=0, **kw))
    return info


def _script(*steps: dict[str, Any]) -> dict[str, str]:
    return {"sim_script": json.dumps(list(steps))}


def _reads(n: int) -> list[dict[str, Any]]:
    return [{"call": {"name": "read_file", "arguments": {"path": f"f{i}.py"}}} for i in range(n)]


def _outputs(result: Any, text: str) -> list[dict[str, Any]]:
    return [{"type": "function_call_output", "call_id": c.call_id, "output": text}
            for c in result.function_calls]


TOOL_TEXT = "line of a file with some code in it = value(42)\n" * 60


@pytest.mark.parametrize("opts", TRANSPORTS)
async def test_function_call_conversation_over_each_transport(opts: dict[str, Any]):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url, **opts)
            meta = _script(*_reads(4), {"text": "all read"})
            results = []
            async with open_model_session(ep, instructions="be brief", tools=TOOLS,
                                          metadata=meta) as s:
                r = await s.turn([_user("read the files")])
                while r.function_calls:
                    results.append(r)
                    r = await s.turn(_outputs(r, TOOL_TEXT))
                results.append(r)
                assert len(s.items) == 1 + 4 * 2 + 1  # user, 4 x (call, output), answer
            nursery.cancel_scope.cancel()
    assert [c.arguments for r in results[:4] for c in r.function_calls] == [
        json.dumps({"path": f"f{i}.py"}, separators=(",", ":")) for i in range(4)] or [
        json.loads(c.arguments)["path"] for r in results[:4] for c in r.function_calls] == [
        f"f{i}.py" for i in range(4)]
    assert all(r.function_calls[0].name == "read_file" for r in results[:4])
    final = results[-1]
    assert (final.status, final.text, final.function_calls) == ("completed", "all read", [])
    assert not any(r.resent_full_context for r in results)
    sent = [r.bytes_sent for r in results]
    if opts["transport"] == "ws":
        # Only the new items travel: every continuation costs about the same.
        assert max(sent[1:]) < 1.2 * min(sent[1:]), sent
    else:
        # The whole context every turn: each turn sends one tool output more than the last.
        steps = [b - a for a, b in zip(sent[1:], sent[2:], strict=False)]
        assert all(st > len(TOOL_TEXT) for st in steps), sent
    assert all(r.bytes_received > 0 and r.elapsed_s >= 0 for r in results)
    # The model's prefix cache is the same for every transport: each turn finds the last one's
    # context cached (up to one 32-token block).
    for prev, r in zip(results, results[1:], strict=False):
        assert r.usage.cached_tokens >= prev.usage.input_tokens - 32


@pytest.mark.parametrize("opts", TRANSPORTS[:3])
async def test_metadata_once_sends_the_sim_script_with_a_chains_first_request_only(
        opts: dict[str, Any]):
    """With metadata_once the WebSocket sends the script on the first turn and after a resend
    only; the server carries it along the chain. HTTP (no chain) sends it every time."""
    script = _script(*_reads(3), {"text": "done"})
    script["sim_script"] += " " * 4000  # big enough to see in the byte counts
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url, **opts)
            async with open_model_session(ep, tools=TOOLS, metadata=script,
                                          metadata_once=True) as s:
                r1 = await s.turn([_user("go")])
                r2 = await s.turn(_outputs(r1, "x"))
                s._book.last_response_id = "resp_the_server_never_saw"  # force a full resend
                r3 = await s.turn(_outputs(r2, "x"))
                r4 = await s.turn(_outputs(r3, "x"))
            nursery.cancel_scope.cancel()
    assert [json.loads(r.function_calls[0].arguments)["path"] for r in (r1, r2, r3)] == [
        "f0.py", "f1.py", "f2.py"]
    assert r4.text == "done"
    sent = [r.bytes_sent for r in (r1, r2, r3, r4)]
    if opts["transport"] == "ws":
        assert r3.resent_full_context
        assert sent[0] > 4000 and sent[1] < 2000 and sent[2] > 4000 and sent[3] < 2000, sent
        assert r2.bytes_received < 4000 < r1.bytes_received  # nor is it echoed back
    else:
        assert min(sent) > 4000, sent


async def test_connection_age_limit_resends_the_full_context_once(autojump_clock: Any):
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery, max_connection_age_s=30.0)
            ep = ModelEndpoint(base_url=info.base_url)
            meta = _script(*_reads(3), {"text": "done"})
            async with open_model_session(ep, tools=TOOLS, metadata=meta) as s:
                r1 = await s.turn([_user("go")])
                await trio.sleep(31)  # the server says the age limit and closes with 1001
                r2 = await s.turn(_outputs(r1, TOOL_TEXT))
                r3 = await s.turn(_outputs(r2, TOOL_TEXT))
                r4 = await s.turn(_outputs(r3, TOOL_TEXT))
                stats = s.statistics()
            server = await fetch_server_stats(info.base_url)
            nursery.cancel_scope.cancel()
    assert [r.resent_full_context for r in (r1, r2, r3, r4)] == [False, True, False, False]
    # The resent turn carries the whole context; the next one is a delta again.
    assert r2.bytes_sent > r1.bytes_sent + len(TOOL_TEXT) and r3.bytes_sent < r2.bytes_sent
    assert [json.loads(r.function_calls[0].arguments)["path"] for r in (r1, r2, r3)] == [
        "f0.py", "f1.py", "f2.py"]
    assert r4.text == "done"
    assert stats.connects == 2 and stats.resends == 1
    assert server["ws_connections_total"] == 2


async def test_cache_miss_resends_the_full_context_and_carries_on():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url, encoding="json")
            meta = _script(*_reads(2), {"text": "done"})
            async with open_model_session(ep, tools=TOOLS, metadata=meta) as s:
                r1 = await s.turn([_user("go")])
                s._book.last_response_id = "resp_the_server_never_saw"  # force a miss
                r2 = await s.turn(_outputs(r1, TOOL_TEXT))
                r3 = await s.turn(_outputs(r2, TOOL_TEXT))
                assert s.statistics().connects == 1  # a miss needs no new connection
            nursery.cancel_scope.cancel()
    assert (r2.resent_full_context, r3.resent_full_context) == (True, False)
    assert json.loads(r2.function_calls[0].arguments)["path"] == "f1.py"
    assert r3.text == "done"


async def test_a_dropped_connection_is_redialled_and_the_context_resent():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url)
            async with open_model_session(ep, tools=TOOLS,
                                          metadata=_script(*_reads(1), {"text": "ok"})) as s:
                r1 = await s.turn([_user("go")])
                assert s._link is not None
                await s._link.conn.aclose()  # the network drops the link between turns
                r2 = await s.turn(_outputs(r1, TOOL_TEXT))
            nursery.cancel_scope.cancel()
    assert r2.resent_full_context and r2.text == "ok"


LONG = {"text": "a long answer", "output_tokens": 5000}


@pytest.mark.parametrize("opts", TRANSPORTS)
async def test_cancelling_a_turn_stops_generation_and_the_session_goes_on(
        opts: dict[str, Any], autojump_clock: Any):
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            # 1 ms per output token: the long answer would take 5 s of model time.
            info = await _serve(nursery, sim=SimConfig(ttft_s=0.01))
            ep = ModelEndpoint(base_url=info.base_url, **opts)
            meta = _script(*_reads(1), LONG, {"text": "short"})
            async with open_model_session(ep, tools=TOOLS, metadata=meta) as s:
                r1 = await s.turn([_user("go")])
                t0 = trio.current_time()
                with trio.move_on_after(1.0) as scope:
                    await s.turn(_outputs(r1, TOOL_TEXT))
                assert scope.cancelled_caught
                await trio.sleep(0.1)
                stats = await fetch_server_stats(info.base_url)
                assert stats["responses_cancelled"] == 1 and stats["in_flight"] == 0
                # Generation stopped at the cancel, not after 5,000 tokens.
                assert stats["output_tokens"] < 2000
                # The next turn starts from the last completed response: the tool output is
                # still in the context, the partial answer is not, so the long step comes again.
                r2 = await s.turn([])
                assert trio.current_time() - t0 >= 5.0
                assert r2.status == "completed" and r2.usage.output_tokens >= 5000
                # After a cancel the server holds the last completed response again: a delta.
                assert not r2.resent_full_context
                r3 = await s.turn([_user("and?")])
                assert r3.text == "short"
                assert [i.get("type") for i in s.items] == [
                    "message", "function_call", "function_call_output", "message", "message",
                    "message"]
                assert s.statistics().cancelled_turns == 1
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("opts", TRANSPORTS[:3])
async def test_wrong_or_missing_key_is_an_auth_error(opts: dict[str, Any]):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery, token="sesame")
            for key in (None, "wrong"):
                ep = ModelEndpoint(base_url=info.base_url, api_key=key, **opts)
                with pytest.raises(ModelAuthError):
                    async with open_model_session(ep) as s:
                        await s.turn([_user("hi")])
            ep = ModelEndpoint(base_url=info.base_url, api_key="sesame", **opts)
            async with open_model_session(ep) as s:
                assert (await s.turn([_user("hi")])).status == "completed"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("opts", TRANSPORTS[:3])
async def test_a_refused_request_names_the_field(opts: dict[str, Any]):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url, **opts)
            async with open_model_session(ep) as s:
                with pytest.raises(ModelRequestError) as err:
                    await s.turn([{"type": "message", "role": "wizard", "content": "x"}])
                assert err.value.code == "invalid_value" and err.value.param == "input[0].role"
            bad_model = ModelEndpoint(base_url=info.base_url, model="gpt-9", **opts)
            async with open_model_session(bad_model) as s:
                with pytest.raises(ModelRequestError, match="model_not_found"):
                    await s.turn([_user("x")])
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ chat completions transport


def test_chat_messages_map_items_tools_and_parallel_calls():
    items = [
        _user("hi"),
        {"type": "message", "role": "assistant", "content": [{"type": "output_text",
                                                              "text": "let me look"}]},
        {"type": "function_call", "call_id": "c1", "name": "a", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "b", "arguments": "{\"x\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "A"},
        {"type": "function_call_output", "call_id": "c2", "output": "B"},
    ]
    assert chat_messages("be brief", items) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "let me look", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "b", "arguments": "{\"x\":1}"}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "A"},
        {"role": "tool", "tool_call_id": "c2", "content": "B"},
    ]
    assert chat_tools(TOOLS) == [{"type": "function", "function": {
        "name": "read_file", "description": "Read a file.", "parameters": TOOLS[0]["parameters"]}}]


def test_chat_completion_becomes_a_response():
    resp = response_from_chat({
        "id": "chatcmpl-1", "choices": [{"finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [
                {"id": "call_9", "type": "function",
                 "function": {"name": "read_file", "arguments": "{\"path\":\"a\"}"}}]}}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 7,
                  "prompt_tokens_details": {"cached_tokens": 32}}})
    r = read_response(resp)
    assert r.function_calls == [FunctionCall(call_id="call_9", name="read_file",
                                             arguments="{\"path\":\"a\"}")]
    assert (r.usage.input_tokens, r.usage.cached_tokens, r.usage.output_tokens) == (50, 32, 7)
    with pytest.raises(ModelConnectionError):
        response_from_chat({"object": "error"})


async def _serve_fake_chat(nursery: trio.Nursery, seen: list[dict[str, Any]]) -> str:
    """A llama.cpp-style server over real sockets: POST /v1/chat/completions only. It calls
    read_file until it has seen a tool result, then answers with that result's text."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            body = b""
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    return
                elif isinstance(ev, h11.Request):
                    assert ev.target == b"/v1/chat/completions"
            req = json.loads(body)
            seen.append(req)
            last = req["messages"][-1]
            msg: dict[str, Any] = {"role": "assistant", "content": None}
            if last["role"] == "tool":
                msg["content"] = "read: " + last["content"]
            else:
                msg["tool_calls"] = [{"id": f"call_{len(seen)}", "type": "function",
                                      "function": {"name": "read_file",
                                                   "arguments": "{\"path\":\"x\"}"}}]
            out = json.dumps({"id": f"chatcmpl-{len(seen)}", "choices": [
                {"index": 0, "finish_reason": "stop", "message": msg}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 2}}).encode()
            await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                ("Content-Type", "application/json"), ("Content-Length", str(len(out)))]))
                + conn.send(h11.Data(data=out)) + conn.send(h11.EndOfMessage()))
            conn.start_next_cycle()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1"


async def test_chat_transport_runs_a_tool_conversation_on_one_connection():
    seen: list[dict[str, Any]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            base = await _serve_fake_chat(nursery, seen)
            ep = ModelEndpoint(base_url=base, model="llama", transport="chat")
            async with open_model_session(ep, instructions="sys", tools=TOOLS) as s:
                r1 = await s.turn([_user("go")])
                r2 = await s.turn(_outputs(r1, "file text"))
                assert s.statistics().connects == 1  # kept alive
            nursery.cancel_scope.cancel()
    assert r1.function_calls[0].name == "read_file" and r2.text == "read: file text"
    assert [m["role"] for m in seen[1]["messages"]] == ["system", "user", "assistant", "tool"]
    assert seen[1]["tools"][0]["function"]["name"] == "read_file"


# ------------------------------------------------------------------ a hostile or broken server


async def _serve_ws_fake(nursery: trio.Nursery, reply: Any) -> str:
    """A WebSocket endpoint that answers each client frame with `await reply(ws, frame)`."""

    async def handler(request: Any) -> None:
        ws = await request.accept()
        try:
            while True:
                await reply(ws, await ws.get_message())
        except WsClosed:
            pass

    host, port = await nursery.start(serve_ws, handler, "127.0.0.1", 0)
    return f"http://{host}:{port}/v1"


async def _garble(ws: Any, frame: Any) -> None:
    await ws.send_message(b"\xc1 not msgpack")


async def _hang_up(ws: Any, frame: Any) -> None:
    await ws.aclose(1011, "boom")


async def _fail(ws: Any, frame: Any) -> None:
    await ws.send_message(msgpack.packb({"type": "error", "status": 500, "error": {
        "type": "server_error", "code": "server_error", "message": "overloaded"}}))


@pytest.mark.parametrize(("reply", "error", "match"), [
    (_garble, ModelConnectionError, "bad event"),
    # The turn, then its one resend on a new connection, both hung up on.
    (_hang_up, ModelConnectionError, "again after a full resend"),
    (_fail, ModelServerError, "overloaded"),
], ids=["garbled-event", "breaks-after-resend", "server-error-event"])
async def test_a_broken_server_gives_the_error_that_says_whose_fault(
        reply: Any, error: type[Exception], match: str, autojump_clock: Any):
    frames: list[Any] = []

    async def record(ws: Any, frame: Any) -> None:
        frames.append(frame)
        await reply(ws, frame)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            base = await _serve_ws_fake(nursery, record)
            async with open_model_session(ModelEndpoint(base_url=base)) as s:
                with pytest.raises(error, match=match):
                    await s.turn([_user("hi")])
            nursery.cancel_scope.cancel()
    # a hang-up is resent once on a new connection; a server error is a transient refusal,
    # tried again ModelEndpoint.retries times (after backoff) before it reaches the caller
    assert len(frames) == {_hang_up: 2, _fail: 1 + ModelEndpoint(base_url="x").retries}.get(
        reply, 1)


# ------------------------------------------------------------------ TLS


@pytest.fixture
def tls_pair(tmp_path: Any) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh self-signed certificate for 127.0.0.1, and a client
    context that trusts it (made with the openssl CLI; skipped where it is missing)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


async def test_https_requests_verify_the_certificate(tls_pair: Any):
    server_ctx, client_ctx = tls_pair

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        conn = h11.Connection(h11.SERVER)
        while not isinstance(ev := conn.next_event(), h11.EndOfMessage):
            if ev is h11.NEED_DATA:
                conn.receive_data(bytes(await tls.receive_some(65536)))
        out = b'{"ok":true}'
        await tls.send_all(conn.send(h11.Response(status_code=200, headers=[
            ("Content-Length", str(len(out)))])) + conn.send(h11.Data(data=out))
            + conn.send(h11.EndOfMessage()))
        await tls.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
            origin = Origin.from_url(f"https://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1")
            conn = await HttpConnection.connect(origin, ssl_context=client_ctx)
            head = await conn.send_request("GET", "/x", headers=[])
            assert (head.status, await conn.read_body()) == (200, b'{"ok":true}')
            await conn.aclose()
            with pytest.raises(HttpError, match="certificate|connect"):
                await HttpConnection.connect(origin)  # the system CAs do not know it
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ the connection pool


async def test_a_closed_sessions_websocket_is_reused_and_starts_with_the_full_context():
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url)
            meta = _script(*_reads(2), {"text": "done"})
            async with open_model_session(ep, tools=TOOLS, metadata=meta) as s1:
                a1 = await s1.turn([_user("secret of session one")])
                await s1.turn(_outputs(a1, TOOL_TEXT))
                assert s1.statistics().connects == 1
            async with open_model_session(ep, tools=TOOLS, metadata=meta) as s2:
                b1 = await s2.turn([_user("session two")])
                b2 = await s2.turn(_outputs(b1, TOOL_TEXT))
                st2 = s2.statistics()
            async with open_model_session(ep, tools=TOOLS, metadata=meta) as fresh:
                assert fresh.statistics().reused == 1
                c1 = await fresh.turn([_user("session two")])
            server = await fetch_server_stats(info.base_url)
            nursery.cancel_scope.cancel()
    assert (st2.connects, st2.reused) == (0, 1)
    assert server["ws_connections_total"] == 1
    # Session two's first turn carried its own context only (no previous_response_id): the
    # same tokens as a third session's first turn, and nothing of session one.
    assert b1.usage.input_tokens == c1.usage.input_tokens
    assert [json.loads(r.function_calls[0].arguments)["path"] for r in (b1, b2)] == [
        "f0.py", "f1.py"]
    assert not b1.resent_full_context and not b2.resent_full_context


async def test_a_session_never_continues_the_previous_sessions_response_on_a_reused_link():
    sent: list[dict[str, Any]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url, encoding="json")
            for n in range(2):
                async with open_model_session(ep, tools=TOOLS) as s:
                    real_send = s._send

                    async def spy(link: Any, event: dict[str, Any], timeout_s: float,
                                  real_send: Any = real_send) -> None:
                        sent.append(dict(event, input=list(event["input"])))  # a snapshot
                        await real_send(link, event, timeout_s)

                    s._send = spy  # type: ignore[method-assign]
                    await s.turn([_user(f"session {n}")])
                    await s.turn([_user("more")])
            nursery.cancel_scope.cancel()
    assert [e.get("previous_response_id") is None for e in sent] == [True, False, True, False]
    assert sent[2]["input"] == [_user("session 1")]


@pytest.mark.parametrize("how", ["cancelled turn", "server closed", "other encoding",
                                 "not reusable"])
async def test_an_unhealthy_or_foreign_websocket_is_never_reused(how: str, autojump_clock: Any):
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery, sim=SimConfig(ttft_s=0.01),
                                max_connection_age_s=30.0)
            ep = ModelEndpoint(base_url=info.base_url,
                               reuse_connections=how != "not reusable")
            async with open_model_session(ep, metadata=_script(LONG)) as s:
                if how == "cancelled turn":  # leaves a cancelled response draining
                    with trio.move_on_after(0.5):
                        await s.turn([_user("go")])
                else:
                    await s.turn([_user("go")])
            if how == "server closed":
                await trio.sleep(31)  # the age limit: the server closes the idle connection
            ep2 = attrs.evolve(ep, encoding="json") if how == "other encoding" else ep
            async with open_model_session(ep2) as s2:
                await s2.turn([_user("hello")])
                st = s2.statistics()
            nursery.cancel_scope.cancel()
    assert (st.connects, st.reused) == (1, 0)


async def _sessions_held_together(ep: ModelEndpoint, n: int, *, steps_apart: int = 0,
                                  while_held: Callable[[], None] | None = None) -> None:
    """n sessions open at once (the i-th after i * steps_apart scheduler steps), each after one
    turn; `while_held` runs once all are open; then all end together."""
    release = trio.Event()

    async def one(steps: int) -> None:
        for _ in range(steps):
            await trio.lowlevel.checkpoint()
        async with open_model_session(ep) as s:
            await s.turn([_user("hi")])
            await release.wait()

    async with trio.open_nursery() as sessions:
        for i in range(n):
            sessions.start_soon(one, i * steps_apart)
        await trio.sleep(1)
        if while_held is not None:
            while_held()
        release.set()


def _pool_counts() -> tuple[int, int, int]:
    """This run's WebSocket pool: links held by sessions, the most held at once, links idle."""
    from modellink import client as client_mod

    pool = client_mod._POOL.get()
    assert pool is not None
    return pool._in_use, pool._peak, pool._count


async def test_pool_keeps_as_many_idle_websockets_as_were_held_at_once_until_idle_timeout(
        autojump_clock: Any):
    from modellink import client as client_mod

    with trio.fail_after(1000):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url)
            n = client_mod.POOL_MAX_IDLE + 3

            def all_open() -> None:
                assert info.server.statistics()["ws_connections_open"] == n

            async def wave() -> None:
                await _sessions_held_together(ep, n, while_held=all_open)

            await wave()
            await trio.sleep(1)
            # more than the POOL_MAX_IDLE floor: the next wave of n sessions connects nothing
            assert info.server.statistics()["ws_connections_open"] == n
            await wave()
            assert info.server.statistics()["ws_connections_open"] == n
            assert info.server.statistics()["ws_connections_total"] == n
            await trio.sleep(client_mod.POOL_IDLE_TIMEOUT_S + 1)
            assert info.server.statistics()["ws_connections_open"] == 0
            nursery.cancel_scope.cancel()


async def test_pooled_websockets_are_counted_back_when_sessions_end(
        autojump_clock: Any):
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url)
            for _ in range(3):  # one at a time: one link, lent and returned three times
                async with open_model_session(ep) as s:
                    await s.turn([_user("hi")])
            assert _pool_counts() == (0, 1, 1)
            nursery.cancel_scope.cancel()


async def test_the_pool_is_started_once_however_many_ask_while_it_starts():
    from modellink import client as client_mod

    got = []

    async def ask(steps: int) -> None:
        for _ in range(steps):
            await trio.lowlevel.checkpoint()
        got.append(await client_mod._pool())

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(ask, i)
    assert len(got) == 8 and got[0] is not None
    assert all(p is got[0] for p in got)


async def test_sessions_opened_while_the_pool_starts_all_share_that_one_pool(
        autojump_clock: Any):
    # A worker's first sessions open a step or two apart, before the pool's system task runs:
    # each started a pool of its own, was counted as held in the one it got and gave its link
    # to the last one, whose peak (its own sessions only) then made it close links given back.
    from modellink import client as client_mod

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url)
            n = client_mod.POOL_MAX_IDLE + 8
            await _sessions_held_together(ep, n, steps_apart=1)
            await trio.sleep(1)
            assert _pool_counts() == (0, n, n)
            stats = info.server.statistics()
            assert (stats["ws_connections_open"], stats["ws_connections_total"]) == (n, n)
            nursery.cancel_scope.cancel()


async def test_sessions_dialling_together_keep_every_link_though_they_end_apart(
        autojump_clock: Any):
    # A worker's first sessions dial at once; the first connected finish their turn and give
    # their link back while the others still dial. A session is held from when it asks for a
    # link: counted only once connected, the pool's peak was lower than the links it got back
    # and it closed the difference, which the next sessions then dialled again.
    from modellink import client as client_mod

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url)
            n = client_mod.POOL_MAX_IDLE * 4

            async def one() -> None:
                async with open_model_session(ep) as s:
                    await s.turn([_user("hi")])

            for _ in range(3):
                async with trio.open_nursery() as sessions:
                    for _ in range(n):
                        sessions.start_soon(one)
                stats = info.server.statistics()
                assert stats["ws_connections_total"] == stats["ws_connections_open"]
            nursery.cancel_scope.cancel()


async def test_giving_a_link_back_wakes_the_reaper_only_when_nothing_else_was_idle(
        autojump_clock: Any):
    # The reaper times the oldest idle link; a link given back is idle since now, so it cannot
    # change that deadline: giving it must not make the reaper scan every idle link again.
    from modellink import client as client_mod

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url)
            async with open_model_session(ep) as s:
                await s.turn([_user("hi")])
            await trio.sleep(1)  # the reaper now waits for the idle link's timeout
            pool = client_mod._POOL.get()
            assert pool is not None
            before = pool.reaper_passes
            for _ in range(20):
                async with open_model_session(ep) as s:
                    await s.turn([_user("hi")])
            await trio.sleep(1)
            assert pool.reaper_passes == before
            await trio.sleep(client_mod.POOL_IDLE_TIMEOUT_S + 1)  # and it still reaps on time
            assert info.server.statistics()["ws_connections_open"] == 0
            nursery.cancel_scope.cancel()


async def test_a_pooled_link_asks_its_socket_for_unread_bytes_once_per_session(
        autojump_clock: Any, monkeypatch: pytest.MonkeyPatch):
    # take() must look (the server may have closed the idle link); give(), right after the
    # session read its last response, need not: whatever arrives later, take() sees.
    from bus import ws as ws_mod

    probes = []
    real_probe = ws_mod._readable_now

    def counting_probe(fd: int) -> bool:  # the socket probe: one poll() syscall
        probes.append(1)
        return real_probe(fd)

    monkeypatch.setattr(ws_mod, "_readable_now", counting_probe)
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url)
            for _ in range(5):
                async with open_model_session(ep) as s:
                    await s.turn([_user("hi")])
                    st = s.statistics()
            nursery.cancel_scope.cancel()
    assert st.reused == 1 and len(probes) == 4  # the first session opened its link


@pytest.mark.parametrize("keepalive", [True, False])
async def test_kept_alive_http_connections_are_pooled_like_websockets(keepalive: bool):
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await _serve(nursery)
            ep = ModelEndpoint(base_url=info.base_url, transport="http", keepalive=keepalive)
            stats = []
            for n in range(2):
                async with open_model_session(ep) as s:
                    r = await s.turn([_user(f"session {n}")])
                    assert r.status == "completed"
                    stats.append(s.statistics())
            nursery.cancel_scope.cancel()
    if keepalive:
        assert [(st.connects, st.reused) for st in stats] == [(1, 0), (0, 1)]
    else:
        assert [(st.connects, st.reused) for st in stats] == [(1, 0), (1, 0)]


# ------------------------------------------------------------------ slow or foreign servers


async def test_a_ws_session_to_a_port_that_never_answers_the_upgrade_fails_at_connect_timeout(
        autojump_clock: Any):
    heard: list[bytes] = []

    async def accept_and_say_nothing(stream: trio.SocketStream) -> None:
        heard.append(await stream.receive_some())
        await trio.sleep_forever()

    with trio.fail_after(600):  # the task timeout the session used to run into
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, accept_and_say_nothing, 0,
                                                    host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            ep = ModelEndpoint(base_url=f"http://127.0.0.1:{port}/v1", transport="ws",
                               connect_timeout_s=3)
            t0 = trio.current_time()
            with pytest.raises(ModelConnectionError) as caught:
                async with open_model_session(ep) as s:
                    await s.turn([_user("hi")])
            assert trio.current_time() - t0 == pytest.approx(3.0)
            nursery.cancel_scope.cancel()
    assert b"upgrade: websocket" in heard[0].lower()
    assert str(caught.value).startswith(
        f"cannot open the model WebSocket ws://127.0.0.1:{port}/v1/responses: "
        "timed out connecting after 3s")
    assert "did not answer the WebSocket upgrade" in str(caught.value)


async def _serve_answer(nursery: trio.Nursery, status: int, ctype: str, body: bytes,
                        targets: list[bytes]) -> str:
    """An HTTP server over real sockets that answers every request with one fixed response
    (an HTML error page, a framework's JSON 404 ...); `targets` records the paths asked for."""
    return await _serve_answers(nursery, [(status, [("Content-Type", ctype)], body)], targets)


async def _serve_answers(nursery: trio.Nursery,
                         answers: list[tuple[int, list[tuple[str, str]], bytes]],
                         targets: list[bytes]) -> str:
    """As _serve_answer, with the n-th request answered by answers[n] (the last one again
    once they run out): (status, headers, body)."""

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(ev, h11.Request):
                targets.append(ev.target)
            elif isinstance(ev, h11.EndOfMessage):
                status, headers, body = answers[min(len(targets), len(answers)) - 1]
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
                    *headers, ("Content-Length", str(len(body))),
                    ("Connection", "close")])) + conn.send(h11.Data(data=body))
                    + conn.send(h11.EndOfMessage()))
                return
            elif isinstance(ev, h11.ConnectionClosed):
                return

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/v1"


async def _http_turn_error(status: int, ctype: str, body: bytes, *, transport: str = "http"
                           ) -> tuple[str, Exception]:
    targets: list[bytes] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            base = await _serve_answer(nursery, status, ctype, body, targets)
            async with open_model_session(ModelEndpoint(base_url=base, transport=transport,
                                                        encoding="json")) as s:
                with pytest.raises(ModelRequestError) as caught:
                    await s.turn([_user("hi")])
            nursery.cancel_scope.cancel()
    assert len(targets) == 1
    return base, caught.value


# What `python -m http.server` answers to a POST.
HTML_501 = (http.server.DEFAULT_ERROR_MESSAGE % {
    "code": 501, "message": html.escape("Unsupported method ('POST')"),
    "explain": "Server does not support this operation."}).encode()


async def test_an_html_error_page_is_named_by_request_and_status_not_printed_whole():
    base, err = await _http_turn_error(501, "text/html;charset=utf-8", HTML_501)
    assert type(err) is ModelServerError and err.status == 501
    assert str(err) == f"POST {base}/responses: error [501]: Error response"


async def test_a_bare_404_on_the_responses_path_says_to_try_the_chat_transport():
    base, err = await _http_turn_error(404, "application/json", b'{"detail":"Not Found"}')
    assert type(err) is ModelRequestError and err.status == 404
    assert str(err) == (
        f"POST {base}/responses: error [404]: Not Found; the server may not implement the "
        f"Responses API: transport = \"chat\" (in the graph's [model] table) uses "
        f"{base}/chat/completions")


async def test_a_404_on_the_chat_path_names_it_without_the_responses_hint():
    base, err = await _http_turn_error(404, "text/plain", b"  no such\n\n   route  ",
                                       transport="chat")
    assert str(err) == f"POST {base}/chat/completions: error [404]: no such route"


async def test_a_providers_json_error_keeps_its_code_message_and_param():
    body = json.dumps({"error": {"message": "The model `x` does not exist", "type":
                                 "invalid_request_error", "param": "model",
                                 "code": "model_not_found"}}).encode()
    base, err = await _http_turn_error(404, "application/json", body)
    assert (err.code, err.param, err.message) == (
        "model_not_found", "model", "The model `x` does not exist")
    # As before, after the request that failed; a Responses server's own 404: no hint.
    assert str(err) == (f"POST {base}/responses: model_not_found [404]: "
                        "The model `x` does not exist (param model)")


def test_body_excerpt_is_one_short_line():
    assert body_excerpt(b"<html><head><title>\n  502 Bad\n Gateway</title></head></html>") \
        == "502 Bad Gateway"
    assert body_excerpt(b"<html><body><h1>Oops</h1>\n<p>it &amp; broke</p></body></html>") \
        == "Oops it & broke"
    long = body_excerpt(b"word " * 100)
    assert len(long) == EXCERPT_CHARS and long.endswith("...") and "\n" not in long
    assert body_excerpt(b"") == "(empty body)"


def test_http_errors_classify_by_status_and_name_the_request():
    auth = error_from_http("POST http://h/v1/responses", 401, b"<title>401</title>")
    assert isinstance(auth, ModelAuthError) and "POST http://h/v1/responses" in str(auth)
    assert type(error_from_http("POST u", 405, b"", chat_url="c")) is ModelRequestError
    assert "transport = \"chat\"" in str(error_from_http("POST u", 405, b"", chat_url="c"))
    assert "transport" not in str(error_from_http("POST u", 400, b"bad", chat_url="c"))


async def test_https_to_a_plain_http_server_says_to_use_http():
    """An https:// URL for a server that speaks plain HTTP failed with a bare
    '[SSL: WRONG_VERSION_NUMBER] wrong version number'."""
    async def plain_http(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, plain_http, 0,
                                                    host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(HttpError) as caught:
                await HttpConnection.connect(Origin.from_url(f"https://127.0.0.1:{port}/v1"))
            nursery.cancel_scope.cancel()
    said = str(caught.value)
    assert f"cannot connect to 127.0.0.1:{port}: the server did not answer in TLS (" in said
    assert said.endswith("use http:// (ws://) instead of https:// (wss://)")


@pytest.mark.parametrize("url,body,says,not_says", [
    # llama.cpp's own 404 for a path it does not serve: an error object, yet the hint applies
    ("http://h:8080/v1", b'{"error":{"code":404,"message":"File Not Found",'
     b'"type":"not_found_error"}}', 'transport = "chat"', "GET /v1/models"),
    # vLLM / SGLang: the route exists, the model name does not: no chat hint
    ("http://h:8000/v1", b'{"object":"error","message":"The model `default` does not exist.",'
     b'"type":"NotFoundError","code":404}', "GET /v1/models lists them", 'transport = "chat"'),
    # a base URL without /v1: the usual slip, and the chat path would 404 as well
    ("http://h:8000", b'{"detail":"Not Found"}', 'usually "http://HOST:PORT/v1"',
     "GET /v1/models"),
])
def test_a_404_from_the_responses_path_says_what_to_change(url, body, says, not_says):
    from modellink.turns import error_from_http

    err = error_from_http(f"POST {url}/responses", 404, body,
                          chat_url=f"{url}/chat/completions")
    assert says in str(err) and not_says not in str(err), str(err)


# ------------------------------------------------------------------ rate limits, overload

JSON = [("Content-Type", "application/json")]
DONE = json.dumps({"id": "resp_1", "object": "response", "status": "completed", "output": [
    {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
     "content": [{"type": "output_text", "text": "at last", "annotations": []}]}],
    "usage": {"input_tokens": 5, "output_tokens": 2}}).encode()


def _err_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"type": "requests", "code": code, "message": message}}).encode()


async def _http_turn(answers: list[tuple[int, list[tuple[str, str]], bytes]], **endpoint: Any
                     ) -> tuple[list[bytes], float, Any]:
    """One HTTP turn against `answers`: (paths asked, trio seconds it took, TurnResult or the
    ModelError it raised)."""
    targets: list[bytes] = []
    async with trio.open_nursery() as nursery:
        base = await _serve_answers(nursery, answers, targets)
        async with open_model_session(ModelEndpoint(base_url=base, transport="http",
                                                    encoding="json", **endpoint)) as s:
            t0 = trio.current_time()
            try:
                out: Any = await s.turn([_user("hi")])
            except ModelError as exc:
                out = exc
            took = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    return targets, took, out


async def test_a_rate_limited_turn_waits_as_the_server_says_and_is_sent_again(
        autojump_clock: Any):
    """A 429 with Retry-After, then a 503 without: the turn waits 7 s, then backs off, and the
    third request's answer is the turn's; the caller never sees the refusals."""
    targets, took, out = await _http_turn([
        (429, [*JSON, ("Retry-After", "7")], _err_body("rate_limit_exceeded", "slow down")),
        (503, [("Content-Type", "text/html")], b"<title>Service Unavailable</title>"),
        (200, JSON, DONE)])
    assert out.text == "at last" and len(targets) == 3
    assert 7 + 0.75 * RETRY_BASE_S * 2 <= took <= 7 + 1.25 * RETRY_BASE_S * 2 + 1


async def test_retry_after_ms_is_read_and_retries_can_be_turned_off(autojump_clock: Any):
    targets, took, out = await _http_turn([
        (429, [*JSON, ("retry-after-ms", "1500")], _err_body("rate_limit_exceeded", "wait")),
        (200, JSON, DONE)])
    assert out.text == "at last" and 1.5 <= took < 2.5
    targets, took, out = await _http_turn(
        [(429, JSON, _err_body("rate_limit_exceeded", "wait"))], retries=0)
    assert isinstance(out, ModelRequestError) and out.status == 429 and len(targets) == 1


@pytest.mark.parametrize(("status", "headers", "body", "why"), [
    (429, JSON, _err_body("insufficient_quota", "You exceeded your current quota"),
     "an exhausted quota does not pass later"),
    (429, [*JSON, ("Retry-After", "3600")], _err_body("rate_limit_exceeded", "next hour"),
     "a wait past RETRY_MAX_S fails now, saying so"),
    (400, JSON, _err_body("invalid_value", "bad input"), "the request's own fault"),
    (501, [("Content-Type", "text/html")], b"<title>Not Implemented</title>", "never will"),
], ids=["quota", "long-retry-after", "400", "501"])
async def test_refusals_that_would_come_again_fail_the_turn_at_once(
        status: int, headers: list[tuple[str, str]], body: bytes, why: str,
        autojump_clock: Any):
    targets, took, out = await _http_turn([(status, headers, body), (200, JSON, DONE)])
    assert isinstance(out, ModelRequestError) and out.status == status, why
    assert len(targets) == 1 and took < 1, why
    if status == 429 and out.code == "rate_limit_exceeded":
        assert out.retry_after_s == 3600  # what the caller needs to decide


async def test_a_websocket_turn_refused_for_now_is_sent_again_on_the_same_connection(
        autojump_clock: Any):
    """An error event (rate_limit_exceeded, no status) then the answer: two frames, one
    connection, and the session's statistics count the retry."""
    frames: list[Any] = []

    async def reply(ws: Any, frame: Any) -> None:
        frames.append(msgpack.unpackb(frame))
        if len(frames) == 1:
            await ws.send_message(msgpack.packb({"type": "error", "error": {
                "type": "requests", "code": "rate_limit_exceeded", "message": "slow down"}}))
        else:
            await ws.send_message(msgpack.packb({"type": "response.completed", "response":
                                                 json.loads(DONE)}))

    async with trio.open_nursery() as nursery:
        base = await _serve_ws_fake(nursery, reply)
        async with open_model_session(ModelEndpoint(base_url=base)) as s:
            out = await s.turn([_user("hi")])
            stats = s.statistics()
        nursery.cancel_scope.cancel()
    assert out.text == "at last"
    assert [f["input"] for f in frames] == [[_user("hi")]] * 2  # the same request again
    assert (stats.connects, stats.retries) == (1, 1)


async def test_a_websocket_upgrade_refused_with_503_is_tried_again(autojump_clock: Any):
    seen: list[float] = []

    async def handler(request: Any) -> None:
        seen.append(trio.current_time())
        if len(seen) == 1:
            await request.reject(503, extra_headers=[(b"Retry-After", b"4")], body=b"busy")
            return
        ws = await request.accept()
        with contextlib.suppress(WsClosed):
            await ws.get_message()
            await ws.send_message(msgpack.packb({"type": "response.completed", "response":
                                                 json.loads(DONE)}))
            await ws.get_message()

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_ws, handler, "127.0.0.1", 0)
        async with open_model_session(ModelEndpoint(base_url=f"http://{host}:{port}/v1")) as s:
            out = await s.turn([_user("hi")])
        nursery.cancel_scope.cancel()
    assert out.text == "at last" and len(seen) == 2 and seen[1] - seen[0] >= 4


def test_retry_after_is_read_in_milliseconds_seconds_or_as_a_date():
    assert parse_retry_after(b"250", b"9", now=0) == 0.25  # OpenAI's ms header wins
    assert parse_retry_after(None, b" 12 ", now=0) == 12
    assert parse_retry_after(None, b"Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10
    assert parse_retry_after(None, b"Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490) == 0
    for bad in (b"soon", b"-3", b"nan", b"inf"):
        assert parse_retry_after(None, bad, now=0) is None, bad
    assert parse_retry_after(b"x", None, now=0) is None


def test_which_refusals_are_transient():
    assert transient(ModelRequestError("x", status=429, code="rate_limit_exceeded"))
    assert transient(ModelServerError("x", status=502))
    assert transient(ModelServerError("x", code="server_error"))  # an error event, no status
    assert not transient(ModelRequestError("x", status=429, code="insufficient_quota"))
    assert not transient(ModelServerError("x", status=501))
    assert not transient(ModelRequestError("x", status=400))
    assert not transient(ModelConnectionError("reset"))


async def test_a_websocket_upgrade_refused_with_404_is_the_requests_fault_and_not_tried_again(
        autojump_clock: Any):
    """A server with no WebSocket at that path: one dial, and an error the worker will not
    retry either (a 4xx), which says to use the HTTP transport."""
    seen: list[float] = []

    async def handler(request: Any) -> None:
        seen.append(trio.current_time())
        await request.reject(404, body=b"Not Found")

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(serve_ws, handler, "127.0.0.1", 0)
        with pytest.raises(ModelRequestError) as caught:
            async with open_model_session(ModelEndpoint(base_url=f"http://{host}:{port}/v1")):
                pass
        nursery.cancel_scope.cancel()
    err = caught.value
    assert type(err) is ModelRequestError and err.status == 404 and len(seen) == 1
    assert str(err) == (f"GET ws://{host}:{port}/v1/responses: error [404]: refused the "
                        "WebSocket upgrade (Not Found); if the server has no WebSocket mode "
                        'use transport "http"')
    from agents.worker import retryable

    assert not retryable(err)
