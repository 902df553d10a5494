//! Subscriptions held on the strength of a subscribe token, and their end
//! when the token expires.
//!
//! One node-wide task sleeps until the earliest `exp` (plus the leeway) of
//! every token-held subscription, then ends those that are due: removed from
//! the registry, an `error` frame `token_expired` with the key on their
//! connection. A subscribe of the key with a newer token before then moves
//! its deadline (a refresh); an unsubscribe, a subscribe without a token (the
//! secret authorizes it then) or the connection's close forgets it.
//!
//! State: one std `Mutex` around a map by (connection, key), its deadline
//! order and each connection's keys; never held across an await, and never
//! while a registry lock is taken (the expiry collects what is due first).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex, Weak, atomic::Ordering::Relaxed},
    time::Duration,
};

use tokio::sync::Notify;

use crate::{
    dispatcher::registry::{ConnId, Connection, Registry},
    key::Key,
    ops::{metrics::Metrics, tasks::Tasks},
    websocket::{
        protocol::{ErrorCode, error_frame},
        tokens::{LEEWAY_SECS, unix_now},
    },
};

/// Token-held subscriptions: a cheap-clone handle.
#[derive(Clone)]
pub(crate) struct Grants {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Woken when a deadline earlier than the one slept on is added.
    earlier: Notify,
    registry: Registry,
    metrics: Arc<Metrics>,
    /// A connection's subscription limit.
    max_per_connection: usize,
}

#[derive(Default)]
struct State {
    held: HashMap<(ConnId, Key), Held>,
    /// (exp, connection, key) of every entry of `held`.
    due: BTreeSet<(u64, ConnId, Key)>,
    by_conn: HashMap<ConnId, HashSet<Key>>,
}

struct Held {
    exp: u64,
    conn: Weak<Connection>,
}

impl Grants {
    /// Starts the expiry task (until the node stops).
    pub(crate) fn start(
        registry: Registry,
        metrics: Arc<Metrics>,
        max_per_connection: usize,
        tasks: &Tasks,
    ) -> Self {
        let grants = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                earlier: Notify::new(),
                registry,
                metrics,
                max_per_connection,
            }),
        };
        let (task, stop) = (grants.clone(), tasks.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                () = task.expire_forever() => {}
            }
        });
        grants
    }

    /// `conn` holds (or is subscribing to) `key` on a token valid until
    /// `exp`: replaces what it held it on before.
    pub(crate) fn grant(&self, conn: &Arc<Connection>, key: &Key, exp: u64) {
        let earliest_before;
        {
            let mut state = self.inner.state.lock().unwrap();
            earliest_before = state.due.first().map(|(exp, ..)| *exp);
            state.forget(conn.id, key);
            state.due.insert((exp, conn.id, key.clone()));
            state.held.insert(
                (conn.id, key.clone()),
                Held {
                    exp,
                    conn: Arc::downgrade(conn),
                },
            );
            let keys = state.by_conn.entry(conn.id).or_default();
            keys.insert(key.clone());
            // Subscriptions that ended otherwise (an error frame) are
            // dropped once the connection has more entries than it can hold
            // subscriptions: so at most that many stay per connection.
            if keys.len() > self.inner.max_per_connection {
                let gone: Vec<Key> = keys
                    .iter()
                    .filter(|k| !conn.holds_key(k))
                    .cloned()
                    .collect();
                for key in gone {
                    state.forget(conn.id, &key);
                }
            }
            self.show(&state);
        }
        if earliest_before.is_none_or(|earliest| exp < earliest) {
            self.inner.earlier.notify_one();
        }
    }

    /// `conn` no longer holds `key` on a token (unsubscribed, or
    /// subscribed again without one).
    pub(crate) fn forget(&self, conn: ConnId, key: &Key) {
        let mut state = self.inner.state.lock().unwrap();
        state.forget(conn, key);
        self.show(&state);
    }

    /// Whether `conn` holds `key` on a token.
    pub(crate) fn holds(&self, conn: ConnId, key: &Key) -> bool {
        let state = self.inner.state.lock().unwrap();
        state.held.contains_key(&(conn, key.clone()))
    }

    /// The connection closed: all of its entries go.
    pub(crate) fn connection_closed(&self, conn: ConnId) {
        let mut state = self.inner.state.lock().unwrap();
        if let Some(keys) = state.by_conn.remove(&conn) {
            for key in keys {
                if let Some(held) = state.held.remove(&(conn, key.clone())) {
                    state.due.remove(&(held.exp, conn, key));
                }
            }
            self.show(&state);
        }
    }

    fn show(&self, state: &State) {
        self.inner
            .metrics
            .token_subscriptions
            .store(state.held.len() as u64, Relaxed);
    }

    /// Ends due subscriptions, then sleeps until the next is due (or an
    /// earlier one is added), forever.
    async fn expire_forever(&self) {
        loop {
            let next = self.expire_due(unix_now());
            // Sleep until the next deadline's second is over (a token is
            // expired once `now > exp + leeway`), re-checked at least every
            // minute (the wall clock may jump).
            let wait = match next {
                Some(exp) => {
                    let at = exp + LEEWAY_SECS + 1;
                    Duration::from_secs(at.saturating_sub(unix_now()).clamp(0, 60))
                        .max(Duration::from_millis(100))
                }
                None => Duration::from_secs(60),
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.inner.earlier.notified() => {}
            }
        }
    }

    /// Ends the subscriptions whose token expired by `now`; the next
    /// deadline left.
    fn expire_due(&self, now: u64) -> Option<u64> {
        let mut ended = Vec::new();
        let next = {
            let mut state = self.inner.state.lock().unwrap();
            while let Some((exp, conn, key)) = state.due.first().cloned() {
                if exp.saturating_add(LEEWAY_SECS) >= now {
                    break;
                }
                state.due.pop_first();
                if let Some(held) = state.forget(conn, &key) {
                    ended.push((held.conn, key));
                }
            }
            self.show(&state);
            state.due.first().map(|(exp, ..)| *exp)
        };
        for (conn, key) in ended {
            let Some(conn) = conn.upgrade() else { continue };
            if self.inner.registry.remove(&key, &conn) {
                conn.outbox.forget(&key);
                conn.outbox.control(
                    Some(&key),
                    error_frame(
                        ErrorCode::TokenExpired,
                        "the subscribe token expired; the subscription ended (subscribe again with a fresh token)",
                        Some(&key),
                    ),
                );
                self.inner.metrics.client_error(ErrorCode::TokenExpired);
                Metrics::inc(&self.inner.metrics.token_expiries_total);
            }
        }
        next
    }
}

impl State {
    /// Drops `conn`'s entry of `key` from every index; the entry, if any.
    fn forget(&mut self, conn: ConnId, key: &Key) -> Option<Held> {
        let held = self.held.remove(&(conn, key.clone()))?;
        self.due.remove(&(held.exp, conn, key.clone()));
        if let Some(keys) = self.by_conn.get_mut(&conn) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_conn.remove(&conn);
            }
        }
        Some(held)
    }
}
