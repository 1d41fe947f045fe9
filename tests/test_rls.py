"""The second wall: PostgreSQL row level security, seen as the application role."""

from __future__ import annotations

import random
import threading

import psycopg
import pytest
from django.apps import apps
from django.db import connection

from agents.models import TenantPlugin
from chat.models import Conversation, Message
from documents.models import Chunk, Document, Page, ReviewStep, ReviewTemplate
from inference.models import UsageRecord
from sandbox.models import Artifact, Workspace
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, Tenant, TenantSSO
from tenants.rls import operator_scope, tenant_scope
from tests.conftest import APP_ROLE
from tests.factories import ConversationFactory, MessageFactory, RunFactory

pytestmark = pytest.mark.django_db(transaction=True)


def tenant_owned_tables() -> list[str]:
    """Every table whose rows belong to a tenant: a `tenant` field, or the tenants."""
    tables = [Tenant._meta.db_table]
    for model in apps.get_models():
        if any(field.name == "tenant" for field in model._meta.get_fields()):
            tables.append(model._meta.db_table)
    return sorted(tables)


def app_connection() -> psycopg.Connection:
    settings = connection.settings_dict
    return psycopg.connect(
        host=settings["HOST"] or None,
        port=settings["PORT"] or None,
        dbname=settings["NAME"],
        user=APP_ROLE,
        autocommit=False,
    )


@pytest.fixture
def two_tenants(alice, charlie):
    """A conversation with a message and a run, an invitation, a key and an audit
    event (and a row of every other tenant-owned table) in each of two tenants."""
    with operator_scope():
        for person in (alice, charlie):
            conversation = ConversationFactory(
                tenant=person.tenant, user=person.user, title=f"{person.user.username}'s"
            )
            RunFactory(user_message=MessageFactory(conversation=conversation, content="hi"))
            Invitation.objects.create(
                tenant=person.tenant,
                email="x@example.com",
                token_hash=f"{person.user.username:0<64}",
                expires_at="2030-01-01T00:00:00Z",
            )
            ApiKey.objects.create(
                tenant=person.tenant, name="ci", prefix=person.user.username, secret_hash="0" * 64
            )
            AuditEvent.objects.create(tenant=person.tenant, action="test.seeded")
            TenantSSO.objects.create(
                tenant=person.tenant, issuer="https://idp.example.com", client_id="parley"
            )
            UsageRecord.objects.create(
                tenant=person.tenant, model="m", prompt_tokens=1, outcome="completed"
            )
            TenantPlugin.objects.create(tenant=person.tenant, plugin="calculator")
            document = Document.objects.create(
                tenant=person.tenant,
                owner=person.user,
                title="notes",
                media_type=Document.MediaType.TEXT,
                size_bytes=2,
                sha256="0" * 64,
                file_name=f"{person.tenant.id}/notes",
            )
            Page.objects.create(tenant=person.tenant, document=document, number=1, text="hi")
            Chunk.objects.create(
                tenant=person.tenant,
                document=document,
                index=0,
                text="hi",
                page_start=1,
                page_end=1,
                char_start=0,
                char_end=2,
                embedding=[0.25, -1.0],
            )
            ReviewTemplate.objects.create(
                tenant=person.tenant, kind="summary", name="Brief", instructions="Summarise."
            )
            ReviewStep.objects.create(
                tenant=person.tenant,
                document_sha256="0" * 64,
                task="t",
                model="m",
                step="map:0:x",
                output={"summary": "", "items": []},
            )
            Workspace.objects.create(
                tenant=person.tenant,
                owner=person.user,
                conversation_id=conversation.id,
                file_name=f"{person.tenant.id}/workspaces/w.tar",
            )
            Artifact.objects.create(
                tenant=person.tenant,
                owner=person.user,
                conversation_id=conversation.id,
                name="plot.png",
                media_type="image/png",
                size_bytes=8,
                sha256="0" * 64,
                file_name=f"{person.tenant.id}/artifacts/a",
            )
    return alice, charlie


def test_every_tenant_owned_table_has_forced_row_level_security():
    tables = tenant_owned_tables()
    assert {
        "chat_conversation",
        "chat_message",
        "chat_run",
        "tenants_membership",
        "tenants_apikey",
        "tenants_auditevent",
        "tenants_tenant",
        "documents_document",
        "documents_page",
        "documents_chunk",
        "documents_reviewtemplate",
        "documents_reviewstep",
        "sandbox_workspace",
        "sandbox_artifact",
    } <= set(tables)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
            "WHERE relname = ANY(%s)",
            [tables],
        )
        flags = {name: (enabled, forced) for name, enabled, forced in cursor.fetchall()}
    assert flags == {table: (True, True) for table in tables}


def test_the_app_role_owns_nothing_and_cannot_bypass(two_tenants):
    with app_connection() as conn:
        role = conn.execute(
            "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert role == (False, False)
        owned = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' "
            "AND tableowner = current_user"
        ).fetchone()[0]
        assert owned == 0


def test_without_a_tenant_every_tenant_owned_table_is_empty(two_tenants):
    with app_connection() as conn:
        for table in tenant_owned_tables():
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
        conn.rollback()
    with operator_scope():
        assert Conversation.objects.count() == 2  # the rows are there


def test_with_tenant_a_set_no_row_of_tenant_b_appears(two_tenants):
    alice, _charlie = two_tenants
    with app_connection() as conn:
        conn.execute("SELECT set_config('app.tenant_id', %s, true)", [str(alice.tenant.id)])
        for table in tenant_owned_tables():
            column = "id" if table == "tenants_tenant" else "tenant_id"
            seen = {row[0] for row in conn.execute(f"SELECT {column} FROM {table}")}
            assert seen == {alice.tenant.id}, table
        conn.rollback()


def test_the_orm_sees_only_the_scoped_tenant(two_tenants):
    _alice, charlie = two_tenants
    assert Conversation.objects.count() == 0
    with tenant_scope(tenant_id=charlie.tenant.id):
        assert list(Conversation.objects.values_list("tenant_id", flat=True)) == [charlie.tenant.id]
        assert Tenant.objects.get().id == charlie.tenant.id
    assert Conversation.objects.count() == 0


def test_writes_into_another_tenant_are_refused(two_tenants):
    alice, charlie = two_tenants
    from django.db import ProgrammingError

    with (
        pytest.raises(ProgrammingError, match="row-level security"),
        tenant_scope(tenant_id=alice.tenant.id),
    ):
        Conversation.objects.create(tenant=charlie.tenant, user=charlie.user, title="sneaky")
    with tenant_scope(tenant_id=alice.tenant.id):
        # Another tenant's rows are invisible to UPDATE and DELETE too.
        assert Conversation.objects.filter(tenant=charlie.tenant).update(title="x") == 0
        assert Message.objects.filter(tenant=charlie.tenant).delete()[0] == 0
    with operator_scope():
        assert Conversation.objects.filter(title="charlie's").count() == 1


@pytest.mark.parametrize(
    "statement",
    [
        "ALTER TABLE chat_message DISABLE ROW LEVEL SECURITY",
        "ALTER TABLE chat_message NO FORCE ROW LEVEL SECURITY",
        "DROP POLICY parley_isolation ON chat_message",
        "ALTER ROLE current_user BYPASSRLS",
    ],
)
def test_the_app_role_cannot_disable_row_level_security(two_tenants, statement):
    with app_connection() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(statement)


def test_row_security_off_refuses_instead_of_leaking(two_tenants):
    with app_connection() as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("SET row_security = off")
        conn.execute("SELECT count(*) FROM chat_message").fetchone()


def test_a_user_sees_their_own_memberships_and_tenants_only(two_tenants):
    alice, _charlie = two_tenants
    with tenant_scope(user_id=alice.user.id):
        assert list(Membership.objects.values_list("user__username", flat=True)) == ["alice"]
        assert list(Tenant.objects.values_list("id", flat=True)) == [alice.tenant.id]
        assert Conversation.objects.count() == 0


def test_the_audit_log_is_append_only(two_tenants):
    with app_connection() as conn:
        conn.execute("SELECT set_config('app.operator', 'on', true)")
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("UPDATE tenants_auditevent SET action = 'forged'")
        conn.rollback()
        conn.execute("SELECT set_config('app.operator', 'on', true)")
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("DELETE FROM tenants_auditevent")


def test_two_tenants_through_one_pooled_connection_never_meet(two_tenants):
    """Two workers take turns on one shared connection (a pool of one), each in its own
    transactions; a transaction that sets no tenant sees nothing, so nothing carries over."""
    alice, charlie = two_tenants
    conn = app_connection()
    lock = threading.Lock()
    seen: dict[str, set] = {"alice": set(), "charlie": set(), "nobody": set()}
    errors: list[BaseException] = []

    def work(name: str, tenant_id: str | None, rounds: int) -> None:
        rng = random.Random(name)
        try:
            for _ in range(rounds):
                # Checking the one connection out of the pool:
                with lock, conn.transaction():
                    if tenant_id:
                        conn.execute("SELECT set_config('app.tenant_id', %s, true)", [tenant_id])
                    rows = conn.execute("SELECT tenant_id FROM chat_conversation").fetchall()
                    rows += conn.execute("SELECT tenant_id FROM chat_message").fetchall()
                    seen[name].update(row[0] for row in rows)
                if rng.random() < 0.5:
                    threading.Event().wait(0.001)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=("alice", str(alice.tenant.id), 200)),
        threading.Thread(target=work, args=("charlie", str(charlie.tenant.id), 200)),
        threading.Thread(target=work, args=("nobody", None, 200)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    conn.close()
    assert not errors
    assert seen == {"alice": {alice.tenant.id}, "charlie": {charlie.tenant.id}, "nobody": set()}


@pytest.fixture
def scratch_database():
    """An empty database, created and dropped as the owner."""
    settings = connection.settings_dict
    name = f"parley_scratch_{random.randrange(10**9)}"
    server = dict(
        host=settings["HOST"] or None,
        port=settings["PORT"] or None,
        user="postgres",
        dbname="postgres",
        autocommit=True,
    )
    with psycopg.connect(**server) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    host = f"{settings['HOST'] or '127.0.0.1'}:{settings['PORT'] or 5432}"
    yield name, host
    with psycopg.connect(**server) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrate_runs_as_the_owner_and_the_app_role_stays_subject_to_rls(scratch_database):
    import os
    import subprocess
    import sys
    from pathlib import Path

    name, host = scratch_database
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update(
        DATABASE_URL=f"postgres://{APP_ROLE}@{host}/{name}",
        DATABASE_OWNER_URL=f"postgres://postgres@{host}/{name}",
        REDIS_URL="redis://127.0.0.1:6379/15",
        DJANGO_SECRET_KEY="x" * 60,
        DJANGO_ALLOWED_HOSTS="localhost",
    )
    root = Path(__file__).resolve().parents[1]

    def manage(*args, **extra):
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=root,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=180,
        )

    result = manage("migrate", "--noinput")
    assert result.returncode == 0, result.stderr
    assert f"Granted the application role '{APP_ROLE}'" in result.stdout

    owner_url = f"postgres://postgres@{host}/{name}"
    with psycopg.connect(owner_url) as conn:
        owners = {
            row[0]
            for row in conn.execute(
                "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        assert owners == {"postgres"}
    with psycopg.connect(f"postgres://{APP_ROLE}@{host}/{name}") as conn:
        assert conn.execute("SELECT count(*) FROM chat_message").fetchone() == (0,)

    # The deployment check is content with the app role, and warns about the owner.
    result = manage("check", "--database", "default")
    assert result.returncode == 0, result.stderr
    assert "tenants.W001" not in result.stdout + result.stderr
    result = manage("check", "--database", "default", DATABASE_URL=owner_url)
    assert "tenants.W001" in result.stdout + result.stderr
