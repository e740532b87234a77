"""Owns the mapping between Responses items and Chat Completions messages, with no I/O.

For endpoints that lack /responses (llama.cpp server, older OpenAI-compatible servers): the
session's context (Responses input items) becomes a `messages` list, Responses function tools
become Chat tools, and a chat completion becomes a Response object the session reads as usual.
"""

from __future__ import annotations

import json
from typing import Any

from modellink.turns import ModelConnectionError, item_text

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools ({"type": "function", "name", ...}) in the Chat shape."""
    if not tools:
        return None
    out = []
    for t in tools:
        if t.get("type") != "function":
            continue  # built-in tools (web search ...) have no Chat equivalent
        if "function" in t:
            out.append(t)
            continue
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if k in t}
        out.append({"type": "function", "function": fn})
    return out or None


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Chat `messages` for a context. Consecutive function calls (a parallel call, with any
    text before them) become one assistant message with `tool_calls`."""
    msgs: list[dict[str, Any]] = []
    if instructions:
        msgs.append({"role": "system", "content": instructions})
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = _ROLES.get(str(item.get("role")), "user")
            msgs.append({"role": role, "content": item_text(item)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = msgs[-1] if msgs else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            text = out if isinstance(out, str) else "".join(
                str(p.get("text", "")) for p in out or [] if isinstance(p, dict))
            msgs.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": text})
    return msgs


def chat_body(*, model: str, instructions: str | None, items: list[dict[str, Any]],
              tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": chat_messages(instructions, items),
                            "stream": False}
    ctools = chat_tools(tools)
    if ctools:
        body["tools"] = ctools
    return body


def response_from_chat(obj: Any) -> dict[str, Any]:
    """A Response object for a chat completion (first choice). Raises ModelConnectionError
    when it is not a chat completion."""
    try:
        choice = obj["choices"][0]
        msg = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise ModelConnectionError(f"the endpoint sent something that is not a chat completion: "
                                   f"{str(obj)[:200]!r}") from None
    rid = str(obj.get("id") or "chatcmpl")
    output: list[dict[str, Any]] = []
    content = msg.get("content")
    if content:
        output.append({"type": "message", "role": "assistant", "status": "completed",
                       "content": [{"type": "output_text", "text": str(content),
                                    "annotations": []}]})
    for i, call in enumerate(msg.get("tool_calls") or []):
        fn = call.get("function") or {}
        args = fn.get("arguments")
        output.append({"type": "function_call", "status": "completed",
                       "call_id": str(call.get("id") or f"{rid}_call_{i}"),
                       "name": str(fn.get("name", "")),
                       "arguments": args if isinstance(args, str) else json.dumps(args or {})})
    usage = obj.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return {
        "id": rid,
        "object": "response",
        "status": "incomplete" if choice.get("finish_reason") == "length" else "completed",
        "output": output,
        "usage": {"input_tokens": int(usage.get("prompt_tokens") or 0),
                  "input_tokens_details": {"cached_tokens": int(details.get("cached_tokens")
                                                                or 0)},
                  "output_tokens": int(usage.get("completion_tokens") or 0)},
    }
