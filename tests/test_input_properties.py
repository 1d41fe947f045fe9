"""Property tests: whatever a client sends, the websocket answers bad frames with an
`error` frame (never `internal_error`) and stays usable, and the REST API answers bad
values with a JSON 4xx (never a 500).

The frames come from the protocol's AsyncAPI document (tests.asyncapi): each client
frame type with its fields, given good values and the classes of bad ones that once
reached a 500 or `internal_error` (NUL, lone surrogates, integers past 63 and 64 bits,
negative cursors, JSON nested thousands deep, wrong types, unknown fields). The REST
operations come from the served OpenAPI document, each parameter and body field given
the same classes of values. Seeds are fixed (derandomize): CI runs the same examples.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from django.test import Client
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from chat import protocol
from tenants.models import Invitation
from tenants.rls import operator_scope, tenant_scope
from tests import asyncapi
from tests.conftest import Socket, ws_connect
from tests.factories import ConversationFactory, MessageFactory, RunFactory

T = TypeVar("T")

PROPERTIES = hypothesis_settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- values ---------------------------------------------------------------------------

NUL = "\x00"
HUGE = [2**63, 2**64, 10**30, -(2**63), -(2**64) - 1, -1]

nul_text = st.builds(lambda a, b: f"{a}{NUL}{b}", st.text(max_size=5), st.text(max_size=5))
lone_surrogate = st.sampled_from(["\ud800", "x\udfff", "\udc00y", "\ud83d"])
huge_int = st.sampled_from(HUGE)


def deep(depth: int, leaf: Any = 1) -> Any:
    """`leaf` inside `depth` arrays and objects (built without recursion)."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


# (Deeper still is sent as raw text: json.dumps and the reports recurse.)
deep_value = st.integers(min_value=65, max_value=300).map(deep)
plain_text = st.text(max_size=20)
any_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    plain_text,
)
wrong_type = st.one_of(
    any_scalar,
    st.lists(any_scalar, max_size=3),
    st.dictionaries(plain_text, any_scalar, max_size=3),
)
# Each bad class: (name, strategy). A value of the "refused" classes makes any frame or
# body refused wherever it sits (config.inputs); the others may be accepted.
REFUSED = {"nul": nul_text, "surrogate": lone_surrogate, "deep": deep_value}
long_text = st.sampled_from([101, 201, 256, 1001, 5000]).map(lambda n: "x" * n)
SUSPECT = {"huge": huge_int, "wrong_type": wrong_type, "long": long_text}


def refused_classes(value: Any) -> bool:
    """Whether `value` holds text or nesting that is refused anywhere it appears."""
    return _depth(value) > 64 or any(
        NUL in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text) for text in _texts(value)
    )


def _texts(value: Any) -> list[str]:
    texts, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict):
            stack.extend([*item.keys(), *item.values()])
        elif isinstance(item, list):
            stack.extend(item)
    return texts


def _depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        depth += 1
        level = [
            child
            for item in level
            if isinstance(item, (list, dict))
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, (list, dict))
        ]
        if not level:
            return depth if isinstance(value, (list, dict)) else 0
    return depth


# --- websocket frames -----------------------------------------------------------------

FIELDS = asyncapi.client_fields()
GOOD = {
    "content": st.sampled_from(["hello", "  x ", "a\u00e9\U0001f600"]),
    "after": st.integers(min_value=0, max_value=2**63 - 1),
    "coalesce": st.booleans(),
    "document_ids": st.just([]),
    "client_id": st.text(min_size=1, max_size=10),
}
ID_GOOD = st.one_of(st.builds(lambda: str(uuid.uuid4())), st.text(min_size=1, max_size=10))


def _good(field: str) -> st.SearchStrategy[Any]:
    return GOOD.get(field, ID_GOOD)


@st.composite
def frames(draw: st.DrawFn) -> tuple[Any, str | None]:
    """A client frame with at most one bad value, and the class of that value (None:
    every value is of the right type; "unknown": an unknown field only)."""
    kind = draw(st.sampled_from(sorted(FIELDS)))
    frame: dict[str, Any] = {"type": kind}
    for field in FIELDS[kind]:
        if field != "type" and draw(st.booleans()):
            frame[field] = draw(_good(field))
    bad = draw(st.sampled_from([None, "unknown", *REFUSED, *SUSPECT]))
    if bad == "unknown":
        frame[draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in FIELDS[kind]))] = draw(
            any_scalar
        )
    elif bad is not None:
        target = draw(st.sampled_from([*FIELDS[kind], "x-extra"]))
        value = draw((REFUSED | SUSPECT)[bad])
        if bad in REFUSED and draw(st.booleans()) and bad != "deep":
            frame[value] = 1  # a refused key is as bad as a refused value
        else:
            frame[target] = value
    return frame, bad


def _parse(frame: Any) -> Any:
    parsed = protocol.parse(json.dumps(frame), max_bytes=65536)
    return protocol.check(parsed)


@hypothesis_settings(PROPERTIES, max_examples=400)
@given(frames())
def test_a_frame_is_parsed_or_refused_with_a_frame_error(example):
    """protocol.parse and the frame validators raise FrameError and nothing else, and
    refuse every frame holding NUL, a lone surrogate, deep nesting or a cursor out of
    range; frames of well-typed values are accepted exactly when the document allows."""
    frame, bad = example
    try:
        _parse(frame)
        accepted = True
    except protocol.FrameError as exc:
        accepted = False
        assert exc.code in {protocol.INVALID_JSON, protocol.INVALID_FRAME, protocol.UNKNOWN_TYPE}
    if bad in REFUSED:
        assert not accepted
    after = frame.get("after")
    if frame["type"] == "run.attach" and isinstance(after, int) and not 0 <= after < 2**63:
        assert not accepted
    if bad in (None, "unknown", "huge") and not refused_classes(frame):
        assert accepted == (not asyncapi.errors(frame, sent_by="client")), frame


class LoopThread:
    """An event loop in a thread of its own: a socket stays open across the examples
    of a (synchronous) Hypothesis test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def _answers(socket: Socket, raw: str, marker: str) -> list[dict[str, Any]]:
    """The frames answering `raw`, up to the pong of the ping sent after it (every frame
    is checked against the AsyncAPI document by Socket.receive)."""
    await socket.send(raw)
    await socket.send({"type": "ping", "client_id": marker})
    frames = []
    while True:
        frame = await socket.receive(timeout=20)
        if frame == {"type": "pong", "client_id": marker}:
            return frames
        frames.append(frame)


@pytest.mark.django_db(transaction=True)
def test_the_socket_answers_every_bad_frame_with_an_error_and_stays_usable(
    alice, settings, monkeypatch
):
    settings.PARLEY_WS_FRAMES_PER_S = 1e6
    settings.PARLEY_WS_FRAME_BURST = 10**6
    # Runs that well-formed sends start stay queued: no task reaches a broker (or a
    # worker that would outlive this test's database).
    monkeypatch.setattr("config.celery.enqueue", lambda task, *args, **kwargs: None)
    loop = LoopThread()
    connected, _, socket = loop.run(ws_connect(alice.user))
    assert connected
    counter = iter(range(10**9))
    seen: set[str] = set()
    try:

        @hypothesis_settings(PROPERTIES, max_examples=60)
        @given(frames())
        def check(example):
            frame, bad = example
            answers = loop.run(_answers(socket, json.dumps(frame), f"m{next(counter)}"))
            errors = [a for a in answers if a["type"] == "error"]
            seen.update(a["type"] if a["type"] != "error" else a["code"] for a in answers)
            assert all(e["code"] != protocol.INTERNAL_ERROR for e in errors), (frame, answers)
            if bad in REFUSED:
                assert [e["code"] for e in errors] in (["invalid_frame"], ["invalid_json"]), (
                    frame,
                    answers,
                )

        check()
        # The examples reached the services too, not only the parser.
        assert {"run.started", "not_found", "invalid_frame", "invalid_json"} <= seen, seen
        # Whole frames the parser never sees as objects.
        for raw in ("[" * 20_000 + "]" * 20_000, '"\\u0000"', "\\", "1e999999", "-" + "9" * 5000):
            answers = loop.run(_answers(socket, raw, "raw"))
            assert [a["type"] for a in answers] == ["error"], (raw[:30], answers)
            assert answers[0]["code"] in ("invalid_json", "invalid_frame"), answers
    finally:
        loop.run(socket.close())
        loop.close()


# --- REST ------------------------------------------------------------------------------


def _objects(person) -> dict[str, str]:
    """Real ids of the person's objects, so that examples reach past the lookups."""
    c = ConversationFactory(tenant=person.tenant, user=person.user, title="t")
    q = MessageFactory(conversation=c, content="q")
    run = RunFactory(user_message=q)
    with operator_scope():
        c.current_leaf = q
        c.save()
        invitation = Invitation.objects.create(
            tenant=person.tenant,
            email="x@example.com",
            role="member",
            token_hash=uuid.uuid4().hex,
            created_by=person.user,
            expires_at="2999-01-01T00:00:00Z",
        )
    with tenant_scope(tenant_id=person.tenant.id):
        from tenants.services.api_keys import api_key_create

        key, _ = api_key_create(actor=person.actor, name="props", scopes=["chat"])
    return {
        "conversation_id": str(c.id),
        "message_id": str(q.id),
        "run_id": str(run.id),
        "membership_id": str(person.membership.id),
        "key_id": str(key.id),
        "invitation_id": str(invitation.id),
        "name": "calculator",
    }


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    from config.api import api

    schema = api.get_openapi_schema(path_prefix="/api/v1/")
    return [
        (method, path, operation)
        for path, methods in sorted(schema["paths"].items())
        for method, operation in sorted(methods.items())
    ], schema


OPERATIONS, SCHEMA = _operations()
# Destructive for the rest of the examples, or for the person: the tenant is deleted
# only with its slug as `confirm` (never generated), the owner cannot leave or be
# removed as the last owner, and ids of other objects are real only for this person.


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = SCHEMA["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _typed(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A plausible value for a field of this schema (the bad ones are drawn apart)."""
    schema = _resolve(schema)
    kinds = {s.get("type") for s in schema.get("anyOf", [schema])}
    choices: list[st.SearchStrategy[Any]] = []
    if "string" in kinds:
        choices.append(st.sampled_from(["x", "hello there", str(uuid.uuid4())]))
    if "integer" in kinds or "number" in kinds:
        choices.append(st.integers(min_value=0, max_value=100))
    if "boolean" in kinds:
        choices.append(st.booleans())
    if "array" in kinds:
        choices.append(st.just([]))
    if "object" in kinds:
        choices.append(st.just({}))
    if "null" in kinds:
        choices.append(st.none())
    return st.one_of(choices) if choices else any_scalar


BAD = {**REFUSED, **SUSPECT}


@st.composite
def requests(draw: st.DrawFn, operation: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    """Path, query and body values for `operation`: real ids and plausible values, one
    of them (a parameter, a body field or key, or the whole body) replaced by a value
    of one bad class (the same classes as for frames), or none."""
    path: dict[str, Any] = {}
    query: dict[str, Any] = {}
    for parameter in operation.get("parameters", []):
        name, where = parameter["name"], parameter["in"]
        if where == "path":
            path[name] = ids.get(name) or draw(_typed(parameter.get("schema", {})))
        elif where == "query" and draw(st.booleans()):
            query[name] = draw(_typed(parameter.get("schema", {})))
    body: Any = None
    fields: dict[str, Any] = {}
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if content:
        schema = _resolve(content["schema"])
        fields = schema.get("properties", {})
        body = {
            field: draw(_typed(sub))
            for field, sub in fields.items()
            if field in schema.get("required", []) or draw(st.booleans())
        }
    bad = draw(st.sampled_from([None, *BAD]))
    if bad is None:
        return {"path": path, "query": query, "body": body, "bad": None}
    value = draw(BAD[bad])
    targets = [
        *(("path", name) for name in path),
        *(("query", p["name"]) for p in operation.get("parameters", []) if p["in"] == "query"),
        *(("body", field) for field in fields),
        *([("body key", ""), ("whole body", "")] if content else []),
    ]
    where, name = draw(st.sampled_from(targets or [("query", "x-extra")]))
    if where == "path":
        path[name] = value
    elif where == "query":
        query[name] = value
    elif where == "body":
        body[name] = value
    elif where == "body key":
        body[draw(st.sampled_from([f"k{NUL}", "\ud800", "x-extra"]))] = value
    else:
        body = value  # not even an object
    return {"path": path, "query": query, "body": body, "bad": (bad, where, name)}


def _text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "path", "operation"),
    OPERATIONS,
    ids=[f"{m.upper()} {p}" for m, p, _ in OPERATIONS],
)
def test_the_rest_api_answers_bad_values_with_a_json_4xx(alice, method, path, operation):
    from urllib.parse import quote, urlencode

    client = Client()
    client.force_login(alice.user)
    ids = _objects(alice)

    @hypothesis_settings(PROPERTIES, max_examples=25)
    @given(requests(operation, ids))
    def check(request):
        url = path
        for name, value in request["path"].items():
            text = _text(value).encode("utf-8", "surrogatepass")
            url = url.replace("{" + name + "}", quote(text, safe="") or "-")
        query = urlencode(
            {k: _text(v).encode("utf-8", "surrogatepass") for k, v in request["query"].items()}
        )
        body = request["body"]
        kwargs: dict[str, Any] = {}
        if body is not None:
            raw = json.dumps(body)
            kwargs = {"data": raw, "content_type": "application/json"}
        response = getattr(client, method)(url + (f"?{query}" if query else ""), **kwargs)
        assert response.status_code < 500, (method, url, query, body, response.content[:500])
        if response.status_code >= 400:
            assert response["Content-Type"].startswith("application/json"), response
            detail = response.json()["detail"]
            assert detail if response.status_code == 422 else isinstance(detail, str)
        if request["bad"] is not None:
            bad, where = request["bad"][:2]
            # (A surrogate or nesting in a URL is only percent-escaped text there.)
            refused = bad == "nul" or (bad in REFUSED and where not in ("path", "query"))
            if refused and not path.startswith("/api/v1/operator/"):  # (404 for members)
                assert response.status_code == 400, (url, query, body, response.content)

    check()
