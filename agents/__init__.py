"""Agents and plugins (DESIGN section 6).

Here now: the plugin mechanism (hookspecs, registry, manifest, scopes) and the
conformance suite plugins run (agents.testing). To come: the agent runtime, LangChain
agents whose chat model calls the inference pool, every step logged as a run event."""
