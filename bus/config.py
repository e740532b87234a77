"""Owns the bus's configuration values: the hub's and the client's knobs, with their reasons."""

from __future__ import annotations

import attrs

from bus.codec import Limits
from bus.ws import WsConfig

# Measured on the orchestrator bench before it: 40% of the WebSocket messages on a worker's
# link were lone ACKs (one per lease, one per result). 20 ms is far below every timer that
# depends on acks (keepalive 5 s, slow-consumer grace 5 s) and above a worker's time per task.
ACK_DELAY = 0.02


def _ws_for(limits: Limits) -> WsConfig:
    # The WS layer's own cap sits above ours so that an oversize frame reaches the codec and is
    # refused with a logged ProtocolError(1009); only a frame over twice the limit is cut off
    # by the WS library itself (also with 1009).
    return WsConfig(max_message_size=2 * limits.max_frame_bytes + 1024,
                    message_queue_size=64, receive_buffer_size=None)


@attrs.frozen(kw_only=True)
class HubConfig:
    """How a hub listens, authenticates, keeps sessions and protects itself from slow peers."""

    host: str = "127.0.0.1"
    port: int = 0
    # Shared secret every peer must present in its hello; None accepts any token (loopback only:
    # `orchestrator bus` refuses to start without one on any other host).
    token: str | None = None
    path: str = "/bus"
    # A session whose connection dropped (no BYE) is kept this long for the peer to resume;
    # messages for it queue meanwhile (within the pending limits below).
    resume_window: float = 30.0
    # A peer silent for keepalive_interval gets a PING; silent for keepalive_interval +
    # keepalive_timeout in total, it is declared dead (close 4002, the session is detached).
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 5.0
    handshake_timeout: float = 10.0  # from TCP accept to a valid hello
    # Slow-consumer policy: a session may hold this many unacknowledged envelopes (or bytes).
    # Over the soft limit for slow_consumer_grace seconds, or over twice it at any moment, the
    # connection is closed with 1013 and the session discarded. Senders are never blocked.
    max_pending_msgs: int = 10_000
    max_pending_bytes: int = 32 * 1024 * 1024
    slow_consumer_grace: float = 5.0
    shutdown_grace: float = 2.0  # on cancel: time to flush queued frames before closing 1001
    max_frame_envelopes: int = 1024  # per outgoing frame; smaller frames keep latency fair
    # An ACK with no data to ride on waits up to this long for some (0: send it at once). On
    # request/response traffic most ACKs then share a frame with the next message instead of
    # costing a WebSocket message of their own. Data is never delayed.
    ack_delay: float = ACK_DELAY
    limits: Limits = Limits()
    ws: WsConfig | None = None  # None: derived from limits

    def ws_config(self) -> WsConfig:
        return self.ws if self.ws is not None else _ws_for(self.limits)


@attrs.frozen(kw_only=True)
class ClientConfig:
    """How a client batches, waits, keeps the connection alive and reconnects."""

    # Bound on envelopes sent but not yet acknowledged by the hub (kept for resume) plus those
    # queued to send; send/publish block (backpressure) while it is full.
    max_outbound: int = 16_384
    # Bound on received messages waiting for receive(); when full the reader stops reading, the
    # hub's queue for us grows, and past the hub's slow-consumer limit it closes us (1013).
    inbox_size: int = 16_384
    control_timeout: float = 10.0  # subscribe/claim/... wait this long for the hub's answer
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 5.0
    reconnect_initial: float = 0.05  # first retry delay; doubles up to reconnect_max
    reconnect_max: float = 2.0
    max_frame_envelopes: int = 1024
    ack_delay: float = ACK_DELAY  # as HubConfig.ack_delay
    close_timeout: float = 2.0  # on exit: time to flush, send BYE and see the hub close
    limits: Limits = Limits()
    ws: WsConfig | None = None

    def ws_config(self) -> WsConfig:
        return self.ws if self.ws is not None else _ws_for(self.limits)
