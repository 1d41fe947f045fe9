"""Deployment check: the application's database role must be subject to row level
security. Runs with `manage.py check --database default`."""

from __future__ import annotations

from typing import Any

from django.core.checks import Tags, Warning, register
from django.db import connections


@register(Tags.database)
def check_app_role(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[Warning]:
    problems: list[Warning] = []
    for alias in databases or []:
        connection = connections[alias]
        if connection.vendor != "postgresql":
            continue
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT r.rolsuper, r.rolbypassrls, (SELECT count(*) FROM pg_tables "
                "WHERE schemaname = 'public' AND tableowner = current_user) "
                "FROM pg_roles r WHERE r.rolname = current_user"
            )
            superuser, bypass, owned = cursor.fetchone()
        if superuser or bypass or owned:
            problems.append(
                Warning(
                    f"The database role of DATABASE_URL ({connection.settings_dict['USER']}) "
                    "is not subject to row level security (it is a superuser, has "
                    "BYPASSRLS or owns tables): tenant isolation then rests on the "
                    "application alone.",
                    hint="Connect as a role that owns no table and has no BYPASSRLS; set "
                    "DATABASE_OWNER_URL to the owner, which `migrate` uses.",
                    id="tenants.W001",
                )
            )
    return problems
