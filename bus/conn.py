"""Owns the bus connection state machine and session sequencing (acks, dedupe, resume); no I/O.

h11-style: `BusConn.receive_frame(bytes) -> list of new envelopes` and
`BusConn.data_to_send() -> bytes | None`. The trio shells (hub.py, client.py) own sockets,
timers and tasks; this module owns every protocol rule:

Every transition lives in `_ALLOWED` / `_NEXT` below:

    role   state       receives                         next state
    HUB    HANDSHAKE   one frame holding only a HELLO   AUTH (the shell checks the token and
                       anything else: close 1008        calls accept() -> OPEN, or refuses)
    HUB    AUTH        nothing (the shell reads no more until accept())
    HUB    OPEN        ack ping pong send publish request reply error
                       subscribe unsubscribe claim release bye      bye -> CLOSED
    HUB    CLOSED      ack ping pong (nothing sequenced after BYE)
    CLIENT HANDSHAKE   one frame holding only a WELCOME               -> OPEN
    CLIENT OPEN        ack ping pong send publish request reply error noroute

Sequencing: each side numbers the sequenced envelopes it sends 1, 2, 3, ... per session and
keeps them until the peer's cumulative ACK covers them. On reconnect the client's HELLO and the
hub's WELCOME carry `last_seen` (the highest number received in order); each side then resends
everything after it. The receiver drops numbers it has seen (duplicates) and refuses gaps, so
the application sees each message exactly once, in order.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any

import attrs

from bus import codec as C
from bus.errors import CLOSE_POLICY, ProtocolError


class Role(enum.Enum):
    HUB = "hub"
    CLIENT = "client"


class State(enum.Enum):
    HANDSHAKE = "handshake"
    AUTH = "auth"
    OPEN = "open"
    CLOSED = "closed"


_FROM_CLIENT = frozenset({C.ACK, C.PING, C.PONG, C.SEND, C.PUBLISH, C.REQUEST, C.REPLY, C.ERROR,
                          C.SUBSCRIBE, C.UNSUBSCRIBE, C.CLAIM, C.RELEASE, C.BYE})
_FROM_HUB = frozenset({C.ACK, C.PING, C.PONG, C.SEND, C.PUBLISH, C.REQUEST, C.REPLY, C.ERROR,
                       C.NOROUTE})
_ALLOWED: dict[tuple[Role, State], frozenset[int]] = {
    (Role.HUB, State.HANDSHAKE): frozenset({C.HELLO}),
    (Role.HUB, State.AUTH): frozenset(),
    (Role.HUB, State.OPEN): _FROM_CLIENT,
    (Role.HUB, State.CLOSED): frozenset({C.ACK, C.PING, C.PONG}),
    (Role.CLIENT, State.HANDSHAKE): frozenset({C.WELCOME}),
    (Role.CLIENT, State.AUTH): frozenset(),
    (Role.CLIENT, State.OPEN): _FROM_HUB,
    (Role.CLIENT, State.CLOSED): frozenset({C.ACK, C.PING, C.PONG}),
}
_NEXT: dict[tuple[Role, State, int], State] = {
    (Role.HUB, State.HANDSHAKE, C.HELLO): State.AUTH,
    (Role.HUB, State.OPEN, C.BYE): State.CLOSED,
    (Role.CLIENT, State.HANDSHAKE, C.WELCOME): State.OPEN,
}


@attrs.frozen(kw_only=True)
class Hello:
    token: str
    endpoint_id: str
    session: str  # "" for a fresh session
    last_seen: int  # highest hub->client seq the client received (resume point)


@attrs.frozen(kw_only=True)
class Welcome:
    session: str
    resumed: bool
    last_seen: int  # highest client->hub seq the hub received
    resume_window: float


_ENCODER = C.EnvelopeEncoder()  # one per process is enough: trio runs one task at a time
# A lone ACK may wait for data to carry it (the shells' ack_delay) only while it covers fewer
# envelopes than this; past it the ACK goes at once, so a sender's window keeps draining.
ACK_HOLD_MAX = 1024
_pack_env = C.pack_envelope


@attrs.define(slots=True)
class SeqState:
    """The sequencing half of a session: what we sent and what we received. It outlives any one
    connection; that is what makes resume work.

    Invariant: inflight holds envelopes written to some connection and not yet acked; pending
    holds envelopes not yet written; both ordered by seq, inflight before pending.
    Bounded by the shells, not here: the client blocks senders at ClientConfig.max_outbound,
    the hub closes a session over HubConfig.max_pending_msgs/bytes (slow-consumer policy).
    """

    next_seq: int = 1
    inflight: deque[tuple[int, bytes]] = attrs.field(factory=deque)
    pending: deque[tuple[int, bytes]] = attrs.field(factory=deque)
    unacked_bytes: int = 0  # bytes held in inflight + pending
    peer_acked: int = 0  # highest of our seqs the peer acknowledged
    in_seq: int = 0  # highest peer seq received in order (what we ack)
    acked_in: int = 0  # the in_seq value we last sent in an ACK

    @property
    def unacked(self) -> int:
        return len(self.inflight) + len(self.pending)

    def queue(self, kind: int, source: str, dest: str, corr: int, body: bytes) -> int:
        """Number and encode one sequenced envelope; returns its seq."""
        seq = self.next_seq
        self.next_seq = seq + 1
        data = _pack_env((kind, seq, source, dest, corr, body))
        self.pending.append((seq, data))
        self.unacked_bytes += len(data)
        return seq

    def on_ack(self, n: int) -> None:
        if n >= self.next_seq:
            raise ProtocolError(f"ack {n} covers envelopes never sent (last sent {self.next_seq - 1})")
        if n <= self.peer_acked:
            return
        self.peer_acked = n
        inflight = self.inflight
        freed = 0
        while inflight and inflight[0][0] <= n:
            freed += len(inflight.popleft()[1])
        # A resume can ack envelopes that were queued but never written on the new connection.
        pending = self.pending
        while pending and pending[0][0] <= n:
            freed += len(pending.popleft()[1])
        self.unacked_bytes -= freed

    def rewind(self, peer_last_seen: int) -> None:
        """A new connection: the peer has everything up to `peer_last_seen`; resend the rest."""
        if peer_last_seen < self.peer_acked:
            raise ProtocolError(f"resume point {peer_last_seen} is before the peer's own ack "
                                f"{self.peer_acked}")
        self.on_ack(peer_last_seen)
        if self.inflight:
            self.pending.extendleft(reversed(self.inflight))
            self.inflight.clear()
        self.acked_in = 0  # tell the new connection our position again

    def take_unacked(self) -> list[bytes]:
        """Remove and return every encoded envelope not acked (the session is being discarded)."""
        out = [d for _, d in self.inflight] + [d for _, d in self.pending]
        self.inflight.clear()
        self.pending.clear()
        self.unacked_bytes = 0
        return out


class BusConn:
    """Protocol state of one WebSocket connection (either side)."""

    __slots__ = ("role", "state", "limits", "seq", "duplicates", "pong_due", "ping_due",
                 "_decoder", "_max_envs", "_max_body", "_allowed", "_hub")

    def __init__(self, role: Role, *, limits: C.Limits = C.Limits(),
                 seq: SeqState | None = None, max_frame_envelopes: int = 1024) -> None:
        self.role = role
        self.state = State.HANDSHAKE
        self.limits = limits
        self.seq = seq if seq is not None else SeqState()
        self.duplicates = 0  # resent envelopes dropped because we had them already
        self.pong_due = False
        self.ping_due = False
        self._decoder = C.FrameDecoder(limits)
        self._max_envs = min(max_frame_envelopes, limits.max_envelopes)
        self._max_body = C.envelope_size_limit(limits)
        self._hub = role is Role.HUB
        self._allowed = _ALLOWED[(role, self.state)]

    def _set_state(self, state: State) -> None:
        self.state = state
        self._allowed = _ALLOWED[(self.role, state)]

    # ------------------------------------------------------------------ receiving

    def receive_frame(self, data: bytes | bytearray | str) -> list[Any]:
        """Decode one frame; return its new sequenced envelopes (tuples) in order, or one
        Hello/Welcome event during the handshake. ACK, PING, PONG are handled here.
        Raises ProtocolError with the close code to send."""
        envs = self._decoder.decode(data)
        if self.state is State.HANDSHAKE:
            return [self._handshake(envs)]
        allowed = self._allowed
        seq = self.seq
        out: list[Any] = []
        for env in envs:
            kind = env[0]
            if kind not in allowed:
                raise ProtocolError(f"{C.KIND_NAMES.get(kind, kind)} not allowed from "
                                    f"{'a client' if self._hub else 'the hub'} in state "
                                    f"{self.state.value}")
            if kind in C.SEQUENCED:
                n = env[1]
                if n <= seq.in_seq:
                    self.duplicates += 1
                    continue
                if n != seq.in_seq + 1:
                    raise ProtocolError(f"sequence gap: expected {seq.in_seq + 1}, got {n}")
                if kind != C.SEND or not env[3] or len(env[5]) > self._max_body:
                    self._check(env)  # the common case (a send) is checked inline above
                seq.in_seq = n
                out.append(env)
                if kind == C.BYE:
                    self._set_state(State.CLOSED)
                    allowed = self._allowed
            elif kind == C.ACK:
                seq.on_ack(env[1])
            elif kind == C.PING:
                self.pong_due = True
        return out

    def _handshake(self, envs: tuple[tuple[Any, ...], ...]) -> Hello | Welcome:
        env = envs[0]
        if len(envs) != 1 or env[0] not in self._allowed:
            if self._hub:
                raise ProtocolError("the first frame must hold exactly one hello (auth)",
                                    CLOSE_POLICY)
            raise ProtocolError("the hub's first frame must hold exactly one welcome")
        self._set_state(_NEXT[(self.role, State.HANDSHAKE, env[0])])
        if self._hub:
            _, _, token, endpoint_id, session, last_seen = env
            return Hello(token=token, endpoint_id=endpoint_id, session=session,
                         last_seen=last_seen)
        _, _, session, resumed, last_seen, window = env
        if resumed:
            self.seq.rewind(last_seen)
        return Welcome(session=session, resumed=resumed, last_seen=last_seen,
                       resume_window=float(window))

    def _check(self, env: tuple[Any, ...]) -> None:
        """Kind-specific field rules for a sequenced envelope."""
        kind, _, _, dest, corr, body = env
        if len(body) > self._max_body:
            raise ProtocolError(f"body of {len(body)} bytes exceeds {self._max_body}",
                                C.CLOSE_TOO_BIG)
        if kind == C.SEND or kind == C.PUBLISH:
            if not dest:
                raise ProtocolError("send/publish needs a destination")
            if kind == C.PUBLISH and ("*" in dest or ">" in dest):
                raise ProtocolError(f"cannot publish to a wildcard topic {dest!r}")
            return
        if kind in (C.REQUEST, C.REPLY, C.ERROR):
            if not dest or corr == 0:
                raise ProtocolError(f"{C.KIND_NAMES[kind]} needs a destination and a corr > 0")
            return
        if kind in (C.SUBSCRIBE, C.UNSUBSCRIBE):
            if corr == 0:
                raise ProtocolError("subscribe/unsubscribe needs a corr > 0")
            C.check_pattern(dest)
        elif kind in (C.CLAIM, C.RELEASE):
            if corr == 0:
                raise ProtocolError("claim/release needs a corr > 0")
            C.check_endpoint_id(dest)

    # ------------------------------------------------------------------ handshake (sending)

    def hello(self, *, token: str, endpoint_id: str, session: str) -> bytes:
        """Client: the first frame of a connection (resume when `session` is not empty)."""
        return _ENCODER.hello(token=token, endpoint_id=endpoint_id, session=session,
                              last_seen=self.seq.in_seq)

    def accept(self, hello: Hello, seq: SeqState, *, session: str, resumed: bool,
               resume_window: float) -> bytes:
        """Hub: the hello passed auth; attach the session's sequencing state, return WELCOME."""
        if self.state is not State.AUTH:
            raise RuntimeError(f"accept() in state {self.state.value}")
        self.seq = seq
        if resumed:
            seq.rewind(hello.last_seen)
        self._set_state(State.OPEN)
        return _ENCODER.welcome(session=session, resumed=resumed, last_seen=seq.in_seq,
                                resume_window=resume_window)

    # ------------------------------------------------------------------ sending

    def ack_can_wait(self) -> bool:
        """True iff all we owe the peer is an ACK, for fewer than ACK_HOLD_MAX envelopes: the
        shell may hold it briefly for data going the same way to carry it."""
        seq = self.seq
        return (not seq.pending and not self.pong_due and not self.ping_due
                and 0 < seq.in_seq - seq.acked_in < ACK_HOLD_MAX)

    def wants_write(self) -> bool:
        seq = self.seq
        return bool(seq.pending) or seq.in_seq > seq.acked_in or self.pong_due or self.ping_due

    def data_to_send(self) -> bytes | None:
        """The next frame: an ACK if we owe one, PONG/PING if due, then queued envelopes up to
        the frame limits (envelope count and bytes). None when there is nothing to send."""
        seq = self.seq
        parts: list[bytes] = []
        if seq.in_seq > seq.acked_in:
            parts.append(_ENCODER.envelope(C.ACK, seq.in_seq, "", "", 0, b""))
            seq.acked_in = seq.in_seq
        if self.pong_due:
            parts.append(_ENCODER.envelope(C.PONG, 0, "", "", 0, b""))
            self.pong_due = False
        if self.ping_due:
            parts.append(_ENCODER.envelope(C.PING, 0, "", "", 0, b""))
            self.ping_due = False
        pending = seq.pending
        if pending:
            room = self._max_envs - len(parts)
            budget = self.limits.max_frame_bytes - 64
            inflight = seq.inflight
            while pending and room > 0:
                item = pending[0]
                size = len(item[1])
                if size > budget and len(parts) > 0:
                    break
                budget -= size
                room -= 1
                pending.popleft()
                inflight.append(item)
                parts.append(item[1])
        return C.frame(parts) if parts else None
