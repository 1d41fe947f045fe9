"""Where document files live: Django's `documents` storage (settings.STORAGES), a
folder or an S3-compatible bucket. A file is named `<tenant id>/<document id>`, so
a tenant's files can be found, and removed, without the database."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from django.core.files.base import ContentFile
from django.core.files.storage import Storage, storages

log = logging.getLogger(__name__)


def document_storage() -> Storage:
    return storages["documents"]


def file_name_for(*, tenant_id: Any, document_id: Any) -> str:
    return f"{uuid.UUID(str(tenant_id))}/{uuid.UUID(str(document_id))}"


def file_save(*, name: str, data: bytes) -> str:
    """Store the bytes under `name` (a new name: nothing is overwritten)."""
    saved = document_storage().save(name, ContentFile(data))
    if saved != name:  # the storage chose another name: the name was taken
        document_storage().delete(saved)
        raise FileExistsError(name)
    return saved


def file_read(name: str) -> bytes:
    with document_storage().open(name, "rb") as file:
        return file.read()


def file_delete(name: str) -> None:
    document_storage().delete(name)


def tenant_files_delete(tenant_id: Any) -> int:
    """Delete every file of the tenant; the number deleted."""
    storage = document_storage()
    folder = str(uuid.UUID(str(tenant_id)))
    try:
        _, files = storage.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in files:
        storage.delete(f"{folder}/{name}")
    try:
        on_disk = storage.path(folder)
    except NotImplementedError:  # a bucket: prefixes vanish with their last file
        return len(files)
    try:
        os.rmdir(on_disk)
    except OSError:
        log.warning("documents: could not remove the folder of tenant %s", folder)
    return len(files)
