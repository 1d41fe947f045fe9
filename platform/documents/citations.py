"""Verified citations: every quote checked against a document's source text and
mapped to its page and offsets, so that an answer never shows a quote the document
does not contain.

`SourceText(pages)` is built once from a document's page texts (page 1 first). It
holds `text`, the whole document normalised, and maps each normalised character back
to the span of original characters it came from. Pages are read joined by
`PAGE_BREAK` (a page break is whitespace), as the chunker reads them
(`documents.chunking`). `locate(quote)` finds a quote in it and returns a
`QuoteMatch`: pages from 1, `char_start` an offset into the original text of page
`page_start` and `char_end` (exclusive) one into page `page_end`, and `text` the
source's exact original characters of the span (across pages: the rest of the first
page, the pages between, the start of the last, joined by `PAGE_BREAK`).

Normalisation, applied alike to the source and to quotes:
- Compatibility decomposition (NFKD, the equivalence NFKC uses: ligatures `ﬁ ﬂ` become
  `fi fl`, full-width forms and non-breaking spaces plain ones, `…` three dots; a
  precomposed `é` and `e` + combining accent are the same). It is applied a character
  at a time, so that every normalised character comes from one source character.
- Quote marks, apostrophes and primes are one character: the straight `"`, the curly
  double and single quotes (U+2018-U+201F), guillemets (U+00AB, U+00BB, U+2039,
  U+203A), primes (U+2032, U+2033, U+2035, U+2036) and the full-width quotes all become
  `'`, double and single alike, since a quotation switches the style of the quotes
  inside it by convention (the source's `"Agreement"` is in single quotes in a
  quotation in double quotes).
- Dashes unified: the Unicode hyphens and dashes (U+2010-U+2015), the minus sign
  (U+2212) and the small and full-width hyphens become `-`; a run of dashes is one dash
  (`--` is an em dash), and whitespace around a dash is dropped (`a - b` and `a-b` are
  the same).
- Soft hyphens and zero-width characters (U+200B-U+200D, U+2060, U+FEFF) removed, and
  asterisks: an answer may bold words inside a quotation (`**shall not**`), and a
  Markdown source has them as emphasis.
- Any run of whitespace (line breaks and page breaks included) is one space.
- Hyphens are taken out of `text` and remembered by position, each either *real* or a
  *line break* one. A line-break hyphen is a hyphen (`-`, U+2010, U+2011) between a
  letter and a line break followed by a letter (`obli-\\ngation`), or a soft hyphen
  followed by whitespace. A real hyphen in the source must be in the quote at that
  place and a real hyphen in the quote must be in the source; a line-break hyphen is
  optional either way, so `obli-\\ngation` matches `obligation`, and `well-\\nknown`
  matches both `well-known` and `wellknown`. `e-mail` does not match `email`, nor
  `10-20` `1020`.

Matching:
- Quotes are stripped, at each end, of whitespace, quote marks, dashes and `. , ; : ! ?`.
- Case is kept; only when no case-exact match exists is the quote matched ignoring
  case, and `QuoteMatch.exact_case` is then False (a quote that capitalises its first
  word, as a sentence does, is still the source's words).
- A match begins and ends at word boundaries: `0 days` is not found in `30 days`.
- A phrase the source holds more than once is located at its first occurrence (its
  first case-exact one, when there is one).
- A quote is too short to verify when its normalised text has fewer than
  `MIN_QUOTE_WORDS` (3) words and fewer than `MIN_QUOTE_CHARS` (12) characters (`30
  days`, `the Buyer`; with ellipses: when every part is, as in `of the ... to the`,
  which would be found almost anywhere): such a fragment says nothing about where it came from, so
  `locate` returns None for it and `quotes_verify` reports it unverified (with
  `too_short`); in a free-text answer, `answer_quotes` does not take a fragment in
  quote marks (or a blockquote as short) for a quotation: it is a term, or a word in
  quote marks, and is left as it is written.
- An ellipsis in a quote (`...`, `. . .`, `…`, `[...]`, `[…]`) stands for omitted
  text: the parts between ellipses must each be found, in order, each beginning at most
  `MAX_ELLIPSIS_GAP` (1,000) normalised characters (about a third of a page) after the
  end of the part before; the match spans the first part to the last. One part at
  least must not be too short (above); the others may be a word.

Free-text answers (a chat answer over documents):
- `answer_quotes(text)` finds what the answer presents as quotations: text in `“…”`,
  `„…“`, `"…"` and `«…»` within a paragraph, and Markdown blockquotes (consecutive lines
  starting with `>`, nested `> >` markers taken off; a last line that attributes it,
  `— Section 4`, and a page reference at its end, `(p. 3)`, are the answer's words, not
  the quotation), outside fenced code blocks and inline code spans. Quote marks inside
  a quotation belong to it. Single quote marks are not taken as quotation marks (they
  are also apostrophes).
- `answer_mark(text, checks)` rewrites the answer: a verified quotation keeps its marks
  (or its blockquote) and is followed by a citation marker, a Markdown link
  ` ([p. 12](#cite-1))` (`pp. 12-13`, with an en dash, across pages) whose fragment
  names the citation; an unverified one loses its marks (or its `>` prefixes) and is
  written `[unverified: …]`. A quotation is matched to its check by its text; one
  without a check counts as unverified. It returns the text, the citations as data
  (number, quote, place, the link's offsets in the new text) for the caller to tie to a
  document, and the counts.

Measured (the development machine, 2 shared cores; 300 pages of 3,000 characters of
contract-like English with some line-break hyphens): building the `SourceText` takes
0.12 s (0.3 s for a text where every other word has an accent, a curly quote or a
dash; 0.1 s for Chinese); a real quote of 6 to 16 words is located in 0.15 ms (about
6,500 lookups a second), a fabricated one in 0.4 ms (two scans of the whole text,
case-exact and then ignoring case), a quote with an ellipsis in 0.35 ms.
"""

from __future__ import annotations

import bisect
import functools
import re
import unicodedata
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from documents.chunking import PAGE_BREAK

MIN_QUOTE_WORDS = 3
MIN_QUOTE_CHARS = 12
MAX_ELLIPSIS_GAP = 1000
# Candidate positions tried for one quote: bounds the work for a quote whose first
# ellipsis part is a common word.
_MAX_CANDIDATES = 10_000

_DASHES = "-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"
_DOUBLE_QUOTES = '"\u201c\u201d\u201e\u201f\u2033\u2036\u00ab\u00bb\uff02'
_SINGLE_QUOTES = "\u2018\u2019\u201a\u201b\u2032\u2035\u2039\u203a\uff07"
# Soft hyphen, zero-width characters, and the asterisk of Markdown emphasis.
_INVISIBLE = "\u00ad\u200b\u200c\u200d\u2060\ufeff*"
_SPECIAL = _DASHES + _DOUBLE_QUOTES + _SINGLE_QUOTES + _INVISIBLE
_CHAR_MAP: dict[int, str | None] = {
    **{ord(c): "'" for c in _DOUBLE_QUOTES},
    **{ord(c): "'" for c in _SINGLE_QUOTES},
    **{ord(c): None for c in _INVISIBLE},
    **{ord(c): "-" for c in _DASHES},
}
_LETTER = r"[^\W\d_]"
_TOKENS = re.compile(
    # A line-break hyphen: between a letter and a letter, across a line break.
    rf"(?P<brk>(?<={_LETTER})(?:[-\u2010\u2011][^\S\n]*\n\s*|\u00ad\s+)(?={_LETTER}))"
    r"|(?P<ws>\s+)"
    rf"|(?P<dash>[{re.escape(_DASHES)}]+)"
    # Words separated by single spaces: normalised already, unless not NFKD.
    rf"|(?P<plain>[^\s{re.escape(_SPECIAL)}]+(?: [^\s{re.escape(_SPECIAL)}]+)*)"
    r"|(?P<other>.)",
    re.DOTALL,
)
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_ELLIPSIS = re.compile(r"\[\s*(?:\u2026|\.(?:\s?\.){2,})\s*\]|\u2026|\.(?:\s?\.){2,}")
_TRIM = " \t\r\n\f\v\u00a0\"'.,;:!?" + _SPECIAL


@dataclass(frozen=True)
class QuoteMatch:
    """Where a quote is in the source: pages from 1, `char_start` in page `page_start`'s
    original text, `char_end` (exclusive) in page `page_end`'s; `text` the original
    characters of the span; `exact_case` False when found only ignoring case."""

    page_start: int
    page_end: int
    char_start: int
    char_end: int
    text: str
    exact_case: bool = True


@dataclass(frozen=True)
class QuoteCheck:
    """A quote and where the source has it (None: not verified)."""

    quote: str
    match: QuoteMatch | None

    @property
    def verified(self) -> bool:
        return self.match is not None

    @property
    def too_short(self) -> bool:
        """Too short to verify at all (see the module docstring)."""
        return quote_is_too_short(self.quote)


@dataclass(frozen=True)
class _Normalized:
    text: str
    starts: array[int]  # per character of `text`: the original span it came from
    ends: array[int]
    # position in `text` before which a hyphen was taken out -> (start, end, line break)
    hyphens: dict[int, tuple[int, int, bool]]


class _Builder:
    """Appends normalised characters with the original span of each."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.starts = array("i")
        self.ends = array("i")
        self.length = 0
        self.hyphens: dict[int, tuple[int, int, bool]] = {}

    def last(self) -> str:
        return self.pieces[-1][-1] if self.pieces else ""

    def plain(self, text: str, start: int) -> None:
        n = len(text)
        self.pieces.append(text)
        self.starts.extend(range(start, start + n))
        self.ends.extend(range(start + 1, start + n + 1))
        self.length += n

    def mapped(self, text: str, start: int, end: int) -> None:
        n = len(text)
        self.pieces.append(text)
        if n == 1:  # most often: a quote mark, a space, an accented letter
            self.starts.append(start)
            self.ends.append(end)
        else:
            self.starts.extend([start] * n)
            self.ends.extend([end] * n)
        self.length += n

    def space(self, start: int, end: int) -> None:
        last = self.last()
        if not last or last == " " or self.length in self.hyphens:
            return
        self.mapped(" ", start, end)

    def hyphen(self, start: int, end: int, line_break: bool) -> None:
        if self.last() == " ":  # whitespace before a dash is dropped
            self.pieces.pop()
            self.starts.pop()
            self.ends.pop()
            self.length -= 1
        earlier = self.hyphens.get(self.length)
        if earlier:  # `- -`: one dash
            self.hyphens[self.length] = (earlier[0], end, earlier[2] and line_break)
        else:
            self.hyphens[self.length] = (start, end, line_break)

    def result(self) -> _Normalized:
        return _Normalized("".join(self.pieces), self.starts, self.ends, self.hyphens)


def _normalize(text: str) -> _Normalized:
    out = _Builder()
    for token in _TOKENS.finditer(text):
        kind = token.lastgroup
        start, end = token.span()
        if kind == "plain":
            run = token.group()
            if run.isascii() or unicodedata.is_normalized("NFKD", run):
                out.plain(run, start)
                continue
            # Only the characters that decompose are mapped one by one.
            done = 0
            for found in _NON_ASCII.finditer(run):
                index, char = found.start(), found.group()
                decomposed = _decomposed(char)
                if decomposed == char:
                    continue
                if index > done:
                    out.plain(run[done:index], start + done)
                if decomposed:
                    out.mapped(decomposed, start + index, start + index + 1)
                done = index + 1
            if done < len(run):
                out.plain(run[done:], start + done)
        elif kind == "ws":
            out.space(start, end)
        elif kind == "dash":
            out.hyphen(start, end, line_break=False)
        elif kind == "brk":
            out.hyphen(start, start + 1, line_break=True)
        else:
            mapped = token.group().translate(_CHAR_MAP)
            if mapped:
                out.mapped(mapped, start, end)
    return out.result()


@functools.lru_cache(maxsize=65536)
def _decomposed(char: str) -> str:
    return unicodedata.normalize("NFKD", char).translate(_CHAR_MAP)


def _fold(text: str) -> str:
    """Lower case, keeping one character for one (so the offsets map still holds)."""
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def _is_word_char(char: str) -> bool:
    return char.isalnum() or unicodedata.category(char).startswith("M")


@dataclass(frozen=True)
class _Part:
    """A quote's part between ellipses, normalised (no hyphens at its ends)."""

    text: str
    folded: str
    hyphens: dict[int, bool]  # position -> a line-break hyphen (optional)


def _quote_parts(quote: str) -> list[_Part]:
    parts = []
    for raw in _ELLIPSIS.split(quote):
        normalized = _normalize(raw.strip(_TRIM))
        text = normalized.text.strip(" ")
        if text:
            # Stripping the ends drops no hyphen: `_TRIM` took the dashes at the ends.
            shift = len(normalized.text) - len(normalized.text.lstrip(" "))
            hyphens = {p - shift: brk for p, (_, _, brk) in normalized.hyphens.items()}
            parts.append(_Part(text, _fold(text), hyphens))
    return parts


def _parts_too_short(parts: Sequence[_Part]) -> bool:
    return all(
        len(p.text.split(" ")) < MIN_QUOTE_WORDS and len(p.text) < MIN_QUOTE_CHARS for p in parts
    )


def quote_is_too_short(quote: str) -> bool:
    """Whether a quote is too short to verify: no part of it (between ellipses) has
    `MIN_QUOTE_WORDS` words or `MIN_QUOTE_CHARS` characters, normalised."""
    return _parts_too_short(_quote_parts(quote))


class SourceText:
    """A document's text, normalised once, for locating quotes (module docstring)."""

    def __init__(self, pages: Sequence[str]) -> None:
        self.pages = list(pages)
        self.original = PAGE_BREAK.join(self.pages)
        self._page_starts: list[int] = []
        offset = 0
        for page in self.pages:
            self._page_starts.append(offset)
            offset += len(page) + len(PAGE_BREAK)
        normalized = _normalize(self.original)
        self.text = normalized.text
        self._starts = normalized.starts
        self._ends = normalized.ends
        self._hyphens = normalized.hyphens
        self._real_hyphens = sorted(p for p, (_, _, brk) in self._hyphens.items() if not brk)
        self._folded: str | None = None

    def place(self, index: int) -> tuple[int, int]:
        """The page (from 1) and the offset in its original text of the normalised
        character at `index`."""
        return self._page_offset(self._starts[index])

    def locate(self, quote: str) -> QuoteMatch | None:
        """Where the source has the quote (its first occurrence); None when it does not,
        or when the quote is too short to verify."""
        parts = _quote_parts(quote)
        if not parts or _parts_too_short(parts):
            return None
        for exact_case in (True, False):
            found = self._find_parts(parts, exact_case)
            if found:
                return self._match(found[0], found[-1], parts[0], parts[-1], exact_case)
        return None

    def _haystack(self, exact_case: bool) -> str:
        if exact_case:
            return self.text
        if self._folded is None:
            self._folded = _fold(self.text)
        return self._folded

    def _find_parts(self, parts: Sequence[_Part], exact_case: bool) -> list[int] | None:
        """The start of each part, in order and each close after the one before."""
        haystack = self._haystack(exact_case)
        budget = [_MAX_CANDIDATES]

        def search(index: int, low: int, high: int) -> list[int] | None:
            part = parts[index]
            for at in self._occurrences(haystack, part, exact_case, low, high, budget):
                if index == len(parts) - 1:
                    return [at]
                end = at + len(part.text)
                rest = search(index + 1, end, end + MAX_ELLIPSIS_GAP)
                if rest is not None:
                    return [at, *rest]
            return None

        return search(0, 0, len(haystack))

    def _occurrences(
        self,
        haystack: str,
        part: _Part,
        exact_case: bool,
        low: int,
        high: int,
        budget: list[int],
    ) -> Iterator[int]:
        """Starts from `low` to `high` where the part matches, hyphens and word
        boundaries included."""
        needle = part.text if exact_case else part.folded
        stop = min(len(haystack), high + len(needle))
        at = haystack.find(needle, low, stop)
        while at >= 0 and budget[0] > 0:
            budget[0] -= 1
            if self._fits(haystack, part, at):
                yield at
            at = haystack.find(needle, at + 1, stop)

    def _fits(self, haystack: str, part: _Part, at: int) -> bool:
        length = len(part.text)
        end = at + length
        for position, line_break in part.hyphens.items():
            if not line_break and at + position not in self._hyphens:
                return False
        first = bisect.bisect_right(self._real_hyphens, at)
        last = bisect.bisect_left(self._real_hyphens, end)
        for position in self._real_hyphens[first:last]:
            if position - at not in part.hyphens:
                return False
        return self._boundary(haystack, at) and self._boundary(haystack, end)

    def _boundary(self, haystack: str, index: int) -> bool:
        """Whether `index` falls between words (or at a real hyphen)."""
        if index <= 0 or index >= len(haystack):
            return True
        if not (_is_word_char(haystack[index - 1]) and _is_word_char(haystack[index])):
            return True
        hyphen = self._hyphens.get(index)
        return hyphen is not None and not hyphen[2]

    def _match(
        self, first: int, last: int, first_part: _Part, last_part: _Part, exact_case: bool
    ) -> QuoteMatch:
        start = self._starts[first]
        end = self._ends[last + len(last_part.text) - 1]
        page_start, char_start = self._page_offset(start)
        page_end, char_end = self._page_offset(end - 1)
        return QuoteMatch(
            page_start=page_start,
            page_end=page_end,
            char_start=char_start,
            char_end=char_end + 1,
            text=self.original[start:end],
            exact_case=exact_case,
        )

    def _page_offset(self, offset: int) -> tuple[int, int]:
        page = bisect.bisect_right(self._page_starts, offset) - 1
        return page + 1, offset - self._page_starts[page]


def quotes_verify(*, quotes: Sequence[str], source: SourceText) -> list[QuoteCheck]:
    """Each quote checked against the source, in order."""
    return [QuoteCheck(quote=quote, match=source.locate(quote)) for quote in quotes]


# Free-text answers ----------------------------------------------------------------


@dataclass(frozen=True)
class QuoteSpan:
    """A quotation in an answer: `start`/`end` (exclusive) cover it with its marks (a
    blockquote: its lines, from the first's start to the last's end, newline excluded);
    `text` is what it quotes, without marks or `>` prefixes."""

    start: int
    end: int
    text: str
    kind: str  # "inline" or "block"


@dataclass(frozen=True)
class Citation:
    """A verified quotation of a marked answer and its place in the source. Its marker
    in the marked text is ` ([p. 12](#cite-<number>))`; `start`/`end` are the offsets of
    the link (`[p. 12](#cite-1)`, brackets included). The caller adds the document."""

    number: int
    quote: str
    page_start: int
    page_end: int
    char_start: int
    char_end: int
    start: int
    end: int

    @property
    def anchor(self) -> str:
        return f"cite-{self.number}"

    @property
    def label(self) -> str:
        return _pages_label(self.page_start, self.page_end)


def _pages_label(page_start: int, page_end: int) -> str:
    if page_start == page_end:
        return f"p. {page_start}"
    return f"pp. {page_start}\u2013{page_end}"


@dataclass(frozen=True)
class MarkedAnswer:
    """An answer whose verified quotations cite their place and whose unverified ones
    are no longer shown as quotations."""

    text: str
    citations: list[Citation] = field(default_factory=list)
    verified: int = 0
    unverified: int = 0
    unverified_quotes: list[str] = field(default_factory=list)


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})", re.MULTILINE)
# A code span ends in its paragraph: a stray backtick hides no more than that.
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.DOTALL)
_BLOCK_LINE = re.compile(r"^ {0,3}>.*$", re.MULTILINE)
_BLOCK_MARKERS = re.compile(r"^(?: {0,3}> ?)+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_ATTRIBUTION = re.compile(r"\s*(?:--|[-\u2013\u2014])\s*\S")
_TRAILING_PAGE_REFERENCE = re.compile(
    r"\s*[(\[]\s*(?:pp?|pages?)\.?\s*\d+(?:\s*[-\u2013]\s*\d+)?\s*[)\]]\.?\s*$", re.IGNORECASE
)
_CLOSING = {"\u201c": "\u201d", "\u201e": "\u201c\u201d", "\u00ab": "\u00bb", '"': '"'}
_OPENING = re.compile('[\u201c\u201e\u00ab"]')
_BEFORE_STRAIGHT_OPEN = " \t\n([{\u2014\u2013-:/*_"


def _code_ranges(text: str) -> list[tuple[int, int]]:
    """Fenced code blocks and inline code spans."""
    ranges: list[tuple[int, int]] = []
    position = 0
    while match := _FENCE.search(text, position):
        fence = match.group(1)
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", re.M)
        line_end = text.find("\n", match.end())
        after = len(text) if line_end < 0 else line_end + 1
        close = closing.search(text, after)
        end = len(text) if close is None else close.end()
        ranges.append((match.start(), end))
        position = max(end, match.end())
    for span in _CODE_SPAN.finditer(text):
        if not _inside(ranges, span.start()):
            ranges.append(span.span())
    return sorted(ranges)


def _inside(ranges: Sequence[tuple[int, int]], index: int) -> bool:
    return any(start <= index < end for start, end in ranges)


def _crosses(ranges: Sequence[tuple[int, int]], start: int, end: int) -> bool:
    return any(s < end and start < e for s, e in ranges)


def answer_quotes(text: str) -> list[QuoteSpan]:
    """The quotations an answer presents (module docstring), in order; fragments too
    short to verify are not among them."""
    code = _code_ranges(text)
    spans: list[QuoteSpan] = []
    blocks: list[tuple[int, int]] = []
    lines = [m for m in _BLOCK_LINE.finditer(text) if not _inside(code, m.start())]
    group: list[re.Match[str]] = []
    for line in [*lines, None]:
        if group and (line is None or line.start() != group[-1].end() + 1):
            start, end = group[0].start(), group[-1].end()
            blocks.append((start, end))
            quoted = _block_quotation(_block_content(text[start:end]))
            if quoted and not quote_is_too_short(quoted):
                spans.append(QuoteSpan(start=start, end=end, text=quoted, kind="block"))
            group = []
        if line is not None:
            group.append(line)
    excluded = sorted(code + blocks)
    position = 0
    while opening := _OPENING.search(text, position):
        at = opening.start()
        position = at + 1
        mark = opening.group()
        if _inside(excluded, at) or at + 1 >= len(text) or text[at + 1].isspace():
            continue
        if mark == '"' and at > 0 and text[at - 1] not in _BEFORE_STRAIGHT_OPEN:
            continue  # an inch mark or a closing quote, not an opening one
        close = _closing_of(text, at, _CLOSING[mark], excluded)
        if close is None:
            continue
        position = close + 1
        quoted = text[at + 1 : close].strip()
        if quoted and not quote_is_too_short(quoted):
            spans.append(QuoteSpan(start=at, end=close + 1, text=quoted, kind="inline"))
    return sorted(spans, key=lambda s: s.start)


def _block_content(block: str) -> str:
    """A blockquote's lines without their `>` markers."""
    return "\n".join(_BLOCK_MARKERS.sub("", line) for line in block.split("\n")).strip()


def _block_quotation(content: str) -> str:
    """What a blockquote quotes: its content less an attribution line (`— Section 4`)
    or a page reference (`(p. 3)`) at its end, which are the answer's, not the source's."""
    lines = content.split("\n")
    if len(lines) > 1 and _ATTRIBUTION.match(lines[-1]):
        content = "\n".join(lines[:-1])
    return _TRAILING_PAGE_REFERENCE.sub("", content).strip()


def _closing_of(
    text: str, at: int, closers: str, excluded: Sequence[tuple[int, int]]
) -> int | None:
    """The closing mark of the quotation opened at `at`, in the same paragraph."""
    paragraph = _PARAGRAPH_BREAK.search(text, at)
    limit = len(text) if paragraph is None else paragraph.start()
    index = at + 1
    while index < limit:
        if text[index] in closers and not text[index - 1].isspace():
            if _crosses(excluded, at, index + 1):
                return None
            return index
        index += 1
    return None


def answer_mark(text: str, checks: Sequence[QuoteCheck]) -> MarkedAnswer:
    """The answer with each quotation (`answer_quotes`) cited when its check (matched by
    quote text) is verified, and flagged `[unverified: …]` without its quote marks
    otherwise, a quotation without a check included."""
    by_quote: dict[str, QuoteCheck] = {}
    for given in checks:
        if given.verified or given.quote not in by_quote:
            by_quote[given.quote] = given
    pieces: list[str] = []
    length = 0
    citations: list[Citation] = []
    unverified: list[str] = []
    position = 0
    for span in answer_quotes(text):
        before = text[position : span.start]
        pieces.append(before)
        length += len(before)
        check = by_quote.get(span.text)
        match = check.match if check is not None else None
        quoted_as_written = text[span.start : span.end]
        if match is not None:
            quoted = quoted_as_written
            number = len(citations) + 1
            marker = f" ([{_pages_label(match.page_start, match.page_end)}](#cite-{number}))"
            pieces.append(quoted + marker)
            link_start = length + len(quoted) + len(" (")
            length += len(quoted) + len(marker)
            citations.append(
                Citation(
                    number=number,
                    quote=span.text,
                    page_start=match.page_start,
                    page_end=match.page_end,
                    char_start=match.char_start,
                    char_end=match.char_end,
                    start=link_start,
                    end=length - len(")"),
                )
            )
        else:
            shown = span.text if span.kind == "inline" else _block_content(quoted_as_written)
            flagged = f"[unverified: {shown}]"
            pieces.append(flagged)
            length += len(flagged)
            unverified.append(span.text)
        position = span.end
    pieces.append(text[position:])
    return MarkedAnswer(
        text="".join(pieces),
        citations=citations,
        verified=len(citations),
        unverified=len(unverified),
        unverified_quotes=unverified,
    )
