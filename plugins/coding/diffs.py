"""Unified diffs: read one, apply it strictly to a set of files, and check review
comments against it. Pure functions over text; nothing here touches a disk.

`diff_parse(diff)` reads what `git diff` (and `git format-patch`) and `diff -u` /
`diff -ruN` write: several files, several hunks each, new and deleted files (`/dev/null`,
or git's `new file mode` / `deleted file mode`), renames, mode changes and
"\\ No newline at end of file". Lines before, between and after the files (a commit
message, `index` lines) are passed over. A hunk whose lines do not add up to its
header is an error: a model's diff cut short is refused, not half applied.

`diff_apply(files, diff)` applies it the way `git apply` does without fuzz: each
hunk's context and removed lines must match the file exactly, at the line its header
names or, failing that, at the nearest place they all match after the hunk before
(line numbers of a hand-written diff are often off; its text must not be). It returns
only what changes: a path's new text, or None for a file the diff deletes (a rename
deletes the old path). Any mismatch raises `DiffError` naming the file and the hunk,
and nothing is applied. Paths must stay inside the files' tree: no absolute path, no
`..` part.

`review_comments_check(diff, comments)` checks comments tied to a file and a line:
the line must be one the diff shows on that side (the new file's added and context
lines by default, `side="old"` for the removed ones).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

NO_NEWLINE = "\\ No newline at end of file"
DEV_NULL = "/dev/null"
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@ ?(.*)$")
_GIT_HEADER = re.compile(r"^diff --git (\"?a/.+?\"?) (\"?b/.+\"?)$")


class DiffError(ValueError):
    """The diff cannot be read or applied; the message says where and why."""


@dataclass(frozen=True)
class DiffLine:
    kind: str  # " " context, "-" removed, "+" added
    text: str  # without its line ending
    old: int | None  # its line number in the old file (None for an added line)
    new: int | None  # its line number in the new file (None for a removed line)
    no_newline: bool = False  # the file ends after it without a line ending


@dataclass(frozen=True)
class Hunk:
    old_start: int
    old_count: int
    new_start: int
    new_count: int
    section: str  # what follows the second @@ (often the enclosing function)
    lines: tuple[DiffLine, ...]

    def old_lines(self) -> list[DiffLine]:
        return [line for line in self.lines if line.kind != "+"]

    def new_lines(self) -> list[DiffLine]:
        return [line for line in self.lines if line.kind != "-"]


@dataclass(frozen=True)
class FileDiff:
    old_path: str | None  # None: a new file
    new_path: str | None  # None: a deleted file
    hunks: tuple[Hunk, ...] = ()
    binary: bool = False
    old_mode: str = ""
    new_mode: str = ""

    @property
    def path(self) -> str:
        return self.new_path or self.old_path or ""

    @property
    def is_new(self) -> bool:
        return self.old_path is None

    @property
    def is_deleted(self) -> bool:
        return self.new_path is None

    @property
    def is_rename(self) -> bool:
        return None not in (self.old_path, self.new_path) and self.old_path != self.new_path

    @property
    def added(self) -> int:
        return sum(1 for hunk in self.hunks for line in hunk.lines if line.kind == "+")

    @property
    def removed(self) -> int:
        return sum(1 for hunk in self.hunks for line in hunk.lines if line.kind == "-")


# --- reading -------------------------------------------------------------------------


def _unquote(path: str) -> str:
    """Git quotes a path with unusual characters in C style."""
    if len(path) >= 2 and path[0] == path[-1] == '"':
        body = path[1:-1]
        try:
            return (
                body.encode("latin-1", "backslashreplace")
                .decode("unicode_escape")
                .encode("latin-1")
                .decode("utf-8")
            )
        except (UnicodeDecodeError, UnicodeEncodeError):
            return body
    return path


def _header_path(value: str, *, strip: bool) -> str | None:
    """The path of a `---` / `+++` line: its timestamp (after a tab) dropped, git's
    `a/` / `b/` dropped when `strip`; None for /dev/null."""
    value = _unquote(value.split("\t", 1)[0].rstrip())
    if value == DEV_NULL:
        return None
    if strip and value[:2] in ("a/", "b/"):
        value = value[2:]
    return value


@dataclass
class _File:
    old_path: str | None = None
    new_path: str | None = None
    git: bool = False
    hunks: list[Hunk] = field(default_factory=list)
    binary: bool = False
    old_mode: str = ""
    new_mode: str = ""
    created: bool = False
    deleted: bool = False

    def done(self) -> FileDiff:
        old, new = self.old_path, self.new_path
        if self.created:
            old = None
        if self.deleted:
            new = None
        return FileDiff(
            old_path=old,
            new_path=new,
            hunks=tuple(self.hunks),
            binary=self.binary,
            old_mode=self.old_mode,
            new_mode=self.new_mode,
        )


def _plain_paths(old: str | None, new: str | None) -> tuple[str | None, str | None]:
    """`diff -ruN a b` names `a/x` and `b/x`: the same file one folder down in two
    folders (as `patch -p1` reads them). Other plain names are kept as written: the
    same path on both sides (`--- src/x` / `+++ src/x`) is that path."""
    if old is None or new is None:
        # A new or deleted file: strip a first folder only when it is git's a/ or b/.
        one = old if old is not None else new
        if one is not None and one[:2] in ("a/", "b/"):
            one = one[2:]
        return (one, None) if new is None else (None, one)
    old_parts, new_parts = old.split("/", 1), new.split("/", 1)
    if (
        len(old_parts) == len(new_parts) == 2
        and old_parts[0] not in ("", ".", "..")
        and new_parts[0] not in ("", ".", "..")
        and old_parts[0] != new_parts[0]
        and old_parts[1] == new_parts[1]
    ):
        return old_parts[1], new_parts[1]
    return old, new


def diff_parse(diff: str) -> list[FileDiff]:
    """The files of a unified diff, in order (see the module's docstring)."""
    lines = diff.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    files: list[FileDiff] = []
    current: _File | None = None
    index = 0

    def finish() -> None:
        nonlocal current
        if current is not None:
            files.append(current.done())
            current = None

    while index < len(lines):
        line = (
            lines[index].removesuffix("\r")
            if lines[index].startswith(("diff ", "---", "+++"))
            else lines[index]
        )
        git = _GIT_HEADER.match(line)
        if git:
            finish()
            current = _File(
                old_path=_header_path(git.group(1), strip=True),
                new_path=_header_path(git.group(2), strip=True),
                git=True,
            )
            index += 1
            continue
        if (
            line.startswith("--- ")
            and index + 1 < len(lines)
            and lines[index + 1].startswith("+++ ")
        ):
            if current is None or current.hunks or not current.git:
                finish()
                current = _File()
            strip = current.git
            old = _header_path(line[4:], strip=strip)
            new = _header_path(lines[index + 1][4:].removesuffix("\r"), strip=strip)
            if not strip:
                old, new = _plain_paths(old, new)
            current.old_path, current.new_path = old, new
            current.created = current.created or old is None
            current.deleted = current.deleted or new is None
            index += 2
            continue
        hunk = _HUNK.match(line)
        if hunk and current is not None:
            parsed, index = _hunk(lines, index, hunk, current, len(current.hunks) + 1)
            current.hunks.append(parsed)
            continue
        if current is not None and current.git and not current.hunks:
            _git_extended(current, line)
        index += 1
    finish()
    if not files:
        raise DiffError("This is not a unified diff: no file header (`--- a/x` / `+++ b/x`).")
    for file in files:
        if file.path == "":
            raise DiffError("A file of this diff has no path.")
    return files


def _git_extended(current: _File, line: str) -> None:
    """git's lines between `diff --git` and the first hunk."""
    if line.startswith("new file mode "):
        current.created, current.new_mode = True, line.rsplit(" ", 1)[1]
    elif line.startswith("deleted file mode "):
        current.deleted, current.old_mode = True, line.rsplit(" ", 1)[1]
    elif line.startswith("old mode "):
        current.old_mode = line.rsplit(" ", 1)[1]
    elif line.startswith("new mode "):
        current.new_mode = line.rsplit(" ", 1)[1]
    elif line.startswith("rename from "):
        current.old_path = _unquote(line[len("rename from ") :])
    elif line.startswith("rename to "):
        current.new_path = _unquote(line[len("rename to ") :])
    elif line.startswith("Binary files ") or line == "GIT binary patch":
        current.binary = True


def _hunk(
    lines: list[str], index: int, header: re.Match, file: _File, number: int
) -> tuple[Hunk, int]:
    old_start, new_start = int(header.group(1)), int(header.group(3))
    old_count = int(header.group(2)) if header.group(2) is not None else 1
    new_count = int(header.group(4)) if header.group(4) is not None else 1
    old_left, new_left = old_count, new_count
    # An empty side starts "after" its line: its first line would be the next one.
    old_at = old_start if old_count else old_start + 1
    new_at = new_start if new_count else new_start + 1
    body: list[DiffLine] = []
    index += 1
    where = f"{file.new_path or file.old_path}, hunk {number}"
    while old_left or new_left:
        if index >= len(lines):
            raise DiffError(
                f"{where}: the hunk ends before its {old_count} old and {new_count} new lines."
            )
        raw = lines[index]
        kind, text = (raw[:1], raw[1:]) if raw else (" ", "")  # a blank context line
        if kind == "\\":
            if body:
                body[-1] = _no_newline(body[-1])
            index += 1
            continue
        if kind not in (" ", "-", "+"):
            raise DiffError(
                f"{where}: line {raw[:80]!r} is not a context, removed or added line; the hunk "
                f"should have {old_left} more old and {new_left} more new lines."
            )
        if kind in (" ", "-"):
            if not old_left:
                raise DiffError(f"{where}: more old lines than its header's {old_count}.")
            old_left -= 1
        if kind in (" ", "+"):
            if not new_left:
                raise DiffError(f"{where}: more new lines than its header's {new_count}.")
            new_left -= 1
        body.append(
            DiffLine(
                kind=kind,
                text=text,
                old=old_at if kind != "+" else None,
                new=new_at if kind != "-" else None,
            )
        )
        if kind != "+":
            old_at += 1
        if kind != "-":
            new_at += 1
        index += 1
    if index < len(lines) and lines[index].startswith("\\"):
        if body:
            body[-1] = _no_newline(body[-1])
        index += 1
    hunk = Hunk(
        old_start=old_start,
        old_count=old_count,
        new_start=new_start,
        new_count=new_count,
        section=header.group(5).strip(),
        lines=tuple(body),
    )
    return hunk, index


def _no_newline(line: DiffLine) -> DiffLine:
    return DiffLine(line.kind, line.text, line.old, line.new, no_newline=True)


# --- applying ------------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:")


def path_check(path: str) -> str:
    """The path, when it stays inside the files' tree; else `DiffError`."""
    unified = path.replace("\\", "/")
    if not path or unified.startswith("/") or _DRIVE.match(unified):
        raise DiffError(f"{path!r}: a diff may only name relative paths inside the files.")
    if ".." in unified.split("/"):
        raise DiffError(f"{path!r}: a diff may not climb out of the files with '..'.")
    if re.search(r"[\x00-\x1f]", path):
        raise DiffError(f"{path!r}: a path with control characters.")
    return "/".join(part for part in unified.split("/") if part not in ("", "."))


@dataclass
class _Text:
    """A file as lines without their endings, and whether its last line has one."""

    lines: list[str]
    final_newline: bool

    @classmethod
    def of(cls, text: str) -> _Text:
        if text == "":
            return cls([], True)
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
            return cls(lines, True)
        return cls(lines, False)

    def text(self) -> str:
        if not self.lines:
            return ""
        return "\n".join(self.lines) + ("\n" if self.final_newline else "")


def diff_apply(files: Mapping[str, str], diff: str | Sequence[FileDiff]) -> dict[str, str | None]:
    """The files the diff changes: each path's new text, or None where it deletes the
    file (see the module's docstring). `files` maps paths to their text."""
    parsed = diff_parse(diff) if isinstance(diff, str) else list(diff)
    state: dict[str, str | None] = {}

    def current(path: str) -> str | None:
        return state[path] if path in state else files.get(path)

    for file in parsed:
        old = path_check(file.old_path) if file.old_path is not None else None
        new = path_check(file.new_path) if file.new_path is not None else None
        name = new or old or ""
        if file.binary:
            raise DiffError(f"{name}: binary changes cannot be applied from a text diff.")
        if old is None:
            if current(name) is not None:
                raise DiffError(f"{name}: the diff creates it, but it exists already.")
            source = ""
        else:
            if old != new and new is not None and current(old) is None and current(new) is not None:
                old = new  # a plain `diff -u x.orig x`: the file is the one that exists
            found = current(old)
            if found is None and file.hunks and all(h.old_count == 0 for h in file.hunks):
                found = ""  # `diff -N` writes a new file under its own name, not /dev/null
            if found is None:
                raise DiffError(f"{old}: the diff changes it, but there is no such file.")
            source = found
        if new is not None and new != old and old is not None and current(new) is not None:
            raise DiffError(f"{new}: the diff renames {old} to it, but it exists already.")
        result = _apply_hunks(name, source, file.hunks, new_file=old is None)
        if new is None:
            if result != "":
                raise DiffError(
                    f"{old}: the diff deletes the file but leaves lines in it; its hunks do "
                    "not remove every line."
                )
            state[old or name] = None
            continue
        if old is not None and old != new:
            state[old] = None
        state[new] = result
    return {path: text for path, text in state.items() if text != files.get(path)}


def _apply_hunks(name: str, source: str, hunks: Sequence[Hunk], *, new_file: bool) -> str:
    text = _Text.of(source)
    out: list[str] = []
    at = 0  # the next line of the source not yet copied
    final_newline = text.final_newline
    for number, hunk in enumerate(hunks, start=1):
        where = (
            f"{name}, hunk {number} (@@ -{hunk.old_start},{hunk.old_count} "
            f"+{hunk.new_start},{hunk.new_count} @@)"
        )
        expected = [line.text for line in hunk.old_lines()]
        stated = hunk.old_start - 1 if hunk.old_count else hunk.old_start
        start = _place(text.lines, expected, stated=stated, after=at)
        if start is None:
            raise DiffError(f"{where}: {_mismatch(text.lines, expected, stated)}")
        reaches_end = start + len(expected) == len(text.lines)
        old_side = hunk.old_lines()
        if old_side and old_side[-1].no_newline and not (reaches_end and not text.final_newline):
            raise DiffError(
                f"{where}: the diff says the file ends without a newline there; it does not."
            )
        if old_side and reaches_end and not old_side[-1].no_newline and not text.final_newline:
            raise DiffError(
                f"{where}: the file ends without a newline, which the diff does not say."
            )
        out.extend(text.lines[at:start])
        new_side = hunk.new_lines()
        out.extend(line.text for line in new_side)
        at = start + len(expected)
        if reaches_end or new_file:
            final_newline = not (new_side and new_side[-1].no_newline)
    out.extend(text.lines[at:])
    return _Text(out, final_newline).text()


def _place(lines: list[str], expected: list[str], *, stated: int, after: int) -> int | None:
    """Where the hunk's old lines are: at the stated line, else the nearest place
    after the previous hunk where they all match."""

    def matches(start: int) -> bool:
        return start >= after and lines[start : start + len(expected)] == expected

    if not expected:
        # Nothing to match (lines added to an empty side): the stated place it must be.
        return stated if after <= stated <= len(lines) else None
    if matches(stated):
        return stated
    last = len(lines) - len(expected)
    for distance in range(1, len(lines) + 1):
        for start in (stated - distance, stated + distance):
            if after <= start <= last and matches(start):
                return start
        if stated - distance < after and stated + distance > last:
            break
    return None


def _mismatch(lines: list[str], expected: list[str], stated: int) -> str:
    """Why the hunk does not apply, for the model to correct it."""
    if not expected:
        return f"it adds lines after line {stated}, but the file has {len(lines)} lines."
    for offset, wanted in enumerate(expected):
        number = stated + offset
        found = lines[number] if 0 <= number < len(lines) else None
        if found != wanted:
            what = "the file ends there" if found is None else f"the file has {found[:120]!r}"
            return (
                f"its context does not match the file at line {number + 1}: the diff expects "
                f"{wanted[:120]!r}, {what}; and its lines match nowhere else after the hunk "
                "before."
            )
    return "its lines overlap the hunk before."


# --- review comments -----------------------------------------------------------------


@dataclass(frozen=True)
class ReviewComment:
    path: str
    line: int
    body: str
    side: str = "new"  # "new": a line of the new file; "old": of the old (a removed line)


def shown_lines(file: FileDiff, side: str = "new") -> list[int]:
    """The line numbers the diff shows of a file, on one side, in order."""
    numbers = (
        line.new if side == "new" else line.old for hunk in file.hunks for line in hunk.lines
    )
    return sorted({n for n in numbers if n is not None})


def _ranges(numbers: list[int]) -> str:
    spans: list[str] = []
    for number in numbers:
        if spans and int(spans[-1].split("-")[-1]) == number - 1:
            spans[-1] = f"{spans[-1].split('-')[0]}-{number}"
        else:
            spans.append(str(number))
    return ", ".join(spans) if spans else "none"


def review_comments_check(
    diff: str | Sequence[FileDiff], comments: Sequence[Mapping[str, object]]
) -> list[ReviewComment]:
    """The comments, each checked to be on a line the diff shows of its file (see the
    module's docstring); `DiffError` lists every comment that is not."""
    parsed = diff_parse(diff) if isinstance(diff, str) else list(diff)
    by_path: dict[str, FileDiff] = {}
    for file in parsed:
        for path in (file.new_path, file.old_path):
            if path is not None:
                by_path.setdefault(path, file)
    checked: list[ReviewComment] = []
    problems: list[str] = []
    for number, comment in enumerate(comments, start=1):
        path = str(comment.get("path") or "").strip()
        body = str(comment.get("body") or "").strip()
        side = str(comment.get("side") or "new").strip().lower()
        raw_line = comment.get("line")
        where = f"comment {number}"
        if side not in ("new", "old"):
            problems.append(f"{where}: side must be 'new' or 'old', not {side!r}.")
            continue
        if not body:
            problems.append(f"{where}: it has no text.")
            continue
        diffed = by_path.get(path)
        if diffed is None:
            names = ", ".join(sorted({f.path for f in parsed}))
            problems.append(f"{where}: {path!r} is not in the diff; its files are {names}.")
            continue
        try:
            line = int(str(raw_line))
        except ValueError:
            problems.append(f"{where}: line must be a number, not {raw_line!r}.")
            continue
        shown = shown_lines(diffed, side)
        if line not in shown:
            problems.append(
                f"{where}: line {line} of the {side} {path} is not in the diff; it shows its "
                f"lines {_ranges(shown)}."
            )
            continue
        checked.append(ReviewComment(path=path, line=line, body=body, side=side))
    if problems:
        raise DiffError(" ".join(problems))
    return checked
