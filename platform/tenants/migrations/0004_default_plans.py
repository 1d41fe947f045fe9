"""The plans a new installation starts with (tenants.services.operators.DEFAULT_PLANS),
so that an operator can put a tenant on a plan at once; operators edit them or add
others. Existing plans of those names are left as they are."""

from django.db import migrations

# As tenants.services.operators.DEFAULT_PLANS was when this migration was written.
PLANS = {
    "Free": {
        "max_members": 5,
        "monthly_token_budget": 1_000_000,
        "requests_per_minute": 20,
        "tokens_per_minute": 40_000,
        "concurrent_runs": 2,
        "max_upload_bytes": 10 * 2**20,
    },
    "Team": {
        "max_members": 100,
        "monthly_token_budget": 50_000_000,
        "requests_per_minute": 120,
        "tokens_per_minute": 400_000,
        "concurrent_runs": 8,
        "max_upload_bytes": 50 * 2**20,
    },
    "Enterprise": {
        "max_members": None,
        "monthly_token_budget": None,
        "requests_per_minute": 600,
        "tokens_per_minute": 2_000_000,
        "concurrent_runs": 32,
        "max_upload_bytes": 200 * 2**20,
    },
}


def plans_create(apps, schema_editor):
    Plan = apps.get_model("tenants", "Plan")
    for name, limits in PLANS.items():
        Plan.objects.get_or_create(name=name, defaults=limits)


class Migration(migrations.Migration):
    dependencies = [("tenants", "0003_tenant_sso")]

    operations = [migrations.RunPython(plans_create, migrations.RunPython.noop)]
