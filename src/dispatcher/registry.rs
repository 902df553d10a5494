//! The subscription registry: which connections hold which keys, sharded so no global lock sits on the hot path.
//!
//! Each key lives in one of [`SHARDS`] shards chosen by its hash; a shard is a
//! std `Mutex<HashMap>` held only for in-memory work (never across `.await`).
//! Fan-out queues a shared frame into each subscriber's [`Outbox`] while the
//! shard is locked: that is a few pointer moves per subscriber, and it keeps
//! "who is subscribed" and "who got the frame" consistent.
//!
//! A key's active subscribers are also grouped by the secret they were
//! activated with ([`Groups`]): a PER_SUBSCRIBER change is resolved once per
//! distinct secret and fanned out once per secret, and each of those
//! fan-outs reaches its own group without looking at the others, so one
//! change costs work linear in the key's subscribers, however many secrets.

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
    websocket::outbox::{Outbox, Queued},
    websocket::protocol::{FrameText, PushFrame},
};

#[cfg(test)]
thread_local! {
    /// Work done by fan-outs on this thread: subscribers looked at and
    /// secrets compared (unit tests assert on it, not on time).
    static WORK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts one unit of fan-out work (tests only).
#[inline]
fn work() {
    #[cfg(test)]
    WORK.with(|w| w.set(w.get() + 1));
}

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

    /// Whether the connection's current secret is `secret` itself: the same
    /// allocation, not just equal text. A subscription keeps the `Arc` of the
    /// epoch it was activated in, and every new secret is a new `Arc`, so
    /// this is a pointer comparison (what a fan-out checks per subscriber).
    fn holds_secret(&self, secret: &Arc<str>) -> bool {
        Arc::ptr_eq(&self.secret.lock().unwrap().secret, secret)
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

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Snapshot resolve under way; `missed` records a change seen meanwhile.
    Pending { missed: bool },
    /// Active since a snapshot resolved with `secret`, the connection's own
    /// `Arc` of that epoch: it names the subscriber's group in [`Groups`],
    /// and a fan-out for that secret reaches the subscriber only while its
    /// connection still holds this very `Arc` (see
    /// [`Connection::holds_secret`]).
    Active { secret: Arc<str> },
}

impl State {
    fn is_active(&self) -> bool {
        matches!(self, State::Active { .. })
    }
}

struct Subscriber {
    conn: Arc<Connection>,
    state: State,
    /// Highest version queued to this subscriber; older pushes are skipped.
    delivered: u64,
    /// [`PushFrame::rows_digest`] of the last push queued to this subscriber.
    rows_digest: u64,
}

/// A key's subscribers: every one by connection, the active ones also by secret.
struct KeySubscribers {
    by_conn: HashMap<ConnId, Subscriber>,
    groups: Groups,
}

/// A key's active subscribers by the secret they were activated with (the
/// secret's text; each subscriber keeps its connection's own `Arc`).
///
/// Invariant: the subscribers in the groups are exactly the active ones in
/// [`KeySubscribers::by_conn`]; only [`KeySubscribers`]'s methods (and
/// [`Registry::revoke`], which empties whole groups) change either.
enum Groups {
    /// No active subscriber.
    None,
    /// `count` active subscribers, all of one secret: the common case (one
    /// subscriber, or one secret for all), with no map and no list.
    One { secret: Arc<str>, count: usize },
    /// Active subscribers of two or more secrets. It stays a map until the
    /// key has no active subscriber left: a client coming and going with a
    /// second secret adds and removes one entry, it does not regroup the rest.
    ///
    /// Boxed: every key carries a `Groups`, and an inline map (48 bytes)
    /// would make each 16 bytes larger for the rare key with several secrets.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<Arc<str>, Vec<ConnId>>>),
}

impl Groups {
    /// Adds `id`, now active with `secret`. `by_conn` (where it is already
    /// marked active) is what a second secret groups, once.
    fn join(&mut self, secret: &Arc<str>, id: ConnId, by_conn: &HashMap<ConnId, Subscriber>) {
        match self {
            Groups::None => {
                *self = Groups::One {
                    secret: secret.clone(),
                    count: 1,
                }
            }
            Groups::One { secret: one, count } if **one == **secret => *count += 1,
            Groups::One { .. } => {
                let mut groups: HashMap<Arc<str>, Vec<ConnId>> = HashMap::new();
                for (id, sub) in by_conn {
                    if let State::Active { secret } = &sub.state {
                        Self::add(&mut groups, secret, *id);
                    }
                }
                *self = Groups::Many(Box::new(groups));
            }
            Groups::Many(groups) => Self::add(groups, secret, id),
        }
    }

    fn add(groups: &mut HashMap<Arc<str>, Vec<ConnId>>, secret: &Arc<str>, id: ConnId) {
        match groups.get_mut(&**secret) {
            Some(ids) => ids.push(id),
            None => {
                groups.insert(secret.clone(), vec![id]);
            }
        }
    }

    /// Removes `id`, active with `secret` until now. A scan of its group:
    /// linear in the subscribers sharing its secret on this key.
    fn leave(&mut self, secret: &str, id: ConnId) {
        match self {
            Groups::None => debug_assert!(false, "an active subscriber has a group"),
            Groups::One { count, .. } => {
                *count -= 1;
                if *count == 0 {
                    *self = Groups::None;
                }
            }
            Groups::Many(groups) => {
                if let Some(ids) = groups.get_mut(secret) {
                    if let Some(at) = ids.iter().position(|i| *i == id) {
                        ids.swap_remove(at);
                    }
                    if ids.is_empty() {
                        groups.remove(secret);
                    }
                }
                if groups.is_empty() {
                    *self = Groups::None;
                }
            }
        }
    }

    /// Removes `ids`, all of them active with `secret` until now (a whole
    /// revocation at once: one pass over the group, not one per subscriber).
    fn leave_all(&mut self, secret: &str, ids: &[ConnId]) {
        match self {
            Groups::None => debug_assert!(ids.is_empty(), "an active subscriber has a group"),
            Groups::One { count, .. } => {
                *count -= ids.len();
                if *count == 0 {
                    *self = Groups::None;
                }
            }
            Groups::Many(groups) => {
                if let Some(group) = groups.get_mut(secret) {
                    if group.len() == ids.len() {
                        groups.remove(secret);
                    } else {
                        let gone: std::collections::HashSet<&ConnId> = ids.iter().collect();
                        group.retain(|id| !gone.contains(id));
                    }
                }
                if groups.is_empty() {
                    *self = Groups::None;
                }
            }
        }
    }
}

impl KeySubscribers {
    fn new() -> Self {
        Self {
            by_conn: HashMap::new(),
            groups: Groups::None,
        }
    }

    /// Makes `id` active with `secret` (moving it out of its group first if
    /// it was active already).
    fn set_active(&mut self, id: ConnId, secret: &Arc<str>) {
        let Some(sub) = self.by_conn.get_mut(&id) else {
            return;
        };
        let was = std::mem::replace(
            &mut sub.state,
            State::Active {
                secret: secret.clone(),
            },
        );
        if let State::Active { secret: old } = was {
            self.groups.leave(&old, id);
        }
        self.groups.join(secret, id, &self.by_conn);
    }

    /// Makes `id` pending (out of its group if it was active).
    fn set_pending(&mut self, id: ConnId, missed: bool) {
        let Some(sub) = self.by_conn.get_mut(&id) else {
            return;
        };
        if let State::Active { secret } =
            std::mem::replace(&mut sub.state, State::Pending { missed })
        {
            self.groups.leave(&secret, id);
        }
    }

    /// Removes `id` (out of its group if it was active).
    fn remove(&mut self, id: ConnId) -> Option<Subscriber> {
        let sub = self.by_conn.remove(&id)?;
        if let State::Active { secret } = &sub.state {
            self.groups.leave(secret, id);
        }
        Some(sub)
    }

    fn has_active(&self) -> bool {
        !matches!(self.groups, Groups::None)
    }

    /// Calls `f` with every active subscriber in `audience`. For a secret,
    /// only its group is looked at (one hash of the secret, one comparison),
    /// and of it the subscribers whose connection still holds the secret.
    fn for_each_in(&mut self, audience: Audience<'_>, mut f: impl FnMut(ConnId, &mut Subscriber)) {
        let wanted = match audience {
            Audience::All => {
                for (id, sub) in &mut self.by_conn {
                    work();
                    if sub.state.is_active() {
                        f(*id, sub);
                    }
                }
                return;
            }
            Audience::Secret(wanted) => wanted,
        };
        let still_holds = |sub: &Subscriber| match &sub.state {
            State::Active { secret } => sub.conn.holds_secret(secret),
            State::Pending { .. } => false,
        };
        match &self.groups {
            Groups::None => {}
            Groups::One { secret, .. } => {
                work();
                if **secret != *wanted {
                    return;
                }
                for (id, sub) in &mut self.by_conn {
                    work();
                    if still_holds(sub) {
                        f(*id, sub);
                    }
                }
            }
            Groups::Many(groups) => {
                work();
                let Some(ids) = groups.get(wanted) else {
                    return;
                };
                for id in ids {
                    work();
                    if let Some(sub) = self.by_conn.get_mut(id)
                        && still_holds(sub)
                    {
                        f(*id, sub);
                    }
                }
            }
        }
    }

    /// Checks the invariant of [`Groups`] (tests).
    #[cfg(test)]
    fn check(&self) {
        let mut active: Vec<(String, ConnId)> = self
            .by_conn
            .iter()
            .filter_map(|(id, sub)| match &sub.state {
                State::Active { secret } => Some((secret.to_string(), *id)),
                State::Pending { .. } => None,
            })
            .collect();
        active.sort();
        let mut grouped: Vec<(String, ConnId)> = match &self.groups {
            Groups::None => Vec::new(),
            Groups::One { secret, count } => {
                assert_eq!(*count, active.len());
                assert!(active.iter().all(|(s, _)| **s == **secret));
                active.clone()
            }
            Groups::Many(groups) => groups
                .iter()
                .flat_map(|(secret, ids)| {
                    assert!(!ids.is_empty());
                    ids.iter().map(|id| (secret.to_string(), *id))
                })
                .collect(),
        };
        grouped.sort();
        assert_eq!(grouped, active);
    }
}

type Shard = HashMap<ChangeKey, KeySubscribers>;

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
    /// Active subscribers activated with this secret whose connection still
    /// holds it (PER_SUBSCRIBER): one group, whatever the key's other secrets.
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
                e.insert(KeySubscribers::new())
            }
        };
        match subscribers.by_conn.entry(conn.id) {
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
            Entry::Occupied(_) => {
                subscribers.set_pending(conn.id, false);
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
        let Some(subs) = shard.get_mut(key) else {
            return Activation::Gone;
        };
        let Some(sub) = subs.by_conn.get(&conn) else {
            return Activation::Gone;
        };
        // The secret of the snapshot's epoch: the connection's current one.
        let (secret, current) = sub.conn.secret_epoch();
        if current != epoch {
            return Activation::Superseded;
        }
        let missed = matches!(sub.state, State::Pending { missed: true });
        subs.set_active(conn, &secret);
        let sub = subs.by_conn.get_mut(&conn).expect("looked up above");
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
        if !subs.by_conn.contains_key(&conn.id) || conn.epoch() != epoch {
            return false;
        }
        subs.remove(conn.id);
        self.inner.subscriptions.fetch_sub(1, Relaxed);
        if subs.by_conn.is_empty() {
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
            let Some(subs) = shard.get_mut(key) else {
                continue;
            };
            let Some(sub) = subs.by_conn.get(&conn.id) else {
                continue;
            };
            // A change seen during a subscribe still running stays noted;
            // an active key's re-check snapshot is newer than any change
            // consumed before it, so it starts with none missed.
            let missed = matches!(sub.state, State::Pending { missed: true });
            subs.set_pending(conn.id, missed);
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
        let removed = subs.remove(conn).is_some();
        if removed {
            self.inner.subscriptions.fetch_sub(1, Relaxed);
        }
        if subs.by_conn.is_empty() {
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
        for sub in subs.by_conn.values_mut() {
            if let State::Pending { missed } = &mut sub.state {
                *missed = true;
            }
        }
        subs.has_active()
    }

    /// Whether `key` has any active subscriber.
    pub(crate) fn has_active(&self, key: &ChangeKey) -> bool {
        let shard = self.shard(key).lock().unwrap();
        shard.get(key).is_some_and(KeySubscribers::has_active)
    }

    /// Distinct secrets among the active subscribers of `key` (the ones
    /// their subscriptions were activated with): its groups, no comparison.
    pub(crate) fn active_secrets(&self, key: &ChangeKey) -> Vec<Arc<str>> {
        let shard = self.shard(key).lock().unwrap();
        match shard.get(key).map(|subs| &subs.groups) {
            None | Some(Groups::None) => Vec::new(),
            Some(Groups::One { secret, .. }) => vec![secret.clone()],
            Some(Groups::Many(groups)) => groups.keys().cloned().collect(),
        }
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
        let push_unchanged = self.inner.push_unchanged_rows;
        subs.for_each_in(audience, |_, sub| {
            if frame.version < sub.delivered {
                result.stale += 1;
                return;
            }
            sub.delivered = frame.version;
            if !push_unchanged && frame.rows_digest == sub.rows_digest {
                result.unchanged += 1;
                return;
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
        });
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
        let mut ids = Vec::new();
        subs.for_each_in(audience, |id, _| ids.push(id));
        for id in &ids {
            // Out of `by_conn` here; out of the groups all at once below.
            let sub = subs.by_conn.remove(id).expect("found above");
            sub.conn.outbox.forget(key);
            sub.conn.outbox.control(Some(key), error.clone());
            // Lock order: shard, then the connection's key set.
            sub.conn.keys.lock().unwrap().retain(|k| k != key);
        }
        match audience {
            Audience::All => subs.groups = Groups::None,
            Audience::Secret(secret) => subs.groups.leave_all(secret, &ids),
        }
        let revoked = ids.len();
        self.inner.subscriptions.fetch_sub(revoked, Relaxed);
        if subs.by_conn.is_empty() {
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
                drain(&c);
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
                let frames = drain(c);
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
                drain(c);
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

    /// Per subscription and per key, what grouping by secret costs: the
    /// state holds its secret's `Arc` (a subscriber 32 → 40 bytes), a key
    /// its groups (a map of subscribers 48 → 80 bytes), and a key with one
    /// secret allocates nothing more.
    #[test]
    fn entry_sizes() {
        assert_eq!(std::mem::size_of::<Subscriber>(), 40);
        assert_eq!(std::mem::size_of::<Groups>(), 32);
        assert_eq!(std::mem::size_of::<KeySubscribers>(), 80);
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
