"""Starting a review run from a tool, without importing chat.

Plugins see runs only through the agent runtime and never import `chat` (DESIGN
section 2; tests/test_layout.py). A review is a run of a new conversation, started by
chat's service, so the plugin is handed that service by configuration, as Django hands
out an e-mail backend: the setting `PARLEY_REVIEW_START` names a function with the
signature of `ReviewStart` (the project's is `chat.services.runs.review_start`).
Unset, the `review_start` tool says that reviews are started from the documents page
here, and does nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Protocol

from django.conf import settings
from django.utils.module_loading import import_string

from tenants.access import Actor

SETTING = "PARLEY_REVIEW_START"


class StartedRun(Protocol):
    id: Any
    conversation_id: Any


class ReviewStart(Protocol):
    """Start a review of one of the actor's documents as a run of a new conversation;
    `NotFound` for a document or template the actor cannot see, `ValidationError` for a
    document not ready or a questions review without questions, `Unavailable` when no
    worker could take the run."""

    def __call__(
        self,
        *,
        actor: Actor,
        document_id: Any,
        template: str,
        questions: Sequence[str] = (),
        model: str = "",
        client_id: str = "",
    ) -> StartedRun: ...


def review_starter() -> ReviewStart | None:
    """The configured review service, or None where none is configured."""
    path = getattr(settings, SETTING, "") or ""
    return import_string(path) if path else None


def review_client_id(
    *, run_id: str, document_id: str, template: str, questions: Sequence[str]
) -> str:
    """The same review asked twice by one agent run (a tool call delivered again, a
    model repeating itself) starts one run: the run service keeps one run per client id."""
    if not run_id:
        return ""
    asked = json.dumps([run_id, document_id, template, list(questions)])
    return "docreview:" + hashlib.sha256(asked.encode()).hexdigest()[:40]
