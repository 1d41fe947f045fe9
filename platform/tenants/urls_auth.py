"""Pages of tenants and identity (urls_auth)."""

from django.urls import path  # noqa: F401

urlpatterns: list = []
