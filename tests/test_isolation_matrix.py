"""The isolation matrix: every route and websocket message that takes an object id,
generated from the URL configuration and the protocol, tried by the object's owner, a
member of the same tenant and an outsider (a member of another tenant).

An outsider always gets 404 and sees nothing of the object. A route or message added
without an entry here fails `test_every_route_with_an_id_has_an_entry`.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.urls import URLResolver, get_resolver

from chat import protocol
from chat.models import Message, Run
from tenants.models import ApiKey, Invitation, Role
from tenants.rls import operator_scope
from tests.conftest import ws_connect
from tests.factories import ConversationFactory, MembershipFactory, MessageFactory, RunFactory

pytestmark = pytest.mark.django_db

OK = "2xx"


@dataclass
class Entry:
    make: Callable[[Any], tuple[Any, str]]  # (alice's world) -> (object id, a text of it)
    # method -> {"owner": status, "member": status, "body": {} or (object id) -> {}}
    calls: dict[str, dict[str, Any]]
    # 404, or OK where the id is a public name and the outsider gets their own tenant's
    # state of it (never the owner's: the object's text must not appear).
    outsider: int | str = 404


@dataclass
class World:
    alice: Any
    bob: Any
    charlie: Any
    dave: Any = None
    objects: dict[str, Any] = field(default_factory=dict)


def _conversation(world: World) -> tuple[Any, str]:
    conversation = ConversationFactory(
        tenant=world.alice.tenant, user=world.alice.user, title="Merger plans"
    )
    MessageFactory(conversation=conversation, content="Merger plans, confidential")
    return conversation.id, "Merger plans"


def _api_key(world: World) -> tuple[Any, str]:
    with operator_scope():
        key = ApiKey.objects.create(
            tenant=world.alice.tenant,
            name=f"deploy-bot-{secrets.token_hex(2)}",
            prefix=secrets.token_hex(6),
            secret_hash="0" * 64,
            scopes=["chat"],
        )
    return key.id, "deploy-bot"


def _membership(world: World) -> tuple[Any, str]:
    membership = MembershipFactory(tenant=world.alice.tenant)
    return membership.id, membership.user.username


def _invitation(world: World) -> tuple[Any, str]:
    from django.utils import timezone

    with operator_scope():
        invitation = Invitation.objects.create(
            tenant=world.alice.tenant,
            email="erin@example.com",
            role=Role.MEMBER,
            token_hash=secrets.token_hex(32),
            expires_at=timezone.now() + timezone.timedelta(days=1),
        )
    return invitation.id, "erin@example.com"


def _backend(world: World) -> tuple[Any, str]:
    from inference.models import Backend

    backend = Backend.objects.create(base_url=f"http://gpu-{secrets.token_hex(3)}:8000")
    return backend.id, backend.base_url


def _tenant(world: World) -> tuple[Any, str]:
    return world.alice.tenant.id, world.alice.tenant.name


HTTP_MATRIX: dict[str, Entry] = {
    "c/<uuid:conversation_id>/": Entry(
        _conversation,
        {"GET": {"owner": OK, "member": 404}},  # conversations are private
    ),
    "api/v1/keys/<key_id>": Entry(
        _api_key,
        {"GET": {"owner": OK, "member": 403}, "DELETE": {"owner": OK, "member": 403}},
    ),
    "api/v1/members/<membership_id>": Entry(
        _membership,
        {
            "PATCH": {"owner": OK, "member": 403, "body": {"role": "member"}},
            "DELETE": {"owner": OK, "member": 403},
        },
    ),
    "api/v1/members/invitations/<invitation_id>": Entry(
        _invitation, {"DELETE": {"owner": OK, "member": 403}}
    ),
    # Platform staff only: to everyone else these routes do not exist.
    "api/v1/operator/tenants/<tenant_id>/suspend": Entry(
        _tenant, {"POST": {"owner": 404, "member": 404, "body": {"reason": "x"}}}
    ),
    "api/v1/operator/tenants/<tenant_id>/plan": Entry(
        _tenant, {"PUT": {"owner": 404, "member": 404, "body": {"plan": None}}}
    ),
    "api/v1/operator/pool/backends/<backend_id>/state": Entry(
        _backend, {"PUT": {"owner": 404, "member": 404, "body": {"state": "draining"}}}
    ),
    "api/v1/operator/tenants/<tenant_id>/resume": Entry(
        _tenant, {"POST": {"owner": 404, "member": 404}}
    ),
    "api/v1/operator/tenants/<tenant_id>/audit": Entry(
        _tenant, {"GET": {"owner": 404, "member": 404}}
    ),
}
# Routes whose parameter is a secret or a public name, not a tenant's object id: they
# are reached before anyone is a member, and are tested in their own modules.
NOT_OBJECT_IDS = {
    "invite/<str:token>/": "an invitation link's secret token (tests/test_invitations.py)",
    "accounts/reset/<uidb64>/<token>/": "a password reset link's secret (tests/test_auth_reset.py)",
    "sso/<slug:slug>/login/": "a tenant's public sign-in name; reveals no data (tests/test_sso.py)",
}
ADMIN_PREFIX = "admin/"  # Django's admin: staff only, everyone else is sent to its login


def _message(world: World) -> tuple[Any, str]:
    conversation_id, text = _conversation(world)
    with operator_scope():
        return Message.objects.get(conversation_id=conversation_id).id, text


def _run(world: World) -> tuple[Any, str]:
    conversation_id, text = _conversation(world)
    with operator_scope():
        message = Message.objects.get(conversation_id=conversation_id)
        run = RunFactory(user_message=message, state=Run.State.QUEUED)
    return run.id, text


def _branch_body(conversation_id: Any) -> dict[str, Any]:
    with operator_scope():
        message = Message.objects.get(conversation_id=conversation_id)
    return {"message_id": str(message.id)}


# The chat API: a member's conversations, messages and runs are theirs alone.
PRIVATE = {"owner": OK, "member": 404}
HTTP_MATRIX.update(
    {
        "api/v1/conversations/<conversation_id>": Entry(
            _conversation,
            {
                "GET": PRIVATE,
                "PATCH": {**PRIVATE, "body": {"title": "Renamed"}},
                "DELETE": PRIVATE,
            },
        ),
        "api/v1/conversations/<conversation_id>/messages": Entry(
            _conversation, {"GET": PRIVATE, "POST": {**PRIVATE, "body": {"content": "hello"}}}
        ),
        "api/v1/conversations/<conversation_id>/branch": Entry(
            _conversation, {"PUT": {**PRIVATE, "body": _branch_body}}
        ),
        "api/v1/conversations/<conversation_id>/runs": Entry(_conversation, {"GET": PRIVATE}),
        "api/v1/conversations/<conversation_id>/export": Entry(_conversation, {"GET": PRIVATE}),
        "api/v1/messages/<message_id>/edit": Entry(
            _message, {"POST": {**PRIVATE, "body": {"content": "edited"}}}
        ),
        "api/v1/messages/<message_id>/regenerate": Entry(_message, {"POST": PRIVATE}),
        "api/v1/runs/<run_id>": Entry(_run, {"GET": PRIVATE}),
        "api/v1/runs/<run_id>/cancel": Entry(_run, {"POST": PRIVATE}),
        "api/v1/runs/<run_id>/events": Entry(_run, {"GET": PRIVATE}),
    }
)


def _tenant_plugin(world: World) -> tuple[Any, str]:
    from agents.registry import registry_reset
    from agents.services import plugin_update
    from tenants.rls import tenant_scope

    registry_reset()  # every installed plugin (PARLEY_PLUGINS unset in tests)
    endpoint = f"https://alice-{secrets.token_hex(3)}.example.org/v1"
    with tenant_scope(tenant_id=world.alice.tenant.id):
        plugin_update(
            actor=world.alice.actor,
            name="example_lookup",
            enabled=True,
            granted_scopes=["network.fetch"],
            settings={"endpoint": endpoint, "api_key": "sk-alice-0123456789"},
        )
    return "example_lookup", endpoint


# A plugin's name is public; its state (enabled, grants, settings) is per tenant. An
# outsider reaches their own tenant's state of the plugin, never the owner's.
HTTP_MATRIX["api/v1/plugins/<name>"] = Entry(
    _tenant_plugin,
    {
        "GET": {"owner": OK, "member": OK},
        "PUT": {"owner": OK, "member": 403, "body": {"granted_scopes": []}},
    },
    outsider=OK,
)


def _stored_document(world: World) -> tuple[Any, str]:
    from documents.models import Document

    with operator_scope():
        document = Document.objects.create(
            tenant=world.alice.tenant,
            owner=world.alice.user,
            title="Merger plans",
            media_type=Document.MediaType.TEXT,
            size_bytes=26,
            sha256="0" * 64,
            page_count=1,
            file_name=f"{world.alice.tenant.id}/{uuid.uuid4()}",
        )
        document.pages.create(tenant=world.alice.tenant, number=1, text="Merger plans, secret")
    return document.id, "Merger plans"


# Documents are private to the member who uploaded them. The page route gets the
# document's id as its page number too (the matrix fills every parameter with it): the
# owner's answer is then 404 as well (no such page); tests/test_documents.py reads pages.
HTTP_MATRIX.update(
    {
        "api/v1/documents/<document_id>": Entry(
            _stored_document, {"GET": PRIVATE, "DELETE": PRIVATE}
        ),
        "api/v1/documents/<document_id>/pages/<number>": Entry(
            _stored_document, {"GET": {"owner": 404, "member": 404}}
        ),
    }
)


def _artifact(world: World) -> tuple[Any, str]:
    """A file a run produced in alice's conversation (stored: the owner downloads it)."""
    from sandbox.services import artifact_create

    conversation_id, text = _conversation(world)
    artifact = artifact_create(
        tenant=world.alice.tenant,
        owner=world.alice.user,
        conversation_id=conversation_id,
        name="figures/merger.txt",
        data=b"Merger plans, confidential figures",
    )
    return artifact.id, text


# Artifacts are their conversation's: private to its member, like the conversation.
HTTP_MATRIX.update(
    {
        "api/v1/artifacts/<artifact_id>": Entry(_artifact, {"GET": PRIVATE}),
        "api/v1/artifacts/<artifact_id>/content": Entry(_artifact, {"GET": PRIVATE}),
    }
)


def test_artifact_conversation_ids_in_queries_are_isolated(client, alice, bob, charlie):
    """`GET /api/v1/artifacts?conversation=<id>`: another's conversation lists nothing."""
    world = World(alice, bob, charlie)
    artifact_id, _ = _artifact(world)
    with operator_scope():
        from sandbox.models import Artifact

        conversation_id = Artifact.objects.get(id=artifact_id).conversation_id
    for person, expected in ((charlie, []), (bob, []), (alice, [str(artifact_id)])):
        client.force_login(person.user)
        response = client.get(f"/api/v1/artifacts?conversation={conversation_id}")
        assert response.status_code == 200, response.content
        assert [a["id"] for a in response.json()] == expected
        if person is not alice:
            assert "merger" not in response.content.decode()


def _review(world: World) -> tuple[Any, str]:
    """A finished review of alice's document: its run and its stored answer."""
    document_id, text = _stored_document(world)
    conversation_id, _ = _conversation(world)
    with operator_scope():
        question = Message.objects.get(conversation_id=conversation_id)
        answer = MessageFactory(
            conversation_id=conversation_id,
            tenant=world.alice.tenant,
            parent=question,
            role="assistant",
            content=f"# Risks: {text}",
            documents={"review": {"document": {"id": str(document_id), "title": text}}},
        )
        run = RunFactory(
            user_message=question,
            assistant_message=answer,
            state=Run.State.SUCCEEDED,
            task="review",
        )
    return run.id, text


def _review_template(world: World) -> tuple[Any, str]:
    from documents.models import ReviewTemplate

    with operator_scope():
        template = ReviewTemplate.objects.create(
            tenant=world.alice.tenant,
            kind="risks",
            name=f"Merger plans checklist {secrets.token_hex(2)}",
            instructions="Find the risks.",
        )
    return template.id, "Merger plans checklist"


# Reviews are runs (private, like any run); templates are the tenant's, changed by its
# owners and admins only.
HTTP_MATRIX.update(
    {
        "api/v1/reviews/<run_id>": Entry(_review, {"GET": PRIVATE}),
        "api/v1/review-templates/<template_id>": Entry(
            _review_template,
            {
                "PATCH": {"owner": OK, "member": 403, "body": {"name": "Renamed"}},
                "DELETE": {"owner": OK, "member": 403},
            },
        ),
    }
)


# Ids in request bodies: another's document is not found, and nothing is created.
BODY_IDS = [
    ("/api/v1/reviews", lambda d: {"document_id": d, "template": "risks"}),
    ("/api/v1/documents/search", lambda d: {"query": "merger", "document_ids": [d]}),
    ("/api/v1/conversations", lambda d: {"content": "hello", "document_ids": [d]}),
]


@pytest.mark.parametrize(("path", "body"), BODY_IDS, ids=[p for p, _ in BODY_IDS])
def test_document_ids_in_bodies_are_isolated(client, alice, bob, charlie, path, body):
    world = World(alice, bob, charlie)
    document_id, text = _stored_document(world)
    before = _snapshot(alice), _snapshot(bob), _snapshot(charlie)
    for person in (charlie, bob):
        client.force_login(person.user)
        response = client.post(path, body(str(document_id)), content_type="application/json")
        assert response.status_code == 404, (path, response.status_code, response.content)
        assert text not in response.content.decode()
    assert (_snapshot(alice), _snapshot(bob), _snapshot(charlie)) == before


WS_MATRIX: dict[str, dict[str, Callable[[World], tuple[Any, str]]]] = {
    "chat.send": {
        "conversation_id": _conversation,
        "parent_message_id": _message,
        "document_ids": _stored_document,
    },
    "chat.regenerate": {"message_id": _message},
    "run.cancel": {"run_id": _run},
    "run.attach": {"run_id": _run},
    "ping": {},
}


def routes() -> list[str]:
    found: list[str] = []

    def walk(patterns: Any, prefix: str) -> None:
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, prefix + str(pattern.pattern))
            else:
                found.append(prefix + str(pattern.pattern))

    walk(get_resolver().url_patterns, "")
    return sorted({r for r in found if "<" in r and not r.startswith(ADMIN_PREFIX)})


def test_every_route_with_an_id_has_an_entry():
    missing = [r for r in routes() if r not in HTTP_MATRIX and r not in NOT_OBJECT_IDS]
    assert not missing, f"routes without an isolation matrix entry: {missing}"
    stale = [r for r in [*HTTP_MATRIX, *NOT_OBJECT_IDS] if r not in routes()]
    assert not stale, f"matrix entries for routes that no longer exist: {stale}"


def test_every_websocket_message_has_an_entry():
    """The id fields of each frame type come from the frame table (chat.protocol.FRAMES)."""
    assert set(WS_MATRIX) == set(protocol.FRAMES)
    for kind, frame_type in protocol.FRAMES.items():
        assert set(WS_MATRIX[kind]) == set(frame_type.ids), kind


def _url(route: str, object_id: Any) -> str:
    import re

    return "/" + re.sub(r"<[^>]+>", str(object_id), route)


def _matches(status: int, expected: Any) -> bool:
    return 200 <= status < 300 if expected == OK else status == expected


@pytest.mark.parametrize("route", sorted(HTTP_MATRIX))
def test_http_route_isolation(client, alice, bob, charlie, route):
    entry = HTTP_MATRIX[route]
    world = World(alice, bob, charlie)
    for method, spec in entry.calls.items():
        object_id, text = entry.make(world)
        url = _url(route, object_id)
        body = spec.get("body", {})
        body = json.dumps(body(object_id) if callable(body) else body)
        # The outsider first (nothing they do may change the object), then a member,
        # then the owner.
        for who, person, expected in (
            ("outsider", charlie, entry.outsider),
            ("member", bob, spec["member"]),
            ("owner", alice, spec["owner"]),
        ):
            client.force_login(person.user)
            if method in ("GET", "DELETE"):
                response = getattr(client, method.lower())(url)
            else:
                response = getattr(client, method.lower())(
                    url, body, content_type="application/json"
                )
            assert _matches(response.status_code, expected), (
                f"{method} {url} as {who}: {response.status_code}, expected {expected}"
            )
            if who == "outsider":
                assert text not in response.content.decode(), f"{method} {url} leaks to outsider"


def test_admin_routes_send_non_staff_to_the_admin_login(client, alice):
    client.force_login(alice.user)
    response = client.get(f"/admin/tenants/tenant/{alice.tenant.id}/change/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("kind", "field_name"),
    [(kind, f) for kind, fields in sorted(WS_MATRIX.items()) for f in fields],
)
async def test_websocket_message_isolation(alice, bob, charlie, kind, field_name):
    from channels.db import database_sync_to_async

    world = World(alice, bob, charlie)
    object_id, text = await database_sync_to_async(WS_MATRIX[kind][field_name])(world)
    before = await database_sync_to_async(_snapshot)(alice)
    for person in (charlie, bob):  # an outsider, and a member who is not its owner
        frame: dict[str, Any] = {"type": kind, "content": "hello", "client_id": "m"}
        if field_name == "document_ids":
            frame[field_name] = [str(object_id)]
        else:
            frame[field_name] = str(object_id)
        if field_name == "parent_message_id":
            # Their own conversation, someone else's message as the parent.
            frame["conversation_id"] = str(await database_sync_to_async(_own_conversation)(person))
        connected, _, socket = await ws_connect(person.user)
        assert connected
        await socket.send(frame)
        reply = await socket.receive()
        assert reply["type"] == "error" and reply["code"] == "not_found", reply
        assert text not in json.dumps(reply)
        assert await socket.nothing_pending()  # no events of the owner's run follow
        await socket.close()
    # Nothing of the owner's changed: no message added, no run cancelled or started.
    assert await database_sync_to_async(_snapshot)(alice) == before


def _own_conversation(person: Any) -> Any:
    return ConversationFactory(tenant=person.tenant, user=person.user).id


def _snapshot(person: Any) -> list[Any]:
    with operator_scope():
        messages = list(
            Message.objects.filter(tenant=person.tenant).order_by("id").values_list("id", flat=True)
        )
        runs = list(
            Run.objects.filter(tenant=person.tenant).order_by("id").values_list("id", "state")
        )
    return [messages, runs]
