"""Owns the bus's error hierarchy: one root, subclasses that say whose fault it was."""

from __future__ import annotations

# WebSocket close codes the bus sends (RFC 6455 section 7.4 plus our 4xxx application codes).
# Documented in docs/bus-protocol.md; keep the two in step.
CLOSE_NORMAL = 1000  # clean shutdown after a BYE
CLOSE_GOING_AWAY = 1001  # the hub is shutting down; sessions are gone
CLOSE_PROTOCOL = 1002  # malformed frame, bad field type, unknown kind, sequence gap
CLOSE_UNSUPPORTED = 1003  # a text frame (the bus speaks binary only)
CLOSE_POLICY = 1008  # auth failed, or a frame before auth
CLOSE_TOO_BIG = 1009  # frame, envelope count, id, topic or token over its limit
CLOSE_INTERNAL = 1011  # a bug on the side that closes
CLOSE_TRY_LATER = 1013  # slow consumer: it did not drain its queue in time
CLOSE_REPLACED = 4000  # a newer connection took this endpoint id
CLOSE_RESUME_REFUSED = 4001  # resume asked for a session the hub does not have (expired)
CLOSE_KEEPALIVE = 4002  # nothing heard from the peer within the keepalive timeout

# Codes after which a client must not try to resume: the session is gone or never existed.
FINAL_CLOSE_CODES = frozenset({
    CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_PROTOCOL, CLOSE_UNSUPPORTED, CLOSE_POLICY,
    CLOSE_TOO_BIG, CLOSE_TRY_LATER, CLOSE_REPLACED, CLOSE_RESUME_REFUSED,
})


class BusError(Exception):
    """Root of every bus error."""


class ProtocolError(BusError):
    """The peer broke the wire protocol (its fault); `close_code` is the WebSocket code to send."""

    def __init__(self, message: str, close_code: int = CLOSE_PROTOCOL) -> None:
        super().__init__(message)
        self.close_code = close_code


class BusClosedError(BusError):
    """You closed this client (or are closing it); open a new one to keep talking."""


class BusBrokenError(BusError):
    """The hub or the network ended the session (e.g. the resume window passed, the hub shut
    down, or it closed us as a slow consumer); messages may be lost. Open a new client."""

    def __init__(self, message: str, close_code: int | None = None) -> None:
        super().__init__(message)
        self.close_code = close_code


class BusAuthError(BusError):
    """The hub refused our token (your configuration): give this peer the hub's token through
    SWITCHBOARD_TOKEN or --token-file."""


class BusTimeoutError(BusError):
    """Nobody replied to a request before its timeout (the responder is slow or gone)."""


class BodyTooLargeError(BusError, ValueError):
    """A message body over the bus's size limit (the sender's data): nothing was sent and the
    connection is fine. Send a reference to large data (a file, a URL) instead."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"message body of {size} bytes exceeds the bus's limit of {limit} "
                         "bytes; send a reference to large data instead")
        self.size = size
        self.limit = limit


class BusNoRouteError(BusError):
    """No connected peer holds the destination endpoint id: check the id, or start that peer."""


class BusRemoteError(BusError):
    """The responder answered the request with an error (its code and message are attached)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def describe_close(reason: object | None) -> tuple[int | None, str]:
    """(code, text) from a WebSocket CloseReason (or None when the library has none)."""
    if reason is None:
        return None, "connection closed without a close frame"
    code = getattr(reason, "code", None)
    text = getattr(reason, "reason", None) or getattr(reason, "name", None) or ""
    return code, str(text)
