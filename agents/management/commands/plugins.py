"""`manage.py plugins`: the installed plugins, what they add, and why any was skipped."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from agents.registry import plugin_failures, plugins_loaded, plugins_not_allowed


class Command(BaseCommand):
    help = "List the plugins loaded from the parley.plugins entry points, and failures."

    def handle(self, *args: Any, **options: Any) -> None:
        loaded = plugins_loaded()
        failures = plugin_failures()
        for plugin in loaded:
            manifest = plugin.manifest
            self.stdout.write(
                f"{plugin.name} {manifest.version} ({plugin.distribution}): {manifest.description}"
            )
            for tool in manifest.tools:
                scopes = ", ".join(sorted(manifest.tool_scopes(tool.name))) or "no scopes"
                self.stdout.write(f"  tool {tool.name} [{scopes}]")
            for agent in manifest.agents:
                self.stdout.write(f"  agent {agent.name}: {agent.title}")
        for name in plugins_not_allowed():
            self.stdout.write(f"{name}: installed, not loaded (not in PARLEY_PLUGINS)")
        for failure in failures:
            self.stderr.write(self.style.ERROR(f"{failure.name}: FAILED: {failure.reason}"))
        if not loaded and not failures:
            self.stdout.write("No plugins installed.")
