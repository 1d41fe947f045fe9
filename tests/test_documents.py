"""Documents: upload (type from the content, hostile files refused with their reason
and nothing stored), list, get, delete, page text, limits, scopes, isolation, and the
files of a deleted tenant."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
import zipfile
from datetime import timedelta

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.utils import timezone

from documents.models import Chunk, Document, Page
from documents.services import document_upload
from tenants.models import Plan, Tenant
from tenants.rls import operator_scope, tenant_scope
from tenants.services.api_keys import api_key_create
from tests.pdfs import raw_pdf

pytestmark = pytest.mark.django_db

URL = "/api/v1/documents"
DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


@pytest.fixture(autouse=True)
def document_files(settings, tmp_path):
    """Each test's files in a folder of its own."""
    folder = tmp_path / "documents"
    settings.STORAGES = {
        **settings.STORAGES,
        "documents": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(folder), "base_url": None},
        },
    }
    return folder


def stored_files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- files made in the test -----------------------------------------------------------


def pdf_bytes(pages: int = 1) -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(200, 200)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def encrypted_pdf_bytes() -> bytes:
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(200, 200)
    writer.encrypt("secret")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def nested_pdf_bytes(depth: int) -> bytes:
    """One page under `depth` levels of /Pages nodes."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    for level in range(depth):
        number = level + 2
        parent = b" /Parent %d 0 R" % (number - 1) if level else b""
        objects.append(b"<< /Type /Pages /Kids [%d 0 R] /Count 1%s >>" % (number + 1, parent))
    objects.append(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 200 200] >>" % (depth + 1))
    return raw_pdf(objects)


def docx_bytes(text: str = "Quarterly report") -> bytes:
    import docx

    document = docx.Document()
    document.add_paragraph(text)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


HTML = (
    b"<!DOCTYPE html><html><head><title>T</title><style>p{color:red}</style>"
    b"<script>alert('x')</script></head><body><h1>Minutes</h1><p>All agreed &amp; "
    b"signed.</p></body></html>"
)
MARKDOWN = b"# Plan\n\nSee [the spec](https://example.org/spec).\n\n- one\n- two\n"
TEXT = "Plain notes, caf\u00e9 and all.\nSecond line.\n".encode()


def upload(client, data: bytes, name: str = "file.bin", form: dict | None = None, **extra):
    return client.post(URL, {"file": SimpleUploadedFile(name, data), **(form or {})}, **extra)


# --- accepted types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "make", "media_type", "pages", "text"),
    [
        ("notes.txt", lambda: TEXT, "text/plain", 1, "Plain notes, caf\u00e9 and all."),
        ("plan.md", lambda: MARKDOWN, "text/markdown", 1, "# Plan"),
        ("minutes.html", lambda: HTML, "text/html", 1, "All agreed & signed."),
        ("report.pdf", lambda: pdf_bytes(3), "application/pdf", 3, None),
        ("report.docx", docx_bytes, DOCX_TYPE, None, None),
        # The name says nothing: a Markdown file named .pdf is Markdown.
        ("misleading.pdf", lambda: MARKDOWN, "text/markdown", 1, "# Plan"),
    ],
)
def test_each_accepted_type_is_stored_and_read_back(
    client, alice, document_files, name, make, media_type, pages, text
):
    data = make()
    client.force_login(alice.user)
    response = upload(client, data, name, form={"title": "Board pack"})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["media_type"] == media_type
    assert body["size_bytes"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["page_count"] == pages
    assert body["state"] == "uploaded" and body["title"] == "Board pack"
    assert body["filename"] == name
    # The file is stored as sent, under the tenant's folder.
    assert stored_files(document_files) == [f"{alice.tenant.id}/{body['id']}"]
    assert (document_files / str(alice.tenant.id) / body["id"]).read_bytes() == data

    assert client.get(f"{URL}/{body['id']}").json() == body
    assert [d["id"] for d in client.get(URL).json()] == [body["id"]]
    page = client.get(f"{URL}/{body['id']}/pages/1")
    if pages is None:
        assert page.status_code == 404  # a DOCX has no pages until it is parsed
    elif text is None:
        assert page.json() == {
            "document_id": body["id"],
            "number": 1,
            "label": "",
            "text": "",
            "parsed": False,
        }
    else:
        assert page.json()["parsed"] is True and text in page.json()["text"]
        assert body["token_count"] == len(page.json()["text"]) // 4


def test_html_is_kept_as_text_without_tags_scripts_or_styles(client, alice):
    client.force_login(alice.user)
    document_id = upload(client, HTML, "minutes.html").json()["id"]
    text = client.get(f"{URL}/{document_id}/pages/1").json()["text"]
    assert text == "Minutes\n\nAll agreed & signed."
    assert "<" not in text and "alert" not in text and "color" not in text


def test_a_text_that_mentions_html_further_down_stays_markdown(client, alice):
    data = b"# Embedding\n\n```html\n<html><body><script>x()</script></body></html>\n```\n"
    client.force_login(alice.user)
    body = upload(client, data, "readme.md").json()
    assert body["media_type"] == "text/markdown"
    assert "<script>" in client.get(f"{URL}/{body['id']}/pages/1").json()["text"]


@pytest.mark.parametrize(
    ("title", "detail"),
    [("x" * 201, "A title is at most 200 characters."), ("a\x00b", "NUL")],
)
def test_a_bad_title_is_refused_and_nothing_stored(client, alice, document_files, title, detail):
    client.force_login(alice.user)
    response = upload(client, TEXT, "notes.txt", form={"title": title})
    assert response.status_code == 400, response.content
    assert detail in response.json()["detail"]
    assert stored_files(document_files) == []
    with operator_scope():
        assert not Document.objects.exists()


def test_pages_outside_the_document_are_not_found(client, alice):
    client.force_login(alice.user)
    document_id = upload(client, TEXT, "notes.txt").json()["id"]
    for number in ("0", "2", "-1", "x", "1.0", "99999999999"):
        response = client.get(f"{URL}/{document_id}/pages/{number}")
        assert response.status_code == 404, number
        assert response.json() == {"detail": "Not found."}


def test_the_list_is_newest_first_and_pages(client, alice):
    client.force_login(alice.user)
    ids = [upload(client, f"note {n}".encode(), f"{n}.txt").json()["id"] for n in range(3)]
    assert [d["id"] for d in client.get(URL).json()] == ids[::-1]
    assert [d["id"] for d in client.get(URL, {"limit": 1, "offset": 1}).json()] == [ids[1]]
    assert client.get(URL, {"limit": 0}).status_code == 422


def test_delete_removes_the_row_its_pages_and_its_file(
    client, alice, document_files, django_capture_on_commit_callbacks
):
    client.force_login(alice.user)
    kept = upload(client, MARKDOWN, "kept.md").json()["id"]
    document_id = upload(client, TEXT, "notes.txt").json()["id"]
    assert len(stored_files(document_files)) == 2
    with django_capture_on_commit_callbacks(execute=True):
        assert client.delete(f"{URL}/{document_id}").status_code == 204
    assert stored_files(document_files) == [f"{alice.tenant.id}/{kept}"]
    assert client.get(f"{URL}/{document_id}").status_code == 404
    with operator_scope():
        assert not Document.objects.filter(id=document_id).exists()
        assert not Page.objects.filter(document_id=document_id).exists()
        assert Page.objects.filter(document_id=kept).count() == 1
    assert client.delete(f"{URL}/{document_id}").status_code == 404


# --- hostile and unsupported files ------------------------------------------------------


def _pe() -> bytes:
    header = bytearray(b"MZ" + b"\0" * 0x3A + (0x80).to_bytes(4, "little"))
    header += b"\0" * (0x80 - len(header)) + b"PE\0\0" + b"\0" * 64
    return bytes(header)


def _zip_bomb() -> bytes:
    return zip_bytes({"[Content_Types].xml": b"<x/>", "word/document.xml": b"\0" * 5_000_000})


HOSTILE = [
    ("elf", lambda: b"\x7fELF\x02\x01\x01" + b"\0" * 100, 415, "ELF executable"),
    ("pe", _pe, 415, "Windows executable"),
    ("mach-o", lambda: b"\xcf\xfa\xed\xfe" + b"\0" * 100, 415, "Mach-O executable"),
    ("binary", lambda: bytes(range(256)) * 4, 415, "Unsupported file type"),
    ("nul in text", lambda: b"looks like text\0but is not", 415, "Unsupported file type"),
    ("latin-1 text", lambda: "caf\u00e9".encode("latin-1"), 415, "Unsupported file type"),
    ("legacy office", lambda: b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 100, 415, "legacy"),
    ("empty", lambda: b"", 400, "empty"),
    ("encrypted pdf", encrypted_pdf_bytes, 400, "encrypted"),
    ("corrupt pdf", lambda: b"%PDF-1.7\n" + b"garbage " * 50, 400, "corrupt"),
    ("truncated pdf", lambda: pdf_bytes(2)[:300], 400, "corrupt"),
    ("too many pages", lambda: pdf_bytes(4), 400, "at most 3"),
    ("nested page tree", lambda: nested_pdf_bytes(6), 400, "nested more than 4 levels"),
    ("zip bomb", _zip_bomb, 400, "zip bomb"),
    # A zip that is not a DOCX is a repository (tests/test_repositories.py): one without
    # a text file is refused.
    ("zip without text", lambda: zip_bytes({"logo.png": b"\x89PNG\0"}), 415, "no text file"),
    ("corrupt zip", lambda: b"PK\x03\x04" + b"\xff" * 200, 400, "corrupt zip"),
    (
        "docx without its parts",
        lambda: zip_bytes({"word/document.xml": b"<w:document/>"}),
        400,
        "DOCX is corrupt",
    ),
]


@pytest.mark.parametrize(("case", "make", "status", "reason"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_files_are_refused_with_their_reason_and_leave_nothing(
    client, alice, settings, document_files, case, make, status, reason
):
    settings.PARLEY_DOCUMENT_MAX_PAGES = 3
    settings.PARLEY_DOCUMENT_MAX_PAGE_TREE_DEPTH = 4
    client.force_login(alice.user)
    response = upload(client, make(), "innocent.pdf")
    assert response.status_code == status, response.content
    assert reason in response.json()["detail"]
    with operator_scope():
        assert not Document.objects.exists() and not Page.objects.exists()
    assert stored_files(document_files) == []


def test_a_shallow_page_tree_within_the_limits_is_accepted(client, alice, settings):
    settings.PARLEY_DOCUMENT_MAX_PAGE_TREE_DEPTH = 4
    client.force_login(alice.user)
    response = upload(client, nested_pdf_bytes(3), "ok.pdf")
    assert response.status_code == 201, response.content
    assert response.json()["page_count"] == 1


def test_a_docx_that_unpacks_too_large_is_refused(client, alice, settings, document_files):
    settings.PARLEY_DOCUMENT_MAX_UNZIPPED_BYTES = 10_000
    client.force_login(alice.user)
    response = upload(client, docx_bytes(), "big.docx")
    assert response.status_code == 400
    assert "unpacks to more than 10000 bytes" in response.json()["detail"]
    assert stored_files(document_files) == []


def test_a_missing_file_field_is_a_schema_error(client, alice):
    client.force_login(alice.user)
    response = client.post(URL, {"title": "no file"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == "file"


# --- limits -------------------------------------------------------------------------------


def test_the_plans_upload_size_is_enforced(client, alice, document_files):
    with operator_scope():
        plan = Plan.objects.create(name="tiny", max_upload_bytes=100)
        Tenant.objects.filter(id=alice.tenant.id).update(plan=plan)
    client.force_login(alice.user)
    response = upload(client, b"x" * 101, "big.txt")
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "The file is 101 bytes; your plan allows uploads of up to 100 bytes."
    )
    assert stored_files(document_files) == []
    assert upload(client, b"x" * 100, "fits.txt").status_code == 201


def test_the_platforms_document_size_is_enforced_whatever_the_plan(
    client, alice, settings, document_files
):
    settings.PARLEY_DOCUMENT_MAX_BYTES = 50  # alice's tenant has no plan: no plan limit
    client.force_login(alice.user)
    response = upload(client, b"x" * 51, "big.txt")
    assert response.status_code == 413
    assert response.json()["detail"] == "The file is 51 bytes; documents may be up to 50 bytes."
    assert stored_files(document_files) == []


def test_the_tenants_storage_quota_is_enforced(client, alice, bob, settings, document_files):
    settings.PARLEY_TENANT_STORAGE_BYTES = 150
    client.force_login(alice.user)
    assert upload(client, b"a" * 100, "first.txt").status_code == 201
    client.force_login(bob.user)  # the quota is the tenant's, not the member's
    response = upload(client, b"b" * 51, "second.txt")
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert "storage is full" in detail and "100 bytes of 150 bytes used" in detail
    assert len(stored_files(document_files)) == 1
    assert upload(client, b"b" * 50, "third.txt").status_code == 201


# --- who may -------------------------------------------------------------------------------


def bearer(secret: str) -> dict:
    return {"HTTP_AUTHORIZATION": f"Bearer {secret}"}


def _key(person, scopes: list[str]) -> str:
    with tenant_scope(tenant_id=person.tenant.id):
        _, secret = api_key_create(actor=person.actor, name="-".join(scopes), scopes=scopes)
    return secret


def test_api_keys_need_the_documents_scope(client, alice, document_files):
    chat_key = _key(alice, ["chat"])
    documents_key = _key(alice, ["documents"])
    refused = upload(client, TEXT, "notes.txt", **bearer(chat_key))
    assert refused.status_code == 403
    assert refused.json()["detail"] == "This API key lacks the 'documents' scope."
    assert client.get(URL, **bearer(chat_key)).status_code == 403
    assert stored_files(document_files) == []
    created = upload(client, TEXT, "notes.txt", **bearer(documents_key))
    assert created.status_code == 201, created.content
    listed = client.get(URL, **bearer(documents_key)).json()
    assert [d["id"] for d in listed] == [created.json()["id"]]
    # The key acts as its creator: the document is hers.
    client.force_login(alice.user)
    assert client.get(f"{URL}/{created.json()['id']}").status_code == 200
    other = client.get(f"{URL}/{created.json()['id']}", **bearer(chat_key))
    assert other.status_code == 403


def test_another_tenants_or_members_document_is_not_found(client, alice, bob, charlie):
    client.force_login(alice.user)
    document_id = upload(client, b"Merger plans, confidential", "secret.txt").json()["id"]
    for person in (charlie, bob):
        client.force_login(person.user)
        for response in (
            client.get(f"{URL}/{document_id}"),
            client.get(f"{URL}/{document_id}/pages/1"),
            client.delete(f"{URL}/{document_id}"),
        ):
            assert response.status_code == 404
            assert "Merger" not in response.content.decode()
        assert client.get(URL).json() == []
    with operator_scope():
        assert Document.objects.filter(id=document_id).exists()


def test_row_level_security_hides_another_tenants_rows(client, alice, charlie):
    if connection.vendor != "postgresql":
        pytest.skip("row level security is PostgreSQL's")
    client.force_login(alice.user)
    upload(client, TEXT, "notes.txt")
    client.force_login(charlie.user)
    upload(client, MARKDOWN, "plan.md")
    # The tests connect as the application role: no tenant set, no rows.
    assert Document.objects.count() == 0 and Page.objects.count() == 0
    for person in (alice, charlie):
        with tenant_scope(tenant_id=person.tenant.id):
            assert set(Document.objects.values_list("tenant_id", flat=True)) == {person.tenant.id}
            assert set(Page.objects.values_list("tenant_id", flat=True)) == {person.tenant.id}
            other = charlie if person is alice else alice
            assert Document.objects.filter(tenant_id=other.tenant.id).update(title="x") == 0


# --- a deleted tenant's files --------------------------------------------------------------


def test_deleting_a_tenant_deletes_its_files(
    client, alice, charlie, document_files, django_capture_on_commit_callbacks
):
    client.force_login(alice.user)
    upload(client, TEXT, "notes.txt")
    upload(client, pdf_bytes(), "report.pdf")
    client.force_login(charlie.user)
    kept = upload(client, MARKDOWN, "plan.md").json()["id"]
    with operator_scope():
        Tenant.objects.filter(id=alice.tenant.id).update(last_exported_at=timezone.now())
    client.force_login(alice.user)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/api/v1/tenant/delete",
            {"confirm": alice.tenant.slug},
            content_type="application/json",
        )
    assert response.status_code == 204, response.content
    assert stored_files(document_files) == [f"{charlie.tenant.id}/{kept}"]
    assert not (document_files / str(alice.tenant.id)).exists()
    with operator_scope():
        assert list(Document.objects.values_list("id", flat=True)) == [uuid.UUID(kept)]


def test_a_deletion_rolled_back_keeps_the_files(
    alice, document_files, django_capture_on_commit_callbacks
):
    """The files go on commit: a deletion that fails later keeps them."""
    from django.db import transaction

    from documents.services import document_upload
    from tenants.services.tenants import tenant_delete

    with tenant_scope(tenant_id=alice.tenant.id):
        document_upload(actor=alice.actor, data=TEXT, filename="notes.txt")
        Tenant.objects.filter(id=alice.tenant.id).update(
            last_exported_at=timezone.now() - timedelta(minutes=1)
        )
    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        with tenant_scope(tenant_id=alice.tenant.id):
            tenant_delete(actor=alice.actor, confirm=alice.tenant.slug)
        raise RuntimeError("a later step failed")
    assert len(stored_files(document_files)) == 1


def test_the_tenant_export_lists_its_documents(client, alice, charlie):
    client.force_login(charlie.user)
    upload(client, b"Charlie's secrets", "c.txt")
    client.force_login(alice.user)
    document = upload(client, TEXT, "notes.txt", form={"title": "Notes"}).json()
    archive = client.get("/api/v1/tenant/export").json()
    assert [(d["id"], d["title"], d["sha256"]) for d in archive["documents"]] == [
        (document["id"], "Notes", document["sha256"])
    ]
    assert "Charlie" not in json.dumps(archive)


def test_a_chunks_embedding_is_stored_as_a_list_of_floats(alice):
    with tenant_scope(tenant_id=alice.tenant.id):
        document = document_upload(actor=alice.actor, data=TEXT, filename="notes.txt")
        common = {"tenant": alice.tenant, "document": document, "page_start": 1, "page_end": 1}
        Chunk.objects.create(
            index=0, text="Plain", char_start=0, char_end=5, embedding=[0.25, -1, 3e-8], **common
        )
        Chunk.objects.create(index=1, text="notes", char_start=6, char_end=11, **common)
        stored = list(Chunk.objects.filter(document=document).values_list("index", "embedding"))
    assert stored == [(0, [0.25, -1.0, 3e-8]), (1, None)]


def test_an_upload_larger_than_a_request_body_may_be_is_taken(client, alice, settings):
    """Request bodies are capped at DATA_UPLOAD_MAX_MEMORY_SIZE before any view reads
    them (config.middleware); a document upload is capped at the document's own limit."""
    client.force_login(alice.user)
    big = b"word " * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE // 5 + 1000)
    response = upload(client, big, "long.txt")
    assert response.status_code == 201, response.content
    # Any other body that size is still refused, and so is an upload over its limit.
    other = client.patch("/api/v1/tenant", big, content_type="application/json")
    assert other.status_code == 413
    settings.PARLEY_DOCUMENT_MAX_BYTES = len(big) // 2
    assert upload(client, big, "long.txt").status_code == 413


def test_a_text_file_is_stored_as_the_pages_parsing_gives(client, alice):
    """Stored pages are what chunk offsets and quote checks point into: a form feed ends
    a page, Windows line endings become plain ones, as parsing has them."""
    client.force_login(alice.user)
    response = upload(client, b"first page\r\nline two\fsecond page", "two.txt")
    assert response.status_code == 201, response.content
    document = response.json()
    assert document["page_count"] == 2
    page = client.get(f"{URL}/{document['id']}/pages/1").json()
    assert page["text"] == "first page\nline two"
