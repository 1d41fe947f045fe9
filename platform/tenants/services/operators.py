"""Platform operators (users who run the installation: tenants, plans, the pool) and the
plans tenants work under."""

from __future__ import annotations

import logging

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import transaction

from tenants.models import Plan, User
from tenants.rls import operator_scope

logger = logging.getLogger(__name__)

# The plans a new installation starts with; operators change them (Django admin) or add
# others. None is unlimited.
DEFAULT_PLANS: dict[str, dict[str, int | None]] = {
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


def plans_seed() -> list[Plan]:
    """The default plans, created where missing (an operator's changes stay)."""
    with operator_scope(), transaction.atomic():
        return [
            Plan.objects.get_or_create(name=name, defaults=limits)[0]
            for name, limits in DEFAULT_PLANS.items()
        ]


def operator_make(
    *, username: str, password: str | None = None, email: str = "", validate: bool = True
) -> tuple[User, bool]:
    """Make `username` a platform operator: a new user with `password`, or an existing
    user promoted (their password is set when one is given). Returns (user, created)."""
    username = username.strip()
    if not username:
        raise ValidationError({"username": "An operator needs a username."})
    with operator_scope(), transaction.atomic():
        user = User.objects.filter(username=username).first()
        created = user is None
        if user is None:
            if not password:
                raise ValidationError({"password": "A new operator needs a password."})
            user = User(username=username, email=email)
        if password:
            if validate:
                validate_password(password, user)
            user.set_password(password)
        user.is_operator = True
        user.save()
    logger.info("operator %s %s", username, "created" if created else "promoted")
    return user, created
