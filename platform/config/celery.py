"""The Celery app, and `enqueue`, the one way Parley hands work to a worker."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery, Task, signals

from config.singleton import process_singleton

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")

app = Celery("parley")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

logger = logging.getLogger(__name__)


@process_singleton
def in_process_executor() -> ThreadPoolExecutor:
    """The embedded mode's task threads."""
    from django.conf import settings

    return ThreadPoolExecutor(
        max_workers=settings.PARLEY_IN_PROCESS_WORKERS, thread_name_prefix="parley-task"
    )


def _run_in_thread(task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    from django.db import connections

    try:
        result = task.apply(args=args, kwargs=kwargs)
        if result.failed():
            logger.error("in-process task %s failed: %r", task.name, result.result)
    finally:
        connections.close_all()


def enqueue(task: Task, *args: Any, **kwargs: Any) -> None:
    """Run `task` on a worker.

    Production: a Celery worker, through the broker (routed by CELERY_TASK_ROUTES).
    Embedded mode: a thread of this process, so the caller (a websocket consumer)
    never waits for the task. Call it from `transaction.on_commit`.
    """
    from django.conf import settings

    if settings.PARLEY_TASKS_IN_PROCESS:
        in_process_executor().submit(_run_in_thread, task, args, kwargs)
    else:
        task.apply_async(args=args, kwargs=kwargs)


@signals.task_prerun.connect
@signals.task_postrun.connect
def _close_stale_connections(**kwargs: Any) -> None:
    # Workers are long-lived: drop connections that are broken or past CONN_MAX_AGE,
    # as Django does around each request.
    from django.db import close_old_connections

    close_old_connections()
