"""Owns the messages between the orchestrator and its workers over the bus (no I/O here).

Every body is a msgpack map with a type tag `t`. Workers talk to the endpoint id
`orchestrator`; the orchestrator talks to `worker.<worker_id>`; a running task is reachable
(for `ask`) at `task.<task_id>`, an alias its worker claims for the task's lifetime.

The rule for incoming messages: `parse_message` either returns a typed value or raises
`WorkerProtocolError` naming the field; the receiver cuts off a peer that sends one.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
import msgpack

PROTOCOL_VERSION = 1
ORCHESTRATOR_ID = "orchestrator"
RUN_TOPIC_PREFIX = "run."


def worker_endpoint(worker_id: str) -> str:
    return f"worker.{worker_id}"


def task_endpoint(task_id: str) -> str:
    return f"task.{task_id}"


class WorkerProtocolError(ValueError):
    """A message broke the worker protocol (the sender's fault): cut the sender off."""


# ---------------------------------------------------------------- values


TURN_RETRIES_DEFAULT = 2  # as OpenAI's SDK
TURN_RETRIES_MAX = 20


@attrs.frozen(kw_only=True)
class ModelRef:
    """Where an agent's model lives. base_url None means the orchestrator's embedded sim."""

    base_url: str | None = None
    model: str = "sim"
    transport: str = "ws"  # "ws" (persistent, cached context) or "http" (full context per turn)
    encoding: str = "msgpack"  # "msgpack" for our servers, "json" for OpenAI and the like
    api_key_env: str | None = None  # read by the worker from ITS environment; never shipped
    store: bool = False
    # True iff the endpoint is a sim model (embedded, or `orchestrator model-server`): only a
    # sim is sent the agent's script (a real provider would refuse or bill the metadata)
    sim: bool = True
    # How many times one model turn is sent again after a rate limit or a server error
    # (429/5xx, Retry-After honoured) before the attempt fails: ModelEndpoint.retries
    turn_retries: int = TURN_RETRIES_DEFAULT


@attrs.frozen(kw_only=True)
class AgentSpec:
    name: str
    instructions: str = ""
    tools: tuple[str, ...] = ()
    max_turns: int = 50
    script: tuple[Any, ...] | None = None  # the sim model's script, one step per turn
    answers: tuple[Any, ...] | None = None  # the sim script used to answer `ask` questions
    subscribe: tuple[str, ...] = ()
    model: ModelRef = ModelRef()
    shell_timeout_s: float = 60.0


@attrs.frozen(kw_only=True)
class Lease:
    """orchestrator -> worker: run this attempt. Valid while heartbeats keep renewing it."""

    run_id: str
    task_id: str
    attempt: int
    agent: AgentSpec
    prompt: str
    timeout_s: float | None
    model_base_url: str | None  # the resolved URL (embedded sim filled in by the orchestrator)
    parent_task: str | None = None
    # False iff no agent of the run has a tool that addresses a task (ask, send_message): the
    # worker then does not claim `task.<id>` on the bus (two control round trips per attempt)
    reachable: bool = True


@attrs.frozen(kw_only=True)
class TurnRecord:
    turn: int
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    model_s: float = 0.0
    tools_s: float = 0.0
    tool_calls: tuple[str, ...] = ()
    resent_full_context: bool = False
    cost_usd: float = 0.0


@attrs.frozen(kw_only=True)
class Result:
    """worker -> orchestrator: how an attempt ended. status: succeeded | failed | cancelled."""

    run_id: str
    task_id: str
    attempt: int
    worker_id: str
    status: str
    text: str = ""
    outputs: dict[str, Any] = attrs.field(factory=dict)
    error: str | None = None
    turns: tuple[TurnRecord, ...] = ()
    stopped_at: str | None = None  # where a cancelled/failed attempt stopped ("turn 3: tools")
    cost_usd: float = 0.0
    # False iff another attempt would fail the same way (refused credentials or request, no
    # key on the worker): the task then fails without spending its retries
    retryable: bool = True


# ---------------------------------------------------------------- encoding to plain maps


# A run's leases carry one of a few agents each: their wire maps are built once (attrs.asdict
# per lease was ~1% of the orchestrator's CPU at 10,000 tasks), with a key naming their content
# (`agent_key`), by which a worker parses each agent once. Keyed by identity, holding the agent
# so the id stays its own; bounded, cleared when full. Callers only pack these maps.
_AGENT_WIRE: dict[int, tuple[AgentSpec, dict[str, Any], str]] = {}
_AGENT_WIRE_MAX = 256
# agent_key -> the agent parsed from the first lease that carried it (worker side)
_AGENTS: dict[str, AgentSpec] = {}


def _agent_to_wire(a: AgentSpec) -> tuple[dict[str, Any], str]:
    """The agent's wire map and its agent_key (a digest of the map's msgpack)."""
    hit = _AGENT_WIRE.get(id(a))
    if hit is not None and hit[0] is a:
        return hit[1], hit[2]
    if len(_AGENT_WIRE) >= _AGENT_WIRE_MAX:
        _AGENT_WIRE.clear()
    d = _build_agent_wire(a)
    key = hashlib.blake2b(msgpack.packb(d, use_bin_type=True), digest_size=12).hexdigest()
    _AGENT_WIRE[id(a)] = (a, d, key)
    return d, key


def _build_agent_wire(a: AgentSpec) -> dict[str, Any]:
    d = attrs.asdict(a, recurse=True)
    d["tools"] = list(a.tools)
    d["subscribe"] = list(a.subscribe)
    d["script"] = list(a.script) if a.script is not None else None
    d["answers"] = list(a.answers) if a.answers is not None else None
    return d


def to_wire(msg: Any) -> dict[str, Any]:
    """Encode one protocol value as a msgpack-able map with its type tag."""
    if isinstance(msg, Lease):
        agent, key = _agent_to_wire(msg.agent)
        return {"run_id": msg.run_id, "task_id": msg.task_id, "attempt": msg.attempt,
                "agent": agent, "agent_key": key, "prompt": msg.prompt,
                "timeout_s": msg.timeout_s, "model_base_url": msg.model_base_url,
                "parent_task": msg.parent_task, "reachable": msg.reachable, "t": "lease"}
    if isinstance(msg, Result):
        # Written out: msgpack walks the outputs map and packs tuples as arrays itself, and
        # attrs.asdict (a field list walked per value) was ~2% of a worker's CPU.
        return {"run_id": msg.run_id, "task_id": msg.task_id, "attempt": msg.attempt,
                "worker_id": msg.worker_id, "status": msg.status, "text": msg.text,
                "outputs": msg.outputs, "error": msg.error,
                "turns": [_turn_to_wire(t) for t in msg.turns], "stopped_at": msg.stopped_at,
                "cost_usd": msg.cost_usd, "retryable": msg.retryable, "t": "result"}
    raise TypeError(f"not a protocol value: {type(msg).__name__}")


def _turn_to_wire(t: TurnRecord) -> dict[str, Any]:
    return {"turn": t.turn, "input_tokens": t.input_tokens, "cached_tokens": t.cached_tokens,
            "output_tokens": t.output_tokens, "bytes_sent": t.bytes_sent,
            "bytes_received": t.bytes_received, "model_s": t.model_s, "tools_s": t.tools_s,
            "tool_calls": t.tool_calls, "resent_full_context": t.resent_full_context,
            "cost_usd": t.cost_usd}


def hello(worker_id: str, capacity: int, pid: int, host: str) -> dict[str, Any]:
    return {"t": "hello", "v": PROTOCOL_VERSION, "worker_id": worker_id, "capacity": capacity,
            "pid": pid, "host": host}


def heartbeat(worker_id: str, held: list[tuple[str, int]], draining: bool,
              joins: dict[str, Any] | None = None) -> dict[str, Any]:
    """`joins`: the worker's hello (capacity, pid, host, v), so that an orchestrator started
    after the worker said hello (a run on a standalone hub) takes it on from a heartbeat."""
    body = {"t": "heartbeat", "worker_id": worker_id, "held": [[t, a] for t, a in held],
            "draining": draining}
    if joins is not None:
        body["join"] = {k: joins[k] for k in ("v", "capacity", "pid", "host")}
    return body


def cancel(task_id: str, attempt: int, reason: str) -> dict[str, Any]:
    return {"t": "cancel", "task_id": task_id, "attempt": attempt, "reason": reason}


def drain() -> dict[str, Any]:
    return {"t": "drain"}


def bye(worker_id: str, reason: str) -> dict[str, Any]:
    return {"t": "bye", "worker_id": worker_id, "reason": reason}


def logs(worker_id: str, lines: list[bytes]) -> dict[str, Any]:
    return {"t": "logs", "worker_id": worker_id, "lines": lines}


def refused(task_id: str, attempt: int, reason: str) -> dict[str, Any]:
    return {"t": "refused", "task_id": task_id, "attempt": attempt, "reason": reason}


# ---------------------------------------------------------------- decoding with checks


def _req(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise WorkerProtocolError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        tn = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise WorkerProtocolError(f"{where}: field {key!r} must be {tn}, got {type(v).__name__}")
    return v


def _opt(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str, default: Any) -> Any:
    if d.get(key) is None:
        return default
    return _req(d, key, typ, where)


def _agent_from_wire(d: Any) -> AgentSpec:
    if not isinstance(d, dict):
        raise WorkerProtocolError("lease: field 'agent' must be a map")
    m = d.get("model") or {}
    if not isinstance(m, dict):
        raise WorkerProtocolError("lease: field 'agent.model' must be a map")
    model = ModelRef(
        base_url=_opt(m, "base_url", str, "agent.model", None),
        model=_opt(m, "model", str, "agent.model", "sim"),
        transport=_opt(m, "transport", str, "agent.model", "ws"),
        encoding=_opt(m, "encoding", str, "agent.model", "msgpack"),
        api_key_env=_opt(m, "api_key_env", str, "agent.model", None),
        store=bool(m.get("store", False)),
        sim=bool(m.get("sim", m.get("base_url") is None)),
        turn_retries=_opt(m, "turn_retries", int, "agent.model", TURN_RETRIES_DEFAULT),
    )
    if not 0 <= model.turn_retries <= TURN_RETRIES_MAX:
        raise WorkerProtocolError(f"agent.model: field 'turn_retries' must be 0 to "
                                  f"{TURN_RETRIES_MAX}, got {model.turn_retries}")
    script = d.get("script")
    answers = d.get("answers")
    return AgentSpec(
        name=_req(d, "name", str, "agent"),
        instructions=_opt(d, "instructions", str, "agent", ""),
        tools=tuple(_opt(d, "tools", list, "agent", [])),
        max_turns=_opt(d, "max_turns", int, "agent", 50),
        script=tuple(script) if isinstance(script, list) else None,
        answers=tuple(answers) if isinstance(answers, list) else None,
        subscribe=tuple(_opt(d, "subscribe", list, "agent", [])),
        model=model,
        shell_timeout_s=float(_opt(d, "shell_timeout_s", (int, float), "agent", 60.0)),
    )


def _lease_agent(body: dict[str, Any]) -> AgentSpec:
    """The lease's agent: parsed from its map the first time its agent_key is seen (the
    orchestrator names each agent's content so), then the same spec again."""
    key = body.get("agent_key")
    if not isinstance(key, str):
        return _agent_from_wire(body.get("agent"))
    agent = _AGENTS.get(key)
    if agent is None:
        agent = _agent_from_wire(body.get("agent"))
        if len(_AGENTS) >= _AGENT_WIRE_MAX:
            _AGENTS.clear()
        _AGENTS[key] = agent
    return agent


def parse_message(body: Any) -> Any:
    """Decode a received body into a protocol value or a checked map. Raises WorkerProtocolError."""
    if not isinstance(body, dict):
        raise WorkerProtocolError(f"message must be a map, got {type(body).__name__}")
    t = body.get("t")
    if t == "lease":
        return Lease(
            run_id=_req(body, "run_id", str, "lease"),
            task_id=_req(body, "task_id", str, "lease"),
            attempt=_req(body, "attempt", int, "lease"),
            agent=_lease_agent(body),
            prompt=_req(body, "prompt", str, "lease"),
            timeout_s=_opt(body, "timeout_s", (int, float), "lease", None),
            model_base_url=_opt(body, "model_base_url", str, "lease", None),
            parent_task=_opt(body, "parent_task", str, "lease", None),
            reachable=_opt(body, "reachable", bool, "lease", True),
        )
    if t == "result":
        turns = [_turn_from_wire(i, tr)
                 for i, tr in enumerate(_opt(body, "turns", list, "result", []))]
        status = _req(body, "status", str, "result")
        if status not in ("succeeded", "failed", "cancelled"):
            raise WorkerProtocolError(
                f"result: status must be succeeded, failed or cancelled, got {status!r}")
        return Result(
            run_id=_req(body, "run_id", str, "result"),
            task_id=_req(body, "task_id", str, "result"),
            attempt=_req(body, "attempt", int, "result"),
            worker_id=_req(body, "worker_id", str, "result"),
            status=status,
            text=_opt(body, "text", str, "result", ""),
            outputs=_opt(body, "outputs", dict, "result", {}),
            error=_opt(body, "error", str, "result", None),
            turns=tuple(turns),
            stopped_at=_opt(body, "stopped_at", str, "result", None),
            cost_usd=float(_opt(body, "cost_usd", (int, float), "result", 0.0)),
            retryable=_opt(body, "retryable", bool, "result", True),
        )
    if t == "hello":
        _req(body, "worker_id", str, "hello")
        _req(body, "capacity", int, "hello")
        v = _req(body, "v", int, "hello")
        if v != PROTOCOL_VERSION:
            raise WorkerProtocolError(
                f"hello: worker speaks protocol v{v}, this orchestrator v{PROTOCOL_VERSION}: "
                "run the same Switchboard version on both")
        return body
    if t == "heartbeat":
        _req(body, "worker_id", str, "heartbeat")
        held = _req(body, "held", list, "heartbeat")
        for h in held:
            if not (isinstance(h, list) and len(h) == 2 and isinstance(h[0], str)
                    and isinstance(h[1], int)):
                raise WorkerProtocolError("heartbeat: 'held' must be a list of [task_id, attempt]")
        join = _opt(body, "join", dict, "heartbeat", None)
        if join is not None and (join.get("v") != PROTOCOL_VERSION
                                 or not isinstance(join.get("capacity"), int)):
            body = {**body, "join": None}  # another version: it cannot join by heartbeat
        return body
    if t in ("cancel",):
        _req(body, "task_id", str, t)
        _req(body, "attempt", int, t)
        return body
    if t == "who":  # a request: another orchestrator asks whose this endpoint is
        return body
    if t == "spawn":  # a request: a running task asks for a dynamic child under it
        _req(body, "run_id", str, t)
        _req(body, "parent", str, t)
        _req(body, "attempt", int, t)
        _req(body, "prompt", str, t)
        _opt(body, "agent", str, t, None)
        return body
    if t == "wait":  # a request: answered when every named child is terminal
        _req(body, "run_id", str, t)
        _req(body, "parent", str, t)
        children = _req(body, "children", list, t)
        if not all(isinstance(c, str) for c in children):
            raise WorkerProtocolError("wait: 'children' must be a list of task ids (strings)")
        return body
    if t == "topic":  # a publish on a topic, delivered to subscribed tasks
        _req(body, "topic", str, t)
        _req(body, "text", str, t)
        _opt(body, "from", str, t, None)
        return body
    if t in ("drain", "bye", "logs", "refused"):
        return body
    raise WorkerProtocolError(f"unknown message type {t!r}")


_TURN_FIELDS: dict[str, type | tuple[type, ...]] = {
    "turn": int, "input_tokens": int, "cached_tokens": int, "output_tokens": int,
    "bytes_sent": int, "bytes_received": int, "model_s": (int, float), "tools_s": (int, float),
    "tool_calls": (list, tuple), "resent_full_context": bool, "cost_usd": (int, float),
}


def _turn_from_wire(i: int, tr: Any) -> TurnRecord:
    where = f"result: turns[{i}]"
    if not isinstance(tr, dict):
        raise WorkerProtocolError(f"{where} must be a map")
    unknown = set(tr) - set(_TURN_FIELDS)
    if unknown:
        raise WorkerProtocolError(f"{where}: unknown fields {sorted(unknown)}")
    _req(tr, "turn", int, where)
    v = {k: _opt(tr, k, typ, where, None) for k, typ in _TURN_FIELDS.items()}
    calls = v["tool_calls"] or []
    if not all(isinstance(c, str) for c in calls):
        raise WorkerProtocolError(f"{where}: 'tool_calls' must be a list of strings")
    return TurnRecord(
        turn=v["turn"], input_tokens=v["input_tokens"] or 0,
        cached_tokens=v["cached_tokens"] or 0, output_tokens=v["output_tokens"] or 0,
        bytes_sent=v["bytes_sent"] or 0, bytes_received=v["bytes_received"] or 0,
        model_s=float(v["model_s"] or 0.0), tools_s=float(v["tools_s"] or 0.0),
        tool_calls=tuple(calls), resent_full_context=bool(v["resent_full_context"]),
        cost_usd=float(v["cost_usd"] or 0.0))
