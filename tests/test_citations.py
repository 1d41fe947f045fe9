"""Verified citations (`documents.citations`): quotes located in a document's pages
with their offsets, fabricated and altered ones caught, and answers rewritten so that
only verified quotations are shown as quotations."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from documents.chunking import PAGE_BREAK
from documents.citations import (
    MAX_ELLIPSIS_GAP,
    QuoteCheck,
    QuoteMatch,
    SourceText,
    answer_mark,
    answer_quotes,
    quote_is_too_short,
    quotes_verify,
)

CONTRACT = [
    # page 1
    "MASTER SERVICES AGREEMENT\n\n"
    "1. Payment. The Customer shall pay each invoice within 30 days of its date. Late\n"
    "payments bear interest at 1.5% per month. The obli-\n"
    "gation to pay survives termination of this Agree-\n"
    "ment. A well-\n"
    "known principle of set-off does not apply.\n"
    "2. Licence. The Customer shall not sublicense the Software to any third party.",
    # page 2
    "3. Confidentiality. Each party keeps the other\u2019s \u201cConfidential Information\u201d"
    " secret \u2014 for ﬁve years after\ntermination \u2013 and uses it only for the ﬂow of"
    " this Agreement.\n4. Notices. Notices are given in writing to the addresses above, "
    "and the Customer shall pay each invoice within 30 days of its date.",
    # page 3
    "5. Term. This Agreement continues until either party ends it by written no-",
    # page 4
    "tice of ninety days. The Supplier may e-mail notices.",
]


@pytest.fixture(scope="module")
def source() -> SourceText:
    return SourceText(CONTRACT)


def original(pages: list[str], match: QuoteMatch) -> str:
    """The span of the original pages a match names, read as the chunker reads one."""
    first, last = match.page_start - 1, match.page_end - 1
    if first == last:
        return pages[first][match.char_start : match.char_end]
    return PAGE_BREAK.join(
        [pages[first][match.char_start :], *pages[first + 1 : last], pages[last][: match.char_end]]
    )


def located(source: SourceText, quote: str) -> QuoteMatch:
    match = source.locate(quote)
    assert match is not None, quote
    assert original(source.pages, match) == match.text
    return match


# Exact quotes, whitespace, hyphenation, ligatures, quote styles, dashes ----------


def test_an_exact_quote_is_found_with_its_page_and_offsets(source: SourceText) -> None:
    quote = "The Customer shall not sublicense the Software to any third party"
    match = located(source, quote)
    assert (match.page_start, match.page_end) == (1, 1)
    assert match.char_start == CONTRACT[0].index(quote)
    assert match.char_end == match.char_start + len(quote)
    assert match.text == quote
    assert match.exact_case


def test_whitespace_and_line_breaks_differ(source: SourceText) -> None:
    match = located(source, "within 30 days of its date.   Late payments\tbear interest")
    assert match.text == "within 30 days of its date. Late\npayments bear interest"
    assert match.page_start == 1


def test_a_word_hyphenated_at_a_line_break_is_accepted(source: SourceText) -> None:
    match = located(source, "The obligation to pay survives termination of this Agreement.")
    assert match.text == "The obli-\ngation to pay survives termination of this Agree-\nment"
    # Copied with its line break, or with the hyphen kept, it is the same quote.
    assert source.locate("The obli-\ngation to pay survives") == source.locate(
        "The obligation to pay survives"
    )
    assert source.locate("The obli-gation to pay survives") is not None


def test_a_compound_hyphenated_at_a_line_break_matches_both_forms(source: SourceText) -> None:
    with_hyphen = located(source, "A well-known principle of set-off")
    without = located(source, "A wellknown principle of set-off")
    assert with_hyphen == without
    assert with_hyphen.text == "A well-\nknown principle of set-off"


def test_a_real_hyphen_must_be_quoted(source: SourceText) -> None:
    # `set-off` and `e-mail` are hyphenated on one line: the hyphen is the source's.
    assert source.locate("A well-known principle of setoff") is None
    assert source.locate("The Supplier may email notices") is None
    assert source.locate("The Supplier may e-mail notices") is not None
    # Nor may a quote add a hyphen the source does not have.
    assert source.locate("The Customer shall not sub-license the Software") is None


def test_a_soft_hyphen_at_a_line_break_is_accepted() -> None:
    text = SourceText(["The indemni\u00ad\nfication clause applies to both par\u00adties."])
    match = located(text, "The indemnification clause applies to both parties")
    assert match.char_start == 0
    assert match.text.endswith("par\u00adties")


def test_windows_line_breaks_and_unicode_spaces() -> None:
    pages = ["The obli-\r\ngation to pay\u00a0survives\r\ntermination\u2009of it."]
    match = located(SourceText(pages), "The obligation to pay survives termination of it")
    assert (match.char_start, match.char_end) == (0, len(pages[0]) - 1)
    assert SourceText(pages).place(0) == (1, 0)


def test_markdown_emphasis_in_a_quote_is_not_a_difference(source: SourceText) -> None:
    match = located(source, "The Customer **shall not** sublicense the *Software*")
    assert match.text == "The Customer shall not sublicense the Software"
    assert SourceText(["The **fee** is due."]).locate("The fee is due") is not None


def test_ligatures_match_their_letters(source: SourceText) -> None:
    match = located(source, "for five years after termination")
    assert "ﬁve" in match.text
    assert source.locate("uses it only for the flow of this Agreement") is not None
    # And the other way round: a quote written with a ligature.
    assert SourceText(["the final offer stands firm"]).locate("the ﬁnal offer") is not None


def test_precomposed_and_decomposed_accents_match() -> None:
    text = SourceText(["Le cafe\u0301 est ferme\u0301 le lundi."])
    match = located(text, "Le caf\u00e9 est ferm\u00e9 le lundi")
    assert match.char_end == len("Le cafe\u0301 est ferme\u0301 le lundi")
    # An accent dropped is a different word.
    assert text.locate("Le cafe est ferme le lundi") is None


def test_curly_and_straight_quotes_match(source: SourceText) -> None:
    match = located(source, 'Each party keeps the other\'s "Confidential Information" secret')
    assert "\u2019s \u201cConfidential Information\u201d" in match.text
    # Inner quotes in the style a quotation switches to are the same quotes.
    assert source.locate("keeps the other\u2019s \u2018Confidential Information\u2019") is not None


def test_dashes_match_whatever_their_kind_and_spacing(source: SourceText) -> None:
    for quote in (
        "Information\u201d secret \u2014 for five years after termination \u2013 and uses it",
        'Information" secret - for five years after termination - and uses it',
        'Information" secret--for five years after termination--and uses it',
    ):
        assert located(source, quote).page_start == 2, quote


def test_case_differences_are_matched_and_recorded(source: SourceText) -> None:
    match = located(source, "the customer shall not sublicense the software")
    assert not match.exact_case
    assert match.text == "The Customer shall not sublicense the Software"


def test_surrounding_quote_marks_and_punctuation_are_not_part_of_the_quote(
    source: SourceText,
) -> None:
    match = located(source, "\u201cNotices are given in writing to the addresses above.\u201d")
    assert match.text == "Notices are given in writing to the addresses above"


# Across pages --------------------------------------------------------------------


def test_a_quote_across_a_page_break_names_both_pages(source: SourceText) -> None:
    match = located(source, "for the flow of this Agreement. 4. Notices. Notices are given")
    assert (match.page_start, match.page_end) == (2, 2)
    match = located(source, "either party ends it by written notice of ninety days")
    assert (match.page_start, match.page_end) == (3, 4)
    assert match.char_start == CONTRACT[2].index("either party")
    assert match.char_end == len("tice of ninety days")
    assert CONTRACT[2][match.char_start :] == "either party ends it by written no-"
    assert CONTRACT[3][: match.char_end] == "tice of ninety days"
    assert match.text == "either party ends it by written no-\n\ntice of ninety days"


def test_a_quote_across_pages_without_hyphenation() -> None:
    pages = ["first page ends with these words", "  and the second page begins so"]
    match = located(SourceText(pages), "ends with these words and the second page")
    assert (match.page_start, match.char_start) == (1, pages[0].index("ends"))
    assert (match.page_end, match.char_end) == (2, pages[1].index("second page") + 11)


# Fabricated and altered quotes ---------------------------------------------------


def test_a_fabricated_quote_is_caught(source: SourceText) -> None:
    assert source.locate("The Supplier may terminate this Agreement without notice") is None


@pytest.mark.parametrize(
    "altered",
    [
        "The Customer shall pay each invoice within 60 days of its date",  # a number
        "The Customer shall pay each invoice within 30 weeks of its date",  # a word
        "The Customer may pay each invoice within 30 days of its date",  # a word
        "The Customer shall sublicense the Software to any third party",  # negation dropped
        "Late payments bear interest at 15% per month",  # a number
        "Late payments bear interest at 1.5% per year",
        "The Customer shall not sublicense the Software to any party",  # a word dropped
        "The obligation to pay survives termination of this Agreement in full",  # added
        "0 days of its date. Late payments",  # a part of a number
    ],
)
def test_an_altered_quote_is_caught(source: SourceText, altered: str) -> None:
    assert source.locate(altered) is None


def test_a_quote_matches_whole_words_only() -> None:
    text = SourceText(["The fee is 130 days overdue, as the nonpayment shows."])
    assert text.locate("30 days overdue, as the") is None
    assert text.locate("payment shows") is None
    assert text.locate("130 days overdue, as the") is not None


# Ellipses --------------------------------------------------------------------------


@pytest.mark.parametrize("ellipsis", ["...", "\u2026", "[...]", "[\u2026]", ". . ."])
def test_an_ellipsis_stands_for_omitted_text(source: SourceText, ellipsis: str) -> None:
    match = located(
        source, f"The Customer shall pay each invoice {ellipsis} interest at 1.5% per month"
    )
    assert match.text.startswith("The Customer shall pay each invoice within 30 days")
    assert match.text.endswith("interest at 1.5% per month")


def test_ellipsis_parts_must_be_in_order_and_close(source: SourceText) -> None:
    assert source.locate("set-off does not apply ... The obligation to pay survives") is None
    assert source.locate("The Customer shall pay ... interest at 2% per month") is None
    far = "x " * MAX_ELLIPSIS_GAP
    text = SourceText([f"The first part is here. {far} The second part is there."])
    assert text.locate("The first part is here ... The second part is there") is None
    near = SourceText(["The first part is here. Then some. The second part is there."])
    match = located(near, "The first part is here ... The second part is there")
    assert match.char_start == 0


def test_an_ellipsis_quote_needs_one_part_long_enough(source: SourceText) -> None:
    match = located(source, "The Customer shall not sublicense \u2026 party")
    assert match.text == "The Customer shall not sublicense the Software to any third party"
    assert quote_is_too_short("of the ... to the ... in the")
    assert source.locate("of the ... to the ... in the") is None
    assert source.locate("Customer ... Software ... party") is None


def test_an_ellipsis_part_is_tried_at_each_of_its_occurrences() -> None:
    # The first part is on page 1 too, but only page 2's is followed by the second.
    pages = ["Alpha beta gamma delta. Nothing else here.", "x " * 600]
    pages.append("Alpha beta gamma delta epsilon. Zeta eta theta.")
    match = located(SourceText(pages), "Alpha beta gamma [\u2026] Zeta eta theta")
    assert (match.page_start, match.char_start, match.page_end) == (3, 0, 3)


# Repeated phrases and short fragments ----------------------------------------------


def test_a_repeated_phrase_is_located_at_its_first_occurrence(source: SourceText) -> None:
    match = located(source, "The Customer shall pay each invoice within 30 days of its date")
    assert (match.page_start, match.exact_case) == (1, True)
    # Page 1 writes "The Customer", page 2 "the Customer": a case-exact match comes
    # first, wherever it is.
    match = located(source, "the Customer shall pay each invoice within 30 days of its date")
    assert (match.page_start, match.exact_case) == (2, True)


def test_short_fragments_are_not_verified(source: SourceText) -> None:
    for fragment in ("30 days", "third party", "pay", "\u2026", "", "   "):
        assert quote_is_too_short(fragment), fragment
        assert source.locate(fragment) is None
    assert not quote_is_too_short("within 30 days")  # three words
    assert not quote_is_too_short("Confidential Information")  # twelve characters
    assert source.locate("Confidential Information") is not None
    check = quotes_verify(quotes=["30 days"], source=source)[0]
    assert (check.verified, check.too_short) == (False, True)


def test_quotes_verify_checks_each_quote_in_order(source: SourceText) -> None:
    checks = quotes_verify(
        quotes=[
            "Notices are given in writing",
            "Notices are given by telephone",
            "The obligation to pay survives",
        ],
        source=source,
    )
    assert [c.verified for c in checks] == [True, False, True]
    assert checks[1] == QuoteCheck(quote="Notices are given by telephone", match=None)
    assert checks[2].match is not None and checks[2].match.page_start == 1


def test_an_empty_document_verifies_nothing() -> None:
    assert SourceText([]).locate("anything at all here") is None
    assert SourceText(["", ""]).locate("anything at all here") is None


# Quotations in an answer -------------------------------------------------------------

ANSWER = (
    "The contract says \u201cThe Customer shall pay each invoice within 30 days\u201d and "
    'also "The Customer shall pay each invoice within 60 days". The term '
    "\u201cSoftware\u201d is defined.\n\n"
    "> The obli-\n> gation to pay survives\n> termination of this Agreement.\n\n"
    'In code: `x = "not a quotation at all, it is code"` and\n\n'
    "```python\n"
    'print("this is code, not a quotation either")\n'
    "> nor is this a blockquote at all\n"
    "```\n\n"
    "\u00abNotices are given in writing\u00bb, and \u201cHe wrote \u2018the Supplier may "
    "e-mail notices\u2019 in the margin\u201d.\n"
    "> > Each party keeps the other\u2019s secrets forever\n"
    'He is 6" tall, not a quote "opening here.'
)


def test_answer_quotes_finds_quotations_outside_code() -> None:
    spans = answer_quotes(ANSWER)
    assert [(s.kind, s.text) for s in spans] == [
        ("inline", "The Customer shall pay each invoice within 30 days"),
        ("inline", "The Customer shall pay each invoice within 60 days"),
        ("block", "The obli-\ngation to pay survives\ntermination of this Agreement."),
        ("inline", "Notices are given in writing"),
        ("inline", "He wrote \u2018the Supplier may e-mail notices\u2019 in the margin"),
        ("block", "Each party keeps the other\u2019s secrets forever"),
    ]
    for span in spans:
        if span.kind == "inline":
            assert ANSWER[span.start] in '\u201c"\u00ab'
            assert ANSWER[span.end - 1] in '\u201d"\u00bb'
            assert ANSWER[span.start + 1 : span.end - 1] == span.text
        else:
            assert ANSWER[span.start] == ">"
            assert span.end == len(ANSWER) or ANSWER[span.end] == "\n"


def test_answer_quotes_ignores_fenced_code_to_the_end_of_an_unclosed_fence() -> None:
    text = 'Before \u201cthe first quotation here\u201d.\n~~~\n"inside the fence still"\n'
    assert [s.text for s in answer_quotes(text)] == ["the first quotation here"]


def test_answer_mark_cites_verified_quotations_and_flags_the_others(
    source: SourceText,
) -> None:
    spans = answer_quotes(ANSWER)
    checks = quotes_verify(quotes=[s.text for s in spans], source=source)
    marked = answer_mark(ANSWER, checks)
    assert (marked.verified, marked.unverified) == (3, 3)
    assert marked.unverified_quotes == [
        "The Customer shall pay each invoice within 60 days",
        "He wrote \u2018the Supplier may e-mail notices\u2019 in the margin",
        "Each party keeps the other\u2019s secrets forever",
    ]
    assert marked.text.startswith(
        "The contract says \u201cThe Customer shall pay each invoice within 30 days\u201d"
        " ([p. 1](#cite-1)) and also [unverified: The Customer shall pay each invoice "
        "within 60 days]. The term \u201cSoftware\u201d is defined.\n\n"
        "> The obli-\n> gation to pay survives\n> termination of this Agreement."
        " ([p. 1](#cite-2))\n\n"
    )
    assert "\u00abNotices are given in writing\u00bb ([p. 2](#cite-3))," in marked.text
    assert "[unverified: He wrote \u2018the Supplier may e-mail notices\u2019 in the margin]" in (
        marked.text
    )
    assert "\n[unverified: Each party keeps the other\u2019s secrets forever]\n" in marked.text
    # Code is left as written.
    assert '`x = "not a quotation at all, it is code"`' in marked.text
    assert "> nor is this a blockquote at all\n```" in marked.text
    # No unverified quotation is left in quote marks or in a blockquote.
    for quote in marked.unverified_quotes:
        assert not re.search(rf"[\u201c\"\u00ab]{re.escape(quote)}", marked.text)
        assert not re.search(rf"^>.*{re.escape(quote[:20])}", marked.text, re.MULTILINE)
    assert [c.number for c in marked.citations] == [1, 2, 3]
    for citation in marked.citations:
        assert marked.text[citation.start : citation.end] == (
            f"[{citation.label}](#{citation.anchor})"
        )
    first = marked.citations[0]
    assert first.quote == "The Customer shall pay each invoice within 30 days"
    assert CONTRACT[0][first.char_start : first.char_end] == first.quote
    assert answer_quotes(marked.text)[0].text == first.quote


def test_a_blockquote_s_attribution_and_page_reference_are_not_quoted(
    source: SourceText,
) -> None:
    answer = (
        "> The Customer shall not sublicense the Software (p. 1)\n"
        "> \u2014 Section 2, Licence\n\n"
        "> Each party keeps its secrets forever. [p. 2]\n"
        "> -- Section 3\n"
    )
    spans = answer_quotes(answer)
    assert [s.text for s in spans] == [
        "The Customer shall not sublicense the Software",
        "Each party keeps its secrets forever.",
    ]
    marked = answer_mark(answer, quotes_verify(quotes=[s.text for s in spans], source=source))
    # The verified one keeps its lines; the other is shown with all it said, unquoted.
    assert marked.text == (
        "> The Customer shall not sublicense the Software (p. 1)\n"
        "> \u2014 Section 2, Licence ([p. 1](#cite-1))\n\n"
        "[unverified: Each party keeps its secrets forever. [p. 2]\n-- Section 3]\n"
    )


def test_answer_mark_treats_a_quotation_without_a_check_as_unverified() -> None:
    marked = answer_mark("She said \u201cthe goods arrived broken\u201d.", [])
    assert marked.text == "She said [unverified: the goods arrived broken]."
    assert (marked.verified, marked.unverified) == (0, 1)


def test_answer_mark_labels_a_quotation_across_pages(source: SourceText) -> None:
    answer = "It ends \u201cby written notice of ninety days\u201d."
    checks = quotes_verify(quotes=[s.text for s in answer_quotes(answer)], source=source)
    marked = answer_mark(answer, checks)
    assert marked.text == (
        "It ends \u201cby written notice of ninety days\u201d ([pp. 3\u20134](#cite-1))."
    )
    citation = marked.citations[0]
    assert (citation.page_start, citation.page_end) == (3, 4)


# Properties ----------------------------------------------------------------------------

WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=9)


@st.composite
def document_and_span(draw: st.DrawFn) -> tuple[list[str], str, tuple[int, int, int, int]]:
    """Pages of distinct words laid out with random whitespace, line-break hyphens and
    ligatures; a span of at least three words re-wrapped differently; its place."""
    words = draw(st.lists(WORD, min_size=4, max_size=40, unique=True))
    cuts = sorted(draw(st.sets(st.integers(1, len(words) - 1), max_size=3)))
    pages: list[str] = []
    places: list[tuple[int, int, int]] = []  # each word's page, start, end
    for number, (low, high) in enumerate(zip([0, *cuts], [*cuts, len(words)], strict=True)):
        text = draw(st.sampled_from(["", " ", "\n"]))
        for word in words[low:high]:
            shown = word.replace("fi", "\ufb01") if draw(st.booleans()) else word
            if len(shown) >= 2 and draw(st.integers(0, 3)) == 0:
                cut = draw(st.integers(1, len(shown) - 1))
                shown = (
                    shown[:cut]
                    + draw(st.sampled_from(["-\n", "-  \n  ", "\u00ad\n"]))
                    + shown[cut:]
                )
            places.append((number + 1, len(text), len(text) + len(shown)))
            text += shown + draw(st.sampled_from([" ", "\n", "  ", " \n ", "\t", "\u00a0"]))
        pages.append(text)
    first = draw(st.integers(0, len(words) - 3))
    last = draw(st.integers(first + 2, len(words) - 1))
    quote = ""
    for word in words[first : last + 1]:
        if len(word) >= 2 and draw(st.integers(0, 4)) == 0:
            cut = draw(st.integers(1, len(word) - 1))
            word = word[:cut] + "-\n" + word[cut:]
        quote += word + draw(st.sampled_from([" ", "\n", "   ", "\r\n"]))
    page_start, char_start, _ = places[first]
    page_end, _, char_end = places[last]
    return pages, quote, (page_start, char_start, page_end, char_end)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document_and_span())
def test_a_rewrapped_span_locates_back_to_its_place(
    case: tuple[list[str], str, tuple[int, int, int, int]],
) -> None:
    pages, quote, place = case
    match = SourceText(pages).locate(quote)
    assert match is not None
    assert (match.page_start, match.char_start, match.page_end, match.char_end) == place
    assert original(pages, match) == match.text


@settings(max_examples=200, deadline=None)
@given(document_and_span(), st.data())
def test_a_span_with_a_word_replaced_is_not_located(
    case: tuple[list[str], str, tuple[int, int, int, int]], data: st.DataObject
) -> None:
    pages, quote, _ = case
    words = quote.split()
    index = data.draw(st.integers(0, len(words) - 1))
    replacement = data.draw(WORD.filter(lambda w: w != words[index].replace("-", "")))
    words[index] = replacement
    assert SourceText(pages).locate(" ".join(words)) is None
