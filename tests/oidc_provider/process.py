"""Start the test OpenID provider in a subprocess on a free port, wait until it serves
its discovery document, stop it on exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from inference.local_process import free_port

ROOT = Path(__file__).resolve().parents[2]
# Parley's variables mean nothing to the provider: it gets none of them.
_STRIP = ("DJANGO_SETTINGS_MODULE", "DATABASE_URL", "DATABASE_OWNER_URL", "REDIS_URL")


class OIDCProvider:
    """`with OIDCProvider(tmp_dir=..., clients=[...], users=[...]) as provider: ...`"""

    def __init__(
        self, *, tmp_dir: Path, clients: list[dict[str, Any]], users: list[dict[str, Any]]
    ) -> None:
        self.tmp_dir = tmp_dir
        self.config = {"clients": clients, "users": users}
        self.port = free_port()
        self.log_path = tmp_dir / "provider.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/o"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def __enter__(self) -> OIDCProvider:
        env = {k: v for k, v in os.environ.items() if k not in _STRIP}
        env["OIDC_PROVIDER_CONFIG"] = json.dumps(self.config)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.oidc_provider.serve",
                    "--port",
                    str(self.port),
                    "--db",
                    str(self.tmp_dir / "provider.sqlite3"),
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 90
        discovery = f"{self.issuer}/.well-known/openid-configuration"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the test OpenID provider exited:\n{self.log()}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the test OpenID provider did not start:\n{self.log()}")
            try:
                if httpx.get(discovery, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
