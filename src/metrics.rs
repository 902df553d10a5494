//! Prometheus counters and gauges of a node, rendered as text for `/metrics`.

use std::{
    fmt::Write,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use crate::{proto::v1::Reason, protocol::ErrorCode};

/// Counters shared by every part of a node. Plain atomics: cheap on the hot
/// path, and a scrape reads a consistent-enough snapshot.
#[derive(Default)]
pub(crate) struct Metrics {
    pub(crate) connections_total: AtomicU64,
    pub(crate) pushes_total: AtomicU64,
    pub(crate) push_bytes_total: AtomicU64,
    pub(crate) pushes_skipped_stale_total: AtomicU64,
    pub(crate) slow_client_closes_total: AtomicU64,
    pub(crate) notify_keys_total: AtomicU64,
    pub(crate) notify_duplicates_total: AtomicU64,
    pub(crate) changes_consumed_total: AtomicU64,
    pub(crate) resolve_requests_subscribe_total: AtomicU64,
    pub(crate) resolve_requests_change_total: AtomicU64,
    pub(crate) resolve_timeouts_total: AtomicU64,
    pub(crate) resolve_retries_total: AtomicU64,
    pub(crate) revocations_total: AtomicU64,
    pub(crate) secret_rechecks_total: AtomicU64,
    pub(crate) resyncs_total: AtomicU64,
    pub(crate) cluster_resolves_total: AtomicU64,
    pub(crate) pass_through_total: AtomicU64,
    pub(crate) client_errors: [AtomicU64; ErrorCode::ALL.len()],
}

/// Live gauges read from the registry and the resolver pool at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Open websocket connections.
    pub connections: usize,
    /// Subscriptions (connection, key) in the registry, pending or active.
    pub subscriptions: usize,
    /// Distinct keys with at least one subscription.
    pub keys: usize,
    /// Registered resolver streams.
    pub resolvers: usize,
}

impl Metrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// Counts one resolve request sent for `reason`.
    pub(crate) fn resolve_request(&self, reason: Reason) {
        let counter = match reason {
            Reason::Subscribe => &self.resolve_requests_subscribe_total,
            _ => &self.resolve_requests_change_total,
        };
        Self::inc(counter);
    }

    pub(crate) fn client_error(&self, code: ErrorCode) {
        self.client_errors[code.index()].fetch_add(1, Relaxed);
    }

    /// Prometheus text exposition format.
    pub(crate) fn render(&self, stats: Stats, bus_head: u64, bus_connected: bool) -> String {
        let mut out = String::with_capacity(4096);
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "entity_sync_connections",
            "Open websocket connections.",
            stats.connections as u64,
        );
        gauge(
            "entity_sync_subscriptions",
            "Subscriptions held by connections.",
            stats.subscriptions as u64,
        );
        gauge(
            "entity_sync_subscribed_keys",
            "Distinct keys with subscribers.",
            stats.keys as u64,
        );
        gauge(
            "entity_sync_resolvers",
            "Registered resolver streams.",
            stats.resolvers as u64,
        );
        gauge(
            "entity_sync_bus_connected",
            "1 while the bus can take and deliver changes (always 1 in-process).",
            u64::from(bus_connected),
        );
        gauge(
            "entity_sync_bus_head_sequence",
            "Latest bus sequence seen by this node.",
            bus_head,
        );
        let counters = [
            (
                "entity_sync_connections_total",
                "Websocket connections accepted.",
                &self.connections_total,
            ),
            (
                "entity_sync_pushes_total",
                "Push frames queued to clients.",
                &self.pushes_total,
            ),
            (
                "entity_sync_push_bytes_total",
                "Bytes of push frames queued to clients.",
                &self.push_bytes_total,
            ),
            (
                "entity_sync_pushes_skipped_stale_total",
                "Pushes not sent because the subscriber already held a newer version.",
                &self.pushes_skipped_stale_total,
            ),
            (
                "entity_sync_slow_client_closes_total",
                "Connections closed because their outbound queue overflowed.",
                &self.slow_client_closes_total,
            ),
            (
                "entity_sync_notify_keys_total",
                "Keys accepted by Notify.",
                &self.notify_keys_total,
            ),
            (
                "entity_sync_notify_duplicates_total",
                "Notify calls answered from the idempotency window.",
                &self.notify_duplicates_total,
            ),
            (
                "entity_sync_changes_consumed_total",
                "Change keys consumed from the bus.",
                &self.changes_consumed_total,
            ),
            (
                "entity_sync_resolve_timeouts_total",
                "Resolve requests that passed their deadline.",
                &self.resolve_timeouts_total,
            ),
            (
                "entity_sync_resolve_retries_total",
                "Change resolves retried after a failure.",
                &self.resolve_retries_total,
            ),
            (
                "entity_sync_revocations_total",
                "Subscriptions ended by a FORBIDDEN change resolve.",
                &self.revocations_total,
            ),
            (
                "entity_sync_secret_rechecks_total",
                "Held keys re-resolved because their connection sent a new secret.",
                &self.secret_rechecks_total,
            ),
            (
                "entity_sync_resyncs_total",
                "Times changes were lost to stream retention and every subscribed key was re-resolved.",
                &self.resyncs_total,
            ),
            (
                "entity_sync_cluster_resolves_total",
                "Resolves sent to another node over NATS (no local resolver).",
                &self.cluster_resolves_total,
            ),
            (
                "entity_sync_pass_through_total",
                "Pass-through messages forwarded to resolvers.",
                &self.pass_through_total,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Relaxed)
            );
        }
        let name = "entity_sync_resolve_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Resolve requests sent to resolvers, by reason.\n# TYPE {name} counter\n{name}{{reason=\"subscribe\"}} {}\n{name}{{reason=\"change\"}} {}",
            self.resolve_requests_subscribe_total.load(Relaxed),
            self.resolve_requests_change_total.load(Relaxed)
        );
        let name = "entity_sync_client_errors_total";
        let _ = writeln!(
            out,
            "# HELP {name} Error frames sent to clients, by code.\n# TYPE {name} counter"
        );
        for code in ErrorCode::ALL {
            let _ = writeln!(
                out,
                "{name}{{code=\"{code}\"}} {}",
                self.client_errors[code.index()].load(Relaxed)
            );
        }
        out
    }
}
