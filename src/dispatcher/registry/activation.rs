//! The subscribe flow's side of the registry: a subscription added as
//! pending, activated by its snapshot or rejected, put back to pending by a
//! new secret, removed.

use std::{
    collections::hash_map::Entry,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use super::{Activation, AddPending, Registry};
use crate::dispatcher::registry::connection::{ConnId, Connection};
use crate::dispatcher::registry::subscribers::{KeySubscribers, State, Subscriber};
use crate::{
    key::Key,
    websocket::protocol::{FrameText, PushFrame},
};

impl Registry {
    /// Adds `(key, conn)` as pending, or leaves an existing subscription as it
    /// is (a duplicate subscribe refreshes the snapshot, it doesn't interrupt
    /// pushes). Returns false, adding nothing, when `conn` already holds
    /// `limit` other keys.
    pub(crate) fn add_pending(
        &self,
        key: &Key,
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
                self.announce_key(key);
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
        key: &Key,
        conn: ConnId,
        epoch: u64,
        subscribed: Option<FrameText>,
        snapshot: &PushFrame,
    ) -> Activation {
        self.activate_as(key, conn, epoch, subscribed, Held::Sent(snapshot))
    }

    /// Like [`Self::activate`] for a subscribe whose client already holds
    /// the key's latest state (a resume answered `current`): queues
    /// `subscribed` and no snapshot. Later pushes are compared with `version`;
    /// the rows the client holds are not known here (the resolve that
    /// authorized it may already have seen a later change), so the next push
    /// newer than `version` is sent whatever its rows.
    pub(crate) fn activate_held(
        &self,
        key: &Key,
        conn: ConnId,
        epoch: u64,
        subscribed: FrameText,
        version: u64,
    ) -> Activation {
        self.activate_as(
            key,
            conn,
            epoch,
            Some(subscribed),
            Held::Already { version },
        )
    }

    fn activate_as(
        &self,
        key: &Key,
        conn: ConnId,
        epoch: u64,
        subscribed: Option<FrameText>,
        held: Held<'_>,
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
        match held {
            Held::Sent(snapshot) => {
                sub.delivered = snapshot.version;
                sub.rows_digest = snapshot.rows_digest;
                sub.conn.outbox.push(key, snapshot);
            }
            Held::Already { version } => {
                sub.delivered = version;
                sub.rows_digest = UNKNOWN_ROWS;
            }
        }
        Activation::Active { missed }
    }

    /// Ends `(key, conn)` after its snapshot resolve with the secret of
    /// `epoch` failed: queues `error` and removes the subscription. Nothing
    /// happens when the connection has moved to a newer secret since (its
    /// re-check decides) or the subscription is gone. Returns whether it
    /// ended the subscription.
    pub(crate) fn reject(
        &self,
        key: &Key,
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
            self.key_left(key);
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
    pub(crate) fn recheck(&self, conn: &Connection) -> Vec<Key> {
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
    /// Whether `conn` holds `key` as an active subscription (not one
    /// waiting for its snapshot).
    pub(crate) fn is_active(&self, key: &Key, conn: ConnId) -> bool {
        self.shard(key)
            .lock()
            .unwrap()
            .get(key)
            .and_then(|subscribers| subscribers.by_conn.get(&conn))
            .is_some_and(|subscriber| subscriber.state.is_active())
    }

    pub(crate) fn remove(&self, key: &Key, conn: &Connection) -> bool {
        conn.keys.lock().unwrap().retain(|k| k != key);
        self.remove_entry(key, conn.id)
    }
}

/// What an activated subscriber holds of its key.
enum Held<'a> {
    /// The snapshot, queued now.
    Sent(&'a PushFrame),
    /// The client's own state, which is the latest (a resume): nothing queued.
    Already { version: u64 },
}

/// The rows digest of a subscriber whose rows are not known here: no push's
/// digest is taken for it (a digest is 64 bits of a keyed hash; one equal to
/// this is as likely as any other collision).
const UNKNOWN_ROWS: u64 = 0;
