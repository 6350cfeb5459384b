#!/usr/bin/env bash
# Writes what kustomization.yaml turns into Secrets, all under deploy/k8s/secrets/ (git-ignored):
# - redis.env → `capsa-redis`: a random Redis password and the URL the services connect with;
# - tls/ → `capsa-tls-<service>` (cert-manager's keys: tls.crt, tls.key, ca.crt): a dev CA and
#   the internal plane's certificates, from deploy/scripts/certs.sh. With cert-manager, issue
#   them there instead (README) and drop those generators.
# Keeps what exists. Usage: deploy/k8s/secrets.sh [REDIS_HOST:PORT] (default redis:6379).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/secrets/redis.env"
mkdir -p "$here/secrets"
if [[ -s "$out" ]]; then
  echo "$out exists; kept" >&2
else
  # URL-safe (hex), so it needs no escaping in redis://:<password>@host.
  password="$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
  (umask 077; printf 'password=%s\nurl=redis://:%s@%s/\n' "$password" "$password" "${1:-redis:6379}" >"$out")
  echo "$out written" >&2
fi
"$here/../scripts/certs.sh" "$here/secrets/tls" >/dev/null
echo "$here/secrets/tls: internal CA and certificates" >&2
