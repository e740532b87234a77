"""Owns the agent loop: model turn -> tools (concurrently) -> results -> next turn, on one session.

The loop keeps no copy of the transcript: the model session holds the context and each turn
hands it only the new items (the user prompt first, then `function_call_output`s).
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
import structlog
import trio

from agents.protocol import AgentSpec, ModelRef, TurnRecord
from agents.tools import clip
from bus.logs import get_logger

log = get_logger("agents.loop")

# USD per million tokens (input, cached input, output). Unknown models cost 0 and say so in logs.
PRICES: dict[str, tuple[float, float, float]] = {
    "sim": (0.0, 0.0, 0.0),
    "gpt-5.3-codex": (1.25, 0.125, 10.0),
    "gpt-5.2": (1.25, 0.125, 10.0),
    "gpt-5-mini": (0.25, 0.025, 2.0),
    "gpt-4.1": (2.00, 0.50, 8.00),
    "gpt-4.1-mini": (0.40, 0.10, 1.60),
}


def turn_cost(model: ModelRef, rec: Any) -> float:
    """What the turn cost in USD at the model's list price; 0 on a sim model, whatever model
    name it was given (the sim answers to any), and for a model without a price. `rec`: a
    TurnRecord, or anything with its three token counts (a response's usage)."""
    p = None if model.sim else PRICES.get(model.model)
    if p is None:
        return 0.0
    uncached = max(rec.input_tokens - rec.cached_tokens, 0)
    return (uncached * p[0] + rec.cached_tokens * p[1] + rec.output_tokens * p[2]) / 1e6


@attrs.define
class LoopState:
    """Where the loop is; read after a cancel to record where it stopped."""

    turn: int = 0
    phase: str = "starting"  # starting | model | tools | max_turns | done
    running_tools: tuple[str, ...] = ()
    turns: list[TurnRecord] = attrs.field(factory=list)

    def where(self) -> str:
        if self.phase == "tools":
            return f"turn {self.turn}: running tools {', '.join(self.running_tools)}"
        if self.phase == "max_turns":
            return f"turn {self.turn}: max_turns reached, no final answer"
        return f"turn {self.turn}: {self.phase}"


@attrs.frozen(kw_only=True)
class AgentOutcome:
    status: str  # succeeded | failed
    text: str
    outputs: dict[str, Any]
    error: str | None
    turns: tuple[TurnRecord, ...]
    cost_usd: float


def _outcome(state: LoopState, status: str, *, text: str = "", error: str | None = None
             ) -> AgentOutcome:
    state.phase = "done" if status == "succeeded" else state.phase
    return AgentOutcome(status=status, text=text,
                        outputs=parse_outputs(text) if status == "succeeded" else {},
                        error=error, turns=tuple(state.turns),
                        cost_usd=sum(t.cost_usd for t in state.turns))


def _failure(error: Any) -> str:
    """The text of a failed response's `error` object (the model side's fault)."""
    if isinstance(error, dict):
        code, msg = error.get("code"), error.get("message")
        return f"{code}: {msg}" if code and msg else str(msg or code or error)
    return "no reason given"


def parse_outputs(text: str) -> dict[str, Any]:
    """The structured outputs of a final answer: the answer parsed as a JSON object, else {}.

    A fenced ```json block is accepted too, as real models often wrap JSON that way.
    """
    s = text.strip()
    if s.startswith("```"):
        s = s.strip("`")
        if s.startswith("json"):
            s = s[4:]
    if not s.lstrip().startswith("{"):  # not an object: no need to have json say so, slowly
        return {}
    try:
        v = json.loads(s)
    except ValueError:
        return {}
    return v if isinstance(v, dict) else {}


async def run_agent_loop(
    *,
    agent: AgentSpec,
    prompt: str,
    session: Any,  # modellink.client.ModelSession
    registry: Any,  # agents.tools.ToolRegistry
    state: LoopState,
    deadline: float | None = None,
) -> AgentOutcome:
    """Run turns until the model answers without a tool call, `agent.max_turns`, or `deadline`
    (trio time) — whichever comes first. A failed model response fails the outcome.

    Each turn is recorded in `state.turns` as soon as its response completes (tool time is
    added when the tools finish), so a cancelled attempt still reports what it spent.
    Raises trio.Cancelled when cancelled (`state.where()` says where); model link errors
    (ModelError) propagate; tool problems never raise (they become error results the model sees).
    """
    if deadline is None:  # the caller's scope bounds it (a worker's attempt): no scope here
        return await _turns(agent, prompt, session, registry, state)
    with trio.move_on_at(deadline) as scope:
        return await _turns(agent, prompt, session, registry, state)
    assert scope.cancelled_caught
    return _outcome(state, "failed",
                    error=f"deadline reached at {state.where()} (the task's timeout)")


async def _turns(agent: AgentSpec, prompt: str, session: Any, registry: Any,
                 state: LoopState) -> AgentOutcome:
    new_items: list[dict[str, Any]] = [{"type": "message", "role": "user", "content": prompt}]
    for turn in range(1, agent.max_turns + 1):
        state.turn, state.phase = turn, "model"
        structlog.contextvars.bind_contextvars(turn=turn)
        result = await session.turn(new_items)
        calls = list(result.function_calls)
        usage = result.usage
        rec = TurnRecord(
            turn=turn,
            input_tokens=usage.input_tokens,
            cached_tokens=usage.cached_tokens,
            output_tokens=usage.output_tokens,
            bytes_sent=result.bytes_sent,
            bytes_received=result.bytes_received,
            model_s=result.elapsed_s,
            tool_calls=tuple(c.name for c in calls),
            resent_full_context=result.resent_full_context,
            cost_usd=turn_cost(agent.model, usage),  # made once: attrs.evolve is slow
        )
        at = len(state.turns)  # answers to `ask`s may append their own records meanwhile
        state.turns.append(rec)  # now: a cancel during the tools keeps this turn's tokens
        if result.status == "failed":
            log.warning("turn.model_failed", error=result.error)
            return _outcome(state, "failed",
                            error=f"model response failed at turn {turn}: "
                                  f"{_failure(result.error)}")
        if calls:
            state.phase = "tools"
            state.running_tools = rec.tool_calls
            t0 = time.perf_counter()
            new_items = await _run_calls(calls, registry)
            rec = attrs.evolve(rec, tools_s=time.perf_counter() - t0)
            state.turns[at] = rec
            state.running_tools = ()
        log.debug("turn", tools=list(rec.tool_calls), input_tokens=rec.input_tokens,
                  cached_tokens=rec.cached_tokens, output_tokens=rec.output_tokens,
                  bytes_sent=rec.bytes_sent, model_ms=round(rec.model_s * 1000, 2),
                  tools_ms=round(rec.tools_s * 1000, 2))
        if not calls:
            if result.status != "completed":
                return _outcome(state, "failed", text=result.text,
                                error=f"model response ended {result.status} at turn {turn}")
            return _outcome(state, "succeeded", text=result.text)
    state.phase = "max_turns"
    return _outcome(state, "failed",
                    error=f"no final answer after max_turns={agent.max_turns} turns; "
                          "raise max_turns for this agent or tighten its instructions")


TOOL_LOG_ARGS = 300  # characters of a failed call's arguments in its tool.error line
TOOL_LOG_TAIL = 500  # characters of the end of its output


async def _run_calls(calls: list[Any], registry: Any) -> list[dict[str, Any]]:
    """Run one turn's function calls concurrently; results keep the calls' order."""
    results: list[dict[str, Any] | None] = [None] * len(calls)

    async def one(i: int, call: Any) -> None:
        res = await registry.call(call.name, call.arguments)
        if res.ok:
            out = res.output
        else:
            out = f"ERROR: {res.error}" + (f"\n{res.output}" if res.output else "")
            # what it was asked and the end of what it printed: what a user debugging the
            # run needs, without the whole output (the model saw it; the journal has tokens)
            log.warning("tool.error", tool=call.name, error=res.error,
                        arguments=clip(call.arguments, TOOL_LOG_ARGS),
                        **({"output_tail": res.output[-TOOL_LOG_TAIL:]} if res.output else {}))
        results[i] = {"type": "function_call_output", "call_id": call.call_id, "output": out}

    if len(calls) == 1:
        await one(0, calls[0])
    else:
        async with trio.open_nursery() as nursery:
            for i, call in enumerate(calls):
                nursery.start_soon(one, i, call)
    return [r for r in results if r is not None]
