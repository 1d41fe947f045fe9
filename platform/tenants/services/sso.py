"""OpenID Connect single sign-on, configured per tenant (model TenantSSO).

The sign-in (views in tenants.auth_views):

1. `sso_login_start`: the tenant's configuration, found by the tenant's slug (a narrow
   operator lookup: the tenant is not known yet), the provider's discovery document
   (`<issuer>/.well-known/openid-configuration`), and an authorization URL carrying a
   state, a nonce and a PKCE (S256) challenge. The view keeps the pending sign-in
   (state, nonce, verifier, tenant) in the browser's session: the callback must come
   back to the same browser.
2. `sso_login_finish`: the callback's state must equal the pending one; the code is
   exchanged at the token endpoint with the client secret and the PKCE verifier; the
   ID token's signature is checked against the provider's published keys (JWKS) and
   its issuer, audience, nonce and expiry against what this sign-in expects; its
   verified email then finds the user (or, with auto-provisioning, creates them) and
   their membership.

A tenant's identity provider is controlled by that tenant's admins, so it may assert
any email address. It therefore never signs in platform staff, nor an account that
also belongs to another tenant (that would open the other tenant's data to it).
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import requests
from authlib.common.security import generate_token
from authlib.integrations.requests_client import OAuth2Session, OAuthError
from authlib.oidc.core import CodeIDToken
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    DecodeError,
    ExpiredTokenError,
    InvalidKeyIdError,
    JoseError,
)
from joserfc.jwk import KeySet

from tenants.access import Actor, NotFound, require_role
from tenants.crypto import DecryptionError, decrypt, encrypt
from tenants.models import Membership, Role, Tenant, TenantSSO, User
from tenants.rls import operator_scope, tenant_scope
from tenants.services.audit import audit_record

logger = logging.getLogger(__name__)

SCOPE = "openid email profile"
# A sign-in must come back from the provider within this time.
PENDING_MAX_AGE_S = 600
# Clock skew tolerated on the ID token's exp / iat / nbf.
ID_TOKEN_LEEWAY_S = 60
# Asymmetric algorithms only: "none" and HMAC (keyed with the client secret) are refused.
SIGNING_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
PROVISION_ROLES = (Role.MEMBER, Role.ADMIN)
_DOMAIN = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")


class SSOError(Exception):
    """A refused sign-in: the message the person sees, the HTTP status of the page, and
    a short reason code for the audit log."""

    def __init__(self, message: str, *, status: int = 400, reason: str = "refused") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class SSOStart:
    authorization_url: str
    pending: dict[str, Any]  # kept in the browser's session until the callback


@dataclass(frozen=True)
class SSOLogin:
    user: User
    tenant: Tenant
    role: str
    provisioned: bool


# --- configuration (the admin API) ----------------------------------------------------


def _schemes() -> set[str]:
    return {"https", "http"} if settings.PARLEY_SSO_ALLOW_HTTP else {"https"}


def _clean_issuer(issuer: str) -> str:
    issuer = (issuer or "").strip()
    parsed = urlparse(issuer)
    if parsed.scheme == "http" and "http" not in _schemes():
        raise ValidationError(
            "The issuer must be an https:// URL (http:// needs PARLEY_SSO_ALLOW_HTTP)."
        )
    if (
        parsed.scheme not in _schemes()
        or not parsed.hostname
        or parsed.query
        or parsed.fragment
        or parsed.username
        or len(issuer) > 500
    ):
        raise ValidationError(
            "The issuer must be the identity provider's https:// URL, without query or "
            "fragment, e.g. https://login.example.com/realms/acme."
        )
    return issuer


def _clean_domains(domains: Iterable[str]) -> list[str]:
    cleaned = set()
    for raw in domains or []:
        domain = str(raw).strip().lower().removeprefix("@")
        if not _DOMAIN.match(domain):
            raise ValidationError(f"{raw!r} is not an email domain such as example.com.")
        cleaned.add(domain)
    return sorted(cleaned)


def sso_get(*, actor: Actor) -> TenantSSO:
    """The actor's tenant's configuration (NotFound when there is none)."""
    require_role(actor, Role.ADMIN)
    config = TenantSSO.objects.filter(tenant_id=actor.tenant_id).first()
    if config is None:
        raise NotFound
    return config


def sso_configure(
    *,
    actor: Actor,
    enabled: bool,
    issuer: str,
    client_id: str,
    client_secret: str | None = None,
    allowed_domains: Iterable[str] = (),
    auto_provision: bool = False,
    provision_role: str = Role.MEMBER,
) -> TenantSSO:
    """Create or replace the actor's tenant's configuration. `client_secret` None keeps
    the stored secret, which is allowed only while the issuer and client id stay."""
    require_role(actor, Role.ADMIN)
    issuer = _clean_issuer(issuer)
    client_id = (client_id or "").strip()
    if not client_id or len(client_id) > 255:
        raise ValidationError("The client id has 1 to 255 characters.")
    if client_secret is not None and not (0 < len(client_secret) <= 1000):
        raise ValidationError(
            "The client secret has 1 to 1000 characters (leave it out to keep the stored one)."
        )
    domains = _clean_domains(allowed_domains)
    if provision_role not in PROVISION_ROLES:
        raise ValidationError("New members get the member or the admin role, never owner.")
    if auto_provision and not domains:
        raise ValidationError(
            "Auto-provisioning needs at least one allowed email domain: otherwise anyone "
            "your identity provider knows could join."
        )

    config = TenantSSO.objects.select_for_update().filter(tenant_id=actor.tenant_id).first()
    created = config is None
    if config is None:
        config = TenantSSO(tenant=actor.tenant)
    elif (
        client_secret is None
        and config.has_secret
        and (config.issuer != issuer or config.client_id != client_id)
    ):
        # The stored secret belongs to the old client: never send it to another issuer.
        raise ValidationError("Changing the issuer or the client id needs the client secret again.")
    if enabled and client_secret is None and not config.has_secret:
        raise ValidationError("Enabling single sign-on needs the client secret.")

    config.enabled = enabled
    config.issuer = issuer
    config.client_id = client_id
    if client_secret is not None:
        config.client_secret_encrypted = encrypt(client_secret)
    config.allowed_domains = domains
    config.auto_provision = auto_provision
    config.provision_role = provision_role
    config.save()
    audit_record(
        actor=actor,
        action="sso.configured",
        target=config,
        target_label=f"single sign-on via {issuer}",
        data={
            "created": created,
            "enabled": enabled,
            "issuer": issuer,
            "client_id": client_id,
            "client_secret_changed": client_secret is not None,  # never the secret itself
            "allowed_domains": domains,
            "auto_provision": auto_provision,
            "provision_role": provision_role,
        },
    )
    return config


# --- the sign-in --------------------------------------------------------------------------


def _not_available(slug: str) -> SSOError:
    return SSOError(
        f"Single sign-on is not available for “{slug}”. Check your company's name on "
        "Parley, or log in with your password.",
        status=404,
        reason="not_available",
    )


def _config_by_slug(slug: str) -> TenantSSO:
    # Finding the tenant precedes knowing it: a narrow lookup by its unique slug.
    with operator_scope():
        config = TenantSSO.objects.select_related("tenant").filter(tenant__slug=slug).first()
    if config is None or not config.enabled or not config.has_secret:
        raise _not_available(slug)
    if not config.tenant.is_active:
        raise SSOError(
            f"{config.tenant.name} is suspended on this platform.",
            status=403,
            reason="suspended",
        )
    return config


def _get_json(url: str, what: str, **kwargs: Any) -> Any:
    try:
        response = requests.get(url, timeout=settings.PARLEY_SSO_TIMEOUT_S, **kwargs)
        response.raise_for_status()
        return response.json()
    except (requests.RequestException, ValueError) as exc:
        logger.warning("SSO: the %s at %s did not load: %s", what, url, exc)
        raise SSOError(
            f"Your company's identity provider could not be reached (its {what} at {url} "
            "did not load). Try again later, or tell your administrator.",
            reason="provider_unreachable",
        ) from None


def _discover(issuer: str) -> dict[str, Any]:
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    metadata = _get_json(url, "discovery document")
    if not isinstance(metadata, dict) or metadata.get("issuer") != issuer:
        named = metadata.get("issuer") if isinstance(metadata, dict) else None
        raise SSOError(
            f"The identity provider's discovery document names the issuer {named!r}, "
            f"not {issuer!r}: an administrator must correct the issuer.",
            reason="issuer_mismatch",
        )
    for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
        value = metadata.get(field)
        if not isinstance(value, str) or urlparse(value).scheme not in _schemes():
            raise SSOError(
                f"The identity provider's discovery document has no usable {field}.",
                reason="bad_discovery",
            )
    return metadata


def sso_login_start(*, slug: str, redirect_uri: str) -> SSOStart:
    """Where to send the browser, and what to remember until it comes back."""
    config = _config_by_slug(slug)
    metadata = _discover(config.issuer)
    state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
    client = OAuth2Session(
        client_id=config.client_id,
        redirect_uri=redirect_uri,
        scope=SCOPE,
        code_challenge_method="S256",
    )
    url, _ = client.create_authorization_url(
        metadata["authorization_endpoint"], state=state, code_verifier=verifier, nonce=nonce
    )
    pending = {
        "tenant_id": str(config.tenant_id),
        "state": state,
        "nonce": nonce,
        "code_verifier": verifier,
        "redirect_uri": redirect_uri,
        "started_at": time.time(),
    }
    return SSOStart(authorization_url=url, pending=pending)


def _exchange_code(
    *, config: TenantSSO, metadata: dict[str, Any], code: str, pending: dict[str, Any]
) -> dict[str, Any]:
    try:
        secret = decrypt(config.client_secret_encrypted)
    except DecryptionError:
        logger.error("SSO: the client secret of tenant %s cannot be decrypted", config.tenant_id)
        raise SSOError(
            f"Single sign-on for {config.tenant.name} is misconfigured (its client secret "
            "cannot be read). An administrator must enter the client secret again.",
            reason="secret_unreadable",
        ) from None
    # Basic is the default of the specification; else the secret goes in the form body.
    methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    basic = "client_secret_basic" in methods
    auth_method = "client_secret_basic" if basic else "client_secret_post"
    try:
        with OAuth2Session(
            client_id=config.client_id,
            client_secret=secret,
            redirect_uri=pending["redirect_uri"],
            token_endpoint_auth_method=auth_method,
            default_timeout=settings.PARLEY_SSO_TIMEOUT_S,
        ) as client:
            token = client.fetch_token(
                metadata["token_endpoint"],
                grant_type="authorization_code",
                code=code,
                code_verifier=pending["code_verifier"],
            )
    except OAuthError as exc:
        detail = f"{exc.error}: {exc.description}" if exc.description else str(exc.error)
        raise SSOError(
            f"The identity provider refused to complete the sign-in ({detail}).",
            reason="token_refused",
        ) from None
    except (requests.RequestException, ValueError) as exc:
        logger.warning("SSO: the token endpoint of %s failed: %s", config.issuer, exc)
        raise SSOError(
            "The identity provider could not be reached to complete the sign-in. Try again.",
            reason="provider_unreachable",
        ) from None
    return dict(token)


def _why(exc: Exception) -> str:
    if isinstance(exc, ExpiredTokenError):
        return "it has expired"
    if isinstance(exc, BadSignatureError):
        return "its signature does not verify with the provider's published keys"
    if isinstance(exc, InvalidKeyIdError):
        return "it is signed with a key the provider does not publish"
    if isinstance(exc, ClaimError):
        return {
            "iss": "it was issued by another issuer",
            "aud": "it was issued for another application (audience)",
            "azp": "it was issued for another application (authorized party)",
            "nonce": "it belongs to another sign-in (nonce)",
        }.get(exc.claim, f"its claim {exc.claim!r} is missing or invalid")
    if isinstance(exc, DecodeError):
        return "it is malformed"
    if isinstance(exc, JoseError):
        return exc.description or exc.error or "it does not verify"
    return "it is malformed"


def _verify_id_token(
    *,
    id_token: Any,
    metadata: dict[str, Any],
    config: TenantSSO,
    nonce: str,
    access_token: Any,
) -> dict[str, Any]:
    """The ID token's claims once its signature (the provider's JWKS), issuer, audience,
    nonce and expiry hold; SSOError otherwise."""
    if not isinstance(id_token, str) or not id_token:
        raise SSOError(
            "The identity provider returned no ID token (is the openid scope allowed for "
            "this client?).",
            reason="no_id_token",
        )
    offered = metadata.get("id_token_signing_alg_values_supported") or ["RS256"]
    algorithms = [alg for alg in offered if alg in SIGNING_ALGORITHMS]
    if not algorithms:
        raise SSOError(
            f"The identity provider signs ID tokens only with {', '.join(map(str, offered))}; "
            f"Parley accepts {', '.join(SIGNING_ALGORITHMS)}.",
            reason="bad_algorithm",
        )
    jwks = _get_json(metadata["jwks_uri"], "key set (JWKS)")
    params: dict[str, Any] = {"nonce": nonce, "client_id": config.client_id}
    if isinstance(access_token, str):
        params["access_token"] = access_token  # checks at_hash when the token has one
    options: dict[str, Any] = {
        "iss": {"essential": True, "value": config.issuer},
        "aud": {"essential": True, "value": config.client_id},
        "sub": {"essential": True},
        "exp": {"essential": True},
        "iat": {"essential": True},
        "nonce": {"essential": True, "value": nonce},
    }
    try:
        key_set = KeySet.import_key_set(jwks)
        token = jwt.decode(id_token, key_set, algorithms=algorithms)
        claims = CodeIDToken(token.claims, token.header, options, params)
        claims.validate(leeway=ID_TOKEN_LEEWAY_S)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        logger.info("SSO: ID token refused for tenant %s: %r", config.tenant_id, exc)
        raise SSOError(
            f"The identity provider's ID token was refused: {_why(exc)}. Start again, and "
            "tell your administrator if this persists.",
            reason="bad_token",
        ) from None
    return dict(claims)


def _verified_email(claims: dict[str, Any], config: TenantSSO) -> str:
    email = claims.get("email")
    if not isinstance(email, str) or "@" not in email.strip():
        raise SSOError(
            "Your identity provider did not send your email address (the email scope must "
            "be released to Parley).",
            status=403,
            reason="no_email",
        )
    email = email.strip()
    verified = claims.get("email_verified")
    if verified is not True and str(verified).lower() != "true":
        raise SSOError(
            f"Your identity provider has not verified the email address {email}, so Parley "
            "cannot sign you in with it.",
            status=403,
            reason="email_unverified",
        )
    domain = email.rsplit("@", 1)[1].lower()
    if config.allowed_domains and domain not in config.allowed_domains:
        raise SSOError(
            f"{config.tenant.name} signs in addresses at {', '.join(config.allowed_domains)} "
            f"only; {email} is not one of them.",
            status=403,
            reason="domain_not_allowed",
        )
    return email


def _not_a_member(email: str, tenant: Tenant) -> SSOError:
    return SSOError(
        f"{email} is not a member of {tenant.name} on Parley. Ask an administrator of "
        f"{tenant.name} to invite you.",
        status=403,
        reason="not_a_member",
    )


def _new_user(email: str, claims: dict[str, Any]) -> User:
    username = email.lower()
    if len(username) > 150 or User.objects.filter(username=username).exists():
        username = f"{email.split('@')[0][:100]}-{secrets.token_hex(4)}"
    user = User(
        username=username,
        email=email,
        display_name=str(claims.get("name") or "")[:150],
    )
    user.set_unusable_password()  # signs in through the identity provider only
    try:
        with transaction.atomic():
            user.save()
    except IntegrityError:  # the same address provisioned concurrently
        raise SSOError(
            "Your account was being created by another sign-in. Try again.",
            status=409,
            reason="conflict",
        ) from None
    return user


def _user_for(*, config: TenantSSO, email: str, claims: dict[str, Any]) -> tuple[User, str, bool]:
    """The user, their role in the tenant, and whether they were provisioned now."""
    tenant = config.tenant
    user = User.objects.filter(email__iexact=email).first()
    if user is None:
        if not config.auto_provision:
            raise _not_a_member(email, tenant)
        user = _new_user(email, claims)
    elif not user.is_active:
        raise SSOError("This Parley account is deactivated.", status=403, reason="inactive")
    elif user.is_operator or user.is_staff or user.is_superuser:
        raise SSOError(
            "Platform staff accounts cannot sign in through a company's single sign-on; "
            "log in with your password.",
            status=403,
            reason="staff_account",
        )
    with tenant_scope(tenant_id=tenant.id, user_id=user.id):
        memberships = list(Membership.objects.filter(user=user))
        if any(m.tenant_id != tenant.id for m in memberships):
            raise SSOError(
                f"The Parley account of {email} also belongs to another company, so "
                f"{tenant.name}'s single sign-on cannot sign it in. Log in with your password.",
                status=403,
                reason="other_tenants",
            )
        if memberships:
            return user, memberships[0].role, False
        if not config.auto_provision:
            raise _not_a_member(email, tenant)
        membership = Membership.objects.create(tenant=tenant, user=user, role=config.provision_role)
        audit_record(
            actor=Actor(tenant=tenant, user=user, role=membership.role),
            action="sso.member_provisioned",
            target=user,
            data={"email": email, "role": membership.role, "issuer": config.issuer},
        )
        return user, membership.role, True


def sso_login_finish(*, pending: Any, params: Mapping[str, str], ip: str | None = None) -> SSOLogin:
    """Check the provider's answer to a pending sign-in; the signed-in user, or SSOError."""
    if not isinstance(pending, dict) or not pending.get("state"):
        raise SSOError(
            "No single sign-on was started in this browser, or it was already used. Start "
            "again from the login page.",
            reason="no_pending",
        )
    state = str(params.get("state") or "")
    if not state or not hmac.compare_digest(state.encode(), str(pending["state"]).encode()):
        raise SSOError(
            "This answer from the identity provider does not belong to the sign-in this "
            "browser started (state mismatch). Start again from the login page.",
            reason="state_mismatch",
        )
    if time.time() - float(pending.get("started_at", 0)) > PENDING_MAX_AGE_S:
        raise SSOError("This sign-in took too long. Start again.", reason="expired")

    tenant_id = pending["tenant_id"]
    with tenant_scope(tenant_id=tenant_id):
        config = TenantSSO.objects.select_related("tenant").filter(tenant_id=tenant_id).first()
    if config is None or not config.enabled or not config.has_secret:
        raise SSOError(
            "Single sign-on was switched off for this company meanwhile.",
            status=404,
            reason="not_available",
        )
    tenant = config.tenant
    email = ""
    try:
        if not tenant.is_active:
            raise SSOError(f"{tenant.name} is suspended on this platform.", status=403)
        if params.get("error"):
            error = str(params["error"])[:100]
            description = str(params.get("error_description") or "")[:300]
            raise SSOError(
                "Your company's identity provider refused the sign-in "
                f"({error}{': ' + description if description else ''}).",
                reason="provider_error",
            )
        code = params.get("code")
        if not code:
            raise SSOError(
                "The identity provider's answer has no authorization code.", reason="no_code"
            )
        metadata = _discover(config.issuer)
        token = _exchange_code(config=config, metadata=metadata, code=code, pending=pending)
        claims = _verify_id_token(
            id_token=token.get("id_token"),
            metadata=metadata,
            config=config,
            nonce=pending["nonce"],
            access_token=token.get("access_token"),
        )
        email = str(claims.get("email") or "")[:254]  # for the audit record, if refused
        email = _verified_email(claims, config)
        user, role, provisioned = _user_for(config=config, email=email, claims=claims)
    except SSOError as exc:
        with tenant_scope(tenant_id=tenant.id):
            audit_record(
                actor=None,
                tenant=tenant,
                action="sso.login_refused",
                data={"reason": exc.reason, "email": email},
                ip=ip,
            )
        raise
    with tenant_scope(tenant_id=tenant.id, user_id=user.id):
        audit_record(
            actor=Actor(tenant=tenant, user=user, role=role),
            action="sso.login",
            target=user,
            data={"email": email, "issuer": config.issuer, "provisioned": provisioned},
            ip=ip,
        )
    return SSOLogin(user=user, tenant=tenant, role=role, provisioned=provisioned)
