"""Model server over real sockets: WebSocket (JSON, msgpack) and HTTP (JSON, SSE) Responses,
the connection cache, cancellation, limits, auth and hostile input."""

from __future__ import annotations

import fcntl
import json
import random
import struct
import termios
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import pytest
import trio

import modellink.server as server_mod
from bus import ws as ws_module
from bus.ws import (
    WsClosed,
    WsConnection,
    WsRejected,
    open_ws,
    queued_messages,
    send_messages,
    serve_ws,
)
from modellink import protocol as p
from modellink.server import ModelServerConfig, ModelServerInfo, serve_model
from modellink.sim import SimConfig

TOOLS = [{"type": "function", "name": "read_file", "parameters": {"type": "object"}}]
CALL_THEN_TEXT = json.dumps([
    {"call": {"name": "read_file", "arguments": {"path": "a.py"}}},
    {"text": "The file defines main()."},
])
TEXT_TYPES = [
    "response.created", "response.in_progress", "response.output_item.added",
    "response.content_part.added", "response.output_text.delta", "response.output_text.done",
    "response.content_part.done", "response.output_item.done", "response.completed",
]


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


def long_script(tokens: int) -> dict[str, str]:
    return {"sim_script": json.dumps([{"text": "", "output_tokens": tokens}])}


@asynccontextmanager
async def running(sim: SimConfig | None = None, **kw: Any) -> AsyncIterator[ModelServerInfo]:
    cfg = ModelServerConfig(sim=sim or SimConfig.zero(), **kw)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(serve_model, cfg)
        yield info
        nursery.cancel_scope.cancel()


class Ws:
    """A bare test client: sends events, reads them back in the connection's encoding."""

    def __init__(self, conn: WsConnection, enc: p.Encoding) -> None:
        self.conn, self.enc = conn, enc

    async def send(self, ev: dict[str, Any]) -> None:
        await self.conn.send_message(p.encode_event(ev, self.enc))

    async def recv(self) -> dict[str, Any]:
        frame = await self.conn.get_message()
        assert p.encoding_of_frame(frame) == self.enc, "the server answered in another encoding"
        return p.decode_event(frame)

    async def until_terminal(self) -> list[dict[str, Any]]:
        evs = [await self.recv()]
        while not p.is_terminal(evs[-1]):
            evs.append(await self.recv())
        return evs

    async def create(self, **kw: Any) -> list[dict[str, Any]]:
        kw.setdefault("model", "sim")
        kw.setdefault("input", [])
        await self.send(p.response_create_event(**kw))
        return await self.until_terminal()


@asynccontextmanager
async def ws(info: ModelServerInfo, enc: p.Encoding = p.JSON, token: str | None = None
             ) -> AsyncIterator[Ws]:
    headers = [(b"authorization", b"Bearer " + token.encode())] if token else None
    async with open_ws(info.ws_url, headers=headers) as conn:
        yield Ws(conn, enc)


async def http(info: ModelServerInfo, method: str, path: str, body: Any = None,
               headers: list[tuple[str, str]] | None = None) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream(info.host, info.port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        data = b"" if body is None else (body if isinstance(body, bytes) else p.dumps_json(body))
        hs = [("host", "x"), ("content-length", str(len(data))), *(headers or [])]
        await stream.send_all(conn.send(h11.Request(method=method, target=path, headers=hs)))
        await stream.send_all(conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
        status, rheaders, out = 0, {}, bytearray()
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(ev, h11.Response):
                status = ev.status_code
                rheaders = {k.decode(): v.decode() for k, v in ev.headers}
            elif isinstance(ev, h11.Data):
                out += ev.data
            elif isinstance(ev, h11.EndOfMessage | h11.ConnectionClosed):
                return status, rheaders, bytes(out)


async def stats(info: ModelServerInfo) -> dict[str, Any]:
    status, _, body = await http(info, "GET", "/v1/switchboard/stats")
    assert status == 200
    return json.loads(body)


def completed(evs: list[dict[str, Any]]) -> dict[str, Any]:
    assert evs[-1]["type"] == "response.completed", evs[-1]
    return evs[-1]["response"]


def text_of(resp: dict[str, Any]) -> str:
    return "".join(c["text"] for o in resp["output"] if o["type"] == "message"
                   for c in o["content"])


# ------------------------------------------------------------------ the happy paths


@pytest.mark.parametrize("enc", [p.JSON, p.MSGPACK])
async def test_ws_conversation_with_a_function_call_sends_only_new_items(enc: p.Encoding):
    with trio.fail_after(10):
        async with running() as info, ws(info, enc) as c:
            meta = {"sim_script": CALL_THEN_TEXT}
            evs = await c.create(input=[user("What does a.py do?")], tools=TOOLS, metadata=meta,
                                 instructions="Be brief.", store=False)
            r1 = completed(evs)
            assert [e["type"] for e in evs] == [
                "response.created", "response.in_progress", "response.output_item.added",
                "response.function_call_arguments.delta", "response.function_call_arguments.done",
                "response.output_item.done", "response.completed"]
            assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
            fc = r1["output"][0]
            assert fc["type"] == "function_call" and fc["name"] == "read_file"
            assert json.loads(fc["arguments"]) == {"path": "a.py"}
            assert fc["id"].startswith("fc_") and fc["call_id"].startswith("call_")
            assert r1["id"].startswith("resp_")
            assert r1["usage"]["x_switchboard"] == {
                "context_source": "request", "tokens_rendered": r1["usage"]["input_tokens"]}

            out = {"type": "function_call_output", "call_id": fc["call_id"], "output": "def main()"}
            evs = await c.create(input=[out], previous_response_id=r1["id"], tools=TOOLS,
                                 metadata=meta, instructions="Be brief.", store=False)
            r2 = completed(evs)
            assert [e["type"] for e in evs] == TEXT_TYPES
            assert text_of(r2) == "The file defines main()."
            u = r2["usage"]
            assert u["x_switchboard"]["context_source"] == "connection_cache"
            # only the function_call_output was rendered; the rest came from the cache
            assert 0 < u["x_switchboard"]["tokens_rendered"] < u["input_tokens"] / 3
            assert u["input_tokens"] > r1["usage"]["input_tokens"] + r1["usage"]["output_tokens"]
            assert u["input_tokens_details"]["cached_tokens"] > 0
            assert r2["previous_response_id"] == r1["id"]


async def test_every_response_object_is_exactly_what_response_object_builds_in_its_key_order():
    with trio.fail_after(10):
        async with running() as info, ws(info) as c:
            raw = p.response_create_event(
                model="sim", input=[user("hi")], instructions="be brief", tools=TOOLS,
                metadata={"sim_script": CALL_THEN_TEXT}, temperature=0.5, store=False)
            evs = await c.create(**{k: v for k, v in raw.items() if k != "type"})
    req = p.parse_client_event(raw)
    assert isinstance(req, p.ResponseCreate)
    for ev in (evs[0], evs[1], evs[-1]):
        r = ev["response"]
        want = p.response_object(
            response_id=r["id"], model="sim", status=r["status"], output=r["output"],
            usage=r["usage"], created_at=r["created_at"], request=req)
        assert list(r.items()) == list(want.items())
    assert [e["response"]["status"] for e in (evs[0], evs[1], evs[-1])] == \
        ["in_progress", "in_progress", "completed"]
    assert evs[0]["response"]["usage"] is None and evs[-1]["response"]["usage"] is not None


async def test_http_json_and_sse_give_the_same_response_shapes():
    with trio.fail_after(10):
        async with running() as info:
            body = {"model": "sim", "input": "hi", "metadata": {"sim_script": CALL_THEN_TEXT}}
            status, headers, raw = await http(info, "POST", "/v1/responses", body)
            assert status == 200 and headers["content-type"] == "application/json"
            resp = json.loads(raw)
            assert resp["status"] == "completed" and resp["output"][0]["type"] == "function_call"

            status, headers, raw = await http(info, "POST", "/v1/responses",
                                              {**body, "input": "hello", "stream": True})
            assert status == 200 and headers["content-type"] == "text/event-stream"
            evs = p.SseDecoder().feed(raw)
            assert evs[-1]["type"] == "response.completed"
            assert raw.startswith(b"event: response.created\ndata: ")
            assert [e["sequence_number"] for e in evs] == list(range(len(evs)))


async def test_a_stored_continuation_without_a_script_keeps_the_conversations():
    with trio.fail_after(10):
        async with running() as info:
            script = json.dumps([{"text": "first"}, {"text": "second"}])
            _, _, raw = await http(info, "POST", "/v1/responses", {
                "model": "sim", "input": "a", "metadata": {"sim_script": script}})
            r1 = json.loads(raw)
            _, _, raw = await http(info, "POST", "/v1/responses", {
                "model": "sim", "input": "b", "previous_response_id": r1["id"]})
            r2 = json.loads(raw)
    assert r2["usage"]["x_switchboard"]["context_source"] == "store"
    texts = [r["output"][0]["content"][0]["text"] for r in (r1, r2)]
    assert texts == ["first", "second"]
    assert r2["metadata"] in ({}, None)  # the response echoes what its request sent


async def test_http_continuation_uses_the_store_and_store_false_is_not_kept():
    with trio.fail_after(10):
        async with running() as info:
            _, _, raw = await http(info, "POST", "/v1/responses", {"model": "sim", "input": "a"})
            r1 = json.loads(raw)
            status, _, raw = await http(info, "POST", "/v1/responses", {
                "model": "sim", "input": "b", "previous_response_id": r1["id"]})
            r2 = json.loads(raw)
            assert status == 200
            assert r2["usage"]["x_switchboard"]["context_source"] == "store"
            assert r2["usage"]["input_tokens"] > r1["usage"]["input_tokens"]
            _, _, raw = await http(info, "POST", "/v1/responses",
                                   {"model": "sim", "input": "a", "store": False})
            status, _, raw = await http(info, "POST", "/v1/responses", {
                "model": "sim", "input": "b", "previous_response_id": json.loads(raw)["id"]})
            err = json.loads(raw)
            assert status == 400 and err["error"]["code"] == "previous_response_not_found"
            assert err["error"]["param"] == "previous_response_id"


async def test_warmup_with_generate_false_prepares_the_context(autojump_clock: Any):
    with trio.fail_after(10):
        async with running(SimConfig(ttft_s=1.0, decode_s_per_token=0.01)) as info, \
                ws(info) as c:
            t0 = trio.current_time()
            evs = await c.create(input=[user("long shared context " * 50)], generate=False,
                                 store=False)
            warm = completed(evs)
            assert warm["output"] == [] and warm["usage"]["output_tokens"] == 0
            assert trio.current_time() == t0  # no model time for a warmup
            r = completed(await c.create(input=[user("now answer")], store=False,
                                         previous_response_id=warm["id"]))
            assert r["usage"]["x_switchboard"]["context_source"] == "connection_cache"
            assert r["usage"]["input_tokens_details"]["cached_tokens"] >= \
                warm["usage"]["input_tokens"] - 32


async def test_http_full_context_and_ws_deltas_cost_the_same_model_time(autojump_clock: Any):
    """Same conversation on two fresh servers: the prefix cache and the simulated time agree;
    only the rendering work differs."""
    sim = SimConfig(ttft_s=0.2, prefill_s_per_token=0.001, decode_s_per_token=0.01)
    script = {"sim_script": json.dumps([{"text": f"Answer {i}: " + "words " * 20}
                                        for i in range(4)])}
    questions = [f"Question {i}: " + "context " * 40 for i in range(4)]
    with trio.fail_after(30):
        ws_turns: list[tuple[Any, ...]] = []
        async with running(sim) as info, ws(info, p.MSGPACK) as c:
            prev = None
            for q in questions:
                t0 = trio.current_time()
                r = completed(await c.create(input=[user(q)], previous_response_id=prev,
                                             metadata=script, instructions="x", store=False))
                u = r["usage"]
                ws_turns.append((u["input_tokens"], u["input_tokens_details"]["cached_tokens"],
                                 u["output_tokens"], trio.current_time() - t0, text_of(r)))
                if prev is not None:
                    assert u["x_switchboard"]["tokens_rendered"] < u["input_tokens"] / 2
                prev = r["id"]
        http_turns: list[tuple[Any, ...]] = []
        async with running(sim) as info:
            context: list[dict[str, Any]] = []
            for q in questions:
                context.append(user(q))
                t0 = trio.current_time()
                _, _, raw = await http(info, "POST", "/v1/responses", {
                    "model": "sim", "input": context, "metadata": script, "instructions": "x",
                    "store": False})
                r = json.loads(raw)
                u = r["usage"]
                assert u["x_switchboard"] == {"context_source": "request",
                                              "tokens_rendered": u["input_tokens"]}
                http_turns.append((u["input_tokens"], u["input_tokens_details"]["cached_tokens"],
                                   u["output_tokens"], trio.current_time() - t0, text_of(r)))
                context += r["output"]
        assert [t[:3] + t[4:] for t in ws_turns] == [t[:3] + t[4:] for t in http_turns]
        for (_, _, _, t_ws, _), (_, _, _, t_http, _) in zip(ws_turns, http_turns, strict=True):
            assert t_ws == pytest.approx(t_http, abs=1e-9)
        assert ws_turns[-1][1] > 0  # later turns hit the model's prefix cache


async def test_model_time_is_ttft_plus_uncached_prefill_plus_decode_as_it_streams(
        autojump_clock: Any):
    sim = SimConfig(ttft_s=0.5, prefill_s_per_token=0.001, decode_s_per_token=0.01,
                    chunk_tokens=10)
    with trio.fail_after(30):
        async with running(sim) as info, ws(info) as c:
            t0 = trio.current_time()
            await c.send(p.response_create_event(model="sim", input=[user("hi")], store=False,
                                                 metadata=long_script(100)))
            times: list[tuple[str, float]] = []
            while True:
                ev = await c.recv()
                times.append((ev["type"], trio.current_time() - t0))
                if p.is_terminal(ev):
                    break
            n_in = ev["response"]["usage"]["input_tokens"]
            prefill = 0.5 + 0.001 * n_in
            first = next(t for k, t in times if k == "response.output_text.delta")
            assert first == pytest.approx(prefill + 0.1, abs=1e-6)  # first 10-token chunk
            assert times[-1][1] == pytest.approx(prefill + 1.0, abs=1e-6)  # 100 tokens


async def test_send_messages_sends_each_as_its_own_message_in_one_write_and_raises_when_closed(
        monkeypatch: pytest.MonkeyPatch):
    got: list[str | bytes] = []
    writes: list[int] = []
    writes_before_close: list[int] = []
    fds: list[int] = []
    real_write = ws_module._os_write

    def counting_write(fd: int, data: Any) -> int:  # FastWs writes to the fd, a syscall each
        if fd in fds:
            writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(ws_module, "_os_write", counting_write)

    async def handler(request: Any) -> None:
        conn = await request.accept()
        fds.append(conn._sock.fileno())
        await send_messages(conn, ["one", b"\x00two", "three"])
        writes_before_close.append(len(writes))
        await conn.aclose()
        with pytest.raises(WsClosed):
            await send_messages(conn, ["after close"])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(serve_ws, handler, "127.0.0.1", 0)
            async with open_ws(f"ws://{host}:{port}/") as conn:
                with pytest.raises(WsClosed):
                    while True:
                        got.append(await conn.get_message())
            nursery.cancel_scope.cancel()
    assert got == ["one", b"\x00two", "three"]
    assert writes_before_close == [1]


# ------------------------------------------------------------------ cancellation


async def test_response_cancel_stops_generation_at_once_and_the_connection_goes_on(
        autojump_clock: Any):
    sim = SimConfig(ttft_s=0.1, prefill_s_per_token=0.0, decode_s_per_token=0.01)
    with trio.fail_after(1000):  # virtual seconds under the autojump clock
        async with running(sim) as info, ws(info) as c:
            r0 = completed(await c.create(input=[user("hello")], store=False))
            await c.send(p.response_create_event(model="sim", input=[user("go")], store=False,
                                                 previous_response_id=r0["id"],
                                                 metadata=long_script(10_000)))
            while (await c.recv())["type"] != "response.output_text.delta":
                pass
            t0 = trio.current_time()
            await c.send(p.response_cancel_event())
            evs = await c.until_terminal()
            assert trio.current_time() - t0 < 0.1
            end = evs[-1]
            assert end["type"] == "response.incomplete"
            assert end["response"]["status"] == "incomplete"
            assert end["response"]["incomplete_details"] == {"reason": "cancelled"}
            partial = end["response"]["output"][0]
            assert partial["status"] == "incomplete" and partial["content"][0]["text"]
            s1 = await stats(info)
            assert s1["responses_cancelled"] == 1 and s1["in_flight"] == 0
            out0 = r0["usage"]["output_tokens"]
            assert 0 < s1["output_tokens"] - out0 < 100
            await trio.sleep(200)  # long past when the full response would have ended
            assert (await stats(info))["output_tokens"] == s1["output_tokens"]
            # the lane holds the last completed response again: the client drops the partial
            # output and resends only the unanswered items
            r = completed(await c.create(input=[user("go"), user("short please")], store=False,
                                         previous_response_id=r0["id"]))
            xs = r["usage"]["x_switchboard"]
            assert xs["context_source"] == "connection_cache"
            # nothing of the cancelled turn is left in the context (+3: the answer's framing)
            assert r["usage"]["input_tokens"] - xs["tokens_rendered"] == \
                r0["usage"]["input_tokens"] + out0 + 3
            # the cancelled response itself was not stored (store=false): not continuable
            evs = await c.create(input=[user("x")], store=False,
                                 previous_response_id=end["response"]["id"])
            assert evs[-1]["error"]["code"] == "previous_response_not_found"


async def client_queue_full(c: Ws) -> None:
    """Wait until the server's writes to the client block: the client reads nothing (a
    connection reads only when asked for a message) and the bytes waiting in its socket have
    stopped growing, so both sides' socket buffers are full."""
    fd = c.conn._stream.socket.fileno()
    last = -1
    while True:
        waiting = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        if waiting and waiting == last and queued_messages(c.conn):
            return
        last = waiting
        await trio.sleep(0.05)


async def test_a_cancel_while_a_write_is_stuck_on_a_slow_reader_never_cuts_a_frame():
    # Zero model time and one token per delta: the events go out 64 at a time as fast as the
    # server can make them, until the client (not reading) pushes back and a write blocks.
    sim = attrs.evolve(SimConfig.zero(), chunk_tokens=1)
    with trio.fail_after(30):
        async with running(sim) as info, ws(info) as c:
            await c.send(p.response_create_event(model="sim", input=[user("go")], store=False,
                                                 metadata=long_script(200_000)))
            await client_queue_full(c)  # from here the server's writes block
            await c.send(p.response_cancel_event())
            evs = await c.until_terminal()  # every frame decodes, in order
            assert evs[-1]["type"] == "response.incomplete"
            assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
            assert len(evs) < 200_000
            assert completed(await c.create(input=[user("again")], store=False))


async def test_shutdown_ends_a_connection_whose_write_is_stuck_on_a_client_not_reading():
    sim = attrs.evolve(SimConfig.zero(), chunk_tokens=1)
    server_scope, ended = trio.CancelScope(), trio.Event()

    async def serve(task_status: trio.TaskStatus[ModelServerInfo]) -> None:
        try:
            with server_scope:
                await serve_model(ModelServerConfig(sim=sim), task_status=task_status)
        finally:
            ended.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve)
            async with ws(info) as c:  # stays open, not reading, while the server stops
                await c.send(p.response_create_event(
                    model="sim", input=[user("go")], store=False,
                    metadata=long_script(200_000)))
                await client_queue_full(c)
                server_scope.cancel()
                with trio.fail_after(5):
                    await ended.wait()


async def test_the_next_create_may_follow_the_terminal_event_before_the_server_resumes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A client in another thread or process (the SDK) can read a terminal event and send the
    # next response.create before the server's response task runs again after its write. The
    # lane is freed, holding the response, before that write: the next turn continues it.
    # Here the write of a terminal event returns late, so the client always wins that race.
    real_send = server_mod.send_messages

    async def send_then_dawdle(conn: Any, frames: list[str | bytes]) -> None:
        await real_send(conn, frames)
        if any(b"response.completed" in (f if isinstance(f, bytes) else f.encode())
               for f in frames):
            await trio.sleep(0.05)

    monkeypatch.setattr(server_mod, "send_messages", send_then_dawdle)
    with trio.fail_after(30):
        async with running(SimConfig.zero()) as info, ws(info) as c:
            prev = None
            for i in range(5):
                r = completed(await c.create(input=[user(f"turn {i}")], store=False,
                                             previous_response_id=prev))
                if prev is not None:
                    assert r["usage"]["x_switchboard"]["context_source"] == "connection_cache"
                prev = r["id"]


async def test_cancel_with_nothing_in_flight_or_a_stale_id_is_a_no_op():
    with trio.fail_after(10):
        async with running() as info, ws(info) as c:
            await c.send(p.response_cancel_event())
            await c.send(p.response_cancel_event("resp_old"))
            r = completed(await c.create(input=[user("x")]))
            assert r["status"] == "completed"


@pytest.mark.parametrize("how", ["ws", "http_sse", "http_json"])
async def test_client_going_away_stops_generation(how: str, autojump_clock: Any):
    sim = SimConfig(ttft_s=0.1, prefill_s_per_token=0.0, decode_s_per_token=0.01)
    with trio.fail_after(1000):  # virtual seconds under the autojump clock
        async with running(sim) as info:
            body = {"model": "sim", "input": "go", "metadata": long_script(10_000)}
            if how == "ws":
                async with ws(info) as c:
                    await c.send({"type": "response.create", **body})
                    while (await c.recv())["type"] != "response.output_text.delta":
                        pass
            else:
                stream = await trio.open_tcp_stream(info.host, info.port)
                conn = h11.Connection(h11.CLIENT)
                data = p.dumps_json({**body, "stream": how == "http_sse"})
                await stream.send_all(conn.send(h11.Request(method="POST", target="/v1/responses",
                    headers=[("host", "x"), ("content-length", str(len(data)))]))
                    + conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
                if how == "http_sse":
                    await stream.receive_some(1)
                else:
                    await trio.sleep(1.0)
                await stream.aclose()
            await trio.sleep(1.0)
            s1 = info.server.statistics()
            assert (s1["in_flight"], s1["responses_cancelled"], s1["responses_completed"]) \
                == (0, 1, 0)
            assert s1["output_tokens"] < 400
            await trio.sleep(200)
            assert info.server.statistics()["output_tokens"] == s1["output_tokens"]


async def test_a_second_create_while_one_is_in_flight_is_an_error_not_a_crash(
        autojump_clock: Any):
    sim = SimConfig(ttft_s=0.1, decode_s_per_token=0.001)
    with trio.fail_after(30):
        async with running(sim) as info, ws(info) as c:
            await c.send(p.response_create_event(model="sim", input=[user("a")],
                                                 metadata=long_script(500)))
            await c.send(p.response_create_event(model="sim", input=[user("b")]))
            evs = await c.until_terminal()
            while evs[-1]["type"] != "response.completed":
                assert evs[-1]["type"] == "error"
                assert evs[-1]["error"]["code"] == "response_in_progress"
                evs = await c.until_terminal()
            assert evs[-1]["response"]["usage"]["output_tokens"] == 500


# ------------------------------------------------------------------ the connection cache


async def test_unknown_previous_response_is_an_error_and_the_connection_stays_usable():
    with trio.fail_after(10):
        async with running() as info, ws(info, p.MSGPACK) as c:
            evs = await c.create(input=[user("x")], previous_response_id="resp_nope")
            assert evs == [{"type": "error", "status": 400, "error": {
                "type": "invalid_request_error", "code": "previous_response_not_found",
                "message": "Previous response with id 'resp_nope' not found.",
                "param": "previous_response_id"}}]
            completed(await c.create(input=[user("x")]))


async def test_other_connections_responses_come_from_the_store_only_when_stored():
    with trio.fail_after(10):
        async with running() as info:
            async with ws(info) as a:
                kept = completed(await a.create(input=[user("remember me")], store=True))
                lost = completed(await a.create(input=[user("forget me")], store=False))
            async with ws(info) as b:
                r = completed(await b.create(input=[user("and?")], previous_response_id=kept["id"]))
                xs = r["usage"]["x_switchboard"]
                assert xs["context_source"] == "store"
                assert xs["tokens_rendered"] == r["usage"]["input_tokens"]  # full cost again
                evs = await b.create(input=[user("and?")], previous_response_id=lost["id"])
                assert evs[-1]["error"]["code"] == "previous_response_not_found"


async def test_a_failed_continuation_evicts_the_response_it_named():
    with trio.fail_after(10):
        async with running() as info, ws(info) as c:
            r1 = completed(await c.create(input=[user("x")], store=False))
            evs = await c.create(model="nope", input=[user("y")], previous_response_id=r1["id"],
                                 store=False)
            assert (evs[-1]["error"]["code"], evs[-1]["error"]["param"]) == \
                ("model_not_found", "model")
            evs = await c.create(input=[user("y")], previous_response_id=r1["id"], store=False)
            assert evs[-1]["error"]["code"] == "previous_response_not_found"


async def test_only_the_most_recent_response_of_a_lane_is_cached():
    with trio.fail_after(10):
        async with running() as info, ws(info) as c:
            r1 = completed(await c.create(input=[user("1")], store=False))
            completed(await c.create(input=[user("2")], store=False, previous_response_id=r1["id"]))
            evs = await c.create(input=[user("3")], store=False, previous_response_id=r1["id"])
            assert evs[-1]["error"]["code"] == "previous_response_not_found"


async def test_lanes_run_concurrently_and_fork_from_each_other(autojump_clock: Any):
    sim = SimConfig(ttft_s=0.1, decode_s_per_token=0.01)
    with trio.fail_after(30):
        async with running(sim) as info, ws(info) as c:
            base = completed(await c.create(input=[user("shared")], store=False))
            t0 = trio.current_time()
            for lane in ("a", "b"):
                await c.send(p.response_create_event(
                    model="sim", input=[user(lane)], stream_id=lane, store=False,
                    previous_response_id=base["id"], metadata=long_script(100)))
            done: dict[str, dict[str, Any]] = {}
            while len(done) < 2:
                ev = await c.recv()
                assert ev["stream_id"] in ("a", "b")
                if ev["type"] == "response.completed":
                    done[ev["stream_id"]] = ev["response"]
            assert trio.current_time() - t0 < 1.5  # two 1.1 s responses overlapped
            for lane in ("a", "b"):
                assert done[lane]["usage"]["x_switchboard"]["context_source"] == \
                    "connection_cache"
            evs = await c.create(input=[user("more")], stream_id="a", store=False,
                                 previous_response_id=done["a"]["id"])
            assert completed(evs) and evs[0]["stream_id"] == "a"


async def test_too_many_lanes_is_an_error():
    with trio.fail_after(10):
        async with running(max_lanes=2) as info, ws(info) as c:
            for lane in ("a", "b"):
                completed(await c.create(input=[user("x")], stream_id=lane))
            evs = await c.create(input=[user("x")], stream_id="c")
            assert evs[-1]["error"]["code"] == "websocket_stream_limit_reached"
            assert evs[-1]["stream_id"] == "c"


async def test_max_connection_age_sends_an_error_then_closes_with_1001(autojump_clock: Any):
    with trio.fail_after(30):
        async with running(max_connection_age_s=10.0) as info, ws(info) as c:
            t0 = trio.current_time()
            completed(await c.create(input=[user("x")]))
            ev = await c.recv()
            assert trio.current_time() - t0 == pytest.approx(10.0, abs=0.01)
            assert ev["error"]["code"] == "websocket_connection_limit_reached"
            with pytest.raises(WsClosed) as info_:
                await c.recv()
            assert info_.value.reason.code == 1001


async def test_server_shutdown_closes_websockets_with_1001():
    server_scope = trio.CancelScope()

    async def server(task_status: trio.TaskStatus[ModelServerInfo]) -> None:
        with server_scope:
            await serve_model(ModelServerConfig(sim=SimConfig.zero()), task_status=task_status)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            info = await nursery.start(server)
            async with ws(info) as c:
                completed(await c.create(input=[user("x")]))
                server_scope.cancel()
                with pytest.raises(WsClosed) as closed:
                    await c.recv()
            assert closed.value.reason.code == 1001


async def test_an_idle_connection_at_its_age_limit_gets_the_error_in_json(autojump_clock: Any):
    with trio.fail_after(30):
        async with running(max_connection_age_s=5.0) as info, ws(info) as c:
            ev = await c.recv()
            assert ev["error"]["code"] == "websocket_connection_limit_reached"
            assert "Create a new websocket connection" in ev["error"]["message"]
            with pytest.raises(WsClosed):
                await c.recv()


async def test_http_expect_100_continue_is_answered_before_the_body():
    with trio.fail_after(10):
        async with running() as info:
            stream = await trio.open_tcp_stream(info.host, info.port)
            async with stream:
                body = p.dumps_json({"model": "sim", "input": "x"})
                await stream.send_all(
                    b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
                got = b""
                while b"\r\n\r\n" not in got:  # the client waits for this before the body
                    got += await stream.receive_some(65536)
                assert got.startswith(b"HTTP/1.1 100 ")
                await stream.send_all(body)
                rest = b""
                while b'"status":"completed"' not in rest:
                    rest += await stream.receive_some(65536)
                assert rest.startswith(b"HTTP/1.1 200 ")


# ------------------------------------------------------------------ bad input


BAD_EVENTS: list[tuple[Any, str, str | None]] = [
    ({"type": "session.update"}, "unknown_event_type", "type"),
    ({"type": "response.create", "input": "x"}, "missing_required_parameter", "model"),
    ({"type": "response.create", "model": "sim", "store": "yes"}, "invalid_type", "store"),
    ({"type": "response.create", "model": "sim", "input": [{"type": "image"}]},
     "invalid_value", "input[0].type"),
    ({"type": "response.create", "model": "gpt-9", "input": "x"}, "model_not_found", "model"),
    ({"type": "response.create", "model": "sim", "input": "x",
      "metadata": {"sim_script": "[oops"}}, "invalid_value", "metadata.sim_script"),
    ({"type": "response.create", "model": "sim", "input": "x",
      "previous_response_id": "resp_x"}, "previous_response_not_found", "previous_response_id"),
    ({"type": "response.create", "model": "sim", "input": "x" * 3000}, "message_too_large", None),
    ([1, 2, 3], "invalid_type", None),
]


@pytest.mark.parametrize("enc", [p.JSON, p.MSGPACK])
async def test_bad_events_get_named_errors_in_the_connections_encoding(enc: p.Encoding):
    with trio.fail_after(20):
        async with running(max_message_bytes=2000) as info, ws(info, enc) as c, \
                ws(info, p.JSON) as other:
            # another connection is mid-response the whole time and never notices
            await other.send(p.response_create_event(model="sim", input="x"))
            for body, code, param in BAD_EVENTS:
                frame = json.dumps(body) if enc == p.JSON else p.encode_event(body, enc)  # type: ignore[arg-type]
                await c.conn.send_message(frame)
                ev = await c.recv()
                assert ev["type"] == "error" and ev["error"]["code"] == code, (body, ev)
                assert ev["error"]["param"] == param
                assert ev["error"]["message"]
            raw = '{"type": "response.create",' if enc == p.JSON else b"\xc1\xc1"
            await c.conn.send_message(raw)
            ev = await c.recv()
            assert ev["error"]["code"] == ("invalid_json" if enc == p.JSON else "invalid_msgpack")
            completed(await c.create(input=[user("still fine")]))
            completed(await other.until_terminal())


async def test_a_frame_in_the_other_encoding_is_an_error_in_the_first():
    with trio.fail_after(10):
        async with running() as info, ws(info, p.MSGPACK) as c:
            completed(await c.create(input=[user("x")]))
            await c.conn.send_message(json.dumps({"type": "response.create", "model": "sim"}))
            ev = await c.recv()  # decoded as msgpack: the connection's encoding
            assert ev["error"]["code"] == "wrong_frame_encoding"
            completed(await c.create(input=[user("x")]))


async def test_random_frames_never_break_the_connection():
    rng = random.Random(7)
    with trio.fail_after(20):
        async with running() as info:
            for enc in (p.JSON, p.MSGPACK):
                async with ws(info, enc) as c:
                    for _ in range(100):
                        n = rng.randrange(0, 64)
                        if enc == p.JSON:
                            frame: str | bytes = "".join(chr(rng.randrange(32, 0x2FF))
                                                         for _ in range(n))
                        else:
                            frame = bytes(rng.randrange(256) for _ in range(n))
                        await c.conn.send_message(frame)
                        assert (await c.recv())["type"] == "error"
                    completed(await c.create(input=[user("x")]))


async def test_http_bad_requests_get_400_with_the_same_error_json():
    with trio.fail_after(10):
        async with running() as info:
            status, _, raw = await http(info, "POST", "/v1/responses", b"{not json")
            assert status == 400 and json.loads(raw)["error"]["code"] == "invalid_json"
            status, _, raw = await http(info, "POST", "/v1/responses",
                                        {"model": "sim", "input": [{"type": "nope"}]})
            err = json.loads(raw)
            assert status == 400 and err["type"] == "error"
            assert (err["error"]["code"], err["error"]["param"]) == ("invalid_value",
                                                                     "input[0].type")
            status, _, raw = await http(info, "POST", "/v1/responses", {"input": "x"})
            assert status == 400 and json.loads(raw)["error"]["param"] == "model"


async def test_http_oversize_body_is_413():
    with trio.fail_after(10):
        async with running(max_message_bytes=1000) as info:
            status, _, raw = await http(info, "POST", "/v1/responses",
                                        {"model": "sim", "input": "x" * 5000})
            assert status == 413 and json.loads(raw)["error"]["code"] == "message_too_large"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/nope", 404), ("DELETE", "/v1/responses", 405), ("GET", "/v1/responses", 426),
    ("POST", "/v1/switchboard/stats", 405),
])
async def test_http_routing_errors(method: str, path: str, status: int):
    with trio.fail_after(10):
        async with running() as info:
            got, _, raw = await http(info, method, path)
            assert got == status and json.loads(raw)["type"] == "error"


async def test_hostile_bytes_never_crash_the_server(autojump_clock: Any):
    rng = random.Random(11)
    heads = [b"GET / HTTP/1.1\r\n\r\n", b"POST /v1/responses HTTP/1.1\r\nHost: x\r\n",
             b"GET /v1/responses HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
             b"Connection: Upgrade\r\n\r\n",
             b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n{",
             b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
             b"GET /v1/switchboard/stats HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"]
    with trio.fail_after(1000):  # virtual seconds: idle connections time out at once
        async with running(http_idle_timeout_s=5.0) as info:
            cases = heads + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
                             for _ in range(60)]
            cases += [rng.choice(heads)[: rng.randrange(1, 60)] for _ in range(20)]
            for data in cases:
                stream = await trio.open_tcp_stream(info.host, info.port)
                try:
                    await stream.send_all(data)
                    with trio.fail_after(10):  # the server answers or hangs up, never waits
                        while await stream.receive_some(65536):
                            pass
                except trio.BrokenResourceError:
                    pass
                finally:
                    await stream.aclose()
            assert (await stats(info))["responses_started"] == 0
            async with ws(info) as c:
                completed(await c.create(input=[user("still serving")]))


# ------------------------------------------------------------------ auth


async def test_a_token_is_required_on_http_and_before_the_websocket_upgrade():
    with trio.fail_after(10):
        async with running(token="s3cret") as info:
            status, headers, raw = await http(info, "GET", "/v1/switchboard/stats")
            assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
            assert headers["www-authenticate"] == "Bearer"
            status, _, _ = await http(info, "POST", "/v1/responses", {"model": "sim"},
                                      headers=[("authorization", "Bearer wrong")])
            assert status == 401
            status, _, _ = await http(info, "GET", "/v1/switchboard/stats",
                                      headers=[("authorization", "Bearer s3cret")])
            assert status == 200
            for token in (None, "wrong"):
                with pytest.raises(WsRejected) as rej:
                    async with ws(info, token=token):
                        pass
                assert rej.value.status_code == 401
            async with ws(info, token="s3cret") as c:
                completed(await c.create(input=[user("x")]))
            assert info.server.statistics()["ws_connections_total"] == 1


async def test_stats_count_what_happened():
    with trio.fail_after(10):
        async with running() as info:
            async with ws(info) as c:
                r = completed(await c.create(input=[user("x")]))
                await c.create(model="nope", input="x")
            s = await stats(info)
            assert s["responses_started"] == s["responses_completed"] == 1
            assert s["output_tokens"] == r["usage"]["output_tokens"]
            assert s["input_tokens"] == r["usage"]["input_tokens"]
            assert (s["in_flight"], s["responses_cancelled"], s["errors_sent"]) == (0, 0, 1)


# ------------------------------------------------------------------ the command


def test_cli_refuses_a_public_host_without_a_token(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]):
    from orchestrator.cli import main

    monkeypatch.delenv("SWITCHBOARD_TOKEN", raising=False)
    assert main(["model-server", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "refusing to serve on '0.0.0.0' without a token" in capsys.readouterr().err
    assert main(["model-server", "--port", "0", "--decode", "-1"]) == 2
    assert "--decode must be a finite number of seconds, zero or more" in capsys.readouterr().err


def test_cli_refuses_a_parent_pid_that_is_not_its_parent_and_a_bad_sim_json(
        capsys: pytest.CaptureFixture[str]):
    import os

    from orchestrator.cli import main

    assert main(["model-server", "--port", "0", "--parent-pid", "1"]) == 2
    err = capsys.readouterr().err
    assert f"--parent-pid 1 is not this model server's parent (that is {os.getppid()})" in err
    for bad in ("[1]", "{\"ttft\": 1}", "not json"):
        assert main(["model-server", "--port", "0", "--sim-json", bad]) == 2
        assert "--sim-json is not a sim configuration" in capsys.readouterr().err


def test_sim_json_round_trips_every_field():
    from modellink.sim import SimConfig
    from orchestrator.simproc import sim_from_json, sim_to_json

    sim = SimConfig(ttft_s=0.5, models=("a", "b"), accept_any_model=True, seed=7,
                    default_script='[{"text": "x"}]', chunk_tokens=3)
    assert sim_from_json(sim_to_json(sim)) == sim


async def test_cli_serves_with_a_token_file_until_sigint(tmp_path: Any):
    import os
    import signal
    import subprocess
    import sys

    token_file = tmp_path / "token"
    token_file.write_text("tok-123\n")
    env = {k: v for k, v in os.environ.items() if k != "SWITCHBOARD_TOKEN"}
    with trio.fail_after(20):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "orchestrator", "model-server", "--port", "0", "--zero",
             "--host", "0.0.0.0", "--token-file", str(token_file)], stderr=subprocess.PIPE,
            env=env)
        try:
            assert proc.stderr is not None
            buf = b""
            while b"listening on " not in buf or not buf.endswith(b"\n"):
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, buf
                buf += chunk
            line = buf.split(b"listening on ")[1].decode()
            url = line.split()[0]  # the URL to dial from here; "0.0.0.0" is nobody's address
            assert url.startswith("http://127.0.0.1:") and "from other machines" in line, line
            host, port = url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
            info = ModelServerInfo(host=host, port=int(port), base_url=url, server=None)  # type: ignore[arg-type]
            status, _, _ = await http(info, "GET", "/v1/switchboard/stats")
            assert status == 401
            status, _, raw = await http(info, "GET", "/v1/switchboard/stats",
                                        headers=[("authorization", "Bearer tok-123")])
            assert status == 200 and json.loads(raw)["responses_started"] == 0
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# ------------------------------------------------------------------ event batches (our extension)


@pytest.mark.parametrize("asked,enc", [(True, p.MSGPACK), (False, p.MSGPACK), (True, p.JSON)])
async def test_events_are_batched_per_frame_only_on_msgpack_connections_that_asked(
        asked: bool, enc: p.Encoding):
    headers = [p.EVENT_BATCH_HEADER] if asked else None
    with trio.fail_after(10):
        async with running() as info, open_ws(info.ws_url, headers=headers) as conn:
            for script in ('[{"text": "hello there"}]', CALL_THEN_TEXT):
                await conn.send_message(p.encode_event(p.response_create_event(
                    model="sim", input=[user("hi")], tools=TOOLS,
                    metadata={"sim_script": script}), enc))
                frames, evs = 0, []
                while not evs or not p.is_terminal(evs[-1]):
                    frames += 1
                    evs += p.decode_events(await conn.get_message())
                # the same events, in order, numbered, however they were framed
                assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
                assert evs[0]["type"] == "response.created"
                assert evs[-1]["type"] == "response.completed"
                if asked and enc == p.MSGPACK:
                    assert frames < len(evs)  # a zero-time response is one pause: one frame
                else:
                    assert frames == len(evs)
