"""The document reviewer's LangChain tools: search, read pages, check a quote, start a
review.

Each learns whose run it serves from its config (`agents.context.tool_context`): the
tenant, the member and the documents in play come from there, never from the model's
arguments, and every read goes through the documents access functions as that member
inside the tenant's database scope (`ToolContext.scope()`). The model names a document
by title or short id among those in play (plugins.docreview.selection). Results fit
under the runtime's cap on a tool result (plugins.docreview.reading); bad input comes
back as a sentence starting with "Error:" so the model can correct itself.
"""

from __future__ import annotations

import re
from typing import Any

from django.core.exceptions import ValidationError
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool

from agents.context import ToolContext, tool_context
from documents.citations import MIN_QUOTE_WORDS, SourceText, quote_is_too_short
from documents.models import Document
from documents.retrieval import passages_search
from documents.review import BUILT_IN
from documents.selectors import page_get, review_template_list
from plugins.docreview.reading import FRAME_CHARS, RESULT_CHARS, cut, pages_part, shares
from plugins.docreview.reviews import review_client_id, review_starter
from plugins.docreview.selection import (
    DocumentChoiceError,
    document_choose,
    documents_in_play,
    label,
    short_id,
)
from tenants.access import NotFound, Unavailable

SEARCH_LIMIT_MAX = 10
READ_PAGES_MAX = 10
QUOTE_MAX_CHARS = 2000
OUTSIDE_A_RUN = "Error: this tool reads the documents of an agent run and has no run here."


def _context(config: RunnableConfig) -> ToolContext | None:
    context = tool_context(config)
    return context if context is not None and context.user_id else None


def _ready(document: Document) -> str | None:
    """Why a document cannot be read yet, or None."""
    if document.state == Document.State.READY:
        return None
    if document.state == Document.State.FAILED:
        return f"Error: {label(document)} could not be read: {document.error_message}"
    return f"Error: {label(document)} is still being read ({document.state}); try again soon."


def _compact(text: str) -> str:
    # Blank lines and runs of spaces cost room; single line breaks stay, so that a word
    # broken at a line's end still reads as the document has it.
    return re.sub(r"\n\s*\n", "\n", re.sub(r"[ \t]+", " ", text)).strip()


def _pages(count: int) -> str:
    return f"{count} page" if count == 1 else f"{count} pages"


@tool(parse_docstring=True)
def documents_search(query: str, config: RunnableConfig, limit: int = 5) -> str:
    """Search the documents of this conversation for the passages that best answer a question.

    Full-text and meaning search combined. Each passage comes with its document's title
    and doc id and its pages: read around it with document_read, and check any quote
    with quote_check before you use it. Without documents attached to the conversation,
    it searches the member's most recent documents and says so.

    Args:
        query: The question or the words to look for, for example "notice to end the lease".
        limit: How many passages to return, 1 to 10.
        config: The run's configuration (given by Parley, not by the model).
    """
    context = _context(config)
    if context is None:
        return OUTSIDE_A_RUN
    limit = max(1, min(int(limit), SEARCH_LIMIT_MAX))
    with context.scope():
        actor = context.actor()
        play = documents_in_play(actor=actor, document_ids=context.document_ids)
        ready = [d for d in play.documents if d.state == Document.State.READY]
        if not ready:
            return f"Error: there is no ready document to search among {play.describe()}."
        context.progress("search", f"Searching {len(ready)} documents", done=0, total=1)
        try:
            found = passages_search(
                actor=actor,
                query=query,
                document_ids=[d.id for d in ready],
                limit=limit,
            )
        except ValidationError as exc:
            return "Error: " + " ".join(exc.messages)
        context.progress("search", f"Found {len(found)} passages", done=1, total=1)
    titles = {d.id: d for d in ready}
    header = f"Searched {play.describe()} for {cut(query, 200)!r}: "
    if not found:
        return header + "no passage matches. Try other words, or read the pages."
    header += f"{len(found)} passages, best first.\n"
    heads = []
    for number, passage in enumerate(found, start=1):
        pages = (
            f"page {passage.page_start}"
            if passage.page_start == passage.page_end
            else f"pages {passage.page_start}-{passage.page_end}"
        )
        pages += f" from character {passage.char_start}"
        heads.append(f"\n[{number}] {label(titles[passage.document_id])}, {pages}:\n")
    footer = "\nQuote only what quote_check verifies; cite the page."
    room = RESULT_CHARS - len(header) - len(footer) - sum(map(len, heads)) - 50
    kept = shares([len(p.text) for p in found], room)
    body = "".join(
        head + cut(_compact(passage.text), keep)
        for head, passage, keep in zip(heads, found, kept, strict=True)
    )
    return header + body + "\n" + footer


@tool(parse_docstring=True)
def document_read(
    document: str, page: int, config: RunnableConfig, pages: int = 1, offset: int = 0
) -> str:
    """Read the text of one or more pages of a document of this conversation.

    A long read comes back a part at a time: the result ends with the call that reads
    on (the next page, or the same page from a character offset). It also says how many
    pages the document has.

    Args:
        document: The document's title or its doc id, as documents_search shows them.
        page: The first page to read, from 1.
        pages: How many pages to read from there, 1 to 10.
        offset: Where to start in the first page, in characters (0 for the whole page).
        config: The run's configuration (given by Parley, not by the model).
    """
    context = _context(config)
    if context is None:
        return OUTSIDE_A_RUN
    with context.scope():
        try:
            chosen = document_choose(
                documents_in_play(actor=context.actor(), document_ids=context.document_ids),
                document,
            )
        except DocumentChoiceError as exc:
            return f"Error: {exc}"
        refused = _ready(chosen)
        if refused:
            return refused
        count = chosen.page_count or 0
        if not 1 <= page <= count:
            return f"Error: {label(chosen)} has {_pages(count)}; ask for a page from 1 to {count}."
        wanted = max(1, min(int(pages), READ_PAGES_MAX))
        last = min(page + wanted - 1, count)
        texts: dict[int, str] = {}
        for done, number in enumerate(range(page, last + 1)):
            if last > page:
                context.progress("read", f"Reading page {number}", done=done, total=last - page + 1)
            texts[number] = page_get(document=chosen, number=number).text
    if not 0 <= offset <= len(texts[page]):
        return f"Error: page {page} has {len(texts[page])} characters; offset must be within it."
    head = f"{label(chosen)}, {_pages(count)}.\n"
    part = pages_part(
        texts,
        page_count=count,
        page=page,
        offset=offset,
        pages=wanted,
        room=RESULT_CHARS - FRAME_CHARS,
    )
    if part.next_page is None:
        tail = "\n(End of the document.)"
    else:
        tail = (
            f'\n(To read on: document_read(document="{short_id(chosen)}", '
            f"page={part.next_page}, offset={part.next_offset}).)"
        )
    return head + part.text + tail


def _where(match: Any) -> str:
    if match.page_start == match.page_end:
        return f"page {match.page_start}, characters {match.char_start}-{match.char_end}"
    return (
        f"pages {match.page_start}-{match.page_end}, from character {match.char_start} of "
        f"page {match.page_start} to character {match.char_end} of page {match.page_end}"
    )


@tool(parse_docstring=True)
def quote_check(quote: str, config: RunnableConfig, document: str = "") -> str:
    """Check that a quote is verbatim in a document of this conversation, and find its page.

    Differences of whitespace, line-break hyphenation, ligatures and quotation marks do
    not count; any other difference does. Use it on every quote before you give it:
    quote exactly the text it returns, with its page.

    Args:
        quote: The words to check, as you would quote them (at least three words).
        document: The document's title or doc id; empty to look in every document.
        config: The run's configuration (given by Parley, not by the model).
    """
    context = _context(config)
    if context is None:
        return OUTSIDE_A_RUN
    quote = quote.strip()
    if len(quote) > QUOTE_MAX_CHARS:
        return f"Error: check a quote of at most {QUOTE_MAX_CHARS} characters at a time."
    if quote_is_too_short(quote):
        return f"Error: the quote is too short to verify; quote at least {MIN_QUOTE_WORDS} words."
    with context.scope():
        play = documents_in_play(actor=context.actor(), document_ids=context.document_ids)
        try:
            candidates = [document_choose(play, document)] if document.strip() else play.documents
        except DocumentChoiceError as exc:
            return f"Error: {exc}"
        candidates = [d for d in candidates if d.state == Document.State.READY]
        for done, candidate in enumerate(candidates):
            context.progress("quote", f"Checking {candidate.title}", done, len(candidates))
            pages = candidate.pages.order_by("number").values_list("text", flat=True)
            match = SourceText(list(pages)).locate(quote)
            if match is not None:
                case = "" if match.exact_case else " (its letter case differs: quote it as here)"
                return (
                    f"Verified{case}: in {label(candidate)}, {_where(match)}. "
                    f"The document's text: “{cut(match.text, RESULT_CHARS - FRAME_CHARS)}”"
                )
    where = label(candidates[0]) if document.strip() and candidates else play.describe()
    return (
        f"Not found: the quote is not verbatim in {where}. Do not give it as a quote: "
        "search or read the page again and quote the document's own words."
    )


def _template(actor: Any, template: str) -> tuple[str, str] | str:
    """(template for the review service, its name), or an error sentence."""
    wanted = template.strip()
    if wanted in BUILT_IN:
        return wanted, BUILT_IN[wanted].name
    for row in review_template_list(actor=actor):
        if wanted in (str(row.id), row.name) or wanted.casefold() == row.name.casefold():
            return str(row.id), row.name
    names = ", ".join(BUILT_IN)
    return f"Error: no review template {wanted!r}; use one of {names} or a template of yours."


@tool(parse_docstring=True)
def review_start(
    template: str, document: str, config: RunnableConfig, questions: list[str] | None = None
) -> str:
    """Start a full review of a document, run on its own in a new conversation.

    For questions about a whole long document (a summary, its key terms, its risks, or a
    list of questions): the review reads every page and verifies its quotes. It takes a
    while; this returns at once with the run to follow.

    Args:
        template: The review, "summary", "key_terms", "risks" or "questions" (or a
            template's name).
        document: The document's title or doc id, as documents_search shows them.
        questions: The questions to answer, for a "questions" review.
        config: The run's configuration (given by Parley, not by the model).
    """
    context = _context(config)
    if context is None:
        return OUTSIDE_A_RUN
    start = review_starter()
    if start is None:
        return (
            "Error: reviews cannot be started from an agent in this deployment; the member "
            "can start one from the document's page."
        )
    asked = [q.strip() for q in questions or [] if q and q.strip()]
    with context.scope():
        actor = context.actor()
        try:
            chosen = document_choose(
                documents_in_play(actor=actor, document_ids=context.document_ids), document
            )
        except DocumentChoiceError as exc:
            return f"Error: {exc}"
        refused = _ready(chosen)
        if refused:
            return refused
        picked = _template(actor, template)
        if isinstance(picked, str):
            return picked
        template_id, name = picked
        try:
            run = start(
                actor=actor,
                document_id=chosen.id,
                template=template_id,
                questions=asked,
                client_id=review_client_id(
                    run_id=context.run_id,
                    document_id=str(chosen.id),
                    template=template_id,
                    questions=asked,
                ),
            )
        except (NotFound, ValidationError, Unavailable) as exc:
            message = " ".join(exc.messages) if isinstance(exc, ValidationError) else str(exc)
            return f"Error: the review was not started: {message or 'not found'}"
    return (
        f"Started a {name} review of {label(chosen)} as run {run.id} in a new conversation "
        f"(/c/{run.conversation_id}/). It runs on its own: the member follows it there; "
        f"its result is at /api/v1/reviews/{run.id} once it is done."
    )
