"""A document's pages cut into overlapping chunks for retrieval, with the place of each.

`chunks_of(pages, target_tokens=..., overlap_tokens=...)` reads the pages (page 1
first) as one text in which each page break is a paragraph break, and returns
`ChunkSpan`s in order. A chunk is whole words (a word is a run of non-whitespace; it
never starts or ends with whitespace), as many as fit in `target_tokens`; it ends at the
strongest boundary in the later half (by characters) of what fits: the end of the
document, then a paragraph (a blank line, or a page break), then a sentence (`.`, `!`,
`?` or `…`, maybe closed by quotes or brackets), then a line, then any word. A single
word longer than the target is a chunk of its own, so no chunk has more tokens than the
target unless it is one word. The next chunk starts at the earliest word from which the
end of the previous chunk is at most `overlap_tokens`, and always after the previous
chunk's start.

Where a chunk is: `page_start` and `page_end` are page numbers from 1 (as `Page.number`);
`char_start` is an offset into the text of page `page_start` and `char_end` (exclusive)
an offset into the text of page `page_end`. On one page the chunk is
`pages[page_start - 1][char_start:char_end]`; across pages it is the rest of the first
page from `char_start`, every page in between whole, and the last page up to
`char_end`, joined by `PAGE_BREAK` (`chunk_text_from_pages` rebuilds it so).

Tokens are counted by the function passed in, `estimated_tokens` (the pool's estimate,
`inference.tokens`) by default; it must not count fewer tokens for a longer text.
Scripts written without spaces between words (Chinese, Japanese, Thai) have few word
breaks, so their chunks are a paragraph or a sentence and may pass the target.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from inference.tokens import CHARS_PER_TOKEN

# How the pages are joined into one text: a page break is a paragraph break.
PAGE_BREAK = "\n\n"

# The boundary before a word, weakest first.
WORD, LINE, SENTENCE, PARAGRAPH = 0, 1, 2, 3
_WORDS = re.compile(r"\S+")
_SENTENCE_END = re.compile(r"[.!?\u2026][\"'\u2019\u201d)\]]*$")


@dataclass(frozen=True)
class ChunkSpan:
    """A chunk's text and its place: pages from 1, `char_end` exclusive (see above)."""

    text: str
    page_start: int
    page_end: int
    char_start: int
    char_end: int
    token_count: int


def estimated_tokens(text: str) -> int:
    """The pool's estimate of a text's tokens (`inference.tokens`)."""
    return len(text) // CHARS_PER_TOKEN


def chunk_text_from_pages(pages: Sequence[str], span: ChunkSpan) -> str:
    """The chunk's text, read from the pages at its place."""
    first, last = span.page_start - 1, span.page_end - 1
    if first == last:
        return pages[first][span.char_start : span.char_end]
    return PAGE_BREAK.join(
        [pages[first][span.char_start :], *pages[first + 1 : last], pages[last][: span.char_end]]
    )


def chunks_of(
    pages: Sequence[str],
    *,
    target_tokens: int,
    overlap_tokens: int,
    count_tokens: Callable[[str], int] = estimated_tokens,
) -> list[ChunkSpan]:
    """The document's chunks, in order; none for a document without words."""
    if target_tokens < 1:
        raise ValueError("target_tokens must be at least 1.")
    if not 0 <= overlap_tokens < target_tokens:
        raise ValueError("overlap_tokens must be at least 0 and less than target_tokens.")
    text = PAGE_BREAK.join(pages)
    page_starts: list[int] = []
    offset = 0
    for page in pages:
        page_starts.append(offset)
        offset += len(page) + len(PAGE_BREAK)
    starts: list[int] = []
    ends: list[int] = []
    for match in _WORDS.finditer(text):
        starts.append(match.start())
        ends.append(match.end())
    count = len(starts)

    def tokens(first: int, last: int) -> int:
        return count_tokens(text[starts[first] : ends[last]])

    def fits(first: int, last: int) -> bool:
        return tokens(first, last) <= target_tokens

    def boundary_after(word: int) -> int:
        """How strong the boundary between `word` and the next one is."""
        gap = text[ends[word] : starts[word + 1]]
        if "\n\n" in gap:
            return PARAGRAPH
        if _SENTENCE_END.search(text[starts[word] : ends[word]]):
            return SENTENCE
        return LINE if "\n" in gap else WORD

    def span(first: int, last: int) -> ChunkSpan:
        start, end = starts[first], ends[last]
        page_start = bisect.bisect_right(page_starts, start) - 1
        page_end = bisect.bisect_right(page_starts, end - 1) - 1
        chunk = text[start:end]
        return ChunkSpan(
            text=chunk,
            page_start=page_start + 1,
            page_end=page_end + 1,
            char_start=start - page_starts[page_start],
            char_end=end - page_starts[page_end],
            token_count=count_tokens(chunk),
        )

    chunks: list[ChunkSpan] = []
    first, previous = 0, -1  # the previous chunk's last word
    while first < count:
        last = _last_fitting(first, count, fits)
        if last <= previous:
            # With the overlap no new word fits (a long word follows): start after it.
            first = previous + 1
            continue
        if last < count - 1:
            last = _best_end(first, last, previous, starts, ends, boundary_after)
        chunks.append(span(first, last))
        previous = last
        if last == count - 1:
            break
        # The earliest start after `first` whose text to `last` fits in the overlap.
        following = last + 1
        if overlap_tokens:
            lo, hi = first + 1, last + 1  # tokens(hi, last) counts nothing: it fits
            while lo < hi:
                mid = (lo + hi) // 2
                if tokens(mid, last) <= overlap_tokens:
                    hi = mid
                else:
                    lo = mid + 1
            following = lo
        first = following
    return chunks


def chunks_of_each_page(
    pages: Sequence[str],
    *,
    target_tokens: int,
    overlap_tokens: int,
    count_tokens: Callable[[str], int] = estimated_tokens,
) -> list[ChunkSpan]:
    """`chunks_of` each page alone, in page order: no chunk spans two pages (a
    repository's pages are its files)."""
    chunks: list[ChunkSpan] = []
    for number, page in enumerate(pages, start=1):
        for span in chunks_of(
            [page],
            target_tokens=target_tokens,
            overlap_tokens=overlap_tokens,
            count_tokens=count_tokens,
        ):
            chunks.append(replace(span, page_start=number, page_end=number))
    return chunks


def _last_fitting(first: int, count: int, fits: Callable[[int, int], bool]) -> int:
    """The last word from `first` such that the words from `first` to it fit; `first`
    itself when even it alone does not. Grows by doubling, then halves, so a long
    document is never counted whole."""
    if not fits(first, first):
        return first
    good, step = first, 1
    while True:
        probe = min(first + step, count - 1)
        if probe == good:
            return good
        if not fits(first, probe):
            bad = probe
            break
        good, step = probe, step * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(first, mid):
            good = mid
        else:
            bad = mid
    return good


def _best_end(
    first: int,
    last: int,
    previous: int,
    starts: list[int],
    ends: list[int],
    boundary_after: Callable[[int], int],
) -> int:
    """The word to end at between `first` and `last`, after `previous` (so each chunk
    reads something new): the strongest boundary whose chunk is at least half as long
    (in characters) as the longest, the latest of equals."""
    least = starts[first] + (ends[last] - starts[first]) / 2
    best, strength = last, boundary_after(last)
    word = last - 1
    while word > max(first - 1, previous) and ends[word] >= least and strength < PARAGRAPH:
        found = boundary_after(word)
        if found > strength:
            best, strength = word, found
        word -= 1
    return best
