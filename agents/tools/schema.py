"""Owns the JSON-schema subset tools are described with: validation of arguments, and schemas from type hints.

The subset: `type` (object, string, integer, number, boolean, array, null, or a list of them),
`properties`, `required`, `additionalProperties: false`, `enum`, `items`. Anything else in a
schema is accepted and ignored (descriptions, defaults). Pure functions, no I/O.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "string": lambda v: isinstance(v, str),
    # bool is an int in Python but not in JSON: true is not an integer.
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


class SchemaError(Exception):
    """A tool's own schema or signature cannot be expressed in the supported subset (the tool author's fault)."""


def _json_type_name(value: Any) -> str:
    for name in ("boolean", "integer", "number", "string", "array", "object", "null"):
        if _TYPE_CHECKS[name](value):
            return name
    return type(value).__name__


def _where(path: str) -> str:
    return f"argument {path!r}" if path else "the arguments"


def validate(value: Any, schema: dict[str, Any], path: str = "") -> str | None:
    """Check `value` against `schema`; return None if it matches, else a message naming the bad field.

    The message is written for a model: it says which argument is wrong and what was expected.
    """
    expected = schema.get("type")
    if expected is not None:
        names = [expected] if isinstance(expected, str) else list(expected)
        if not any(_TYPE_CHECKS.get(n, lambda v: True)(value) for n in names):
            want = " or ".join(names)
            return f"{_where(path)} must be {want}, got {_json_type_name(value)}"
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(repr(e) for e in schema["enum"])
        return f"{_where(path)} must be one of {allowed}, got {value!r}"
    if isinstance(value, dict):
        props: dict[str, Any] = schema.get("properties", {})
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            return (f"missing required argument{'s' if len(missing) > 1 else ''} "
                    + ", ".join(repr(_join(path, k)) for k in missing))
        if schema.get("additionalProperties") is False:
            extra = [k for k in value if k not in props]
            if extra:
                known = ", ".join(repr(k) for k in props) or "none"
                return (f"unknown argument{'s' if len(extra) > 1 else ''} "
                        + ", ".join(repr(_join(path, k)) for k in extra)
                        + f" (accepted: {known})")
        for key, sub in props.items():
            if key in value:
                err = validate(value[key], sub, _join(path, key))
                if err:
                    return err
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            err = validate(item, schema["items"], f"{path}[{i}]")
            if err:
                return err
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def object_schema(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """The parameters schema of a tool: a closed object."""
    return {"type": "object", "properties": properties, "required": required,
            "additionalProperties": False}


def schema_for_type(hint: Any, where: str) -> dict[str, Any]:
    """JSON schema for one Python type hint. Raises SchemaError naming `where` if unsupported."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        return schema_for_type(args[0], where)
    if hint is str:
        return {"type": "string"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is type(None):
        return {"type": "null"}
    if hint is list or hint is tuple:
        return {"type": "array"}
    if hint is dict:
        return {"type": "object"}
    if origin in (list, tuple, set, frozenset) or (
            origin is not None and getattr(origin, "__name__", "") in ("Sequence", "Iterable")):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = args[:1]
        if len(args) == 1:
            return {"type": "array", "items": schema_for_type(args[0], where)}
        return {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    if origin is Literal:
        values = list(args)
        kinds = {_json_type_name(v) for v in values}
        out: dict[str, Any] = {"enum": values}
        if len(kinds) == 1:
            out["type"] = kinds.pop()
        return out
    if origin is Union or origin is types.UnionType:
        members = [a for a in args if a is not type(None)]
        nullable = len(members) < len(args)
        subs = [schema_for_type(m, where) for m in members]
        if all("type" in s and isinstance(s["type"], str) and set(s) == {"type"} for s in subs):
            names = [s["type"] for s in subs] + (["null"] if nullable else [])
            return {"type": names[0] if len(names) == 1 else names}
        if len(subs) == 1:
            sub = dict(subs[0])
            if nullable and isinstance(sub.get("type"), str):
                sub["type"] = [sub["type"], "null"]
                if "enum" in sub:
                    sub["enum"] = [*sub["enum"], None]
            return sub
        raise SchemaError(f"{where}: union {hint!r} is not supported; use one type, "
                          "Optional[X] or Literal[...]")
    raise SchemaError(f"{where}: type {hint!r} is not supported; use str, int, float, bool, "
                      "list[X], dict, Optional[X] or Literal[...]")
