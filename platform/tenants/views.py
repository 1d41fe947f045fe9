"""Pages of tenants: a person's tenants (switch, leave) and the invitation link.

The invitation page is reached by people who are not members (yet): the services find
the invitation by its token's hash in a narrow operator scope and write the membership
in the invitation's tenant scope.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_http_methods, require_POST

from tenants.access import SESSION_TENANT_KEY, Actor, NotFound
from tenants.models import Invitation, Role
from tenants.selectors import (
    InvitationRefused,
    invitation_by_token,
    membership_of_user,
    memberships_of_user,
    plans_all,
    tenants_overview,
)
from tenants.services.members import invitation_accept, invitation_signup, member_leave

# Sign-up on the invitation page creates a password account.
SIGNUP_AUTH_BACKEND = "django.contrib.auth.backends.ModelBackend"


def _errors(exc: ValidationError) -> dict[str, list[str]]:
    """Messages by form field; those of no field under `general`."""
    if not hasattr(exc, "error_dict"):
        return {"general": list(exc.messages)}
    return {
        ("general" if field == "__all__" else field): list(field_messages)
        for field, field_messages in exc.message_dict.items()
    }


# --- your tenants -----------------------------------------------------------------------


def _mine(request: HttpRequest, *, error: str = "", status: int = 200) -> HttpResponse:
    actor: Actor | None = getattr(request, "actor", None)
    return render(
        request,
        "tenants/mine.html",
        {
            "actor": actor,
            "memberships": memberships_of_user(user=request.user),
            "error": error,
        },
        status=status,
    )


@login_required
def tenants_mine(request: HttpRequest) -> HttpResponse:
    return _mine(request)


@login_required
def operator_home(request: HttpRequest) -> HttpResponse:
    """The platform operator's page: every tenant (plan, members, state), the plans,
    and where the operator's tools are. Anyone else: 404, as the operator API."""
    if not getattr(request.user, "is_operator", False):
        raise Http404("No such page.")
    return render(
        request,
        "tenants/operator_home.html",
        {"tenants": tenants_overview(), "plans": plans_all()},
    )


@login_required
@require_POST
def tenant_switch(request: HttpRequest) -> HttpResponse:
    """Act in another of one's own tenants from now on (any other id: 404)."""
    try:
        membership = membership_of_user(user=request.user, tenant_id=request.POST.get("tenant"))
    except NotFound:
        raise Http404("You are not a member of that tenant.") from None
    request.session[SESSION_TENANT_KEY] = str(membership.tenant_id)
    return redirect("chat:home")


@login_required
@require_POST
def tenant_leave(request: HttpRequest) -> HttpResponse:
    """Leave the tenant one currently acts in."""
    actor: Actor | None = getattr(request, "actor", None)
    if actor is None:
        raise Http404("You are not a member of any tenant.")
    try:
        with transaction.atomic():
            member_leave(actor=actor)
    except ValidationError as exc:
        return _mine(request, error=" ".join(exc.messages), status=400)
    except PermissionDenied as exc:
        return _mine(request, error=str(exc), status=403)
    request.session.pop(SESSION_TENANT_KEY, None)
    messages.success(request, f"You left {actor.tenant.name}.")
    return redirect("tenants:mine")


# --- invitations ------------------------------------------------------------------------


def _refused(request: HttpRequest, exc: InvitationRefused) -> HttpResponse:
    return render(
        request, "tenants/invitation_error.html", {"message": exc.message}, status=exc.status
    )


def _invitation_page(
    request: HttpRequest,
    invitation: Invitation,
    *,
    errors: dict[str, list[str]] | None = None,
    username: str = "",
    status: int = 200,
) -> HttpResponse:
    user: Any = request.user
    context: dict[str, Any] = {
        "invitation": invitation,
        "tenant": invitation.tenant,
        "role": Role(invitation.role).label,
        "errors": errors or {},
        "username": username,
    }
    if user.is_authenticated:
        context["email_matches"] = (user.email or "").strip().lower() == (
            invitation.email.strip().lower()
        )
        context["already_member"] = any(
            m.tenant_id == invitation.tenant_id for m in memberships_of_user(user=user)
        )
    return render(request, "tenants/invitation.html", context, status=status)


@never_cache
@require_http_methods(["GET", "POST"])
def invitation_page(request: HttpRequest, token: str) -> HttpResponse:
    """GET: which tenant, which role. POST: accept, signed in, or signing up here."""
    try:
        invitation = invitation_by_token(token=token)
    except InvitationRefused as exc:
        return _refused(request, exc)
    if request.method != "POST":
        return _invitation_page(request, invitation)

    user: Any = request.user
    username = request.POST.get("username", "").strip()
    try:
        with transaction.atomic():
            if user.is_authenticated:
                membership = invitation_accept(token=token, user=user)
            else:
                password = request.POST.get("password1", "")
                if password != request.POST.get("password2", ""):
                    raise ValidationError({"password2": "The two passwords differ."})
                user, membership = invitation_signup(
                    token=token, username=username, password=password
                )
    except InvitationRefused as exc:
        return _refused(request, exc)
    except ValidationError as exc:
        return _invitation_page(
            request, invitation, errors=_errors(exc), username=username, status=400
        )
    if not request.user.is_authenticated:
        login(request, user, backend=SIGNUP_AUTH_BACKEND)
    request.session[SESSION_TENANT_KEY] = str(membership.tenant_id)
    return redirect("chat:home")
