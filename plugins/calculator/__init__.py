"""Calculator: exact arithmetic, unit conversion and date arithmetic for agents.

Small models are poor at arithmetic; these tools make it exact. Nothing here touches
the network, files or the interpreter: expressions are parsed with `ast` and walked
over a fixed set of operators and functions, never passed to eval.
"""

from __future__ import annotations

from agents.hookspecs import hookimpl
from agents.manifest import AgentSpec, PluginManifest
from plugins.calculator.tools import calculate, convert_units, date_shift, days_between

VERSION = "1.0.0"


@hookimpl
def parley_manifest() -> PluginManifest:
    tools = [calculate, convert_units, days_between, date_shift]
    return PluginManifest(
        name="calculator",
        version=VERSION,
        description="Exact arithmetic, unit conversion and date arithmetic.",
        tools=tools,
        scopes={tool.name: () for tool in tools},
        agents=[
            AgentSpec(
                name="calculator",
                title="Calculator",
                description="Answers questions that need exact numbers, units or dates.",
                instructions=(
                    "You answer questions that involve numbers, units of measure or dates. "
                    "Never compute in your head: use `calculate` for arithmetic, "
                    "`convert_units` for units, `days_between` and `date_shift` for "
                    "dates. Show the expression you evaluated and give the result "
                    "with its unit."
                ),
                tools=tuple(tool.name for tool in tools),
                # Every question it takes needs a tool; small models rarely reach for one
                # unasked (docs/benchmarks.md, tool calls).
                tool_choice="required",
            )
        ],
    )
