"""How fast does a document become searchable? A generated 300-page PDF and the licence
texts Debian ships (/usr/share/common-licenses) go through the real ingestion path:
upload (documents.services.document_upload), then the job (documents.ingest.document_ingest:
pages, chunks, embeddings, each stored in batches with progress). Reported: pages per
second end to end, the time of each stage, and in the same run the reference, the raw
work the pipeline cannot avoid: the parser alone (documents.parsing.iter_pages) plus the
embedding model alone (documents.embeddings.texts_embed over the same chunks' texts).
The ratio pipeline / reference is the pipeline's overhead (storage, progress, batching).

Goals (issue 13): 300 pages in at most 20 s on 2 cores, pipeline at most 1.3x its
reference.

    eval "$(bash tests/services.sh)"
    .venv/bin/python tests/bench/ingest.py --json
    .venv/bin/python tests/bench/ingest.py --quick            # 12 pages, smoke run
    .venv/bin/python tests/bench/ingest.py --profile prof.txt # where the pipeline's time goes

The documents are stored in a PostgreSQL database of the benchmark's own,
`parley_bench_docs` (created, migrated and dropped by the run, on DATABASE_URL's server),
as production stores them: the GIN full-text index and the vectors are written as they
would be there. The run connects as DATABASE_URL's role (the tables' owner), so row
level security is not in the way of measuring; the ingestion job is run in this process,
as a documents worker runs it (the message the upload queues goes to an in-memory broker
no worker reads).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import os
import pstats
import re
import secrets
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
for _path in (ROOT / "platform", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from results import result_write  # noqa: E402

LICENCES_DIR = Path("/usr/share/common-licenses")
DATABASE = "parley_bench_docs"
PAGES = 300
QUICK_PAGES = 4
GOAL_SECONDS_300 = 20.0
GOAL_RATIO = 1.3
# A letter page in 12 pt Helvetica with 16 pt leading: 45 lines of at most 90 characters.
LINES_PER_PAGE = 45
LINE_CHARS = 90


# --- the database and Django ------------------------------------------------------------


def licence_files() -> list[Path]:
    """The licence texts this machine has (the symbolic links name copies of others)."""
    if not LICENCES_DIR.is_dir():
        return []
    return sorted(p for p in LICENCES_DIR.iterdir() if p.is_file() and not p.is_symlink())


def licences_required(names: list[str]) -> dict[str, str]:
    """The texts of the named licences, or exit with a message saying which are missing."""
    missing = [name for name in names if not (LICENCES_DIR / name).is_file()]
    if missing:
        raise SystemExit(
            f"This benchmark reads the licence texts Debian ships in {LICENCES_DIR} "
            f"(package base-files); missing here: {', '.join(missing)}. Run it on a Debian "
            "or Ubuntu machine (or container)."
        )
    return {name: (LICENCES_DIR / name).read_text(encoding="utf-8") for name in names}


def _url_with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def _admin_execute(url: str, *statements: str) -> None:
    import psycopg

    with psycopg.connect(_url_with_database(url, "postgres"), autocommit=True) as admin:
        for statement in statements:
            admin.execute(statement)  # type: ignore[arg-type]


def _database_create(url: str) -> None:
    """A new `parley_bench_docs`; one a past run left behind is dropped first, one that
    another run is using is not touched (exit with a message)."""
    import psycopg

    with psycopg.connect(_url_with_database(url, "postgres"), autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [DATABASE]
        ).fetchone()
        if row and row[0]:
            raise SystemExit(
                f"The database {DATABASE} is in use: another run of a documents benchmark? "
                "Run one at a time."
            )
        admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}"')
        admin.execute(f'CREATE DATABASE "{DATABASE}"')


def _database_drop(url: str) -> None:
    _admin_execute(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{DATABASE}' AND pid <> pg_backend_pid()",
        f'DROP DATABASE IF EXISTS "{DATABASE}"',
    )


@contextlib.contextmanager
def documents_django(*, scratch: Path) -> Iterator[Any]:
    """Django on a fresh, migrated `parley_bench_docs` database on DATABASE_URL's server
    (dropped on the way out), the documents' files under `scratch`; yields the actor (a
    tenant's owner)."""
    server = os.environ.get("DATABASE_URL", "").strip() or "postgres://postgres@127.0.0.1/parley"
    if urlsplit(server).scheme not in ("postgres", "postgresql"):
        raise SystemExit("DATABASE_URL must be a postgres:// URL of a role that creates databases.")
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings.base",
        DATABASE_URL=_url_with_database(server, DATABASE),
        REDIS_URL=os.environ.get("REDIS_URL", "").strip() or "redis://127.0.0.1:6379/15",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="localhost",
        DATABASE_POOL="false",
        PARLEY_REDIS_PREFIX=f"parley-bench-docs-{os.getpid()}",
        PARLEY_DOCUMENTS_DIR=str(scratch / "documents"),
        PARLEY_LOG_LEVEL="WARNING",
    )
    for name in [k for k in os.environ if k.startswith("PARLEY_DOCUMENT_CHUNK")]:
        del os.environ[name]  # the default chunk settings are what is measured
    _database_create(server)
    try:
        import django

        django.setup()
        from django.core.management import call_command
        from django.db import connections

        from config.celery import app

        # The upload queues the ingestion job on commit; this process runs the job itself
        # (and the in-memory broker's warning that it has no host name says nothing).
        app.conf.broker_url = "memory://"
        logging.getLogger("kombu.connection").setLevel(logging.ERROR)
        call_command("migrate", verbosity=0)
        try:
            yield _owner()
        finally:
            connections.close_all()
    finally:
        _database_drop(server)


def _owner() -> Any:
    from tenants.access import Actor
    from tenants.models import Membership, Role, Tenant, User

    tenant = Tenant.objects.create(name="Bench", slug="bench")
    user = User.objects.create(username="bench", email="bench@example.com")
    Membership.objects.create(tenant=tenant, user=user, role=Role.OWNER)
    return Actor(tenant=tenant, user=user, role=Role.OWNER)


def document_ingested(actor: Any, *, data: bytes, filename: str, title: str = "") -> Any:
    """Upload the file and run its ingestion job, as a documents worker would; the
    document, `ready` (or an exit with its failure)."""
    from documents.ingest import document_ingest
    from documents.models import Document
    from documents.services import document_upload
    from tenants.rls import tenant_scope

    with tenant_scope(tenant_id=actor.tenant.id, user_id=actor.user.id):
        document = document_upload(actor=actor, data=data, filename=filename, title=title)
    document_ingest(document_id=document.id, tenant_id=actor.tenant.id)
    with tenant_scope(tenant_id=actor.tenant.id):
        document = Document.objects.get(id=document.id)
    if document.state != Document.State.READY:
        raise SystemExit(f"{filename} did not become ready: {document.error_message}")
    return document


def model_warm() -> None:
    """Load the embedding model before anything is timed (a worker loads it once)."""
    from documents.embeddings import texts_embed

    texts_embed(["warm up"])


# --- the generated PDF ------------------------------------------------------------------


def pdf_lines(texts: list[str]) -> Iterator[str]:
    """The texts as lines of a printed page: paragraphs wrapped at LINE_CHARS, a blank
    line between paragraphs, Latin-1 only (the PDF's font encoding), forever."""
    while True:
        for text in texts:
            for paragraph in re.split(r"\n\s*\n", text):
                words = paragraph.split()
                if not words:
                    continue
                line = " ".join(words).encode("latin-1", "replace").decode("latin-1")
                yield from textwrap.wrap(line, LINE_CHARS)
                yield ""


def pdf_generated(texts: list[str], pages: int) -> bytes:
    """A `pages`-page PDF of the texts (tests/pdfs.py's hand-written PDF builder), with
    a running header and a page number as a printed contract has."""
    from tests.pdfs import pdf_with_text

    lines = pdf_lines(texts)
    body = LINES_PER_PAGE - 2
    return pdf_with_text(
        [
            [f"Licence compendium - page {n}", *(next(lines) for _ in range(body)), f"- {n} -"]
            for n in range(1, pages + 1)
        ]
    )


# --- measuring ---------------------------------------------------------------------------


class StageTimer:
    """Seconds spent in the ingestion job's stage functions, and inside them in the
    parser and the model, by wrapping them where documents.ingest calls them (the job's
    code is not changed). The parser yields pages as asked: its time is that of each
    next page."""

    STAGES = ("pages_store", "chunks_store", "embeddings_store")
    WORK = {"iter_labelled_pages": "parse", "texts_embed": "model"}

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import documents.ingest as ingest

        originals = {name: getattr(ingest, name) for name in (*self.STAGES, *self.WORK)}
        for name in self.STAGES:
            setattr(ingest, name, self._timed(name, originals[name]))
        ingest.texts_embed = self._timed("model", originals["texts_embed"])
        ingest.iter_labelled_pages = self._timed_iterator("parse", originals["iter_labelled_pages"])
        try:
            yield
        finally:
            for name, function in originals.items():
                setattr(ingest, name, function)

    def _add(self, name: str, since: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - since

    def _timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._add(name, start)

        return timed

    def _timed_iterator(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            start = time.perf_counter()
            items = iter(function(*args, **kwargs))
            self._add(name, start)
            while True:
                start = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    self._add(name, start)
                yield item

        return timed


def pipeline_measure(actor: Any, *, data: bytes, filename: str) -> dict[str, Any]:
    """Upload and ingest the file: wall and CPU seconds in all; wall seconds per stage,
    and of the parser and the model inside the stages."""
    timer = StageTimer()
    with timer.installed():
        start, cpu = time.perf_counter(), time.process_time()
        document = document_ingested(actor, data=data, filename=filename)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    stages = {name: round(timer.seconds.get(name, 0.0), 3) for name in timer.STAGES}
    stages["upload_and_rest"] = round(
        seconds - sum(timer.seconds.get(n, 0.0) for n in timer.STAGES), 3
    )
    parse, model = timer.seconds.get("parse", 0.0), timer.seconds.get("model", 0.0)
    return {
        "seconds": round(seconds, 3),
        "cpu_s": round(cpu, 3),
        "stages": stages,
        "inside": {
            "parse_s": round(parse, 3),
            "model_s": round(model, 3),
            "everything_else_s": round(seconds - parse - model, 3),
        },
        "pages": document.page_count,
        "chunks": document.chunks.count(),
        "tokens": document.token_count,
    }


def reference_measure(*, data: bytes, media_type: str) -> dict[str, Any]:
    """The parser alone, then the model alone over the same chunks' texts (cut with the
    default chunk settings; the cutting itself is not part of the reference)."""
    from django.conf import settings

    from documents.chunking import chunks_of
    from documents.embeddings import texts_embed
    from documents.parsing import iter_pages

    start, cpu = time.perf_counter(), time.process_time()
    pages = list(iter_pages(data, media_type))
    parse, parse_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    texts = [
        span.text
        for span in chunks_of(
            pages,
            target_tokens=settings.PARLEY_DOCUMENT_CHUNK_TOKENS,
            overlap_tokens=settings.PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS,
        )
    ]
    chunk = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    texts_embed(texts)
    embed, embed_cpu = time.perf_counter() - start, time.process_time() - cpu
    return {
        "parse_s": round(parse, 3),
        "embed_s": round(embed, 3),
        "seconds": round(parse + embed, 3),
        "cpu_s": round(parse_cpu + embed_cpu, 3),
        "chunking_s_not_in_reference": round(chunk, 3),
        "pages": len(pages),
        "chunks": len(texts),
    }


def profile_top(actor: Any, *, data: bytes, filename: str, lines: int = 25) -> str:
    """cProfile of one more ingestion of the file: the functions by cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    document_ingested(actor, data=data, filename=filename)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(lines)
    return out.getvalue()


def case_measure(
    actor: Any, *, name: str, files: list[tuple[str, bytes, str]], repeat: int
) -> dict[str, Any]:
    """Pipeline and reference over the files, `repeat` times each, interleaved; the best
    time of each side (the least disturbed by the other work of a shared machine)."""
    pipelines: list[dict[str, Any]] = []
    references: list[dict[str, Any]] = []
    for round_ in range(repeat):
        references.append(_summed([reference_measure(data=d, media_type=m) for _, d, m in files]))
        pipelines.append(
            _summed(
                [
                    pipeline_measure(actor, data=d, filename=f"r{round_}-{filename}")
                    for filename, d, _ in files
                ]
            )
        )
    pipeline = min(pipelines, key=lambda row: row["seconds"])
    reference = min(references, key=lambda row: row["seconds"])
    pages = pipeline["pages"]
    return {
        "name": name,
        "documents": len(files),
        "bytes": sum(len(d) for _, d, _ in files),
        "pages": pages,
        "chunks": pipeline["chunks"],
        "tokens": pipeline["tokens"],
        "pipeline": pipeline,
        "reference": reference,
        "pipeline_pages_per_s": round(pages / pipeline["seconds"], 1),
        "ratio": round(pipeline["seconds"] / reference["seconds"], 2),
        "cpu_ratio": round(pipeline["cpu_s"] / reference["cpu_s"], 2),
        # The same ingestion against its own parser and model time: no drift of the
        # machine's load between the pipeline's run and the reference's.
        "ratio_inside": round(
            pipeline["seconds"] / (pipeline["inside"]["parse_s"] + pipeline["inside"]["model_s"]), 2
        ),
        "runs": {
            "pipeline_s": [row["seconds"] for row in pipelines],
            "reference_s": [row["seconds"] for row in references],
        },
    }


def _summed(rows: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, dict):
                inner = total.setdefault(key, {})
                for k, v in value.items():
                    inner[k] = round(inner.get(k, 0) + v, 3)
            elif isinstance(value, int | float):
                total[key] = round(total.get(key, 0) + (value or 0), 3)
    return total


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{'case':<22}{'pages':>6}{'chunks':>7}{'pipeline s':>11}{'pages/s':>8}"
        f"{'parse s':>8}{'embed s':>8}{'ratio':>7}{'cpu ratio':>10}{'inside':>7}"
    ]
    for case in result["cases"]:
        lines.append(
            f"{case['name']:<22}{case['pages']:>6}{case['chunks']:>7}"
            f"{case['pipeline']['seconds']:>11}{case['pipeline_pages_per_s']:>8}"
            f"{case['reference']['parse_s']:>8}{case['reference']['embed_s']:>8}"
            f"{case['ratio']:>7}{case['cpu_ratio']:>10}{case['ratio_inside']:>7}"
        )
    for case in result["cases"]:
        stages = ", ".join(f"{k} {v} s" for k, v in case["pipeline"]["stages"].items())
        inside = ", ".join(f"{k} {v}" for k, v in case["pipeline"]["inside"].items())
        lines.append(f"{case['name']} stages: {stages}; inside: {inside}")
    goals = result["goals"]
    lines.append(f"load average: {result['load_average']} on {result['cpus']} CPUs")
    lines.append(
        f"goals: {result['pages_goal']} pages in <= {goals['seconds']} s: "
        f"{goals['seconds_met']}; ratio <= {goals['ratio']}: {goals['ratio_met']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=PAGES, help="pages of the generated PDF")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side (the best counts)")
    parser.add_argument("--quick", action="store_true", help=f"a {QUICK_PAGES}-page PDF, once")
    parser.add_argument("--profile", type=Path, help="write a cProfile of one PDF ingestion here")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    args = parser.parse_args(argv)
    pages, repeat = (QUICK_PAGES, 1) if args.quick else (args.pages, args.repeat)
    names = ["BSD", "CC0-1.0"] if args.quick else [p.name for p in licence_files()]
    if not names:
        raise SystemExit(f"No licence texts in {LICENCES_DIR} (Debian's base-files ships them).")
    texts = licences_required(names)
    load_start = round(os.getloadavg()[0], 2)
    with (
        tempfile.TemporaryDirectory(prefix="parley-bench-ingest-") as scratch,
        documents_django(scratch=Path(scratch)) as actor,
    ):
        from documents.models import Document

        model_warm()
        pdf = pdf_generated(list(texts.values()), pages)
        cases = [
            case_measure(
                actor,
                name=f"generated PDF ({pages} p)",
                files=[("compendium.pdf", pdf, Document.MediaType.PDF)],
                repeat=repeat,
            ),
            case_measure(
                actor,
                name=f"licence texts ({len(names)})",
                files=[(n, t.encode(), Document.MediaType.TEXT) for n, t in texts.items()],
                repeat=repeat,
            ),
        ]
        if args.profile:
            args.profile.write_text(profile_top(actor, data=pdf, filename="profiled.pdf", lines=40))
    from django.conf import settings

    pdf_case = cases[0]
    seconds_per_300 = pdf_case["pipeline"]["seconds"] * PAGES / pages
    result = {
        "pages_goal": PAGES,
        "cpus": os.cpu_count(),
        # Other work on the machine during the run (1-minute load averages).
        "load_average": {"start": load_start, "end": round(os.getloadavg()[0], 2)},
        "settings": {
            "chunk_tokens": settings.PARLEY_DOCUMENT_CHUNK_TOKENS,
            "chunk_overlap_tokens": settings.PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS,
            "ingest_batch": settings.PARLEY_DOCUMENT_INGEST_BATCH,
            "embedding_batch": settings.PARLEY_EMBEDDING_BATCH,
            "embedding_threads": settings.PARLEY_EMBEDDING_THREADS,
            "embedding_backend": settings.PARLEY_EMBEDDING_BACKEND,
        },
        "repeat": repeat,
        "cases": cases,
        "goals": {
            "seconds": GOAL_SECONDS_300,
            "seconds_for_300_pages": round(seconds_per_300, 1),
            "seconds_met": seconds_per_300 <= GOAL_SECONDS_300,
            "ratio": GOAL_RATIO,
            "ratio_met": all(case["ratio"] <= GOAL_RATIO for case in cases),
        },
    }
    return result_write(
        "ingest", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


if __name__ == "__main__":
    sys.exit(main())
