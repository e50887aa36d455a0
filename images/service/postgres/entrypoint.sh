#!/bin/sh
# Starts PostgreSQL on $PGDATA; on the first start (an empty folder) creates the
# cluster with POSTGRES_USER as superuser, password authentication for every network
# client, and the databases POSTGRES_DB and POSTGRES_EXTRA_DBS.
set -eu

: "${PGDATA:?PGDATA is not set}"
user=${POSTGRES_USER:-postgres}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "labcloud-postgres: POSTGRES_PASSWORD is required to create the cluster" >&2
    exit 2
  fi
  pwfile=$(mktemp)
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb --username="$user" --pwfile="$pwfile" --auth-local=trust \
    --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA" >/dev/null
  rm -f "$pwfile"
  # Clients come from other containers: listen everywhere and ask them all for the
  # password. Local (socket) connections inside this container stay trusted, for
  # pg_dump and psql run through `docker exec`.
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.auto.conf"
  # Databases are made by a server listening on the socket only, so no client can
  # reach it half set up.
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  for db in ${POSTGRES_DB:-} ${POSTGRES_EXTRA_DBS:-}; do
    if [ "$db" != postgres ]; then
      echo "labcloud-postgres: creating database $db"
      createdb --username="$user" --owner="$user" "$db"
    fi
  done
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi

exec postgres -D "$PGDATA" "$@"
