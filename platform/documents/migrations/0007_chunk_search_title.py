"""Full-text ranking of chunks counts their document's title too: a question names the
document it is about ("under the Apache licence") far more often than the chunk that
answers it does. The title's words (split at `-`, `_` and `.`, as file names join
them) add to a chunk's rank; which chunks match is still decided on the chunk's own
text, through its GIN index (documents migration 0004 says why the function runs
past row level security)."""

from django.db import migrations

SEARCH = r"""
CREATE OR REPLACE FUNCTION parley_chunk_search(uuid[], text, integer)
RETURNS TABLE (chunk_id bigint, rank real)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public
AS $$
SELECT c.id,
       ts_rank(to_tsvector('english'::regconfig, c.text), q.query)
       + ts_rank(
           to_tsvector('english'::regconfig, regexp_replace(d.title, '[-_.]+', ' ', 'g')),
           q.query
         ) AS rank
FROM documents_chunk c
JOIN documents_document d ON d.id = c.document_id,
     parley_or_tsquery($2) q(query)
WHERE c.tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid
  AND c.document_id = ANY ($1)
  AND to_tsvector('english'::regconfig, c.text) @@ q.query
ORDER BY rank DESC, c.id
LIMIT $3
$$
"""

PREVIOUS = r"""
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
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(SEARCH)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(PREVIOUS)


class Migration(migrations.Migration):
    dependencies = [
        ("documents", "0006_reviews"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
