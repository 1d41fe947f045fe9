"""The tenant's OpenID Connect single sign-on: read and configure (owners and admins).
The client secret goes in, never out: answers say only whether one is stored."""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.http import HttpRequest
from django.urls import reverse
from ninja import Field, Router, Schema

from tenants.api.auth import actor_of
from tenants.models import Role, TenantSSO
from tenants.services.sso import sso_configure, sso_get

router = Router(tags=["single sign-on"])


class SSOOut(Schema):
    enabled: bool
    issuer: str
    client_id: str
    client_secret_set: bool
    allowed_domains: list[str]
    auto_provision: bool
    provision_role: str
    # Register this redirect URI with the identity provider.
    redirect_uri: str
    # Where members start a sign-in (the login page also offers it).
    login_url: str
    updated_at: datetime


class SSOIn(Schema):
    enabled: bool = False
    issuer: str
    client_id: str
    # Leave out (or null) to keep the stored secret.
    client_secret: str | None = None
    allowed_domains: list[str] = Field(default_factory=list)
    auto_provision: bool = False
    provision_role: str = Role.MEMBER


def _out(config: TenantSSO) -> dict:
    public = settings.PARLEY_PUBLIC_URL
    return {
        "enabled": config.enabled,
        "issuer": config.issuer,
        "client_id": config.client_id,
        "client_secret_set": config.has_secret,
        "allowed_domains": config.allowed_domains,
        "auto_provision": config.auto_provision,
        "provision_role": config.provision_role,
        "redirect_uri": public + reverse("sso_callback"),
        "login_url": public + reverse("sso_login", args=[config.tenant.slug]),
        "updated_at": config.updated_at,
    }


@router.get("", response=SSOOut, url_name="sso")
def sso_read(request: HttpRequest):
    return _out(sso_get(actor=actor_of(request)))


@router.put("", response=SSOOut, url_name="sso")
def sso_update(request: HttpRequest, payload: SSOIn):
    config = sso_configure(
        actor=actor_of(request),
        enabled=payload.enabled,
        issuer=payload.issuer,
        client_id=payload.client_id,
        client_secret=payload.client_secret,
        allowed_domains=payload.allowed_domains,
        auto_provision=payload.auto_provision,
        provision_role=payload.provision_role,
    )
    return _out(config)
