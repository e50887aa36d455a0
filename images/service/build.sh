#!/usr/bin/env bash
# Builds LabCloud's service image and its PostgreSQL image on the local Docker engine.
#
#   images/service/build.sh            from the public bases (a connected machine)
#   images/service/build.sh --offline  from a base made from Debian's archive
#                                      (scripts/build-base-image.sh), with the locked
#                                      wheels downloaded by this host's pip: no registry
#
# It also builds the demo tool's image (labcloud/demo:latest) when it is missing.
# Tags: SERVICE_IMAGE (labcloud/service:latest), POSTGRES_IMAGE (labcloud/postgres:15);
# BASE_IMAGE is the offline base (labcloud/base:bookworm), kept between runs.
# The compose file uses the same tags (deploy/compose/docker-compose.yml).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

offline=0
for arg in "$@"; do
  case "$arg" in
    --offline) offline=1 ;;
    *) echo "unknown option: $arg" >&2; exit 2 ;;
  esac
done
service_image=${SERVICE_IMAGE:-labcloud/service:latest}
postgres_image=${POSTGRES_IMAGE:-labcloud/postgres:15}
base_image=${BASE_IMAGE:-labcloud/base:bookworm}

args=()
pg_args=()
if [ "$offline" -eq 1 ]; then
  scripts/build-base-image.sh "$base_image"
  pg_args=(--build-arg "BASE=$base_image")
fi
# PostgreSQL's image waits mostly on Debian's archive: built beside the service image.
docker build --quiet "${pg_args[@]}" -t "$postgres_image" images/service/postgres >/dev/null &
postgres_build=$!

if [ "$offline" -eq 1 ]; then
  # The runtime requirements with their locked hashes, and the build backend, as wheels
  # for this platform (the image's Python is the same 3.11 on Linux x86_64/glibc).
  wheels=images/service/wheels
  requirements=$(mktemp)
  trap 'rm -f "$requirements"' EXIT
  python3 images/service/requirements_from_lock.py poetry.lock >"$requirements"
  pip=(poetry run python -m pip)
  "${pip[@]}" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --require-hashes -r "$requirements" -d "$wheels"
  "${pip[@]}" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    'poetry-core>=2.0,<3' -d "$wheels"
  args=(--build-arg "BASE=$base_image" --build-arg PIP_NO_INDEX=1)
fi

docker build --quiet "${args[@]}" -f images/service/Dockerfile -t "$service_image" . >/dev/null
echo "built $service_image"
wait "$postgres_build" || { echo "building $postgres_image failed" >&2; exit 1; }
echo "built $postgres_image"
# The shipped catalog's demo tool, which the README's example session runs: built as
# `labcloud up` builds it (public busybox, or the host's static busybox offline).
poetry run labcloud demo-image
