"""Owns the bus wire format: frames of msgpack envelopes, their limits, ids and topic patterns.

No I/O here. One binary WebSocket message is one frame: a msgpack array of envelopes. Every
envelope is a 6-element array; its meaning depends on its kind (first element):

    data and control:  [kind, seq, source, dest, corr, body]
                        int   int  str     str   int   bin (opaque msgpack, never decoded here)
    hello (client):    [HELLO, version, token, endpoint_id, session, last_seen]
    welcome (hub):     [WELCOME, version, session, resumed, last_seen, resume_window_s]

Anything malformed raises ProtocolError carrying the WebSocket close code to send.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import msgpack

from bus.errors import CLOSE_PROTOCOL, CLOSE_TOO_BIG, CLOSE_UNSUPPORTED, ProtocolError

VERSION = 1

# Wire kinds. Numbers are part of the protocol: never reuse one.
HELLO = 1  # client -> hub, first frame only
WELCOME = 2  # hub -> client, first frame only
ACK = 3  # seq field = cumulative ack: every sequenced envelope <= it was received
PING = 4  # please answer (any frame counts as an answer)
PONG = 5
SEND = 10  # direct message to an endpoint id
PUBLISH = 11  # to a topic; delivered to every matching subscription
REQUEST = 12  # direct, corr > 0; answered by REPLY / ERROR / NOROUTE with the same corr
REPLY = 13
ERROR = 14  # body = msgpack [code, message]
NOROUTE = 15  # hub -> client: nobody holds `dest`; corr names the request (0 for a send)
SUBSCRIBE = 20  # dest = pattern; the hub answers REPLY or ERROR with the same corr
UNSUBSCRIBE = 21
CLAIM = 22  # dest = alias endpoint id routed to this connection
RELEASE = 23
BYE = 24  # client -> hub: end the session (no resume); the hub closes with 1000

KIND_NAMES = {
    HELLO: "hello", WELCOME: "welcome", ACK: "ack", PING: "ping", PONG: "pong",
    SEND: "send", PUBLISH: "publish", REQUEST: "request", REPLY: "reply", ERROR: "error",
    NOROUTE: "noroute", SUBSCRIBE: "subscribe", UNSUBSCRIBE: "unsubscribe", CLAIM: "claim",
    RELEASE: "release", BYE: "bye",
}
# Kinds carrying a sequence number: the ones acked, kept for resume and deduplicated.
SEQUENCED = frozenset({SEND, PUBLISH, REQUEST, REPLY, ERROR, NOROUTE, SUBSCRIBE, UNSUBSCRIBE,
                       CLAIM, RELEASE, BYE})
# Kinds in the [kind, seq, source, dest, corr, body] shape.
DATA_SHAPED = SEQUENCED | {ACK, PING, PONG}

_U64 = 2**64

# Endpoint ids and topics: no whitespace, no control characters, no wildcards.
_ID_RE = re.compile(r"[^\s*>\x00-\x1f\x7f]+")
_SEGMENT_RE = re.compile(r"[^\s.*>\x00-\x1f\x7f]+")


@attrs.frozen(kw_only=True)
class Limits:
    """Wire limits. Both sides enforce them on what they receive (close 1009 when exceeded)."""

    max_frame_bytes: int = 1024 * 1024  # one WebSocket message
    max_envelopes: int = 4096  # per frame
    max_id_len: int = 256  # characters in an endpoint id, topic, pattern or session id
    max_token_len: int = 1024


def envelope_size_limit(limits: Limits) -> int:
    """The largest body a sender may queue: a frame of one envelope must stay within the limit."""
    return limits.max_frame_bytes - 2 * limits.max_id_len * 4 - 64


class EnvelopeEncoder:
    """Encodes envelopes with one reused Packer (no per-call Packer construction)."""

    __slots__ = ("_pack",)

    def __init__(self) -> None:
        self._pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack

    def envelope(self, kind: int, seq: int, source: str, dest: str, corr: int,
                 body: bytes) -> bytes:
        return self._pack((kind, seq, source, dest, corr, body))  # type: ignore[no-any-return]

    def hello(self, *, token: str, endpoint_id: str, session: str, last_seen: int) -> bytes:
        return frame([self._pack((HELLO, VERSION, token, endpoint_id, session, last_seen))])

    def welcome(self, *, session: str, resumed: bool, last_seen: int,
                resume_window: float) -> bytes:
        return frame([self._pack((WELCOME, VERSION, session, resumed, last_seen,
                                  float(resume_window)))])


def frame(encoded: Sequence[bytes]) -> bytes:
    """One frame from already-encoded envelopes: a msgpack array header, then the envelopes."""
    n = len(encoded)
    if n < 16:
        head = bytes((0x90 | n,))
    elif n < 0x10000:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(encoded)


def encode_frame(envelopes: Iterable[Sequence[Any]]) -> bytes:
    """Encode whole envelope tuples into one frame (tests, tools; the hot path uses `frame`)."""
    pack = msgpack.Packer(use_bin_type=True).pack
    return frame([pack(tuple(e)) for e in envelopes])


# Reused Packers (a Packer per call costs as much as the packing). Not thread-safe; trio runs
# one task at a time. pack_envelope takes a (kind, seq, source, dest, corr, body) tuple.
pack_envelope = msgpack.Packer(use_bin_type=True, autoreset=True).pack
_pack_value = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def pack_body(value: Any) -> bytes:
    """Serialize an application value (anything msgpack can encode) into an opaque body."""
    try:
        return _pack_value(value)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"message body is not msgpack-serializable: {exc}") from None


def unpack_body(body: bytes) -> Any:
    """Decode a body. Raises ValueError when it is not one well-formed msgpack value."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False)
    except ValueError:
        raise
    except Exception as exc:  # msgpack raises several non-ValueError types on garbage
        raise ValueError(f"body is not valid msgpack: {exc}") from None


class FrameDecoder:
    """Decodes and type-checks frames received on one connection. Reuse one per connection."""

    __slots__ = ("_limits", "_unpacker", "_fed")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._unpacker = self._new_unpacker()
        self._fed = 0

    def _new_unpacker(self) -> msgpack.Unpacker:
        lim = self._limits
        return msgpack.Unpacker(
            use_list=False, raw=False,
            max_buffer_size=lim.max_frame_bytes,
            max_str_len=4 * max(lim.max_id_len, lim.max_token_len),
            max_bin_len=lim.max_frame_bytes,
            max_array_len=max(lim.max_envelopes, 6),
            max_map_len=0, max_ext_len=0,
        )

    def decode(self, data: bytes | bytearray | str) -> tuple[tuple[Any, ...], ...]:
        """Return the frame's envelopes as tuples, each shape- and type-checked for its kind."""
        if isinstance(data, str):
            raise ProtocolError("text frame: the bus speaks binary msgpack frames only",
                                CLOSE_UNSUPPORTED)
        if len(data) > self._limits.max_frame_bytes:
            raise ProtocolError(f"frame of {len(data)} bytes exceeds the limit of "
                                f"{self._limits.max_frame_bytes}", CLOSE_TOO_BIG)
        if not data:
            raise ProtocolError("empty frame")
        up = self._unpacker
        try:
            up.feed(data)
            self._fed += len(data)
            envs = up.unpack()
        except msgpack.OutOfData:
            self._unpacker, self._fed = self._new_unpacker(), 0
            raise ProtocolError("truncated frame: incomplete msgpack") from None
        except ValueError as exc:
            self._unpacker, self._fed = self._new_unpacker(), 0
            text = str(exc)
            # str/bin/array over their limits are "too big"; a map or ext is a wrong type.
            code = (CLOSE_TOO_BIG if "exceeds max" in text and "max_map" not in text
                    and "max_ext" not in text else CLOSE_PROTOCOL)
            raise ProtocolError(f"frame is not valid msgpack: {exc}", code) from None
        except Exception as exc:  # every decoder failure is the peer's protocol error
            self._unpacker, self._fed = self._new_unpacker(), 0
            raise ProtocolError(f"frame is not valid msgpack: {type(exc).__name__}") from None
        if up.tell() != self._fed:
            self._unpacker, self._fed = self._new_unpacker(), 0
            raise ProtocolError("trailing bytes after the frame's msgpack array")
        if self._fed > 1 << 30:  # keep tell() small; the buffer itself is already empty
            self._unpacker, self._fed = self._new_unpacker(), 0
        if type(envs) is not tuple or not envs:
            raise ProtocolError("a frame must be a non-empty msgpack array of envelopes")
        if len(envs) > self._limits.max_envelopes:  # pragma: no cover - max_array_len stops it
            raise ProtocolError("too many envelopes in one frame", CLOSE_TOO_BIG)
        max_id = self._limits.max_id_len
        for env in envs:
            if type(env) is not tuple or len(env) != 6:
                raise ProtocolError("an envelope must be an array of 6 fields")
            kind = env[0]
            if type(kind) is not int:
                raise ProtocolError(f"envelope kind must be an int, not {type(kind).__name__}")
            if kind in DATA_SHAPED:
                _, seq, source, dest, corr, body = env
                if type(seq) is not int or not 0 <= seq < _U64:
                    raise ProtocolError("envelope seq must be an unsigned int")
                if type(source) is not str or type(dest) is not str:
                    raise ProtocolError("envelope source and dest must be strings")
                if len(source) > max_id or len(dest) > max_id:
                    raise ProtocolError(f"envelope source/dest longer than {max_id} characters",
                                        CLOSE_TOO_BIG)
                if type(corr) is not int or not 0 <= corr < _U64:
                    raise ProtocolError("envelope corr must be an unsigned int")
                if type(body) is not bytes:
                    raise ProtocolError("envelope body must be msgpack bin (opaque bytes)")
            elif kind == HELLO:
                _check_hello(env, self._limits)
            elif kind == WELCOME:
                _check_welcome(env, max_id)
            else:
                raise ProtocolError(f"unknown envelope kind {kind}")
        return envs  # type: ignore[no-any-return]


def _check_hello(env: tuple[Any, ...], limits: Limits) -> None:
    _, version, token, endpoint_id, session, last_seen = env
    if type(version) is not int:
        raise ProtocolError("hello version must be an int")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}: this side speaks {VERSION}")
    if type(token) is not str or type(endpoint_id) is not str or type(session) is not str:
        raise ProtocolError("hello token, endpoint_id and session must be strings")
    if len(token) > limits.max_token_len:
        raise ProtocolError("hello token too long", CLOSE_TOO_BIG)
    if len(endpoint_id) > limits.max_id_len or len(session) > limits.max_id_len:
        raise ProtocolError("hello endpoint_id or session too long", CLOSE_TOO_BIG)
    check_endpoint_id(endpoint_id)
    if type(last_seen) is not int or not 0 <= last_seen < _U64:
        raise ProtocolError("hello last_seen must be an unsigned int")


def _check_welcome(env: tuple[Any, ...], max_id: int) -> None:
    _, version, session, resumed, last_seen, window = env
    if version != VERSION or type(version) is not int:
        raise ProtocolError(f"unsupported protocol version {version!r}: this side speaks {VERSION}")
    if type(session) is not str or not session or len(session) > max_id:
        raise ProtocolError("welcome session must be a non-empty string")
    if type(resumed) is not bool:
        raise ProtocolError("welcome resumed must be a bool")
    if type(last_seen) is not int or not 0 <= last_seen < _U64:
        raise ProtocolError("welcome last_seen must be an unsigned int")
    if type(window) not in (float, int) or window < 0:
        raise ProtocolError("welcome resume_window must be a non-negative number")


# ---------------------------------------------------------------- ids, topics, patterns

def check_endpoint_id(value: str) -> str:
    """An endpoint id or alias: non-empty, no whitespace, control characters, '*' or '>'."""
    if not _ID_RE.fullmatch(value):
        raise ProtocolError(f"invalid endpoint id {value!r}: use a non-empty string without "
                            "whitespace, '*' or '>'")
    return value


def check_topic(value: str) -> str:
    """A topic to publish to: dot-separated non-empty segments, no wildcards."""
    if not value or not all(_SEGMENT_RE.fullmatch(s) for s in value.split(".")):
        raise ProtocolError(f"invalid topic {value!r}: use dot-separated non-empty segments "
                            "without whitespace or wildcards, e.g. 'tasks.build'")
    return value


def check_pattern(value: str) -> str:
    """A subscription pattern: segments, each literal or '*' (one segment); '>' as the last
    segment matches one or more remaining segments."""
    segs = value.split(".") if value else [""]
    for i, s in enumerate(segs):
        if s == "*" or (s == ">" and i == len(segs) - 1):
            continue
        if not _SEGMENT_RE.fullmatch(s):
            raise ProtocolError(f"invalid pattern {value!r}: segments are literals, '*' (one "
                                "segment) or a final '>' (one or more segments)")
    return value


def is_wildcard(pattern: str) -> bool:
    return "*" in pattern or ">" in pattern


def pattern_matches(pattern: str, topic: str) -> bool:
    """True iff `topic` matches `pattern` ('*' = exactly one segment, final '>' = one or more)."""
    psegs = pattern.split(".")
    tsegs = topic.split(".")
    for i, p in enumerate(psegs):
        if p == ">":
            return len(tsegs) > i
        if i >= len(tsegs) or (p != "*" and p != tsegs[i]):
            return False
    return len(tsegs) == len(psegs)
