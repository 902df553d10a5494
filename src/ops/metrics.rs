//! Prometheus metrics of a node: counters and histograms updated on the way, live gauges read at scrape time, encoded by `prometheus-client`.
//!
//! Counters are plain atomics (one relaxed add on the hot path); the two
//! latency histograms are `prometheus-client` histograms (a few atomics per
//! observation, observed per resolve and per fan-out, never per subscriber).
//! A scrape hands everything to one [`Collector`] that writes the Prometheus
//! text format (0.0.4), so the names and types stay exactly as documented in
//! the README's "Operate" section.

use std::{
    collections::HashSet,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelSetEncoder,
        LabelValueEncoder,
    },
    metrics::{
        MetricType, counter::ConstCounter, family::Family, gauge::ConstGauge, histogram::Histogram,
    },
    registry::Registry,
};

use crate::{proto::v1::Reason, websocket::protocol::ErrorCode};

/// Most distinct entity label values; further entities count as `other`.
/// Only entities a resolver answered for get one (see [`answered`]): a
/// client can name any entity, so it could otherwise take every label
/// before the real entities are first resolved.
pub const MAX_ENTITY_LABELS: usize = 64;
/// Most distinct resolver names labelled in `entity_sync_resolver_streams`;
/// the rest (and names that are not plain identifiers) count as `other`.
pub const MAX_RESOLVER_NAME_LABELS: usize = 32;
/// The label value that folds everything past a cap.
pub const OTHER_LABEL: &str = "other";

/// Upper bounds of the latency histograms' buckets, in seconds: from half a
/// millisecond to past the default resolve deadline (5 s, up to 3 attempts).
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Labels of `entity_sync_resolve_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ResolveLabels {
    entity: Arc<str>,
    status: &'static str,
}

/// An `Arc<str>` label value (`prometheus-client` encodes `&str`, not `str`).
struct SharedStr<'a>(&'a str);

impl EncodeLabelValue for SharedStr<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.0)
    }
}

impl EncodeLabelSet for ResolveLabels {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        [("entity", SharedStr(&self.entity))]
            .as_slice()
            .encode(encoder)?;
        [("status", self.status)].as_slice().encode(encoder)
    }
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Counters and histograms shared by every part of a node.
pub(crate) struct Metrics {
    pub(crate) connections_total: AtomicU64,
    pub(crate) pushes_total: AtomicU64,
    pub(crate) push_bytes_total: AtomicU64,
    pub(crate) pushes_skipped_stale_total: AtomicU64,
    /// Change pushes not sent: the rows were the ones the subscriber got last.
    pub(crate) pushes_skipped_unchanged_total: AtomicU64,
    pub(crate) slow_client_closes_total: AtomicU64,
    /// Queued pushes replaced by a newer push of their key before they were
    /// written (the client never sees the older state).
    pub(crate) outbox_replaced_total: AtomicU64,
    pub(crate) notify_keys_total: AtomicU64,
    pub(crate) notify_duplicates_total: AtomicU64,
    pub(crate) changes_consumed_total: AtomicU64,
    pub(crate) resolve_requests_subscribe_total: AtomicU64,
    pub(crate) resolve_requests_change_total: AtomicU64,
    pub(crate) resolve_timeouts_total: AtomicU64,
    pub(crate) resolve_retries_total: AtomicU64,
    /// Subscribe resolves answered by a request already in flight for the
    /// same key and secret (single-flight), instead of a request of their own.
    pub(crate) resolve_joined_total: AtomicU64,
    pub(crate) revocations_total: AtomicU64,
    pub(crate) secret_rechecks_total: AtomicU64,
    pub(crate) resyncs_total: AtomicU64,
    pub(crate) cluster_resolves_total: AtomicU64,
    pub(crate) pass_through_total: AtomicU64,
    pub(crate) client_errors: [AtomicU64; ErrorCode::ALL.len()],
    // State at scale: the node cache, resumes, the cluster relay.
    pub(crate) cache_hits_total: AtomicU64,
    pub(crate) cache_misses_total: AtomicU64,
    pub(crate) cache_evictions_total: AtomicU64,
    /// Gauges, kept by the cache as it changes.
    pub(crate) cache_bytes: AtomicU64,
    pub(crate) cache_keys: AtomicU64,
    /// Subscribes with a version answered `current` (no snapshot sent).
    pub(crate) resumed_current_total: AtomicU64,
    /// Subscribe tokens verified, by result: valid, invalid, expired.
    pub(crate) tokens_valid_total: AtomicU64,
    pub(crate) tokens_invalid_total: AtomicU64,
    pub(crate) tokens_expired_total: AtomicU64,
    /// Re-subscribes of a held key with a newer token (no resolve, no push).
    pub(crate) token_refreshes_total: AtomicU64,
    /// Subscriptions ended because their token expired.
    pub(crate) token_expiries_total: AtomicU64,
    /// Subscriptions held on a token now (a gauge).
    pub(crate) token_subscriptions: AtomicU64,
    /// Subscribes with a version that got a snapshot (the key changed, or
    /// the version could not be placed).
    pub(crate) resumed_snapshot_total: AtomicU64,
    /// Changes this node resolved for the whole cluster and published.
    pub(crate) relay_published_total: AtomicU64,
    /// Changes the relay skipped: no node holds the key.
    pub(crate) relay_unheld_total: AtomicU64,
    /// Rows received from the relay and pushed here.
    pub(crate) relay_received_total: AtomicU64,
    /// Changes this node resolved itself because the relay's rows did not
    /// come in time.
    pub(crate) relay_fallbacks_total: AtomicU64,
    /// Refresh changes this node stored on the bus (not counting the ones
    /// another node stored first for the same key and slot).
    pub(crate) refresh_changes_total: AtomicU64,
    /// Time of one key's resolve (local or through another node), by entity and outcome.
    resolve_duration: HistogramFamily<ResolveLabels>,
    /// From the `Notify` that accepted a change to the push of its rows into
    /// the subscribers' queues.
    notify_to_push: Histogram,
    /// Entities that have a label of their own (at most [`MAX_ENTITY_LABELS`]).
    /// A std `RwLock`: read once per resolve, written at most 64 times.
    entity_labels: RwLock<HashSet<Arc<str>>>,
    other: Arc<str>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connections_total: AtomicU64::new(0),
            pushes_total: AtomicU64::new(0),
            push_bytes_total: AtomicU64::new(0),
            pushes_skipped_stale_total: AtomicU64::new(0),
            pushes_skipped_unchanged_total: AtomicU64::new(0),
            slow_client_closes_total: AtomicU64::new(0),
            outbox_replaced_total: AtomicU64::new(0),
            notify_keys_total: AtomicU64::new(0),
            notify_duplicates_total: AtomicU64::new(0),
            changes_consumed_total: AtomicU64::new(0),
            resolve_requests_subscribe_total: AtomicU64::new(0),
            resolve_requests_change_total: AtomicU64::new(0),
            resolve_timeouts_total: AtomicU64::new(0),
            resolve_retries_total: AtomicU64::new(0),
            resolve_joined_total: AtomicU64::new(0),
            revocations_total: AtomicU64::new(0),
            secret_rechecks_total: AtomicU64::new(0),
            resyncs_total: AtomicU64::new(0),
            cluster_resolves_total: AtomicU64::new(0),
            pass_through_total: AtomicU64::new(0),
            client_errors: std::array::from_fn(|_| AtomicU64::new(0)),
            cache_hits_total: AtomicU64::new(0),
            cache_misses_total: AtomicU64::new(0),
            cache_evictions_total: AtomicU64::new(0),
            cache_bytes: AtomicU64::new(0),
            cache_keys: AtomicU64::new(0),
            resumed_current_total: AtomicU64::new(0),
            tokens_valid_total: AtomicU64::new(0),
            tokens_invalid_total: AtomicU64::new(0),
            tokens_expired_total: AtomicU64::new(0),
            token_expiries_total: AtomicU64::new(0),
            token_refreshes_total: AtomicU64::new(0),
            token_subscriptions: AtomicU64::new(0),
            resumed_snapshot_total: AtomicU64::new(0),
            relay_published_total: AtomicU64::new(0),
            relay_unheld_total: AtomicU64::new(0),
            relay_received_total: AtomicU64::new(0),
            relay_fallbacks_total: AtomicU64::new(0),
            refresh_changes_total: AtomicU64::new(0),
            resolve_duration: Family::new_with_constructor(latency_histogram),
            notify_to_push: latency_histogram(),
            entity_labels: RwLock::new(HashSet::new()),
            other: Arc::from(OTHER_LABEL),
        }
    }
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

/// What a scrape reads from the live node besides the counters.
#[derive(Debug, Clone, Default)]
pub(crate) struct Live {
    pub(crate) stats: Stats,
    pub(crate) bus_head: u64,
    pub(crate) bus_connected: bool,
    /// Changes stored on the bus that this node has not consumed yet.
    pub(crate) bus_lag: u64,
    pub(crate) ready: bool,
    /// Why the node is not ready, when it is not.
    pub(crate) not_ready: Option<crate::ops::health::NotReady>,
    /// Connected to the bus, and receiving changes from it.
    pub(crate) bus_available: bool,
    /// Resolver streams per registered name.
    pub(crate) resolver_streams: Vec<(Arc<str>, usize)>,
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

    /// Records how long one key's resolve of `entity` took and how it ended.
    pub(crate) fn resolve_done(&self, entity: &Arc<str>, status: &'static str, took: Duration) {
        let labels = ResolveLabels {
            entity: self.entity_label(entity, answered(status)),
            status,
        };
        self.resolve_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// Records the time from a change's `Notify` to the push of its rows.
    pub(crate) fn notify_to_push(&self, took: Duration) {
        self.notify_to_push.observe(took.as_secs_f64());
    }

    /// `entity` itself if it has a label, or gets one now: `registered` (a
    /// resolver answered for it) while fewer than [`MAX_ENTITY_LABELS`]
    /// entities have one. Else [`OTHER_LABEL`].
    fn entity_label(&self, entity: &Arc<str>, registered: bool) -> Arc<str> {
        if self.entity_labels.read().unwrap().contains(entity) {
            return entity.clone();
        }
        if !registered {
            return self.other.clone();
        }
        let mut labels = self.entity_labels.write().unwrap();
        if labels.contains(entity) || labels.len() < MAX_ENTITY_LABELS {
            labels.insert(entity.clone());
            entity.clone()
        } else {
            self.other.clone()
        }
    }

    /// The Prometheus text exposition format (0.0.4) of every metric.
    pub(crate) fn render(self: &Arc<Self>, live: Live) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape {
            metrics: self.clone(),
            live,
        }));
        let mut out = String::with_capacity(8192);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing to a String does not fail");
        out
    }
}

/// Whether a resolve that ended with `status` (a
/// [`crate::resolving::status_label`]) was answered by a resolver, here or on
/// another node: then the entity is one a backend registered. A resolve of
/// an entity nobody serves ends `no_resolver` (or `timeout`, `closed` while
/// the bus or the node is in trouble), never with an answer.
fn answered(status: &str) -> bool {
    matches!(
        status,
        "ok" | "not_found" | "forbidden" | "error" | "invalid"
    )
}

/// The content type of [`Metrics::render`]'s output.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Folds resolver names into at most [`MAX_RESOLVER_NAME_LABELS`] labels:
/// the first names in order, then `other` (also for names that are not
/// plain `[A-Za-z0-9_.-]` identifiers: a name is a backend's choice).
pub(crate) fn fold_resolver_names(
    mut counts: Vec<(Arc<str>, usize)>,
    other: &Arc<str>,
) -> Vec<(Arc<str>, usize)> {
    counts.sort();
    let plain = |name: &str| {
        name != OTHER_LABEL
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    };
    let mut folded: Vec<(Arc<str>, usize)> = Vec::new();
    let mut rest = 0;
    for (name, n) in counts {
        if plain(&name) && folded.len() < MAX_RESOLVER_NAME_LABELS {
            folded.push((name, n));
        } else {
            rest += n;
        }
    }
    if rest > 0 {
        folded.push((other.clone(), rest));
    }
    folded
}

/// One scrape: the counters, the histograms and the live values.
struct Scrape {
    metrics: Arc<Metrics>,
    live: Live,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrape").finish_non_exhaustive()
    }
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// A counter named `{name}_total` (the encoder adds the suffix).
fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (m, live) = (&*self.metrics, &self.live);
        let stats = live.stats;
        gauge(
            &mut enc,
            "entity_sync_connections",
            "Open websocket connections.",
            stats.connections as u64,
        )?;
        gauge(
            &mut enc,
            "entity_sync_subscriptions",
            "Subscriptions held by connections.",
            stats.subscriptions as u64,
        )?;
        gauge(
            &mut enc,
            "entity_sync_subscribed_keys",
            "Distinct keys with subscribers.",
            stats.keys as u64,
        )?;
        gauge(
            &mut enc,
            "entity_sync_resolvers",
            "Registered resolver streams.",
            stats.resolvers as u64,
        )?;
        gauge(
            &mut enc,
            "entity_sync_bus_connected",
            "1 while the bus can take and deliver changes (always 1 in-process).",
            u64::from(live.bus_connected),
        )?;
        gauge(
            &mut enc,
            "entity_sync_bus_head_sequence",
            "Latest bus sequence seen by this node.",
            live.bus_head,
        )?;
        gauge(
            &mut enc,
            "entity_sync_bus_lag",
            "Changes stored on the bus (up to the latest head seen) that this node has not consumed yet.",
            live.bus_lag,
        )?;
        gauge(
            &mut enc,
            "entity_sync_cache_bytes",
            "Bytes held by the node cache (latest rows of SHARED keys with subscribers here).",
            m.cache_bytes.load(Relaxed),
        )?;
        gauge(
            &mut enc,
            "entity_sync_cache_keys",
            "Keys held by the node cache.",
            m.cache_keys.load(Relaxed),
        )?;
        gauge(
            &mut enc,
            "entity_sync_token_subscriptions",
            "Subscriptions held on a subscribe token (they end when it expires).",
            m.token_subscriptions.load(Relaxed),
        )?;
        gauge(
            &mut enc,
            "entity_sync_ready",
            "1 while /readyz answers 200 and gRPC health is SERVING.",
            u64::from(live.ready),
        )?;
        gauge(
            &mut enc,
            "entity_sync_bus_available",
            "1 while this node receives changes: connected to the bus, the change stream answers and the consumer is not stalled (always 1 in-process).",
            u64::from(live.bus_available),
        )?;
        {
            let mut reasons = enc.encode_descriptor(
                "entity_sync_not_ready",
                "1 for the reason /readyz gives while the node is not ready, 0 for the others.",
                None,
                MetricType::Gauge,
            )?;
            for reason in crate::ops::health::NotReady::ALL {
                let labels = [("reason", reason.as_str())];
                ConstGauge::new(u64::from(live.not_ready == Some(reason)))
                    .encode(reasons.encode_family(&labels.as_slice())?)?;
            }
        }
        {
            let mut streams = enc.encode_descriptor(
                "entity_sync_resolver_streams",
                "Registered resolver streams by the name their backend registered (capped; the rest as \"other\").",
                None,
                MetricType::Gauge,
            )?;
            for (name, n) in &live.resolver_streams {
                let labels = [("name", SharedStr(name))];
                ConstGauge::new(*n as u64).encode(streams.encode_family(&labels.as_slice())?)?;
            }
        }
        let counters = [
            (
                "entity_sync_connections",
                "Websocket connections accepted.",
                &m.connections_total,
            ),
            (
                "entity_sync_pushes",
                "Push frames queued to clients.",
                &m.pushes_total,
            ),
            (
                "entity_sync_push_bytes",
                "Bytes of push frames queued to clients.",
                &m.push_bytes_total,
            ),
            (
                "entity_sync_pushes_skipped_stale",
                "Pushes not sent because the subscriber already held a newer version.",
                &m.pushes_skipped_stale_total,
            ),
            (
                "entity_sync_pushes_skipped_unchanged",
                "Change pushes not sent because their rows were the ones the subscriber got last.",
                &m.pushes_skipped_unchanged_total,
            ),
            (
                "entity_sync_slow_client_closes",
                "Connections closed because their outbound queue overflowed.",
                &m.slow_client_closes_total,
            ),
            (
                "entity_sync_outbox_replaced",
                "Queued pushes dropped for a newer push of the same key before they were written.",
                &m.outbox_replaced_total,
            ),
            (
                "entity_sync_notify_keys",
                "Keys accepted by Notify.",
                &m.notify_keys_total,
            ),
            (
                "entity_sync_notify_duplicates",
                "Notify calls answered from the idempotency window.",
                &m.notify_duplicates_total,
            ),
            (
                "entity_sync_changes_consumed",
                "Change keys consumed from the bus.",
                &m.changes_consumed_total,
            ),
            (
                "entity_sync_resolve_timeouts",
                "Resolve requests that passed their deadline.",
                &m.resolve_timeouts_total,
            ),
            (
                "entity_sync_resolve_retries",
                "Change resolves retried after a failure.",
                &m.resolve_retries_total,
            ),
            (
                "entity_sync_resolve_joined",
                "Subscribe resolves that joined a request in flight for the same key and secret.",
                &m.resolve_joined_total,
            ),
            (
                "entity_sync_revocations",
                "Subscriptions ended by a FORBIDDEN change resolve.",
                &m.revocations_total,
            ),
            (
                "entity_sync_secret_rechecks",
                "Held keys re-resolved because their connection sent a new secret.",
                &m.secret_rechecks_total,
            ),
            (
                "entity_sync_resyncs",
                "Times changes were lost to stream retention and every subscribed key was re-resolved.",
                &m.resyncs_total,
            ),
            (
                "entity_sync_cluster_resolves",
                "Resolves sent to another node over NATS (no local resolver).",
                &m.cluster_resolves_total,
            ),
            (
                "entity_sync_pass_through",
                "Pass-through messages forwarded to resolvers.",
                &m.pass_through_total,
            ),
            (
                "entity_sync_cache_hits",
                "Resumed subscribes whose version the node cache placed (no bus request), and token subscribes whose snapshot it held (no resolve).",
                &m.cache_hits_total,
            ),
            (
                "entity_sync_cache_misses",
                "Resumed subscribes whose version the node cache could not place (asked the bus), and token subscribes whose snapshot it did not hold.",
                &m.cache_misses_total,
            ),
            (
                "entity_sync_cache_evictions",
                "Keys dropped from the node cache to stay within --cache-max-bytes.",
                &m.cache_evictions_total,
            ),
            (
                "entity_sync_resumed_current",
                "Subscribes with a version answered current: true (no snapshot sent).",
                &m.resumed_current_total,
            ),
            (
                "entity_sync_token_refreshes",
                "Subscriptions a newer subscribe token renewed, with no resolve and no push.",
                &m.token_refreshes_total,
            ),
            (
                "entity_sync_token_expiries",
                "Subscriptions the node ended because their subscribe token expired.",
                &m.token_expiries_total,
            ),
            (
                "entity_sync_resumed_snapshot",
                "Subscribes with a version that got a snapshot (the key changed, or the version could not be placed).",
                &m.resumed_snapshot_total,
            ),
            (
                "entity_sync_relay_published",
                "SHARED changes this node resolved once for the whole cluster and published.",
                &m.relay_published_total,
            ),
            (
                "entity_sync_relay_unheld",
                "SHARED changes the relay skipped because no node holds their key.",
                &m.relay_unheld_total,
            ),
            (
                "entity_sync_relay_received",
                "Rows received from the cluster relay and pushed to this node's subscribers.",
                &m.relay_received_total,
            ),
            (
                "entity_sync_relay_fallbacks",
                "SHARED changes this node resolved itself because the relay's rows did not come in time.",
                &m.relay_fallbacks_total,
            ),
            (
                "entity_sync_refresh_changes",
                "Refresh changes (keys re-resolved without a Notify) this node stored on the bus.",
                &m.refresh_changes_total,
            ),
        ];
        for (name, help, value) in counters {
            counter(&mut enc, name, help, value.load(Relaxed))?;
        }
        {
            let mut tokens = enc.encode_descriptor(
                "entity_sync_subscribe_tokens",
                "Subscribe tokens verified, by result (valid, invalid, expired).",
                None,
                MetricType::Counter,
            )?;
            for (result, value) in [
                ("valid", &m.tokens_valid_total),
                ("invalid", &m.tokens_invalid_total),
                ("expired", &m.tokens_expired_total),
            ] {
                let labels = [("result", result)];
                ConstCounter::new(value.load(Relaxed))
                    .encode(tokens.encode_family(&labels.as_slice())?)?;
            }
        }
        {
            let mut requests = enc.encode_descriptor(
                "entity_sync_resolve_requests",
                "Resolve requests sent to resolvers, by reason.",
                None,
                MetricType::Counter,
            )?;
            for (reason, value) in [
                ("subscribe", &m.resolve_requests_subscribe_total),
                ("change", &m.resolve_requests_change_total),
            ] {
                let labels = [("reason", reason)];
                ConstCounter::new(value.load(Relaxed))
                    .encode(requests.encode_family(&labels.as_slice())?)?;
            }
        }
        {
            let mut errors = enc.encode_descriptor(
                "entity_sync_client_errors",
                "Error frames sent to clients, by code.",
                None,
                MetricType::Counter,
            )?;
            for code in ErrorCode::ALL {
                let labels = [("code", code.as_str())];
                ConstCounter::new(m.client_errors[code.index()].load(Relaxed))
                    .encode(errors.encode_family(&labels.as_slice())?)?;
            }
        }
        m.resolve_duration.encode(enc.encode_descriptor(
            "entity_sync_resolve_duration_seconds",
            "Time to resolve one key, locally or through another node, by entity (capped; the rest as \"other\") and status.",
            None,
            MetricType::Histogram,
        )?)?;
        m.notify_to_push.encode(enc.encode_descriptor(
            "entity_sync_notify_to_push_seconds",
            "From the Notify that accepted a change (its node's clock) to the push of the resolved rows into subscribers' queues (this node's clock).",
            None,
            MetricType::Histogram,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entity_labels_are_capped() {
        let metrics = Metrics::default();
        for i in 0..MAX_ENTITY_LABELS + 5 {
            let entity: Arc<str> = Arc::from(format!("e{i}"));
            metrics.resolve_done(&entity, "ok", Duration::from_millis(1));
        }
        // Every entity seen before the cap keeps its own label.
        let first: Arc<str> = Arc::from("e0");
        metrics.resolve_done(&first, "ok", Duration::from_millis(1));
        let text = Arc::new(metrics).render(Live::default());
        let series = text
            .lines()
            .filter(|l| l.starts_with("entity_sync_resolve_duration_seconds_count{"))
            .count();
        assert_eq!(series, MAX_ENTITY_LABELS + 1, "{text}");
        assert!(
            text.contains(
                "entity_sync_resolve_duration_seconds_count{entity=\"other\",status=\"ok\"} 5\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "entity_sync_resolve_duration_seconds_count{entity=\"e0\",status=\"ok\"} 2\n"
            ),
            "{text}"
        );
    }

    /// Only an answer from a resolver gives an entity a label; once it
    /// has one, every outcome of it is counted under it.
    #[test]
    fn unanswered_entities_get_no_label() {
        let metrics = Metrics::default();
        let (bogus, real): (Arc<str>, Arc<str>) = (Arc::from("bogus"), Arc::from("real"));
        for status in ["no_resolver", "timeout", "closed"] {
            metrics.resolve_done(&bogus, status, Duration::from_millis(1));
            metrics.resolve_done(&real, status, Duration::from_millis(1));
        }
        metrics.resolve_done(&real, "ok", Duration::from_millis(1));
        metrics.resolve_done(&real, "timeout", Duration::from_millis(1));
        let text = Arc::new(metrics).render(Live::default());
        let count = |entity: &str, status: &str| {
            format!(
                "entity_sync_resolve_duration_seconds_count{{entity=\"{entity}\",status=\"{status}\"}}"
            )
        };
        for (series, value) in [
            (count("other", "no_resolver"), 2),
            (count("other", "timeout"), 2),
            (count("other", "closed"), 2),
            (count("real", "ok"), 1),
            (count("real", "timeout"), 1),
        ] {
            assert!(
                text.contains(&format!("{series} {value}\n")),
                "{series} in {text}"
            );
        }
        assert!(!text.contains("entity=\"bogus\""), "{text}");
    }

    #[test]
    fn resolver_names_are_capped_and_plain() {
        let other: Arc<str> = Arc::from(OTHER_LABEL);
        let mut counts: Vec<(Arc<str>, usize)> = (0..MAX_RESOLVER_NAME_LABELS + 3)
            .map(|i| (Arc::from(format!("svc{i:02}")), 1))
            .collect();
        counts.push((Arc::from("evil\"}\n"), 2));
        let folded = fold_resolver_names(counts, &other);
        assert_eq!(folded.len(), MAX_RESOLVER_NAME_LABELS + 1);
        assert_eq!(folded.last().unwrap(), &(other, 5));
    }

    #[test]
    fn existing_names_and_types_are_kept() {
        let metrics = Arc::new(Metrics::default());
        Metrics::inc(&metrics.pushes_total);
        metrics.client_error(ErrorCode::Forbidden);
        let text = metrics.render(Live {
            bus_connected: true,
            bus_head: 7,
            ..Live::default()
        });
        for line in [
            "# TYPE entity_sync_pushes_total counter\n",
            "entity_sync_pushes_total 1\n",
            "entity_sync_bus_head_sequence 7\n",
            "entity_sync_bus_connected 1\n",
            "entity_sync_client_errors_total{code=\"forbidden\"} 1\n",
            "entity_sync_resolve_requests_total{reason=\"change\"} 0\n",
            "# TYPE entity_sync_notify_to_push_seconds histogram\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }
    }
}
