//! One node, in-process ([`TestNode`](entity_sync_testkit::TestNode)) or
//! the real binary as a child process: the websocket protocol, notify,
//! resolvers, limits, TLS, credentials, shutdown and what operators see.
//! One module per area, all in one test binary (one link of the whole
//! stack instead of one per file); `cargo test --test node websocket::`
//! runs one area.
//!
//! Tests of different modules run in parallel threads of one process: none
//! of them changes process-wide state (environment variables, rlimits,
//! signal dispositions other than the node's own SIGHUP handler, a global
//! log subscriber), and what they measure of a node's memory or file
//! descriptors is a child process's, never this one's.

mod auth;
mod binary;
mod grpc_limits;
mod grpc_reflection;
mod keepalive;
mod limits;
mod notify;
mod observability;
mod refresh;
mod resolve;
mod resume;
mod secrets;
mod shutdown;
mod tls;
mod tokens;
mod unchanged_rows;
mod websocket;
