"""Documents: each format read into page texts (page breaks where the file has them),
corrupt files refused with a reason, and page-aware chunks whose offsets rebuild their
text exactly, within the token target, overlapping."""

from __future__ import annotations

import io
import itertools
import re
import zipfile

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from documents.chunking import (
    PAGE_BREAK,
    ChunkSpan,
    chunk_text_from_pages,
    chunks_of,
    estimated_tokens,
)
from documents.intake import intake_check
from documents.parsing import ParseError, document_pages, html_text, iter_pages, text_pages
from tests.pdfs import pdf_with_text

PDF = "application/pdf"
DOCX = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
HTML = "text/html"
MARKDOWN = "text/markdown"
TEXT = "text/plain"

PROPERTIES = hypothesis_settings(derandomize=True, database=None, deadline=None, print_blob=True)


# --- files made in the test -----------------------------------------------------------


def saved(document) -> bytes:
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def docx_with_page_breaks() -> bytes:
    import docx

    document = docx.Document()
    document.add_heading("Annual   report", level=1)
    document.add_paragraph("Revenue grew.\tCosts fell.")
    document.add_page_break()
    table = document.add_table(rows=2, cols=2)
    for row, cells in zip(table.rows, [("Year", "Revenue"), ("2025", "12")], strict=True):
        for cell, value in zip(row.cells, cells, strict=True):
            cell.text = value
    paragraph = document.add_paragraph("Before the break")
    paragraph.add_run().add_break(docx.enum.text.WD_BREAK.PAGE)
    paragraph.add_run("after the break.")
    line = document.add_paragraph("One line")
    line.add_run().add_break()  # a line break, not a page break
    line.add_run("and the next.")
    return saved(document)


def docx_with_rendered_breaks() -> bytes:
    """As Word saves a file it has laid out: a hard break followed by Word's own record
    of where the page broke, and a page that broke by itself mid-paragraph."""
    import docx
    from docx.oxml import OxmlElement

    document = docx.Document()
    document.add_paragraph("Page one.")
    document.add_page_break()
    top = document.add_paragraph()
    top.add_run()._r.append(OxmlElement("w:lastRenderedPageBreak"))
    top.add_run("Page two starts")
    flowing = top.add_run(" and flows")
    flowing._r.append(OxmlElement("w:lastRenderedPageBreak"))
    top.add_run(" onto page three.")
    return saved(document)


# --- parsing ----------------------------------------------------------------------------


def test_a_pdf_is_read_page_by_page_with_empty_pages_kept():
    data = pdf_with_text(
        [["Minutes of   the meeting", "All agreed (unanimously)."], [], ["Signed."]]
    )
    assert document_pages(data, PDF) == [
        "Minutes of the meeting\nAll agreed (unanimously).",
        "",
        "Signed.",
    ]


def test_a_pdf_is_read_lazily_one_page_at_a_time():
    pages = iter_pages(pdf_with_text([["One."], ["Two."], ["Three."]]), PDF)
    assert next(pages) == "One."
    assert list(pages) == ["Two.", "Three."]


def test_a_docx_breaks_into_pages_at_its_page_breaks():
    assert document_pages(docx_with_page_breaks(), DOCX) == [
        "Annual report\n\nRevenue grew. Costs fell.",
        "Year | Revenue\n2025 | 12\n\nBefore the break",
        "after the break.\n\nOne line\nand the next.",
    ]


def test_a_docx_laid_out_by_word_breaks_where_word_broke_it():
    assert document_pages(docx_with_rendered_breaks(), DOCX) == [
        "Page one.",
        "Page two starts and flows",
        "onto page three.",
    ]


def test_a_docx_without_page_breaks_is_one_page():
    import docx

    document = docx.Document()
    document.add_paragraph("Only")
    document.add_paragraph("page.")
    assert document_pages(saved(document), DOCX) == ["Only\n\npage."]


def test_text_and_markdown_are_kept_as_written_and_split_at_form_feeds():
    markdown = b"# Title\r\n\r\n    code, indented\r\n"
    assert document_pages(markdown, MARKDOWN) == ["# Title\n\n    code, indented\n"]
    text = "caf\u00e9  one\fpage two\f\fpage four\f".encode()
    assert document_pages(text, TEXT) == ["caf\u00e9  one", "page two", "", "page four"]
    assert text_pages("no form feed") == ["no form feed"]


def test_html_is_its_text_with_blocks_on_lines_of_their_own():
    html = (
        b"<!doctype html><html><head><title>T</title><style>p{}</style>"
        b"<body><script>alert(1)</script><h1>Minutes</h1><p>All &amp; one<br/>line two"
        b"</p><table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>"
        b"<ul><li>x</li><li>y</li></ul></body></html>"
    )
    # No </head>: the body is read all the same.
    assert document_pages(html, HTML) == ["Minutes\n\nAll & one\nline two\n\na b\nc d\n\nx\ny"]


def test_upload_and_parsing_read_html_the_same_way():
    html = b"<html><body><p>One</p><div>Two <b>bold</b></div></body></html>"
    assert intake_check(html).pages == document_pages(html, HTML) == [html_text(html.decode())]


@pytest.mark.parametrize(
    ("data", "media_type", "reason"),
    [
        (b"%PDF-1.4\nnot a pdf at all", PDF, "This PDF is corrupt or unreadable"),
        (pdf_with_text([["x"]])[:200], PDF, "This PDF is corrupt or unreadable"),
        (b"PK\x03\x04 not a zip", DOCX, "This DOCX is corrupt or unreadable"),
        (b"\xff\xfe text", TEXT, "not valid UTF-8"),
        (b"\xff\xfe <html>", HTML, "not valid UTF-8"),
        (b"anything", "image/png", "cannot be read"),
    ],
)
def test_a_corrupt_file_raises_a_parse_error_with_its_reason(data, media_type, reason):
    with pytest.raises(ParseError) as raised:
        document_pages(data, media_type)
    assert reason in raised.value.message


def test_a_zip_that_is_not_a_docx_raises_a_parse_error():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("word/document.xml", b"<not-word/>")
    with pytest.raises(ParseError, match="DOCX is corrupt"):
        document_pages(out.getvalue(), DOCX)


def test_an_encrypted_pdf_raises_a_parse_error():
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(200, 200)
    writer.encrypt("secret")
    out = io.BytesIO()
    writer.write(out)
    with pytest.raises(ParseError, match="encrypted"):
        document_pages(out.getvalue(), PDF)


# --- chunking ---------------------------------------------------------------------------


def words(text: str) -> int:
    return len(text.split())


def check_chunks(pages: list[str], chunks: list[ChunkSpan], *, target, overlap, count):
    """What every chunking must hold: offsets that rebuild the text, whole words, the
    target kept (unless by one word alone), overlap within its budget, nothing left out."""
    text = PAGE_BREAK.join(pages)
    all_words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    page_starts = []
    offset = 0
    for page in pages:
        page_starts.append(offset)
        offset += len(page) + len(PAGE_BREAK)
    covered = 0  # words covered so far, from the start
    previous: tuple[int, int] | None = None
    for chunk in chunks:
        assert chunk_text_from_pages(pages, chunk) == chunk.text
        assert 1 <= chunk.page_start <= chunk.page_end <= len(pages)
        assert 0 <= chunk.char_start < len(pages[chunk.page_start - 1])
        assert 0 < chunk.char_end <= len(pages[chunk.page_end - 1])
        assert chunk.text == chunk.text.strip() != ""
        assert chunk.token_count == count(chunk.text)
        start = page_starts[chunk.page_start - 1] + chunk.char_start
        end = page_starts[chunk.page_end - 1] + chunk.char_end
        assert text[start:end] == chunk.text
        # Never mid-word: the chunk starts where a word starts and ends where one ends.
        assert start in {s for s, _ in all_words} and end in {e for _, e in all_words}
        assert chunk.token_count <= target or len(chunk.text.split()) == 1
        if previous is not None:
            assert start > previous[0] and end > previous[1]
            if start < previous[1]:  # an overlap: within its budget
                assert count(text[start : previous[1]]) <= overlap
        previous = (start, end)
        # Nothing between chunks is skipped.
        assert start <= (all_words[covered][0] if covered < len(all_words) else start)
        while covered < len(all_words) and all_words[covered][1] <= end:
            covered += 1
    assert covered == len(all_words)


page_text = st.text(alphabet=st.sampled_from('ab\u00e9 .\n!"x'), max_size=120)


@hypothesis_settings(PROPERTIES, max_examples=300)
@given(
    pages=st.lists(page_text, min_size=1, max_size=6),
    target=st.integers(min_value=1, max_value=40),
    overlap_share=st.floats(min_value=0, max_value=0.99),
    by_words=st.booleans(),
)
def test_chunk_offsets_rebuild_their_text_exactly(pages, target, overlap_share, by_words):
    count = words if by_words else estimated_tokens
    overlap = int(target * overlap_share)
    chunks = chunks_of(pages, target_tokens=target, overlap_tokens=overlap, count_tokens=count)
    check_chunks(pages, chunks, target=target, overlap=overlap, count=count)


def test_chunks_break_at_paragraphs_then_sentences_then_words():
    pages = [
        "One two three four five six.\n\nSeven eight nine ten eleven. Twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty"
    ]
    chunks = chunks_of(pages, target_tokens=8, overlap_tokens=0, count_tokens=words)
    check_chunks(pages, chunks, target=8, overlap=0, count=words)
    assert [c.text for c in chunks] == [
        "One two three four five six.",  # the paragraph, though two more words fit
        "Seven eight nine ten eleven.",  # the sentence, though three more words fit
        "Twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen",
        "twenty",
    ]


def test_a_chunk_may_run_across_a_page_break():
    pages = ["alpha beta", "gamma delta epsilon. zeta eta"]
    chunks = chunks_of(pages, target_tokens=5, overlap_tokens=0, count_tokens=words)
    check_chunks(pages, chunks, target=5, overlap=0, count=words)
    across, rest = chunks
    assert across.text == "alpha beta\n\ngamma delta epsilon."
    assert (across.page_start, across.char_start, across.page_end, across.char_end) == (
        1,
        0,
        2,
        len("gamma delta epsilon."),
    )
    assert (rest.text, rest.page_start, rest.page_end, rest.char_start) == ("zeta eta", 2, 2, 21)


def test_consecutive_chunks_overlap_by_at_most_the_overlap():
    text = " ".join(f"w{n}" for n in range(40))
    chunks = chunks_of([text], target_tokens=10, overlap_tokens=3, count_tokens=words)
    check_chunks([text], chunks, target=10, overlap=3, count=words)
    assert [c.token_count for c in chunks] == [10, 10, 10, 10, 10, 5]  # 7 new words each
    for before, after in itertools.pairwise(chunks):
        assert before.text.split()[-3:] == after.text.split()[:3]


def test_a_word_longer_than_the_target_is_a_chunk_of_its_own():
    pages = ["short " + "x" * 100 + " tail words here"]
    chunks = chunks_of(pages, target_tokens=5, overlap_tokens=2)
    check_chunks(pages, chunks, target=5, overlap=2, count=estimated_tokens)
    assert "x" * 100 in [c.text for c in chunks]


def test_an_overlap_gives_way_when_the_next_word_would_not_fit_with_it():
    pages = ["aaaa bbbb " + "x" * 12 + " cc"]
    # "bbbb" would be the overlap, but "bbbb xxxxxxxxxxxx" is 17 characters, 4 tokens.
    chunks = chunks_of(pages, target_tokens=3, overlap_tokens=2)
    check_chunks(pages, chunks, target=3, overlap=2, count=estimated_tokens)
    assert [c.text for c in chunks] == ["aaaa bbbb", "x" * 12 + " cc"]


def test_chunks_skip_empty_pages_and_keep_page_numbers():
    pages = ["", "alpha beta", "", "  ", "gamma delta"]
    chunks = chunks_of(pages, target_tokens=2, overlap_tokens=0, count_tokens=words)
    assert [(c.text, c.page_start, c.page_end, c.char_start, c.char_end) for c in chunks] == [
        ("alpha beta", 2, 2, 0, 10),
        ("gamma delta", 5, 5, 0, 11),
    ]


@pytest.mark.parametrize("pages", [[], [""], ["", " \n\n\t ", "\f"]])
def test_an_empty_document_has_no_chunks(pages):
    assert chunks_of(pages, target_tokens=100, overlap_tokens=10) == []


@pytest.mark.parametrize(("target", "overlap"), [(0, 0), (10, 10), (10, -1)])
def test_a_target_or_overlap_out_of_range_is_refused(target, overlap):
    with pytest.raises(ValueError):
        chunks_of(["some text"], target_tokens=target, overlap_tokens=overlap)


def test_a_parsed_pdf_is_chunked_with_its_page_numbers():
    data = pdf_with_text(
        [[f"Page one sentence {n}." for n in range(10)], [], ["Page three ends it."]]
    )
    pages = document_pages(data, PDF)
    chunks = chunks_of(pages, target_tokens=30, overlap_tokens=5)
    check_chunks(pages, chunks, target=30, overlap=5, count=estimated_tokens)
    assert chunks[0].page_start == 1 and chunks[-1].page_end == 3
    assert chunks[-1].text.endswith("Page three ends it.")
