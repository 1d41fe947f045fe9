"""The documents benchmarks (tests/bench/retrieval.py, tests/bench/ingest.py) run in
their quick mode and measure what they say: the retrieval benchmark's scores follow from
its per-question ranks and its own fusion reproduces passages_search's hybrid; the
ingestion benchmark's reference embeds exactly the chunks the pipeline stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LICENCES = Path("/usr/share/common-licenses")
DATABASE = "parley_bench_docs"  # tests/bench/ingest.py's

pytestmark = pytest.mark.skipif(
    not all((LICENCES / name).is_file() for name in ("BSD", "Artistic", "CC0-1.0")),
    reason="the benchmarks read Debian's licence texts (package base-files)",
)


def bench(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "PARLEY_"))}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "bench" / f"{name}.py"),
            "--quick",
            "--out",
            str(out),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode and f"The database {DATABASE} is in use" in done.stderr:
        # Another run (a concurrent test session, someone's benchmark) has it: the
        # benchmark refused to touch it, which is right, and there is nothing to check.
        pytest.skip(f"another documents benchmark is using {DATABASE}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_retrieval_quick(tmp_path):
    result = bench("retrieval", tmp_path)
    assert result["licences"] == ["Artistic", "BSD", "CC0-1.0"]
    assert result["questions"] == 10
    (corpus,) = result["corpora"]
    assert corpus["labels_in_no_chunk"] == []
    assert corpus["fusion_reproduces_product_hybrid"] is True
    for mode in ("text", "vector", "hybrid"):
        ranks = [row[mode] for row in corpus["questions"]]
        assert all(r is None or 1 <= r <= 10 for r in ranks)
        found = sum(r is not None and r <= 5 for r in ranks)
        assert corpus["overall"][mode]["recall@5"] == round(found / len(ranks), 3)
        assert corpus["overall"][mode]["n"] == 10
    assert set(result["goals"]) == {
        "hybrid_at_least_each_alone",
        "hybrid_recall_at_least",
        "hybrid_recall_met",
    }


def test_ingest_quick(tmp_path):
    result = bench("ingest", tmp_path)
    pdf, texts = result["cases"]
    assert pdf["pages"] == pdf["reference"]["pages"] == 4
    assert texts["documents"] == 2
    for case in (pdf, texts):
        # The reference embeds the very chunks the pipeline stored.
        assert case["chunks"] == case["reference"]["chunks"] > 0
        stages = case["pipeline"]["stages"]
        assert {"pages_store", "chunks_store", "embeddings_store"} <= set(stages)
        assert sum(stages.values()) == pytest.approx(case["pipeline"]["seconds"], abs=0.02)
        assert case["ratio"] == round(case["pipeline"]["seconds"] / case["reference"]["seconds"], 2)
