"""Owns the one dependency on a WebSocket library (trio-websocket), so it can be swapped.

Everything else in Switchboard imports WebSocket names from here, never from trio_websocket.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio_websocket as _tw
from wsproto.events import BytesMessage as _BytesMessage
from wsproto.events import TextMessage as _TextMessage

# Re-exported names: callers use these, not trio_websocket's.
WsConnection = _tw.WebSocketConnection
WsRequest = _tw.WebSocketRequest
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

    # Bounded: at most this many whole received messages wait for the application;
    # beyond it the reader stops reading and TCP pushes back on the peer.
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


async def serve_ws(
    handler: Callable[[WsRequest], Awaitable[None]],
    host: str,
    port: int,
    *,
    config: WsConfig = WsConfig(),
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve WebSocket connections on host:port until cancelled.

    `task_status.started` receives the bound (host, port) of the first listener, so port 0 works.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    server = _tw.WebSocketServer(
        handler,
        # the library's annotation lists two classes; it calls only accept and aclose
        [_PlainListener(listener) for listener in listeners],  # type: ignore[misc]
        handler_nursery=handler_nursery,
        connect_timeout=config.connect_timeout,
        disconnect_timeout=config.disconnect_timeout,
        **_kw(config),
    )
    sockname = listeners[0].socket.getsockname()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        task_status.started((sockname[0], sockname[1]))


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


def peer_address(conn: WsConnection) -> str:
    """"HOST:PORT" of the peer of a connection `serve_ws` accepted. Raises OSError once the
    peer has reset (getpeername fails)."""
    stream = conn._stream
    assert isinstance(stream, _PlainStream | trio.SocketStream), stream
    host, port, *_ = stream.socket.getpeername()
    return f"{host}:{port}"


class _PlainListener(trio.abc.Listener[trio.abc.HalfCloseableStream]):
    def __init__(self, inner: trio.SocketListener) -> None:
        self._inner = inner
        self.socket = inner.socket

    async def accept(self) -> trio.abc.HalfCloseableStream:
        return _PlainStream(await self._inner.accept())

    async def aclose(self) -> None:
        await self._inner.aclose()


async def send_messages(conn: WsConnection, messages: list[str | bytes]) -> None:
    """Send several WebSocket messages (str: text, bytes: binary) with one write to the socket.

    Each stays its own WebSocket message, so the peer sees exactly what `send_message` per
    message would send; only the syscalls are batched. Raises WsClosed like `send_message`
    (the connection is closed, being closed, or broke while writing).

    Built on trio-websocket's internals (its wsproto connection and stream lock, as its own
    `_send` uses them), so it lives here, beside the one import of the library.
    """
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


def queued_messages(conn: WsConnection) -> int:
    """How many received messages wait for `get_message` (0 for a connection nobody left
    anything unread on: one that may be handed to another user)."""
    return conn._recv_channel.statistics().current_buffer_used


def _dial_timeout_message(timeout: float) -> str:
    # The two phases cannot be told apart from outside trio-websocket's dial: name both.
    return (f"timed out connecting after {timeout:g}s: no TCP connection (a firewall, or a host "
            "that is down?), or the server accepted the connection but did not answer the "
            "WebSocket upgrade (not a WebSocket endpoint?)")


@asynccontextmanager
async def open_ws(
    url: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    config: WsConfig = WsConfig(),
) -> AsyncIterator[WsConnection]:
    """Open a client WebSocket; the whole dial (TCP connect, TLS, the HTTP upgrade) is bounded
    by `config.connect_timeout`.

    Raises WsConnectTimeout past that bound (its text names the bound),
    WsRejected when the server refuses the upgrade, WsHandshakeError / OSError otherwise.
    trio.Cancelled from an enclosing scope propagates as it is.
    """
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
        # trio-websocket swallows a failed TLS handshake and waits out the bound: for wss://,
        # ask the server for TLS once more to say why (a plain ws:// server, most often).
        tls = await _tls_failure(url) if url.startswith("wss://") else None
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


class PrefixedStream(trio.abc.Stream):
    """A stream that first yields bytes already read off `inner` (e.g. an HTTP request head).

    Lets an HTTP server that sniffed `Upgrade: websocket` hand the connection to the
    WebSocket layer without losing what it read.
    """

    def __init__(self, inner: trio.abc.Stream, prefix: bytes) -> None:
        self._inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            if max_bytes is None or max_bytes >= len(self._prefix):
                data, self._prefix = self._prefix, b""
            else:
                data, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            await trio.lowlevel.checkpoint()
            return data
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def socket(self) -> Any:  # trio-websocket reads .socket for local/remote addresses
        return self._inner.socket  # type: ignore[attr-defined]


async def accept_on_stream(
    nursery: trio.Nursery, stream: trio.abc.Stream, prefix: bytes, *, config: WsConfig = WsConfig()
) -> WsRequest:
    """Start the WebSocket handshake on a stream whose first `prefix` bytes were already read.

    Returns the request; await `.accept()` or `.reject(status)` on it.
    """
    return await _tw.wrap_server_stream(nursery, PrefixedStream(stream, prefix), **_kw(config))
