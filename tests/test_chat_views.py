"""The chat page, and an outsider's view of someone else's conversation."""

from __future__ import annotations

import re
import uuid

import pytest
from django.urls import reverse

from agents.services import plugin_update
from chat.models import Conversation, Run
from tenants.rls import operator_scope, tenant_scope
from tests.conftest import chat_page_data
from tests.factories import ConversationFactory, MessageFactory, RunFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(alice):
    conversation = ConversationFactory(
        tenant=alice.tenant, user=alice.user, title="Quarterly numbers"
    )
    question = MessageFactory(conversation=conversation, content="How did Q3 go?")
    MessageFactory(parent=question, role="assistant", content="Revenue grew <b>12%</b>.")
    return conversation


def test_owner_sees_the_conversation_with_its_thread(client, alice, conversation):
    client.force_login(alice.user)
    response = client.get(reverse("chat:conversation", args=[conversation.id]))
    assert response.status_code == 200
    page = response.content.decode()
    assert "Quarterly numbers" in page
    assert "How did Q3 go?" in page
    # Model output reaches the page only as JSON data, never as markup.
    assert "<b>12%</b>" not in page
    assert "Revenue grew \\u003Cb\\u003E12%\\u003C/b\\u003E." in page


@pytest.fixture
def branched(alice):
    """Q1 answered three times (A1, A2, A3: regenerated), a follow-up Q2 under A2 whose
    answer is being generated, and the current branch on A2's side."""
    with operator_scope():
        conversation = ConversationFactory(tenant=alice.tenant, user=alice.user, title="Branches")
        q1 = MessageFactory(conversation=conversation, content="First question")
        a1 = MessageFactory(parent=q1, role="assistant", content="First answer")
        a2 = MessageFactory(parent=q1, role="assistant", content="Second answer, cut short")
        a3 = MessageFactory(parent=q1, role="assistant", content="Third answer")
        q2 = MessageFactory(parent=a2, content="Follow-up")
        conversation.current_leaf = q2
        conversation.save()

        RunFactory(user_message=q1, assistant_message=a1, state=Run.State.SUCCEEDED)
        RunFactory(
            user_message=q1,
            assistant_message=a2,
            state=Run.State.CANCELLED,
            error_code="cancelled",
            error_message="Cancelled by the user.",
        )
        RunFactory(user_message=q1, assistant_message=a3, state=Run.State.SUCCEEDED)
        live = RunFactory(user_message=q2, state=Run.State.RUNNING)
        RunFactory(
            user_message=q2,
            state=Run.State.FAILED,
            error_code="no_backend",
            error_message="No backend.",
        )
    return conversation, {"q1": q1, "a1": a1, "a2": a2, "a3": a3, "q2": q2, "live": live}


def test_the_page_carries_the_current_branch_with_siblings_and_live_runs(client, alice, branched):
    conversation, m = branched
    client.force_login(alice.user)
    data = chat_page_data(client.get(reverse("chat:conversation", args=[conversation.id])))

    assert data["conversation"] == {
        "id": str(conversation.id),
        "title": "Branches",
        "current_leaf_id": str(m["q2"].id),
        "agent": None,
        "model": "",
    }
    branch = data["branch"]
    assert [step["id"] for step in branch] == [str(m["q1"].id), str(m["a2"].id), str(m["q2"].id)]
    assert [step["role"] for step in branch] == ["user", "assistant", "user"]
    assert [step["content"] for step in branch] == [
        "First question",
        "Second answer, cut short",
        "Follow-up",
    ]
    assert [step["parent_id"] for step in branch] == [None, str(m["q1"].id), str(m["a2"].id)]
    answer = branch[1]
    assert answer["sibling_ids"] == [str(m[k].id) for k in ("a1", "a2", "a3")]
    assert (answer["sibling_index"], answer["sibling_count"]) == (1, 3)
    assert (branch[0]["sibling_index"], branch[0]["sibling_count"]) == (0, 1)
    # Why an answer ended early stays with it; finished answers carry no note.
    assert answer["error"] == {"code": "cancelled", "message": "Cancelled by the user."}
    assert branch[0]["error"] is None and branch[2]["error"] is None
    # Only the run still going is listed, to attach to; ended ones are in the messages.
    assert data["runs"] == [
        {"id": str(m["live"].id), "user_message_id": str(m["q2"].id), "state": "running"}
    ]


def test_the_page_follows_a_switched_branch(client, alice, branched):
    conversation, m = branched
    with operator_scope():
        conversation.current_leaf = m["a3"]
        conversation.save()
    client.force_login(alice.user)
    data = chat_page_data(client.get(reverse("chat:conversation", args=[conversation.id])))
    assert [step["id"] for step in data["branch"]] == [str(m["q1"].id), str(m["a3"].id)]
    assert (data["branch"][1]["sibling_index"], data["branch"][1]["sibling_count"]) == (2, 3)
    assert data["branch"][1]["error"] is None


def test_the_page_carries_what_the_client_needs_for_the_api(client, alice, conversation):
    client.force_login(alice.user)
    response = client.get(reverse("chat:conversation", args=[conversation.id]))
    page = response.content.decode()
    # Unsafe API calls need the CSRF token: the page holds it, whatever the cookie settings.
    token = re.search(r'data-csrf-token="([^"]+)"', page)
    assert token and len(token.group(1)) >= 32
    assert 'data-api-url="/api/v1/"' in page
    export = reverse("api:chat_conversation_export", kwargs={"conversation_id": conversation.id})
    assert f'href="{export}?format=markdown"' in page
    assert f'href="{export}?format=json"' in page


def test_a_new_chat_carries_no_conversation(client, alice, conversation):
    client.force_login(alice.user)
    data = chat_page_data(client.get(reverse("chat:home")))
    assert data == {
        "conversation": None,
        "branch": [],
        "runs": [],
        "agents": [],
        # (no backend in these tests: no model to choose)
        "default_model": "",
        "models": [],
        "model": "",
    }


CALCULATOR = {
    "id": "calculator.calculator",
    "title": "Calculator",
    "description": "Answers questions that need exact numbers, units or dates.",
}


def _enable(person, plugin, *, enabled=True):
    with tenant_scope(tenant_id=person.tenant.id):
        plugin_update(actor=person.actor, name=plugin, enabled=enabled)


def _agent_select(response) -> str:
    match = re.search(r'<select id="agent".*?</select>', response.content.decode(), re.S)
    assert match, "the composer has no agent choice"
    return match.group(0)


def test_agents_are_offered_only_once_the_tenant_enables_their_plugin(
    client, alice, bob, all_plugins, conversation
):
    client.force_login(bob.user)
    url = reverse("chat:conversation", args=[conversation.id])
    assert chat_page_data(client.get(reverse("chat:home")))["agents"] == []
    assert "calculator.calculator" not in _agent_select(client.get(reverse("chat:home")))

    _enable(alice, "calculator")
    client.force_login(alice.user)
    for page in (client.get(reverse("chat:home")), client.get(url)):
        assert chat_page_data(page)["agents"] == [CALCULATOR]
    # Members pick agents as well as admins.
    client.force_login(bob.user)
    home = client.get(reverse("chat:home"))
    assert chat_page_data(home)["agents"] == [CALCULATOR]
    choice = _agent_select(home)
    assert '<option value="">Plain chat</option>' in choice
    assert re.search(r'<option value="calculator\.calculator"[^>]*>Calculator</option>', choice)

    _enable(alice, "calculator", enabled=False)
    assert chat_page_data(client.get(reverse("chat:home")))["agents"] == []


def test_the_page_carries_the_conversations_agent_and_selects_it(
    client, alice, all_plugins, conversation
):
    _enable(alice, "calculator")
    client.force_login(alice.user)
    url = reverse("chat:conversation", args=[conversation.id])
    response = client.get(url)
    assert chat_page_data(response)["conversation"]["agent"] is None
    assert " selected" not in _agent_select(response)

    with operator_scope():
        Conversation.objects.filter(id=conversation.id).update(agent="calculator.calculator")
    response = client.get(url)
    assert chat_page_data(response)["conversation"]["agent"] == "calculator.calculator"
    assert re.search(
        r'<option value="calculator\.calculator"[^>]*\sselected>', _agent_select(response)
    )

    # Its plugin disabled since: the conversation still names it, no choice offers it.
    _enable(alice, "calculator", enabled=False)
    response = client.get(url)
    assert chat_page_data(response)["conversation"]["agent"] == "calculator.calculator"
    assert chat_page_data(response)["agents"] == []
    assert "calculator.calculator" not in _agent_select(response)


def test_an_outsider_is_offered_only_their_own_tenants_agents(
    client, alice, charlie, all_plugins, conversation
):
    _enable(alice, "calculator")
    client.force_login(charlie.user)
    home = client.get(reverse("chat:home"))
    assert chat_page_data(home) == {
        "conversation": None,
        "branch": [],
        "runs": [],
        "agents": [],
        "default_model": "",
        "models": [],
        "model": "",
    }
    assert "calculator" not in _agent_select(home)
    # And still nothing of the owner's conversation, its agent included.
    foreign = client.get(reverse("chat:conversation", args=[conversation.id]))
    assert foreign.status_code == 404

    _enable(charlie, "calculator")
    assert chat_page_data(client.get(reverse("chat:home")))["agents"] == [CALCULATOR]


def test_chat_home_lists_only_own_conversations(client, alice, charlie, conversation):
    client.force_login(charlie.user)
    page = client.get(reverse("chat:home")).content.decode()
    assert "Quarterly numbers" not in page
    client.force_login(alice.user)
    assert "Quarterly numbers" in client.get(reverse("chat:home")).content.decode()


@pytest.mark.parametrize("who", ["charlie", "bob"])
def test_others_get_not_found_exactly_like_a_missing_conversation(
    client, who, request, conversation
):
    person = request.getfixturevalue(who)
    client.force_login(person.user)
    foreign = client.get(reverse("chat:conversation", args=[conversation.id]))
    missing = client.get(reverse("chat:conversation", args=[uuid.uuid4()]))
    assert foreign.status_code == missing.status_code == 404
    assert foreign.content == missing.content
    assert "How did Q3 go?" not in foreign.content.decode()


@pytest.mark.parametrize("who", ["charlie", "bob"])
def test_others_see_nothing_of_the_branches_or_runs(client, who, request, branched):
    conversation, m = branched
    person = request.getfixturevalue(who)
    client.force_login(person.user)
    response = client.get(reverse("chat:conversation", args=[conversation.id]))
    assert response.status_code == 404
    page = response.content.decode()
    assert str(m["live"].id) not in page and "First question" not in page
    home = client.get(reverse("chat:home")).content.decode()
    assert "Branches" not in home and str(conversation.id) not in home


def test_anonymous_users_are_sent_to_login(client, conversation):
    response = client.get(reverse("chat:conversation", args=[conversation.id]))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))


def test_user_without_a_tenant_gets_not_found(client):
    client.force_login(UserFactory())
    assert client.get(reverse("chat:home")).status_code == 404


def test_pages_carry_a_strict_content_security_policy(client, alice):
    client.force_login(alice.user)
    policy = client.get(reverse("chat:home"))["Content-Security-Policy"]
    assert "script-src 'self'" in policy
    assert "default-src 'self'" in policy
    assert "unsafe-inline" not in policy


def test_health_endpoint(client):
    assert client.get("/healthz").json() == {"status": "ok"}
