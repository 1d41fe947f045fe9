"""Writes to tenants and identity, one module per area:

- `tenants`: creating tenants, their lifecycle (rename, suspend, export, delete);
- `members`: memberships, roles, invitations;
- `api_keys`: integrators' keys;
- `audit`: the append-only audit log every other service writes to;
- `sso`: per-tenant OpenID Connect single sign-on.
"""
