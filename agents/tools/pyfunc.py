"""Owns Python function tools ("package.module:function"): loading them and describing them as JSON schemas.

The schema comes from the signature and type hints (str, int, float, bool, list[X], dict,
Optional[X], Literal[...]; a default makes a parameter optional), the description from the
docstring (its "Args:" section, Google style, describes the parameters). Async functions are
awaited; sync ones run in a worker thread which, on cancellation, is abandoned: Python cannot
kill a thread, so a sync tool that never returns keeps its thread (and whatever it holds) until
the process exits. Write long-running tools as async functions, or use the shell tool.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import sys
import typing
from collections.abc import Callable
from typing import Any

from agents.tools.registry import ToolSpecError
from agents.tools.schema import SchemaError, object_schema, schema_for_type

SPEC_RE = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")
_ARGS_HEADERS = ("args:", "arguments:", "parameters:", "params:")
_SECTION_HEADERS = _ARGS_HEADERS + ("returns:", "return:", "raises:", "yields:", "examples:",
                                    "example:", "note:", "notes:")
_ARG_LINE = re.compile(r"^\s*\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def tool_name(spec: str) -> str:
    """The name the model calls a function tool by: the function's own name."""
    return spec.rsplit(":", 1)[1].rsplit(".", 1)[-1]


def _cwd_on_path() -> None:
    """Tool modules load from the current directory too, however the process started:
    `python -m orchestrator` (local workers) puts it on sys.path, the `orchestrator` console
    script (a worker started by hand, `validate`) does not. Last, so it shadows nothing."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)


def load_function_tool(spec: str) -> tuple[Callable[..., Any], str, dict[str, Any]]:
    """Import "package.module:function" and describe it: (function, description, parameters schema).

    Raises ToolSpecError naming the spec: bad syntax, a module that cannot be imported, a
    missing attribute, something not callable, or a signature with no JSON-schema form.
    """
    if not isinstance(spec, str) or not SPEC_RE.match(spec):
        raise ToolSpecError(f"tool spec {spec!r} is not 'package.module:function' (dotted module "
                            "path, a colon, then the function name)")
    module_name, attr_path = spec.split(":")
    _cwd_on_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ToolSpecError(f"tool {spec!r}: module {module_name!r} not found; is it "
                                "installed, on PYTHONPATH, or in the current directory where "
                                "the worker runs?") from None
        raise ToolSpecError(f"tool {spec!r}: importing {module_name!r} failed: {exc}") from None
    except Exception as exc:  # the module's own import-time bug
        raise ToolSpecError(f"tool {spec!r}: importing {module_name!r} raised "
                            f"{type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ToolSpecError(f"tool {spec!r}: {module_name!r} has no attribute "
                                f"{attr_path!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ToolSpecError(f"tool {spec!r}: {attr_path!r} is not a function (it is a "
                            f"{type(obj).__name__})")
    description, parameters = describe(obj, spec)
    return obj, description, parameters


def describe(fn: Callable[..., Any], spec: str) -> tuple[str, dict[str, Any]]:
    """(description, parameters schema) of a function, from its docstring and type hints."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ToolSpecError(f"tool {spec!r}: cannot read its signature ({exc})") from None
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as exc:  # unresolvable forward references and the like
        raise ToolSpecError(f"tool {spec!r}: cannot resolve its type hints ({exc})") from None
    summary, arg_docs = _parse_doc(inspect.getdoc(fn) or "")
    props: dict[str, Any] = {}
    required: list[str] = []
    for name, param in sig.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolSpecError(f"tool {spec!r}: *{name} parameters are not supported; declare "
                                "each argument by name")
        if param.kind is param.POSITIONAL_ONLY:
            raise ToolSpecError(f"tool {spec!r}: positional-only parameter {name!r} cannot be "
                                "passed by name; remove the '/'")
        try:
            schema = schema_for_type(hints.get(name, param.annotation),
                                     f"tool {spec!r} parameter {name!r}")
        except SchemaError as exc:
            raise ToolSpecError(str(exc)) from None
        if name in arg_docs:
            schema["description"] = arg_docs[name]
        if param.default is param.empty:
            required.append(name)
        else:
            try:
                json.dumps(param.default)
                schema["default"] = param.default
            except (TypeError, ValueError):
                pass
        props[name] = schema
    return summary or f"Python function {spec}", object_schema(props, required)


def _parse_doc(doc: str) -> tuple[str, dict[str, str]]:
    """(the docstring without its Args section, {argument: description})."""
    summary: list[str] = []
    args: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    for line in doc.splitlines():
        key = line.strip().lower()
        if key in _SECTION_HEADERS:
            section = "args" if key in _ARGS_HEADERS else "other"
            current = None
            if section == "other":
                summary.append(line)
            continue
        if section == "args":
            m = _ARG_LINE.match(line)
            if m and not line.startswith(" " * 8):
                current = m.group(1)
                args[current] = m.group(2).strip()
            elif current and line.strip():
                args[current] = (args[current] + " " + line.strip()).strip()
            continue
        summary.append(line)
    return "\n".join(summary).strip(), args


def make_caller(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The callable the registry invokes with keyword arguments (async awaited, sync threaded)."""
    return fn
