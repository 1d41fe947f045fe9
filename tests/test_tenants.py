"""Tenants, owners, the demo seed, login and logout, and who a user acts as."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.urls import reverse

from tenants.access import SESSION_TENANT_KEY, actor_for_user
from tenants.models import Membership, Plan, Role, Tenant, User
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
        assert sorted(Plan.objects.values_list("name", flat=True)) == [
            "Enterprise",
            "Free",
            "Team",
        ]


def test_seed_demo_shows_the_product(capsys, all_plugins):
    """The demo tenant is on a plan with its built-in agents enabled (the agent picker
    shows them), and there is an operator whose home is the operator's page."""
    from agents.selectors import agents_available

    call_command("seed_demo")
    with operator_scope():
        tenant = Tenant.objects.select_related("plan").get(slug="demo")
    assert tenant.plan.name == "Team"
    demo = User.objects.get(username="demo")
    with tenant_scope(tenant_id=tenant.id):
        actor = actor_for_user(demo, tenant_id=tenant.id)
        agents = [agent.id for agent in agents_available(actor=actor)]
    assert "calculator.calculator" in agents
    # The test-only example plugin is installed here but is not built in: not enabled.
    assert not any(key.startswith("example_lookup") for key in agents)
    operator = User.objects.get(username="operator")
    assert operator.is_operator and operator.check_password("parley-operator")
    assert "operator / parley-operator" in capsys.readouterr().out


def test_an_operator_lands_on_the_operator_page(client):
    call_command("seed_demo")
    client.login(username="operator", password="parley-operator")
    response = client.get(reverse("chat:home"))
    assert response.status_code == 302 and response["Location"] == "/operator/"
    page = client.get("/operator/").content.decode()
    assert "Demo Company" in page and "Team" in page and "/api/v1/docs" in page


def test_the_operator_page_is_not_found_for_members(client, alice):
    client.login(username="alice", password=PASSWORD)
    assert client.get("/operator/").status_code == 404


def test_operator_create_makes_or_promotes_an_operator(capsys, alice, monkeypatch):
    call_command("operator_create", "olga", "--password", "a-long-unusual-pass")
    assert User.objects.get(username="olga").is_operator
    assert "Created operator olga" in capsys.readouterr().out
    call_command("operator_create", "alice")  # an existing user keeps their password
    promoted = User.objects.get(username="alice")
    assert promoted.is_operator and promoted.check_password(PASSWORD)
    monkeypatch.setenv("PARLEY_OPERATOR_PASSWORD", "short")
    with pytest.raises(CommandError, match="too short"):
        call_command("operator_create", "oscar")
    with pytest.raises(CommandError, match="needs a password"):
        monkeypatch.delenv("PARLEY_OPERATOR_PASSWORD")
        call_command("operator_create", "oscar")
    assert not User.objects.filter(username="oscar").exists()


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


def test_a_new_installation_has_the_default_plans():
    """The migration creates the plans seed_demo ensures, with the same limits: an
    operator can put a tenant on "Team" at once."""
    import importlib

    from tenants.services.operators import DEFAULT_PLANS, plans_seed

    migration = importlib.import_module("tenants.migrations.0004_default_plans")
    assert migration.PLANS == DEFAULT_PLANS
    plans_seed()  # (a test database may have been emptied by an earlier test)
    with operator_scope():
        team = Plan.objects.get(name="Team")
    assert team.requests_per_minute == DEFAULT_PLANS["Team"]["requests_per_minute"]
