#!/usr/bin/env bash
# Builds the base image of LabCloud's service images without an image registry: a
# Debian bookworm root file system made by mmdebstrap from Debian's package archive
# (python3 with venv and apt, so the Dockerfiles can install into it), imported into
# the local Docker engine. The service and PostgreSQL Dockerfiles take it as
# `--build-arg BASE=<tag>`; a machine that reaches a registry does not need it.
#
#   scripts/build-base-image.sh [--rebuild] [TAG]      (default TAG: labcloud/base:bookworm)
#
# An existing TAG is kept unless --rebuild is given. MIRROR and SECURITY_MIRROR override
# Debian's archives (http://deb.debian.org/debian, http://deb.debian.org/debian-security). Needs root (mmdebstrap) and `mmdebstrap`
# (scripts/ensure-deps.sh --deploy installs it).
set -euo pipefail

rebuild=0
tag=labcloud/base:bookworm
for arg in "$@"; do
  case "$arg" in
    --rebuild) rebuild=1 ;;
    -*) echo "unknown option: $arg" >&2; exit 2 ;;
    *) tag=$arg ;;
  esac
done
mirror=${MIRROR:-http://deb.debian.org/debian}
security_mirror=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}

if [ "$rebuild" -eq 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "$tag already present (--rebuild to make it again)"
  exit 0
fi
command -v mmdebstrap >/dev/null 2>&1 || {
  echo "mmdebstrap is missing: apt-get install mmdebstrap (or scripts/ensure-deps.sh --deploy)" >&2
  exit 1
}

# --variant=apt: the essential packages plus apt, so a Dockerfile can add packages
# (PostgreSQL) from the same archive. Documentation, manual pages and translations are
# left out: nobody reads them in a service container, and they are a fifth of the size.
# The security suite keeps the base's packages as current as a public image's.
mmdebstrap --variant=apt --quiet \
  --include=python3,python3-venv,ca-certificates \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  --aptopt='APT::Install-Recommends "false"' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  bookworm - \
  "deb $mirror bookworm main" \
  "deb $mirror bookworm-updates main" \
  "deb $security_mirror bookworm-security main" \
  | docker import \
      --change 'ENV LANG=C.UTF-8' \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["/bin/bash"]' \
      --message "Debian bookworm from $mirror (scripts/build-base-image.sh)" \
      - "$tag" >/dev/null
echo "built $tag ($(docker image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
