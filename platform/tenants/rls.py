"""PostgreSQL Row Level Security: the second wall of tenant isolation.

Every tenant-owned table has a policy on `tenant_id` against the transaction-local
setting `app.tenant_id` (set with `set_config(..., true)`), is FORCEd (the owner is
subject too), and the application connects as a role that does not own the tables
and has no BYPASSRLS. No tenant set means no rows.

`tenant_scope` is how code says whose data it works on: it opens a transaction and
sets `app.tenant_id`, `app.user_id` (a user sees their own memberships, to find their
tenants) and `app.operator` (platform staff, and the few narrow lookups that must
precede knowing the tenant, such as finding an API key by its prefix). Because the
settings are transaction-local, a pooled connection never carries them over.

SQLite (embedded mode) has no RLS: there `tenant_scope` only records the scope, and
the first wall (access functions scoping every query) stands alone.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from django.db import connections, migrations, transaction
from django.db.migrations.operations.base import Operation

T = TypeVar("T")

TENANT_SETTING = "app.tenant_id"
USER_SETTING = "app.user_id"
OPERATOR_SETTING = "app.operator"


@dataclass(frozen=True)
class Scope:
    tenant_id: str = ""
    user_id: str = ""
    operator: bool = False


EMPTY = Scope()
_current: ContextVar[Scope] = ContextVar("parley_tenant_scope", default=EMPTY)


def _text(value: Any) -> str:
    return str(uuid.UUID(str(value))) if value else ""


def rls_enforced(using: str = "default") -> bool:
    return connections[using].vendor == "postgresql"


def current_scope() -> Scope:
    return _current.get()


SCOPE_SQL = "SELECT set_config(%s, %s, true), set_config(%s, %s, true), set_config(%s, %s, true)"


def scope_params(scope: Scope) -> list[str]:
    """The parameters of SCOPE_SQL, the statement that sets `scope` for the current
    transaction (also sent ahead of another statement in one query string)."""
    return [
        TENANT_SETTING,
        scope.tenant_id,
        USER_SETTING,
        scope.user_id,
        OPERATOR_SETTING,
        "on" if scope.operator else "",
    ]


def tenant_only(tenant_id: Any) -> Scope:
    """The scope of a tenant with no user (a task's, a ledger batch's)."""
    return Scope(tenant_id=_text(tenant_id))


def _apply(scope: Scope, using: str) -> None:
    with connections[using].cursor() as cursor:
        cursor.execute(SCOPE_SQL, scope_params(scope))


@contextmanager
def tenant_scope(
    *, tenant_id: Any = None, user_id: Any = None, operator: bool = False, using: str = "default"
) -> Iterator[Scope]:
    """Run the block in a transaction scoped to this tenant (and user). Nested scopes
    are savepoints; leaving one restores the outer scope's settings."""
    scope = Scope(tenant_id=_text(tenant_id), user_id=_text(user_id), operator=operator)
    outer = _current.get()
    token = _current.set(scope)
    try:
        if not rls_enforced(using):
            yield scope
            return
        with transaction.atomic(using=using):
            _apply(scope, using)
            yield scope
    finally:
        _current.reset(token)
        if rls_enforced(using) and connections[using].in_atomic_block:
            # RELEASE SAVEPOINT keeps what the inner scope set: put the outer one back.
            _apply(outer, using)


def scope_set_tenant(tenant_id: Any, using: str = "default") -> None:
    """Narrow the current scope to a tenant, once the actor is known (the web request
    first finds the user's memberships under the user's scope)."""
    scope = Scope(
        tenant_id=_text(tenant_id), user_id=_current.get().user_id, operator=_current.get().operator
    )
    _current.set(scope)
    if rls_enforced(using) and connections[using].in_atomic_block:
        _apply(scope, using)


def in_tenant(tenant_id: Any, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with tenant_scope(tenant_id=tenant_id):
        return fn(*args, **kwargs)


@contextmanager
def operator_scope(using: str = "default") -> Iterator[Scope]:
    """Every tenant's rows: platform staff, and lookups that precede knowing the tenant."""
    with tenant_scope(operator=True, using=using) as scope:
        yield scope


# --- policies, created by migrations ----------------------------------------------------

_CURRENT_TENANT = f"NULLIF(current_setting('{TENANT_SETTING}', true), '')::uuid"
_CURRENT_USER = f"NULLIF(current_setting('{USER_SETTING}', true), '')::uuid"
_OPERATOR = f"current_setting('{OPERATOR_SETTING}', true) = 'on'"

POLICIES = {
    # Rows of the current tenant.
    "tenant": (f"tenant_id = {_CURRENT_TENANT}", f"tenant_id = {_CURRENT_TENANT}"),
    # Memberships: the tenant's, and the current user's own (to list their tenants).
    "membership": (
        f"tenant_id = {_CURRENT_TENANT} OR user_id = {_CURRENT_USER}",
        f"tenant_id = {_CURRENT_TENANT}",
    ),
    # Tenants: the current one, and those the current user belongs to.
    "tenant_row": (
        f"id = {_CURRENT_TENANT} OR id IN (SELECT tenant_id FROM tenants_membership "  # noqa: S608
        f"WHERE user_id = {_CURRENT_USER})",
        f"id = {_CURRENT_TENANT}",
    ),
}


class AddIndexOnPostgres(migrations.AddIndex):
    """An index only PostgreSQL can build (full-text GIN): skipped on the embedded
    SQLite database, where the queries that would use it take a simpler path."""

    def database_forwards(self, app_label: str, schema_editor: Any, *args: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, *args)

    def database_backwards(self, app_label: str, schema_editor: Any, *args: Any) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, *args)


class AddFieldBesidePostgresIndexes(migrations.AddField):
    """AddField on a table that has an index only PostgreSQL can build
    (AddIndexOnPostgres). SQLite adds such a column by remaking the table, which
    builds the model's indexes anew: there the PostgreSQL-only ones are left out."""

    def database_forwards(self, app_label: str, schema_editor: Any, from_state, to_state) -> None:
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)
            return
        from django.contrib.postgres.indexes import PostgresIndex

        meta = from_state.apps.get_model(app_label, self.model_name)._meta
        kept = meta.indexes
        meta.indexes = [index for index in kept if not isinstance(index, PostgresIndex)]
        try:
            super().database_forwards(app_label, schema_editor, from_state, to_state)
        finally:
            meta.indexes = kept


class EnableRowLevelSecurity(Operation):
    """Migration operation: enable and force RLS on a table with one of POLICIES.
    A no-op on databases without RLS (SQLite)."""

    reversible = True
    reduces_to_sql = True

    def __init__(self, table: str, policy: str = "tenant") -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy kind {policy!r}")
        self.table = table
        self.policy = policy

    def state_forwards(self, app_label: str, state: Any) -> None:
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        using, check = POLICIES[self.policy]
        table = schema_editor.quote_name(self.table)
        schema_editor.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        schema_editor.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        schema_editor.execute(f"DROP POLICY IF EXISTS parley_isolation ON {table}")
        schema_editor.execute(
            f"CREATE POLICY parley_isolation ON {table} "
            f"USING ({using} OR {_OPERATOR}) WITH CHECK ({check} OR {_OPERATOR})"
        )

    def database_backwards(self, app_label, schema_editor, from_state, to_state) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        table = schema_editor.quote_name(self.table)
        schema_editor.execute(f"DROP POLICY IF EXISTS parley_isolation ON {table}")
        schema_editor.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
        schema_editor.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")

    def describe(self) -> str:
        return f"Enable row level security on {self.table} ({self.policy} policy)"

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        return (self.__class__.__qualname__, [], {"table": self.table, "policy": self.policy})


class AppendOnly(Operation):
    """Migration operation: PostgreSQL refuses UPDATE and DELETE on the table."""

    reversible = True
    reduces_to_sql = True

    def __init__(self, table: str) -> None:
        self.table = table

    def state_forwards(self, app_label: str, state: Any) -> None:
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        table = schema_editor.quote_name(self.table)
        schema_editor.execute(
            "CREATE OR REPLACE FUNCTION parley_append_only() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION '%% is append-only', TG_TABLE_NAME; END $$"
        )
        schema_editor.execute(
            f"CREATE TRIGGER parley_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION parley_append_only()"
        )

    def database_backwards(self, app_label, schema_editor, from_state, to_state) -> None:
        if schema_editor.connection.vendor != "postgresql":
            return
        table = schema_editor.quote_name(self.table)
        schema_editor.execute(f"DROP TRIGGER IF EXISTS parley_append_only ON {table}")

    def describe(self) -> str:
        return f"Make {self.table} append-only"

    def deconstruct(self) -> tuple[str, list[Any], dict[str, Any]]:
        return (self.__class__.__qualname__, [], {"table": self.table})


def grant_app_role(role: str, using: str = "default") -> None:
    """Give the application role what it needs on the schema, and no more: no
    ownership, no TRUNCATE, no BYPASSRLS. Run by `migrate` as the owner."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return
    quoted = connection.ops.quote_name(role)
    with connection.cursor() as cursor:
        cursor.execute(f"GRANT USAGE ON SCHEMA public TO {quoted}")
        cursor.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {quoted}"
        )
        cursor.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {quoted}")
        cursor.execute("SELECT current_user")
        if cursor.fetchone()[0] != role:
            _search_policies_create(cursor)


# Tables searched by a SECURITY DEFINER function of their own (the migrations that
# create parley_message_search and parley_chunk_search say why).
SEARCHED_TABLES = ("chat_message", "documents_chunk")


def _search_policies_create(cursor: Any) -> None:
    """Let the owner read the searched tables, so that the search functions, which run
    as the owner and apply the tenant filter themselves, can use their full-text
    indexes: row level security would keep a non-leakproof `@@` off the index.

    Only where the application connects as another role (`migrate` with
    DATABASE_OWNER_URL): a deployment whose application role owns the tables would
    otherwise lose row level security on them. The owner could anyway turn row level
    security off on its own tables; the application role gains nothing."""
    for table in SEARCHED_TABLES:
        cursor.execute("SELECT to_regclass(%s)", [table])
        if cursor.fetchone()[0] is None:
            continue
        cursor.execute(f"DROP POLICY IF EXISTS parley_search ON {table}")
        cursor.execute(
            f"CREATE POLICY parley_search ON {table} FOR SELECT TO CURRENT_USER USING (true)"
        )
