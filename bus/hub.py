"""Owns the bus hub: sessions, routing (direct, topics, request/reply), claims, slow consumers.

A thin trio shell around bus.conn: per connection one reader task (decode a frame, route every
envelope synchronously, never awaiting per message), one writer task (everything queued for the
session goes out as one frame) and one monitor task (keepalive, slow-consumer timer). Routing
never blocks a sender: envelopes go into the destination session's queue, whose size the
slow-consumer policy bounds (see HubConfig and docs/bus-protocol.md).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import msgpack
import trio

from bus import codec as C
from bus.config import HubConfig
from bus.conn import BusConn, Hello, Role, SeqState, State
from bus.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_KEEPALIVE,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_REPLACED,
    CLOSE_RESUME_REFUSED,
    CLOSE_TRY_LATER,
    ProtocolError,
    describe_close,
)
from bus.local import LocalWs, local_ws_pair
from bus.logs import get_logger
from bus.writer import WriterWake, write_frames
from bus.ws import WsClosed, WsConnection, WsRequest, peer_address, serve_ws

_NIL = b"\xc0"  # msgpack nil: the body of a hub acknowledgement
TOPIC_CACHE_SIZE = 4096  # topics whose subscriber list is cached; cleared wholesale beyond it


def _log() -> Any:
    # Looked up per use (connects, closes: never per message) so configure_logging applies.
    return get_logger("bus.hub")


@attrs.frozen(kw_only=True)
class HubInfo:
    """What `serve_bus` reports once listening."""

    host: str
    port: int
    url: str  # ws://HOST:PORT/bus: give this to open_bus_client
    # The hub itself, for a client in this same process: open_bus_client(url, ...,
    # local=info.hub) talks to it over memory channels instead of a loopback socket.
    hub: Hub | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class HubStatistics:
    sessions: int
    connected: int
    routed: int  # envelopes queued to a destination (a publish counts once per subscriber)
    no_route: int  # sends/requests to an endpoint id nobody holds
    frames_in: int
    frames_out: int
    slow_consumers_closed: int
    protocol_errors: int
    auth_failures: int


@attrs.define(eq=False)
class _Session:
    session_id: str
    endpoint_id: str
    seq: SeqState
    aliases: set[str] = attrs.field(factory=set)
    patterns: set[str] = attrs.field(factory=set)
    link: _Link | None = None
    expiry: trio.CancelScope | None = None
    slow_since: float | None = None  # when the queue went over the soft limit; None if under
    closed: bool = False


@attrs.define(eq=False)
class _Link:
    """One live WebSocket connection."""

    ws: WsConnection | LocalWs
    conn: BusConn
    peer: str
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    session: _Session | None = None
    writer_wake: WriterWake = attrs.field(factory=WriterWake)
    monitor_lot: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    last_rx: float = 0.0
    retired: bool = False  # True once replaced/ended: its tasks must not touch the session
    # (close code or None, reason, log event) once the link is ending; the first reason wins.
    end: tuple[int | None, str, str] | None = None

    def wake(self) -> None:
        self.writer_wake.wake()

    def finish(self, code: int | None, reason: str, event: str) -> None:
        if self.end is None:
            self.end = (code, reason, event)
        self.retired = True
        self.scope.cancel()


class Hub:
    """Routing state of one hub. `serve_bus` is the usual entry point."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.sessions: dict[str, _Session] = {}
        self.routes: dict[str, _Session] = {}  # endpoint id or claimed alias -> session
        self._exact: dict[str, set[_Session]] = {}  # literal pattern -> subscribers
        self._wild: dict[str, set[_Session]] = {}  # wildcard pattern -> subscribers
        self._topic_cache: dict[str, tuple[_Session, ...]] = {}
        self._token = config.token.encode() if config.token is not None else None
        self._nursery: trio.Nursery | None = None
        self.routed = 0
        self.no_route = 0
        self.frames_in = 0
        self.frames_out = 0
        self.slow_closed = 0
        self.protocol_errors = 0
        self.auth_failures = 0

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            sessions=len(self.sessions),
            connected=sum(1 for s in self.sessions.values() if s.link is not None),
            routed=self.routed, no_route=self.no_route, frames_in=self.frames_in,
            frames_out=self.frames_out, slow_consumers_closed=self.slow_closed,
            protocol_errors=self.protocol_errors, auth_failures=self.auth_failures)

    async def serve(self, *, task_status: trio.TaskStatus[HubInfo] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        cfg = self.config
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                host, port = await nursery.start(
                    lambda task_status: serve_ws(self._handle, cfg.host, cfg.port,
                                                 config=cfg.ws_config(), task_status=task_status))
                shown = f"[{host}]" if ":" in host else host
                info = HubInfo(host=host, port=port, url=f"ws://{shown}:{port}{cfg.path}",
                               hub=self)
                _log().info("bus.listening", url=info.url, auth=self._token is not None)
                task_status.started(info)
        finally:
            self._nursery = None

    def connect_local(self) -> LocalWs:
        """A new connection from this process, over memory channels (bus.local): the hub
        serves it like a socket's (handshake, auth, sequencing) in its own nursery. Returns
        the client's end. Raises ConnectionRefusedError when the hub is not serving."""
        if self._nursery is None:
            raise ConnectionRefusedError("the hub is not serving (in-process attach)")
        client_end, hub_end = local_ws_pair(names=("hub", "local"))
        self._nursery.start_soon(self._serve_link, hub_end, "local")
        return client_end

    # ------------------------------------------------------------------ connections

    async def _handle(self, request: WsRequest) -> None:
        try:
            if request.path != self.config.path:
                await request.reject(404, body=f"the bus lives at {self.config.path}\n".encode())
                return
            ws = await request.accept()
            peer = peer_address(ws)  # getpeername: fails once the peer has reset
        except (WsClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # the peer went away mid-handshake: its problem alone (an escape from here would
            # end the listener, and every other peer's connection with it)
            _log().info("bus.handshake_failed", reason=repr(exc))
            return
        await self._serve_link(ws, peer)

    async def _serve_link(self, ws: WsConnection | LocalWs, peer: str) -> None:
        link = _Link(ws=ws, conn=BusConn(Role.HUB, limits=self.config.limits,
                                         max_frame_envelopes=self.config.max_frame_envelopes),
                     peer=peer)
        try:
            with link.scope:
                with self._map_errors(link):
                    await self._run_link(link)
        except BaseException as exc:
            if _only_cancelled(exc):  # the hub is being shut down around us
                link.finish(CLOSE_GOING_AWAY, "hub shutting down", "bus.shutdown")
            else:  # a bug: close 1011 and let it propagate
                link.finish(CLOSE_INTERNAL, f"internal error: {exc!r}", "bus.internal_error")
            raise
        finally:
            with trio.CancelScope(shield=True) as cs:
                cs.deadline = trio.current_time() + self.config.shutdown_grace
                await self._end_link(link)

    @contextmanager
    def _map_errors(self, link: _Link) -> Iterator[None]:
        """Every way a connection ends, translated into (close code, reason, log event)."""
        try:
            yield
        except ProtocolError as exc:
            auth = link.conn.state is not State.OPEN and link.session is None
            link.finish(exc.close_code, str(exc), "bus.auth_failed"
                        if auth and exc.close_code == CLOSE_POLICY else "bus.protocol_error")
        except WsClosed as exc:
            code, text = describe_close(exc.reason)
            link.finish(None, f"peer closed ({code} {text})", "bus.disconnect")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            link.finish(None, f"connection lost: {exc!r}", "bus.disconnect")

    async def _guarded(self, link: _Link, fn: Callable[[_Link], Awaitable[None]]) -> None:
        with self._map_errors(link):
            await fn(link)

    async def _run_link(self, link: _Link) -> None:
        ws, conn = link.ws, link.conn
        data: bytes | str | None = None
        with trio.move_on_after(self.config.handshake_timeout):
            data = await ws.get_message()
        if data is None:
            raise ProtocolError(f"no hello within {self.config.handshake_timeout:g}s",
                                CLOSE_POLICY)
        hello = conn.receive_frame(data)[0]
        assert isinstance(hello, Hello)
        if self._token is not None and not hmac.compare_digest(
                hello.token.encode(), self._token):
            raise ProtocolError("auth failed: wrong or missing token", CLOSE_POLICY)
        welcome = self._attach(link, hello)
        link.last_rx = trio.current_time()
        await ws.send_message(welcome)
        s = link.session
        assert s is not None
        _log().info("bus.connect", peer=link.peer, endpoint_id=s.endpoint_id,
                    session=s.session_id, resumed=hello.session != "")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._guarded, link, self._writer)
            nursery.start_soon(self._guarded, link, self._monitor)
            await self._guarded(link, self._reader)
            nursery.cancel_scope.cancel()

    def _attach(self, link: _Link, hello: Hello) -> bytes:
        """Bind an authenticated connection to a session (resumed or new); returns WELCOME."""
        cfg = self.config
        if hello.session:
            s = self.sessions.get(hello.session)
            if s is None or s.endpoint_id != hello.endpoint_id:
                raise ProtocolError(
                    f"cannot resume session {hello.session!r}: this hub does not have it (it "
                    f"expired after the {cfg.resume_window:g}s resume window, or the hub "
                    "restarted since); open a new client", CLOSE_RESUME_REFUSED)
            if s.expiry is not None:
                s.expiry.cancel()
                s.expiry = None
            old = s.link
            if old is not None:
                old.finish(CLOSE_REPLACED, "session resumed on a newer connection", "bus.replaced")
            welcome = link.conn.accept(hello, s.seq, session=s.session_id, resumed=True,
                                       resume_window=cfg.resume_window)
        else:
            holder = self.routes.get(hello.endpoint_id)
            if holder is not None:
                if holder.endpoint_id == hello.endpoint_id:
                    # Newest wins: a restarted peer must not be locked out by its own ghost.
                    self._discard(holder, CLOSE_REPLACED,
                                  f"endpoint id {hello.endpoint_id!r} taken by a newer connection")
                else:
                    holder.aliases.discard(hello.endpoint_id)
            s = _Session(session_id=secrets.token_urlsafe(12), endpoint_id=hello.endpoint_id,
                         seq=SeqState())
            self.sessions[s.session_id] = s
            self.routes[s.endpoint_id] = s
            welcome = link.conn.accept(hello, s.seq, session=s.session_id, resumed=False,
                                       resume_window=cfg.resume_window)
        s.link = link
        link.session = s
        return welcome

    async def _end_link(self, link: _Link) -> None:
        """Close the socket with the link's code, log one line, then detach or drop the session."""
        code, reason, event = link.end or (CLOSE_INTERNAL, "link ended without a reason",
                                           "bus.disconnect")
        link.retired = True
        s = link.session
        if s is not None and s.link is link:
            s.link = None
            if code == CLOSE_GOING_AWAY:
                await self._flush(link)
            if code in (CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_TRY_LATER) or code is not None \
                    and event == "bus.protocol_error":
                self._discard(s, None, reason)
            elif not s.closed:
                self._detach(s)
        log = _log()
        fields = {"peer": link.peer, "code": code, "reason": reason}
        if s is not None:
            fields.update(endpoint_id=s.endpoint_id, session=s.session_id)
        if event == "bus.internal_error":
            log.error(event, **fields)
        elif event in ("bus.protocol_error", "bus.auth_failed", "bus.slow_consumer",
                       "bus.keepalive_timeout"):
            if event == "bus.auth_failed":
                self.auth_failures += 1
            elif event == "bus.protocol_error":
                self.protocol_errors += 1
            log.warning(event, **fields)
        else:
            log.info(event, **fields)
        if code is not None and link.ws.closed is None:
            with trio.move_on_after(self.config.shutdown_grace):
                try:
                    await link.ws.aclose(code, reason[:120])
                except (WsClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    async def _flush(self, link: _Link) -> None:
        try:
            while (data := link.conn.data_to_send()) is not None:
                await link.ws.send_message(data)
        except (WsClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    def _detach(self, s: _Session) -> None:
        """The connection dropped without BYE: keep the session for resume_window seconds."""
        if self._nursery is None:  # pragma: no cover - serve() always sets it
            return
        scope = trio.CancelScope()
        s.expiry = scope

        async def expire() -> None:
            with scope:
                await trio.sleep(self.config.resume_window)
                if s.link is None and not s.closed:
                    _log().info("bus.session_expired", endpoint_id=s.endpoint_id,
                                session=s.session_id, unacked=s.seq.unacked)
                    self._discard(s, None, "resume window passed")

        self._nursery.start_soon(expire)

    def _discard(self, s: _Session, code: int | None, reason: str) -> None:
        """Forget a session: routes, claims, subscriptions; answer its queued requests NOROUTE."""
        if s.closed:
            return
        s.closed = True
        self.sessions.pop(s.session_id, None)
        for name in (s.endpoint_id, *s.aliases):
            if self.routes.get(name) is s:
                del self.routes[name]
        for p in list(s.patterns):
            self._unsubscribe(s, p)
        if s.expiry is not None:
            s.expiry.cancel()
        for data in s.seq.take_unacked():
            kind, _, source, dest, corr, _ = msgpack.unpackb(data, use_list=False, raw=False)
            if kind == C.REQUEST:
                self._no_route(source, dest, corr)
        if code is not None and s.link is not None:
            s.link.finish(code, reason, "bus.replaced" if code == CLOSE_REPLACED
                          else "bus.slow_consumer")

    # ------------------------------------------------------------------ tasks per link

    async def _reader(self, link: _Link) -> None:
        ws, conn = link.ws, link.conn
        s = link.session
        assert s is not None
        cfg = self.config
        route = self._route
        while True:
            data = await ws.get_message()
            if link.retired:
                return
            link.last_rx = trio.current_time()
            self.frames_in += 1
            for env in conn.receive_frame(data):
                route(s, env)
            if s.slow_since is not None and s.seq.unacked <= cfg.max_pending_msgs \
                    and s.seq.unacked_bytes <= cfg.max_pending_bytes:
                s.slow_since = None
            if conn.state is State.CLOSED:  # BYE: flush what it is owed, then close 1000
                await self._flush(link)
                link.finish(CLOSE_NORMAL, "bye", "bus.disconnect")
                return
            link.writer_wake.owe_ack(conn)  # we owe an ACK for this frame

    async def _writer(self, link: _Link) -> None:
        await write_frames(link.ws, link.conn, link.writer_wake, ack_delay=self.config.ack_delay,
                           on_frame=self._count_frame_out, stop=lambda: link.retired)

    def _count_frame_out(self) -> None:
        self.frames_out += 1

    async def _monitor(self, link: _Link) -> None:
        """Keepalive and the slow-consumer timer for one link."""
        cfg = self.config
        s = link.session
        assert s is not None
        pinged_for = -1.0  # last_rx value we already sent a PING for
        while True:
            now = trio.current_time()
            quiet_until = link.last_rx + cfg.keepalive_interval
            dead_at = quiet_until + cfg.keepalive_timeout
            if now >= dead_at:
                link.finish(CLOSE_KEEPALIVE, f"no frame from the peer for "
                            f"{cfg.keepalive_interval + cfg.keepalive_timeout:g}s",
                            "bus.keepalive_timeout")
                return
            if now >= quiet_until and pinged_for != link.last_rx:
                pinged_for = link.last_rx
                link.conn.ping_due = True
                link.wake()
            wake_at = dead_at if pinged_for == link.last_rx else quiet_until
            if s.slow_since is not None:
                over_at = s.slow_since + cfg.slow_consumer_grace
                if now >= over_at:
                    self._slow(s, f"more than {cfg.max_pending_msgs} messages or "
                               f"{cfg.max_pending_bytes} bytes unacknowledged for "
                               f"{cfg.slow_consumer_grace:g}s")
                    return
                wake_at = min(wake_at, over_at)
            with trio.move_on_at(wake_at):
                await link.monitor_lot.park()

    def _slow(self, s: _Session, reason: str) -> None:
        self.slow_closed += 1
        self._discard(s, CLOSE_TRY_LATER, f"slow consumer: {reason}")

    # ------------------------------------------------------------------ routing (no awaits)

    def _deliver(self, s: _Session, kind: int, source: str, dest: str, corr: int,
                 body: bytes) -> None:
        seq = s.seq
        seq.queue(kind, source, dest, corr, body)
        self.routed += 1
        link = s.link
        if link is not None and link.writer_wake.parked:  # once per routed message: no call
            link.wake()
        cfg = self.config
        held = len(seq.pending) + len(seq.inflight)
        if held > cfg.max_pending_msgs or seq.unacked_bytes > cfg.max_pending_bytes:
            if held > 2 * cfg.max_pending_msgs or \
                    seq.unacked_bytes > 2 * cfg.max_pending_bytes:
                self._slow(s, f"{held} messages ({seq.unacked_bytes} bytes) "
                           "unacknowledged, over twice the limit")
            elif s.slow_since is None:
                s.slow_since = trio.current_time()
                if link is not None:
                    link.monitor_lot.unpark_all()

    def _no_route(self, requester: str, dest: str, corr: int) -> None:
        self.no_route += 1
        s = self.routes.get(requester)
        if s is not None and not s.closed:
            self._deliver(s, C.NOROUTE, "", dest, corr, _NIL)

    def _answer(self, s: _Session, corr: int, error: tuple[str, str] | None = None) -> None:
        if error is None:
            self._deliver(s, C.REPLY, "", s.endpoint_id, corr, _NIL)
        else:
            self._deliver(s, C.ERROR, "", s.endpoint_id, corr, C.pack_body(list(error)))

    def _route(self, s: _Session, env: tuple[Any, ...]) -> None:
        kind, _, _, dest, corr, body = env
        if s.closed:
            return
        source = s.endpoint_id
        if kind == C.PUBLISH:
            targets = self._topic_cache.get(dest)
            if targets is None:
                targets = self._subscribers(dest)
            for t in targets:
                if not t.closed:
                    self._deliver(t, C.PUBLISH, source, dest, 0, body)
            return
        if kind <= C.ERROR:  # SEND, REQUEST, REPLY, ERROR: direct
            target = self.routes.get(dest)
            if target is None:
                if kind == C.SEND or kind == C.REQUEST:
                    self._no_route(source, dest, corr)
                return  # a reply for a requester that is gone: nobody is waiting
            self._deliver(target, kind, source, dest, corr, body)
            return
        if kind == C.SUBSCRIBE:
            if dest not in s.patterns:
                s.patterns.add(dest)
                table = self._wild if C.is_wildcard(dest) else self._exact
                table.setdefault(dest, set()).add(s)
                self._topic_cache.clear()
            self._answer(s, corr)
        elif kind == C.UNSUBSCRIBE:
            self._unsubscribe(s, dest)
            self._answer(s, corr)
        elif kind == C.CLAIM:
            holder = self.routes.get(dest)
            if holder is not None and holder is not s and holder.endpoint_id == dest:
                self._answer(s, corr, ("claim_refused", f"{dest!r} is the endpoint id of a "
                                       "connected peer; claim an alias nobody connects as"))
                return
            if holder is not None and holder is not s:
                holder.aliases.discard(dest)  # newest claim wins (a retried task moves)
            if dest != s.endpoint_id:
                s.aliases.add(dest)
            self.routes[dest] = s
            self._answer(s, corr)
        elif kind == C.RELEASE:
            if dest in s.aliases:
                s.aliases.discard(dest)
                if self.routes.get(dest) is s:
                    del self.routes[dest]
            self._answer(s, corr)
        # BYE needs no routing: the reader closes the link after it.

    def _unsubscribe(self, s: _Session, pattern: str) -> None:
        if pattern not in s.patterns:
            return
        s.patterns.discard(pattern)
        table = self._wild if C.is_wildcard(pattern) else self._exact
        subs = table.get(pattern)
        if subs is not None:
            subs.discard(s)
            if not subs:
                del table[pattern]
        self._topic_cache.clear()

    def _subscribers(self, topic: str) -> tuple[_Session, ...]:
        found: set[_Session] = set(self._exact.get(topic, ()))
        for pattern, subs in self._wild.items():
            if C.pattern_matches(pattern, topic):
                found |= subs
        targets = tuple(found)
        if len(self._topic_cache) >= TOPIC_CACHE_SIZE:
            self._topic_cache.clear()
        self._topic_cache[topic] = targets
        return targets


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


async def serve_bus(config: HubConfig, *,
                    task_status: trio.TaskStatus[HubInfo] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a hub until cancelled. `task_status.started` gets HubInfo(host, port, url).

    On cancel it flushes what each connection is owed and closes it with 1001 (bounded by
    `config.shutdown_grace`). Raises OSError if it cannot listen."""
    await Hub(config).serve(task_status=task_status)
