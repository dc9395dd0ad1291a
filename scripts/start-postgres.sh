#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers on 127.0.0.1:5432 with trust
# authentication and a database `test`, as the tests expect. Starts the
# machine's cluster if it is stopped; installs PostgreSQL with apt-get (as
# root) only when none is installed.
set -euo pipefail

host=127.0.0.1
port=5432

ready() { pg_isready -h "$host" -p "$port" -q 2>/dev/null; }

if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: PostgreSQL is not installed and installing it needs root" >&2
    exit 1
  fi
  echo "installing PostgreSQL with apt-get..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

if ! ready; then
  version="$(ls /etc/postgresql | sort -V | tail -n 1)"
  echo "starting PostgreSQL $version..."
  pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 30); do
    ready && break
    sleep 1
  done
fi
ready || { echo "error: PostgreSQL does not answer on $host:$port" >&2; exit 1; }

# Trust authentication and the `test` database, as on the development machines.
if ! psql -h "$host" -p "$port" -U postgres -d test -tAc 'select 1' >/dev/null 2>&1; then
  if [[ $(id -u) -eq 0 ]] && command -v runuser >/dev/null; then
    runuser -u postgres -- psql -p "$port" -tAc 'create database test' >/dev/null 2>&1 || true
  fi
  psql -h "$host" -p "$port" -U postgres -d test -tAc 'select 1' >/dev/null || {
    echo "error: cannot connect as postgres to database test on $host:$port (trust authentication expected)" >&2
    exit 1
  }
fi
echo "PostgreSQL ready on $host:$port"
