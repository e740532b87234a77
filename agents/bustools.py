"""Owns the tools that reach other agents and the orchestrator over the bus.

send_message / ask / publish / read_messages talk to other running tasks (endpoint
`task.<task_id>`) and topics; spawn / wait ask the orchestrator for dynamic child tasks.
Every failure (no such agent, nobody answers in time) is raised as ToolFailure, which the
registry turns into an error result the model sees; trio.Cancelled always propagates.
"""

from __future__ import annotations

import collections
import time
from typing import Any

import attrs

from agents.protocol import ORCHESTRATOR_ID, task_endpoint
from agents.tools import ToolError, clip
from bus.errors import BusError, BusNoRouteError, BusTimeoutError
from bus.logs import get_logger

log = get_logger("agents.bus")

INBOX_SIZE = 256  # per task; older messages are dropped (and counted) beyond it
TEXT_LOG = 200  # characters of a message, question or answer in its log line


class ToolFailure(ToolError):
    """A bus tool could not do what the model asked; the message (shown to the model as is)
    says why and what to do instead."""


@attrs.define
class Inbox:
    """Messages and topic publishes delivered to one running task. Bounded: drops oldest."""

    items: collections.deque[dict[str, Any]] = attrs.field(
        factory=lambda: collections.deque(maxlen=INBOX_SIZE))
    dropped: int = 0

    def put(self, item: dict[str, Any]) -> None:
        if len(self.items) == self.items.maxlen:
            self.dropped += 1
        self.items.append(item)

    def take_all(self) -> tuple[list[dict[str, Any]], int]:
        out, dropped = list(self.items), self.dropped
        self.items.clear()
        self.dropped = 0
        return out, dropped


@attrs.define
class BusTools:
    """The bus-backed tools of one running task."""

    bus: Any  # bus.client.BusClient
    run_id: str
    task_id: str
    attempt: int
    inbox: Inbox
    deadline: float | None  # trio time by which the task must end, for request timeouts
    ask_timeout_s: float = 30.0

    def _timeout(self, wanted: float) -> float:
        import trio

        if self.deadline is None:
            return wanted
        return max(0.01, min(wanted, self.deadline - trio.current_time()))

    async def send_message(self, to: str, text: str) -> str:
        try:
            await self.bus.request(task_endpoint(to), {"t": "message", "from": self.task_id,
                                                       "text": text}, timeout=self._timeout(10.0))
        except BusNoRouteError:
            raise ToolFailure(f"no running task named {to!r}: check the task id "
                              "(messages go to tasks that are running now)") from None
        except BusTimeoutError:
            raise ToolFailure(f"task {to!r} did not acknowledge the message in time") from None
        except BusError as exc:
            raise ToolFailure(f"sending to {to!r} failed: {exc}") from None
        log.info("message.sent", to=to, text=clip(text, TEXT_LOG))
        return f"delivered to {to}"

    async def ask(self, task: str, question: str, timeout_s: float | None = None) -> str:
        wait = self._timeout(_seconds(timeout_s, self.ask_timeout_s))
        t0 = time.monotonic()
        try:
            reply = await self.bus.request(
                task_endpoint(task), {"t": "ask", "from": self.task_id, "question": question,
                                      "timeout_s": wait},
                timeout=wait)
        except BusNoRouteError:
            raise ToolFailure(f"no running task named {task!r} to ask: check the task id") from None
        except BusTimeoutError:
            raise ToolFailure(f"task {task!r} did not answer within {wait:.1f}s") from None
        except BusError as exc:
            raise ToolFailure(f"asking {task!r} failed: {exc}") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("answer"), str):
            raise ToolFailure(f"task {task!r} sent a malformed answer")
        answer = str(reply["answer"])
        log.info("ask", task=task, question=clip(question, TEXT_LOG),
                 answer=clip(answer, TEXT_LOG), seconds=round(time.monotonic() - t0, 3))
        return answer

    async def publish(self, topic: str, text: str) -> str:
        try:
            await self.bus.publish(topic, {"t": "topic", "from": self.task_id, "topic": topic,
                                           "text": text})
        except BusError as exc:
            raise ToolFailure(f"publishing to {topic!r} failed: {exc}") from None
        log.info("topic.published", topic=topic, text=clip(text, TEXT_LOG))
        return f"published to {topic}"

    async def read_messages(self) -> str:
        items, dropped = self.inbox.take_all()
        if not items:
            return "no new messages"
        lines = [f"[{i.get('topic') or 'direct'}] from {i.get('from')}: {i.get('text')}"
                 for i in items]
        if dropped:
            lines.insert(0, f"({dropped} older messages were dropped: inbox holds {INBOX_SIZE})")
        return "\n".join(lines)

    async def spawn(self, prompt: str, agent: str | None = None) -> str:
        try:
            reply = await self.bus.request(
                ORCHESTRATOR_ID,
                {"t": "spawn", "run_id": self.run_id, "parent": self.task_id,
                 "attempt": self.attempt, "prompt": prompt, "agent": agent},
                timeout=self._timeout(10.0))
        except BusError as exc:
            raise ToolFailure(f"spawn failed: {exc}") from None
        if not isinstance(reply, dict) or "child" not in reply:
            raise ToolFailure(f"spawn refused: {reply.get('error') if isinstance(reply, dict) else reply}")
        log.info("spawn", child=str(reply["child"]), agent=agent, prompt=clip(prompt, TEXT_LOG))
        return str(reply["child"])

    async def wait(self, children: list[str], timeout_s: float | None = None) -> str:
        import json

        wait = self._timeout(_seconds(timeout_s, 3600.0))
        t0 = time.monotonic()
        try:
            reply = await self.bus.request(
                ORCHESTRATOR_ID,
                {"t": "wait", "run_id": self.run_id, "parent": self.task_id,
                 "attempt": self.attempt, "children": list(children)},
                timeout=wait)
        except BusTimeoutError:
            raise ToolFailure(f"children {children} not finished after "
                              f"{time.monotonic() - t0:.1f}s") from None
        except BusError as exc:
            raise ToolFailure(f"wait failed: {exc}") from None
        if not isinstance(reply, dict) or "results" not in reply:
            raise ToolFailure(str(reply.get("error") if isinstance(reply, dict) else reply))
        log.info("wait", children=list(children), seconds=round(time.monotonic() - t0, 3),
                 **_states(reply["results"]))
        return json.dumps(reply)


def _states(results: Any) -> dict[str, Any]:
    """How the waited-for children ended, for the wait's log line: {"states": {id: state}}."""
    if isinstance(results, dict):
        return {"states": {str(k): v.get("state") if isinstance(v, dict) else None
                           for k, v in results.items()}}
    return {}


def _seconds(timeout_s: float | None, default: float) -> float:
    """A tool's timeout_s argument (None: `default`). Raises ToolFailure unless positive."""
    if timeout_s is None:
        return default
    if not float(timeout_s) > 0:  # NaN included
        raise ToolFailure(f"timeout_s must be a positive number of seconds, got {timeout_s}")
    return float(timeout_s)


SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "send_message": ("Send a text message to another running task (by task id).", {
        "type": "object", "properties": {"to": {"type": "string"}, "text": {"type": "string"}},
        "required": ["to", "text"], "additionalProperties": False}),
    "ask": ("Ask another running task a question and wait for its answer.", {
        "type": "object", "properties": {"task": {"type": "string"},
                                         "question": {"type": "string"},
                                         "timeout_s": {"type": "number"}},
        "required": ["task", "question"], "additionalProperties": False}),
    "publish": ("Publish a text to a topic; tasks subscribed to it can read it.", {
        "type": "object", "properties": {"topic": {"type": "string"}, "text": {"type": "string"}},
        "required": ["topic", "text"], "additionalProperties": False}),
    "read_messages": ("Read (and clear) messages sent to this task and its subscribed topics.", {
        "type": "object", "properties": {}, "additionalProperties": False}),
    "spawn": ("Start a child task under this one; returns its task id.", {
        "type": "object", "properties": {"prompt": {"type": "string"},
                                         "agent": {"type": "string"}},
        "required": ["prompt"], "additionalProperties": False}),
    "wait": ("Wait until the given child tasks finish; returns their results.", {
        "type": "object", "properties": {"children": {"type": "array",
                                                      "items": {"type": "string"}},
                                         "timeout_s": {"type": "number"}},
        "required": ["children"], "additionalProperties": False}),
}
ALIASES = {"read_topic": "read_messages"}
BUS_TOOL_NAMES = frozenset(SCHEMAS) | frozenset(ALIASES)


def register_bus_tools(registry: Any, tools: BusTools, wanted: list[str]) -> None:
    """Register the bus tools named in `wanted` (others are left to the local registry)."""
    for name in wanted:
        real = ALIASES.get(name, name)
        if real not in SCHEMAS:
            continue
        desc, schema = SCHEMAS[real]
        registry.register(name, desc, schema, getattr(tools, real))
