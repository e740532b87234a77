"""Owns Switchboard's WebSocket layer, so nothing else depends on a WebSocket library.

Everything else in Switchboard imports WebSocket names from here, never from trio_websocket.

Two implementations behind one interface (`WsConnection`: send_message, get_message, aclose,
closed):
- `FastWs`, for every server (the bus hub, the sim model server) and every ws:// dial: the
  frames of `bus.wsframe` (no I/O) over a trio stream, the HTTP upgrade with h11, and no
  reader task: the task asking for a message reads and parses a whole burst at once, and
  reads and writes the socket itself, with no run-loop pass after a call that did not wait.
  One message per WebSocket message, echoed: ~65k/s against trio-websocket's ~11k on the
  2-core box (`python bench/bus.py` reports both as `raw_fastws_*` and `raw_ws_*`).
- trio-websocket, for wss:// dials: a real provider across the internet over TLS, where
  the network, not the per-message CPU, sets the pace and the mature library handles whatever
  the provider's edge sends.
The errors are trio-websocket's classes on both paths (`WsClosed` carries a CloseReason with
.code, .name, .reason), so callers see one set.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import functools
import hashlib
import ipaddress
import math
import os
import select
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import trio
import trio_websocket as _tw
from wsproto.events import BytesMessage as _BytesMessage
from wsproto.events import TextMessage as _TextMessage

from bus import wsframe as F

# Re-exported names: callers use these, not trio_websocket's.
WsClosed = _tw.ConnectionClosed  # .reason.code / .reason.reason
WsHandshakeError = _tw.HandshakeError
WsRejected = _tw.ConnectionRejected  # .status_code, .headers, .body
WsConnectTimeout = _tw.ConnectionTimeout


# What OpenSSL says when the peer's first bytes are not TLS (a plain-HTTP server answering).
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE",
                      "PACKET_LENGTH_TOO_LONG"})


def connect_failure(exc: BaseException) -> str:
    """Why opening a client WebSocket failed, in words. trio-websocket wraps the network error in
    a bare HandshakeError (its repr says nothing); this names the cause: a refused connection,
    an unknown host, a timeout, or the error's own text."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:  # the exception, its causes and contexts, and the members of any group
        e = todo.pop()
        if any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(c for c in (e.__cause__, e.__context__) if c is not None)
    refused = next((e for e in seen if isinstance(e, ConnectionRefusedError)), None)
    if refused is not None:
        if refused.errno is None and str(refused):  # ours (e.g. an in-process hub), not the OS's
            return str(refused)
        return "connection refused: nothing is listening at that address and port"
    gai = next((e for e in seen if isinstance(e, socket.gaierror)), None)
    if gai is not None:
        return f"cannot resolve the host name ({gai.strerror})"
    tls = next((e for e in seen if isinstance(e, ssl.SSLError)), None)
    if tls is not None and getattr(tls, "reason", None) in _NOT_TLS:
        return (f"the server did not answer in TLS ({tls.reason}): it may speak plain HTTP "
                "there; use http:// (ws://) instead of https:// (wss://)")
    rejected = next((e for e in seen if isinstance(e, WsRejected)), None)
    if rejected is not None:
        status = rejected.status_code
        if status == 404:
            return ("the server answered 404: nothing takes WebSockets at that path; check the "
                    "URL's path (the bus is at /bus, as `orchestrator run` prints its URL)")
        if status in (401, 403):
            return (f"the server refused the upgrade with {status}: a wrong or missing token "
                    "for it?")
        return (f"the server answered HTTP {status} instead of accepting a WebSocket: is "
                "this the right URL?")
    timeout = next((e for e in seen if isinstance(e, (WsConnectTimeout, TimeoutError))), None)
    if timeout is not None:
        if isinstance(timeout, WsConnectTimeout) and str(timeout):  # open_ws's, with the phase
            return str(timeout)
        return "timed out connecting (a firewall, or a host that is down?)"
    told = next((e for e in seen if not isinstance(e, WsHandshakeError) and str(e)), None)
    return str(told) if told is not None else repr(exc)


@attrs.frozen(kw_only=True)
class WsConfig:
    """Transport tuning. The library defaults (queue 1, 4 KiB reads) cost 2x on 10 KB messages."""

    # trio-websocket (wss:// dials): at most this many whole received messages wait for the
    # application; beyond it its reader stops reading and TCP pushes back on the peer. FastWs
    # has no reader task: it reads only when asked, so at most one read's burst waits.
    message_queue_size: int = 64
    max_message_size: int = 4 * 1024 * 1024
    # None lets trio read whatever the kernel has (one syscall per burst, not per 4 KiB).
    receive_buffer_size: int | None = None
    connect_timeout: float = 10.0
    disconnect_timeout: float = 5.0


def _kw(cfg: WsConfig) -> dict[str, Any]:
    return {
        "message_queue_size": cfg.message_queue_size,
        "max_message_size": cfg.max_message_size,
        "receive_buffer_size": cfg.receive_buffer_size,
    }


_RECV_SIZE = 65536  # trio's SocketStream default
_IO_BUDGET = 4096  # see FastWs._recv_direct
_IO_CALL_COST = 512
_os_write = os.write  # a name of this module's, so a test can count the writes
# os.read/os.write on a socket's fd: POSIX only (Windows sockets are not file descriptors)
_DIRECT_IO = os.name == "posix"


# What FastWs.write_now did
WROTE, QUEUED, BUSY = 0, 1, 2

_poll = getattr(select, "poll", None)


def _readable_now(fd: int) -> bool:
    """True iff `fd` has bytes to read, its end, or an error, now. poll, not select: select
    refuses a descriptor numbered 1024 or more (ValueError), which a process holding ~1,000
    connections reaches, and the probe then said "nothing unread" for every link."""
    if fd < 0:
        return False
    if _poll is None:  # no poll (Windows): select, whose limit there is a count, not a number
        return bool(select.select([fd], [], [], 0)[0])
    p = _poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


# What a plain ws:// server answers a TLS ClientHello (a wss:// URL): plain HTTP, which the
# client's TLS layer reports at once as "wrong version number" (connect_failure then says to
# use ws://). Left unanswered, the hello waits for an HTTP line that never comes, and the
# client times out after 10 s saying nothing of TLS.
_NOT_TLS_REPLY = (b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 46\r\n\r\n"
                  b"this server speaks plain ws://, not wss:// TLS")


class _PlainStream(trio.abc.HalfCloseableStream):
    """An accepted TCP stream that ends at once, with _NOT_TLS_REPLY, if it opens with a TLS
    handshake record; otherwise the stream itself."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self._inner = inner
        self._first = True

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._inner.receive_some(max_bytes)
        if self._first and data:
            self._first = False
            if data[:2] == b"\x16\x03":  # TLS record type "handshake", version 3.x
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._inner.send_all(_NOT_TLS_REPLY)
                return b""
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._inner.socket


class FastWs:
    """One WebSocket over a trio stream (see the module's docstring): the frames of
    `bus.wsframe`, read by the task that asks for a message. A task in `get_message` reads
    the socket itself and parses the whole burst it gets, answering pings and the peer's close
    on the way; messages of the burst it does not return wait in a queue for the next call.
    No reader task: nothing is read that nobody asked for, so an application that stops
    reading pushes back on its peer through TCP, and a message costs no hop between tasks.

    Closing: `aclose` sends a close frame, reads (and drops) what comes until the peer's close
    frame or the stream's end, at most `config.disconnect_timeout`, then closes the stream.
    """

    def __init__(self, stream: trio.abc.Stream, *, client: bool, config: WsConfig,
                 trailing: bytes = b"") -> None:
        self._stream = stream
        self._client = client
        self._parser = F.FrameParser(expect_masked=not client,
                                     max_message_size=config.max_message_size)
        self._trailing = trailing  # read with the upgrade: frames the peer sent right after
        self._bufsize = config.receive_buffer_size
        self._disconnect_timeout = config.disconnect_timeout
        self._queue: collections.deque[str | bytes] = collections.deque()
        self._reading = False  # a task is reading the socket
        self._read_done: trio.Event | None = None  # made by a task waiting for that read
        self._send_lock = trio.Lock()
        sock = getattr(stream, "socket", None)
        self._sock: trio.socket.SocketType | None = (
            sock if isinstance(sock, trio.socket.SocketType) else None)
        self._unsent = b""  # the rest of a frame whose write was cancelled half way
        # What socket calls that completed without waiting may still do before one yields
        # (see _recv_direct), so a busy peer cannot starve the process's other tasks.
        self._io_budget = _IO_BUDGET
        self._close_reason: _tw.CloseReason | None = None
        self._close_sent = False
        self._send_broken = False  # a write failed: the peer is gone or reset the connection
        self._pong_stalled = False  # a control frame could not be written in time
        self._ended = False  # nothing more to read: the peer's close, the stream's end, an error
        self._taking = True  # False once aclose began: get_message raises from then on
        self._stream_closed = False

    @property
    def closed(self) -> _tw.CloseReason | None:
        """Why the connection closed (or is closing), or None while it is open as far as what
        was read says."""
        return self._close_reason

    def queued(self, *, probe: bool = True) -> int:
        """Messages read and not taken, plus 1 if the socket has unread bytes (or its end): an
        idle connection the server closed, or wrote to, counts as not empty. `probe=False`
        skips the socket (a syscall) and counts only what was read already."""
        n = len(self._queue)
        if self._trailing:
            return n + 1
        if probe and self._sock is not None and not self._ended:
            with contextlib.suppress(OSError, ValueError):
                if _readable_now(self._sock.fileno()):
                    n += 1
        return n

    async def get_message(self) -> str | bytes:
        """The next message (str: text, bytes: binary). Raises WsClosed once the connection is
        closed and every message received before the close was taken (or `aclose` began)."""
        while True:
            if not self._taking:
                await trio.lowlevel.checkpoint()
                raise WsClosed(self._close_reason)
            if self._queue:
                await trio.lowlevel.checkpoint_if_cancelled()
                return self._queue.popleft()
            if self._ended:
                await trio.lowlevel.checkpoint()
                raise WsClosed(self._close_reason)
            if self._reading:  # another task is reading: take what it finds
                await self._other_read()
                continue
            await self._read_once()

    async def _other_read(self) -> None:
        if self._read_done is None:
            self._read_done = trio.Event()
        await self._read_done.wait()

    async def _read_once(self) -> None:
        self._reading = True
        try:
            data: bytes | bytearray
            if self._trailing:
                data, self._trailing = self._trailing, b""
            else:
                data = await self._recv()
            if not data:
                self._lost()
                return
            try:
                events = self._parser.feed(data)
            except F.FrameError as exc:
                self._ended = True
                await self._fail(exc.code, exc.reason)
                return
            # Only a burst's last ping is answered (RFC 6455 5.5.3 allows it), and none once
            # a pong could not be written in time: a peer flooding pings and reading nothing
            # cannot hold this reader in shielded writes.
            ping: F.Ping | None = None
            for ev in events:
                t = type(ev)
                if t is bytes or t is str:
                    self._queue.append(ev)  # type: ignore[arg-type]
                elif t is F.Ping:
                    ping = ev  # type: ignore[assignment]
                elif t is F.Close:
                    if ping is not None:  # a pong may not follow our close reply
                        await self._pong(ping)
                        ping = None
                    self._ended = True
                    await self._peer_closed(ev)  # type: ignore[arg-type]
            if ping is not None:
                await self._pong(ping)
        finally:
            self._reading = False
            if self._read_done is not None:
                self._read_done.set()
                self._read_done = None

    async def _recv(self) -> bytes | bytearray:
        """The next bytes from the stream; b"" at its end, or when it broke or was closed."""
        sock = self._sock
        if sock is None or not _DIRECT_IO:  # a test's memory stream; not POSIX
            try:
                return await self._stream.receive_some(self._bufsize)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        return await self._recv_direct(sock)

    async def _recv_direct(self, sock: trio.socket.SocketType) -> bytes:
        # trio's socket calls end every call that did not wait with a yield to the scheduler
        # (checkpoint, call, then cancel_shielded_checkpoint): a run-loop pass per read and per
        # write: most of the CPU of a small frame. Here a call that completes at once only
        # checks for cancellation; one that must wait parks in wait_readable, a schedule point;
        # and calls that never waited yield once they have spent _IO_BUDGET (each counts its
        # bytes plus _IO_CALL_COST: a 64 KiB read yields at once, as trio's would, and a run
        # of small frames every ~7 calls). The fd is read from the socket at each call: -1
        # once closed (EBADF, never a number reused by another file).
        await trio.lowlevel.checkpoint_if_cancelled()
        size = self._bufsize or _RECV_SIZE
        while True:
            try:
                data = os.read(sock.fileno(), size)
            except BlockingIOError:
                self._io_budget = _IO_BUDGET
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:  # another task closed the stream
                    return b""
                continue
            except OSError:  # reset, or closed (EBADF): the stream's end, as trio would say
                return b""
            await self._after_io(len(data))
            return data

    async def _after_io(self, nbytes: int) -> None:
        self._io_budget -= nbytes + _IO_CALL_COST
        if self._io_budget < 0:
            self._io_budget = _IO_BUDGET
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def send_message(self, message: str | bytes) -> None:
        """Send one message (str: text, bytes: binary). Raises WsClosed when the connection is
        closed, closing, or breaks while writing."""
        if self._close_reason is not None or self._send_broken:
            raise self._closed_error()
        await self._write(F.encode_message(message, mask=self._client))

    async def send_messages(self, messages: list[str | bytes]) -> None:
        """Several messages, each its own WebSocket message, in one write to the socket."""
        if self._close_reason is not None or self._send_broken:
            raise self._closed_error()
        await self._write(self._encode(messages))

    def _encode(self, messages: list[str | bytes]) -> bytes:
        """`messages` as the bytes of one write, each its own WebSocket message."""
        mask = self._client
        if len(messages) == 1:
            return F.encode_message(messages[0], mask=mask)
        return b"".join([F.encode_message(m, mask=mask) for m in messages])

    def write_now(self, messages: list[str | bytes]) -> int:
        """Write `messages` (each its own WebSocket message) without waiting, when no other
        write is under way: WROTE when the socket took all of it; QUEUED when it took part or
        none, the rest then waiting as unsent bytes (`await flush()` writes them, first); BUSY,
        having done nothing, when another write is in progress or this is not a socket (then
        `send_messages`). No schedule point and no cancel point: a request and its response
        cost no cancel scope around a write that never waits. Raises WsClosed as
        send_message does."""
        if self._close_reason is not None or self._send_broken:
            raise self._closed_error()
        sock = self._sock
        if sock is None or not _DIRECT_IO or self._unsent or self._send_lock.locked():
            return BUSY
        data = self._encode(messages)
        try:
            sent = _os_write(sock.fileno(), data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._send_broken = True
            raise self._closed_error() from None
        self._io_budget -= sent + _IO_CALL_COST
        if sent == len(data):
            return WROTE
        self._unsent = data[sent:]
        return QUEUED

    async def flush(self) -> None:
        """Write the unsent bytes a cut write or `write_now` left. Raises WsClosed."""
        await self._write(b"")

    def _closed_error(self) -> WsClosed:
        """What a send on a closed (or broken) connection raises: why it closed, or 1006."""
        return WsClosed(self._close_reason or _tw.CloseReason(F.CLOSE_ABNORMAL, None))

    async def _write(self, data: bytes) -> None:
        lock = self._send_lock
        try:  # uncontended (the rule): no schedule point of its own, send_all has them
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self._send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            # Only the sending side is known broken: what the peer sent before it went (its
            # close frame, often) is still there to be read, and says why.
            self._send_broken = True
            raise self._closed_error() from None
        finally:
            lock.release()

    async def _send_all(self, data: bytes) -> None:
        # A write cancelled half way (a cancelled task, a timeout) leaves part of a frame on the
        # wire; whatever is sent next (another message, the close frame) would be read as the
        # rest of it. So the unsent rest is kept and goes out first, before anything else.
        if self._unsent:
            data = self._unsent + data
            self._unsent = b""
        sock = self._sock
        if sock is None:  # not a socket: a stream that cannot say how much it sent
            await self._stream.send_all(data)
            return
        view = memoryview(data)
        total = len(data)
        sent = 0
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled task sends nothing
        try:
            while sent < total:
                if not _DIRECT_IO:  # trio's socket call, with its own schedule points
                    sent += await sock.send(view[sent:])
                    continue
                try:  # as _recv_direct: a write that completes at once has no yield
                    sent += _os_write(sock.fileno(), view[sent:])
                except BlockingIOError:
                    self._io_budget = _IO_BUDGET
                    await trio.lowlevel.wait_writable(sock)
            if _DIRECT_IO:
                await self._after_io(total)
        finally:
            if sent < total:
                self._unsent = bytes(view[sent:])

    async def _pong(self, ping: F.Ping) -> None:
        if not self._pong_stalled:
            await self._control(F.OP_PONG, ping.payload)

    async def _control(self, opcode: int, payload: bytes) -> None:
        """A pong or a close: whole or not at all (shielded from the reader's cancel scope,
        bounded by the disconnect timeout), never raising."""
        frame = F.encode_frame(opcode, payload, mask=self._client)
        with trio.CancelScope(shield=True), trio.move_on_after(self._disconnect_timeout) as t, \
                contextlib.suppress(WsClosed):
            await self._write(frame)
        if t.cancelled_caught:  # the peer reads nothing: answer no more pings
            self._pong_stalled = True

    def _lost(self) -> None:
        """The stream broke or ended without a close frame: 1006, as the RFC names it."""
        self._ended = True
        if self._close_reason is None:
            self._close_reason = _tw.CloseReason(F.CLOSE_ABNORMAL, None)

    async def _close_stream(self) -> None:
        self._close_sent = True
        if not self._stream_closed:
            self._stream_closed = True
            await trio.aclose_forcefully(self._stream)

    async def aclose(self, code: int = F.CLOSE_NORMAL, reason: str | None = None) -> None:
        """Close with `code` and `reason`: idempotent; returns once the stream is closed."""
        self._taking = False
        if self._close_reason is None:
            self._close_reason = _tw.CloseReason(code, reason)
        if self._stream_closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            with trio.move_on_after(self._disconnect_timeout):
                if not self._close_sent and not self._ended and not self._send_broken:
                    self._close_sent = True
                    with contextlib.suppress(WsClosed):
                        await self._write(F.encode_frame(
                            F.OP_CLOSE, F.close_payload(code, reason), mask=self._client))
                while not self._ended:  # read up to the peer's close frame, dropping messages
                    if self._reading:
                        await self._other_read()
                    else:
                        await self._read_once()
                    self._queue.clear()
        finally:
            await self._close_stream()

    async def _fail(self, code: int, reason: str) -> None:
        """Our peer broke the protocol: tell it why (best effort) and drop the connection."""
        if self._close_reason is None:
            self._close_reason = _tw.CloseReason(code, reason)
        if not self._close_sent:
            self._close_sent = True
            await self._control(F.OP_CLOSE, F.close_payload(code, reason))
        await self._drain()
        await self._close_stream()

    async def _drain(self) -> None:
        """After a framing error nothing more can be parsed, but closing the socket with the
        peer's bytes still arriving (the rest of an oversize message) would reset the
        connection, and a reset destroys the close frame the peer has not read yet. So: end our
        side (FIN after the close frame), drop what comes until the peer closes, at most the
        disconnect timeout."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
        with trio.move_on_after(self._disconnect_timeout):
            while await self._recv():
                pass

    async def _peer_closed(self, ev: F.Close) -> None:
        code = F.CLOSE_NO_STATUS if ev.code is None else ev.code
        if self._close_reason is None:
            self._close_reason = _tw.CloseReason(code, ev.reason or None)
        if not self._close_sent:  # the peer began the close: answer it with its own code
            self._close_sent = True
            await self._control(F.OP_CLOSE, F.close_payload(ev.code, None))
        if not self._client:  # RFC 6455 7.1.1: the server closes the TCP connection first
            await self._close_stream()


# What the rest of Switchboard calls a WebSocket: ours, or trio-websocket's for a wss:// dial.
WsConnection = FastWs | _tw.WebSocketConnection

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 16 * 1024  # an upgrade request or response head larger than this is refused
_MAX_REJECT_BODY = 64 * 1024


def _accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def _tokens(value: bytes | None) -> set[bytes]:
    return {t.strip().lower() for t in (value or b"").split(b",")}


class WsRequest:
    """An HTTP upgrade request a server read: `path`, `headers` (lower-case names, bytes), and
    `accept()` / `reject(status)`, one of which the handler awaits."""

    def __init__(self, stream: trio.abc.Stream, h11conn: h11.Connection, req: h11.Request,
                 config: WsConfig) -> None:
        self._stream = stream
        self._h11 = h11conn
        self._config = config
        self.path = req.target.decode("latin-1")
        self.headers: list[tuple[bytes, bytes]] = list(req.headers)
        self.connection: FastWs | None = None

    async def accept(self, *, extra_headers: list[tuple[bytes, bytes]] | None = None) -> FastWs:
        """Answer 101 and return the open connection.
        Raises trio.BrokenResourceError (or OSError) when the peer went away meanwhile."""
        key = _header(self.headers, b"sec-websocket-key") or b""
        data = self._h11.send(h11.InformationalResponse(status_code=101, headers=[
            (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", _accept_key(key)), *(extra_headers or [])]))
        trailing, _ = self._h11.trailing_data
        await self._stream.send_all(data or b"")
        conn = FastWs(self._stream, client=False, config=self._config, trailing=bytes(trailing))
        self.connection = conn
        return conn

    async def reject(self, status_code: int, *, extra_headers: list[tuple[bytes, bytes]]
                     | None = None, body: bytes | None = None) -> None:
        """Answer `status_code` with `body` and close the connection."""
        await _send_reject(self._stream, self._h11, status_code, body or b"", extra_headers)


async def _send_reject(stream: trio.abc.Stream, conn: h11.Connection, status: int, body: bytes,
                       extra: list[tuple[bytes, bytes]] | None = None) -> None:
    head = conn.send(h11.Response(status_code=status, headers=[
        (b"content-length", str(len(body)).encode()), (b"connection", b"close"),
        (b"content-type", b"text/plain; charset=utf-8"), *(extra or [])]))
    data = (head or b"") + (conn.send(h11.Data(data=body)) or b"") + (
        conn.send(h11.EndOfMessage()) or b"")
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await stream.send_all(data)
    await trio.aclose_forcefully(stream)


async def _read_upgrade(stream: trio.abc.Stream, prefix: bytes,
                        config: WsConfig) -> WsRequest | None:
    """Read an upgrade request (after `prefix`, bytes of it already read). A request that is
    not a valid WebSocket upgrade is answered 400 (saying what is wrong) and gives None."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
    if prefix:
        conn.receive_data(prefix)  # (b"" would tell h11 the peer closed)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            await _send_reject(stream, h11.Connection(h11.SERVER), 400,
                               f"bad HTTP request: {exc}\n".encode())
            return None
        if event is h11.NEED_DATA:
            data = await stream.receive_some()
            if not data:
                return None
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            break
        return None  # the peer closed, or sent something that is not a request
    headers = list(event.headers)
    problem = None
    if event.method != b"GET":
        problem = "a WebSocket upgrade is a GET"
    elif b"websocket" not in _tokens(_header(headers, b"upgrade")):
        problem = "missing Upgrade: websocket"
    elif b"upgrade" not in _tokens(_header(headers, b"connection")):
        problem = "missing Connection: Upgrade"
    elif _header(headers, b"sec-websocket-version") != b"13":
        problem = "Sec-WebSocket-Version must be 13"
    elif not _header(headers, b"sec-websocket-key"):
        problem = "missing Sec-WebSocket-Key"
    if problem is not None:
        await _send_reject(stream, conn, 400, f"not a WebSocket upgrade: {problem}\n".encode())
        return None
    return WsRequest(stream, conn, event, config)


async def _serve_connection(handler: Callable[[WsRequest], Awaitable[None]],
                            stream: trio.abc.Stream, config: WsConfig) -> None:
    try:
        request = None
        with trio.move_on_after(config.connect_timeout):
            try:
                request = await _read_upgrade(stream, b"", config)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                request = None
        if request is None:  # no valid upgrade in time: the peer's problem alone
            return
        try:
            await handler(request)
        finally:
            if request.connection is not None:
                with trio.move_on_after(config.disconnect_timeout):
                    await request.connection.aclose()
    finally:
        await trio.aclose_forcefully(stream)


async def serve_ws(
    handler: Callable[[WsRequest], Awaitable[None]],
    host: str,
    port: int,
    *,
    config: WsConfig = WsConfig(),
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve WebSocket connections on host:port until cancelled: `handler(request)` for each
    upgrade, in `handler_nursery` (or one of this call's). The connection closes (1000) when
    the handler returns.

    `task_status.started` receives the bound (host, port) of the first listener, so port 0 works.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def one(stream: trio.SocketStream) -> None:
        await _serve_connection(handler, _PlainStream(stream), config)

    sockname = listeners[0].socket.getsockname()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(trio.serve_listeners, one, listeners,
                                              handler_nursery=handler_nursery))
        task_status.started((sockname[0], sockname[1]))


def peer_address(conn: WsConnection) -> str:
    """"HOST:PORT" of the peer of a connection `serve_ws` accepted. Raises OSError once the
    peer has reset (getpeername fails)."""
    stream = conn._stream
    assert isinstance(stream, _PlainStream | trio.SocketStream), stream
    host, port, *_ = stream.socket.getpeername()
    return f"{host}:{port}"


async def send_messages(conn: WsConnection, messages: list[str | bytes]) -> None:
    """Send several WebSocket messages (str: text, bytes: binary) with one write to the socket.

    Each stays its own WebSocket message, so the peer sees exactly what `send_message` per
    message would send; only the syscalls are batched. Raises WsClosed like `send_message`
    (the connection is closed, being closed, or broke while writing).
    """
    if isinstance(conn, FastWs):
        await conn.send_messages(messages)
        return
    # trio-websocket's connection (a wss:// dial): its wsproto connection and stream lock, as
    # its own `_send` uses them
    if conn._close_reason:
        raise WsClosed(conn._close_reason)
    proto = conn._wsproto
    parts = []
    for m in messages:
        if isinstance(m, str):
            parts.append(proto.send(_TextMessage(data=m)))
        elif isinstance(m, bytes):
            parts.append(proto.send(_BytesMessage(data=m)))
        else:
            raise ValueError("message must be str or bytes")
    data = b"".join(parts)
    async with conn._stream_lock:
        try:
            await conn._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await conn._abort_web_socket()
            assert conn._close_reason is not None
            raise WsClosed(conn._close_reason) from None


def queued_messages(conn: WsConnection, *, probe: bool = True) -> int:
    """How many received messages wait for `get_message` (0 for a connection nobody left
    anything unread on: one that may be handed to another user). With `probe=False` bytes
    still unread in the socket are not looked for (no syscall)."""
    if isinstance(conn, FastWs):
        return conn.queued(probe=probe)
    return conn._recv_channel.statistics().current_buffer_used


def _dial_timeout_message(timeout: float) -> str:
    # The two phases cannot be told apart from outside trio-websocket's dial: name both.
    return (f"timed out connecting after {timeout:g}s: no TCP connection (a firewall, or a host "
            "that is down?), or the server accepted the connection but did not answer the "
            "WebSocket upgrade (not a WebSocket endpoint?)")


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP stream to host:port, raising OSError as trio.open_tcp_stream does. A numeric
    address is dialled directly: open_tcp_stream's resolution and happy eyeballs (a nursery,
    a task per address) cost the dialler ~225 us of CPU per connection here (380 against 155
    us for the connect with its accept, 300 loopback dials each), which every model session
    that opens a WebSocket paid. A host name keeps open_tcp_stream (DNS, IPv4/IPv6 racing)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                              socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)  # which sets TCP_NODELAY, as open_tcp_stream's does


async def _dial_fast(url: str, headers: list[tuple[bytes, bytes]] | None,
                     config: WsConfig) -> FastWs:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        stream: trio.abc.Stream = await open_tcp(host, port)
    except OSError as exc:
        raise WsHandshakeError(str(exc)) from exc
    try:
        key = base64.b64encode(os.urandom(16))
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
        name = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets
        hostport = name if parts.port is None else f"{name}:{port}"
        data = conn.send(h11.Request(method=b"GET", target=target.encode(), headers=[
            (b"host", hostport.encode()), (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"), (b"sec-websocket-key", key),
            (b"sec-websocket-version", b"13"), *(headers or [])]))
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(data)
        response = await _read_response(stream, conn)
        if isinstance(response, h11.InformationalResponse) and response.status_code == 101:
            rh = list(response.headers)
            if (b"websocket" not in _tokens(_header(rh, b"upgrade"))
                    or _header(rh, b"sec-websocket-accept") != _accept_key(key)):
                raise WsHandshakeError("the server answered 101 without a valid WebSocket "
                                       "accept (Upgrade / Sec-WebSocket-Accept)")
            trailing, _ = conn.trailing_data
            return FastWs(stream, client=True, config=config, trailing=bytes(trailing))
        body = bytearray()
        while len(body) < _MAX_REJECT_BODY:
            event = await _next_event(stream, conn)
            if isinstance(event, h11.Data):
                body += event.data
            else:
                break
        raise WsRejected(response.status_code, tuple(response.headers), bytes(body))
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise WsHandshakeError(f"the server's answer to the upgrade is not HTTP: {exc}"
                                   ) from None
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise WsHandshakeError("the connection broke during the WebSocket upgrade"
                                   ) from exc
        conn.receive_data(bytes(data))  # b"" tells h11 the server closed


async def _read_response(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    event = await _next_event(stream, conn)
    if isinstance(event, h11.InformationalResponse | h11.Response):
        return event
    raise WsHandshakeError("the server closed the connection without answering the "
                           "WebSocket upgrade")


@asynccontextmanager
async def open_ws(
    url: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    config: WsConfig = WsConfig(),
) -> AsyncIterator[WsConnection]:
    """Open a client WebSocket; the whole dial (TCP connect, TLS, the HTTP upgrade) is bounded
    by `config.connect_timeout`. Closes it (1000) on leaving.

    Raises WsConnectTimeout past that bound (its text names the bound),
    WsRejected when the server refuses the upgrade, WsHandshakeError / OSError otherwise.
    trio.Cancelled from an enclosing scope propagates as it is.
    """
    if url.startswith("wss://"):
        async with _open_tw(url, headers=headers, config=config) as tw:
            yield tw
        return
    conn: FastWs | None = None
    with trio.move_on_after(config.connect_timeout):
        conn = await _dial_fast(url, headers, config)
    if conn is None:
        raise WsConnectTimeout(_dial_timeout_message(config.connect_timeout))
    try:
        yield conn
    finally:
        await conn.aclose()


@asynccontextmanager
async def _open_tw(
    url: str,
    *,
    headers: list[tuple[bytes, bytes]] | None,
    config: WsConfig,
) -> AsyncIterator[_tw.WebSocketConnection]:
    """A wss:// dial through trio-websocket (see the module's docstring)."""
    opened = False
    # trio-websocket 0.12.2 bounds its dial with fail_after, but when the TCP connection is up
    # and the upgrade goes unanswered it catches its own timeout and then waits for its reader
    # task, which reads the silent socket until the peer closes it: possibly never. This scope
    # cuts that wait at the same deadline; both paths end in the one WsConnectTimeout below.
    with trio.move_on_after(config.connect_timeout) as dial:
        try:
            async with _tw.open_websocket_url(
                url,
                extra_headers=headers,
                connect_timeout=config.connect_timeout,
                disconnect_timeout=config.disconnect_timeout,
                **_kw(config),
            ) as conn:
                opened = True
                dial.deadline = math.inf  # the bound is the dial's, never the user's body's
                yield conn
        except WsConnectTimeout:
            if opened:
                raise
    # Not opened: the library timed out, or this scope cut its wait on a silent socket.
    # Caught after opening: the deadline passed as the upgrade finished, before it was lifted,
    # so the body was cancelled at its first checkpoint; that is a dial that ran out of time.
    if not opened or dial.cancelled_caught:
        # trio-websocket swallows a failed TLS handshake and waits out the bound: ask the
        # server for TLS once more to say why (a plain ws:// server, most often).
        tls = await _tls_failure(url)
        raise WsConnectTimeout(_dial_timeout_message(config.connect_timeout)) from tls


TLS_PROBE_S = 2.0


async def _tls_failure(url: str) -> ssl.SSLError | None:
    """The TLS error a handshake with `url`'s server ends in, or None (it succeeds, or it
    cannot even connect, or takes longer than TLS_PROBE_S)."""
    parts = urllib.parse.urlsplit(url)
    with trio.move_on_after(TLS_PROBE_S):
        try:
            stream = await trio.open_ssl_over_tcp_stream(parts.hostname or "", parts.port or 443,
                                                         https_compatible=True)
        except OSError:
            return None
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            return cause if isinstance(cause, ssl.SSLError) else None
        finally:
            await trio.aclose_forcefully(stream)
    return None


async def accept_on_stream(
    stream: trio.abc.Stream, prefix: bytes, *, config: WsConfig = WsConfig()
) -> WsRequest:
    """Read the WebSocket upgrade on a stream whose first `prefix` bytes were already read (an
    HTTP server that sniffed `Upgrade: websocket`).

    Returns the request; await `.accept()` or `.reject(status)` on it. Raises WsHandshakeError
    when it is not a valid upgrade (answered 400 already).
    """
    request = await _read_upgrade(stream, prefix, config)
    if request is None:
        raise WsHandshakeError("not a valid WebSocket upgrade (answered 400)")
    return request
