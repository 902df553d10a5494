//! The subscription registry: which connections hold which keys, sharded so no global lock sits on the hot path.
//!
//! Each key lives in one of [`SHARDS`] shards chosen by its hash; a shard is a
//! std `Mutex<HashMap>` held only for in-memory work (never across `.await`).
//! Fan-out queues a shared frame into each subscriber's [`Outbox`] while the
//! shard is locked: that is a few pointer moves per subscriber, and it keeps
//! "who is subscribed" and "who got the frame" consistent.

use std::{
    collections::{HashMap, hash_map::Entry},
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use tokio::sync::Notify;

use crate::{
    key::ChangeKey,
    outbox::{Outbox, Queued},
    protocol::{FrameText, PushFrame},
};

/// Number of registry shards (a power of two).
const SHARDS: usize = 64;

/// Identifies a websocket connection within a node.
pub(crate) type ConnId = u64;

/// What the registry knows of one websocket connection.
pub(crate) struct Connection {
    pub(crate) id: ConnId,
    pub(crate) outbox: Outbox,
    /// Current secret (`secret` message) and its epoch, which goes up with
    /// every new secret. A std `Mutex` around an `Arc` so a reader clones the
    /// pointer and releases at once. Locked after a shard lock (audiences,
    /// activation), never the other way round.
    secret: Mutex<SecretState>,
    /// Keys this connection holds (pending or active). Locked after a shard
    /// lock when a revocation removes a key; never the other way round. A
    /// `Vec`: a handful of keys is the norm, and it costs 32 bytes a key.
    keys: Mutex<Vec<ChangeKey>>,
    /// Woken when the secret changes, so snapshot resolves for an older
    /// secret stop waiting (see [`Connection::superseded`]).
    secret_changed: Notify,
}

/// A connection's secret and the epoch it belongs to.
struct SecretState {
    secret: Arc<str>,
    epoch: u64,
}

impl Connection {
    pub(crate) fn new(id: ConnId, outbox_max_bytes: usize) -> Self {
        Self {
            id,
            outbox: Outbox::new(outbox_max_bytes),
            secret: Mutex::new(SecretState {
                secret: Arc::from(""),
                epoch: 0,
            }),
            keys: Mutex::new(Vec::new()),
            secret_changed: Notify::new(),
        }
    }

    pub(crate) fn secret(&self) -> Arc<str> {
        self.secret.lock().unwrap().secret.clone()
    }

    /// Keys this connection holds, pending or active.
    pub(crate) fn key_count(&self) -> usize {
        self.keys.lock().unwrap().len()
    }

    /// The current secret and its epoch: a snapshot resolved with this
    /// secret may only activate a subscription while the epoch is current.
    pub(crate) fn secret_epoch(&self) -> (Arc<str>, u64) {
        let state = self.secret.lock().unwrap();
        (state.secret.clone(), state.epoch)
    }

    fn epoch(&self) -> u64 {
        self.secret.lock().unwrap().epoch
    }

    /// Sets a new secret and starts a new epoch. Returns false, changing
    /// nothing, when `secret` is the current one: the same secret again
    /// authorizes exactly what it did, so it needs no re-check.
    pub(crate) fn set_secret(&self, secret: &str) -> bool {
        let mut state = self.secret.lock().unwrap();
        if *state.secret == *secret {
            return false;
        }
        state.secret = Arc::from(secret);
        state.epoch += 1;
        drop(state);
        self.secret_changed.notify_waiters();
        true
    }

    /// Completes once the connection's secret is no longer the one of
    /// `epoch`. A snapshot resolve races it and gives up when it wins: the
    /// answer would be dropped anyway, and dropping the resolve withdraws a
    /// request still queued in the pool, so a client that keeps changing its
    /// secret costs the backend one round of re-checks, not one per change.
    pub(crate) async fn superseded(&self, epoch: u64) {
        loop {
            let changed = self.secret_changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before the check, so a change in between is not missed.
            changed.as_mut().enable();
            if self.epoch() != epoch {
                return;
            }
            changed.await;
        }
    }

    #[cfg(test)]
    pub(crate) fn holds(&self, key: &ChangeKey) -> bool {
        self.keys.lock().unwrap().contains(key)
    }
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Snapshot resolve under way; `missed` records a change seen meanwhile.
    Pending {
        missed: bool,
    },
    Active,
}

struct Subscriber {
    conn: Arc<Connection>,
    state: State,
    /// Highest version queued to this subscriber; older pushes are skipped.
    delivered: u64,
    /// [`PushFrame::rows_digest`] of the last push queued to this subscriber.
    rows_digest: u64,
}

type Shard = HashMap<ChangeKey, HashMap<ConnId, Subscriber>>;

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

/// Which subscribers of a key a change resolve result is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Audience<'a> {
    /// Every active subscriber (SHARED fetch mode).
    All,
    /// Active subscribers whose connection's secret is this one (PER_SUBSCRIBER).
    Secret(&'a str),
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
    /// `--push-unchanged-rows`: send a change push even when its rows are
    /// the ones the subscriber got last.
    push_unchanged_rows: bool,
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
            }),
        }
    }

    fn shard(&self, key: &ChangeKey) -> &Mutex<Shard> {
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

    /// Adds `(key, conn)` as pending, or leaves an existing subscription as it
    /// is (a duplicate subscribe refreshes the snapshot, it doesn't interrupt
    /// pushes). Returns false, adding nothing, when `conn` already holds
    /// `limit` other keys.
    pub(crate) fn add_pending(
        &self,
        key: &ChangeKey,
        conn: &Arc<Connection>,
        limit: usize,
    ) -> AddPending {
        {
            let mut keys = conn.keys.lock().unwrap();
            if !keys.contains(key) {
                if keys.len() >= limit {
                    return AddPending::Full;
                }
                // Most connections hold one key: room for exactly one (a
                // first push would make room for four, 96 bytes more).
                if keys.capacity() == 0 {
                    keys.reserve_exact(1);
                }
                keys.push(key.clone());
            }
        }
        let mut shard = self.shard(key).lock().unwrap();
        let subscribers = match shard.entry(key.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                self.inner.keys.fetch_add(1, Relaxed);
                e.insert(HashMap::new())
            }
        };
        match subscribers.entry(conn.id) {
            Entry::Vacant(e) => {
                e.insert(Subscriber {
                    conn: conn.clone(),
                    state: State::Pending { missed: false },
                    delivered: 0,
                    rows_digest: 0,
                });
                self.inner.subscriptions.fetch_add(1, Relaxed);
                AddPending::Started
            }
            // A snapshot resolve is under way: it answers this subscribe too,
            // so a client repeating a subscribe starts one resolve, not many.
            Entry::Occupied(e) if matches!(e.get().state, State::Pending { .. }) => {
                AddPending::InFlight
            }
            // A resubscribe of an active key: it waits for its snapshot like
            // a new one (pushes queued before it are superseded by it).
            Entry::Occupied(mut e) => {
                e.get_mut().state = State::Pending { missed: false };
                conn.outbox.forget_all(key);
                AddPending::Started
            }
        }
    }

    /// Makes a pending subscription active after its snapshot resolved with
    /// the secret of `epoch`: queues `subscribed` (if given) and the snapshot
    /// push, in that order. Nothing happens when the connection has moved
    /// to a newer secret since (the epoch is read under the shard lock, the
    /// lock [`Self::recheck`] marks keys under, so no old snapshot slips in
    /// after a re-check started).
    pub(crate) fn activate(
        &self,
        key: &ChangeKey,
        conn: ConnId,
        epoch: u64,
        subscribed: Option<FrameText>,
        snapshot: &PushFrame,
    ) -> Activation {
        let mut shard = self.shard(key).lock().unwrap();
        let Some(sub) = shard.get_mut(key).and_then(|subs| subs.get_mut(&conn)) else {
            return Activation::Gone;
        };
        if sub.conn.epoch() != epoch {
            return Activation::Superseded;
        }
        let missed = matches!(sub.state, State::Pending { missed: true });
        sub.state = State::Active;
        if let Some(frame) = subscribed {
            sub.conn.outbox.control(Some(key), frame);
        }
        // The snapshot answers the client's own subscribe: it is sent whatever
        // its version, and becomes the version later pushes are compared
        // with (a version source that went back, or a resolver's bogus
        // version, is reset by resubscribing). Nothing newer can be queued:
        // a pending key gets no pushes.
        sub.delivered = snapshot.version;
        sub.rows_digest = snapshot.rows_digest;
        sub.conn.outbox.push(key, snapshot);
        Activation::Active { missed }
    }

    /// Ends `(key, conn)` after its snapshot resolve with the secret of
    /// `epoch` failed: queues `error` and removes the subscription. Nothing
    /// happens when the connection has moved to a newer secret since (its
    /// re-check decides) or the subscription is gone. Returns whether it
    /// ended the subscription.
    pub(crate) fn reject(
        &self,
        key: &ChangeKey,
        conn: &Connection,
        epoch: u64,
        error: FrameText,
    ) -> bool {
        let mut shard = self.shard(key).lock().unwrap();
        let Some(subs) = shard.get_mut(key) else {
            return false;
        };
        if !subs.contains_key(&conn.id) || conn.epoch() != epoch {
            return false;
        }
        subs.remove(&conn.id);
        self.inner.subscriptions.fetch_sub(1, Relaxed);
        if subs.is_empty() {
            shard.remove(key);
            self.inner.keys.fetch_sub(1, Relaxed);
        }
        conn.outbox.forget_all(key);
        conn.outbox.control(Some(key), error);
        // Lock order: shard, then the connection's key set.
        conn.keys.lock().unwrap().retain(|k| k != key);
        true
    }

    /// Puts every key `conn` holds back to pending after it sent a new
    /// secret ([`Connection::set_secret`] first), and returns them: each must
    /// be re-resolved with the new secret, like a subscribe, before it gets
    /// a push again.
    ///
    /// Why nothing resolved for the old secret reaches the connection once
    /// this returned:
    /// - a push already queued for a key is dropped here, under the shard
    ///   lock that fan-outs take, so it is either queued before (and dropped)
    ///   or finds the key pending (and skipped): pending keys get no pushes;
    /// - a change resolve for the old secret that finishes later is skipped
    ///   while the key is pending, and after the re-check activated it, its
    ///   audience `Secret(old)` no longer includes the connection (the
    ///   secret is read under the shard lock); a SHARED one carries rows for
    ///   every authorized subscriber, which the re-check just re-authorized,
    ///   and versions keep it from going back past the re-check's snapshot;
    /// - a snapshot resolved for the old secret (a subscribe or an earlier
    ///   re-check still running) finds its epoch outdated in
    ///   [`Self::activate`] / [`Self::reject`] and is dropped, whatever it
    ///   answered.
    ///
    /// Only the re-check of the current epoch can make the key active again.
    pub(crate) fn recheck(&self, conn: &Connection) -> Vec<ChangeKey> {
        let keys = conn.keys.lock().unwrap().clone();
        for key in &keys {
            let mut shard = self.shard(key).lock().unwrap();
            let Some(sub) = shard.get_mut(key).and_then(|subs| subs.get_mut(&conn.id)) else {
                continue;
            };
            // A change seen during a subscribe still running stays noted;
            // an active key's re-check snapshot is newer than any change
            // consumed before it, so it starts with none missed.
            let missed = matches!(sub.state, State::Pending { missed: true });
            sub.state = State::Pending { missed };
            conn.outbox.forget_all(key);
        }
        keys
    }

    /// Removes `(key, conn)`. Returns whether it existed.
    pub(crate) fn remove(&self, key: &ChangeKey, conn: &Connection) -> bool {
        conn.keys.lock().unwrap().retain(|k| k != key);
        self.remove_entry(key, conn.id)
    }

    fn remove_entry(&self, key: &ChangeKey, conn: ConnId) -> bool {
        let mut shard = self.shard(key).lock().unwrap();
        let Some(subs) = shard.get_mut(key) else {
            return false;
        };
        let removed = subs.remove(&conn).is_some();
        if removed {
            self.inner.subscriptions.fetch_sub(1, Relaxed);
        }
        if subs.is_empty() {
            shard.remove(key);
            self.inner.keys.fetch_sub(1, Relaxed);
        }
        removed
    }

    /// Records a change of `key`: pending subscribers are marked as having
    /// missed it. Returns whether the key has active subscribers to resolve for.
    pub(crate) fn note_change(&self, key: &ChangeKey) -> bool {
        let mut shard = self.shard(key).lock().unwrap();
        let Some(subs) = shard.get_mut(key) else {
            return false;
        };
        let mut active = false;
        for sub in subs.values_mut() {
            match &mut sub.state {
                State::Pending { missed } => *missed = true,
                State::Active => active = true,
            }
        }
        active
    }

    /// Whether `key` has any active subscriber.
    pub(crate) fn has_active(&self, key: &ChangeKey) -> bool {
        let shard = self.shard(key).lock().unwrap();
        shard
            .get(key)
            .is_some_and(|subs| subs.values().any(|s| s.state == State::Active))
    }

    /// Distinct secrets among the active subscribers of `key`.
    pub(crate) fn active_secrets(&self, key: &ChangeKey) -> Vec<Arc<str>> {
        let shard = self.shard(key).lock().unwrap();
        let mut secrets: Vec<Arc<str>> = Vec::new();
        if let Some(subs) = shard.get(key) {
            for sub in subs.values().filter(|s| s.state == State::Active) {
                let secret = sub.conn.secret();
                if !secrets.contains(&secret) {
                    secrets.push(secret);
                }
            }
        }
        secrets
    }

    /// Queues `frame` to the active subscribers of `key` in `audience`,
    /// skipping those that already hold a newer version, and (unless
    /// `--push-unchanged-rows`) those whose last push of the key had the same
    /// rows: their version is recorded, so a later, older push is still
    /// recognized as stale.
    pub(crate) fn fan_out(
        &self,
        key: &ChangeKey,
        frame: &PushFrame,
        audience: Audience<'_>,
    ) -> FanOut {
        let mut result = FanOut::default();
        let mut shard = self.shard(key).lock().unwrap();
        let Some(subs) = shard.get_mut(key) else {
            return result;
        };
        for sub in subs.values_mut() {
            if sub.state != State::Active || !audience.includes(&sub.conn) {
                continue;
            }
            if frame.version < sub.delivered {
                result.stale += 1;
                continue;
            }
            sub.delivered = frame.version;
            if !self.inner.push_unchanged_rows && frame.rows_digest == sub.rows_digest {
                result.unchanged += 1;
                continue;
            }
            sub.rows_digest = frame.rows_digest;
            match sub.conn.outbox.push(key, frame) {
                Queued::Appended => result.delivered += 1,
                Queued::Replaced => {
                    result.delivered += 1;
                    result.replaced += 1;
                }
                Queued::Stale => result.stale += 1,
                Queued::Overflow => result.overflowed += 1,
                Queued::Closed => {}
            }
        }
        result
    }

    /// Ends the active subscriptions of `key` in `audience` (revocation):
    /// each gets `error` queued and loses the key. Returns how many.
    pub(crate) fn revoke(
        &self,
        key: &ChangeKey,
        audience: Audience<'_>,
        error: &FrameText,
    ) -> usize {
        let mut shard = self.shard(key).lock().unwrap();
        let Some(subs) = shard.get_mut(key) else {
            return 0;
        };
        let before = subs.len();
        subs.retain(|_, sub| {
            if sub.state != State::Active || !audience.includes(&sub.conn) {
                return true;
            }
            sub.conn.outbox.forget(key);
            sub.conn.outbox.control(Some(key), error.clone());
            // Lock order: shard, then the connection's key set.
            sub.conn.keys.lock().unwrap().retain(|k| k != key);
            false
        });
        let revoked = before - subs.len();
        self.inner.subscriptions.fetch_sub(revoked, Relaxed);
        if subs.is_empty() {
            shard.remove(key);
            self.inner.keys.fetch_sub(1, Relaxed);
        }
        revoked
    }

    /// Every key with at least one subscriber (for resyncs).
    pub(crate) fn keys(&self) -> Vec<ChangeKey> {
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

impl Audience<'_> {
    fn includes(&self, conn: &Connection) -> bool {
        match self {
            Audience::All => true,
            Audience::Secret(secret) => *conn.secret() == **secret,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn key(id: &str) -> ChangeKey {
        ChangeKey::new("items", id).unwrap()
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

    fn drain(conn: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        conn.outbox.drain(&mut out);
        out.iter().map(|f| f.as_str().to_string()).collect()
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
        let frames = drain(&a);
        assert_eq!(frames[0], "ack");
        assert!(frames[1].contains("\"version\":4"));
    }

    #[test]
    fn fan_out_skips_older_versions() {
        let registry = Registry::new();
        let a = conn(1);
        registry.add_pending(&key("1"), &a, 10);
        registry.activate(&key("1"), 1, 0, None, &frame("1", 10));
        drain(&a);
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
        drain(&a);
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
        assert!(drain(&a).is_empty(), "queued pushes are dropped");

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
        assert!(drain(&a).is_empty());
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
        let frames = drain(&a);
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
