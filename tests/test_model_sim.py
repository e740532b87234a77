"""Sim model with no I/O: tokenizer, rendering, the prefix cache, scripts, outputs and timing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modellink import tokenizer as tk_mod
from modellink.protocol import ErrorCode, ProtocolError
from modellink.sim import (
    DEFAULT_TEXT,
    PrefixCache,
    PrefixTokens,
    ScriptStep,
    SimConfig,
    SimModel,
    parse_script,
    step_for_turn,
)
from modellink.tokenizer import Tokenizer, get_tokenizer


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": text}


def call(call_id: str, name: str = "f", args: str = "{}") -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": args}


def result(call_id: str, out: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": out}


def assistant(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": text}]}


# ------------------------------------------------------------------ tokenizer


@settings(max_examples=200)
@given(st.text(max_size=300))
def test_tokenizer_round_trips_any_text(text: str):
    tk = get_tokenizer()
    assert tk.decode(tk.encode(text)) == text


def test_tokenizer_training_is_deterministic_and_compresses():
    a = Tokenizer(tk_mod._train(tk_mod._CORPUS, tk_mod.N_MERGES))
    b = get_tokenizer()
    text = "def main(argv: list[str]) -> int:\n    return 0  # the agent calls the tool"
    assert a.encode(text) == b.encode(text)
    assert len(b.encode(text)) < len(text.encode()) / 2  # merges do real work
    assert b.vocab_size > 256 + 200


def test_piece_cache_is_bounded(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tk_mod, "_PIECE_CACHE_MAX", 10)
    tk = Tokenizer(tk_mod._train(tk_mod._CORPUS, 50))
    tk.encode(" ".join(f"w{i}x" for i in range(100)))
    assert len(tk._cache) <= 10


def _reference_encode(tk: Tokenizer, text: str) -> list[int]:
    """What encode means: _PIECE_RE's pieces, each one's UTF-8 bytes through BPE, no caches."""
    return [t for piece in tk_mod._PIECE_RE.findall(text) for t in tk._bpe(piece.encode())]


# Pieces that stress where _PIECE_RE's branches meet: whitespace runs (a space joins what
# follows it, the last character of a run before a non-space is left for the next piece),
# contractions, letters / digits / other that re's classes see differently from str methods
# ("²" and "Ⅻ" are \w but not \d, "٣" is \d), characters above U+FFFF, joiners and controls.
_FRAGMENTS = (
    " ", "  ", "\n", "\n\n", "\t", "\r\n", " \n ", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\xa0",
    "\u2028", "\u3000", "a", "Zy", "é", "ß", "Жж", "中文", "ǅ", "ﬁ", "x1", "0", "7", "123", "4567",
    "٣", "१२", "²", "½", "Ⅻ", "①", "_", "__", "'", "'s", "'t", "'ll", "'ve", "'re", "'d", "'m",
    "'S", "''", "'x", ".", ",", "(", "):", "-", "→", "—", "\"", "\\", "#", "{", "}", "\x00", "\x7f",
    "\u200d", "\ufeff", "\U0001f600", "\U0001f44d\U0001f3fd", "\U0001d400", "\U0001d7ce", "\U00020000",
)
_FRAGMENT_TEXT = st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map("".join)


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=200), st.text(st.characters(max_codepoint=0xFFFF), max_size=200),
                 _FRAGMENT_TEXT))
def test_encode_gives_the_reference_tokens_for_any_text(text: str):
    tk = get_tokenizer()
    assert tk.split(text) == tk_mod._PIECE_RE.findall(text)
    assert _outcome(tk.encode, text) == _outcome(lambda t: _reference_encode(tk, t), text)


def _outcome(encode: Any, text: str) -> Any:
    """The tokens, or the error: a lone surrogate has no UTF-8 bytes, before as now."""
    try:
        return encode(text)
    except UnicodeEncodeError as exc:
        return type(exc), exc.start


def test_every_bmp_character_splits_as_the_reference_does_beside_each_class():
    # Beside a letter, a digit, an underscore, a space and itself, each character joins a run
    # (or not) exactly as its class in _PIECE_RE says; lone surrogates included (split only).
    text = "".join(f"{c}{c}a{c}1{c}_{c} {c}'{c}s\n" for c in map(chr, range(0x10000)))
    assert get_tokenizer().split(text) == tk_mod._PIECE_RE.findall(text)


def test_encode_gives_the_reference_tokens_for_real_text():
    tk = get_tokenizer()
    root = Path(__file__).resolve().parent.parent
    seq = "".join(f"{i}\n" for i in range(1000, 1201))
    numbers = " ".join(f"{x!r} {-x:.3e} {x:,.2f}" for x in (0.5, 3.25, 1e-10, 12345678.9, -7.0))
    blob = {"items": [{"id": i, "name": f"item_{i}", "value": i * 3.25, "ok": i % 3 != 0,
                       "tags": ["alpha", "béta", "γάμμα", "数据"][: i % 5]} for i in range(30)]}
    samples = [tk_mod._CORPUS, seq, numbers, DEFAULT_TEXT,
               json.dumps(blob), json.dumps(blob, indent=2, ensure_ascii=False),
               *(f.read_text() for f in sorted((root / "modellink").glob("*.py")))]
    for text in samples:
        assert tk.encode(text) == _reference_encode(tk, text)


def test_encode_does_not_depend_on_what_the_piece_cache_holds(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tk_mod, "_PIECE_CACHE_MAX", 3)  # cleared again and again mid-text
    tk = Tokenizer(tk_mod._train(tk_mod._CORPUS, tk_mod.N_MERGES))
    text = "def f(x):\n    return x + 1  # the agent's tool\n" * 3
    assert tk.encode(text) == _reference_encode(tk, text) == tk.encode(text)
    assert len(tk._cache) <= 3



# ------------------------------------------------------------------ rendering


def _ctx(model: SimModel, items: list[dict[str, Any]], instructions: str | None = "be brief",
         tools: list[dict[str, Any]] | None = None):
    ctx = model.new_context()
    rendered = ctx.set_prefix(instructions, tools or [{"type": "function", "name": "f"}])
    rendered += ctx.append_items(items)
    return ctx, rendered


def test_incremental_rendering_equals_full_rendering():
    model = SimModel(SimConfig(block_tokens=4))
    items = [user("hello there"), call("c1", "read", '{"path": "a.py"}'),
             result("c1", "print('hi')\n" * 5), assistant("done"), user("again")]
    full, full_rendered = _ctx(model, items)
    inc, rendered = _ctx(model, items[:2])
    for item in items[2:]:
        rendered += inc.append_items([item])
    assert inc.tokens == full.tokens and inc.hashes == full.hashes
    assert rendered == full_rendered == len(full.tokens)
    assert len(full.hashes) == len(full.tokens) // 4


def test_a_prefix_seen_before_renders_the_same_tokens_and_counts_as_rendered():
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    warm = SimModel(SimConfig(block_tokens=4))
    first, n_first = _ctx(warm, [user("a")], instructions="be brief", tools=tools)
    again, n_again = _ctx(warm, [user("a")], instructions="be brief", tools=tools)
    cold, n_cold = _ctx(SimModel(SimConfig(block_tokens=4)), [user("a")],
                        instructions="be brief", tools=tools)
    assert again.tokens == first.tokens == cold.tokens and again.hashes == cold.hashes
    assert n_again == n_first == n_cold == len(cold.tokens)
    other, _ = _ctx(warm, [user("a")], instructions="be verbose", tools=tools)
    assert other.tokens != first.tokens


def test_the_prefix_token_cache_is_bounded():
    cache = PrefixTokens(max_entries=3)
    tk = get_tokenizer()
    firsts = [cache.get((f"rule {i}", ""), tk) for i in range(10)]
    assert len(cache._d) <= 3
    assert cache.get(("rule 0", ""), tk) == firsts[0]


def test_changing_instructions_renders_everything_again():
    model = SimModel(SimConfig())
    ctx, _ = _ctx(model, [user("hello"), assistant("hi")])
    before = list(ctx.tokens)
    n = ctx.set_prefix("be verbose", [{"type": "function", "name": "f"}])
    assert n == len(ctx.tokens) and ctx.tokens != before
    assert ctx.set_prefix("be verbose", [{"type": "function", "name": "f"}]) == 0
    assert ctx.model_turns == 1


def test_an_unchanged_prefix_is_not_serialized_again_and_a_changed_tool_is_seen(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import modellink.sim as sim_mod

    model = SimModel(SimConfig())
    ctx, _ = _ctx(model, [user("hello")])
    tools = [{"type": "function", "name": "f", "parameters": {"type": "object"}}]
    assert ctx.set_prefix("rules", tools) > 0
    equal = json.loads(json.dumps(tools))  # what the next request decodes: new, equal lists
    changed = [{"type": "function", "name": "f",
                "parameters": {"type": "object", "required": ["x"]}}]
    serialized: list[Any] = []

    def counting_dumps(obj: Any, **kw: Any) -> str:
        serialized.append(obj)
        return json.dumps(obj, **kw)

    monkeypatch.setattr(sim_mod, "json", types.SimpleNamespace(dumps=counting_dumps))
    assert ctx.set_prefix("rules", equal) == 0
    assert serialized == []  # recognised without serializing the tools again
    assert ctx.set_prefix("rules", changed) > 0  # a changed schema is seen and rendered
    assert serialized == [changed]
    assert ctx.copy().set_prefix("rules", json.loads(json.dumps(changed))) == 0


def test_turns_count_model_responses_and_parallel_calls_are_one_turn():
    model = SimModel(SimConfig())
    ctx, _ = _ctx(model, [user("go"), call("a"), call("b"), result("a", "1"), result("b", "2"),
                          call("c"), result("c", "3"), assistant("done"), user("more")])
    assert ctx.model_turns == 3


def test_copy_is_independent():
    model = SimModel(SimConfig())
    ctx, _ = _ctx(model, [user("x")])
    fork = ctx.copy()
    fork.append_items([user("y")])
    assert len(fork.tokens) > len(ctx.tokens) and len(ctx.items) == 1


def test_truncate_returns_to_a_mark_unless_the_prefix_was_rendered_again():
    model = SimModel(SimConfig(block_tokens=4))
    ctx, _ = _ctx(model, [user("hello there")])
    before = (list(ctx.tokens), list(ctx.hashes), ctx.model_turns)
    mark = ctx.mark()
    ctx.append_items([user("go"), assistant("partial answer that was cancelled")])
    assert ctx.truncate(mark)
    assert (ctx.tokens, ctx.hashes, ctx.model_turns) == before and len(ctx.items) == 1
    ctx.set_prefix("other instructions", [])
    assert not ctx.truncate(mark)


# ------------------------------------------------------------------ prefix cache


def test_prefix_cache_matches_leading_blocks_and_evicts_least_recent():
    cache = PrefixCache(3)
    cache.insert([1, 2, 3])
    assert cache.match([1, 2, 9]) == 2
    assert cache.match([9, 1]) == 0  # chained: a miss ends the match
    cache.insert([4])  # evicts 3, the least recently used
    assert cache.match([1, 2, 3]) == 2 and len(cache) == 3


def test_second_request_for_a_context_hits_the_prefix_cache_up_to_the_last_full_block():
    cfg = SimConfig(block_tokens=8, ttft_s=0.1, prefill_s_per_token=0.01)
    model = SimModel(cfg)
    items = [user("the agent reads the file and runs the tests " * 4)]
    ctx, _ = _ctx(model, items)
    g1 = model.plan(ctx, {})
    assert g1.cached_tokens == 0
    assert g1.prefill_s == pytest.approx(0.1 + 0.01 * len(ctx.tokens))
    again, _ = _ctx(model, items)  # a second, full rendering (HTTP) of the same context
    g2 = model.plan(again, {})
    assert g2.cached_tokens == len(ctx.tokens) // 8 * 8
    assert g2.prefill_s == pytest.approx(0.1 + 0.01 * (len(ctx.tokens) - g2.cached_tokens))


def test_finished_output_is_cached_for_the_next_turn():
    model = SimModel(SimConfig(block_tokens=4))
    ctx, _ = _ctx(model, [user("hello")])
    model.plan(ctx, {})
    model.finish(ctx, [assistant("an answer of several tokens, long enough")])
    n = len(ctx.tokens)
    ctx.append_items([user("next")])
    assert model.plan(ctx, {}).cached_tokens == n // 4 * 4


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["turn", "truncate", "fork"]),
                          st.integers(1, 40)), min_size=1, max_size=25),
       st.integers(4, 40))
def test_continuations_skip_matching_blocks_only_when_a_full_match_would_give_the_same(
        ops: list[tuple[int, str, int]], cache_blocks: int):
    """The shortcut (start after the blocks a context's last finish left most recently used)
    gives the same cached tokens and the same LRU order as a full match every time, however
    sessions interleave, truncate, fork and evict one another."""
    fast, ref = (SimModel(SimConfig(block_tokens=4, prefix_cache_blocks=cache_blocks))
                 for _ in range(2))
    ctxs: dict[int, tuple[Any, Any]] = {}
    marks: dict[int, tuple[Any, Any]] = {}
    for k, (sess, op, words) in enumerate(ops):
        if sess not in ctxs:
            ctxs[sess] = (_ctx(fast, [user(f"session {sess}")])[0],
                          _ctx(ref, [user(f"session {sess}")])[0])
        pair = ctxs[sess]
        if op == "truncate":  # a cancelled continuation: back to before its request
            if sess in marks:
                for c, m in zip(pair, marks.pop(sess), strict=True):
                    assert c.truncate(m)
            continue
        if op == "fork":
            ctxs[sess] = pair = (pair[0].copy(), pair[1].copy())
            marks.pop(sess, None)
        marks[sess] = (pair[0].mark(), pair[1].mark())
        text = " ".join(f"w{k}x{i}" for i in range(words))
        gens = []
        for model, c in zip((fast, ref), pair, strict=True):
            if model is ref:
                c.lru_tail = None  # the reference always matches every block
            c.append_items([user(text)])
            gens.append(model.plan(c, {}).cached_tokens)
            model.finish(c, [assistant(f"answer {k} " + text[: words])])
        assert gens[0] == gens[1]
        assert list(fast.prefix_cache._lru) == list(ref.prefix_cache._lru)


def test_a_continuation_after_nothing_else_touched_the_cache_matches_only_its_new_blocks():
    model = SimModel(SimConfig(block_tokens=4))
    ctx, _ = _ctx(model, [user("hello there, a first message of a few tokens")])
    model.plan(ctx, {})
    model.finish(ctx, [assistant("an answer of several tokens, long enough")])
    assert ctx.lru_tail == (model.prefix_cache.version, len(ctx.hashes))
    n = len(ctx.hashes)
    seen: list[int] = []
    real_match = model.prefix_cache.match

    def spy(hashes: list[int], start: int = 0) -> int:
        seen.append(start)
        return real_match(hashes, start)

    model.prefix_cache.match = spy  # type: ignore[method-assign]
    ctx.append_items([user("next")])
    model.plan(ctx, {})
    other, _ = _ctx(model, [user("another session")])
    model.plan(other, {})
    model.finish(ctx, [assistant("late")])  # another request planned meanwhile
    assert ctx.lru_tail is None
    assert seen == [n, 0]


# ------------------------------------------------------------------ scripts and output


SCRIPT = json.dumps([
    {"call": {"name": "read", "arguments": {"path": "a.py"}}},
    {"calls": [{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{\"x\":1}"}]},
    {"text": "all done"},
    {"call": {"name": "late", "arguments": {}}},
])


def test_script_turns_follow_the_model_responses_in_the_context():
    model = SimModel(SimConfig.zero())
    meta = {"sim_script": SCRIPT}
    ctx, _ = _ctx(model, [user("go")])
    out = model.plan(ctx, meta).outputs
    assert [(o.kind, o.name, o.full) for o in out] == [("call", "read", '{"path":"a.py"}')]
    ctx.append_items([call("c1", "read"), result("c1", "x")])
    out = model.plan(ctx, meta).outputs
    assert [(o.name, o.full) for o in out] == [("a", "{}"), ("b", '{"x":1}')]
    ctx.append_items([call("c2", "a"), call("c3", "b"), result("c2", ""), result("c3", "")])
    assert model.plan(ctx, meta).outputs[0].full == "all done"


def test_a_continuation_without_sim_metadata_keeps_its_conversations_script_and_attempt():
    model = SimModel(SimConfig.zero())
    fails_first = json.dumps([{"fail": "flaky", "attempts": [1]},
                              {"call": {"name": "read", "arguments": {}}}, {"text": "done"}])
    ctx, _ = _ctx(model, [user("go")])
    first = model.plan(ctx, {"sim_script": fails_first, "sim_attempt": "2", "other": "x"})
    assert [o.name for o in first.outputs] == ["read"]  # attempt 2: the fail step is skipped
    ctx.append_items([call("c1", "read"), result("c1", "x")])
    assert model.plan(ctx, {}).outputs[0].full == "done"  # same script, same attempt
    assert model.plan(ctx, {"other": "y"}).outputs[0].full == "done"  # other keys: still kept
    # Its own sim keys replace the conversation's, and are carried on from then.
    assert model.plan(ctx, {"sim_script": SCRIPT}).outputs[0].name == "a"
    assert model.plan(ctx, {}).outputs[0].name == "a"
    assert ctx.copy().sim_metadata == {"sim_script": SCRIPT}
    fresh, _ = _ctx(model, [user("go")])
    assert model.plan(fresh, {}).outputs[0].full == DEFAULT_TEXT  # a new conversation: none


def test_a_script_is_parsed_once_per_text(monkeypatch: pytest.MonkeyPatch):
    import modellink.sim as sim_mod

    parsed: list[str] = []
    real = sim_mod.parse_script
    monkeypatch.setattr(sim_mod, "parse_script", lambda t: parsed.append(t) or real(t))
    model = SimModel(SimConfig())
    meta = {"sim_script": SCRIPT}
    assert model.script_for(meta) == model.script_for(dict(meta)) == parse_script(SCRIPT)
    assert parsed == [SCRIPT]


def test_past_the_end_of_the_script_the_last_text_step_answers():
    steps = parse_script(SCRIPT)
    assert step_for_turn(steps, 3).calls[0].name == "late"
    assert step_for_turn(steps, 4).text == "all done"
    assert step_for_turn(steps, 99).text == "all done"
    only_calls = parse_script(json.dumps([{"call": {"name": "x"}}]))
    assert step_for_turn(only_calls, 1) == ScriptStep(text=DEFAULT_TEXT)


def test_without_a_script_the_server_default_or_a_short_answer_is_used():
    assert SimModel(SimConfig()).plan(_ctx(SimModel(SimConfig()), [user("x")])[0], {}) \
        .outputs[0].full == DEFAULT_TEXT
    model = SimModel(SimConfig(default_script=json.dumps([{"text": "custom"}])))
    assert model.plan(_ctx(model, [user("x")])[0], {}).outputs[0].full == "custom"


def test_output_tokens_pads_a_text_step_exactly_and_deterministically():
    meta = {"sim_script": json.dumps([{"text": "start", "output_tokens": 500}])}
    a = SimModel(SimConfig(chunk_tokens=8))
    ga = a.plan(_ctx(a, [user("x")])[0], meta)
    assert ga.output_tokens == 500
    assert all(n <= 8 for _, n in ga.outputs[0].chunks[:-1])
    assert ga.outputs[0].full.startswith("start ")
    b = SimModel(SimConfig(chunk_tokens=8))
    assert b.plan(_ctx(b, [user("x")])[0], meta).outputs == ga.outputs  # same seed, same output
    c = SimModel(SimConfig(chunk_tokens=8, seed=1))
    assert c.plan(_ctx(c, [user("x")])[0], meta).outputs[0].full != ga.outputs[0].full


def test_padded_plans_still_differ_by_turn_when_plans_are_reused():
    meta = {"sim_script": json.dumps([{"text": "start", "output_tokens": 40}])}
    model = SimModel(SimConfig(chunk_tokens=8))
    ctx, _ = _ctx(model, [user("x")])
    turn0 = model.plan(ctx, meta).outputs
    assert model.plan(ctx, meta).outputs == turn0  # the same turn again: the same plan
    ctx.append_items([assistant(turn0[0].full), user("y")])
    turn1 = model.plan(ctx, meta).outputs
    fresh = SimModel(SimConfig(chunk_tokens=8))
    assert turn1 == fresh._outputs(ScriptStep(text="start", output_tokens=40), 1)
    assert turn1 != turn0


@given(st.text(max_size=200), st.integers(1, 20))
def test_chunks_join_to_the_text_and_count_its_tokens(text: str, k: int):
    model = SimModel(SimConfig(chunk_tokens=k))
    chunks = model._chunks(text)
    assert "".join(c for c, _ in chunks) == text
    assert sum(n for _, n in chunks) == sum(len(model.tokenizer.encode(c)) for c, _ in chunks)


def test_generate_false_plans_no_output_and_no_model_time():
    model = SimModel(SimConfig())
    g = model.plan(_ctx(model, [user("warm up")])[0], {}, generate=False)
    assert g.outputs == () and g.prefill_s == 0.0 and g.input_tokens > 0


@pytest.mark.parametrize(("script", "fragment"), [
    ("not json", "not valid JSON"),
    ("[]", "non-empty JSON list"),
    ('{"text": "x"}', "non-empty JSON list"),
    ('["x"]', "step 0 must be an object"),
    ('[{"text": 5}]', "step 0.text"),
    ('[{"text": "x", "output_tokens": -1}]', "output_tokens"),
    ('[{"call": {"arguments": {}}}]', "step 0.call"),
    ('[{"text": "a"}, {"calls": []}]', "step 1.calls"),
    ('[{"say": "x"}]', "needs one of"),
])
def test_bad_scripts_say_what_to_fix(script: str, fragment: str):
    model = SimModel(SimConfig())
    with pytest.raises(ProtocolError) as info:
        model.plan(_ctx(model, [user("x")])[0], {"sim_script": script})
    assert info.value.code == ErrorCode.INVALID_VALUE
    assert info.value.param == "metadata.sim_script" and fragment in info.value.message


def test_unknown_models_are_refused_unless_configured():
    with pytest.raises(ProtocolError) as info:
        SimModel(SimConfig()).check_model("gpt-5")
    assert (info.value.code, info.value.param) == (ErrorCode.MODEL_NOT_FOUND, "model")
    SimModel(SimConfig(models=("sim", "gpt-5"))).check_model("gpt-5")
    SimModel(SimConfig(accept_any_model=True)).check_model("anything")


def test_zero_config_has_no_model_time():
    z = SimConfig.zero()
    assert (z.ttft_s, z.prefill_s_per_token, z.decode_s_per_token) == (0.0, 0.0, 0.0)
    d = SimConfig()
    assert d.decode_s_per_token == 0.001  # ~1,000 output tokens/s
