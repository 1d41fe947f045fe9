"""What a tool knows of the call it serves: `ToolContext`.

A tool reads it from its `RunnableConfig`, `config["configurable"]["parley_context"]`
(`tool_context(config)` returns it, or None when the tool runs outside a run):

- `tenant_id`, `user_id`, `run_id`, `conversation_id`: whose run this is; a tool
  never takes them from the model's arguments;
- `document_ids`: the documents in play in the conversation (attached to its
  messages), the member's own;
- `untrusted`: the run's context holds document text (data that may carry
  instructions): tools with side effects are off for such a run (agents.runtime);
- `scope()`: the tenant's database scope (tenants.rls.tenant_scope) for the tool's
  thread, under which the tool reads and writes through the access functions; the
  thread's connections are closed when the tool returns;
- `actor()`: the member as an `Actor`, for those access functions;
- `progress(stage, message, done, total)`: a `progress` event of the run, for a long
  tool (the agent loop sends it from the run's thread; from a tool on another worker
  it is dropped).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tenants.access import Actor

CONTEXT_KEY = "parley_context"


class EventSink(Protocol):
    def put(self, event: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class ToolContext:
    tenant_id: str
    user_id: str = ""
    run_id: str = ""
    conversation_id: str = ""
    document_ids: tuple[str, ...] = ()
    untrusted: bool = False
    # Where progress events go: the agent loop's queue, or a tool worker's relay to it
    # (None: dropped).
    events: EventSink | None = field(default=None, compare=False)

    def progress(
        self, stage: str, message: str = "", done: int | None = None, total: int | None = None
    ) -> None:
        if self.events is None:
            return
        event: dict[str, Any] = {"type": "progress", "stage": str(stage)[:64]}
        if message:
            event["message"] = str(message)[:500]
        if done is not None:
            event["done"] = max(0, int(done))
        if total is not None:
            event["total"] = max(0, int(total))
        self.events.put(event)

    @contextmanager
    def scope(self) -> Iterator[None]:
        from tenants.rls import tenant_scope

        with tenant_scope(tenant_id=self.tenant_id, user_id=self.user_id or None):
            yield

    def actor(self) -> Actor:
        """The member the run is for (call inside `scope()`)."""
        from tenants.access import member_actor
        from tenants.models import Tenant, User

        return member_actor(
            tenant=Tenant.objects.get(id=self.tenant_id), user=User.objects.get(id=self.user_id)
        )

    def for_worker(self) -> dict[str, Any]:
        """What travels to a tool worker (ids only)."""
        return {
            "tenant_id": self.tenant_id,
            "user_id": self.user_id,
            "run_id": self.run_id,
            "conversation_id": self.conversation_id,
            "document_ids": list(self.document_ids),
            "untrusted": self.untrusted,
        }

    @classmethod
    def from_worker(cls, data: dict[str, Any]) -> ToolContext:
        return cls(
            tenant_id=str(data["tenant_id"]),
            user_id=str(data.get("user_id") or ""),
            run_id=str(data.get("run_id") or ""),
            conversation_id=str(data.get("conversation_id") or ""),
            document_ids=tuple(str(d) for d in data.get("document_ids") or ()),
            untrusted=bool(data.get("untrusted")),
        )


@dataclass(frozen=True)
class ToolAnswer:
    """A tool's answer with files it produced: `text` is what the model reads,
    `artifacts` ([{id, name, media_type, size}], stored by sandbox.services) travel to
    the `tool.end` event and the message's steps, where the page shows them."""

    text: str
    artifacts: tuple[dict[str, Any], ...] = ()


def tool_context(config: Any) -> ToolContext | None:
    """The context of the call whose `RunnableConfig` is `config` (None outside a run)."""
    configurable = (config or {}).get("configurable") or {}
    context = configurable.get(CONTEXT_KEY)
    return context if isinstance(context, ToolContext) else None
