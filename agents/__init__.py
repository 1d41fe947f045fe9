"""Agents and plugins (DESIGN section 6).

Here now: the plugin mechanism (hookspecs, registry, manifest, scopes), the conformance
suite plugins run (agents.testing), per-tenant enablement (models, services, selectors,
api_tenant), the tool loop (agents.runtime) and the pool as a LangChain chat model
(agents.pool_model). To come: tool calls through the pool, and agent runs wired into
chat runs on the `agents` Celery queue."""
