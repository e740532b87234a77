"""Owns the model server: one TCP port for the Responses protocol over WebSocket and HTTP.

The trio shell around modellink.protocol (event shapes) and modellink.sim (the model):

* `GET /v1/responses` with `Upgrade: websocket` -> a WebSocket session (JSON or msgpack frames,
  chosen by the client's first frame), one connection cache per lane;
* `POST /v1/responses` -> one response over HTTP, JSON or (`"stream": true`) server-sent events;
* `GET /v1/switchboard/stats` -> JSON counters (ServerStats) so tests can see generation stop.

HTTP is parsed with h11; an upgrade request is handed, with the bytes already read, to bus.ws.
Every connection is isolated: whatever one peer sends, the server and other connections go on.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import h11
import trio

from bus.logs import get_logger
from bus.ws import (
    BUSY,
    WROTE,
    FastWs,
    WsClosed,
    WsConfig,
    WsConnection,
    accept_on_stream,
    send_messages,
)
from modellink import protocol as p
from modellink.protocol import ErrorCode, ProtocolError, ResponseCancel, ResponseCreate
from modellink.sim import Generation, RenderedContext, SimConfig, SimModel

log = get_logger("modellink.server")

RESPONSES_PATH = "/v1/responses"
STATS_PATH = "/v1/switchboard/stats"


@attrs.frozen(kw_only=True)
class ModelServerConfig:
    """How the model server listens and behaves. `token=None` means no auth (loopback only,
    enforced by the CLI, not here)."""

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    sim: SimConfig = SimConfig()
    # A WebSocket older than this gets websocket_connection_limit_reached and close code 1001.
    max_connection_age_s: float = 3600.0
    # Larger client messages get message_too_large (the connection stays usable up to twice
    # this; beyond that the WebSocket layer closes with 1009).
    max_message_bytes: int = p.MAX_MESSAGE_BYTES
    max_header_bytes: int = 64 * 1024
    # Named lanes (stream_id) per connection; the default lane is not counted (OpenAI: 32).
    max_lanes: int = 32
    # Responses kept for previous_response_id over HTTP or after a connection-cache miss.
    store_max_responses: int = 10_000
    # An HTTP connection idle this long between requests (or mid request head) is closed.
    http_idle_timeout_s: float = 120.0
    # Bounded: encoded events waiting for one WebSocket's writer; a slow reader pushes back on
    # the generating responses rather than growing memory.
    send_queue_size: int = 64


@attrs.frozen(kw_only=True)
class ModelServerInfo:
    """What `nursery.start(serve_model, ...)` returns."""

    host: str
    port: int
    base_url: str  # "http://HOST:PORT/v1", for OpenAI(base_url=...) and ModelEndpoint
    server: ModelServer = attrs.field(eq=False, repr=False)

    @property
    def ws_url(self) -> str:
        return "ws" + self.base_url[4:] + "/responses"


@attrs.define
class ServerStats:
    """Counters; `in_flight` is responses started and not yet ended."""

    responses_started: int = 0
    responses_completed: int = 0
    responses_cancelled: int = 0
    responses_failed: int = 0
    in_flight: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    tokens_rendered: int = 0
    errors_sent: int = 0
    ws_connections_open: int = 0
    ws_connections_total: int = 0
    http_requests: int = 0


@attrs.frozen(kw_only=True)
class _Stored:
    previous_id: str | None
    input: tuple[dict[str, Any], ...]
    output: tuple[dict[str, Any], ...]
    sim_metadata: dict[str, str] | None = None  # what a continuation without its own carries on


class ResponseStore:
    """Bounded in-memory store of responses made with store=true (LRU by last use)."""

    def __init__(self, max_responses: int) -> None:
        self._max = max_responses
        self._d: OrderedDict[str, _Stored] = OrderedDict()

    def __contains__(self, rid: str) -> bool:
        return rid in self._d

    def put(self, rid: str, previous_id: str | None, input: list[dict[str, Any]],
            output: list[dict[str, Any]], sim_metadata: dict[str, str] | None = None) -> None:
        self._d[rid] = _Stored(previous_id=previous_id, input=tuple(input), output=tuple(output),
                               sim_metadata=sim_metadata)
        while len(self._d) > self._max:
            self._d.popitem(last=False)

    def sim_metadata_of(self, rid: str) -> dict[str, str] | None:
        s = self._d.get(rid)
        return None if s is None else s.sim_metadata

    def items_of(self, rid: str) -> list[dict[str, Any]] | None:
        """Every item of the conversation ending in `rid`, or None if any link is gone."""
        chain: list[_Stored] = []
        cur: str | None = rid
        while cur is not None:
            s = self._d.get(cur)
            if s is None:
                return None
            self._d.move_to_end(cur)
            chain.append(s)
            cur = s.previous_id
            if len(chain) > len(self._d):  # a cycle cannot happen; never loop forever anyway
                return None
        items: list[dict[str, Any]] = []
        for s in reversed(chain):
            items += s.input
            items += s.output
        return items


def _not_found(rid: str) -> ProtocolError:
    return ProtocolError(
        ErrorCode.PREVIOUS_RESPONSE_NOT_FOUND,
        f"Previous response with id '{rid}' not found.",
        param="previous_response_id",
    )


@attrs.define(eq=False)
class _Run:
    """One response being generated: its plan, what was streamed so far, its cancel scope."""

    id: str
    request: ResponseCreate
    ctx: RenderedContext
    gen: Generation
    source: str
    rendered: int
    seq: p.EventSequence
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    created_at: float = 0.0
    output: list[dict[str, Any]] = attrs.field(factory=list)  # finished output items
    partial_text: tuple[str, str] | None = None  # (item id, text so far) of a text in progress
    output_tokens: int = 0
    status: str = "in_progress"
    # For a continuation of a connection-cache context: the response it continued and the
    # context's mark before this request, so a cancel can give the lane its parent back.
    parent: tuple[str, tuple[Any, ...]] | None = None
    _base: dict[str, Any] | None = attrs.field(default=None, init=False)

    def usage(self) -> dict[str, Any]:
        return p.make_usage(
            input_tokens=self.gen.input_tokens,
            cached_tokens=self.gen.cached_tokens,
            output_tokens=self.output_tokens,
            context_source=self.source,
            tokens_rendered=self.rendered,
        )

    def final_output(self) -> list[dict[str, Any]]:
        """The output items of a response that has ended (a text cut off by a cancel last)."""
        output = list(self.output)
        if self.partial_text is not None:
            output.append(p.message_item(self.partial_text[0], self.partial_text[1],
                                         status="completed"))
            output[-1]["status"] = "incomplete"
        return output

    def response(self, status: str, *, usage: bool = True, error: dict[str, Any] | None = None,
                 incomplete_details: dict[str, Any] | None = None) -> dict[str, Any]:
        base = self._base
        if base is None:  # what every response object of this run shares, built once
            base = self._base = p.response_object(
                response_id=self.id, model=self.request.model, status=status,
                created_at=self.created_at, request=self.request)
        r = base.copy()  # assigning existing keys keeps response_object's key order
        r["status"] = status
        r["error"] = error
        r["incomplete_details"] = incomplete_details
        r["output"] = self.final_output() if status != "in_progress" else []
        r["usage"] = self.usage() if usage else None
        return r


# Receives a response's events in order, a batch at a time: every event produced between two
# pauses of simulated model time (at most _MAX_BATCH), so a transport can write them at once.
Emit = Callable[[list[dict[str, Any]]], Awaitable[None]]
_MAX_BATCH = 64


@attrs.define(eq=False)
class ModelServer:
    """Runtime state shared by every connection: the sim model, the store, the counters."""

    config: ModelServerConfig
    sim: SimModel
    store: ResponseStore
    stats: ServerStats = attrs.field(factory=ServerStats)

    @classmethod
    def from_config(cls, config: ModelServerConfig) -> ModelServer:
        return cls(config=config, sim=SimModel(config.sim),
                   store=ResponseStore(config.store_max_responses))

    def statistics(self) -> dict[str, Any]:
        d = attrs.asdict(self.stats)
        d["prefix_cache_blocks"] = len(self.sim.prefix_cache)
        return d

    # ---- preparing a response (synchronous: all the real CPU work on the input happens here)

    def prepare(self, req: ResponseCreate, cached: RenderedContext | None, source: str,
                stream_id: str | None = None) -> _Run:
        """Build the context (from `cached`, the store, or the request) and plan the output.

        `cached` is a connection-cache context to extend (consumed); None means the request or,
        with previous_response_id, the store. Raises ProtocolError.
        """
        self.sim.check_model(req.model)
        if cached is not None:
            ctx = cached
        else:
            ctx = self.sim.new_context()
            if req.previous_response_id is not None:
                prior = self.store.items_of(req.previous_response_id)
                if prior is None:
                    raise _not_found(req.previous_response_id)
                ctx.items = prior  # rendered below by set_prefix, which re-renders every item
                ctx.prefix_key = None
                ctx.sim_metadata = self.store.sim_metadata_of(req.previous_response_id)
                source = "store"
        rendered = ctx.set_prefix(req.instructions, req.tools)
        rendered += ctx.append_items(req.input)
        gen = self.sim.plan(ctx, req.metadata, generate=req.generate)
        return _Run(id=p.new_response_id(), request=req, ctx=ctx, gen=gen, source=source,
                    rendered=rendered, seq=p.EventSequence(stream_id), created_at=time.time())

    # ---- generating (the simulated model time is paid here, as it streams)

    async def generate(self, run: _Run, emit: Emit) -> None:
        """Stream `run` through `emit` until completed, or until run.scope is cancelled (then
        response.incomplete, reason "cancelled"). Outer cancellation propagates."""
        st = self.stats
        st.responses_started += 1
        st.in_flight += 1
        st.input_tokens += run.gen.input_tokens
        st.cached_tokens += run.gen.cached_tokens
        st.tokens_rendered += run.rendered
        out = _Out(run.seq, emit)
        try:
            with run.scope:
                await self._stream(run, out)
            if run.status == "failed":
                pass  # a scripted failure, already sent
            elif run.status != "completed":  # run.scope was cancelled: response.cancel
                run.status = "incomplete"
                self._finish(run)
                st.responses_cancelled += 1
                # What was produced before the cancel goes first (run.partial_text holds it).
                out.add(p.ev_incomplete(run.response(
                    "incomplete", incomplete_details={"reason": "cancelled"})))
                await out.flush()
        except Exception as exc:
            if run.status != "in_progress":
                raise
            run.status = "failed"
            st.responses_failed += 1
            log.error("response.failed", response_id=run.id, error=repr(exc), exc_info=True)
            out.add(p.ev_failed(run.response("failed", error={
                "code": ErrorCode.SERVER_ERROR,
                "message": "the sim model failed; this is a server bug, please report it"})))
            await out.flush()
        finally:
            st.in_flight -= 1
            if run.status == "in_progress":  # torn down from outside (client gone, shutdown)
                st.responses_cancelled += 1

    async def _stream(self, run: _Run, out: _Out) -> None:
        gen, add, pause = run.gen, out.add, out.pause
        started = run.response("in_progress", usage=False)  # the same in both events
        add(p.ev_created(started))
        add(p.ev_in_progress(started))
        await pause(gen.prefill_s)
        if gen.fail is not None:  # the script says this response fails (retry tests)
            run.status = "failed"
            self.stats.responses_failed += 1
            add(p.ev_failed(run.response("failed", error={
                "code": ErrorCode.SERVER_ERROR,
                "message": f"the sim script fails this response: {gen.fail}"})))
            await out.flush()
            return
        per_token = gen.decode_s_per_token
        stats = self.stats
        for plan in gen.outputs:
            idx = len(run.output)
            if plan.kind == "text":
                iid = p.new_message_id()
                add(p.ev_output_item_added(idx, p.message_item(iid, "", status="in_progress")))
                add(p.ev_content_part_added(iid, idx, 0))
                text = ""
                run.partial_text = (iid, text)
                for delta, n in plan.chunks:
                    await pause(n * per_token)
                    text += delta
                    run.partial_text = (iid, text)
                    run.output_tokens += n
                    stats.output_tokens += n
                    add(p.ev_output_text_delta(iid, idx, 0, delta))
                add(p.ev_output_text_done(iid, idx, 0, text))
                add(p.ev_content_part_done(iid, idx, 0, text))
                item = p.message_item(iid, text)
                run.output.append(item)
                run.partial_text = None
            else:
                iid, call_id = p.new_function_call_id(), p.new_call_id()
                add(p.ev_output_item_added(
                    idx, p.function_call_item(iid, call_id, plan.name, "", status="in_progress")))
                args = ""
                for delta, n in plan.chunks:
                    await pause(n * per_token)
                    args += delta
                    run.output_tokens += n
                    stats.output_tokens += n
                    add(p.ev_function_call_arguments_delta(iid, idx, delta))
                add(p.ev_function_call_arguments_done(iid, idx, plan.name, args))
                item = p.function_call_item(iid, call_id, plan.name, args)
                run.output.append(item)
            add(p.ev_output_item_done(idx, item))
        run.status = "completed"
        self._finish(run)
        stats.responses_completed += 1
        add(p.ev_completed(run.response("completed")))
        await out.flush()

    def _finish(self, run: _Run) -> None:
        """The response's output joins its context (and the store, if asked)."""
        output = run.final_output()
        self.sim.finish(run.ctx, output)
        if run.request.store:
            self.store.put(run.id, run.request.previous_response_id, run.request.input, output,
                           run.ctx.sim_metadata)


class _Out:
    """A response's outgoing events: numbered, held until the next pause, then emitted as one
    batch; and the simulated clock, paid against one origin.

    Simulated time is slept until `start + total so far` (not `sleep(each)`): every trio.sleep
    wakes up to a timer tick late, which summed over a response's pauses added milliseconds of
    time no model would spend. The total simulated time is unchanged.
    """

    def __init__(self, seq: p.EventSequence, emit: Emit) -> None:
        self._seq = seq
        self._emit = emit
        self._pending: list[dict[str, Any]] = []
        self._start = trio.current_time()
        self._due = 0.0  # simulated seconds paid so far

    def add(self, ev: dict[str, Any]) -> None:
        self._pending.append(self._seq.stamp(ev))

    async def flush(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            await self._emit(batch)

    async def pause(self, seconds: float) -> None:
        """Emit what is pending, then pay `seconds` of simulated model time (a cancellation
        point even when zero)."""
        if seconds > 0:
            await self.flush()
            self._due += seconds
            await trio.sleep_until(self._start + self._due)
        elif len(self._pending) >= _MAX_BATCH:
            await self.flush()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()


# --------------------------------------------------------------------------- WebSocket


class _Close:
    """Writer sentinel: close the WebSocket with this code after everything queued before it."""

    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason


@attrs.define(eq=False)
class _Lane:
    cached_id: str | None = None
    cached_ctx: RenderedContext | None = None
    run: _Run | None = None  # True iff a response of this lane is in flight


class _WsSession:
    """One WebSocket connection: a reader (this task), a writer task, one task per response.

    Frames go out in the order they are emitted. An emitter writes them itself when nothing
    is queued for the writer or being written (waking the writer task cost a task switch per
    response); otherwise it queues them behind the rest.
    """

    def __init__(self, server: ModelServer, ws: WsConnection, nursery: trio.Nursery,
                 *, batch: bool = False) -> None:
        self.server = server
        self.ws = ws
        self.nursery = nursery
        self.encoding: p.Encoding | None = None  # set by the client's first frame
        # The client asked for it at the upgrade (p.EVENT_BATCH_HEADER): on a msgpack
        # connection the events of one pause go out as one frame holding an array of them.
        self.batch = batch
        self.lanes: dict[str | None, _Lane] = {None: _Lane()}
        # Each entry is a batch of encoded events (at most _MAX_BATCH) or a close.
        self.send, self._recv = trio.open_memory_channel[list[str | bytes] | _Close](
            server.config.send_queue_size)
        self._unsent = 0  # entries given to the writer and not yet written (a close counts)
        # The write an emitter is doing itself: shielded, so a response.cancel never cuts a
        # frame in half; `_stop` cancels it.
        self._direct: trio.CancelScope | None = None
        self._scope: trio.CancelScope | None = None  # the session's nursery

    def _stop(self) -> None:
        """Stop everything of this connection: the responses, the writer, a write in progress."""
        if self._scope is not None:
            self._scope.cancel()
        if self._direct is not None:
            self._direct.cancel()

    async def run(self) -> None:
        cfg = self.server.config
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._scope = nursery.cancel_scope
            nursery.start_soon(self._writer)
            nursery.start_soon(self._age_limit, cfg.max_connection_age_s)
            try:
                while True:
                    frame = await self.ws.get_message()
                    await self._on_frame(frame)
            except WsClosed:
                pass
            finally:  # the client is gone, or we are cancelled: stop every response at once
                self._stop()

    async def _writer(self) -> None:
        # Every frame that is ready goes out in one socket write (still one event per WebSocket
        # message): a response's events are produced in bursts, and a write per event was
        # most of the server's CPU per turn.
        recv = self._recv
        try:
            async for entry in recv:
                batch: list[str | bytes] = []
                taken = 1
                while True:
                    if isinstance(entry, _Close):
                        if batch:
                            await send_messages(self.ws, batch)
                        await self.ws.aclose(entry.code, entry.reason)
                        self._stop()
                        return
                    batch += entry
                    if len(batch) >= _MAX_BATCH:
                        break
                    try:
                        entry = recv.receive_nowait()
                    except trio.WouldBlock:
                        break
                    taken += 1
                await send_messages(self.ws, batch)
                self._unsent -= taken
        except WsClosed:
            pass
        self._stop()

    async def _age_limit(self, seconds: float) -> None:
        if not math.isfinite(seconds):
            return
        await trio.sleep(seconds)
        for lane in self.lanes.values():
            if lane.run is not None:
                lane.run.scope.cancel()
        minutes = seconds / 60
        await self._error(ProtocolError(
            ErrorCode.CONNECTION_LIMIT,
            f"Responses websocket connection limit reached ({minutes:g} minutes). "
            "Create a new websocket connection to continue.",
        ))
        await self._queue(_Close(p.CLOSE_GOING_AWAY, "connection age limit"))

    async def _emit(self, events: list[dict[str, Any]]) -> None:
        # Before the client's first frame (e.g. the age limit of an idle connection): JSON.
        encoding = self.encoding or p.JSON
        if self.batch and encoding == p.MSGPACK and len(events) > 1:
            frames: list[str | bytes] = [p.encode_event_batch(events)]
        else:
            frames = [p.encode_event(ev, encoding) for ev in events]
        if self._unsent or self._direct is not None:
            await self._queue(frames)
            return
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled emitter sends nothing
        try:
            ws = self.ws
            # the rule: the socket takes the batch at once, so there is no write to shield
            # from a response.cancel (nor a scope to enter)
            how = ws.write_now(frames) if isinstance(ws, FastWs) else BUSY
            if how != WROTE:
                with trio.CancelScope(shield=True) as self._direct:
                    if how == BUSY:
                        await send_messages(ws, frames)
                    else:  # part of it went: the rest, before anything else
                        await ws.flush()  # type: ignore[union-attr]
        except WsClosed:
            self._stop()
        finally:
            self._direct = None

    async def _queue(self, entry: list[str | bytes] | _Close) -> None:
        self._unsent += 1
        try:
            await self.send.send(entry)
        except BaseException:  # cancelled before it was queued: it will never be written
            self._unsent -= 1
            raise

    async def _error(self, err: ProtocolError, stream_id: str | None = None) -> None:
        self.server.stats.errors_sent += 1
        await self._emit([err.to_event(stream_id=stream_id)])

    async def _on_frame(self, frame: str | bytes) -> None:
        kind = p.encoding_of_frame(frame)
        if self.encoding is None:
            self.encoding = kind
        elif kind != self.encoding:
            await self._error(ProtocolError(
                ErrorCode.WRONG_ENCODING,
                f"this connection speaks {self.encoding} (set by its first frame); got a "
                f"{'text' if kind == p.JSON else 'binary'} frame: send every event as "
                f"{'text (JSON)' if self.encoding == p.JSON else 'binary (msgpack)'}",
            ))
            return
        stream_id: str | None = None
        try:
            obj = p.decode_event(frame, max_bytes=self.server.config.max_message_bytes)
            sid = obj.get("stream_id")
            stream_id = sid if isinstance(sid, str) else None
            event = p.parse_client_event(obj)
            if isinstance(event, ResponseCancel):
                self._cancel(event)
            else:
                await self._create(event)
        except ProtocolError as err:
            await self._error(err, stream_id)

    def _cancel(self, ev: ResponseCancel) -> None:
        lane = self.lanes.get(ev.stream_id)
        if lane is None or lane.run is None:
            return  # raced the end of the response: nothing to stop
        if ev.response_id is None or ev.response_id == lane.run.id:
            lane.run.scope.cancel()

    def _lane(self, sid: str | None) -> _Lane:
        lane = self.lanes.get(sid)
        if lane is None:
            if len(self.lanes) - 1 >= self.server.config.max_lanes:
                raise ProtocolError(
                    ErrorCode.STREAM_LIMIT,
                    f"this connection already uses {self.server.config.max_lanes} stream_id "
                    "lanes: reuse one, or open another connection",
                    param="stream_id",
                )
            lane = self.lanes[sid] = _Lane()
        return lane

    async def _create(self, req: ResponseCreate) -> None:
        lane = self._lane(req.stream_id)
        prev = req.previous_response_id
        try:
            if lane.run is not None:
                raise ProtocolError(
                    ErrorCode.RESPONSE_IN_PROGRESS,
                    f"response {lane.run.id} is still in progress on this "
                    + ("connection" if req.stream_id is None else f"lane {req.stream_id!r}")
                    + ": wait for its terminal event or send response.cancel first",
                )
            cached, source = None, "request"
            if prev is not None:
                source = "connection_cache"
                if lane.cached_id == prev:
                    cached, lane.cached_id, lane.cached_ctx = lane.cached_ctx, None, None
                else:  # a fork from another lane of this connection: copy, keep the parent
                    for other in self.lanes.values():
                        if other.cached_id == prev and other.cached_ctx is not None:
                            cached = other.cached_ctx.copy()
                            break
                if cached is None and (not req.store or prev not in self.server.store):
                    raise _not_found(prev)
            mark = cached.mark() if cached is not None else None
            run = self.server.prepare(req, cached, source, req.stream_id)
            if prev is not None and mark is not None:
                run.parent = (prev, mark)
        except ProtocolError:
            if prev is not None and lane.cached_id == prev:  # OpenAI: a failed continuation
                lane.cached_id, lane.cached_ctx = None, None  # evicts the id it referenced
            raise
        lane.run = run
        self.nursery.start_soon(self._respond, lane, run)

    async def _respond(self, lane: _Lane, run: _Run) -> None:
        def settle() -> None:
            if lane.run is not run:  # settled already (and the lane may hold the next run)
                return
            lane.run = None
            if run.status == "completed":
                lane.cached_id, lane.cached_ctx = run.id, run.ctx
            elif run.status == "incomplete" and run.parent is not None \
                    and run.ctx.truncate(run.parent[1]):
                # Cancelled: its partial output is not worth continuing from; the lane holds
                # the response it continued again, so the client resends only the unanswered
                # items.
                lane.cached_id, lane.cached_ctx = run.parent[0], run.ctx

        async def emit(events: list[dict[str, Any]]) -> None:
            # The lane is free, and holds the response, before the client can read its
            # terminal event: a client that sends the next response.create at once must find
            # it so (settled after the write, it met response_in_progress on a fast link).
            if events and p.is_terminal(events[-1]):
                settle()
            await self._emit(events)

        try:
            await self.server.generate(run, emit)
        finally:
            settle()


# --------------------------------------------------------------------------- HTTP


def _headers(req: h11.Request) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for name, value in req.headers:
        out[name] = out[name] + b", " + value if name in out else value
    return out


class _HttpConn:
    """One TCP connection: h11 requests until it closes or upgrades to a WebSocket."""

    def __init__(self, server: ModelServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        cfg = server.config
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=cfg.max_header_bytes)
        self.raw = bytearray()  # bytes of the current request cycle (replayed on an upgrade)

    async def _next_event(self) -> Any:
        while True:
            ev = self.conn.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            with trio.move_on_after(self.server.config.http_idle_timeout_s) as idle:
                data = await self.stream.receive_some(65536)
            if idle.cancelled_caught:
                return h11.ConnectionClosed()
            if len(self.raw) < self.server.config.max_header_bytes * 2:
                self.raw += data
            self.conn.receive_data(data)

    async def _send(self, ev: Any) -> None:
        data = self.conn.send(ev)
        if data:
            await self.stream.send_all(data)

    async def _send_json(self, status: int, body: dict[str, Any],
                         headers: list[tuple[str, str]] | None = None) -> None:
        payload = p.dumps_json(body)
        hs = [("content-type", "application/json"), ("content-length", str(len(payload)))]
        await self._send(h11.Response(status_code=status, headers=hs + (headers or [])))
        await self._send(h11.Data(data=payload))
        await self._send(h11.EndOfMessage())

    async def _send_error(self, err: ProtocolError,
                          headers: list[tuple[str, str]] | None = None) -> None:
        self.server.stats.errors_sent += 1
        await self._send_json(err.status, err.to_event(), headers)

    async def serve(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                ev = await self._next_event()
            except h11.RemoteProtocolError as exc:
                await self._bad_request(exc)
                return
            if isinstance(ev, h11.ConnectionClosed):
                return
            if not isinstance(ev, h11.Request):
                return
            self.server.stats.http_requests += 1
            try:
                upgraded = await self._handle(ev, nursery)
            except h11.RemoteProtocolError as exc:
                await self._bad_request(exc)
                return
            if upgraded:
                return
            if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                return
            tail = self.conn.trailing_data[0]
            self.conn.start_next_cycle()
            self.raw = bytearray(tail)

    async def _bad_request(self, exc: h11.RemoteProtocolError) -> None:
        if self.conn.our_state is h11.SEND_RESPONSE or self.conn.our_state is h11.IDLE:
            try:
                status = exc.error_status_hint
                await self._send_error(ProtocolError(
                    "invalid_http", f"malformed HTTP request: {exc}", status=status))
            except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _read_body(self) -> bytes | None:
        """The request body, or None after answering 413 (too large)."""
        body = bytearray()
        limit = self.server.config.max_message_bytes
        if self.conn.client_is_waiting_for_100_continue:  # curl does this for large bodies
            await self._send(h11.InformationalResponse(status_code=100, headers=[]))
        while True:
            ev = await self._next_event()
            if isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > limit:
                    await self._send_error(ProtocolError(
                        ErrorCode.MESSAGE_TOO_LARGE,
                        f"the request body is over the {limit}-byte limit; send a smaller "
                        "context (or continue with previous_response_id)", status=413),
                        [("connection", "close")])
                    return None
            elif isinstance(ev, h11.EndOfMessage):
                return bytes(body)
            else:
                raise h11.RemoteProtocolError("the connection closed inside the request body")

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        token = self.server.config.token
        if token is None:
            return True
        got = headers.get(b"authorization", b"")
        want = b"Bearer " + token.encode()
        return hmac.compare_digest(got, want)

    async def _handle(self, req: h11.Request, nursery: trio.Nursery) -> bool:
        """Answer one request; True iff the connection became a WebSocket (and is now done)."""
        headers = _headers(req)
        path = req.target.split(b"?", 1)[0].decode("latin-1")
        method = req.method.decode("latin-1")
        is_ws = b"websocket" in headers.get(b"upgrade", b"").lower()
        if not self._authorized(headers):
            if not is_ws and method == "POST":
                await self._drain_body()
            await self._send_error(ProtocolError(
                ErrorCode.UNAUTHORIZED,
                "missing or wrong bearer token: send 'Authorization: Bearer <token>' with the "
                "server's token (SWITCHBOARD_TOKEN or its --token-file)", status=401),
                [("www-authenticate", "Bearer")] + ([("connection", "close")] if is_ws else []))
            return False
        if path == RESPONSES_PATH and method == "GET" and is_ws:
            await self._upgrade(headers, nursery)
            return True
        if path == RESPONSES_PATH and method == "POST":
            await self._post_response()
            return False
        if path == STATS_PATH and method == "GET":
            await self._send_json(200, self.server.statistics())
            return False
        if method == "POST":
            await self._drain_body()
        if path == RESPONSES_PATH and method == "GET":
            await self._send_error(ProtocolError(
                "upgrade_required", "GET /v1/responses must be a WebSocket upgrade; "
                "use POST /v1/responses for HTTP", status=426), [("upgrade", "websocket")])
        elif path in (RESPONSES_PATH, STATS_PATH):
            await self._send_error(ProtocolError(
                ErrorCode.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}",
                status=405))
        else:
            await self._send_error(ProtocolError(
                ErrorCode.NOT_FOUND, f"no such endpoint {path!r}: use POST {RESPONSES_PATH}, "
                f"a WebSocket on {RESPONSES_PATH}, or GET {STATS_PATH}", status=404))
        return False

    async def _drain_body(self) -> None:
        await self._read_body()

    async def _upgrade(self, headers: dict[bytes, bytes], nursery: trio.Nursery) -> None:
        if b"sec-websocket-key" not in headers or headers.get(b"sec-websocket-version") != b"13":
            await self._send_error(ProtocolError(
                "invalid_websocket_handshake",
                "a WebSocket upgrade needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
                status=400), [("connection", "close")])
            return
        cfg = self.server.config
        wscfg = WsConfig(max_message_size=cfg.max_message_bytes * 2)
        request = await accept_on_stream(self.stream, bytes(self.raw), config=wscfg)
        ws = await request.accept()
        st = self.server.stats
        st.ws_connections_open += 1
        st.ws_connections_total += 1
        try:
            batch = headers.get(p.EVENT_BATCH_HEADER[0].lower()) == p.EVENT_BATCH_HEADER[1]
            await _WsSession(self.server, ws, nursery, batch=batch).run()
        finally:
            st.ws_connections_open -= 1
            # Cancelled from outside: the server is shutting down. The library's reader task is
            # being cancelled too, so the peer's close reply may never be read: wait briefly.
            stopping = trio.current_effective_deadline() == -math.inf
            with trio.CancelScope(shield=True), trio.move_on_after(0.1 if stopping else 1):
                if stopping:
                    await ws.aclose(p.CLOSE_GOING_AWAY, "server shutting down")
                else:
                    await ws.aclose()

    async def _post_response(self) -> None:
        raw = await self._read_body()
        if raw is None:
            return
        try:
            body = p.loads_json(raw)
            req = p.parse_create_body(body, http=True)
            run = self.server.prepare(req, None, "request")
        except ProtocolError as err:
            await self._send_error(err)
            return
        if req.stream:
            await self._stream_sse(run)
        else:
            await self._respond_json(run)

    async def _watch_disconnect(self, scope: trio.CancelScope) -> None:
        """Cancel `scope` if the client goes away while we generate (any bytes it sends early,
        e.g. a pipelined request, are kept for h11)."""
        try:
            while True:
                data = await self.stream.receive_some(65536)
                if not data:
                    break
                self.conn.receive_data(data)
                if len(self.conn.trailing_data[0]) > self.server.config.max_header_bytes:
                    return  # stop reading; backpressure on a client that floods us
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def _respond_json(self, run: _Run) -> None:
        final: dict[str, Any] = {}

        async def keep_terminal(events: list[dict[str, Any]]) -> None:
            for ev in events:
                if ev["type"] in p.TERMINAL_TYPES:
                    final.update(ev["response"])
            await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, run.scope)
            await self.server.generate(run, keep_terminal)
            nursery.cancel_scope.cancel()
        if run.scope.cancelled_caught:
            return  # the client is gone
        await self._send_json(500 if run.status == "failed" else 200, final)

    async def _stream_sse(self, run: _Run) -> None:
        await self._send(h11.Response(status_code=200, headers=[
            ("content-type", "text/event-stream"), ("cache-control", "no-cache")]))

        async def send_sse(events: list[dict[str, Any]]) -> None:
            try:
                await self._send(h11.Data(data=b"".join(map(p.encode_sse, events))))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                run.scope.cancel()
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, run.scope)
            await self.server.generate(run, send_sse)
            nursery.cancel_scope.cancel()
        if run.scope.cancelled_caught:
            return
        await self._send(h11.EndOfMessage())


# --------------------------------------------------------------------------- serving


def _is_disconnect(exc: BaseException) -> bool:
    """True iff `exc` (or every leaf of an exception group) just means the peer went away."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_disconnect(e) for e in exc.exceptions)
    return isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError | WsClosed)


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def serve_model(
    config: ModelServerConfig,
    *,
    task_status: trio.TaskStatus[ModelServerInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the model on config.host:config.port until cancelled.

    `task_status.started` receives a ModelServerInfo (port 0 resolves to the bound port).
    Raises OSError if the address cannot be bound.
    """
    server = ModelServer.from_config(config)
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    bound = listeners[0].socket.getsockname()
    port = bound[1]
    host = config.host or bound[0]
    info = ModelServerInfo(host=host, port=port,
                           base_url=f"http://{_url_host(host)}:{port}/v1", server=server)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await _HttpConn(server, stream).serve(nursery)
                nursery.cancel_scope.cancel()
        except Exception as exc:  # one connection's failure must never take the server down
            if not _is_disconnect(exc):
                log.warning("connection.error", error=repr(exc), exc_info=True)
        finally:
            await trio.aclose_forcefully(stream)

    log.info("model_server.start", base_url=info.base_url, auth=config.token is not None)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(info)
