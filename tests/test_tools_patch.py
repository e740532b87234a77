"""The unified-diff applier, without I/O: real diffs apply, mismatches name file and hunk."""

import difflib
import re
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.tools.patch import PatchError, Text, apply_hunks, parse_patch


def apply(content: str, patch: str) -> str:
    (fp,) = parse_patch(patch)
    return apply_hunks(Text.parse(content), fp).render()


def udiff(a: str, b: str, name: str = "f.txt") -> str:
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True),
                                        f"a/{name}", f"b/{name}"))


OLD = "".join(f"line {i}\n" for i in range(1, 31))


def test_two_hunks_with_context_apply():
    new = OLD.replace("line 3\n", "line three\n").replace("line 25\n", "line 25\nextra\n")
    patch = udiff(OLD, new)
    assert patch.count("@@ -") == 2
    assert apply(OLD, patch) == new


def test_hunk_found_when_line_numbers_are_off_but_context_is_exact():
    new = OLD.replace("line 20\n", "LINE 20\n")
    patch = udiff(OLD, new)
    shifted = "header\nheader\n" + OLD
    assert apply(shifted, patch) == "header\nheader\n" + new


def test_context_mismatch_names_file_hunk_and_line():
    new = OLD.replace("line 20\n", "LINE 20\n")
    patch = udiff(OLD, new, "src/app.py")
    changed = OLD.replace("line 19\n", "line nineteen\n")
    with pytest.raises(PatchError) as err:
        apply(changed, patch)
    msg = str(err.value)
    assert "src/app.py" in msg and "hunk #1" in msg and "@@ -17,7 +17,7 @@" in msg
    assert "expects 'line 19' but the file has 'line nineteen'" in msg


def test_no_fuzz_whitespace_differences_do_not_match():
    patch = udiff("a\nb\nc\n", "a\nB\nc\n")
    with pytest.raises(PatchError):
        apply("a\nb \nc\n", patch)


def test_no_newline_at_end_of_file_markers_from_real_diff(tmp_path):
    (tmp_path / "a").write_text("one\ntwo")
    (tmp_path / "b").write_text("one\ntwo\nthree")
    out = subprocess.run(["diff", "-u", "a", "b"], cwd=tmp_path, capture_output=True,
                         text=True).stdout
    assert "\\ No newline at end of file" in out
    assert apply("one\ntwo", out) == "one\ntwo\nthree"
    (tmp_path / "c").write_text("one\ntwo\n")
    out = subprocess.run(["diff", "-u", "c", "a"], cwd=tmp_path, capture_output=True,
                         text=True).stdout
    assert apply("one\ntwo\n", out) == "one\ntwo"


def test_git_diff_with_several_files_creation_and_deletion(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (tmp_path / "keep.py").write_text(OLD)
    (tmp_path / "gone.txt").write_text("bye\nbye\n")
    git("add", ".")
    git("commit", "-qm", "x")
    (tmp_path / "keep.py").write_text(OLD.replace("line 7\n", "seven\n"))
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "new.md").write_text("# hi\n")
    git("add", "-A")
    patch = git("diff", "--cached")
    fps = {fp.path: fp for fp in parse_patch(patch)}
    assert set(fps) == {"keep.py", "gone.txt", "new.md"}
    assert fps["gone.txt"].new_path is None and fps["new.md"].old_path is None
    assert apply_hunks(Text.parse(OLD), fps["keep.py"]).render() == OLD.replace("line 7\n",
                                                                                "seven\n")
    assert apply_hunks(Text.parse(""), fps["new.md"]).render() == "# hi\n"
    assert apply_hunks(Text.parse("bye\nbye\n"), fps["gone.txt"]).lines == ()


def test_crlf_files_keep_their_line_endings():
    patch = udiff("a\nb\nc\n", "a\nB\nc\n")
    assert apply("a\r\nb\r\nc\r\n", patch) == "a\r\nB\r\nc\r\n"


def test_pure_insertion_hunk_with_zero_old_lines():
    patch = "--- a/f\n+++ b/f\n@@ -2,0 +3,2 @@\n+x\n+y\n"
    assert apply("1\n2\n3\n", patch) == "1\n2\nx\ny\n3\n"


def test_blank_context_line_with_its_space_stripped_still_counts():
    patch = "--- a/f\n+++ b/f\n@@ -1,3 +1,3 @@\n a\n\n-c\n+C\n"
    assert apply("a\n\nc\n", patch) == "a\n\nC\n"


@pytest.mark.parametrize("patch, words", [
    ("", "no file headers"),
    ("--- a/f\n@@ -1 +1 @@\n-a\n+b\n", "not followed by '+++ '"),
    ("--- a/f\n+++ b/f\n", "no hunks"),
    ("--- a/f\n+++ b/f\n@@ bogus @@\n", "bad header"),
    ("--- a/f\n+++ b/f\n@@ -1,3 +1,3 @@\n a\n-b\n", "ends early"),
    ("--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n*b\n+c\n", "does not start with"),
    ("@@ -1 +1 @@\n-a\n+b\n", "hunk header before"),
    ("--- /dev/null\n+++ /dev/null\n@@ -0,0 +1 @@\n+a\n", "both sides"),
])
def test_malformed_patches_are_refused_with_a_reason(patch, words):
    with pytest.raises(PatchError, match=re.escape(words)):
        parse_patch(patch)


def test_hunks_apply_in_order_and_do_not_overlap():
    a = "x\ny\nx\ny\n"
    patch = "--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n x\n-y\n+Y\n@@ -1,2 +1,2 @@\n x\n-y\n+Z\n"
    assert apply(a, patch) == "x\nY\nx\nZ\n"


lines = st.lists(st.sampled_from(["a", "b", "c", "", "def f():", "    return 1"]), max_size=25)


@settings(max_examples=200, deadline=None)
@given(lines, lines, st.integers(0, 3))
def test_any_difflib_diff_applies_and_gives_the_new_text(old, new, context):
    a = "".join(x + "\n" for x in old)
    b = "".join(x + "\n" for x in new)
    patch = "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True), "a/f", "b/f",
                                         n=context))
    if not patch:
        assert a == b
        return
    assert apply(a, patch) == b


patch_lines = st.sampled_from(["--- a/f", "+++ b/f", "--- /dev/null", "+++ /dev/null",
                               "@@ -1,2 +1,2 @@", "@@ -0,0 +1 @@", "@@ -1 +0,0 @@", " a", "-a",
                               "+b", "", "\\ No newline at end of file", "@@ x @@", "diff --git"])


@settings(max_examples=300, deadline=None)
@given(st.lists(patch_lines, max_size=12), st.text(alphabet="ab\n", max_size=12))
def test_hostile_patches_fail_only_with_patch_error(lines, content):
    try:
        fps = parse_patch("\n".join(lines))
        for fp in fps:
            apply_hunks(Text.parse(content), fp)
    except PatchError:
        pass
