"""Writes to tenants, users and memberships."""

from __future__ import annotations

import uuid

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.text import slugify

from tenants.models import Membership, Role, Tenant, User
from tenants.rls import operator_scope, tenant_scope


def tenant_create(
    *,
    name: str,
    owner_username: str,
    owner_password: str,
    owner_email: str = "",
    slug: str | None = None,
    validate: bool = True,
) -> tuple[Tenant, User]:
    """Create a tenant and its owner (a new user, or an existing one given the same
    username and matching password)."""
    name = name.strip()
    if not name:
        raise ValidationError({"name": "A tenant needs a name."})
    slug = slugify(slug or name)[:63]
    if not slug:
        raise ValidationError({"slug": "The tenant name must contain letters or digits."})
    with operator_scope():  # slugs are unique across every tenant
        if Tenant.objects.filter(slug=slug).exists():
            raise ValidationError({"slug": f"A tenant with the slug {slug!r} already exists."})
    if not owner_username.strip():
        raise ValidationError({"owner_username": "The owner needs a username."})

    tenant_id = uuid.uuid4()
    with tenant_scope(tenant_id=tenant_id), transaction.atomic():
        tenant = Tenant.objects.create(id=tenant_id, name=name, slug=slug)
        owner = User.objects.filter(username=owner_username).first()
        if owner is None:
            owner = User(username=owner_username, email=owner_email)
            if validate:
                validate_password(owner_password, owner)
            owner.set_password(owner_password)
            owner.save()
        elif not owner.check_password(owner_password):
            raise ValidationError(
                {"owner_username": f"User {owner_username!r} exists; give their password."}
            )
        Membership.objects.create(tenant=tenant, user=owner, role=Role.OWNER)
    return tenant, owner


def membership_add(*, tenant: Tenant, user: User, role: str = Role.MEMBER) -> Membership:
    if role not in Role.values:
        raise ValidationError({"role": f"Unknown role {role!r}."})
    membership, _ = Membership.objects.update_or_create(
        tenant=tenant, user=user, defaults={"role": role}
    )
    return membership
