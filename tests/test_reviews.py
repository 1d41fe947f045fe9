"""Document reviews (documents.review, chat.review_turn): the whole document in one
call when it fits, else map-reduce over sections with every step kept, fanned out at
most `parallel` at a time, merged hierarchically; every quote verified; a review cut
short and run again gives the same result as one that was not; reviews are runs,
started, followed and exported through the API; templates are the tenant's."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path

import jsonschema
import pytest

from documents.review import (
    BUILT_IN,
    ReviewCancelled,
    ReviewEngine,
    review_markdown,
    sections_of,
)
from tests.synthetic import Reply

SCHEMA = json.loads(Path("docs/review.schema.json").read_text())
PAGE_WORDS = "The supplier shall deliver the goods within thirty days of each order"


def pages_of(count: int, words: int = 60) -> list[str]:
    """Pages whose first sentence names the page: `Clause N. ...`."""
    filler = " ".join(["and the buyer pays on delivery"] * (words // 6))
    return [f"Clause {n}. {PAGE_WORDS} number {n}. {filler}." for n in range(1, count + 1)]


class FakeModel:
    """A scripted reviewer: a map step quotes each page's first sentence; a reduce step
    concatenates its partials' items. Counts calls and the most in flight at once."""

    def __init__(self, *, delay: float = 0.0, fail_after: int | None = None, lie: bool = False):
        self.delay, self.fail_after, self.lie = delay, fail_after, lie
        self.calls = 0
        self.in_flight = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, messages: list[dict], schema: dict) -> str:
        with self.lock:
            self.calls += 1
            if self.fail_after is not None and self.calls > self.fail_after:
                raise RuntimeError("worker killed")
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        try:
            time.sleep(self.delay)
            user = messages[-1]["content"]
            if "summary" in schema["required"] and "items" not in schema["required"]:
                parts = re.findall(r'<part number="\d+">\n(.*?)\n</part>', user, re.S)
                assert len(parts) >= 2
                return json.dumps({"summary": " ".join(parts)})
            items = []
            for number, text in re.findall(r'<page number="(\d+)">\n(.*?)\n</page>', user, re.S):
                sentence = text.split(". ")[1]
                quote = sentence.replace("thirty", "sixty") if self.lie else sentence
                items.append(
                    {
                        "category": "risk",
                        "title": f"Delivery {number}",
                        "detail": "Late delivery.",
                        "severity": "high",
                        "quote": quote,
                        "page": int(number),
                    }
                )
            first = re.search(r'<page number="(\d+)">', user).group(1)
            # Long enough that the summaries of a long document need several merges.
            summary = f"Part {first}. " + "It sets delivery terms. " * 20
            return json.dumps({"summary": summary, "items": items})
        finally:
            with self.lock:
                self.in_flight -= 1


def engine(pages, model, *, context=2000, steps=None, parallel=3, cancelled=lambda: False):
    kept = {} if steps is None else steps
    return ReviewEngine(
        spec=BUILT_IN["risks"],
        title="Supply agreement",
        pages=pages,
        context_tokens=context,
        max_output_tokens=200,
        complete=model,
        step_get=kept.get,
        step_put=kept.__setitem__,
        parallel=parallel,
        cancelled=cancelled,
    )


def test_sections_keep_pages_whole_and_in_order_and_cut_a_page_too_long():
    pages = pages_of(10)
    sections = sections_of(pages, budget_tokens=200)
    assert [s.page_start for s in sections] == sorted(s.page_start for s in sections)
    covered = [n for s in sections for n in range(s.page_start, s.page_end + 1)]
    assert covered == list(range(1, 11))
    assert all(s.tokens <= 200 for s in sections)
    long_page = ["word " * 2000]
    parts = sections_of(long_page, budget_tokens=300)
    assert len(parts) > 1 and all(p.page_start == p.page_end == 1 for p in parts)


def test_sections_can_be_held_below_what_the_context_allows():
    pages = pages_of(12)
    wide = engine(pages, FakeModel(), context=8000).run()
    review_engine = engine(pages, FakeModel(), context=8000)
    review_engine.section_tokens = 300
    narrow = review_engine.run()
    assert wide["stats"]["sections"] == 1 and narrow["stats"]["sections"] >= 4
    assert narrow["quotes"] == wide["quotes"] == {"verified": 12, "unverified": 0}


def test_a_document_that_fits_is_reviewed_in_one_call():
    model = FakeModel()
    result = engine(pages_of(2), model, context=8000).run()
    assert result["strategy"] == "whole" and model.calls == 1
    assert result["quotes"] == {"verified": 2, "unverified": 0}


def test_a_long_document_is_mapped_in_parallel_and_reduced_hierarchically():
    pages = pages_of(40)
    model = FakeModel(delay=0.05)
    review = engine(pages, model, context=1200, parallel=3).run()
    stats = review["stats"]
    assert review["strategy"] == "map_reduce" and stats["sections"] > 6
    assert stats["map_calls"] == stats["sections"]
    # Merged in more than one level: more reduce calls than one, the parts in order.
    assert stats["reduce_calls"] > 1
    firsts = [int(n) for n in re.findall(r"Part (\d+)\.", review["summary"])]
    assert len(firsts) == stats["sections"] and firsts == sorted(firsts) and firsts[0] == 1
    assert model.most == 3 == stats["parallel_max"]
    # Every page's quote made it through, verified and placed.
    assert review["quotes"] == {"verified": 40, "unverified": 0}
    pages_cited = sorted(item["citation"]["page_start"] for item in review["items"])
    assert pages_cited == list(range(1, 41))
    item = review["items"][0]
    page = pages[item["citation"]["page_start"] - 1]
    assert page[item["citation"]["char_start"] : item["citation"]["char_end"]] == item["quote"]


def test_altered_quotes_are_never_shown_as_quotes_and_are_counted():
    review = engine(pages_of(3), FakeModel(lie=True), context=8000).run()
    assert review["quotes"] == {"verified": 0, "unverified": 3}
    assert all(
        "quote" not in item and "sixty" in item["unverified_quote"] for item in review["items"]
    )
    full = {
        "template": BUILT_IN["risks"].as_dict(),
        "document": {"id": str(uuid.uuid4()), "title": "t", "sha256": "0" * 64, "pages": 3},
        "model": "m",
        **review,
    }
    jsonschema.validate(full, SCHEMA)
    markdown = review_markdown(full)
    assert "sixty" not in markdown and "could not be found in the document" in markdown


def test_a_review_cut_short_resumes_with_the_same_result_and_redoes_at_most_a_batch():
    pages = pages_of(30)
    uninterrupted = engine(pages, FakeModel(), context=1200).run()

    kept: dict = {}
    killed = FakeModel(fail_after=5)
    with pytest.raises(RuntimeError, match="worker killed"):
        engine(pages, killed, context=1200, steps=kept, parallel=3).run()
    done_before = len(kept)
    resumed_model = FakeModel()
    resumed = engine(pages, resumed_model, context=1200, steps=kept, parallel=3).run()
    for key in ("summary", "items", "quotes", "strategy"):
        assert resumed[key] == uninterrupted[key], key
    assert resumed["stats"]["reused_steps"] == done_before >= 3
    # The resumed run calls for the sections not kept only (then the reduce)...
    sections = uninterrupted["stats"]["sections"]
    assert resumed["stats"]["map_calls"] == sections - done_before
    assert resumed_model.calls == sections - done_before + resumed["stats"]["reduce_calls"]
    # ...and the work lost with the killed worker is at most one batch of `parallel`.
    assert killed.calls - done_before <= 3


def test_a_cancelled_review_stops_between_steps():
    model = FakeModel(delay=0.05)
    calls_at_cancel = []

    def cancelled() -> bool:
        if model.calls >= 4:
            calls_at_cancel.append(model.calls)
            return True
        return False

    with pytest.raises(ReviewCancelled):
        engine(pages_of(40), model, context=1200, cancelled=cancelled).run()
    time.sleep(0.2)
    assert model.calls <= calls_at_cancel[0] + 3


# --- through the API, as a run ----------------------------------------------------------------


@pytest.fixture
def lease(alice, documents_storage):
    from documents.ingest import document_ingest
    from documents.services import document_upload
    from tenants.rls import tenant_scope

    text = "\f".join(pages_of(2)).encode()
    with tenant_scope(tenant_id=alice.tenant.id, user_id=alice.user.id):
        document = document_upload(actor=alice.actor, data=text, filename="supply.txt")
    document_ingest(document_id=document.id, tenant_id=alice.tenant.id)
    return document


def _wait_done(client, run_id: str) -> dict:
    for _ in range(200):
        run = client.get(f"/api/v1/runs/{run_id}").json()
        if run["state"] in ("succeeded", "failed", "cancelled"):
            return run
        time.sleep(0.05)
    raise AssertionError("the review did not finish")


@pytest.mark.django_db(transaction=True)
def test_a_review_is_a_run_started_followed_and_exported(
    client, alice, lease, worker, synthetic_server, settings
):
    from inference import pool

    answer = {
        "summary": "A supply agreement.",
        "items": [
            {
                "category": "risk",
                "title": "Delivery",
                "detail": "Thirty days is long.",
                "severity": "high",
                "quote": f"{PAGE_WORDS} number 2",
                "page": 2,
            },
            {
                "category": "risk",
                "title": "Penalty",
                "detail": "Invented.",
                "severity": "low",
                "quote": "the buyer pays a penalty of ten percent",
                "page": 1,
            },
        ],
    }
    server = synthetic_server(replies=[Reply(pieces=[json.dumps(answer)])])
    settings.PARLEY_BACKENDS = [server.url]
    pool.forget_cache()
    client.force_login(alice.user)
    response = client.post(
        "/api/v1/reviews",
        {"document_id": str(lease.id), "template": "risks"},
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    run = _wait_done(client, response.json()["id"])
    assert run["state"] == "succeeded", run
    # The model was asked for the schema's JSON, with the document delimited as data.
    body = server.bodies[0]
    assert body["response_format"]["type"] == "json_schema"
    assert '<page number="2">' in body["messages"][-1]["content"]

    review = client.get(f"/api/v1/reviews/{run['id']}").json()
    jsonschema.validate(review, SCHEMA)
    assert review["strategy"] == "whole" and review["quotes"] == {"verified": 1, "unverified": 1}
    assert review["items"][0]["citation"]["page_start"] == 2
    assert "quote" not in review["items"][1]
    markdown = client.get(f"/api/v1/reviews/{run['id']}?format=markdown")
    assert markdown["Content-Disposition"].startswith('attachment; filename="review-supply')
    text = markdown.content.decode()
    assert "([p. 2](#cite-1))" in text and "ten percent" not in text
    # The answer is that Markdown; its documents field is the same review.
    messages = client.get(f"/api/v1/conversations/{run['conversation_id']}/messages").json()
    stored = messages["messages"][-1]
    assert stored["content"] == text
    assert stored["documents"]["review"] == review
    assert stored["documents"]["citations"][0]["page_start"] == 2
    pool.forget_cache()


@pytest.mark.django_db
def test_reviews_refuse_what_they_cannot_do(client, alice, charlie, lease):
    client.force_login(alice.user)

    def start(**body):
        return client.post(
            "/api/v1/reviews",
            {"document_id": str(lease.id), "template": "risks", **body},
            content_type="application/json",
        )

    assert start(template="nonsense").status_code == 404
    response = start(template="questions")
    assert response.status_code == 400 and "at least one question" in response.json()["detail"]
    assert start(document_id=str(uuid.uuid4())).status_code == 404
    client.force_login(charlie.user)
    assert start().status_code == 404  # another tenant's document
    assert client.get(f"/api/v1/reviews/{uuid.uuid4()}").status_code == 404


@pytest.mark.django_db
def test_templates_are_copied_and_edited_by_admins_and_private_to_the_tenant(
    client, alice, bob, charlie
):
    client.force_login(alice.user)
    listed = client.get("/api/v1/review-templates").json()
    assert [t["id"] for t in listed] == ["summary", "key_terms", "risks", "questions"]
    created = client.post(
        "/api/v1/review-templates",
        {"kind": "questions", "name": "Lease check", "questions": ["Who pays repairs?"]},
        content_type="application/json",
    )
    assert created.status_code == 201, created.content
    template = created.json()
    assert template["instructions"] == BUILT_IN["questions"].instructions
    patched = client.patch(
        f"/api/v1/review-templates/{template['id']}",
        {"questions": ["Who pays repairs?", "What is the deposit?"]},
        content_type="application/json",
    )
    assert patched.json()["questions"] == ["Who pays repairs?", "What is the deposit?"]
    again = client.post(
        "/api/v1/review-templates",
        {"kind": "questions", "name": "Lease check", "questions": ["x?"]},
        content_type="application/json",
    )
    assert again.status_code == 400 and "exists already" in again.json()["detail"]
    # A member uses it but cannot change it; another tenant does not see it.
    client.force_login(bob.user)
    assert template["id"] in [t["id"] for t in client.get("/api/v1/review-templates").json()]
    denied = client.delete(f"/api/v1/review-templates/{template['id']}")
    assert denied.status_code == 403
    client.force_login(charlie.user)
    assert template["id"] not in [t["id"] for t in client.get("/api/v1/review-templates").json()]
    assert client.delete(f"/api/v1/review-templates/{template['id']}").status_code == 404
    client.force_login(alice.user)
    assert client.delete(f"/api/v1/review-templates/{template['id']}").status_code == 204


def test_a_reply_cut_off_mid_json_keeps_what_was_complete():
    from documents.review import output_parse

    spec = BUILT_IN["risks"]
    whole = {
        "category": "risk",
        "title": "Penalty",
        "detail": "Ten percent.",
        "severity": "high",
        "quote": "a penalty of ten percent",
        "page": 2,
    }
    cut = (
        '{"summary": "A supply \\"agreement\\" with penalties", "items": ['
        + json.dumps(whole)
        + ', {"category": "risk", "title": "Renew'
    )
    parsed = output_parse(cut, spec)
    assert parsed["summary"] == 'A supply "agreement" with penalties'
    assert parsed["items"] == [whole]
    # Not JSON at all: the text is the summary, nothing invented.
    assert output_parse("Just prose.", spec) == {"summary": "Just prose.", "items": []}


@pytest.mark.django_db
def test_kept_steps_are_never_reused_across_tenants(alice, charlie):
    """The same file reviewed in two tenants: each reuses only its own steps, even where
    row level security does not stand (operator scope here; SQLite in embedded mode)."""
    from documents.models import ReviewStep
    from documents.selectors import review_step_output
    from tenants.rls import operator_scope

    key = {"document_sha256": "a" * 64, "task": "t", "model": "m", "step": "map:0:x"}
    with operator_scope():
        ReviewStep.objects.create(tenant=alice.tenant, output={"summary": "alice's"}, **key)
        assert review_step_output(tenant_id=charlie.tenant.id, **key) is None
        ReviewStep.objects.create(tenant=charlie.tenant, output={"summary": "charlie's"}, **key)
        assert review_step_output(tenant_id=alice.tenant.id, **key) == {"summary": "alice's"}
        assert review_step_output(tenant_id=charlie.tenant.id, **key) == {"summary": "charlie's"}
