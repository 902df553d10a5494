//! The cluster relay: a change of a SHARED key is resolved once for the whole cluster, and its rows travel to the nodes that hold the key.
//!
//! Two sides, on every node of a JetStream cluster:
//!
//! - **Claiming.** The bus's relay feed hands each change to exactly one node
//!   (a durable pull consumer shared by all). That node asks NATS whether
//!   any node holds the key (a request on `{prefix}.rows.{entity}.{id}`:
//!   "no responders" means none, and the change costs nothing more),
//!   resolves it once (reason CHANGE, `shared`, empty secret; locally or
//!   through another node), publishes the rows on that subject and only then
//!   acknowledges the claim. While it resolves it reports progress; a node
//!   that dies, stalls or is cut off stops doing so and JetStream hands the
//!   change to another node. Changes of a key claimed while one of its
//!   resolves runs here wait and are covered by one more resolve
//!   (coalescing); a resolve that fails is handed back to be retried.
//! - **Holding.** A node with subscribers of a SHARED key subscribes to its
//!   rows subject (and answers the "does anyone hold it" probes). Rows that
//!   arrive are handed to the dispatcher, which pushes them. The node's own
//!   bus consumer still sees every change; for a held key the change flow
//!   waits up to `--relay-timeout` for the relay's rows of that change and
//!   resolves the key itself if they do not come, so a lost message or a
//!   relay that is down costs time, never a change.
//!
//! Per-subscriber entities never use the relay: their rows depend on each
//! secret, and the nodes holding the connections resolve them.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{Client, RequestErrorKind, client::PublishErrorKind};
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    bus::{Claim, RelayFeed},
    key::Key,
    ops::metrics::Metrics,
    ops::tasks::Tasks,
    ops::trace::{ChangeMeta, TraceId},
    proto::{internal::v1::RelayedRows, v1::KeyResult},
    resolving::pool::{ResolveErrorKind, Resolved, key_result, read_key_result},
    websocket::protocol::PushFrame,
};

/// How long the claiming node waits for holders to answer its probe; no
/// answer in time counts as "held" (resolving for nobody is the safe error).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Claims this node works on at once; the feed waits for room.
const MAX_CLAIMS: usize = 256;
/// Delay before a claim whose resolve failed is delivered again.
const RETRY_DELAY: Duration = Duration::from_secs(1);
/// Rows received and not yet applied by the dispatcher.
const RECEIVED_BUFFER: usize = 1024;

/// What resolves a SHARED change for the cluster: the node's route (the
/// local pool, or another node's), which imports this module, not the other
/// way round.
pub(crate) trait SharedResolver: Clone + Send + Sync + 'static {
    /// Resolves `key` once for every subscriber (reason CHANGE, `shared`,
    /// empty secret).
    fn resolve_shared(&self, key: &Key) -> impl Future<Output = Resolved> + Send;
}

/// The relay of a node: a cheap-clone handle.
#[derive(Clone)]
pub(crate) struct Relay {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    prefix: String,
    /// `--relay-timeout`: how long a held key's change waits for the
    /// relay's rows before this node resolves it itself.
    timeout: Duration,
    tasks: Tasks,
    /// The first change version the relay feed covers (see [`RelayFeed`]).
    covers_from: Arc<std::sync::atomic::AtomicU64>,
    /// Held keys: their rows subscription and what arrived. A std `Mutex`:
    /// map operations only, never held across `.await`.
    held: Mutex<HashMap<Key, Held>>,
    received_tx: mpsc::Sender<Received>,
    received_rx: Mutex<Option<mpsc::Receiver<Received>>>,
}

struct Held {
    cancel: CancellationToken,
    mark: watch::Sender<Mark>,
    /// The latest relayed push applied here (shared with the cache and the
    /// outboxes by reference count), for subscribers that were still pending
    /// when it came.
    latest: Option<PushFrame>,
}

/// How far the relay's rows of a held key have come.
#[derive(Debug, Clone, Copy, Default)]
struct Mark {
    /// Highest change version whose rows were applied here.
    applied: u64,
    /// Highest change version the relay could not carry: resolve it here.
    resolve_here: u64,
}

/// Rows the relay delivered for a held key, for the dispatcher.
pub(crate) struct Received {
    pub(crate) key: Key,
    /// The highest change the rows cover.
    pub(crate) change_version: u64,
    /// The answer; `None`: too large to relay, resolve it here.
    pub(crate) outcome: Option<Resolved>,
    pub(crate) meta: ChangeMeta,
}

/// What a held key's change got from the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waited {
    /// Its rows (or newer ones) were applied here.
    Arrived,
    /// Nothing in time, the relay could not carry the rows, or the key is
    /// not held: resolve it here.
    ResolveHere,
}

impl Relay {
    /// Starts both sides: claims from `feed` resolved with `resolvers`, and
    /// the held keys' subscriptions on `client`.
    pub(crate) fn start(
        client: Client,
        prefix: &str,
        timeout: Duration,
        feed: RelayFeed,
        resolvers: impl SharedResolver,
        metrics: Arc<Metrics>,
        tasks: &Tasks,
    ) -> Self {
        let (received_tx, received_rx) = mpsc::channel(RECEIVED_BUFFER);
        let relay = Relay {
            inner: Arc::new(Inner {
                client,
                prefix: prefix.to_owned(),
                timeout,
                tasks: tasks.clone(),
                covers_from: feed.covers_from,
                held: Mutex::new(HashMap::new()),
                received_tx,
                received_rx: Mutex::new(Some(received_rx)),
            }),
        };
        let claimer = Claimer {
            client: relay.inner.client.clone(),
            prefix: relay.inner.prefix.clone(),
            resolvers,
            metrics,
            relaying: Arc::new(Mutex::new(HashMap::new())),
            room: Arc::new(Semaphore::new(MAX_CLAIMS)),
        };
        tasks.spawn(claimer.run(feed.claims, tasks.clone()));
        relay
    }

    /// The rows the relay delivers, for the dispatcher (once).
    pub(crate) fn take_received(&self) -> Option<mpsc::Receiver<Received>> {
        self.inner.received_rx.lock().unwrap().take()
    }

    /// Starts receiving the relay's rows of `key` (a SHARED key with
    /// subscribers here), unless already.
    pub(crate) fn hold(&self, key: &Key) {
        let mut held = self.inner.held.lock().unwrap();
        if held.contains_key(key) {
            return;
        }
        let cancel = self.inner.tasks.token().child_token();
        held.insert(
            key.clone(),
            Held {
                cancel: cancel.clone(),
                mark: watch::Sender::new(Mark::default()),
                latest: None,
            },
        );
        drop(held);
        let this = self.clone();
        let key = key.clone();
        self.inner
            .tasks
            .spawn(async move { this.listen(key, cancel).await });
    }

    /// Stops receiving `key`'s rows (its last subscriber here left).
    pub(crate) fn release(&self, key: &Key) {
        if let Some(held) = self.inner.held.lock().unwrap().remove(key) {
            held.cancel.cancel();
        }
    }

    /// The dispatcher applied rows of `key` covering `change_version`, and
    /// pushed `frame` (`resolve_here`: the relay could not carry them).
    pub(crate) fn applied(
        &self,
        key: &Key,
        change_version: u64,
        frame: Option<PushFrame>,
        resolve_here: bool,
    ) {
        let mut held = self.inner.held.lock().unwrap();
        if let Some(held) = held.get_mut(key) {
            if let Some(frame) = frame
                && held
                    .latest
                    .as_ref()
                    .is_none_or(|l| frame.version >= l.version)
            {
                held.latest = Some(frame);
            }
            held.mark.send_modify(|mark| {
                if resolve_here {
                    mark.resolve_here = mark.resolve_here.max(change_version);
                } else {
                    mark.applied = mark.applied.max(change_version);
                }
            });
        }
    }

    /// Whether rows covering `change_version` are news for `key`: no rows
    /// covering it or a later change were applied here yet. A claim handed to
    /// another node is sometimes published twice (the first node was only
    /// slow); the second copy, resolved earlier or later, is dropped.
    pub(crate) fn is_news(&self, key: &Key, change_version: u64) -> bool {
        let held = self.inner.held.lock().unwrap();
        held.get(key)
            .is_some_and(|held| held.mark.borrow().applied < change_version)
    }

    /// The latest relayed push applied for `key`.
    pub(crate) fn latest(&self, key: &Key) -> Option<PushFrame> {
        let held = self.inner.held.lock().unwrap();
        held.get(key).and_then(|held| held.latest.clone())
    }

    /// Waits for the relay's rows of `key`'s change `version`, until
    /// `--relay-timeout` after the change's `Notify` (`meta`; after now when
    /// its time is unknown): a change this node consumes late (it was cut off,
    /// or behind) waits less, or not at all, since its rows were published
    /// while this node could not receive them. At once
    /// [`Waited::ResolveHere`] for a change the relay may not have claimed
    /// (stored before the relay consumer existed).
    pub(crate) async fn wait(&self, key: &Key, version: u64, meta: ChangeMeta) -> Waited {
        let wait = match meta.since_notified() {
            Some(age) => self.inner.timeout.saturating_sub(age),
            None => self.inner.timeout,
        };
        if wait.is_zero() {
            return Waited::ResolveHere;
        }
        if version
            < self
                .inner
                .covers_from
                .load(std::sync::atomic::Ordering::Acquire)
        {
            return Waited::ResolveHere;
        }
        let marks = {
            let held = self.inner.held.lock().unwrap();
            match held.get(key) {
                Some(held) => held.mark.subscribe(),
                None => return Waited::ResolveHere,
            }
        };
        let mut marks = marks;
        let arrived = marks.wait_for(|m| m.applied >= version || m.resolve_here >= version);
        // Not past the node's shutdown: it waits for its tasks.
        tokio::select! {
            _ = self.inner.tasks.cancelled() => Waited::ResolveHere,
            arrived = tokio::time::timeout(wait, arrived) => match arrived {
                Ok(Ok(mark)) if mark.applied >= version => Waited::Arrived,
                _ => Waited::ResolveHere,
            },
        }
    }

    /// Receives `key`'s rows until released or the node stops, and answers
    /// probes for it.
    async fn listen(self, key: Key, cancel: CancellationToken) {
        let subject = rows_subject(&self.inner.prefix, &key);
        let mut subscriber = match self.inner.client.subscribe(subject.clone()).await {
            Ok(subscriber) => subscriber,
            Err(err) => {
                tracing::warn!(%err, key = %key, "cannot receive relayed rows; this node resolves the key's changes itself");
                return;
            }
        };
        loop {
            let message = tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = subscriber.unsubscribe().await;
                    return;
                }
                message = subscriber.next() => message,
            };
            let Some(message) = message else {
                return;
            };
            if let Some(reply) = message.reply {
                // A probe: this node holds the key.
                let _ = self.inner.client.publish(reply, Bytes::new()).await;
                continue;
            }
            let rows = match RelayedRows::decode(message.payload) {
                Ok(rows) => rows,
                Err(err) => {
                    tracing::warn!(%err, key = %key, "undecodable relayed rows, ignored");
                    continue;
                }
            };
            let received = Received {
                key: key.clone(),
                change_version: rows.change_version,
                outcome: (!rows.resolve_here).then(|| {
                    read_key_result(KeyResult {
                        id: key.id.to_string(),
                        status: rows.status,
                        rows: rows.rows,
                        version: rows.version,
                        message: rows.message,
                    })
                }),
                meta: ChangeMeta {
                    trace: TraceId::parse(&rows.trace_id).unwrap_or(TraceId::NONE),
                    notified_at_us: rows.notified_at_us,
                },
            };
            if self.inner.received_tx.send(received).await.is_err() {
                return;
            }
        }
    }
}

/// `{prefix}.rows.{entity}.{id}`: where a key's relayed rows go.
fn rows_subject(prefix: &str, key: &Key) -> String {
    format!("{prefix}.rows.{}.{}", key.entity, key.id)
}

/// The claiming side: resolves the changes this node claimed.
#[derive(Clone)]
struct Claimer<R> {
    client: Client,
    prefix: String,
    resolvers: R,
    metrics: Arc<Metrics>,
    /// Keys with a resolve running here, and the claims of the same key
    /// that came meanwhile (covered by one more resolve).
    relaying: Arc<Mutex<HashMap<Key, Vec<Arc<Claim>>>>>,
    room: Arc<Semaphore>,
}

/// How a relayed change ended.
enum Relayed {
    /// Rows published, or nobody holds the key: acknowledge.
    Done,
    /// The resolve failed: deliver it again later.
    Retry,
}

impl<R: SharedResolver> Claimer<R> {
    async fn run(self, mut feed: mpsc::Receiver<Claim>, tasks: Tasks) {
        loop {
            let claim = tokio::select! {
                _ = tasks.cancelled() => return,
                claim = feed.recv() => claim,
            };
            let Some(claim) = claim else {
                return;
            };
            let claim = Arc::new(claim);
            {
                let mut relaying = self.relaying.lock().unwrap();
                if let Some(folded) = relaying.get_mut(&claim.change.key) {
                    folded.push(claim);
                    continue;
                }
                relaying.insert(claim.change.key.clone(), Vec::new());
            }
            let Ok(permit) = self.room.clone().acquire_owned().await else {
                return;
            };
            let this = self.clone();
            tasks.spawn(async move {
                this.relay_key(claim).await;
                drop(permit);
            });
        }
    }

    /// Relays `first` and, one resolve at a time, the claims of its key
    /// that come meanwhile.
    async fn relay_key(&self, first: Arc<Claim>) {
        let key = first.change.key.clone();
        let mut claims = vec![first];
        loop {
            let newest = claims
                .iter()
                .max_by_key(|c| c.change.version)
                .expect("never empty");
            let (version, meta) = (newest.change.version, newest.change.meta);
            let relayed = {
                let work = self.relay_change(&key, version, meta);
                let mut work = std::pin::pin!(work);
                let mut every = tokio::time::interval(crate::bus::RELAY_PROGRESS_EVERY);
                every.tick().await;
                loop {
                    tokio::select! {
                        relayed = &mut work => break relayed,
                        _ = every.tick() => self.progress(&key, &claims).await,
                    }
                }
            };
            for claim in &claims {
                match relayed {
                    Relayed::Done => claim.done().await,
                    Relayed::Retry => claim.retry(RETRY_DELAY).await,
                }
            }
            let mut relaying = self.relaying.lock().unwrap();
            let folded = relaying
                .get_mut(&key)
                .map(std::mem::take)
                .unwrap_or_default();
            if folded.is_empty() {
                relaying.remove(&key);
                return;
            }
            claims = folded;
        }
    }

    /// Tells JetStream the claims of `key` (and those waiting behind them)
    /// are still being worked on.
    async fn progress(&self, key: &Key, claims: &[Arc<Claim>]) {
        let waiting: Vec<Arc<Claim>> = self
            .relaying
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .unwrap_or_default();
        for claim in claims.iter().chain(&waiting) {
            claim.progress().await;
        }
    }

    async fn relay_change(&self, key: &Key, version: u64, meta: ChangeMeta) -> Relayed {
        let subject = rows_subject(&self.prefix, key);
        let probe = self.client.request(subject.clone(), Bytes::new());
        if let Ok(Err(err)) = tokio::time::timeout(PROBE_TIMEOUT, probe).await
            && err.kind() == RequestErrorKind::NoResponders
        {
            Metrics::inc(&self.metrics.relay_unheld_total);
            tracing::debug!(key = %key, version, trace_id = %meta.trace, "relay: no node holds the key");
            return Relayed::Done;
        }
        let outcome = self.resolvers.resolve_shared(key).await;
        if let Err(err) = &outcome {
            match err.kind() {
                ResolveErrorKind::NotFound | ResolveErrorKind::Forbidden => {}
                ResolveErrorKind::Failed
                | ResolveErrorKind::InvalidAnswer
                | ResolveErrorKind::Timeout
                | ResolveErrorKind::NoResolver
                | ResolveErrorKind::Closed => {
                    tracing::debug!(key = %key, %err, trace_id = %meta.trace, "relay: change resolve failed, handed back");
                    return Relayed::Retry;
                }
            }
        }
        let result = key_result(outcome, &key.id);
        let rows = RelayedRows {
            change_version: version,
            trace_id: meta.trace.to_string(),
            notified_at_us: meta.notified_at_us,
            resolve_here: false,
            status: result.status,
            rows: result.rows,
            version: result.version,
            message: result.message,
        };
        let published = match self
            .client
            .publish(subject.clone(), rows.encode_to_vec().into())
            .await
        {
            Err(err) if err.kind() == PublishErrorKind::MaxPayloadExceeded => {
                tracing::info!(key = %key, version, "relayed rows too large for NATS; holders resolve them themselves");
                let marker = RelayedRows {
                    resolve_here: true,
                    rows: Vec::new(),
                    message: String::new(),
                    ..rows
                };
                self.client
                    .publish(subject, marker.encode_to_vec().into())
                    .await
            }
            other => other,
        };
        match published {
            Ok(()) => {
                Metrics::inc(&self.metrics.relay_published_total);
                tracing::debug!(key = %key, version, trace_id = %meta.trace, "relay: rows published");
                Relayed::Done
            }
            Err(err) => {
                tracing::debug!(key = %key, %err, "relay: cannot publish rows, handed back");
                Relayed::Retry
            }
        }
    }
}
