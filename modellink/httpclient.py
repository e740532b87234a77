"""Owns the model link's HTTP/1.1 client: h11 over trio, TLS optional, one connection kept alive.

Byte counters count what crosses the socket (request head and body, response head and body),
so a benchmark compares the real cost of an HTTP turn with a WebSocket frame's payload.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import urlsplit

import attrs
import h11
import trio

from bus.ws import connect_failure, open_tcp

# One read asks the kernel for up to this much; a 200 KB response body is a few reads.
READ_SIZE = 256 * 1024


class HttpError(Exception):
    """The HTTP exchange failed on the network or broke the protocol (the peer's or network's fault).

    `reusable_failure` is True iff the request failed on a kept-alive connection before any byte of
    a response arrived: the server may have closed an idle connection, so one retry on a new
    connection is safe.
    """

    def __init__(self, message: str, *, reusable_failure: bool = False) -> None:
        super().__init__(message)
        self.reusable_failure = reusable_failure


@attrs.frozen(kw_only=True)
class Origin:
    """Where an endpoint lives: scheme, host, port, and the path prefix (e.g. "/v1")."""

    scheme: str  # "http" | "https"
    host: str
    port: int
    base_path: str

    @classmethod
    def from_url(cls, url: str) -> Origin:
        """Parse an http(s) base URL; raises ValueError saying what to write instead."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"model base_url {url!r} is not an http(s) URL: "
                             "write for example http://127.0.0.1:8000/v1")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(scheme=parts.scheme, host=parts.hostname, port=port,
                   base_path=parts.path.rstrip("/"))

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    def target(self, path: str) -> str:
        """The request target for `path` under the base path ("/responses" -> "/v1/responses")."""
        return self.base_path + path

    def url(self, path: str) -> str:
        """The http(s):// URL for `path` under the base path (for messages)."""
        return f"{self.scheme}://{self.host_header}{self.target(path)}"

    def ws_url(self, path: str) -> str:
        """The ws(s):// URL for `path` under the base path."""
        scheme = "wss" if self.tls else "ws"
        return f"{scheme}://{self.host_header}{self.target(path)}"


@attrs.frozen(kw_only=True)
class ResponseHead:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None


_ssl_context: ssl.SSLContext | None = None


def _client_ssl_context() -> ssl.SSLContext:
    global _ssl_context
    if _ssl_context is None:
        ctx = ssl.create_default_context()
        ctx.set_alpn_protocols(["http/1.1"])
        _ssl_context = ctx
    return _ssl_context


class HttpConnection:
    """One HTTP/1.1 connection: requests go one at a time; kept alive when both sides allow.

    Not safe for concurrent use: a model session runs one turn at a time.
    """

    def __init__(self, origin: Origin, stream: trio.abc.Stream) -> None:
        self.origin = origin
        self._stream = stream
        self._h11 = h11.Connection(h11.CLIENT)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.requests = 0  # True iff > 0: the connection has been used before (a reuse)
        self._closed = False

    @classmethod
    async def connect(cls, origin: Origin, *, timeout_s: float = 10.0,
                      ssl_context: ssl.SSLContext | None = None) -> HttpConnection:
        """Open a TCP (or TLS: the system's CAs unless `ssl_context`) connection.

        Raises HttpError when it cannot (refused, unreachable, timeout, certificate refused).
        """
        try:
            with trio.fail_after(timeout_s):
                if origin.tls:
                    stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                        origin.host, origin.port, ssl_context=ssl_context or _client_ssl_context(),
                        https_compatible=True)
                    await stream.do_handshake()  # type: ignore[attr-defined]
                else:
                    stream = await open_tcp(origin.host, origin.port)
        except trio.TooSlowError:
            raise HttpError(f"connecting to {origin.host}:{origin.port} timed out after "
                            f"{timeout_s}s") from None
        except (OSError, trio.BrokenResourceError) as exc:
            # trio wraps a TLS failure (certificate ...) in Broken: connect_failure names it
            raise HttpError(f"cannot connect to {origin.host}:{origin.port}: "
                            f"{connect_failure(exc)}") from None
        return cls(origin, stream)

    @property
    def reusable(self) -> bool:
        """True iff another request may go on this connection."""
        return not self._closed and self._h11.our_state is h11.IDLE

    async def send_request(self, method: str, path: str, *, headers: list[tuple[str, str]],
                           body: bytes = b"") -> ResponseHead:
        """Send one request with a body and wait for the response head.

        Raises HttpError (network or protocol; see `reusable_failure`).
        """
        reused = self.requests > 0
        self.requests += 1
        all_headers = [("Host", self.origin.host_header), *headers]
        if body or method == "POST":
            all_headers.append(("Content-Length", str(len(body))))
        try:
            data = self._h11.send(h11.Request(method=method, target=self.origin.target(path),
                                              headers=all_headers))
            if body:
                data += self._h11.send(h11.Data(data=body))
            data += self._h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise HttpError(f"cannot send request: {exc}") from None
        received_before = self.bytes_received
        try:
            await self._stream.send_all(data)
            self.bytes_sent += len(data)
            event = await self._next_event()
        except HttpError as exc:
            raise HttpError(str(exc), reusable_failure=reused
                            and self.bytes_received == received_before) from None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._closed = True
            raise HttpError(f"connection to {self.origin.host}:{self.origin.port} failed: "
                            f"{exc!r}", reusable_failure=reused
                            and self.bytes_received == received_before) from None
        while isinstance(event, h11.InformationalResponse):
            event = await self._next_event()
        if not isinstance(event, h11.Response):
            raise HttpError(f"expected a response head, got {type(event).__name__}")
        return ResponseHead(status=event.status_code, headers=tuple(event.headers))

    async def next_body_chunk(self) -> bytes | None:
        """The next piece of the response body, or None at its end. Raises HttpError."""
        event = await self._next_event()
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
                self._h11.start_next_cycle()
            return None
        raise HttpError(f"unexpected {type(event).__name__} in a response body")

    async def read_body(self, *, limit: int = 256 * 1024 * 1024) -> bytes:
        """The whole response body. Raises HttpError (also past `limit` bytes)."""
        parts: list[bytes] = []
        size = 0
        while (chunk := await self.next_body_chunk()) is not None:
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                raise HttpError(f"response body larger than {limit} bytes")
        return b"".join(parts)

    async def _next_event(self) -> Any:
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._closed = True
                raise HttpError(f"the server broke HTTP/1.1: {exc}") from None
            if event is h11.NEED_DATA:
                try:
                    data = await self._stream.receive_some(READ_SIZE)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._closed = True
                    raise HttpError(f"reading from {self.origin.host}:{self.origin.port} "
                                    f"failed: {exc!r}") from None
                self.bytes_received += len(data)
                self._h11.receive_data(data)  # type: ignore[arg-type]
                continue
            if isinstance(event, h11.ConnectionClosed):
                self._closed = True
                raise HttpError("the server closed the connection before the response ended")
            return event

    async def aclose(self) -> None:
        """Close at once (no TLS goodbye): used after a finished exchange and on cancel."""
        self._closed = True
        await trio.aclose_forcefully(self._stream)

    def close_nowait(self) -> None:
        """Close the socket without a checkpoint (for a pool shutting down under a cancel)."""
        self._closed = True
        stream: Any = self._stream
        sock = getattr(stream, "socket", None) or getattr(
            getattr(stream, "transport_stream", None), "socket", None)
        if sock is not None:
            sock.close()
