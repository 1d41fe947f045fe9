"""API keys for integrators: created by admins, shown once, revocable."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.http import HttpRequest
from ninja import Router, Schema, Status

from config.inputs import Timestamp
from tenants.api.auth import actor_of
from tenants.models import ApiKey
from tenants.services.api_keys import api_key_create, api_key_get, api_key_list, api_key_revoke

router = Router(tags=["api keys"])


class KeyOut(Schema):
    id: uuid.UUID
    name: str
    prefix: str
    scopes: list[str]
    created_by: str | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None

    @staticmethod
    def resolve_created_by(key: ApiKey) -> str | None:
        return key.created_by.get_username() if key.created_by else None


class KeyCreated(KeyOut):
    secret: str  # the whole key; shown this once


class KeyIn(Schema):
    name: str
    scopes: list[str]
    expires_at: Timestamp | None = None


@router.get("", response=list[KeyOut], url_name="api_keys")
def keys_list(request: HttpRequest):
    return api_key_list(actor=actor_of(request))


@router.post("", response={201: KeyCreated}, url_name="api_keys")
def keys_create(request: HttpRequest, payload: KeyIn):
    key, secret = api_key_create(
        actor=actor_of(request),
        name=payload.name,
        scopes=payload.scopes,
        expires_at=payload.expires_at,
    )
    key.secret = secret  # type: ignore[attr-defined]  # for this one response
    return Status(201, key)


@router.get("/{key_id}", response=KeyOut, url_name="api_key")
def keys_get(request: HttpRequest, key_id: str):
    return api_key_get(actor=actor_of(request), key_id=key_id)


@router.delete("/{key_id}", response=KeyOut, url_name="api_key")
def keys_revoke(request: HttpRequest, key_id: str):
    return api_key_revoke(actor=actor_of(request), key_id=key_id)
