"""Owns the bus client: batching writer, reader, requests, reconnect-and-resume, statistics.

A thin trio shell around bus.conn. Sends only append to the session's queue and wake the one
writer task, which coalesces everything queued into one frame (so batching adds no latency
when idle: a lone message goes out at the next scheduling tick). A dropped connection is
redialled with backoff and resumed within the hub's resume window: unacknowledged envelopes are
resent both ways and duplicates dropped, so each message reaches the application once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import attrs
import trio

from bus import codec as C
from bus.config import ClientConfig
from bus.conn import BusConn, Role, SeqState, Welcome
from bus.errors import (
    CLOSE_KEEPALIVE,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    FINAL_CLOSE_CODES,
    BodyTooLargeError,
    BusAuthError,
    BusBrokenError,
    BusClosedError,
    BusError,
    BusNoRouteError,
    BusRemoteError,
    BusTimeoutError,
    ProtocolError,
    describe_close,
)
from bus.local import LocalHub, LocalWs
from bus.logs import get_logger
from bus.writer import WriterWake, write_frames
from bus.ws import WsClosed, WsConnection, WsHandshakeError, connect_failure, open_ws

_Ws = WsConnection | LocalWs

_KIND_NAME = {C.SEND: "send", C.PUBLISH: "publish", C.REQUEST: "request"}
YIELD_EVERY = 64  # sends/receives between schedule points (see BusClient._maybe_yield)
# 256 filled bigger frames (~210k vs ~195k routed msgs/s) but the first message of a burst
# waited for the whole burst: bench/bus.py p99 at half rate went 5.2-6.2 ms -> 2.7-4.4 ms.


def _log() -> Any:
    # Looked up per use (connects, reconnects: never per message) so configure_logging applies.
    return get_logger("bus.client")


@attrs.frozen(kw_only=True)
class Message:
    """A message delivered to this client."""

    kind: str  # "send", "publish" or "request" (answer a request with reply/reply_error)
    source: str  # the sender's endpoint id, stamped by the hub
    dest: str  # our endpoint id, a claimed alias, or the topic published to
    correlation_id: int  # non-zero for requests
    body: bytes  # msgpack, as the sender encoded it

    def payload(self) -> Any:
        """The decoded body. Raises ValueError when it is not valid msgpack."""
        return C.unpack_body(self.body)


_new = object.__new__
_set = object.__setattr__


def _message(kind: str, source: str, dest: str, corr: int, body: bytes) -> Message:
    """Message(...) without attrs' per-field frozen-setattr wrapper: the reader's hot path."""
    m = _new(Message)
    _set(m, "kind", kind)
    _set(m, "source", source)
    _set(m, "dest", dest)
    _set(m, "correlation_id", corr)
    _set(m, "body", body)
    return m  # type: ignore[no-any-return]


@attrs.frozen(kw_only=True)
class ClientStatistics:
    connected: bool
    session: str
    sent: int  # envelopes queued by this client (messages, replies, control)
    received: int  # messages delivered to the inbox
    frames_out: int
    frames_in: int
    unacked: int  # envelopes queued or in flight that the hub has not acknowledged
    inbox: int
    pending_requests: int
    reconnects: int
    duplicates: int  # resent envelopes dropped after a resume
    no_route: int  # sends the hub could not deliver (requests raise instead)
    late_replies: int  # replies that came after their request timed out


class _Waiter:
    __slots__ = ("event", "value", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class _LinkEnd(Exception):
    """Internal: why the current connection ended (never escapes this module)."""

    def __init__(self, reason: str, *, code: int | None = None, final: BusError | None = None,
                 clean: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.final = final  # set when the session cannot be resumed
        self.clean = clean  # True iff we asked to close and the hub agreed


class BusClient:
    """One endpoint on the bus. Make it with `open_bus_client`."""

    def __init__(self, url: str, *, token: str, endpoint_id: str, config: ClientConfig,
                 local: LocalHub | None = None) -> None:
        self.url = url
        self._local = local  # the hub in this process, reached over memory channels; or None
        self.endpoint_id = endpoint_id
        self.config = config
        self._token = token
        self._seq = SeqState()
        self._session = ""
        self._resume_window = 0.0
        self._conn: BusConn | None = None
        self._error: BusError | None = None  # set once: every later call raises it
        self._closing = False
        self._done = trio.Event()  # set when the connection task has finished
        # Bounded by config.inbox_size: the reader stops reading the socket while it is full
        # (it may overshoot by the one frame it was handling, at most max_envelopes).
        self._inbox: deque[Message] = deque()
        self._inbox_lot = trio.lowlevel.ParkingLot()  # receivers waiting for a message
        self._reader_lot = trio.lowlevel.ParkingLot()  # the reader waiting for inbox room
        self._space_lot = trio.lowlevel.ParkingLot()  # senders waiting for outbound room
        self._writer_wake = WriterWake()
        self._waiters: dict[int, _Waiter] = {}
        self._next_corr = 1
        self._last_rx = 0.0
        self._conn_ok = False  # True iff the latest dial reached WELCOME
        self._reader_blocked = False  # True iff the reader waits for inbox room (not reading)
        self._unyielded = 0  # sends/receives since this client last yielded to the scheduler
        self._max_body = C.envelope_size_limit(config.limits)
        self._sent = self._received = self._frames_out = self._frames_in = 0
        self._reconnects = self._no_route = self._late = self._dups = 0

    # ------------------------------------------------------------------ public API

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            connected=self._conn is not None, session=self._session, sent=self._sent,
            received=self._received, frames_out=self._frames_out, frames_in=self._frames_in,
            unacked=self._seq.unacked, inbox=len(self._inbox),
            pending_requests=len(self._waiters), reconnects=self._reconnects,
            duplicates=self._dups + (self._conn.duplicates if self._conn else 0),
            no_route=self._no_route, late_replies=self._late)

    async def send(self, dest: str, body: Any) -> None:
        """Send `body` to the endpoint id `dest`. Blocks while the outbound queue is full.
        A destination nobody holds is counted in statistics().no_route (use request() to be
        told). Raises BusClosedError, BusBrokenError, TypeError for a body msgpack rejects."""
        await self._put(C.SEND, dest, 0, C.pack_body(body))

    def send_nowait(self, dest: str, body: Any) -> None:
        """send() without waiting; raises trio.WouldBlock when the outbound queue is full."""
        self._put_nowait(C.SEND, dest, 0, C.pack_body(body))

    async def publish(self, topic: str, body: Any) -> None:
        """Publish to a topic (dot-separated segments, no wildcards). Raises ValueError for a
        bad topic, BusClosedError, BusBrokenError."""
        _user_check(C.check_topic, topic)
        await self._put(C.PUBLISH, topic, 0, C.pack_body(body))

    def publish_nowait(self, topic: str, body: Any) -> None:
        _user_check(C.check_topic, topic)
        self._put_nowait(C.PUBLISH, topic, 0, C.pack_body(body))

    async def subscribe(self, pattern: str) -> None:
        """Receive publishes matching `pattern` ('*' = one segment, final '>' = the rest).
        Returns once the hub applied it. Raises ValueError, BusTimeoutError, BusError."""
        _user_check(C.check_pattern, pattern)
        await self._control(C.SUBSCRIBE, pattern)

    async def unsubscribe(self, pattern: str) -> None:
        _user_check(C.check_pattern, pattern)
        await self._control(C.UNSUBSCRIBE, pattern)

    async def claim(self, alias: str) -> None:
        """Route the endpoint id `alias` to this client too (the newest claim wins). Raises
        BusRemoteError('claim_refused') when it is another connected peer's own endpoint id."""
        _user_check(C.check_endpoint_id, alias)
        await self._control(C.CLAIM, alias)

    async def release(self, alias: str) -> None:
        _user_check(C.check_endpoint_id, alias)
        await self._control(C.RELEASE, alias)

    async def request(self, dest: str, body: Any, *, timeout: float) -> Any:  # noqa: ASYNC109 (contract: the deadline travels with the request)
        """Send a request to `dest` and return the decoded reply. Raises BusTimeoutError (no
        reply within `timeout` seconds, queueing included), BusNoRouteError (nobody holds
        `dest`), BusRemoteError (the responder replied with an error), BusClosedError,
        BusBrokenError."""
        data = C.pack_body(body)
        waiter, corr = self._new_waiter()
        try:
            with trio.move_on_after(timeout):
                await self._put(C.REQUEST, dest, corr, data)
                await waiter.event.wait()
            if not waiter.event.is_set():
                raise BusTimeoutError(f"no reply from {dest!r} within {timeout:g}s")
        finally:
            self._waiters.pop(corr, None)
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    async def reply(self, msg: Message, body: Any) -> None:
        """Answer a request message. Raises ValueError if `msg` is not a request."""
        await self._put(C.REPLY, msg.source, _corr_of(msg), C.pack_body(body))

    async def reply_error(self, msg: Message, code: str, message: str) -> None:
        """Answer a request with an error; the requester's request() raises BusRemoteError."""
        await self._put(C.ERROR, msg.source, _corr_of(msg),
                        C.pack_body([str(code), str(message)]))

    async def receive(self) -> Message:
        """The next message. Raises BusClosedError after you closed the client, or the error
        that broke it (BusBrokenError, BusAuthError, ProtocolError) once the inbox is empty."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._inbox:
            while not self._inbox:
                if self._error is not None:
                    raise self._error
                await self._inbox_lot.park()
            self._unyielded = 0
            return self._take()
        msg = self._take()
        await self._maybe_yield()
        return msg

    def receive_nowait(self) -> Message:
        """A message if one is waiting; raises trio.WouldBlock otherwise."""
        if not self._inbox:
            if self._error is not None:
                raise self._error
            raise trio.WouldBlock
        return self._take()

    def __aiter__(self) -> BusClient:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except BusClosedError:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        """Flush what is queued, end the session with BYE and wait (bounded by
        config.close_timeout) for the hub to close. Idempotent; never raises BusError."""
        if self._closing:
            await self._done.wait()
            return
        self._closing = True
        with trio.CancelScope(shield=True) as cs:
            cs.deadline = trio.current_time() + self.config.close_timeout
            if self._error is None and self._conn is not None:
                self._seq.queue(C.BYE, "", "", 0, C.pack_body(None))
                self._wake_writer()
                await self._done.wait()
        self._fail(BusClosedError("this bus client was closed; open a new one"))

    # ------------------------------------------------------------------ queueing

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise BusClosedError("this bus client is closing; open a new one")

    def _put_nowait(self, kind: int, dest: str, corr: int, body: bytes) -> None:
        self._check_usable()
        if len(body) > self._max_body:
            raise BodyTooLargeError(len(body), self._max_body)
        if not dest:
            raise ValueError("a message needs a destination")
        if self._seq.unacked >= self.config.max_outbound:
            raise trio.WouldBlock
        self._seq.queue(kind, "", dest, corr, body)
        self._sent += 1
        self._wake_writer()

    async def _put(self, kind: int, dest: str, corr: int, body: bytes) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                self._put_nowait(kind, dest, corr, body)
            except trio.WouldBlock:
                await self._space_lot.park()  # woken when acks free room, or on failure
                self._unyielded = 0
                continue
            break
        await self._maybe_yield()

    async def _maybe_yield(self) -> None:
        """A schedule point every YIELD_EVERY sends/receives, not on each: a task sending in a
        loop then fills whole frames instead of handing the writer one message at a time
        (measured: ~15k msgs/s with a yield per send). Every call is still a cancel point."""
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _new_waiter(self) -> tuple[_Waiter, int]:
        corr = self._next_corr
        self._next_corr = corr + 1
        waiter = _Waiter()
        self._waiters[corr] = waiter
        return waiter, corr

    async def _control(self, kind: int, name: str) -> None:
        waiter, corr = self._new_waiter()
        try:
            with trio.move_on_after(self.config.control_timeout):
                await self._put(kind, name, corr, b"\xc0")
                await waiter.event.wait()
            if not waiter.event.is_set():
                raise BusTimeoutError(f"the hub did not confirm {C.KIND_NAMES[kind]} {name!r} "
                                      f"within {self.config.control_timeout:g}s")
        finally:
            self._waiters.pop(corr, None)
        if waiter.error is not None:
            raise waiter.error

    def _take(self) -> Message:
        msg = self._inbox.popleft()
        if self._reader_blocked and len(self._inbox) < self.config.inbox_size:
            self._reader_lot.unpark_all()
        return msg

    def _wake_writer(self) -> None:
        if self._writer_wake.parked:  # checked here: this runs once per message sent
            self._writer_wake.wake()

    def _fail(self, exc: BusError) -> None:
        """Make every current and later call raise `exc` (the first failure wins)."""
        if self._error is None:
            self._error = exc
        for w in self._waiters.values():
            if not w.event.is_set():
                w.error = self._error
                w.event.set()
        self._inbox_lot.unpark_all()
        self._space_lot.unpark_all()
        self._reader_lot.unpark_all()

    # ------------------------------------------------------------------ connection task

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                   ) -> None:
        """Connect, serve, reconnect with backoff while the session can still be resumed."""
        cfg = self.config
        delay = cfg.reconnect_initial
        lost_at: float | None = None
        started = False
        try:
            while True:
                end = await self._connect_once(task_status if not started else None)
                started = True
                if self._conn_ok:  # this connection was up: the outage starts now
                    delay, lost_at = cfg.reconnect_initial, None
                if end.clean:
                    return
                if end.final is not None:
                    _log().warning("bus.client.closed_by_hub", endpoint_id=self.endpoint_id,
                                   code=end.code, reason=end.reason)
                    self._fail(end.final)
                    return
                now = trio.current_time()
                if lost_at is None:
                    lost_at = now
                    _log().info("bus.client.connection_lost", endpoint_id=self.endpoint_id,
                                reason=end.reason, resume_window=self._resume_window)
                if self._closing or now - lost_at >= self._resume_window:
                    self._fail(BusBrokenError(
                        f"connection to {self.url} lost ({end.reason}) and not resumed within "
                        f"the hub's resume window of {self._resume_window:g}s; messages may be "
                        "lost: open a new client", end.code))
                    return
                await trio.sleep(min(delay, max(0.0, lost_at + self._resume_window - now)))
                delay = min(delay * 2, cfg.reconnect_max)
        finally:
            self._conn = None
            self._done.set()

    async def _connect_once(self, task_status: trio.TaskStatus[None] | None) -> _LinkEnd:
        """One connection from dial to end. Before the first WELCOME, failures raise (they
        become open_bus_client's error); afterwards they are returned as a _LinkEnd."""
        self._conn_ok = False
        end: _LinkEnd | None = None
        with trio.CancelScope() as scope:
            try:
                async with self._dial() as ws:
                    conn = await self._handshake(ws)
                    self._conn_ok = True
                    if task_status is not None:
                        task_status.started()
                        task_status = None
                    else:
                        self._reconnects += 1
                        _log().info("bus.client.resumed", endpoint_id=self.endpoint_id,
                                    session=self._session, resent=self._seq.unacked)
                    end = await self._serve(ws, conn)
                    if end.code is not None and end.final is not None and \
                            isinstance(end.final, ProtocolError):
                        with trio.move_on_after(1.0):
                            await ws.aclose(end.code, end.reason[:120])
                    elif not end.clean and end.final is None:
                        scope.cancel()  # a dead link: don't wait for a close handshake
            except _LinkEnd as exc:
                end = exc
            except (WsHandshakeError, OSError, trio.BrokenResourceError) as exc:
                end = _LinkEnd(f"cannot connect to {self.url}: {connect_failure(exc)}")
            except WsClosed as exc:
                end = self._classify_close(exc, during_handshake=True)
        if end is None:  # pragma: no cover - the scope is only cancelled after end is set
            end = _LinkEnd("connection cancelled")
        if task_status is not None:
            # Never connected: the opener sees the reason directly.
            raise end.final if end.final is not None else BusBrokenError(end.reason, end.code)
        return end

    @asynccontextmanager
    async def _dial(self) -> AsyncIterator[_Ws]:
        """A WebSocket to `url`, or a local pair when the hub runs in this process."""
        if self._local is None:
            async with open_ws(self.url, config=self.config.ws_config()) as ws:
                yield ws
            return
        end = self._local.connect_local()
        try:
            yield end
        finally:
            end.close()  # as leaving open_ws does: the hub sees the connection end

    async def _handshake(self, ws: _Ws) -> BusConn:
        conn = BusConn(Role.CLIENT, limits=self.config.limits, seq=self._seq,
                       max_frame_envelopes=self.config.max_frame_envelopes)
        await ws.send_message(conn.hello(token=self._token, endpoint_id=self.endpoint_id,
                                         session=self._session))
        with trio.move_on_after(self.config.ws_config().connect_timeout) as cs:
            data = await ws.get_message()
        if cs.cancelled_caught:
            raise _LinkEnd("the hub sent no welcome in time")
        try:
            welcome = conn.receive_frame(data)[0]
        except ProtocolError as exc:
            raise _LinkEnd(f"bad welcome: {exc}", code=exc.close_code, final=exc) from None
        assert isinstance(welcome, Welcome)
        if self._session and not welcome.resumed:
            raise _LinkEnd("the hub started a new session instead of resuming ours",
                           final=BusBrokenError("session lost: the hub did not resume it; "
                                                "messages may be lost: open a new client"))
        self._session = welcome.session
        self._resume_window = welcome.resume_window
        return conn

    def _classify_close(self, exc: WsClosed, *, during_handshake: bool = False) -> _LinkEnd:
        code, why = describe_close(exc.reason)
        if self._closing and code == CLOSE_NORMAL:
            return _LinkEnd("closed", code=code, clean=True)
        if code == CLOSE_POLICY:
            return _LinkEnd(why, code=code, final=BusAuthError(
                f"the hub at {self.url} refused this client: {why}; check the token "
                "(SWITCHBOARD_TOKEN or --token-file)"))
        if code in FINAL_CLOSE_CODES:
            again = "" if "open a new client" in why else "; open a new client"
            return _LinkEnd(why, code=code, final=BusBrokenError(
                f"the hub closed the session ({code}: {why}){again}", code))
        return _LinkEnd(f"connection closed ({code}: {why})", code=code)

    async def _serve(self, ws: _Ws, conn: BusConn) -> _LinkEnd:
        """Run reader, writer and keepalive for one connection until it ends."""
        self._conn = conn
        self._last_rx = trio.current_time()
        ends: list[_LinkEnd] = []

        async def guard(fn: Any, cancel: trio.CancelScope) -> None:
            try:
                await fn(ws, conn)
            except _LinkEnd as exc:
                ends.append(exc)
            except ProtocolError as exc:
                ends.append(_LinkEnd(str(exc), code=exc.close_code, final=exc))
            except WsClosed as exc:
                ends.append(self._classify_close(exc))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                ends.append(_LinkEnd(f"connection lost: {exc!r}"))
            cancel.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guard, self._writer, nursery.cancel_scope)
                nursery.start_soon(guard, self._keepalive, nursery.cancel_scope)
                nursery.start_soon(guard, self._reader, nursery.cancel_scope)
        finally:
            self._dups += conn.duplicates
            self._conn = None
        return ends[0] if ends else _LinkEnd("connection ended")

    async def _reader(self, ws: _Ws, conn: BusConn) -> None:
        inbox = self._inbox
        limit = self.config.inbox_size
        max_out = self.config.max_outbound
        seq = self._seq
        waiters = self._waiters
        while True:
            if len(inbox) >= limit:  # backpressure: stop reading until the app catches up
                self._reader_blocked = True
                try:
                    while len(inbox) >= limit:
                        await self._reader_lot.park()
                finally:
                    self._reader_blocked = False
                self._last_rx = trio.current_time()  # our silence was not the hub's
            data = await ws.get_message()
            self._last_rx = trio.current_time()
            self._frames_in += 1
            before = len(inbox)
            for env in conn.receive_frame(data):
                kind = env[0]
                if kind <= C.REQUEST:  # SEND, PUBLISH, REQUEST
                    inbox.append(_message(_KIND_NAME[kind], env[2], env[3], env[4], env[5]))
                    continue
                waiter = waiters.get(env[4])
                if kind == C.NOROUTE:
                    if waiter is None:
                        self._no_route += 1
                        continue
                    waiter.error = BusNoRouteError(
                        f"no connected peer holds endpoint id {env[3]!r}")
                elif waiter is None:
                    self._late += 1
                    continue
                elif kind == C.REPLY:
                    try:
                        waiter.value = C.unpack_body(env[5])
                    except ValueError as exc:
                        waiter.error = BusRemoteError("bad_reply", f"reply is not msgpack: {exc}")
                else:  # ERROR
                    waiter.error = _remote_error(env[5])
                waiter.event.set()
            if len(inbox) > before:
                self._received += len(inbox) - before
                self._inbox_lot.unpark_all()
            if seq.unacked < max_out:
                self._space_lot.unpark_all()
            if conn.wants_write():
                self._writer_wake.owe_ack(conn)

    async def _writer(self, ws: _Ws, conn: BusConn) -> None:
        await write_frames(ws, conn, self._writer_wake, ack_delay=self.config.ack_delay,
                           on_frame=self._count_frame_out)

    def _count_frame_out(self) -> None:
        self._frames_out += 1

    async def _keepalive(self, ws: _Ws, conn: BusConn) -> None:
        cfg = self.config
        pinged_for = -1.0
        while True:
            now = trio.current_time()
            quiet_until = self._last_rx + cfg.keepalive_interval
            dead_at = quiet_until + cfg.keepalive_timeout
            if now >= dead_at and not self._reader_blocked:
                raise _LinkEnd(f"nothing heard from the hub for "
                               f"{cfg.keepalive_interval + cfg.keepalive_timeout:g}s",
                               code=CLOSE_KEEPALIVE)
            if now >= quiet_until and pinged_for != self._last_rx:
                pinged_for = self._last_rx
                conn.ping_due = True
                self._wake_writer()
            await trio.sleep_until(max(now + 0.01, dead_at) if pinged_for == self._last_rx
                                   else quiet_until)


def _corr_of(msg: Message) -> int:
    if msg.kind != "request" or not msg.correlation_id:
        raise ValueError(f"only a request can be replied to (this message is a {msg.kind})")
    return msg.correlation_id


def _remote_error(body: bytes) -> BusRemoteError:
    try:
        code, message = C.unpack_body(body)
        return BusRemoteError(str(code), str(message))
    except (ValueError, TypeError):
        return BusRemoteError("bad_error", "the responder sent a malformed error")


def _user_check(check: Any, value: str) -> None:
    """Validate a name the caller gave; a bad one is the caller's ValueError, not a bus error."""
    try:
        check(value)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


def _raise_single(eg: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the one exception inside nested groups (the caller's own error), else the group."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                leaves.append(e)

    walk(eg)
    if len(leaves) == 1:
        exc = leaves[0]
        context = exc.__context__
        try:
            raise exc
        finally:
            exc.__context__ = context
            del exc, context
    raise eg


@asynccontextmanager
async def open_bus_client(url: str, *, token: str, endpoint_id: str,
                          config: ClientConfig = ClientConfig(),
                          local: LocalHub | None = None) -> AsyncIterator[BusClient]:
    """Connect to a hub as `endpoint_id` and yield the client; on exit flush, BYE and close.

    `local`: the hub when it runs in this process (`HubInfo.hub`): the client then talks to it
    over bounded memory channels (bus.local) instead of a WebSocket to `url`, with the same
    protocol (auth, sequencing, acks, resume), errors and API; `url` only names it in errors.

    Raises ValueError for a bad endpoint id, BusAuthError when the hub refuses the token,
    BusBrokenError when the hub cannot be reached, ProtocolError when it speaks nonsense.
    Exceptions from the body propagate unchanged (not wrapped in an ExceptionGroup)."""
    _user_check(C.check_endpoint_id, endpoint_id)
    client = BusClient(url, token=token, endpoint_id=endpoint_id, config=config, local=local)
    try:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(client._run)
            except BaseExceptionGroup as eg:
                _raise_single(eg)
            try:
                yield client
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as eg:
        _raise_single(eg)
