"""A real OpenID provider for the SSO tests (django-oauth-toolkit with OpenID Connect),
run as a separate Django project in a subprocess with its own SQLite database. See
`process.OIDCProvider` (start and stop it) and `serve` (what runs in the subprocess)."""
