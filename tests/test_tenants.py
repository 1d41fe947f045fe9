"""Tenants, owners, the demo seed, login and logout, and who a user acts as."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.urls import reverse

from tenants.access import SESSION_TENANT_KEY, actor_for_user
from tenants.models import Membership, Role, Tenant, User
from tenants.rls import operator_scope, tenant_scope
from tenants.services.tenants import tenant_create
from tests.factories import PASSWORD

pytestmark = pytest.mark.django_db


def test_tenant_create_makes_the_owner():
    tenant, owner = tenant_create(
        name="Acme Corp", owner_username="ada", owner_password="a-long-unusual-pass"
    )
    assert tenant.slug == "acme-corp"
    assert owner.check_password("a-long-unusual-pass")
    with operator_scope():
        membership = Membership.objects.get(tenant=tenant, user=owner)
    assert membership.role == Role.OWNER


def test_tenant_create_refuses_bad_input_and_changes_nothing():
    tenant_create(name="Acme", owner_username="ada", owner_password="a-long-unusual-pass")
    with pytest.raises(ValidationError, match="already exists"):
        tenant_create(name="ACME", owner_username="bea", owner_password="a-long-unusual-pass")
    with pytest.raises(ValidationError, match="needs a name"):
        tenant_create(name="  ", owner_username="bea", owner_password="a-long-unusual-pass")
    with pytest.raises(ValidationError):
        tenant_create(name="Weak", owner_username="bea", owner_password="123")
    with pytest.raises(ValidationError, match="give their password"):
        tenant_create(name="Other", owner_username="ada", owner_password="wrong-password-1")
    with operator_scope():
        assert list(Tenant.objects.values_list("slug", flat=True)) == ["acme"]
    assert list(User.objects.values_list("username", flat=True)) == ["ada"]


def test_existing_user_can_own_a_second_tenant():
    tenant_create(name="One", owner_username="ada", owner_password="a-long-unusual-pass")
    _, owner = tenant_create(name="Two", owner_username="ada", owner_password="a-long-unusual-pass")
    with tenant_scope(user_id=owner.id):
        assert owner.memberships.count() == 2


def test_tenant_create_command(capsys):
    call_command("tenant_create", "Globex", "--owner", "hank", "--password", "a-long-unusual-pass")
    assert "Created tenant globex" in capsys.readouterr().out
    with pytest.raises(CommandError, match="already exists"):
        call_command("tenant_create", "Globex", "--owner", "x", "--password", "a-long-unusual-pass")


def test_seed_demo_is_idempotent(capsys):
    call_command("seed_demo")
    call_command("seed_demo")
    demo = User.objects.get(username="demo")
    assert demo.check_password("parley-demo")
    with operator_scope():
        assert Tenant.objects.filter(slug="demo").count() == 1
        assert Membership.objects.get(user=demo).role == Role.OWNER


def test_login_and_logout(client, alice):
    response = client.post(reverse("login"), {"username": "alice", "password": "nope"})
    assert response.status_code == 200
    assert "didn't match" in response.content.decode()

    response = client.post(reverse("login"), {"username": "alice", "password": PASSWORD})
    assert response.status_code == 302
    assert response["Location"] == reverse("chat:home")
    assert client.get(reverse("chat:home")).status_code == 200

    response = client.post(reverse("logout"))
    assert response.status_code == 302
    response = client.get(reverse("chat:home"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_a_session_cannot_choose_a_foreign_tenant(alice, charlie):
    with tenant_scope(user_id=alice.user.id):
        actor = actor_for_user(alice.user, tenant_id=charlie.tenant.id)
        assert actor is not None
        assert actor.tenant == alice.tenant
        assert actor_for_user(alice.user, tenant_id="garbage").tenant == alice.tenant


def test_a_session_chooses_among_own_tenants(client, alice, charlie):
    with operator_scope():
        Membership.objects.create(tenant=charlie.tenant, user=alice.user, role=Role.MEMBER)
    with tenant_scope(user_id=alice.user.id):
        assert actor_for_user(alice.user, tenant_id=charlie.tenant.id).tenant == charlie.tenant
    client.force_login(alice.user)
    session = client.session
    session[SESSION_TENANT_KEY] = str(charlie.tenant.id)
    session.save()
    assert charlie.tenant.name in client.get(reverse("chat:home")).content.decode()
