from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from tenants.services.tenants import tenant_create


class Command(BaseCommand):
    help = "Create a tenant with its owner."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the tenant's display name")
        parser.add_argument("--slug", help="URL-safe identifier (default: from the name)")
        parser.add_argument("--owner", required=True, help="the owner's username")
        parser.add_argument("--password", required=True, help="the owner's password")
        parser.add_argument("--email", default="", help="the owner's email address")

    def handle(self, *args, **options):
        try:
            tenant, owner = tenant_create(
                name=options["name"],
                slug=options["slug"],
                owner_username=options["owner"],
                owner_password=options["password"],
                owner_email=options["email"],
            )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        self.stdout.write(f"Created tenant {tenant.slug} ({tenant.id}) owned by {owner.username}")
