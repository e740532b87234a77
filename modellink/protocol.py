"""Owns the Responses protocol with no I/O: event shapes, validation, JSON/msgpack/SSE codecs, errors.

Both sides of the model link (server.py, client.py) build and read events only through this
module. It never imports trio; every function takes and returns plain values.

Public API (stable; the client is written against it)
-----------------------------------------------------
Encodings and frames
    JSON, MSGPACK                            the two encodings (str constants "json", "msgpack")
    Encoding                                 Literal["json", "msgpack"]
    encoding_of_frame(frame) -> Encoding     str (text frame) -> JSON, bytes (binary) -> msgpack
    encode_event(event, encoding) -> str | bytes
                                             JSON -> str (send as a text frame);
                                             msgpack -> bytes (send as a binary frame)
    decode_event(frame, *, max_bytes=MAX_MESSAGE_BYTES) -> dict
                                             decodes by frame kind; raises ProtocolError
                                             (invalid_json / invalid_msgpack / message_too_large /
                                             invalid_type for a non-object or a missing "type")
    dumps_json(obj) -> bytes, loads_json(data) -> Any
                                             the HTTP body codec (compact UTF-8 JSON)
    encode_sse(event) -> bytes               b"event: <type>\\ndata: <json>\\n\\n"
    SseDecoder().feed(data: bytes) -> list[dict]
                                             incremental SSE parser for the HTTP streaming client

Client events (client -> server)
    response_create_event(*, model, input, previous_response_id=None, instructions=None,
                          tools=None, store=None, metadata=None, stream_id=None,
                          generate=None, **extra) -> dict
    response_cancel_event(response_id=None, *, stream_id=None) -> dict
    parse_client_event(obj) -> ResponseCreate | ResponseCancel       raises ProtocolError
    parse_create_body(obj, *, http=False) -> ResponseCreate           (HTTP POST body)
    ResponseCreate, ResponseCancel           frozen attrs values (see the classes)

Server events (server -> client), all carry "sequence_number"
    EventSequence                            numbers the events of one response from 0
    response_object(...) -> dict             the Response object (id, status, output, usage ...)
    make_usage(...) -> dict                  OpenAI usage plus usage["x_switchboard"]
    message_item(...), function_call_item(...), output_text_part(text)
    ev_created / ev_in_progress / ev_output_item_added / ev_content_part_added /
    ev_output_text_delta / ev_output_text_done / ev_content_part_done /
    ev_function_call_arguments_delta / ev_function_call_arguments_done /
    ev_output_item_done / ev_completed / ev_failed / ev_incomplete   -> dict
    error_event(code, message, *, param=None, status=400, stream_id=None) -> dict
    TERMINAL_TYPES                           {"response.completed", "response.failed",
                                              "response.incomplete"}
    is_terminal(event) -> bool               terminal response event or an "error" event

Errors
    ProtocolError(code, message, *, param=None, status=400)  .to_event(stream_id=None) -> dict
    ErrorCode                                the error code strings (class of constants)
    CLOSE_* constants                        WebSocket close codes the server uses

Ids
    new_response_id() "resp_…", new_message_id() "msg_…", new_function_call_id() "fc_…",
    new_call_id() "call_…"

Decisions (see docs/model-protocol.md)
    * `response.cancel` {"response_id"?: str, "stream_id"?: str} stops the in-flight response at
      once; it ends with `response.incomplete` whose response has status "incomplete" and
      incomplete_details {"reason": "cancelled"}. A cancel with nothing in flight, or naming a
      response that is no longer in flight, is a no-op (it raced the end of the response).
      After a cancel the connection cache holds the response the cancelled one continued, so
      the client continues from its last completed response sending only unanswered items.
    * usage["x_switchboard"] = {"context_source": "connection_cache" | "store" | "request",
      "tokens_rendered": N} says where the context came from and how many tokens were rendered
      (tokenized) for this request.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Final, Literal

import attrs
import msgpack

JSON: Final = "json"
MSGPACK: Final = "msgpack"
Encoding = Literal["json", "msgpack"]

# A received message larger than this gets a message_too_large error event.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024

# WebSocket close codes the server uses.
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001  # max connection age reached, or server shutting down
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_MESSAGE_TOO_BIG: Final = 1009  # frame over the transport limit (the library closes)
CLOSE_INTERNAL_ERROR: Final = 1011

TERMINAL_TYPES: Final = frozenset({"response.completed", "response.failed", "response.incomplete"})

# Client event types.
RESPONSE_CREATE: Final = "response.create"
RESPONSE_CANCEL: Final = "response.cancel"


class ErrorCode:
    """Error codes in `error.code`; OpenAI's where one exists, ours otherwise."""

    INVALID_JSON = "invalid_json"
    INVALID_MSGPACK = "invalid_msgpack"
    MESSAGE_TOO_LARGE = "message_too_large"
    WRONG_ENCODING = "wrong_frame_encoding"  # a binary frame on a JSON connection, or vice versa
    UNKNOWN_EVENT_TYPE = "unknown_event_type"
    MISSING_PARAMETER = "missing_required_parameter"
    INVALID_TYPE = "invalid_type"
    INVALID_VALUE = "invalid_value"
    MODEL_NOT_FOUND = "model_not_found"
    PREVIOUS_RESPONSE_NOT_FOUND = "previous_response_not_found"
    RESPONSE_IN_PROGRESS = "response_in_progress"
    INVALID_STREAM_ID = "invalid_stream_id"
    STREAM_LIMIT = "websocket_stream_limit_reached"
    CONNECTION_LIMIT = "websocket_connection_limit_reached"
    UNAUTHORIZED = "invalid_api_key"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    SERVER_ERROR = "server_error"


class ProtocolError(Exception):
    """The peer sent something the protocol does not allow (the peer's fault).

    `code`, `message` and `param` go into the error event; `status` is the HTTP status to use.
    """

    def __init__(
        self, code: str, message: str, *, param: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.status = status

    def to_event(self, *, stream_id: str | None = None) -> dict[str, Any]:
        return error_event(
            self.code, self.message, param=self.param, status=self.status, stream_id=stream_id
        )

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r}, param={self.param!r})"


# --------------------------------------------------------------------------- ids


# Ids are 12 random bytes in hex. os.urandom is a syscall, so it is read 64 ids at a time; the
# pool is emptied in a forked child, which must never hand out its parent's next ids.
_ID_BYTES: Final = 12
_ID_BATCH: Final = 64
_id_pool: list[str] = []


def _forget_ids() -> None:
    _id_pool.clear()


os.register_at_fork(after_in_child=_forget_ids)


def _rand_id(prefix: str) -> str:
    if not _id_pool:
        raw = os.urandom(_ID_BYTES * _ID_BATCH).hex()
        step = 2 * _ID_BYTES
        _id_pool.extend(raw[i : i + step] for i in range(0, len(raw), step))
    return prefix + _id_pool.pop()


def new_response_id() -> str:
    return _rand_id("resp_")


def new_message_id() -> str:
    return _rand_id("msg_")


def new_function_call_id() -> str:
    return _rand_id("fc_")


def new_call_id() -> str:
    return _rand_id("call_")


# --------------------------------------------------------------------------- codecs

_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# One Packer for every event: msgpack.packb builds a new one per call. Safe to share: pack()
# runs in C without releasing the GIL (no `default` hook), and resets itself even on error.
_packer = msgpack.Packer(use_bin_type=True)


def dumps_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON bytes (HTTP bodies, SSE data)."""
    return _json_encoder.encode(obj).encode("utf-8")


def loads_json(data: bytes | str) -> Any:
    """Parse JSON; raises ProtocolError(invalid_json) on anything that is not JSON."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(
            ErrorCode.INVALID_JSON,
            f"the message is not valid JSON ({exc}); send one JSON object per text frame",
        ) from None


def encoding_of_frame(frame: str | bytes | bytearray | memoryview) -> Encoding:
    """A text frame (str) means JSON, a binary frame (bytes) means msgpack."""
    return JSON if isinstance(frame, str) else MSGPACK


def encode_event(event: dict[str, Any], encoding: Encoding) -> str | bytes:
    """Encode one event: JSON -> str for a text frame, msgpack -> bytes for a binary frame."""
    if encoding == JSON:
        return _json_encoder.encode(event)
    return _packer.pack(event)


# Our extension, asked for by the client in its upgrade request: on a msgpack connection the
# server may then write the events of one pause as ONE binary frame holding a msgpack array of
# event maps, in order (a turn's 7-9 events cost one WebSocket message instead of one each).
# Without the header, and always on JSON connections, every event is its own frame.
EVENT_BATCH_HEADER: Final = (b"X-Switchboard-Event-Batch", b"1")


def encode_event_batch(events: list[dict[str, Any]]) -> bytes:
    """Several events as one binary frame (only for a client that sent EVENT_BATCH_HEADER)."""
    return _packer.pack(events)


def decode_events(
    frame: str | bytes | bytearray | memoryview, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> list[dict[str, Any]]:
    """Decode one frame into its events: one, or a batch (a msgpack array of event maps).

    Raises ProtocolError as decode_event does; an empty batch is invalid_type.
    """
    obj = _decode_frame(frame, max_bytes)
    if isinstance(obj, list) and not isinstance(frame, str):  # batches are msgpack only
        if not obj:
            raise ProtocolError(ErrorCode.INVALID_TYPE, "an event batch must not be empty")
        return [_check_event_object(ev) for ev in obj]
    return [_check_event_object(obj)]


def decode_event(
    frame: str | bytes | bytearray | memoryview, *, max_bytes: int = MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """Decode one frame into an event dict with a string "type".

    Raises ProtocolError: message_too_large, invalid_json, invalid_msgpack, or invalid_type /
    missing_required_parameter when the message is not an object with a string "type".
    """
    return _check_event_object(_decode_frame(frame, max_bytes))


def _decode_frame(frame: str | bytes | bytearray | memoryview, max_bytes: int) -> Any:
    """The frame's JSON (text) or msgpack (binary) value, within `max_bytes`."""
    size = len(frame.encode("utf-8")) if isinstance(frame, str) and len(frame) * 4 > max_bytes \
        else len(frame)
    if size > max_bytes:
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"the message is {size} bytes, over the {max_bytes}-byte limit; "
            "send fewer or smaller input items per event",
        )
    if isinstance(frame, str):
        obj = loads_json(frame)
    else:
        try:
            obj = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises many types for hostile input
            raise ProtocolError(
                ErrorCode.INVALID_MSGPACK,
                f"the message is not valid msgpack ({type(exc).__name__}: {exc}); "
                "send one msgpack map per binary frame",
            ) from None
    return obj


def _check_event_object(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ProtocolError(
            ErrorCode.INVALID_TYPE,
            f"an event must be an object with a 'type' field, got {_typename(obj)}",
        )
    if "type" not in obj:
        raise ProtocolError(
            ErrorCode.MISSING_PARAMETER, "the event has no 'type' field", param="type"
        )
    if not isinstance(obj["type"], str):
        raise ProtocolError(
            ErrorCode.INVALID_TYPE,
            f"'type' must be a string, got {_typename(obj['type'])}",
            param="type",
        )
    for key in obj:
        if not isinstance(key, str):
            raise ProtocolError(ErrorCode.INVALID_TYPE, "event field names must be strings")
    return obj


def encode_sse(event: dict[str, Any]) -> bytes:
    """One server-sent event: `event: <type>` and `data: <json>` lines, then a blank line."""
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + dumps_json(event) + b"\n\n"


class SseDecoder:
    """Incremental server-sent-events parser: feed bytes, get the JSON `data` of each event.

    A `data: [DONE]` sentinel (sent by some OpenAI-compatible servers) is skipped.
    Raises ProtocolError(invalid_json) for a data payload that is not JSON.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._data: list[bytes] = []

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return out
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[: nl + 1]
            if not line:
                if self._data:
                    payload = b"\n".join(self._data)
                    self._data = []
                    if payload.strip() != b"[DONE]":
                        out.append(_check_event_object(loads_json(payload)))
                continue
            if line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                self._data.append(value)


# --------------------------------------------------------------------------- client events


@attrs.frozen(kw_only=True)
class ResponseCreate:
    """A validated `response.create` (or HTTP POST /v1/responses body).

    `input` is always a list of normalized items (a string input becomes one user message).
    `raw` is the event as received, for echoing fields (tools, tool_choice ...) into the
    response object.
    """

    model: str
    input: list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] = attrs.field(factory=list)
    previous_response_id: str | None = None
    store: bool = True
    metadata: dict[str, str] = attrs.field(factory=dict)
    stream_id: str | None = None
    generate: bool = True
    stream: bool = False  # HTTP only; ignored over WebSocket
    raw: dict[str, Any] = attrs.field(factory=dict, repr=False)


@attrs.frozen(kw_only=True)
class ResponseCancel:
    """Our extension: stop the in-flight response (of `stream_id`'s lane) at once."""

    response_id: str | None = None
    stream_id: str | None = None


def response_create_event(
    *,
    model: str,
    input: str | list[dict[str, Any]],
    previous_response_id: str | None = None,
    instructions: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    store: bool | None = None,
    metadata: dict[str, str] | None = None,
    stream_id: str | None = None,
    generate: bool | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build a `response.create` event; None-valued fields are left out."""
    ev: dict[str, Any] = {"type": RESPONSE_CREATE, "model": model, "input": input}
    for key, value in (
        ("previous_response_id", previous_response_id),
        ("instructions", instructions),
        ("tools", tools),
        ("store", store),
        ("metadata", metadata),
        ("stream_id", stream_id),
        ("generate", generate),
    ):
        if value is not None:
            ev[key] = value
    ev.update(extra)
    return ev


def response_cancel_event(
    response_id: str | None = None, *, stream_id: str | None = None
) -> dict[str, Any]:
    """Build a `response.cancel` event (our extension)."""
    ev: dict[str, Any] = {"type": RESPONSE_CANCEL}
    if response_id is not None:
        ev["response_id"] = response_id
    if stream_id is not None:
        ev["stream_id"] = stream_id
    return ev


def parse_client_event(obj: Any) -> ResponseCreate | ResponseCancel:
    """Validate a decoded client event. Raises ProtocolError naming the offending field."""
    obj = _check_event_object(obj)
    kind = obj["type"]
    if kind == RESPONSE_CREATE:
        return parse_create_body(obj, http=False)
    if kind == RESPONSE_CANCEL:
        rid = _opt_str(obj, "response_id")
        return ResponseCancel(response_id=rid, stream_id=_stream_id(obj))
    raise ProtocolError(
        ErrorCode.UNKNOWN_EVENT_TYPE,
        f"unknown client event type {kind!r}: send 'response.create' or 'response.cancel'",
        param="type",
    )


_STREAM_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _stream_id(obj: dict[str, Any]) -> str | None:
    sid = _opt_str(obj, "stream_id")
    if sid is not None and not (1 <= len(sid) <= 256 and set(sid) <= _STREAM_ID_CHARS):
        raise ProtocolError(
            ErrorCode.INVALID_STREAM_ID,
            "stream_id must be 1-256 characters of A-Z a-z 0-9 _ . -",
            param="stream_id",
        )
    return sid


def parse_create_body(obj: Any, *, http: bool = False) -> ResponseCreate:
    """Validate a `response.create` event or an HTTP create body.

    Unknown fields are accepted and ignored (reasoning, include, text, tool_choice ...);
    `stream` and `background` are accepted and ignored over WebSocket.
    Raises ProtocolError naming the field.
    """
    if not isinstance(obj, dict):
        raise ProtocolError(
            ErrorCode.INVALID_TYPE, f"the request body must be a JSON object, got {_typename(obj)}"
        )
    if "model" not in obj or obj["model"] is None:
        raise ProtocolError(
            ErrorCode.MISSING_PARAMETER,
            "missing required parameter 'model': name the model (e.g. \"sim\")",
            param="model",
        )
    model = _req_str(obj, "model")
    raw_input = obj.get("input")
    items: list[dict[str, Any]]
    if raw_input is None:
        items = []
    elif isinstance(raw_input, str):
        items = [{"type": "message", "role": "user", "content": raw_input}]
    elif isinstance(raw_input, list):
        items = [normalize_input_item(item, f"input[{i}]") for i, item in enumerate(raw_input)]
    else:
        raise ProtocolError(
            ErrorCode.INVALID_TYPE,
            f"'input' must be a string or a list of items, got {_typename(raw_input)}",
            param="input",
        )
    instructions = _opt_str(obj, "instructions")
    tools = obj.get("tools")
    if tools is None:
        tools = []
    elif not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ProtocolError(
            ErrorCode.INVALID_TYPE, "'tools' must be a list of tool objects", param="tools"
        )
    for i, tool in enumerate(tools):
        if not isinstance(tool.get("type"), str):
            raise ProtocolError(
                ErrorCode.MISSING_PARAMETER,
                f"tools[{i}] has no string 'type' (e.g. \"function\")",
                param=f"tools[{i}].type",
            )
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ProtocolError(
            ErrorCode.INVALID_TYPE,
            "'metadata' must be an object of string keys to string values",
            param="metadata",
        )
    return ResponseCreate(
        model=model,
        input=items,
        instructions=instructions,
        tools=tools,
        previous_response_id=_opt_str(obj, "previous_response_id"),
        store=_opt_bool(obj, "store", True),
        metadata=metadata,
        stream_id=None if http else _stream_id(obj),
        generate=_opt_bool(obj, "generate", True),
        stream=_opt_bool(obj, "stream", False) if http else False,
        raw=obj,
    )


_MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
_TEXT_PART_TYPES = frozenset({"input_text", "output_text", "text", "refusal"})


def normalize_input_item(item: Any, where: str) -> dict[str, Any]:
    """Validate one input item; return it (a message without "type" gets type "message").

    Supported: message (string content or a list of text parts), function_call,
    function_call_output. Raises ProtocolError with param = the item's path (e.g. input[2].type).
    """
    if not isinstance(item, dict):
        raise ProtocolError(
            ErrorCode.INVALID_TYPE, f"{where} must be an object, got {_typename(item)}", param=where
        )
    kind = item.get("type")
    if kind is None and "role" in item:
        item = {**item, "type": "message"}
        kind = "message"
    if kind == "message":
        role = item.get("role")
        if role not in _MESSAGE_ROLES:
            raise ProtocolError(
                ErrorCode.INVALID_VALUE,
                f"{where}.role must be one of {sorted(_MESSAGE_ROLES)}, got {role!r}",
                param=f"{where}.role",
            )
        content = item.get("content")
        if isinstance(content, str):
            return item
        if not isinstance(content, list):
            raise ProtocolError(
                ErrorCode.INVALID_TYPE,
                f"{where}.content must be a string or a list of content parts, "
                f"got {_typename(content)}",
                param=f"{where}.content",
            )
        for j, part in enumerate(content):
            p = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise ProtocolError(
                    ErrorCode.INVALID_TYPE, f"{p} must be an object", param=p
                )
            ptype = part.get("type")
            if ptype not in _TEXT_PART_TYPES:
                raise ProtocolError(
                    ErrorCode.INVALID_VALUE,
                    f"{p}.type {ptype!r} is not supported: use 'input_text' or 'output_text'",
                    param=f"{p}.type",
                )
            key = "refusal" if ptype == "refusal" else "text"
            if not isinstance(part.get(key), str):
                raise ProtocolError(
                    ErrorCode.INVALID_TYPE, f"{p}.{key} must be a string", param=f"{p}.{key}"
                )
        return item
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            _req_str(item, key, where=where)
        return item
    if kind == "function_call_output":
        _req_str(item, "call_id", where=where)
        out = item.get("output")
        if isinstance(out, str):
            return item
        if isinstance(out, list) and all(
            isinstance(p, dict) and isinstance(p.get("text"), str) for p in out
        ):
            return item
        raise ProtocolError(
            ErrorCode.INVALID_TYPE,
            f"{where}.output must be a string (or a list of text parts)",
            param=f"{where}.output",
        )
    if kind is None:
        raise ProtocolError(
            ErrorCode.MISSING_PARAMETER,
            f"{where} has no 'type': use 'message', 'function_call' or 'function_call_output'",
            param=f"{where}.type",
        )
    raise ProtocolError(
        ErrorCode.INVALID_VALUE,
        f"{where}.type {kind!r} is not a supported input item type: "
        "use 'message', 'function_call' or 'function_call_output'",
        param=f"{where}.type",
    )


def _typename(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int | float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list | tuple):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _req_str(obj: dict[str, Any], key: str, *, where: str | None = None) -> str:
    param = f"{where}.{key}" if where else key
    if key not in obj:
        raise ProtocolError(
            ErrorCode.MISSING_PARAMETER, f"missing required parameter '{param}'", param=param
        )
    v = obj[key]
    if not isinstance(v, str):
        raise ProtocolError(
            ErrorCode.INVALID_TYPE, f"'{param}' must be a string, got {_typename(v)}", param=param
        )
    return v


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    v = obj.get(key)
    if v is None or isinstance(v, str):
        return v
    raise ProtocolError(
        ErrorCode.INVALID_TYPE, f"'{key}' must be a string or null, got {_typename(v)}", param=key
    )


def _opt_bool(obj: dict[str, Any], key: str, default: bool) -> bool:
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    raise ProtocolError(
        ErrorCode.INVALID_TYPE, f"'{key}' must be a boolean, got {_typename(v)}", param=key
    )


# --------------------------------------------------------------------------- server events


def error_event(
    code: str,
    message: str,
    *,
    param: str | None = None,
    status: int = 400,
    stream_id: str | None = None,
) -> dict[str, Any]:
    """The in-band `error` event (and the HTTP error body, minus nothing: same shape)."""
    etype = (
        "invalid_request_error" if status < 500 else "server_error"
    ) if status != 401 else "authentication_error"
    ev: dict[str, Any] = {
        "type": "error",
        "status": status,
        "error": {"type": etype, "code": code, "message": message, "param": param},
    }
    if stream_id is not None:
        ev["stream_id"] = stream_id
    return ev


def is_terminal(event: dict[str, Any]) -> bool:
    """True iff the event ends a response: completed, failed, incomplete, or an error event."""
    t = event.get("type")
    return t in TERMINAL_TYPES or t == "error"


class EventSequence:
    """Numbers the events of one response from 0 (OpenAI's `sequence_number`)."""

    def __init__(self, stream_id: str | None = None) -> None:
        self._n = 0
        self.stream_id = stream_id

    def stamp(self, ev: dict[str, Any]) -> dict[str, Any]:
        ev["sequence_number"] = self._n
        self._n += 1
        if self.stream_id is not None:
            ev["stream_id"] = self.stream_id
        return ev


def make_usage(
    *,
    input_tokens: int,
    cached_tokens: int,
    output_tokens: int,
    reasoning_tokens: int = 0,
    context_source: str | None = None,
    tokens_rendered: int | None = None,
) -> dict[str, Any]:
    """OpenAI's usage object plus our `x_switchboard` extension when context_source is given."""
    usage: dict[str, Any] = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }
    if context_source is not None:
        usage["x_switchboard"] = {
            "context_source": context_source,
            "tokens_rendered": tokens_rendered or 0,
        }
    return usage


def output_text_part(text: str = "") -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str, *, status: str = "completed") -> dict[str, Any]:
    """An assistant output message with one output_text part (empty content while in progress)."""
    content = [output_text_part(text)] if status == "completed" else []
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def function_call_item(
    item_id: str, call_id: str, name: str, arguments: str, *, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def response_object(
    *,
    response_id: str,
    model: str,
    status: str,
    output: list[dict[str, Any]] | None = None,
    usage: dict[str, Any] | None = None,
    created_at: float | None = None,
    request: ResponseCreate | None = None,
    error: dict[str, Any] | None = None,
    incomplete_details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Response object as OpenAI shapes it (fields the SDK reads are all present)."""
    raw = request.raw if request is not None else {}
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(created_at if created_at is not None else time.time()),
        "status": status,
        "error": error,
        "incomplete_details": incomplete_details,
        "instructions": request.instructions if request is not None else None,
        "max_output_tokens": raw.get("max_output_tokens"),
        "model": model,
        "output": output if output is not None else [],
        "parallel_tool_calls": raw.get("parallel_tool_calls", True),
        "previous_response_id": request.previous_response_id if request is not None else None,
        "reasoning": {"effort": None, "summary": None},
        "store": request.store if request is not None else True,
        "temperature": raw.get("temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": raw.get("tool_choice", "auto"),
        "tools": request.tools if request is not None else [],
        "top_p": raw.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "metadata": request.metadata if request is not None else {},
    }


# Events are dict literals (a **kwargs helper built a second dict per event). Key order is the
# order on the wire.


def ev_created(response: dict[str, Any]) -> dict[str, Any]:
    return {"type": "response.created", "response": response}


def ev_in_progress(response: dict[str, Any]) -> dict[str, Any]:
    return {"type": "response.in_progress", "response": response}


def ev_output_item_added(output_index: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "response.output_item.added", "output_index": output_index, "item": item}


def ev_output_item_done(output_index: int, item: dict[str, Any]) -> dict[str, Any]:
    return {"type": "response.output_item.done", "output_index": output_index, "item": item}


def ev_content_part_added(item_id: str, output_index: int, content_index: int) -> dict[str, Any]:
    return {
        "type": "response.content_part.added",
        "item_id": item_id,
        "output_index": output_index,
        "content_index": content_index,
        "part": output_text_part(""),
    }


def ev_content_part_done(
    item_id: str, output_index: int, content_index: int, text: str
) -> dict[str, Any]:
    return {
        "type": "response.content_part.done",
        "item_id": item_id,
        "output_index": output_index,
        "content_index": content_index,
        "part": output_text_part(text),
    }


def ev_output_text_delta(
    item_id: str, output_index: int, content_index: int, delta: str
) -> dict[str, Any]:
    return {
        "type": "response.output_text.delta",
        "item_id": item_id,
        "output_index": output_index,
        "content_index": content_index,
        "delta": delta,
        "logprobs": [],
    }


def ev_output_text_done(
    item_id: str, output_index: int, content_index: int, text: str
) -> dict[str, Any]:
    return {
        "type": "response.output_text.done",
        "item_id": item_id,
        "output_index": output_index,
        "content_index": content_index,
        "text": text,
        "logprobs": [],
    }


def ev_function_call_arguments_delta(
    item_id: str, output_index: int, delta: str
) -> dict[str, Any]:
    return {
        "type": "response.function_call_arguments.delta",
        "item_id": item_id,
        "output_index": output_index,
        "delta": delta,
    }


def ev_function_call_arguments_done(
    item_id: str, output_index: int, name: str, arguments: str
) -> dict[str, Any]:
    return {
        "type": "response.function_call_arguments.done",
        "item_id": item_id,
        "output_index": output_index,
        "name": name,
        "arguments": arguments,
    }


def ev_completed(response: dict[str, Any]) -> dict[str, Any]:
    return {"type": "response.completed", "response": response}


def ev_failed(response: dict[str, Any]) -> dict[str, Any]:
    return {"type": "response.failed", "response": response}


def ev_incomplete(response: dict[str, Any]) -> dict[str, Any]:
    return {"type": "response.incomplete", "response": response}
