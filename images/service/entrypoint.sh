#!/bin/sh
# Starts one LabCloud service in the container: the first argument, or
# LABCLOUD_SERVICE when there is none (user-api, worker-api, runner). Further
# arguments go to the service. The APIs listen on LABCLOUD_HOST (default: every
# interface, as a container must) and LABCLOUD_PORT (default 8000 and 8001).
set -eu

service=${LABCLOUD_SERVICE:-user-api}
case "${1:-}" in
  user-api|worker-api|runner) service=$1; shift ;;
esac
# The health check reads the same variable to know what to check.
export LABCLOUD_SERVICE="$service"
host=${LABCLOUD_HOST:-0.0.0.0}

# The user API's signing key is a PEM of several lines, which env files cannot hold:
# LOCAL_AUTH_PRIVATE_KEY_FILE names a file holding it instead, made on the first start
# when missing (keep it on a volume: a new key invalidates every token issued).
if [ "$service" = user-api ] && [ -z "${LOCAL_AUTH_PRIVATE_KEY:-}" ] \
    && [ -n "${LOCAL_AUTH_PRIVATE_KEY_FILE:-}" ]; then
  if [ ! -s "$LOCAL_AUTH_PRIVATE_KEY_FILE" ]; then
    echo "labcloud-service: creating the token signing key $LOCAL_AUTH_PRIVATE_KEY_FILE" >&2
    (umask 077 && python -c 'from labcloud.auth.local import generate_private_key_pem as g; print(g(), end="")' \
      >"$LOCAL_AUTH_PRIVATE_KEY_FILE.new") && mv "$LOCAL_AUTH_PRIVATE_KEY_FILE.new" "$LOCAL_AUTH_PRIVATE_KEY_FILE"
  fi
  LOCAL_AUTH_PRIVATE_KEY=$(cat "$LOCAL_AUTH_PRIVATE_KEY_FILE")
  export LOCAL_AUTH_PRIVATE_KEY
fi

case "$service" in
  user-api)
    exec python -m user_api --host "$host" --port "${LABCLOUD_PORT:-8000}" \
      --workers "${LABCLOUD_WORKERS:-1}" "$@" ;;
  worker-api)
    exec python -m worker_api --host "$host" --port "${LABCLOUD_PORT:-8001}" "$@" ;;
  runner)
    exec python -m worker_runner "$@" ;;
  *)
    echo "labcloud-service: unknown service '$service' (user-api, worker-api or runner)" >&2
    exit 2 ;;
esac
