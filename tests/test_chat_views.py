"""The chat page, and an outsider's view of someone else's conversation."""

from __future__ import annotations

import uuid

import pytest
from django.urls import reverse

from chat.models import Conversation, Message
from tenants.rls import operator_scope
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def conversation(alice):
    with operator_scope():
        return _conversation(alice)


def _conversation(alice):
    conversation = Conversation.objects.create(
        tenant=alice.tenant, user=alice.user, title="Quarterly numbers"
    )
    question = Message.objects.create(
        tenant=alice.tenant, conversation=conversation, role="user", content="How did Q3 go?"
    )
    Message.objects.create(
        tenant=alice.tenant,
        conversation=conversation,
        parent=question,
        role="assistant",
        content="Revenue grew <b>12%</b>.",
    )
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
