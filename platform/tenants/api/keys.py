"""keys API."""

from ninja import Router

router = Router(tags=["keys"])
