"""The registry never raises for tool problems; schemas; Python function tools; tool specs."""

import json
import sys
import time

import pytest
import toolfns
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.tools import (
    ToolContext,
    ToolError,
    ToolSpecError,
    build_registry,
    pyfunc,
    validate_tool_spec,
)
from agents.tools.schema import validate


@pytest.fixture
def ctx(tmp_path):
    return ToolContext(workspace=tmp_path, env={})


async def call(registry, name, arguments):
    with trio.fail_after(5):
        return await registry.call(name, arguments)


# --- schemas --------------------------------------------------------------------------------

def test_schemas_are_openai_function_tools_in_spec_order(ctx):
    reg = build_registry(["shell", "toolfns:add", "read_file"], ctx)
    schemas = reg.schemas()
    assert [s["name"] for s in schemas] == ["shell", "add", "read_file"]
    for s in schemas:
        assert s["type"] == "function" and s["strict"] is False
        assert s["parameters"]["type"] == "object"
        assert isinstance(s["description"], str) and s["description"]
    add = schemas[1]
    assert add["description"] == "Add two integers."
    assert add["parameters"] == {
        "type": "object", "additionalProperties": False, "required": ["a"],
        "properties": {"a": {"type": "integer", "description": "the first number"},
                       "b": {"type": "integer", "default": 2,
                             "description": "the second number, two by default"}}}
    json.dumps(schemas)  # sent to the model as JSON


def test_function_schema_from_literal_optional_list_and_defaults(ctx):
    reg = build_registry(["toolfns:greet", "toolfns:scale"], ctx)
    greet, scale = (s["parameters"] for s in reg.schemas())
    assert greet["required"] == ["name"]
    assert greet["properties"]["style"] == {"type": "string", "enum": ["plain", "loud"],
                                            "default": "plain"}
    assert greet["properties"]["tags"]["type"] == ["array", "null"]
    assert greet["properties"]["tags"]["items"] == {"type": "string"}
    assert scale["properties"]["values"] == {"type": "array", "items": {"type": "number"}}
    assert scale["properties"]["inplace"] == {"type": "boolean", "default": False}
    assert scale["properties"]["offset"] == {"type": ["number", "null"], "default": None}
    assert reg.schemas()[1]["description"] == "Python function toolfns:scale"


# --- bad input becomes an error result ------------------------------------------------------

@pytest.mark.parametrize("name, args, words", [
    ("nope", "{}", "unknown tool 'nope'; available tools: add, greet"),
    ("add", "{a: 1}", "not valid JSON"),
    ("add", '{"a": NaN}', "not valid JSON"),
    ("add", "[1, 2]", "must be a JSON object, got list"),
    ("add", "{}", "missing required argument 'a'"),
    ("add", '{"a": 1, "c": 3}', "unknown argument 'c' (accepted: 'a', 'b')"),
    ("add", '{"a": "1"}', "argument 'a' must be integer, got string"),
    ("add", '{"a": true}', "argument 'a' must be integer, got boolean"),
    ("add", '{"a": 1.5}', "argument 'a' must be integer, got number"),
    ("greet", '{"name": "x", "style": "shout"}', "'style' must be one of 'plain', 'loud'"),
    ("greet", '{"name": "x", "tags": ["a", 2]}', "argument 'tags[1]' must be string"),
])
async def test_bad_calls_become_error_results_the_model_can_act_on(ctx, name, args, words):
    reg = build_registry(["toolfns:add", "toolfns:greet"], ctx)
    res = await call(reg, name, args)
    assert not res.ok
    assert words in res.error
    assert res.output == ""


async def test_empty_arguments_mean_no_arguments(ctx):
    reg = build_registry(["toolfns:raw_bytes", "list_files"], ctx)
    res = await call(reg, "list_files", "")
    assert res.ok


async def test_a_tool_that_raises_is_an_error_result(ctx):
    reg = build_registry(["toolfns:boom"], ctx)
    res = await call(reg, "boom", '{"reason": "tuesdays"}')
    assert not res.ok
    assert res.error == "tool 'boom' raised ValueError: cannot handle tuesdays"
    assert res.elapsed_s >= 0


async def test_tool_error_message_is_shown_as_is_with_its_output(ctx):
    reg = build_registry([], ctx)

    async def picky(x: str) -> str:
        raise ToolError(f"x={x} is not allowed", output="details")

    reg.register("picky", "", {"type": "object", "properties": {"x": {"type": "string"}}}, picky)
    res = await call(reg, "picky", '{"x": "1"}')
    assert (res.ok, res.error, res.output) == (False, "x=1 is not allowed", "details")


async def test_function_tools_sync_in_a_thread_and_async_awaited(ctx):
    reg = build_registry(["toolfns:add", "toolfns:greet", "toolfns:scale"], ctx)
    res = await call(reg, "add", '{"a": 40}')
    assert res.ok and res.output == "42"
    res = await call(reg, "greet", '{"name": "ada", "style": "loud", "tags": ["x"]}')
    assert res.ok and json.loads(res.output) == {"text": "HELLO ADA", "tags": ["x"]}
    res = await call(reg, "scale", '{"values": [1, 2.5], "factor": 2}')
    assert res.ok and json.loads(res.output) == [2, 5.0]


async def test_async_function_tool_times_out_at_the_configured_limit(tmp_path, autojump_clock):
    reg = build_registry(["toolfns:slow_async"],
                         ToolContext(workspace=tmp_path, function_timeout_s=5))
    t0 = trio.current_time()
    with trio.fail_after(60):
        res = await reg.call("slow_async", '{"seconds": 1000}')
    assert trio.current_time() - t0 == pytest.approx(5)
    assert not res.ok and "did not finish within 5s" in res.error


async def test_a_tools_own_too_slow_error_is_not_mistaken_for_our_timeout(ctx):
    reg = build_registry(["toolfns:own_deadline"], ctx)
    res = await call(reg, "own_deadline", "{}")
    assert not res.ok and res.error == "tool 'own_deadline' raised TooSlowError"


async def test_sync_function_tool_timeout_abandons_its_thread(tmp_path):
    reg = build_registry(["toolfns:slow_sync"],
                         ToolContext(workspace=tmp_path, function_timeout_s=0.1))
    t0 = time.monotonic()
    with trio.fail_after(5):
        res = await reg.call("slow_sync", '{"seconds": 0.5}')
    assert time.monotonic() - t0 < 0.4
    assert not res.ok and "abandoned" in res.error
    await trio.sleep(0.6)
    assert "slow_sync done" in toolfns.CALLS  # the thread ran on: Python cannot kill it


async def test_cancel_propagates_out_of_a_function_tool(ctx):
    reg = build_registry(["toolfns:slow_async"], ctx)
    with trio.fail_after(5):
        with trio.move_on_after(0.05) as scope:
            await reg.call("slow_async", '{"seconds": 30}')
    assert scope.cancelled_caught


async def test_huge_and_binary_returns_are_capped_and_marked(tmp_path):
    reg = build_registry(["toolfns:huge", "toolfns:raw_bytes"],
                         ToolContext(workspace=tmp_path, max_output_bytes=1000))
    res = await call(reg, "huge", '{"n": 1000000}')
    assert res.ok
    assert res.truncated_bytes > 990_000
    assert len(res.output) < 3000 and "bytes cut from the middle" in res.output
    res = await call(reg, "raw_bytes", "{}")
    assert res.ok and res.output.startswith("[binary output") and "\\0\ufffdabc" in res.output


async def test_registered_agent_layer_tools_and_extra_tools(tmp_path):
    from agents.tools import Tool

    async def ping(text: str) -> str:
        return f"pong {text}"

    extra = Tool(name="echo", description="echo", fn=ping,
                 parameters={"type": "object", "properties": {"text": {"type": "string"}},
                             "required": ["text"]})
    reg = build_registry(["shell", "send_message", "ask"],
                         ToolContext(workspace=tmp_path, extra_tools=(extra,)))
    assert reg.names() == ["shell", "echo"]  # bus tools are left to the agents layer
    reg.register("send_message", "send", {"type": "object", "properties": {
        "text": {"type": "string"}}, "required": ["text"]}, ping)
    res = await call(reg, "send_message", '{"text": "hi"}')
    assert res.ok and res.output == "pong hi"
    with pytest.raises(ToolSpecError, match="registered twice"):
        reg.register("echo", "", {"type": "object"}, ping)
    with pytest.raises(ToolSpecError, match="JSON object schema"):
        reg.register("x", "", {"type": "string"}, ping)
    with pytest.raises(ToolSpecError, match="letters, digits"):
        reg.register("has space", "", {"type": "object"}, ping)


# --- tool specs -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec, words", [
    ("shel", "unknown tool 'shel': built-in tools are shell"),
    ("toolfns:", "is not 'package.module:function'"),
    ("tool fns:add", "is not 'package.module:function'"),
    ("no_such_module_xyz:f", "module 'no_such_module_xyz' not found"),
    ("toolfns:missing", "'toolfns' has no attribute 'missing'"),
    ("toolfns:NOT_CALLABLE", "is not a function (it is a int)"),
    ("toolfns:kwargs_tool", "*kw parameters are not supported"),
    ("toolfns:bad_hint", "parameter 'x': type <class 'complex'> is not supported"),
    ("", "must be a non-empty string"),
])
def test_bad_specs_are_named_by_validate_and_refused_by_build(ctx, spec, words):
    msg = validate_tool_spec(spec)
    assert msg is not None and words in msg
    with pytest.raises(ToolSpecError) as err:
        build_registry([spec], ctx)
    assert words in str(err.value)


def test_good_specs_validate(ctx):
    for spec in ["shell", "read_file", "write_file", "list_files", "apply_patch", "ask",
                 "send_message", "publish", "read_topic", "spawn", "wait", "toolfns:add",
                 {"name": "shell"}]:
        assert validate_tool_spec(spec) is None, spec


def test_builtin_names_validate_without_importing_tool_modules():
    names = ("agents.tools.shell", "agents.tools.files", "agents.tools.pyfunc")
    saved = {m: sys.modules.pop(m) for m in names if m in sys.modules}
    try:
        assert validate_tool_spec("shell") is None
        assert validate_tool_spec("apply_patch") is None
        assert validate_tool_spec("ask") is None
        assert not [m for m in names if m in sys.modules]
    finally:
        sys.modules.update(saved)


# --- the schema validator -------------------------------------------------------------------

def test_validator_subset():
    schema = {"type": "object", "required": ["xs"], "additionalProperties": False,
              "properties": {"xs": {"type": "array", "items": {"type": "object", "properties": {
                  "n": {"type": ["integer", "null"]}, "k": {"enum": ["a", "b"]}}}},
                  "f": {"type": "number"}, "flag": {"type": "boolean"}}}
    assert validate({"xs": [{"n": 1, "k": "a"}, {"n": None}], "f": 1}, schema) is None
    assert validate({"xs": [{"n": "1"}]}, schema) == \
        "argument 'xs[0].n' must be integer or null, got string"
    assert validate({"xs": [{"k": "c"}]}, schema) == \
        "argument 'xs[0].k' must be one of 'a', 'b', got 'c'"
    assert validate({"xs": [], "f": True}, schema) == "argument 'f' must be number, got boolean"
    assert validate({"xs": [], "flag": 0}, schema) == \
        "argument 'flag' must be boolean, got integer"
    assert validate({"xs": {}}, schema) == "argument 'xs' must be array, got object"
    assert validate({"xs": [], "a": 1, "b": 2}, schema).startswith("unknown arguments 'a', 'b'")


def test_two_function_tools_with_the_same_name_collide(ctx):
    with pytest.raises(ToolSpecError, match="'add' is registered twice"):
        build_registry(["toolfns:add", "toolfns:add"], ctx)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["add", "greet", "scale", "read_file", "shell", "nope", ""]),
       st.one_of(st.text(max_size=40), json_values.map(json.dumps),
                 st.dictionaries(st.sampled_from(["a", "b", "name", "style", "tags", "values",
                                                  "factor", "path", "offset", "x"]),
                                 json_values, max_size=4).map(json.dumps)))
def test_hostile_arguments_never_raise(tmp_path_factory, name, arguments):
    ws = tmp_path_factory.mktemp("ws")
    reg = build_registry(["toolfns:add", "toolfns:greet", "toolfns:scale", "read_file"],
                         ToolContext(workspace=ws))

    async def go():
        with trio.fail_after(5):
            return await reg.call(name, arguments)

    res = trio.run(go)
    assert isinstance(res.output, str)
    assert res.ok == (res.error is None)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=300) | st.text(max_size=100).map(str.encode), max_size=20),
       st.integers(2, 600))
def test_capture_keeps_exact_head_and_tail_and_counts_the_cut(chunks, limit):
    from agents.tools.shell import _Capture

    cap = _Capture(limit)
    for c in chunks:
        cap.feed(c)
    data = b"".join(chunks)
    head, tail = limit // 2, limit - limit // 2
    assert cap.total == len(data)
    if len(data) <= limit:
        assert bytes(cap.head) + bytes(cap.tail) == data
    else:
        assert bytes(cap.head) == data[:head] and bytes(cap.tail) == data[-tail:]
    text, binary, cut = cap.render()
    assert cut >= max(0, len(data) - limit)
    assert binary == (b"\x00" in data or _not_utf8(data)) or cut  # seams may hide a bad byte
    assert len(text.encode()) <= limit * 3 + 300  # replacement chars take 3 bytes each


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=3000), st.integers(10, 2000))
def test_cap_text_bounds_the_size_and_keeps_both_ends(text, limit):
    from agents.tools.registry import cap_text

    out, cut = cap_text(text, limit)
    if len(text.encode("utf-8", "surrogatepass")) <= limit:
        assert (out, cut) == (text, 0)
    else:
        assert cut > 0
        assert len(out.encode("utf-8", "surrogatepass")) <= limit + 300


async def test_example_function_tools_for_graphs(ctx):
    specs = ["agents.tools.examples:word_count", "agents.tools.examples:convert_case"]
    assert [validate_tool_spec(s) for s in specs] == [None, None]
    reg = build_registry(specs, ctx)
    res = await call(reg, "word_count", json.dumps({"text": "a b a\nc", "top": 1}))
    assert res.ok and json.loads(res.output) == {"words": 4, "lines": 2,
                                                 "most_common": [["a", 2]]}
    res = await call(reg, "convert_case", '{"text": "hi there", "to": "title"}')
    assert res.ok and res.output == "Hi There"
    assert reg.schemas()[1]["parameters"]["properties"]["to"]["enum"] == ["upper", "lower",
                                                                         "title"]


def test_a_tool_module_in_the_current_directory_loads_however_the_process_started(
        tmp_path, monkeypatch):
    # `python -m orchestrator` (local workers) has the current directory on sys.path; the
    # `orchestrator` console script (validate, a worker started by hand) has not. validate
    # said "not found" for a module the workers then loaded; now both load it.
    (tmp_path / "sb_cwd_tools").mkdir()
    (tmp_path / "sb_cwd_tools" / "t.py").write_text(
        'def shout(text: str) -> str:\n    """Upper-case."""\n    return text.upper()\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    fn, _, schema = pyfunc.load_function_tool("sb_cwd_tools.t:shout")
    assert fn("hi") == "HI" and schema["required"] == ["text"]
