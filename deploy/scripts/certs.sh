#!/usr/bin/env bash
# Dev CA and per-service certificates of the internal plane (mTLS between services).
#
#   deploy/scripts/certs.sh DIR
#
# Writes DIR/ca.pem (+ ca.key) and DIR/<service>.pem + DIR/<service>.key for session-manager,
# vm-pool, executor, metering and gateway. Each certificate's identity is the DNS
# subjectAltName <service>.capsa.internal (what --tls-allowed-peers lists and what clients
# expect of a server), usable as server and client certificate. `public.pem`/`public.key` is
# a server certificate for localhost / 127.0.0.1 (--public-tls-cert of session-manager, and
# Redis over TLS in tests). Idempotent: existing files are kept; delete DIR to start over.
# Keys are mode 0600. For production, issue the same names from your own CA (cert-manager).
set -euo pipefail

dir=${1:?usage: certs.sh DIR}
days=${CAPSA_CERT_DAYS:-825}
mkdir -p "$dir"
umask 077

if [[ ! -s $dir/ca.pem || ! -s $dir/ca.key ]]; then
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" -days "$days" \
    -subj "/CN=capsa dev internal CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

# issue NAME SAN...: a leaf certificate signed by the CA.
issue() {
  local name=$1 san=$2
  [[ -s $dir/$name.pem && -s $dir/$name.key ]] && return 0
  local ext
  ext=$(mktemp)
  printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth,clientAuth" \
    "subjectAltName=$san" >"$ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/$name.key" -out "$dir/$name.csr" -subj "/CN=$name" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -out "$dir/$name.pem" -days "$days" -extfile "$ext" 2>/dev/null
  rm -f "$dir/$name.csr" "$ext"
}

for service in session-manager vm-pool executor metering gateway; do
  issue "$service" "DNS:$service.capsa.internal"
done
issue public "DNS:localhost,IP:127.0.0.1"
chmod 0644 "$dir"/*.pem
echo "$dir"
