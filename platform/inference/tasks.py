from celery import shared_task

from inference.backends import backends_refresh


@shared_task(name="inference.tasks.pool_refresh", ignore_result=True)
def pool_refresh() -> None:
    """Health, models and load of every backend (Celery beat, every few seconds)."""
    backends_refresh()
