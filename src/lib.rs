//! entity-sync keeps browsers in sync with server-side entities.
//!
//! A backend changes a row and calls `Notify(entity, id)` over gRPC. The node
//! puts the change key on a bus; every node consumes it, asks a backend
//! resolver (over the backend's own `Resolve` stream) for the key's fresh
//! rows, and pushes them to each websocket client subscribed to the key.
//!
//! # Layout
//!
//! - [`config`]: flags and `ENTITY_SYNC_*` environment variables.
//! - [`key`]: `ChangeKey`, the `(entity, id)` pair, and its validation rules.
//! - [`protocol`]: websocket JSON messages in, frames out (built once, shared).
//! - [`session`]: one websocket connection's task (read, write batches, ping).
//! - [`outbox`]: a connection's outbound queue: latest push per key, bounded bytes.
//! - [`registry`]: sharded map of key → subscribed connections.
//! - [`bus`]: carries change keys from `Notify` to dispatchers (in-process or NATS JetStream).
//! - [`cluster`]: resolves on another node's resolvers over NATS request-reply.
//! - [`dispatcher`]: consumes the bus, coalesces per key, resolves, fans out.
//! - [`resolver`]: the pool of backend `Resolve` streams: batching, in-flight caps, retries.
//! - [`grpc`]: the `entitysync.v1.EntitySync` service (`Notify`, `Resolve`).
//! - [`http`]: the websocket upgrade, `/healthz`, `/readyz`, `/metrics`.
//! - [`metrics`]: Prometheus counters and gauges.
//! - [`node`]: wires it all together; `Node::start` / `node::run`, graceful shutdown.
//! - [`proto`]: code generated from `proto/entitysync/v1/entitysync.proto`.

pub mod bus;
pub mod cluster;
pub mod config;
pub mod dispatcher;
pub mod grpc;
pub mod http;
pub mod key;
pub mod metrics;
pub mod node;
pub mod outbox;
pub mod protocol;
pub mod registry;
pub mod resolver;
pub mod session;

/// Generated gRPC code.
pub mod proto {
    /// Package `entitysync.v1`: the public API backends speak.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("entitysync.v1");
    }
    /// Package `entitysync.internal.v1`: node-to-node messages over NATS.
    pub(crate) mod internal {
        pub(crate) mod v1 {
            #![allow(clippy::all, missing_docs)]
            tonic::include_proto!("entitysync.internal.v1");
        }
    }
}
