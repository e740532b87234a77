"""WebSocket framing (bus.wsframe) as plain tests, and the connection (bus.ws.FastWs) against
raw sockets and the `websockets` library: what another implementation sends must be read."""

from __future__ import annotations

import contextlib
import functools
import os
import struct
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from bus import ws as ws_module
from bus import wsframe as F
from bus.ws import (
    BUSY,
    QUEUED,
    WROTE,
    FastWs,
    WsClosed,
    WsConfig,
    open_ws,
    queued_messages,
    serve_ws,
)


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True,
          rsv: int = 0) -> bytes:
    """A frame built by hand (any flags, including wrong ones)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | rsv | opcode
    b1 = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, b1 | n))
    elif n < 65536:
        head = bytes((b0, b1 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, b1 | 127)) + struct.pack("!Q", n)
    if mask:
        key = os.urandom(4)
        return head + key + F.xor_mask(payload, key)
    return head + payload


def server_parser(max_size: int = 1 << 20) -> F.FrameParser:
    return F.FrameParser(expect_masked=True, max_message_size=max_size)


@given(st.lists(st.one_of(st.binary(max_size=70_000), st.text(max_size=300)), max_size=6),
       st.integers(min_value=1, max_value=5000), st.booleans())
def test_messages_round_trip_whatever_the_read_sizes(messages: list[Any], step: int,
                                                     mask: bool) -> None:
    wire = b"".join(F.encode_message(m, mask=mask) for m in messages)
    parser = F.FrameParser(expect_masked=mask, max_message_size=1 << 20)
    got: list[Any] = []
    for i in range(0, len(wire), step):
        got += parser.feed(wire[i:i + step])
    assert got == messages


def test_fragments_are_joined_and_control_frames_may_come_between_them() -> None:
    p = server_parser()
    wire = (frame(F.OP_TEXT, "héllo ".encode()[:3], fin=False)
            + frame(F.OP_PING, b"are you there")
            + frame(F.OP_CONT, "héllo ".encode()[3:], fin=False)
            + frame(F.OP_CONT, b"world")
            + frame(F.OP_BINARY, b"\x00\x01"))
    assert p.feed(wire) == [F.Ping(b"are you there"), "héllo world", b"\x00\x01"]


def test_a_close_frame_ends_parsing_and_carries_its_code_and_reason() -> None:
    p = server_parser()
    out = p.feed(frame(F.OP_CLOSE, F.close_payload(4000, "done")) + frame(F.OP_TEXT, b"late"))
    assert out == [F.Close(4000, "done")]
    assert p.closed and p.feed(frame(F.OP_TEXT, b"more")) == []
    assert server_parser().feed(frame(F.OP_CLOSE, b"")) == [F.Close(None, "")]


@pytest.mark.parametrize(("wire", "code", "words"), [
    (frame(F.OP_TEXT, b"x", mask=False), 1002, "must be masked"),
    (frame(F.OP_TEXT, b"x", rsv=0x40), 1002, "RSV"),
    (frame(0x3, b"x"), 1002, "unknown data opcode"),
    (frame(0xB, b"x"), 1002, "unknown control opcode"),
    (frame(F.OP_PING, b"x", fin=False), 1002, "fragmented"),
    (frame(F.OP_PING, b"x" * 126), 1002, "over 125"),
    (frame(F.OP_CONT, b"x"), 1002, "no message begun"),
    (frame(F.OP_TEXT, b"x", fin=False) + frame(F.OP_TEXT, b"y"), 1002, "inside a fragmented"),
    (frame(F.OP_TEXT, b"\xff\xfe"), 1007, "UTF-8"),
    (frame(F.OP_CLOSE, b"\x03"), 1002, "one byte"),
    (frame(F.OP_CLOSE, struct.pack("!H", 1005)), 1002, "1005"),
    (frame(F.OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), 1007, "UTF-8"),
    (bytes((0x82, 0x80 | 127)) + struct.pack("!Q", 1 << 63) + b"\0" * 4, 1002, "top bit"),
])
def test_each_broken_rule_names_itself_and_its_close_code(wire: bytes, code: int,
                                                          words: str) -> None:
    with pytest.raises(F.FrameError) as info:
        server_parser().feed(wire)
    assert info.value.code == code and words in info.value.reason


def test_a_message_over_the_limit_is_refused_from_its_header_before_it_is_buffered() -> None:
    p = server_parser(max_size=1000)
    header_only = frame(F.OP_BINARY, b"x" * 5000)[:8]  # the length says 5000; no payload yet
    with pytest.raises(F.FrameError) as info:
        p.feed(header_only)
    assert info.value.code == 1009
    p = server_parser(max_size=1000)  # fragments count together
    with pytest.raises(F.FrameError):
        p.feed(frame(F.OP_BINARY, b"x" * 600, fin=False) + frame(F.OP_CONT, b"x" * 600)[:8])


def test_a_message_in_endless_empty_fragments_is_refused() -> None:
    p = server_parser()
    wire = frame(F.OP_TEXT, b"", fin=False) + frame(F.OP_CONT, b"", fin=False) * F.MAX_FRAGMENTS
    with pytest.raises(F.FrameError) as info:
        p.feed(wire)
    assert info.value.code == 1009 and "fragments" in info.value.reason
    ok = frame(F.OP_TEXT, b"a", fin=False) + frame(F.OP_CONT, b"b", fin=False) * 100 \
        + frame(F.OP_CONT, b"c")
    assert server_parser().feed(ok) == ["a" + "b" * 100 + "c"]


def test_a_server_refuses_masked_frames_from_its_peer_when_it_is_the_client() -> None:
    with pytest.raises(F.FrameError, match="must not be masked"):
        F.FrameParser(expect_masked=False, max_message_size=100).feed(frame(F.OP_TEXT, b"x"))


def test_close_payload_cuts_a_long_reason_without_splitting_a_character() -> None:
    body = F.close_payload(1000, "é" * 100)
    assert len(body) <= 125
    assert F.FrameParser._close(body).reason == "é" * 61
    assert F.close_payload(None, "x") == b"" and F.close_payload(1006, "x") == b""


# ------------------------------------------------------------------ the connection over sockets


async def raw_upgrade(port: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(1)
    assert head.startswith(b"HTTP/1.1 101")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's own example key and accept
    return stream


async def test_a_server_connection_answers_pings_reads_fragments_and_echoes_the_close():
    got: list[Any] = []
    handled = trio.Event()

    async def handler(request: Any) -> None:
        conn = await request.accept()
        try:
            while True:
                got.append(await conn.get_message())
        except WsClosed as exc:
            got.append(exc.reason and exc.reason.code)
        handled.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_ws, handler, "127.0.0.1", 0)
            stream = await raw_upgrade(port)
            await stream.send_all(frame(F.OP_TEXT, b"ab", fin=False) + frame(F.OP_PING, b"p1")
                                  + frame(F.OP_CONT, b"c"))
            parser = F.FrameParser(expect_masked=False, max_message_size=1000)
            out: list[Any] = []
            while not out:
                out += parser.feed(await stream.receive_some())
            assert out == [F.Pong(b"p1")]
            await stream.send_all(frame(F.OP_CLOSE, F.close_payload(4001, "bye")))
            while not parser.closed:
                data = await stream.receive_some()
                assert data, "the server closed without echoing the close"
                out += parser.feed(data)
            assert out[-1] == F.Close(4001, "")
            assert await stream.receive_some() == b""  # then the server closes the TCP side
            await handled.wait()
            nursery.cancel_scope.cancel()
    assert got == ["abc", 4001]


async def test_a_peer_breaking_the_framing_gets_its_close_code_and_the_server_goes_on():
    async def handler(request: Any) -> None:
        conn = await request.accept()
        with pytest.raises(WsClosed) as info:
            await conn.get_message()
        assert info.value.reason is not None and info.value.reason.code == 1002

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_ws, handler, "127.0.0.1", 0)
            stream = await raw_upgrade(port)
            await stream.send_all(frame(F.OP_TEXT, b"unmasked", mask=False))
            parser = F.FrameParser(expect_masked=False, max_message_size=1000)
            out: list[Any] = []
            while not parser.closed:
                data = await stream.receive_some()
                assert data
                out += parser.feed(data)
            assert out[-1].code == 1002 and "masked" in out[-1].reason
            async with open_ws(f"ws://127.0.0.1:{port}/") as conn:  # still serving
                await conn.send_message("fine")
            nursery.cancel_scope.cancel()


async def test_not_an_upgrade_is_answered_400_saying_what_is_missing():
    async def handler(request: Any) -> None:
        raise AssertionError("never called")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_ws, handler, "127.0.0.1", 0)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 400") and b"missing Upgrade: websocket" in answer
            nursery.cancel_scope.cancel()


async def _count_schedule_points(work: Any) -> int:
    """How many times a task that is always runnable ran while `work` ran: the number of
    schedule points `work` passed (trio runs each runnable task once per loop pass)."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()  # the ticker is parked on its own checkpoint
        before = ticks
        await work()
        counted = ticks - before
        nursery.cancel_scope.cancel()
    return counted


async def test_small_frames_read_and_written_at_once_yield_every_few_calls_not_every_call():
    # trio's socket calls yield after every call; ours only when they had to wait, or once a
    # run of calls that did not wait has moved ~4 KiB (a small frame counts ~0.6 KiB). A
    # connection busy with small frames gives up most of those loop passes, and still
    # cannot starve the process: the other tasks run every few calls.
    n = 200
    read_ticks: list[int] = []
    write_ticks: list[int] = []
    served = trio.Event()

    async def handler(request: Any) -> None:
        conn = await request.accept()

        async def read_all() -> None:
            for i in range(n):
                assert await conn.get_message() == f"m{i:03}"

        async def write_all() -> None:
            for i in range(n):
                await conn.send_message(f"w{i:03}")

        await trio.sleep(0.2)  # every frame is in the socket: no read has to wait
        read_ticks.append(await _count_schedule_points(read_all))
        write_ticks.append(await _count_schedule_points(write_all))
        served.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(functools.partial(
                serve_ws, config=WsConfig(receive_buffer_size=64)), handler, "127.0.0.1", 0)
            stream = await raw_upgrade(port)
            await stream.send_all(b"".join(frame(F.OP_TEXT, f"m{i:03}".encode())
                                           for i in range(n)))
            await served.wait()
            nursery.cancel_scope.cancel()
    # 64-byte reads: n * 6 bytes of frames is ~19 reads; n writes of 6 bytes.
    assert 2 <= read_ticks[0] <= 10, read_ticks
    assert n // 12 <= write_ticks[0] <= n // 4, write_ticks


async def test_a_reader_waiting_on_the_socket_ends_when_the_connection_closes_or_resets():
    # The reader parks in wait_readable on the socket itself. Closing the connection from
    # another task (the peer never answers our close) wakes it with WsClosed, and so does a
    # peer that resets the TCP connection (1006): never a hang, never a raw OSError.
    import socket

    outcomes: list[Any] = []
    ended = [trio.Event(), trio.Event()]
    accepted = 0

    async def handler(request: Any) -> None:
        nonlocal accepted
        conn = await request.accept()
        accepted += 1
        first = accepted == 1

        async def read_until_closed() -> None:
            try:
                await conn.get_message()
                outcomes.append("a message?")
            except WsClosed as exc:
                outcomes.append(exc.reason and exc.reason.code)
            ended[len(outcomes) - 1].set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until_closed)
            if first:
                await trio.sleep(0.1)  # the reader is parked on the socket
                await conn.aclose(4000, "bye")  # never answered: the stream closes at 0.3 s

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(functools.partial(
                serve_ws, config=WsConfig(disconnect_timeout=0.3)), handler, "127.0.0.1", 0)
            silent = await raw_upgrade(port)  # reads nothing, answers nothing
            await ended[0].wait()
            resetting = await raw_upgrade(port)
            await trio.sleep(0.2)
            resetting.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
            await resetting.aclose()
            await ended[1].wait()
            await silent.aclose()
            nursery.cancel_scope.cancel()
    assert outcomes == [4000, 1006]


async def test_where_sockets_are_not_file_descriptors_trios_socket_calls_carry_the_frames(
        monkeypatch: pytest.MonkeyPatch):
    # Not POSIX (Windows): no os.read/os.write on a socket, so the connection reads through
    # its stream and writes with trio's socket send. Same messages, same close.
    monkeypatch.setattr(ws_module, "_DIRECT_IO", False)
    monkeypatch.setattr(ws_module, "_os_write", None)  # any direct write would fail

    async def handler(request: Any) -> None:
        conn = await request.accept()
        with contextlib.suppress(WsClosed):
            while True:
                await conn.send_message(await conn.get_message())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_ws, handler, "127.0.0.1", 0)
            async with open_ws(f"ws://127.0.0.1:{port}/") as conn:
                messages: list[str | bytes] = ["one", b"two", "x" * 100_000]
                for m in messages:
                    await conn.send_message(m)
                    assert await conn.get_message() == m
            nursery.cancel_scope.cancel()


async def test_unread_bytes_are_found_on_a_socket_numbered_past_select_limit():
    # The model link's pool asks a link for unread bytes (a server's close, a stray event)
    # before lending it again. select() refuses descriptors numbered 1024 and up, which a
    # process holding ~1,000 connections reaches: the probe then said "nothing unread".
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"this process may open only {hard} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200, hard))
    fillers: list[int] = []
    opened, written = trio.Event(), trio.Event()
    try:
        while not fillers or fillers[-1] < 1030:  # what opens next is numbered past 1024
            fillers.append(os.open(os.devnull, os.O_RDONLY))

        async def handler(request: Any) -> None:
            conn = await request.accept()
            await opened.wait()  # after the handshake: not read along with the upgrade
            await conn.send_message("unasked")
            written.set()
            with contextlib.suppress(WsClosed):  # until the client's close, answered at once
                await conn.get_message()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                _, port = await nursery.start(serve_ws, handler, "127.0.0.1", 0)
                async with open_ws(f"ws://127.0.0.1:{port}/") as conn:
                    assert conn._sock.fileno() >= 1024  # type: ignore[union-attr]
                    opened.set()
                    await written.wait()
                    await trio.sleep(0.1)  # the frame crosses loopback
                    assert queued_messages(conn, probe=False) == 0  # nothing read yet
                    assert queued_messages(conn) == 1  # but the socket holds it
                    assert await conn.get_message() == "unasked"
                nursery.cancel_scope.cancel()
    finally:
        for fd in fillers:
            os.close(fd)
        if soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_write_cancelled_half_way_is_finished_before_the_next_frame():
    # A client that stops reading makes the server's write block part way through a big
    # message; that write is cancelled. What the server sends next (a small message, then
    # its close) must still parse: the rest of the big frame goes first.
    big = b"z" * 8_000_000
    done = trio.Event()

    async def handler(request: Any) -> None:
        conn = await request.accept()
        with trio.move_on_after(0.3):
            await conn.send_message(big)  # blocks: the client is not reading yet
        await conn.send_message("after")
        await done.wait()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_ws, handler, "127.0.0.1", 0)
            async with open_ws(f"ws://127.0.0.1:{port}/",
                               config=WsConfig(max_message_size=10_000_000)) as conn:
                await trio.sleep(0.5)
                assert await conn.get_message() == big
                assert await conn.get_message() == "after"
                done.set()
                with pytest.raises(WsClosed) as info:
                    await conn.get_message()
                assert info.value.reason is not None and info.value.reason.code == 1000
            nursery.cancel_scope.cancel()


async def test_write_now_writes_what_the_socket_takes_and_leaves_the_rest_to_flush():
    """write_now never waits: WROTE when the socket took the messages whole; QUEUED when the
    peer is not reading, the rest held as unsent bytes that flush writes first; BUSY, doing
    nothing, while another write is under way. Every message still parses at the peer."""
    big = b"y" * 24_000_000  # far more than loopback's socket buffers
    got: list[Any] = []
    go, done = trio.Event(), trio.Event()

    async def handler(request: Any) -> None:
        conn = await request.accept()
        await go.wait()  # reads nothing until the client has filled the socket
        for _ in range(4):
            got.append(await conn.get_message())
        done.set()
        with contextlib.suppress(WsClosed):
            await conn.get_message()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(functools.partial(
                serve_ws, config=WsConfig(max_message_size=30_000_000)), handler, "127.0.0.1", 0)
            async with open_ws(f"ws://127.0.0.1:{port}/") as conn:
                assert isinstance(conn, FastWs)
                assert conn.write_now(["small", b"two"]) == WROTE
                assert conn.write_now([big]) == QUEUED
                assert conn.write_now(["later"]) == BUSY  # the rest of `big` goes first
                async with trio.open_nursery() as inner:
                    inner.start_soon(conn.flush)
                    await trio.sleep(0.1)  # the flush waits for the peer, holding the lock
                    assert conn.write_now(["later"]) == BUSY
                    go.set()
                await conn.send_message("last")
                await done.wait()
                assert got == ["small", b"two", big, "last"]
            nursery.cancel_scope.cancel()


async def test_the_websockets_library_talks_to_our_server_both_ways():
    """Another implementation (the one the openai SDK uses) as the client: its masking,
    its pings and its close handshake."""
    from websockets.sync.client import connect

    async def handler(request: Any) -> None:
        conn = await request.accept()
        try:
            while True:
                m = await conn.get_message()
                await conn.send_message(m)
        except WsClosed:
            pass

    def client(port: int) -> list[Any]:
        with connect(f"ws://127.0.0.1:{port}/", compression="deflate") as ws:
            out = []
            for m in ("text", b"\x00bin", "x" * 100_000):
                ws.send(m)
                out.append(ws.recv())
            ws.ping(b"hi").wait(5)
            return out

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(serve_ws, handler, "127.0.0.1", 0)
            out = await trio.to_thread.run_sync(client, port)
            assert out == ["text", b"\x00bin", "x" * 100_000]
            nursery.cancel_scope.cancel()


async def test_a_peer_still_sending_an_oversize_message_gets_its_1009_not_a_reset():
    # The server refuses the message from its header while megabytes of it are still on the
    # way; the peer must still read the 1009. (Closing the socket on unread bytes may reset
    # the connection and destroy the close frame unread: CI saw 1006 once, under load, in
    # test_oversize_frame_closes_1009. The server now drains until the peer closes; this
    # test does not reproduce that race on a quiet machine.)
    async def handler(request: Any) -> None:
        conn = await request.accept()
        with pytest.raises(WsClosed):
            await conn.get_message()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(functools.partial(
                serve_ws, handler, "127.0.0.1", 0, config=WsConfig(max_message_size=1000)))
            async with open_ws(f"ws://127.0.0.1:{port}/") as conn:
                with contextlib.suppress(WsClosed):
                    await conn.send_message(b"x" * 8_000_000)
                with pytest.raises(WsClosed) as info:
                    await conn.get_message()
                assert info.value.reason is not None and info.value.reason.code == 1009
            nursery.cancel_scope.cancel()


async def test_a_dial_to_an_ipv6_literal_sends_a_bracketed_host_header():
    heads: list[Any] = []

    async def handler(request: Any) -> None:
        heads.append(dict(request.headers)[b"host"])
        await request.accept()

    try:
        listeners = await trio.open_tcp_listeners(0, host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = listeners[0].socket.getsockname()[1]
    for listener in listeners:
        await listener.aclose()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_ws, handler, "::1", port)
            async with open_ws(f"ws://[::1]:{port}/"):
                pass
            nursery.cancel_scope.cancel()
    assert heads == [f"[::1]:{port}".encode()]


async def test_a_peer_flooding_pings_and_reading_nothing_cannot_hold_the_server():
    # 60,000 pings of 125 bytes (7.5 MB of pongs if each were answered) and then a message,
    # from a peer that never reads: the server answers the last ping of each burst, stops
    # once a pong cannot be written in time, and still reads the message at once.
    got: list[Any] = []
    done = trio.Event()

    async def handler(request: Any) -> None:
        conn = await request.accept()
        got.append(await conn.get_message())
        done.set()
        await trio.sleep_forever()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            _, port = await nursery.start(functools.partial(
                serve_ws, handler, "127.0.0.1", 0, config=WsConfig(disconnect_timeout=1.0)))
            stream = await raw_upgrade(port)
            ping = frame(F.OP_PING, b"p" * 125)
            nursery.start_soon(stream.send_all, ping * 60_000 + frame(F.OP_TEXT, b"still here"))
            with trio.fail_after(4):
                await done.wait()
            assert got == ["still here"]
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("family,host", [("v4", "127.0.0.1"), ("v6", "::1"), ("name", "localhost")])
async def test_open_tcp_dials_an_address_directly_and_a_name_through_resolution(family, host):
    """A numeric address (v4 or v6) gets a direct connect, a host name trio's resolution; all
    give a SocketStream with TCP_NODELAY, and a refused one is named as refused."""
    import socket

    from bus.ws import connect_failure, open_tcp

    af = socket.AF_INET6 if family == "v6" else socket.AF_INET
    try:
        listeners = await trio.open_tcp_listeners(0, host="::1" if family == "v6" else "127.0.0.1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async def accept_one() -> None:
                conn = await listeners[0].accept()
                await conn.send_all(await conn.receive_some(10))

            nursery.start_soon(accept_one)
            stream = await ws_module.open_tcp(host, port)
            assert stream.socket.family == af
            assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            await stream.send_all(b"ping")
            assert await stream.receive_some(10) == b"ping"
            await stream.aclose()
        await listeners[0].aclose()
        with pytest.raises(OSError) as refused:
            await open_tcp(host, port)  # nothing listens there any more
    assert connect_failure(refused.value).startswith("connection refused")
