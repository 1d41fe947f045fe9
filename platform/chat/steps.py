"""An agent's tool calls as stored with its answer (`Message.steps`), folded from the
run's `tool.start` / `tool.end` events: by the worker as it ends the run, by the
watchdog from the log when the worker died. What the log showed, the message keeps."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# A call that started but never ended (the run was cancelled or its worker died).
UNFINISHED = "The call did not finish: the run ended first."


def tool_steps(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One step per tool call, in the order the calls started."""
    steps: dict[str, dict[str, Any]] = {}
    for event in events:
        kind = event.get("type")
        if kind not in ("tool.start", "tool.end"):
            continue
        call_id = str(event.get("call_id", ""))
        step = steps.setdefault(
            call_id,
            {
                "call_id": call_id,
                "name": event.get("name", ""),
                "arguments": None,
                "result": None,
                "error": UNFINISHED,
                "truncated": False,
            },
        )
        if kind == "tool.start":
            step["arguments"] = event.get("arguments")
        else:
            step.update(
                result=event.get("result"),
                error=event.get("error"),
                truncated=bool(event.get("truncated", False)),
            )
            if event.get("artifacts"):  # files the call produced (sandbox.services.artifact_ref)
                step["artifacts"] = list(event["artifacts"])
    return list(steps.values())
