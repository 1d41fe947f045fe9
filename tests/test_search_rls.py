"""The full-text searches use their GIN indexes under row level security.

PostgreSQL applies a row level security policy before any non-leakproof condition, so
`tsvector @@ tsquery` (not leakproof) cannot be an index condition for the application
role: a search would read every row of the tenant. `parley_message_search` and
`parley_chunk_search` run as the tables' owner and apply the tenant filter themselves;
`tenants.rls.grant_app_role` gives the owner a read policy on the searched tables.

The tests' owner is a superuser, which bypasses row level security anyway: these tests
hand the tables and the functions, inside a transaction that is rolled back, to a plain
role that owns them as in a production deployment (FORCE ROW LEVEL SECURITY applies to
it), and read the plan of each function's own body as that role.
"""

from __future__ import annotations

import os
import uuid

import psycopg
import pytest
from django.db import connection

from config import env
from tenants.rls import SEARCHED_TABLES, _search_policies_create

pytestmark = pytest.mark.django_db

TENANT, USER, DOCUMENT = (str(uuid.uuid4()) for _ in range(3))

FUNCTIONS = {
    # function: its argument types, arguments, the tables it reads, the index it should
    # use, and rows that make that index the best plan (a member with many messages, a
    # long document; foreign keys are not checked while they are written).
    "parley_message_search": (
        "uuid, text",
        [USER, "llamas"],
        ["chat_message", "chat_conversation"],
        "chat_message_content_fts",
        f"""
        INSERT INTO chat_conversation (id, tenant_id, user_id, title, title_auto, model, agent,
                                      created_at, updated_at)
        SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, '{TENANT}',
               '{USER}', 't', false, '', '', now(), now()
        FROM generate_series(1, 200) g;
        INSERT INTO chat_message (id, tenant_id, conversation_id, role, content, steps,
                                  document_ids, documents, created_at)
        SELECT gen_random_uuid(), '{TENANT}',
               ('00000000-0000-0000-0000-' || lpad((g % 200 + 1)::text, 12, '0'))::uuid,
               'user', 'note ' || g || CASE WHEN g % 500 = 0 THEN ' llamas' ELSE ' cows' END,
               '[]', '[]', '{{}}', now()
        FROM generate_series(1, 20000) g;
        """,
    ),
    "parley_chunk_search": (
        "uuid[], text, integer",
        [[DOCUMENT], "which licence applies to llamas", 50],
        ["documents_chunk", "documents_document"],
        "documents_chunk_text_fts",
        f"""
        INSERT INTO documents_document (id, tenant_id, owner_id, title, filename, media_type,
                                        size_bytes, sha256, state, error_message, stage,
                                        progress_done, ingest_restarts, file_name,
                                        embedding_model, created_at, updated_at)
        VALUES ('{DOCUMENT}', '{TENANT}', '{USER}', 'Farm-rules.txt', '', 'text/plain', 1,
                '', 'ready', '', '', 0, 0, 'x', '', now(), now());
        INSERT INTO documents_chunk (tenant_id, document_id, index, text, page_start, page_end,
                                     char_start, char_end, token_count)
        SELECT '{TENANT}', '{DOCUMENT}', g,
               'clause ' || g || CASE WHEN g % 500 = 0 THEN ' llamas' ELSE ' cows' END,
               1, 1, 0, 10, 3
        FROM generate_series(1, 20000) g;
        """,
    ),
}


def _owner_connection() -> psycopg.Connection:
    owner = env.database("DATABASE_URL")  # this session's owner role (tests/conftest.py)
    return psycopg.connect(
        host=owner["HOST"] or None,
        port=owner["PORT"] or None,
        user=owner["USER"],
        password=owner["PASSWORD"] or None,
        dbname=connection.settings_dict["NAME"],
    )


def _plan_as_plain_owner(function: str, *, with_policy: bool) -> str:
    types, args, tables, index, rows = FUNCTIONS[function]
    role = f"parley_probe_owner_{os.getpid()}"
    with _owner_connection() as conn:
        try:
            # Parameters inlined by the client: EXPLAIN EXECUTE takes no bound ones.
            cursor = psycopg.ClientCursor(conn)
            cursor.execute("SET LOCAL session_replication_role = replica")
            cursor.execute(rows)
            cursor.execute("SET LOCAL session_replication_role = origin")
            # As a vacuum would: the rows leave GIN's pending list for the index proper
            # (the planner prices a long pending list, and rolled-back runs leave one).
            cursor.execute("SELECT gin_clean_pending_list(%s::regclass)", [index])
            for table in tables:
                cursor.execute(f"ANALYZE {table}")
            cursor.execute(f"CREATE ROLE {role} NOLOGIN NOSUPERUSER NOBYPASSRLS")
            for table in {*tables, *SEARCHED_TABLES}:
                cursor.execute(f"ALTER TABLE {table} OWNER TO {role}")
            cursor.execute(f"ALTER FUNCTION {function}({types}) OWNER TO {role}")
            cursor.execute(
                "SELECT prosrc FROM pg_proc WHERE proname = %s", [function], prepare=False
            )
            body = cursor.fetchone()[0]
            cursor.execute(f"SET ROLE {role}")
            cursor.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", [role])
            assert cursor.fetchone() == (False, False)
            if with_policy:
                _search_policies_create(cursor)
            cursor.execute("SELECT set_config('app.tenant_id', %s, true)", [TENANT])
            # A SQL function's statements are planned without its arguments' values.
            cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            cursor.execute(f"PREPARE probe ({types}) AS {body}", prepare=False)
            cursor.execute(
                f"EXPLAIN EXECUTE probe ({', '.join(['%s'] * len(args))})", args, prepare=False
            )
            return "\n".join(row[0] for row in cursor.fetchall())
        finally:
            conn.rollback()


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row level security")
@pytest.mark.parametrize("function", FUNCTIONS)
def test_search_functions_use_their_full_text_index_under_row_level_security(function):
    index = FUNCTIONS[function][3]
    assert index in _plan_as_plain_owner(function, with_policy=True)
    # Without the owner's read policy, row level security keeps `@@` off the index.
    assert index not in _plan_as_plain_owner(function, with_policy=False)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="row level security")
def test_the_owner_read_policy_is_not_given_when_the_application_owns_the_tables():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tablename, roles FROM pg_policies WHERE policyname = 'parley_search'"
        )
        policies = dict(cursor.fetchall())
    # The application role reads under the tenant policy alone.
    assert set(policies) == set(SEARCHED_TABLES)
    assert all("parley_app" not in roles for roles in policies.values()), policies
