"""Where workspaces and artifacts live: Django's `sandbox` storage (settings.STORAGES),
a folder or the documents' S3-compatible bucket under a prefix of its own. Names are
`<tenant id>/workspaces/<uuid>.tar` and `<tenant id>/artifacts/<artifact id>`, so a
tenant's files can be found, and removed, without the database."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages

log = logging.getLogger(__name__)

KINDS = ("workspaces", "artifacts")


def sandbox_storage() -> Storage:
    return storages["sandbox"]


def _tenant_folder(tenant_id: Any) -> str:
    return str(uuid.UUID(str(tenant_id)))


def workspace_file_name(*, tenant_id: Any) -> str:
    """A fresh name for a workspace archive (each save writes a new file)."""
    return f"{_tenant_folder(tenant_id)}/workspaces/{uuid.uuid4()}.tar"


def artifact_file_name(*, tenant_id: Any, artifact_id: Any) -> str:
    return f"{_tenant_folder(tenant_id)}/artifacts/{uuid.UUID(str(artifact_id))}"


def file_save(*, name: str, data: bytes) -> str:
    """Store the bytes under `name` (a new name: nothing is overwritten)."""
    saved = sandbox_storage().save(name, ContentFile(data))
    if saved != name:  # the storage chose another name: the name was taken
        sandbox_storage().delete(saved)
        raise FileExistsError(name)
    return saved


def file_read(name: str) -> bytes:
    with sandbox_storage().open(name, "rb") as file:
        return file.read()


def file_delete(name: str) -> None:
    sandbox_storage().delete(name)


def file_delete_quietly(name: str) -> None:
    """For after a commit: the row is gone already, a file left over is logged."""
    try:
        file_delete(name)
    except Exception:
        log.exception("sandbox: could not delete the file %s", name)


def tenant_files_delete(tenant_id: Any) -> int:
    """Delete every workspace and artifact file of the tenant; the number deleted."""
    storage = sandbox_storage()
    folder = _tenant_folder(tenant_id)
    count = 0
    for kind in KINDS:
        try:
            _, files = storage.listdir(f"{folder}/{kind}")
        except FileNotFoundError:
            continue
        for name in files:
            storage.delete(f"{folder}/{kind}/{name}")
        count += len(files)
    for empty in (*(f"{folder}/{kind}" for kind in KINDS), folder):
        try:
            os.rmdir(storage.path(empty))
        except NotImplementedError:  # a bucket: prefixes vanish with their last file
            break
        except FileNotFoundError:
            continue
        except OSError:
            log.warning("sandbox: could not remove the folder %s", empty)
    return count
