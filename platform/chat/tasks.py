from celery import shared_task

from chat.runner import run_execute


@shared_task(name="chat.tasks.run_execute", acks_late=True)
def run_execute_task(run_id: str, tenant_id: str) -> None:
    # The tenant comes from the server that queued the run, never from a client: it
    # scopes every query of the run (row level security).
    run_execute(run_id=run_id, tenant_id=tenant_id)
