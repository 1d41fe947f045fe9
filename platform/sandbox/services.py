"""Writes of workspaces and artifacts, called by the sandboxed tools (on a tool or
sandbox worker, with the run's tenant and member) and by chat when a conversation
goes. A refused write raises `StorageRefused` (a subclass says which rule), whose
`message` is meant to be shown as it is: the tool hands it to the model.

Files are written last inside the transaction and deleted only after it commits, so
a failure leaves rows and files agreeing (at worst a file with no row, never a row
with no file)."""

from __future__ import annotations

import functools
import hashlib
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from sandbox.media import media_type_detect
from sandbox.models import Artifact, Workspace
from sandbox.selectors import tenant_sandbox_used
from sandbox.storage import (
    artifact_file_name,
    file_delete_quietly,
    file_read,
    file_save,
    workspace_file_name,
)
from tenants.models import Tenant, User
from tenants.rls import operator_scope, tenant_scope

log = logging.getLogger(__name__)

NAME_MAX_CHARS = Artifact._meta.get_field("name").max_length or 255


class StorageRefused(Exception):
    """A workspace or artifact was not stored; `message` says why, in words."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class StorageFull(StorageRefused):
    """The tenant's workspaces and artifacts would pass PARLEY_SANDBOX_TENANT_BYTES."""


class ArtifactTooLarge(StorageRefused):
    """One file over PARLEY_SANDBOX_ARTIFACT_BYTES."""


class ArtifactNameRefused(StorageRefused):
    """Not a relative path inside the workspace."""


def _id(value: Any) -> uuid.UUID:
    """A model's id, or the id itself (workers hold ids, requests hold objects)."""
    return uuid.UUID(str(getattr(value, "pk", value)))


def _size_text(size: int) -> str:
    return f"{size} bytes" if size < 2**20 else f"{size / 2**20:.1f} MiB"


def _room_check(*, tenant_id: uuid.UUID, size: int, replacing: uuid.UUID | None = None) -> None:
    """Refuse (StorageFull) what would pass the tenant's cap. Holds the tenant's row
    until the transaction ends: one write at a time per tenant, so the cap holds."""
    Tenant.objects.select_for_update().filter(id=tenant_id).first()
    cap = settings.PARLEY_SANDBOX_TENANT_BYTES
    used = tenant_sandbox_used(tenant_id=tenant_id, except_workspace_of=replacing)
    if used + size > cap:
        raise StorageFull(
            f"Not stored: your organization's sandbox storage is full ({_size_text(used)} "
            f"of {_size_text(cap)} used by workspaces and files, and this is "
            f"{_size_text(size)}). Delete files from the workspace, or old conversations, "
            "to make room."
        )


@contextmanager
def _files_removed_on_error(written: list[str]) -> Iterator[None]:
    """Around a transaction that writes files last: if it raises, or its commit does,
    the files written go again (a row rolled back never leaves its file behind)."""
    try:
        yield
    except BaseException:
        for name in written:
            file_delete_quietly(name)
        raise


# --- workspaces -----------------------------------------------------------------------


def workspace_load(*, tenant: Tenant | uuid.UUID | str, conversation_id: Any) -> bytes | None:
    """The conversation's workspace archive (a tar), or None when it has none (never
    saved, expired, or deleted). Loading counts as using it: its TTL starts again."""
    tenant_id, conversation = _id(tenant), _id(conversation_id)
    with tenant_scope(tenant_id=tenant_id):
        workspace = Workspace.objects.filter(
            tenant_id=tenant_id, conversation_id=conversation
        ).first()
        if workspace is None:
            return None
        Workspace.objects.filter(id=workspace.id).update(last_used_at=timezone.now())
    try:
        return file_read(workspace.file_name)
    except FileNotFoundError:
        log.warning("sandbox: the archive of workspace %s is missing", workspace.id)
        return None


def workspace_save(
    *,
    tenant: Tenant | uuid.UUID | str,
    owner: User | uuid.UUID | str,
    conversation_id: Any,
    archive: bytes,
) -> Workspace:
    """Keep `archive` (a tar) as the conversation's workspace, replacing the one
    before. Refused (StorageFull, nothing changed) past the tenant's cap."""
    tenant_id, owner_id, conversation = _id(tenant), _id(owner), _id(conversation_id)
    size = len(archive)
    name = workspace_file_name(tenant_id=tenant_id)
    replaced = ""
    written: list[str] = []
    with _files_removed_on_error(written), tenant_scope(tenant_id=tenant_id), transaction.atomic():
        _room_check(tenant_id=tenant_id, size=size, replacing=conversation)
        workspace = (
            Workspace.objects.select_for_update()
            .filter(tenant_id=tenant_id, conversation_id=conversation)
            .first()
        )
        if workspace is None:
            workspace = Workspace(
                tenant_id=tenant_id, owner_id=owner_id, conversation_id=conversation
            )
        else:
            replaced = workspace.file_name
        workspace.file_name = name
        workspace.size_bytes = size
        workspace.last_used_at = timezone.now()
        workspace.save()
        written.append(name)  # (a fresh uuid: never another's file)
        file_save(name=name, data=archive)
        if replaced:
            transaction.on_commit(lambda: file_delete_quietly(replaced))
    return workspace


def workspace_delete(*, tenant: Tenant | uuid.UUID | str, conversation_id: Any) -> bool:
    """Delete the conversation's workspace (its row, and its file once that is
    committed). Whether there was one."""
    tenant_id = _id(tenant)
    with tenant_scope(tenant_id=tenant_id), transaction.atomic():
        workspace = Workspace.objects.filter(
            tenant_id=tenant_id, conversation_id=_id(conversation_id)
        ).first()
        if workspace is None:
            return False
        name = workspace.file_name
        workspace.delete()
        transaction.on_commit(lambda: file_delete_quietly(name))
    return True


def workspaces_expire(*, now: datetime | None = None) -> int:
    """Delete the workspaces no run used for PARLEY_SANDBOX_WORKSPACE_TTL_S (rows and
    files); how many. Run by Celery beat (sandbox.tasks.workspaces_expire) and by a
    thread of `serve` in the embedded mode."""
    now = now or timezone.now()
    before = now - timedelta(seconds=settings.PARLEY_SANDBOX_WORKSPACE_TTL_S)
    with operator_scope():
        found = list(
            Workspace.objects.filter(last_used_at__lt=before).values_list("id", "tenant_id")
        )
    expired = 0
    for workspace_id, tenant_id in found:
        with tenant_scope(tenant_id=tenant_id), transaction.atomic():
            # (Looked at again under the lock: a run may have used it meanwhile.)
            workspace = (
                Workspace.objects.select_for_update()
                .filter(id=workspace_id, last_used_at__lt=before)
                .first()
            )
            if workspace is None:
                continue
            workspace.delete()
            transaction.on_commit(functools.partial(file_delete_quietly, workspace.file_name))
        expired += 1
    if expired:
        log.info("sandbox: %d workspaces unused since %s deleted", expired, before.isoformat())
    return expired


# --- artifacts ------------------------------------------------------------------------


def artifact_name_clean(name: str) -> str:
    """The artifact's name as stored: a relative path inside the workspace, with
    forward slashes. Refused (ArtifactNameRefused): absolute, `..`, empty, control
    characters, too long."""
    cleaned = str(name).replace("\\", "/")
    while cleaned.startswith("./"):
        cleaned = cleaned[2:]
    parts = [part for part in cleaned.split("/") if part not in ("", ".")]
    if (
        not parts
        or cleaned.startswith("/")
        or ".." in parts
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in cleaned)
        or len("/".join(parts)) > NAME_MAX_CHARS
    ):
        raise ArtifactNameRefused(
            f"Not stored: {name[:100]!r} is not a file name inside the workspace (a relative "
            f"path of at most {NAME_MAX_CHARS} characters, without '..')."
        )
    return "/".join(parts)


def artifact_create(
    *,
    tenant: Tenant | uuid.UUID | str,
    owner: User | uuid.UUID | str,
    conversation_id: Any,
    run_id: Any = None,
    name: str,
    data: bytes,
) -> Artifact:
    """Store a file a run produced. Refused (a StorageRefused, nothing stored): a bad
    name, over PARLEY_SANDBOX_ARTIFACT_BYTES, or past the tenant's cap."""
    tenant_id, owner_id = _id(tenant), _id(owner)
    clean = artifact_name_clean(name)
    size = len(data)
    limit = settings.PARLEY_SANDBOX_ARTIFACT_BYTES
    if size > limit:
        raise ArtifactTooLarge(
            f"Not stored: {clean} is {_size_text(size)}; a file kept from a run may be up "
            f"to {_size_text(limit)}."
        )
    written: list[str] = []
    with _files_removed_on_error(written), tenant_scope(tenant_id=tenant_id), transaction.atomic():
        _room_check(tenant_id=tenant_id, size=size)
        artifact = Artifact(
            tenant_id=tenant_id,
            owner_id=owner_id,
            conversation_id=_id(conversation_id),
            run_id=_id(run_id) if run_id else None,
            name=clean,
            media_type=media_type_detect(data, name=clean),
            size_bytes=size,
            sha256=hashlib.sha256(data).hexdigest(),
        )
        artifact.file_name = artifact_file_name(tenant_id=tenant_id, artifact_id=artifact.id)
        artifact.save()
        written.append(artifact.file_name)
        file_save(name=artifact.file_name, data=data)
    return artifact


def artifact_ref(artifact: Artifact) -> dict[str, Any]:
    """What a tool step lists of an artifact (chat shows it with the answer)."""
    return {
        "id": str(artifact.id),
        "name": artifact.name,
        "media_type": artifact.media_type,
        "size": artifact.size_bytes,
    }


# --- a conversation going -------------------------------------------------------------


def conversation_files_delete(*, tenant: Tenant | uuid.UUID | str, conversation_id: Any) -> int:
    """Delete the conversation's workspace and artifacts: rows now, files once that is
    committed (chat calls it inside the conversation's deletion). How many files."""
    tenant_id, conversation = _id(tenant), _id(conversation_id)
    with tenant_scope(tenant_id=tenant_id), transaction.atomic():
        workspaces = Workspace.objects.filter(tenant_id=tenant_id, conversation_id=conversation)
        artifacts = Artifact.objects.filter(tenant_id=tenant_id, conversation_id=conversation)
        names = [
            *workspaces.values_list("file_name", flat=True),
            *artifacts.values_list("file_name", flat=True),
        ]
        workspaces.delete()
        artifacts.delete()

        def delete_files() -> None:
            for name in names:
                file_delete_quietly(name)

        transaction.on_commit(delete_files)
    return len(names)
