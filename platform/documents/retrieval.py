"""Retrieval: the passages (chunks) of the documents in play that best answer a query.

Hybrid, always scoped by the acting member and by the documents the caller names:
- **full text**: PostgreSQL's full-text search over the chunk text, through
  `parley_chunk_search` (documents migrations 0004 and 0007), which uses the GIN index
  under row level security and applies the tenant filter itself; the query's words are
  OR-ed and ts_rank orders the chunks, their document's title counting too (a question
  names its document more often than the answering chunk does). The embedded SQLite
  database has none: there the chunks in scope are scored with BM25 in Python, their
  titles' words counted too (an embedded deployment holds few documents).
- **vectors**: the query's embedding (`documents.embeddings.query_embed`) against the
  stored chunk embeddings of the documents in scope, scored with numpy (the vectors are
  normalised: a dot product is the cosine). A document's matrix is cached per process
  while the document is unchanged.
- **fused** by reciprocal rank fusion: a chunk's score is the sum over the two lists of
  1 / (RRF_K + its rank), so a chunk both lists rank well wins, and neither score scale
  has to be calibrated against the other. A small constant and short lists (the top
  CANDIDATES of each) keep a chunk one list ranks near the top ahead of chunks both
  rank far down (docs/benchmarks.md, retrieval: k = 5 and 20 candidates scored best of
  the 15 settings measured).

`passages_search(actor=..., query=..., document_ids=[...])` refuses a document that is
not the actor's as `NotFound`, like a missing one.
"""

from __future__ import annotations

import math
import re
import threading
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from django.core.exceptions import ValidationError
from django.db import connection

from documents.models import Chunk, Document
from documents.selectors import document_list
from tenants.access import Actor, NotFound, id_parse

Mode = Literal["hybrid", "text", "vector"]
MODES: tuple[Mode, ...] = ("hybrid", "text", "vector")
RRF_K = 5
# How many chunks each list contributes to the fusion.
CANDIDATES = 20
QUERY_MAX_CHARS = 2000
LIMIT_MAX = 50


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk, where it is, and why: its fused `score` and its rank (from 1)
    in each list that found it."""

    chunk_id: int
    document_id: uuid.UUID
    index: int
    text: str
    page_start: int
    page_end: int
    char_start: int
    char_end: int
    token_count: int
    score: float
    text_rank: int | None = None
    vector_rank: int | None = None


def documents_in_scope(*, actor: Actor, document_ids: Sequence[Any]) -> list[Document]:
    """The actor's documents among `document_ids`, in the order given; any other id
    (another member's, another tenant's, none at all) is `NotFound`."""
    ids = list(dict.fromkeys(id_parse(value) for value in document_ids))
    found = document_list(actor=actor).in_bulk(ids)
    if len(found) != len(ids):
        raise NotFound
    return [found[i] for i in ids]


def passages_search(
    *,
    actor: Actor,
    query: str,
    document_ids: Sequence[Any],
    limit: int = 8,
    mode: Mode = "hybrid",
) -> list[Passage]:
    """The `limit` best passages for `query` among the given documents (see above)."""
    query = query.strip()
    if not query:
        raise ValidationError("Give a question or words to search for.")
    if len(query) > QUERY_MAX_CHARS:
        raise ValidationError(f"A search query is at most {QUERY_MAX_CHARS} characters.")
    if not 1 <= limit <= LIMIT_MAX:
        raise ValidationError(f"limit must be between 1 and {LIMIT_MAX}.")
    if mode not in MODES:
        raise ValidationError(f"mode must be one of {', '.join(MODES)}.")
    documents = documents_in_scope(actor=actor, document_ids=document_ids)
    if not documents:
        return []
    lists: dict[str, list[int]] = {}
    if mode in ("hybrid", "text"):
        lists["text"] = _text_ranking(documents, query, CANDIDATES)
    if mode in ("hybrid", "vector"):
        lists["vector"] = _vector_ranking(documents, query, CANDIDATES)
    ranks: dict[str, dict[int, int]] = {
        name: {chunk_id: place for place, chunk_id in enumerate(ids, start=1)}
        for name, ids in lists.items()
    }
    scores: dict[int, float] = {}
    for ranking in ranks.values():
        for chunk_id, place in ranking.items():
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (RRF_K + place)
    best = sorted(scores, key=lambda chunk_id: (-scores[chunk_id], chunk_id))[:limit]
    chunks = Chunk.objects.filter(tenant=actor.tenant, document__in=documents).in_bulk(best)
    return [
        Passage(
            chunk_id=chunk.id,
            document_id=chunk.document_id,
            index=chunk.index,
            text=chunk.text,
            page_start=chunk.page_start,
            page_end=chunk.page_end,
            char_start=chunk.char_start,
            char_end=chunk.char_end,
            token_count=chunk.token_count,
            score=scores[chunk.id],
            text_rank=ranks.get("text", {}).get(chunk.id),
            vector_rank=ranks.get("vector", {}).get(chunk.id),
        )
        for chunk_id in best
        if (chunk := chunks.get(chunk_id)) is not None
    ]


# --- full text --------------------------------------------------------------------------


def _text_ranking(documents: Sequence[Document], query: str, limit: int) -> list[int]:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT chunk_id FROM parley_chunk_search(%s::uuid[], %s, %s)",
                [[str(d.id) for d in documents], query, limit],
            )
            return [row[0] for row in cursor.fetchall()]
    return _bm25_ranking(documents, query, limit)


_WORD = re.compile(r"\w+", re.UNICODE)
_TITLE_JOINS = re.compile(r"[-_.]+")
# A few function words that would otherwise dominate a question's score.
_STOP = frozenset(
    _WORD.findall(
        "a an and are as at be by do does for from has have how i in is it its may of on or "
        "shall that the their there this to under was what when where which who why will "
        "with you your"
    )
)


def _terms(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def _bm25_ranking(
    documents: Sequence[Document], query: str, limit: int, k1: float = 1.2, b: float = 0.75
) -> list[int]:
    """BM25 over the chunks in scope (the embedded database's full-text search)."""
    wanted = set(_terms(query))
    if not wanted:
        return []
    rows = list(
        Chunk.objects.filter(document__in=documents).values_list("id", "text", "document__title")
    )
    if not rows:
        return []
    # The title's words count with each chunk's, as in parley_chunk_search.
    counts = [
        (chunk_id, Counter(_terms(text)) + Counter(_terms(_TITLE_JOINS.sub(" ", title))))
        for chunk_id, text, title in rows
    ]
    average = sum(sum(c.values()) for _, c in counts) / len(counts) or 1.0
    frequency = Counter(term for _, c in counts for term in wanted if term in c)
    n = len(counts)
    scored = []
    for chunk_id, c in counts:
        length = sum(c.values())
        score = 0.0
        for term in wanted:
            tf = c.get(term, 0)
            if tf:
                idf = math.log(1 + (n - frequency[term] + 0.5) / (frequency[term] + 0.5))
                score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / average))
        if score > 0:
            scored.append((score, chunk_id))
    scored.sort(key=lambda pair: (-pair[0], pair[1]))
    return [chunk_id for _, chunk_id in scored[:limit]]


# --- vectors ----------------------------------------------------------------------------


class _Matrices:
    """Each document's chunk ids and embedding matrix, kept while the document is
    unchanged (its `updated_at`); least recently used out past `size` documents."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[uuid.UUID, tuple[Any, np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, document: Document) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            item = self._items.get(document.id)
            if item is not None and item[0] == document.updated_at:
                self._items.move_to_end(document.id)
                return item[1], item[2]
        rows = list(
            Chunk.objects.filter(document=document, embedding__isnull=False)
            .order_by("index")
            .values_list("id", "embedding")
        )
        ids = np.array([chunk_id for chunk_id, _ in rows], dtype=np.int64)
        vectors = (
            np.array([vector for _, vector in rows], dtype=np.float32)
            if rows
            else np.zeros((0, 0), dtype=np.float32)
        )
        with self._lock:
            self._items[document.id] = (document.updated_at, ids, vectors)
            self._items.move_to_end(document.id)
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return ids, vectors


_matrices = _Matrices()


def _vector_ranking(documents: Sequence[Document], query: str, limit: int) -> list[int]:
    from documents.embeddings import query_embed  # the model loads on first use

    pairs = [_matrices.get(document) for document in documents]
    pairs = [(ids, vectors) for ids, vectors in pairs if len(ids)]
    if not pairs:
        return []
    q = query_embed(query)
    # A document embedded by another model (a different size) is not comparable: it
    # waits for its new vectors (documents.ingest) and is found by full text meanwhile.
    pairs = [(ids, vectors) for ids, vectors in pairs if vectors.shape[1] == len(q)]
    if not pairs:
        return []
    ids = np.concatenate([ids for ids, _ in pairs])
    scores = np.concatenate([vectors @ q for _, vectors in pairs])
    top = min(limit, len(ids))
    best = np.argpartition(-scores, top - 1)[:top]
    best = best[np.lexsort((ids[best], -scores[best]))]
    return [int(ids[i]) for i in best]
