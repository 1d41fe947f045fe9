"""`manage.py check` (and every command that runs the checks, `migrate` and `serve`
among them) reports each plugin that failed to load: it is skipped, never fatal."""

from __future__ import annotations

from typing import Any

from django.core.checks import Warning, register


@register("plugins")
def check_plugins(app_configs: Any = None, **kwargs: Any) -> list[Warning]:
    # Imported here: plugins (and LangChain) load when checked, not when Django starts.
    from agents.registry import plugin_failures

    return [
        Warning(
            f"Plugin {failure.name!r} is not loaded: {failure.reason}",
            hint="Fix or uninstall its distribution"
            + (f" ({failure.distribution})" if failure.distribution else "")
            + ", or leave it out of PARLEY_PLUGINS. `manage.py plugins` lists all plugins.",
            id="agents.W001",
        )
        for failure in plugin_failures()
    ]
