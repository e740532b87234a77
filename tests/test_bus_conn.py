"""The sans-I/O connection state machine: handshake, kinds per state, acks, dedupe, resume."""

from __future__ import annotations

import pytest

from bus import codec as C
from bus.conn import ACK_HOLD_MAX, BusConn, Hello, Role, SeqState, State, Welcome
from bus.errors import CLOSE_POLICY, CLOSE_PROTOCOL, CLOSE_TOO_BIG, ProtocolError


def frame(*envs: tuple) -> bytes:
    return C.encode_frame(envs)


def decode(data: bytes) -> tuple:
    return C.FrameDecoder(C.Limits()).decode(data)


def open_pair() -> tuple[BusConn, BusConn, SeqState]:
    """A client and a hub connection past the handshake; returns the hub session's SeqState."""
    client = BusConn(Role.CLIENT)
    hub = BusConn(Role.HUB)
    hello = hub.receive_frame(client.hello(token="t", endpoint_id="a", session=""))[0]
    assert isinstance(hello, Hello) and hub.state is State.AUTH
    session = SeqState()
    welcome = hub.accept(hello, session, session="s1", resumed=False, resume_window=30)
    ev = client.receive_frame(welcome)[0]
    assert isinstance(ev, Welcome) and ev.session == "s1"
    assert client.state is State.OPEN and hub.state is State.OPEN
    return client, hub, session


def pump(src: BusConn, dst: BusConn) -> list:
    out = []
    while (data := src.data_to_send()) is not None:
        out.extend(dst.receive_frame(data))
    return out


def test_hub_refuses_any_frame_before_hello_with_1008():
    hub = BusConn(Role.HUB)
    with pytest.raises(ProtocolError) as exc:
        hub.receive_frame(frame((C.SEND, 1, "", "b", 0, b"")))
    assert exc.value.close_code == CLOSE_POLICY


def test_hello_must_be_alone_in_the_first_frame():
    hub = BusConn(Role.HUB)
    h = decode(C.EnvelopeEncoder().hello(token="t", endpoint_id="a", session="", last_seen=0))[0]
    with pytest.raises(ProtocolError) as exc:
        hub.receive_frame(frame(h, (C.PING, 0, "", "", 0, b"")))
    assert exc.value.close_code == CLOSE_POLICY


def test_hub_reads_nothing_between_hello_and_accept():
    hub = BusConn(Role.HUB)
    hub.receive_frame(C.EnvelopeEncoder().hello(token="t", endpoint_id="a", session="",
                                                last_seen=0))
    with pytest.raises(ProtocolError, match="not allowed"):
        hub.receive_frame(frame((C.PING, 0, "", "", 0, b"")))


def test_second_hello_is_a_protocol_error():
    client, hub, _ = open_pair()
    with pytest.raises(ProtocolError) as exc:
        hub.receive_frame(client.hello(token="t", endpoint_id="a", session=""))
    assert exc.value.close_code == CLOSE_PROTOCOL


def test_client_refuses_client_only_kinds_from_the_hub():
    client, _, _ = open_pair()
    with pytest.raises(ProtocolError, match="subscribe not allowed"):
        client.receive_frame(frame((C.SUBSCRIBE, 1, "", "a.b", 1, b"")))


def test_hub_refuses_noroute_from_a_client():
    _, hub, _ = open_pair()
    with pytest.raises(ProtocolError, match="noroute not allowed"):
        hub.receive_frame(frame((C.NOROUTE, 1, "", "x", 1, b"")))


def test_envelopes_flow_in_order_and_are_acked_cumulatively():
    client, hub, session = open_pair()
    for i in range(5):
        client.seq.queue(C.SEND, "", "b", 0, bytes([i]))
    got = pump(client, hub)
    assert [e[5] for e in got] == [bytes([i]) for i in range(5)]
    assert [e[1] for e in got] == [1, 2, 3, 4, 5]
    assert client.seq.unacked == 5
    pump(hub, client)  # the hub's ACK
    assert client.seq.unacked == 0 and client.seq.unacked_bytes == 0
    assert session.in_seq == 5


def test_one_frame_carries_many_envelopes_up_to_the_envelope_limit():
    client = BusConn(Role.CLIENT, max_frame_envelopes=10)
    for _ in range(25):
        client.seq.queue(C.SEND, "", "b", 0, b"x")
    sizes = []
    while (data := client.data_to_send()) is not None:
        sizes.append(len(decode(data)))
    assert sizes == [10, 10, 5]


def test_frames_stay_within_the_byte_limit():
    lim = C.Limits(max_frame_bytes=2000)
    client = BusConn(Role.CLIENT, limits=lim)
    for _ in range(10):
        client.seq.queue(C.SEND, "", "b", 0, b"x" * 500)
    frames = []
    while (data := client.data_to_send()) is not None:
        assert len(data) <= 2000
        frames.append(data)
    assert sum(len(decode(f)) for f in frames) == 10


def test_sequence_gap_is_a_protocol_error():
    _, hub, _ = open_pair()
    with pytest.raises(ProtocolError, match="gap: expected 1, got 2"):
        hub.receive_frame(frame((C.SEND, 2, "", "b", 0, b"")))


def test_duplicates_are_dropped_and_counted():
    _, hub, _ = open_pair()
    assert len(hub.receive_frame(frame((C.SEND, 1, "", "b", 0, b"")))) == 1
    assert hub.receive_frame(frame((C.SEND, 1, "", "b", 0, b""))) == []
    assert hub.duplicates == 1


def test_ack_beyond_what_was_sent_is_a_protocol_error():
    client, hub, _ = open_pair()
    with pytest.raises(ProtocolError, match="never sent"):
        client.receive_frame(frame((C.ACK, 1, "", "", 0, b"")))


def test_ping_is_answered_with_pong():
    client, hub, _ = open_pair()
    hub.ping_due = True
    pump(hub, client)
    assert client.pong_due
    data = client.data_to_send()
    assert data is not None and decode(data)[0][0] == C.PONG


@pytest.mark.parametrize("env,code", [
    ((C.REQUEST, 1, "", "b", 0, b""), CLOSE_PROTOCOL),  # request without corr
    ((C.REPLY, 1, "", "", 3, b""), CLOSE_PROTOCOL),  # reply without destination
    ((C.SEND, 1, "", "", 0, b""), CLOSE_PROTOCOL),
    ((C.PUBLISH, 1, "", "tasks.*", 0, b""), CLOSE_PROTOCOL),
    ((C.SUBSCRIBE, 1, "", "a..b", 1, b""), CLOSE_PROTOCOL),
    ((C.SUBSCRIBE, 1, "", "a.b", 0, b""), CLOSE_PROTOCOL),
    ((C.CLAIM, 1, "", "has space", 1, b""), CLOSE_PROTOCOL),
])
def test_kind_specific_field_rules(env, code):
    _, hub, _ = open_pair()
    with pytest.raises(ProtocolError) as exc:
        hub.receive_frame(frame(env))
    assert exc.value.close_code == code


def test_body_over_the_envelope_limit_is_too_big():
    lim = C.Limits(max_frame_bytes=4096, max_id_len=16)
    hub = BusConn(Role.HUB, limits=lim)
    hello = hub.receive_frame(C.EnvelopeEncoder().hello(token="", endpoint_id="a", session="",
                                                        last_seen=0))[0]
    hub.accept(hello, SeqState(), session="s", resumed=False, resume_window=1)
    with pytest.raises(ProtocolError) as exc:
        hub.receive_frame(frame((C.SEND, 1, "", "b", 0, b"x" * 4000)))
    assert exc.value.close_code == CLOSE_TOO_BIG


def test_after_bye_nothing_sequenced_is_accepted():
    _, hub, _ = open_pair()
    hub.receive_frame(frame((C.BYE, 1, "", "", 0, b"\xc0")))
    assert hub.state is State.CLOSED
    hub.receive_frame(frame((C.ACK, 0, "", "", 0, b"")))
    with pytest.raises(ProtocolError):
        hub.receive_frame(frame((C.SEND, 2, "", "b", 0, b"")))


def test_resume_resends_exactly_what_the_peer_missed_both_ways():
    client, hub, session = open_pair()
    # client -> hub: 3 envelopes arrive, the hub's ACK is lost with the connection
    for i in range(3):
        client.seq.queue(C.SEND, "", "b", 0, bytes([i]))
    assert len(pump(client, hub)) == 3
    hub.data_to_send()  # the ACK frame, never delivered
    client.seq.queue(C.SEND, "", "b", 0, b"\x03")  # queued while disconnected
    # hub -> client: 2 delivered, 2 written but lost
    for i in range(2):
        session.queue(C.SEND, "x", "a", 0, bytes([10 + i]))
    assert len(pump(hub, client)) == 2
    for i in range(2):
        session.queue(C.SEND, "x", "a", 0, bytes([20 + i]))
    hub.data_to_send()  # lost
    client.data_to_send()  # the client's ACK for the 2, lost too

    # reconnect: new connection objects, same sequencing state on both sides
    hub2 = BusConn(Role.HUB)
    hello = hub2.receive_frame(client.hello(token="t", endpoint_id="a", session="s1"))[0]
    assert hello.last_seen == 2
    client2 = BusConn(Role.CLIENT, seq=client.seq)
    welcome = hub2.accept(hello, session, session="s1", resumed=True, resume_window=30)
    ev = client2.receive_frame(welcome)[0]
    assert ev.resumed and ev.last_seen == 3
    to_hub = pump(client2, hub2)
    assert [e[5] for e in to_hub] == [b"\x03"]  # the 3 the hub had are not resent
    to_client = pump(hub2, client2)
    assert [e[5] for e in to_client] == [bytes([20]), bytes([21])]
    pump(client2, hub2)
    pump(hub2, client2)
    assert client.seq.unacked == 0 and session.unacked == 0


def test_resent_envelopes_the_peer_already_had_are_deduplicated():
    client, hub, session = open_pair()
    for i in range(3):
        client.seq.queue(C.SEND, "", "b", 0, bytes([i]))
    first = client.data_to_send()
    assert len(hub.receive_frame(first)) == 3
    # the hub's ACK is lost; the client still counts them unacked and resends on resume as if
    # the hub had told it an older position (a stale HELLO exchange replays them)
    client.seq.rewind(0)
    again = client.data_to_send()
    assert hub.receive_frame(again) == []
    assert hub.duplicates == 3


def test_resume_point_before_the_peers_own_ack_is_a_protocol_error():
    client, hub, _ = open_pair()
    client.seq.queue(C.SEND, "", "b", 0, b"")
    pump(client, hub)
    pump(hub, client)
    with pytest.raises(ProtocolError, match="resume point"):
        client.seq.rewind(0)


def test_take_unacked_returns_everything_not_acknowledged():
    seq = SeqState()
    for i in range(4):
        seq.queue(C.REQUEST, "a", "b", i + 1, b"")
    conn = BusConn(Role.HUB, seq=seq, max_frame_envelopes=2)
    conn.data_to_send()
    taken = seq.take_unacked()
    assert [decode(C.frame([d]))[0][4] for d in taken] == [1, 2, 3, 4]
    assert seq.unacked == 0 and seq.unacked_bytes == 0


def test_a_lone_ack_may_wait_only_while_nothing_else_is_owed_and_it_is_small():
    client, hub, _ = open_pair()
    assert not hub.ack_can_wait()  # nothing owed at all
    client.seq.queue(C.SEND, "", "b", 0, b"x")
    pump(client, hub)
    assert hub.ack_can_wait()  # only the ACK for 1 envelope
    hub.seq.queue(C.SEND, "a", "a", 0, b"y")
    assert not hub.ack_can_wait()  # data goes now, and carries the ACK
    pump(hub, client)
    assert not hub.ack_can_wait() and client.seq.unacked == 0
    client.seq.queue(C.SEND, "", "b", 0, b"x")
    pump(client, hub)
    hub.pong_due = True
    assert not hub.ack_can_wait()  # a PONG goes at once, ACK included
    pump(hub, client)
    for _ in range(ACK_HOLD_MAX):
        client.seq.queue(C.SEND, "", "b", 0, b"x")
    pump(client, hub)
    assert not hub.ack_can_wait()  # a big ACK goes at once: the sender's window drains
