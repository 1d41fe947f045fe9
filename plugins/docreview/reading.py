"""Cutting what a tool returns to fit the agent runtime's cap on a tool result.

The runtime keeps the first `RESULT_CHARS` characters of a result and drops the rest
without telling the model where it stopped. The tools here fit their results under it
themselves: passages get a share of the room each, and pages are read a part at a
time, each part ending with where to read on (a page and a character offset into its
text, the offsets `quote_check` gives too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from agents.runtime import AgentLimits

RESULT_CHARS = AgentLimits().tool_result_chars
# Room kept for a result's header and its closing line.
FRAME_CHARS = 400
ELLIPSIS = "…"


def cut(text: str, limit: int) -> str:
    """`text` within `limit` characters, cut at a space when one is near the end."""
    if len(text) <= limit:
        return text
    if limit <= len(ELLIPSIS):
        return ELLIPSIS[:limit]
    head = text[: limit - len(ELLIPSIS)]
    space = head.rfind(" ")
    if space >= len(head) * 0.8:
        head = head[:space]
    return head.rstrip() + ELLIPSIS


def shares(lengths: list[int], room: int) -> list[int]:
    """How many characters each of several texts may keep so that together they fit in
    `room`: a short text keeps all of it and leaves the rest to the longer ones."""
    kept = [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    left = room
    for place, index in enumerate(order):
        fair = left // (len(order) - place)
        kept[index] = min(lengths[index], max(fair, 0))
        left -= kept[index]
    return kept


@dataclass(frozen=True)
class Part:
    """Pages read from (`page`, `offset`) on; `next_page`/`next_offset` is where to
    read on, `next_page` None at the end of the document."""

    text: str
    next_page: int | None
    next_offset: int


def pages_part(
    texts: Mapping[int, str], *, page_count: int, page: int, offset: int, pages: int, room: int
) -> Part:
    """The text of pages `page` (from character `offset`) to `page + pages - 1`, each
    under a line naming it, cut where `room` characters are used up. `texts` holds at
    least the pages asked for."""
    blocks: list[str] = []
    used = 0
    last = min(page + pages - 1, page_count)
    number, start = page, offset
    while number <= last:
        text = texts.get(number, "")
        header = f"--- page {number} of {page_count}"
        header += f", from character {start} ---\n" if start else " ---\n"
        body = text[start:] or "(no text on this page)"
        free = room - used - len(header)
        if free < 200 and blocks:
            break
        if len(text) - start > free:
            piece = text[start : start + free]
            space = piece.rfind(" ")
            if space >= len(piece) * 0.8:
                piece = piece[: space + 1]
            blocks.append(header + piece)
            return Part(text="".join(blocks), next_page=number, next_offset=start + len(piece))
        blocks.append(header + body + "\n")
        used += len(blocks[-1])
        number, start = number + 1, 0
    return Part(
        text="".join(blocks),
        next_page=number if number <= page_count else None,
        next_offset=start,
    )
