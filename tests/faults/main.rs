//! The fault-injection suite: real node processes on a real three-server
//! NATS JetStream cluster (replicas 3, `sync_interval: always`), real
//! resolvers through `entity-sync-backend`, and hundreds of browser-like
//! websocket clients (testkit `fleet`) that reconnect and resubscribe. Each
//! scenario applies a fault while notifies stream in at a steady rate, then
//! compares every client's rows with the backend's final state, and prints
//! its figures (notifies accepted, clients, mismatches, duplicates, stale
//! pushes, max node RSS, time to recover and to converge).
//!
//! Scenarios run one at a time (`harness::serial`); each is bounded (every
//! wait has a deadline). The soak runs briefly by default and longer with
//! `ENTITY_SYNC_SOAK_SECS`.
//!
//! # Layout
//!
//! - `harness`: the cluster and nodes, the backend's rows, the notify load, RSS sampling, figures.
//! - `nodes`: a node killed (SIGKILL) or stopped (SIGTERM) under load.
//! - `bus`: NATS servers killed and restarted, and a faulty link to NATS.
//! - `resolvers`: resolvers killed, slow, or all gone for a while.
//! - `clients`: a client that stops reading, and a reconnect storm.
//! - `partition`: a NATS server cut off from the cluster while a node stays connected to it.
//! - `relay`: the node resolving changes for the whole cluster killed, cut off from NATS, stalled.
//! - `soak`: RSS and file descriptors back to their baseline after clients leave.

mod bus;
mod clients;
mod harness;
mod nodes;
mod partition;
mod relay;
mod resolvers;
mod soak;
