"""Owns the task graph file: parsing TOML, validation with line-precise problems, prompt rendering.

The format is documented in docs/graph-format.md. Every problem found is collected and raised
at once as a GraphError; nothing here does I/O except `GraphSpec.from_toml` reading its file.
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
import re
import stat
import tomllib
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import attrs

from agents.protocol import TURN_RETRIES_DEFAULT, TURN_RETRIES_MAX, AgentSpec, ModelRef
from orchestrator.durations import ALLOWED as DURATION_ALLOWED
from orchestrator.durations import DurationError, parse_duration

# ---------------------------------------------------------------- problems


@attrs.frozen(kw_only=True)
class Problem:
    """One thing wrong in a graph file: where, what, and what to write instead."""

    file: str
    line: int
    message: str
    hint: str = ""
    column: int | None = None

    def render(self) -> str:
        where = f"{self.file}:{self.line}" + (f":{self.column}" if self.column else "")
        out = f"{where}: {self.message}"
        if self.hint:
            out += f"\n    hint: {self.hint}"
        return out


class GraphError(Exception):
    """The graph file is wrong (the author's fault). `problems` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.message))
        super().__init__(self.render())

    def render(self) -> str:
        return "\n".join(p.render() for p in self.problems)


class RenderError(KeyError):
    """A {{ }} reference has no value at run time (an upstream result lacks it)."""

    def __str__(self) -> str:
        return str(self.args[0])


# ---------------------------------------------------------------- values

BUILTIN_TOOLS = ("shell", "read_file", "write_file", "list_files", "apply_patch", "send_message",
                 "ask", "publish", "read_topic", "spawn", "wait")

# provider presets: one setting (`provider = "openai"`) switches a graph to a real model
PROVIDERS: dict[str, dict[str, Any]] = {
    "sim": {"url": None, "model": "sim", "transport": "ws", "encoding": "msgpack",
            "api_key_env": None, "sim": True},
    "openai": {"url": "https://api.openai.com/v1", "model": "gpt-4.1-mini", "transport": "ws",
               "encoding": "json", "api_key_env": "OPENAI_API_KEY", "sim": False},
    "ollama": {"url": "http://localhost:11434/v1", "model": "llama3.2", "transport": "http",
               "encoding": "json", "api_key_env": None, "sim": False},
    "openai-compatible": {"url": None, "model": "default", "transport": "http",
                          "encoding": "json", "api_key_env": None, "sim": False},
}


MAX_GRAPH_BYTES = 16 * 1024 * 1024  # a graph is a short text; this is far past any real one


class GraphFileError(Exception):
    """The graph file cannot be read as text: missing, unreadable, not a regular file, too
    large, or not UTF-8. The message names the file and what to do."""


def read_graph_text(path: str | pathlib.Path) -> str:
    """The text of a graph file. Raises GraphFileError."""
    name = str(path)
    try:
        with open(path, "rb") as f:  # noqa: PTH123 - one read, bounded below
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise GraphFileError(f"graph file {name!r} is not a regular file (a directory, "
                                     "device or pipe): pass the path of a .toml file")
            data = f.read(MAX_GRAPH_BYTES + 1)
    except IsADirectoryError:
        raise GraphFileError(f"graph file {name!r} is a directory: pass the path of a .toml "
                             "file in it") from None
    except OSError as exc:
        raise GraphFileError(f"cannot read graph file {name!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_GRAPH_BYTES:
        raise GraphFileError(f"graph file {name!r} is over {MAX_GRAPH_BYTES // 2**20} MiB: a "
                             "graph is a short TOML text; is this the right file?")
    try:
        # "-sig": a byte-order mark (Windows editors write one) is dropped; tomllib takes it
        # for a statement and refused the file at line 1, column 1
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GraphFileError(f"graph file {name!r} is not UTF-8 text (byte {exc.start} is "
                             f"{data[exc.start:exc.start + 1]!r}): save it as UTF-8, or check "
                             "that it is the right file") from None


@attrs.frozen(kw_only=True)
class RunSpec:
    name: str = "run"
    max_concurrent: int = 8
    failure_policy: str = "stop"  # "stop" | "continue"
    retries: int = 0
    timeout_s: float = 600.0
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    jitter: float = 0.1  # each backoff is multiplied by a factor in [1 - jitter, 1]
    # spawn guards: a child spawning children... stops at this depth (a graph task's own
    # children are depth 1), and the run stops taking spawns after this many in all
    max_spawn_depth: int = 4
    max_spawned: int = 1000


@attrs.frozen(kw_only=True)
class TaskSpec:
    id: str
    agent: str
    prompt: str = ""
    needs: tuple[str, ...] = ()
    retries: int = 0
    timeout_s: float = 600.0
    fan_out: str | None = None  # "TASK.outputs.KEY": one child per element, at run time
    line: int = 0

    @property
    def fan_out_source(self) -> tuple[str, str] | None:
        """(upstream task id, output key) of fan_out, or None."""
        if self.fan_out is None:
            return None
        t, _, k = self.fan_out.split(".", 2)
        return t, k


@attrs.frozen(kw_only=True)
class GraphSpec:
    """A validated task graph. Build with `from_toml(path)` or `from_text(text, filename)`."""

    path: str
    source_text: str
    run: RunSpec
    model: ModelRef
    agents: Mapping[str, AgentSpec]
    tasks: tuple[TaskSpec, ...]

    @classmethod
    def from_toml(cls, path: str | pathlib.Path) -> GraphSpec:
        """Read and validate a graph file. Raises GraphError, or GraphFileError if it cannot
        be read as text."""
        return cls.from_text(read_graph_text(path), str(path))

    @classmethod
    def from_text(cls, text: str, filename: str = "<graph>") -> GraphSpec:
        """Parse and validate; raises GraphError listing every problem."""
        return _Parser(text, filename).parse()

    def agent_specs(self) -> dict[str, AgentSpec]:
        return dict(self.agents)

    def unimportable_tools(self) -> list[str]:
        """One line per Python function tool ("pkg.module:function") that cannot be loaded in
        this process. Workers import tools in their own environment (a remote one may have
        what this one lacks), so these are notes; local workers inherit this environment."""
        from agents.tools import validate_tool_spec

        specs = dict.fromkeys(t for a in self.agents.values() for t in a.tools
                              if isinstance(t, str) and ":" in t)
        return [f"{msg} (local workers import tools in this environment)"
                for msg in map(validate_tool_spec, specs) if msg]

    def unset_keys(self, env: Any) -> list[str]:
        """One line per api_key_env variable the agents need that `env` does not set (workers
        read keys from their own environment; local workers inherit the orchestrator's)."""
        need: dict[str, list[str]] = {}
        for name, a in self.agents.items():
            var = a.model.api_key_env
            if var and not env.get(var):
                need.setdefault(var, []).append(name)
        return [f"${var} is not set here, and agent{'s' if len(names) > 1 else ''} "
                f"{', '.join(names)} read{'' if len(names) > 1 else 's'} the model's key "
                "from it: export it where the workers start (local workers inherit this "
                "environment)" for var, names in need.items()]

    def task(self, task_id: str) -> TaskSpec:
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise KeyError(task_id)

    @property
    def task_map(self) -> dict[str, TaskSpec]:
        return {t.id: t for t in self.tasks}


# ---------------------------------------------------------------- references and rendering

REF = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_REF_PATH = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*$")
_ID = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def references(template: str) -> list[tuple[str, int]]:
    """Every {{ }} reference in a template with its character offset."""
    return [(m.group(1), m.start()) for m in REF.finditer(template)]


def render_prompt(template: str, context: Mapping[str, Any]) -> str:
    """Substitute {{ a.b.c }} from `context` (task id -> {"text", "outputs"}; "item" -> element).

    Strings are inserted as they are, anything else as JSON. Raises RenderError naming the
    reference and what was missing.
    """

    def sub(m: re.Match[str]) -> str:
        ref = m.group(1)
        parts = ref.split(".")
        if parts[0] not in context:
            raise RenderError(f"{{{{ {ref} }}}}: no value for {parts[0]!r} "
                              f"(have: {', '.join(sorted(context)) or 'nothing'})")
        value: Any = context[parts[0]]
        for i, part in enumerate(parts[1:], start=1):
            if isinstance(value, Mapping) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                have = sorted(value) if isinstance(value, Mapping) else type(value).__name__
                raise RenderError(f"{{{{ {ref} }}}}: {'.'.join(parts[:i])} has no {part!r} "
                                  f"(it has: {have})")
        if isinstance(value, str):
            return value
        return json.dumps(value, ensure_ascii=False, sort_keys=True)

    return REF.sub(sub, template)


# ---------------------------------------------------------------- line index


class _Lines:
    """Where tables and keys are in the source text: tomllib gives no positions."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'. ]+?)\s*=")

    def __init__(self, text: str) -> None:
        self.tables: dict[tuple[str, ...], int] = {}
        self.keys: dict[tuple[tuple[str, ...], str], int] = {}
        self.task_count = 0
        section: tuple[str, ...] = ()
        in_multi: str | None = None
        for no, raw in enumerate(text.splitlines(), start=1):
            line = raw
            if in_multi is not None:
                if line.count(in_multi) % 2 == 1:
                    in_multi = None
                continue
            m = self._HEADER.match(line)
            if m:
                name = m.group(2).strip()
                if m.group(1) == "[[" and name == "tasks":
                    section = ("tasks", str(self.task_count))
                    self.task_count += 1
                else:
                    section = tuple(p.strip().strip('"\'') for p in name.split("."))
                self.tables.setdefault(section, no)
                continue
            k = self._KEY.match(line)
            if k:
                # A dotted key (model.url = ...) names its tables as it goes.
                parts = [p.strip().strip('"\'') for p in k.group(1).split(".")]
                for depth, key in enumerate(parts):
                    self.keys.setdefault((section + tuple(parts[:depth]), key), no)
                for q in ('"""', "'''"):
                    if line.count(q) % 2 == 1:
                        in_multi = q
                        break

    def of(self, section: tuple[str, ...], key: str | None = None) -> int:
        if key is not None:
            if (section, key) in self.keys:
                return self.keys[(section, key)]
            # A key that is a table of its own: [extra], or [extra.sub] with no [extra].
            below = [no for path, no in self.tables.items() if path[:len(section) + 1]
                     == (*section, key)]
            if below:
                return min(below)
        if section in self.tables:
            return self.tables[section]
        if len(section) > 1:
            return self.of(section[:-1], section[-1])
        return 1


# ---------------------------------------------------------------- parser

RUN_KEYS = {"name", "max_concurrent", "failure_policy", "retries", "timeout", "backoff",
            "backoff_max", "jitter", "max_spawn_depth", "max_spawned"}
MODEL_KEYS = {"provider", "url", "model", "transport", "encoding", "api_key_env", "turn_retries"}
AGENT_KEYS = {"instructions", "model", "tools", "max_turns", "script", "answers", "subscribe",
              "shell_timeout"}
TASK_KEYS = {"id", "agent", "prompt", "needs", "retries", "timeout", "fan_out"}
TOP_KEYS = {"run", "model", "agents", "tasks"}
STEP_KEYS = {"text", "call", "calls", "output_tokens", "fail", "attempts"}
# Unknown keys whose usual "did you mean" would mislead: (a key that must be allowed where the
# hint applies, the hint).
_KEY_HINTS = {
    "api_key": ("api_key_env", "never write a key in the graph (it is kept in the journal): "
                'set api_key_env = "NAME" to the environment variable that holds it'),
    **{k: ("model", f'an agent\'s endpoint goes in its model table: model = {{ {k} = "..." }}')
       for k in ("provider", "url", "transport", "encoding", "api_key_env")},
}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Servers people name as a provider; they are reached through their OpenAI-compatible URL.
_COMPATIBLE_SERVERS = {"vllm", "llamacpp", "llamacppserver", "lmstudio", "sglang", "tgi",
                       "localai", "textgenerationinference"}
_SERVER_HINT = ('for vLLM, llama.cpp server and other OpenAI-compatible servers write '
                'url = "http://HOST:PORT/v1" and model = "the name it serves" (no provider), '
                'adding transport = "chat" for a server without the Responses API')


def _url_problem(url: str) -> str | None:
    """Why `url` cannot be a model endpoint's base URL, or None."""
    if not re.match(r"^https?://", url):
        return "is not an http(s) URL"
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "contains spaces or control characters"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if not parts.hostname:
        return "has no host name"
    return None


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else ""


def _type_name(v: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "a list", dict: "a table"}.get(type(v), type(v).__name__)


class _Parser:
    def __init__(self, text: str, filename: str) -> None:
        self.text = text
        self.file = filename
        self.problems: list[Problem] = []
        self.lines = _Lines(text)

    def problem(self, line: int, message: str, hint: str = "") -> None:
        self.problems.append(Problem(file=self.file, line=line, message=message, hint=hint))

    # -- generic checks

    def check_keys(self, table: dict[str, Any], allowed: set[str], section: tuple[str, ...],
                   where: str) -> None:
        for key in table:
            if key not in allowed:
                hint = _KEY_HINTS.get(key)
                dym = hint[1] if hint and hint[0] in allowed else _did_you_mean(key, allowed)
                self.problem(self.lines.of(section, key), f"unknown key {key!r} in {where}",
                             dym or f"allowed keys: {', '.join(sorted(allowed))}")

    def get(self, table: dict[str, Any], key: str, types: type | tuple[type, ...],
            section: tuple[str, ...], where: str, default: Any, *, what: str) -> Any:
        if key not in table:
            return default
        v = table[key]
        bad_bool = isinstance(v, bool) and bool not in (types if isinstance(types, tuple)
                                                       else (types,))
        if not isinstance(v, types) or bad_bool:
            self.problem(self.lines.of(section, key),
                         f"{where}: {key} must be {what}, not {_type_name(v)} ({v!r})",
                         f"write for example {key} = {_example(what)}")
            return default
        return v

    def duration(self, table: dict[str, Any], key: str, section: tuple[str, ...], where: str,
                 default: float, *, positive: bool = False) -> float:
        if key not in table:
            return default
        try:
            seconds = parse_duration(table[key])
            if positive and seconds <= 0:
                self.problem(self.lines.of(section, key),
                             f"{where}: {key} = {table[key]!r} must be longer than zero",
                             f'write for example {key} = "30s"')
                return default
            return seconds
        except DurationError:
            self.problem(self.lines.of(section, key),
                         f"{where}: {key} = {table[key]!r} is not a duration",
                         f"use {DURATION_ALLOWED}")
            return default

    def positive_int(self, table: dict[str, Any], key: str, section: tuple[str, ...],
                     where: str, default: int, *, minimum: int) -> int:
        v = self.get(table, key, int, section, where, default, what="an integer")
        if isinstance(v, int) and v < minimum:
            self.problem(self.lines.of(section, key),
                         f"{where}: {key} must be at least {minimum}, not {v}",
                         f"write {key} = {max(minimum, 1)}")
            return default
        return v

    # -- sections

    def parse(self) -> GraphSpec:
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"line (\d+)(?:, column (\d+))?", str(exc))
            line = int(m.group(1)) if m else 1
            col = int(m.group(2)) if m and m.group(2) else None
            raise GraphError([Problem(file=self.file, line=line, column=col,
                                      message=f"not valid TOML: {exc}",
                                      hint="fix the TOML syntax (quotes, brackets, '=' "
                                           "between key and value)")]) from None
        self.check_keys(data, TOP_KEYS, (), "the file")
        run = self.parse_run(data.get("run", {}))
        model = self.parse_model(data.get("model", {}), ("model",), "[model]",
                                 base={**PROVIDERS["sim"], "turn_retries": TURN_RETRIES_DEFAULT})
        agents = self.parse_agents(data.get("agents", {}), model)
        tasks = self.parse_tasks(data.get("tasks", []), run, agents)
        self.check_graph(tasks, agents)
        if self.problems:
            raise GraphError(self.problems)
        return GraphSpec(path=self.file, source_text=self.text, run=run, model=model,
                         agents=agents, tasks=tuple(tasks))

    def parse_run(self, t: Any) -> RunSpec:
        sec = ("run",)
        if not isinstance(t, dict):
            self.problem(self.lines.of(sec), "run must be a table", "write a [run] section")
            return RunSpec()
        self.check_keys(t, RUN_KEYS, sec, "[run]")
        d = RunSpec()
        policy = self.get(t, "failure_policy", str, sec, "[run]", d.failure_policy,
                          what='"stop" or "continue"')
        if policy not in ("stop", "continue"):
            self.problem(self.lines.of(sec, "failure_policy"),
                         f"[run]: failure_policy = {policy!r} is not a policy",
                         'write failure_policy = "stop" (cancel the run on a final failure) or '
                         '"continue" (run the independent branches)')
            policy = d.failure_policy
        jitter = self.get(t, "jitter", (int, float), sec, "[run]", d.jitter, what="a number")
        if not 0 <= jitter <= 1:
            self.problem(self.lines.of(sec, "jitter"), f"[run]: jitter = {jitter} is out of range",
                         "write a fraction between 0 and 1, e.g. jitter = 0.1")
            jitter = d.jitter
        return RunSpec(
            name=self.get(t, "name", str, sec, "[run]", d.name, what="a string"),
            max_concurrent=self.positive_int(t, "max_concurrent", sec, "[run]",
                                             d.max_concurrent, minimum=1),
            failure_policy=policy,
            retries=self.positive_int(t, "retries", sec, "[run]", d.retries, minimum=0),
            timeout_s=self.duration(t, "timeout", sec, "[run]", d.timeout_s, positive=True),
            backoff_s=self.duration(t, "backoff", sec, "[run]", d.backoff_s),
            backoff_max_s=self.duration(t, "backoff_max", sec, "[run]", d.backoff_max_s),
            jitter=float(jitter),
            max_spawn_depth=self.positive_int(t, "max_spawn_depth", sec, "[run]",
                                              d.max_spawn_depth, minimum=0),
            max_spawned=self.positive_int(t, "max_spawned", sec, "[run]", d.max_spawned,
                                          minimum=0),
        )

    def parse_model(self, t: Any, sec: tuple[str, ...], where: str,
                    base: dict[str, Any]) -> ModelRef:
        if not isinstance(t, dict):
            self.problem(self.lines.of(sec), f"{where} must be a table",
                         'write for example model = { provider = "openai" }')
            t = {}
        self.check_keys(t, MODEL_KEYS, sec, where)
        vals = dict(base)
        if "provider" in t:
            prov = t["provider"]
            if prov not in PROVIDERS:
                plain = str(prov).lower().replace("_", "").replace("-", "").replace(".", "")
                hint = (_SERVER_HINT if plain in _COMPATIBLE_SERVERS
                        else (_did_you_mean(str(prov), PROVIDERS) + " ").lstrip()
                        + f"known providers: {', '.join(PROVIDERS)}")
                self.problem(self.lines.of(sec, "provider"),
                             f"{where}: unknown provider {prov!r}", hint)
            else:  # another endpoint; the retry policy is the run's unless set here
                vals = {**PROVIDERS[prov], "turn_retries": base["turn_retries"]}
        for key in ("url", "model", "api_key_env"):
            if key in t:
                vals[key] = self.get(t, key, str, sec, where, vals[key], what="a string")
        for key, allowed in (("transport", ("ws", "http", "chat")), ("encoding", ("msgpack", "json"))):
            if key in t:
                v = t[key]
                if v not in allowed:
                    self.problem(self.lines.of(sec, key), f"{where}: {key} = {v!r} is not allowed",
                                 f"write {key} = " + " or ".join(f'"{a}"' for a in allowed))
                else:
                    vals[key] = v
        url = vals["url"]
        if url is not None:
            bad = _url_problem(url)
            if bad:
                self.problem(self.lines.of(sec, "url"), f"{where}: url {url!r} {bad}",
                             'write for example url = "http://localhost:8000/v1" (the '
                             "server's base URL, up to and including /v1)")
        elif t.get("provider") == "openai-compatible":
            self.problem(self.lines.of(sec, "provider"),
                         f'{where}: provider = "openai-compatible" needs a url (without one '
                         "the run would use the embedded sim model)",
                         'add url = "http://HOST:PORT/v1" (the server\'s base URL) and '
                         'model = "the name it serves"')
        if "turn_retries" in t:
            n = self.get(t, "turn_retries", int, sec, where, None, what="an integer")
            if isinstance(n, int) and not 0 <= n <= TURN_RETRIES_MAX:
                self.problem(self.lines.of(sec, "turn_retries"),
                             f"{where}: turn_retries must be 0 to {TURN_RETRIES_MAX}, not {n}",
                             "turn_retries is how many times one model turn is sent again "
                             "after a rate limit or server error; write for example "
                             "turn_retries = 5 (0: fail the attempt at the first one)")
            elif isinstance(n, int):
                vals["turn_retries"] = n
        key_env = vals["api_key_env"]
        if "api_key_env" in t and isinstance(key_env, str) and not _ENV_NAME.match(key_env):
            # not echoed: what is there may be the key itself
            self.problem(self.lines.of(sec, "api_key_env"),
                         f"{where}: api_key_env is not an environment variable name",
                         "api_key_env names the variable that holds the key, e.g. "
                         'api_key_env = "OPENAI_API_KEY"; never write the key itself in a '
                         "graph (it is kept in the journal)")
        if "url" in t and "provider" not in t:
            # a bare url is a foreign OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp):
            # HTTP Responses with JSON and its own model name, unless the table says otherwise
            # (the sim preset's "sim" over ws/msgpack would be refused there)
            compat = PROVIDERS["openai-compatible"]
            vals["sim"] = False
            for key in ("model", "transport", "encoding"):
                if key not in t:
                    vals[key] = compat[key]
            # and the key of the endpoint it overrides is not sent to another server
            if "api_key_env" not in t and vals["url"] != base["url"]:
                vals["api_key_env"] = None
        return ModelRef(base_url=vals["url"], model=vals["model"], transport=vals["transport"],
                        encoding=vals["encoding"], api_key_env=vals["api_key_env"],
                        sim=vals["sim"], turn_retries=vals["turn_retries"])

    def parse_agents(self, t: Any, model: ModelRef) -> dict[str, AgentSpec]:
        out: dict[str, AgentSpec] = {}
        if not isinstance(t, dict):
            self.problem(self.lines.of(("agents",)), "agents must be tables [agents.NAME]",
                         "write [agents.writer] with instructions = \"...\"")
            return out
        for name, a in t.items():
            sec = ("agents", name)
            where = f"[agents.{name}]"
            if not _ID.match(name):
                self.problem(self.lines.of(sec), f"agent name {name!r} is not a plain name",
                             "use letters, digits, '_' and '-' only")
            if not isinstance(a, dict):
                self.problem(self.lines.of(sec), f"{where} must be a table",
                             f"write [agents.{name}] on its own line")
                continue
            self.check_keys(a, AGENT_KEYS, sec, where)
            m = model
            if "model" in a:
                mv = a["model"]
                if isinstance(mv, str):
                    m = attrs.evolve(model, model=mv)
                else:
                    base = {"url": model.base_url, "model": model.model,
                            "transport": model.transport, "encoding": model.encoding,
                            "api_key_env": model.api_key_env, "sim": model.sim,
                            "turn_retries": model.turn_retries}
                    m = self.parse_model(mv, sec + ("model",), f"{where} model", base=base)
            tools = self.get(a, "tools", list, sec, where, [], what="a list of tool names")
            for tool in tools:
                if not isinstance(tool, str):
                    self.problem(self.lines.of(sec, "tools"), f"{where}: tool {tool!r} is not a name",
                                 'write tools = ["shell", "read_file"]')
                elif tool not in BUILTIN_TOOLS and not re.match(r"^[\w.]+:\w+$", tool):
                    dym = _did_you_mean(tool, BUILTIN_TOOLS)
                    self.problem(self.lines.of(sec, "tools"), f"{where}: unknown tool {tool!r}",
                                 (dym + " " if dym else "") + "built-in tools: "
                                 + ", ".join(BUILTIN_TOOLS) + "; or a Python function as "
                                 "\"package.module:function\"")
            seen: dict[str, str] = {}  # the name the model sees -> the spec that gave it
            for tool in tools:
                if not isinstance(tool, str):
                    continue
                shown = tool.rsplit(":", 1)[-1]  # a function tool is named by its function
                if shown in seen:
                    twice = (f"{tool!r} is listed twice" if seen[shown] == tool else
                             f"{seen[shown]!r} and {tool!r} both give the model a tool named "
                             f"{shown!r}")
                    self.problem(self.lines.of(sec, "tools"), f"{where}: {twice}",
                                 "list each tool once; rename a function that shares a name "
                                 "with a built-in or another function")
                seen.setdefault(shown, tool)
            subscribe = self.get(a, "subscribe", list, sec, where, [], what="a list of topics")
            if subscribe and "read_topic" not in tools:
                self.problem(self.lines.of(sec, "subscribe"),
                             f"{where}: subscribes to topics but has no read_topic tool, so it "
                             "could never read what they bring",
                             'add "read_topic" to its tools, or drop subscribe')
            script = self.parse_script(a, "script", sec, where)
            answers = self.parse_script(a, "answers", sec, where)
            out[name] = AgentSpec(
                name=name,
                instructions=self.get(a, "instructions", str, sec, where, "", what="a string"),
                tools=tuple(x for x in tools if isinstance(x, str)),
                max_turns=self.positive_int(a, "max_turns", sec, where, 50, minimum=1),
                script=script, answers=answers,
                subscribe=tuple(str(x) for x in subscribe),
                model=m,
                shell_timeout_s=self.duration(a, "shell_timeout", sec, where, 60.0),
            )
        return out

    def parse_script(self, a: dict[str, Any], key: str, sec: tuple[str, ...],
                     where: str) -> tuple[Any, ...] | None:
        steps = self.get(a, key, list, sec, where, None, what="a list of steps")
        if steps is None:
            return None
        line = self.lines.of(sec, key)
        for i, step in enumerate(steps):
            hint = ('each step is {text = "..."}, {call = {name = "shell", arguments = '
                    '{cmd = "true"}}} or {calls = [...]}')
            if not isinstance(step, dict):
                self.problem(line, f"{where}: {key}[{i}] must be a table, not {_type_name(step)}",
                             hint)
                continue
            unknown = set(step) - STEP_KEYS
            kinds = [k for k in ("text", "call", "calls", "fail") if k in step]
            if unknown:
                self.problem(line, f"{where}: {key}[{i}] has unknown key(s) "
                             f"{', '.join(sorted(unknown))}", hint)
            elif len(kinds) != 1:
                self.problem(line, f"{where}: {key}[{i}] must have exactly one of text, call, "
                             f"calls (has {', '.join(kinds) or 'none'})", hint)
            elif "text" in step and not isinstance(step["text"], str):
                self.problem(line, f"{where}: {key}[{i}].text must be a string", hint)
            elif "call" in step and not _is_call(step["call"]):
                self.problem(line, f"{where}: {key}[{i}].call must be a table with a name "
                             "and arguments", hint)
            elif "calls" in step and not (isinstance(step["calls"], list)
                                          and all(_is_call(c) for c in step["calls"])):
                self.problem(line, f"{where}: {key}[{i}].calls must be a list of calls", hint)
        return tuple(steps)

    def parse_tasks(self, t: Any, run: RunSpec, agents: dict[str, AgentSpec]) -> list[TaskSpec]:
        out: list[TaskSpec] = []
        if not isinstance(t, list):
            self.problem(self.lines.of(("tasks",)), "tasks must be an array of tables",
                         "write each task as a [[tasks]] block")
            return out
        if not t:
            self.problem(1, "the graph has no tasks", 'add a [[tasks]] block with id, agent '
                         'and prompt')
        seen: dict[str, int] = {}
        for i, task in enumerate(t):
            sec = ("tasks", str(i))
            line = self.lines.of(sec)
            if not isinstance(task, dict):
                self.problem(line, "a task must be a table", "write each task as [[tasks]]")
                continue
            tid = task.get("id")
            where = f"task {tid!r}" if isinstance(tid, str) else f"task #{i + 1}"
            self.check_keys(task, TASK_KEYS, sec, where)
            if "id" not in task:
                self.problem(line, f"{where} has no id", 'add id = "a-unique-name"')
                tid = f"#{i + 1}"
            elif not isinstance(tid, str) or not _ID.match(tid):
                self.problem(self.lines.of(sec, "id"), f"{where}: id {tid!r} is not a plain name",
                             "use letters, digits, '_' and '-' only, starting with a letter")
                tid = f"#{i + 1}"
            elif tid in seen:
                self.problem(self.lines.of(sec, "id"),
                             f"duplicate task id {tid!r} (first defined on line {seen[tid]})",
                             "give each task its own id")
            else:
                seen[tid] = self.lines.of(sec, "id")
            agent = task.get("agent")
            if "agent" not in task:
                self.problem(line, f"{where} has no agent",
                             f"add agent = one of: {', '.join(sorted(agents)) or '(define [agents.NAME] first)'}")
                agent = ""
            elif not isinstance(agent, str) or agent not in agents:
                dym = _did_you_mean(str(agent), agents)
                self.problem(self.lines.of(sec, "agent"), f"{where}: unknown agent {agent!r}",
                             (dym + " " if dym else "") + "defined agents: "
                             + (", ".join(sorted(agents)) or "none; add [agents.NAME]"))
                agent = str(agent)
            needs = self.get(task, "needs", list, sec, where, [], what="a list of task ids")
            needs = [n for n in needs if isinstance(n, str)] if isinstance(needs, list) else []
            fan_out = self.get(task, "fan_out", str, sec, where, None, what="a string")
            if fan_out is not None and not re.match(r"^[A-Za-z_][\w-]*\.outputs\.[\w-]+$", fan_out):
                self.problem(self.lines.of(sec, "fan_out"),
                             f"{where}: fan_out = {fan_out!r} is not an output reference",
                             'write fan_out = "TASK.outputs.KEY" where TASK is in needs and its '
                             "output KEY is a list")
                fan_out = None
            out.append(TaskSpec(
                id=str(tid), agent=agent,
                prompt=self.get(task, "prompt", str, sec, where, "", what="a string"),
                needs=tuple(needs),
                retries=self.positive_int(task, "retries", sec, where, run.retries, minimum=0),
                timeout_s=self.duration(task, "timeout", sec, where, run.timeout_s,
                                        positive=True),
                fan_out=fan_out, line=line,
            ))
        return out

    # -- whole-graph checks

    def task_line(self, i: int, key: str | None = None) -> int:
        return self.lines.of(("tasks", str(i)), key)

    def check_graph(self, tasks: list[TaskSpec], agents: dict[str, AgentSpec]) -> None:
        ids = {t.id: i for i, t in enumerate(tasks)}
        for i, t in enumerate(tasks):
            for n in t.needs:
                if n not in ids:
                    dym = _did_you_mean(n, ids)
                    self.problem(self.task_line(i, "needs"),
                                 f"task {t.id!r} needs {n!r}, which is not a task",
                                 (dym + " " if dym else "") + "tasks: " + ", ".join(ids))
                elif n == t.id:
                    self.problem(self.task_line(i, "needs"), f"task {t.id!r} needs itself",
                                 f"remove {n!r} from needs")
        cycle = _find_cycle(tasks)
        if cycle:
            i = ids[cycle[0]]
            self.problem(self.task_line(i, "needs"),
                         "the tasks form a cycle: " + " needs ".join(
                             cycle + [cycle[0]] if len(cycle) <= 12 else
                             cycle[:10] + [f"... ({len(cycle) - 11} more)", cycle[-1], cycle[0]]),
                         f"remove one of these needs, e.g. {cycle[1] if len(cycle) > 1 else cycle[0]!r}"
                         f" from task {cycle[0]!r}")
            return
        by_id: dict[str, TaskSpec] = {}
        for t in tasks:
            by_id.setdefault(t.id, t)  # a duplicate id was reported; judge by the first
        upstream = _Upstream(by_id)
        for i, t in enumerate(tasks):
            if t.fan_out is not None and by_id[t.id] is t:
                src, key = t.fan_out.split(".outputs.", 1)
                line = self.task_line(i, "fan_out")
                if src not in upstream[t.id]:
                    self.problem(line, f"task {t.id!r}: fan_out over {src!r}, which is not "
                                 "upstream of it", f'add needs = ["{src}"] (or fan out over '
                                 "an upstream task's output)")
                else:
                    keys = _known_output_keys(by_id[src], agents)
                    if by_id[src].fan_out is not None:
                        self.problem(line, f"task {t.id!r}: fan_out over {src!r}, a fan-out "
                                     "task whose outputs is a list of child outputs",
                                     "fan out over a task that is not itself a fan-out")
                    elif keys is not None and key not in keys[0]:
                        self.problem(line, f"task {t.id!r}: fan_out over {t.fan_out!r}, but "
                                     f"agent {by_id[src].agent!r} answers with keys "
                                     f"{sorted(keys[0])}", _key_hint(src, keys[0], key))
                    elif keys is not None and not isinstance(keys[0][key], list):
                        self.problem(line, f"task {t.id!r}: fan_out over {t.fan_out!r}, which is "
                                     f"not a list in agent {by_id[src].agent!r}'s final answer",
                                     f"make {key} a JSON list in the final text step")
            if by_id[t.id] is t:
                self.check_refs(i, t, upstream[t.id], by_id, agents)

    def check_refs(self, i: int, t: TaskSpec, up: _Reach, by_id: dict[str, TaskSpec],
                   agents: dict[str, AgentSpec]) -> None:
        line = self.task_line(i, "prompt")
        for ref, _ in references(t.prompt):
            if not _REF_PATH.match(ref):
                self.problem(line, f"task {t.id!r}: {{{{ {ref} }}}} is not a reference",
                             "write {{ TASK.text }}, {{ TASK.outputs.KEY }} or {{ item }}")
                continue
            parts = ref.split(".")
            head = parts[0]
            if head == "item":
                if t.fan_out is None:
                    self.problem(line, f"task {t.id!r}: {{{{ {ref} }}}} is only set in a "
                                 "fan-out task", 'add fan_out = "TASK.outputs.KEY", or refer '
                                 "to an upstream task's output")
                continue
            if head not in by_id:
                dym = _did_you_mean(head, by_id)
                self.problem(line, f"task {t.id!r}: {{{{ {ref} }}}} refers to {head!r}, which "
                             "is not a task", (dym + " " if dym else "") + "refer to a task in "
                             "needs: {{ TASK.text }} or {{ TASK.outputs.KEY }}")
                continue
            if head not in up:
                self.problem(line, f"task {t.id!r}: {{{{ {ref} }}}} refers to {head!r}, which "
                             "is not upstream of it", f'add "{head}" to needs')
                continue
            rest = parts[1:]
            if not rest or rest[0] not in ("text", "outputs") or (rest[0] == "text"
                                                                   and len(rest) > 1):
                self.problem(line, f"task {t.id!r}: {{{{ {ref} }}}} names no result field",
                             f"write {{{{ {head}.text }}}} or {{{{ {head}.outputs.KEY }}}}")
                continue
            if rest[0] == "outputs" and len(rest) > 1:
                src = by_id[head]
                if src.fan_out is not None:
                    if not rest[1].isdigit():
                        self.problem(line, f"task {t.id!r}: {{{{ {ref} }}}}: {head!r} is a "
                                     "fan-out task; its outputs is the list of its children's "
                                     "outputs", f"write {{{{ {head}.outputs }}}} (or "
                                     f"{{{{ {head}.outputs.0 }}}})")
                    continue
                keys = _known_output_keys(src, agents)
                if keys is not None and rest[1] not in keys[0]:
                    self.problem(line, f"task {t.id!r}: {{{{ {ref} }}}}: agent {src.agent!r} "
                                 f"answers with keys {sorted(keys[0])}, not {rest[1]!r}",
                                 _key_hint(head, keys[0], rest[1]))


def _key_hint(task: str, keys: Mapping[str, Any], key: str) -> str:
    dym = _did_you_mean(key, keys)
    if dym:
        return dym
    if keys:
        return f"use one of {', '.join(f'{task}.outputs.{k}' for k in sorted(keys))}, or add " \
               f"{key!r} to the final text step's JSON"
    return f"make the final text step of the agent's script a JSON object with {key!r}"


def _example(what: str) -> str:
    return {"an integer": "3", "a string": '"text"', "a number": "0.5",
            "a list of task ids": '["plan"]', "a list of tool names": '["shell"]',
            "a list of topics": '["news.*"]', "a list of steps": '[{text = "done"}]',
            '"stop" or "continue"': '"stop"'}.get(what, '"..."')


def _is_call(c: Any) -> bool:
    return isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(
        c.get("arguments", {}), dict | str)


def _known_output_keys(task: TaskSpec, agents: Mapping[str, AgentSpec]
                       ) -> tuple[dict[str, Any]] | None:
    """The outputs an agent's sim script will produce, when that is knowable.

    Known iff the agent has a script whose last text step (the sim repeats it past the end) is
    text; the outputs are that text parsed as a JSON object, else {} (no outputs at all).
    """
    agent = agents.get(task.agent)
    if agent is None or not agent.script:
        return None
    texts = [s["text"] for s in agent.script if isinstance(s, dict) and isinstance(
        s.get("text"), str)]
    if not texts:
        return None
    try:
        v = json.loads(texts[-1])
    except ValueError:
        return ({},)
    return (v,) if isinstance(v, dict) else ({},)


class _Upstream:
    """upstream[tid] answers `head in ...` iff tid needs head, transitively.

    Ancestor sets are Python ints used as bitsets, filled in topological order: a 10,000-task
    chain costs ~12 MB for a moment instead of 50 million set entries.
    """

    def __init__(self, by_id: Mapping[str, TaskSpec]) -> None:
        self.bit = {tid: 1 << k for k, tid in enumerate(by_id)}
        self.mask: dict[str, int] = {}
        order: list[str] = []
        state: dict[str, int] = {}
        for root in by_id:
            stack = [(root, False)]
            while stack:
                tid, done = stack.pop()
                if done:
                    state[tid] = 2
                    order.append(tid)
                    continue
                if state.get(tid) or tid not in by_id:
                    continue
                state[tid] = 1
                stack.append((tid, True))
                stack.extend((n, False) for n in by_id[tid].needs if not state.get(n))
        for tid in order:
            m = 0
            for n in by_id[tid].needs:
                if n in self.bit:
                    m |= self.bit[n] | self.mask.get(n, 0)
            self.mask[tid] = m

    def __getitem__(self, tid: str) -> _Reach:
        return _Reach(self, tid)


@attrs.frozen
class _Reach:
    up: _Upstream
    tid: str

    def __contains__(self, target: object) -> bool:
        bit = self.up.bit.get(target) if isinstance(target, str) else None
        return bit is not None and bool(self.up.mask.get(self.tid, 0) & bit)


def _find_cycle(tasks: list[TaskSpec]) -> list[str] | None:
    """One cycle, as task ids where each needs the next (the last needs the first), or None."""
    by_id: dict[str, TaskSpec] = {}
    for t in tasks:
        by_id.setdefault(t.id, t)
    color: dict[str, int] = {}
    for root in by_id:
        if root in color:
            continue
        path: list[str] = []
        iters: list[Iterator[str]] = []
        color[root] = 1
        path.append(root)
        iters.append(iter(by_id[root].needs))
        while path:
            n = next(iters[-1], None)
            if n is None:
                color[path.pop()] = 2
                iters.pop()
                continue
            if n not in by_id:
                continue
            if color.get(n) == 1:
                return path[path.index(n):]
            if n not in color:
                color[n] = 1
                path.append(n)
                iters.append(iter(by_id[n].needs))
    return None
