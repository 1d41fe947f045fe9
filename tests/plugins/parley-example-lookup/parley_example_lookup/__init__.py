"""Country lookup: a tool that needs `network.fetch`, and one that needs no scope."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from langchain_core.tools import tool

from agents.hookspecs import hookimpl
from agents.manifest import AgentSpec, PluginManifest

# What the directory service would answer; fixed so the plugin never goes online.
COUNTRIES: dict[str, tuple[str, str, str]] = {
    "DE": ("Germany", "Berlin", "EUR"),
    "FR": ("France", "Paris", "EUR"),
    "JP": ("Japan", "Tokyo", "JPY"),
    "KE": ("Kenya", "Nairobi", "KES"),
    "BR": ("Brazil", "Brasília", "BRL"),
    "CA": ("Canada", "Ottawa", "CAD"),
}


@tool(parse_docstring=True)
def country_lookup(code: str) -> str:
    """Look up a country by its ISO 3166-1 alpha-2 code in the country directory.

    Args:
        code: Two-letter country code, for example "KE".
    """
    entry = COUNTRIES.get(code.strip().upper())
    if entry is None:
        return f"Error: no country with code {code!r} in the directory."
    name, capital, currency = entry
    return f"{name}: capital {capital}, currency {currency}"


@tool(parse_docstring=True)
def country_codes(prefix: str = "") -> str:
    """List the country codes the directory knows, optionally only those starting with a prefix.

    Args:
        prefix: Letters the codes must start with; empty for all.
    """
    codes = sorted(code for code in COUNTRIES if code.startswith(prefix.strip().upper()))
    return ", ".join(codes) or "none"


SETTINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "endpoint": {
            "type": "string",
            "description": "Base URL of the country directory service.",
            "default": "https://directory.example.org/v1",
        },
        "api_key": {
            "type": "string",
            "description": "Key for the directory service.",
            "writeOnly": True,
            "minLength": 8,
        },
        "max_results": {"type": "integer", "minimum": 1, "maximum": 50, "default": 10},
    },
    "required": ["api_key"],
    "additionalProperties": False,
}


@hookimpl
def parley_manifest() -> PluginManifest:
    return PluginManifest(
        name="example_lookup",
        version="0.3.0",
        description="Looks countries up in a country directory service.",
        tools=[country_lookup, country_codes],
        scopes={"country_lookup": ["network.fetch"], "country_codes": []},
        agents=[
            AgentSpec(
                name="geographer",
                title="Geographer",
                description="Answers questions about countries from the directory.",
                instructions="Answer questions about countries. Use country_lookup for facts.",
                tools=("country_lookup", "country_codes"),
            )
        ],
        settings_schema=SETTINGS_SCHEMA,
    )


@hookimpl
def parley_settings_check(settings: dict[str, Any]) -> list[str]:
    endpoint = settings.get("endpoint", SETTINGS_SCHEMA["properties"]["endpoint"]["default"])
    if urlparse(endpoint).scheme != "https":
        return ["endpoint must be an https:// URL"]
    return []
