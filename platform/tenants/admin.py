from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from tenants.models import Membership, Tenant, User


@admin.register(User)
class ParleyUserAdmin(UserAdmin):
    pass


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "created_at"]
    search_fields = ["name", "slug"]
    inlines = [MembershipInline]
