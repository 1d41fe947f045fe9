"""What an uploaded file is, decided from its bytes (never its name), and whether it
is safe to keep. `intake_check` answers the media type and what can be learnt
cheaply (page count; the text of text, Markdown, HTML and a repository's text files),
or raises `Refused` with the status and the reason; it writes nothing.

Accepted: PDF (`%PDF-`, not encrypted, readable by pypdf, a sane page tree), DOCX (a
zip holding `word/document.xml`, checked for zip bombs before a byte is unpacked),
HTML, Markdown and plain text (valid UTF-8, no NUL), and repositories: any other zip,
a tar (ustar or GNU) or a gzipped tar, read through `documents.archives` (which refuses
unsafe paths, links and special files, and bombs) and holding at least one text file.
Refused with 415: anything else (other Office packages among them), executables (ELF,
PE, Mach-O) by name. HTML is kept as text: never rendered, its text read without
tags, scripts or styles.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from documents.models import Document
from documents.parsing import archive_pages, html_text, text_pages

MediaType = Document.MediaType


class Refused(Exception):
    """The file is not stored: `status` (413, 415 or 400) and a reason for a person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Intake:
    media_type: str
    page_count: int | None = None
    # The text of each page when it was cheap to read at upload (text, Markdown, HTML,
    # a repository's text files).
    pages: list[str] = field(default_factory=list)
    # Each page's label, where pages have one (a repository's file paths), else empty.
    labels: list[str] = field(default_factory=list)


EXECUTABLES: tuple[tuple[bytes, str], ...] = (
    (b"\x7fELF", "an ELF executable"),
    (b"\xfe\xed\xfa\xce", "a Mach-O executable"),
    (b"\xfe\xed\xfa\xcf", "a Mach-O executable"),
    (b"\xce\xfa\xed\xfe", "a Mach-O executable"),
    (b"\xcf\xfa\xed\xfe", "a Mach-O executable"),
    (b"\xca\xfe\xba\xbe", "a Mach-O universal binary (or Java class file)"),
)
OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # legacy Office files, and encrypted OOXML
ZIP = b"PK\x03\x04"
GZIP = b"\x1f\x8b"
DOCX_MAIN = "word/document.xml"
ACCEPTED = (
    "PDF, DOCX, HTML, Markdown or plain text (UTF-8), or a repository as a zip, tar or "
    "tar.gz archive"
)
MAX_ZIP_MEMBERS = 10_000


def intake_check(data: bytes) -> Intake:
    if not data:
        raise Refused(400, "The file is empty.")
    for magic, what in EXECUTABLES:
        if data.startswith(magic):
            raise Refused(415, f"This file is {what}, not a document. Upload {ACCEPTED}.")
    if _is_pe(data):
        raise Refused(415, f"This file is a Windows executable, not a document. Upload {ACCEPTED}.")
    if data.startswith(b"%PDF-"):
        return _pdf(data)
    if data.startswith(ZIP):
        return _zip(data)
    if data.startswith(OLE):
        raise Refused(
            415,
            "This is a legacy Office file or an encrypted Office document; save it as an "
            f"unencrypted DOCX or PDF. Upload {ACCEPTED}.",
        )
    if data.startswith(GZIP):
        return _repository(data, MediaType.TAR_GZ)
    if looks_like_tar(data):
        return _repository(data, MediaType.TAR)
    text = _utf8(data)
    if text is None:
        raise Refused(415, f"Unsupported file type. Upload {ACCEPTED}.")
    if _looks_like_html(text):
        return Intake(MediaType.HTML, page_count=1, pages=[html_text(text)])
    media_type = MediaType.MARKDOWN if _looks_like_markdown(text) else MediaType.TEXT
    pages = text_pages(text)  # the pages parsing gives: what chunk offsets point into
    return Intake(media_type, page_count=len(pages), pages=pages)


def looks_like_tar(data: bytes) -> bool:
    """A ustar (POSIX) or GNU tar: its magic at byte 257 of the first header, whose
    fields are padded with NUL bytes (which no accepted text has)."""
    return data[257:262] == b"ustar" and b"\0" in data[:512]


# --- executables ---------------------------------------------------------------------


def _is_pe(data: bytes) -> bool:
    """An MZ header whose e_lfanew points at a PE signature, or an MZ file that is not
    text (a DOS program); a text that happens to start with "MZ" passes."""
    if not data.startswith(b"MZ"):
        return False
    if len(data) >= 0x40:
        offset = int.from_bytes(data[0x3C:0x40], "little")
        if data[offset : offset + 4] == b"PE\0\0":
            return True
    return _utf8(data) is None


# --- PDF ---------------------------------------------------------------------------


def _pdf(data: bytes) -> Intake:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    max_pages = settings.PARLEY_DOCUMENT_MAX_PAGES
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise Refused(400, "This PDF is encrypted (password-protected); upload it unlocked.")
        pages = _pdf_page_tree_leaves(reader, max_pages=max_pages)
        counted = len(reader.pages)
    except Refused:
        raise
    except PyPdfError as exc:
        raise Refused(400, f"This PDF is corrupt or unreadable ({exc}).") from None
    except Exception as exc:  # pypdf meets malformed files with many kinds of error
        raise Refused(400, f"This PDF is corrupt or unreadable ({type(exc).__name__}).") from None
    if counted != pages:
        raise Refused(400, "This PDF is corrupt: its page tree does not add up.")
    if pages == 0:
        raise Refused(400, "This PDF has no pages.")
    return Intake(MediaType.PDF, page_count=pages)


def _pdf_page_tree_leaves(reader: Any, *, max_pages: int) -> int:
    """Walk the page tree without recursion: refuse a tree deeper than the limit, one
    with a loop, or more pages than PARLEY_DOCUMENT_MAX_PAGES (also as claimed by
    /Count, before walking it). The number of pages."""
    from pypdf.generic import ArrayObject, DictionaryObject

    max_depth = settings.PARLEY_DOCUMENT_MAX_PAGE_TREE_DEPTH
    root = reader.trailer["/Root"].get_object()["/Pages"].get_object()
    claimed = root.get("/Count", 0)
    if not isinstance(claimed, int) or claimed < 0:
        raise Refused(400, "This PDF is corrupt: its page count is not a number.")
    if claimed > max_pages:
        raise Refused(400, f"This PDF has {claimed} pages; at most {max_pages} are accepted.")
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(root, 1)]
    leaves = 0
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise Refused(400, f"This PDF's page tree is nested more than {max_depth} levels deep.")
        if id(node) in seen:
            raise Refused(400, "This PDF is corrupt: its page tree loops.")
        seen.add(id(node))
        if not isinstance(node, DictionaryObject):
            raise Refused(400, "This PDF is corrupt: a page tree node is not a dictionary.")
        kids = node.get("/Kids")
        if node.get("/Type") == "/Page" or kids is None:
            leaves += 1
            if leaves > max_pages:
                raise Refused(400, f"This PDF has more than {max_pages} pages.")
            continue
        kids = kids.get_object()
        if not isinstance(kids, ArrayObject):
            raise Refused(400, "This PDF is corrupt: a page tree node has no list of kids.")
        for kid in kids:
            stack.append((kid.get_object(), depth + 1))
    return leaves


# --- zip: DOCX or a repository ---------------------------------------------------------


def _zip(data: bytes) -> Intake:
    """A DOCX is a zip holding `word/document.xml`; other Office packages are refused;
    any other zip is a repository."""
    try:
        members = zipfile.ZipFile(io.BytesIO(data)).infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError):
        raise Refused(400, "This file is a corrupt zip archive.") from None
    names = {member.filename for member in members}
    if DOCX_MAIN in names:
        return _docx(data, members)
    if "[Content_Types].xml" in names or {"mimetype", "content.xml"} <= names:
        raise Refused(
            415,
            "This is an Office document other than a Word document (a spreadsheet or a "
            f"presentation, say); save it as PDF. Upload {ACCEPTED}.",
        )
    return _repository(data, MediaType.ZIP)


def _repository(data: bytes, media_type: str) -> Intake:
    """An archive's text files are its pages, one a file, labelled with its path."""
    pages = archive_pages(data, media_type)
    if not pages:
        raise Refused(
            415,
            "This archive holds no text file (source code or text in UTF-8) to read. "
            f"Upload {ACCEPTED}.",
        )
    return Intake(
        media_type,
        page_count=len(pages),
        pages=[text for _, text in pages],
        labels=[label for label, _ in pages],
    )


# --- DOCX --------------------------------------------------------------------------


def _docx(data: bytes, members: list[zipfile.ZipInfo]) -> Intake:
    """A zip is checked from its directory before anything is unpacked: members, total
    size and each member's compression ratio; then python-docx must open it."""
    if len(members) > MAX_ZIP_MEMBERS:
        raise Refused(400, f"This DOCX holds more than {MAX_ZIP_MEMBERS} files.")
    max_total = settings.PARLEY_DOCUMENT_MAX_UNZIPPED_BYTES
    max_ratio = settings.PARLEY_DOCUMENT_MAX_ZIP_RATIO
    total = 0
    for member in members:
        total += member.file_size
        if total > max_total:
            raise Refused(400, f"This DOCX unpacks to more than {max_total} bytes.")
        if member.file_size > max_ratio * max(member.compress_size, 1) and member.file_size > 1024:
            raise Refused(
                400,
                f"This DOCX looks like a zip bomb: {member.filename!r} is compressed more "
                f"than {max_ratio} to 1.",
            )
        if member.flag_bits & 0x1:
            raise Refused(400, "This DOCX is encrypted; upload it unlocked.")
    try:
        import docx

        docx.Document(io.BytesIO(data))
    except Exception as exc:  # python-docx raises many kinds on a malformed package
        raise Refused(400, f"This DOCX is corrupt or unreadable ({type(exc).__name__}).") from None
    return Intake(MediaType.DOCX)


# --- text --------------------------------------------------------------------------


def _utf8(data: bytes) -> str | None:
    """The text, when the bytes are UTF-8 without NUL or other binary control bytes."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.removeprefix("\ufeff")
    if re.search(r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]", text):
        return None
    return text


# A page starts (after blanks and comments) with its doctype, <html>, <head> or <body>;
# a text that only mentions tags further down (a Markdown code block) stays text.
_HTML_START = re.compile(r"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html|head|body)[\s>]", re.I | re.S)


def _looks_like_html(text: str) -> bool:
    return bool(_HTML_START.match(text[:4096]))


_MARKDOWN = re.compile(
    r"^(#{1,6}\s+\S|```|~~~|\s{0,3}([-*+]|\d+\.)\s+\S.*\n\s{0,3}([-*+]|\d+\.)\s+\S)"
    r"|\[[^\]\n]+\]\([^)\s]+\)|^\s{0,3}>\s|\*\*[^*\n]+\*\*",
    re.M,
)


def _looks_like_markdown(text: str) -> bool:
    """Headings, fences, lists, links, quotes or bold: Markdown; else plain text."""
    return bool(_MARKDOWN.search(text[:65536]))
