#!/usr/bin/env bash
# Makes the TLS files of the compose example's NATS cluster (deploy/compose.yaml):
# a CA, and one certificate for the three servers (client port and routes,
# so it is valid for both server and client authentication). Run once before
# `docker compose up`; keep ca.key somewhere safe (or delete it) afterwards.
#
#   deploy/nats/make-certs.sh [DIR]      # default: deploy/nats/certs
set -euo pipefail
dir="${1:-$(dirname "$0")/certs}"
mkdir -p "$dir"
cd "$dir"
if [ -e server.pem ]; then
  echo "$dir/server.pem exists; remove $dir to make new files" >&2
  exit 1
fi
days=825
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=entity-sync NATS CA" -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=entity-sync NATS" -keyout server-key.pem -out server.csr 2>/dev/null
cat > server.ext <<'EXT'
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:nats-1, DNS:nats-2, DNS:nats-3, DNS:localhost, IP:127.0.0.1
EXT
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -days "$days" -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 0644 ca.pem server.pem
chmod 0644 server-key.pem  # read by the nats container's user
echo "wrote $dir/{ca.pem,ca.key,server.pem,server-key.pem}"
