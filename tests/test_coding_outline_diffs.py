"""The coding plugin's pure parts: symbol outlines per language (tree-sitter), and unified
diffs (read, applied strictly, review comments checked), on diffs that `git diff`,
`diff -u` and `difflib.unified_diff` really write."""

from __future__ import annotations

import difflib
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.coding.diffs import (
    DiffError,
    diff_apply,
    diff_parse,
    review_comments_check,
    shown_lines,
)
from plugins.coding.outline import UnsupportedLanguage, language_for, outline

# --- outline ------------------------------------------------------------------------------

SOURCES = {
    "shapes.py": (
        "import math\n\n\n@dataclass\nclass Shape:\n    def area(self):\n"
        "        def helper():\n            return 1\n        return helper()\n\n\n"
        "async def main():\n    pass\n",
        [
            ("class", "Shape", 5, 9, 0),
            ("method", "area", 6, 9, 1),
            ("function", "helper", 7, 8, 2),
            ("function", "main", 12, 13, 0),
        ],
    ),
    "box.ts": (
        "export interface Point { x: number }\ntype Id = string;\nenum Color { Red }\n"
        "export class Box<T> {\n  constructor(private v: T) {}\n  get(): T { return this.v }\n}\n"
        "export function make(): Box<number> { return new Box(1) }\n"
        "const handler = async (e: Event) => {};\n",
        [
            ("interface", "Point", 1, 1, 0),
            ("type", "Id", 2, 2, 0),
            ("enum", "Color", 3, 3, 0),
            ("class", "Box", 4, 7, 0),
            ("method", "constructor", 5, 5, 1),
            ("method", "get", 6, 6, 1),
            ("function", "make", 8, 8, 0),
            ("function", "handler", 9, 9, 0),
        ],
    ),
    "app.jsx": (
        "class A {\n  m() {}\n}\nfunction f() {}\nconst g = function () {};\n",
        [
            ("class", "A", 1, 3, 0),
            ("method", "m", 2, 2, 1),
            ("function", "f", 4, 4, 0),
            ("function", "g", 5, 5, 0),
        ],
    ),
    "server.go": (
        "package main\n\ntype Server struct {\n\tport int\n}\n\n"
        "type Handler interface{ Serve() }\n\n"
        "func (s *Server) Start() error {\n\treturn nil\n}\n\nfunc main() {}\n",
        [
            ("struct", "Server", 3, 5, 0),
            ("interface", "Handler", 7, 7, 0),
            ("method", "Server.Start", 9, 11, 0),
            ("function", "main", 13, 13, 0),
        ],
    ),
    "lib.rs": (
        "struct P { x: i32 }\ntrait T {\n    fn t(&self);\n}\n"
        "impl T for P {\n    fn t(&self) {}\n}\n"
        "impl P {\n    pub fn new() -> Self { P { x: 0 } }\n}\nfn main() {}\n",
        [
            ("struct", "P", 1, 1, 0),
            ("trait", "T", 2, 4, 0),
            ("method", "t", 3, 3, 1),
            ("impl", "T for P", 5, 7, 0),
            ("method", "t", 6, 6, 1),
            ("impl", "P", 8, 10, 0),
            ("method", "new", 9, 9, 1),
            ("function", "main", 11, 11, 0),
        ],
    ),
    "src/A.java": (
        "package x;\npublic class A {\n  public A() {}\n  void run() {}\n  enum E { X }\n}\n",
        [
            ("class", "A", 2, 6, 0),
            ("constructor", "A", 3, 3, 1),
            ("method", "run", 4, 4, 1),
            ("enum", "E", 5, 5, 1),
        ],
    ),
    "point.c": (
        "#include <stdio.h>\nstruct point { int x; };\ntypedef int id;\n"
        "static int *make(int n) {\n  return 0;\n}\nint main(void) { return 0; }\n",
        [
            ("struct", "point", 2, 2, 0),
            ("type", "id", 3, 3, 0),
            ("function", "make", 4, 6, 0),
            ("function", "main", 7, 7, 0),
        ],
    ),
    "shape.hpp": (
        "namespace geo {\nclass Shape {\n public:\n  double area() const { return 0; }\n};\n}\n"
        "double geo::Circle::area() const { return 1; }\n",
        [
            ("namespace", "geo", 1, 6, 0),
            ("class", "Shape", 2, 5, 1),
            ("method", "area", 4, 4, 2),
            ("method", "geo::Circle::area", 7, 7, 0),
        ],
    ),
}


@pytest.mark.parametrize("path", list(SOURCES))
def test_the_outline_of_each_language(path):
    text, expected = SOURCES[path]
    symbols = outline(path, text)
    assert [(s.kind, s.name, s.line, s.end_line, s.depth) for s in symbols] == expected


def test_an_unknown_language_has_a_clear_answer():
    assert language_for("notes.txt") is None and language_for("Makefile") is None
    with pytest.raises(UnsupportedLanguage, match=r"no outline for 'notes.txt'.*\.py"):
        outline("docs/notes.txt", "hello")


def test_a_file_with_syntax_errors_still_has_an_outline_and_deep_nesting_is_no_trouble():
    broken = "def good():\n    pass\n\ndef broken(:\n\nclass After:\n    pass\n"
    names = [s.name for s in outline("x.py", broken)]
    assert "good" in names and "After" in names
    deep = "x = " + "[" * 3000 + "]" * 3000 + "\n\ndef f():\n    pass\n"
    assert [s.name for s in outline("deep.py", deep)] == ["f"]


# --- diffs from the real tools --------------------------------------------------------------

OLD = {
    "src/app.py": "".join(f"line {n}\n" for n in range(1, 61)),
    "README.md": "# Project\n\nSome words.\n",
    "gone.txt": "to be deleted\nsecond\n",
    "moved/old_name.py": "print('hello')\n",
    "no_newline.txt": "first\nlast without newline",
    "gets_no_newline.txt": "alpha\nbeta\n",
}


def _changed(old: dict[str, str]) -> dict[str, str | None]:
    new: dict[str, str | None] = dict(old)
    lines = old["src/app.py"].splitlines(keepends=True)
    lines[4] = "line 5 changed\n"
    lines.insert(20, "inserted after 20\n")
    del lines[45]
    new["src/app.py"] = "".join(lines)
    new["README.md"] = "# Project\n\nSome better words.\n"
    new["gone.txt"] = None
    new["brand/new.py"] = "def new():\n    return 1\n"
    new["moved/old_name.py"] = None
    new["moved/new_name.py"] = "print('hello')\n"
    new["no_newline.txt"] = "first\nlast, now with a newline\n"
    new["gets_no_newline.txt"] = "alpha\nbeta, no newline"
    return new


def _write(root: Path, files: dict[str, str | None]) -> None:
    for path, text in files.items():
        if text is not None:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(text.encode())


def _expected(old: dict[str, str], new: dict[str, str | None]) -> dict[str, str | None]:
    return {p: t for p, t in new.items() if t != old.get(p)}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_a_git_diff_applies_to_the_old_tree_and_gives_the_new(tmp_path):
    new = _changed(OLD)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    git("init", "-q")
    _write(tmp_path, OLD)
    git("add", "-A")
    git("commit", "-qm", "old")
    for path, text in new.items():
        if text is None:
            (tmp_path / path).unlink()
    _write(tmp_path, new)
    git("add", "-A")
    diff = git("diff", "--cached", "-M")
    files = {f.path: f for f in diff_parse(diff)}
    assert files["brand/new.py"].is_new and files["gone.txt"].is_deleted
    assert files["moved/new_name.py"].is_rename
    assert files["moved/new_name.py"].old_path == "moved/old_name.py"
    assert len(files["src/app.py"].hunks) == 3
    assert diff_apply(OLD, diff) == _expected(OLD, new)


def test_difflib_unified_diffs_apply_with_their_line_numbers():
    old, new = OLD["src/app.py"], _changed(OLD)["src/app.py"]
    assert isinstance(new, str)
    diff = "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True),
            new.splitlines(keepends=True),
            "a/src/app.py",
            "b/src/app.py",
        )
    )
    (file,) = diff_parse(diff)
    assert file.path == "src/app.py" and not file.is_new and not file.is_deleted
    first = file.hunks[0]
    assert (first.old_start, first.new_start) == (2, 2)
    removed = next(line for line in first.lines if line.kind == "-")
    added = next(line for line in first.lines if line.kind == "+")
    assert (removed.text, removed.old, removed.new) == ("line 5", 5, None)
    assert (added.text, added.old, added.new) == ("line 5 changed", None, 5)
    assert diff_apply({"src/app.py": old}, diff) == {"src/app.py": new}


@pytest.mark.skipif(shutil.which("diff") is None, reason="diff is not installed")
def test_plain_diff_u_and_diff_ruN_apply(tmp_path):
    new = _changed(OLD)
    _write(tmp_path / "a", OLD)
    _write(tmp_path / "b", new)
    ruN = subprocess.run(
        ["diff", "-ruN", "a", "b"], cwd=tmp_path, capture_output=True, text=True
    ).stdout
    assert "--- a/src/app.py\t" in ruN  # with its timestamp
    # diff -N writes new and deleted files as empty ones: the deleted file stays, empty.
    expected = _expected(OLD, new)
    expected["gone.txt"] = ""
    expected["moved/old_name.py"] = ""
    assert diff_apply(OLD, ruN) == expected

    one = subprocess.run(
        ["diff", "-u", "a/no_newline.txt", "b/no_newline.txt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout
    assert "\\ No newline at end of file" in one
    assert diff_apply(OLD, one) == {"no_newline.txt": new["no_newline.txt"]}


def test_a_hunk_whose_context_does_not_match_names_the_file_and_the_hunk():
    old = OLD["src/app.py"]
    new = old.replace("line 30\n", "line thirty\n")
    diff = "".join(
        difflib.unified_diff(
            old.splitlines(True), new.splitlines(True), "a/src/app.py", "b/src/app.py"
        )
    )
    edited = old.replace("line 29\n", "line 29 edited meanwhile\n")
    with pytest.raises(DiffError) as caught:
        diff_apply({"src/app.py": edited}, diff)
    message = str(caught.value)
    assert message.startswith("src/app.py, hunk 1 (@@ -27,7 +27,7 @@)")
    assert "'line 29'" in message and "'line 29 edited meanwhile'" in message


def test_a_plain_diff_naming_the_same_path_twice_keeps_it():
    diff = "--- src/app.py\n+++ src/app.py\n@@ -1 +1 @@\n-line 1\n+line one\n"
    (file,) = diff_parse(diff)
    assert (file.old_path, file.new_path) == ("src/app.py", "src/app.py")
    result = diff_apply(OLD, diff)
    assert result == {"src/app.py": OLD["src/app.py"].replace("line 1\n", "line one\n", 1)}


def test_a_hunk_with_wrong_line_numbers_applies_where_its_context_matches():
    old = OLD["src/app.py"]
    diff = (
        "--- a/src/app.py\n+++ b/src/app.py\n@@ -10,3 +10,3 @@\n line 20\n-line 21\n+line 21!\n"
        " line 22\n"
    )
    result = diff_apply({"src/app.py": old}, diff)
    assert result == {"src/app.py": old.replace("line 21\n", "line 21!\n")}


@pytest.mark.parametrize(
    ("diff", "reason"),
    [
        ("--- a/../etc/passwd\n+++ b/../etc/passwd\n@@ -1 +1 @@\n-x\n+y\n", "climb out"),
        ("--- /etc/passwd\n+++ /etc/passwd\n@@ -1 +1 @@\n-x\n+y\n", "relative paths"),
        ("--- a/C:\\x\n+++ b/C:\\x\n@@ -1 +1 @@\n-x\n+y\n", "relative paths"),
        ("--- /dev/null\n+++ b/README.md\n@@ -0,0 +1 @@\n+x\n", "exists already"),
        ("--- a/missing.py\n+++ b/missing.py\n@@ -1 +1 @@\n-x\n+y\n", "no such file"),
        ("--- a/README.md\n+++ b/README.md\n@@ -1,3 +1,3 @@\n # Project\n", "ends before"),
        ("--- a/README.md\n+++ b/README.md\n@@ -1,2 +1,2 @@\n # Project\n?what\n", "not a context"),
        ("just some words\n", "not a unified diff"),
        ("diff --git a/x.png b/x.png\nBinary files a/x.png and b/x.png differ\n", "binary"),
        (
            "--- a/no_newline.txt\n+++ b/no_newline.txt\n@@ -2 +2 @@\n-last without newline\n"
            "+changed\n",
            "ends without a newline",
        ),
    ],
)
def test_bad_diffs_are_refused_with_the_reason(diff, reason):
    with pytest.raises(DiffError, match=reason):
        diff_apply({**OLD, "x.png": "?"}, diff)


def test_nothing_is_applied_when_a_later_file_fails():
    diff = (
        "--- a/README.md\n+++ b/README.md\n@@ -1 +1 @@\n-# Project\n+# Renamed\n"
        "--- a/gone.txt\n+++ b/gone.txt\n@@ -1 +1 @@\n-not what it says\n+x\n"
    )
    files = dict(OLD)
    with pytest.raises(DiffError, match=r"gone\.txt, hunk 1"):
        diff_apply(files, diff)
    assert files == OLD


def test_review_comments_must_be_on_lines_the_diff_shows():
    old, new = OLD["src/app.py"], _changed(OLD)["src/app.py"]
    assert isinstance(new, str)
    diff = "".join(
        difflib.unified_diff(
            old.splitlines(True), new.splitlines(True), "a/src/app.py", "b/src/app.py"
        )
    )
    (file,) = diff_parse(diff)
    assert shown_lines(file)[:7] == [2, 3, 4, 5, 6, 7, 8]
    checked = review_comments_check(
        diff,
        [
            {"path": "src/app.py", "line": 5, "body": "Why change it?"},
            {"path": "src/app.py", "line": 21, "body": "An added line."},
            {"path": "src/app.py", "line": 5, "side": "old", "body": "The removed line."},
        ],
    )
    assert [(c.line, c.side) for c in checked] == [(5, "new"), (21, "new"), (5, "old")]
    with pytest.raises(DiffError) as caught:
        review_comments_check(
            diff,
            [
                {"path": "src/app.py", "line": 30, "body": "Far from any hunk."},
                {"path": "other.py", "line": 1, "body": "Not in the diff."},
                {"path": "src/app.py", "line": 5, "body": "  "},
            ],
        )
    message = str(caught.value)
    assert "comment 1: line 30 of the new src/app.py is not in the diff" in message
    assert "it shows its lines 2-8, 18-24" in message
    assert "comment 2: 'other.py' is not in the diff" in message
    assert "comment 3: it has no text" in message


_LINES = st.lists(
    st.sampled_from(["a", "b", "c", "", "  d", "--- x", "+++ y", "@@ z"]), max_size=30
)


@settings(max_examples=300, deadline=None)
@given(old=_LINES, new=_LINES, context=st.integers(min_value=0, max_value=4))
def test_any_difflib_diff_applies_back_to_its_new_text(old, new, context):
    # difflib writes no "No newline" marker: both texts end with one.
    before = "".join(f"{line}\n" for line in old)
    after = "".join(f"{line}\n" for line in new)
    diff = "".join(
        difflib.unified_diff(
            before.splitlines(True), after.splitlines(True), "a/f.txt", "b/f.txt", n=context
        )
    )
    if not diff:
        assert before == after
        return
    assert diff_apply({"f.txt": before}, diff) == {"f.txt": after}
