"""Graph files: parsing, every validation problem with its line, rendering, the validate command."""

from __future__ import annotations

import argparse
import pathlib
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents import protocol as P
from orchestrator import cmd_validate
from orchestrator.durations import DurationError, parse_duration
from orchestrator.graph import GraphError, GraphSpec, Problem, RenderError, render_prompt

DATA = pathlib.Path(__file__).parent / "data" / "graphs"

AGENTS = """\
[agents.planner]
instructions = "plan"
script = [{text = '{"files": ["a.py", "b.py"], "summary": "s"}'}]

[agents.coder]
tools = ["shell"]
"""


def problems(text: str) -> list[Problem]:
    with pytest.raises(GraphError) as ei:
        GraphSpec.from_text(textwrap.dedent(text), "g.toml")
    return ei.value.problems


def only(text: str) -> Problem:
    ps = problems(text)
    assert len(ps) == 1, [p.render() for p in ps]
    return ps[0]


def line_of(text: str, needle: str) -> int:
    for i, line in enumerate(textwrap.dedent(text).splitlines(), start=1):
        if needle in line:
            return i
    raise AssertionError(needle)


def test_good_example_loads_with_defaults_and_overrides():
    g = GraphSpec.from_toml(DATA / "good_fanout.toml")
    assert [t.id for t in g.tasks] == ["plan", "code", "review"]
    assert g.run.max_concurrent == 4 and g.run.failure_policy == "stop"
    code = g.task("code")
    assert code.timeout_s == 90.0 and code.retries == 2
    assert code.fan_out_source == ("plan", "files")
    assert g.task("plan").retries == 1 and g.task("plan").timeout_s == 30.0  # run defaults
    assert g.agents["coder"].tools == ("write_file", "shell")
    assert g.agents["planner"].model.base_url is None  # embedded sim
    assert g.source_text.startswith("# A planner")


def test_every_example_graph_in_the_repo_validates():
    root = pathlib.Path(__file__).parent.parent / "examples"
    for path in sorted(root.glob("*.toml")) + sorted(DATA.glob("good_*.toml")):
        GraphSpec.from_toml(path)


def test_provider_openai_is_one_setting_to_a_real_model():
    g = GraphSpec.from_text('[model]\nprovider = "openai"\n' + AGENTS + '[[tasks]]\nid = "a"\n'
                            'agent = "coder"\n', "g.toml")
    m = g.agents["coder"].model
    assert m.base_url == "https://api.openai.com/v1" and m.api_key_env == "OPENAI_API_KEY"
    assert m.encoding == "json" and m.model != "sim"


def test_agent_model_override_keeps_the_endpoint():
    g = GraphSpec.from_text('[model]\nurl = "http://localhost:11434/v1"\nmodel = "llama3.2"\n'
                            '[agents.a]\nmodel = "qwen3"\n[agents.b]\n'
                            '[[tasks]]\nid = "t"\nagent = "a"\n', "g.toml")
    assert g.agents["a"].model.base_url == "http://localhost:11434/v1"
    assert g.agents["a"].model.model == "qwen3" and g.agents["b"].model.model == "llama3.2"
    assert g.agents["a"].model.encoding == "json"


def test_bad_file_reports_all_problems_at_once_each_on_its_line():
    text = (DATA / "bad_many.toml").read_text()
    ps = problems(text)
    got = {(p.line, p.message.split(":")[0] if p.message.startswith("[") else p.message[:30])
           for p in ps}
    assert len(ps) >= 10, got
    lines = {p.line for p in ps}
    for needle in ("max_concurent", "failure_policy", 'timeout = "30 seconds"', "tols",
                   '"shel"', '"planer"', '"nothere"', 'timeout = "5x"', "{{ review.text }}"):
        assert line_of(text, needle) in lines, needle
    assert all(p.file == "g.toml" and p.hint for p in ps)


def test_unknown_key_suggests_the_right_one():
    p = only(AGENTS + '[[tasks]]\nid = "a"\nagent = "coder"\nneeds = []\nprompt = "x"\n'
             'timout = "3s"\n')
    assert p.message == "unknown key 'timout' in task 'a'"
    assert "did you mean 'timeout'" in p.hint
    assert p.line == 12


def test_wrong_type_names_the_type_and_an_example():
    text = AGENTS + '[[tasks]]\nid = "a"\nagent = "coder"\nretries = "three"\n'
    p = only(text)
    assert "retries must be an integer, not a string" in p.message
    assert p.line == line_of(text, "retries") and "retries = 3" in p.hint


def test_missing_required_keys():
    text = AGENTS + '[[tasks]]\nprompt = "x"\n'
    ps = problems(text)
    msgs = sorted(p.message for p in ps)
    assert msgs == ["task #1 has no agent", "task #1 has no id"]
    assert {p.line for p in ps} == {line_of(text, "[[tasks]]")}


def test_cycle_is_named_in_order_on_the_line_of_its_needs():
    text = AGENTS + "".join(
        f'[[tasks]]\nid = "{a}"\nagent = "coder"\nneeds = ["{b}"]\n'
        for a, b in (("x", "y"), ("y", "z"), ("z", "x")))
    p = only(text)
    assert p.message == "the tasks form a cycle: x needs y needs z needs x"
    assert p.line == line_of(text, 'needs = ["y"]')


def test_duplicate_id_points_at_both():
    text = AGENTS + '[[tasks]]\nid = "a"\nagent = "coder"\n[[tasks]]\nid = "a"\nagent = "coder"\n'
    p = only(text)
    assert p.message == "duplicate task id 'a' (first defined on line 8)"
    assert p.line == 11


@pytest.mark.parametrize("good,seconds", [("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0),
                                          ("250ms", 0.25), (12, 12.0), ("1.5s", 1.5)])
def test_durations_parse(good, seconds):
    assert parse_duration(good) == seconds


@pytest.mark.parametrize("bad", ["30", "5 minutes", "1d", "", "-3s", -1, True, [1]])
def test_bad_durations_say_what_is_allowed(bad):
    with pytest.raises(DurationError, match="ms, s, m, h"):
        parse_duration(bad)


def test_missing_dependency_and_unknown_agent_suggest_names():
    text = AGENTS + ('[[tasks]]\nid = "plan"\nagent = "planner"\n'
                     '[[tasks]]\nid = "b"\nagent = "codr"\nneeds = ["plam"]\n')
    ps = problems(text)
    by_line = {p.line: p for p in ps}
    assert "did you mean 'coder'" in by_line[line_of(text, '"codr"')].hint
    assert "did you mean 'plan'" in by_line[line_of(text, '"plam"')].hint


def test_reference_to_a_task_not_upstream():
    text = AGENTS + ('[[tasks]]\nid = "plan"\nagent = "planner"\n'
                     '[[tasks]]\nid = "b"\nagent = "coder"\nprompt = "use {{ plan.text }}"\n')
    p = only(text)
    assert "refers to 'plan', which is not upstream" in p.message
    assert p.hint == 'add "plan" to needs' and p.line == line_of(text, "prompt")


def test_transitive_upstream_reference_is_fine():
    GraphSpec.from_text(AGENTS + (
        '[[tasks]]\nid = "plan"\nagent = "planner"\n'
        '[[tasks]]\nid = "b"\nagent = "coder"\nneeds = ["plan"]\n'
        '[[tasks]]\nid = "c"\nagent = "coder"\nneeds = ["b"]\nprompt = "{{ plan.outputs.summary }}"\n'),
        "g.toml")


def test_reference_to_an_output_key_the_sim_script_never_produces():
    text = AGENTS + ('[[tasks]]\nid = "plan"\nagent = "planner"\n'
                     '[[tasks]]\nid = "b"\nagent = "coder"\nneeds = ["plan"]\n'
                     'prompt = "{{ plan.outputs.filez }}"\n')
    p = only(text)
    assert "answers with keys ['files', 'summary'], not 'filez'" in p.message
    assert "did you mean 'files'" in p.hint


def test_item_outside_fan_out_and_fan_out_over_non_upstream_and_non_list():
    text = AGENTS + ('[[tasks]]\nid = "plan"\nagent = "planner"\n'
                     '[[tasks]]\nid = "b"\nagent = "coder"\nprompt = "{{ item }}"\n'
                     '[[tasks]]\nid = "c"\nagent = "coder"\nfan_out = "plan.outputs.files"\n'
                     '[[tasks]]\nid = "d"\nagent = "coder"\nneeds = ["plan"]\n'
                     'fan_out = "plan.outputs.summary"\n'
                     '[[tasks]]\nid = "e"\nagent = "coder"\nneeds = ["plan"]\nfan_out = "plan"\n')
    ps = {p.line: p.message for p in problems(text)}
    assert "only set in a fan-out task" in ps[line_of(text, "{{ item }}")]
    assert "which is not upstream" in ps[line_of(text, 'fan_out = "plan.outputs.files"')]
    assert "not a list" in ps[line_of(text, 'fan_out = "plan.outputs.summary"')]
    assert "not an output reference" in ps[line_of(text, 'fan_out = "plan"')]


def test_join_of_fan_out_cannot_name_an_output_key():
    text = AGENTS + ('[[tasks]]\nid = "plan"\nagent = "planner"\n'
                     '[[tasks]]\nid = "code"\nagent = "coder"\nneeds = ["plan"]\n'
                     'fan_out = "plan.outputs.files"\nprompt = "{{ item }}"\n'
                     '[[tasks]]\nid = "j"\nagent = "coder"\nneeds = ["code"]\n'
                     'prompt = "{{ code.outputs.path }}"\n')
    p = only(text)
    assert "is a fan-out task" in p.message and "{{ code.outputs }}" in p.hint


def test_toml_syntax_error_has_its_line():
    p = only('[run]\nname = "x"\nmax_concurrent = \n')
    assert p.line == 3 and "not valid TOML" in p.message


def test_bad_script_step_and_tool():
    text = '[agents.a]\nscript = [{txt = "x"}]\ntools = ["mod:fn", "nope"]\n' \
           '[[tasks]]\nid = "t"\nagent = "a"\n'
    ps = {p.line: p for p in problems(text)}
    assert "unknown key(s) txt" in ps[2].message
    assert "unknown tool 'nope'" in ps[3].message


@pytest.mark.parametrize(("tools", "says"), [
    ('["shell", "shell"]', "'shell' is listed twice"),
    ('["shell", "pkg.dup:shell"]', "'shell' and 'pkg.dup:shell' both give the model a tool "
                                   "named 'shell'"),
    ('["pkg.a:add", "pkg.b:add"]', "both give the model a tool named 'add'"),
])
def test_two_tools_of_one_name_are_a_graph_error_not_a_failure_of_every_task(tools, says):
    # validate said OK and every attempt then failed with "registered twice"
    text = f'[agents.a]\ntools = {tools}\n[[tasks]]\nid = "t"\nagent = "a"\n'
    p = only(text)
    assert p.line == 2 and says in p.message and "list each tool once" in p.hint


def test_subscribing_without_read_topic_is_a_graph_error():
    text = '[agents.a]\nsubscribe = ["news.*"]\n[[tasks]]\nid = "t"\nagent = "a"\n'
    p = only(text)
    assert p.line == 2 and "has no read_topic tool" in p.message and "read_topic" in p.hint
    GraphSpec.from_text(text.replace("subscribe", 'tools = ["read_topic"]\nsubscribe'), "g")


def test_render_prompt_substitutes_text_json_and_items():
    ctx = {"plan": {"text": "P", "outputs": {"files": ["a", "b"], "n": 2}}, "item": "a.py"}
    assert render_prompt("{{ plan.text }}/{{item}}/{{ plan.outputs.n }}", ctx) == "P/a.py/2"
    assert render_prompt("{{ plan.outputs.files }}", ctx) == '["a", "b"]'
    assert render_prompt("{{ plan.outputs.files.1 }}", ctx) == "b"
    with pytest.raises(RenderError, match="plan.outputs has no 'missing'"):
        render_prompt("{{ plan.outputs.missing }}", ctx)
    with pytest.raises(RenderError, match="no value for 'other'"):
        render_prompt("{{ other.text }}", ctx)


def test_validate_command_ok_and_bad(capsys):
    assert cmd_validate.run(argparse.Namespace(file=str(DATA / "good_fanout.toml"))) == 0
    assert capsys.readouterr().out == "OK: 3 tasks, 3 agents\n"
    bad = DATA / "bad_many.toml"
    assert cmd_validate.run(argparse.Namespace(file=str(bad))) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: unknown key 'max_concurent' in [run]\n    hint: did you mean" in err
    assert cmd_validate.run(argparse.Namespace(file=str(DATA / "nope.toml"))) == 2


def test_validate_notes_a_key_the_agents_need_that_is_not_set(tmp_path, capsys,
                                                             monkeypatch):
    g = tmp_path / "g.toml"
    g.write_text('[model]\nprovider = "openai"\n[agents.a]\n[agents.b]\n'
                 '[agents.c]\nmodel = {url = "http://127.0.0.1:8000/v1"}\n' + TASK_A)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert cmd_validate.run(argparse.Namespace(file=str(g))) == 0  # remote workers may hold it
    out = capsys.readouterr()
    assert out.out == "OK: 1 tasks, 3 agents\n"
    assert out.err == ("note: $OPENAI_API_KEY is not set here, and agents a, b read the model's "
                       "key from it: export it where the workers start (local workers inherit "
                       "this environment)\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert cmd_validate.run(argparse.Namespace(file=str(g))) == 0
    assert capsys.readouterr().err == ""


def test_validate_is_registered_as_a_subcommand():
    p = argparse.ArgumentParser()
    cmd_validate.add_parser(p.add_subparsers())
    args = p.parse_args(["validate", "x.toml"])
    assert args.func is cmd_validate.run and args.file == "x.toml"


# ---------------------------------------------------------------- property tests


@st.composite
def dags(draw):
    n = draw(st.integers(1, 12))
    needs = [sorted(draw(st.sets(st.integers(0, i - 1), max_size=3))) if i else []
             for i in range(n)]
    return needs


def graph_text(needs: list[list[int]]) -> str:
    out = ['[agents.a]\nscript = [{text = \'{"k": [1, 2]}\'}]\n']
    for i, ns in enumerate(needs):
        refs = " ".join(f"{{{{ t{j}.outputs.k }}}}" for j in ns)
        out.append(f'[[tasks]]\nid = "t{i}"\nagent = "a"\nneeds = {[f"t{j}" for j in ns]!r}\n'
                   .replace("'", '"') + f'prompt = "{refs}"\n')
    return "".join(out)


@given(dags())
@settings(max_examples=60, deadline=None)
def test_random_dags_validate(needs):
    g = GraphSpec.from_text(graph_text(needs), "g.toml")
    assert len(g.tasks) == len(needs)


@given(dags(), st.data())
@settings(max_examples=60, deadline=None)
def test_a_back_edge_is_reported_as_a_cycle_through_real_edges(needs, data):
    n = len(needs)
    if n < 2:
        return
    hi = data.draw(st.integers(1, n - 1))
    lo = data.draw(st.integers(0, hi - 1))
    # make lo need hi: with a path hi -> ... -> lo present, a cycle exists
    needs = [list(x) for x in needs]
    needs[hi] = sorted(set(needs[hi]) | {lo})
    needs[lo] = sorted(set(needs[lo]) | {hi})
    text = graph_text([[j for j in ns] for ns in needs]).replace("{{", "").replace("}}", "")
    ps = problems(text)
    cyc = [p for p in ps if "cycle" in p.message]
    assert len(cyc) == 1
    names = cyc[0].message.split(": ", 1)[1].split(" needs ")
    assert names[0] == names[-1]
    for a, b in zip(names, names[1:], strict=False):
        assert int(b[1:]) in needs[int(a[1:])]


def test_the_documented_example_validates():
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "graph-format.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    g = GraphSpec.from_text(example, "docs/graph-format.md")
    assert g.agents["reviewer"].model.model == "gpt-4.1"
    switched = example.replace('provider = "sim"', 'provider = "openai"', 1)
    g2 = GraphSpec.from_text(switched, "x.toml")
    assert all(a.model.base_url == "https://api.openai.com/v1" for a in g2.agents.values())


def test_long_cycles_are_found_without_recursion_and_named_briefly():
    n = 3000
    text = "[agents.a]\n" + "".join(
        f'[[tasks]]\nid = "t{i}"\nagent = "a"\nneeds = ["t{(i + 1) % n}"]\n' for i in range(n))
    p = only(text)
    assert p.message.startswith("the tasks form a cycle: t0 needs t1 needs t2")
    assert f"({n - 11} more)" in p.message and p.message.endswith("t2999 needs t0")


@given(st.text(max_size=300))
@settings(max_examples=200, deadline=None)
def test_any_text_is_a_graph_or_a_graph_error(text):
    try:
        GraphSpec.from_text(text, "g.toml")
    except GraphError as exc:
        assert exc.problems and all(p.line >= 1 for p in exc.problems)


@given(st.dictionaries(st.sampled_from(["id", "agent", "needs", "retries", "timeout", "prompt",
                                        "fan_out", "bogus"]),
                       st.one_of(st.integers(-3, 3), st.text(max_size=8), st.booleans(),
                                 st.lists(st.text(max_size=3), max_size=2)), max_size=6))
@settings(max_examples=200, deadline=None)
def test_any_task_table_is_accepted_or_reported_with_a_line(table):
    import json as _json
    body = "".join(f"{k} = {_json.dumps(v)}\n" for k, v in table.items())
    try:
        GraphSpec.from_text("[agents.a]\n[[tasks]]\n" + body, "g.toml")
    except GraphError as exc:
        assert all(2 <= p.line <= 2 + len(table) for p in exc.problems), exc.render()


def test_zero_timeout_is_refused():
    text = AGENTS + '[[tasks]]\nid = "a"\nagent = "coder"\ntimeout = "0s"\n'
    p = only(text)
    assert "must be longer than zero" in p.message and p.line == line_of(text, "timeout")


TASK_A = '[[tasks]]\nid = "t"\nagent = "a"\n'


def test_an_agent_on_another_server_is_not_sent_the_default_endpoints_key():
    g = GraphSpec.from_text('[model]\nprovider = "openai"\n[agents.a]\n'
                            'model = {url = "http://127.0.0.1:8000/v1", model = "local"}\n'
                            '[agents.b]\nmodel = {url = "http://127.0.0.1:8000/v1", '
                            'api_key_env = "VLLM_KEY"}\n[agents.c]\n'
                            'model = {url = "https://api.openai.com/v1", model = "gpt-5-mini"}\n'
                            + TASK_A, "g.toml")
    assert g.agents["a"].model.api_key_env is None  # another server: no key unless named
    assert g.agents["b"].model.api_key_env == "VLLM_KEY"
    assert g.agents["c"].model.api_key_env == "OPENAI_API_KEY"  # the same server keeps it


def test_openai_compatible_without_a_url_is_refused_not_run_on_the_sim():
    for table in ('[model]\nprovider = "openai-compatible"\nmodel = "Qwen/Qwen2.5-7B"\n',
                  '[agents.x]\nmodel = {provider = "openai-compatible", model = "q"}\n'):
        p = only(table + "[agents.a]\n" + TASK_A)
        assert 'provider = "openai-compatible" needs a url' in p.message
        assert p.line == 2 and 'url = "http://HOST:PORT/v1"' in p.hint


@pytest.mark.parametrize(("url", "why"), [
    ("http://127.0.0.1:18431:v1", "is not a valid URL"),
    ("http://127.0.0.1:184310/v1", "is not a valid URL"),
    ("http://", "has no host name"),
    ("http://localhost:8000/v1 ", "contains spaces"),
    ("localhost:8000/v1", "is not an http(s) URL"),
])
def test_a_url_that_cannot_be_dialled_is_refused_before_the_run(url, why):
    p = only(f'[model]\nurl = "{url}"\n[agents.a]\n' + TASK_A)
    assert p.message.startswith(f"[model]: url {url!r} {why}"), p.message
    assert p.line == 2 and "base URL" in p.hint


def test_a_key_written_as_api_key_env_is_refused_without_being_repeated():
    secret = "sk-proj-SECRETVALUE123"
    p = only(f'[model]\nprovider = "openai"\napi_key_env = "{secret}"\n[agents.a]\n' + TASK_A)
    assert p.message == "[model]: api_key_env is not an environment variable name"
    assert secret not in p.message + p.hint and 'api_key_env = "OPENAI_API_KEY"' in p.hint


def test_api_key_and_server_names_as_providers_get_hints_that_lead_somewhere():
    p = only('[model]\nprovider = "openai"\napi_key = "sk-x"\n[agents.a]\n' + TASK_A)
    assert p.message == "unknown key 'api_key' in [model]"
    assert "never write a key in the graph" in p.hint and "api_key_env" in p.hint
    for name in ("vllm", "llama.cpp", "LM-Studio"):
        p = only(f'[model]\nprovider = "{name}"\n[agents.a]\n' + TASK_A)
        assert 'url = "http://HOST:PORT/v1"' in p.hint and "ollama" not in p.hint, name


def test_only_sim_endpoints_are_marked_sim():
    g = GraphSpec.from_text(
        '[model]\nprovider = "sim"\n[agents.a]\nmodel = "gpt-4.1"\n'
        '[agents.b]\nmodel = {url = "http://127.0.0.1:8000/v1"}\n'
        '[agents.c]\nmodel = {provider = "sim", url = "http://127.0.0.1:8123/v1"}\n'
        '[agents.d]\nmodel = {provider = "openai"}\n[agents.e]\nmodel = {provider = "ollama"}\n'
        + TASK_A, "g.toml")
    assert {n: a.model.sim for n, a in g.agents.items()} == {
        "a": True, "b": False, "c": True, "d": False, "e": False}
    lease = P.Lease(run_id="r", task_id="t", attempt=1, agent=g.agents["b"], prompt="p",
                    timeout_s=None, model_base_url=None)
    assert P.parse_message(P.to_wire(lease)).agent.model.sim is False


def test_endpoint_keys_written_in_an_agent_table_point_to_its_model_table():
    p = only('[agents.a]\nprovider = "openai"\n' + TASK_A)
    assert p.message == "unknown key 'provider' in [agents.a]" and p.line == 2
    assert p.hint == 'an agent\'s endpoint goes in its model table: model = { provider = "..." }'


def test_validate_notes_a_function_tool_that_does_not_load_here(tmp_path, capsys):
    g = tmp_path / "g.toml"
    g.write_text('[agents.a]\ntools = ["nosuchmod_sb:fn", "agents.tools.examples:word_count"]\n'
                 + TASK_A)
    assert cmd_validate.run(argparse.Namespace(file=str(g))) == 0  # workers may have it
    err = capsys.readouterr().err
    assert err.startswith("note: tool 'nosuchmod_sb:fn': module 'nosuchmod_sb' not found")
    assert err.rstrip().endswith("(local workers import tools in this environment)")
    assert "word_count" not in err and err.count("note:") == 1


def test_an_unknown_table_is_reported_at_its_header_not_at_line_1():
    # tomllib gives no positions; a table nobody knows (or one reached by a dotted key) must
    # still point at its own line, or a user hunts through the whole file.
    text = (AGENTS + '[[tasks]]\nid = "a"\nagent = "coder"\nprompt = "x"\n\n'
            '[extra]\nfoo = 1\n\n[more.sub]\nx = 1\n\n[agents.planner2]\nmodel.urll = "x"\n')
    ps = problems(text)
    where = {p.message: p.line for p in ps}
    assert where["unknown key 'extra' in the file"] == line_of(text, "[extra]")
    assert where["unknown key 'more' in the file"] == line_of(text, "[more.sub]")
    urll = [p for p in ps if "'urll'" in p.message]
    assert urll and urll[0].line == line_of(text, "model.urll"), [p.render() for p in ps]


def test_turn_retries_is_set_per_run_and_kept_by_agents_on_other_endpoints():
    g = GraphSpec.from_text('[model]\nprovider = "openai"\nturn_retries = 6\n'
                            '[agents.a]\n[agents.b]\nmodel = { provider = "ollama" }\n'
                            '[agents.c]\nmodel = { provider = "ollama", turn_retries = 0 }\n'
                            + TASK_A, "g.toml")
    assert [g.agents[n].model.turn_retries for n in "abc"] == [6, 6, 0]
    plain = GraphSpec.from_text("[agents.a]\n" + TASK_A, "g.toml")
    assert plain.agents["a"].model.turn_retries == 2  # as OpenAI's SDK


@pytest.mark.parametrize("value", ["-1", "21", '"5"', "2.5"])
def test_a_turn_retries_out_of_range_or_not_a_whole_number_is_refused_on_its_line(value):
    p = only(f"[model]\nturn_retries = {value}\n[agents.a]\n" + TASK_A)
    assert p.line == 2 and "turn_retries" in p.message, p.render()
    if value in ("-1", "21"):
        assert p.message == f"[model]: turn_retries must be 0 to 20, not {value}"
        assert "turn_retries = 5" in p.hint
