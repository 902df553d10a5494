//! entity-sync keeps browsers in sync with server-side entities.
//!
//! A backend changes a row and calls `Notify(entity, id)` over gRPC. The node
//! puts the change key on a bus; every node consumes it, asks a backend
//! resolver (over the backend's own `Resolve` stream) for the key's fresh
//! rows, and pushes them to each websocket client subscribed to the key.
//!
//! # Layout
//!
//! Public, for the binary and for tests that run nodes:
//!
//! - [`config`]: flags and `ENTITY_SYNC_*` environment variables, one section per component.
//! - [`node`]: starts each component from its section; `Node::start` / `node::run`, graceful shutdown.
//! - [`metrics`]: Prometheus counters, gauges and histograms through `prometheus-client` (`Stats`, the live counts, is public).
//! - [`protocol`]: websocket JSON messages in, frames out, built once and shared (`ErrorCode` is public).
//! - [`session`]: one websocket connection's task: read, write batches, ping (close codes are public).
//! - [`trace`]: trace ids: from `Notify` metadata (`x-trace-id`, `traceparent`) or fresh, carried with each change to its push.
//! - [`bus`]: carries change keys from `Notify` to dispatchers, in-process or NATS JetStream (`BusError` is public).
//! - [`proto`]: code generated from `proto/`.
//! - `fuzzing` (hidden, not API): thin wrappers over the decoder, resolver answers and `Register`, for `fuzz/` and `tests/fuzz_properties.rs`.
//!
//! Internal:
//!
//! - `tasks`: the node's task tracker and cancellation token, one shutdown path.
//! - `auth`: backend credentials: the tokens file, roles, entity lists, the check on each call.
//! - `key`: `ChangeKey`, the `(entity, id)` pair, and its validation rules.
//! - `outbox`: a connection's outbound queue: latest push per key, bounded bytes.
//! - `registry`: sharded map of key → subscribed connections.
//! - `dispatcher`: the change flow (consumes the bus, coalesces per key, resolves, fans out); `dispatcher::subscribe`, the subscribe flow (snapshot, activation or error frame).
//! - `resolve`: where a key is resolved: the local pool, or another node over NATS.
//! - `resolver`: the local pool of backend `Resolve` streams: batching, in-flight caps, retries.
//! - `cluster`: the NATS request-reply link to other nodes' resolvers, both sides.
//! - `grpc`: the `entitysync.v1.EntitySync` service (`Notify`, `Resolve`), health, reflection; `grpc::gate` checks a call's credentials from its headers before its body is read, `grpc::listener` caps the port's connections and handshakes.
//! - `http`: the websocket upgrade, `/healthz`, `/readyz`, `/metrics`.
//! - `health`: readiness and why not (draining, bus down), for `/readyz`, gRPC health and metrics.
//! - `admission`: the websocket port's connections: counted from accept (`--max-connections`), capped per address, deadlined until they are websockets, their partly read messages budgeted.
//! - `tls`: TLS of both ports: PEM files checked at start, the websocket port's TLS listener, the gRPC port's acceptor.
//!
//! Dependencies go one way: `session`/`dispatcher` → `resolve` →
//! {`resolver`, `cluster`}, and `cluster` → `resolver` (it answers other
//! nodes from the local pool); `grpc` feeds backends' streams into `resolver`.

pub(crate) mod admission;
pub(crate) mod auth;
pub mod bus;
pub(crate) mod cluster;
pub mod config;
pub(crate) mod dispatcher;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod grpc;
pub(crate) mod health;
pub(crate) mod http;
pub(crate) mod key;
pub mod metrics;
pub mod node;
pub(crate) mod outbox;
pub mod protocol;
pub(crate) mod registry;
pub(crate) mod resolve;
pub(crate) mod resolver;
pub mod session;
pub(crate) mod tasks;
pub(crate) mod tls;
pub mod trace;

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
