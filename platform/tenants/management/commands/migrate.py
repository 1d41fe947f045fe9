"""`migrate` as the owner of the tables; the application role gets its grants after.

With DATABASE_OWNER_URL set, the schema is changed as that role (the owner) and the
application role (DATABASE_URL's) is granted what it needs: row level security then
applies to it. Without it, `migrate` runs as DATABASE_URL's role, as usual.
"""

from django.conf import settings
from django.core.management.commands.migrate import Command as DjangoMigrate
from django.db import connections

from tenants.rls import grant_app_role


class Command(DjangoMigrate):
    def handle(self, *args, **options):
        owner = getattr(settings, "PARLEY_DATABASE_OWNER", None)
        connection = connections[options["database"]]
        if not owner or connection.vendor != "postgresql":
            return super().handle(*args, **options)
        app_role = connection.settings_dict["USER"]
        saved = {key: connection.settings_dict.get(key) for key in owner}
        _disconnect(connection)
        connection.settings_dict.update(owner)
        try:
            super().handle(*args, **options)
            if app_role and app_role != owner["USER"]:
                grant_app_role(app_role, using=options["database"])
                if options["verbosity"]:
                    self.stdout.write(f"Granted the application role {app_role!r} its privileges.")
        finally:
            _disconnect(connection)
            connection.settings_dict.update(saved)


def _disconnect(connection) -> None:
    """Close the connection and, with DATABASE_POOL, the pool: a pool keeps the
    credentials it was made with, so an application role's pool would run the schema
    changes as that role, and the owner's would serve the application afterwards."""
    connection.close()
    if connection.settings_dict.get("OPTIONS", {}).get("pool"):
        connection.close_pool()
