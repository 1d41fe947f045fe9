from celery import shared_task

from chat.runner import run_execute


@shared_task(name="chat.tasks.run_execute", acks_late=True)
def run_execute_task(run_id: str) -> None:
    run_execute(run_id=run_id)
