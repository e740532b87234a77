"""Wire format: round trips, limits and their close codes, ids and topic patterns."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import codec as C
from bus.errors import CLOSE_PROTOCOL, CLOSE_TOO_BIG, CLOSE_UNSUPPORTED, ProtocolError

LIM = C.Limits()

ids = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"),
                                     blacklist_characters="*>\t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85"),
              min_size=0, max_size=40)
data_kinds = st.sampled_from(sorted(C.SEQUENCED | {C.ACK, C.PING, C.PONG}))
u64 = st.integers(min_value=0, max_value=2**64 - 1)
envelopes = st.tuples(data_kinds, u64, ids, ids, u64, st.binary(max_size=300))


def decode(data: bytes | str, limits: C.Limits = LIM) -> tuple:
    return C.FrameDecoder(limits).decode(data)


@given(st.lists(envelopes, min_size=1, max_size=50))
def test_frames_of_envelopes_round_trip(envs):
    enc = C.EnvelopeEncoder()
    data = C.frame([enc.envelope(*e) for e in envs])
    assert decode(data) == tuple(envs)
    assert C.encode_frame(envs) == data


@given(st.lists(envelopes, min_size=1, max_size=5), st.integers(1, 4))
def test_one_decoder_decodes_frame_after_frame(envs, repeat):
    dec = C.FrameDecoder(LIM)
    data = C.encode_frame(envs)
    for _ in range(repeat):
        assert dec.decode(data) == tuple(envs)


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_random_bytes_raise_only_protocol_error(data):
    try:
        decode(data)
    except ProtocolError as exc:
        assert exc.close_code in (CLOSE_PROTOCOL, CLOSE_TOO_BIG)


@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
                    | st.text(max_size=20) | st.binary(max_size=20),
                    lambda inner: st.lists(inner, max_size=7) | st.dictionaries(
                        st.text(max_size=5), inner, max_size=3), max_leaves=30))
@settings(max_examples=500)
def test_well_formed_msgpack_of_any_shape_raises_only_protocol_error(value):
    data = msgpack.packb(value, use_bin_type=True)
    try:
        decode(data)
    except ProtocolError:
        pass


@given(st.lists(envelopes, min_size=1, max_size=5), st.data())
def test_truncated_frames_are_protocol_errors(envs, data):
    full = C.encode_frame(envs)
    cut = data.draw(st.integers(1, len(full) - 1))
    with pytest.raises(ProtocolError) as exc:
        decode(full[:cut])
    assert exc.value.close_code == CLOSE_PROTOCOL


def test_decoder_is_usable_after_a_truncated_frame():
    dec = C.FrameDecoder(LIM)
    good = C.encode_frame([(C.SEND, 1, "", "b", 0, b"\x01")])
    with pytest.raises(ProtocolError):
        dec.decode(good[:-1])
    assert dec.decode(good) == ((C.SEND, 1, "", "b", 0, b"\x01"),)


def test_text_frame_is_unsupported_data_1003():
    with pytest.raises(ProtocolError) as exc:
        decode("[1, 2]")
    assert exc.value.close_code == CLOSE_UNSUPPORTED


def test_oversize_frame_is_too_big_1009():
    lim = C.Limits(max_frame_bytes=100)
    data = C.encode_frame([(C.SEND, 1, "", "b", 0, b"x" * 200)])
    with pytest.raises(ProtocolError) as exc:
        decode(data, lim)
    assert exc.value.close_code == CLOSE_TOO_BIG


def test_too_many_envelopes_is_too_big_1009():
    lim = C.Limits(max_envelopes=8)
    data = C.encode_frame([(C.PING, 0, "", "", 0, b"")] * 9)
    with pytest.raises(ProtocolError) as exc:
        decode(data, lim)
    assert exc.value.close_code == CLOSE_TOO_BIG


def test_overlong_id_is_too_big_1009():
    data = C.encode_frame([(C.SEND, 1, "", "d" * (LIM.max_id_len + 1), 0, b"")])
    with pytest.raises(ProtocolError) as exc:
        decode(data)
    assert exc.value.close_code == CLOSE_TOO_BIG


def test_trailing_bytes_after_frame_are_protocol_error():
    data = C.encode_frame([(C.PING, 0, "", "", 0, b"")]) + b"\x00"
    with pytest.raises(ProtocolError, match="trailing"):
        decode(data)


GOOD = (C.SEND, 1, "a", "b", 0, b"\x01")


@pytest.mark.parametrize("index,bad", [
    (0, "send"), (0, 1.0), (0, True), (0, 999), (0, -1),
    (1, "1"), (1, -1), (1, 1.5), (1, None), (1, True),
    (2, 5), (2, b"a"), (2, None), (2, ["a"]),
    (3, 5), (3, b"b"), (3, None),
    (4, "0"), (4, -3), (4, 0.0), (4, None),
    (5, "body"), (5, 5), (5, None), (5, [1]),
])
def test_wrong_type_in_any_envelope_field_is_protocol_error(index, bad):
    env = list(GOOD)
    env[index] = bad
    with pytest.raises(ProtocolError) as exc:
        decode(msgpack.packb([env], use_bin_type=True))
    assert exc.value.close_code == CLOSE_PROTOCOL


@pytest.mark.parametrize("frame", [
    [], {}, 5, "x", [GOOD[:5]], [list(GOOD) + [1]], [{"kind": 10}], [[C.SEND]],
])
def test_malformed_frame_shapes_are_protocol_errors(frame):
    with pytest.raises(ProtocolError) as exc:
        decode(msgpack.packb(frame, use_bin_type=True))
    assert exc.value.close_code == CLOSE_PROTOCOL


def test_hello_round_trips_and_checks_version():
    enc = C.EnvelopeEncoder()
    data = enc.hello(token="t", endpoint_id="worker.1", session="s", last_seen=4)
    assert decode(data) == ((C.HELLO, C.VERSION, "t", "worker.1", "s", 4),)
    bad = msgpack.packb([[C.HELLO, C.VERSION + 1, "t", "w", "", 0]])
    with pytest.raises(ProtocolError, match="unsupported protocol version 2"):
        decode(bad)


def test_hello_with_bad_endpoint_id_is_refused():
    bad = msgpack.packb([[C.HELLO, C.VERSION, "t", "has space", "", 0]])
    with pytest.raises(ProtocolError, match="invalid endpoint id"):
        decode(bad)


def test_welcome_round_trips():
    data = C.EnvelopeEncoder().welcome(session="abc", resumed=True, last_seen=9,
                                       resume_window=30)
    assert decode(data) == ((C.WELCOME, C.VERSION, "abc", True, 9, 30.0),)


@pytest.mark.parametrize("pattern,topic,match", [
    ("tasks.*", "tasks.a", True),
    ("tasks.*", "tasks", False),
    ("tasks.*", "tasks.a.b", False),
    ("*.done", "t1.done", True),
    ("tasks.>", "tasks.a.b.c", True),
    ("tasks.>", "tasks", False),
    (">", "anything.at.all", True),
    ("a.b", "a.b", True),
    ("a.b", "a.c", False),
    ("a.*.c", "a.x.c", True),
])
def test_pattern_matching(pattern, topic, match):
    C.check_pattern(pattern)
    assert C.pattern_matches(pattern, topic) is match


@pytest.mark.parametrize("pattern", ["", "a..b", "a.>.b", "ta*sks", "a b", "a.>x"])
def test_bad_patterns_are_refused(pattern):
    with pytest.raises(ProtocolError):
        C.check_pattern(pattern)


@pytest.mark.parametrize("topic", ["", "a..b", "a.*", "a.>", "a b", "."])
def test_bad_topics_are_refused(topic):
    with pytest.raises(ProtocolError):
        C.check_topic(topic)


def test_body_helpers_round_trip_and_refuse_garbage():
    assert C.unpack_body(C.pack_body({"a": [1, b"x"]})) == {"a": [1, b"x"]}
    with pytest.raises(ValueError):
        C.unpack_body(b"\xc1")
    with pytest.raises(ValueError):
        C.unpack_body(b"\x92\x01")
    with pytest.raises(TypeError, match="msgpack-serializable"):
        C.pack_body(object())
