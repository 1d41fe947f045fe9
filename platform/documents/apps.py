from django.apps import AppConfig


class DocumentsConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "documents"

    def ready(self) -> None:
        from documents.lifecycle import documents_export, files_delete_for_tenant
        from tenants.lifecycle import register_export_section, tenant_deleted

        tenant_deleted.connect(files_delete_for_tenant, dispatch_uid="documents.files_delete")
        register_export_section("documents", documents_export)
