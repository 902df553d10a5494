//! Nodes on real nats-servers (JetStream): several nodes sharing changes
//! and resolvers, what a node does with cluster resolve requests no node
//! sends, and the NATS permissions of `deploy/nats/nats.conf`. Each test
//! starts its own nats-server(s) on free ports; `cargo test --test cluster
//! nats_auth::` runs one module; `notify_batch` covers atomic notifies.
//!
//! `cluster`'s tests install a global log subscriber writing to the test
//! output (`RUST_LOG`); tests of the other modules share it.

mod cluster;
mod cluster_limits;
mod nats_auth;
mod notify_batch;
mod refresh;
mod relay;
mod tokens;
