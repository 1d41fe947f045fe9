"""The text of a stored document, page by page.

`iter_pages(data, media_type)` yields one text per page, in order, so a long PDF can
report its progress page by page; `document_pages` is the same as a list. The bytes are
those `documents.intake` accepted (so the type is known and the file was checked for
zip bombs and deep page trees); anything that still cannot be read raises `ParseError`
with a reason a person can read.

A page's text is what chunk offsets point into and what quotes are checked against, so
it is made once, here, the same way for every use. Across formats a paragraph ends with
a blank line (`"\\n\\n"`), a line break inside one is `"\\n"`, and there are no
control characters (PostgreSQL text holds no NUL).

- PDF (pypdf): one text per page; a page without text (a scan) is `""`. Spaces are
  collapsed, lines stripped, blank lines kept as paragraph breaks.
- DOCX (python-docx): paragraphs and tables (a row a line, cells joined by `" | "`) in
  document order. Pages break where Word last rendered them (`w:lastRenderedPageBreak`)
  when the file has any; otherwise at hard page breaks (`w:br w:type="page"`); a file
  with neither (or written by a program that does not paginate) is one page. Page breaks
  that come only from styles or section settings are not seen.
- Markdown and plain text: kept as written (line endings become `"\\n"`); a form feed
  ends a page, so a text without one is one page.
- HTML: its text only, one page (`html_text`: no tags, scripts or styles; block
  elements become line breaks). Upload stores the same text (`documents.intake`).
- Repositories (zip, tar, tar.gz): a page for each text file, in the order of their
  paths, labelled with its path (`iter_labelled_pages`, `archive_pages`); its text kept
  as written (line endings become `"\\n"`, control characters spaces, a form feed
  too: a file is one page). Binary files (a NUL byte, or not UTF-8) and files over
  `TEXT_FILE_MAX_BYTES` (minified bundles, lock files, data) have no page. The files
  are read through `documents.archives`, the same reader as the upload check.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

from documents.models import Document

MediaType = Document.MediaType


class ParseError(Exception):
    """The document's text cannot be read; `message` says why, for a person."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def document_pages(data: bytes, media_type: str) -> list[str]:
    """Every page's text, in order (page 1 first)."""
    return list(iter_pages(data, media_type))


def iter_pages(data: bytes, media_type: str) -> Iterator[str]:
    """Each page's text, in order. A PDF's pages are read one at a time, as they are
    asked for; other formats are read whole at the first."""
    return (text for _, text in iter_labelled_pages(data, media_type))


def iter_labelled_pages(data: bytes, media_type: str) -> Iterator[tuple[str, str]]:
    """Each page's label (a repository's file path; else "") and text, in order."""
    from documents.archives import is_archive
    from documents.intake import Refused

    if is_archive(media_type):
        try:
            return iter(archive_pages(data, media_type))
        except Refused as exc:
            raise ParseError(exc.message) from None
    return (("", text) for text in _texts(data, media_type))


def _texts(data: bytes, media_type: str) -> Iterator[str]:
    if media_type == MediaType.PDF:
        return _pdf_pages(data)
    if media_type == MediaType.DOCX:
        return iter(_docx_pages(data))
    if media_type in (MediaType.MARKDOWN, MediaType.TEXT):
        return iter(text_pages(_decoded(data)))
    if media_type == MediaType.HTML:
        return iter([html_text(_decoded(data))])
    raise ParseError(f"Documents of type {media_type!r} cannot be read.")


# --- repositories --------------------------------------------------------------------

# A text file larger than this is not read as a page (it is still in the archive).
TEXT_FILE_MAX_BYTES = 1 << 20


def archive_pages(data: bytes, media_type: str) -> list[tuple[str, str]]:
    """A repository's text files as (path, text), by path; raises
    `documents.intake.Refused` for an archive that is not safe to read."""
    from documents.archives import archive_files

    pages = []
    for file in archive_files(data, media_type):
        text = file_text(file.data)
        if text is not None:
            pages.append((file.path, text))
    return sorted(pages)


def file_text(data: bytes) -> str | None:
    """A repository file's page text, or None for a binary or too large file."""
    if len(data) > TEXT_FILE_MAX_BYTES or b"\0" in data:
        return None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        return None
    return _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))


# --- whitespace --------------------------------------------------------------------

# Control characters other than tab and newline (a form feed has ended its page by now).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SPACES = re.compile(r"[^\S\n]+")


def tidy(text: str) -> str:
    """Spaces collapsed, lines stripped, at most one blank line in a row, no control
    characters, nothing around: the text of a page read out of a layout (PDF, DOCX,
    HTML), where whitespace carries no meaning beyond line and paragraph breaks."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub(" ", text)
    lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# --- text and Markdown -------------------------------------------------------------


def _decoded(data: bytes) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise ParseError(f"This text is not valid UTF-8 (byte {exc.start}).") from None


def text_pages(text: str) -> list[str]:
    """A text's pages: split at form feeds, otherwise as written (line endings become
    `"\\n"`, control characters spaces, so indentation and Markdown survive). A form feed
    ends a page: one at the very end starts no empty page after it."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    pages = [_CONTROL.sub(" ", page) for page in text.split("\f")]
    if len(pages) > 1 and not pages[-1].strip():
        pages.pop()
    return pages


# --- HTML --------------------------------------------------------------------------


class _TextOfHtml(HTMLParser):
    SKIPPED = {"script", "style", "template", "noscript", "head", "svg", "math"}
    # Blocks stand apart as paragraphs; a line element starts a line of its own.
    BLOCKS = {
        "address", "article", "aside", "blockquote", "details", "dialog", "div", "dl",
        "fieldset", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
        "header", "hr", "main", "nav", "ol", "p", "pre", "section", "table", "ul",
    }  # fmt: skip
    LINES = {"br", "caption", "dd", "dt", "figcaption", "li", "summary", "tr"}
    # Cells of a row stay on its line, apart.
    CELLS = {"td", "th"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "body":
            # </head> may be left out: the body ends whatever was being skipped.
            self.skipping = 0
        elif tag in self.SKIPPED:
            self.skipping += 1
        elif tag in self.CELLS:
            self.parts.append(" ")
        elif tag in self.LINES:
            self.parts.append("\n")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag: str, attrs: Any) -> None:
        # <br/> is one line break, as <br> is; <script/> skips nothing.
        if tag not in self.SKIPPED:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIPPED and self.skipping:
            self.skipping -= 1
        elif tag in self.CELLS:
            self.parts.append(" ")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(data)


def html_text(html: str) -> str:
    """The text a person reads on the page: no tags, scripts or styles; paragraphs,
    headings and other blocks apart, a table's row a line."""
    parser = _TextOfHtml()
    parser.feed(html)
    parser.close()
    return tidy("".join(parser.parts))


# --- PDF ---------------------------------------------------------------------------


def _pdf_pages(data: bytes) -> Iterator[str]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            raise ParseError("This PDF is encrypted (password-protected).")
        count = len(reader.pages)
    except ParseError:
        raise
    except Exception as exc:  # pypdf meets malformed files with many kinds of error
        raise ParseError(f"This PDF is corrupt or unreadable ({_why(exc)}).") from None
    for number in range(1, count + 1):
        try:
            text = reader.pages[number - 1].extract_text()
        except Exception as exc:
            raise ParseError(f"Page {number} of this PDF cannot be read ({_why(exc)}).") from None
        yield tidy(text or "")


def _why(exc: Exception) -> str:
    detail = str(exc).strip()
    return f"{type(exc).__name__}: {detail[:200]}" if detail else type(exc).__name__


# --- DOCX --------------------------------------------------------------------------

_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"
_PARAGRAPH, _TABLE, _ROW, _CELL, _RUN = (f"{_W}p", f"{_W}tbl", f"{_W}tr", f"{_W}tc", f"{_W}r")
_RENDERED_BREAK = f"{_W}lastRenderedPageBreak"
_PAGE = object()  # a page break in the stream of a DOCX's text


def _docx_pages(data: bytes) -> list[str]:
    try:
        import docx

        body = docx.Document(io.BytesIO(data)).element.body
    except Exception as exc:  # python-docx raises many kinds on a malformed package
        raise ParseError(f"This DOCX is corrupt or unreadable ({_why(exc)}).") from None
    # A hard break is followed by a rendered one where Word last laid the file out, so
    # only one kind is counted: Word's layout when there is one.
    rendered = next(body.iter(_RENDERED_BREAK), None) is not None
    pages: list[str] = []
    page: list[str] = []
    for item in _docx_blocks(body, rendered=rendered):
        if item is _PAGE:
            pages.append(tidy("".join(page)))
            page = []
        else:
            page.append(str(item))
    pages.append(tidy("".join(page)))
    return pages


def _docx_blocks(container: Any, *, rendered: bool) -> Iterator[object]:
    """The text of a body, a cell or a content control, paragraphs and tables in order,
    with `_PAGE` where a page breaks."""
    for element in container.iterchildren():
        if element.tag == _PARAGRAPH:
            yield from _docx_paragraph(element, rendered=rendered)
            yield "\n\n"
        elif element.tag == _TABLE:
            for row in element.iter(_ROW):
                if _nearest(row, _TABLE) is not element:
                    continue  # a table inside a cell is read with its cell
                for number, cell in enumerate(row.iterchildren(_CELL)):
                    if number:
                        yield " | "
                    for item in _docx_blocks(cell, rendered=rendered):
                        yield " " if item == "\n\n" else item
                yield "\n"
            yield "\n"
        elif element.tag in (f"{_W}sdt", f"{_W}sdtContent", f"{_W}customXml"):
            yield from _docx_blocks(element, rendered=rendered)


def _docx_paragraph(paragraph: Any, *, rendered: bool) -> Iterator[object]:
    for run in paragraph.iter(_RUN):
        if _nearest(run, _PARAGRAPH) is not paragraph:
            continue  # a text box's paragraphs are not the page's text
        for child in run.iterchildren():
            tag = child.tag
            if tag == f"{_W}t":
                yield child.text or ""
            elif tag in (f"{_W}tab", f"{_W}ptab"):
                yield "\t"
            elif tag == f"{_W}noBreakHyphen":
                yield "-"
            elif tag == f"{_W}cr":
                yield "\n"
            elif tag == f"{_W}br":
                kind = child.get(f"{_W}type")
                if kind == "page":
                    if not rendered:
                        yield _PAGE
                elif kind != "column":
                    yield "\n"
            elif tag == _RENDERED_BREAK and rendered:
                yield _PAGE


def _nearest(element: Any, tag: str) -> Any:
    return next(element.iterancestors(tag), None)
