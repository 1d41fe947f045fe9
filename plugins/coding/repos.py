"""The member's repositories as the coding tools see them: which are in play, and their
files.

A repository is a document uploaded as a zip, tar or tar.gz archive
(`documents.archives`); its text files are its pages, each labelled with its path
(`documents.parsing`), stored when it is uploaded, so it can be read before its
chunks are embedded. Binary files and very large ones have no page: the tools read
text files only.

The repositories in play are chosen as the document reviewer chooses documents
(plugins.docreview.selection): those attached to the conversation, read through the
documents access functions as the run's member, or, with none attached, the
member's most recent repositories. The model names one by title or short id. Call
everything here inside `ToolContext.scope()`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from django.db.models import QuerySet, Value
from django.db.models.functions import Length, Replace, Right

from documents.archives import ARCHIVE_TYPES, ArchiveFile, archive_files
from documents.models import Document, Page
from documents.selectors import document_list
from documents.storage import file_read
from plugins.docreview.selection import RECENT_LIMIT, InPlay
from tenants.access import Actor


@dataclass(frozen=True)
class RepositoriesInPlay(InPlay):
    def describe(self) -> str:
        count = len(self.documents)
        noun = "repository" if count == 1 else "repositories"
        if self.attached:
            return f"the {count} {noun} attached to this conversation"
        return (
            f"your {count} most recent {noun} (none is attached to this conversation; "
            "attach one to narrow it down)"
        )


def repositories_in_play(*, actor: Actor, document_ids: Sequence[str]) -> RepositoriesInPlay:
    """The run's repositories: the attached documents that are repositories, else the
    member's most recent ones that did not fail."""
    repositories = document_list(actor=actor).filter(media_type__in=ARCHIVE_TYPES)
    if document_ids:
        found = repositories.in_bulk(list(dict.fromkeys(document_ids)))
        by_text = {str(key): document for key, document in found.items()}
        ordered = [by_text[i] for i in dict.fromkeys(document_ids) if i in by_text]
        return RepositoriesInPlay(documents=ordered, attached=True)
    recent = repositories.exclude(state=Document.State.FAILED)[:RECENT_LIMIT]
    return RepositoriesInPlay(documents=list(recent), attached=False)


@dataclass(frozen=True)
class RepoFile:
    path: str
    chars: int
    lines: int


def _prefix(path_prefix: str) -> str:
    prefix = path_prefix.strip().replace("\\", "/")
    while prefix.startswith("./"):
        prefix = prefix[2:]
    return prefix.lstrip("/")


def _pages(repository: Document, path_prefix: str = "") -> QuerySet[Page]:
    """The repository's files (pages with a path), by path, those under the prefix."""
    pages = repository.pages.exclude(label="").order_by("label")
    prefix = _prefix(path_prefix)
    return pages.filter(label__startswith=prefix) if prefix else pages


def repository_files(*, repository: Document, path_prefix: str = "") -> list[RepoFile]:
    """The repository's text files whose path starts with `path_prefix` (a folder, or
    the start of a path), by path, counted by the database (their text stays there)."""
    counted = _pages(repository, path_prefix).annotate(
        chars=Length("text"),
        breaks=Length("text") - Length(Replace("text", Value("\n"), Value(""))),
        last=Right("text", 1),
    )
    return [
        # A last line without a line ending is a line too.
        RepoFile(path=label, chars=chars, lines=breaks + int(bool(last) and last != "\n"))
        for label, chars, breaks, last in counted.values_list("label", "chars", "breaks", "last")
    ]


def repository_file(*, repository: Document, path: str) -> str | None:
    """The text of the file at `path`, or None when the repository has no such text
    file."""
    page = repository.pages.filter(label=_prefix(path)).exclude(label="").first()
    return page.text if page is not None else None


def repository_archive_files(*, repository: Document) -> list[ArchiveFile]:
    """Every file of the repository as uploaded (binary ones too, with their modes),
    read from its stored archive through the same safe reader as the upload check:
    what fills a sandbox workspace. Raises `documents.intake.Refused` should the
    archive no longer pass (limits lowered since)."""
    return archive_files(file_read(repository.file_name), repository.media_type)


def repository_texts(*, repository: Document, path_prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path, text) of each text file under `path_prefix`, by path, a few at a time."""
    yield from _pages(repository, path_prefix).values_list("label", "text").iterator(chunk_size=50)
