"""Password reset by email (Django's views, Parley's templates): the link, what an
unknown address gets (the same answer, no email), and links that must not work."""

from __future__ import annotations

import html
import re
from datetime import datetime, timedelta

import pytest
from django.contrib.auth.tokens import PasswordResetTokenGenerator, default_token_generator
from django.core import mail
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from tenants.models import User
from tenants.services.login_throttle import login_throttle_failure, login_throttle_reset
from tests.factories import PASSWORD, UserFactory

pytestmark = pytest.mark.django_db

RESET = "/accounts/password_reset/"
NEW_PASSWORD = "a-brand-new-passphrase-42"


@pytest.fixture(autouse=True)
def public_url(settings):
    settings.PARLEY_PUBLIC_URL = "https://chat.example.com"


def page(response) -> str:
    return html.unescape(response.content.decode())


def reset_link(message) -> str:
    match = re.search(r"https://chat\.example\.com(/accounts/reset/[^/\s]+/[^/\s]+/)", message.body)
    assert match, message.body
    return match.group(1)


def link_for(user, token: str | None = None) -> str:
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    return f"/accounts/reset/{uid}/{token or default_token_generator.make_token(user)}/"


def set_password(client, link: str, password: str = NEW_PASSWORD):
    """Open the link and submit a new password, as a browser does."""
    opened = client.get(link)
    if opened.status_code != 302:
        return opened
    form_url = opened["Location"]
    assert client.get(form_url).status_code == 200
    return client.post(form_url, {"new_password1": password, "new_password2": password})


def password_works(user: User, password: str) -> bool:
    user.refresh_from_db()
    return user.check_password(password)


def test_reset_by_email_sets_a_new_password(client, alice):
    login_page = client.get("/accounts/login/").content.decode()
    assert f'href="{RESET}"' in login_page
    assert client.get(RESET).status_code == 200

    response = client.post(RESET, {"email": "ALICE@example.com"})
    assert response.status_code == 302 and response["Location"] == "/accounts/password_reset/done/"
    [message] = mail.outbox
    assert message.to == ["alice@example.com"]
    assert message.subject == "Reset your Parley password"
    assert "Hello alice" in message.body

    done = set_password(client, reset_link(message))
    assert done.status_code == 302 and done["Location"] == "/accounts/reset/done/"
    assert "Your password is changed" in page(client.get(done["Location"]))
    assert password_works(alice.user, NEW_PASSWORD)
    assert not password_works(alice.user, PASSWORD)

    login = client.post("/accounts/login/", {"username": "alice", "password": NEW_PASSWORD})
    assert login.status_code == 302


def test_unknown_address_gets_the_same_answer_and_no_email(client, alice):
    known = client.post(RESET, {"email": "alice@example.com"})
    unknown = client.post(RESET, {"email": "nobody@example.com"})
    assert (unknown.status_code, unknown["Location"]) == (known.status_code, known["Location"])
    assert len(mail.outbox) == 1  # alice's only
    assert page(client.get(unknown["Location"])) == page(client.get(known["Location"]))


def test_accounts_without_a_password_get_no_email(client, db):
    """Single sign-on accounts have no Parley password to reset."""
    user = UserFactory(email="sso-only@acme.test")
    user.set_unusable_password()
    user.save()
    response = client.post(RESET, {"email": "sso-only@acme.test"})
    assert response.status_code == 302
    assert mail.outbox == []


def test_invalid_address_is_reported(client, db):
    response = client.post(RESET, {"email": "not-an-address"})
    assert response.status_code == 200
    assert "Enter a valid email address" in page(response)
    assert mail.outbox == []


def test_links_point_at_the_public_url_whatever_the_host(client, alice):
    client.post(RESET, {"email": "alice@example.com"}, HTTP_HOST="localhost")
    [message] = mail.outbox
    assert "https://chat.example.com/accounts/reset/" in message.body
    assert "localhost" not in message.body


def assert_link_refused(client, link: str, user: User) -> None:
    response = set_password(client, link)
    assert response.status_code == 400
    assert "This password reset link is invalid or has expired" in page(response)
    assert password_works(user, PASSWORD)


def test_forged_links_do_not_work(client, alice, bob):
    assert_link_refused(client, link_for(alice.user, "abc123-0123456789abcdef01234567"), alice.user)
    # A valid token of bob's does not open alice's account.
    bob_token = default_token_generator.make_token(bob.user)
    assert_link_refused(client, link_for(alice.user, bob_token), alice.user)
    assert_link_refused(client, "/accounts/reset/not-a-uid/set-password/", alice.user)
    # Posting straight to the form without having opened a valid link does nothing.
    uid = urlsafe_base64_encode(force_bytes(alice.user.pk))
    response = client.post(
        f"/accounts/reset/{uid}/set-password/",
        {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
    )
    assert response.status_code == 400
    assert password_works(alice.user, PASSWORD)


def test_expired_links_do_not_work(client, alice, settings):
    class FourDaysAgo(PasswordResetTokenGenerator):
        def _now(self) -> datetime:
            return datetime.now() - timedelta(days=4)

    assert settings.PASSWORD_RESET_TIMEOUT < 4 * 24 * 3600
    old_token = FourDaysAgo().make_token(alice.user)
    assert_link_refused(client, link_for(alice.user, old_token), alice.user)


def test_a_link_works_once(client, alice):
    client.post(RESET, {"email": "alice@example.com"})
    link = reset_link(mail.outbox[0])
    assert set_password(client, link).status_code == 302
    response = set_password(client, link, "yet-another-passphrase-7")
    assert response.status_code == 400
    assert password_works(alice.user, NEW_PASSWORD)


def test_weak_new_password_is_refused(client, alice):
    response = set_password(client, link_for(alice.user), "123")
    assert response.status_code == 200
    assert "This password is too short" in page(response)
    assert password_works(alice.user, PASSWORD)


def test_a_new_password_lifts_a_login_lockout(client, alice):
    try:
        for _ in range(5):
            login_throttle_failure(username="alice", ip=None)
        locked = client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})
        assert locked.status_code == 429

        assert set_password(client, link_for(alice.user)).status_code == 302
        login = client.post("/accounts/login/", {"username": "alice", "password": NEW_PASSWORD})
        assert login.status_code == 302
    finally:
        login_throttle_reset(username="alice")
