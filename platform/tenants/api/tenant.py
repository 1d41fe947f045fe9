"""tenant API."""

from ninja import Router

router = Router(tags=["tenant"])
