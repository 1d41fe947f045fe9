from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class GatewayConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "gateway"
    verbose_name = "OpenAI-compatible API"

    def ready(self) -> None:
        from gateway.services import auth_cache_clear
        from tenants.models import ApiKey, Membership, Plan, Tenant

        # A revoked key, a suspended tenant, a changed plan, a key's creator given
        # another role or removed (a key acts with its creator's current role):
        # forget remembered callers.
        for model in (ApiKey, Tenant, Plan, Membership):
            post_save.connect(auth_cache_clear, sender=model, dispatch_uid=f"gateway-{model}")
            post_delete.connect(auth_cache_clear, sender=model, dispatch_uid=f"gateway-del-{model}")
