"""The provider's claims: email and email_verified per test user, and per-user
overrides of ID token claims (a wrong audience, nonce, issuer or expiry), so the tests
get tokens really signed by the provider that Parley must still refuse."""

from __future__ import annotations

import json
import os
from typing import Any

from oauth2_provider.oauth2_validators import OAuth2Validator


def _users() -> dict[str, dict[str, Any]]:
    config = json.loads(os.environ.get("OIDC_PROVIDER_CONFIG", "{}"))
    return {user["username"]: user for user in config.get("users", [])}


USERS = _users()


class ClaimsValidator(OAuth2Validator):
    def get_additional_claims(self, request):
        spec = USERS.get(request.user.username, {})
        return {
            "email": request.user.email,
            "email_verified": spec.get("email_verified", True),
            "name": spec.get("name", request.user.username),
        }

    def get_id_token_dictionary(self, token, token_handler, request):
        claims, expiration_time = super().get_id_token_dictionary(token, token_handler, request)
        claims.update(USERS.get(request.user.username, {}).get("id_token_overrides", {}))
        return claims, expiration_time
