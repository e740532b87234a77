"""Shared fakes for the bus tests: a hub in a nursery, a TCP proxy that can cut or blackhole
links (a real network failure, not a mock), and a raw WebSocket peer for hostile input."""

from __future__ import annotations

from typing import Any

import attrs
import structlog
import trio

from bus import codec as C
from bus.config import HubConfig
from bus.hub import Hub, HubInfo
from bus.ws import WsClosed, WsConnection

TOKEN = "test-token"


async def start_hub(nursery: trio.Nursery, **overrides: Any) -> tuple[Hub, HubInfo]:
    overrides.setdefault("token", TOKEN)
    hub = Hub(HubConfig(**overrides))
    info = await nursery.start(hub.serve)
    return hub, info


def hello(token: str = TOKEN, endpoint_id: str = "raw", session: str = "",
          last_seen: int = 0) -> bytes:
    return C.EnvelopeEncoder().hello(token=token, endpoint_id=endpoint_id, session=session,
                                     last_seen=last_seen)


async def close_code(ws: WsConnection) -> int | None:
    """Read until the connection closes; return the close code the other side sent."""
    try:
        while True:
            await ws.get_message()
    except WsClosed as exc:
        return exc.reason.code if exc.reason else None


def bus_events(captured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in captured if str(e.get("event", "")).startswith("bus.")]


def capture_logs() -> Any:
    return structlog.testing.capture_logs()


@attrs.define(eq=False)
class Proxy:
    """Forwards TCP to `target_port`. `cut()` drops every live link without a WebSocket close
    frame; `blackhole(direction)` silently discards bytes going "up" (to the hub) or "down";
    `refuse = True` makes new connections fail at once."""

    target_port: int
    port: int = 0
    refuse: bool = False
    blocked: set[str] = attrs.field(factory=set)
    links: list[trio.CancelScope] = attrs.field(factory=list)
    accepted: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/bus"

    def cut(self) -> None:
        for scope in self.links:
            scope.cancel()
        self.links.clear()

    def blackhole(self, direction: str) -> None:
        self.blocked.add(direction)

    async def _handle(self, down: trio.SocketStream) -> None:
        self.accepted += 1
        if self.refuse:
            await down.aclose()
            return
        up = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        with trio.CancelScope() as scope:
            self.links.append(scope)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, down, up, "up", scope)
                nursery.start_soon(self._pump, up, down, "down", scope)
        self.blocked.clear()
        with trio.CancelScope(shield=True):
            await up.aclose()
            await down.aclose()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, direction: str,
                    scope: trio.CancelScope) -> None:
        try:
            async for chunk in src:
                if direction in self.blocked:
                    continue
                await dst.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # one side hung up: end the whole link
