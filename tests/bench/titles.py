"""Are the bundled model's conversation titles decent, or should a conversation keep the
first words of its question? Measured on a fixed set of 24 openings (a question and a
short answer), with the real title prompt (chat.titles) on the local model server.

A title is decent when it is 1 to 8 words, names something the question is about (it
shares a content word with it), and is not about the chat itself ("User", "Assistant",
"Title", "Conversation"). Reported: the share of decent titles written by the model and
by the first-words rule (chat.titles.title_first_words), each title, and the model's
time per title.

    .venv/bin/python tests/bench/titles.py
    .venv/bin/python tests/bench/titles.py --quick     # the first 6 openings
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT / "platform") not in sys.path:
    sys.path.insert(0, str(ROOT / "platform"))

from results import result_write  # noqa: E402

OPENINGS: list[tuple[str, str]] = [
    ("How do I reverse a list in Python?", "Use reversed(items) or items[::-1]."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    (
        "Can you explain how vaccines train the immune system?",
        "They show it a harmless part of a germ.",
    ),
    ("Write a haiku about autumn leaves.", "Red leaves drift and fall / ..."),
    ("What's the difference between TCP and UDP?", "TCP is reliable and ordered; UDP is not."),
    ("Give me a recipe for banana bread.", "Mash three bananas, mix with flour, sugar, eggs..."),
    ("How many kilometres are there in a marathon?", "A marathon is 42.195 kilometres."),
    ("Why is the sky blue?", "Air scatters blue light more than red light."),
    ("Summarize the plot of Romeo and Juliet.", "Two young lovers from feuding families die."),
    ("How do I center a div in CSS?", "Use display: flex with justify-content and align-items."),
    ("What are the health benefits of green tea?", "It has antioxidants and a little caffeine."),
    ("Translate 'good morning' into Spanish.", "Buenos días."),
    ("Help me write a cover letter for a nursing job.", "Dear hiring manager, ..."),
    ("What causes inflation?", "More money chasing fewer goods, among other causes."),
    ("How does a bicycle gear system work?", "Gears change how far the wheel turns per pedal."),
    ("Suggest names for a golden retriever puppy.", "Sunny, Maple, Biscuit, Honey."),
    ("Is coffee bad for your heart?", "Moderate coffee is fine for most people."),
    ("How do I make a pull request on GitHub?", "Push a branch, then open a pull request."),
    ("What is photosynthesis?", "Plants turn light, water and CO2 into sugar."),
    ("Plan a three-day trip to Rome.", "Day 1: the Colosseum; day 2: the Vatican; ..."),
    ("How do I fix a leaking kitchen tap?", "Turn off the water and replace the washer."),
    ("Explain recursion to a child.", "A thing that is defined by a smaller copy of itself."),
    ("What should I pack for a camping weekend?", "A tent, a sleeping bag, water, food, a torch."),
    ("Compare electric cars and hybrid cars.", "Electric cars use only batteries; hybrids both."),
]
STOPWORDS = {
    "about",
    "after",
    "again",
    "also",
    "because",
    "been",
    "before",
    "being",
    "could",
    "does",
    "doing",
    "from",
    "have",
    "here",
    "into",
    "just",
    "like",
    "make",
    "more",
    "most",
    "much",
    "need",
    "only",
    "other",
    "over",
    "same",
    "should",
    "some",
    "such",
    "than",
    "that",
    "their",
    "them",
    "then",
    "there",
    "these",
    "they",
    "this",
    "those",
    "through",
    "very",
    "what",
    "when",
    "where",
    "which",
    "while",
    "with",
    "would",
    "your",
    "write",
    "give",
    "explain",
    "help",
    "tell",
    "between",
    "difference",
}
META = re.compile(r"\b(user|assistant|title|conversation)\b", re.IGNORECASE)


def content_words(text: str) -> set[str]:
    words = re.findall(r"[a-z]+", text.lower())
    return {w[:5] for w in words if len(w) >= 4 and w not in STOPWORDS}


def decent(title: str, question: str) -> bool:
    words = title.split()
    return (
        1 <= len(words) <= 8
        and not META.search(title)
        and bool(content_words(title) & content_words(question))
    )


def setup_django() -> None:
    for name in ("DATABASE_URL", "REDIS_URL"):
        os.environ.pop(name, None)  # the embedded settings: no services needed
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
    import django

    django.setup()


def model_titles(openings: list[tuple[str, str]]) -> tuple[list[str], float]:
    """The titles the bundled model writes (chat.titles' prompt and clean-up), and the
    mean seconds per title."""
    import httpx
    from django.conf import settings

    from chat.titles import TITLE_MAX_TOKENS, title_clean, title_messages
    from inference.local_process import LocalModelServer

    server = LocalModelServer(
        model_path=settings.PARLEY_LOCAL_MODEL_PATH,
        ctx=settings.PARLEY_LOCAL_MODEL_CTX,
        threads=settings.PARLEY_LOCAL_MODEL_THREADS,
        log_path=ROOT / "var" / "bench-titles-model.log",
    )
    server.start()
    titles = []
    started = time.perf_counter()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for question, answer in openings:
                reply = client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "SmolLM2-135M-Instruct",
                        "messages": title_messages(question=question, answer=answer),
                        "max_tokens": TITLE_MAX_TOKENS,
                        "temperature": 0.0,
                    },
                )
                reply.raise_for_status()
                titles.append(title_clean(reply.json()["choices"][0]["message"]["content"]))
    finally:
        server.stop()
    return titles, (time.perf_counter() - started) / len(openings)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"decent titles: model {result['model_decent']:.0%}, "
        f"first words {result['first_words_decent']:.0%} "
        f"({result['openings']} openings; {result['model_s_per_title']} s per model title)",
        "",
    ]
    for row in result["titles"]:
        mark = "ok " if row["model_decent"] else "BAD"
        lines.append(f"{mark} {row['model']!r:45.45}  <- {row['question']}")
    lines.append(f"decision: {result['decision']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first 6 openings")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    args = parser.parse_args(argv)
    setup_django()
    from chat.titles import title_first_words

    openings = OPENINGS[:6] if args.quick else OPENINGS
    titles, seconds = model_titles(openings)
    rows = [
        {
            "question": question,
            "model": title,
            "model_decent": decent(title, question),
            "first_words": title_first_words(question),
            "first_words_decent": decent(title_first_words(question), question),
        }
        for (question, _), title in zip(openings, titles, strict=True)
    ]
    model_rate = sum(r["model_decent"] for r in rows) / len(rows)
    first_rate = sum(r["first_words_decent"] for r in rows) / len(rows)
    result = {
        "openings": len(rows),
        "model_decent": round(model_rate, 3),
        "first_words_decent": round(first_rate, 3),
        "model_s_per_title": round(seconds, 2),
        "decision": "model titles" if model_rate >= 0.8 else "first words",
        "titles": rows,
    }
    return result_write(
        "titles", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


if __name__ == "__main__":
    sys.exit(main())
