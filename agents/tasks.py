from typing import Any

from celery import shared_task

from agents.tool_queue import tool_execute


# Acknowledged on receipt, unlike Parley's other tasks: a tool with side effects must
# not run twice because its worker died, and the agent waiting for it has moved on.
@shared_task(name="agents.tasks.tool_execute", acks_late=False, ignore_result=True)
def tool_execute_task(
    tenant_id: str,
    agent: str,
    tool: str,
    arguments: dict[str, Any],
    call: str,
    deadline: float,
    context: dict[str, Any] | None = None,
) -> None:
    # Everything here comes from the agent worker, never from a client; the tool and
    # the plugin's settings (secrets) are read again from the database, not sent.
    tool_execute(
        tenant_id=tenant_id,
        agent=agent,
        tool=tool,
        arguments=arguments,
        call=call,
        deadline=deadline,
        context=context,
    )
