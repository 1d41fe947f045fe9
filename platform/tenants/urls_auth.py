"""Pages of tenants and identity (urls_auth): password reset and single sign-on. The
login and logout pages are routed in config.urls."""

from django.contrib.auth import views as auth_views
from django.urls import path

from tenants import auth_views as views

urlpatterns = [
    path("accounts/password_reset/", views.PasswordResetView.as_view(), name="password_reset"),
    path(
        "accounts/password_reset/done/",
        auth_views.PasswordResetDoneView.as_view(),
        name="password_reset_done",
    ),
    path(
        "accounts/reset/<uidb64>/<token>/",
        views.PasswordResetConfirmView.as_view(),
        name="password_reset_confirm",
    ),
    path(
        "accounts/reset/done/",
        auth_views.PasswordResetCompleteView.as_view(),
        name="password_reset_complete",
    ),
    path("sso/", views.sso_start, name="sso_start"),
    path("sso/callback/", views.sso_callback, name="sso_callback"),
    path("sso/<slug:slug>/login/", views.sso_login, name="sso_login"),
]
