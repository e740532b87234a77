"""WebSocket frames (RFC 6455 section 5) with no I/O: a parser that turns received bytes into
messages and control frames, and the encoders for what we send.

`bus.ws` runs it over trio streams for every server (the hub, the sim model server) and for
ws:// dials. It exists because the generic stack (wsproto's event objects under
trio-websocket's reader) cost ~35 us of CPU per message on each side; the bus and the model
link send a few messages per task and per turn, and that was a third of a zero-time model
turn's CPU.

Scope: no extensions (a peer's permessage-deflate offer is declined by not echoing it, so
RSV bits must be 0), fragmented messages reassembled, control frames interleaved, text checked
as UTF-8. Every violation raises `FrameError` with the close code to send: 1002 (protocol),
1007 (bad UTF-8), 1009 (message too big).
"""

from __future__ import annotations

import os
import struct
from typing import Final

import attrs

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL: Final = 1002
CLOSE_NO_STATUS: Final = 1005  # never on the wire: a close frame without a code
CLOSE_ABNORMAL: Final = 1006  # never on the wire: the connection ended without a close frame
CLOSE_BAD_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009

MAX_FRAGMENTS: Final = 4096  # frames one message may arrive in

_H: Final = struct.Struct("!H")
_Q: Final = struct.Struct("!Q")


class FrameError(Exception):
    """The peer broke the framing rules: close the connection with `code`, saying `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@attrs.frozen
class Ping:
    payload: bytes


@attrs.frozen
class Pong:
    payload: bytes


@attrs.frozen
class Close:
    """A close frame: `code` None when it carried none (1005 to the application)."""

    code: int | None
    reason: str


Event = str | bytes | Ping | Pong | Close


def _valid_close_code(code: int) -> bool:
    # RFC 6455 7.4 and the IANA registry: what a peer may put in a close frame.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def xor_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """`data` XOR the 4-byte `key` repeated (masking and unmasking are the same operation)."""
    n = len(data)
    if not n:
        return b""
    keys = key * (n // 4 + 1)
    return (int.from_bytes(data, "little") ^ int.from_bytes(keys[:n], "little")).to_bytes(
        n, "little")


def encode_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame. A client (mask=True) masks with a fresh random key, as the RFC says."""
    n = len(payload)
    b1 = 0x80 if mask else 0
    if n < 126:
        head = bytes((0x80 | opcode, b1 | n))
    elif n < 0x10000:
        head = bytes((0x80 | opcode, b1 | 126)) + _H.pack(n)
    else:
        head = bytes((0x80 | opcode, b1 | 127)) + _Q.pack(n)
    if mask:
        key = os.urandom(4)
        return head + key + xor_mask(payload, key)
    return head + payload


def encode_message(message: str | bytes | bytearray, *, mask: bool) -> bytes:
    """A text (str) or binary (bytes) message as one frame."""
    if isinstance(message, str):
        return encode_frame(OP_TEXT, message.encode("utf-8"), mask=mask)
    if isinstance(message, bytes | bytearray):
        return encode_frame(OP_BINARY, bytes(message), mask=mask)
    raise ValueError(f"a WebSocket message is str or bytes, not {type(message).__name__}")


def close_payload(code: int | None, reason: str | None) -> bytes:
    """The body of a close frame; the reason is cut to fit the 125-byte control frame limit."""
    if code is None or code in (CLOSE_NO_STATUS, CLOSE_ABNORMAL):
        return b""
    text = (reason or "").encode("utf-8")[:123]
    text = text.decode("utf-8", "ignore").encode("utf-8")  # never cut a character in half
    return _H.pack(code) + text


class FrameParser:
    """Bytes in, events out. `expect_masked` is True on a server (clients must mask), False on a
    client (servers must not). A message longer than `max_message_size` bytes is refused with
    1009 as soon as its length is known, before it is buffered."""

    def __init__(self, *, expect_masked: bool, max_message_size: int) -> None:
        self._masked = expect_masked
        self._max = max_message_size
        self._buf = bytearray()
        self._frag_op: int | None = None  # opcode of the fragmented message being reassembled
        self._frags: list[bytes] = []
        self._frag_len = 0
        self.closed = False  # a close frame was read: nothing after it is parsed

    def feed(self, data: bytes | bytearray) -> list[Event]:
        """The complete events `data` finishes, in order. Raises FrameError."""
        if self.closed:
            return []
        buf = self._buf
        buf += data
        out: list[Event] = []
        pos = 0
        end = len(buf)
        try:
            while end - pos >= 2:
                b0 = buf[pos]
                b1 = buf[pos + 1]
                n = b1 & 0x7F
                at = pos + 2
                if n == 126:
                    if end - at < 2:
                        break
                    n = _H.unpack_from(buf, at)[0]
                    at += 2
                elif n == 127:
                    if end - at < 8:
                        break
                    n = _Q.unpack_from(buf, at)[0]
                    at += 8
                    if n >> 63:
                        raise FrameError(CLOSE_PROTOCOL, "frame length has its top bit set")
                opcode = b0 & 0x0F
                self._check_header(b0, b1, opcode, n)
                masked = b1 & 0x80
                if masked:
                    if end - at < 4 + n:
                        break
                    payload = xor_mask(memoryview(buf)[at + 4:at + 4 + n], bytes(buf[at:at + 4]))
                    pos = at + 4 + n
                else:
                    if end - at < n:
                        break
                    payload = bytes(buf[at:at + n])
                    pos = at + n
                ev = self._frame(b0 & 0x80, opcode, payload)
                if ev is not None:
                    out.append(ev)
                    if type(ev) is Close:
                        self.closed = True
                        break
        finally:
            if pos:
                del buf[:pos]
        return out

    def _check_header(self, b0: int, b1: int, opcode: int, n: int) -> None:
        if b0 & 0x70:
            raise FrameError(CLOSE_PROTOCOL, "RSV bits set, but no extension was agreed")
        if bool(b1 & 0x80) != self._masked:
            raise FrameError(CLOSE_PROTOCOL, "client frames must be masked" if self._masked
                             else "server frames must not be masked")
        if opcode >= 0x8:
            if opcode not in (OP_CLOSE, OP_PING, OP_PONG):
                raise FrameError(CLOSE_PROTOCOL, f"unknown control opcode {opcode:#x}")
            if not b0 & 0x80:
                raise FrameError(CLOSE_PROTOCOL, "a control frame must not be fragmented")
            if n > 125:
                raise FrameError(CLOSE_PROTOCOL, "a control frame's payload is over 125 bytes")
            return
        if opcode not in (OP_CONT, OP_TEXT, OP_BINARY):
            raise FrameError(CLOSE_PROTOCOL, f"unknown data opcode {opcode:#x}")
        if opcode == OP_CONT:
            if self._frag_op is None:
                raise FrameError(CLOSE_PROTOCOL, "a continuation frame with no message begun")
            if len(self._frags) >= MAX_FRAGMENTS:  # empty ones would grow the list forever
                raise FrameError(CLOSE_TOO_BIG, f"a message in more than {MAX_FRAGMENTS} "
                                                "fragments")
            total = self._frag_len + n
        else:
            if self._frag_op is not None:
                raise FrameError(CLOSE_PROTOCOL, "a new message began inside a fragmented one")
            total = n
        if total > self._max:
            raise FrameError(CLOSE_TOO_BIG, f"message of {total} bytes is over the limit of "
                                            f"{self._max}")

    def _frame(self, fin: int, opcode: int, payload: bytes) -> Event | None:
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_PONG:
            return Pong(payload)
        if opcode == OP_CLOSE:
            return self._close(payload)
        if opcode != OP_CONT:
            if fin:
                return self._message(opcode, payload)
            self._frag_op = opcode
            self._frags = [payload]
            self._frag_len = len(payload)
            return None
        self._frags.append(payload)
        self._frag_len += len(payload)
        if not fin:
            return None
        op, whole = self._frag_op, b"".join(self._frags)
        self._frag_op, self._frags, self._frag_len = None, [], 0
        assert op is not None
        return self._message(op, whole)

    @staticmethod
    def _message(opcode: int, payload: bytes) -> str | bytes:
        if opcode == OP_BINARY:
            return payload
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(CLOSE_BAD_DATA, "a text message is not valid UTF-8") from None

    @staticmethod
    def _close(payload: bytes) -> Close:
        if not payload:
            return Close(None, "")
        if len(payload) == 1:
            raise FrameError(CLOSE_PROTOCOL, "a close frame of one byte")
        code = _H.unpack_from(payload)[0]
        if not _valid_close_code(code):
            raise FrameError(CLOSE_PROTOCOL, f"close code {code} is not one a peer may send")
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(CLOSE_BAD_DATA, "a close reason is not valid UTF-8") from None
        return Close(code, reason)
