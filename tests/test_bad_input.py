"""Bad input never reaches a 500: NUL characters, lone surrogates, cursors past 64 bits,
JSON nested thousands deep and oversized bodies are refused where they enter, on the
REST API (a JSON 4xx with `detail`) and on the websocket (an `error` frame, the socket
stays usable). The property tests (test_input_properties.py) generalise these."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from channels.db import database_sync_to_async as sync_to_async

from chat.models import Conversation, Message, Run
from config import inputs
from tenants.rls import operator_scope
from tests.conftest import ws_connect
from tests.factories import ConversationFactory, MessageFactory, RunFactory

API = "/api/v1"
NUL = "\u0000"
DEEP = 20_000


def _conversation(person) -> tuple[Conversation, Message, Run]:
    c = ConversationFactory(tenant=person.tenant, user=person.user, title="t")
    q = MessageFactory(conversation=c, content="q")
    run = RunFactory(user_message=q, backend="http://10.0.0.7:8000")
    return c, q, run


def _refused(response, status: int = 400) -> str:
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


# --- config.inputs ---------------------------------------------------------------


def test_json_loads_refuses_nul_lone_surrogates_depth_and_non_json():
    assert inputs.json_loads('{"a": ["\\ud83d\\ude00", 1]}') == {"a": ["\U0001f600", 1]}
    for raw, code in [
        ('{"a": "x\\u0000"}', inputs.INVALID_VALUE),
        ('{"x\\u0000": 1}', inputs.INVALID_VALUE),
        ('["\\ud800"]', inputs.INVALID_VALUE),
        ('["\\uDFFF x"]', inputs.INVALID_VALUE),
        ("[" * DEEP + "]" * DEEP, inputs.INVALID_JSON),
        ("{not json", inputs.INVALID_JSON),
        ("\ud800", inputs.INVALID_JSON),  # a str that is not even valid Unicode
        (b"\xff\xfe", inputs.INVALID_JSON),
    ]:
        with pytest.raises(inputs.InvalidInput) as refused:
            inputs.json_loads(raw)
        assert refused.value.code == code, raw[:40]
    # An escaped backslash before "u0000" is text, not a NUL.
    assert inputs.json_loads('["\\\\u0000"]') == ["\\u0000"]


def test_text_check_refuses_nul_and_lone_surrogates():
    assert inputs.text_check("fine \U0001f600") == "fine \U0001f600"
    for bad in ("a\x00b", "a\ud800b"):
        with pytest.raises(inputs.InvalidInput):
            inputs.text_check(bad, name="title")


# --- REST: bodies -----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("post", "/conversations", {"content": f"a{NUL}b"}),
        ("post", "/conversations", {"content": "hi", "client_id": f"k{NUL}"}),
        ("post", "/conversations", {"content": "hi", "model": f"m{NUL}"}),
        ("post", "/conversations", {"content": "a\ud800b"}),
        ("patch", "/conversations/{c}", {"title": f"t{NUL}"}),
        ("post", "/conversations/{c}/messages", {"content": f"{NUL}"}),
        ("post", "/messages/{q}/edit", {"content": "x", "client_id": NUL}),
        ("post", "/messages/{q}/regenerate", {"model": NUL}),
        ("patch", "/tenant", {"name": f"Acme{NUL}"}),
        ("post", "/tenant/delete", {"confirm": NUL}),
        ("post", "/keys", {"name": f"k{NUL}", "scopes": ["chat"]}),
        ("post", "/keys", {"name": "k", "scopes": [NUL]}),
        ("post", "/members/invitations", {"email": f"a{NUL}@example.com"}),
        ("patch", "/members/{m}", {"role": NUL}),
        ("put", "/plugins/calculator", {"settings": {NUL: 1}}),
        ("put", "/plugins/calculator", {"granted_scopes": [f"x{NUL}"]}),
        ("put", "/sso", {"issuer": f"https://idp{NUL}.example", "client_id": "c"}),
        ("put", "/sso", {"issuer": "https://idp.example", "client_id": f"c{NUL}"}),
    ],
)
def test_text_with_nul_or_lone_surrogates_in_a_body_is_a_400(client, alice, method, path, body):
    c, q, _ = _conversation(alice)
    client.force_login(alice.user)
    url = API + path.format(c=c.id, q=q.id, m=alice.membership.id)
    raw = json.dumps(body)  # escapes NUL as \u0000 and a lone surrogate as \ud800
    response = getattr(client, method)(url, raw, content_type="application/json")
    detail = _refused(response)
    assert "NUL" in detail or "surrogate" in detail or "Unicode" in detail
    with operator_scope():
        assert Message.objects.count() == 1 and Run.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/conversations", {"content": "hi", "model": "m" * 201}),
        ("/conversations/{c}/messages", {"content": "hi", "model": "m" * 201}),
        ("/messages/{q}/edit", {"content": "hi", "model": "m" * 201}),
        ("/messages/{q}/regenerate", {"model": "m" * 201}),
    ],
)
def test_a_model_name_longer_than_a_run_stores_is_a_422(client, alice, path, body):
    c, q, _ = _conversation(alice)
    client.force_login(alice.user)
    url = API + path.format(c=c.id, q=q.id)
    response = client.post(url, json.dumps(body), content_type="application/json")
    assert response.status_code == 422, response.content
    assert response.json()["detail"][0]["loc"][-1] == "model"


@pytest.mark.django_db
def test_a_crafted_paging_cursor_nested_thousands_deep_is_a_400(client, alice):
    import base64

    client.force_login(alice.user)
    cursor = base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode()
    assert "cursor" in _refused(client.get(f"{API}/conversations?cursor={cursor}"))


@pytest.mark.django_db
def test_json_nested_thousands_deep_is_a_400(client, alice):
    client.force_login(alice.user)
    body = '{"content": ' + "[" * DEEP + "]" * DEEP + "}"
    detail = _refused(client.post(f"{API}/conversations", body, content_type="application/json"))
    assert "deeper" in detail


@pytest.mark.django_db
def test_a_body_over_the_upload_limit_is_a_json_413(client, alice, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    client.force_login(alice.user)
    body = json.dumps({"content": "x" * 2000})
    detail = _refused(
        client.post(f"{API}/conversations", body, content_type="application/json"), 413
    )
    assert "1000" in detail
    with operator_scope():
        assert not Message.objects.exists()


@pytest.mark.django_db
def test_a_content_length_that_is_no_number_is_not_a_500(client, alice):
    client.force_login(alice.user)
    response = client.get(f"{API}/conversations", CONTENT_LENGTH="many")
    assert response.status_code == 200


# --- REST: query strings and paths ---------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    [
        "/conversations/search?q=a%00b",
        "/conversations?cursor=%00",
        "/audit?action=%00",
        "/audit?actor=x%00",
        "/audit?target_type=%00&target_id=%00",
        "/conversations/{c}/export?format=json%00",
        "/conversations/%00",
        "/conversations/{c}%00/messages",
        "/runs/%00/events",
        "/keys/%00",
        "/plugins/calc%00",
        "/members/invitations?x%00=1",
    ],
)
def test_nul_in_a_query_or_path_is_a_400(client, alice, path):
    c, _, _ = _conversation(alice)
    client.force_login(alice.user)
    assert "NUL" in _refused(client.get(API + path.format(c=c.id)))


@pytest.mark.django_db
def test_nul_in_a_page_request_is_a_plain_400(client, alice):
    for response in (
        client.get("/accounts/login/?next=%00"),
        client.get("/accounts/login/", headers={"X-Anything": f"a{NUL}"}),
        client.post(  # a browser's form post
            "/accounts/login/",
            "username=a%00&password=x",
            content_type="application/x-www-form-urlencoded",
        ),
    ):
        assert response.status_code == 400, response
        assert response["Content-Type"].startswith("text/plain")
        assert "NUL" in response.content.decode()
    # Multipart forms are left to the form, whose fields refuse NUL themselves.
    response = client.post("/accounts/login/", {"username": f"a{NUL}", "password": "x"})
    assert response.status_code == 200


# --- REST: dates a database cannot take ---------------------------------------------------

EXTREME_DATES = ["9999-12-31T23:59:59-23:00", "0001-01-01T00:00:00+23:00", "2030-01-01T00:00+16:00"]


@pytest.mark.django_db
@pytest.mark.parametrize("when", EXTREME_DATES)
def test_dates_out_of_the_databases_range_are_a_422(client, alice, when):
    from urllib.parse import quote

    client.force_login(alice.user)
    for name in ("since", "until"):
        response = client.get(f"{API}/audit?{name}={quote(when)}")
        assert response.status_code == 422, response.content
        assert "UTC" in response.json()["detail"][0]["msg"]
    body = json.dumps({"name": "k", "scopes": ["chat"], "expires_at": when})
    response = client.post(f"{API}/keys", body, content_type="application/json")
    assert response.status_code == 422 and "UTC" in response.json()["detail"][0]["msg"]
    # An offset just under the limit is a date like any other.
    assert client.get(f"{API}/audit?since={quote('2030-01-01T00:00+15:59')}").status_code == 200


# --- REST: run cursors -----------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("after", [2**63, 2**64, 10**30, -1])
def test_run_event_cursors_out_of_range_are_a_400(client, alice, after):
    _, _, run = _conversation(alice)
    client.force_login(alice.user)
    detail = _refused(client.get(f"{API}/runs/{run.id}/events?after={after}"))
    assert "after" in detail
    sse = client.get(
        f"{API}/runs/{run.id}/events",
        headers={"Accept": "text/event-stream", "Last-Event-ID": str(after)},
    )
    assert "Last-Event-ID" in _refused(sse)


@pytest.mark.django_db
def test_the_largest_cursor_is_accepted(client, alice):
    _, _, run = _conversation(alice)
    client.force_login(alice.user)
    response = client.get(f"{API}/runs/{run.id}/events?after={2**63 - 1}")
    assert response.status_code == 200 and response.json()["events"] == []


# --- REST: what members see, and the schema --------------------------------------------------


@pytest.mark.django_db
def test_members_do_not_see_the_backend_of_a_run(client, alice):
    c, _, run = _conversation(alice)
    client.force_login(alice.user)
    for url in (f"/runs/{run.id}", f"/conversations/{c.id}/runs", f"/runs/{run.id}/events"):
        body = client.get(API + url).content.decode()
        assert "10.0.0.7" not in body and '"backend"' not in body, url


@pytest.mark.django_db
def test_every_operation_documents_its_error_responses(client):
    schema = client.get(f"{API}/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorOut"}
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            responses = operation["responses"]
            where = f"{method.upper()} {path}"
            for status in ("400", "401", "403", "404", "422"):
                assert status in responses, (where, status)
            assert responses["400"]["content"]["application/json"]["schema"] == error, where
            assert responses["422"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ValidationErrorOut"
            }, where
            if "requestBody" in operation:
                assert "413" in responses, where
    detail = schema["components"]["schemas"]["ValidationErrorOut"]["properties"]["detail"]
    assert detail["type"] == "array"


@pytest.mark.django_db
def test_a_schema_validation_error_is_json_422(client, alice):
    c, _, _ = _conversation(alice)
    client.force_login(alice.user)
    response = client.put(
        f"{API}/conversations/{c.id}/branch",
        json.dumps({"message_id": "not-a-uuid"}),
        content_type="application/json",
    )
    assert response.status_code == 422
    assert response["Content-Type"].startswith("application/json")
    assert response.json()["detail"][0]["loc"] == ["body", "payload", "message_id"]


# --- the websocket ----------------------------------------------------------------------


async def _answer(socket, frame: Any) -> dict[str, Any]:
    await socket.send(frame)
    return await socket.receive()


async def _usable(socket) -> None:
    assert await _answer(socket, {"type": "ping", "client_id": "alive"}) == {
        "type": "pong",
        "client_id": "alive",
    }


@pytest.mark.django_db(transaction=True)
async def test_nul_and_lone_surrogates_in_frames_are_error_frames(alice):
    _, _, socket = await ws_connect(alice.user)
    for frame in [
        {"type": "chat.send", "content": f"a{NUL}b"},
        {"type": "chat.send", "content": "a\ud800"},
        {"type": "chat.send", "content": "hi", "client_id": f"k{NUL}"},
        {"type": "chat.send", "content": "hi", "model": f"m{NUL}"},
        {"type": "chat.send", "content": "hi", "agent": NUL},
        {"type": "chat.regenerate", "message_id": str(uuid.uuid4()), "model": NUL},
        {"type": "run.attach", "run_id": NUL},
        {"type": NUL},
    ]:
        reply = await _answer(socket, frame)
        assert reply["type"] == "error" and reply["code"] == "invalid_frame", (frame, reply)
        await _usable(socket)
    assert await _count(Message) == 0
    await socket.close()


@pytest.mark.django_db(transaction=True)
async def test_deep_json_frames_are_error_frames(alice, settings):
    settings.PARLEY_WS_MAX_FRAME_BYTES = 4 * DEEP
    _, _, socket = await ws_connect(alice.user)
    for raw in ["[" * DEEP + "]" * DEEP, '{"type": "ping", "x": ' + "[" * DEEP + "]" * DEEP + "}"]:
        reply = await _answer(socket, raw)
        assert reply["type"] == "error" and reply["code"] == "invalid_json", reply
        assert "deeper" in reply["message"]
        await _usable(socket)
    await socket.close()


@pytest.mark.django_db(transaction=True)
async def test_a_rate_limited_deep_frame_is_still_a_rate_limited_error(alice, settings):
    settings.PARLEY_WS_FRAME_BURST = 1
    settings.PARLEY_WS_FRAMES_PER_S = 0.5
    _, _, socket = await ws_connect(alice.user)
    await _usable(socket)
    reply = await _answer(socket, "[" * 2000 + "]" * 2000)
    assert reply["type"] == "error" and reply["code"] == "rate_limited", reply
    await socket.close()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("after", [2**63, 2**64, 10**30])
async def test_attach_cursors_out_of_range_are_error_frames(alice, after):
    _, _, run = await sync_to_async(_conversation)(alice)
    _, _, socket = await ws_connect(alice.user)
    reply = await _answer(
        socket, {"type": "run.attach", "run_id": str(run.id), "after": after, "client_id": "a"}
    )
    assert reply == reply | {"type": "error", "code": "invalid_frame", "client_id": "a"}
    assert "after" in reply["message"]
    await _usable(socket)
    # The largest cursor attaches (nothing comes: the queued run has logged nothing).
    await socket.send({"type": "run.attach", "run_id": str(run.id), "after": 2**63 - 1})
    assert await socket.nothing_pending()
    await _usable(socket)
    await socket.close()


async def _count(model) -> int:
    def count() -> int:
        with operator_scope():
            return model.objects.count()

    return await sync_to_async(count)()
