"""Sign-in pages: password login (throttled), password reset, and a tenant's OpenID
Connect single sign-on. The logic lives in tenants.services.login_throttle and
tenants.services.sso; these views carry it over HTTP."""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth import views as auth_views
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render, resolve_url
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme, urlencode
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from tenants.access import SESSION_TENANT_KEY
from tenants.services.login_throttle import (
    login_throttle_check,
    login_throttle_failure,
    login_throttle_reset,
    login_throttle_success,
)
from tenants.services.sso import SSOError, sso_login_finish, sso_login_start

SSO_SESSION_KEY = "parley_sso_pending"
_SLUG = re.compile(r"^[-a-z0-9_]{1,63}$")


def client_ip(request: HttpRequest) -> str | None:
    # Behind a proxy, the ASGI server must put the client's address here
    # (uvicorn --forwarded-allow-ips): else every client shares the proxy's count.
    return request.META.get("REMOTE_ADDR") or None


def _safe_next(request: HttpRequest, value: str | None) -> str:
    if value and url_has_allowed_host_and_scheme(
        value, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return value
    return ""


# --- password login ----------------------------------------------------------------------


class LoginView(auth_views.LoginView):
    """Django's login, refusing attempts (429, without checking the password) for a
    username or an address that failed too often lately."""

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        username = str(request.POST.get("username", ""))[:254]
        ip = client_ip(request)
        refusal = login_throttle_check(username=username, ip=ip)
        if refusal is not None:
            # An unbound form: validating it would check the password.
            form = self.form_class(request, initial={"username": username})
            response = self.render_to_response(
                self.get_context_data(form=form, throttled=refusal.message), status=429
            )
            response["Retry-After"] = str(refusal.retry_after_s)
            return response
        form = self.get_form()
        if form.is_valid():
            login_throttle_success(username=username)
            return self.form_valid(form)
        if username and request.POST.get("password"):
            login_throttle_failure(username=username, ip=ip)
        return self.form_invalid(form)


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
