"""Owns the model session: one persistent link per agent session, the context sent as deltas.

Transports behind one `ModelSession.turn`:
  * "ws": one WebSocket kept for the session (GET {base_url}/responses); each turn sends
    `response.create` with only the items the server has not seen plus `previous_response_id`.
    When the server no longer holds the context (`previous_response_not_found`, the connection
    dropped, or `websocket_connection_limit_reached` at its age limit) the turn transparently
    sends the full context once (previous_response_id null) and sets `resent_full_context`.
  * "http": POST {base_url}/responses with the full context every turn and store=false, on one
    kept-alive connection (or a new one per turn with `keepalive=False`); `stream=True` reads SSE.
  * "chat": POST {base_url}/chat/completions (non-streaming) for endpoints without /responses
    (llama.cpp server): items map to chat messages and tool calls (modellink.chat).

Cancelling a turn (a trio cancel scope around `turn`) sends `response.cancel` (WS) or closes the
HTTP connection; the session stays usable. The cancelled turn's new items stay in the context
(they happened: a tool ran, the user spoke); its partial output is dropped, and the next turn
continues from the last completed response (`turn([])` asks again without adding anything).
"""

from __future__ import annotations

import collections
import functools
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from bus.logs import get_logger
from bus.ws import (
    BUSY,
    WROTE,
    FastWs,
    WsClosed,
    WsConfig,
    WsConnectTimeout,
    WsHandshakeError,
    WsRejected,
    connect_failure,
    open_ws,
    queued_messages,
)
from modellink import protocol as P
from modellink.chat import chat_body, response_from_chat
from modellink.httpclient import HttpConnection, HttpError, Origin
from modellink.turns import (
    TRANSIENT_STATUSES,
    ContextBook,
    FunctionCall,
    ModelAuthError,
    ModelConnectionError,
    ModelError,
    ModelRequestError,
    ModelServerError,
    TurnResult,
    Usage,
    body_excerpt,
    context_item,
    error_from_event,
    error_from_http,
    parse_retry_after,
    read_response,
    transient,
)

__all__ = [
    "FunctionCall", "ModelAuthError", "ModelConnectionError", "ModelEndpoint", "ModelError",
    "ModelRequestError", "ModelServerError", "ModelSession", "SessionStats", "TurnResult", "Usage",
    "fetch_server_stats", "open_model_session",
]

log = get_logger("modellink.client")

TRANSPORTS = ("ws", "http", "chat")
ENCODINGS = ("msgpack", "json")
# A response.cancel that cannot be written within this long means the link is stuck: drop it.
CANCEL_SEND_TIMEOUT_S = 2.0
# Frames are sent shielded (a send cut in half would corrupt the stream), but never for longer.
SEND_TIMEOUT_S = 30.0
USER_AGENT = "switchboard-modellink/0.1"
# A turn the endpoint refused for now (429, 5xx but 501, rate_limit_exceeded, server_error) is
# sent again after RETRY_BASE_S * 2**n (n = retries so far, times 0.75-1.25, at most
# RETRY_MAX_S), or after the server's Retry-After; one asking for more than RETRY_MAX_S fails
# the turn at once.
RETRY_BASE_S = 0.5
RETRY_MAX_S = 60.0

# Client side: up to 64 whole received events wait for us; beyond that the WebSocket reader stops
# and TCP pushes back on the server. Events are small (deltas), responses are read at once.
_WS_CONFIG = WsConfig(message_queue_size=64, max_message_size=P.MAX_MESSAGE_BYTES)


@functools.lru_cache(maxsize=64)
def _origin(base_url: str) -> Origin:
    # Every session asks (a fleet has a handful of endpoints): parsing the URL each time was
    # ~2% of a one-turn session's CPU. Origin is frozen, so one value serves every caller.
    return Origin.from_url(base_url)


def _one_of(allowed: tuple[str, ...]) -> Any:
    def check(inst: Any, attr: attrs.Attribute[Any], value: Any) -> None:
        if value not in allowed:
            raise ValueError(f"ModelEndpoint.{attr.name} = {value!r} is not allowed: use "
                             + " or ".join(repr(a) for a in allowed))
    return check


@attrs.frozen(kw_only=True)
class ModelEndpoint:
    """Where and how to reach a model. `keepalive` matters for "http" and "chat", `stream` for
    "http" only."""

    base_url: str
    model: str = "sim"
    transport: str = attrs.field(default="ws", validator=_one_of(TRANSPORTS))
    encoding: str = attrs.field(default="msgpack", validator=_one_of(ENCODINGS))
    api_key: str | None = attrs.field(default=None, repr=False)
    keepalive: bool = True
    stream: bool = False
    connect_timeout_s: float = 10.0
    # A closed session hands its healthy WebSocket (or kept-alive HTTP connection) to the
    # run's pool and the next session to the same endpoint takes it instead of connecting.
    reuse_connections: bool = True
    # How many times a turn is sent again after a rate limit or a server error (as OpenAI's
    # SDK, 2), before the error reaches the caller
    retries: int = 2

    @property
    def origin(self) -> Origin:
        return _origin(self.base_url)


@attrs.frozen(kw_only=True)
class SessionStats:
    """Counters over a session's life (`ModelSession.statistics()`)."""

    turns: int
    bytes_sent: int
    bytes_received: int
    connects: int  # connections opened (WS, or HTTP)
    reused: int  # connections taken from the pool instead of opened
    resends: int  # turns that had to resend the full context
    cancelled_turns: int
    retries: int  # turns sent again after a rate limit or a server error


class _LinkLost(Exception):
    """The WebSocket is gone (closed, reset, or at its age limit); the server lost our context."""


@attrs.define(eq=False)
class _WsLink:
    """One WebSocket, held open by a task (in the pool's nursery, or the session's when it is
    not pooled) until `done` is set."""

    conn: Any  # bus.ws.WsConnection
    opened_at: float = 0.0
    done: trio.Event = attrs.Factory(trio.Event)
    dead: bool = False
    # True iff a cancelled response may still send events that must be read before the next turn.
    drain_pending: bool = False
    idle_since: float = 0.0
    # Events of a batched frame not read yet (P.EVENT_BATCH_HEADER): in order, before the next.
    pending: collections.deque[dict[str, Any]] = attrs.Factory(collections.deque)

    @property
    def alive(self) -> bool:
        return not self.dead and self.conn.closed is None

    def close(self) -> None:
        self.dead = True
        self.done.set()


# The pool of idle model WebSockets, per trio run (so per process in practice): a session that
# ends with a healthy connection leaves it here and the next session to the same endpoint takes
# it, saving a TCP connect and an HTTP upgrade on both sides (what the OpenAI Agents SDK's
# responses_websocket_session does). A taken connection starts like a new one: the session's
# first turn sends its whole context with previous_response_id null, so nothing of the previous
# session's server-side cache is ever continued.
# Bounded: idle connections kept per process, oldest closed first, at most this many or as many
# as sessions held at once since the last idle sweep (a worker running 256 one-turn sessions
# at a time otherwise closed ~240 of every 256 it gave back and paid a TCP connect and an
# upgrade, on both sides, for each of the next ones).
POOL_MAX_IDLE = 16
POOL_IDLE_TIMEOUT_S = 60.0
# A connection is not pooled past this age: OpenAI closes at 60 minutes (our server's default
# too); with the margin, a taken connection has minutes left, not seconds.
POOL_MAX_AGE_S = 55 * 60.0


class _WsPool:
    """Idle WebSockets by (url, encoding, credentials); their holders run in its nursery."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self._idle: dict[tuple[str, str, str | None], list[_WsLink]] = {}
        self._count = 0
        self._in_use = 0  # links sessions hold (lent, not yet given back or dropped)
        self._peak = 0  # most held at once since the last sweep: bounds the idle ones
        self._wake = trio.Event()
        # True while the reaper waits with nothing idle to time: only then does a give need
        # to wake it. A link given back is idle since now, never earlier than the one it
        # already times, so waking it on every give (it then scanned every idle link and
        # armed a new timer) bought nothing and cost ~5% of a one-turn session's CPU.
        self._reaper_empty = False
        self.reaper_passes = 0  # times the reaper looked at the idle links (tests count them)
        # Kept-alive HTTP connections get the same treatment (what any HTTP client's pool
        # does), so the HTTP transport is not charged a TCP connect per session that WebSocket
        # sessions no longer pay: (connection, idle since), most recent last.
        self._http: dict[tuple[str, str | None], list[tuple[HttpConnection, float]]] = {}

    def take_http(self, key: tuple[str, str | None]) -> HttpConnection | None:
        conns = self._http.get(key)
        now = trio.current_time()
        while conns:
            conn, since = conns.pop()
            if conn.reusable and now - since < POOL_IDLE_TIMEOUT_S:
                return conn
            self.nursery.start_soon(conn.aclose)
        return None

    def give_http(self, key: tuple[str, str | None], conn: HttpConnection) -> None:
        conns = self._http.setdefault(key, [])
        conns.append((conn, trio.current_time()))
        if len(conns) > POOL_MAX_IDLE:
            self.nursery.start_soon(conns.pop(0)[0].aclose)
        self.wake()

    def close_all_http(self) -> None:
        """Close every idle HTTP connection now (their sockets; no I/O to wait for)."""
        for conns in self._http.values():
            for conn, _ in conns:
                conn.close_nowait()
        self._http.clear()

    def take(self, key: tuple[str, str, str | None]) -> _WsLink | None:
        links = self._idle.get(key)
        now = trio.current_time()
        while links:
            link = links.pop()  # the most recently used: least likely to have gone stale
            self._count -= 1
            if _reusable(link, now):
                return link
            link.close()
        return None

    def lent(self) -> None:
        """A session holds one more link (taken from here or newly opened)."""
        self._in_use += 1
        self._peak = max(self._peak, self._in_use)

    def returned(self) -> None:
        """A session let go of a link it held (gave it back or closed it)."""
        self._in_use -= 1

    def give(self, key: tuple[str, str, str | None], link: _WsLink) -> None:
        if not _reusable(link, trio.current_time(), probe=False):
            link.close()
            return
        link.idle_since = trio.current_time()
        self._idle.setdefault(key, []).append(link)
        self._count += 1
        while self._count > max(POOL_MAX_IDLE, self._peak):
            oldest = min((ls for ls in self._idle.values() if ls), key=lambda ls: ls[0].idle_since)
            oldest.pop(0).close()
            self._count -= 1
        self.wake()

    def wake(self) -> None:
        """Tell the reaper there is something idle to time (only needed while it has none)."""
        if self._reaper_empty:
            self._wake.set()

    async def reap(self) -> None:
        """Close connections idle longer than POOL_IDLE_TIMEOUT_S (or gone bad meanwhile)."""
        while True:
            self.reaper_passes += 1
            now = trio.current_time()
            first = min([link.idle_since for ls in self._idle.values() for link in ls]
                        + [t for cs in self._http.values() for _, t in cs], default=None)
            if first is None:
                self._reaper_empty = True
                try:
                    await self._wake.wait()
                finally:
                    self._reaper_empty = False
                self._wake = trio.Event()
                continue
            if first + POOL_IDLE_TIMEOUT_S > now:
                with trio.move_on_at(first + POOL_IDLE_TIMEOUT_S):
                    await self._wake.wait()
                    self._wake = trio.Event()
                continue
            for hkey, conns in list(self._http.items()):
                fresh = []
                for c, t in conns:
                    if t + POOL_IDLE_TIMEOUT_S > now:
                        fresh.append((c, t))
                    else:
                        c.close_nowait()
                self._http[hkey] = fresh
            for key, links in list(self._idle.items()):
                keep = []
                for ln in links:
                    if ln.idle_since + POOL_IDLE_TIMEOUT_S > now and ln.alive:
                        keep.append(ln)
                    else:
                        ln.close()
                self._count -= len(links) - len(keep)
                if keep:
                    self._idle[key] = keep
                else:
                    del self._idle[key]
            self._peak = self._in_use + self._count


def _reusable(link: _WsLink, now: float, *, probe: bool = True) -> bool:
    """True iff another session may take `link`: open, nothing in flight or unread, young.
    `probe=False` does not ask the socket whether unread bytes wait there (a syscall): give()
    needs no answer, since take() asks before anyone uses the link."""
    return (link.alive and not link.drain_pending and not link.pending
            and queued_messages(link.conn, probe=probe) == 0
            and now - link.opened_at < POOL_MAX_AGE_S)


_POOL: trio.lowlevel.RunVar[_WsPool | None] = trio.lowlevel.RunVar("modellink_ws_pool",
                                                                   default=None)
# Set while the pool's system task starts: sessions asking meanwhile wait for that one pool.
# (Without it, every session opened before the first pool was up started a pool of its own:
# a worker ramping up to 256 sessions had dozens, each session counted as held in the one it
# got but gave its link to the last, whose small peak then closed some of the links given
# back, and the sessions after dialled again, in the worker and the server.)
_POOL_STARTING: trio.lowlevel.RunVar[trio.Event | None] = trio.lowlevel.RunVar(
    "modellink_ws_pool_starting", default=None)


async def _pool() -> _WsPool | None:
    """This run's pool, started on first use in a system task (it outlives every session and is
    cancelled, closing its connections, when the run ends). None while the run is ending."""
    pool = _POOL.get()
    if pool is not None:
        return pool
    ready = _POOL_STARTING.get()
    if ready is None:
        ready = trio.Event()
        _POOL_STARTING.set(ready)
        try:
            trio.lowlevel.spawn_system_task(_serve_pool, ready, name="modellink.ws_pool")
        except RuntimeError:  # the run is shutting down
            _POOL_STARTING.set(None)
            ready.set()
            return None
    await ready.wait()
    return _POOL.get()


async def _serve_pool(ready: trio.Event) -> None:
    """The pool's system task: its nursery holds the pooled connections until the run ends."""
    try:
        async with trio.open_nursery() as nursery:
            pool = _WsPool(nursery)
            _POOL.set(pool)
            ready.set()
            try:
                await pool.reap()
            finally:
                pool.close_all_http()
    except Exception as exc:  # a system task must not raise: give up pooling instead
        log.warning("model.ws_pool_failed", error=repr(exc))
    finally:
        _POOL.set(None)
        _POOL_STARTING.set(None)  # a later session may start a new one
        ready.set()


def _frame_size(frame: str | bytes) -> int:
    if isinstance(frame, str):
        return len(frame) if frame.isascii() else len(frame.encode("utf-8"))
    return len(frame)


async def _hold_ws(url: str, headers: list[tuple[bytes, bytes]], config: WsConfig, *,
                   task_status: trio.TaskStatus[_WsLink] = trio.TASK_STATUS_IGNORED) -> None:
    """Hold one WebSocket open in the pool's or a session's nursery (not in a turn's cancel
    scope) until its link's `done` is set. Never raises once started."""
    started = False
    try:
        async with open_ws(url, headers=headers, config=config) as conn:
            link = _WsLink(conn=conn, opened_at=trio.current_time())
            task_status.started(link)
            started = True
            await link.done.wait()
    except Exception as exc:  # after start, a failed close must not end the session
        if not started:
            raise
        log.debug("model.ws_close_failed", error=repr(exc))


class ModelSession:
    """One agent's conversation with a model. Use `open_model_session`; one turn at a time."""

    def __init__(self, endpoint: ModelEndpoint, nursery: trio.Nursery | None, *,
                 instructions: str | None, tools: list[dict[str, Any]] | None,
                 metadata: dict[str, str] | None, metadata_once: bool = False) -> None:
        self.endpoint = endpoint
        self._origin = endpoint.origin
        self._nursery = nursery
        self._instructions = instructions
        self._tools = list(tools) if tools else None
        self._metadata = dict(metadata) if metadata else None
        self._metadata_once = metadata_once
        self._encoding: P.Encoding = P.JSON if endpoint.encoding == "json" else P.MSGPACK
        self._book = ContextBook()
        self._link: _WsLink | None = None
        self._lent_from: _WsPool | None = None  # the pool counting self._link as held
        self._http: HttpConnection | None = None
        self._busy = False
        self._refused: ModelRequestError | None = None  # why the first dial failed, for now
        self._tx = 0  # this turn's bytes
        self._rx = 0
        self._stats = {"turns": 0, "bytes_sent": 0, "bytes_received": 0, "connects": 0,
                       "reused": 0, "resends": 0, "cancelled_turns": 0, "retries": 0}
        self._pool_key = (self._origin.ws_url("/responses"), self._encoding,
                          endpoint.api_key) if endpoint.reuse_connections else None
        self._http_key = (endpoint.base_url, endpoint.api_key) \
            if endpoint.reuse_connections and endpoint.keepalive else None

    # ------------------------------------------------------------ public

    @property
    def items(self) -> list[dict[str, Any]]:
        """The session's whole context (read it, do not change it)."""
        return self._book.items

    @property
    def last_response_id(self) -> str | None:
        return self._book.last_response_id

    def statistics(self) -> SessionStats:
        return SessionStats(**self._stats)

    async def turn(self, new_items: list[dict[str, Any]]) -> TurnResult:
        """Add `new_items` to the context, run one model response, add its output.

        Raises ModelAuthError (credentials), ModelRequestError (the endpoint refused the
        request; ModelServerError when it failed on its side), ModelConnectionError (the
        network or peer broke the link even after one full resend). trio.Cancelled propagates
        after the response is cancelled at the server; the session stays usable.
        """
        if self._busy:
            raise RuntimeError("ModelSession.turn is already running: one turn at a time")
        self._busy = True
        self._tx = self._rx = 0
        try:
            n, added = 0, False
            if self._refused is not None:  # the session's first dial was refused for now
                refused, self._refused = self._refused, None
                if not await self._pause(refused, n):
                    raise refused
                n += 1
            while True:
                try:
                    if self.endpoint.transport == "ws":
                        return await self._turn_ws([] if added else new_items)
                    return await self._turn_http([] if added else new_items)
                except ModelRequestError as exc:
                    added = True  # the book has the new items: a retry sends them again
                    if not await self._pause(exc, n):
                        raise
                    n += 1
        except trio.Cancelled:
            self._stats["cancelled_turns"] += 1
            raise
        finally:
            self._busy = False
            self._stats["bytes_sent"] += self._tx
            self._stats["bytes_received"] += self._rx

    async def _pause(self, exc: ModelRequestError, n: int) -> bool:
        """Wait before the (n+1)-th retry after `exc` and return True, or return False at once
        if _retry_wait allows none."""
        wait = self._retry_wait(exc, n)
        if wait is None:
            return False
        log.warning("model.retry", error=str(exc), retry=f"{n + 1} of {self.endpoint.retries}",
                    in_s=round(wait, 3), retry_after_s=exc.retry_after_s)
        self._stats["retries"] += 1
        await trio.sleep(wait)
        return True

    def _retry_wait(self, exc: ModelRequestError, n: int) -> float | None:
        """Seconds to wait before sending the turn again after `exc` (the n-th retry so far),
        or None if it is not to be sent again (the error is not transient, retries are used
        up, or the server asks for a wait longer than RETRY_MAX_S: the error says how long)."""
        if not transient(exc) or n >= self.endpoint.retries:
            return None
        if exc.retry_after_s is not None:
            return exc.retry_after_s if exc.retry_after_s <= RETRY_MAX_S else None
        return min(RETRY_BASE_S * 2 ** n * random.uniform(0.75, 1.25), RETRY_MAX_S)

    async def aclose(self) -> None:
        """Close the link, or give it to the pool when it is healthy and nothing is in flight
        (a closed WebSocket's close handshake runs in the task that holds it)."""
        self._let_go_ws()
        if self._http is not None:
            http, self._http = self._http, None
            pool = _POOL.get() if self._http_key is not None else None
            if pool is not None and self._http_key is not None and not self._busy \
                    and http.reusable:
                pool.give_http(self._http_key, http)
            else:
                await http.aclose()

    def _let_go_ws(self) -> None:
        """aclose's WebSocket half, which never waits: the link goes back to the pool or its
        holder is told to close it."""
        link, self._link, key = self._link, None, self._pool_key
        if link is not None:
            pool = _POOL.get() if key is not None else None
            if pool is not None and key is not None and not self._busy:
                pool.give(key, link)
            else:
                link.close()
            self._let_go()

    # ------------------------------------------------------------ results

    def _finish(self, response: Any, fallback: list[dict[str, Any]], t0: float,
                resent: bool) -> TurnResult:
        r = read_response(response, fallback)
        if r.status == "failed":
            # A failed continuation evicts its parent at the server: next turn sends everything.
            self._book.forget_server()
            log.warning("model.response_failed", response_id=r.response_id, error=r.error)
        else:
            kept = [c for c in map(context_item, r.output_items) if c is not None]
            self._book.complete(r.response_id, kept)
        self._stats["turns"] += 1
        if resent:
            self._stats["resends"] += 1
        return TurnResult(response_id=r.response_id, status=r.status, text=r.text,
                          function_calls=r.function_calls, output_items=r.output_items,
                          usage=r.usage, bytes_sent=self._tx, bytes_received=self._rx,
                          elapsed_s=trio.current_time() - t0, resent_full_context=resent,
                          error=r.error)

    def _create_event(self, items: list[dict[str, Any]], previous: str | None, *,
                      http: bool) -> dict[str, Any]:
        ev = P.response_create_event(
            model=self.endpoint.model, input=items, previous_response_id=previous,
            instructions=self._instructions, tools=self._tools, store=False,
            metadata=None if previous is not None and self._metadata_once else self._metadata)
        if http:
            del ev["type"]
            if self.endpoint.stream:
                ev["stream"] = True
        return ev

    # ------------------------------------------------------------ WebSocket

    async def _turn_ws(self, new_items: list[dict[str, Any]]) -> TurnResult:
        t0 = trio.current_time()
        self._book.add_new(new_items)
        retried = resent = False
        while True:
            try:
                link = await self._ensure_ws()
                await self._drain(link)
                resent = resent or self._book.would_resend()
                items, previous = self._book.request()
                event, seen = await self._exchange(link, items, previous)
            except _LinkLost as exc:
                self._drop_link()
                if retried:
                    raise ModelConnectionError(
                        f"the model WebSocket to {self._origin.ws_url('/responses')} broke "
                        f"again after a full resend: {exc}") from None
                retried = True
                log.info("model.link_lost", reason=str(exc), resend_items=len(self._book.items))
                continue
            kind = event["type"]
            if kind == "error":
                code = (event.get("error") or {}).get("code")
                if not retried and code == P.ErrorCode.PREVIOUS_RESPONSE_NOT_FOUND:
                    retried = True
                    self._book.forget_server()
                    log.info("model.cache_miss", resend_items=len(self._book.items))
                    continue
                if not retried and code == P.ErrorCode.CONNECTION_LIMIT:
                    retried = True
                    self._drop_link()
                    log.info("model.connection_limit", resend_items=len(self._book.items))
                    continue
                self._book.forget_server()  # a refused continuation evicts its parent
                raise error_from_event(event)
            return self._finish(event.get("response"), seen, t0, resent)

    async def _ensure_ws(self) -> _WsLink:
        if self._link is not None and not self._link.alive:
            self._drop_link()
        if self._link is None:
            # A new (or pooled) connection's cache holds nothing of ours: send everything.
            self._book.forget_server()
            key = self._pool_key
            pool = await _pool() if key is not None else None
            if pool is not None:
                # held from now, a dial under way included: the pool keeps as many idle links
                # as were held at once, and a worker's first 256 sessions dial together but
                # finish apart (counted once connected, the peak was ~130: a 10,000-task run
                # closed 64-374 of the ~5,000 links each worker gave back, and dialled again)
                pool.lent()
                self._lent_from = pool
            try:
                link = pool.take(key) if pool is not None and key is not None else None
                if link is not None:
                    self._stats["reused"] += 1
                else:
                    nursery = pool.nursery if pool is not None else self._nursery
                    if nursery is None:  # opened on the pool, which is gone: the run is ending
                        raise ModelConnectionError(
                            "cannot open the model WebSocket "
                            f"{self._origin.ws_url('/responses')}: this process's connection "
                            "pool has shut down (its trio run is ending)")
                    link = await self._connect_ws(nursery)
                    self._stats["connects"] += 1
            except BaseException:
                self._let_go()
                raise
            self._link = link
        return self._link

    def _let_go(self) -> None:
        """Tell the pool this session no longer holds the link it lent (or opened) for it."""
        if self._lent_from is not None:
            self._lent_from.returned()
            self._lent_from = None

    async def _connect_ws(self, nursery: trio.Nursery) -> _WsLink:
        url = self._origin.ws_url("/responses")
        headers = [(b"User-Agent", USER_AGENT.encode())]
        if self._encoding == P.MSGPACK:  # a Switchboard server may then batch events per frame
            headers.append(P.EVENT_BATCH_HEADER)
        if self.endpoint.api_key:
            headers.append((b"Authorization", b"Bearer " + self.endpoint.api_key.encode()))
        try:
            config = attrs.evolve(_WS_CONFIG, connect_timeout=self.endpoint.connect_timeout_s)
            link: _WsLink = await nursery.start(_hold_ws, url, headers, config)
        except WsRejected as exc:
            status = getattr(exc, "status_code", None)
            if status in (401, 403):
                raise ModelAuthError(f"the model endpoint {url} refused the credentials "
                                     f"({status}); check the API key") from None
            said = dict(exc.headers or ())
            kind = ModelServerError if status is not None and status >= 500 else \
                ModelRequestError
            # 429/5xx: busy for now, the turn is tried again; any other 4xx would come again
            # (no WebSocket at that path): the attempt is not retried either
            hint = "" if status in TRANSIENT_STATUSES else (
                "; if the server has no WebSocket mode use transport \"http\"")
            raise kind(f"refused the WebSocket upgrade ({body_excerpt(exc.body or b'')}){hint}",
                       status=status, request=f"GET {url}",
                       retry_after_s=parse_retry_after(said.get(b"retry-after-ms"),
                                                       said.get(b"retry-after"),
                                                       now=time.time())) from None
        except (WsHandshakeError, WsConnectTimeout, OSError, trio.BrokenResourceError) as exc:
            raise ModelConnectionError(
                f"cannot open the model WebSocket {url}: {connect_failure(exc)}") from None
        return link

    def _drop_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
            self._let_go()

    async def _send(self, link: _WsLink, event: dict[str, Any], timeout_s: float) -> None:
        frame = P.encode_event(event, self._encoding)
        conn = link.conn
        try:
            # the rule: the socket takes the frame at once, with nothing to wait for or cut
            # (a FastWs: ws://; a wss:// link is trio-websocket's)
            how = conn.write_now([frame]) if isinstance(conn, FastWs) else BUSY
            if how != WROTE:
                # Shielded: a frame cut off by a cancel would break the link that a cancelled
                # turn still sends response.cancel on. One scope: the shield, and the send's
                # own deadline.
                with trio.CancelScope(shield=True,
                                      deadline=trio.current_time() + timeout_s) as scope:
                    if how == BUSY:
                        await conn.send_message(frame)
                    else:  # the socket took part of it: the rest, before anything else
                        await conn.flush()
                if scope.cancelled_caught:
                    link.dead = True
                    raise _LinkLost(f"a frame could not be sent within {timeout_s}s")
        except WsClosed as exc:
            link.dead = True
            raise _LinkLost(f"closed ({_close_reason(exc)})") from None
        self._tx += _frame_size(frame)

    async def _recv(self, link: _WsLink) -> dict[str, Any]:
        """The next event."""
        if link.pending:
            return link.pending.popleft()
        first, *rest = await self._read_frame(link)
        link.pending.extend(rest)
        return first

    async def _recv_events(self, link: _WsLink) -> list[dict[str, Any]]:
        """The next events, in order: those left of a batch, else one frame's (one, or a
        batch). A caller that stops part way puts the rest back in `link.pending`."""
        if link.pending:
            events = list(link.pending)
            link.pending.clear()
            return events
        return await self._read_frame(link)

    async def _read_frame(self, link: _WsLink) -> list[dict[str, Any]]:
        try:
            frame = await link.conn.get_message()
        except WsClosed as exc:
            link.dead = True
            raise _LinkLost(f"closed ({_close_reason(exc)})") from None
        self._rx += _frame_size(frame)
        try:
            return P.decode_events(frame)
        except P.ProtocolError as exc:
            self._drop_link()
            raise ModelConnectionError(f"the model server sent a bad event: {exc}") from None

    async def _exchange(self, link: _WsLink, items: list[dict[str, Any]], previous: str | None
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send one response.create and read its events up to the terminal one (or an error)."""
        await self._send(link, self._create_event(items, previous, http=False), SEND_TIMEOUT_S)
        self._book.mark_sent()
        response_id: str | None = None
        seen: list[dict[str, Any]] = []  # output items, for a terminal event without output
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                # a batch at a time (a zero-time response is one frame of 9 events): one await
                # per frame, not per event
                events = await self._recv_events(link)
                for i, event in enumerate(events):
                    kind = event["type"]
                    if kind == "response.output_item.done":
                        seen.append(event.get("item") or {})
                    elif kind == "response.created":
                        response_id = (event.get("response") or {}).get("id")
                    elif kind in P.TERMINAL_TYPES or kind == "error":
                        link.pending.extend(events[i + 1:])  # another response's, in order
                        return event, seen
        except trio.Cancelled:
            await self._cancel_ws(link, response_id)
            raise
        except BaseException:
            # Anything else mid-response (KeyboardInterrupt, a bug): the link's event stream is
            # no longer in step with the session, so the next turn starts on a new one.
            self._drop_link()
            raise

    async def _cancel_ws(self, link: _WsLink, response_id: str | None) -> None:
        if not link.alive:
            return
        link.drain_pending = True
        try:
            await self._send(link, P.response_cancel_event(response_id), CANCEL_SEND_TIMEOUT_S)
        except _LinkLost:
            self._drop_link()

    async def _drain(self, link: _WsLink) -> None:
        """Read what a cancelled response still sends, up to its terminal event."""
        while link.drain_pending:
            event = await self._recv(link)
            if event["type"] == "error" and (event.get("error") or {}).get("code") \
                    == P.ErrorCode.CONNECTION_LIMIT:
                link.dead = True
                raise _LinkLost("the connection reached its age limit")
            if P.is_terminal(event):
                link.drain_pending = False

    # ------------------------------------------------------------ HTTP

    def _http_headers(self, *, sse: bool) -> list[tuple[str, str]]:
        headers = [("User-Agent", USER_AGENT), ("Content-Type", "application/json"),
                   ("Accept", "text/event-stream" if sse else "application/json")]
        if self.endpoint.api_key:
            headers.append(("Authorization", f"Bearer {self.endpoint.api_key}"))
        if not self.endpoint.keepalive:
            headers.append(("Connection", "close"))
        return headers

    async def _http_connection(self) -> HttpConnection:
        if self._http is not None and not self._http.reusable:
            await self._http.aclose()
            self._http = None
        if self._http is None and self._http_key is not None:
            pool = await _pool()
            self._http = pool.take_http(self._http_key) if pool is not None else None
            if self._http is not None:
                self._stats["reused"] += 1
        if self._http is None:
            try:
                self._http = await HttpConnection.connect(
                    self._origin, timeout_s=self.endpoint.connect_timeout_s)
            except HttpError as exc:
                raise ModelConnectionError(str(exc)) from None
            self._stats["connects"] += 1
        return self._http

    async def _turn_http(self, new_items: list[dict[str, Any]]) -> TurnResult:
        t0 = trio.current_time()
        self._book.add_new(new_items)
        chat = self.endpoint.transport == "chat"
        if chat:
            path = "/chat/completions"
            body = P.dumps_json(chat_body(model=self.endpoint.model,
                                          instructions=self._instructions,
                                          items=self._book.items, tools=self._tools))
        else:
            path = "/responses"
            body = P.dumps_json(self._create_event(self._book.items, None, http=True))
        headers = self._http_headers(sse=self.endpoint.stream and not chat)
        for attempt in (1, 2):
            conn = await self._http_connection()
            sent0, recv0 = conn.bytes_sent, conn.bytes_received
            try:
                response, seen = await self._exchange_http(conn, path, body, headers)
            except HttpError as exc:
                await self._close_http()
                if exc.reusable_failure and attempt == 1:
                    continue  # the server closed an idle kept-alive connection: once more
                raise ModelConnectionError(f"POST {self._origin.target(path)} on "
                                           f"{self._origin.host_header}: {exc}") from None
            except BaseException:
                await self._close_http()  # cancelled: closing tells the server to stop
                raise
            finally:
                self._tx += conn.bytes_sent - sent0
                self._rx += conn.bytes_received - recv0
            if not self.endpoint.keepalive or not conn.reusable:
                await self._close_http()
            self._book.mark_sent()
            if chat:
                response = response_from_chat(response)
            return self._finish(response, seen, t0, False)
        raise AssertionError("unreachable")

    async def _close_http(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    async def _exchange_http(self, conn: HttpConnection, path: str, body: bytes,
                             headers: list[tuple[str, str]]
                             ) -> tuple[Any, list[dict[str, Any]]]:
        head = await conn.send_request("POST", path, headers=headers, body=body)
        request = f"POST {self._origin.url(path)}"
        ctype = head.header(b"content-type") or b""
        if head.status != 200 or not ctype.startswith(b"text/event-stream"):
            data = await conn.read_body()
            if head.status != 200:
                chat_url = self._origin.url("/chat/completions") if path == "/responses" \
                    else None
                err = error_from_http(request, head.status, data, chat_url=chat_url)
                if isinstance(err, ModelRequestError):
                    err.retry_after_s = parse_retry_after(
                        head.header(b"retry-after-ms"), head.header(b"retry-after"),
                        now=time.time())
                raise err
            try:
                obj = P.loads_json(data) if data else {}
            except P.ProtocolError:
                raise ModelConnectionError(f"{request} answered HTTP 200 with a body that is "
                                           f"not JSON: {body_excerpt(data)}") from None
            return obj, []
        decoder = P.SseDecoder()
        seen: list[dict[str, Any]] = []
        terminal: dict[str, Any] | None = None
        while (chunk := await conn.next_body_chunk()) is not None:
            try:
                events = decoder.feed(chunk)
            except P.ProtocolError as exc:
                raise HttpError(f"the server sent a bad event: {exc}") from None
            for event in events:
                kind = event["type"]
                if kind == "response.output_item.done":
                    seen.append(event.get("item") or {})
                elif kind == "error":
                    raise error_from_event(event, request=request)
                elif kind in P.TERMINAL_TYPES:
                    terminal = event
        if terminal is None:
            raise HttpError("the event stream ended without a terminal response event")
        return terminal.get("response"), seen


def _close_reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    code = getattr(reason, "code", None)
    text = getattr(reason, "reason", None)
    return f"code {code}" + (f": {text}" if text else "")


def open_model_session(endpoint: ModelEndpoint, *, instructions: str | None = None,
                       tools: list[dict[str, Any]] | None = None,
                       metadata: dict[str, str] | None = None,
                       metadata_once: bool = False) -> _SessionOpener:
    """Open a session (`async with open_model_session(...) as session:`); over "ws" its
    WebSocket is connected before the block runs.

    `metadata` goes with every request (OpenAI attaches it to that one response), or with
    `metadata_once` only with the first request of each chain (the first turn, and a full
    resend after a lost connection cache): for the sim, which carries its script and attempt
    along a chain, so a long script is not resent and echoed back every turn.

    Raises ModelAuthError / ModelConnectionError when the WebSocket cannot be opened, ValueError
    for a malformed base_url.
    """
    return _SessionOpener(endpoint, instructions, tools, metadata, metadata_once)


class _SessionOpener:
    """open_model_session's context manager. A pooled "ws" session (a worker's every attempt)
    is opened and closed here directly: its pool's nursery holds the WebSocket, and closing
    gives it back without waiting, so there is no nursery, shield or checkpoint of the
    session's own (open and close one after another: 56-63 -> 11-16 us of CPU, measured), nor
    a generator-based context manager around it. Any other goes through _open_unpooled."""

    __slots__ = ("_args", "_session", "_unpooled")

    def __init__(self, endpoint: ModelEndpoint, instructions: str | None,
                 tools: list[dict[str, Any]] | None, metadata: dict[str, str] | None,
                 metadata_once: bool) -> None:
        self._args = (endpoint, instructions, tools, metadata, metadata_once)
        self._session: ModelSession | None = None
        self._unpooled: Any = None

    async def __aenter__(self) -> ModelSession:
        endpoint, instructions, tools, metadata, metadata_once = self._args
        pool = await _pool() if endpoint.transport == "ws" and endpoint.reuse_connections \
            else None
        if pool is None:
            self._unpooled = _open_unpooled(*self._args)
            return await self._unpooled.__aenter__()  # type: ignore[no-any-return]
        session = ModelSession(endpoint, None, instructions=instructions, tools=tools,
                               metadata=metadata, metadata_once=metadata_once)
        try:
            await _first_dial(session)
        except BaseException:
            session._let_go_ws()
            raise
        self._session = session
        return session

    async def __aexit__(self, *exc: Any) -> bool | None:
        if self._unpooled is not None:
            return await self._unpooled.__aexit__(*exc)  # type: ignore[no-any-return]
        if self._session is not None:
            self._session._let_go_ws()  # a "ws" session holds no HTTP connection
        return None


@asynccontextmanager
async def _open_unpooled(endpoint: ModelEndpoint, instructions: str | None,
                         tools: list[dict[str, Any]] | None, metadata: dict[str, str] | None,
                         metadata_once: bool) -> AsyncIterator[ModelSession]:
    """A session holding its connections in a nursery of its own (HTTP, or no pool)."""
    try:
        async with trio.open_nursery() as nursery:
            session = ModelSession(endpoint, nursery, instructions=instructions, tools=tools,
                                   metadata=metadata, metadata_once=metadata_once)
            try:
                if endpoint.transport == "ws":
                    await _first_dial(session)
                yield session
            finally:
                with trio.CancelScope(shield=True):
                    await session.aclose()
    except BaseExceptionGroup as group:
        # The nursery only holds connections that never raise after they start, so a group
        # carries the body's own exception: give the caller that, not a wrapper.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from group.exceptions[0].__cause__
        raise


async def _first_dial(session: ModelSession) -> None:
    """Connect a "ws" session's WebSocket (or take one from the pool) before it is used."""
    try:
        await session._ensure_ws()
    except ModelRequestError as exc:
        if session._retry_wait(exc, 0) is None:
            raise
        # busy for now (a 429 or 503 to the upgrade): the first turn waits and dials again,
        # as its first retry
        session._refused = exc


async def fetch_server_stats(base_url: str, *, timeout_s: float = 10.0) -> dict[str, Any]:
    """GET {base_url}/switchboard/stats from a Switchboard model server: its JSON counters.

    Raises ModelConnectionError when the server cannot be reached or answers badly.
    """
    origin = Origin.from_url(base_url)
    try:
        with trio.fail_after(timeout_s):
            conn = await HttpConnection.connect(origin, timeout_s=timeout_s)
            try:
                head = await conn.send_request("GET", "/switchboard/stats",
                                               headers=[("Connection", "close")])
                body = await conn.read_body()
            finally:
                await conn.aclose()
    except (HttpError, trio.TooSlowError) as exc:
        raise ModelConnectionError(f"cannot read {base_url}/switchboard/stats: {exc!r}") from None
    if head.status != 200:
        raise ModelConnectionError(f"{base_url}/switchboard/stats answered HTTP {head.status}")
    stats = P.loads_json(body)
    if not isinstance(stats, dict):
        raise ModelConnectionError(f"{base_url}/switchboard/stats is not a JSON object")
    return stats
