"""HTTP API of tenants and identity (django-ninja routers, wired in config.api)."""
