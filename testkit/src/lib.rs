//! What entity-sync's tests and its bench share, each written once: a node
//! in-process on port 0 or the real binary as a child process (on ports it
//! binds itself and reports), real `nats-server`s on ports they pick and
//! report, with their own store dirs, websocket
//! clients that assert exact frames, a resolver built on
//! `entity-sync-backend`, notifies, and HTTP/metrics reads.
//!
//! Nothing here sleeps for readiness: a node is ready once `Node::start`
//! returned (its listeners were bound before), a process once its port
//! answers; every "wait" is a receive with a deadline or a condition polled
//! until a deadline.
//!
//! # Layout
//!
//! - [`node`]: [`TestNode`] (in-process) and [`NodeProcess`] (the binary).
//! - [`nats`]: one nats-server or a JetStream cluster, and a TCP proxy that
//!   cuts, slows, drops or stalls links.
//! - [`ws`]: [`connect`](ws::connect) with socket options, and [`WsClient`] (over TLS: [`WssClient`]).
//! - [`resolver`]: [`TestResolver`] and the data it serves.
//! - [`notify`]: `Notify` through the SDK's notifier, without retries.
//! - [`http`]: a plain or TLS GET and Prometheus text reading.
//! - [`tls`]: a CA and certificates for tests ([`TlsFiles`]), and the TLS clients' config.
//! - [`process`]: child processes killed on drop, temp dirs, closed ports.
//! - [`procstat`]: a process's RSS, CPU time and open file descriptors, the open-file limit.
//! - [`stats`]: percentiles of latency samples.
//! - [`fleet`]: hundreds of browser-like websocket clients that reconnect,
//!   resubscribe and drop stale pushes, checked against an expected state.
//!
//! The `entity-sync-testkit` binary (`src/bin/`) offers the resolver and the
//! certificates to tests in other languages (the JavaScript client's).

pub mod fleet;
pub mod http;
pub mod nats;
pub mod node;
pub mod notify;
pub mod process;
pub mod procstat;
pub mod resolver;
pub mod stats;
pub mod tls;
pub mod ws;

use std::time::Duration;

use tokio::time::Instant;

pub use node::{NodeProcess, StatsView, TestNode};
pub use notify::{notify, notify_one, try_notify};
pub use resolver::{
    Entry, ResolverData, ResolverOptions, SeenPassThrough, SeenRequest, TestResolver,
};
pub use tls::{CertKey, TestCa, TlsFiles};
pub use ws::{WsClient, WssClient, connect, connect_wss, parse_push};

/// How long a receive or a polled condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// The window in which "nothing more must happen" is checked.
pub const SILENCE: Duration = Duration::from_millis(300);

/// Polls `cond` until it holds; panics after [`DEADLINE`] with `what`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks that `cond` stays true for the whole [`SILENCE`] window (used to
/// prove that nothing *more* happens, like [`WsClient::expect_silence`]).
pub async fn assert_stays(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + SILENCE;
    while Instant::now() < end {
        assert!(cond(), "condition no longer holds: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cond(), "condition no longer holds: {what}");
}
