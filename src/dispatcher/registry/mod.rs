//! The subscription registry: which connections hold which keys, sharded so no global lock sits on the hot path.
//!
//! Each key lives in one of [`SHARDS`] shards chosen by its hash; a shard is a
//! std `Mutex<HashMap>` held only for in-memory work (never across `.await`).
//! Fan-out hands a shared frame to each subscriber's `Outbox` while the
//! shard is locked: a few pointer moves per subscriber (and, for the first
//! few idle ones, a `send`: see `fan_out`), and it keeps "who is subscribed"
//! and "who got the frame" consistent.
//!
//! A key's active subscribers are also grouped by the secret they were
//! activated with (`Groups`): a PER_SUBSCRIBER change is resolved once per
//! distinct secret and fanned out once per secret, and each of those
//! fan-outs reaches its own group without looking at the others, so one
//! change costs work linear in the key's subscribers, however many secrets.
//!
//! `connection` holds what the registry knows of a connection, `subscribers`
//! a key's subscribers and their groups; the methods of [`Registry`] are
//! split by flow: the subscribe flow's (`activation`: add, activate, reject,
//! re-check, remove) and the change flow's (`fan_out`).

mod activation;
mod connection;
mod fan_out;
mod subscribers;

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use crate::{dispatcher::refresh::KeyFeed, key::Key};

pub(crate) use connection::{ConnId, Connection};
pub(crate) use subscribers::Audience;
use subscribers::KeySubscribers;

/// Number of registry shards (a power of two).
const SHARDS: usize = 64;

type Shard = HashMap<Key, KeySubscribers>;

/// What [`Registry::add_pending`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddPending {
    /// The subscription waits for a snapshot resolve, to be started.
    Started,
    /// A snapshot resolve for it is already under way and will answer.
    InFlight,
    /// The connection holds its maximum of subscriptions.
    Full,
}

/// Outcome of fanning a push out to a key's subscribers.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FanOut {
    pub(crate) delivered: usize,
    /// Of `delivered`, how many replaced an unwritten older push of the key.
    pub(crate) replaced: usize,
    pub(crate) stale: usize,
    /// Not sent: the rows were the ones last queued to the subscriber (its
    /// version is recorded all the same).
    pub(crate) unchanged: usize,
    pub(crate) overflowed: usize,
}

/// Outcome of [`Registry::activate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// Active now; `missed` says a change arrived during the snapshot resolve.
    Active { missed: bool },
    /// The subscription went away meanwhile (unsubscribe or disconnect).
    Gone,
    /// The connection sent a new secret after this snapshot's resolve
    /// started: the snapshot is for the old secret and is dropped; the
    /// re-check with the new secret decides.
    Superseded,
}

/// The subscription registry: a cheap-clone handle.
#[derive(Clone)]
pub(crate) struct Registry {
    inner: Arc<Inner>,
}

/// One shard of the open connections, by id.
type LiveShard = Mutex<HashMap<ConnId, Arc<Connection>>>;

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Every open connection, sharded by id: what the node-wide ping timer
    /// and shutdown reach (so a session needs no wait of its own for them).
    live: Box<[LiveShard]>,
    connections: AtomicUsize,
    subscriptions: AtomicUsize,
    keys: AtomicUsize,
    /// Keys whose last subscriber left, until the dispatcher takes them (to
    /// drop what it keeps per held key: the cache entry, the relay's
    /// subscription). A std `Mutex`: one push per departed key.
    departed: Mutex<Vec<Key>>,
    /// `--push-unchanged-rows`: send a change push even when its rows are
    /// the ones the subscriber got last.
    push_unchanged_rows: bool,
    /// Where keys that got their first subscriber are announced (the
    /// refresh schedule's, see `dispatcher::refresh`); set once.
    key_feed: OnceLock<Arc<KeyFeed>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// A registry that skips pushes whose rows did not change.
    pub(crate) fn new() -> Self {
        Self::with_push_unchanged_rows(false)
    }

    /// With `push`, every change push is sent, unchanged rows or not.
    pub(crate) fn with_push_unchanged_rows(push: bool) -> Self {
        Self {
            inner: Arc::new(Inner {
                push_unchanged_rows: push,
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                hasher: RandomState::new(),
                live: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                connections: AtomicUsize::new(0),
                subscriptions: AtomicUsize::new(0),
                keys: AtomicUsize::new(0),
                departed: Mutex::new(Vec::new()),
                key_feed: OnceLock::new(),
            }),
        }
    }

    fn shard(&self, key: &Key) -> &Mutex<Shard> {
        let hash = self.inner.hasher.hash_one(key) as usize;
        &self.inner.shards[hash & (SHARDS - 1)]
    }

    fn live(&self, id: ConnId) -> &LiveShard {
        &self.inner.live[id as usize & (SHARDS - 1)]
    }

    /// Counts `conn` open and lists it for [`for_each_connection`](Self::for_each_connection).
    pub(crate) fn connection_opened(&self, conn: &Arc<Connection>) {
        self.live(conn.id)
            .lock()
            .unwrap()
            .insert(conn.id, conn.clone());
        self.inner.connections.fetch_add(1, Relaxed);
    }

    /// Calls `f` with every open connection, a shard's worth at a time under
    /// its lock (`f` must be quick: a flag and a wake-up).
    pub(crate) fn for_each_connection(&self, mut f: impl FnMut(&Connection)) {
        for shard in self.inner.live.iter() {
            for conn in shard.lock().unwrap().values() {
                f(conn);
            }
        }
    }

    /// Removes every subscription of `conn` and counts it closed.
    pub(crate) fn connection_closed(&self, conn: &Connection) {
        let keys = std::mem::take(&mut *conn.keys.lock().unwrap());
        for key in keys {
            self.remove_entry(&key, conn.id);
        }
        self.live(conn.id).lock().unwrap().remove(&conn.id);
        self.inner.connections.fetch_sub(1, Relaxed);
    }

    fn remove_entry(&self, key: &Key, conn: ConnId) -> bool {
        let mut shard = self.shard(key).lock().unwrap();
        let Some(subs) = shard.get_mut(key) else {
            return false;
        };
        let removed = subs.remove(conn).is_some();
        if removed {
            self.inner.subscriptions.fetch_sub(1, Relaxed);
        }
        if subs.by_conn.is_empty() {
            shard.remove(key);
            self.key_left(key);
        }
        removed
    }

    /// `key`'s last subscriber left (called with its shard locked).
    pub(super) fn key_left(&self, key: &Key) {
        self.inner.keys.fetch_sub(1, Relaxed);
        self.inner.departed.lock().unwrap().push(key.clone());
    }

    /// Keys whose last subscriber left since the last call, and that have
    /// none now.
    pub(crate) fn take_departed(&self) -> Vec<Key> {
        let mut departed = std::mem::take(&mut *self.inner.departed.lock().unwrap());
        departed.retain(|key| !self.shard(key).lock().unwrap().contains_key(key));
        departed.sort_unstable();
        departed.dedup();
        departed
    }

    /// Announces to `feed` every key that gets its first subscriber from
    /// now on (the first feed set stays).
    pub(crate) fn set_key_feed(&self, feed: Arc<KeyFeed>) {
        let _ = self.inner.key_feed.set(feed);
    }

    /// A key got its first subscriber (called under its shard's lock; never waits).
    fn announce_key(&self, key: &Key) {
        if let Some(feed) = self.inner.key_feed.get() {
            feed.offer(key);
        }
    }

    /// Whether `key` has any subscriber, pending or active.
    pub(crate) fn is_held(&self, key: &Key) -> bool {
        self.shard(key).lock().unwrap().contains_key(key)
    }

    /// Every key with at least one subscriber (for resyncs).
    pub(crate) fn keys(&self) -> Vec<Key> {
        let mut keys = Vec::new();
        for shard in self.inner.shards.iter() {
            keys.extend(shard.lock().unwrap().keys().cloned());
        }
        keys
    }

    pub(crate) fn connections(&self) -> usize {
        self.inner.connections.load(Relaxed)
    }

    pub(crate) fn subscriptions(&self) -> usize {
        self.inner.subscriptions.load(Relaxed)
    }

    pub(crate) fn key_count(&self) -> usize {
        self.inner.keys.load(Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{
        subscribers::{Groups, State, WORK},
        *,
    };
    use crate::websocket::protocol::{FrameText, PushFrame, text_of_wire};

    fn key(id: &str) -> Key {
        Key::new("items", id).unwrap()
    }

    fn conn(id: ConnId) -> Arc<Connection> {
        Arc::new(Connection::new(id, 1 << 20))
    }

    /// A push whose rows change with its version (unchanged rows are not sent).
    fn frame(id: &str, version: u64) -> PushFrame {
        PushFrame::build(
            &key(id),
            version,
            &[Bytes::from(version.to_string())],
            false,
        )
    }

    fn queued(conn: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        conn.outbox.take_queued(&mut out).expect("open");
        out.iter().map(|wire| text_of_wire(wire)).collect()
    }

    #[test]
    fn pending_subscribers_get_no_pushes_but_note_missed_changes() {
        let registry = Registry::new();
        let a = conn(1);
        assert_eq!(registry.add_pending(&key("1"), &a, 10), AddPending::Started);
        assert!(!registry.note_change(&key("1")), "no active subscriber yet");
        let fan = registry.fan_out(&key("1"), &frame("1", 5), Audience::All);
        assert_eq!(fan.delivered, 0);
        let act = registry.activate(
            &key("1"),
            1,
            0,
            Some(FrameText::from_static("ack")),
            &frame("1", 4),
        );
        assert_eq!(act, Activation::Active { missed: true });
        assert!(registry.note_change(&key("1")));
        let frames = queued(&a);
        assert_eq!(frames[0], "ack");
        assert!(frames[1].contains("\"version\":4"));
    }

    #[test]
    fn fan_out_skips_older_versions() {
        let registry = Registry::new();
        let a = conn(1);
        registry.add_pending(&key("1"), &a, 10);
        registry.activate(&key("1"), 1, 0, None, &frame("1", 10));
        queued(&a);
        let fan = registry.fan_out(&key("1"), &frame("1", 9), Audience::All);
        assert_eq!(
            fan,
            FanOut {
                delivered: 0,
                replaced: 0,
                stale: 1,
                unchanged: 0,
                overflowed: 0
            }
        );
        let fan = registry.fan_out(&key("1"), &frame("1", 11), Audience::All);
        assert_eq!(fan.delivered, 1);
    }

    #[test]
    fn audiences_select_by_secret() {
        let registry = Registry::new();
        let (a, b) = (conn(1), conn(2));
        a.set_secret("s1");
        b.set_secret("s2");
        for c in [&a, &b] {
            registry.add_pending(&key("1"), c, 10);
            registry.activate(&key("1"), c.id, 1, None, &frame("1", 1));
        }
        let mut secrets = registry.active_secrets(&key("1"));
        secrets.sort();
        assert_eq!(secrets, vec![Arc::from("s1"), Arc::from("s2")]);
        let fan = registry.fan_out(&key("1"), &frame("1", 2), Audience::Secret("s2"));
        assert_eq!(fan.delivered, 1);
        let revoked = registry.revoke(
            &key("1"),
            Audience::Secret("s1"),
            &FrameText::from_static("err"),
        );
        assert_eq!(revoked, 1);
        assert!(!a.holds(&key("1")));
        assert!(b.holds(&key("1")));
        assert_eq!(registry.subscriptions(), 1);
    }

    #[test]
    fn a_recheck_drops_queued_pushes_and_holds_pushes_until_it_answers() {
        let registry = Registry::new();
        let a = conn(1);
        a.set_secret("old");
        let (_, old) = a.secret_epoch();
        for id in ["1", "2"] {
            registry.add_pending(&key(id), &a, 10);
            registry.activate(&key(id), 1, old, None, &frame(id, 1));
        }
        queued(&a);
        // Pushes resolved for the old secret, not yet written.
        registry.fan_out(&key("1"), &frame("1", 2), Audience::Secret("old"));
        registry.fan_out(&key("2"), &frame("2", 2), Audience::All);

        assert!(a.set_secret("new"));
        assert!(!a.set_secret("new"), "the same secret is no change");
        let (_, new) = a.secret_epoch();
        assert_ne!(old, new);
        let mut keys = registry.recheck(&a);
        keys.sort_by(|x, y| x.id.cmp(&y.id));
        assert_eq!(keys, vec![key("1"), key("2")]);
        assert!(queued(&a).is_empty(), "queued pushes are dropped");

        // Under re-check: no fan-out reaches the key, whatever the audience.
        for audience in [
            Audience::All,
            Audience::Secret("new"),
            Audience::Secret("old"),
        ] {
            assert_eq!(
                registry
                    .fan_out(&key("1"), &frame("1", 3), audience)
                    .delivered,
                0
            );
        }
        assert!(registry.active_secrets(&key("1")).is_empty());
        assert!(
            !registry.note_change(&key("1")),
            "the change is noted as missed"
        );
        // Answers resolved for the old secret change nothing.
        let old_snapshot = registry.activate(&key("1"), 1, old, None, &frame("1", 4));
        assert_eq!(old_snapshot, Activation::Superseded);
        assert!(!registry.reject(&key("2"), &a, old, FrameText::from_static("err")));
        assert!(queued(&a).is_empty());
        assert_eq!(registry.subscriptions(), 2);

        // The re-checks answer: key 1 is active again (it missed a change), key 2 forbidden.
        let act = registry.activate(
            &key("1"),
            1,
            new,
            Some(FrameText::from_static("ack")),
            &frame("1", 4),
        );
        assert_eq!(act, Activation::Active { missed: true });
        assert!(registry.reject(&key("2"), &a, new, FrameText::from_static("err")));
        let frames = queued(&a);
        assert_eq!(frames.len(), 3, "{frames:?}");
        assert_eq!(frames[0], "ack");
        assert!(frames[1].contains("\"version\":4"));
        assert_eq!(frames[2], "err");
        assert!(!a.holds(&key("2")));
        assert_eq!(registry.subscriptions(), 1);

        // A change resolved for the old secret, answering late, is for another audience.
        assert_eq!(
            registry
                .fan_out(&key("1"), &frame("1", 5), Audience::Secret("old"))
                .delivered,
            0
        );
        assert_eq!(
            registry
                .fan_out(&key("1"), &frame("1", 5), Audience::Secret("new"))
                .delivered,
            1
        );
    }

    /// `n` connections, each with its own secret (4 KiB, all alike but
    /// for their last bytes: the worst case of a comparison), active on
    /// `key("1")` with a snapshot of version 1.
    fn distinct_secrets(registry: &Registry, n: usize) -> Vec<Arc<Connection>> {
        (0..n)
            .map(|i| {
                let c = conn(i as ConnId);
                c.set_secret(&format!("{}{i:08}", "s".repeat(4096 - 8)));
                let (_, epoch) = c.secret_epoch();
                registry.add_pending(&key("1"), &c, 10);
                registry.activate(&key("1"), c.id, epoch, None, &frame("1", 1));
                queued(&c);
                c
            })
            .collect()
    }

    /// What the dispatcher does for a PER_SUBSCRIBER change: one fan-out
    /// per distinct secret. Returns the work it took.
    fn change_per_secret(registry: &Registry, version: u64) -> usize {
        WORK.with(|w| w.set(0));
        let secrets = registry.active_secrets(&key("1"));
        for secret in &secrets {
            let fan = registry.fan_out(&key("1"), &frame("1", version), Audience::Secret(secret));
            assert_eq!(fan.delivered, 1);
        }
        WORK.with(|w| w.get())
    }

    /// One change of a key whose subscribers all have distinct secrets
    /// costs work linear in their number: each subscriber is looked at and
    /// each secret compared a bounded number of times, not once per secret.
    #[test]
    fn a_change_per_secret_costs_linear_work() {
        let mut per_subscriber = Vec::new();
        for n in [50, 200, 800] {
            let registry = Registry::new();
            let conns = distinct_secrets(&registry, n);
            let work = change_per_secret(&registry, 2);
            for c in &conns {
                let frames = queued(c);
                assert_eq!(frames.len(), 1, "each subscriber gets its push once");
                assert!(frames[0].contains("\"version\":2"));
            }
            per_subscriber.push((n, work));
        }
        for (n, work) in &per_subscriber {
            assert!(
                *work <= 4 * n,
                "{n} subscribers: {work} units of work ({per_subscriber:?})"
            );
        }
    }

    impl Registry {
        /// Checks every key's groups against its subscribers.
        fn check(&self) {
            for shard in self.inner.shards.iter() {
                for subs in shard.lock().unwrap().values() {
                    subs.check();
                }
            }
        }
    }

    /// Subscribes, activations, re-checks, removals and revocations in a
    /// random order over a few keys and secrets: the groups always hold
    /// exactly the active subscribers, and a fan-out per secret reaches
    /// exactly the active subscribers whose connection holds that secret.
    #[test]
    fn groups_follow_every_change_of_the_subscribers() {
        let secrets = ["", "a", "b", "c"];
        let mut rng = fastrand::Rng::with_seed(7);
        let registry = Registry::new();
        let conns: Vec<Arc<Connection>> = (0..12).map(conn).collect();
        let mut version = 1;
        let (mut delivered, mut many) = (0, 0);
        for _ in 0..5000 {
            let c = &conns[rng.usize(..conns.len())];
            let k = key(&rng.usize(..3).to_string());
            match rng.u8(..7) {
                0 => {
                    registry.add_pending(&k, c, 10);
                }
                1 | 2 => {
                    let (_, epoch) = c.secret_epoch();
                    version += 1;
                    registry.activate(&k, c.id, epoch, None, &frame(&k.id, version));
                }
                3 => {
                    if c.set_secret(secrets[rng.usize(..secrets.len())]) {
                        registry.recheck(c);
                    }
                }
                4 => {
                    registry.remove(&k, c);
                }
                5 => {
                    let audience = match rng.usize(..=secrets.len()) {
                        0 => Audience::All,
                        i => Audience::Secret(secrets[i - 1]),
                    };
                    registry.revoke(&k, audience, &FrameText::from_static("err"));
                }
                _ => {
                    // A new secret not yet re-checked: its old group still
                    // names it, but no fan-out for either secret reaches it.
                    c.set_secret(secrets[rng.usize(..secrets.len())]);
                }
            }
            registry.check();
            many += registry
                .keys()
                .iter()
                .filter(|k| {
                    let shard = registry.shard(k).lock().unwrap();
                    matches!(shard.get(*k).map(|s| &s.groups), Some(Groups::Many(_)))
                })
                .count();
            for c in &conns {
                queued(c);
            }
            let k = key(&rng.usize(..3).to_string());
            for secret in secrets {
                version += 1;
                let fan = registry.fan_out(&k, &frame(&k.id, version), Audience::Secret(secret));
                let holders = registry
                    .shard(&k)
                    .lock()
                    .unwrap()
                    .get(&k)
                    .map_or(0, |subs| {
                        subs.by_conn
                            .values()
                            .filter(|sub| match &sub.state {
                                State::Active { secret: mine } => {
                                    **mine == *secret && Arc::ptr_eq(mine, &sub.conn.secret())
                                }
                                State::Pending { .. } => false,
                            })
                            .count()
                    });
                assert_eq!(fan.delivered, holders, "{secret:?}");
                delivered += fan.delivered;
            }
        }
        assert!(
            delivered > 1000 && many > 1000,
            "{delivered} pushes, {many} keys × steps in Many"
        );
        for c in &conns {
            registry.connection_closed(c);
        }
        assert_eq!((registry.subscriptions(), registry.key_count()), (0, 0));
    }

    #[test]
    fn limits_and_counts_return_to_zero() {
        let registry = Registry::new();
        let a = conn(1);
        registry.connection_opened(&a);
        assert_eq!(registry.add_pending(&key("1"), &a, 2), AddPending::Started);
        assert_eq!(registry.add_pending(&key("2"), &a, 2), AddPending::Started);
        assert_eq!(
            registry.add_pending(&key("1"), &a, 2),
            AddPending::InFlight,
            "held keys don't count twice, and one snapshot resolve answers both"
        );
        assert_eq!(registry.add_pending(&key("3"), &a, 2), AddPending::Full);
        let b = conn(2);
        registry.add_pending(&key("1"), &b, 2);
        assert_eq!((registry.subscriptions(), registry.key_count()), (3, 2));
        assert!(registry.remove(&key("1"), &b));
        assert!(!registry.remove(&key("1"), &b));
        registry.connection_closed(&a);
        assert_eq!(
            (
                registry.connections(),
                registry.subscriptions(),
                registry.key_count()
            ),
            (0, 0, 0)
        );
        assert!(registry.keys().is_empty());
    }
}
