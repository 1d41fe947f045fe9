"""Finding and loading plugins: every entry point of the group `parley.plugins`.

Built-in plugins (plugins/) register in Parley's own pyproject exactly like third-party
distributions. Loading happens on first use and is cached; it never raises: a plugin
that fails to import, whose hooks do not fit agents.hookspecs, whose manifest is
invalid, or whose name another distribution also claims, is skipped and recorded in
`plugin_failures()` with the reason (the operator sees them in `manage.py plugins`,
`manage.py check` and GET /api/v1/operator/plugins).

PARLEY_PLUGINS (comma-separated plugin names) limits which installed plugins load;
unset, all do. A plugin left out of it is never imported.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy
from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from agents import hookspecs
from agents.manifest import PluginManifest, SettingsError, manifest_problems, settings_validate
from config.singleton import process_singleton

ENTRY_POINT_GROUP = "parley.plugins"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedPlugin:
    name: str
    manifest: PluginManifest
    entry_point: str  # "module:attr", as registered
    distribution: str  # "name version" of the distribution that registered it
    module: Any


@dataclass(frozen=True)
class PluginFailure:
    name: str
    entry_point: str
    distribution: str
    reason: str


class PluginNotFound(LookupError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"No plugin {name!r} is loaded (not installed, not allowed, or failed).")


class PluginLoadError(Exception):
    """One plugin could not be loaded; the message says why."""


def _distribution(entry_point: metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "unknown distribution"
    return f"{dist.metadata['Name']} {dist.version}"


def _new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


def plugin_load(entry_point: metadata.EntryPoint) -> LoadedPlugin:
    """Import one entry point and check it; PluginLoadError with the reason otherwise."""
    try:
        module = entry_point.load()
    except Exception as exc:  # an import may raise anything
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
        raise PluginLoadError(
            f"import of {entry_point.value} failed: {type(exc).__name__}: {exc}{where}"
        ) from exc
    # A manager of its own checks the hooks' names and arguments against the specs.
    manager = _new_manager()
    try:
        manager.register(module, name=entry_point.name)
        manager.check_pending()
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginLoadError(f"hooks do not fit agents.hookspecs: {exc}") from exc
    if not manager.hook.parley_manifest.get_hookimpls():
        raise PluginLoadError("it implements no parley_manifest hook")
    try:
        manifest = manager.hook.parley_manifest()
    except Exception as exc:
        raise PluginLoadError(f"parley_manifest raised {type(exc).__name__}: {exc}") from exc
    problems = manifest_problems(manifest)
    if not problems and manifest.name != entry_point.name:
        problems.append(
            f"manifest name {manifest.name!r} differs from its entry point name "
            f"{entry_point.name!r}"
        )
    if problems:
        raise PluginLoadError("invalid manifest: " + "; ".join(problems))
    return LoadedPlugin(
        name=entry_point.name,
        manifest=manifest,
        entry_point=entry_point.value,
        distribution=_distribution(entry_point),
        module=module,
    )


def _installed_entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


class PluginRegistry:
    """The plugins of one process. `allowlist` None loads every installed plugin."""

    def __init__(
        self,
        *,
        allowlist: Iterable[str] | None = None,
        entry_points: Callable[[], Iterable[metadata.EntryPoint]] | None = None,
    ) -> None:
        self.allowlist = None if allowlist is None else list(allowlist)
        self._entry_points = entry_points
        self._lock = threading.Lock()
        self._loaded: dict[str, LoadedPlugin] | None = None
        self._failures: list[PluginFailure] = []
        self._not_allowed: list[str] = []
        # One manager for all: later hooks that every plugin answers go through it.
        self.manager = _new_manager()

    def _load(self) -> dict[str, LoadedPlugin]:
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load_all()
            return self._loaded

    def _fail(self, entry_point: metadata.EntryPoint, reason: str) -> None:
        failure = PluginFailure(
            name=entry_point.name,
            entry_point=entry_point.value,
            distribution=_distribution(entry_point),
            reason=reason,
        )
        logger.error(
            "Plugin %s (%s, %s) skipped: %s",
            failure.name,
            failure.entry_point,
            failure.distribution,
            reason,
        )
        self._failures.append(failure)

    def _load_all(self) -> dict[str, LoadedPlugin]:
        try:
            found = list((self._entry_points or _installed_entry_points)())
        except Exception:
            logger.exception("Listing the installed plugins failed; none is loaded.")
            found = []
        # The same distribution seen twice on sys.path is one registration.
        unique: dict[tuple[str, str, str], metadata.EntryPoint] = {}
        for entry_point in found:
            unique.setdefault(
                (entry_point.name, entry_point.value, _distribution(entry_point)), entry_point
            )
        by_name: dict[str, list[metadata.EntryPoint]] = {}
        for entry_point in unique.values():
            by_name.setdefault(entry_point.name, []).append(entry_point)

        loaded: dict[str, LoadedPlugin] = {}
        for name in sorted(by_name):
            candidates = by_name[name]
            if self.allowlist is not None and name not in self.allowlist:
                self._not_allowed.append(name)
                continue
            if len(candidates) > 1:
                # Which one would win depends on sys.path order: run neither.
                sources = ", ".join(f"{_distribution(ep)} ({ep.value})" for ep in candidates)
                for entry_point in candidates:
                    self._fail(
                        entry_point,
                        f"duplicate plugin name {name!r}: registered by {sources}; "
                        "none of them is loaded",
                    )
                continue
            try:
                plugin = plugin_load(candidates[0])
            except PluginLoadError as exc:
                self._fail(candidates[0], str(exc))
                continue
            try:
                self.manager.register(plugin.module, name=name)
            except ValueError as exc:  # the same module under a second name
                self._fail(candidates[0], f"cannot be registered twice: {exc}")
                continue
            loaded[name] = plugin
        for name in self.allowlist or []:
            if name not in by_name:
                self._failures.append(
                    PluginFailure(
                        name=name,
                        entry_point="",
                        distribution="",
                        reason="named in PARLEY_PLUGINS but no installed distribution "
                        f"registers it in {ENTRY_POINT_GROUP}",
                    )
                )
                logger.error("Plugin %s is named in PARLEY_PLUGINS but not installed.", name)
        return loaded

    def plugins(self) -> list[LoadedPlugin]:
        return list(self._load().values())

    def get(self, name: str) -> LoadedPlugin:
        try:
            return self._load()[name]
        except KeyError:
            raise PluginNotFound(name) from None

    def failures(self) -> list[PluginFailure]:
        self._load()
        return list(self._failures)

    def not_allowed(self) -> list[str]:
        """Installed plugins that PARLEY_PLUGINS leaves out (never imported)."""
        self._load()
        return list(self._not_allowed)

    def settings_check(self, name: str, settings: Any) -> dict[str, Any]:
        """A tenant's settings for plugin `name`: the schema, then the plugin's own
        `parley_settings_check` hook; SettingsError listing every problem."""
        plugin = self.get(name)
        clean = settings_validate(plugin.manifest, settings)
        others = [p.module for p in self.plugins() if p.name != name]
        check = self.manager.subset_hook_caller("parley_settings_check", remove_plugins=others)
        try:
            problems = check(settings=dict(clean)) or []
        except Exception as exc:
            problems = [f"the plugin's settings check failed: {type(exc).__name__}"]
        if problems:
            raise SettingsError([str(problem) for problem in problems])
        return clean


@process_singleton
def registry() -> PluginRegistry:
    """The process's registry, built on first use from PARLEY_PLUGINS."""
    return PluginRegistry(allowlist=settings.PARLEY_PLUGINS)


def registry_reset() -> None:
    """Forget what was loaded: the next use finds the plugins again."""
    registry.reset()


@receiver(setting_changed)
def _allowlist_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "PARLEY_PLUGINS":
        registry_reset()


def plugins_loaded() -> list[LoadedPlugin]:
    return registry().plugins()


def plugin_get(name: str) -> LoadedPlugin:
    """The loaded plugin `name`, or PluginNotFound."""
    return registry().get(name)


def plugin_failures() -> list[PluginFailure]:
    return registry().failures()


def plugins_not_allowed() -> list[str]:
    return registry().not_allowed()
