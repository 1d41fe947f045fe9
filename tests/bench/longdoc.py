"""A review of a document far beyond any model's context: map-reduce over the pool.

    python tests/bench/longdoc.py [--tokens 1000000] [--servers 4] [--slots 8] [--json]
    python tests/bench/longdoc.py --local          # a smaller document, the bundled model

The document is generated: pages of contract prose, each opening with a sentence of
its own (`Clause N. ...`). The pool is `--servers` synthetic reviewers (a model server
each, `--slots` requests at a time, `--rate` tokens a second per request, as a vLLM
server decodes), routed by Parley's pool (`inference.pool`, the embedded settings).
A reviewer answers a map step with the review JSON quoting the first sentence of every
page it was sent, and a reduce step (summaries only: the engine merges items by rule)
with the summaries it was sent, shortened: a perfect model, so every quote must verify
and every page must be cited.

The review is `documents.review.ReviewEngine`, the product's engine, with the product's
call (`chat.review_turn`'s: the pool, `response_format`, retries on limits). Measured:
wall time, model calls (map and reduce), the most calls in flight against the pool's
slots, the tokens read. Then a worker is killed mid-map (every call from the first one started after
the first batch fails) and the review run again with the steps that were kept: the calls
redone (lost in flight) must be at most one batch (`parallel`), and the result the same.

`--local` reviews a smaller document (`--local-tokens`, 10,000 by default) with the
bundled SmolLM2 (8k context; sections of PARLEY_REVIEW_SECTION_TOKENS, 2,048 in the
embedded mode) under the local server's grammar: a 135M model quotes
badly, and the point is that whatever it invents is never shown as a quote.

The goal (docs/benchmarks.md): no error, every shown quote verified.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

from tests.bench.results import result_write  # noqa: E402

CHARS_PER_PAGE = 3000
FILLER = (
    "The parties agree that notices are given in writing to the addresses above, that "
    "payments are made within thirty days of an undisputed invoice, and that neither "
    "party is liable for delays caused by events beyond its reasonable control. "
)


def document_pages(tokens: int) -> list[str]:
    pages = []
    count = max(1, tokens * 4 // CHARS_PER_PAGE)
    for n in range(1, count + 1):
        opening = (
            f"Clause {n}. The supplier shall deliver lot {n * 7919 % 100003} within "
            f"{n % 90 + 10} days of the order numbered {n}."
        )
        body = (FILLER * (CHARS_PER_PAGE // len(FILLER) + 1))[: CHARS_PER_PAGE - len(opening)]
        pages.append(f"{opening} {body}")
    return pages


# --- the synthetic reviewers -------------------------------------------------------------


def reviewer_reply(body: dict[str, Any]) -> str:
    """What a perfect reviewer answers (see the module docstring)."""
    user = body["messages"][-1]["content"]
    schema = body["response_format"]["json_schema"]["schema"]
    if "items" not in schema["properties"]:  # a reduce: the summaries, merged
        parts = re.findall(r'<part number="\d+">\n(.*?)\n</part>', user, re.S)
        return json.dumps({"summary": " ".join(p.split(".")[0] + "." for p in parts)})
    items = []
    for number, text in re.findall(r'<page number="(\d+)">\n(.*?)\n</page>', user, re.S):
        quote = text.split(". ", 1)[1].split(".")[0]
        items.append(
            {
                "category": "risk",
                "title": f"Delivery, clause {number}",
                "detail": "A fixed delivery deadline.",
                "severity": "medium",
                "quote": quote,
                "page": int(number),
            }
        )
    first = items[0]["page"] if items else 0
    return json.dumps({"summary": f"Pages from {first}: delivery deadlines. " * 8, "items": items})


class Reviewer:
    """A model server: `slots` requests decode at a time, `rate` tokens a second each."""

    def __init__(self, *, slots: int, rate: float, context: int) -> None:
        self.slots, self.rate, self.context = slots, rate, context
        self.port = 0
        self.requests = 0
        self.busy = self.most_busy = 0
        self._server: Any = None

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        semaphore = asyncio.Semaphore(self.slots)

        async def health(request: Any) -> Any:
            return JSONResponse({})

        async def models(request: Any) -> Any:
            return JSONResponse(
                {"data": [{"id": "reviewer", "object": "model", "max_model_len": self.context}]}
            )

        async def completions(request: Any) -> Any:
            body = await request.json()
            self.requests += 1
            text = reviewer_reply(body)
            prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4
            completion_tokens = max(1, len(text) // 4)

            async def stream() -> Any:
                async with semaphore:
                    self.busy += 1
                    self.most_busy = max(self.most_busy, self.busy)
                    try:
                        await asyncio.sleep(completion_tokens / self.rate)
                    finally:
                        self.busy -= 1
                head = {"id": "r", "object": "chat.completion.chunk", "model": "reviewer"}
                piece = {"index": 0, "delta": {"role": "assistant", "content": text}}
                yield f"data: {json.dumps({**head, 'choices': [piece]})}\n\n"
                done = {"index": 0, "delta": {}, "finish_reason": "stop"}
                yield f"data: {json.dumps({**head, 'choices': [done]})}\n\n"
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")

        return Starlette(
            routes=[
                Route("/health", health),
                Route("/v1/models", models),
                Route("/v1/chat/completions", completions, methods=["POST"]),
            ]
        )

    def start(self) -> str:
        import uvicorn

        from inference.local_process import free_port

        self.port = free_port()
        config = uvicorn.Config(self.app(), port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        threading.Thread(target=self._server.run, daemon=True).start()
        deadline = time.monotonic() + 10
        while not self._server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True


# --- the review --------------------------------------------------------------------------


def setup_django(var_dir: str) -> None:
    for name in ("DATABASE_URL", "REDIS_URL"):
        os.environ.pop(name, None)  # the embedded settings: no services needed
    os.environ["PARLEY_VAR_DIR"] = var_dir
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def tenant_id() -> str:
    from tenants.models import Tenant

    tenant = Tenant.objects.create(name=f"bench {uuid.uuid4().hex[:6]}", slug=uuid.uuid4().hex[:12])
    return str(tenant.id)


def review(
    pages: list[str],
    *,
    tenant: str,
    context: int,
    parallel: int,
    model: str = "",
    steps: dict[str, dict] | None = None,
    fail_after: int | None = None,
    section_tokens: int = 0,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Run the product's review engine through the pool; the result (None when the
    simulated worker died) and the calls made."""
    from django.conf import settings

    from chat.review_turn import _complete
    from documents.review import BUILT_IN, ReviewEngine, with_retries
    from inference.types import ChatRequest

    calls = {"made": 0, "failed_at": None}
    lock = threading.Lock()
    usage = [0, 0]
    kept = {} if steps is None else steps

    def complete(messages: list[dict], schema: dict) -> str:
        with lock:
            calls["made"] += 1
            if fail_after is not None and calls["made"] > fail_after:
                raise RuntimeError("the worker was killed")
        request = ChatRequest(
            messages=messages,
            model=model,
            max_tokens=settings.PARLEY_REVIEW_MAX_TOKENS,
            temperature=0.0,
            tenant_id=tenant,
            purpose="documents.review",
            sampling={
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "review", "schema": schema},
                }
            },
        )
        return with_retries(lambda: _complete(request, usage, []))

    engine = ReviewEngine(
        spec=BUILT_IN["risks"],
        title="Supply agreement",
        pages=pages,
        context_tokens=context,
        max_output_tokens=settings.PARLEY_REVIEW_MAX_TOKENS,
        complete=complete,
        step_get=kept.get,
        step_put=kept.__setitem__,
        parallel=parallel,
        section_tokens=section_tokens,
    )
    try:
        result = engine.run()
    except RuntimeError:
        return None, {**calls, "kept": len(kept), "prompt_tokens": usage[0]}
    return result, {**calls, "kept": len(kept), "prompt_tokens": usage[0]}


def synthetic_run(args: argparse.Namespace) -> dict[str, Any]:
    from django.conf import settings

    from inference import pool

    pages = document_pages(args.tokens)
    reviewers = [
        Reviewer(slots=args.slots, rate=args.rate, context=args.context)
        for _ in range(args.servers)
    ]
    settings.PARLEY_BACKENDS = [r.start() for r in reviewers]
    settings.PARLEY_REVIEW_MAX_TOKENS = 4096
    pool.forget_cache()
    tenant = tenant_id()
    slots = args.servers * args.slots
    try:
        started = time.perf_counter()
        result, calls = review(pages, tenant=tenant, context=args.context, parallel=slots)
        wall = time.perf_counter() - started
        assert result is not None
        shown = [item for item in result["items"] if "quote" in item]
        cited = sorted({item["citation"]["page_start"] for item in shown})

        # A worker killed a third of the way through the map, then the review run again.
        kept: dict[str, dict] = {}
        # The death comes with the first call started after the first batch: once the
        # first steps came back and were kept, with a batch of calls in flight.
        cut = min(slots, max(1, result["stats"]["sections"] - 1))
        died, before = review(
            pages, tenant=tenant, context=args.context, parallel=slots, steps=kept, fail_after=cut
        )
        assert died is None
        resumed, _ = review(pages, tenant=tenant, context=args.context, parallel=slots, steps=kept)
        assert resumed is not None
        # Calls that answered (the ones after the cut failed at once) but whose output
        # was not kept: the work the killed worker lost.
        lost = min(before["made"], cut) - before["kept"]
    finally:
        for reviewer in reviewers:
            reviewer.stop()
        pool.forget_cache()
    return {
        "document": {"tokens": args.tokens, "pages": len(pages)},
        "pool": {"servers": args.servers, "slots_each": args.slots, "rate_tok_s": args.rate},
        "context_tokens": args.context,
        "wall_s": round(wall, 2),
        "sections": result["stats"]["sections"],
        "map_calls": result["stats"]["map_calls"],
        "reduce_calls": result["stats"]["reduce_calls"],
        "parallel_max": result["stats"]["parallel_max"],
        "pool_slots": slots,
        "server_busy_max": [r.most_busy for r in reviewers],
        "prompt_tokens_read": calls["prompt_tokens"],
        "quotes": result["quotes"],
        "shown_quotes_verified": f"{len(shown)}/{len(shown)}",
        "pages_cited": len(cited),
        "all_pages_cited": cited == list(range(1, len(pages) + 1)),
        "kill": {
            "failed_at_call": cut + 1,
            "steps_kept": before["kept"],
            "calls_lost_in_flight": lost,
            "at_most_one_batch": lost <= slots,
            "resumed_reused": resumed["stats"]["reused_steps"],
            "same_result": all(resumed[k] == result[k] for k in ("summary", "items", "quotes")),
        },
    }


def local_run(args: argparse.Namespace) -> dict[str, Any]:
    """The bundled model through the local server (as `serve` runs it)."""
    from django.conf import settings

    from inference import pool
    from inference.local_process import LocalModelServer

    server = LocalModelServer(
        model_path=settings.PARLEY_LOCAL_MODEL_PATH,
        ctx=settings.PARLEY_LOCAL_MODEL_CTX,
        threads=settings.PARLEY_LOCAL_MODEL_THREADS,
        log_path=Path(tempfile.gettempdir()) / "parley-bench-longdoc-model.log",
    )
    server.start()
    settings.PARLEY_BACKENDS = [server.url]
    settings.PARLEY_REVIEW_MAX_TOKENS = 512
    pool.forget_cache()
    pages = document_pages(args.local_tokens)
    try:
        started = time.perf_counter()
        result, _ = review(
            pages,
            tenant=tenant_id(),
            context=settings.PARLEY_LOCAL_MODEL_CTX,
            parallel=1,
            section_tokens=settings.PARLEY_REVIEW_SECTION_TOKENS,
        )
        wall = time.perf_counter() - started
    finally:
        server.stop()
        pool.forget_cache()
    assert result is not None
    shown = [item for item in result["items"] if "quote" in item]
    return {
        "document": {"tokens": args.local_tokens, "pages": len(pages)},
        "model": "SmolLM2-135M-Instruct (local server, grammar-constrained JSON)",
        "section_tokens": settings.PARLEY_REVIEW_SECTION_TOKENS,
        "wall_s": round(wall, 1),
        "sections": result["stats"]["sections"],
        "map_calls": result["stats"]["map_calls"],
        "reduce_calls": result["stats"]["reduce_calls"],
        "items": len(result["items"]),
        "quotes": result["quotes"],
        "shown_quotes_verified": f"{len(shown)}/{len(shown)}",
    }


def table(result: dict[str, Any]) -> str:
    lines = []
    if "synthetic" in result:
        s = result["synthetic"]
        lines += [
            f"synthetic pool: {s['document']['tokens']:,} tokens ({s['document']['pages']} pages), "
            f"{s['pool']['servers']} servers x {s['pool']['slots_each']} slots",
            f"  {s['wall_s']} s; {s['sections']} sections, {s['map_calls']} map + "
            f"{s['reduce_calls']} reduce calls; in flight at most {s['parallel_max']} of "
            f"{s['pool_slots']} slots",
            f"  quotes {s['quotes']}, shown verified {s['shown_quotes_verified']}, all pages "
            f"cited: {s['all_pages_cited']}",
            f"  killed at call {s['kill']['failed_at_call']}: {s['kill']['steps_kept']} steps "
            f"kept, {s['kill']['calls_lost_in_flight']} lost in flight (at most one batch: "
            f"{s['kill']['at_most_one_batch']}), same result: {s['kill']['same_result']}",
        ]
    if "local" in result:
        s = result["local"]
        lines += [
            f"bundled model: {s['document']['tokens']:,} tokens ({s['document']['pages']} pages)",
            f"  {s['wall_s']} s; {s['sections']} sections, {s['map_calls']} map + "
            f"{s['reduce_calls']} reduce calls; {s['items']} items; quotes {s['quotes']}; "
            f"shown verified {s['shown_quotes_verified']}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--slots", type=int, default=8, help="requests at a time per server")
    parser.add_argument("--rate", type=float, default=400.0, help="tokens/s per request")
    parser.add_argument("--context", type=int, default=32768, help="the servers' max_model_len")
    parser.add_argument("--local", action="store_true", help="also the bundled model")
    parser.add_argument("--local-only", action="store_true", help="only the bundled model")
    parser.add_argument("--local-tokens", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="100,000 tokens, no local model")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="write the results JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.local, args.local_only = 100_000, False, False
    with tempfile.TemporaryDirectory(prefix="parley-longdoc-") as var_dir:
        setup_django(var_dir)
        result: dict[str, Any] = {"benchmark": "longdoc"}
        if not args.local_only:
            result["synthetic"] = synthetic_run(args)
        if args.local or args.local_only:
            result["local"] = local_run(args)
    return result_write(
        "longdoc", result, out=args.out, quick=args.quick, as_json=args.json, table=table
    )


if __name__ == "__main__":
    raise SystemExit(main())
