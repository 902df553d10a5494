//! entity-sync keeps browsers in sync with server-side entities.
//!
//! A backend changes a row and calls `Notify(entity, id)` over gRPC. The node
//! puts the change key on a bus; every node consumes it, asks a backend
//! resolver (over the backend's own `Resolve` stream) for the key's fresh
//! rows, and pushes them to each websocket client subscribed to the key.
//!
//! # Layout
//!
//! The folders follow a change from `Notify` to the browser, and a client
//! from accept to its first push:
//!
//! - [`config`]: flags and `ENTITY_SYNC_*` environment variables, one section per component.
//! - [`node`]: starts each component from its section; `Node::start` / `node::run`, graceful shutdown.
//! - `key`: the key, `(entity, id)`, and its validation rules: the one type every room shares.
//! - [`websocket`]: the websocket side. `admission` (connections counted from
//!   accept, capped per address, deadlined until they are websockets), `http`
//!   (the upgrade, `/healthz`, `/readyz`, `/metrics`), [`websocket::session`]
//!   (one connection's task: read, write batches, ping), `outbox` (a
//!   connection's outbound queue: latest push per key, bounded bytes),
//!   [`websocket::protocol`] (the JSON messages in, frames out).
//! - `grpc`: the gRPC side. The `entitysync.v1.EntitySync` service (`Notify`,
//!   `Resolve`), health, reflection; `grpc::listener` caps the port's
//!   connections and handshakes, `grpc::gate` checks a call's credentials
//!   from its headers before its body is read, `grpc::auth` holds the
//!   backend credentials (tokens file, roles, entity lists).
//! - [`bus`]: carries change keys from `Notify` to every node's dispatcher,
//!   in-process or over NATS JetStream (`BusError` is public).
//! - `dispatcher`: dispatch. The change flow (consumes the bus, coalesces per
//!   key, resolves, fans out), `dispatcher::subscribe` (the subscribe flow:
//!   snapshot, activation or error frame), `dispatcher::refresh` (held keys
//!   re-resolved every `refresh_interval_ms` without a `Notify`) and
//!   `dispatcher::registry` (the sharded map of key → subscribed connections).
//! - `resolving`: where a key's rows come from. The route (`Resolvers`: the
//!   local pool, or another node), `resolving::pool` (the local backends'
//!   `Resolve` streams: batching, in-flight caps, deadlines) and
//!   `resolving::cluster` (the NATS request-reply link to other nodes'
//!   pools, both sides), `resolving::cache` (the node cache: the latest push
//!   of each SHARED key held here) and `resolving::relay` (each SHARED
//!   change resolved once for the whole cluster, its rows published to the
//!   nodes that hold the key).
//! - [`ops`]: operations. The task tracker and its shutdown path, readiness,
//!   Prometheus metrics, trace ids, TLS of both ports.
//! - [`proto`]: code generated from `proto/`.
//! - `fuzzing` (unit tests and `--cfg fuzzing` builds only): the properties
//!   the fuzz targets (`fuzz/`) check on the decoder, resolver answers and
//!   `Register`, run as property tests by `cargo test`.
//!
//! Dependencies go one way: `websocket::session` and `dispatcher` →
//! `resolving` → {`resolving::pool`, `resolving::cluster`,
//! `resolving::cache`, `resolving::relay`}, and `resolving::cluster` and
//! `resolving::relay` → `resolving::pool`; `grpc` feeds backends' streams
//! into `resolving::pool`.

pub mod bus;
pub mod config;
pub(crate) mod dispatcher;
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub(crate) mod grpc;
pub(crate) mod key;
pub mod node;
pub mod ops;
pub(crate) mod resolving;
pub mod websocket;

/// Generated gRPC code.
pub mod proto {
    /// Package `entitysync.v1`: the public API backends speak (the
    /// `entity-sync-proto` crate's, shared with the SDK).
    pub use entity_sync_proto::v1;
    /// Package `entitysync.internal.v1`: node-to-node messages over NATS.
    pub(crate) mod internal {
        pub(crate) mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("entitysync.internal.v1");
        }
    }
}
