"""Owns the workspace file tools: read_file, write_file, list_files, apply_patch, all confined to the workspace.

Invariant: every path is resolved (symlinks followed, `..` folded) and used only if the real
path is the workspace or inside it; absolute paths are refused outright. Writes go to the
resolved target, so a symlink inside the workspace is written through and one pointing outside
is refused. Limit: the check and the write are not one atomic step, so a process running at the
same time (say a backgrounded shell command) could swap a directory for a symlink in between;
the shell tool itself is not confined (it is a shell), so these checks guard the model's
mistakes, not a hostile command.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable
from typing import Any

import trio

from agents.tools.patch import FilePatch, PatchError, Text, apply_hunks, parse_patch
from agents.tools.registry import Tool, ToolContext, ToolError
from agents.tools.schema import object_schema

MAX_LIST_ENTRIES = 1000
MAX_READ_BYTES = 64 * 1024 * 1024  # bigger files are refused: read them in the shell


def resolve(workspace: pathlib.Path, path: str) -> pathlib.Path:
    """The real path of `path` (relative to `workspace`), or ToolError if it leaves the workspace."""
    if not isinstance(path, str) or not path.strip():
        raise ToolError("path is empty: give a path relative to the workspace, e.g. 'src/app.py'")
    if "\x00" in path:
        raise ToolError(f"path {path!r} contains a NUL byte")
    if os.path.isabs(path) or path.startswith("~"):
        raise ToolError(f"absolute path {path!r} refused: paths are relative to the workspace "
                        "(e.g. 'src/app.py', or '.' for the workspace itself)")
    root = os.path.realpath(workspace)
    real = os.path.realpath(os.path.join(root, path))
    if real != root and not real.startswith(root + os.sep):
        lexical = os.path.normpath(os.path.join(root, path))
        if lexical != root and not lexical.startswith(root + os.sep):
            raise ToolError(f"path {path!r} escapes the workspace ('..' leads outside it); "
                            "use a path inside the workspace")
        raise ToolError(f"path {path!r} resolves through a symlink to {real!r}, outside the "
                        "workspace; refused")
    return pathlib.Path(real)


def _rel(workspace: pathlib.Path, real: pathlib.Path) -> str:
    rel = os.path.relpath(real, os.path.realpath(workspace))
    return "." if rel == "." else rel


def _read_bytes(real: pathlib.Path, shown: str) -> bytes:
    """A file's bytes, or ToolError if it is missing, a directory or too big."""
    if not real.exists():
        raise ToolError(f"no such file {shown!r} (list_files shows what exists)")
    if real.is_dir():
        raise ToolError(f"{shown!r} is a directory; use list_files to see its entries")
    size = real.stat().st_size
    if size > MAX_READ_BYTES:
        raise ToolError(f"{shown!r} is {size} bytes, more than the {MAX_READ_BYTES} this tool "
                        "reads; use the shell (head, sed -n, grep) for parts of it")
    return real.read_bytes()


def read_file(ctx: ToolContext, path: str, offset: int = 1, limit: int | None = None) -> str:
    real = resolve(ctx.workspace, path)
    if offset < 1:
        raise ToolError(f"offset is a 1-based line number, got {offset}")
    if limit is not None and limit < 1:
        raise ToolError(f"limit must be at least 1 line, got {limit}")
    data = _read_bytes(real, path)
    if b"\x00" in data[:8192]:
        raise ToolError(f"{path!r} is a binary file ({len(data)} bytes); read_file shows text "
                        "files only (try the shell: xxd, file)")
    binary = False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text, binary = data.decode("utf-8", errors="replace"), True
    lines = text.splitlines(keepends=True)
    total = len(lines)
    if offset > max(total, 1):
        raise ToolError(f"offset {offset} is past the end of {path!r}, which has {total} lines")
    end = total if limit is None else min(total, offset - 1 + limit)
    budget = ctx.max_output_bytes
    out: list[str] = []
    used = 0
    last = offset - 1
    for i in range(offset - 1, end):
        n = len(lines[i].encode("utf-8", errors="replace"))
        if used + n > budget and out:
            break
        out.append(lines[i])
        used += n
        last = i + 1
    body = "".join(out)
    if binary:
        body = "[not valid UTF-8: undecodable bytes shown as U+FFFD]\n" + body
    if last < total:
        if body and not body.endswith("\n"):
            body += "\n"
        body += (f"[lines {offset}-{last} of {total} shown; call read_file with "
                 f"offset={last + 1} to read on]")
    return body


def _atomic_write(real: pathlib.Path, data: bytes) -> None:
    real.parent.mkdir(parents=True, exist_ok=True)
    mode = real.stat().st_mode & 0o7777 if real.exists() else None
    fd, tmp = tempfile.mkstemp(dir=real.parent, prefix=f".{real.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _why(workspace: pathlib.Path, exc: OSError) -> str:
    """Why a write failed, with paths relative to the workspace (the model never sees where
    the workspace lives)."""
    shown = _rel(workspace, pathlib.Path(exc.filename)) if exc.filename else None
    if isinstance(exc, (FileExistsError, NotADirectoryError)) and shown:
        return f"{shown!r} is a file, so it cannot be a directory on the path"
    return f"{exc.strerror or type(exc).__name__}" + (f": {shown!r}" if shown else "")


def write_file(ctx: ToolContext, path: str, content: str) -> str:
    real = resolve(ctx.workspace, path)
    if real.is_dir():
        raise ToolError(f"{path!r} is a directory; give a file path")
    existed = real.exists()
    data = content.encode("utf-8", errors="surrogatepass")
    try:
        _atomic_write(real, data)
    except OSError as exc:
        raise ToolError(f"cannot write {path!r}: {_why(ctx.workspace, exc)}") from None
    verb = "replaced" if existed else "created"
    return f"{verb} {_rel(ctx.workspace, real)}: {len(data)} bytes, {len(content.splitlines())} lines"


def list_files(ctx: ToolContext, path: str = ".", recursive: bool = False) -> str:
    real = resolve(ctx.workspace, path)
    if not real.exists():
        raise ToolError(f"no such directory {path!r}")
    if not real.is_dir():
        return _rel(ctx.workspace, real)
    root = os.path.realpath(ctx.workspace)
    entries: list[str] = []
    more = False

    def describe(full: str) -> str:
        rel = os.path.relpath(full, root)
        if os.path.islink(full):
            return f"{rel} -> {os.readlink(full)}"
        return rel + "/" if os.path.isdir(full) else rel

    if recursive:
        for dirpath, dirnames, filenames in os.walk(real, followlinks=False):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                entries.append(describe(os.path.join(dirpath, name)))
            if len(entries) > MAX_LIST_ENTRIES:
                more = True
                break
    else:
        for name in sorted(os.listdir(real)):
            entries.append(describe(os.path.join(real, name)))
    if not recursive:
        entries.sort()
    if len(entries) > MAX_LIST_ENTRIES:
        more = True
        entries = entries[:MAX_LIST_ENTRIES]
    if not entries:
        return f"{_rel(ctx.workspace, real)} is empty"
    out = "\n".join(entries)
    if more:
        out += f"\n[more than {MAX_LIST_ENTRIES} entries; list a subdirectory to see the rest]"
    return out


def apply_patch(ctx: ToolContext, patch: str) -> str:
    """Apply a unified diff to the workspace, all files or none."""
    try:
        file_patches = parse_patch(patch)
    except PatchError as exc:
        raise ToolError(f"malformed patch: {exc}") from None
    # path (real) -> new content, or None for deleted; computed fully before anything is written
    state: dict[pathlib.Path, str | None] = {}
    originals: dict[pathlib.Path, bytes | None] = {}
    summary: list[str] = []

    def current(real: pathlib.Path, shown: str) -> str | None:
        if real in state:
            return state[real]
        if not real.exists():
            return None
        if real.is_dir():
            raise ToolError(f"patch targets {shown!r}, which is a directory")
        data = real.read_bytes()
        originals[real] = data
        if b"\x00" in data:
            raise ToolError(f"patch targets {shown!r}, a binary file; apply_patch edits text only")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError(f"patch targets {shown!r}, which is not UTF-8 text") from None

    for fp in file_patches:
        _plan(ctx, fp, state, originals, summary, current)
    written: list[pathlib.Path] = []
    try:
        for real, content in state.items():
            if real not in originals:
                originals[real] = real.read_bytes() if real.is_file() else None
            written.append(real)
            if content is None:
                if real.exists():
                    real.unlink()
            else:
                _atomic_write(real, content.encode("utf-8"))
    except OSError as exc:
        for real in written:  # roll back what was already written
            before = originals.get(real)
            try:
                if before is None:
                    if real.exists():
                        real.unlink()
                else:
                    _atomic_write(real, before)
            except OSError:
                pass
        raise ToolError(f"writing the patched files failed ({_why(ctx.workspace, exc)}); no "
                        "file was changed") from None
    return "applied: " + "; ".join(summary)


def _plan(ctx: ToolContext, fp: FilePatch, state: dict[pathlib.Path, str | None],
          originals: dict[pathlib.Path, bytes | None], summary: list[str],
          current: Callable[[pathlib.Path, str], str | None]) -> None:
    old_real = resolve(ctx.workspace, fp.old_path) if fp.old_path is not None else None
    new_real = resolve(ctx.workspace, fp.new_path) if fp.new_path is not None else None
    n = len(fp.hunks)
    hunks = f"{n} hunk{'s' if n != 1 else ''}"
    try:
        if old_real is None:  # create
            assert new_real is not None and fp.new_path is not None
            if current(new_real, fp.new_path) is not None:
                raise ToolError(f"patch creates {fp.new_path!r} (--- /dev/null) but it already "
                                "exists; patch it against its current content instead")
            result = apply_hunks(Text.parse(""), fp)
            state[new_real] = result.render()
            summary.append(f"created {fp.new_path}")
            return
        assert fp.old_path is not None
        before = current(old_real, fp.old_path)
        if before is None:
            raise ToolError(f"patch changes {fp.old_path!r}, which does not exist "
                            "(to create a file, use '--- /dev/null')")
        result = apply_hunks(Text.parse(before), fp)
        if new_real is None:  # delete
            if result.lines:
                raise ToolError(f"patch deletes {fp.old_path!r} (+++ /dev/null) but its hunks "
                                f"leave {len(result.lines)} lines: the file has lines the "
                                "patch does not remove")
            state[old_real] = None
            summary.append(f"deleted {fp.old_path}")
            return
        assert fp.new_path is not None
        if new_real != old_real:  # rename
            if current(new_real, fp.new_path) is not None:
                raise ToolError(f"patch renames {fp.old_path!r} to {fp.new_path!r}, which "
                                "already exists")
            state[old_real] = None
            state[new_real] = result.render()
            summary.append(f"renamed {fp.old_path} to {fp.new_path} ({hunks})")
            return
        state[old_real] = result.render()
        summary.append(f"patched {fp.old_path} ({hunks})")
    except PatchError as exc:
        raise ToolError(f"{exc}; no file was changed") from None


# Tool definitions -------------------------------------------------------------------------

def _threaded(ctx: ToolContext, fn: Callable[..., str]) -> Callable[..., Any]:
    # File work is blocking I/O: a thread, never abandoned (a half-done write must finish).
    async def run(**kwargs: Any) -> str:
        return await trio.to_thread.run_sync(lambda: fn(ctx, **kwargs))

    return run


def read_file_tool(ctx: ToolContext) -> Tool:
    return Tool(
        name="read_file",
        description=("Read a text file in the workspace. Returns its lines; for long files, "
                     "use offset (1-based first line) and limit (number of lines)."),
        parameters=object_schema({
            "path": {"type": "string", "description": "Path relative to the workspace."},
            "offset": {"type": "integer", "description": "First line to return (1-based)."},
            "limit": {"type": "integer", "description": "Maximum number of lines."},
        }, ["path"]),
        fn=_threaded(ctx, read_file),
    )


def write_file_tool(ctx: ToolContext) -> Tool:
    return Tool(
        name="write_file",
        description=("Create or replace a file in the workspace with the given content "
                     "(parent directories are created)."),
        parameters=object_schema({
            "path": {"type": "string", "description": "Path relative to the workspace."},
            "content": {"type": "string", "description": "The whole new content."},
        }, ["path", "content"]),
        fn=_threaded(ctx, write_file),
    )


def list_files_tool(ctx: ToolContext) -> Tool:
    return Tool(
        name="list_files",
        description=("List a directory of the workspace (default: its top). Directories end "
                     "with '/', symlinks show their target."),
        parameters=object_schema({
            "path": {"type": "string", "description": "Directory relative to the workspace."},
            "recursive": {"type": "boolean", "description": "Include all subdirectories."},
        }, []),
        fn=_threaded(ctx, list_files),
    )


def apply_patch_tool(ctx: ToolContext) -> Tool:
    return Tool(
        name="apply_patch",
        description=("Apply a unified diff (as from `diff -u` or `git diff`) to files in the "
                     "workspace. Several files per patch; '--- /dev/null' creates a file, "
                     "'+++ /dev/null' deletes one. Context lines must match exactly. All files "
                     "change or none do."),
        parameters=object_schema({
            "patch": {"type": "string", "description": "The unified diff text."},
        }, ["patch"]),
        fn=_threaded(ctx, apply_patch),
    )
