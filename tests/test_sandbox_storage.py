"""Sandbox storage: a conversation's workspace between runs (round trip, the tenant's
cap, expiry), the files runs produce (artifacts: stored, listed, read, downloaded
under the conversation's access rules), and what goes when a conversation or a
tenant does."""

from __future__ import annotations

import io
import tarfile
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from sandbox.media import media_type_detect
from sandbox.models import Artifact, Workspace
from sandbox.services import (
    ArtifactNameRefused,
    ArtifactTooLarge,
    StorageFull,
    StorageRefused,
    artifact_create,
    artifact_ref,
    conversation_files_delete,
    workspace_delete,
    workspace_load,
    workspace_save,
    workspaces_expire,
)
from tenants.models import Tenant
from tenants.rls import operator_scope, tenant_scope
from tenants.services.api_keys import api_key_create
from tests.factories import ConversationFactory, MessageFactory

pytestmark = pytest.mark.django_db

URL = "/api/v1/artifacts"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"\x00" * 40
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><script>x()</script></svg>'


@pytest.fixture(autouse=True)
def files(sandbox_storage):
    return sandbox_storage


def stored_files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def tar_of(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def tar_entries(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}  # type: ignore[union-attr]


def conversation_of(person):
    return ConversationFactory(tenant=person.tenant, user=person.user, title="Analysis")


def artifact_of(person, *, name="plot.png", data=PNG, conversation=None) -> Artifact:
    conversation = conversation or conversation_of(person)
    return artifact_create(
        tenant=person.tenant,
        owner=person.user,
        conversation_id=conversation.id,
        run_id=uuid.uuid4(),
        name=name,
        data=data,
    )


# --- workspaces ----------------------------------------------------------------------------


def test_a_workspace_round_trips_and_a_save_replaces_its_archive(
    alice, files, django_capture_on_commit_callbacks
):
    conversation = conversation_of(alice)
    assert workspace_load(tenant=alice.tenant, conversation_id=conversation.id) is None
    first = tar_of({"data.csv": b"a,b\n1,2\n"})
    workspace_save(
        tenant=alice.tenant, owner=alice.user, conversation_id=conversation.id, archive=first
    )
    assert workspace_load(tenant=alice.tenant.id, conversation_id=str(conversation.id)) == first
    [old_file] = stored_files(files)
    assert old_file.startswith(f"{alice.tenant.id}/workspaces/")

    second = tar_of({"data.csv": b"a,b\n1,2\n", "model.py": b"print(1)\n"})
    with (
        django_capture_on_commit_callbacks(execute=True),
        tenant_scope(tenant_id=alice.tenant.id),
    ):
        saved = workspace_save(
            tenant=alice.tenant.id,
            owner=alice.user.id,
            conversation_id=conversation.id,
            archive=second,
        )
    assert tar_entries(workspace_load(tenant=alice.tenant, conversation_id=conversation.id)) == {
        "data.csv": b"a,b\n1,2\n",
        "model.py": b"print(1)\n",
    }
    # One row, one file: the archive before is gone once the save committed.
    with operator_scope():
        assert Workspace.objects.count() == 1
        assert Workspace.objects.get().size_bytes == len(second)
    assert stored_files(files) == [saved.file_name] != [old_file]


def test_another_tenants_workspace_is_not_loaded(alice, charlie):
    conversation = conversation_of(alice)
    workspace_save(
        tenant=alice.tenant,
        owner=alice.user,
        conversation_id=conversation.id,
        archive=tar_of({"secret.txt": b"alice"}),
    )
    assert workspace_load(tenant=charlie.tenant, conversation_id=conversation.id) is None


def test_the_tenant_cap_refuses_a_save_with_a_clear_message(settings, alice, charlie, files):
    settings.PARLEY_SANDBOX_TENANT_BYTES = 12_000
    conversation = conversation_of(alice)
    small = tar_of({"a.txt": b"x" * 100})  # a tar takes 10240 bytes at least
    assert len(small) == 10240
    workspace_save(
        tenant=alice.tenant, owner=alice.user, conversation_id=conversation.id, archive=small
    )
    artifact_of(alice, name="notes.txt", data=b"y" * 1000)  # 11240 bytes used
    before = stored_files(files)
    with pytest.raises(StorageFull) as refused:
        artifact_of(alice, name="more.txt", data=b"z" * 1000)
    assert refused.value.message == (
        "Not stored: your organization's sandbox storage is full (11240 bytes of 12000 "
        "bytes used by workspaces and files, and this is 1000 bytes). Delete files from "
        "the workspace, or old conversations, to make room."
    )
    assert stored_files(files) == before
    # Replacing the workspace counts its new size, not the old one as well.
    workspace_save(
        tenant=alice.tenant,
        owner=alice.user,
        conversation_id=conversation.id,
        archive=tar_of({"b.txt": b"x" * 200}),
    )
    before = stored_files(files)
    with pytest.raises(StorageFull):
        workspace_save(
            tenant=alice.tenant,
            owner=alice.user,
            conversation_id=conversation_of(alice).id,
            archive=small,
        )
    assert stored_files(files) == before
    with operator_scope():
        assert Workspace.objects.filter(tenant=alice.tenant).count() == 1
        assert Artifact.objects.filter(tenant=alice.tenant).count() == 1
    # Another tenant has a cap of its own.
    workspace_save(
        tenant=charlie.tenant,
        owner=charlie.user,
        conversation_id=conversation_of(charlie).id,
        archive=small,
    )


def test_a_write_that_fails_after_its_file_leaves_no_file_and_no_row(alice, files, monkeypatch):
    from sandbox import services

    written = services.file_save

    def write_then_fail(*, name, data):
        written(name=name, data=data)
        raise OSError("the disk went away")

    monkeypatch.setattr(services, "file_save", write_then_fail)
    conversation = conversation_of(alice)
    with pytest.raises(OSError):
        artifact_of(alice, name="a.txt", data=b"abc", conversation=conversation)
    with pytest.raises(OSError):
        workspace_save(
            tenant=alice.tenant,
            owner=alice.user,
            conversation_id=conversation.id,
            archive=tar_of({}),
        )
    assert stored_files(files) == []
    with operator_scope():
        assert not Artifact.objects.exists() and not Workspace.objects.exists()


def test_unused_workspaces_expire_with_their_files(
    settings, alice, charlie, files, django_capture_on_commit_callbacks
):
    settings.PARLEY_SANDBOX_WORKSPACE_TTL_S = 3600
    old, fresh = conversation_of(alice), conversation_of(charlie)
    for person, conversation in ((alice, old), (charlie, fresh)):
        workspace_save(
            tenant=person.tenant,
            owner=person.user,
            conversation_id=conversation.id,
            archive=tar_of({"f": b"1"}),
        )
    with operator_scope():
        Workspace.objects.filter(conversation_id=old.id).update(
            last_used_at=timezone.now() - timedelta(hours=2)
        )
        kept = Workspace.objects.get(conversation_id=fresh.id).file_name
    with django_capture_on_commit_callbacks(execute=True):
        assert workspaces_expire() == 1
    assert stored_files(files) == [kept]
    with operator_scope():
        assert list(Workspace.objects.values_list("conversation_id", flat=True)) == [fresh.id]
    # Loading counts as use: a workspace loaded now is not expired an hour and a half on.
    workspace_load(tenant=charlie.tenant, conversation_id=fresh.id)
    later = timezone.now() + timedelta(minutes=30)
    assert workspaces_expire(now=later) == 0
    assert workspaces_expire(now=later + timedelta(hours=1)) == 1
    assert workspace_load(tenant=charlie.tenant, conversation_id=fresh.id) is None


def test_workspace_delete(alice, files, django_capture_on_commit_callbacks):
    conversation = conversation_of(alice)
    workspace_save(
        tenant=alice.tenant,
        owner=alice.user,
        conversation_id=conversation.id,
        archive=tar_of({"f": b"1"}),
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert workspace_delete(tenant=alice.tenant, conversation_id=conversation.id) is True
    assert stored_files(files) == []
    assert workspace_delete(tenant=alice.tenant, conversation_id=conversation.id) is False


# --- artifacts -----------------------------------------------------------------------------


def test_an_artifact_is_stored_with_its_type_from_the_content(alice, files):
    artifact = artifact_of(alice, name="./figures/plot.jpg", data=PNG)  # a PNG named .jpg
    assert artifact.name == "figures/plot.jpg"
    assert artifact.media_type == "image/png"
    assert artifact.size_bytes == len(PNG)
    assert stored_files(files) == [f"{alice.tenant.id}/artifacts/{artifact.id}"]
    assert artifact_ref(artifact) == {
        "id": str(artifact.id),
        "name": "figures/plot.jpg",
        "media_type": "image/png",
        "size": len(PNG),
    }


@pytest.mark.parametrize(
    ("data", "name", "expected"),
    [
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, "a.png", "image/jpeg"),
        (b"GIF89a" + b"\x00" * 20, "a", "image/gif"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 20, "a", "image/webp"),
        (SVG, "chart.png", "image/svg+xml"),
        (b"%PDF-1.7\n", "report", "application/pdf"),
        (b"a,b\n1,2\n", "table.csv", "text/csv"),
        (b"<html><script>alert(1)</script></html>", "page.png", "text/plain"),
        (b"\x7fELF\x02\x01\x01" + b"\x00" * 20, "tool", "application/octet-stream"),
    ],
)
def test_media_types_come_from_the_content(data, name, expected):
    assert media_type_detect(data, name=name) == expected


@pytest.mark.parametrize("name", ["", "/etc/passwd", "../outside.txt", "a/../../b", "a\x00b", "."])
def test_artifact_names_outside_the_workspace_are_refused(alice, files, name):
    with pytest.raises(ArtifactNameRefused) as refused:
        artifact_of(alice, name=name)
    assert "not a file name inside the workspace" in refused.value.message
    assert stored_files(files) == []


def test_an_artifact_over_the_size_limit_is_refused(settings, alice, files):
    settings.PARLEY_SANDBOX_ARTIFACT_BYTES = 10
    with pytest.raises(ArtifactTooLarge) as refused:
        artifact_of(alice, name="big.bin", data=b"x" * 11)
    assert isinstance(refused.value, StorageRefused)
    assert refused.value.message == (
        "Not stored: big.bin is 11 bytes; a file kept from a run may be up to 10 bytes."
    )
    assert stored_files(files) == []


def test_the_owner_lists_reads_and_downloads_artifacts(client, alice):
    conversation = conversation_of(alice)
    image = artifact_of(alice, conversation=conversation)
    table = artifact_of(alice, name="out/table.csv", data=b"a,b\n1,2\n", conversation=conversation)
    artifact_of(alice)  # another conversation's
    client.force_login(alice.user)

    listed = client.get(URL, {"conversation": str(conversation.id)})
    assert listed.status_code == 200, listed.content
    assert [(a["id"], a["name"]) for a in listed.json()] == [
        (str(image.id), "plot.png"),
        (str(table.id), "out/table.csv"),
    ]
    one = client.get(f"{URL}/{table.id}").json()
    assert one["media_type"] == "text/csv" and one["size_bytes"] == 8
    assert one["conversation_id"] == str(conversation.id)
    assert one["sha256"] == table.sha256

    shown = client.get(f"{URL}/{image.id}/content")
    assert shown.status_code == 200
    assert shown.content == PNG
    assert shown["Content-Type"] == "image/png"
    assert shown["Content-Disposition"] == 'inline; filename="plot.png"'
    assert shown["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in shown["Content-Security-Policy"]
    assert "default-src 'none'" in shown["Content-Security-Policy"]

    downloaded = client.get(f"{URL}/{table.id}/content")
    assert downloaded.content == b"a,b\n1,2\n"
    assert downloaded["Content-Disposition"] == 'attachment; filename="table.csv"'


def test_svg_and_html_are_never_served_inline(client, alice):
    svg = artifact_of(alice, name="chart.svg", data=SVG)
    page = artifact_of(alice, name="report.html", data=b"<html><script>x()</script></html>")
    client.force_login(alice.user)
    for artifact, media_type in ((svg, "image/svg+xml"), (page, "text/plain")):
        response = client.get(f"{URL}/{artifact.id}/content")
        assert response.status_code == 200
        assert response["Content-Type"] == media_type
        assert response["Content-Disposition"].startswith("attachment;")
        assert response["X-Content-Type-Options"] == "nosniff"


def test_another_member_and_another_tenant_get_404(client, alice, bob, charlie):
    artifact = artifact_of(alice)
    for person in (bob, charlie):
        client.force_login(person.user)
        for path in (f"{URL}/{artifact.id}", f"{URL}/{artifact.id}/content"):
            response = client.get(path)
            assert response.status_code == 404, (person.user.username, path)
            assert b"plot" not in response.content
        listed = client.get(URL, {"conversation": str(artifact.conversation_id)})
        assert listed.status_code == 200 and listed.json() == []
    client.force_login(alice.user)
    assert client.get(f"{URL}/not-an-id").status_code == 404
    assert client.get(f"{URL}/{uuid.uuid4()}/content").status_code == 404


def _key(person, scopes: list[str]) -> str:
    with tenant_scope(tenant_id=person.tenant.id):
        _, secret = api_key_create(actor=person.actor, name="-".join(scopes), scopes=scopes)
    return secret


def test_api_keys_need_the_chat_scope(client, alice):
    artifact = artifact_of(alice)
    refused = client.get(
        f"{URL}/{artifact.id}", HTTP_AUTHORIZATION=f"Bearer {_key(alice, ['documents'])}"
    )
    assert refused.status_code == 403
    assert "chat" in refused.json()["detail"]
    allowed = client.get(
        f"{URL}/{artifact.id}/content", HTTP_AUTHORIZATION=f"Bearer {_key(alice, ['chat'])}"
    )
    assert allowed.status_code == 200 and allowed.content == PNG


def test_without_credentials_the_answer_is_401(client, alice):
    artifact = artifact_of(alice)
    assert client.get(f"{URL}/{artifact.id}/content").status_code == 401


# --- what goes with a conversation or a tenant ---------------------------------------------


def test_deleting_a_conversation_deletes_its_workspace_and_artifacts(
    client, alice, files, django_capture_on_commit_callbacks
):
    conversation, other = conversation_of(alice), conversation_of(alice)
    workspace_save(
        tenant=alice.tenant,
        owner=alice.user,
        conversation_id=conversation.id,
        archive=tar_of({"f": b"1"}),
    )
    artifact_of(alice, conversation=conversation)
    kept = artifact_of(alice, conversation=other)
    client.force_login(alice.user)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.delete(f"/api/v1/conversations/{conversation.id}")
    assert response.status_code == 204, response.content
    assert stored_files(files) == [kept.file_name]
    with operator_scope():
        assert not Workspace.objects.exists()
        assert list(Artifact.objects.values_list("id", flat=True)) == [kept.id]


def test_conversation_files_delete_keeps_files_until_the_commit(
    alice, files, django_capture_on_commit_callbacks
):
    from django.db import transaction

    artifact = artifact_of(alice)
    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        conversation_files_delete(tenant=alice.tenant, conversation_id=artifact.conversation_id)
        raise RuntimeError("a later step failed")
    assert stored_files(files) == [artifact.file_name]


def test_deleting_a_tenant_deletes_its_files(
    client, alice, charlie, files, django_capture_on_commit_callbacks
):
    conversation = conversation_of(alice)
    workspace_save(
        tenant=alice.tenant,
        owner=alice.user,
        conversation_id=conversation.id,
        archive=tar_of({"f": b"1"}),
    )
    artifact_of(alice, conversation=conversation)
    kept = artifact_of(charlie)
    with operator_scope():
        Tenant.objects.filter(id=alice.tenant.id).update(last_exported_at=timezone.now())
    client.force_login(alice.user)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/api/v1/tenant/delete", {"confirm": alice.tenant.slug}, content_type="application/json"
        )
    assert response.status_code == 204, response.content
    assert stored_files(files) == [kept.file_name]
    assert not (files / str(alice.tenant.id)).exists()
    with operator_scope():
        assert not Workspace.objects.exists()
        assert list(Artifact.objects.values_list("id", flat=True)) == [kept.id]


def test_the_tenant_export_lists_its_artifacts(client, alice, charlie):
    artifact = artifact_of(alice)
    artifact_of(charlie, name="charlies.png")
    client.force_login(alice.user)
    archive = client.get("/api/v1/tenant/export").json()
    assert [(a["id"], a["name"]) for a in archive["artifacts"]] == [(str(artifact.id), "plot.png")]
    assert "charlies" not in str(archive)


# --- the steps that list them ---------------------------------------------------------------


def test_a_tool_steps_artifacts_are_kept_and_served_with_the_message():
    from chat.schemas import ToolStepOut
    from chat.steps import tool_steps

    ref = {"id": str(uuid.uuid4()), "name": "plot.png", "media_type": "image/png", "size": 10}
    steps = tool_steps(
        [
            {"type": "tool.start", "call_id": "c1", "name": "run_code", "arguments": {}},
            {"type": "tool.end", "call_id": "c1", "name": "run_code", "result": "ok"},
            {"type": "tool.start", "call_id": "c2", "name": "run_code", "arguments": {}},
            {
                "type": "tool.end",
                "call_id": "c2",
                "name": "run_code",
                "result": "",
                "artifacts": [ref],
            },
        ]
    )
    assert "artifacts" not in steps[0] and steps[1]["artifacts"] == [ref]
    assert ToolStepOut.model_validate(steps[0]).artifacts == []
    assert ToolStepOut.model_validate(steps[1]).model_dump(mode="json")["artifacts"] == [ref]


def test_the_markdown_export_names_a_steps_files(client, alice):
    conversation = conversation_of(alice)
    artifact = artifact_of(alice, conversation=conversation)
    question = MessageFactory(conversation=conversation, content="Plot it")
    MessageFactory(
        parent=question,
        role="assistant",
        content="Here is the plot.",
        steps=[
            {
                "call_id": "c1",
                "name": "run_code",
                "arguments": {"code": "plot()"},
                "result": "",
                "error": None,
                "truncated": False,
                "artifacts": [artifact_ref(artifact)],
            }
        ],
    )
    client.force_login(alice.user)
    tree = client.get(f"/api/v1/conversations/{conversation.id}/messages").json()
    [answer] = [m for m in tree["messages"] if m["role"] == "assistant"]
    assert answer["steps"][0]["artifacts"] == [artifact_ref(artifact)]
    text = client.get(f"/api/v1/conversations/{conversation.id}/export").content.decode()
    assert f"File: `plot.png` ({len(PNG)} bytes)" in text
