"""Password login with throttling of failed attempts, per username and per client
address, counted in the Django cache (the real Redis under `make test`)."""

from __future__ import annotations

import html
import time
from pathlib import Path

import pytest
from django.contrib.auth.backends import ModelBackend

from tenants.services import login_throttle
from tenants.services.login_throttle import login_throttle_reset
from tests.factories import PASSWORD
from tests.test_settings import manage

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[1]
LOGIN = "/accounts/login/"
# Each test fails from its own addresses: counts never leak into other tests.
IP = "198.51.100.7"
OTHER_IP = "198.51.100.8"
USERNAMES = ("alice", "bob", "nobody", "someone")


@pytest.fixture(autouse=True)
def forget_counts():
    """Counts live in the shared cache for a window: start and leave every test clean."""

    def reset():
        for username in USERNAMES:
            login_throttle_reset(username=username)
        for ip in (IP, OTHER_IP, "127.0.0.1"):
            login_throttle_reset(ip=ip)
        for n in range(30):
            login_throttle_reset(username=f"user-{n}")

    reset()
    yield
    reset()


@pytest.fixture
def password_checks(monkeypatch) -> list[str]:
    """The usernames whose password the backend checked."""
    checked: list[str] = []
    authenticate = ModelBackend.authenticate

    def spy(self, request, username=None, password=None, **kwargs):
        checked.append(username)
        return authenticate(self, request, username=username, password=password, **kwargs)

    monkeypatch.setattr(ModelBackend, "authenticate", spy)
    return checked


def attempt(client, username: str, password: str, ip: str = IP):
    return client.post(LOGIN, {"username": username, "password": password}, REMOTE_ADDR=ip)


def signed_in(client) -> bool:
    return "_auth_user_id" in client.session


def page(response) -> str:
    return html.unescape(response.content.decode())


def test_wrong_password_is_refused(client, alice):
    response = attempt(client, "alice", "wrong-password")
    assert response.status_code == 200
    assert "didn't match" in page(response)
    assert not signed_in(client)


def test_correct_password_signs_in(client, alice):
    response = attempt(client, "alice", PASSWORD)
    assert response.status_code == 302 and response["Location"] == "/"
    assert signed_in(client)


def test_lockout_refuses_even_the_right_password_without_checking_it(
    client, alice, password_checks
):
    for _ in range(5):
        response = attempt(client, "alice", "wrong-password")
        assert response.status_code == 200, page(response)
    assert password_checks == ["alice"] * 5

    response = attempt(client, "alice", PASSWORD)
    assert response.status_code == 429
    assert 895 <= int(response["Retry-After"]) <= 900
    text = page(response)
    assert (
        "Too many failed sign-in attempts for this account. Try again in 15 minutes "
        "or reset your password." in text
    )
    assert "didn't match" not in text
    assert password_checks == ["alice"] * 5  # the password was not checked
    assert not signed_in(client)

    # From another address too: the account is locked, not the address.
    assert attempt(client, "alice", PASSWORD, ip=OTHER_IP).status_code == 429
    # Other accounts are not locked.
    assert attempt(client, "bob", "wrong-password").status_code == 200


def test_lockout_ends_after_the_window(client, alice, monkeypatch):
    for _ in range(5):
        attempt(client, "alice", "wrong-password")
    assert attempt(client, "alice", PASSWORD).status_code == 429

    later = time.time() + 901
    monkeypatch.setattr(login_throttle, "_now", lambda: later)
    assert attempt(client, "alice", PASSWORD).status_code == 302
    assert signed_in(client)


def test_limits_and_window_come_from_settings(client, alice, settings):
    settings.PARLEY_LOGIN_MAX_FAILURES = 2
    settings.PARLEY_LOGIN_WINDOW_S = 120
    attempt(client, "alice", "wrong-password")
    assert attempt(client, "alice", "wrong-password").status_code == 200
    response = attempt(client, "alice", PASSWORD)
    assert response.status_code == 429
    assert "Try again in 2 minutes" in page(response)


def test_success_clears_the_username_count(client, alice):
    for _ in range(4):
        attempt(client, "alice", "wrong-password")
    assert attempt(client, "alice", PASSWORD).status_code == 302
    client.logout()
    for _ in range(4):
        assert attempt(client, "alice", "wrong-password").status_code == 200
    assert attempt(client, "alice", PASSWORD).status_code == 302


def test_username_counts_ignore_case(client, alice):
    for variant in ("ALICE", "Alice", "alicE", "aLice", "alice"):
        attempt(client, variant, "wrong-password")
    assert attempt(client, "alice", PASSWORD).status_code == 429


def test_unknown_usernames_lock_the_same_way(client, db):
    """No difference between existing and unknown accounts: nothing to enumerate."""
    for _ in range(5):
        assert attempt(client, "nobody", "wrong-password").status_code == 200
    response = attempt(client, "nobody", "any-password")
    assert response.status_code == 429
    assert "Too many failed sign-in attempts for this account" in page(response)


def test_one_address_failing_for_many_usernames_is_locked(client, alice, password_checks):
    for n in range(20):
        assert attempt(client, f"user-{n}", "wrong-password").status_code == 200
    response = attempt(client, "alice", PASSWORD)
    assert response.status_code == 429
    assert "Too many failed sign-in attempts from your network" in page(response)
    assert "alice" not in password_checks
    # Alice herself, elsewhere, is not locked.
    assert attempt(client, "alice", PASSWORD, ip=OTHER_IP).status_code == 302


def test_address_limit_comes_from_settings(client, alice, settings):
    settings.PARLEY_LOGIN_MAX_FAILURES_PER_IP = 3
    for n in range(3):
        attempt(client, f"user-{n}", "wrong-password")
    assert attempt(client, "alice", PASSWORD).status_code == 429


def test_empty_submissions_are_not_counted(client, alice):
    for _ in range(10):
        client.post(LOGIN, {"username": "alice", "password": ""}, REMOTE_ADDR=IP)
    assert attempt(client, "alice", PASSWORD).status_code == 302


def test_login_page_links_to_password_reset(client):
    response = client.get(LOGIN)
    assert response.status_code == 200
    assert 'href="/accounts/password_reset/"' in response.content.decode()


def test_bad_limit_stops_start_up(tmp_path):
    result = manage("check", env={"PARLEY_LOGIN_MAX_FAILURES": "0"}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "PARLEY_LOGIN_MAX_FAILURES must be at least 1, not 0" in result.stderr
