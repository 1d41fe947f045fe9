"""Run the test OpenID provider (in a subprocess of the tests):

    python -m tests.oidc_provider.serve --port 8123 --db /tmp/provider.sqlite3

Generates an RSA signing key, migrates its own SQLite database, registers the clients
and users of OIDC_PROVIDER_CONFIG (JSON: {"clients": [{"client_id", "client_secret",
"redirect_uris"}], "users": [{"username", "password", "email", "email_verified",
"id_token_overrides"}]}), then serves on 127.0.0.1 until terminated or its parent exits.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def _private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _register(config: dict) -> None:
    from django.contrib.auth.models import User
    from oauth2_provider.models import get_application_model

    application = get_application_model()
    for client in config.get("clients", []):
        application.objects.create(
            name=client["client_id"],
            client_id=client["client_id"],
            client_secret=client["client_secret"],
            client_type=application.CLIENT_CONFIDENTIAL,
            authorization_grant_type=application.GRANT_AUTHORIZATION_CODE,
            redirect_uris=" ".join(client["redirect_uris"]),
            algorithm=application.RS256_ALGORITHM,
            skip_authorization=True,
        )
    for user in config.get("users", []):
        User.objects.create_user(user["username"], user["email"], user["password"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", required=True)
    args = parser.parse_args()
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.oidc_provider.settings"
    os.environ["OIDC_PROVIDER_DB"] = args.db
    os.environ["OIDC_PROVIDER_ISSUER"] = f"http://127.0.0.1:{args.port}/o"
    os.environ["OIDC_PROVIDER_RSA_KEY"] = _private_key_pem()

    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    _register(json.loads(os.environ.get("OIDC_PROVIDER_CONFIG", "{}")))
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    call_command(
        "runserver",
        f"127.0.0.1:{args.port}",
        use_reloader=False,
        use_threading=True,
        skip_checks=True,
    )


if __name__ == "__main__":
    main()
