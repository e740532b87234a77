"""Workspace file tools: confined to the workspace (absolute, `..`, symlinks refused), all-or-nothing patches."""

import difflib
import json
import os

import pytest
import trio

from agents.tools import ToolContext, build_registry

FILE_TOOLS = ["read_file", "write_file", "list_files", "apply_patch"]


@pytest.fixture
def setup(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("top secret\n")
    ctx = ToolContext(workspace=ws, env={})
    return ws, outside, build_registry(FILE_TOOLS, ctx)


async def call(registry, name, **kw):
    with trio.fail_after(5):
        return await registry.call(name, json.dumps(kw))


async def test_write_then_read_round_trip_with_parent_dirs_created(setup):
    ws, _, reg = setup
    res = await call(reg, "write_file", path="src/pkg/mod.py", content="x = 1\ny = 2\n")
    assert res.ok and res.output == "created src/pkg/mod.py: 12 bytes, 2 lines"
    assert (ws / "src/pkg/mod.py").read_text() == "x = 1\ny = 2\n"
    res = await call(reg, "read_file", path="src/pkg/mod.py")
    assert res.ok and res.output == "x = 1\ny = 2\n"
    res = await call(reg, "write_file", path="src/pkg/mod.py", content="z")
    assert res.output.startswith("replaced")


async def test_writing_under_a_file_is_a_tool_error_with_a_relative_path(setup):
    # it was "tool 'write_file' raised FileExistsError: ... '/tmp/.../ws/a.txt'"
    ws, _, reg = setup
    (ws / "a.txt").write_text("a file\n")
    res = await call(reg, "write_file", path="a.txt/x", content="y")
    assert not res.ok
    assert res.error == "cannot write 'a.txt/x': 'a.txt' is a file, so it cannot be a " \
        "directory on the path"


async def test_read_with_offset_and_limit_says_how_to_read_on(setup):
    ws, _, reg = setup
    (ws / "f.txt").write_text("".join(f"{i}\n" for i in range(1, 101)))
    res = await call(reg, "read_file", path="f.txt", offset=10, limit=3)
    assert res.ok
    assert res.output == "10\n11\n12\n[lines 10-12 of 100 shown; call read_file with offset=13 to read on]"
    res = await call(reg, "read_file", path="f.txt", offset=500)
    assert not res.ok and "past the end" in res.error and "100 lines" in res.error


async def test_large_file_is_cut_at_the_output_budget_with_a_hint(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    reg = build_registry(["read_file"], ToolContext(workspace=ws, max_output_bytes=1000))
    (ws / "big.txt").write_text("".join(f"line {i:04d}\n" for i in range(1000)))
    res = await call(reg, "read_file", path="big.txt")
    assert res.ok and len(res.output) < 1200
    assert "call read_file with offset=" in res.output


async def test_binary_and_missing_files_and_directories_are_tool_errors(setup):
    ws, _, reg = setup
    (ws / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (ws / "d").mkdir()
    res = await call(reg, "read_file", path="blob.bin")
    assert not res.ok and "binary file" in res.error
    res = await call(reg, "read_file", path="nope.txt")
    assert not res.ok and "no such file 'nope.txt'" in res.error
    res = await call(reg, "read_file", path="d")
    assert not res.ok and "is a directory" in res.error
    res = await call(reg, "write_file", path="d", content="x")
    assert not res.ok and "is a directory" in res.error


async def test_latin1_file_is_read_with_replacement_and_marked(setup):
    ws, _, reg = setup
    (ws / "l1.txt").write_bytes("café\n".encode("latin-1"))
    res = await call(reg, "read_file", path="l1.txt")
    assert res.ok and res.output.startswith("[not valid UTF-8") and "caf\ufffd" in res.output


@pytest.mark.parametrize("tool, extra", [
    ("read_file", {}), ("write_file", {"content": "pwned"}), ("list_files", {}),
])
async def test_absolute_paths_are_refused(setup, tool, extra):
    _, outside, reg = setup
    res = await call(reg, tool, path=str(outside / "secret.txt"), **extra)
    assert not res.ok and "absolute path" in res.error
    assert (outside / "secret.txt").read_text() == "top secret\n"


@pytest.mark.parametrize("tool, extra", [
    ("read_file", {}), ("write_file", {"content": "pwned"}), ("list_files", {}),
])
async def test_dotdot_escapes_are_refused(setup, tool, extra):
    _, outside, reg = setup
    res = await call(reg, tool, path="sub/../../outside/secret.txt", **extra)
    assert not res.ok and "escapes the workspace" in res.error
    assert (outside / "secret.txt").read_text() == "top secret\n"


async def test_dotdot_that_stays_inside_is_fine(setup):
    ws, _, reg = setup
    (ws / "a").mkdir()
    res = await call(reg, "write_file", path="a/../b.txt", content="ok")
    assert res.ok and (ws / "b.txt").read_text() == "ok"


async def test_symlinks_resolving_outside_are_refused_for_every_tool(setup):
    ws, outside, reg = setup
    os.symlink(outside, ws / "linkdir")
    os.symlink(outside / "secret.txt", ws / "linkfile")
    os.symlink(outside / "not-yet.txt", ws / "dangling")
    for path in ("linkdir/secret.txt", "linkfile"):
        res = await call(reg, "read_file", path=path)
        assert not res.ok and "symlink" in res.error and "outside the workspace" in res.error
    for path in ("linkdir/secret.txt", "linkfile", "dangling", "linkdir/new.txt"):
        res = await call(reg, "write_file", path=path, content="pwned")
        assert not res.ok and "outside the workspace" in res.error, path
    res = await call(reg, "list_files", path="linkdir")
    assert not res.ok and "outside the workspace" in res.error
    assert (outside / "secret.txt").read_text() == "top secret\n"
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (ws / "linkfile").is_symlink()  # not replaced by a regular file either


async def test_symlink_inside_the_workspace_is_written_through(setup):
    ws, _, reg = setup
    (ws / "real.txt").write_text("old\n")
    os.symlink("real.txt", ws / "alias.txt")
    res = await call(reg, "write_file", path="alias.txt", content="new\n")
    assert res.ok
    assert (ws / "real.txt").read_text() == "new\n"
    assert (ws / "alias.txt").is_symlink()


async def test_list_files_flat_and_recursive_without_following_symlinks(setup):
    ws, outside, reg = setup
    (ws / "src/deep").mkdir(parents=True)
    (ws / "src/deep/x.py").write_text("")
    (ws / "README").write_text("")
    os.symlink(outside, ws / "out")
    res = await call(reg, "list_files")
    assert res.ok and res.output.splitlines() == ["README", f"out -> {outside}", "src/"]
    res = await call(reg, "list_files", path="src", recursive=True)
    assert res.output.splitlines() == ["src/deep/", "src/deep/x.py"]
    res = await call(reg, "list_files", recursive=True)
    assert "secret.txt" not in res.output
    (ws / "empty").mkdir()
    res = await call(reg, "list_files", path="empty")
    assert res.output == "empty is empty"


def udiff(name, a, b):
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True),
                                        f"a/{name}" if a else "/dev/null",
                                        f"b/{name}" if b else "/dev/null"))


async def test_apply_patch_modifies_creates_and_deletes_several_files(setup):
    ws, _, reg = setup
    (ws / "a.py").write_text("def f():\n    return 1\n")
    (ws / "old.txt").write_text("remove me\n")
    patch = (udiff("a.py", "def f():\n    return 1\n", "def f():\n    return 2\n")
             + udiff("new/b.py", "", "print('hi')\n")
             + udiff("old.txt", "remove me\n", ""))
    res = await call(reg, "apply_patch", patch=patch)
    assert res.ok, res.error
    assert res.output == "applied: patched a.py (1 hunk); created new/b.py; deleted old.txt"
    assert (ws / "a.py").read_text() == "def f():\n    return 2\n"
    assert (ws / "new/b.py").read_text() == "print('hi')\n"
    assert not (ws / "old.txt").exists()


async def test_apply_patch_is_all_or_nothing_and_names_the_failing_hunk(setup):
    ws, _, reg = setup
    (ws / "a.py").write_text("one\ntwo\n")
    (ws / "b.py").write_text("three\nfour\n")
    patch = (udiff("a.py", "one\ntwo\n", "one\nTWO\n")
             + udiff("b.py", "three\nFOUR?\n", "three\nfour!\n")
             + udiff("c.py", "", "new\n"))
    res = await call(reg, "apply_patch", patch=patch)
    assert not res.ok
    assert "b.py, hunk #1" in res.error and "no file was changed" in res.error
    assert (ws / "a.py").read_text() == "one\ntwo\n"
    assert not (ws / "c.py").exists()


async def test_apply_patch_refuses_paths_outside_and_bad_creates(setup):
    ws, outside, reg = setup
    res = await call(reg, "apply_patch",
                     patch=udiff("../outside/secret.txt", "top secret\n", "leaked\n"))
    assert not res.ok and "escapes the workspace" in res.error
    os.symlink(outside, ws / "o")
    res = await call(reg, "apply_patch", patch=udiff("o/secret.txt", "top secret\n", "x\n"))
    assert not res.ok and "outside the workspace" in res.error
    assert (outside / "secret.txt").read_text() == "top secret\n"
    (ws / "exists.txt").write_text("x\n")
    res = await call(reg, "apply_patch", patch=udiff("exists.txt", "", "y\n"))
    assert not res.ok and "already exists" in res.error
    res = await call(reg, "apply_patch", patch=udiff("missing.txt", "a\n", "b\n"))
    assert not res.ok and "does not exist" in res.error
    res = await call(reg, "apply_patch", patch="this is not a diff")
    assert not res.ok and "malformed patch" in res.error


async def test_apply_patch_delete_must_remove_every_line(setup):
    ws, _, reg = setup
    (ws / "f.txt").write_text("a\nb\n")
    patch = "--- a/f.txt\n+++ /dev/null\n@@ -1,1 +0,0 @@\n-a\n"
    res = await call(reg, "apply_patch", patch=patch)
    assert not res.ok and "leave 1 lines" in res.error
    assert (ws / "f.txt").exists()


async def test_apply_patch_keeps_file_mode(setup):
    ws, _, reg = setup
    (ws / "run.sh").write_text("echo 1\n")
    os.chmod(ws / "run.sh", 0o755)
    res = await call(reg, "apply_patch", patch=udiff("run.sh", "echo 1\n", "echo 2\n"))
    assert res.ok
    assert os.stat(ws / "run.sh").st_mode & 0o777 == 0o755


async def test_apply_patch_rolls_back_written_files_when_a_later_write_fails(setup):
    ws, _, reg = setup
    (ws / "a.txt").write_text("old\n")
    (ws / "x").write_text("a file, not a directory\n")
    patch = udiff("a.txt", "old\n", "new\n") + udiff("x/y.txt", "", "cannot be written\n")
    res = await call(reg, "apply_patch", patch=patch)
    assert not res.ok and "no file was changed" in res.error
    assert "'x' is a file, so it cannot be a directory on the path" in res.error
    assert str(ws) not in res.error  # where the workspace lives is not the model's business
    assert (ws / "a.txt").read_text() == "old\n"
    assert sorted(p.name for p in ws.iterdir()) == ["a.txt", "x"]  # no temporary files left


async def test_apply_patch_renames_with_changes(setup):
    ws, _, reg = setup
    (ws / "old.py").write_text("a\nb\n")
    patch = "--- a/old.py\n+++ b/pkg/new.py\n@@ -1,2 +1,2 @@\n a\n-b\n+B\n"
    res = await call(reg, "apply_patch", patch=patch)
    assert res.ok and res.output == "applied: renamed old.py to pkg/new.py (1 hunk)"
    assert not (ws / "old.py").exists()
    assert (ws / "pkg/new.py").read_text() == "a\nB\n"


async def test_apply_patch_two_patches_to_one_file_in_one_diff(setup):
    ws, _, reg = setup
    (ws / "f.txt").write_text("1\n2\n3\n")
    patch = ("--- a/f.txt\n+++ b/f.txt\n@@ -1,2 +1,2 @@\n-1\n+one\n 2\n"
             "--- a/f.txt\n+++ b/f.txt\n@@ -2,2 +2,2 @@\n 2\n-3\n+three\n")
    res = await call(reg, "apply_patch", patch=patch)
    assert res.ok, res.error
    assert (ws / "f.txt").read_text() == "one\n2\nthree\n"
