//! The refresh safety net: held keys of entities registered with a `refresh_interval_ms` are re-resolved about that often, without a `Notify`.
//!
//! A backend write that forgot its `Notify` would leave every client stale
//! until the next one; the refresh bounds that. The node does not resolve
//! on its own: it stores the due keys on the bus as changes (reason CHANGE),
//! and they flow like any change, so every node holding a key resolves it,
//! and a subscriber whose rows did not change gets nothing (the registry
//! skips unchanged rows).
//!
//! **Once per cluster.** A key's interval is cut into slots that every node
//! agrees on: its phase is a stable hash of the key modulo the interval (so
//! keys spread over the interval), its slot at Unix time `t` (ms) is
//! `(t + phase) / interval`, and a key is due when its slot changes. Each
//! due key is stored under the message id `refresh.{entity}.{id}.{slot}`
//! (key parts never contain `.`), so the bus keeps one change per key and
//! slot whichever nodes hold it (JetStream's duplicate window; nodes publish
//! within a tick of the slot's start, clocks permitting).
//!
//! **Scale.** The task never scans every held key per tick: [`Schedule`]
//! orders the keys by due time, and the registry announces keys that got
//! their first subscriber through a bounded [`KeyFeed`]. Only when that feed
//! overflowed, or the set of intervals changed (a Register, a stream gone, a
//! report from another node), is the registry read in full, once. Keys
//! nobody holds any more leave the schedule when they fall due. A tick
//! publishes the keys due by then in batches of [`REFRESH_BATCH`]; when the
//! bus refuses, the tick's remaining keys are skipped until their next slot,
//! so nothing piles up.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc::{self, error::TrySendError};

use super::Dispatcher;
use crate::{
    bus::REFRESH_BATCH,
    key::Key,
    ops::trace::{ChangeMeta, TraceId, unix_micros},
};

/// How often the task looks for due keys: a key is refreshed at most this
/// long after its slot starts.
const TICK: Duration = Duration::from_millis(200);
/// Announced keys buffered between two ticks; past it the next tick reads
/// the registry in full instead.
const FEED_CAPACITY: usize = 8192;
/// Most warnings about a refusing bus: one per this period (the rest at debug).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Where the registry announces keys that got their first subscriber.
pub(crate) struct KeyFeed {
    tx: mpsc::Sender<Key>,
    /// A key could not be queued: the schedule must be rebuilt from the registry.
    overflowed: AtomicBool,
}

impl KeyFeed {
    /// Announces `key` (never waits: a full feed only sets a flag).
    pub(crate) fn offer(&self, key: &Key) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(key.clone()) {
            self.overflowed.store(true, Ordering::Release);
        }
    }
}

/// A stable 64-bit hash of `key` (FNV-1a over entity, a 0 byte, id): the
/// same on every node and every version of the node.
pub(crate) fn key_hash(key: &Key) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = key.entity.bytes().chain([0]).chain(key.id.bytes());
    bytes.fold(OFFSET, |hash, b| (hash ^ u64::from(b)).wrapping_mul(PRIME))
}

/// Where in each interval `key` falls due, in ms.
pub(crate) fn phase(key: &Key, interval_ms: u32) -> u64 {
    key_hash(key) % u64::from(interval_ms)
}

/// The slot of a key with `phase` at Unix time `unix_ms`.
pub(crate) fn slot(unix_ms: u64, phase: u64, interval_ms: u32) -> u64 {
    (unix_ms + phase) / u64::from(interval_ms)
}

/// The first time after `unix_ms` at which the key's slot changes.
pub(crate) fn next_due(unix_ms: u64, phase: u64, interval_ms: u32) -> u64 {
    let interval = u64::from(interval_ms);
    (slot(unix_ms, phase, interval_ms) + 1) * interval - phase
}

/// The bus message id of `key`'s refresh in `slot`.
pub(crate) fn message_id(key: &Key, slot: u64) -> String {
    format!("refresh.{}.{}.{slot}", key.entity, key.id)
}

/// Keys ordered by the time they fall due (Unix ms), each at most once.
#[derive(Default)]
pub(crate) struct Schedule {
    due: BTreeMap<u64, Vec<Key>>,
    scheduled: HashSet<Key>,
}

impl Schedule {
    /// Schedules `key` at `due_ms`, unless it is scheduled already.
    pub(crate) fn insert(&mut self, key: Key, due_ms: u64) -> bool {
        if !self.scheduled.insert(key.clone()) {
            return false;
        }
        self.due.entry(due_ms).or_default().push(key);
        true
    }

    /// Takes out the keys due at or before `now_ms`, earliest first.
    pub(crate) fn take_due(&mut self, now_ms: u64) -> Vec<Key> {
        let later = self.due.split_off(&(now_ms + 1));
        let due = std::mem::replace(&mut self.due, later);
        let keys: Vec<Key> = due.into_values().flatten().collect();
        for key in &keys {
            self.scheduled.remove(key);
        }
        keys
    }

    /// Keys scheduled.
    pub(crate) fn len(&self) -> usize {
        self.scheduled.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }

    pub(crate) fn clear(&mut self) {
        self.due.clear();
        self.scheduled.clear();
    }
}

/// Starts the refresh task of `dispatcher` (until the node shuts down).
pub(super) fn start(dispatcher: &Dispatcher) {
    let (tx, rx) = mpsc::channel(FEED_CAPACITY);
    let feed = Arc::new(KeyFeed {
        tx,
        overflowed: AtomicBool::new(false),
    });
    dispatcher.inner.registry.set_key_feed(feed.clone());
    let refresher = Refresher {
        dispatcher: dispatcher.clone(),
        feed,
        announced: rx,
        schedule: Schedule::default(),
        intervals: HashMap::new(),
        last_warn: None,
    };
    dispatcher.inner.tasks.spawn(refresher.run());
}

struct Refresher {
    dispatcher: Dispatcher,
    feed: Arc<KeyFeed>,
    announced: mpsc::Receiver<Key>,
    schedule: Schedule,
    /// The intervals the schedule was built for.
    intervals: HashMap<Arc<str>, u32>,
    last_warn: Option<Instant>,
}

impl Refresher {
    async fn run(mut self) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.dispatcher.inner.tasks.cancelled() => return,
                _ = ticks.tick() => {}
            }
            self.tick(unix_micros() / 1000).await;
        }
    }

    async fn tick(&mut self, now_ms: u64) {
        self.follow(now_ms);
        if self.schedule.is_empty() {
            return;
        }
        let due = self.due(now_ms);
        if due.is_empty() {
            return;
        }
        self.publish(due).await;
    }

    /// Brings the schedule up to date: new intervals or a lost announcement
    /// rebuild it from the registry; else it takes in the announced keys.
    fn follow(&mut self, now_ms: u64) {
        let intervals = self.dispatcher.inner.resolvers.refresh_intervals();
        let overflowed = self.feed.overflowed.swap(false, Ordering::AcqRel);
        if intervals != self.intervals || overflowed {
            self.intervals = intervals;
            while self.announced.try_recv().is_ok() {}
            self.schedule.clear();
            if self.intervals.is_empty() {
                return;
            }
            for key in self.dispatcher.inner.registry.keys() {
                self.add(key, now_ms);
            }
            tracing::debug!(
                keys = self.schedule.len(),
                entities = self.intervals.len(),
                "refresh schedule rebuilt"
            );
            return;
        }
        while let Ok(key) = self.announced.try_recv() {
            self.add(key, now_ms);
        }
    }

    fn add(&mut self, key: Key, now_ms: u64) {
        if let Some(&interval) = self.intervals.get(&key.entity) {
            let due = next_due(now_ms, phase(&key, interval), interval);
            self.schedule.insert(key, due);
        }
    }

    /// The due keys still held actively, with their message ids; every key
    /// still held goes back into the schedule at its next slot.
    fn due(&mut self, now_ms: u64) -> Vec<(Key, String)> {
        let registry = &self.dispatcher.inner.registry;
        let mut due = Vec::new();
        for key in self.schedule.take_due(now_ms) {
            let Some(&interval) = self.intervals.get(&key.entity) else {
                continue;
            };
            if !registry.is_held(&key) {
                continue;
            }
            let phase = phase(&key, interval);
            if registry.has_active(&key) {
                due.push((key.clone(), message_id(&key, slot(now_ms, phase, interval))));
            }
            self.schedule.insert(key, next_due(now_ms, phase, interval));
        }
        due
    }

    async fn publish(&mut self, due: Vec<(Key, String)>) {
        let inner = &self.dispatcher.inner;
        let meta = ChangeMeta {
            trace: TraceId::generate(),
            // Not a `Notify`: kept out of the notify-to-push latency.
            notified_at_us: 0,
        };
        let total = due.len();
        let mut stored = 0;
        let mut due = due.into_iter().peekable();
        while due.peek().is_some() {
            let batch: Vec<(Key, String)> = due.by_ref().take(REFRESH_BATCH).collect();
            match inner.bus.publish_refresh(batch, meta).await {
                Ok(n) => {
                    stored += n;
                    inner
                        .metrics
                        .refresh_changes_total
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(err) => {
                    // The keys are scheduled at their next slot already.
                    let warn = self.last_warn.is_none_or(|at| at.elapsed() >= WARN_EVERY);
                    if warn {
                        self.last_warn = Some(Instant::now());
                        tracing::warn!(%err, keys = total, "refresh skipped: the bus refused; retried at the keys' next slot");
                    } else {
                        tracing::debug!(%err, keys = total, "refresh skipped: the bus refused");
                    }
                    return;
                }
            }
        }
        tracing::debug!(keys = total, stored, trace_id = %meta.trace, "refresh published");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        bus::{Bus, BusEvent},
        config::{NatsConfig, ResolveConfig, WsConfig},
        dispatcher::registry::{Connection, Registry},
        ops::{metrics::Metrics, tasks::Tasks},
        proto::v1::{EntityRegistration, FetchMode, Register},
        resolving::{Resolvers, pool::ResolverPool},
        websocket::protocol::PushFrame,
    };

    fn key(id: &str) -> Key {
        Key::new("items", id).unwrap()
    }

    #[test]
    fn the_hash_is_stable_and_separates_entity_from_id() {
        // Fixed values: every node, of every version, must agree.
        // FNV-1a 64 of b"items\x001", computed independently.
        assert_eq!(key_hash(&key("1")), 0x6582_cd6c_d4b4_a444);
        assert_ne!(
            key_hash(&Key::new("ab", "c").unwrap()),
            key_hash(&Key::new("a", "bc").unwrap())
        );
        assert_eq!(message_id(&key("7"), 42), "refresh.items.7.42");
    }

    #[test]
    fn a_key_falls_due_once_per_interval_at_its_phase() {
        let interval = 1_000;
        let phase = 300;
        // Slots change where unix_ms + phase crosses a multiple of the interval.
        assert_eq!(slot(699, phase, interval), 0);
        assert_eq!(slot(700, phase, interval), 1);
        assert_eq!(slot(1_699, phase, interval), 1);
        assert_eq!(next_due(0, phase, interval), 700);
        assert_eq!(next_due(699, phase, interval), 700);
        assert_eq!(next_due(700, phase, interval), 1_700);
        // Two nodes that look at different moments of one slot agree on it,
        // and on when the next one starts.
        for t in [700, 1_000, 1_699] {
            assert_eq!(slot(t, phase, interval), 1);
            assert_eq!(next_due(t, phase, interval), 1_700);
        }
        // Due times are strictly later and exactly one interval apart.
        let mut t = 12_345;
        for _ in 0..5 {
            let due = next_due(t, phase, interval);
            assert!(due > t);
            assert_eq!(slot(due, phase, interval), slot(t, phase, interval) + 1);
            t = due;
        }
    }

    #[test]
    fn phases_spread_keys_over_the_interval() {
        let interval = 1_000;
        let mut per_tenth = [0usize; 10];
        for i in 0..10_000 {
            let p = phase(&key(&i.to_string()), interval);
            assert!(p < u64::from(interval));
            per_tenth[(p / 100) as usize] += 1;
        }
        // 1,000 expected per tenth of the interval.
        for (tenth, n) in per_tenth.iter().enumerate() {
            assert!((800..=1_200).contains(n), "tenth {tenth}: {n} keys");
        }
    }

    #[test]
    fn the_schedule_hands_out_due_keys_in_order_once() {
        let mut s = Schedule::default();
        assert!(s.insert(key("b"), 200));
        assert!(s.insert(key("a"), 100));
        assert!(s.insert(key("c"), 300));
        assert!(!s.insert(key("a"), 50), "scheduled already");
        assert_eq!(s.len(), 3);
        assert!(s.take_due(99).is_empty());
        assert_eq!(s.take_due(200), vec![key("a"), key("b")]);
        assert!(s.take_due(200).is_empty());
        assert_eq!(s.len(), 1);
        // A key taken out may come back.
        assert!(s.insert(key("a"), 400));
        assert_eq!(s.take_due(1_000), vec![key("c"), key("a")]);
        assert_eq!(s.len(), 0);
        s.insert(key("d"), 1);
        s.clear();
        assert!(s.take_due(u64::MAX - 1).is_empty());
    }

    /// 100,000 held keys: a tick takes out only what is due (about a fifth
    /// of a second's worth at a 1 s interval), not every key.
    #[test]
    fn a_tick_touches_only_the_due_keys() {
        let interval = 1_000;
        let mut s = Schedule::default();
        let now = 1_000_000;
        for i in 0..100_000 {
            let k = key(&i.to_string());
            let due = next_due(now, phase(&k, interval), interval);
            s.insert(k, due);
        }
        let due = s.take_due(now + TICK.as_millis() as u64);
        assert!(
            (15_000..=25_000).contains(&due.len()),
            "{} keys due in one tick",
            due.len()
        );
        assert_eq!(s.len(), 100_000 - due.len());
    }

    /// The refresh task's rounds on a node with the in-process bus: only
    /// held, active keys of an entity with an interval are published, once
    /// per slot, with no notify time; a refusing bus skips the round and
    /// keeps each key scheduled once; keys nobody holds leave the schedule.
    #[tokio::test]
    async fn rounds_publish_due_active_keys_once_per_slot_and_skip_when_the_bus_refuses() {
        let metrics = Arc::new(Metrics::default());
        let tasks = Tasks::default();
        let (bus, mut events, _) = Bus::start(&NatsConfig::default(), "n", metrics.clone(), &tasks)
            .await
            .unwrap();
        let pool = ResolverPool::new(&ResolveConfig::default(), metrics.clone());
        let register = Register {
            name: "backend".into(),
            entities: vec![EntityRegistration {
                entity: "items".into(),
                fetch_mode: FetchMode::Shared as i32,
                refresh_interval_ms: 1_000,
            }],
            pass_through: false,
            max_in_flight: 1,
        };
        let (tx, _rx) = mpsc::channel(pool.channel_capacity(&register));
        pool.register(pool.allocate_id(), &register, tx).unwrap();
        let registry = Registry::new();
        let dispatcher = Dispatcher::new(
            &WsConfig::default(),
            registry.clone(),
            Resolvers::new(pool, None, metrics.clone()),
            bus.clone(),
            metrics.clone(),
            &tasks,
        );
        let (feed_tx, announced) = mpsc::channel(FEED_CAPACITY);
        let feed = Arc::new(KeyFeed {
            tx: feed_tx,
            overflowed: AtomicBool::new(false),
        });
        registry.set_key_feed(feed.clone());
        let mut refresher = Refresher {
            dispatcher,
            feed,
            announced,
            schedule: Schedule::default(),
            intervals: HashMap::new(),
            last_warn: None,
        };
        let conn = Arc::new(Connection::new(1, 1 << 20));
        let activate = |k: &Key| {
            registry.add_pending(k, &conn, 10);
            registry.activate(k, 1, 0, None, &PushFrame::build(k, 1, &[], false));
        };
        activate(&key("1"));
        // Pending only: held, not refreshed.
        registry.add_pending(&key("2"), &conn, 10);
        // Not an entity with an interval.
        let other = Key::new("docs", "1").unwrap();
        activate(&other);
        let published = |events: &mut mpsc::Receiver<BusEvent>| match events.try_recv() {
            Ok(BusEvent::Changes(changes)) => changes
                .into_iter()
                .map(|c| {
                    assert_eq!(c.meta.notified_at_us, 0);
                    c.key
                })
                .collect(),
            Ok(other) => panic!("{other:?}"),
            Err(_) => Vec::new(),
        };

        let t0 = 1_000_000;
        // New intervals: the schedule is built from the registry; nothing due yet.
        refresher.tick(t0).await;
        assert_eq!(refresher.schedule.len(), 2);
        assert!(published(&mut events).is_empty());
        // A key subscribed later is announced.
        activate(&key("3"));
        // One interval on, keys 1 and 2 are due, key 3 not yet.
        refresher.tick(t0 + 1_000).await;
        assert_eq!(published(&mut events), vec![key("1")]);
        assert_eq!(refresher.schedule.len(), 3);
        // Again in the same slot: nothing.
        refresher.tick(t0 + 1_000).await;
        assert!(published(&mut events).is_empty());
        assert_eq!(metrics.refresh_changes_total.load(Ordering::Relaxed), 1);

        // The bus refuses: skipped, nothing piles up.
        bus.close().await;
        refresher.tick(t0 + 2_000).await;
        assert!(published(&mut events).is_empty());
        assert_eq!(metrics.refresh_changes_total.load(Ordering::Relaxed), 1);
        assert_eq!(refresher.schedule.len(), 3);

        // Nobody holds the keys any more: they leave at their due time.
        for k in [key("1"), key("2"), key("3")] {
            registry.remove(&k, &conn);
        }
        refresher.tick(t0 + 3_000).await;
        assert_eq!(refresher.schedule.len(), 0);
        tasks.token().cancel();
    }
}
