"""The built-in document reviewer (plugins/docreview): the conformance suite; its tools
over real ingested documents, called as the agent runtime calls them (a ToolContext in
the config), never reaching a document of another member or tenant; and an agent run
through the websocket where a scripted model searches, then answers."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from langchain_core.messages import AIMessage, ToolMessage

from agents import tool_queue
from agents.context import ToolContext
from agents.testing import PluginConformance
from chat import agent_turn
from chat.models import Message, Run
from documents.ingest import document_ingest
from documents.models import Document
from documents.services import document_upload
from plugins.docreview.reading import RESULT_CHARS, pages_part, shares
from plugins.docreview.selection import RECENT_LIMIT, short_id
from plugins.docreview.tools import document_read, documents_search, quote_check, review_start
from tenants.rls import tenant_scope
from tests.conftest import ws_connect
from tests.scripted_model import ScriptedChatModel


class TestDocreviewConformance(PluginConformance):
    entry_point = "docreview"
    settings_examples = [{}]
    invalid_settings_examples = [{"max_pages": 3}]


LEASE = [
    "This lease is made between Northwind Properties (the landlord) and Ada Lovelace "
    "(the tenant) for the flat at 12 Analytical Street.",
    "Rent. The tenant pays a monthly rent of 1,450 euros on the first day of each month "
    "by bank transfer. Late payment incurs a fee of 40 euros.",
    # A word broken at the end of a line, as a PDF's text has it.
    "Pets. No cats, dogs or other animals may be kept in the flat without the landlord's "
    "writ-\nten consent, which may be withdrawn at any time.",
    "Termination. Either party may end this lease by giving three months' notice in "
    "writing. The deposit of two months' rent is returned within thirty days.",
]
RECIPES = [
    "Bread. Mix flour, water, salt and yeast; leave the dough to rise for two hours.",
    "Pets are welcome in the kitchen: cats and dogs may be kept near the oven.",
]
SECRET = [
    "Confidential merger plan. Zanzibar Holdings buys the zeppelin works for 90 million.",
]


@pytest.fixture
def storage(settings, tmp_path):
    settings.STORAGES = {
        **settings.STORAGES,
        "documents": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "documents"), "base_url": None},
        },
    }
    # One paragraph a chunk (each is under 60 tokens), no overlap.
    settings.PARLEY_DOCUMENT_CHUNK_TOKENS = 60
    settings.PARLEY_DOCUMENT_CHUNK_OVERLAP_TOKENS = 0


def ingested(person, text: str, filename: str) -> Document:
    with tenant_scope(tenant_id=person.tenant.id, user_id=person.user.id):
        document = document_upload(actor=person.actor, data=text.encode(), filename=filename)
    document_ingest(document_id=document.id, tenant_id=person.tenant.id)
    with tenant_scope(tenant_id=person.tenant.id):
        document = Document.objects.get(id=document.id)
    assert document.state == Document.State.READY, document.error_message
    return document


class Events:
    def __init__(self) -> None:
        self.put_events: list[dict[str, Any]] = []

    def put(self, event: dict[str, Any]) -> None:
        self.put_events.append(event)


def context(person, *documents: Document, events: Events | None = None, **kwargs) -> ToolContext:
    return ToolContext(
        tenant_id=str(person.tenant.id),
        user_id=str(person.user.id),
        run_id=kwargs.pop("run_id", str(uuid.uuid4())),
        document_ids=tuple(str(d.id) for d in documents),
        events=events,
        **kwargs,
    )


def call(tool, ctx: ToolContext | None, **arguments) -> str:
    configurable = {"parley_context": ctx} if ctx is not None else {}
    result = tool.invoke(arguments, config={"configurable": configurable})
    assert isinstance(result, str) and len(result) <= RESULT_CHARS, result
    return result


@pytest.fixture
def lease(alice, storage) -> Document:
    return ingested(alice, "\n\n".join(LEASE), "lease.txt")


@pytest.fixture
def recipes(alice, storage) -> Document:
    return ingested(alice, "\n\n".join(RECIPES), "recipes.txt")


# --- documents_search ----------------------------------------------------------------------


@pytest.mark.django_db
def test_search_finds_the_passage_in_the_documents_in_play_only(alice, lease, recipes):
    events = Events()
    found = call(
        documents_search,
        context(alice, lease, events=events),
        query="May I keep cats or dogs in the flat?",
        limit=3,
    )
    assert found.startswith("Searched the 1 document attached to this conversation")
    first = found.split("[1]")[1].split("[2]")[0]
    assert f"“lease.txt” (doc {short_id(lease)}), page 1" in first and "No cats, dogs" in first
    # The recipes say "cats and dogs" too, but they are not in play.
    assert "recipes" not in found and "oven" not in found
    assert [e["stage"] for e in events.put_events] == ["search", "search"]
    assert events.put_events[-1]["done"] == events.put_events[-1]["total"] == 1

    both = call(documents_search, context(alice, lease, recipes), query="cats dogs oven")
    assert "the 2 documents attached" in both and "oven" in both


@pytest.mark.django_db
def test_search_without_attachments_uses_the_members_recent_documents_and_says_so(
    alice, bob, charlie, lease, storage
):
    ingested(bob, "\n\n".join(SECRET), "bob-merger.txt")
    ingested(charlie, "\n\n".join(SECRET), "charlie-merger.txt")
    found = call(documents_search, context(alice), query="zeppelin works merger Zanzibar")
    assert "your 1 most recent ready documents (none is attached" in found
    # The query is echoed; no passage of Bob's or Charlie's document is.
    assert "lease.txt" in found and "merger.txt" not in found and "Holdings buys" not in found
    assert RECENT_LIMIT == 20


@pytest.mark.django_db
def test_search_results_stay_under_the_cap(alice, storage, settings):
    settings.PARLEY_DOCUMENT_CHUNK_TOKENS = 400
    paragraph = "The supplier delivers the goods within thirty days of the order. " * 25
    long = ingested(alice, "\n\n".join([paragraph] * 12), "supply.txt")
    found = call(documents_search, context(alice, long), query="deliver goods", limit=10)
    assert found.count("\n[") >= 5 and "…" in found
    assert found.rstrip().endswith("cite the page.")


@pytest.mark.django_db
def test_tools_outside_a_run_refuse():
    for tool, arguments in (
        (documents_search, {"query": "rent"}),
        (document_read, {"document": "lease", "page": 1}),
        (quote_check, {"quote": "the monthly rent of"}),
        (review_start, {"template": "summary", "document": "lease"}),
    ):
        assert call(tool, None, **arguments).startswith("Error: this tool reads"), tool.name


# --- never another member's or tenant's document ------------------------------------------


@pytest.mark.django_db
def test_another_members_or_tenants_document_is_never_reachable(alice, bob, charlie, lease):
    bobs = ingested(bob, "\n\n".join(SECRET), "bob-merger.txt")
    charlies = ingested(charlie, "\n\n".join(SECRET), "charlie-merger.txt")
    ctx = context(alice, lease)
    for other in (bobs, charlies):
        for name in (other.title, str(other.id), short_id(other), other.id.hex):
            read = call(document_read, ctx, document=name, page=1)
            assert read.startswith("Error: No document") and "Zanzibar" not in read, name
            checked = call(
                quote_check, ctx, quote="Zanzibar Holdings buys the zeppelin works", document=name
            )
            assert checked.startswith("Error: No document"), name
        # Even ids of theirs slipped into the context reach nothing: they are not Alice's.
        slipped = context(alice, other)
        assert "no ready document" in call(documents_search, slipped, query="Zanzibar zeppelin")
        assert call(document_read, slipped, document=other.title, page=1).startswith("Error:")
        assert call(
            quote_check, slipped, quote="Zanzibar Holdings buys the zeppelin works"
        ).startswith("Not found")
    # The quote is real, in their documents: only Alice's are looked at.
    assert call(quote_check, ctx, quote="Zanzibar Holdings buys the zeppelin works").startswith(
        "Not found"
    )


# --- document_read ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_read_pages_paginates_under_the_cap(alice, storage, settings):
    settings.PARLEY_DOCUMENT_CHUNK_TOKENS = 400  # the chunks do not matter here
    long_page = " ".join(f"Clause {n} binds the parties to term {n}." for n in range(1, 400))
    pages = ["Cover page of the supply agreement.", long_page, "Signatures of both parties."]
    document = ingested(alice, "\f".join(pages), "supply.txt")
    ctx = context(alice, document)
    with tenant_scope(tenant_id=alice.tenant.id):
        stored = {p.number: p.text for p in document.pages.all()}
    assert len(stored[2]) > 3 * RESULT_CHARS

    first = call(document_read, ctx, document="supply", page=1, pages=3)
    assert first.startswith(f"“supply.txt” (doc {short_id(document)}), 3 pages.")
    assert "--- page 1 of 3 ---\nCover page" in first and "--- page 2 of 3 ---\nClause 1 " in first
    # Page 2 comes a part at a time, each call saying where to read on, until the end.
    read_of_page_2 = first.split("--- page 2 of 3 ---\n")[1].split("\n(To read on:")[0]
    calls = 1
    result = first
    while "(To read on:" in result:
        tail = result.rsplit("(To read on: document_read(", 1)[1]
        assert tail.startswith(f'document="{short_id(document)}", page=')
        page = int(tail.split("page=")[1].split(",")[0])
        offset = int(tail.split("offset=")[1].split(")")[0])
        result = call(document_read, ctx, document=short_id(document), page=page, offset=offset)
        calls += 1
        if page == 2:
            body = result.split(f"--- page 2 of 3, from character {offset} ---\n")[1]
            read_of_page_2 += body.split("\n(To read on:")[0].split("\n--- page 3")[0]
    assert calls >= 4 and result.endswith("(End of the document.)")
    assert "--- page 3 of 3 ---\nSignatures" in result
    assert read_of_page_2.rstrip("\n") == stored[2].rstrip("\n")

    assert "has 3 pages" in call(document_read, ctx, document="supply", page=4)
    assert "offset must be within" in call(
        document_read, ctx, document="supply", page=1, offset=999
    )


@pytest.mark.django_db
def test_read_names_the_choices_when_the_document_is_unclear(alice, lease, recipes):
    events = Events()
    ctx = context(alice, lease, recipes, events=events)
    unclear = call(document_read, ctx, document="", page=1)
    assert unclear.startswith("Error: Name the document.") and short_id(recipes) in unclear
    assert "Bread. Mix flour" in call(document_read, ctx, document="RECIPES.txt", page=1)
    assert "Northwind" in call(document_read, ctx, document=str(lease.id), page=1, pages=2)
    assert events.put_events == []  # one page: nothing long to report


def test_pages_part_cuts_at_the_room_and_says_where_to_go_on():
    texts = {1: "a" * 50, 2: "word " * 100, 3: "end"}
    part = pages_part(texts, page_count=3, page=1, offset=0, pages=3, room=300)
    assert part.next_page == 2 and 0 < part.next_offset < 500
    assert part.text.endswith(" ") and texts[2][: part.next_offset] in part.text
    rest = pages_part(texts, page_count=3, page=2, offset=part.next_offset, pages=2, room=5000)
    assert rest.next_page is None and rest.text.endswith("end\n")
    assert shares([10, 1000, 1000], 510) == [10, 250, 250]


# --- quote_check ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_quote_check_accepts_a_real_quote_across_a_line_break_hyphen(alice, lease, recipes):
    ctx = context(alice, lease, recipes)
    verified = call(
        quote_check, ctx, quote="without the landlord's written consent, which may be withdrawn"
    )
    assert verified.startswith(f"Verified: in “lease.txt” (doc {short_id(lease)}), page 1")
    with tenant_scope(tenant_id=alice.tenant.id):
        text = lease.pages.get(number=1).text
    start = text.index("without the landlord")
    end = text.index("withdrawn") + len("withdrawn")
    assert f"characters {start}-{end}" in verified and "writ-\nten" in verified
    # Named document, and a quote in other quotation marks.
    assert call(
        quote_check, ctx, quote="“Either party may end this lease”", document="lease"
    ).startswith("Verified")


@pytest.mark.django_db
def test_quote_check_rejects_an_altered_or_fabricated_quote(alice, lease, recipes):
    ctx = context(alice, lease, recipes)
    for quote in (
        "without the landlord's verbal consent, which may be withdrawn",
        "the tenant pays a monthly rent of 1,540 euros",
        "the landlord may enter the flat at any time",
    ):
        assert call(quote_check, ctx, quote=quote).startswith("Not found"), quote
    assert "not verbatim in “lease.txt”" in call(
        quote_check, ctx, quote="Mix flour, water, salt and yeast", document="lease"
    )
    assert "too short" in call(quote_check, ctx, quote="the rent")


# --- review_start -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_review_start_creates_a_queued_review_run(
    alice, charlie, lease, settings, django_capture_on_commit_callbacks
):
    settings.PARLEY_REVIEW_START = "chat.services.runs.review_start"
    ctx = context(alice, lease)
    with django_capture_on_commit_callbacks() as queued:
        started = call(review_start, ctx, template="risks", document="lease")
    assert started.startswith(f"Started a Risks review of “lease.txt” (doc {short_id(lease)})")
    with tenant_scope(tenant_id=alice.tenant.id):
        run = Run.objects.get(task="review")
        message = Message.objects.get(id=run.user_message_id)
        assert run.user_id == alice.user.id and run.state == Run.State.QUEUED
        assert message.document_ids == [str(lease.id)]
        assert message.documents["review"]["kind"] == "risks"
    assert f"run {run.id}" in started and f"/c/{run.conversation_id}/" in started
    assert queued, "the run was handed to a worker on commit"
    # Asked again in the same agent run: the same run, not a second review.
    again = call(review_start, ctx, template="risks", document="lease")
    assert f"run {run.id}" in again
    with tenant_scope(tenant_id=alice.tenant.id):
        assert Run.objects.filter(task="review").count() == 1

    refused = call(review_start, ctx, template="questions", document="lease")
    assert refused.startswith("Error: the review was not started") and "question" in refused
    assert call(review_start, ctx, template="poem", document="lease").startswith(
        "Error: no review template 'poem'"
    )
    charlies = ingested(charlie, "\n\n".join(SECRET), "charlie-merger.txt")
    assert call(review_start, ctx, template="summary", document=str(charlies.id)).startswith(
        "Error: No document"
    )
    with tenant_scope(tenant_id=alice.tenant.id):
        assert Run.objects.filter(task="review").count() == 1


@pytest.mark.django_db
def test_review_start_without_the_review_service_configured_does_nothing(alice, lease, settings):
    settings.PARLEY_REVIEW_START = ""
    said = call(review_start, context(alice, lease), template="summary", document="lease")
    assert said.startswith("Error: reviews cannot be started from an agent")
    with tenant_scope(tenant_id=alice.tenant.id):
        assert not Run.objects.exists()


# --- an agent run ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_the_reviewer_searches_then_answers_in_an_agent_run(
    alice, storage, worker, all_plugins, monkeypatch
):
    from agents.services import plugin_enable, plugin_scopes_grant

    def prepare() -> Document:
        with tenant_scope(tenant_id=alice.tenant.id):
            plugin_scopes_grant(
                actor=alice.actor, name="docreview", scopes=["documents.read", "documents.write"]
            )
            plugin_enable(actor=alice.actor, name="docreview")
        return ingested(alice, "\n\n".join(LEASE), "lease.txt")

    document = await sync_to_async(prepare)()
    model = ScriptedChatModel(
        script=iter(
            [
                AIMessage(
                    content="",
                    tool_calls=[
                        {
                            "name": "documents_search",
                            "args": {"query": "notice to end the lease", "limit": 2},
                            "id": "call_search",
                        }
                    ],
                ),
                AIMessage(content="Three months' notice in writing (page 1)."),
            ]
        )
    )
    monkeypatch.setattr(agent_turn, "agent_model_build", lambda *, run: model)

    _, _, socket = await ws_connect(alice.user)
    await socket.send(
        {
            "type": "chat.send",
            "agent": "docreview.reviewer",
            "content": "How do I end the lease?",
            "document_ids": [str(document.id)],
        }
    )
    started = await socket.receive(timeout=15)
    assert started["type"] == "run.started", started
    frames = await socket.receive_until(("run.done", "run.error"), timeout=60)
    await socket.close()
    frames = [f for f in frames if f.get("run_id") == started["run_id"]]

    assert frames[-1]["type"] == "run.done", frames[-1]
    # Documents in the conversation: review_start (documents.write) is not offered.
    assert model.offered[0] == ["documents_search", "document_read", "quote_check"]
    assert model.choices[0] == "required"
    end = next(f for f in frames if f["type"] == "tool.end")
    assert end["name"] == "documents_search" and end["error"] is None
    assert "three months' notice" in end["result"] and short_id(document) in end["result"]
    progress = [f for f in frames if f["type"] == "progress" and f.get("stage") == "search"]
    assert len(progress) == 2
    # The model got the passage back and answered from it.
    [sent] = [m for m in model.seen[1] if isinstance(m, ToolMessage)]
    assert "three months' notice" in sent.content
    answer = "".join(f["delta"] for f in frames if f["type"] == "token")
    assert answer == "Three months' notice in writing (page 1)."


@pytest.mark.django_db(transaction=True)
async def test_without_attachments_the_reviewer_starts_a_review_on_the_tools_worker(
    alice, storage, worker, all_plugins, fresh_pool, monkeypatch, settings
):
    """No document in the conversation: the run is trusted and offered review_start,
    which runs on the `tools` queue (documents.write) and starts a review run."""
    from agents.services import plugin_enable, plugin_scopes_grant

    settings.PARLEY_REVIEW_START = "chat.services.runs.review_start"

    def prepare() -> Document:
        with tenant_scope(tenant_id=alice.tenant.id):
            plugin_scopes_grant(
                actor=alice.actor, name="docreview", scopes=["documents.read", "documents.write"]
            )
            plugin_enable(actor=alice.actor, name="docreview")
        return ingested(alice, "\n\n".join(LEASE), "lease.txt")

    document = await sync_to_async(prepare)()
    model = ScriptedChatModel(
        script=iter(
            [
                AIMessage(
                    content="",
                    tool_calls=[
                        {
                            "name": "review_start",
                            "args": {"template": "risks", "document": "lease.txt"},
                            "id": "call_review",
                        }
                    ],
                ),
                AIMessage(content="The risks review is running."),
            ]
        )
    )
    monkeypatch.setattr(agent_turn, "agent_model_build", lambda *, run: model)
    queues: list[str] = []
    dispatch = tool_queue.tool_dispatch

    def recorded(*, queue, message, expires_s):
        queues.append(queue)
        dispatch(queue=queue, message=message, expires_s=expires_s)

    monkeypatch.setattr(tool_queue, "tool_dispatch", recorded)
    _, _, socket = await ws_connect(alice.user)
    await socket.send(
        {"type": "chat.send", "agent": "docreview.reviewer", "content": "Review my lease's risks."}
    )
    started = await socket.receive(timeout=15)
    assert started["type"] == "run.started", started
    frames = await socket.receive_until(("run.done", "run.error"), timeout=60)
    await socket.close()
    frames = [f for f in frames if f.get("run_id") == started["run_id"]]

    assert frames[-1]["type"] == "run.done", frames[-1]
    assert "review_start" in model.offered[0] and queues == ["tools"]
    end = next(f for f in frames if f["type"] == "tool.end")
    assert end["error"] is None, end
    assert end["result"].startswith(
        f"Started a Risks review of “lease.txt” (doc {short_id(document)})"
    )

    def review_run() -> Run:
        with tenant_scope(tenant_id=alice.tenant.id):
            return Run.objects.get(task="review")

    run = await sync_to_async(review_run)()
    assert f"run {run.id}" in end["result"] and run.user_id == alice.user.id
    assert str(run.id) != started["run_id"]


@pytest.mark.django_db
def test_the_demo_tenant_has_the_reviewer_with_its_scopes(all_plugins, capsys):
    from django.core.management import call_command

    from agents.models import TenantPlugin
    from agents.selectors import agents_available
    from tenants.access import actor_for_user
    from tenants.models import Tenant, User
    from tenants.rls import operator_scope

    call_command("seed_demo")
    with operator_scope():
        tenant = Tenant.objects.get(slug="demo")
    with tenant_scope(tenant_id=tenant.id):
        row = TenantPlugin.objects.get(tenant=tenant, plugin="docreview")
        assert row.enabled and row.granted_scopes == ["documents.read", "documents.write"]
        actor = actor_for_user(User.objects.get(username="demo"), tenant_id=tenant.id)
        assert "docreview.reviewer" in [agent.id for agent in agents_available(actor=actor)]
