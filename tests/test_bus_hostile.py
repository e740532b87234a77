"""Hostile input against a live hub: every bad frame gets its close code and one log line,
and two well-behaved peers keep talking through all of it."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import msgpack
import pytest
import trio
from bus_helpers import TOKEN, capture_logs, close_code, hello, start_hub

from bus import codec as C
from bus.client import BusClient, Message, open_bus_client
from bus.hub import Hub
from bus.ws import WsConnection, open_ws

WARNINGS = ("bus.protocol_error", "bus.auth_failed", "bus.slow_consumer")


@attrs.define
class Env:
    hub: Hub
    url: str
    a: BusClient
    b: BusClient
    logs: list[dict[str, Any]]
    b_got: list[Message]  # what reached b other than the bystanders' echo requests

    async def still_talking(self) -> None:
        """The bystanders' traffic is unaffected: a request round trip works."""
        assert await self.a.request("b", "ping", timeout=2) == "ping"

    def hostile_lines(self) -> list[dict[str, Any]]:
        return [e for e in self.logs if e.get("logger") == "bus.hub"
                and e["event"] in WARNINGS]


@asynccontextmanager
async def hub_env(**hub_config: Any) -> AsyncIterator[Env]:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            hub, info = await start_hub(nursery, **hub_config)
            async with open_bus_client(info.url, token=TOKEN, endpoint_id="a") as a, \
                    open_bus_client(info.url, token=TOKEN, endpoint_id="b") as b:

                b_got: list[Message] = []

                async def echo() -> None:
                    async for m in b:
                        if m.kind == "request":
                            await b.reply(m, m.payload())
                        else:
                            b_got.append(m)

                nursery.start_soon(echo)
                with capture_logs() as logs:
                    yield Env(hub=hub, url=info.url, a=a, b=b, logs=logs, b_got=b_got)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def authed(url: str, endpoint_id: str = "mallory") -> AsyncIterator[WsConnection]:
    async with open_ws(url) as ws:
        await ws.send_message(hello(endpoint_id=endpoint_id))
        await ws.get_message()  # WELCOME
        yield ws


async def expect_close(env: Env, payload: bytes | str, code: int, *, auth: bool = True,
                       event: str = "bus.protocol_error") -> dict[str, Any]:
    opener = authed(env.url) if auth else open_ws(env.url)
    async with opener as ws:
        await ws.send_message(payload)
        assert await close_code(ws) == code
    await env.still_talking()
    lines = env.hostile_lines()
    assert len(lines) == 1, lines
    assert lines[0]["event"] == event and lines[0]["code"] == code
    assert lines[0]["peer"].startswith("127.0.0.1:") and lines[0]["reason"]
    return lines[0]


def env_frame(*fields: Any) -> bytes:
    return msgpack.packb([list(fields)], use_bin_type=True)


@pytest.mark.parametrize("seed", range(8))
async def test_random_bytes_after_auth_close_1002(seed):
    rng = random.Random(seed)
    data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    try:
        C.FrameDecoder(C.Limits()).decode(data)
        pytest.skip("random bytes happened to be a valid frame")
    except Exception:
        pass
    async with hub_env() as env:
        await expect_close(env, data, 1002)


async def test_random_bytes_before_auth_close_1002_and_nothing_is_routed():
    async with hub_env() as env:
        await expect_close(env, b"\xc1\xff\x00junk", 1002, auth=False)
        assert env.hub.statistics().sessions == 2


async def test_truncated_msgpack_closes_1002():
    full = C.encode_frame([(C.SEND, 1, "", "b", 0, C.pack_body("x" * 50))])
    async with hub_env() as env:
        line = await expect_close(env, full[:-10], 1002)
        assert "truncated" in line["reason"]


@pytest.mark.parametrize("auth", [True, False])
async def test_text_frame_closes_1003(auth):
    async with hub_env() as env:
        await expect_close(env, '{"kind": "send"}', 1003, auth=auth)


@pytest.mark.parametrize("size", [70_000, 200_000])
async def test_oversize_frame_closes_1009(size):
    """Just over the limit: refused by our codec; far over: cut off by the WS layer's cap."""
    async with hub_env(limits=C.Limits(max_frame_bytes=64 * 1024)) as env:
        data = C.encode_frame([(C.SEND, 1, "", "b", 0, b"x" * size)])
        opener = authed(env.url)
        async with opener as ws:
            await ws.send_message(data)
            assert await close_code(ws) == 1009
        await env.still_talking()
        if size == 70_000:
            lines = env.hostile_lines()
            assert len(lines) == 1 and lines[0]["code"] == 1009


@pytest.mark.parametrize("field,bad", [
    (0, "send"), (0, None), (0, 1.5),
    (1, "1"), (1, -1), (1, None),
    (2, 1), (2, None), (2, b"src"),
    (3, 1), (3, None), (3, [1]),
    (4, "7"), (4, -1), (4, None),
    (5, "body"), (5, 1), (5, None), (5, {"a": 1}),
])
async def test_wrong_type_in_each_envelope_field_closes_1002(field, bad):
    fields: list[Any] = [C.SEND, 1, "", "b", 0, b"\xc0"]
    fields[field] = bad
    async with hub_env() as env:
        await expect_close(env, env_frame(*fields), 1002)


@pytest.mark.parametrize("kind", [0, 6, 16, 99, C.HELLO, C.WELCOME, C.NOROUTE])
async def test_unknown_or_misplaced_kind_closes_1002(kind):
    async with hub_env() as env:
        await expect_close(env, env_frame(kind, 1, "", "b", 1, b"\xc0"), 1002)


async def test_frame_before_auth_closes_1008_and_routes_nothing():
    async with hub_env() as env:
        await expect_close(env, env_frame(C.SEND, 1, "", "b", 0, C.pack_body("sneaky")), 1008,
                           auth=False, event="bus.auth_failed")
        assert env.b_got == []


async def test_wrong_token_closes_1008():
    async with hub_env() as env:
        await expect_close(env, hello(token="guess"), 1008, auth=False, event="bus.auth_failed")


async def test_unsupported_version_closes_1002():
    async with hub_env() as env:
        line = await expect_close(env, env_frame(C.HELLO, 99, TOKEN, "m", "", 0), 1002,
                                  auth=False)
        assert "version 99" in line["reason"]


async def test_sequence_gap_closes_1002():
    async with hub_env() as env:
        await expect_close(env, env_frame(C.SEND, 5, "", "b", 0, b"\xc0"), 1002)


async def test_replayed_sequence_numbers_are_delivered_once():
    async with hub_env() as env:
        async with authed(env.url) as ws:
            frame = env_frame(C.SEND, 1, "spoofed", "b", 0, C.pack_body("once"))
            for _ in range(3):
                await ws.send_message(frame)
            await env.still_talking()  # after the replays in the hub's order of processing
        assert [(m.payload(), m.source) for m in env.b_got] == [("once", "mallory")]


async def test_flood_from_one_peer_is_cut_1013_while_others_keep_talking():
    """A peer floods sends to nobody and never reads its NOROUTE notices: it is a slow
    consumer of its own errors. The bystanders' round trips stay fast throughout."""
    async with hub_env(max_pending_msgs=20_000, slow_consumer_grace=0.5) as env:
        rtts: list[float] = []
        async with authed(env.url) as ws:
            enc = C.EnvelopeEncoder()
            seq = 0

            async def flood() -> None:
                nonlocal seq
                try:
                    while True:
                        parts = []
                        for _ in range(500):
                            seq += 1
                            parts.append(enc.envelope(C.SEND, seq, "", "nobody", 0, b"\xc0"))
                        await ws.send_message(C.frame(parts))
                except Exception:
                    return  # the hub closed us

            async with trio.open_nursery() as n:
                n.start_soon(flood)
                while ws.closed is None and len(rtts) < 2000:
                    t0 = trio.current_time()
                    await env.still_talking()
                    rtts.append(trio.current_time() - t0)
                    if env.hub.statistics().slow_consumers_closed:
                        break
                    await trio.sleep(0.002)
                n.cancel_scope.cancel()
            assert await close_code(ws) == 1013
        assert env.hub.statistics().slow_consumers_closed == 1
        lines = env.hostile_lines()
        assert [e["event"] for e in lines] == ["bus.slow_consumer"]
        assert len(rtts) >= 5 and max(rtts) < 0.5, rtts
        await env.still_talking()


async def _upgrade_then_reset(url: str, *, wait_s: float) -> None:
    """Send a WebSocket upgrade request, then reset the connection (SO_LINGER 0) after
    `wait_s`: mid-handshake, or just after it, before the peer was looked at."""
    import socket
    import struct

    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    sock = trio.socket.socket()
    await sock.connect((host, int(port)))
    await sock.send(b"GET /bus HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"Sec-WebSocket-Version: 13\r\n\r\n")
    await trio.sleep(wait_s)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_peers_that_reset_during_or_right_after_the_handshake_cost_the_hub_nothing():
    async with hub_env() as env:
        for i in range(30):
            await _upgrade_then_reset(env.url, wait_s=(i % 3) * 0.001)
        await trio.sleep(0.2)
        await env.still_talking()
        async with authed(env.url, "after") as ws:  # and new peers still get in
            assert ws is not None
