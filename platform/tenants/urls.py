"""Pages of tenants and identity (urls)."""

from django.urls import path  # noqa: F401

urlpatterns: list = []
