"""Full-text search of chunks: a GIN index on the chunk text, and the function that
searches it past row level security (which applies the tenant filter itself).

Under row level security PostgreSQL uses an index only for leakproof operators, and
`@@` is not one: the function runs as the tables' owner (SECURITY DEFINER), to whom
`tenants.rls.grant_app_role` gives a read policy, and filters on the transaction's
`app.tenant_id` itself. The words of the query are OR-ed (a question's words are not
all in the passage that answers it); ts_rank orders the chunks.
"""

from django.db import migrations

OR_QUERY = r"""
CREATE OR REPLACE FUNCTION parley_or_tsquery(text) RETURNS tsquery
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog
AS $$
SELECT to_tsquery('simple', coalesce(string_agg(quote_literal(lexeme), ' | '), ''))
FROM unnest(to_tsvector('english'::regconfig, $1))
$$
"""

SEARCH = r"""
CREATE OR REPLACE FUNCTION parley_chunk_search(uuid[], text, integer)
RETURNS TABLE (chunk_id bigint, rank real)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
AS $$
SELECT c.id, ts_rank(to_tsvector('english'::regconfig, c.text), q.query) AS rank
FROM documents_chunk c, parley_or_tsquery($2) q(query)
WHERE c.tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid
  AND c.document_id = ANY ($1)
  AND to_tsvector('english'::regconfig, c.text) @@ q.query
ORDER BY rank DESC, c.id
LIMIT $3
$$
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(
        "CREATE INDEX IF NOT EXISTS documents_chunk_text_fts ON documents_chunk "
        "USING gin (to_tsvector('english'::regconfig, text))"
    )
    schema_editor.execute(OR_QUERY)
    schema_editor.execute(SEARCH)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute("DROP FUNCTION IF EXISTS parley_chunk_search(uuid[], text, integer)")
    schema_editor.execute("DROP FUNCTION IF EXISTS parley_or_tsquery(text)")
    schema_editor.execute("DROP INDEX IF EXISTS documents_chunk_text_fts")


class Migration(migrations.Migration):
    dependencies = [
        ("documents", "0003_ingest_restarts"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
