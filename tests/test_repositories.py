"""Repositories through the documents API: a zip, tar or tar.gz upload, told from its
bytes, becomes a document whose pages are its text files labelled with their paths;
hostile archives are refused with their reason and nothing stored; ingestion cuts
chunks within files; and the Coder's read-only tools list, read, search and outline a
real uploaded repository, never one of another member or tenant."""

from __future__ import annotations

import gzip
import io
import re
import stat
import tarfile
import uuid
import zipfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from agents.context import ToolContext
from documents.archives import ArchiveLimits, archive_files, safe_path
from documents.context import context_build
from documents.ingest import document_ingest
from documents.intake import Refused
from documents.models import Chunk, Document, Page
from documents.retrieval import passages_search
from documents.services import document_upload
from plugins.coding.repo_tools import (
    REPO_SCOPES,
    REPO_TOOLS,
    repo_files,
    repo_outline,
    repo_read,
    repo_search,
)
from plugins.coding.repos import repository_archive_files
from plugins.docreview.reading import RESULT_CHARS
from tenants.rls import operator_scope, tenant_scope

URL = "/api/v1/documents"
PNG = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256))

APP = (
    '"""The shop\'s app."""\n\nimport os\n\n\nclass Cart:\n    """A basket."""\n\n'
    "    def __init__(self):\n        self.items = []\n\n    def add(self, item):\n"
    "        self.items.append(item)\n        return len(self.items)\n\n\n"
    "def checkout(cart):\n    total = sum(i.price for i in cart.items)\n"
    "    return total  # TODO: taxes\n"
)
UTIL = "export function slugify(text: string): string {\n  return text.toLowerCase();\n}\n"
FILES: dict[str, bytes] = {
    "shop/README.md": b"# Shop\n\nA tiny shop to try the coding tools on.\n",
    "shop/src/app.py": APP.encode(),
    "shop/src/util.ts": UTIL.encode(),
    "shop/scripts/run.sh": b"#!/bin/sh\r\necho run\r\n",  # CRLF: read as "\n"
    "shop/logo.png": PNG,  # binary: no page
    "shop/vendor.zip": b"PK\x03\x04" + b"\0" * 40,  # an archive inside: just a binary file
}


# --- archives made in the test ------------------------------------------------------------


def zip_of(files: dict[str, bytes], *, links: dict[str, str] | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            mode = 0o755 if name.endswith(".sh") else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return out.getvalue()


def tar_of(
    files: dict[str, bytes], *, special: list[tarfile.TarInfo] | None = None, gz: bool = False
) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(".sh") else 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in special or []:
            tar.addfile(info)
    return out.getvalue()


def entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def upload(client, data: bytes, name: str = "shop.bin"):
    return client.post(URL, {"file": SimpleUploadedFile(name, data)})


def nothing_stored(folder) -> None:
    with operator_scope():
        assert not Document.objects.exists() and not Page.objects.exists()
    assert not folder.exists() or not any(p.is_file() for p in folder.rglob("*"))


TEXT_PATHS = ["shop/README.md", "shop/scripts/run.sh", "shop/src/app.py", "shop/src/util.ts"]


# --- accepted repositories ----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("make", "media_type"),
    [
        (lambda: zip_of(FILES, links={"shop/latest": "src/app.py"}), "application/zip"),
        (
            lambda: tar_of(FILES, special=[entry("shop/latest", tarfile.SYMTYPE, "src/app.py")]),
            "application/x-tar",
        ),
        (lambda: tar_of(FILES, gz=True), "application/gzip"),
    ],
    ids=["zip", "tar", "tar.gz"],
)
def test_a_repository_upload_becomes_pages_labelled_with_their_paths(
    client, alice, documents_storage, make, media_type
):
    client.force_login(alice.user)
    # The name says nothing: the type comes from the bytes.
    response = upload(client, make(), "shop.pdf")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["media_type"] == media_type
    assert body["page_count"] == len(TEXT_PATHS)
    document_id = body["id"]
    pages = [client.get(f"{URL}/{document_id}/pages/{n}").json() for n in range(1, 5)]
    # Text files only (no PNG, no nested zip, no link), by path, each with its text.
    assert [p["label"] for p in pages] == TEXT_PATHS
    assert pages[2]["text"] == APP and pages[2]["parsed"] is True
    assert pages[1]["text"] == "#!/bin/sh\necho run\n"


@pytest.mark.django_db
def test_a_repository_is_ingested_with_chunks_that_stay_within_a_file(alice, documents_storage):
    # Small files, but each longer than a chunk: chunks must not run across files.
    files = {
        f"lib/module_{n}.py": "".join(
            f"def function_{n}_{k}(value):\n    return value * {k}\n\n" for k in range(40)
        ).encode()
        for n in range(3)
    }
    files["lib/pricing.py"] = b"def zanzibar_discount(price):\n    return price * 0.9\n"
    with tenant_scope(tenant_id=alice.tenant.id, user_id=alice.user.id):
        document = document_upload(actor=alice.actor, data=zip_of(files), filename="lib.zip")
    document_ingest(document_id=document.id, tenant_id=alice.tenant.id)
    with tenant_scope(tenant_id=alice.tenant.id, user_id=alice.user.id):
        document.refresh_from_db()
        assert document.state == Document.State.READY, document.error_message
        labels = list(document.pages.values_list("label", flat=True))
        assert labels == sorted(files)
        chunks = list(Chunk.objects.filter(document=document))
        assert len(chunks) > len(files)
        assert all(c.page_start == c.page_end for c in chunks)
        found = passages_search(
            actor=alice.actor, query="zanzibar_discount", document_ids=[document.id], limit=1
        )
    assert labels[found[0].page_start - 1] == "lib/pricing.py"


def test_the_reader_keeps_modes_plain_paths_and_skips_inner_links():
    data = zip_of({"./pkg//run.sh": b"echo\n", "pkg/a.py": b"x = 1\n"}, links={"pkg/b.py": "a.py"})
    files = archive_files(data, Document.MediaType.ZIP)
    assert [(f.path, f.mode, f.data) for f in files] == [
        ("pkg/run.sh", 0o755, b"echo\n"),
        ("pkg/a.py", 0o644, b"x = 1\n"),
    ]
    setuid = tarfile.TarInfo("tool")
    setuid.mode, setuid.size = 0o4755, 2
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.addfile(setuid, io.BytesIO(b"hi"))
    (tool,) = archive_files(out.getvalue(), Document.MediaType.TAR)
    assert tool.mode == 0o755  # never setuid


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.py", "climbs out"),
        ("a/../../evil.py", "climbs out"),
        ("..\\evil.py", "climbs out"),
        ("/etc/cron.d/evil", "absolute path"),
        ("C:\\Windows\\evil.dll", "absolute path"),
        ("\\\\server\\share\\evil", "absolute path"),
        ("ok/\x1b[31mred", "control characters"),
        ("caf\udce9.py", "not UTF-8"),  # how tarfile keeps a Latin-1 name
        ("x" * 300, "longer than 255"),
    ],
)
def test_unsafe_paths_are_refused(name, reason):
    with pytest.raises(Refused, match=reason):
        safe_path(name)


# --- hostile archives -----------------------------------------------------------------------


def _zip_bomb() -> bytes:
    return zip_of({"src/a.py": b"x = 1\n", "data.txt": b"\0" * 3_000_000})


def _gzip_bomb() -> bytes:
    return tar_of({"src/a.py": b"x = 1\n", "zeros.bin": b"\0" * 3_000_000}, gz=True)


def _encrypted_zip() -> bytes:
    """A zip whose member is marked encrypted (zipfile cannot write encryption): the
    flag in its local header and its directory entry."""
    data = bytearray(zip_of({"secret.py": b"x = 1\n"}))
    for signature, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.index(signature) + at] |= 0x1
    return bytes(data)


HOSTILE = [
    ("zip slip", lambda: zip_of({"../../evil.py": b"x\n"}), 400, "climbs out with '..'"),
    ("tar slip", lambda: tar_of({"ok/../../evil.py": b"x\n"}), 400, "climbs out with '..'"),
    ("absolute zip", lambda: zip_of({"/etc/passwd": b"x\n"}), 400, "absolute path"),
    ("absolute tar", lambda: tar_of({"/etc/passwd": b"x\n"}), 400, "absolute path"),
    ("drive letter", lambda: zip_of({"C:\\evil.bat": b"x\n"}), 400, "absolute path"),
    (
        "zip link out",
        lambda: zip_of({"a.py": b"x\n"}, links={"etc": "/etc"}),
        400,
        "symbolic link that points outside",
    ),
    (
        "tar link out",
        lambda: tar_of({"a.py": b"x\n"}, special=[entry("up", tarfile.SYMTYPE, "../../..")]),
        400,
        "symbolic link that points outside",
    ),
    (
        "hard link",
        lambda: tar_of({"a.py": b"x\n"}, special=[entry("b.py", tarfile.LNKTYPE, "a.py")]),
        400,
        "hard link",
    ),
    (
        "device",
        lambda: tar_of({"a.py": b"x\n"}, special=[entry("dev/sda", tarfile.BLKTYPE)]),
        400,
        "device file",
    ),
    (
        "char device",
        lambda: tar_of({"a.py": b"x\n"}, special=[entry("null", tarfile.CHRTYPE)]),
        400,
        "device file",
    ),
    (
        "fifo",
        lambda: tar_of({"a.py": b"x\n"}, special=[entry("pipe", tarfile.FIFOTYPE)]),
        400,
        "fifo",
    ),
    ("zip bomb", _zip_bomb, 400, "zip bomb"),
    ("gzip bomb", _gzip_bomb, 400, "looks like a bomb"),
    ("too many files", lambda: zip_of({f"f{n}.py": b"x\n" for n in range(6)}), 400, "more than 5"),
    ("too large", lambda: zip_of({"a.py": b"x" * 6000}), 400, "up to 5000 bytes"),
    (
        "too large in all",
        lambda: tar_of({f"f{n}.py": b"x" * 4000 for n in range(4)}),
        400,
        "unpacks to more than 12000",
    ),
    ("twice", lambda: tar_of({"a.py": b"x\n", "./a.py": b"y\n"}), 400, "holds 'a.py' twice"),
    (
        "file and folder",
        lambda: zip_of({"a": b"x\n", "a/b.py": b"y\n"}),
        400,
        "as a file and as a folder",
    ),
    ("encrypted", _encrypted_zip, 400, "encrypted"),
    ("gzip, not tar", lambda: gzip.compress(b"just text\n"), 415, "does not hold a tar"),
    (
        "latin-1 name",
        lambda: tar_of({"caf\udce9.py": b"x\n"}),  # encoded back to its Latin-1 byte
        400,
        "not UTF-8",
    ),
    ("truncated tar.gz", lambda: tar_of({"a.py": b"x\n" * 500}, gz=True)[:60], 400, "gzip"),
    ("binary only", lambda: zip_of({"logo.png": PNG}), 415, "no text file"),
    (
        "spreadsheet",
        lambda: zip_of({"[Content_Types].xml": b"<x/>", "xl/workbook.xml": b"<w/>"}),
        415,
        "other than a Word document",
    ),
]


@pytest.mark.django_db
@pytest.mark.parametrize(("case", "make", "status", "reason"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_archives_are_refused_with_their_reason_and_leave_nothing(
    client, alice, settings, documents_storage, case, make, status, reason
):
    if case in ("too many files", "too large", "too large in all"):
        settings.PARLEY_ARCHIVE_MAX_FILES = 5
        settings.PARLEY_ARCHIVE_MAX_FILE_BYTES = 5000
        settings.PARLEY_ARCHIVE_MAX_BYTES = 12000
    client.force_login(alice.user)
    response = upload(client, make(), "innocent.zip")
    assert response.status_code == status, response.content
    assert reason in response.json()["detail"]
    nothing_stored(documents_storage)


def test_a_zip_bomb_is_refused_before_it_is_unpacked(monkeypatch):
    # The directory says enough: not a byte of the member is read.
    bomb = _zip_bomb()

    def unpacked(*args, **kwargs):
        raise AssertionError("a member was unpacked")

    monkeypatch.setattr(zipfile.ZipFile, "open", unpacked)
    limits = ArchiveLimits(max_files=10, max_bytes=10**9, max_file_bytes=10**9, max_ratio=100)
    with pytest.raises(Refused, match="zip bomb"):
        archive_files(bomb, Document.MediaType.ZIP, limits=limits)


# --- the Coder's tools ---------------------------------------------------------------------


def context(person, *documents: Document) -> ToolContext:
    return ToolContext(
        tenant_id=str(person.tenant.id),
        user_id=str(person.user.id),
        run_id=str(uuid.uuid4()),
        document_ids=tuple(str(d.id) for d in documents),
    )


def call(tool, ctx: ToolContext | None, **arguments) -> str:
    configurable = {"parley_context": ctx} if ctx is not None else {}
    result = tool.invoke(arguments, config={"configurable": configurable})
    assert isinstance(result, str) and len(result) <= RESULT_CHARS, result
    return result


def uploaded(person, data: bytes, filename: str) -> Document:
    with tenant_scope(tenant_id=person.tenant.id, user_id=person.user.id):
        return document_upload(actor=person.actor, data=data, filename=filename)


@pytest.fixture
def shop(alice, documents_storage) -> Document:
    return uploaded(alice, zip_of(FILES), "shop.zip")


@pytest.mark.django_db
def test_the_tools_are_exported_with_the_read_scope():
    names = [t.name for t in REPO_TOOLS]
    assert names == ["repo_files", "repo_read", "repo_search", "repo_outline"]
    assert dict.fromkeys(names, ("documents.read",)) == REPO_SCOPES


@pytest.mark.django_db
def test_repo_files_lists_the_text_files_with_lines(alice, shop):
    result = call(repo_files, context(alice, shop), repository="")
    assert "“shop.zip”" in result and "4 text files" in result
    assert "shop/src/app.py: 19 lines" in result
    assert "shop/scripts/run.sh: 2 lines, 19 chars" in result
    assert "logo.png" not in result
    only = call(repo_files, context(alice, shop), repository="shop", path_prefix="shop/src/")
    assert "2 text files under 'shop/src/'" in only and "README" not in only


@pytest.mark.django_db
def test_repo_read_gives_numbered_lines_and_how_to_read_on(alice, shop):
    ctx = context(alice, shop)
    result = call(repo_read, ctx, repository="", path="shop/src/app.py", start_line=6, end_line=8)
    assert ' 6| class Cart:\n 7|     """A basket."""\n 8| \n' in result
    assert "(Read to line 8 of 19.)" in result
    whole = call(repo_read, ctx, repository="", path="shop/src/app.py")
    assert whole.endswith("(End of the file.)") and "19|     return total" in whole
    missing = call(repo_read, ctx, repository="", path="shop/src/ap.py")
    assert missing.startswith("Error:") and "Did you mean shop/src/app.py" in missing
    beyond = call(repo_read, ctx, repository="", path="shop/src/app.py", start_line=99)
    assert beyond.startswith("Error: shop/src/app.py has 19 lines")


@pytest.mark.django_db
def test_a_long_file_is_read_a_part_at_a_time(alice, documents_storage):
    long = "".join(f"line_{n} = '{'x' * 60}'\n" for n in range(1, 2001)).encode()
    repo = uploaded(alice, tar_of({"big.py": long}), "big.tar")
    ctx = context(alice, repo)
    first = call(repo_read, ctx, repository="", path="big.py")
    read_on = re.search(
        r'\(To read on: repo_read\(repository="\w+", path="big.py", '
        r"start_line=(\d+)\)\.\)$",
        first,
    )
    assert read_on is not None, first[-300:]
    next_line = int(read_on.group(1))
    assert 10 < next_line < 2000
    assert f"{next_line - 1:>4}| line_{next_line - 1} =" in first
    second = call(repo_read, ctx, repository=repo.title, path="big.py", start_line=next_line)
    assert second.split("\n")[1].startswith(f"{next_line:>4}| line_{next_line} =")


@pytest.mark.django_db
def test_repo_search_finds_exact_text_and_regular_expressions(alice, shop):
    ctx = context(alice, shop)
    result = call(repo_search, ctx, repository="", pattern="TODO")
    assert "1 matching lines in 1 files" in result
    assert "shop/src/app.py:19: return total  # TODO: taxes" in result
    # Exact and case sensitive by default; a regular expression on request.
    assert "no line matches" in call(repo_search, ctx, repository="", pattern="todo")
    found = call(repo_search, ctx, repository="", pattern=r"def \w+\(", regex_pattern=True)
    assert "3 matching lines in 1 files" in found and "shop/src/app.py:12:" in found
    bad = call(repo_search, ctx, repository="", pattern="(unclosed", regex_pattern=True)
    assert bad.startswith("Error: the regular expression does not compile")
    assert call(repo_search, ctx, repository="", pattern="").startswith("Error:")


@pytest.mark.django_db
def test_repo_search_caps_its_matches(alice, documents_storage):
    files = {f"m{n}.py": b"needle = 1\n" * 30 for n in range(20)}
    repo = uploaded(alice, zip_of(files), "many.zip")
    result = call(repo_search, context(alice, repo), repository="", pattern="needle")
    assert "600 matching lines in 20 files" in result and "(Showing the first" in result


@pytest.mark.django_db
def test_repo_outline_gives_the_symbols_or_says_why_not(alice, shop):
    ctx = context(alice, shop)
    result = call(repo_outline, ctx, repository="", path="shop/src/app.py")
    assert "class Cart (lines 6-14)\n  method __init__ (lines 9-10)" in result
    assert "function checkout (lines 17-19)" in result
    ts = call(repo_outline, ctx, repository="", path="shop/src/util.ts")
    assert "function slugify (lines 1-3)" in ts
    readme = call(repo_outline, ctx, repository="", path="shop/README.md")
    assert readme.startswith("Error: There is no outline for 'README.md'")


@pytest.mark.django_db
def test_a_listing_too_long_for_one_result_says_how_to_narrow_it(alice, documents_storage):
    files = {f"pkg_{n // 100}/module_with_a_long_name_{n}.py": b"x = 1\n" for n in range(1500)}
    repo = uploaded(alice, zip_of(files), "wide.zip")
    result = call(repo_files, context(alice, repo), repository="")
    assert "1500 text files" in result and "more files: list a folder with path_prefix" in result


@pytest.mark.django_db
def test_the_tools_never_reach_another_members_or_tenants_repository(alice, bob, charlie, shop):
    assert "TODO" in call(repo_search, context(alice), repository="", pattern="TODO")
    for person in (bob, charlie):
        # Named by its id, attached or not: not among theirs.
        for ctx in (context(person, shop), context(person)):
            for tool, arguments in (
                (repo_files, {}),
                (repo_read, {"path": "shop/src/app.py"}),
                (repo_search, {"pattern": "TODO"}),
                (repo_outline, {"path": "shop/src/app.py"}),
            ):
                result = call(tool, ctx, repository=str(shop.id), **arguments)
                assert result.startswith("Error: There are no documents"), result
                assert "Cart" not in result and "TODO" not in result
    assert call(repo_files, None, repository="").startswith("Error: this tool reads")


@pytest.mark.django_db
def test_documents_that_are_not_repositories_are_not_in_play(alice, shop, documents_storage):
    notes = uploaded(alice, b"Plain notes about the shop.\n", "notes.txt")
    result = call(repo_files, context(alice, notes, shop), repository="notes")
    assert result.startswith("Error: No document 'notes' among the 1 repository attached")


@pytest.mark.django_db
def test_a_repositorys_files_are_read_back_whole_for_a_workspace(alice, shop):
    with tenant_scope(tenant_id=alice.tenant.id, user_id=alice.user.id):
        files = {f.path: f for f in repository_archive_files(repository=shop)}
    # Every file, binary ones too, as uploaded (CRLF kept), with its mode.
    assert {path: f.data for path, f in files.items()} == FILES
    assert files["shop/scripts/run.sh"].mode == 0o755
    assert files["shop/src/app.py"].mode == 0o644


@pytest.mark.django_db
def test_a_repository_in_the_prompt_names_each_files_path(alice, shop):
    with tenant_scope(tenant_id=alice.tenant.id, user_id=alice.user.id):
        built = context_build(
            actor=alice.actor,
            documents=[shop],
            question="Where is the cart?",
            context_tokens=32000,
            used_tokens=0,
        )
    assert built.strategy == "whole"
    assert '<page number="3" file="shop/src/app.py">\n"""The shop' in built.system
