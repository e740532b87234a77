"""Owns the in-process bus transport: a WebSocket stand-in made of two bounded memory channels.

The process that runs a hub can attach its own client to it without a socket
(`open_bus_client(url, ..., local=info.hub)`). Only the transport differs: the client and the
hub run the same `bus.conn` state machine over it (HELLO and token, sequence numbers, acks,
keepalive, resume), exchanging the same frames as bytes, so the semantics are the
WebSocket's. What is saved per frame is the WebSocket framing and masking, two syscalls, the
epoll wakeup and trio-websocket's reader task hop.

`LocalWs` offers the part of `WsConnection` the hub and the client use: `get_message`,
`send_message`, `aclose(code, reason)`, `closed`, `remote`. Closing either end closes the pair:
the peer still receives the frames already queued, then `LocalClosed` (a `WsClosed`, carrying
the close code and reason), as a WebSocket peer would.
"""

from __future__ import annotations

from typing import Protocol

import attrs
import trio

from bus.ws import WsClosed

# Frames waiting per direction, as trio-websocket's message_queue_size (64) for a socket: a
# writer whose peer does not read waits here, as it would on a full TCP window.
LOCAL_QUEUE = 64


@attrs.frozen
class LocalCloseReason:
    """What `WsClosed.reason` holds for a local pair (the fields `describe_close` reads)."""

    code: int | None
    reason: str

    @property
    def name(self) -> str:
        return str(self.code)


class LocalClosed(WsClosed):
    """The local pair is closed (`.reason` is a LocalCloseReason, or None for no code)."""

    def __init__(self, reason: LocalCloseReason | None) -> None:
        # Duck-typed for describe_close (code, reason, name): not trio-websocket's CloseReason,
        # which only bus.ws may import.
        super().__init__(reason)  # type: ignore[arg-type]


@attrs.define(eq=False)
class _Pipe:
    closed: LocalCloseReason | None = None  # set once, by whichever end closes first


class LocalWs:
    """One end of a local pair. Make a pair with `local_ws_pair`."""

    __slots__ = ("_pipe", "_tx", "_rx", "remote")

    def __init__(self, pipe: _Pipe, tx: trio.MemorySendChannel[bytes],
                 rx: trio.MemoryReceiveChannel[bytes], remote: str) -> None:
        self._pipe = pipe
        self._tx = tx
        self._rx = rx
        self.remote = remote

    @property
    def closed(self) -> LocalCloseReason | None:
        return self._pipe.closed

    async def get_message(self) -> bytes:
        """The next frame. Raises LocalClosed once the pair is closed and drained."""
        try:
            return await self._rx.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise LocalClosed(self._pipe.closed) from None

    async def send_message(self, data: bytes) -> None:
        """Queue one frame for the peer; waits while LOCAL_QUEUE frames are unread.
        Raises LocalClosed when the pair is closed."""
        if self._pipe.closed is not None:
            await trio.lowlevel.checkpoint()
            raise LocalClosed(self._pipe.closed)
        try:
            await self._tx.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise LocalClosed(self._pipe.closed) from None

    def close(self, code: int | None = 1000, reason: str = "") -> None:
        """Close the pair (idempotent; the first close's code is the one both ends see)."""
        pipe = self._pipe
        if pipe.closed is None:
            pipe.closed = LocalCloseReason(code, reason)
        self._tx.close()  # the peer drains what we sent, then sees LocalClosed
        self._rx.close()  # the peer's sends (even one blocked on a full queue) see LocalClosed

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        self.close(code, reason or "")
        await trio.lowlevel.checkpoint()


def local_ws_pair(*, queue_size: int = LOCAL_QUEUE, names: tuple[str, str] = ("local", "local")
                  ) -> tuple[LocalWs, LocalWs]:
    """Two connected ends; `names` are what each end reports as its `remote`."""
    a_tx, b_rx = trio.open_memory_channel[bytes](queue_size)
    b_tx, a_rx = trio.open_memory_channel[bytes](queue_size)
    pipe = _Pipe()
    a = LocalWs(pipe, a_tx, a_rx, names[0])
    b = LocalWs(pipe, b_tx, b_rx, names[1])
    return a, b


class LocalHub(Protocol):
    """A hub a client in the same process can attach to (bus.hub.Hub)."""

    def connect_local(self) -> LocalWs:
        """Start serving a new local connection; return the client's end."""
        ...
