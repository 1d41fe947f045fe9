"""Switching tenants: a member of several tenants picks the current one in the header;
only their own memberships can be chosen (anything else is a 404)."""

from __future__ import annotations

import re
import uuid

import pytest
from django.test import Client

from tenants.access import SESSION_TENANT_KEY
from tenants.models import Membership
from tenants.rls import operator_scope
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db

SWITCH = "/tenants/switch/"


def as_user(person) -> Client:
    client = Client()
    client.force_login(person.user)
    return client


def header(page: str) -> str:
    return re.search(r"<header.*?</header>", page, re.S).group(0)


def selected(page: str) -> list[str]:
    return re.findall(r'<option value="([0-9a-f-]+)" selected>', header(page))


@pytest.fixture
def bob_in_two(bob, charlie):
    """bob: member of tenant A (first) and of charlie's tenant B."""
    MembershipFactory(tenant=charlie.tenant, user=bob.user)
    return bob


def test_a_member_of_several_tenants_switches_in_the_header(alice, bob_in_two, charlie):
    client = as_user(bob_in_two)
    page = client.get("/").content.decode()
    bar = header(page)
    assert f'action="{SWITCH}"' in bar
    assert '<select name="tenant"' in bar
    assert alice.tenant.name in bar
    assert charlie.tenant.name in bar
    assert selected(page) == [str(alice.tenant.id)]

    response = client.post(SWITCH, {"tenant": str(charlie.tenant.id)})
    assert response.status_code == 302
    assert response["Location"] == "/"
    assert client.session[SESSION_TENANT_KEY] == str(charlie.tenant.id)
    assert selected(client.get("/").content.decode()) == [str(charlie.tenant.id)]
    assert {m["username"] for m in client.get("/api/v1/members").json()} == {"charlie", "bob"}

    assert client.post(SWITCH, {"tenant": str(alice.tenant.id)}).status_code == 302
    assert client.session[SESSION_TENANT_KEY] == str(alice.tenant.id)
    assert {m["username"] for m in client.get("/api/v1/members").json()} == {"alice", "bob"}


def test_the_switcher_uses_no_inline_script(bob_in_two):
    page = as_user(bob_in_two).get("/").content.decode()
    bar = header(page)
    assert "<script" not in bar
    assert not re.search(r"\son[a-z]+=", bar)
    # Every script on the page is a file of Parley's own (or JSON data), as the CSP demands.
    scripts = re.findall(r"<script[^>]*>", page)
    assert scripts
    assert all("src=" in tag or 'type="application/json"' in tag for tag in scripts)


def test_a_member_of_one_tenant_sees_its_name_and_no_select(alice):
    page = as_user(alice).get("/").content.decode()
    bar = header(page)
    assert alice.tenant.name in bar
    assert "<select" not in bar


@pytest.mark.parametrize("tenant", ["foreign", "random", "malformed", "missing"])
def test_only_own_tenants_can_be_chosen(alice, charlie, tenant):
    client = as_user(alice)
    data = {
        "foreign": {"tenant": str(charlie.tenant.id)},
        "random": {"tenant": str(uuid.uuid4())},
        "malformed": {"tenant": "not-a-uuid"},
        "missing": {},
    }[tenant]
    response = client.post(SWITCH, data)
    assert response.status_code == 404
    assert SESSION_TENANT_KEY not in client.session
    assert {m["username"] for m in client.get("/api/v1/members").json()} == {"alice"}


def test_a_tenant_one_has_left_can_no_longer_be_chosen(alice, bob_in_two, charlie):
    client = as_user(bob_in_two)
    with operator_scope():
        Membership.objects.filter(tenant=charlie.tenant, user=bob_in_two.user).delete()
    assert client.post(SWITCH, {"tenant": str(charlie.tenant.id)}).status_code == 404
    assert SESSION_TENANT_KEY not in client.session


def test_switching_needs_a_signed_in_post(alice):
    assert as_user(alice).get(SWITCH).status_code == 405
    response = Client().post(SWITCH, {"tenant": str(alice.tenant.id)})
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_the_tenants_page_lists_ones_tenants_and_offers_to_leave_the_current(
    alice, bob_in_two, charlie
):
    client = as_user(bob_in_two)
    page = client.get("/tenants/").content.decode()
    assert alice.tenant.name in page
    assert charlie.tenant.name in page
    assert f"Leave {alice.tenant.name}" in page
    assert f'name="tenant" value="{charlie.tenant.id}"' in page
    # An outsider's page shows only their own.
    other = as_user(charlie).get("/tenants/").content.decode()
    assert alice.tenant.name not in other


def test_the_selector_finds_only_ones_own_memberships_even_past_row_level_security(
    alice, bob_in_two, charlie
):
    """The first wall on its own: with every row visible, another person's membership
    in a tenant is still not yours."""
    from tenants.access import NotFound
    from tenants.selectors import membership_of_user

    with operator_scope():
        assert membership_of_user(user=bob_in_two.user, tenant_id=charlie.tenant.id).user_id == (
            bob_in_two.user.id
        )
        with pytest.raises(NotFound):
            membership_of_user(user=alice.user, tenant_id=charlie.tenant.id)
        with pytest.raises(NotFound):
            membership_of_user(user=alice.user, tenant_id="not-a-uuid")
