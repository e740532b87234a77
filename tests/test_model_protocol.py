"""Responses protocol with no I/O: codecs, validation of client events, error and server shapes."""

from __future__ import annotations

import json
import os
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modellink import protocol as p
from modellink.protocol import ErrorCode, ProtocolError, ResponseCancel, ResponseCreate

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20) \
    | st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
events = st.builds(
    lambda t, fields: {**fields, "type": t},
    st.text(min_size=1, max_size=30),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)


def _err(fn: Any, *args: Any, **kw: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kw)
    return info.value


# ------------------------------------------------------------------ codecs


@given(events, st.sampled_from([p.JSON, p.MSGPACK]))
def test_every_event_round_trips_in_both_encodings(event: dict[str, Any], enc: p.Encoding):
    frame = p.encode_event(event, enc)
    assert isinstance(frame, str if enc == p.JSON else bytes)
    assert p.encoding_of_frame(frame) == enc
    assert p.decode_event(frame) == event


@given(st.binary(max_size=200))
def test_random_binary_frames_raise_only_protocol_errors(data: bytes):
    try:
        p.parse_client_event(p.decode_event(data))
    except ProtocolError as exc:
        assert exc.code and exc.message


@given(st.text(max_size=200))
def test_random_text_frames_raise_only_protocol_errors(data: str):
    try:
        p.parse_client_event(p.decode_event(data))
    except ProtocolError as exc:
        assert exc.code and exc.message


@given(json_values)
def test_any_json_value_as_a_client_event_raises_only_protocol_errors(value: Any):
    for candidate in (value, {"type": "response.create", "model": "sim", "input": value},
                      {"type": "response.create", "model": value},
                      {"type": "response.cancel", "response_id": value}):
        try:
            p.parse_client_event(candidate)
        except ProtocolError as exc:
            assert exc.code and exc.message


def test_malformed_json_is_invalid_json():
    err = _err(p.decode_event, '{"type": "response.create",')
    assert err.code == ErrorCode.INVALID_JSON and err.status == 400


def test_malformed_msgpack_is_invalid_msgpack():
    assert _err(p.decode_event, b"\xc1\x00\xff").code == ErrorCode.INVALID_MSGPACK
    # a valid msgpack value followed by garbage
    assert _err(p.decode_event, msgpack.packb({"type": "x"}) + b"\x01").code == \
        ErrorCode.INVALID_MSGPACK


def test_non_object_event_and_missing_or_wrong_type_are_named():
    assert _err(p.decode_event, "[1, 2]").code == ErrorCode.INVALID_TYPE
    err = _err(p.decode_event, '{"model": "sim"}')
    assert (err.code, err.param) == (ErrorCode.MISSING_PARAMETER, "type")
    err = _err(p.decode_event, p.encode_event({"type": 5}, p.MSGPACK))
    assert (err.code, err.param) == (ErrorCode.INVALID_TYPE, "type")


def test_oversize_message_is_refused_before_decoding():
    big = json.dumps({"type": "response.create", "model": "sim", "input": "x" * 2000})
    err = _err(p.decode_event, big, max_bytes=1000)
    assert err.code == ErrorCode.MESSAGE_TOO_LARGE and "1000" in err.message
    # counted in UTF-8 bytes, not characters
    assert _err(p.decode_event, '"' + "é" * 600 + '"', max_bytes=1000).code == \
        ErrorCode.MESSAGE_TOO_LARGE
    assert p.decode_event(big, max_bytes=len(big))["type"] == "response.create"


def test_sse_frames_are_event_and_data_lines():
    ev = {"type": "response.output_text.delta", "delta": "hi\nthere", "sequence_number": 3}
    raw = p.encode_sse(ev)
    assert raw.startswith(b"event: response.output_text.delta\ndata: {")
    assert raw.endswith(b"\n\n") and raw.count(b"\n") == 3  # the newline inside is escaped
    assert p.SseDecoder().feed(raw) == [ev]


@given(st.lists(events, max_size=5), st.data())
def test_sse_decoder_reassembles_events_split_anywhere(evs: list[dict[str, Any]], data: Any):
    raw = b"".join(p.encode_sse(e) for e in evs) + b"data: [DONE]\n\n"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    dec, out, last = p.SseDecoder(), [], 0
    for c in [*cuts, len(raw)]:
        out += dec.feed(raw[last:c])
        last = c
    assert out == evs


def test_sse_decoder_joins_multiline_data_and_skips_comments():
    raw = b": keepalive\r\nevent: x\r\ndata: {\"type\":\r\ndata: \"x\"}\r\n\r\n"
    assert p.SseDecoder().feed(raw) == [{"type": "x"}]


# ------------------------------------------------------------------ client events


def test_string_input_becomes_one_user_message_and_defaults_are_openais():
    ev = p.parse_client_event(p.response_create_event(model="sim", input="hello"))
    assert isinstance(ev, ResponseCreate)
    assert ev.input == [{"type": "message", "role": "user", "content": "hello"}]
    assert (ev.store, ev.generate, ev.previous_response_id, ev.stream_id) == (True, True, None,
                                                                               None)


def test_builders_leave_out_none_fields():
    assert p.response_create_event(model="m", input=[]) == {
        "type": "response.create", "model": "m", "input": []}
    assert p.response_cancel_event() == {"type": "response.cancel"}
    ev = p.parse_client_event(p.response_cancel_event("resp_1", stream_id="a"))
    assert ev == ResponseCancel(response_id="resp_1", stream_id="a")


def test_stream_and_background_are_accepted_and_ignored_over_websocket():
    ev = p.parse_client_event({"type": "response.create", "model": "sim", "input": "x",
                               "stream": True, "background": False, "reasoning": {}})
    assert isinstance(ev, ResponseCreate) and ev.stream is False


def test_http_body_keeps_stream_and_ignores_stream_id():
    req = p.parse_create_body({"model": "sim", "input": "x", "stream": True,
                               "stream_id": "lane"}, http=True)
    assert req.stream is True and req.stream_id is None


def test_every_supported_item_shape_is_accepted():
    items = [
        {"role": "user", "content": "no type field"},
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "a"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "b", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}",
         "id": "fc_1", "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1", "output": "ok"},
        {"type": "function_call_output", "call_id": "call_1",
         "output": [{"type": "input_text", "text": "ok"}]},
    ]
    req = p.parse_create_body({"model": "sim", "input": items})
    assert [i["type"] for i in req.input] == ["message", "message", "message", "function_call",
                                               "function_call_output", "function_call_output"]


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"type": "response.create", "input": "x"}, ErrorCode.MISSING_PARAMETER, "model"),
    ({"type": "response.create", "model": 3}, ErrorCode.INVALID_TYPE, "model"),
    ({"type": "response.create", "model": "sim", "store": "yes"}, ErrorCode.INVALID_TYPE, "store"),
    ({"type": "response.create", "model": "sim", "input": 7}, ErrorCode.INVALID_TYPE, "input"),
    ({"type": "response.create", "model": "sim", "previous_response_id": 1},
     ErrorCode.INVALID_TYPE, "previous_response_id"),
    ({"type": "response.create", "model": "sim", "tools": {}}, ErrorCode.INVALID_TYPE, "tools"),
    ({"type": "response.create", "model": "sim", "tools": [{"name": "f"}]},
     ErrorCode.MISSING_PARAMETER, "tools[0].type"),
    ({"type": "response.create", "model": "sim", "metadata": {"a": 1}},
     ErrorCode.INVALID_TYPE, "metadata"),
    ({"type": "response.create", "model": "sim", "generate": "no"},
     ErrorCode.INVALID_TYPE, "generate"),
    ({"type": "response.create", "model": "sim", "stream_id": "bad lane!"},
     ErrorCode.INVALID_STREAM_ID, "stream_id"),
    ({"type": "response.create", "model": "sim", "input": ["x"]},
     ErrorCode.INVALID_TYPE, "input[0]"),
    ({"type": "response.create", "model": "sim", "input": [{"type": "image", "url": "u"}]},
     ErrorCode.INVALID_VALUE, "input[0].type"),
    ({"type": "response.create", "model": "sim", "input": [{"content": "x"}]},
     ErrorCode.MISSING_PARAMETER, "input[0].type"),
    ({"type": "response.create", "model": "sim",
      "input": [{"type": "message", "role": "robot", "content": "x"}]},
     ErrorCode.INVALID_VALUE, "input[0].role"),
    ({"type": "response.create", "model": "sim",
      "input": [{"type": "message", "role": "user", "content": 5}]},
     ErrorCode.INVALID_TYPE, "input[0].content"),
    ({"type": "response.create", "model": "sim",
      "input": [{"type": "message", "role": "user", "content": [{"type": "input_image"}]}]},
     ErrorCode.INVALID_VALUE, "input[0].content[0].type"),
    ({"type": "response.create", "model": "sim",
      "input": [{"type": "message", "role": "user", "content": [{"type": "input_text"}]}]},
     ErrorCode.INVALID_TYPE, "input[0].content[0].text"),
    ({"type": "response.create", "model": "sim", "input": [
        {"type": "message", "role": "user", "content": "ok"},
        {"type": "function_call", "name": "f", "arguments": "{}"}]},
     ErrorCode.MISSING_PARAMETER, "input[1].call_id"),
    ({"type": "response.create", "model": "sim",
      "input": [{"type": "function_call_output", "call_id": "c", "output": 1}]},
     ErrorCode.INVALID_TYPE, "input[0].output"),
    ({"type": "response.cancel", "response_id": 5}, ErrorCode.INVALID_TYPE, "response_id"),
    ({"type": "session.update"}, ErrorCode.UNKNOWN_EVENT_TYPE, "type"),
])
def test_bad_client_events_name_the_field(body: dict[str, Any], code: str, param: str):
    err = _err(p.parse_client_event, body)
    assert (err.code, err.param) == (code, param)
    assert param.split("[")[0].split(".")[0] in err.message
    ev = err.to_event()
    assert ev["type"] == "error" and ev["error"]["param"] == param


# ------------------------------------------------------------------ server events


def test_error_event_has_openais_shape():
    ev = p.error_event(ErrorCode.PREVIOUS_RESPONSE_NOT_FOUND, "gone",
                       param="previous_response_id", stream_id="a")
    assert ev == {"type": "error", "status": 400, "stream_id": "a", "error": {
        "type": "invalid_request_error", "code": "previous_response_not_found",
        "message": "gone", "param": "previous_response_id"}}
    assert p.error_event("x", "y", status=401)["error"]["type"] == "authentication_error"
    assert p.error_event("x", "y", status=500)["error"]["type"] == "server_error"
    assert p.is_terminal(ev) and p.is_terminal({"type": "response.incomplete"})
    assert not p.is_terminal({"type": "response.output_text.delta"})


def test_sequence_numbers_count_from_zero_per_response_and_carry_the_lane():
    seq = p.EventSequence("lane-1")
    evs = [seq.stamp(p.ev_output_text_delta("msg_1", 0, 0, "x")) for _ in range(3)]
    assert [e["sequence_number"] for e in evs] == [0, 1, 2]
    assert all(e["stream_id"] == "lane-1" for e in evs)
    assert "stream_id" not in p.EventSequence().stamp({"type": "x"})


def test_usage_has_openais_fields_and_our_extension():
    u = p.make_usage(input_tokens=10, cached_tokens=4, output_tokens=3,
                     context_source="connection_cache", tokens_rendered=2)
    assert u == {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 4},
                 "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": 13,
                 "x_switchboard": {"context_source": "connection_cache", "tokens_rendered": 2}}
    assert "x_switchboard" not in p.make_usage(input_tokens=1, cached_tokens=0, output_tokens=1)


def test_response_object_echoes_the_request():
    req = p.parse_create_body({"model": "sim", "input": "x", "instructions": "be brief",
                               "tools": [{"type": "function", "name": "f"}],
                               "metadata": {"k": "v"}, "store": False,
                               "previous_response_id": "resp_0", "tool_choice": "none"})
    r = p.response_object(response_id="resp_1", model="sim", status="completed", request=req,
                          output=[p.message_item("msg_1", "hi")])
    assert r["object"] == "response" and r["status"] == "completed"
    assert (r["instructions"], r["metadata"], r["store"], r["previous_response_id"],
            r["tool_choice"]) == ("be brief", {"k": "v"}, False, "resp_0", "none")
    assert r["tools"] == [{"type": "function", "name": "f"}]
    assert r["output"][0]["content"][0] == {"type": "output_text", "text": "hi",
                                            "annotations": [], "logprobs": []}


def test_ids_have_openais_prefixes_and_are_unique():
    ids = {p.new_response_id() for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("resp_") for i in ids)
    assert p.new_message_id().startswith("msg_")
    assert p.new_function_call_id().startswith("fc_")
    assert p.new_call_id().startswith("call_")


def test_ids_stay_unique_across_many_batches_of_randomness():
    ids = [p.new_call_id() for _ in range(5 * p._ID_BATCH + 3)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == len("call_") + 2 * p._ID_BYTES for i in ids)
    int(ids[0][len("call_"):], 16)  # hex


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_never_hands_out_its_parents_next_ids():
    p.new_response_id()  # the pool now holds ids
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(w, p.new_response_id().encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    child = os.read(r, 100).decode()
    os.close(r)
    assert child.startswith("resp_") and child != p.new_response_id()


def test_msgpack_encoding_recovers_after_an_event_it_cannot_pack():
    with pytest.raises(TypeError):
        p.encode_event({"type": "x", "bad": object()}, p.MSGPACK)
    ev = {"type": "response.output_text.delta", "delta": "hi", "sequence_number": 3}
    assert p.encode_event(ev, p.MSGPACK) == msgpack.packb(ev, use_bin_type=True)


@settings(max_examples=50)
@given(st.text(max_size=50), st.text(max_size=50))
def test_function_call_items_keep_their_arguments_verbatim(name: str, args: str):
    item = p.function_call_item("fc_1", "call_1", name, args)
    back = p.decode_event(p.encode_event({"type": "x", "item": item}, p.MSGPACK))["item"]
    assert back == item


def test_decode_events_reads_a_batch_and_a_single_event_alike():
    a = {"type": "response.created", "sequence_number": 0}
    b = {"type": "response.completed", "sequence_number": 1}
    assert p.decode_events(p.encode_event_batch([a, b])) == [a, b]
    assert p.decode_events(p.encode_event(a, p.MSGPACK)) == [a]
    assert p.decode_events(p.encode_event(a, p.JSON)) == [a]


@pytest.mark.parametrize("frame,code", [
    (msgpack.packb([]), "invalid_type"),
    (msgpack.packb([{"type": "x"}, 3]), "invalid_type"),
    (msgpack.packb([{"no_type": 1}]), "missing_required_parameter"),
    (msgpack.packb([{"type": "x"}])[:-1], "invalid_msgpack"),
])
def test_decode_events_refuses_bad_batches_with_a_code(frame: bytes, code: str):
    with pytest.raises(ProtocolError) as err:
        p.decode_events(frame)
    assert err.value.code == code
