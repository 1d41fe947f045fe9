from django.core.management.base import BaseCommand

from tenants.access import actor_for_user
from tenants.models import Plan, Tenant, User
from tenants.rls import operator_scope, tenant_scope
from tenants.services.operators import operator_make, plans_seed
from tenants.services.tenants import tenant_create

DEMO_TENANT = "demo"
DEMO_USER = "demo"
DEMO_PASSWORD = "parley-demo"  # noqa: S105 - the documented login of the local demo
DEMO_PLAN = "Team"
DEMO_OPERATOR = "operator"
DEMO_OPERATOR_PASSWORD = "parley-operator"  # noqa: S105 - the documented local operator
# The scopes the demo grants a built-in plugin whose tools need some: the document
# reviewer reads documents and starts reviews (plugins/docreview); the Coder reads
# repositories and runs code in the sandbox (plugins/coding).
DEMO_SCOPES = {
    "docreview": ["documents.read", "documents.write"],
    "coding": ["documents.read", "code.execute"],
}


def builtin_agents_enable(tenant: Tenant, owner) -> list[str]:
    """Enable for the tenant every built-in plugin (shipped in Parley's `plugins`
    package) that has agents, with the scopes of DEMO_SCOPES: the demo shows them in
    the agent picker."""
    from agents.registry import plugins_loaded
    from agents.services import plugin_enable, plugin_scopes_grant

    enabled = []
    with tenant_scope(tenant_id=tenant.id):
        actor = actor_for_user(owner, tenant_id=tenant.id)
        assert actor is not None  # the owner has just been made a member
        for plugin in plugins_loaded():
            if plugin.entry_point.startswith("plugins.") and plugin.manifest.agents:
                if plugin.name in DEMO_SCOPES:
                    plugin_scopes_grant(
                        actor=actor, name=plugin.name, scopes=DEMO_SCOPES[plugin.name]
                    )
                plugin_enable(actor=actor, name=plugin.name)
                enabled.append(plugin.name)
    return enabled


class Command(BaseCommand):
    help = (
        "Create the demo: plans, the demo tenant (on the Team plan, its built-in agents "
        "enabled) and its owner, and a platform operator (idempotent). For local use only."
    )

    def handle(self, *args, **options):
        plans_seed()
        with operator_scope():
            exists = Tenant.objects.filter(slug=DEMO_TENANT).exists()
        if not exists:
            tenant, owner = tenant_create(
                name="Demo Company",
                slug=DEMO_TENANT,
                owner_username=DEMO_USER,
                owner_password=DEMO_PASSWORD,
                owner_email="demo@example.com",
                validate=False,
            )
            with operator_scope():
                tenant.plan = Plan.objects.get(name=DEMO_PLAN)
                tenant.save(update_fields=["plan"])
            agents = builtin_agents_enable(tenant, owner)
            self.stdout.write(
                f"Seeded the demo tenant (plan {DEMO_PLAN}; agents of "
                f"{', '.join(agents) or 'no plugin'} enabled)."
            )
        with operator_scope():
            has_operator = User.objects.filter(username=DEMO_OPERATOR).exists()
        if not has_operator:
            operator_make(username=DEMO_OPERATOR, password=DEMO_OPERATOR_PASSWORD, validate=False)
        self.stdout.write(f"Log in as {DEMO_USER} / {DEMO_PASSWORD} (a member of the demo tenant)")
        self.stdout.write(
            f"or as the platform operator {DEMO_OPERATOR} / {DEMO_OPERATOR_PASSWORD} (/operator/)"
        )
