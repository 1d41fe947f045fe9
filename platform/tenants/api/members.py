"""Members, roles and invitations."""

from ninja import Router

router = Router(tags=["members"])
