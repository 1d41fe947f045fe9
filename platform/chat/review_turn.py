"""A document review as a run: the answer producer for a run whose task is `review`.

The review itself is documents.review's (sections, map-reduce, kept steps, verified
quotes); this producer gives it the run: every model call goes through the inference
pool on behalf of the run's member (recorded in the ledger against the run, purpose
`documents.review`), at most the tenant's concurrency at a time; its progress is the
run's `progress` events; a cancel stops it between steps. Being a run, a review gets
the event log, `run.attach`, the watchdog and the usage ledger like any other; run
again (`chat.regenerate`), it reuses the steps already done.

The answer is the review in Markdown, streamed when it is done; the review itself
(docs/review.schema.json) is stored with it in the message's `documents`, with its
citations in the shape of any answer over documents.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.conf import settings
from django.db import IntegrityError, close_old_connections, connections

from chat.documents import context_tokens_of, documents_in_play
from chat.execution import RunExecution, run_execute
from chat.models import Run
from documents.models import ReviewStep
from documents.review import (
    ReviewCancelled,
    ReviewEngine,
    ReviewSpec,
    items_in_order,
    review_markdown,
    with_retries,
)
from documents.selectors import review_step_output
from inference import pool
from inference.selectors import tenant_limits
from inference.types import (
    ChatRequest,
    InferenceError,
    StreamFinished,
    StreamStarted,
    TextDelta,
    Usage,
)
from tenants.rls import tenant_scope

logger = logging.getLogger(__name__)


class ReviewTurn:
    """The answer is the review of the document attached to the question."""

    def prepare(self, run: Run) -> None:
        self.spec = ReviewSpec.from_dict(run.user_message.documents["review"])
        documents = documents_in_play(run=run)
        if not documents:
            raise_later = InferenceError(
                "document_not_found", "The document to review was deleted or is not ready."
            )
            self.error: InferenceError | None = raise_later
            return
        self.error = None
        self.document = documents[0]
        self.pages = list(self.document.pages.order_by("number").values_list("text", flat=True))
        self.context_tokens = context_tokens_of(run.model)
        concurrency = tenant_limits(run.tenant_id).concurrent_runs
        self.parallel = max(1, min(settings.PARLEY_REVIEW_PARALLEL, concurrency or 10**6))

    def produce(self, execution: RunExecution) -> StreamFinished:
        if self.error is not None:
            raise self.error
        run = execution.run
        usage = [0, 0]  # prompt and completion tokens of every call
        models: list[str] = []

        def complete(messages: list[dict], schema: dict) -> str:
            request = ChatRequest(
                messages=messages,
                model=run.model,
                max_tokens=settings.PARLEY_REVIEW_MAX_TOKENS,
                temperature=0.0,
                tenant_id=str(run.tenant_id),
                user_id=str(run.user_id),
                purpose="documents.review",
                reference=str(run.id),
                sampling={
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "review", "schema": schema},
                    }
                },
            )
            try:
                return with_retries(lambda: _complete(request, usage, models))
            finally:
                close_old_connections()
                connections.close_all()  # this thread's, not the run's

        def step_get(step: str) -> dict | None:
            with tenant_scope(tenant_id=run.tenant_id):
                return review_step_output(tenant_id=run.tenant_id, **self._key(run), step=step)

        def step_put(step: str, output: dict) -> None:
            try:
                with tenant_scope(tenant_id=run.tenant_id):
                    ReviewStep.objects.create(
                        tenant_id=run.tenant_id, **self._key(run), step=step, output=output
                    )
            except IntegrityError:  # kept by another run of the same review meanwhile
                pass

        def progress(stage: str, done: int, total: int, message: str) -> None:
            event: dict[str, Any] = {"type": "progress", "stage": stage, "done": done}
            event["total"] = total
            if message:
                event["message"] = message
            execution.append(event)
            execution.heartbeat()

        engine = ReviewEngine(
            spec=self.spec,
            title=self.document.title,
            pages=self.pages,
            context_tokens=self.context_tokens,
            max_output_tokens=settings.PARLEY_REVIEW_MAX_TOKENS,
            complete=complete,
            step_get=step_get,
            step_put=step_put,
            progress=progress,
            cancelled=execution.cancelled,
            parallel=self.parallel,
            section_tokens=settings.PARLEY_REVIEW_SECTION_TOKENS,
        )
        try:
            result = engine.run()
        except ReviewCancelled:
            execution.raise_if_cancelled()
            raise InferenceError("cancelled", "The review was cancelled.") from None
        review = {
            "template": self.spec.as_dict(),
            "document": {
                "id": str(self.document.id),
                "title": self.document.title,
                "sha256": self.document.sha256,
                "pages": len(self.pages),
            },
            "model": models[0] if models else run.model,
            **result,
        }
        markdown, citations = review_markdown(review), review_citations(review)
        execution.token(markdown)
        execution.documents = {
            "strategy": review["strategy"],
            "reason": _reason(review),
            "documents": [
                {
                    "id": str(self.document.id),
                    "title": self.document.title,
                    "pages": list(range(1, len(self.pages) + 1)),
                }
            ],
            "citations": citations,
            "unverified": [
                i["unverified_quote"] for i in review["items"] if "unverified_quote" in i
            ],
            "quotes": review["quotes"],
            "marked": markdown,
            "review": review,
        }
        return StreamFinished(
            finish_reason="stop", usage=Usage(prompt_tokens=usage[0], completion_tokens=usage[1])
        )

    def _key(self, run: Run) -> dict[str, Any]:
        return {
            "document_sha256": self.document.sha256,
            "task": self.spec.key(),
            "model": run.model or "default",
        }


_usage_lock = threading.Lock()


def _complete(request: ChatRequest, usage: list[int], models: list[str]) -> str:
    """One pool call's text (not streamed to the user); its usage added to `usage`."""
    text: list[str] = []
    stream = pool.chat_stream(request)
    try:
        for event in stream:
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, StreamFinished):
                with _usage_lock:
                    usage[0] += event.usage.prompt_tokens
                    usage[1] += event.usage.completion_tokens
            elif isinstance(event, StreamStarted) and not models:
                models.append(event.model)
    finally:
        stream.close()
    return "".join(text)


def _reason(review: dict[str, Any]) -> str:
    stats = review["stats"]
    if review["strategy"] == "whole":
        return "The document fits in the model's context: it was reviewed in one call."
    return (
        f"The document is longer than the model's context: it was reviewed in "
        f"{stats['sections']} sections ({stats['map_calls']} calls, "
        f"{stats['reused_steps']} steps reused, up to {stats['parallel_max']} at a time), "
        f"then merged ({stats['reduce_calls']} calls)."
    )


def review_citations(review: dict[str, Any]) -> list[dict[str, Any]]:
    """The review's verified quotes as citations, numbered as review_markdown links them."""
    document = review["document"]
    out: list[dict[str, Any]] = []
    for item in items_in_order(review):
        citation = item.get("citation")
        if citation:
            out.append(
                {
                    "number": len(out) + 1,
                    "quote": item["quote"],
                    "document_id": document["id"],
                    "title": document["title"],
                    **citation,
                }
            )
    return out


def review_turn_execute(*, run_id: Any, tenant_id: Any) -> None:
    run_execute(run_id=run_id, tenant_id=tenant_id, producer=ReviewTurn())
