#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer for the test suite.
#
# Prints `export DATABASE_URL=... REDIS_URL=...` on stdout for `eval`; talks on stderr.
# A variable already set is trusted as it is. Otherwise the standard local ports are
# tried; a server that is down is started from the installed binaries (Debian's
# pg_ctlcluster, or initdb/pg_ctl into var/, and redis-server); with no binaries,
# it stops with a message saying what to install.
set -euo pipefail
cd "$(dirname "$0")/.."
VAR="$PWD/var/test-services"
say() { echo "services: $*" >&2; }
up() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
wait_up() { for _ in $(seq 1 60); do up "$1" "$2" && return 0; sleep 0.5; done; return 1; }

PG_PORT="${PARLEY_TEST_PG_PORT:-5432}"
REDIS_PORT="${PARLEY_TEST_REDIS_PORT:-6379}"

start_postgres() {
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ] && [ -n "$(ls -A /etc/postgresql 2>/dev/null)" ]; then
    local version
    version="$(ls /etc/postgresql | sort -V | tail -1)"
    say "starting PostgreSQL $version (pg_ctlcluster)"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
    wait_up 127.0.0.1 "$PG_PORT" && return 0
  fi
  local bindir initdb
  initdb="$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)"
  if [ -z "$initdb" ]; then
    say "PostgreSQL is not reachable at 127.0.0.1:$PG_PORT and no server is installed."
    say "Install it (Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql)"
    say "or set DATABASE_URL to a PostgreSQL you can create databases on."
    exit 1
  fi
  bindir="$(dirname "$initdb")"
  local run=()
  mkdir -p "$VAR"
  if [ "$(id -u)" = 0 ]; then
    # PostgreSQL refuses to run as root.
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    chown postgres "$VAR"
    run=(runuser -u postgres --)
  fi
  if [ ! -f "$VAR/pg/PG_VERSION" ]; then
    say "initialising a PostgreSQL cluster in $VAR/pg"
    "${run[@]}" "$bindir/initdb" -D "$VAR/pg" -U postgres --auth=trust >&2
  fi
  say "starting PostgreSQL from $bindir on port $PG_PORT"
  "${run[@]}" "$bindir/pg_ctl" -D "$VAR/pg" -l "$VAR/pg.log" -o "-p $PG_PORT -k $VAR -c listen_addresses=127.0.0.1" -w start >&2
  wait_up 127.0.0.1 "$PG_PORT"
}

start_redis() {
  if ! command -v redis-server >/dev/null; then
    say "Redis is not reachable at 127.0.0.1:$REDIS_PORT and redis-server is not installed."
    say "Install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)"
    say "or set REDIS_URL."
    exit 1
  fi
  say "starting redis-server on port $REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >&2
  wait_up 127.0.0.1 "$REDIS_PORT"
}

if [ -z "${DATABASE_URL:-}" ]; then
  up 127.0.0.1 "$PG_PORT" || start_postgres || { say "PostgreSQL did not come up"; exit 1; }
  DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/parley"
  # The suite makes its own test database; `parley` itself is what manage.py commands
  # outside pytest (the migrations check) connect to, so it should exist too.
  if command -v psql >/dev/null && ! psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = 'parley'" 2>/dev/null | grep -q 1; then
    say "creating the database parley"
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "CREATE DATABASE parley" >&2 || true
  fi
fi
if [ -z "${REDIS_URL:-}" ]; then
  up 127.0.0.1 "$REDIS_PORT" || start_redis || { say "Redis did not come up"; exit 1; }
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/15"
fi
echo "export DATABASE_URL='$DATABASE_URL' REDIS_URL='$REDIS_URL'"
