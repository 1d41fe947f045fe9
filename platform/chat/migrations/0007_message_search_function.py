"""The search of a member's messages past row level security, so it can use the
full-text index chat_message_content_fts.

Under row level security PostgreSQL uses an index only for leakproof operators, and
`@@` is not one. The function runs as the tables' owner (SECURITY DEFINER), to whom
`tenants.rls.grant_app_role` gives a read policy, and applies the tenant filter
itself, from the transaction's `app.tenant_id`. It returns each conversation's best
matching message (ts_rank, then the newest) with its rank.
"""

from django.db import migrations

SEARCH = r"""
CREATE OR REPLACE FUNCTION parley_message_search(uuid, text)
RETURNS TABLE (conversation_id uuid, message_id uuid, rank real)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
AS $$
SELECT DISTINCT ON (m.conversation_id) m.conversation_id, m.id,
       ts_rank(to_tsvector('english'::regconfig, COALESCE(m.content, '')), q.query) AS rank
FROM chat_message m
JOIN chat_conversation c ON c.id = m.conversation_id,
     websearch_to_tsquery('english'::regconfig, $2) q(query)
WHERE m.tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid
  AND c.tenant_id = m.tenant_id
  AND c.user_id = $1
  AND to_tsvector('english'::regconfig, COALESCE(m.content, '')) @@ q.query
ORDER BY m.conversation_id, rank DESC, m.created_at DESC
$$
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(SEARCH)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute("DROP FUNCTION IF EXISTS parley_message_search(uuid, text)")


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0006_message_steps"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
