//! The node cache: the latest push of every SHARED key this node has subscribers for.
//!
//! An entry is the push frame last sent (or resolved as a snapshot) for the
//! key, with the highest change of the key this node has seen since the entry
//! began. The entry is *current* while no change newer than its push has
//! been seen. With the node caught up on the bus, a current entry places a
//! resumed subscribe's version without asking the bus: no change of the key
//! came after the push it holds.
//!
//! **Invariants.** An entry only moves forward: a push older than the one it
//! holds is refused, so it never serves rows older than a push already sent.
//! The entries' bytes stay under `--cache-max-bytes`: the least recently
//! used keys leave first. A key leaves with its last subscriber on the node
//! (the dispatcher drops it). One std `Mutex` around the map and its
//! recency order; every operation is O(log n) and never awaits.

use std::{
    collections::{BTreeMap, HashMap, hash_map::Entry},
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
};

use crate::{key::Key, ops::metrics::Metrics, websocket::protocol::PushFrame};

/// What an entry costs besides its frame and key: the map slot, the recency
/// index and the frame's own fields (measured roughly, a fixed estimate).
const ENTRY_OVERHEAD: usize = 160;

/// The node cache: a cheap-clone handle.
#[derive(Clone)]
pub(crate) struct NodeCache {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    max_bytes: usize,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, CacheEntry>,
    /// Last use → key: the first is the least recently used.
    recency: BTreeMap<u64, Key>,
    /// Uses so far: each use takes the next number.
    clock: u64,
    bytes: usize,
}

struct CacheEntry {
    frame: PushFrame,
    /// The frame's version is a bus version (not a resolver's own), so it
    /// compares with changes.
    bus_version: bool,
    /// Highest version of a change of the key seen while the entry lived.
    seen: u64,
    used: u64,
    size: usize,
}

/// How a resumed subscribe's version was placed by the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed {
    /// No change of the key came after the version.
    Current,
    /// The cache cannot tell; ask the bus.
    Unknown,
}

impl NodeCache {
    pub(crate) fn new(max_bytes: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                max_bytes,
                metrics,
            }),
        }
    }

    /// Records `frame`, the latest push of `key`, unless the entry already
    /// holds a newer one. `bus_version`: the frame's version is a bus version.
    /// `applied`: the highest bus version this node has consumed; changes up
    /// to it that the entry did not see make it not current until a push at
    /// or above it.
    pub(crate) fn store(&self, key: &Key, frame: &PushFrame, bus_version: bool, applied: u64) {
        let size = frame.payload.len() + key.entity.len() + key.id.len() + ENTRY_OVERHEAD;
        if size > self.inner.max_bytes {
            return;
        }
        let mut state = self.inner.state.lock().unwrap();
        let used = state.tick();
        match state.entries.entry(key.clone()) {
            Entry::Occupied(mut slot) => {
                let entry = slot.get_mut();
                let old_used = entry.used;
                if frame.version >= entry.frame.version || bus_version != entry.bus_version {
                    let old_size = entry.size;
                    entry.frame = frame.clone();
                    entry.bus_version = bus_version;
                    entry.size = size;
                    entry.used = used;
                    state.bytes = state.bytes + size - old_size;
                } else {
                    entry.used = used;
                }
                state.recency.remove(&old_used);
                state.recency.insert(used, key.clone());
            }
            Entry::Vacant(slot) => {
                slot.insert(CacheEntry {
                    frame: frame.clone(),
                    bus_version,
                    // Changes consumed before the entry began are unknown to
                    // it: taken as seen, conservatively.
                    seen: applied,
                    used,
                    size,
                });
                state.recency.insert(used, key.clone());
                state.bytes += size;
            }
        }
        state.evict(self.inner.max_bytes, &self.inner.metrics);
        state.show(&self.inner.metrics);
    }

    /// A change of `key` at `version` was consumed.
    pub(crate) fn note_change(&self, key: &Key, version: u64) {
        let mut state = self.inner.state.lock().unwrap();
        if let Some(entry) = state.entries.get_mut(key) {
            entry.seen = entry.seen.max(version);
        }
    }

    /// Every key may have changed (changes were lost on the bus).
    pub(crate) fn note_all_changed(&self, version: u64) {
        let mut state = self.inner.state.lock().unwrap();
        for entry in state.entries.values_mut() {
            entry.seen = entry.seen.max(version);
        }
    }

    /// Places `version`, the one a resuming client holds, with the node
    /// caught up to `base` on the bus (`caught_up`): current when the entry
    /// holds a push at or before `version` and has seen no change after it.
    /// Counts a hit or a miss.
    pub(crate) fn place(&self, key: &Key, version: u64, caught_up: bool) -> Placed {
        match self.current_where(key, |frame| caught_up && frame.version <= version) {
            Some(_) => Placed::Current,
            None => Placed::Unknown,
        }
    }

    /// The push cached for `key` if it is current (no change after it
    /// seen), as a subscribe's snapshot. Counts a hit or a miss.
    pub(crate) fn current(&self, key: &Key) -> Option<PushFrame> {
        self.current_where(key, |_| true)
    }

    /// The entry's push, when the entry is current (a bus version, no
    /// change seen after it) and `accept` takes it: a hit (the key is used
    /// now), else a miss.
    fn current_where(&self, key: &Key, accept: impl Fn(&PushFrame) -> bool) -> Option<PushFrame> {
        let mut state = self.inner.state.lock().unwrap();
        let frame = state
            .entries
            .get(key)
            .filter(|entry| {
                entry.bus_version && entry.seen <= entry.frame.version && accept(&entry.frame)
            })
            .map(|entry| entry.frame.clone());
        let metrics = &self.inner.metrics;
        if frame.is_some() {
            state.touch(key);
            Metrics::inc(&metrics.cache_hits_total);
        } else {
            Metrics::inc(&metrics.cache_misses_total);
        }
        frame
    }

    /// The version of the push cached for `key`, if any.
    #[cfg(test)]
    pub(crate) fn version(&self, key: &Key) -> Option<u64> {
        let state = self.inner.state.lock().unwrap();
        state.entries.get(key).map(|entry| entry.frame.version)
    }

    /// Drops `key` (its last subscriber on this node left).
    pub(crate) fn remove(&self, key: &Key) {
        let mut state = self.inner.state.lock().unwrap();
        if let Some(entry) = state.entries.remove(key) {
            state.recency.remove(&entry.used);
            state.bytes -= entry.size;
            state.show(&self.inner.metrics);
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.inner.state.lock().unwrap().bytes
    }
}

impl State {
    /// Sets the cache's gauges to what it holds now.
    fn show(&self, metrics: &Metrics) {
        metrics.cache_bytes.store(self.bytes as u64, Relaxed);
        metrics.cache_keys.store(self.entries.len() as u64, Relaxed);
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn touch(&mut self, key: &Key) {
        let used = self.tick();
        if let Some(entry) = self.entries.get_mut(key) {
            self.recency.remove(&entry.used);
            entry.used = used;
            self.recency.insert(used, key.clone());
        }
    }

    /// Drops least recently used entries until the bytes fit.
    fn evict(&mut self, max_bytes: usize, metrics: &Metrics) {
        while self.bytes > max_bytes {
            let Some((_, key)) = self.recency.pop_first() else {
                return;
            };
            if let Some(entry) = self.entries.remove(&key) {
                self.bytes -= entry.size;
                Metrics::inc(&metrics.cache_evictions_total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn key(id: &str) -> Key {
        Key::new("items", id).unwrap()
    }

    fn frame(id: &str, version: u64, row: &str) -> PushFrame {
        PushFrame::build(&key(id), version, &[Bytes::from(row.to_string())], false)
    }

    fn cache(max_bytes: usize) -> (NodeCache, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        (NodeCache::new(max_bytes, metrics.clone()), metrics)
    }

    #[test]
    fn an_entry_never_goes_back() {
        let (cache, _) = cache(1 << 20);
        cache.store(&key("1"), &frame("1", 10, "\"new\""), true, 0);
        cache.store(&key("1"), &frame("1", 9, "\"old\""), true, 0);
        assert_eq!(cache.version(&key("1")), Some(10));
    }

    #[test]
    fn a_version_is_current_only_with_no_change_seen_after_the_push() {
        let (cache, metrics) = cache(1 << 20);
        cache.store(&key("1"), &frame("1", 10, "1"), true, 5);
        assert_eq!(cache.place(&key("1"), 10, true), Placed::Current);
        assert_eq!(cache.place(&key("1"), 12, true), Placed::Current);
        // Older than the push: the key may have changed in between.
        assert_eq!(cache.place(&key("1"), 9, true), Placed::Unknown);
        // The node is behind the bus: a change may not be seen yet.
        assert_eq!(cache.place(&key("1"), 10, false), Placed::Unknown);
        cache.note_change(&key("1"), 11);
        assert_eq!(cache.place(&key("1"), 12, true), Placed::Unknown);
        cache.store(&key("1"), &frame("1", 11, "2"), true, 11);
        assert_eq!(cache.place(&key("1"), 11, true), Placed::Current);
        assert_eq!(metrics.cache_hits_total.load(Relaxed), 3);
        assert_eq!(metrics.cache_misses_total.load(Relaxed), 3);
        // An entry that began after changes it did not see is not current.
        cache.store(&key("2"), &frame("2", 10, "1"), true, 15);
        assert_eq!(cache.place(&key("2"), 10, true), Placed::Unknown);
        // A resolver's own versions do not compare with the bus's.
        cache.store(&key("3"), &frame("3", 10, "1"), false, 0);
        assert_eq!(cache.place(&key("3"), 10, true), Placed::Unknown);
    }

    #[test]
    fn the_least_recently_used_keys_leave_first_within_the_bound() {
        let one = frame("1", 1, "1").payload.len() + "items".len() + 1 + ENTRY_OVERHEAD;
        let (cache, metrics) = cache(3 * one);
        for id in ["1", "2", "3"] {
            cache.store(&key(id), &frame(id, 1, "1"), true, 0);
        }
        assert_eq!(cache.bytes(), 3 * one);
        // 1 is used: 2 is now the least recently used.
        assert_eq!(cache.place(&key("1"), 1, true), Placed::Current);
        cache.store(&key("4"), &frame("4", 1, "1"), true, 0);
        assert_eq!(cache.version(&key("2")), None);
        for id in ["1", "3", "4"] {
            assert_eq!(cache.version(&key(id)), Some(1), "{id}");
        }
        assert_eq!(metrics.cache_evictions_total.load(Relaxed), 1);
        assert_eq!(metrics.cache_keys.load(Relaxed), 3);
        cache.remove(&key("1"));
        assert_eq!(cache.bytes(), 2 * one);
        assert_eq!(metrics.cache_bytes.load(Relaxed), 2 * one as u64);
        // An entry larger than the whole cache is not kept.
        let big = PushFrame::build(&key("5"), 1, &[Bytes::from("x".repeat(4 * one))], false);
        cache.store(&key("5"), &big, true, 0);
        assert_eq!(cache.version(&key("5")), None);
    }
}
