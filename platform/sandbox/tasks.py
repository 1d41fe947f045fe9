"""The sandbox storage's Celery task: the workspace expiry sweep (Celery beat, every
PARLEY_SANDBOX_EXPIRE_INTERVAL_S, on the `default` queue: CELERY_TASK_ROUTES)."""

from celery import shared_task


@shared_task(name="sandbox.tasks.workspaces_expire", ignore_result=True)
def workspaces_expire_task() -> int:
    from sandbox.services import workspaces_expire

    return workspaces_expire()
