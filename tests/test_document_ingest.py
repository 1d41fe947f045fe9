"""Document ingestion (documents.ingest): PDF, DOCX and text files become pages and
chunks whose offsets point into the pages' text, and the chunks get the real model's
vectors; a file that cannot be parsed, or an embedding backend that fails, ends `failed`
with its reason; a job run again, or resumed after some batches, stores and embeds
nothing twice; the watchdog embeds again the ready documents whose vectors are missing or
another model's; the REST API and the owner's sockets (only theirs) follow it."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer

from documents.chunking import ChunkSpan, chunk_text_from_pages
from documents.embeddings import (
    EMBEDDING_DIM,
    embedding_model_name,
    texts_embed,
    vectors_version,
)
from documents.ingest import FAILED_EMBEDDING, FAILED_GENERIC, document_ingest, pages_store
from documents.models import Document
from documents.notify import documents_group
from documents.services import document_upload
from tenants.rls import tenant_scope
from tests.conftest import as_operator, ws_connect
from tests.pdfs import pdf_with_text

URL = "/api/v1/documents"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


@pytest.fixture(autouse=True)
def document_files(settings, tmp_path):
    """Each test's files in a folder of its own; small chunks and batches, so a short
    document has several of each."""
    settings.STORAGES = {
        **settings.STORAGES,
        "documents": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "documents"), "base_url": None},
        },
    }
    settings.PARLEY_DOCUMENT_CHUNK_TOKENS = 20
    settings.PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS = 5
    settings.PARLEY_DOCUMENT_INGEST_BATCH = 2


def sentences(page: int, count: int = 12) -> list[str]:
    return [f"Page {page} line {n}: {' '.join(WORDS[: 3 + n % 6])}." for n in range(count)]


def docx_bytes(pages: list[list[str]]) -> bytes:
    import docx
    from docx.enum.text import WD_BREAK

    document = docx.Document()
    for number, lines in enumerate(pages):
        for line in lines:
            document.add_paragraph(line)
        if number < len(pages) - 1:
            document.add_paragraph().add_run().add_break(WD_BREAK.PAGE)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def text_bytes(pages: list[list[str]]) -> bytes:
    return "\f".join("\n".join(lines) for lines in pages).encode()


def upload(person, data: bytes, filename: str) -> Document:
    with tenant_scope(tenant_id=person.tenant.id, user_id=person.user.id):
        return document_upload(actor=person.actor, data=data, filename=filename)


def ingested(person, data: bytes, filename: str) -> Document:
    document = upload(person, data, filename)
    document_ingest(document_id=document.id, tenant_id=person.tenant.id)
    with tenant_scope(tenant_id=person.tenant.id):
        return Document.objects.get(id=document.id)


def rows(document: Document) -> tuple[list, list]:
    with tenant_scope(tenant_id=document.tenant_id):
        pages = list(document.pages.order_by("number").values_list("id", "number", "text"))
        chunks = list(
            document.chunks.order_by("index").values_list(
                "id", "index", "text", "page_start", "page_end", "char_start", "char_end"
            )
        )
    return pages, chunks


PAGES = [sentences(1), sentences(2), sentences(3)]


@pytest.mark.parametrize(
    ("filename", "make"),
    [("report.pdf", pdf_with_text), ("report.docx", docx_bytes), ("notes.txt", text_bytes)],
)
def test_a_file_becomes_its_pages_and_chunks_at_their_places(alice, filename, make):
    document = ingested(alice, make(PAGES), filename)
    assert (document.state, document.error_message, document.stage) == ("ready", "", "")
    assert document.page_count == 3
    pages, chunks = rows(document)
    texts = [text for _, _, text in pages]
    assert [number for _, number, _ in pages] == [1, 2, 3]
    for number, lines in enumerate(PAGES):
        for line in lines:
            assert line in texts[number]
    assert len(chunks) > 3  # small chunks: several per page
    assert [index for _, index, *_ in chunks] == list(range(len(chunks)))
    for _, _, text, page_start, page_end, char_start, char_end in chunks:
        span = ChunkSpan(text, page_start, page_end, char_start, char_end, token_count=0)
        assert chunk_text_from_pages(texts, span) == text
    # The first chunk starts the document; the last ends it.
    assert chunks[0][2].startswith("Page 1 line 0")
    assert PAGES[-1][-1].endswith(chunks[-1][2])
    assert document.token_count and document.token_count > 0
    assert document.progress_done == document.progress_total == len(chunks)


def test_a_file_that_passed_intake_but_cannot_be_parsed_fails_with_its_reason(alice, settings):
    document = upload(alice, pdf_with_text(PAGES), "a.pdf")
    # The stored file is damaged after intake accepted it (a half-written copy).
    from documents.storage import document_storage

    path = document_storage().path(document.file_name)
    with open(path, "wb") as file:
        file.write(b"%PDF-1.4\n" + b"\x00garbage" * 20)
    document_ingest(document_id=document.id, tenant_id=alice.tenant.id)
    with tenant_scope(tenant_id=alice.tenant.id):
        document.refresh_from_db()
    assert document.state == "failed"
    assert document.error_message.startswith("This PDF is corrupt or unreadable")
    assert rows(document) == ([], [])


def test_an_unexpected_error_fails_with_a_generic_reason_and_is_logged(alice, monkeypatch, caplog):
    document = upload(alice, text_bytes(PAGES), "a.txt")

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("documents.ingest.chunks_of", broken)
    document_ingest(document_id=document.id, tenant_id=alice.tenant.id)
    with tenant_scope(tenant_id=alice.tenant.id):
        document.refresh_from_db()
    assert (document.state, document.error_message) == ("failed", FAILED_GENERIC)
    assert "disk on fire" in caplog.text


def test_running_the_job_again_stores_nothing_twice(alice):
    document = ingested(alice, pdf_with_text(PAGES), "a.pdf")
    before = rows(document)
    document_ingest(document_id=document.id, tenant_id=alice.tenant.id)
    # Even when the document's state says the job never finished:
    with tenant_scope(tenant_id=alice.tenant.id):
        Document.objects.filter(id=document.id).update(state="parsing")
    document_ingest(document_id=document.id, tenant_id=alice.tenant.id)
    assert rows(document) == before
    with tenant_scope(tenant_id=alice.tenant.id):
        assert Document.objects.get(id=document.id).state == "ready"


def test_a_job_cut_short_resumes_without_redoing_or_duplicating(alice, monkeypatch):
    data = pdf_with_text([sentences(n) for n in range(1, 6)])
    whole = ingested(alice, data, "whole.pdf")
    document = upload(alice, data, "cut.pdf")
    # Killed after its pages and two batches of chunks were stored:
    pages_store(document_id=document.id, tenant_id=alice.tenant.id)
    from documents import ingest

    stored = []
    real_bulk_create = ingest.Chunk.objects.bulk_create

    def dies_on_the_third(objs, **kwargs):
        if len(stored) == 2:
            raise SystemExit("worker killed")
        stored.append(real_bulk_create(objs, **kwargs))
        return stored[-1]

    monkeypatch.setattr(ingest.Chunk.objects, "bulk_create", dies_on_the_third)
    with pytest.raises(SystemExit):
        ingest.chunks_store(document_id=document.id, tenant_id=alice.tenant.id)
    monkeypatch.undo()
    pages_before, chunks_before = rows(document)
    assert len(chunks_before) == 4  # two batches of two
    # What is already stored is not written again.
    parsed, created = [], []
    monkeypatch.setattr(
        ingest.Page.objects,
        "bulk_create",
        lambda objs, **kwargs: parsed.extend(objs),
    )
    real = ingest.Chunk.objects.bulk_create
    monkeypatch.setattr(
        ingest.Chunk.objects,
        "bulk_create",
        lambda objs, **kwargs: created.extend(objs) or real(objs, **kwargs),
    )
    document_ingest(document_id=document.id, tenant_id=alice.tenant.id)
    assert parsed == []
    assert {chunk.index for chunk in created} == set(range(4, len(rows(whole)[1])))
    pages, chunks = rows(document)
    assert pages == pages_before
    assert chunks[:4] == chunks_before
    # The same pages and chunks as a job that was never interrupted.
    assert [p[1:] for p in pages] == [p[1:] for p in rows(whole)[0]]
    assert [c[1:] for c in chunks] == [c[1:] for c in rows(whole)[1]]
    with tenant_scope(tenant_id=alice.tenant.id):
        assert Document.objects.get(id=document.id).state == "ready"


def test_the_rest_api_shows_the_state_and_progress(client, alice):
    document = ingested(alice, text_bytes(PAGES), "a.txt")
    client.force_login(alice.user)
    body = client.get(f"{URL}/{document.id}").json()
    assert body["state"] == "ready"
    assert body["stage"] == ""
    assert body["progress_done"] == body["progress_total"] == len(rows(document)[1]) > 0
    assert body["page_count"] == 3


@pytest.mark.django_db(transaction=True)
async def test_an_upload_queues_the_job_and_the_owner_is_told_its_progress(alice, bob, worker):
    """The upload queues the job on the `documents` queue, where a worker runs it; the
    owner's group (their sockets join it) gets its `document.updated` frames, ending
    `ready`; another member's gets nothing."""
    layer = get_channel_layer()
    own, colleague = await layer.new_channel(), await layer.new_channel()
    await layer.group_add(documents_group(alice.tenant.id, alice.user.id), own)
    await layer.group_add(documents_group(bob.tenant.id, bob.user.id), colleague)
    data = pdf_with_text([sentences(n) for n in range(1, 6)])
    document = await sync_to_async(upload)(alice, data, "r.pdf")
    frames: list[dict] = []
    while not frames or frames[-1]["state"] not in ("ready", "failed"):
        message = await asyncio.wait_for(layer.receive(own), timeout=60)
        assert message["type"] == "frame.forward"
        frames.append(message["frame"])
    assert {f["type"] for f in frames} == {"document.updated"}
    assert {f["document_id"] for f in frames} == {str(document.id)}
    assert frames[0]["state"] == "parsing"
    assert frames[-1]["state"] == "ready", frames[-1]
    stages = [f["stage"] for f in frames[:-1]]
    assert stages == sorted(stages, key=["pages", "chunks", "embeddings"].index)
    assert [f["done"] for f in frames if f["stage"] == "pages"] == [0, 2, 4, 5]
    count = await as_operator(lambda: Document.objects.get(id=document.id).chunks.count())
    chunk_frames = [f for f in frames if f["stage"] == "chunks"]
    assert chunk_frames[-1]["done"] == chunk_frames[-1]["total"] == count
    embedding_frames = [f for f in frames if f["stage"] == "embeddings"]
    assert {f["state"] for f in embedding_frames} == {"embedding"}
    assert [f["done"] for f in embedding_frames] == [*range(0, count, 2), count]
    assert {f["total"] for f in embedding_frames} == {count}
    assert frames[-1]["done"] == frames[-1]["total"] == count
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(colleague), timeout=0.5)


@pytest.mark.django_db(transaction=True)
async def test_the_owner_follows_the_job_on_their_sockets_and_no_one_else(alice, bob, worker):
    """The frames reach the owner's sockets as documented (`Socket.receive` checks each
    against docs/asyncapi.yaml), ending `ready`; another member's sockets get none."""
    _, _, own = await ws_connect(alice.user)
    _, _, colleague = await ws_connect(bob.user)
    data = pdf_with_text([sentences(n) for n in range(1, 6)])
    document = await sync_to_async(upload)(alice, data, "r.pdf")
    frames = await own.receive_until(("document.updated",), timeout=60)
    while frames[-1]["state"] not in ("ready", "failed"):
        frames += await own.receive_until(("document.updated",), timeout=60)
    assert {f["document_id"] for f in frames} == {str(document.id)}
    assert frames[0]["state"] == "parsing"
    assert frames[-1]["state"] == "ready", frames[-1]
    count = await as_operator(lambda: Document.objects.get(id=document.id).chunks.count())
    assert frames[-1]["done"] == frames[-1]["total"] == count
    assert await colleague.nothing_pending()
    await own.close()
    await colleague.close()


@pytest.mark.django_db(transaction=True)
async def test_an_api_key_socket_follows_the_job_with_the_documents_scope_only(alice, worker):
    from tenants.services.api_keys import api_key_create

    def key(scopes: list[str]) -> str:
        with tenant_scope(tenant_id=alice.tenant.id):
            return api_key_create(actor=alice.actor, name="-".join(scopes), scopes=scopes)[1]

    documents_key = await sync_to_async(key)(["chat", "documents"])
    chat_key = await sync_to_async(key)(["chat"])
    _, _, with_scope = await ws_connect(
        origin=None, headers=[(b"authorization", f"Bearer {documents_key}".encode())]
    )
    _, _, without = await ws_connect(
        origin=None, headers=[(b"authorization", f"Bearer {chat_key}".encode())]
    )
    data = pdf_with_text([sentences(n) for n in range(1, 3)])
    document = await sync_to_async(upload)(alice, data, "r.pdf")
    frames = await with_scope.receive_until(("document.updated",), timeout=60)
    while frames[-1]["state"] not in ("ready", "failed"):
        frames += await with_scope.receive_until(("document.updated",), timeout=60)
    assert {f["document_id"] for f in frames} == {str(document.id)}
    assert frames[-1]["state"] == "ready"
    assert await without.nothing_pending()
    await with_scope.close()
    await without.close()


# --- the watchdog -------------------------------------------------------------------------


def stall(document: Document, *, state: str, seconds_ago: float) -> None:
    """As a lost worker leaves it: the state, and no progress since `seconds_ago`."""
    from datetime import timedelta

    from django.utils import timezone

    with tenant_scope(tenant_id=document.tenant_id):
        Document.objects.filter(id=document.id).update(
            state=state, updated_at=timezone.now() - timedelta(seconds=seconds_ago)
        )


def test_the_watchdog_resumes_a_stalled_job_and_fails_one_that_keeps_stalling(
    alice, settings, monkeypatch, django_capture_on_commit_callbacks
):
    from documents import watchdog

    # (The job runs here rather than on a worker: what was queued is run at once.)
    monkeypatch.setattr(
        watchdog,
        "enqueue",
        lambda task, document_id, tenant_id: document_ingest(
            document_id=document_id, tenant_id=tenant_id
        ),
    )
    settings.PARLEY_DOCUMENT_STALL_S = 60
    settings.PARLEY_DOCUMENT_INGEST_RESTARTS = 1
    data = pdf_with_text([sentences(n) for n in range(1, 4)])
    document = upload(alice, data, "stalled.pdf")
    pages_store(document_id=document.id, tenant_id=alice.tenant.id)  # then the worker died
    fresh = upload(alice, data, "fresh.pdf")
    stall(document, state=Document.State.PARSING, seconds_ago=120)
    stall(fresh, state=Document.State.PARSING, seconds_ago=10)  # still at work: left alone

    with django_capture_on_commit_callbacks(execute=True):
        assert watchdog.documents_reap() == {
            "restarted": 1,
            "failed": 0,
            "moved_on": 0,
            "reembedding": 0,
        }
    with tenant_scope(tenant_id=alice.tenant.id):
        resumed = Document.objects.get(id=document.id)
        assert Document.objects.get(id=fresh.id).state == Document.State.PARSING
    assert resumed.state == Document.State.READY and resumed.ingest_restarts == 1
    assert rows(resumed)[1] and len(rows(resumed)[0]) == 3

    # One that stalls again after its restarts fails, with the reason.
    stall(fresh, state=Document.State.PARSING, seconds_ago=120)
    with tenant_scope(tenant_id=alice.tenant.id):
        Document.objects.filter(id=fresh.id).update(ingest_restarts=1)
    with django_capture_on_commit_callbacks(execute=True):
        assert watchdog.documents_reap() == {
            "restarted": 0,
            "failed": 1,
            "moved_on": 0,
            "reembedding": 0,
        }
    with tenant_scope(tenant_id=alice.tenant.id):
        failed = Document.objects.get(id=fresh.id)
    assert failed.state == Document.State.FAILED
    assert "stopped 2 times" in failed.error_message


def test_the_watchdog_queues_again_an_upload_no_worker_took(
    alice, settings, monkeypatch, django_capture_on_commit_callbacks
):
    from documents import watchdog

    queued = []
    monkeypatch.setattr(watchdog, "enqueue", lambda task, *args: queued.append(args))
    settings.PARLEY_RUN_QUEUE_TIMEOUT_S = 600
    document = upload(alice, text_bytes(PAGES), "waiting.txt")
    stall(document, state=Document.State.UPLOADED, seconds_ago=300)
    with django_capture_on_commit_callbacks(execute=True):
        assert watchdog.documents_reap()["restarted"] == 0  # not yet: within the timeout
    stall(document, state=Document.State.UPLOADED, seconds_ago=900)
    with django_capture_on_commit_callbacks(execute=True):
        assert watchdog.documents_reap()["restarted"] == 1
    assert queued == [(str(document.id), str(alice.tenant.id))]


# --- the embeddings stage -----------------------------------------------------------------


def vectors(document: Document) -> list[tuple[int, list[float] | None]]:
    with tenant_scope(tenant_id=document.tenant_id):
        return list(document.chunks.order_by("index").values_list("index", "embedding"))


def test_the_chunks_get_the_models_vectors(alice):
    document = ingested(alice, text_bytes(PAGES), "a.txt")
    assert document.embedding_model == vectors_version() == embedding_model_name() + "+title+192"
    texts = [text for _, _, text, *_ in rows(document)[1]]
    stored = np.array([vector for _, vector in vectors(document)])
    assert stored.shape == (len(texts), EMBEDDING_DIM)
    assert np.allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    # Each chunk is embedded after its document's title.
    assert np.allclose(stored, texts_embed([f"a.txt\n\n{t}" for t in texts]), atol=1e-5)
    assert not np.allclose(stored, texts_embed(texts), atol=1e-3)
    assert (document.stage, document.progress_done) == ("", len(texts))


def counting_embed(calls: list[list[str]], *, dies_at: int | None = None):
    from documents.embeddings import texts_embed as real

    def embed(texts):
        if len(calls) == dies_at:
            raise SystemExit("worker killed")
        calls.append(list(texts))
        return real(texts)

    return embed


def test_a_job_killed_mid_embedding_resumes_without_embedding_a_batch_twice(alice, monkeypatch):
    from documents import ingest

    data = text_bytes([sentences(n) for n in range(1, 4)])
    whole = ingested(alice, data, "cut.txt")  # the same title: the same vectors
    document = upload(alice, data, "cut.txt")
    first: list[list[str]] = []
    monkeypatch.setattr(ingest, "texts_embed", counting_embed(first, dies_at=2))
    with pytest.raises(SystemExit):
        document_ingest(document_id=document.id, tenant_id=alice.tenant.id)
    with tenant_scope(tenant_id=alice.tenant.id):
        document.refresh_from_db()
    assert (document.state, document.stage, document.progress_done) == (
        "embedding",
        "embeddings",
        4,
    )
    assert [vector is not None for _, vector in vectors(document)][:5] == [True] * 4 + [False]

    # Run again (the watchdog, or the message redelivered): no parsing, only the rest.
    parsed: list = []
    monkeypatch.setattr(ingest, "pages_store", lambda **kwargs: parsed.append(kwargs))
    second: list[list[str]] = []
    monkeypatch.setattr(ingest, "texts_embed", counting_embed(second))
    document_ingest(document_id=document.id, tenant_id=alice.tenant.id)
    texts = [text for _, _, text, *_ in rows(document)[1]]
    assert parsed == []
    # Each once (after the document's title, as it is embedded).
    assert [text for call in first + second for text in call] == [f"cut.txt\n\n{t}" for t in texts]
    assert all(len(call) == 2 for call in second[:-1])  # PARLEY_DOCUMENT_INGEST_BATCH
    with tenant_scope(tenant_id=alice.tenant.id):
        document.refresh_from_db()
    assert document.state == "ready"
    assert np.allclose([v for _, v in vectors(document)], [v for _, v in vectors(whole)], atol=1e-5)


def test_a_failing_embedding_backend_fails_the_document_and_the_worker_goes_on(
    alice, settings, monkeypatch
):
    import socket

    from config.singleton import process_singleton
    from documents import embeddings

    with socket.socket() as closed:  # a port no one listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    settings.PARLEY_EMBEDDING_BACKEND = "openai"
    settings.PARLEY_EMBEDDING_URL = f"http://127.0.0.1:{port}"
    settings.PARLEY_EMBEDDING_MODEL = "BAAI/bge-small-en-v1.5"
    monkeypatch.setattr(
        embeddings, "embedding_backend", process_singleton(embeddings.backend_from_settings)
    )
    document = ingested(alice, text_bytes(PAGES), "a.txt")
    assert document.state == "failed"
    assert document.error_message == FAILED_EMBEDDING.format(
        reason="the embedding server could not be reached"
    )
    assert all(vector is None for _, vector in vectors(document))
    # The same worker, its database connection and the local model serve the next one.
    monkeypatch.undo()
    settings.PARLEY_EMBEDDING_BACKEND = "local"
    following = ingested(alice, text_bytes(PAGES), "b.txt")
    assert following.state == "ready"
    assert all(vector is not None for _, vector in vectors(following))


def test_the_watchdog_embeds_again_ready_documents_without_vectors_or_of_another_model(
    alice, bob, settings, monkeypatch, django_capture_on_commit_callbacks
):
    from documents import watchdog

    monkeypatch.setattr(
        watchdog,
        "enqueue",
        lambda task, document_id, tenant_id: document_ingest(
            document_id=document_id, tenant_id=tenant_id
        ),
    )
    legacy = ingested(alice, text_bytes(PAGES), "before-embeddings.txt")
    other_model = ingested(bob, text_bytes(PAGES[:2]), "old-model.txt")
    current = ingested(alice, text_bytes(PAGES[1:]), "current.txt")
    expected = {d.id: vectors(d) for d in (legacy, other_model)}
    with tenant_scope(tenant_id=alice.tenant.id):
        # Ingested before the embeddings stage existed: no model, no vectors.
        legacy.chunks.update(embedding=None)
        Document.objects.filter(id=legacy.id).update(embedding_model="")
    with tenant_scope(tenant_id=bob.tenant.id):
        other_model.chunks.update(embedding=[1.0] + [0.0] * 383)
        Document.objects.filter(id=other_model.id).update(embedding_model="an/older-model")
    with tenant_scope(tenant_id=alice.tenant.id):
        current_updated = Document.objects.get(id=current.id).updated_at

    with django_capture_on_commit_callbacks(execute=True):
        counts = watchdog.documents_reap()
    assert counts == {"restarted": 0, "failed": 0, "moved_on": 0, "reembedding": 2}
    for document in (legacy, other_model):
        with tenant_scope(tenant_id=document.tenant_id):
            document.refresh_from_db()
        assert (document.state, document.embedding_model) == ("ready", vectors_version())
        assert document.ingest_restarts == 0
        got = vectors(document)
        assert [i for i, _ in got] == [i for i, _ in expected[document.id]]
        assert np.allclose([v for _, v in got], [v for _, v in expected[document.id]], atol=1e-5)
    with tenant_scope(tenant_id=alice.tenant.id):
        assert Document.objects.get(id=current.id).updated_at == current_updated
    with django_capture_on_commit_callbacks(execute=True):
        assert watchdog.documents_reap()["reembedding"] == 0

    # An embedding stage whose worker was lost is started again like any stalled job.
    settings.PARLEY_DOCUMENT_STALL_S = 60
    stall(current, state=Document.State.EMBEDDING, seconds_ago=120)
    with django_capture_on_commit_callbacks(execute=True):
        assert watchdog.documents_reap()["restarted"] == 1
    with tenant_scope(tenant_id=alice.tenant.id):
        assert Document.objects.get(id=current.id).state == "ready"
