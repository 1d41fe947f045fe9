"""Chat's Celery tasks, each a few lines. The tenant comes from the server that queued
the run, never from a client: it scopes every query of the run (row level security).

Nothing in chat imports this module but chat.services.runs, which hands runs to
workers. The title task is defined next to what queues it (chat.titles, at the end of
a successful run) and imported here so that a worker registers it."""

from celery import shared_task

from chat.agent_turn import agent_turn_execute
from chat.chat_turn import chat_turn_execute
from chat.review_turn import review_turn_execute
from chat.titles import conversation_title_task
from chat.watchdog import runs_reap

__all__ = [
    "agent_execute_task",
    "conversation_title_task",
    "review_execute_task",
    "run_execute_task",
    "runs_reap_task",
]


@shared_task(name="chat.tasks.run_execute", acks_late=True)
def run_execute_task(run_id: str, tenant_id: str) -> None:
    chat_turn_execute(run_id=run_id, tenant_id=tenant_id)


@shared_task(name="chat.tasks.agent_execute", acks_late=True)
def agent_execute_task(run_id: str, tenant_id: str) -> None:
    # On the `agents` queue, so long tool loops do not hold the workers that stream
    # plain chat.
    agent_turn_execute(run_id=run_id, tenant_id=tenant_id)


@shared_task(name="chat.tasks.review_execute", acks_late=True)
def review_execute_task(run_id: str, tenant_id: str) -> None:
    # A document review (many model calls, minutes long) shares the agents' workers.
    review_turn_execute(run_id=run_id, tenant_id=tenant_id)


@shared_task(name="chat.tasks.runs_reap", ignore_result=True)
def runs_reap_task() -> int:
    """The run watchdog (Celery beat, every PARLEY_RUN_WATCHDOG_INTERVAL_S)."""
    return runs_reap()
