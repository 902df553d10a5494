//! The dispatcher: consumes change keys from the bus, coalesces them per key, resolves and fans out pushes.
//!
//! Per key at most one change resolve runs at a time. Changes that arrive
//! meanwhile only raise the key's pending sequence, so a burst causes at most
//! one more resolve (coalescing). Failed resolves retry with backoff while the
//! key has subscribers: a push is never lost while its subscribers stay.
//! This file consumes the bus and schedules; one key's change resolve, its
//! retries and what its outcome does (a push fanned out, a revocation) are
//! in `change`.
//! The subscribe flow (snapshot, then activation) is the room next door,
//! `subscribe`: it shares this state, to agree with the change flow on
//! versions and missed changes.

mod change;
mod refresh;
pub(crate) mod registry;
pub(crate) mod subscribe;

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::{Semaphore, mpsc, watch};
use tracing::Instrument;

use crate::{
    bus::{Bus, BusEvent},
    config::WsConfig,
    dispatcher::registry::{Audience, Registry},
    key::Key,
    ops::metrics::Metrics,
    ops::tasks::Tasks,
    ops::trace::{ChangeMeta, TraceId},
    resolving::{Resolvers, relay},
};

/// How often what the node keeps for departed keys is dropped.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// A key's change resolve in flight (see `change`).
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
    flights: Mutex<HashMap<Key, Flight>>,
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

impl Dispatcher {
    /// The registry this dispatcher fans out to.
    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The resolvers this dispatcher resolves with.
    pub(crate) fn resolvers(&self) -> &Resolvers {
        &self.inner.resolvers
    }

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
        tasks.spawn(dispatcher.clone().sweep_departed());
        if let Some(received) = dispatcher
            .inner
            .resolvers
            .relay()
            .and_then(|relay| relay.take_received())
        {
            tasks.spawn(dispatcher.clone().receive_relayed(received));
        }
        refresh::start(&dispatcher);
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
                        let version = change.version;
                        self.schedule(change.key, version, change.meta);
                        self.inner.applied.fetch_max(version, Ordering::AcqRel);
                    }
                    self.publish_applied();
                }
                Some(BusEvent::Resync { version }) => self.resync(version),
            }
        }
    }

    /// Re-resolves every subscribed key: changes were lost on the bus, so
    /// any key may be stale.
    fn resync(&self, version: u64) {
        // Any key may have changed, also keys nobody holds right now.
        self.inner.resolvers.note_all_changed();
        self.inner.resolvers.cache().note_all_changed(version);
        let keys = self.inner.registry.keys();
        let meta = ChangeMeta {
            trace: TraceId::generate(),
            notified_at_us: 0,
        };
        tracing::info!(
            keys = keys.len(),
            version,
            trace_id = %meta.trace,
            "resync: re-resolving every subscribed key"
        );
        // Resolved here: the relay knows nothing of a resync.
        for key in keys {
            self.schedule_as(key, version, meta, true);
        }
        // After scheduling, as in `run`.
        self.inner.applied.fetch_max(version, Ordering::AcqRel);
        self.publish_applied();
    }

    /// Drops what the node keeps for keys whose last subscriber left (their
    /// cache entries), a few times a second.
    async fn sweep_departed(self) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.inner.tasks.cancelled() => return,
                _ = every.tick() => {}
            }
            for key in self.inner.registry.take_departed() {
                self.inner.resolvers.cache().remove(&key);
                if let Some(relay) = self.inner.resolvers.relay() {
                    relay.release(&key);
                }
            }
        }
    }

    /// Pushes the rows the cluster relay delivers for keys held here.
    async fn receive_relayed(self, mut received: mpsc::Receiver<relay::Received>) {
        let Some(relay) = self.inner.resolvers.relay().cloned() else {
            return;
        };
        loop {
            let rows = tokio::select! {
                _ = self.inner.tasks.cancelled() => return,
                rows = received.recv() => rows,
            };
            let Some(rows) = rows else {
                return;
            };
            let relay::Received {
                key,
                change_version,
                outcome,
                meta,
            } = rows;
            let Some(outcome) = outcome else {
                relay.applied(&key, change_version, None, true);
                continue;
            };
            if !relay.is_news(&key, change_version) {
                continue;
            }
            Metrics::inc(&self.inner.metrics.relay_received_total);
            let (attempt, frame) = self.apply(&key, change_version, meta, outcome, Audience::All);
            relay.applied(
                &key,
                change_version,
                frame,
                attempt == change::Attempt::Retry,
            );
        }
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

    /// Starts a change resolve of `key`, or folds `version` into the running one.
    fn schedule(&self, key: Key, version: u64, meta: ChangeMeta) {
        self.schedule_as(key, version, meta, false);
    }

    /// [`Self::schedule`]; `local`: a new resolve runs here, not through the
    /// relay.
    fn schedule_as(&self, key: Key, version: u64, meta: ChangeMeta, local: bool) {
        // First the pool, then the registry: a subscribe the registry does
        // not mark as having missed this change (it came after) must not
        // join a snapshot resolve sent before it either.
        self.inner.resolvers.note_change(&key);
        self.inner.resolvers.cache().note_change(&key, version);
        if !self.inner.registry.note_change(&key) {
            return;
        }
        tracing::debug!(key = %key, version, trace_id = %meta.trace, "change dispatched");
        let mut flights = self.inner.flights.lock().unwrap();
        match flights.entry(key) {
            Entry::Occupied(mut flight) => {
                let pending = &mut flight.get_mut().pending;
                if pending.is_none_or(|(p, _)| version >= p) {
                    *pending = Some((version, meta));
                }
            }
            Entry::Vacant(slot) => {
                let key = slot.key().clone();
                slot.insert(Flight { pending: None });
                drop(flights);
                let span = tracing::debug_span!("change", key = %key);
                let this = self.clone();
                self.inner.tasks.spawn(
                    async move { this.resolve_loop(key, version, meta, local).await }
                        .instrument(span),
                );
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        config::{NatsConfig, ResolveConfig},
        resolving::pool::ResolverPool,
    };

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
}
