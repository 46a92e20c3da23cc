#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the Optuna multi-worker tests, and print its URL.
#
#   .ci/postgres.sh            -> prints postgresql://embtable:embtable@127.0.0.1:PORT/embtable_test
#
# - Installs Debian's `postgresql` package with apt-get when no server binaries are found (CI images).
# - Creates a fresh cluster under ${EMBTABLE_PG_DIR:-/tmp/embtable-pg} (as the `postgres` user when run as
#   root: PostgreSQL refuses to run as root), listening on 127.0.0.1 only, and a user and database.
# - Writes the URL to .ci/postgres_url (the tests read it there, or from EMBTABLE_TEST_POSTGRES_URL).
#   It exports nothing. Re-running it reuses a server that is still up.
# - Stop the server with:  .ci/postgres.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."

PGDIR="${EMBTABLE_PG_DIR:-/tmp/embtable-pg}"
PORT="${EMBTABLE_PG_PORT:-54329}"
URL_FILE=.ci/postgres_url
URL="postgresql+psycopg2://embtable:embtable@127.0.0.1:${PORT}/embtable_test"

find_bindir() {
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir
        return
    fi
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ]; then echo "$d"; return; fi
    done
}

BINDIR="$(find_bindir || true)"
if [ -z "$BINDIR" ]; then
    echo "postgres.sh: no PostgreSQL server found; installing Debian's postgresql" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >&2
    BINDIR="$(find_bindir)"
fi

# Run server commands as `postgres` when we are root (initdb and postgres refuse root).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

if [ "${1:-}" = "stop" ]; then
    as_pg "$BINDIR/pg_ctl" -D "$PGDIR/data" -m fast stop >&2 || true
    rm -f "$URL_FILE"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    mkdir -p "$PGDIR"
    chown postgres "$PGDIR"
else
    mkdir -p "$PGDIR"
fi

if ! as_pg "$BINDIR/pg_ctl" -D "$PGDIR/data" status >/dev/null 2>&1; then
    if [ ! -f "$PGDIR/data/PG_VERSION" ]; then
        as_pg "$BINDIR/initdb" -D "$PGDIR/data" -U postgres --auth=trust -E UTF8 >"$PGDIR/initdb.log" 2>&1 \
            || { cat "$PGDIR/initdb.log" >&2; exit 1; }
    fi
    # Loopback only; the socket goes in the cluster folder (no need for /var/run/postgresql).
    as_pg "$BINDIR/pg_ctl" -D "$PGDIR/data" -l "$PGDIR/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -c port=$PORT -k $PGDIR -c max_connections=100" start >&2 \
        || { cat "$PGDIR/server.log" >&2; exit 1; }
fi

PSQL=("$BINDIR/psql" -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
if [ "$(as_pg "${PSQL[@]}" -d postgres -c "SELECT 1 FROM pg_roles WHERE rolname='embtable'")" != "1" ]; then
    as_pg "${PSQL[@]}" -d postgres -c "CREATE ROLE embtable LOGIN PASSWORD 'embtable'" >&2
fi
if [ "$(as_pg "${PSQL[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname='embtable_test'")" != "1" ]; then
    as_pg "${PSQL[@]}" -d postgres -c "CREATE DATABASE embtable_test OWNER embtable" >&2
fi

echo "$URL" > "$URL_FILE"
echo "$URL"
