#!/usr/bin/env bash
# Makes the TLS files of the nodes' gRPC port (Notify, Resolve): a CA, and
# one certificate for the nodes, in DIR (default: deploy/grpc/certs). Bearer
# tokens and the subscriber secrets sent to resolvers cross that port, so a
# node on a network refuses to serve tokens without TLS. Run once before
# `docker compose up`; give backends ca.pem (compose: the demo's
# DEMO_NODE_CA), keep ca.key somewhere safe (or delete it) afterwards.
#
#   deploy/grpc/make-certs.sh [DIR]
#
# GRPC_CERT_HOSTS (comma-separated DNS names) replaces the compose nodes'
# names, e.g. for the Kubernetes Service (deploy/k8s/service.yaml) in
# namespace NS:
#   GRPC_CERT_HOSTS=entity-sync,entity-sync.NS,entity-sync.NS.svc deploy/grpc/make-certs.sh k8s-grpc-certs
# The files are made by deploy/nats/make-certs.sh (the same CA and
# certificate shape, named for gRPC).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
NATS_CERT_HOSTS="${GRPC_CERT_HOSTS:-entity-sync-1,entity-sync-2,entity-sync-3}" \
  CERT_NAME="entity-sync gRPC" \
  exec "$here/../nats/make-certs.sh" "${1:-$here/certs}"
