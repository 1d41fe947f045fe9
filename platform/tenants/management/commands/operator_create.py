import getpass
import os
import sys

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from tenants.services.operators import operator_make


class Command(BaseCommand):
    help = (
        "Make a platform operator: create the user, or promote an existing one. The "
        "password comes from --password, else PARLEY_OPERATOR_PASSWORD, else a prompt."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--email", default="")
        parser.add_argument("--password", help="(visible in the process list: prefer the prompt)")

    def handle(self, *args, **options):
        password = options["password"] or os.environ.get("PARLEY_OPERATOR_PASSWORD")
        if not password and sys.stdin.isatty():
            password = getpass.getpass("Password (empty: keep an existing user's): ") or None
        try:
            user, created = operator_make(
                username=options["username"], password=password, email=options["email"]
            )
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from None
        verb = "Created" if created else "Promoted"
        self.stdout.write(f"{verb} operator {user.username}; their home page is /operator/")
