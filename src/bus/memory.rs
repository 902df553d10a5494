//! The in-process bus: one node, sequences from a counter, delivery through a bounded channel.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::bus::{
    error::BusError,
    event::{BusEvent, Change, EVENT_BUFFER, LastChange, Receipt},
};
use crate::{key::Key, ops::trace::ChangeMeta};

/// How long an idempotency key is remembered (JetStream's default duplicate window).
pub const DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// Most idempotency keys remembered at once.
pub const DEDUP_MAX_ENTRIES: usize = 100_000;

/// Most keys whose last change the bus remembers: past it, it forgets them
/// all and answers "no change after" the head it had then (as a stream that
/// left older changes out of its retention would).
pub const LAST_CHANGES_MAX_KEYS: usize = 100_000;

/// The in-process bus: sequences from a counter, delivery by a bounded channel.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<MemoryInner>,
}

struct MemoryInner {
    /// A tokio mutex because it is held across the channel send: sequences
    /// are assigned and delivered in one order, and a full channel makes
    /// `Notify` callers wait (backpressure) instead of queueing without bound.
    publisher: tokio::sync::Mutex<Publisher>,
    /// Last sequence assigned.
    head: AtomicU64,
    /// Each key's last change, for subscribes that resume. A std `Mutex`:
    /// one map update per published key, never held across `.await`.
    last: std::sync::Mutex<LastChanges>,
}

/// The last change of each key, at most [`LAST_CHANGES_MAX_KEYS`] keys.
struct LastChanges {
    by_key: HashMap<Key, u64>,
    /// Every change after this version is in `by_key`.
    floor: u64,
}

struct Publisher {
    next_seq: u64,
    tx: Option<mpsc::Sender<BusEvent>>,
    dedup: DedupWindow,
    /// Refresh changes' message ids, apart: they never crowd `Notify`'s
    /// idempotency keys out of `dedup`.
    refresh_dedup: DedupWindow,
}

impl MemoryBus {
    /// Creates the bus and the receiver the dispatcher consumes. Sequences
    /// start at the current Unix time in microseconds, so versions keep
    /// growing across node restarts (unless a node sustained more than a
    /// million changes a second) and stay below 2^53, exact in JavaScript.
    pub fn new() -> (Self, mpsc::Receiver<BusEvent>) {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Self::starting_at(micros.max(1))
    }

    /// Creates the bus with `first` as the first sequence it assigns.
    pub fn starting_at(first: u64) -> (Self, mpsc::Receiver<BusEvent>) {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let bus = Self {
            inner: Arc::new(MemoryInner {
                publisher: tokio::sync::Mutex::new(Publisher {
                    next_seq: first,
                    tx: Some(tx),
                    dedup: DedupWindow::default(),
                    refresh_dedup: DedupWindow::default(),
                }),
                head: AtomicU64::new(first - 1),
                last: std::sync::Mutex::new(LastChanges {
                    by_key: HashMap::new(),
                    floor: first - 1,
                }),
            }),
        };
        (bus, rx)
    }

    pub(super) fn head(&self) -> u64 {
        self.inner.head.load(Ordering::Acquire)
    }

    pub(super) async fn close(&self) {
        self.inner.publisher.lock().await.tx = None;
    }

    pub(super) fn last_change(&self, key: &Key) -> LastChange {
        let last = self.inner.last.lock().unwrap();
        match last.by_key.get(key) {
            Some(version) => LastChange::At(*version),
            None => LastChange::NoneAfter(last.floor),
        }
    }

    pub(super) async fn publish(
        &self,
        keys: Vec<Key>,
        idempotency_key: &str,
        meta: ChangeMeta,
    ) -> Result<Receipt, BusError> {
        let mut publisher = self.inner.publisher.lock().await;
        let now = Instant::now();
        if !idempotency_key.is_empty()
            && let Some(sequences) = publisher.dedup.get(idempotency_key, now)
        {
            return Ok(Receipt {
                sequences,
                duplicate: true,
            });
        }
        let Some(tx) = publisher.tx.clone() else {
            return Err(BusError::Closed);
        };
        let first = publisher.next_seq;
        let events: Vec<Change> = keys
            .into_iter()
            .enumerate()
            .map(|(i, key)| Change {
                key,
                version: first + i as u64,
                meta,
            })
            .collect();
        let sequences: Vec<u64> = events.iter().map(|e| e.version).collect();
        let last = first + events.len() as u64 - 1;
        {
            // Before delivery: a subscribe that reads it after the change
            // reached the dispatcher must see it.
            let mut changes = self.inner.last.lock().unwrap();
            if changes.by_key.len() + events.len() > LAST_CHANGES_MAX_KEYS {
                changes.by_key.clear();
                changes.floor = first - 1;
            }
            for change in &events {
                changes.by_key.insert(change.key.clone(), change.version);
            }
        }
        tx.send(BusEvent::Changes(events))
            .await
            .map_err(|_| BusError::Closed)?;
        publisher.next_seq = last + 1;
        self.inner.head.store(last, Ordering::Release);
        if !idempotency_key.is_empty() {
            publisher
                .dedup
                .insert(idempotency_key.to_string(), sequences.clone(), now);
        }
        Ok(Receipt {
            sequences,
            duplicate: false,
        })
    }
}

/// Refresh changes (see `bus::refresh`).
impl MemoryBus {
    /// Stores each key whose message id was not stored within the window,
    /// in one batch; returns how many it stored.
    pub(super) async fn publish_refresh(
        &self,
        changes: Vec<(Key, String)>,
        meta: ChangeMeta,
    ) -> Result<usize, BusError> {
        let mut publisher = self.inner.publisher.lock().await;
        let Some(tx) = publisher.tx.clone() else {
            return Err(BusError::Closed);
        };
        let now = Instant::now();
        let first = publisher.next_seq;
        let mut events = Vec::with_capacity(changes.len());
        let mut ids = Vec::with_capacity(changes.len());
        for (key, id) in changes {
            if publisher.refresh_dedup.get(&id, now).is_some() || ids.contains(&id) {
                continue;
            }
            events.push(Change {
                key,
                version: first + events.len() as u64,
                meta,
            });
            ids.push(id);
        }
        let stored = events.len();
        if stored == 0 {
            return Ok(0);
        }
        tx.send(BusEvent::Changes(events))
            .await
            .map_err(|_| BusError::Closed)?;
        let last = first + stored as u64 - 1;
        publisher.next_seq = last + 1;
        self.inner.head.store(last, Ordering::Release);
        for (i, id) in ids.into_iter().enumerate() {
            publisher
                .refresh_dedup
                .insert(id, vec![first + i as u64], now);
        }
        Ok(stored)
    }
}

/// Remembers idempotency keys for [`DEDUP_WINDOW`], at most [`DEDUP_MAX_ENTRIES`].
#[derive(Default)]
struct DedupWindow {
    seen: HashMap<String, (Instant, Vec<u64>)>,
    order: VecDeque<(Instant, String)>,
}

impl DedupWindow {
    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            let expired = now.duration_since(*at) >= DEDUP_WINDOW;
            if !expired && self.order.len() <= DEDUP_MAX_ENTRIES {
                break;
            }
            let (at, key) = self.order.pop_front().expect("front exists");
            if self.seen.get(&key).is_some_and(|(t, _)| *t == at) {
                self.seen.remove(&key);
            }
        }
    }

    fn get(&mut self, key: &str, now: Instant) -> Option<Vec<u64>> {
        self.expire(now);
        self.seen.get(key).map(|(_, seqs)| seqs.clone())
    }

    fn insert(&mut self, key: String, sequences: Vec<u64>, now: Instant) {
        self.order.push_back((now, key.clone()));
        self.seen.insert(key, (now, sequences));
        self.expire(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Bus;

    fn key(id: &str) -> Key {
        Key::new("items", id).unwrap()
    }

    fn meta() -> ChangeMeta {
        ChangeMeta {
            trace: crate::ops::trace::TraceId::parse("0123456789abcdef0123456789abcdef").unwrap(),
            notified_at_us: 42,
        }
    }

    #[tokio::test]
    async fn sequences_are_assigned_in_order_and_delivered() {
        let (bus, mut rx) = MemoryBus::starting_at(1);
        let bus = Bus::InProcess(bus);
        let r = bus
            .publish(vec![key("1"), key("2")], "", meta())
            .await
            .unwrap();
        assert_eq!(r.sequences, vec![1, 2]);
        let r = bus.publish(vec![key("1")], "", meta()).await.unwrap();
        assert_eq!(r.sequences, vec![3]);
        assert_eq!(bus.head(), 3);
        let batch = rx.recv().await.unwrap();
        assert_eq!(
            batch,
            BusEvent::Changes(vec![
                Change {
                    key: key("1"),
                    version: 1,
                    meta: meta(),
                },
                Change {
                    key: key("2"),
                    version: 2,
                    meta: meta(),
                }
            ])
        );
        assert_eq!(
            rx.recv().await.unwrap(),
            BusEvent::Changes(vec![Change {
                key: key("1"),
                version: 3,
                meta: meta(),
            }])
        );
    }

    #[test]
    fn sequences_start_from_the_clock_so_they_grow_across_restarts() {
        let (first, _rx) = MemoryBus::new();
        let (second, _rx2) = MemoryBus::new();
        let first = Bus::InProcess(first).head();
        assert!(
            first > 1_700_000_000_000_000,
            "microseconds since 1970: {first}"
        );
        assert!(first < 1 << 53, "exact as a JavaScript number");
        assert!(Bus::InProcess(second).head() >= first);
    }

    #[tokio::test]
    async fn idempotency_key_applies_once() {
        let (bus, mut rx) = MemoryBus::new();
        let bus = Bus::InProcess(bus);
        let a = bus.publish(vec![key("1")], "op-1", meta()).await.unwrap();
        let b = bus.publish(vec![key("1")], "op-1", meta()).await.unwrap();
        assert!(!a.duplicate);
        assert!(b.duplicate);
        assert_eq!(a.sequences, b.sequences);
        rx.recv().await.unwrap();
        assert!(rx.try_recv().is_err(), "the duplicate was not delivered");
    }

    #[tokio::test]
    async fn closed_bus_refuses() {
        let (bus, _rx) = MemoryBus::new();
        let bus = Bus::InProcess(bus);
        bus.close().await;
        assert!(matches!(
            bus.publish(vec![key("1")], "", meta()).await,
            Err(BusError::Closed)
        ));
    }

    #[tokio::test]
    async fn the_last_change_of_each_key_is_known_within_a_bound() {
        let (bus, _rx) = MemoryBus::starting_at(10);
        assert_eq!(bus.last_change(&key("1")), LastChange::NoneAfter(9));
        let bus = Bus::InProcess(bus);
        bus.publish(vec![key("1"), key("2"), key("1")], "", meta())
            .await
            .unwrap();
        let Bus::InProcess(memory) = &bus else {
            unreachable!()
        };
        assert_eq!(memory.last_change(&key("1")), LastChange::At(12));
        assert_eq!(memory.last_change(&key("2")), LastChange::At(11));
        assert_eq!(memory.last_change(&key("3")), LastChange::NoneAfter(9));
        // Past the bound, every key is forgotten: the floor moves up.
        let many: Vec<Key> = (0..LAST_CHANGES_MAX_KEYS)
            .map(|i| key(&format!("k{i}")))
            .collect();
        drop(_rx);
        let (fresh, mut rx) = MemoryBus::starting_at(1);
        let fresh_bus = Bus::InProcess(fresh.clone());
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        fresh_bus.publish(vec![key("1")], "", meta()).await.unwrap();
        fresh_bus.publish(many, "", meta()).await.unwrap();
        assert_eq!(fresh.last_change(&key("1")), LastChange::NoneAfter(1));
        assert_eq!(
            fresh.last_change(&key("k0")),
            LastChange::At(2),
            "the publish that overflowed is kept"
        );
        fresh_bus.close().await;
        drain.await.unwrap();
        assert!(LastChange::NoneAfter(1).unchanged_since(1));
        assert!(!LastChange::At(5).unchanged_since(4));
        assert!(LastChange::At(5).unchanged_since(5));
        assert!(!LastChange::Unknown.unchanged_since(u64::MAX));
    }

    #[tokio::test]
    async fn refresh_changes_are_stored_once_per_message_id() {
        let (bus, mut rx) = MemoryBus::starting_at(10);
        let bus = Bus::InProcess(bus);
        let changes = |ids: &[(&str, &str)]| -> Vec<(Key, String)> {
            ids.iter().map(|(k, id)| (key(k), id.to_string())).collect()
        };
        let stored = bus
            .publish_refresh(changes(&[("1", "r:1:7"), ("2", "r:2:7")]), meta())
            .await
            .unwrap();
        assert_eq!(stored, 2);
        // Key 1's slot 7 again (another node's publish, say), key 1's slot 8.
        let stored = bus
            .publish_refresh(changes(&[("1", "r:1:7"), ("1", "r:1:8")]), meta())
            .await
            .unwrap();
        assert_eq!(stored, 1);
        assert_eq!(
            bus.publish_refresh(changes(&[("2", "r:2:7")]), meta())
                .await
                .unwrap(),
            0
        );
        let change = |id: &str, version| Change {
            key: key(id),
            version,
            meta: meta(),
        };
        assert_eq!(
            rx.recv().await.unwrap(),
            BusEvent::Changes(vec![change("1", 10), change("2", 11)])
        );
        assert_eq!(
            rx.recv().await.unwrap(),
            BusEvent::Changes(vec![change("1", 12)])
        );
        assert!(rx.try_recv().is_err(), "duplicates are not delivered");
        // Notify's idempotency keys are apart from refresh ids.
        assert!(
            !bus.publish(vec![key("1")], "r:1:7", meta())
                .await
                .unwrap()
                .duplicate
        );
    }

    #[test]
    fn dedup_window_expires() {
        let mut w = DedupWindow::default();
        let t0 = Instant::now();
        w.insert("a".into(), vec![1], t0);
        assert_eq!(w.get("a", t0 + Duration::from_secs(1)), Some(vec![1]));
        assert_eq!(w.get("a", t0 + DEDUP_WINDOW), None);
    }
}
