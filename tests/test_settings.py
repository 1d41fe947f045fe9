"""Settings come from the environment through one reader; bad values stop start-up
with a message naming the variable. Each case runs manage.py in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARLEY_VARS = (
    "DATABASE_URL",
    "REDIS_URL",
    "DJANGO_SETTINGS_MODULE",
    "DJANGO_SECRET_KEY",
    "DJANGO_ALLOWED_HOSTS",
    "PARLEY_BACKENDS",
    "PARLEY_MAX_TOKENS",
    "DJANGO_DEBUG",
)
PRODUCTION = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/parley",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "DJANGO_SECRET_KEY": "k3y-" + "".join(chr(97 + (i * 7) % 26) for i in range(60)),
    "DJANGO_ALLOWED_HOSTS": "chat.example.com",
    "PARLEY_BACKENDS": "http://vllm-0:8000,http://vllm-1:8000",
}


def manage(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in PARLEY_VARS}
    clean["PARLEY_VAR_DIR"] = str(tmp_path / "var")
    clean.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_embedded_mode_needs_no_configuration(tmp_path):
    result = manage("check", env={}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout
    assert (tmp_path / "var" / "secret_key").exists()


def test_embedded_mode_uses_sqlite_and_in_memory_layers(tmp_path):
    code = (
        "from django.conf import settings as s;"
        "print(s.PARLEY_MODE, s.DATABASES['default']['ENGINE'],"
        " s.CHANNEL_LAYERS['default']['BACKEND'], s.PARLEY_TASKS_IN_PROCESS, s.REDIS_URL)"
    )
    result = manage("shell", "-c", code, env={}, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].split() == [
        "embedded",
        "django.db.backends.sqlite3",
        "channels.layers.InMemoryChannelLayer",
        "True",
        "None",
    ]


def test_production_mode_uses_postgres_and_redis(tmp_path):
    code = (
        "from django.conf import settings as s;"
        "print(s.PARLEY_MODE, s.DATABASES['default']['ENGINE'],"
        " s.CHANNEL_LAYERS['default']['BACKEND'], s.PARLEY_TASKS_IN_PROCESS, s.CELERY_BROKER_URL)"
    )
    result = manage("shell", "-c", code, env=PRODUCTION, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].split() == [
        "production",
        "django.db.backends.postgresql",
        "channels_redis.core.RedisChannelLayer",
        "False",
        "redis://127.0.0.1:6379/0",
    ]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DATABASE_URL": PRODUCTION["DATABASE_URL"]}, "REDIS_URL"),
        ({"REDIS_URL": PRODUCTION["REDIS_URL"]}, "DATABASE_URL"),
        ({**PRODUCTION, "DJANGO_SECRET_KEY": ""}, "DJANGO_SECRET_KEY"),
        ({**PRODUCTION, "DATABASE_URL": "mysql://root@localhost/parley"}, "DATABASE_URL"),
        ({**PRODUCTION, "DATABASE_URL": "postgres://localhost"}, "DATABASE_URL"),
        ({**PRODUCTION, "REDIS_URL": "http://localhost:6379"}, "REDIS_URL"),
        ({**PRODUCTION, "DJANGO_ALLOWED_HOSTS": ""}, "DJANGO_ALLOWED_HOSTS"),
        ({**PRODUCTION, "PARLEY_BACKENDS": "vllm-0:8000"}, "PARLEY_BACKENDS"),
        ({"PARLEY_MAX_TOKENS": "lots"}, "PARLEY_MAX_TOKENS"),
        ({"PARLEY_MAX_TOKENS": "0"}, "PARLEY_MAX_TOKENS"),
        ({"PARLEY_MAX_TOKENS": str(2**31)}, "PARLEY_MAX_TOKENS"),
        ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG"),
    ],
)
def test_bad_or_missing_values_stop_start_up_naming_the_variable(env, named, tmp_path):
    result = manage("check", env=env, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert named in last_line, last_line


@pytest.mark.parametrize("missing", ["PARLEY_BACKENDS", "DATABASE_URL"])
def test_production_settings_require_their_values(missing, tmp_path):
    env = {**PRODUCTION, "DJANGO_SETTINGS_MODULE": "config.settings.production", missing: ""}
    result = manage("check", env=env, tmp_path=tmp_path)
    assert result.returncode != 0
    assert missing in result.stderr.strip().splitlines()[-1]


def test_check_deploy_with_production_settings_gives_no_warnings(tmp_path):
    env = {**PRODUCTION, "DJANGO_SETTINGS_MODULE": "config.settings.production"}
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=env, tmp_path=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_import_platform_is_the_standard_library(tmp_path):
    code = (
        "import sys, platform; sys.path.insert(0, 'platform');"
        "import config, django; import platform as p;"
        "print(p.__file__, callable(p.python_version))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    path, has_version = result.stdout.split()
    assert not path.startswith(str(ROOT)) and path.endswith("platform.py")
    assert has_version == "True"
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_links_name_the_address_served_unless_a_public_url_is_set():
    """Invitation links and password resets say where people reach this server: the
    address `serve` listens on (`make run PORT=8011` gives :8011) unless
    PARLEY_PUBLIC_URL says otherwise (a proxy in front)."""
    import socket

    from chat.management.commands.serve import served_url

    assert served_url("127.0.0.1", 8011) == "http://127.0.0.1:8011"
    assert served_url("::1", 9000) == "http://[::1]:9000"
    assert served_url("0.0.0.0", 8000) == f"http://{socket.getfqdn()}:8000"
