//! The dispatcher: consumes change keys from the bus, coalesces them per key, resolves and fans out pushes.
//!
//! Per key at most one change resolve runs at a time. Changes that arrive
//! meanwhile only raise the key's pending sequence, so a burst causes at most
//! one more resolve (coalescing). Failed resolves retry with backoff while the
//! key has subscribers: a push is never lost while its subscribers stay.
//! The subscribe flow (snapshot, then activation) lives here too, because it
//! must agree with the change flow on versions and missed changes.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    bus::{Bus, BusEvent},
    key::ChangeKey,
    metrics::Metrics,
    proto::v1::{FetchMode, Reason},
    protocol::{ErrorCode, PushFrame, error_frame, subscribed_frame},
    registry::{Activation, Audience, Connection, Registry},
    resolver::{Resolved, ResolverPool},
};

/// First retry delay of a failed change resolve; doubles up to [`RETRY_MAX`].
pub const RETRY_BASE: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(5);

struct Flight {
    /// Highest sequence of a change that arrived while the resolve ran.
    pending: Option<u64>,
}

/// The dispatcher: a cheap-clone handle.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    pool: ResolverPool,
    bus: Bus,
    metrics: Arc<Metrics>,
    /// Keys with a change resolve running. A std `Mutex`: touched once per
    /// consumed change and once per finished resolve, never across `.await`.
    flights: Mutex<HashMap<ChangeKey, Flight>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    bare_rows: bool,
    /// Highest bus sequence consumed.
    applied: AtomicU64,
}

/// How a resolve attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Done,
    Retry,
}

impl Dispatcher {
    pub fn new(
        registry: Registry,
        pool: ResolverPool,
        bus: Bus,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        cancel: CancellationToken,
        bare_rows: bool,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry,
                pool,
                bus,
                metrics,
                flights: Mutex::new(HashMap::new()),
                tracker,
                cancel,
                bare_rows,
                applied: AtomicU64::new(0),
            }),
        }
    }

    /// Consumes the bus until it ends or the node shuts down.
    pub async fn run(self, mut events: mpsc::Receiver<BusEvent>) {
        loop {
            let event = tokio::select! {
                _ = self.inner.cancel.cancelled() => return,
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
                        self.inner.applied.fetch_max(change.seq, Ordering::AcqRel);
                        self.schedule(change.key, change.seq);
                    }
                }
                Some(BusEvent::Resync { seq }) => self.resync(seq),
            }
        }
    }

    /// Re-resolves every subscribed key: changes were lost on the bus, so
    /// any key may be stale.
    pub fn resync(&self, seq: u64) {
        self.inner.applied.fetch_max(seq, Ordering::AcqRel);
        let keys = self.inner.registry.keys();
        tracing::info!(
            keys = keys.len(),
            seq,
            "resync: re-resolving every subscribed key"
        );
        for key in keys {
            self.schedule(key, seq);
        }
    }

    /// Highest bus sequence consumed by this node.
    pub fn applied(&self) -> u64 {
        self.inner.applied.load(Ordering::Acquire)
    }

    /// Starts a change resolve of `key`, or folds `seq` into the running one.
    pub fn schedule(&self, key: ChangeKey, seq: u64) {
        if !self.inner.registry.note_change(&key) {
            return;
        }
        let mut flights = self.inner.flights.lock().unwrap();
        match flights.entry(key) {
            Entry::Occupied(mut flight) => {
                let pending = &mut flight.get_mut().pending;
                *pending = Some(pending.map_or(seq, |p| p.max(seq)));
            }
            Entry::Vacant(slot) => {
                let key = slot.key().clone();
                slot.insert(Flight { pending: None });
                drop(flights);
                let span = tracing::debug_span!("change", key = %key);
                let this = self.clone();
                self.inner
                    .tracker
                    .spawn(async move { this.resolve_loop(key, seq).await }.instrument(span));
            }
        }
    }

    async fn resolve_loop(&self, key: ChangeKey, mut seq: u64) {
        let mut failures: u32 = 0;
        loop {
            if self.inner.cancel.is_cancelled() {
                self.land(&key);
                return;
            }
            if self.resolve_change(&key, seq).await == Attempt::Retry {
                failures += 1;
                if !self.inner.registry.has_active(&key) {
                    self.land(&key);
                    return;
                }
                Metrics::inc(&self.inner.metrics.resolve_retries_total);
                let delay = RETRY_BASE
                    .saturating_mul(1 << failures.min(16))
                    .min(RETRY_MAX);
                tracing::debug!(failures, ?delay, "change resolve failed, retrying");
                tokio::select! {
                    _ = self.inner.cancel.cancelled() => {
                        self.land(&key);
                        return;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                if let Some(pending) = self.take_pending(&key) {
                    seq = seq.max(pending);
                }
                continue;
            }
            failures = 0;
            // Done: run once more if changes came in meanwhile, else land.
            let mut flights = self.inner.flights.lock().unwrap();
            match flights.get_mut(&key).and_then(|f| f.pending.take()) {
                Some(pending) => seq = pending,
                None => {
                    flights.remove(&key);
                    return;
                }
            }
        }
    }

    fn take_pending(&self, key: &ChangeKey) -> Option<u64> {
        let mut flights = self.inner.flights.lock().unwrap();
        flights.get_mut(key).and_then(|f| f.pending.take())
    }

    fn land(&self, key: &ChangeKey) {
        self.inner.flights.lock().unwrap().remove(key);
    }

    async fn resolve_change(&self, key: &ChangeKey, seq: u64) -> Attempt {
        let Some(mode) = self.inner.pool.fetch_mode(&key.entity) else {
            return Attempt::Retry;
        };
        match mode {
            FetchMode::Shared => {
                let result = self
                    .inner
                    .pool
                    .resolve(key, Arc::from(""), Reason::Change)
                    .await;
                self.apply(key, seq, result, Audience::All)
            }
            _ => {
                let secrets = self.inner.registry.active_secrets(key);
                let results =
                    join_all(secrets.iter().map(|secret| {
                        self.inner.pool.resolve(key, secret.clone(), Reason::Change)
                    }))
                    .await;
                let mut attempt = Attempt::Done;
                for (secret, result) in secrets.iter().zip(results) {
                    if self.apply(key, seq, result, Audience::Secret(secret)) == Attempt::Retry {
                        attempt = Attempt::Retry;
                    }
                }
                attempt
            }
        }
    }

    fn apply(
        &self,
        key: &ChangeKey,
        seq: u64,
        result: Resolved,
        audience: Audience<'_>,
    ) -> Attempt {
        let metrics = &self.inner.metrics;
        match result {
            Resolved::Rows { rows, version } => {
                let version = if version != 0 { version } else { seq };
                self.fan_out(
                    key,
                    &PushFrame::build(key, version, &rows, self.inner.bare_rows),
                    audience,
                );
                Attempt::Done
            }
            // The row is gone: subscribers learn it from an empty push and
            // stay subscribed in case it comes back.
            Resolved::NotFound(_) => {
                self.fan_out(
                    key,
                    &PushFrame::build(key, seq, &[], self.inner.bare_rows),
                    audience,
                );
                Attempt::Done
            }
            Resolved::Forbidden(message) => {
                let message = if message.is_empty() {
                    "access to this key was revoked".to_string()
                } else {
                    message
                };
                let error = error_frame(ErrorCode::Forbidden, &message, Some(key));
                let revoked = self.inner.registry.revoke(key, audience, &error);
                metrics
                    .revocations_total
                    .fetch_add(revoked as u64, Ordering::Relaxed);
                metrics.client_errors[ErrorCode::Forbidden.index()]
                    .fetch_add(revoked as u64, Ordering::Relaxed);
                tracing::info!(key = %key, revoked, "subscriptions revoked by resolver");
                Attempt::Done
            }
            Resolved::Error(message) => {
                tracing::warn!(key = %key, error = %message, "change resolve failed");
                Attempt::Retry
            }
            Resolved::Timeout | Resolved::NoResolver => Attempt::Retry,
            Resolved::Closed => Attempt::Done,
        }
    }

    fn fan_out(&self, key: &ChangeKey, frame: &PushFrame, audience: Audience<'_>) {
        let fan = self.inner.registry.fan_out(key, frame, audience);
        let metrics = &self.inner.metrics;
        metrics
            .pushes_total
            .fetch_add(fan.delivered as u64, Ordering::Relaxed);
        metrics.push_bytes_total.fetch_add(
            (fan.delivered * frame.payload.len()) as u64,
            Ordering::Relaxed,
        );
        metrics
            .pushes_skipped_stale_total
            .fetch_add(fan.stale as u64, Ordering::Relaxed);
        metrics
            .slow_client_closes_total
            .fetch_add(fan.overflowed as u64, Ordering::Relaxed);
    }

    /// Resolves the snapshot of a subscription that the session has added to
    /// the registry as pending, then activates it (or ends it with an error
    /// frame). Dropping the future (the connection closed) is fine.
    pub async fn subscribe(&self, conn: Arc<Connection>, key: ChangeKey) {
        // Read before resolving: the snapshot reflects every change up to it.
        let base = self.inner.bus.snapshot_version().await.max(self.applied());
        let result = self
            .inner
            .pool
            .resolve(&key, conn.secret(), Reason::Subscribe)
            .await;
        let (code, message) = match result {
            Resolved::Rows { rows, version } => {
                let version = if version != 0 { version } else { base };
                let frame = PushFrame::build(&key, version, &rows, self.inner.bare_rows);
                let ack = (!self.inner.bare_rows).then(|| subscribed_frame(&key));
                let activation = self.inner.registry.activate(&key, conn.id, ack, &frame);
                if activation == (Activation::Active { missed: true }) {
                    // A change came in while the snapshot was being resolved;
                    // the snapshot may predate it.
                    self.schedule(key, self.applied());
                }
                return;
            }
            Resolved::NotFound(m) => (ErrorCode::NotFound, or(m, "no such key")),
            Resolved::Forbidden(m) => (ErrorCode::Forbidden, or(m, "access denied")),
            Resolved::Error(m) => (ErrorCode::ResolverError, or(m, "the resolver failed")),
            Resolved::Timeout => (
                ErrorCode::ResolverTimeout,
                "no resolver answered in time".to_string(),
            ),
            Resolved::NoResolver => (
                ErrorCode::NoResolver,
                format!("no resolver serves entity {:?}", &*key.entity),
            ),
            Resolved::Closed => (
                ErrorCode::NoResolver,
                "the node is shutting down".to_string(),
            ),
        };
        self.inner.registry.remove(&key, &conn);
        conn.outbox
            .control(Some(&key), error_frame(code, &message, Some(&key)));
        self.inner.metrics.client_error(code);
    }
}

fn or(message: String, default: &str) -> String {
    if message.is_empty() {
        default.to_string()
    } else {
        message
    }
}
