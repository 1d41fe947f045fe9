"""OpenID Connect single sign-on per tenant, against a real OpenID provider
(django-oauth-toolkit in a subprocess, tests/oidc_provider). Parley is driven through
the Django test client; the browser's side at the provider through `requests`. The
provider signs real ID tokens; some of its users get deliberately wrong claims
(audience, nonce, issuer, expiry), and other tokens are tampered with or forged on the
way, so every check of the ID token is seen to refuse."""

from __future__ import annotations

import base64
import html
import json
import re
import time
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlparse

import pytest
import requests
from cryptography.fernet import Fernet
from django.core.exceptions import ValidationError
from django.test import Client
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from tenants import crypto
from tenants.access import SESSION_TENANT_KEY
from tenants.auth_views import SSO_SESSION_KEY
from tenants.models import AuditEvent, Membership, Role, Tenant, TenantSSO, User
from tenants.rls import operator_scope, tenant_scope
from tenants.services import sso as sso_service
from tenants.services.sso import sso_configure
from tests.conftest import Person
from tests.factories import MembershipFactory, UserFactory
from tests.oidc_provider.process import OIDCProvider
from tests.test_settings import manage

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[1]
PARLEY = "http://testserver"
CLIENT_ID = "parley-acme"
CLIENT_SECRET = "provider-issued-client-secret-8d1f0c"
IDP_PASSWORD = "idp-password-1"
USERS = {
    # username at the provider: email, and what it does to the ID token
    "ada": {"email": "ada@acme.test"},
    "newcomer": {"email": "newcomer@acme.test", "name": "New Comer"},
    "eve": {"email": "eve@evil.test"},
    "unverified": {"email": "unverified@acme.test", "email_verified": False},
    "charlie-idp": {"email": "charlie@example.com"},
    "operator-idp": {"email": "operator@acme.test"},
    "wrong-aud": {"email": "ada@acme.test", "id_token_overrides": {"aud": "another-client"}},
    "wrong-nonce": {"email": "ada@acme.test", "id_token_overrides": {"nonce": "not-the-nonce"}},
    "wrong-iss": {"email": "ada@acme.test", "id_token_overrides": {"iss": "http://127.0.0.1:9/o"}},
    "expired": {"email": "ada@acme.test", "id_token_overrides": {"exp": int(time.time()) - 3600}},
}


# --- the provider and the browser -------------------------------------------------------


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    users = [{"username": name, "password": IDP_PASSWORD, **spec} for name, spec in USERS.items()]
    clients = [
        {
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "redirect_uris": [f"{PARLEY}/sso/callback/"],
        }
    ]
    with OIDCProvider(
        tmp_dir=tmp_path_factory.mktemp("oidc"), clients=clients, users=users
    ) as running:
        yield running


def provider_sign_in(authorization_url: str, username: str) -> str:
    """Play the browser at the provider: follow its redirects and fill in its login
    form; return the URL it finally sends the browser to (on Parley)."""
    browser = requests.Session()
    url, data = authorization_url, None
    for _ in range(10):
        method = "POST" if data else "GET"
        response = browser.request(method, url, data=data, allow_redirects=False, timeout=10)
        if response.is_redirect:
            url, data = urljoin(url, response.headers["Location"]), None
            if url.startswith(PARLEY + "/"):
                return url
            continue
        assert response.status_code == 200, (response.status_code, response.text[:2000])
        csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', response.text)
        next_ = re.search(r'name="next" value="([^"]*)"', response.text)
        assert csrf and next_ and 'name="password"' in response.text, response.text[:2000]
        data = {
            "csrfmiddlewaretoken": csrf.group(1),
            "username": username,
            "password": IDP_PASSWORD,
            "next": html.unescape(next_.group(1)),
        }
    raise AssertionError(f"the provider never sent the browser back to Parley (at {url})")


def sso_start(client: Client, slug: str, **query: str):
    response = client.get(f"/sso/{slug}/login/", query)
    assert response.status_code == 302, response.content.decode()
    return response


def sso_sign_in(client: Client, slug: str, username: str):
    """The whole round trip; Parley's answer to the provider's redirect."""
    start = sso_start(client, slug)
    back = provider_sign_in(start["Location"], username)
    return client.get(back.removeprefix(PARLEY))


def signed_in_user_id(client: Client) -> str | None:
    return client.session.get("_auth_user_id")


def text(response) -> str:
    return html.unescape(response.content.decode())


# --- Parley's side -----------------------------------------------------------------------


def configure(person: Person, issuer: str, **changes):
    values = {
        "enabled": True,
        "issuer": issuer,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "allowed_domains": [],
        "auto_provision": False,
        "provision_role": Role.MEMBER,
        **changes,
    }
    with tenant_scope(tenant_id=person.tenant.id, user_id=person.user.id):
        return sso_configure(actor=person.actor, **values)


@pytest.fixture
def allow_http(settings):
    settings.PARLEY_SSO_ALLOW_HTTP = True


@pytest.fixture
def acme(alice, provider, allow_http) -> Tenant:
    """Tenant A (alice owns it) with single sign-on through the test provider."""
    configure(alice, provider.issuer)
    return alice.tenant


@pytest.fixture
def ada(alice) -> Person:
    """A member of tenant A whose address the provider knows."""
    return Person(
        MembershipFactory(tenant=alice.tenant, user__username="ada", user__email="ada@acme.test")
    )


def audit(tenant: Tenant, action: str) -> list[AuditEvent]:
    with operator_scope():
        return list(AuditEvent.objects.filter(tenant=tenant, action=action))


def assert_refused(response, status: int, *phrases: str, client: Client) -> None:
    body = text(response)
    assert response.status_code == status, body
    assert "Single sign-on failed" in body
    for phrase in phrases:
        assert phrase in body, body
    assert signed_in_user_id(client) is None


# --- the login page -------------------------------------------------------------------------


def test_login_page_offers_sso_by_company_name(client):
    page = text(client.get("/accounts/login/"))
    assert "Sign in with your company's SSO" in page
    assert 'action="/sso/"' in page and 'name="tenant"' in page


def test_sso_start_page_moves_on_without_a_cross_origin_form_redirect(client):
    response = client.get("/sso/", {"tenant": " Acme-Corp ", "next": "/c/1/"})
    assert response.status_code == 200
    # A refresh, not a 302: the form's navigation ends on Parley (CSP form-action 'self').
    assert response["Refresh"] == "0; url=/sso/acme-corp/login/?next=%2Fc%2F1%2F"
    assert 'href="/sso/acme-corp/login/?next=%2Fc%2F1%2F"' in response.content.decode()

    offsite = client.get("/sso/", {"tenant": "acme", "next": "https://evil.example/"})
    assert offsite["Refresh"] == "0; url=/sso/acme/login/"

    for bad in ("", "../admin", "acme corp", "a" * 64):
        response = client.get("/sso/", {"tenant": bad})
        assert response.status_code == 400, bad
        assert "Type your company" in text(response)


# --- the round trip -----------------------------------------------------------------------


def test_member_signs_in_through_the_provider(client, acme, ada, provider):
    start = sso_start(client, acme.slug)
    authorize = urlparse(start["Location"])
    assert f"{authorize.scheme}://{authorize.netloc}{authorize.path}" == (
        f"{provider.issuer}/authorize/"
    )
    query = {k: v[0] for k, v in parse_qs(authorize.query).items()}
    pending = client.session[SSO_SESSION_KEY]
    assert query["client_id"] == CLIENT_ID
    assert query["redirect_uri"] == f"{PARLEY}/sso/callback/"
    assert query["state"] == pending["state"] and query["nonce"] == pending["nonce"]
    assert query["code_challenge_method"] == "S256" and query["code_challenge"]
    assert query["scope"] == "openid email profile"
    assert CLIENT_SECRET not in start["Location"]

    back = provider_sign_in(start["Location"], "ada")
    response = client.get(back.removeprefix(PARLEY))
    assert response.status_code == 302, text(response)
    assert response["Location"] == "/"
    assert signed_in_user_id(client) == str(ada.user.id)
    assert client.session[SESSION_TENANT_KEY] == str(acme.id)
    assert SSO_SESSION_KEY not in client.session
    assert client.get("/").status_code == 200

    [event] = audit(acme, "sso.login")
    assert event.actor_user_id == ada.user.id
    assert event.data == {"email": "ada@acme.test", "issuer": provider.issuer, "provisioned": False}
    with operator_scope():
        assert Membership.objects.get(user=ada.user).role == Role.MEMBER

    # The provider's answer is good once: replayed, there is no pending sign-in.
    client.logout()
    replay = client.get(back.removeprefix(PARLEY))
    assert_refused(replay, 400, "No single sign-on was started", client=client)


def test_next_page_is_kept_when_it_is_on_parley(client, acme, ada):
    start = sso_start(client, acme.slug, next="/c/123/")
    back = provider_sign_in(start["Location"], "ada")
    assert client.get(back.removeprefix(PARLEY))["Location"] == "/c/123/"

    start = sso_start(client, acme.slug, next="https://evil.example/")
    back = provider_sign_in(start["Location"], "ada")
    assert client.get(back.removeprefix(PARLEY))["Location"] == "/"


def test_auto_provisioning_creates_the_user_and_membership(client, alice, acme, provider):
    configure(
        alice,
        provider.issuer,
        client_secret=None,
        auto_provision=True,
        allowed_domains=["acme.test"],
        provision_role=Role.ADMIN,
    )
    response = sso_sign_in(client, acme.slug, "newcomer")
    assert response.status_code == 302, text(response)
    user = User.objects.get(email="newcomer@acme.test")
    assert signed_in_user_id(client) == str(user.id)
    assert user.display_name == "New Comer"
    assert not user.has_usable_password()
    with operator_scope():
        assert Membership.objects.get(user=user, tenant=acme).role == Role.ADMIN
    [provisioned] = audit(acme, "sso.member_provisioned")
    assert provisioned.data["role"] == Role.ADMIN
    assert audit(acme, "sso.login")[0].data["provisioned"] is True


def test_unknown_address_is_refused_without_auto_provisioning(client, acme):
    response = sso_sign_in(client, acme.slug, "newcomer")
    assert_refused(response, 403, "newcomer@acme.test is not a member of", client=client)
    assert not User.objects.filter(email="newcomer@acme.test").exists()
    [refused] = audit(acme, "sso.login_refused")
    assert refused.data == {"reason": "not_a_member", "email": "newcomer@acme.test"}


def test_address_outside_the_allowed_domains_is_refused(client, alice, acme, provider):
    configure(
        alice,
        provider.issuer,
        client_secret=None,
        auto_provision=True,
        allowed_domains=["acme.test"],
    )
    response = sso_sign_in(client, acme.slug, "eve")
    assert_refused(response, 403, "acme.test only; eve@evil.test is not one", client=client)
    assert not User.objects.filter(email="eve@evil.test").exists()


def test_unverified_address_is_refused(client, alice, acme, provider):
    configure(
        alice,
        provider.issuer,
        client_secret=None,
        auto_provision=True,
        allowed_domains=["acme.test"],
    )
    response = sso_sign_in(client, acme.slug, "unverified")
    assert_refused(response, 403, "has not verified the email address", client=client)
    assert not User.objects.filter(email="unverified@acme.test").exists()


def test_tenant_provider_cannot_take_over_accounts_of_other_tenants(
    client, alice, charlie, acme, provider
):
    """Tenant A's provider asserts the address of charlie (owner of tenant B) and of a
    platform operator: neither is signed in, nor added to tenant A."""
    configure(
        alice,
        provider.issuer,
        client_secret=None,
        auto_provision=True,
        allowed_domains=["acme.test", "example.com"],
    )
    assert charlie.user.email == "charlie@example.com"
    response = sso_sign_in(client, acme.slug, "charlie-idp")
    assert_refused(response, 403, "also belongs to another company", client=client)

    UserFactory(username="op", email="operator@acme.test", is_operator=True)
    response = sso_sign_in(client, acme.slug, "operator-idp")
    assert_refused(response, 403, "Platform staff accounts cannot sign in", client=client)
    with operator_scope():
        assert not Membership.objects.filter(tenant=acme).exclude(user=alice.user).exists()


@pytest.mark.parametrize(
    ("username", "why"),
    [
        ("wrong-aud", "issued for another application (audience)"),
        ("wrong-nonce", "it belongs to another sign-in (nonce)"),
        ("wrong-iss", "it was issued by another issuer"),
        ("expired", "it has expired"),
    ],
)
def test_id_token_with_wrong_claims_is_refused(client, acme, ada, username, why):
    """Tokens really signed by the provider, whose claims do not fit this sign-in."""
    response = sso_sign_in(client, acme.slug, username)
    assert_refused(
        response, 400, "The identity provider's ID token was refused", why, client=client
    )
    assert audit(acme, "sso.login_refused")[0].data["reason"] == "bad_token"


def _segments(token: str) -> tuple[dict, dict, str]:
    def decode(part: str) -> dict:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))

    header, payload, signature = token.split(".")
    return decode(header), decode(payload), signature


def _encode(part: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(part).encode()).rstrip(b"=").decode()


def tamper_with_id_token(monkeypatch, change) -> None:
    """Let the real token exchange happen, then change the ID token before Parley checks it."""
    exchange = sso_service._exchange_code

    def tampered(**kwargs):
        token = exchange(**kwargs)
        token["id_token"] = change(token["id_token"])
        return token

    monkeypatch.setattr(sso_service, "_exchange_code", tampered)


def _other_email(token: str) -> str:
    header, claims, signature = _segments(token)
    claims["email"] = "alice@example.com"  # the owner's address instead of ada's
    return f"{_encode(header)}.{_encode(claims)}.{signature}"


def _signed_by_another_key(token: str) -> str:
    header, claims, _ = _segments(token)
    key = RSAKey.generate_key(2048, parameters={"kid": header["kid"]})
    return jwt.encode({"alg": "RS256", "kid": header["kid"]}, claims, key)


def _signed_with_client_secret(token: str) -> str:
    # The provider advertises HS256 too; an HMAC token keyed with the client secret
    # proves nothing about the provider and must not pass.
    _, claims, _ = _segments(token)
    return jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(CLIENT_SECRET))


def _unsigned(token: str) -> str:
    _, claims, _ = _segments(token)
    return f"{_encode({'alg': 'none', 'typ': 'JWT'})}.{_encode(claims)}."


@pytest.mark.parametrize(
    "change",
    [_other_email, _signed_by_another_key, _signed_with_client_secret, _unsigned],
    ids=["payload-changed", "another-key", "hmac-client-secret", "alg-none"],
)
def test_tampered_or_forged_id_token_is_refused(client, alice, acme, ada, monkeypatch, change):
    tamper_with_id_token(monkeypatch, change)
    response = sso_sign_in(client, acme.slug, "ada")
    assert_refused(response, 400, "The identity provider's ID token was refused", client=client)


def test_untampered_exchange_through_the_same_hook_signs_in(client, acme, ada, monkeypatch):
    """The hook above changes nothing by itself: the refusals come from the changes."""
    tamper_with_id_token(monkeypatch, lambda token: token)
    assert sso_sign_in(client, acme.slug, "ada").status_code == 302


def test_state_mismatch_is_refused(client, acme, ada):
    start = sso_start(client, acme.slug)
    back = provider_sign_in(start["Location"], "ada")
    forged = re.sub(r"state=[^&]+", "state=attacker-state", back)
    response = client.get(forged.removeprefix(PARLEY))
    assert_refused(response, 400, "state mismatch", client=client)


def test_callback_without_a_started_sign_in_is_refused(client, acme):
    response = client.get("/sso/callback/", {"code": "abc", "state": "xyz"})
    assert_refused(response, 400, "No single sign-on was started in this browser", client=client)


def test_sign_in_that_took_too_long_is_refused(client, acme, ada):
    start = sso_start(client, acme.slug)
    session = client.session
    session[SSO_SESSION_KEY] = {
        **session[SSO_SESSION_KEY],
        "started_at": time.time() - sso_service.PENDING_MAX_AGE_S - 1,
    }
    session.save()
    back = provider_sign_in(start["Location"], "ada")
    assert_refused(client.get(back.removeprefix(PARLEY)), 400, "took too long", client=client)


def test_provider_error_is_shown(client, acme):
    sso_start(client, acme.slug)
    state = client.session[SSO_SESSION_KEY]["state"]
    response = client.get(
        "/sso/callback/",
        {"error": "access_denied", "error_description": "<b>User cancelled</b>", "state": state},
    )
    assert_refused(
        response, 400, "refused the sign-in (access_denied: <b>User cancelled</b>)", client=client
    )
    assert "<b>" not in response.content.decode()  # escaped
    assert audit(acme, "sso.login_refused")[0].data["reason"] == "provider_error"


def test_wrong_client_secret_is_refused_by_the_provider(client, alice, acme, ada, provider, caplog):
    configure(alice, provider.issuer, client_secret="not-the-secret-at-all")
    response = sso_sign_in(client, acme.slug, "ada")
    assert_refused(response, 400, "refused to complete the sign-in (invalid_client", client=client)
    assert "not-the-secret-at-all" not in caplog.text


def test_unknown_disabled_and_suspended_tenants(client, alice, acme, provider, charlie):
    unknown = client.get("/sso/no-such-company/login/")
    assert_refused(unknown, 404, "not available for “no-such-company”", client=client)

    # charlie's tenant has no single sign-on: the same answer as an unknown company.
    unconfigured = client.get(f"/sso/{charlie.tenant.slug}/login/")
    assert_refused(unconfigured, 404, "not available", client=client)

    configure(alice, provider.issuer, client_secret=None, enabled=False)
    disabled = client.get(f"/sso/{acme.slug}/login/")
    assert_refused(disabled, 404, f"not available for “{acme.slug}”", client=client)

    configure(alice, provider.issuer, client_secret=None, enabled=True)
    with operator_scope():
        Tenant.objects.filter(id=acme.id).update(state=Tenant.State.SUSPENDED)
    suspended = client.get(f"/sso/{acme.slug}/login/")
    assert_refused(suspended, 403, "is suspended", client=client)


def test_sso_switched_off_during_a_sign_in_is_refused(client, alice, acme, ada, provider):
    start = sso_start(client, acme.slug)
    configure(alice, provider.issuer, client_secret=None, enabled=False)
    back = provider_sign_in(start["Location"], "ada")
    assert_refused(client.get(back.removeprefix(PARLEY)), 404, "switched off", client=client)


def test_unreachable_provider_and_wrong_issuer(client, alice, allow_http, provider):
    from inference.local_process import free_port

    configure(alice, f"http://127.0.0.1:{free_port()}/o")
    response = client.get(f"/sso/{alice.tenant.slug}/login/")
    assert_refused(response, 400, "could not be reached", client=client)

    # The discovery document answers for another issuer (here: without the slash).
    configure(alice, provider.issuer + "/")
    response = client.get(f"/sso/{alice.tenant.slug}/login/")
    assert_refused(response, 400, f"names the issuer '{provider.issuer}'", client=client)


def test_undecryptable_secret_is_refused_cleanly(client, acme, ada, settings):
    settings.PARLEY_ENCRYPTION_KEY = [Fernet.generate_key().decode()]  # not the one used
    response = sso_sign_in(client, acme.slug, "ada")
    assert_refused(
        response, 400, "An administrator must enter the client secret again", client=client
    )


# --- configuration: service and API --------------------------------------------------------


def test_https_issuers_only_unless_allowed(alice, settings):
    settings.PARLEY_SSO_ALLOW_HTTP = False
    with pytest.raises(ValidationError, match="https"):
        configure(alice, "http://idp.example.com")
    configure(alice, "https://idp.example.com/realms/acme")
    with pytest.raises(ValidationError, match="without query or fragment"):
        configure(alice, "https://idp.example.com/?x=1")


def test_configuration_is_validated(alice):
    issuer = "https://idp.example.com"
    cases = [
        (
            {"auto_provision": True, "allowed_domains": []},
            "needs at least one allowed email domain",
        ),
        ({"provision_role": Role.OWNER}, "never owner"),
        ({"allowed_domains": ["not a domain"]}, "is not an email domain"),
        ({"client_id": " "}, "client id"),
        ({"client_secret": ""}, "client secret has 1 to 1000"),
        ({"client_secret": None}, "needs the client secret"),
    ]
    for changes, message in cases:
        with pytest.raises(ValidationError, match=message):
            configure(alice, issuer, **changes)
    with operator_scope():
        assert not TenantSSO.objects.exists()

    config = configure(alice, issuer, allowed_domains=["@Acme.TEST", "acme.test", "b.io"])
    assert config.allowed_domains == ["acme.test", "b.io"]
    # The stored secret never goes to another issuer or client.
    with pytest.raises(ValidationError, match="needs the client secret again"):
        configure(alice, "https://elsewhere.example.com", client_secret=None)
    with pytest.raises(ValidationError, match="needs the client secret again"):
        configure(alice, issuer, client_id="other-client", client_secret=None)
    kept = configure(alice, issuer, client_secret=None, enabled=False)
    assert crypto.decrypt(kept.client_secret_encrypted) == CLIENT_SECRET


def test_owner_configures_sso_through_the_api_and_never_sees_the_secret(client, alice, settings):
    settings.PARLEY_PUBLIC_URL = "https://chat.example.com"
    client.force_login(alice.user)
    assert client.get("/api/v1/sso").status_code == 404  # nothing configured yet

    body = {
        "enabled": True,
        "issuer": "https://idp.example.com/realms/acme",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "allowed_domains": ["acme.test"],
        "auto_provision": True,
    }
    response = client.put("/api/v1/sso", body, content_type="application/json")
    assert response.status_code == 200, response.content
    answer = response.json()
    assert answer["client_secret_set"] is True
    assert answer["provision_role"] == Role.MEMBER
    assert answer["redirect_uri"] == "https://chat.example.com/sso/callback/"
    assert answer["login_url"] == f"https://chat.example.com/sso/{alice.tenant.slug}/login/"
    assert "client_secret" not in answer

    read = client.get("/api/v1/sso")
    assert read.status_code == 200 and read.json() == answer

    # Changing other fields keeps the secret.
    response = client.put(
        "/api/v1/sso", {**body, "client_secret": None, "enabled": False}, "application/json"
    )
    assert response.json()["client_secret_set"] is True and response.json()["enabled"] is False

    for answer_text in (response.content, read.content, client.get("/api/v1/sso").content):
        assert CLIENT_SECRET.encode() not in answer_text
    with operator_scope():
        config = TenantSSO.objects.get(tenant=alice.tenant)
        events = list(AuditEvent.objects.filter(tenant=alice.tenant, action="sso.configured"))
    assert CLIENT_SECRET not in config.client_secret_encrypted
    assert crypto.decrypt(config.client_secret_encrypted) == CLIENT_SECRET
    assert len(events) == 2
    assert events[-1].data["client_secret_changed"] is True  # the first, oldest last
    assert events[0].data["client_secret_changed"] is False
    for event in events:
        assert CLIENT_SECRET not in json.dumps(event.data) + event.target_label

    bad = client.put("/api/v1/sso", {**body, "provision_role": "owner"}, "application/json")
    assert bad.status_code == 400 and "never owner" in bad.json()["detail"]


def test_members_cannot_configure_and_outsiders_see_nothing(client, alice, bob, charlie):
    configure(alice, "https://idp.example.com")
    body = {"issuer": "https://evil.example.com", "client_id": "x", "client_secret": "y"}

    client.force_login(bob.user)  # a member of tenant A
    assert client.get("/api/v1/sso").status_code == 403
    assert client.put("/api/v1/sso", body, "application/json").status_code == 403

    client.force_login(charlie.user)  # owner of tenant B, even naming tenant A in his session
    session = client.session
    session[SESSION_TENANT_KEY] = str(alice.tenant.id)
    session.save()
    assert client.get("/api/v1/sso").status_code == 404
    assert client.put("/api/v1/sso", body, "application/json").status_code == 200

    with operator_scope():
        mine = TenantSSO.objects.get(tenant=alice.tenant)
        theirs = TenantSSO.objects.get(tenant=charlie.tenant)
    assert mine.issuer == "https://idp.example.com" and mine.client_id == CLIENT_ID
    assert theirs.issuer == "https://evil.example.com"


def test_sso_rows_are_isolated_by_row_level_security(alice, charlie):
    configure(alice, "https://idp.example.com")
    with tenant_scope(tenant_id=charlie.tenant.id):
        assert not TenantSSO.objects.exists()
    with tenant_scope(tenant_id=alice.tenant.id):
        assert TenantSSO.objects.count() == 1


# --- encryption of the secret ------------------------------------------------------------


def test_secrets_are_encrypted_with_rotating_keys(settings):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.PARLEY_ENCRYPTION_KEY = [old]
    ciphertext = crypto.encrypt("s3cret")
    assert "s3cret" not in ciphertext and crypto.decrypt(ciphertext) == "s3cret"
    settings.PARLEY_ENCRYPTION_KEY = [new, old]  # rotation: the new key first
    assert crypto.decrypt(ciphertext) == "s3cret"
    settings.PARLEY_ENCRYPTION_KEY = [new]
    with pytest.raises(crypto.DecryptionError) as refused:
        crypto.decrypt(ciphertext)
    assert ciphertext not in str(refused.value) and new not in str(refused.value)


def test_without_a_key_the_secret_key_derives_one(settings):
    settings.PARLEY_ENCRYPTION_KEY = []
    ciphertext = crypto.encrypt("s3cret")
    assert crypto.decrypt(ciphertext) == "s3cret"
    settings.SECRET_KEY = "another-secret-key-" + "z" * 40
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(ciphertext)


def test_bad_encryption_key_stops_start_up(tmp_path):
    result = manage("check", env={"PARLEY_ENCRYPTION_KEY": "not-a-fernet-key"}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "PARLEY_ENCRYPTION_KEY must be comma-separated Fernet keys" in result.stderr
    assert "not-a-fernet-key" not in result.stderr  # a secret is never echoed
