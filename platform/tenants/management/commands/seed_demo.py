from django.core.management.base import BaseCommand

from tenants.models import Tenant
from tenants.rls import operator_scope
from tenants.services.tenants import tenant_create

DEMO_TENANT = "demo"
DEMO_USER = "demo"
DEMO_PASSWORD = "parley-demo"  # noqa: S105 - the documented login of the local demo


class Command(BaseCommand):
    help = "Create the demo tenant and its owner (idempotent). For local use only."

    def handle(self, *args, **options):
        with operator_scope():
            exists = Tenant.objects.filter(slug=DEMO_TENANT).exists()
        if exists:
            self.stdout.write(f"Demo tenant exists; log in as {DEMO_USER} / {DEMO_PASSWORD}")
            return
        tenant_create(
            name="Demo Company",
            slug=DEMO_TENANT,
            owner_username=DEMO_USER,
            owner_password=DEMO_PASSWORD,
            owner_email="demo@example.com",
            validate=False,
        )
        self.stdout.write(f"Seeded demo tenant; log in as {DEMO_USER} / {DEMO_PASSWORD}")
