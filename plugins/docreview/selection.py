"""Which documents a tool may touch: those in play in the run, never one the model names.

The documents in play are the run's (`ToolContext.document_ids`: those attached to the
conversation), read through the access functions as the run's member, so another
member's or another tenant's document is not among them whatever id or title the model
passes. A conversation without attachments has the member's most recent ready
documents in play instead (`RECENT_LIMIT`), and the tools say so.

The model names a document by its title or its short id (the first characters of its
id, as the tools show it); a name that fits no document in play, or several, is a
`DocumentChoiceError` whose message lists what it can choose from.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from documents.models import Document
from documents.selectors import document_list
from tenants.access import Actor

RECENT_LIMIT = 20
SHORT_ID_CHARS = 8
# How many documents an error lists by name before it only counts the rest.
LISTED_MAX = 10


class DocumentChoiceError(ValueError):
    """The model's name for a document fits none in play, or several; the message says
    which it may choose from."""


@dataclass(frozen=True)
class InPlay:
    documents: list[Document]
    attached: bool  # False: the member's recent documents, none being attached

    def describe(self) -> str:
        """Where the tools looked, as a sentence."""
        count = len(self.documents)
        if self.attached:
            noun = "document" if count == 1 else "documents"
            return f"the {count} {noun} attached to this conversation"
        return (
            f"your {count} most recent ready documents (none is attached to this "
            "conversation; attach documents to narrow it down)"
        )


def short_id(document: Document) -> str:
    return document.id.hex[:SHORT_ID_CHARS]


def label(document: Document) -> str:
    """How the tools name a document to the model: its title and short id."""
    return f"“{document.title}” (doc {short_id(document)})"


def documents_in_play(*, actor: Actor, document_ids: Sequence[str]) -> InPlay:
    """The run's documents (call inside `ToolContext.scope()`). Attached ids that are
    no longer the member's (a document deleted since) are left out, not an error."""
    if document_ids:
        found = document_list(actor=actor).in_bulk(list(dict.fromkeys(document_ids)))
        by_text = {str(key): document for key, document in found.items()}
        ordered = [by_text[i] for i in dict.fromkeys(document_ids) if i in by_text]
        return InPlay(documents=ordered, attached=True)
    recent = document_list(actor=actor).filter(state=Document.State.READY)[:RECENT_LIMIT]
    return InPlay(documents=list(recent), attached=False)


def _normal(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def document_choose(play: InPlay, reference: str) -> Document:
    """The document in play that `reference` (a title or a short or full id) names."""
    wanted = reference.strip().strip("“”\"'")
    if not play.documents:
        raise DocumentChoiceError("There are no documents to choose from: " + play.describe())
    if not wanted:
        if len(play.documents) == 1:
            return play.documents[0]
        raise DocumentChoiceError("Name the document. " + choices(play))
    hexed = wanted.lower().removeprefix("doc ").replace("-", "")
    if re.fullmatch(r"[0-9a-f]{6,32}", hexed):
        by_id = [d for d in play.documents if d.id.hex.startswith(hexed)]
        if len(by_id) == 1:
            return by_id[0]
    title = _normal(wanted)
    for test in (
        lambda d: _normal(d.title) == title,
        lambda d: title in _normal(d.title),
    ):
        fitting = [d for d in play.documents if test(d)]
        if len(fitting) == 1:
            return fitting[0]
        if len(fitting) > 1:
            raise DocumentChoiceError(
                f"Several documents fit {wanted!r}: "
                + ", ".join(label(d) for d in fitting[:LISTED_MAX])
                + ". Name one by its doc id."
            )
    raise DocumentChoiceError(f"No document {wanted!r} among {play.describe()}. " + choices(play))


def choices(play: InPlay) -> str:
    listed = ", ".join(label(d) for d in play.documents[:LISTED_MAX])
    more = len(play.documents) - LISTED_MAX
    return f"Choose one of: {listed}" + (f" and {more} more." if more > 0 else ".")
