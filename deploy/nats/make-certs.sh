#!/usr/bin/env bash
# Makes the TLS files of the compose example's NATS cluster (deploy/compose.yaml):
# a CA, and one certificate for the three servers (client port and routes,
# so it is valid for both server and client authentication). Run once before
# `docker compose up`; keep ca.key somewhere safe (or delete it) afterwards.
#
#   deploy/nats/make-certs.sh [DIR]      # default: deploy/nats/certs
#
# NATS_CERT_HOSTS (comma-separated DNS names) replaces the compose servers'
# names, e.g. for the Helm chart's pods (deploy/nats/helm-values.yaml):
#   NATS_CERT_HOSTS=nats-0.nats-headless,nats-1.nats-headless,nats-2.nats-headless,nats
# CERT_NAME names the CA and the certificate (deploy/grpc/make-certs.sh
# makes the nodes' gRPC files with this script).
set -euo pipefail
hosts="${NATS_CERT_HOSTS:-nats-1,nats-2,nats-3}"
cert_name="${CERT_NAME:-entity-sync NATS}"
case "$cert_name" in
  "" | *[!A-Za-z0-9\ .-]*) echo "bad CERT_NAME: '$cert_name'" >&2; exit 2 ;;
esac
san=""
IFS=',' read -r -a names <<<"$hosts"
for name in "${names[@]}"; do
  case "$name" in
    "" | *[!A-Za-z0-9.-]*) echo "bad host name in NATS_CERT_HOSTS: '$name'" >&2; exit 2 ;;
  esac
  san="${san}DNS:${name}, "
done
dir="${1:-$(dirname "$0")/certs}"
mkdir -p "$dir"
cd "$dir"
if [ -e server.pem ]; then
  echo "$dir/server.pem exists; remove $dir to make new files" >&2
  exit 1
fi
days=825
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=$cert_name CA" -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=$cert_name" -keyout server-key.pem -out server.csr 2>/dev/null
cat > server.ext <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = ${san}DNS:localhost, IP:127.0.0.1
EXT
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -days "$days" -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 0644 ca.pem server.pem
chmod 0644 server-key.pem  # read by the container's user (nats, or the node's 10001)
echo "wrote $dir/{ca.pem,ca.key,server.pem,server-key.pem}"
