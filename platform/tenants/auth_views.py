"""Sign-in pages: password login (throttled), password reset, and a tenant's OpenID
Connect single sign-on. The logic lives in tenants.services.login_throttle and
tenants.services.sso; these views carry it over HTTP.

The throttle itself is in the authentication backend, so it holds for every login
form; the forms here (the product's, and the Django admin's: tenants.admin) read the
username with the throttle's normalisation and say when an attempt was refused."""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.contrib.auth.forms import AuthenticationForm, UsernameField
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render, resolve_url
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from tenants.access import SESSION_TENANT_KEY
from tenants.services.login_throttle import (
    client_ip,
    login_refusal_of,
    login_throttle_reset,
    username_normalize,
)
from tenants.services.sso import SSOError, sso_login_finish, sso_login_start

SSO_SESSION_KEY = "parley_sso_pending"
_SLUG = re.compile(r"^[-a-z0-9_]{1,63}$")


def _safe_next(request: HttpRequest, value: str | None) -> str:
    if value and url_has_allowed_host_and_scheme(
        value, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return value
    return ""


# --- password login ----------------------------------------------------------------------


class LoginUsernameField(UsernameField):
    """The username as the throttle counts it (login_throttle.username_normalize)."""

    def to_python(self, value: Any) -> str:
        return username_normalize(forms.CharField.to_python(self, value))


class ThrottleMessageMixin:
    """A login form that, when the throttle refused the attempt, says so (and when to
    try again) instead of "wrong password"."""

    request: HttpRequest | None

    def clean(self) -> dict[str, Any]:
        try:
            return super().clean()  # type: ignore[misc]
        except ValidationError:
            refusal = login_refusal_of(self.request)
            if refusal is not None:
                raise ValidationError(refusal.message, code="throttled") from None
            raise


class LoginForm(ThrottleMessageMixin, AuthenticationForm):
    username = LoginUsernameField(widget=forms.TextInput(attrs={"autofocus": True}))


class AdminLoginForm(ThrottleMessageMixin, AdminAuthenticationForm):
    username = LoginUsernameField(widget=forms.TextInput(attrs={"autofocus": True}))


class LoginView(auth_views.LoginView):
    """Django's login; an attempt the throttle refused (a username or an address that
    failed too often lately, refused without checking the password) answers 429."""

    form_class = LoginForm

    def form_invalid(self, form: Any) -> HttpResponse:
        refusal = login_refusal_of(self.request)
        if refusal is None:
            return super().form_invalid(form)
        # An unbound form: the page shows the refusal, not "didn't match".
        unbound = self.form_class(self.request, initial={"username": form.data.get("username")})
        response = self.render_to_response(
            self.get_context_data(form=unbound, throttled=refusal.message), status=429
        )
        response["Retry-After"] = str(refusal.retry_after_s)
        return response


# --- password reset ------------------------------------------------------------------------


class PasswordResetView(auth_views.PasswordResetView):
    """Mails a reset link when the address belongs to an account with a password; the
    answer is the same either way (it reveals no accounts)."""

    email_template_name = "registration/password_reset_email.txt"
    subject_template_name = "registration/password_reset_subject.txt"

    def form_valid(self, form: Any) -> HttpResponse:
        # Links point at the public address, never at whatever Host the request named.
        self.extra_email_context = {"public_url": settings.PARLEY_PUBLIC_URL}
        return super().form_valid(form)


class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    """An invalid or expired link answers 400; a new password lifts a login lockout."""

    def render_to_response(self, context: dict[str, Any], **kwargs: Any) -> HttpResponse:
        if not context.get("validlink"):
            kwargs["status"] = 400
        return super().render_to_response(context, **kwargs)

    def form_valid(self, form: Any) -> HttpResponse:
        response = super().form_valid(form)
        login_throttle_reset(username=form.user.get_username())
        return response


# --- single sign-on ------------------------------------------------------------------------


def _sso_error(request: HttpRequest, exc: SSOError) -> HttpResponse:
    return render(
        request, "registration/sso_error.html", {"message": exc.message}, status=exc.status
    )


@never_cache
@require_GET
def sso_start(request: HttpRequest) -> HttpResponse:
    """The login page's SSO form: the company's slug. Answers a page that moves on to
    /sso/<slug>/login/ by itself (a Refresh, with a link): a redirect chain from the
    form's submission to the identity provider would break CSP `form-action 'self'`."""
    slug = str(request.GET.get("tenant", "")).strip().lower()
    if not _SLUG.match(slug):
        return _sso_error(
            request,
            SSOError(
                "Type your company's name on Parley (letters, digits and dashes, as in "
                "acme-corp) to sign in with its single sign-on.",
                status=400,
            ),
        )
    url = reverse("sso_login", args=[slug])
    next_url = _safe_next(request, request.GET.get("next"))
    if next_url:
        url += "?" + urlencode({"next": next_url})
    response = render(request, "registration/sso_continue.html", {"url": url, "slug": slug})
    response["Refresh"] = f"0; url={url}"
    return response


@never_cache
@require_GET
def sso_login(request: HttpRequest, slug: str) -> HttpResponse:
    """Send the browser to the tenant's identity provider."""
    redirect_uri = request.build_absolute_uri(reverse("sso_callback"))
    try:
        start = sso_login_start(slug=slug, redirect_uri=redirect_uri)
    except SSOError as exc:
        return _sso_error(request, exc)
    request.session[SSO_SESSION_KEY] = {
        **start.pending,
        "next": _safe_next(request, request.GET.get("next")),
    }
    return HttpResponseRedirect(start.authorization_url)


@never_cache
@require_GET
def sso_callback(request: HttpRequest) -> HttpResponse:
    """The identity provider's answer: verify it, sign the person in to the tenant."""
    pending = request.session.pop(SSO_SESSION_KEY, None)  # one use, whatever the outcome
    try:
        result = sso_login_finish(pending=pending, params=request.GET, ip=client_ip(request))
    except SSOError as exc:
        return _sso_error(request, exc)
    login(request, result.user, backend="django.contrib.auth.backends.ModelBackend")
    request.session[SESSION_TENANT_KEY] = str(result.tenant.id)
    next_url = _safe_next(request, pending.get("next")) if isinstance(pending, dict) else ""
    return HttpResponseRedirect(next_url or resolve_url(settings.LOGIN_REDIRECT_URL))
