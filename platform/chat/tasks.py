from celery import shared_task

from chat.runner import run_execute


@shared_task(name="chat.tasks.run_execute", acks_late=True)
def run_execute_task(run_id: str, tenant_id: str) -> None:
    # The tenant comes from the server that queued the run, never from a client: it
    # scopes every query of the run (row level security).
    run_execute(run_id=run_id, tenant_id=tenant_id)


@shared_task(name="chat.tasks.agent_execute", acks_late=True)
def agent_execute_task(run_id: str, tenant_id: str) -> None:
    # A run answered by an agent: on the `agents` queue, so long tool loops do not hold
    # the workers that stream plain chat.
    from chat.agent_runs import agent_execute

    agent_execute(run_id=run_id, tenant_id=tenant_id)


@shared_task(name="chat.tasks.conversation_title", acks_late=True)
def conversation_title_task(conversation_id: str, tenant_id: str, model: str = "") -> None:
    from chat.titles import conversation_title_generate

    conversation_title_generate(conversation_id=conversation_id, tenant_id=tenant_id, model=model)


@shared_task(name="chat.tasks.runs_reap", ignore_result=True)
def runs_reap_task() -> int:
    """The run watchdog (Celery beat, every PARLEY_RUN_WATCHDOG_INTERVAL_S)."""
    from chat.watchdog import runs_reap

    return runs_reap()
