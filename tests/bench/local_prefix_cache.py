"""Prefix (KV) cache reuse on the local model server: time to first token at turn 1
and turn 10 of one conversation, with reuse and without, in the same run.

    python tests/bench/local_prefix_cache.py --quick --json   # 1 conversation per mode
    python tests/bench/local_prefix_cache.py                  # 3 per mode; writes
                                        # bench-results/local_prefix_cache.json

Two local model servers in turn (SmolLM2-135M-Instruct through llama.cpp): the default
one (`--prefix-cache 4`: the live sequence plus 4 snapshots) and one with reuse off
(`--prefix-cache -1`: every prompt prefilled). Each plays the same ten-turn
conversation as the platform does: a system prompt, then per turn a user message of
~600 characters, the streamed answer (temperature 0, 48 tokens) appended as the
assistant's, and between turns a title request for the conversation (another prompt
on the same server, which would evict a single-sequence cache). Time to first token
is from sending the request to the first content delta. The prefix-cache counters
(`vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`) are read at the end.
"""

from __future__ import annotations

import argparse
import json
import platform as stdlib_platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "platform"))

import httpx  # noqa: E402
from results import result_write  # noqa: E402

TURNS = 10
SYSTEM = "You are Parley's assistant. Answer clearly and briefly."
TOPICS = [
    "the history of the printing press",
    "how tides work",
    "why the sky is blue",
    "the rules of chess openings",
    "how bread rises",
    "the life of honey bees",
    "how a bicycle stays upright",
    "the water cycle",
    "how vaccines train immunity",
    "the origins of the Olympic games",
]


def user_message(turn: int) -> str:
    topic = TOPICS[(turn - 1) % len(TOPICS)]
    return (
        f"Turn {turn}. I am preparing a short talk for a general audience and need help "
        f"with {topic}. Please explain the main idea in plain words, give one concrete "
        "example that people will remember, mention a common misconception and why it "
        "is wrong, and suggest a question I could ask the audience at the end. Keep the "
        "tone friendly and avoid jargon; if you must use a technical term, define it in "
        "the same sentence. I will ask about other topics after this one, so keep the "
        "answer self-contained and do not refer back to earlier topics unless asked."
    )


def stream(
    http: httpx.Client, messages: list[dict[str, Any]], max_tokens: int
) -> tuple[float, str]:
    started = time.perf_counter()
    first = None
    text = []
    body = {
        "messages": messages,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 1,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                piece = choice["delta"].get("content")
                if piece:
                    if first is None:
                        first = time.perf_counter() - started
                    text.append(piece)
    return (first if first is not None else time.perf_counter() - started), "".join(text)


def conversation(http: httpx.Client, number: int) -> dict[str, Any]:
    # Each conversation its own from the first token: nothing shared between them.
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": f"Conversation {number}. {SYSTEM}"}
    ]
    ttft = []
    for turn in range(1, TURNS + 1):
        messages.append({"role": "user", "content": user_message(turn)})
        seconds, answer = stream(http, messages, 48)
        ttft.append(seconds)
        messages.append({"role": "assistant", "content": answer})
        title = [
            {
                "role": "system",
                "content": "Write a title of at most six words for this conversation.",
            },
            {"role": "user", "content": messages[1]["content"]},
        ]
        stream(http, title, 8)
    chars = sum(len(m["content"]) for m in messages[:-1])
    return {"ttft": ttft, "history_chars_at_turn_10": chars}


def counter(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def run_mode(prefix_cache: int, reps: int) -> dict[str, Any]:
    from inference.local_process import LocalModelServer

    with (
        LocalModelServer(extra_args=["--prefix-cache", str(prefix_cache)]) as server,
        httpx.Client(base_url=server.url, timeout=300) as http,
    ):
        stream(http, [{"role": "user", "content": "Hello"}], 4)  # warm-up
        runs = [conversation(http, number) for number in range(reps)]
        metrics = http.get("/metrics").text
    turn1 = [r["ttft"][0] for r in runs]
    turn10 = [r["ttft"][-1] for r in runs]
    return {
        "prefix_cache": prefix_cache,
        "ttft_turn_1_s": round(statistics.median(turn1), 3),
        "ttft_turn_10_s": round(statistics.median(turn10), 3),
        "ttft_by_turn_s": [
            round(statistics.median(t), 3) for t in zip(*(r["ttft"] for r in runs), strict=True)
        ],
        "history_chars_at_turn_10": runs[0]["history_chars_at_turn_10"],
        "prefix_cache_queries_total": counter(metrics, "vllm:prefix_cache_queries_total"),
        "prefix_cache_hits_total": counter(metrics, "vllm:prefix_cache_hits_total"),
    }


def table(result: dict[str, Any]) -> str:
    lines = ["mode             TTFT turn 1  TTFT turn 10  hits/queries (tokens)"]
    for name, mode in result["modes"].items():
        lines.append(
            f"{name:16} {mode['ttft_turn_1_s']:9.3f} s {mode['ttft_turn_10_s']:10.3f} s  "
            f"{mode['prefix_cache_hits_total']:.0f}/{mode['prefix_cache_queries_total']:.0f}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 conversation per mode")
    parser.add_argument("--json", action="store_true", help="print the JSON result")
    parser.add_argument("--out", help="where to write the JSON result")
    parser.add_argument("--reps", type=int, help="conversations per mode (1 quick, 3 full)")
    args = parser.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    modes = {"reuse": run_mode(4, reps), "no reuse": run_mode(-1, reps)}
    result = {
        "bench": "local_prefix_cache",
        "model": "SmolLM2-135M-Instruct",
        "conversations_per_mode": reps,
        "machine": f"{stdlib_platform.machine()}, {stdlib_platform.python_version()}",
        "modes": modes,
    }
    return result_write(
        "local_prefix_cache",
        result,
        out=args.out,
        quick=args.quick,
        as_json=args.json,
        table=table,
    )


if __name__ == "__main__":
    sys.exit(main())
