#!/bin/bash
# Starts PostgreSQL 15 in a container, initialising the data folder on the
# first start, as the official image does:
#   POSTGRES_USER (default postgres): the superuser, who owns POSTGRES_DB
#   POSTGRES_DB (default: the user's name)
#   POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE: its password (required)
# Connections from other hosts log in with that password (scram-sha-256),
# replication included. Two more settings make a primary and its standby:
#   POSTGRES_SYNC_STANDBY=NAME  (primary) commits wait for the standby NAME
#   POSTGRES_PRIMARY=HOST       (standby) on an empty folder, copy HOST's data
#                               with pg_basebackup and follow it, under the
#                               name POSTGRES_STANDBY_NAME (default standby)
# Arguments are passed to `postgres`.
set -euo pipefail
bin=/usr/lib/postgresql/15/bin
export PGDATA=${PGDATA:-/var/lib/postgresql/data}

if [ "$(id -u)" = 0 ]; then
  install -d -o postgres -g postgres -m 0700 "$PGDATA"
  install -d -o postgres -g postgres /var/run/postgresql
  exec runuser -u postgres -- "$0" "$@"
fi

user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
password=${POSTGRES_PASSWORD:-}
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
  password=$(cat "$POSTGRES_PASSWORD_FILE")
fi
if [ -z "$password" ]; then
  echo "postgres: set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE" >&2
  exit 1
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -n "${POSTGRES_PRIMARY:-}" ]; then
    echo "postgres: copying $POSTGRES_PRIMARY's data for a standby"
    until PGPASSWORD=$password "$bin/pg_basebackup" -h "$POSTGRES_PRIMARY" -U "$user" \
        -D "$PGDATA" -X stream -R; do
      rm -rf "${PGDATA:?}"/*
      echo "postgres: $POSTGRES_PRIMARY not ready, trying again"
      sleep 1
    done
    printf "primary_conninfo = 'host=%s user=%s password=%s application_name=%s'\n" \
      "$POSTGRES_PRIMARY" "$user" "$password" "${POSTGRES_STANDBY_NAME:-standby}" \
      >>"$PGDATA/postgresql.auto.conf"
    # The primary's settings came with its data: once promoted, this one
    # waits for no standby of its own (an operator adds one later).
    echo "synchronous_standby_names = ''" >>"$PGDATA/postgresql.auto.conf"
  else
    echo "postgres: initialising $PGDATA"
    pwfile=$(mktemp)
    printf '%s\n' "$password" >"$pwfile"
    "$bin/initdb" -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 \
      --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    {
      echo "host all all all scram-sha-256"
      echo "host replication all all scram-sha-256"
    } >>"$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
    if [ "$db" != postgres ]; then
      echo "CREATE DATABASE \"$db\" OWNER \"$user\";" |
        "$bin/postgres" --single -D "$PGDATA" postgres >/dev/null
    fi
    # Only now: a commit in single-user mode would wait for the standby.
    if [ -n "${POSTGRES_SYNC_STANDBY:-}" ]; then
      echo "synchronous_standby_names = '$POSTGRES_SYNC_STANDBY'" >>"$PGDATA/postgresql.conf"
    fi
  fi
fi
echo "postgres: starting"
exec "$bin/postgres" -D "$PGDATA" "$@"
