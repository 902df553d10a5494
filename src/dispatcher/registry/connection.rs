//! What the registry knows of one websocket connection: its outbox, its
//! secret and the epoch of that secret, and the keys it holds.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::{key::Key, websocket::outbox::Outbox};

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
    pub(super) secret: Mutex<SecretState>,
    /// Keys this connection holds (pending or active). Locked after a shard
    /// lock when a revocation removes a key; never the other way round. A
    /// `Vec`: a handful of keys is the norm, and it costs 32 bytes a key.
    pub(super) keys: Mutex<Vec<Key>>,
    /// Woken when the secret changes, so snapshot resolves for an older
    /// secret stop waiting (see [`Connection::superseded`]).
    secret_changed: Notify,
}

/// The secret every connection starts with: one shared `Arc`, not an
/// allocation per connection (32 bytes of every idle one). Sharing it is
/// safe for the epoch rule (a subscriber's group secret is the very `Arc`
/// its connection held): a connection's first new secret is a new `Arc`,
/// and so is every later one, "" included.
fn no_secret() -> Arc<str> {
    static NONE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
    NONE.clone()
}

/// A connection's secret and the epoch it belongs to.
pub(super) struct SecretState {
    secret: Arc<str>,
    epoch: u64,
}

impl Connection {
    pub(crate) fn new(id: ConnId, outbox_max_bytes: usize) -> Self {
        Self {
            id,
            outbox: Outbox::new(outbox_max_bytes),
            secret: Mutex::new(SecretState {
                secret: no_secret(),
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

    /// Whether this connection holds `key`, pending or active.
    pub(crate) fn holds_key(&self, key: &Key) -> bool {
        self.keys.lock().unwrap().contains(key)
    }

    /// The current secret and its epoch: a snapshot resolved with this
    /// secret may only activate a subscription while the epoch is current.
    pub(crate) fn secret_epoch(&self) -> (Arc<str>, u64) {
        let state = self.secret.lock().unwrap();
        (state.secret.clone(), state.epoch)
    }

    pub(super) fn epoch(&self) -> u64 {
        self.secret.lock().unwrap().epoch
    }

    /// Whether the connection's current secret is `secret` itself: the same
    /// allocation, not just equal text. A subscription keeps the `Arc` of the
    /// epoch it was activated in, and every new secret is a new `Arc`, so
    /// this is a pointer comparison (what a fan-out checks per subscriber).
    pub(super) fn holds_secret(&self, secret: &Arc<str>) -> bool {
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
    pub(crate) fn holds(&self, key: &Key) -> bool {
        self.keys.lock().unwrap().contains(key)
    }
}
