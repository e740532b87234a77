"""Owns the tool registry: what tools an agent has, their schemas, and calling them without ever raising.

Invariant: `ToolRegistry.call` returns a ToolResult for every tool problem (unknown name, bad
JSON, arguments that do not match the schema, a tool that raises, times out, or returns huge or
binary output). Only trio.Cancelled and KeyboardInterrupt (BaseExceptions) propagate.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import pathlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from agents.tools.schema import validate

BUILTIN_NAMES = ("shell", "read_file", "write_file", "list_files", "apply_patch")
# Registered by the agents layer (agents.bustools) with ToolRegistry.register, not built here.
AGENT_LAYER_NAMES = frozenset({"send_message", "ask", "publish", "read_topic", "read_messages",
                               "spawn", "wait"})
NOTE_HEADROOM_BYTES = 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ToolSpecError(Exception):
    """A tool named in the graph file (or registered by code) cannot be provided: the graph author's or caller's fault."""


def clip(value: Any, limit: int) -> str:
    """`value` (text, or anything as JSON) cut to `limit` characters for a log line, saying how
    long it was when cut."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class ToolError(Exception):
    """Raised by a tool to report a problem the model caused or can fix; becomes ToolResult(ok=False, error=str(exc)).

    `output` is optional text shown with the error (e.g. a command's output before it timed out).
    """

    def __init__(self, message: str, *, output: str = "", truncated_bytes: int = 0) -> None:
        super().__init__(message)
        self.output = output
        self.truncated_bytes = truncated_bytes


@attrs.frozen(kw_only=True)
class ToolResult:
    """What one tool call produced. `output` is what the model sees; `error` is None iff ok."""

    ok: bool
    output: str
    error: str | None = None
    elapsed_s: float = 0.0
    truncated_bytes: int = 0  # bytes of output cut from the middle to respect the cap


@attrs.frozen(kw_only=True)
class Tool:
    """One registered tool. `fn` is called with the validated arguments as keywords."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    timeout_s: float | None = None  # None: the tool enforces its own limits (shell, bus tools)
    # Releases what the tool holds between calls (the shell's spare process); called once by
    # ToolRegistry.close when the session ends. Must not raise or block.
    close: Callable[[], None] | None = None


@attrs.frozen(kw_only=True)
class ToolContext:
    """Everything the built-in tools of one task need. Frozen: change with attrs.evolve."""

    workspace: pathlib.Path = attrs.field(converter=pathlib.Path)  # file tools stay inside it
    env: dict[str, str] = attrs.field(factory=dict)  # the whole environment shell commands get
    shell_timeout_s: float = 60.0
    max_output_bytes: int = 16 * 1024  # per call; the model sees head and tail beyond this
    kill_grace_s: float = 2.0  # on timeout: SIGTERM, this long, then SIGKILL to the group
    cancel_grace_s: float = 0.5  # the same on cancellation (must stay well under 1 s)
    function_timeout_s: float = 60.0  # Python function tools
    extra_tools: tuple[Tool, ...] = ()  # registered on top of the built-ins by build_registry


def _cut_utf8_head(data: bytes) -> bytes:
    """Drop an incomplete UTF-8 sequence at the end of a head slice."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b < 0x80:
            return data
        if b >= 0xC0:  # lead byte: complete iff the sequence it starts fits
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return data if back >= need else data[:-back]
    return data


def _cut_utf8_tail(data: bytes) -> bytes:
    """Drop continuation bytes at the start of a tail slice (the rest of a cut character)."""
    i = 0
    while i < min(3, len(data)) and 0x80 <= data[i] <= 0xBF:
        i += 1
    return data[i:]


def render_bytes(head: bytes, tail: bytes, cut: int) -> tuple[str, bool, int]:
    """Decode captured output for the model: (text, is_binary, bytes cut).

    `cut` bytes were dropped between head and tail (a few more are dropped at the seams if a
    character was split there).

    Output that holds NUL bytes or is not UTF-8 is decoded with errors="replace" and marked.
    """
    if not cut:  # nothing between them: one text (a character may span the two)
        head, tail = head + tail, b""
    else:  # characters cut at the seams would look like binary: trim them first
        n = len(head) + len(tail)
        head = _cut_utf8_head(head)
        tail = _cut_utf8_tail(tail)
        cut += n - len(head) - len(tail)
    binary = b"\x00" in head or b"\x00" in tail
    if not binary:
        try:
            head.decode("utf-8")
            tail.decode("utf-8")
        except UnicodeDecodeError:
            binary = True
    text = head.decode("utf-8", errors="replace")
    if cut:
        text += (f"\n[... {cut} bytes cut from the middle of the output; showing the first "
                 f"{len(head)} and the last {len(tail)} bytes ...]\n")
        text += tail.decode("utf-8", errors="replace")
    if binary:
        text = text.replace("\x00", "\\0")
        text = ("[binary output: not valid UTF-8 text; undecodable bytes shown as U+FFFD, "
                "NUL as \\0]\n" + text)
    return text, binary, cut


def cap_text(text: str, limit: int) -> tuple[str, int]:
    """Cap `text` at `limit` UTF-8 bytes keeping head and tail; returns (text, bytes cut)."""
    data = text.encode("utf-8", errors="surrogatepass")
    if len(data) <= limit:
        return text, 0
    half = max(limit // 2, 1)
    head, tail = data[:half], data[-half:]
    cut = len(data) - len(head) - len(tail)
    rendered, _, cut = render_bytes(head, tail, cut)
    return rendered, cut


def render_value(value: Any) -> str:
    """A tool's return value as the text the model sees: str as is, JSON for the rest."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return render_bytes(bytes(value), b"", 0)[0]
    try:
        return json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


@attrs.define
class ToolRegistry:
    """The tools of one agent session, by name, in registration order."""

    ctx: ToolContext
    _tools: dict[str, Tool] = attrs.field(factory=dict)

    def register(self, name: str, description: str, schema: dict[str, Any],
                 fn: Callable[..., Awaitable[Any]] | Callable[..., Any], *,
                 timeout_s: float | None = None, close: Callable[[], None] | None = None
                 ) -> None:
        """Add a tool. `fn(**arguments)` may be async (awaited) or sync (run in a thread).

        Raises ToolSpecError for a bad name, a schema that is not an object schema, or a
        name already taken.
        """
        if not _NAME_RE.match(name):
            raise ToolSpecError(f"tool name {name!r} must be 1-64 letters, digits, _ or -")
        if name in self._tools:
            raise ToolSpecError(f"tool {name!r} is registered twice; list each tool once")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            raise ToolSpecError(f"tool {name!r}: parameters schema must be a JSON object schema "
                                '({"type": "object", ...})')
        self._tools[name] = Tool(name=name, description=description, parameters=schema, fn=fn,
                                 timeout_s=timeout_s, close=close)

    def add(self, tool: Tool) -> None:
        self.register(tool.name, tool.description, tool.parameters, tool.fn,
                      timeout_s=tool.timeout_s, close=tool.close)

    def close(self) -> None:
        """Release what the tools hold between calls (the session is over). Idempotent."""
        for tool in self._tools.values():
            if tool.close is not None:
                tool.close()

    def names(self) -> list[str]:
        return list(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __len__(self) -> int:
        return len(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """OpenAI Responses function-tool definitions, one per tool, in registration order."""
        return [{"type": "function", "name": t.name, "description": t.description,
                 "parameters": t.parameters, "strict": False} for t in self._tools.values()]

    async def call(self, name: str, arguments_json: str) -> ToolResult:
        """Run tool `name` with the JSON-encoded arguments the model sent.

        Never raises for a tool problem: every one becomes ToolResult(ok=False, error=...).
        Raises trio.Cancelled when cancelled (after the tool cleaned up: shell processes are
        gone) and KeyboardInterrupt.
        """
        t0 = time.perf_counter()

        def fail(error: str, output: str = "", truncated: int = 0) -> ToolResult:
            return ToolResult(ok=False, output=output, error=error,
                              elapsed_s=time.perf_counter() - t0, truncated_bytes=truncated)

        tool = self._tools.get(name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            return fail(f"unknown tool {name!r}; available tools: {known}")
        if arguments_json is None or (isinstance(arguments_json, str)
                                      and not arguments_json.strip()):
            arguments_json = "{}"
        try:
            args = json.loads(arguments_json, parse_constant=_reject_constant)
        except (TypeError, ValueError) as exc:
            return fail(f"arguments for {name!r} are not valid JSON ({exc}); send a JSON object "
                        "matching the tool's parameters schema")
        if not isinstance(args, dict):
            return fail(f"arguments for {name!r} must be a JSON object, got "
                        f"{type(args).__name__}")
        err = validate(args, tool.parameters)
        if err:
            return fail(f"invalid arguments for {name!r}: {err}")
        # Headroom for the notes a built-in adds around output it already capped itself.
        limit = self.ctx.max_output_bytes + NOTE_HEADROOM_BYTES
        value: Any = None
        # Only this scope's own deadline is a timeout; a TooSlowError the tool raises is its own.
        deadline = trio.move_on_after(tool.timeout_s if tool.timeout_s is not None else math.inf)
        try:
            with deadline:
                value = await _invoke(tool.fn, args)
        except ToolError as exc:
            out, cut = cap_text(exc.output, limit)
            return fail(str(exc), out, cut + exc.truncated_bytes)
        except Exception as exc:  # the tool's bug or the model's input: the agent goes on
            detail = f": {exc}" if str(exc) else ""
            return fail(f"tool {name!r} raised {type(exc).__name__}{detail}")
        if deadline.cancelled_caught:
            return fail(f"tool {name!r} did not finish within {tool.timeout_s:g}s and was "
                        "abandoned")
        if isinstance(value, ToolResult):  # a built-in that reports its own outcome
            out, cut = cap_text(value.output, limit)
            return attrs.evolve(value, output=out, elapsed_s=time.perf_counter() - t0,
                                truncated_bytes=value.truncated_bytes + cut)
        out, cut = cap_text(render_value(value), limit)
        return ToolResult(ok=True, output=out, error=None, elapsed_s=time.perf_counter() - t0,
                          truncated_bytes=cut)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _invoke(fn: Callable[..., Any], args: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)):  # noqa: B004
        return await fn(**args)
    # A sync function cannot be interrupted: on cancel its thread is abandoned and runs on.
    result = await trio.to_thread.run_sync(lambda: fn(**args), abandon_on_cancel=True)
    if inspect.isawaitable(result):
        return await result
    return result


def validate_tool_spec(spec: object) -> str | None:
    """Check one tool spec from a graph file; returns an error message, or None if it is fine.

    Built-in and agent-layer names are checked without importing anything; a
    "pkg.module:function" spec is checked for syntax, then imported to check that the module
    exists and has the function and that its signature maps to a schema.
    """
    name = _spec_name(spec)
    if isinstance(name, _SpecProblem):
        return name.message
    if name in BUILTIN_NAMES or name in AGENT_LAYER_NAMES:
        return None
    if ":" not in name:
        return (f"unknown tool {name!r}: built-in tools are {', '.join(BUILTIN_NAMES)}; agent "
                f"tools are {', '.join(sorted(AGENT_LAYER_NAMES))}; Python function tools are "
                "written 'package.module:function'")
    from agents.tools.pyfunc import load_function_tool

    try:
        load_function_tool(name)
    except ToolSpecError as exc:
        return str(exc)
    return None


@attrs.frozen
class _SpecProblem:
    message: str


def _spec_name(spec: object) -> str | _SpecProblem:
    if isinstance(spec, dict):
        extra = set(spec) - {"name"}
        if "name" not in spec or extra:
            return _SpecProblem(f"tool spec {spec!r}: a table spec takes only 'name'")
        spec = spec["name"]
    if not isinstance(spec, str) or not spec.strip():
        return _SpecProblem(f"tool spec {spec!r} must be a non-empty string")
    return spec.strip()


@functools.cache
def builtin_tools() -> dict[str, Callable[[ToolContext], Tool]]:
    """The built-in tools' factories by name.

    Their modules (and the function-tool loader's) import this one, so they are loaded here,
    on first use: ~8 ms, which `orchestrator worker` pays at start-up by calling this, rather
    than inside the first attempt it runs.
    """
    import agents.tools.pyfunc  # noqa: F401 - loaded with the rest, used by build_registry
    from agents.tools.files import (
        apply_patch_tool,
        list_files_tool,
        read_file_tool,
        write_file_tool,
    )
    from agents.tools.shell import shell_tool

    return {
        "shell": shell_tool,
        "read_file": read_file_tool,
        "write_file": write_file_tool,
        "list_files": list_files_tool,
        "apply_patch": apply_patch_tool,
    }


def build_registry(tool_specs: list[str | dict[str, Any]] | tuple[str, ...],
                   ctx: ToolContext) -> ToolRegistry:
    """Build the registry for one agent session from the graph file's tool specs.

    Agent-layer names (send_message, ask, ...) are skipped: the agents layer registers them.
    Raises ToolSpecError naming the spec for an unknown name, a module that cannot be imported,
    a missing function, or a signature that cannot be described as a JSON schema.
    """
    from agents.tools.pyfunc import load_function_tool, make_caller, tool_name

    builtins = builtin_tools()
    registry = ToolRegistry(ctx)
    for spec in tool_specs:
        name = _spec_name(spec)
        if isinstance(name, _SpecProblem):
            raise ToolSpecError(name.message)
        if name in AGENT_LAYER_NAMES:
            continue
        if name in builtins:
            registry.add(builtins[name](ctx))
            continue
        if ":" not in name:
            msg = validate_tool_spec(name)
            raise ToolSpecError(msg or f"unknown tool {name!r}")
        fn, description, parameters = load_function_tool(name)
        registry.register(tool_name(name), description, parameters, make_caller(fn),
                          timeout_s=ctx.function_timeout_s)
    for tool in ctx.extra_tools:
        registry.add(tool)
    return registry
