from django.apps import AppConfig


class SandboxConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "sandbox"

    def ready(self) -> None:
        import sandbox.checks  # noqa: F401 - registers the sandbox's system check
        from sandbox.lifecycle import artifacts_export, files_delete_for_tenant
        from tenants.lifecycle import register_export_section, tenant_deleted

        tenant_deleted.connect(files_delete_for_tenant, dispatch_uid="sandbox.files_delete")
        register_export_section("artifacts", artifacts_export)
