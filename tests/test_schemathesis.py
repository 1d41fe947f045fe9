"""A short schemathesis pass over the served OpenAPI document (/api/v1/openapi.json):
every operation, called through Django's WSGI application in this process as a tenant
owner's API key with every scope, with a few generated requests each, valid and not
(deterministic: CI runs the same ones). It fails on any 500 and on any response the
document does not describe (status code, content type, body schema).

Nothing generated can destroy what the rest of the pass needs: the ids in paths are
random (the key in use, the owner's membership and the tenant are never named), the
tenant is deleted only with its slug as `confirm` and only by its owner (the key is an
admin), and an API key cannot leave the tenant. So no operation is excluded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode

from tenants.models import ApiKey
from tenants.rls import tenant_scope

EXAMPLES = 6  # per operation and mode (valid, invalid)
CONFIG = {
    # Only these: a server error, and a response the document does not describe.
    "checks": {
        "enabled": False,
        "not_a_server_error": {"enabled": True},
        "status_code_conformance": {"enabled": True},
        "content_type_conformance": {"enabled": True},
        "response_schema_conformance": {"enabled": True},
    },
}


@pytest.fixture
def owner_key(alice) -> str:
    from tenants.services.api_keys import api_key_create

    with tenant_scope(tenant_id=alice.tenant.id):
        _, secret = api_key_create(
            actor=alice.actor, name="schemathesis", scopes=[s.value for s in ApiKey.Scope]
        )
    return secret


@pytest.fixture
def wsgi_app(db) -> Iterator[Any]:
    """Django's WSGI application, in this thread and this test's transaction: without
    the handler's closing of the connection at each request's start and end (which
    Django's test client leaves out too)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield get_wsgi_application()
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def api_schema(wsgi_app):
    """The document as the app serves it."""
    return schemathesis.openapi.from_wsgi(
        "/api/v1/openapi.json", wsgi_app, config=schemathesis.Config.from_dict(CONFIG)
    )


# (schemathesis.pytest.from_fixture would run each operation as a subtest, but its
# lazy loader does not work with pytest 9; the operations are looped over here.)
def test_the_api_answers_as_its_schema_says_and_never_500(api_schema, owner_key):
    headers = {"Authorization": f"Bearer {owner_key}"}
    failures: list[str] = []
    operations = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis_settings(
                max_examples=EXAMPLES,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                case.call_and_validate(headers=headers)

            try:
                call()
            except (Exception, BaseExceptionGroup) as exc:  # every failing operation, not one
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    assert operations > 40
    assert not failures, "\n\n".join(failures)
