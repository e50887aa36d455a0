#!/usr/bin/env bash
# Installs and starts what LabCloud needs on this machine, idempotently:
#   poetry and the project's dependencies, a running Docker engine, a static busybox
#   (to build the demo image without a registry) and, with --postgres, PostgreSQL
#   and what the deployment tests use (mmdebstrap, docker-compose; --deploy alone
#   installs just these, for building the service images and running the compose file).
# Installing system packages needs root (or sudo); anything already present is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

want_postgres=0
want_deploy=0
for arg in "$@"; do
  case "$arg" in
    --postgres) want_postgres=1; want_deploy=1 ;;
    --deploy) want_deploy=1 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# Python dependencies. Poetry goes into a virtual environment of its own (Debian 12
# refuses `pip install` into the system's Python), linked onto PATH.
if ! command -v poetry >/dev/null 2>&1; then
  log "installing poetry"
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt_install python3-venv
  fi
  as_root python3 -m venv /opt/poetry
  as_root /opt/poetry/bin/pip install --quiet poetry
  as_root ln -sf /opt/poetry/bin/poetry /usr/local/bin/poetry
fi
log "installing Python dependencies (poetry install)"
poetry install --quiet

# The `labcloud` command in every shell and folder, as the README writes it: a
# launcher on PATH that runs this checkout's environment. (`poetry run labcloud`
# works only inside the checkout; `labcloud runner` and `labcloud admin` are meant
# to be run from anywhere.) A `labcloud` that is not our launcher is left alone.
venv=$(poetry env info --path)
launcher=/usr/local/bin/labcloud
marker="# LabCloud launcher, written by scripts/ensure-deps.sh"
if [ -e "$launcher" ] && ! grep -q "^$marker" "$launcher"; then
  echo "warning: $launcher is not LabCloud's launcher; left alone (use: poetry run labcloud)" >&2
else
  printf '#!/bin/sh\n%s of %s\nexec "%s/bin/labcloud" "$@"\n' "$marker" "$PWD" "$venv" \
    | as_root tee "$launcher.tmp" >/dev/null
  as_root chmod 755 "$launcher.tmp"
  as_root mv "$launcher.tmp" "$launcher"
fi

# curl: the README's example session talks to the API with it.
command -v curl >/dev/null 2>&1 || apt_install curl

# Docker engine: the runner starts real containers.
if ! docker info >/dev/null 2>&1; then
  if ! command -v dockerd >/dev/null 2>&1; then
    log "installing the Docker engine (docker.io)"
    apt_install docker.io
  fi
  if ! docker info >/dev/null 2>&1; then
    log "starting dockerd"
    as_root sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  fi
  docker info >/dev/null 2>&1 || { echo "the Docker engine did not start: see /var/log/dockerd.log" >&2; exit 1; }
fi

# A static busybox lets the demo image build on a machine that reaches no registry.
bb=$(command -v busybox || true)
if [ -z "$bb" ] || ldd "$bb" >/dev/null 2>&1; then  # ldd fails on static binaries
  log "installing busybox-static"
  apt_install busybox-static
fi

if [ "$want_postgres" -eq 1 ]; then
  # The zip tests check archives with Info-ZIP, as desktop tools read them.
  command -v unzip >/dev/null 2>&1 || apt_install unzip
  if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
      log "installing PostgreSQL"
      apt_install postgresql
    fi
    log "starting PostgreSQL"
    version=$(ls /usr/lib/postgresql | sort -n | tail -1)
    if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d "/etc/postgresql/$version/main" ]; then
      as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    fi
    if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
      # No packaged cluster: a throwaway one with trust auth, for tests only.
      data=/var/tmp/labcloud-pg
      as_root mkdir -p "$data" && as_root chown postgres "$data"
      as_root su postgres -c "/usr/lib/postgresql/$version/bin/initdb -A trust -D $data/db >/dev/null" || true
      as_root su postgres -c "/usr/lib/postgresql/$version/bin/pg_ctl -D $data/db -o '-p 5432 -c fsync=off -k /tmp' -l $data/log -w start"
    fi
    pg_isready -h 127.0.0.1 -p 5432 >/dev/null || { echo "PostgreSQL did not start" >&2; exit 1; }
  fi
fi
if [ "$want_deploy" -eq 1 ]; then
  # The service images build offline on a base made from Debian's archive
  # (scripts/build-base-image.sh: mmdebstrap) and run with Debian's docker-compose 1.29
  # (deploy/compose); tests/deploy does both.
  command -v mmdebstrap >/dev/null 2>&1 || { log "installing mmdebstrap"; apt_install mmdebstrap; }
  command -v docker-compose >/dev/null 2>&1 || { log "installing docker-compose"; apt_install docker-compose; }
fi
log "dependencies ready"
