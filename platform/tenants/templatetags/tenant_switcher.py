"""`{% tenant_switcher %}`: the header's list of the signed-in person's tenants, with the
current one selected (a plain form: the pages' CSP allows no inline script)."""

from __future__ import annotations

from typing import Any

from django import template

from tenants.selectors import memberships_of_user

register = template.Library()


@register.inclusion_tag("tenants/switcher.html", takes_context=True)
def tenant_switcher(context: template.Context) -> dict[str, Any]:
    request = context.get("request")
    actor = getattr(request, "actor", None)
    memberships = memberships_of_user(user=getattr(request, "user", None)) if actor else []
    return {
        "actor": actor,
        "memberships": memberships,
        "current": actor.tenant_id if actor else None,
        "csrf_token": context.get("csrf_token"),
    }
