//! The dispatcher: consumes change keys from the bus, coalesces them per key, resolves and fans out pushes.
//!
//! Per key at most one change resolve runs at a time. Changes that arrive
//! meanwhile only raise the key's pending sequence, so a burst causes at most
//! one more resolve (coalescing). Failed resolves retry with backoff while the
//! key has subscribers: a push is never lost while its subscribers stay.
//! The subscribe flow (snapshot, then activation) is the room next door,
//! `subscribe`: it shares this state, to agree with the change flow on
//! versions and missed changes.

pub(crate) mod registry;
pub(crate) mod subscribe;

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use entity_sync_backend::Backoff;
use futures_util::future::join_all;
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::Instrument;

use crate::{
    bus::{Bus, BusEvent},
    config::WsConfig,
    dispatcher::registry::{Audience, Registry},
    key::ChangeKey,
    ops::metrics::Metrics,
    ops::tasks::Tasks,
    ops::trace::{ChangeMeta, TraceId},
    proto::v1::{FetchMode, Reason},
    resolving::{ResolveErrorKind, Resolved, Resolvers, Rows},
    websocket::protocol::{ErrorCode, PushFrame, error_frame},
};

/// First retry delay of a failed change resolve (jittered, see
/// [`Backoff`]); doubles up to [`RETRY_MAX`].
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
struct Flight {
    /// Highest sequence of a change that arrived while the resolve ran, and
    /// that change's trace.
    pending: Option<(u64, ChangeMeta)>,
}

/// The dispatcher: a cheap-clone handle.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    resolvers: Resolvers,
    bus: Bus,
    metrics: Arc<Metrics>,
    /// Keys with a change resolve running. A std `Mutex`: touched once per
    /// consumed change and once per finished resolve, never across `.await`.
    flights: Mutex<HashMap<ChangeKey, Flight>>,
    tasks: Tasks,
    /// `--compat-bare-rows`: the shape of push frames.
    bare_rows: bool,
    /// Highest bus sequence consumed.
    applied: AtomicU64,
    /// `applied` after each consumed batch, for subscribes that wait to
    /// join a resolve in flight (see `subscribe`).
    applied_watch: watch::Sender<u64>,
    /// When a subscribe's wait for `applied` last ran out, in milliseconds
    /// after `started` (0: never).
    join_wait_expired_ms: AtomicU64,
    started: std::time::Instant,
    /// Snapshot resolves running at once on this node (`--max-snapshot-resolves`).
    snapshot_permits: Semaphore,
}

/// How a resolve attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Done,
    Retry,
}

impl Dispatcher {
    /// Creates the dispatcher and starts consuming `events`, the bus's
    /// change keys, until the bus ends or the node shuts down.
    pub(crate) fn start(
        config: &WsConfig,
        registry: Registry,
        resolvers: Resolvers,
        bus: Bus,
        events: mpsc::Receiver<BusEvent>,
        metrics: Arc<Metrics>,
        tasks: &Tasks,
    ) -> Self {
        let dispatcher = Self::new(config, registry, resolvers, bus, metrics, tasks);
        tasks.spawn(dispatcher.clone().run(events));
        dispatcher
    }

    fn new(
        config: &WsConfig,
        registry: Registry,
        resolvers: Resolvers,
        bus: Bus,
        metrics: Arc<Metrics>,
        tasks: &Tasks,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                bus: bus.clone(),
                registry,
                resolvers,
                metrics,
                flights: Mutex::new(HashMap::new()),
                tasks: tasks.clone(),
                bare_rows: config.compat_bare_rows,
                // Where the bus starts: the lag gauge is the bus head minus this.
                applied: AtomicU64::new(bus.head()),
                applied_watch: watch::Sender::new(bus.head()),
                join_wait_expired_ms: AtomicU64::new(0),
                started: std::time::Instant::now(),
                snapshot_permits: Semaphore::new(config.max_snapshot_resolves),
            }),
        }
    }

    /// Consumes the bus until it ends or the node shuts down.
    async fn run(self, mut events: mpsc::Receiver<BusEvent>) {
        loop {
            let event = tokio::select! {
                _ = self.inner.tasks.cancelled() => return,
                event = events.recv() => event,
            };
            match event {
                None => return,
                Some(BusEvent::Changes(batch)) => {
                    self.inner
                        .metrics
                        .changes_consumed_total
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    for change in batch {
                        // `applied` moves only after the change is scheduled:
                        // a subscribe that reads it may join a resolve in
                        // flight (see `subscribe`).
                        let seq = change.seq;
                        self.schedule(change.key, seq, change.meta);
                        self.inner.applied.fetch_max(seq, Ordering::AcqRel);
                    }
                    self.publish_applied();
                }
                Some(BusEvent::Resync { seq }) => self.resync(seq),
            }
        }
    }

    /// Re-resolves every subscribed key: changes were lost on the bus, so
    /// any key may be stale.
    fn resync(&self, seq: u64) {
        // Any key may have changed, also keys nobody holds right now.
        self.inner.resolvers.note_all_changed();
        let keys = self.inner.registry.keys();
        let meta = ChangeMeta {
            trace: TraceId::generate(),
            notified_at_us: 0,
        };
        tracing::info!(
            keys = keys.len(),
            seq,
            trace_id = %meta.trace,
            "resync: re-resolving every subscribed key"
        );
        for key in keys {
            self.schedule(key, seq, meta);
        }
        // After scheduling, as in `run`.
        self.inner.applied.fetch_max(seq, Ordering::AcqRel);
        self.publish_applied();
    }

    /// Wakes subscribes waiting for `applied` (only when there are any).
    fn publish_applied(&self) {
        if self.inner.applied_watch.receiver_count() > 0 {
            self.inner.applied_watch.send_replace(self.applied());
        }
    }

    /// Highest bus sequence consumed by this node.
    pub(crate) fn applied(&self) -> u64 {
        self.inner.applied.load(Ordering::Acquire)
    }

    /// Starts a change resolve of `key`, or folds `seq` into the running one.
    fn schedule(&self, key: ChangeKey, seq: u64, meta: ChangeMeta) {
        // First the pool, then the registry: a subscribe the registry does
        // not mark as having missed this change (it came after) must not
        // join a snapshot resolve sent before it either.
        self.inner.resolvers.note_change(&key);
        if !self.inner.registry.note_change(&key) {
            return;
        }
        tracing::debug!(key = %key, seq, trace_id = %meta.trace, "change dispatched");
        let mut flights = self.inner.flights.lock().unwrap();
        match flights.entry(key) {
            Entry::Occupied(mut flight) => {
                let pending = &mut flight.get_mut().pending;
                if pending.is_none_or(|(p, _)| seq >= p) {
                    *pending = Some((seq, meta));
                }
            }
            Entry::Vacant(slot) => {
                let key = slot.key().clone();
                slot.insert(Flight { pending: None });
                drop(flights);
                let span = tracing::debug_span!("change", key = %key);
                let this = self.clone();
                self.inner
                    .tasks
                    .spawn(async move { this.resolve_loop(key, seq, meta).await }.instrument(span));
            }
        }
    }

    async fn resolve_loop(&self, key: ChangeKey, mut seq: u64, mut meta: ChangeMeta) {
        let mut failures: u32 = 0;
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
        loop {
            if self.inner.tasks.is_cancelled() {
                self.land(&key);
                return;
            }
            if self.resolve_change(&key, seq, meta).await == Attempt::Retry {
                failures += 1;
                if !self.inner.registry.has_active(&key) {
                    self.land(&key);
                    return;
                }
                Metrics::inc(&self.inner.metrics.resolve_retries_total);
                let delay = backoff.next_delay();
                tracing::debug!(failures, ?delay, "change resolve failed, retrying");
                tokio::select! {
                    _ = self.inner.tasks.cancelled() => {
                        self.land(&key);
                        return;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                if let Some((pending, pending_meta)) = self.take_pending(&key)
                    && pending >= seq
                {
                    (seq, meta) = (pending, pending_meta);
                }
                continue;
            }
            failures = 0;
            backoff.reset();
            // Done: run once more if changes came in meanwhile, else land.
            let mut flights = self.inner.flights.lock().unwrap();
            match flights.get_mut(&key).and_then(|f| f.pending.take()) {
                Some((pending, pending_meta)) => (seq, meta) = (pending, pending_meta),
                None => {
                    flights.remove(&key);
                    return;
                }
            }
        }
    }

    fn take_pending(&self, key: &ChangeKey) -> Option<(u64, ChangeMeta)> {
        let mut flights = self.inner.flights.lock().unwrap();
        flights.get_mut(key).and_then(|f| f.pending.take())
    }

    fn land(&self, key: &ChangeKey) {
        self.inner.flights.lock().unwrap().remove(key);
    }

    async fn resolve_change(&self, key: &ChangeKey, seq: u64, meta: ChangeMeta) -> Attempt {
        let Some(mode) = self.inner.resolvers.fetch_mode(&key.entity) else {
            return Attempt::Retry;
        };
        match mode {
            FetchMode::Shared => {
                let result = self
                    .inner
                    .resolvers
                    .resolve(key, Arc::from(""), Reason::Change, true)
                    .await;
                self.apply(key, seq, meta, result, Audience::All)
            }
            _ => {
                let secrets = self.inner.registry.active_secrets(key);
                let results = join_all(secrets.iter().map(|secret| {
                    self.inner
                        .resolvers
                        .resolve(key, secret.clone(), Reason::Change, false)
                }))
                .await;
                let mut attempt = Attempt::Done;
                for (secret, result) in secrets.iter().zip(results) {
                    if self.apply(key, seq, meta, result, Audience::Secret(secret))
                        == Attempt::Retry
                    {
                        attempt = Attempt::Retry;
                    }
                }
                attempt
            }
        }
    }

    fn apply(
        &self,
        key: &ChangeKey,
        seq: u64,
        meta: ChangeMeta,
        result: Resolved,
        audience: Audience<'_>,
    ) -> Attempt {
        tracing::debug!(
            key = %key,
            seq,
            trace_id = %meta.trace,
            status = crate::resolving::status_label(&result),
            "change resolved"
        );
        let err = match result {
            Ok(Rows { rows, version }) => {
                let version = if version != 0 { version } else { seq };
                self.fan_out(
                    key,
                    &PushFrame::build(key, version, &rows, self.inner.bare_rows),
                    audience,
                    meta,
                );
                return Attempt::Done;
            }
            Err(err) => err,
        };
        match err.kind() {
            // The row is gone: subscribers learn it from an empty push and
            // stay subscribed in case it comes back.
            ResolveErrorKind::NotFound => {
                self.fan_out(
                    key,
                    &PushFrame::build(key, seq, &[], self.inner.bare_rows),
                    audience,
                    meta,
                );
                Attempt::Done
            }
            ResolveErrorKind::Forbidden => {
                let message = err
                    .resolver_message()
                    .unwrap_or("access to this key was revoked");
                let error = error_frame(ErrorCode::Forbidden, message, Some(key));
                let revoked = self.inner.registry.revoke(key, audience, &error);
                let metrics = &self.inner.metrics;
                metrics
                    .revocations_total
                    .fetch_add(revoked as u64, Ordering::Relaxed);
                metrics.client_errors[ErrorCode::Forbidden.index()]
                    .fetch_add(revoked as u64, Ordering::Relaxed);
                tracing::info!(key = %key, revoked, trace_id = %meta.trace, "subscriptions revoked by resolver");
                Attempt::Done
            }
            ResolveErrorKind::Failed | ResolveErrorKind::InvalidAnswer => {
                tracing::warn!(key = %key, %err, trace_id = %meta.trace, "change resolve failed");
                Attempt::Retry
            }
            ResolveErrorKind::Timeout | ResolveErrorKind::NoResolver => Attempt::Retry,
            ResolveErrorKind::Closed => Attempt::Done,
        }
    }

    fn fan_out(
        &self,
        key: &ChangeKey,
        frame: &PushFrame,
        audience: Audience<'_>,
        meta: ChangeMeta,
    ) {
        let fan = self.inner.registry.fan_out(key, frame, audience);
        let metrics = &self.inner.metrics;
        // Once per fan-out, not per subscriber.
        if fan.delivered > 0
            && let Some(took) = meta.since_notified()
        {
            metrics.notify_to_push(took);
        }
        tracing::debug!(
            key = %key,
            version = frame.version,
            delivered = fan.delivered,
            trace_id = %meta.trace,
            "pushed"
        );
        if fan.replaced > 0 {
            metrics
                .outbox_replaced_total
                .fetch_add(fan.replaced as u64, Ordering::Relaxed);
        }
        metrics
            .pushes_total
            .fetch_add(fan.delivered as u64, Ordering::Relaxed);
        metrics.push_bytes_total.fetch_add(
            (fan.delivered * frame.payload.len()) as u64,
            Ordering::Relaxed,
        );
        metrics
            .pushes_skipped_stale_total
            .fetch_add(fan.stale as u64, Ordering::Relaxed);
        if fan.unchanged > 0 {
            metrics
                .pushes_skipped_unchanged_total
                .fetch_add(fan.unchanged as u64, Ordering::Relaxed);
        }
        // A connection this closed as too slow is counted by its session,
        // which sees every such close, whatever frame overflowed the queue.
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use bytes::Bytes;

    use super::*;
    use crate::{
        config::{NatsConfig, ResolveConfig},
        dispatcher::registry::Connection,
        resolving::pool::ResolverPool,
        websocket::outbox::CloseReason,
    };

    fn key() -> ChangeKey {
        ChangeKey::new("items", "1").unwrap()
    }

    /// A dispatcher on the in-process bus with no resolver, and what it uses.
    pub(crate) async fn in_memory_dispatcher() -> (Arc<Metrics>, Tasks, Registry, Dispatcher) {
        let metrics = Arc::new(Metrics::default());
        let tasks = Tasks::default();
        let (bus, _events, _) = Bus::start(&NatsConfig::default(), "n", metrics.clone(), &tasks)
            .await
            .unwrap();
        let pool = ResolverPool::new(&ResolveConfig::default(), metrics.clone());
        let registry = Registry::new();
        let dispatcher = Dispatcher::new(
            &WsConfig::default(),
            registry.clone(),
            Resolvers::new(pool, None, metrics.clone()),
            bus,
            metrics.clone(),
            &tasks,
        );
        (metrics, tasks, registry, dispatcher)
    }

    #[tokio::test]
    async fn a_push_that_replaces_an_unwritten_one_is_counted_and_timed() {
        let (metrics, tasks, registry, dispatcher) = in_memory_dispatcher().await;
        let conn = Arc::new(Connection::new(1, 1 << 20));
        registry.add_pending(&key(), &conn, 10);
        registry.activate(
            &key(),
            conn.id,
            0,
            None,
            &PushFrame::build(&key(), 1, &[], false),
        );
        // The snapshot is written; what follows waits unwritten.
        assert_eq!(conn.outbox.drain(&mut Vec::new()), None);
        let meta = ChangeMeta::accepted_now(TraceId::generate());
        for version in [2, 3, 4] {
            // Rows that change: unchanged rows would not be sent.
            let rows = [Bytes::from(version.to_string())];
            dispatcher.fan_out(
                &key(),
                &PushFrame::build(&key(), version, &rows, false),
                Audience::All,
                meta,
            );
        }
        // 3 replaces 2, 4 replaces 3.
        assert_eq!(metrics.outbox_replaced_total.load(Relaxed), 2);
        assert_eq!(metrics.pushes_total.load(Relaxed), 3);
        let text = metrics.render(crate::ops::metrics::Live::default());
        assert!(
            text.contains("entity_sync_notify_to_push_seconds_count 3\n"),
            "{text}"
        );
        // A change without an accept time (a resync) is not timed.
        dispatcher.fan_out(
            &key(),
            &PushFrame::build(&key(), 5, &[Bytes::from_static(b"5")], false),
            Audience::All,
            ChangeMeta::default(),
        );
        let text = metrics.render(crate::ops::metrics::Live::default());
        assert!(
            text.contains("entity_sync_notify_to_push_seconds_count 3\n"),
            "{text}"
        );
        tasks.token().cancel();
    }

    #[tokio::test]
    async fn a_fan_out_overflow_is_left_to_the_session_to_count() {
        let (metrics, tasks, registry, dispatcher) = in_memory_dispatcher().await;
        let conn = Arc::new(Connection::new(1, 1024));
        registry.add_pending(&key(), &conn, 10);
        registry.activate(
            &key(),
            conn.id,
            0,
            None,
            &PushFrame::build(&key(), 1, &[], false),
        );
        let big = Bytes::from(format!("\"{}\"", "x".repeat(2048)));
        dispatcher.fan_out(
            &key(),
            &PushFrame::build(&key(), 2, &[big], false),
            Audience::All,
            ChangeMeta::default(),
        );
        assert_eq!(
            conn.outbox.drain(&mut Vec::new()),
            Some(CloseReason::Overflow)
        );
        assert_eq!(metrics.slow_client_closes_total.load(Relaxed), 0);
        assert_eq!(metrics.pushes_total.load(Relaxed), 0);
        tasks.token().cancel();
    }
}
