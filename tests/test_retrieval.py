"""Retrieval (documents.retrieval): full text, vectors and their fusion, always within
the actor's documents and never another tenant's chunk, under row level security as
the application role."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.db import connection

from documents.ingest import document_ingest
from documents.models import Chunk, Document
from documents.retrieval import _bm25_ranking, documents_in_scope, passages_search
from documents.services import document_upload
from tenants.access import NotFound
from tenants.rls import tenant_scope

pytestmark = pytest.mark.django_db

LEASE = [
    "This lease is made between Northwind Properties (the landlord) and Ada Lovelace "
    "(the tenant) for the flat at 12 Analytical Street.",
    "Rent. The tenant pays a monthly rent of 1,450 euros on the first day of each month "
    "by bank transfer. Late payment incurs a fee of 40 euros.",
    "Pets. No cats, dogs or other animals may be kept in the flat without the landlord's "
    "written consent, which may be withdrawn at any time.",
    "Termination. Either party may end this lease by giving three months' notice in "
    "writing. The deposit of two months' rent is returned within thirty days.",
    "Repairs. The landlord keeps the roof, walls, heating and plumbing in good repair; "
    "the tenant reports any damage without delay.",
]


@pytest.fixture(autouse=True)
def small_chunks(settings, documents_storage):
    # One paragraph a chunk (each is under 60 tokens), no overlap.
    settings.PARLEY_DOCUMENT_CHUNK_TOKENS = 60
    settings.PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS = 0


def ingested(person, paragraphs: list[str], filename: str = "lease.txt") -> Document:
    data = "\n\n".join(paragraphs).encode()
    with tenant_scope(tenant_id=person.tenant.id, user_id=person.user.id):
        document = document_upload(actor=person.actor, data=data, filename=filename)
    document_ingest(document_id=document.id, tenant_id=person.tenant.id)
    with tenant_scope(tenant_id=person.tenant.id):
        return Document.objects.get(id=document.id)


def search(person, query: str, documents: list[Document], **kwargs):
    with tenant_scope(tenant_id=person.tenant.id):
        return passages_search(
            actor=person.actor, query=query, document_ids=[d.id for d in documents], **kwargs
        )


def test_full_text_ranks_the_passage_with_the_question_words_first(alice):
    lease = ingested(alice, LEASE)
    assert lease.state == Document.State.READY
    # Every word need not occur: the passage sharing the most wins.
    found = search(
        alice, "How much notice to end the lease, and the deposit?", [lease], mode="text"
    )
    assert found and "three months' notice" in found[0].text
    assert found[0].text_rank == 1 and found[0].vector_rank is None
    assert found[0].document_id == lease.id and found[0].page_start == 1
    # Offsets point into the page text.
    with tenant_scope(tenant_id=alice.tenant.id):
        page = lease.pages.get(number=found[0].page_start).text
    assert page[found[0].char_start : found[0].char_end] == found[0].text
    assert "monthly rent" in search(alice, "rent payment", [lease], mode="text")[0].text
    assert search(alice, "zeppelin", [lease], mode="text") == []


def test_passages_come_only_from_the_documents_named(alice):
    lease = ingested(alice, LEASE)
    other = ingested(alice, ["Rent for the garage is 90 euros a month."], "garage.txt")
    assert {p.document_id for p in search(alice, "rent", [other], mode="text")} == {other.id}
    assert {p.document_id for p in search(alice, "rent", [lease, other], mode="text")} == {
        lease.id,
        other.id,
    }


def test_another_members_or_tenants_document_is_not_found(alice, bob, charlie):
    mine = ingested(alice, LEASE)
    bobs = ingested(bob, LEASE, "bob.txt")
    charlies = ingested(charlie, LEASE, "charlie.txt")
    for foreign in (bobs, charlies):
        with pytest.raises(NotFound):
            search(alice, "rent", [mine, foreign])
    with pytest.raises(NotFound), tenant_scope(tenant_id=alice.tenant.id):
        documents_in_scope(actor=alice.actor, document_ids=["not-an-id"])


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row level security")
def test_the_search_function_never_returns_another_tenants_chunk(alice, charlie):
    """The second wall: even given another tenant's document id, the function (which
    runs past row level security) applies the tenant of the transaction."""
    charlies = ingested(charlie, LEASE, "charlie.txt")
    with tenant_scope(tenant_id=alice.tenant.id), connection.cursor() as cursor:
        cursor.execute(
            "SELECT chunk_id FROM parley_chunk_search(%s::uuid[], %s, 50)",
            [[str(charlies.id)], "rent"],
        )
        assert cursor.fetchall() == []
        cursor.execute("SELECT current_user")
        assert cursor.fetchone()[0] == "parley_app"
    with tenant_scope(tenant_id=charlie.tenant.id), connection.cursor() as cursor:
        cursor.execute(
            "SELECT chunk_id FROM parley_chunk_search(%s::uuid[], %s, 50)",
            [[str(charlies.id)], "rent"],
        )
        assert len(cursor.fetchall()) >= 1
    # No tenant in the transaction: nothing.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT chunk_id FROM parley_chunk_search(%s::uuid[], %s, 50)",
            [[str(charlies.id)], "rent"],
        )
        assert cursor.fetchall() == []


def test_the_embedded_full_text_ranking_agrees_with_postgresql(alice):
    """BM25 in Python (the SQLite path) finds the same best passage."""
    lease = ingested(alice, LEASE)
    with tenant_scope(tenant_id=alice.tenant.id):
        for query, expected in [
            ("monthly rent bank transfer", "monthly rent"),
            ("animals cats dogs", "No cats"),
            ("repair heating plumbing", "plumbing"),
        ]:
            best = _bm25_ranking([lease], query, 5)[0]
            assert expected in Chunk.objects.get(id=best).text
            assert search(alice, query, [lease], mode="text")[0].chunk_id == best


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({"query": "  "}, "Give a question"),
        ({"query": "x" * 2001}, "at most 2000"),
        ({"query": "rent", "limit": 0}, "limit"),
        ({"query": "rent", "mode": "psychic"}, "mode must be"),
    ],
)
def test_bad_searches_are_refused_with_a_reason(alice, kwargs, detail):
    lease = ingested(alice, LEASE)
    query = kwargs.pop("query")
    with pytest.raises(ValidationError, match=detail):
        search(alice, query, [lease], **kwargs)


def test_a_question_naming_a_document_by_its_title_finds_that_documents_passage(alice):
    """The same clause in two documents: the one whose title the question names ranks
    first, in PostgreSQL's ranking and in the embedded mode's BM25 alike."""
    clause = ["Termination. Either party may end this agreement with three months' notice."]
    apache = ingested(alice, clause, "Apache-2.0.txt")
    mozilla = ingested(alice, clause, "Mozilla-Public-License.txt")
    for question, expected in (
        ("How do I end an Apache agreement?", apache),
        ("How do I end a Mozilla agreement?", mozilla),
    ):
        found = search(alice, question, [apache, mozilla], mode="text")
        assert found[0].document_id == expected.id, question
        with tenant_scope(tenant_id=alice.tenant.id):
            best = _bm25_ranking([apache, mozilla], question, 5)[0]
            assert Chunk.objects.get(id=best).document_id == expected.id, question
