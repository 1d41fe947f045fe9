"""`manage.py check` (and `migrate`, `serve`) warns when code cannot run sandboxed here:
the coding tools then refuse every call with the same reason, and never run code
outside the sandbox (sandbox.jail)."""

from __future__ import annotations

from typing import Any

from django.core.checks import Warning, register


@register("sandbox")
def check_sandbox(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    from django.conf import settings

    from sandbox.jail import sandbox_problem, wall_limit_s

    warnings = []
    problem = sandbox_problem()
    if problem:
        warnings.append(
            Warning(
                f"Code cannot run sandboxed on this host: {problem}",
                hint="Tools that run code (the code.execute scope) refuse every call here. "
                "Install bubblewrap and let the worker create user namespaces "
                "(deploy/README.md, the sandbox workers); `make sandbox` sets up a "
                "development machine.",
                id="sandbox.W001",
            )
        )
    if wall_limit_s() < settings.PARLEY_SANDBOX_WALL_S:
        warnings.append(
            Warning(
                f"PARLEY_SANDBOX_WALL_S ({settings.PARLEY_SANDBOX_WALL_S:g} s) is not below "
                f"PARLEY_TOOL_TIMEOUT_S ({settings.PARLEY_TOOL_TIMEOUT_S:g} s): sandboxed "
                f"code stops after {wall_limit_s():g} s instead.",
                hint="Raise PARLEY_TOOL_TIMEOUT_S or lower PARLEY_SANDBOX_WALL_S.",
                id="sandbox.W002",
            )
        )
    return warnings
