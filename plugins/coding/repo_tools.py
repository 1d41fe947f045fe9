"""The Coder's read-only LangChain tools over the member's repositories: list files,
read lines, search, outline a file. `REPO_TOOLS` lists them for the plugin's manifest;
each needs the `documents.read` scope (`REPO_SCOPES`).

As the document reviewer's tools (plugins.docreview.tools), each learns whose run it
serves from its config (`agents.context.tool_context`), reads through the documents
access functions as that member inside the tenant's database scope, and lets the model
name a repository only among those in play (plugins.coding.repos). Results fit under
the runtime's cap on a tool result and say how to read on; bad input comes back as a
sentence starting with "Error:" so the model can correct itself.
"""

from __future__ import annotations

import difflib
import time

import regex
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool

from agents.context import ToolContext, tool_context
from documents.models import Document
from plugins.coding.outline import UnsupportedLanguage, outline, outline_text
from plugins.coding.repos import (
    repositories_in_play,
    repository_file,
    repository_files,
    repository_texts,
)
from plugins.docreview.reading import FRAME_CHARS, RESULT_CHARS, cut
from plugins.docreview.selection import DocumentChoiceError, document_choose, label, short_id

OUTSIDE_A_RUN = "Error: this tool reads the repositories of an agent run and has no run here."
READ_LINES_MAX = 400
LINE_CHARS_MAX = 500  # a line longer than this is cut when read or shown as a match
SEARCH_MATCHES_MAX = 100
SEARCH_LINE_CHARS = 200
PATTERN_CHARS_MAX = 300
# A regular expression gets this long on a file, and this long in all (the model's
# pattern must not hold a worker).
REGEX_FILE_TIMEOUT_S = 0.5
SEARCH_TIMEOUT_S = 5.0
ROOM = RESULT_CHARS - FRAME_CHARS


def _context(config: RunnableConfig) -> ToolContext | None:
    context = tool_context(config)
    return context if context is not None and context.user_id else None


def repository_choose(context: ToolContext, repository: str) -> Document | str:
    """The repository the model names among those in play, or an error sentence (call
    inside `context.scope()`)."""
    play = repositories_in_play(actor=context.actor(), document_ids=context.document_ids)
    try:
        chosen = document_choose(play, repository)
    except DocumentChoiceError as exc:
        return f"Error: {exc}"
    if chosen.state == Document.State.FAILED:
        return f"Error: {label(chosen)} could not be read: {chosen.error_message}"
    return chosen


def _no_file(chosen: Document, path: str) -> str:
    paths = [f.path for f in repository_files(repository=chosen)]
    close = difflib.get_close_matches(path, paths, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else " List them with repo_files."
    return f"Error: {label(chosen)} has no text file {path!r}.{hint}"


@tool(parse_docstring=True)
def repo_files(repository: str, config: RunnableConfig, path_prefix: str = "") -> str:
    """List the text files of a repository (an uploaded zip or tar of source code).

    Each file comes with its number of lines and characters. Binary files and very
    large files are not listed: they cannot be read here.

    Args:
        repository: The repository's title or doc id; empty when only one is in play.
        path_prefix: Only the files whose path starts with this, for example "src/".
        config: The run's configuration (given by Parley, not by the model).
    """
    context = _context(config)
    if context is None:
        return OUTSIDE_A_RUN
    with context.scope():
        chosen = repository_choose(context, repository)
        if isinstance(chosen, str):
            return chosen
        files = repository_files(repository=chosen, path_prefix=path_prefix)
    where = f" under {path_prefix!r}" if path_prefix.strip() else ""
    if not files:
        return f"{label(chosen)} has no text file{where}."
    head = f"{label(chosen)}: {len(files)} text files{where} (path: lines, characters).\n"
    rows: list[str] = []
    used = len(head)
    for file in files:
        row = f"{file.path}: {file.lines} lines, {file.chars} chars\n"
        if used + len(row) > ROOM:
            break
        rows.append(row)
        used += len(row)
    tail = ""
    if len(rows) < len(files):
        tail = (
            f"(… and {len(files) - len(rows)} more files: list a folder with path_prefix, "
            f'for example path_prefix="{_folder(files[len(rows)].path)}".)'
        )
    return head + "".join(rows) + tail


def _folder(path: str) -> str:
    return path.rsplit("/", 1)[0] + "/" if "/" in path else path


@tool(parse_docstring=True)
def repo_read(
    repository: str, path: str, config: RunnableConfig, start_line: int = 1, end_line: int = 0
) -> str:
    """Read lines of a file of a repository, each with its line number.

    A long read comes back a part at a time: the result ends with the call that reads on.

    Args:
        repository: The repository's title or doc id; empty when only one is in play.
        path: The file's path, as repo_files lists it.
        start_line: The first line to read, from 1.
        end_line: The last line to read; 0 for as far as fits.
        config: The run's configuration (given by Parley, not by the model).
    """
    context = _context(config)
    if context is None:
        return OUTSIDE_A_RUN
    with context.scope():
        chosen = repository_choose(context, repository)
        if isinstance(chosen, str):
            return chosen
        text = repository_file(repository=chosen, path=path)
        if text is None:
            return _no_file(chosen, path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    count = len(lines)
    if count == 0:
        return f"{path} in {label(chosen)} is empty."
    start_line, end_line = int(start_line), int(end_line)
    if not 1 <= start_line <= count:
        return f"Error: {path} has {count} lines; start_line must be from 1 to {count}."
    if end_line and end_line < start_line:
        return "Error: end_line must be 0 or at least start_line."
    last = min(end_line or count, count, start_line + READ_LINES_MAX - 1)
    head = f"{path} in {label(chosen)}, {count} lines:\n"
    width = len(str(count))
    out: list[str] = []
    used = len(head)
    number = start_line
    while number <= last:
        row = f"{number:>{width}}| {cut(lines[number - 1], LINE_CHARS_MAX)}\n"
        if used + len(row) > ROOM and out:
            break
        out.append(row)
        used += len(row)
        number += 1
    read_to = number - 1
    if read_to >= count:
        tail = "(End of the file.)"
    elif end_line and read_to >= end_line:
        tail = f"(Read to line {read_to} of {count}.)"
    else:
        tail = (
            f'(To read on: repo_read(repository="{short_id(chosen)}", path="{path}", '
            f"start_line={read_to + 1}).)"
        )
    return head + "".join(out) + tail


@tool(parse_docstring=True)
def repo_search(
    repository: str,
    pattern: str,
    config: RunnableConfig,
    regex_pattern: bool = False,
    path_prefix: str = "",
) -> str:
    """Search the text files of a repository for a word or a pattern, like grep.

    Each matching line comes as path:line: text. The search is exact and case
    sensitive, unless regex_pattern is true (then pattern is a regular expression,
    for example "def \\w+_test" or "(?i)timeout").

    Args:
        repository: The repository's title or doc id; empty when only one is in play.
        pattern: The text to find in a line (or a regular expression).
        regex_pattern: True to read pattern as a regular expression.
        path_prefix: Only the files whose path starts with this, for example "src/".
        config: The run's configuration (given by Parley, not by the model).
    """
    context = _context(config)
    if context is None:
        return OUTSIDE_A_RUN
    if not pattern or len(pattern) > PATTERN_CHARS_MAX:
        return f"Error: give a pattern of 1 to {PATTERN_CHARS_MAX} characters."
    compiled = None
    if regex_pattern:
        try:
            compiled = regex.compile(pattern)
        except regex.error as exc:
            return f"Error: the regular expression does not compile: {exc}."
    matches: list[str] = []
    total = 0
    files = 0
    deadline = time.monotonic() + SEARCH_TIMEOUT_S
    timed_out = False
    with context.scope():
        chosen = repository_choose(context, repository)
        if isinstance(chosen, str):
            return chosen
        for path, text in repository_texts(repository=chosen, path_prefix=path_prefix):
            try:
                found = _matching_lines(text, pattern, compiled)
            except TimeoutError:
                timed_out = True
                break
            if found:
                files += 1
                total += len(found)
                for number, line in found:
                    if len(matches) < SEARCH_MATCHES_MAX:
                        matches.append(f"{path}:{number}: {cut(line.strip(), SEARCH_LINE_CHARS)}")
            if time.monotonic() > deadline:
                timed_out = True
                break
    where = f" under {path_prefix!r}" if path_prefix.strip() else ""
    head = f"Searched {label(chosen)}{where} for {cut(pattern, 100)!r}: "
    stopped = (
        " The search stopped early: the pattern took too long; make it simpler or narrow "
        "it with path_prefix."
        if timed_out
        else ""
    )
    if not matches:
        return head + "no line matches." + stopped
    head += f"{total} matching lines in {files} files.\n"
    rows: list[str] = []
    used = len(head) + len(stopped)
    for row in matches:
        if used + len(row) + 1 > ROOM:
            break
        rows.append(row)
        used += len(row) + 1
    tail = ""
    if len(rows) < total:
        tail = (
            f"\n(Showing the first {len(rows)}; narrow the search with a longer pattern or "
            "path_prefix.)"
        )
    return head + "\n".join(rows) + tail + stopped


def _matching_lines(
    text: str, pattern: str, compiled: regex.Pattern | None
) -> list[tuple[int, str]]:
    if compiled is None:
        if pattern not in text:
            return []
        return [(n, line) for n, line in enumerate(text.split("\n"), start=1) if pattern in line]
    if compiled.search(text, timeout=REGEX_FILE_TIMEOUT_S) is None:
        return []
    return [
        (n, line)
        for n, line in enumerate(text.split("\n"), start=1)
        if compiled.search(line, timeout=REGEX_FILE_TIMEOUT_S) is not None
    ]


@tool(parse_docstring=True)
def repo_outline(repository: str, path: str, config: RunnableConfig) -> str:
    """Outline a source file of a repository: its classes, functions, methods and types,
    nested, each with its lines (read them with repo_read).

    Args:
        repository: The repository's title or doc id; empty when only one is in play.
        path: The file's path, as repo_files lists it.
        config: The run's configuration (given by Parley, not by the model).
    """
    context = _context(config)
    if context is None:
        return OUTSIDE_A_RUN
    with context.scope():
        chosen = repository_choose(context, repository)
        if isinstance(chosen, str):
            return chosen
        text = repository_file(repository=chosen, path=path)
        if text is None:
            return _no_file(chosen, path)
    try:
        symbols = outline(path, text)
    except UnsupportedLanguage as exc:
        return f"Error: {exc} Read the file with repo_read instead."
    if not symbols:
        return f"{path} in {label(chosen)} defines no class, function or type."
    head = f"{path} in {label(chosen)}, {len(symbols)} symbols:\n"
    return head + cut(outline_text(symbols), ROOM - len(head))


REPO_TOOLS = [repo_files, repo_read, repo_search, repo_outline]
REPO_SCOPES = {t.name: ("documents.read",) for t in REPO_TOOLS}
