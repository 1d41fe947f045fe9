from django.apps import AppConfig


class ChatConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chat"

    def ready(self) -> None:
        from chat.lifecycle import conversations_export, runs_cancel_for_tenant
        from tenants.lifecycle import register_export_section, tenant_suspended

        tenant_suspended.connect(runs_cancel_for_tenant, dispatch_uid="chat.runs_cancel")
        register_export_section("conversations", conversations_export)
