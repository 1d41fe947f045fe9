from django.contrib import admin
from django.contrib.auth.admin import UserAdmin

from tenants.auth_views import AdminLoginForm
from tenants.models import AuditEvent, Membership, Plan, Tenant, User

# The admin's login is throttled like every password login (in the authentication
# backend: tenants.services.login_throttle); this form reads the username the same way
# and says when an attempt was refused.
admin.site.login_form = AdminLoginForm


@admin.register(User)
class ParleyUserAdmin(UserAdmin):
    list_display = ["username", "email", "is_operator", "is_staff", "is_active"]
    list_filter = ["is_operator", "is_staff", "is_active"]
    fieldsets = (
        *(UserAdmin.fieldsets or ()),
        ("Platform", {"fields": ("is_operator", "display_name")}),
    )


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "max_members",
        "monthly_token_budget",
        "requests_per_minute",
        "tokens_per_minute",
        "concurrent_runs",
        "fairness_weight",
    ]
    search_fields = ["name"]


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only: the audit log is append-only."""

    list_display = ["created_at", "tenant_id", "actor_label", "action", "target_label"]
    list_filter = ["action"]
    search_fields = ["actor_label", "action", "target_label"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    raw_id_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["name", "slug", "state", "plan", "created_at"]
    list_filter = ["state", "plan"]
    search_fields = ["name", "slug"]
    inlines = [MembershipInline]
