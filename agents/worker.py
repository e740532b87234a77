"""Owns the worker process: one bus connection, leased task attempts run as agent sessions.

Tree of scopes: worker nursery -> one cancel scope per attempt -> model session + tools.
Cancelling an attempt (orchestrator `cancel`, its timeout, worker shutdown) cancels that scope:
the model response is cancelled at the server, tool process groups are killed.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import pathlib
import re
import socket
import time
import urllib.parse
from typing import Any

import attrs
import structlog
import trio

from agents import protocol as P
from agents.bustools import BUS_TOOL_NAMES, BusTools, Inbox, register_bus_tools
from agents.loop import LoopState, run_agent_loop, turn_cost
from agents.tools import ToolContext, ToolRegistry, ToolSpecError, build_registry
from bus.client import open_bus_client
from bus.codec import pattern_matches
from bus.errors import BodyTooLargeError, BusError
from bus.logs import get_logger
from modellink.client import ModelEndpoint, open_model_session
from modellink.turns import ModelAuthError, ModelRequestError, ModelServerError

log = get_logger("agents.worker")

LOG_BUFFER = 5000  # log lines held for shipping; beyond it the oldest are dropped and counted
SAFE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER", "SHELL", "TERM")
MODEL_TOKEN_ENV = "SWITCHBOARD_MODEL_TOKEN"  # bearer token for a token-protected model server
RESULT_SEND_S = 2.0  # how long a finished attempt may wait to hand its result to the bus
ASK_ANSWER_MAX_S = 60.0  # an answer's model turn never runs longer than this
READERS = frozenset({"read_topic", "read_messages"})  # tools that read a task's inbox


def workspace_dir(root: pathlib.Path, run_id: str, task_id: str) -> pathlib.Path:
    """The task's directory: one path segment per task, so a spawned child `plan/1` is a
    sibling of `plan`, not inside its workspace (`/` and `%` are %-escaped)."""
    return _run_dir(root, run_id) / urllib.parse.quote(task_id, safe="[]-_.")


@functools.lru_cache(maxsize=16)
def _run_dir(root: pathlib.Path, run_id: str) -> pathlib.Path:
    return root / run_id  # once per run, not per attempt: path joins are slow


_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")  # a key holding one cannot be a header value


class MissingModelKeyError(ValueError):
    """The agent's model needs a key that this worker's environment does not hold."""


# 4xx statuses that say "later", not "never": timeout, conflict, too early, rate limited.
_RETRY_LATER = frozenset({408, 409, 425, 429})


def retryable(exc: BaseException) -> bool:
    """False iff an attempt that failed with `exc` would fail the same way again: the endpoint
    refused the credentials or the request itself (a 4xx that is not "later"), the worker has
    no key, or a tool of the agent cannot be loaded. Network breaks, server errors and
    everything else may pass next time."""
    if isinstance(exc, ModelAuthError | MissingModelKeyError | ToolSpecError):
        return False
    if isinstance(exc, ModelRequestError) and not isinstance(exc, ModelServerError) \
            and exc.status is not None:
        return not 400 <= exc.status < 500 or exc.status in _RETRY_LATER
    return True


def _sim_metadata(agent: P.AgentSpec, attempt: int, script: tuple[Any, ...] | None
                  ) -> dict[str, str] | None:
    """The request metadata a sim model follows (its script, the attempt number); None for a
    real model, which would refuse it (OpenAI caps a value at 512 characters) or keep it."""
    if not agent.model.sim:
        return None
    metadata = {"sim_attempt": str(attempt)}
    if script:
        metadata["sim_script"] = _script_json(script)
    return metadata


# A run's leases carry one of a few agents, parsed once (agents.protocol caches them by
# agent_key): their scripts' JSON is made once too. Keyed by identity, holding the script so
# the id stays its own; bounded, cleared when full.
_SCRIPTS: dict[int, tuple[tuple[Any, ...], str]] = {}


def _script_json(script: tuple[Any, ...]) -> str:
    hit = _SCRIPTS.get(id(script))
    if hit is not None and hit[0] is script:
        return hit[1]
    if len(_SCRIPTS) >= 256:
        _SCRIPTS.clear()
    text = json.dumps(list(script))
    _SCRIPTS[id(script)] = (script, text)
    return text


def model_token(cfg_token: str | None, env: Any = os.environ) -> str | None:
    """The token for a sim model server (`orchestrator model-server`) when the agent names no
    api_key_env: the worker's configured one, else $SWITCHBOARD_MODEL_TOKEN."""
    return cfg_token or (env.get(MODEL_TOKEN_ENV) or "").strip() or None


def model_key(name: str, worker_id: str, env: Any = os.environ) -> str:
    """The key in $`name`, without the line end a Secret made from a file or a CRLF .env file
    leaves on it. Raises MissingModelKeyError when it is unset or empty, or holds a control
    character inside (it would fail as an HTTP header, and the error would carry the key to
    the journal and the logs); the message never repeats the value."""
    key = (env.get(name) or "").strip()
    if not key:
        raise MissingModelKeyError(
            f"the agent's model needs a key in ${name}, which is not set on worker "
            f"{worker_id}; export it where the workers start")
    if _CONTROL_CHAR.search(key):
        raise MissingModelKeyError(
            f"${name} on worker {worker_id} holds a control character (a line break?) inside "
            "the key; set it to the key alone")
    return key


@attrs.frozen(kw_only=True)
class WorkerConfig:
    url: str
    token: str | None
    worker_id: str
    capacity: int = 8
    heartbeat_s: float = 1.0
    workspace_root: pathlib.Path = pathlib.Path(".switchboard/workspaces")
    pass_env: tuple[str, ...] = ()  # extra environment variable names the shell tool may see
    ship_logs: bool = True
    # Sent as the bearer token to model servers when the agent's model names no api_key_env
    # (a token-protected `orchestrator model-server`); None falls back to $SWITCHBOARD_MODEL_TOKEN.
    model_token: str | None = attrs.field(default=None, repr=False)


@attrs.define
class _Running:
    lease: P.Lease
    scope: trio.CancelScope
    inbox: Inbox
    state: LoopState
    cancel_reason: str | None = None
    side: trio.Nursery | None = None  # answers to `ask`s run here: they end with the attempt


class LogShipper:
    """A bounded buffer of this process's JSON log lines, shipped to the orchestrator in batches."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.dropped = 0

    def add(self, line: bytes) -> None:
        if len(self.lines) >= LOG_BUFFER:
            self.lines.pop(0)
            self.dropped += 1
        self.lines.append(line)

    def take(self) -> list[bytes]:
        out, self.lines = self.lines, []
        return out


@attrs.define
class Worker:
    config: WorkerConfig
    shipper: LogShipper | None = None
    running: dict[tuple[str, int], _Running] = attrs.field(factory=dict)
    draining: bool = False
    bus: Any = None
    _nursery: trio.Nursery | None = None
    # topic pattern -> running attempts that subscribe to it; the bus subscription is held
    # while the count is above zero
    subs: collections.Counter[str] = attrs.field(factory=collections.Counter)
    stop_reason: str | None = None  # set by stop(); the bye says it
    served: bool = False  # True once joined: a bus error after that is not "cannot reach"
    _env: dict[str, str] | None = None  # see _tool_env
    _bare: ToolContext | None = None  # see _no_local_tools
    _hello: dict[str, Any] | None = None  # what run() said first; heartbeats repeat it

    def stop(self, reason: str = "stopped") -> bool:
        """Stop serving: cancel every running attempt (each still reports "cancelled", with
        where it stopped, to the orchestrator), ship the last log lines, say bye, and return
        from run(). Returns False, doing nothing, when run() is not serving yet (the caller
        may then cancel it outright: there is nothing to report)."""
        if self._nursery is None:
            return False
        if self.stop_reason is None:
            self.stop_reason = reason
        self._nursery.cancel_scope.cancel()
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Serve leases until drained or cancelled. Raises BusError if the bus cannot be reached."""
        cfg = self.config
        structlog.contextvars.bind_contextvars(worker_id=cfg.worker_id)
        async with open_bus_client(cfg.url, token=cfg.token or "",
                                   endpoint_id=P.worker_endpoint(cfg.worker_id)) as bus:
            self.bus = bus
            self._hello = P.hello(cfg.worker_id, cfg.capacity, os.getpid(),
                                  socket.gethostname())
            await bus.send(P.ORCHESTRATOR_ID, self._hello)
            log.info("worker.ready", capacity=cfg.capacity, url=cfg.url)
            self.served = True
            task_status.started()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._heartbeats)
                if self.shipper is not None:
                    nursery.start_soon(self._ship_logs)
                await self._receive_loop(nursery)
                nursery.cancel_scope.cancel()
            log.info("worker.exit", draining=self.draining)
            await self._say_bye()
        return 0

    # ------------------------------------------------------------ bus input

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        async for msg in self.bus:
            if msg.kind == "request" and msg.dest.startswith("task."):
                nursery.start_soon(self._on_task_request, msg)
                continue
            try:
                body = P.parse_message(msg.payload())
            except (P.WorkerProtocolError, ValueError) as exc:
                log.warning("worker.bad_message", source=msg.source, error=str(exc))
                continue
            if msg.kind == "publish":
                if isinstance(body, dict) and body["t"] == "topic":
                    self._deliver_topic(msg.dest, body)
            elif isinstance(body, P.Lease):
                await self._on_lease(nursery, body)
            elif isinstance(body, dict) and body["t"] == "cancel":
                r = self.running.get((body["task_id"], body["attempt"]))
                if r is not None:
                    r.cancel_reason = str(body.get("reason") or "cancelled")
                    r.scope.cancel()
            elif isinstance(body, dict) and body["t"] == "drain":
                self.draining = True
                log.info("worker.draining", held=len(self.running))
                if not self.running:
                    break

    def _deliver_topic(self, topic: str, body: dict[str, Any]) -> None:
        """Put a publish in the inbox of every running task subscribed to a matching pattern
        (not the publisher's own)."""
        for (tid, _a), r in self.running.items():
            if tid != body.get("from") and any(pattern_matches(p, topic)
                                               for p in r.lease.agent.subscribe):
                r.inbox.put({"from": body.get("from"), "text": body["text"], "topic": topic})

    async def _on_task_request(self, msg: Any) -> None:
        task_id = msg.dest[len("task."):]
        try:
            body = msg.payload()
        except Exception:
            await self._reply_error(msg, "bad_request", "body is not msgpack")
            return
        run = next((r for (tid, _), r in self.running.items() if tid == task_id), None)
        if run is None or not isinstance(body, dict):
            await self._reply_error(msg, "no_such_task", f"task {task_id} is not running here")
            return
        if body.get("t") == "message":
            if not READERS & set(run.lease.agent.tools):  # "delivered" would be a lie
                await self._reply_error(msg, "cannot_read", (
                    f"task {task_id} cannot read messages (its agent has no read_topic tool): "
                    "use ask, which it answers"))
                return
            run.inbox.put({"from": body.get("from"), "text": body.get("text"), "topic": None})
            await self._reply(msg, {"ok": True})
        elif body.get("t") == "ask":
            if run.side is None:
                await self._reply_error(msg, "no_such_task", f"task {task_id} is not ready yet")
                return
            run.side.start_soon(self._answer_ask, run, msg, body)
        else:
            await self._reply_error(msg, "bad_request", f"unknown request {body.get('t')!r}")

    async def _answer_ask(self, run: _Running, msg: Any, body: dict[str, Any]) -> None:
        """Answer one ask, in the answered attempt's side nursery: if that attempt ends first,
        the answer's model response is cancelled and the asker told so."""
        lease = run.lease
        structlog.contextvars.bind_contextvars(  # this task was started from the bus reader
            run_id=lease.run_id, task_id=lease.task_id, attempt=lease.attempt,
            agent_id=lease.agent.name)
        limit = body.get("timeout_s")
        limit = float(limit) if isinstance(limit, (int, float)) and limit > 0 else ASK_ANSWER_MAX_S
        answer: str | None = None
        try:
            with trio.move_on_after(min(limit, ASK_ANSWER_MAX_S)):
                answer = await self._answer(run, str(body.get("from")), str(body.get("question")))
        except trio.Cancelled:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + RESULT_SEND_S):
                await self._reply_error(msg, "task_ended",
                                        f"task {run.lease.task_id} ended before it answered")
            raise
        except Exception as exc:  # the asker gets the reason; this worker goes on
            log.warning("ask.failed", error=repr(exc))
            await self._reply_error(msg, "answer_failed", str(exc))
            return
        if answer is None:
            await self._reply_error(msg, "answer_timeout", "no answer in time")
            return
        await self._reply(msg, {"answer": answer})

    async def _reply(self, msg: Any, body: Any) -> None:
        try:
            await self.bus.reply(msg, body)
        except BodyTooLargeError as exc:  # the asker hears why instead of waiting it out
            log.warning("reply.too_large", bytes=exc.size, limit=exc.limit)
            await self._reply_error(msg, "answer_too_large", (
                f"the answer is {exc.size} bytes, over the bus's limit of {exc.limit}: ask "
                "for a shorter answer, or for the path of a file holding it"))
        except BusError as exc:
            log.warning("reply.failed", error=str(exc))

    async def _reply_error(self, msg: Any, code: str, text: str) -> None:
        try:
            await self.bus.reply_error(msg, code, text)
        except BusError as exc:
            log.warning("reply.failed", error=str(exc))

    async def _answer(self, run: _Running, asker: str, question: str) -> str:
        """Answer a question for a running task with a side session (the task's loop goes on).

        The answer's model turn is the answering task's spending: it joins that attempt's
        turns (numbered with the turn it is on, tool_calls ("answer:ASKER",))."""
        lease = run.lease
        agent = lease.agent
        metadata = _sim_metadata(agent, lease.attempt, agent.answers)
        endpoint = self._endpoint(lease)
        prompt = (f"You are working on this task:\n{lease.prompt}\n\n"
                  f"Task {asker} asks you: {question}\nAnswer briefly.")
        async with open_model_session(endpoint, instructions=agent.instructions, tools=[],
                                      metadata=metadata) as session:
            res = await session.turn([{"type": "message", "role": "user", "content": prompt}])
        rec = P.TurnRecord(turn=run.state.turn, input_tokens=res.usage.input_tokens,
                           cached_tokens=res.usage.cached_tokens,
                           output_tokens=res.usage.output_tokens, bytes_sent=res.bytes_sent,
                           bytes_received=res.bytes_received, model_s=res.elapsed_s,
                           tool_calls=(f"answer:{asker}",))
        run.state.turns.append(attrs.evolve(rec, cost_usd=turn_cost(agent.model, rec)))
        if res.status != "completed":
            raise ValueError(f"the answering model response ended {res.status}")
        log.info("ask.answered", asker=asker, output_tokens=rec.output_tokens)
        return str(res.text)

    # ------------------------------------------------------------ leases

    async def _on_lease(self, nursery: trio.Nursery, lease: P.Lease) -> None:
        key = (lease.task_id, lease.attempt)
        if self.draining or len(self.running) >= self.config.capacity or key in self.running:
            why = "draining" if self.draining else "at capacity"
            await self.bus.send(P.ORCHESTRATOR_ID, P.refused(lease.task_id, lease.attempt, why))
            return
        r = _Running(lease=lease, scope=trio.CancelScope(), inbox=Inbox(), state=LoopState())
        self.running[key] = r
        nursery.start_soon(self._run_attempt, r)

    def _endpoint(self, lease: P.Lease) -> ModelEndpoint:
        m = lease.agent.model
        api_key: str | None
        if m.api_key_env:
            api_key = model_key(m.api_key_env, self.config.worker_id)
        elif m.sim:  # our own model server: never hand its token to somebody else's endpoint
            api_key = model_token(self.config.model_token)
        else:
            api_key = None
        base = lease.model_base_url or m.base_url
        if base is None:
            raise ValueError("no model endpoint: the lease names none and the agent has no url")
        return ModelEndpoint(base_url=base, model=m.model, transport=m.transport,
                             encoding=m.encoding, api_key=api_key, retries=m.turn_retries)

    async def _run_attempt(self, r: _Running) -> None:
        lease = r.lease
        key = (lease.task_id, lease.attempt)
        # this task's own context (trio gives each task a copy): bound for its lines alone,
        # with nothing to restore after (bound_contextvars walked the context twice more)
        structlog.contextvars.bind_contextvars(
            run_id=lease.run_id, task_id=lease.task_id, attempt=lease.attempt,
            agent_id=lease.agent.name)
        t0 = time.monotonic()
        log.info("task.start", parent=lease.parent_task)
        result: P.Result | None = None
        try:
            result = await self._execute(r)
        finally:
            self.running.pop(key, None)
            if result is None:  # the worker itself is stopping: say where we were
                result = self._result(r, "cancelled", error="worker shutting down")
            log.info("task.end", status=result.status, error=result.error,
                     turns=len(result.turns), seconds=round(time.monotonic() - t0, 3),
                     stopped_at=result.stopped_at, cost_usd=result.cost_usd,
                     output_tokens=sum(t.output_tokens for t in result.turns))
            await self._send_result(result)
        if self.draining and not self.running and self._nursery is not None:
            self._nursery.cancel_scope.cancel()  # drained: finish what we held, then exit

    async def _send_result(self, result: P.Result) -> None:
        """Hand the result to the bus, even from a cancelled attempt (the worker stopping).
        The rule is room in the outbound queue: then it is queued at once, with no scope to
        enter; else it waits, shielded, up to RESULT_SEND_S."""
        body = P.to_wire(result)
        try:
            try:
                self.bus.send_nowait(P.ORCHESTRATOR_ID, body)
                return
            except BodyTooLargeError as exc:
                # the answer cannot travel: the task fails saying so (another attempt would
                # most likely produce as much), the worker goes on
                log.warning("task.result_too_large", bytes=exc.size, limit=exc.limit)
                body = P.to_wire(_too_large(result, exc))
            except trio.WouldBlock:
                pass
            with trio.CancelScope(shield=True, deadline=trio.current_time() + RESULT_SEND_S):
                await self.bus.send(P.ORCHESTRATOR_ID, body)
        except BusError as exc:
            log.warning("task.result_not_sent", error=str(exc))

    def _result(self, r: _Running, status: str, *, text: str = "",
                outputs: dict[str, Any] | None = None, error: str | None = None,
                again: bool = True) -> P.Result:
        lease = r.lease
        turns = tuple(r.state.turns)
        return P.Result(run_id=lease.run_id, task_id=lease.task_id, attempt=lease.attempt,
                        worker_id=self.config.worker_id, status=status, text=text,
                        outputs=outputs or {}, error=error, turns=turns,
                        stopped_at=None if status == "succeeded" else r.state.where(),
                        cost_usd=sum(t.cost_usd for t in turns), retryable=again)

    async def _execute(self, r: _Running) -> P.Result:
        """Run one attempt in its cancel scope. Returns how it ended; raises trio.Cancelled
        only when the worker itself is cancelled (its own scope's cancel becomes a result).

        The attempt's scope carries its timeout as its deadline (one scope, not two: a scope
        costs a few microseconds to enter and leave, at every attempt); `cancel_reason` tells
        a cancel from the orchestrator apart from the deadline."""
        lease, cfg = r.lease, self.config
        agent = lease.agent
        status, text, outputs, error = "failed", "", {}, None
        again = True
        deadline = (trio.current_time() + lease.timeout_s) if lease.timeout_s else None
        claimed = False
        subscribed: list[str] = []
        registry: ToolRegistry | None = None
        if deadline is not None:
            r.scope.deadline = deadline
        with r.scope:
            try:
                local: list[str | dict[str, Any]] = [
                    t for t in agent.tools if t not in BUS_TOOL_NAMES]
                if local:  # only local tools (shell, files, functions) use the workspace
                    workspace = workspace_dir(cfg.workspace_root, lease.run_id, lease.task_id)
                    workspace.mkdir(parents=True, exist_ok=True)
                    registry = build_registry(local, ToolContext(
                        workspace=workspace, env=self._tool_env(),
                        shell_timeout_s=agent.shell_timeout_s))
                else:  # no workspace, environment or loading: the bus tools at most
                    registry = ToolRegistry(self._no_local_tools())
                if agent.tools:
                    register_bus_tools(registry, BusTools(
                        bus=self.bus, run_id=lease.run_id, task_id=lease.task_id,
                        attempt=lease.attempt, inbox=r.inbox, deadline=deadline),
                        list(agent.tools))
                metadata = _sim_metadata(agent, lease.attempt, agent.script)
                if lease.reachable:  # another task may ask or message this one
                    await self.bus.claim(P.task_endpoint(lease.task_id))
                    claimed = True
                for pattern in agent.subscribe:
                    subscribed.append(pattern)
                    self.subs[pattern] += 1
                    if self.subs[pattern] == 1:
                        await self.bus.subscribe(pattern)
                # Asks reach a task through its alias: one that claimed none needs no nursery
                # to answer them in.
                async with _side_nursery(claimed) as side:
                    r.side = side
                    async with open_model_session(
                        self._endpoint(lease), instructions=agent.instructions,
                        tools=registry.schemas(), metadata=metadata,
                        metadata_once=True,  # a sim keeps it per conversation
                    ) as session:
                        # no deadline of its own: this scope's ends the loop first
                        out = await run_agent_loop(agent=agent, prompt=lease.prompt,
                                                   session=session, registry=registry,
                                                   state=r.state)
                    r.side = None
                    if side is not None:
                        side.cancel_scope.cancel()  # answers in progress end with the task
                status, text, outputs, error = out.status, out.text, out.outputs, out.error
            except Exception as exc:  # the attempt fails; the worker and other attempts go on
                leaf = _leaf(exc)
                error = f"{type(leaf).__name__}: {leaf}"
                again = retryable(leaf)
                log.warning("task.error", error=error, retryable=again)
            finally:
                r.side = None
                if registry is not None:
                    registry.close()  # the shell's spare process exits
                if claimed or subscribed:  # (most attempts hold neither: no scope to enter)
                    with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
                        await self._unhold(lease.task_id if claimed else None, subscribed)
        if r.scope.cancelled_caught:
            if r.cancel_reason is not None:  # the orchestrator's cancel
                status, error = "cancelled", r.cancel_reason
            else:  # the deadline
                status, error = "failed", \
                    f"timed out after {lease.timeout_s:g}s at {r.state.where()}"
        return self._result(r, status, text=text, outputs=outputs, error=error, again=again)

    def _no_local_tools(self) -> ToolContext:
        """The tool context of an agent without local tools: nothing reads it (bus tools
        take what they need apart), so one serves every such attempt."""
        if self._bare is None:
            self._bare = ToolContext(workspace=self.config.workspace_root)
        return self._bare

    def _tool_env(self) -> dict[str, str]:
        """The environment tools see (an allow-list of this process's), read once: a copy per
        attempt, since a tool context may keep it."""
        if self._env is None:
            names = SAFE_ENV + self.config.pass_env
            self._env = {k: os.environ[k] for k in names if k in os.environ}
        return dict(self._env)

    async def _unhold(self, task_id: str | None, patterns: list[str]) -> None:
        """Release the task's alias and drop subscriptions no other running attempt needs."""
        drop = []
        for pattern in patterns:
            self.subs[pattern] -= 1
            if self.subs[pattern] <= 0:
                del self.subs[pattern]
                drop.append(pattern)
        try:
            if task_id is not None:
                await self.bus.release(P.task_endpoint(task_id))
            for pattern in drop:
                await self.bus.unsubscribe(pattern)
        except BusError as exc:
            log.warning("task.unhold_failed", error=str(exc))

    # ------------------------------------------------------------ background

    async def _heartbeats(self) -> None:
        while True:
            held = list(self.running.keys())
            try:
                await self.bus.send(P.ORCHESTRATOR_ID, P.heartbeat(
                    self.config.worker_id, held, self.draining, joins=self._hello))
            except BusError as exc:
                log.warning("heartbeat.failed", error=str(exc))
            await trio.sleep(self.config.heartbeat_s)

    async def _ship_logs(self) -> None:
        assert self.shipper is not None
        while True:
            await trio.sleep(0.25)
            lines = self.shipper.take()
            if lines:
                try:
                    await self.bus.send(P.ORCHESTRATOR_ID, P.logs(self.config.worker_id, lines))
                except BusError:
                    pass

    async def _say_bye(self) -> None:
        # Shielded but bounded: a broken bus must not keep a stopping worker alive.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
            if self.shipper is not None:
                lines = self.shipper.take()
                if lines:
                    try:
                        await self.bus.send(P.ORCHESTRATOR_ID,
                                            P.logs(self.config.worker_id, lines))
                    except BusError:
                        pass
            try:
                await self.bus.send(P.ORCHESTRATOR_ID,
                                    P.bye(self.config.worker_id, self.stop_reason or "drained"))
            except BusError:
                pass


def _side_nursery(wanted: bool) -> contextlib.AbstractAsyncContextManager[trio.Nursery | None]:
    """A nursery for an attempt's side tasks (answers to asks), or None when none can come."""
    return trio.open_nursery() if wanted else contextlib.nullcontext()


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups (nurseries wrap)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _too_large(result: P.Result, exc: BodyTooLargeError) -> P.Result:
    """`result` failed in place: its answer and outputs (`exc.size` bytes on the wire) do not
    fit in one bus message. Its turns are kept (their usage is real); not retried."""
    return attrs.evolve(result, status="failed", text="", outputs={}, retryable=False, error=(
        f"the task's result is {exc.size} bytes, over the bus's message limit of {exc.limit}: "
        "have the agent write large output to a file in its workspace and answer with the "
        "file's path, or ask for a shorter answer"))
