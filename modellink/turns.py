"""Owns a model session's state with no I/O: the context it keeps, what the server holds, results.

The client's I/O shell (client.py) asks `ContextBook` what to send and tells it what came back;
`read_response` turns a Response object into a `TurnResult`. Nothing here imports trio.

Invariant of `ContextBook`: `items` is the session's whole context in order (each turn's new items,
then that response's output items), appended in place and never copied; the server's connection
cache holds exactly `items[:server_upto]` under `last_response_id` (when that is not None).
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

import attrs


class ModelError(Exception):
    """Root of the model link's errors."""


class ModelAuthError(ModelError):
    """The endpoint refused the credentials (HTTP 401/403): fix the API key or its variable."""


class ModelRequestError(ModelError):
    """The endpoint refused this request (an error event or 4xx with a code): the request's fault.

    `status`, `code`, `message`, `param` are the server's; `param` names the offending field.
    `request` is the HTTP request that failed ("POST http://host/v1/responses"), None for an
    error event on a WebSocket.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 param: str | None = None, request: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.request = request
        self.retry_after_s = retry_after_s  # the server's Retry-After, when it sent one

    def __str__(self) -> str:
        where = f" (param {self.param})" if self.param else ""
        said = f"{self.code or 'error'} [{self.status}]: {self.message}{where}"
        return f"{self.request}: {said}" if self.request else said


class ModelServerError(ModelRequestError):
    """The endpoint failed on its side (5xx or server_error): not the request's fault; retry later."""


class ModelConnectionError(ModelError):
    """The network or the peer broke the link (refused, reset, closed, garbled): not the request."""


@attrs.frozen(kw_only=True)
class Usage:
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


@attrs.frozen(kw_only=True)
class FunctionCall:
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it


@attrs.frozen(kw_only=True)
class TurnResult:
    """One model turn, as the caller sees it.

    `bytes_sent` / `bytes_received` count frame payloads (WebSocket) or whole HTTP messages,
    resends included. `resent_full_context` is True iff this turn had to send context the server
    had already been sent, because the server no longer held it (cache miss, reconnect, age limit).
    """

    response_id: str
    status: str  # "completed" | "incomplete" | "failed"
    text: str
    function_calls: list[FunctionCall]
    output_items: list[dict[str, Any]]
    usage: Usage
    bytes_sent: int
    bytes_received: int
    elapsed_s: float
    resent_full_context: bool
    error: dict[str, Any] | None = None  # the response's `error` object when status is "failed"


@attrs.define
class ContextBook:
    """The session's context and what the server has cached of it (see the module invariant)."""

    items: list[dict[str, Any]] = attrs.field(factory=list)
    server_upto: int = 0
    last_response_id: str | None = None
    # True iff items[:sent_upto] have been sent to some server at least once.
    sent_upto: int = 0

    def add_new(self, new_items: list[dict[str, Any]]) -> None:
        self.items.extend(new_items)

    def request(self, *, full: bool = False) -> tuple[list[dict[str, Any]], str | None]:
        """The input to send and the previous_response_id: the delta, or everything when
        `full` or when the server holds nothing. Only the delta is a new list."""
        if full or self.last_response_id is None:
            return self.items, None
        return self.items[self.server_upto:], self.last_response_id

    def would_resend(self, *, full: bool = False) -> bool:
        """True iff the request would carry items already sent to a server before."""
        return (full or self.last_response_id is None) and self.sent_upto > 0

    def mark_sent(self) -> None:
        self.sent_upto = len(self.items)

    def complete(self, response_id: str, output_items: list[dict[str, Any]]) -> None:
        """The server finished `response_id`; its cache now holds all items so far plus these."""
        self.items.extend(output_items)
        self.server_upto = self.sent_upto = len(self.items)
        self.last_response_id = response_id

    def forget_server(self) -> None:
        """The server no longer holds our context (new connection, miss, failed continuation)."""
        self.server_upto = 0
        self.last_response_id = None


def context_item(item: dict[str, Any]) -> dict[str, Any] | None:
    """The form of an output item the session keeps and sends back, or None to keep nothing.

    Item ids are dropped: with store=false a provider cannot resolve them and refuses the item.
    Reasoning items without encrypted content cannot be replayed without store, so they go.
    """
    if item.get("type") == "reasoning" and not item.get("encrypted_content"):
        return None
    if "id" in item:
        return {k: v for k, v in item.items() if k != "id"}
    return item


def read_usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage()
    details = usage.get("input_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return Usage(input_tokens=int(usage.get("input_tokens") or 0), cached_tokens=int(cached or 0),
                 output_tokens=int(usage.get("output_tokens") or 0))


def item_text(item: dict[str, Any]) -> str:
    """The text of a message item (its text parts joined)."""
    content = item.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(str(p.get("text", "")) for p in content
                   if isinstance(p, dict) and p.get("type") in ("output_text", "input_text", "text"))


@attrs.frozen(kw_only=True)
class ReadResponse:
    """What a Response object says, before the session files it."""

    response_id: str
    status: str
    text: str
    function_calls: list[FunctionCall]
    output_items: list[dict[str, Any]]
    usage: Usage
    error: dict[str, Any] | None


def read_response(response: Any, fallback_output: list[dict[str, Any]] | None = None
                  ) -> ReadResponse:
    """Read a Response object (the `response` of a terminal event, or an HTTP body).

    `fallback_output` (the items seen in `response.output_item.done` events) is used when the
    terminal event carries no output. Raises ModelConnectionError when it is not a Response.
    """
    if not isinstance(response, dict) or not isinstance(response.get("id"), str):
        raise ModelConnectionError(f"the endpoint sent something that is not a Response object: "
                                   f"{str(response)[:200]!r}")
    output = response.get("output")
    if not isinstance(output, list) or (not output and fallback_output):
        output = list(fallback_output or [])
    texts: list[str] = []
    calls: list[FunctionCall] = []
    for item in output:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            texts.append(item_text(item))
        elif kind == "function_call":
            calls.append(FunctionCall(call_id=str(item.get("call_id", "")),
                                      name=str(item.get("name", "")),
                                      arguments=str(item.get("arguments") or "{}")))
    error = response.get("error")
    return ReadResponse(response_id=response["id"], status=str(response.get("status") or ""),
                        text="".join(texts), function_calls=calls,
                        output_items=[i for i in output if isinstance(i, dict)],
                        usage=read_usage(response.get("usage")),
                        error=error if isinstance(error, dict) else None)


def error_from_event(event: dict[str, Any], *, http_status: int | None = None,
                     request: str | None = None) -> ModelError:
    """The error to raise for an `error` event or an HTTP error body, saying whose fault it is.

    Accepts our shape {"type": "error", "status", "error": {...}} and OpenAI's HTTP body
    {"error": {...}}. `request` names the HTTP request that failed ("POST <url>"), if any.
    """
    err = event.get("error")
    if not isinstance(err, dict):
        err = {"message": str(err or event.get("message") or event)[:500]}
    status = event.get("status") if isinstance(event.get("status"), int) else http_status
    code = err.get("code") if isinstance(err.get("code"), str) else None
    message = str(err.get("message") or "no message")
    param = err.get("param") if isinstance(err.get("param"), str) else None
    if status in (401, 403) or err.get("type") == "authentication_error":
        endpoint = f"the model endpoint ({request})" if request else "the model endpoint"
        return ModelAuthError(f"{endpoint} refused the credentials ({status}): {message}; "
                              "check the API key (ModelEndpoint.api_key or the agent's "
                              "api_key_env)")
    if (status is not None and status >= 500) or code == "server_error":
        return ModelServerError(message, status=status, code=code, param=param, request=request)
    return ModelRequestError(message, status=status, code=code, param=param, request=request)


EXCERPT_CHARS = 120
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def body_excerpt(body: bytes, limit: int = EXCERPT_CHARS) -> str:
    """A short, one-line view of a body that is not a JSON error object: an HTML page's <title>
    (else its text without tags), or the text, whitespace collapsed, at most `limit` chars."""
    title = _TITLE.search(body[:64 * 1024])
    text = (title.group(1) if title else body[:16 * 1024]).decode("utf-8", "replace")
    if title is None and text.lstrip()[:1] == "<":
        text = _TAG.sub(" ", text)
    text = " ".join(html.unescape(text).split())
    if not text:
        return "(empty body)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_from_http(request: str, status: int, body: bytes, *,
                    chat_url: str | None = None) -> ModelError:
    """The error for an HTTP response with a status other than 200, naming `request`
    ("POST <url>") and the status.

    A JSON error object (OpenAI's {"error": {"message", "code", ...}}, or our error event) is
    read as `error_from_event` reads it; any other body (an HTML error page, plain text, a
    framework's {"detail": ...}) is shown as a short excerpt. `chat_url` is given for a request
    to the Responses API: a 404 or 405 without an error object then says the server may not
    implement it and where the Chat Completions transport would go instead.
    """
    try:
        obj = json.loads(body) if body else None
    except ValueError:
        obj = None
    hint = chat_url is not None and status in (404, 405)
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        err = obj["error"]
        # llama.cpp: {"error": {"code": 404, "message": "File Not Found", ...}} for a path it
        # does not serve; a Responses server's own "model not found" needs no hint
        if hint and isinstance(err.get("message"), str) \
                and "model" not in err["message"].lower():
            obj = {**obj, "error": {**err, "message": err["message"] + _not_found_hint(
                request, err["message"], chat_url or "")}}
        return error_from_event(obj, http_status=status, request=request)
    said = next((obj[k] for k in ("detail", "message", "error") if isinstance(obj, dict)
                 and isinstance(obj.get(k), str) and obj[k].strip()), None)
    message = body_excerpt(said.encode() if said is not None else body)
    if hint:
        message += _not_found_hint(request, message, chat_url or "")
    return error_from_event({"error": {"message": message}}, http_status=status,
                            request=request)


# Statuses and codes that say "this request, later": the model link tries the turn again
# (ModelEndpoint.retries) before the error reaches the agent. 501 and the other 4xx would
# fail the same way again; so would an exhausted quota, though OpenAI sends it as a 429.
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset({"rate_limit_exceeded", "server_error", "server_overloaded"})
PERMANENT_CODES = frozenset({"insufficient_quota"})


def transient(exc: BaseException) -> bool:
    """True iff `exc` is a model error the same request may pass later (rate limit, overload,
    a gateway error): what the model link retries within the turn."""
    if not isinstance(exc, ModelRequestError) or exc.code in PERMANENT_CODES:
        return False
    if exc.status is not None:
        return exc.status in TRANSIENT_STATUSES
    return exc.code in TRANSIENT_CODES


def parse_retry_after(ms: bytes | None, seconds: bytes | None, *, now: float) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI's) or `retry-after` (seconds, or an HTTP
    date; `now` is the wall clock to count from). None when absent or unreadable."""
    try:
        if ms is not None:
            v = float(ms) / 1000
            return v if 0 <= v < float("inf") else None
    except ValueError:
        pass
    if seconds is None:
        return None
    text = seconds.decode("latin-1").strip()
    try:
        v = float(text)
        return v if 0 <= v < float("inf") else None
    except ValueError:
        pass
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - now, 0.0)


def _not_found_hint(request: str, message: str, chat_url: str) -> str:
    """What to change when POST .../responses answers 404/405. A message about the model means
    the server has the route but not that model; a URL without /v1 is the usual slip; else the
    server may have no Responses API at all (Ollama, llama.cpp: Chat Completions only)."""
    if "model" in message.lower():
        return ("; check the graph's model = \"...\" against the names this server serves "
                "(GET /v1/models lists them)")
    chat = (f"transport = \"chat\" (in the graph's [model] table) uses {chat_url}")
    if "/v1/" not in request:
        return ("; OpenAI-compatible servers serve under /v1, so the graph's url is usually "
                f"\"http://HOST:PORT/v1\"; if the server has no Responses API, {chat}")
    return f"; the server may not implement the Responses API: {chat}"
