"""The Coder's tools that run code: run Python or shell, check a repository out into the
workspace, apply a diff there, and review a diff.

Code runs in the platform's sandbox (sandbox.jail): the `code.execute` scope sends
these tools to the `sandbox` workers (agents.tool_queue). Each conversation has one
workspace (sandbox.services), loaded before a call and kept after it, so files persist
between turns; calls never share a directory. The files a call makes or changes are
stored as artifacts and listed with the step (`ToolAnswer`), where the chat page shows
images inline and offers the rest for download. Python's matplotlib figures left open
at the end are saved as PNG files.

Where code cannot run sandboxed, the tools say why and never run it. Bad input comes
back as a sentence starting with "Error:" so the model can correct itself.
"""

from __future__ import annotations

import posixpath
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool

from agents.context import ToolAnswer, ToolContext, tool_context
from documents.archives import archive_files as repository_archive_files
from documents.intake import Refused
from documents.storage import file_read
from plugins.coding.diffs import DiffError, diff_apply, diff_parse, review_comments_check
from plugins.coding.repo_tools import repository_choose
from sandbox.jail import PYTHON, Result, SandboxUnavailable, archive_files, archive_of, sandbox_run
from sandbox.services import (
    StorageRefused,
    artifact_create,
    artifact_ref,
    workspace_load,
    workspace_save,
)

# What models write for the two languages (small ones name the library they use).
LANGUAGES = {
    **dict.fromkeys(("python", "python3", "py", "numpy", "pandas", "matplotlib"), "python"),
    **dict.fromkeys(("shell", "sh", "bash", "zsh", "console"), "shell"),
}
OUTSIDE_A_RUN = "Error: this tool runs in a conversation's workspace and has no run here."
CODE_CHARS_MAX = 100_000
STREAM_CHARS = 2_000  # of stdout and of stderr, each, in the answer to the model
ARTIFACTS_MAX = 12  # files stored and shown per call
# Produced, but not worth showing: caches and the like.
SKIPPED_PARTS = ("__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "node_modules")

# Runs the member's Python as a script, then saves the matplotlib figures it left open.
RUNNER = b"""
import sys, traceback, warnings
warnings.filterwarnings("ignore", message=".*non-interactive.*")
sys.argv = ["main.py"]
sys.path.insert(0, "/workspace")
status = 0
try:
    source = open("/.parley/main.py", encoding="utf-8").read()
    exec(compile(source, "main.py", "exec"), {"__name__": "__main__", "__file__": "main.py"})
except SystemExit as exc:
    status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
except BaseException:
    kind, error, trace = sys.exc_info()
    traceback.print_exception(kind, error, trace.tb_next)  # from the member's code on
    status = 1
finally:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        import os
        for number in pyplot.get_fignums():
            name, n = "figure-%d.png" % number, number
            while os.path.exists(name):
                n += 100
                name = "figure-%d.png" % n
            try:
                pyplot.figure(number).savefig(name, dpi=100)
            except Exception as exc:
                print("figure %d was not saved: %s" % (number, exc), file=sys.stderr)
    sys.stdout.flush()
sys.exit(status)
"""


def _context(config: RunnableConfig) -> ToolContext | None:
    context = tool_context(config)
    if context is None or not context.user_id or not context.conversation_id:
        return None
    return context


def _cancelled(config: RunnableConfig) -> Any:
    return ((config or {}).get("configurable") or {}).get("parley_cancelled")


def _size(size: int) -> str:
    for unit in ("bytes", "KB", "MB"):
        if size < 1024 or unit == "MB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return ""


def _stream(name: str, text: str, truncated: bool) -> str:
    if not text:
        return ""
    shown = text if len(text) <= STREAM_CHARS else f"[…]{text[-STREAM_CHARS:]}"
    cut = " (cut at the output limit)" if truncated else ""
    return f"{name}{cut}:\n{shown.rstrip()}\n"


STOPPED = {
    "time": "stopped at the time limit",
    "cpu": "stopped at the CPU time limit",
    "output": "stopped: it wrote more output than allowed",
    "workspace": "stopped: the workspace grew past its size limit",
    "cancelled": "stopped: the run was cancelled",
}


def _summary(result: Result) -> str:
    head = STOPPED[result.stopped] if result.stopped else f"exit status {result.exit_code}"
    head += (
        f" · {result.cpu_s:.2f} s CPU · {_size(result.max_rss_bytes)} memory"
        f" · {result.wall_s:.2f} s"
    )
    if result.stopped in ("time", "output", "workspace", "cancelled"):
        head += " · the workspace keeps its files from before this call"
    return head


def _shown(path: str) -> bool:
    parts = path.split("/")
    return not any(part in SKIPPED_PARTS or part.startswith(".") for part in parts)


def _keep(context: ToolContext, result: Result) -> tuple[list[dict[str, Any]], list[str]]:
    """Save the workspace and store the files the call made or changed; the artifacts'
    refs, and sentences about what could not be kept."""
    notes: list[str] = []
    if result.workspace is None:
        return [], notes
    try:
        workspace_save(
            tenant=context.tenant_id,
            owner=context.user_id,
            conversation_id=context.conversation_id,
            archive=result.workspace,
        )
    except StorageRefused as exc:
        notes.append(f"The workspace was not kept: {exc}")
    changed = [change for change in result.changed if _shown(change.path)]
    refs: list[dict[str, Any]] = []
    files = archive_files(result.workspace) if changed else {}
    for change in changed[:ARTIFACTS_MAX]:
        try:
            artifact = artifact_create(
                tenant=context.tenant_id,
                owner=context.user_id,
                conversation_id=context.conversation_id,
                run_id=context.run_id or None,
                name=change.path,
                data=files[change.path],
            )
        except StorageRefused as exc:
            notes.append(str(exc))
            continue
        refs.append(artifact_ref(artifact))
    if len(changed) > ARTIFACTS_MAX:
        notes.append(
            f"{len(changed) - ARTIFACTS_MAX} more files changed; they are in the workspace."
        )
    return refs, notes


def _answer(result: Result, refs: list[dict[str, Any]], notes: list[str]) -> ToolAnswer:
    parts = [_summary(result) + "\n"]
    parts.append(_stream("stdout", result.stdout, result.stdout_truncated))
    parts.append(_stream("stderr", result.stderr, result.stderr_truncated))
    if refs:
        listed = ", ".join(
            f"{ref['name']} ({_size(int(ref['size']))}, {ref['media_type']})" for ref in refs
        )
        parts.append(f"files produced (shown to the member): {listed}\n")
    parts.extend(f"{note}\n" for note in notes)
    return ToolAnswer("".join(part for part in parts if part).rstrip(), tuple(refs))


def _run(
    context: ToolContext,
    config: RunnableConfig,
    *,
    argv: list[str],
    programs: dict[str, bytes],
    workspace: bytes | None = None,
    loaded: bool = False,
) -> ToolAnswer | str:
    with context.scope():
        if not loaded:
            workspace = workspace_load(
                tenant=context.tenant_id, conversation_id=context.conversation_id
            )
    try:
        result = sandbox_run(
            argv=argv, workspace=workspace, programs=programs, cancelled=_cancelled(config)
        )
    except SandboxUnavailable as exc:
        return f"Error: code cannot run here, so it was not run: {exc}"
    with context.scope():
        refs, notes = _keep(context, result)
    return _answer(result, refs, notes)


@tool(parse_docstring=True)
def code_run(code: str, config: RunnableConfig, language: str = "python") -> ToolAnswer | str:
    """Run Python or shell code in the conversation's sandboxed workspace.

    The workspace is a folder kept between calls of this conversation (files written
    there persist; repo_checkout puts repositories there). No network. Python has numpy,
    pandas, matplotlib and pytest; figures left open are saved as PNG files and shown to
    the member. The answer gives the exit status, CPU time, memory, stdout, stderr and
    the files produced.

    Args:
        code: The Python program or the shell script to run.
        language: "python" or "shell".
    """
    context = _context(config)
    if context is None:
        return OUTSIDE_A_RUN
    if not code.strip():
        return "Error: there is no code to run."
    if len(code) > CODE_CHARS_MAX:
        return f"Error: the code is longer than {CODE_CHARS_MAX} characters."
    language = LANGUAGES.get(language.strip().lower(), language)
    if language == "python":
        argv = [PYTHON, "/.parley/run.py"]
        programs = {"run.py": RUNNER, "main.py": code.encode()}
    elif language == "shell":
        argv = ["/bin/sh", "/.parley/main.sh"]
        programs = {"main.sh": code.encode()}
    else:
        return f"Error: the language must be python or shell, not {language!r}."
    return _run(context, config, argv=argv, programs=programs)


def _folder_name(title: str) -> str:
    stem = title.rsplit("/", 1)[-1]
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    clean = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip(".-")
    return clean or "repository"


@tool(parse_docstring=True)
def repo_checkout(repository: str, config: RunnableConfig, folder: str = "") -> str:
    """Copy a repository's files into the workspace, to run its code or its tests.

    Replaces the folder if it is there. Afterwards run commands in it with code_run,
    for example language "shell" and code "cd <folder> && python -m pytest -q".

    Args:
        repository: The repository's title or doc id, as listed by repo_files.
        folder: The workspace folder to put it in; by default a name made from its title.
    """
    context = _context(config)
    if context is None:
        return OUTSIDE_A_RUN
    with context.scope():
        chosen = repository_choose(context, repository)
        if isinstance(chosen, str):
            return chosen
        try:
            files = repository_archive_files(file_read(chosen.file_name), chosen.media_type)
        except Refused as exc:
            return f"Error: the repository could not be unpacked: {exc}"
        except FileNotFoundError:
            return "Error: the repository's file is missing; upload it again."
        workspace = workspace_load(
            tenant=context.tenant_id, conversation_id=context.conversation_id
        )
    name = posixpath.normpath(folder.strip().strip("/")) if folder.strip() else ""
    if not name:
        name = _folder_name(chosen.title)
    if name.startswith("..") or name.startswith("/") or name == ".":
        return f"Error: {folder!r} is not a folder inside the workspace."
    current = {
        path: data
        for path, data in archive_files(workspace).items()
        if not (path == name or path.startswith(f"{name}/"))
    }
    current.update({f"{name}/{file.path}": file.data for file in files})
    with context.scope():
        try:
            workspace_save(
                tenant=context.tenant_id,
                owner=context.user_id,
                conversation_id=context.conversation_id,
                archive=archive_of(current),
            )
        except StorageRefused as exc:
            return f"Error: {exc}"
    return (
        f"Checked out {len(files)} files of {chosen.title} into {name}/ in the workspace. "
        f'Run its tests with code_run(language="shell", code="cd {name} && python -m pytest -q").'
    )


@tool(parse_docstring=True)
def diff_apply_tool(diff: str, config: RunnableConfig) -> str:
    """Apply a unified diff to the files in the workspace (paths relative to it).

    Strict: every hunk's context must match the file, or nothing changes and the answer
    says which hunk of which file did not apply. New and deleted files are supported.

    Args:
        diff: The unified diff (git diff or diff -u output).
    """
    context = _context(config)
    if context is None:
        return OUTSIDE_A_RUN
    with context.scope():
        workspace = workspace_load(
            tenant=context.tenant_id, conversation_id=context.conversation_id
        )
    files = archive_files(workspace)
    texts: dict[str, str] = {}
    try:
        parsed = diff_parse(diff)
        for file_diff in parsed:
            for path in (file_diff.old_path, file_diff.new_path):
                if path and path in files:
                    texts[path] = files[path].decode("utf-8")
        changed = diff_apply(texts, parsed)
    except UnicodeDecodeError:
        return "Error: the diff touches a file that is not UTF-8 text."
    except DiffError as exc:
        return f"Error: {exc}"
    for path, text in changed.items():
        if text is None:
            files.pop(path, None)
        else:
            files[path] = text.encode("utf-8")
    with context.scope():
        try:
            workspace_save(
                tenant=context.tenant_id,
                owner=context.user_id,
                conversation_id=context.conversation_id,
                archive=archive_of(files),
            )
        except StorageRefused as exc:
            return f"Error: {exc}"
    listed = ", ".join(
        f"{path} ({'deleted' if text is None else 'written'})" for path, text in changed.items()
    )
    return f"Applied: {listed}."


diff_apply_tool.name = "diff_apply"


@tool(parse_docstring=True)
def diff_review(diff: str, comments: list[dict[str, Any]]) -> str:
    """Give a review of a unified diff as comments tied to files and lines.

    Each comment names a file of the diff and a line number of the new file that the
    diff shows (a removed line: its old number with side "old"). Comments on lines the
    diff does not show are refused with the lines that may be used.

    Args:
        diff: The unified diff under review.
        comments: The comments, each {"path": "src/app.py", "line": 12, "body": "...",
            "side": "new"}.
    """
    try:
        checked = review_comments_check(diff, comments)
    except DiffError as exc:
        return f"Error: {exc}"
    if not checked:
        return "No comments: the diff looks fine as it is."
    lines = [f"Review: {len(checked)} comment{'s' if len(checked) != 1 else ''}"]
    for comment in checked:
        lines.append(f"- {comment.path}:{comment.line} ({comment.side}): {comment.body}")
    return "\n".join(lines)


RUN_TOOLS = [code_run, repo_checkout, diff_apply_tool, diff_review]
