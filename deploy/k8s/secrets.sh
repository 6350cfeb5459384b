#!/usr/bin/env bash
# Writes deploy/k8s/secrets/redis.env (git-ignored), which kustomization.yaml turns into the
# Secret `capsa-redis`: a random Redis password and the URL the services connect with. Keeps
# an existing file. Usage: deploy/k8s/secrets.sh [REDIS_HOST:PORT] (default redis:6379).
set -euo pipefail
out="$(dirname "$0")/secrets/redis.env"
if [[ -s "$out" ]]; then
  echo "$out exists; kept" >&2
  exit 0
fi
mkdir -p "$(dirname "$out")"
# URL-safe (hex), so it needs no escaping in redis://:<password>@host.
password="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
umask 077
printf 'password=%s\nurl=redis://:%s@%s/\n' "$password" "$password" "${1:-redis:6379}" >"$out"
echo "$out written" >&2
