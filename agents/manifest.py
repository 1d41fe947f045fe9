"""What a plugin declares (DESIGN section 6), and the checks that hold it to that.

A plugin's `parley_manifest` hook returns one `PluginManifest`: its name, version and
description, the LangChain tools it adds, the scopes each tool needs, the agents it
provides (instructions plus a choice of its tools) and the JSON Schema of its settings.

Settings. The schema is a JSON Schema (draft 2020-12) for an object. A property whose
schema says `"writeOnly": true` is a secret (an API key, a token): the standard keyword
for "accepted on input, never sent back". Secrets are strings; Parley stores them
encrypted (`settings_seal`, with `tenants.crypto`) and shows them redacted
(`settings_redact`); only a plugin's tools see them in the clear.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jsonschema
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

# What a tool may be allowed to do. A tool declares the scopes it needs; the runtime
# offers and runs it only where all of them are granted (agents.scopes).
SCOPES: dict[str, str] = {
    "code.execute": "Run code in the sandbox (no network, private temporary workspace).",
    "documents.read": "Read the tenant's uploaded documents and repositories.",
    "documents.write": "Create or change the tenant's documents.",
    "network.fetch": "Make requests to hosts outside Parley.",
}

# Plugin and agent names: lowercase, start with a letter; tool names follow the
# OpenAI function-name rule, which vLLM and LangChain share.
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SECRET_KEYWORD = "writeOnly"  # noqa: S105 - a JSON Schema keyword, not a password

EMPTY_SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}


TOOL_CHOICES = ("auto", "required")


@dataclass(frozen=True)
class AgentSpec:
    """An agent a plugin provides: a member picks it for a conversation."""

    name: str
    title: str
    description: str
    instructions: str
    tools: tuple[str, ...] = ()
    # "auto": the model chooses whether to call a tool at each step. "required": the
    # first model call of each run must call one of the agent's tools (later calls
    # choose), for an agent every question of which needs a tool, on models that do not
    # reach for tools by themselves (the bundled one: docs/benchmarks.md).
    tool_choice: str = "auto"


@dataclass(frozen=True)
class PluginManifest:
    name: str
    version: str
    description: str
    tools: Sequence[BaseTool] = ()
    # Tool name -> the scopes it needs; every tool appears, with () when it needs none.
    scopes: Mapping[str, Sequence[str]] = field(default_factory=dict)
    agents: Sequence[AgentSpec] = ()
    settings_schema: Mapping[str, Any] = field(default_factory=lambda: EMPTY_SETTINGS_SCHEMA)

    def tool(self, name: str) -> BaseTool | None:
        return next((tool for tool in self.tools if tool.name == name), None)

    def tool_scopes(self, name: str) -> frozenset[str]:
        return frozenset(self.scopes.get(name, ()))


class ManifestError(ValueError):
    """A plugin's manifest breaks the rules; `problems` lists every one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid manifest: " + "; ".join(problems))


class SettingsError(ValueError):
    """Settings that do not fit a plugin's schema; `problems` lists every one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings: " + "; ".join(problems))


def tool_parameters(tool: BaseTool) -> dict[str, Any]:
    """The JSON Schema of a tool's arguments, as the model is shown it."""
    return dict(convert_to_openai_tool(tool)["function"].get("parameters") or {})


def manifest_problems(manifest: Any) -> list[str]:
    """Every way `manifest` breaks the rules, as sentences; empty when it is valid."""
    if not isinstance(manifest, PluginManifest):
        return [f"parley_manifest returned {type(manifest).__name__}, not a PluginManifest"]
    problems: list[str] = []
    if not isinstance(manifest.name, str) or not NAME_RE.match(manifest.name):
        problems.append(
            f"name {manifest.name!r} must be lowercase letters, digits and underscores, "
            "starting with a letter (at most 63 characters)"
        )
    for attribute in ("version", "description"):
        value = getattr(manifest, attribute)
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{attribute} must be a non-empty string")
    problems += _tool_problems(manifest)
    problems += _agent_problems(manifest)
    problems += settings_schema_problems(manifest.settings_schema)
    return problems


def manifest_validate(manifest: Any) -> PluginManifest:
    problems = manifest_problems(manifest)
    if problems:
        raise ManifestError(problems)
    return manifest


def _tool_problems(manifest: PluginManifest) -> list[str]:
    problems: list[str] = []
    names: list[str] = []
    for index, tool in enumerate(manifest.tools):
        if not isinstance(tool, BaseTool):
            problems.append(f"tools[{index}] is a {type(tool).__name__}, not a LangChain tool")
            continue
        names.append(tool.name)
        if not TOOL_NAME_RE.match(tool.name):
            problems.append(f"tool name {tool.name!r} must be 1-64 letters, digits, '_' or '-'")
        if not (tool.description or "").strip():
            problems.append(f"tool {tool.name!r} has no description")
        try:
            parameters = tool_parameters(tool)
        except Exception as exc:  # a broken args_schema, whatever it raises
            problems.append(f"tool {tool.name!r} has no usable argument schema: {exc}")
        else:
            if parameters.get("type") != "object":
                problems.append(f"tool {tool.name!r} arguments are not a JSON object schema")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"tool names repeat: {', '.join(duplicates)}")
    if not isinstance(manifest.scopes, Mapping):
        return [*problems, "scopes must map each tool name to the scopes it needs"]
    for name in names:
        if name not in manifest.scopes:
            problems.append(f"tool {name!r} declares no scopes (use () when it needs none)")
    for name, scopes in manifest.scopes.items():
        if name not in names:
            problems.append(f"scopes name {name!r}, which is not one of the plugin's tools")
        if isinstance(scopes, str) or not isinstance(scopes, Sequence | frozenset | set):
            problems.append(f"scopes of tool {name!r} must be a list of scope names")
            continue
        for scope in scopes:
            if scope not in SCOPES:
                problems.append(
                    f"tool {name!r} needs unknown scope {scope!r} (known: {', '.join(SCOPES)})"
                )
    return problems


def _agent_problems(manifest: PluginManifest) -> list[str]:
    problems: list[str] = []
    tool_names = {tool.name for tool in manifest.tools if isinstance(tool, BaseTool)}
    seen: set[str] = set()
    for index, agent in enumerate(manifest.agents):
        if not isinstance(agent, AgentSpec):
            problems.append(f"agents[{index}] is a {type(agent).__name__}, not an AgentSpec")
            continue
        if not NAME_RE.match(agent.name):
            problems.append(f"agent name {agent.name!r} must be like a plugin name")
        if agent.name in seen:
            problems.append(f"agent name {agent.name!r} repeats")
        seen.add(agent.name)
        for attribute in ("title", "instructions"):
            if not str(getattr(agent, attribute) or "").strip():
                problems.append(f"agent {agent.name!r} has no {attribute}")
        if agent.tool_choice not in TOOL_CHOICES:
            problems.append(
                f"agent {agent.name!r} has tool_choice {agent.tool_choice!r}: one of "
                f"{', '.join(TOOL_CHOICES)}"
            )
        elif agent.tool_choice == "required" and not agent.tools:
            problems.append(f"agent {agent.name!r} requires a tool call but has no tools")
        unknown = [name for name in agent.tools if name not in tool_names]
        if unknown:
            problems.append(
                f"agent {agent.name!r} uses tools the plugin does not add: {', '.join(unknown)}"
            )
    return problems


# --- settings -----------------------------------------------------------------


def settings_schema_problems(schema: Any) -> list[str]:
    if not isinstance(schema, Mapping):
        return ["settings_schema must be a JSON Schema object"]
    try:
        jsonschema.Draft202012Validator.check_schema(dict(schema))
    except jsonschema.SchemaError as exc:
        return [f"settings_schema is not a valid JSON Schema: {exc.message}"]
    problems: list[str] = []
    if schema.get("type") != "object":
        problems.append('settings_schema must have "type": "object"')
    properties = schema.get("properties", {})
    for name, prop in properties.items():
        if prop.get(SECRET_KEYWORD) and prop.get("type") != "string":
            problems.append(f"secret setting {name!r} (writeOnly) must be a string")
    try:
        json.dumps(schema)
    except (TypeError, ValueError):
        problems.append("settings_schema must be plain JSON")
    return problems


def settings_secret_fields(schema: Mapping[str, Any]) -> frozenset[str]:
    """The top-level settings marked `"writeOnly": true`."""
    properties = schema.get("properties", {})
    return frozenset(name for name, prop in properties.items() if prop.get(SECRET_KEYWORD))


def settings_problems(schema: Mapping[str, Any], settings: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(dict(schema))
    problems = []
    for error in sorted(validator.iter_errors(settings), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(part) for part in error.absolute_path) or "settings"
        # Never echo a value: it may be a secret typed in the wrong field.
        problems.append(f"{where}: {_error_text(error)}")
    return problems


def _error_text(error: jsonschema.ValidationError) -> str:
    # jsonschema's own messages quote the offending value; only those naming keys pass.
    if error.validator in {"required", "additionalProperties", "dependentRequired"}:
        return error.message
    return f"breaks the schema rule {error.validator} {error.validator_value!r}"


def settings_validate(manifest: PluginManifest, settings: Any) -> dict[str, Any]:
    """`settings` checked against the plugin's schema, or SettingsError."""
    problems = settings_problems(manifest.settings_schema, settings)
    if problems:
        raise SettingsError(problems)
    return dict(settings)


def settings_redact(manifest: PluginManifest, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings to show back: each secret says only whether it is set."""
    secrets = settings_secret_fields(manifest.settings_schema)
    return {key: (bool(value) if key in secrets else value) for key, value in settings.items()}


SEALED_PREFIX = "fernet:"


def settings_seal(manifest: PluginManifest, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings to store: secrets encrypted with `tenants.crypto`, the rest as is."""
    from tenants.crypto import encrypt

    secrets = settings_secret_fields(manifest.settings_schema)
    return {
        key: (SEALED_PREFIX + encrypt(value) if key in secrets and value else value)
        for key, value in settings.items()
    }


def settings_unseal(manifest: PluginManifest, stored: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of `settings_seal` (tenants.crypto.DecryptionError if the keys changed)."""
    from tenants.crypto import decrypt

    secrets = settings_secret_fields(manifest.settings_schema)
    opened = {}
    for key, value in stored.items():
        if key in secrets and isinstance(value, str) and value.startswith(SEALED_PREFIX):
            value = decrypt(value.removeprefix(SEALED_PREFIX))
        opened[key] = value
    return opened
