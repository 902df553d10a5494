//! The local resolver pool: this node's backend `Resolve` streams, and the requests the node sends them.
//!
//! Jobs (resolve one key for one secret) queue per entity. A queue is drained
//! into requests while some resolver of the entity has room under its
//! `max_in_flight`; jobs with the same secret and reason share a request (up
//! to the batch size), so under load the backend sees O(distinct keys)
//! requests. Requests of a stream that dies, or that pass their deadline, go
//! back to the front of the queue and on to another resolver.
//!
//! Subscribe resolves are single-flight per key and secret: a local subscribe
//! whose key and secret are already being resolved for another subscriber
//! joins that request instead of sending its own, until a change of the key
//! is seen ([`ResolverPool::note_change`]); from then on the request may
//! predate the change, so later subscribes send a fresh one.
//!
//! The pool knows nothing of other nodes: reaching their resolvers is
//! `resolve`'s choice, and `cluster` answers them from this pool.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use crate::{
    config::ResolveConfig,
    key::{ChangeKey, validate_part},
    ops::metrics::Metrics,
    ops::tasks::Tasks,
    proto::v1::{
        FetchMode, KeyResult, NodeMessage, PassThrough, Reason, Register, ResolveRequest,
        node_message,
    },
    websocket::protocol::{RowError, validate_row},
};

/// Identifies one `Resolve` stream within a node.
pub(crate) type ResolverId = u64;

/// What a stream's outbound channel carries.
pub(crate) type StreamItem = Result<NodeMessage, Status>;

/// Messages beyond `max_in_flight` a stream's channel can hold (pass-through).
pub(crate) const PASS_THROUGH_HEADROOM: usize = 256;
/// Upper bound on a resolver's `max_in_flight`.
pub(crate) const MAX_IN_FLIGHT_CAP: u32 = 4096;
/// Queued jobs examined for companions when building one request.
const BATCH_SCAN_LIMIT: usize = 1024;
/// Attempts of one job (deadline passes) before it fails with `Timeout`.
pub(crate) const MAX_ATTEMPTS: u32 = 3;
/// Most entities one `Register` may name.
pub(crate) const MAX_ENTITIES_PER_STREAM: usize = 1024;
/// Largest version a resolver may give: 2^53, the last integer a browser's
/// JavaScript number holds exactly (versions above it would compare wrong).
pub(crate) const MAX_VERSION: u64 = 1 << 53;

/// Outcome of resolving one key for one secret.
pub(crate) type Resolved = Result<Rows, ResolveError>;

/// A key's rows, as a resolver returned them.
#[derive(Debug, Clone)]
pub(crate) struct Rows {
    /// Each one JSON value (validated on arrival), in the resolver's order.
    pub(crate) rows: Vec<Bytes>,
    /// The resolver's own version of the rows; 0 when it gave none.
    pub(crate) version: u64,
}

/// Why resolving a key failed.
///
/// Only [`ResolveError::resolver_message`], a resolver's own words, may be
/// shown to a websocket client; whoever builds the client's error frame
/// picks a fixed message for every other case and logs the error.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ResolveError {
    /// The resolver answered NOT_FOUND, with this message.
    #[error("the resolver answered NOT_FOUND")]
    NotFound(String),
    /// The resolver answered FORBIDDEN, with this message.
    #[error("the resolver answered FORBIDDEN")]
    Forbidden(String),
    /// The resolver answered ERROR, with this message.
    #[error("the resolver answered ERROR: {0}")]
    Failed(String),
    #[error("the resolver sent an invalid row")]
    InvalidRow(#[source] RowError),
    #[error("the resolver sent unknown status {0}")]
    UnknownStatus(i32),
    /// Browsers compare versions as JavaScript numbers, exact up to 2^53.
    #[error("the resolver sent version {0}, above 2^53")]
    VersionTooLarge(u64),
    #[error("the resolver's answer has no result for id {0:?}")]
    MissingResult(Arc<str>),
    #[error("undecodable cluster resolve reply")]
    BadClusterReply(#[source] prost::DecodeError),
    /// No resolver answered within the deadline, after retries.
    #[error("no resolver answered in time")]
    Timeout,
    /// No resolver serves the entity.
    #[error("no resolver serves the entity")]
    NoResolver,
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Closed,
}

/// What kind of failure a [`ResolveError`] is, for callers to decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResolveErrorKind {
    /// NOT_FOUND from the resolver.
    NotFound,
    /// FORBIDDEN from the resolver.
    Forbidden,
    /// ERROR from the resolver.
    Failed,
    /// The answer was malformed (a row, a status, a missing result, a reply).
    InvalidAnswer,
    Timeout,
    NoResolver,
    Closed,
}

impl ResolveError {
    pub(crate) fn kind(&self) -> ResolveErrorKind {
        match self {
            Self::NotFound(_) => ResolveErrorKind::NotFound,
            Self::Forbidden(_) => ResolveErrorKind::Forbidden,
            Self::Failed(_) => ResolveErrorKind::Failed,
            Self::InvalidRow(_)
            | Self::UnknownStatus(_)
            | Self::MissingResult(_)
            | Self::VersionTooLarge(_)
            | Self::BadClusterReply(_) => ResolveErrorKind::InvalidAnswer,
            Self::Timeout => ResolveErrorKind::Timeout,
            Self::NoResolver => ResolveErrorKind::NoResolver,
            Self::Closed => ResolveErrorKind::Closed,
        }
    }

    /// The message the resolver itself sent with NOT_FOUND, FORBIDDEN or
    /// ERROR, if not empty: the only text of a failure a client may see.
    pub(crate) fn resolver_message(&self) -> Option<&str> {
        match self {
            Self::NotFound(m) | Self::Forbidden(m) | Self::Failed(m) if !m.is_empty() => Some(m),
            _ => None,
        }
    }
}

/// Interprets one `KeyResult` from a resolver (or another node), validating its rows.
pub(crate) fn read_key_result(result: KeyResult) -> Resolved {
    use crate::proto::v1::Status as S;
    match S::try_from(result.status) {
        Ok(S::Ok) => {
            for row in &result.rows {
                validate_row(row).map_err(ResolveError::InvalidRow)?;
            }
            if result.version > MAX_VERSION {
                return Err(ResolveError::VersionTooLarge(result.version));
            }
            Ok(Rows {
                rows: result.rows,
                version: result.version,
            })
        }
        Ok(S::NotFound) => Err(ResolveError::NotFound(result.message)),
        Ok(S::Forbidden) => Err(ResolveError::Forbidden(result.message)),
        Ok(S::Error) => Err(ResolveError::Failed(result.message)),
        Ok(S::Unspecified) | Err(_) => Err(ResolveError::UnknownStatus(result.status)),
    }
}

/// The `KeyResult` for `id` that [`read_key_result`] reads back (a node's
/// answer to another node). Failures without a status of their own become
/// ERROR with a fixed message, never the inner error's text: the other node
/// may show the message to its clients.
pub(crate) fn key_result(outcome: Resolved, id: &str) -> KeyResult {
    use crate::proto::v1::Status as S;
    let (status, rows, version, message) = match outcome {
        Ok(Rows { rows, version }) => (S::Ok, rows, version, String::new()),
        Err(ResolveError::NotFound(m)) => (S::NotFound, Vec::new(), 0, m),
        Err(ResolveError::Forbidden(m)) => (S::Forbidden, Vec::new(), 0, m),
        Err(ResolveError::Failed(m)) => (S::Error, Vec::new(), 0, m),
        Err(err) => {
            let message = match err.kind() {
                ResolveErrorKind::Timeout => "resolver timed out",
                ResolveErrorKind::NoResolver | ResolveErrorKind::Closed => "no resolver",
                _ => "the resolver sent an invalid answer",
            };
            (S::Error, Vec::new(), 0, message.to_string())
        }
    };
    KeyResult {
        id: id.to_string(),
        status: status as i32,
        rows,
        version,
        message,
    }
}

/// Why a `Register` was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegisterError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Full(String),
    #[error("node is shutting down")]
    Closed,
}

struct Job {
    id: Arc<str>,
    secret: Arc<str>,
    reason: Reason,
    /// A SHARED change resolve (`ResolveRequest.shared`).
    shared: bool,
    reply: oneshot::Sender<Resolved>,
    attempts: u32,
    /// A job waiting this long (queued or in flight, over its attempts)
    /// fails with `Timeout`: a queue whose resolvers never have room does
    /// not hold callers forever.
    give_up: Instant,
}

struct InFlight {
    resolver: ResolverId,
    entity: Arc<str>,
    jobs: Vec<Job>,
    /// A subscribe request listed in `State::joinable` (for its ids and secret).
    joinable: bool,
}

struct Slot {
    name: Arc<str>,
    tx: mpsc::Sender<StreamItem>,
    in_flight: u32,
    max_in_flight: u32,
    pass_through: bool,
    entities: Vec<Arc<str>>,
    /// The backend sent `Drain`: it answers what it holds, gets nothing new.
    draining: bool,
}

struct EntityQueue {
    mode: FetchMode,
    resolvers: Vec<ResolverId>,
    next: usize,
    queue: VecDeque<Job>,
}

#[derive(Default)]
struct State {
    resolvers: HashMap<ResolverId, Slot>,
    entities: HashMap<Arc<str>, EntityQueue>,
    in_flight: HashMap<u64, InFlight>,
    /// Requests sent, by deadline: every request gets the same timeout, so
    /// the order they were sent in is the order they expire in, and
    /// [`ResolverPool::expire`] looks only at the front. Entries of requests
    /// answered meanwhile are dropped when they reach the front.
    deadlines: VecDeque<(Instant, u64)>,
    /// Subscribe requests in flight that a local subscribe of the same key
    /// and secret may join: per key, `(secret, request id)`. A key's entries
    /// go when a change of it is seen, so a joiner never gets rows read
    /// before a change it would otherwise miss.
    joinable: HashMap<ChangeKey, Vec<(Arc<str>, u64)>>,
    pass_through_turn: usize,
    closed: bool,
}

/// The resolver pool: a cheap-clone handle.
#[derive(Clone)]
pub(crate) struct ResolverPool {
    inner: Arc<Inner>,
}

struct Inner {
    /// One std `Mutex` for the whole pool: every operation is a handful of
    /// map updates and channel `try_send`s, never an `.await`, and the rate
    /// is per request (batched), not per delivery.
    state: Mutex<State>,
    config: ResolveConfig,
    metrics: Arc<Metrics>,
    next_request: AtomicU64,
    next_resolver: AtomicU64,
    /// Entities with a local resolver, for the cluster-resolve server.
    entities: watch::Sender<Vec<(Arc<str>, FetchMode)>>,
}

impl ResolverPool {
    pub(crate) fn new(config: &ResolveConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                config: config.clone(),
                metrics,
                next_request: AtomicU64::new(1),
                next_resolver: AtomicU64::new(1),
                entities: watch::Sender::new(Vec::new()),
            }),
        }
    }

    /// Creates the pool and starts its deadline timer, which runs until the
    /// node shuts down.
    pub(crate) fn start(config: &ResolveConfig, metrics: Arc<Metrics>, tasks: &Tasks) -> Self {
        let pool = Self::new(config, metrics);
        tasks.spawn(pool.clone().run_deadlines(tasks.clone()));
        pool
    }

    /// Follows the set of entities served by local resolvers.
    pub(crate) fn watch_entities(&self) -> watch::Receiver<Vec<(Arc<str>, FetchMode)>> {
        self.inner.entities.subscribe()
    }

    fn publish_entities(&self, state: &State) {
        let mut entities: Vec<(Arc<str>, FetchMode)> = state
            .entities
            .iter()
            .map(|(e, q)| (e.clone(), q.mode))
            .collect();
        entities.sort();
        self.inner.entities.send_if_modified(|current| {
            let changed = *current != entities;
            if changed {
                *current = entities;
            }
            changed
        });
    }

    /// A fresh resolver id (sent in `Registered` before the stream is registered).
    pub(crate) fn allocate_id(&self) -> ResolverId {
        self.inner.next_resolver.fetch_add(1, Relaxed)
    }

    /// Channel capacity for a stream with this `max_in_flight`.
    pub(crate) fn channel_capacity(&self, register: &Register) -> usize {
        self.max_in_flight(register) as usize + PASS_THROUGH_HEADROOM
    }

    fn max_in_flight(&self, register: &Register) -> u32 {
        match register.max_in_flight {
            0 => self.inner.config.default_max_in_flight,
            n => n.min(MAX_IN_FLIGHT_CAP),
        }
    }

    /// Adds a resolver stream. `tx` is the stream's outbound channel.
    pub(crate) fn register(
        &self,
        id: ResolverId,
        register: &Register,
        tx: mpsc::Sender<StreamItem>,
    ) -> Result<(), RegisterError> {
        let name = register.name.trim();
        if name.is_empty() || name.len() > 128 {
            return Err(RegisterError::Invalid(
                "Register.name must be 1 to 128 bytes".into(),
            ));
        }
        if register.entities.is_empty() && !register.pass_through {
            return Err(RegisterError::Invalid(
                "Register must name at least one entity or set pass_through".into(),
            ));
        }
        if register.entities.len() > MAX_ENTITIES_PER_STREAM {
            return Err(RegisterError::Invalid(format!(
                "Register names {} entities; at most {MAX_ENTITIES_PER_STREAM} per stream",
                register.entities.len()
            )));
        }
        let mut wanted: Vec<(Arc<str>, FetchMode)> = Vec::with_capacity(register.entities.len());
        // Linear in the entities named, whatever their number.
        let mut named: HashSet<&str> = HashSet::with_capacity(register.entities.len());
        for reg in &register.entities {
            validate_part("entity", &reg.entity)
                .map_err(|err| RegisterError::Invalid(format!("Register.entities: {err}")))?;
            let mode = match FetchMode::try_from(reg.fetch_mode) {
                Ok(FetchMode::Unspecified) => FetchMode::PerSubscriber,
                Ok(mode) => mode,
                Err(_) => {
                    return Err(RegisterError::Invalid(format!(
                        "entity {:?}: unknown fetch_mode {}",
                        reg.entity, reg.fetch_mode
                    )));
                }
            };
            if !named.insert(reg.entity.as_str()) {
                return Err(RegisterError::Invalid(format!(
                    "entity {:?} registered twice",
                    reg.entity
                )));
            }
            wanted.push((Arc::from(reg.entity.as_str()), mode));
        }
        let mut state = self.inner.state.lock().unwrap();
        if state.closed {
            return Err(RegisterError::Closed);
        }
        if state.resolvers.len() >= self.inner.config.max_resolver_streams {
            return Err(RegisterError::Full(format!(
                "this node holds its maximum of {} resolver streams (--max-resolver-streams)",
                self.inner.config.max_resolver_streams
            )));
        }
        for (entity, mode) in &wanted {
            if let Some(existing) = state.entities.get(entity)
                && existing.mode != *mode
            {
                return Err(RegisterError::Conflict(format!(
                    "entity {entity:?} is already served with fetch mode {}, not {}",
                    existing.mode.as_str_name(),
                    mode.as_str_name()
                )));
            }
        }
        for (entity, mode) in &wanted {
            let queue = state
                .entities
                .entry(entity.clone())
                .or_insert_with(|| EntityQueue {
                    mode: *mode,
                    resolvers: Vec::new(),
                    next: 0,
                    queue: VecDeque::new(),
                });
            queue.resolvers.push(id);
        }
        state.resolvers.insert(
            id,
            Slot {
                name: Arc::from(name),
                tx,
                in_flight: 0,
                max_in_flight: self.max_in_flight(register),
                pass_through: register.pass_through,
                entities: wanted.iter().map(|(e, _)| e.clone()).collect(),
                draining: false,
            },
        );
        // Jobs may be queued for these entities (a resolver came back).
        for (entity, _) in &wanted {
            self.dispatch(&mut state, entity);
        }
        self.publish_entities(&state);
        Ok(())
    }

    /// Removes a resolver stream; its in-flight requests go to other resolvers.
    pub(crate) fn deregister(&self, id: ResolverId) {
        let mut state = self.inner.state.lock().unwrap();
        let Some(slot) = state.resolvers.remove(&id) else {
            return;
        };
        for entity in &slot.entities {
            if let Some(queue) = state.entities.get_mut(entity) {
                queue.resolvers.retain(|r| *r != id);
            }
        }
        let orphaned: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, f)| f.resolver == id)
            .map(|(request, _)| *request)
            .collect();
        for request in orphaned {
            let flight = state.in_flight.remove(&request).expect("listed above");
            forget_joinable(&mut state.joinable, request, &flight);
            if let Some(queue) = state.entities.get_mut(&flight.entity) {
                // Back to the front, in their original order.
                for job in flight.jobs.into_iter().rev() {
                    queue.queue.push_front(job);
                }
            }
        }
        for entity in &slot.entities {
            let orphan = state
                .entities
                .get(entity)
                .is_some_and(|q| q.resolvers.is_empty());
            if orphan {
                let queue = state.entities.remove(entity).expect("checked above");
                for job in queue.queue {
                    let _ = job.reply.send(Err(ResolveError::NoResolver));
                }
            } else {
                self.dispatch(&mut state, entity);
            }
        }
        self.publish_entities(&state);
    }

    /// Stops sending requests to resolver `id` (it sent `Drain`): queued
    /// jobs wait for the entity's other resolvers; what it holds in flight
    /// is answered by it, or moved on when its stream ends.
    pub(crate) fn drain(&self, id: ResolverId) {
        let mut state = self.inner.state.lock().unwrap();
        let Some(slot) = state.resolvers.get_mut(&id) else {
            return;
        };
        slot.draining = true;
        slot.pass_through = false;
    }

    /// The fetch mode of `entity` on a local resolver.
    pub(crate) fn fetch_mode(&self, entity: &str) -> Option<FetchMode> {
        let state = self.inner.state.lock().unwrap();
        state.entities.get(entity).map(|q| q.mode)
    }

    /// Resolves `key` for `secret` on a local resolver; waits for the
    /// answer (or its failure). `shared`: a SHARED change resolve, whose rows
    /// go to every subscriber (sent as `ResolveRequest.shared`).
    pub(crate) async fn resolve(
        &self,
        key: &ChangeKey,
        secret: Arc<str>,
        reason: Reason,
        shared: bool,
    ) -> Resolved {
        self.submit(key, secret, reason, shared, false).await
    }

    /// Resolves the snapshot of a subscribe of `key` on this node for
    /// `secret`. With `may_join` it joins a subscribe request of the same key
    /// and secret already in flight, unless a change of the key was seen
    /// since that request was sent; else it queues as [`Self::resolve`] does.
    ///
    /// `may_join` is the caller's promise that every change up to the bus
    /// sequence its snapshot version stands for has been passed to
    /// [`Self::note_change`] already: then a request that no change has
    /// invalidated read rows at least that new.
    pub(crate) async fn resolve_subscribe(
        &self,
        key: &ChangeKey,
        secret: Arc<str>,
        may_join: bool,
    ) -> Resolved {
        self.submit(key, secret, Reason::Subscribe, false, may_join)
            .await
    }

    async fn submit(
        &self,
        key: &ChangeKey,
        secret: Arc<str>,
        reason: Reason,
        shared: bool,
        may_join: bool,
    ) -> Resolved {
        let (reply, answer) = oneshot::channel();
        {
            let mut state = self.inner.state.lock().unwrap();
            if state.closed {
                return Err(ResolveError::Closed);
            }
            let job = Job {
                id: key.id.clone(),
                secret,
                reason,
                shared,
                reply,
                attempts: 0,
                give_up: Instant::now() + self.inner.config.timeout * MAX_ATTEMPTS,
            };
            let job = if may_join {
                match join(&mut state, key, job) {
                    Ok(()) => {
                        Metrics::inc(&self.inner.metrics.resolve_joined_total);
                        None
                    }
                    Err(job) => Some(job),
                }
            } else {
                Some(job)
            };
            if let Some(job) = job {
                let Some(queue) = state.entities.get_mut(&*key.entity) else {
                    return Err(ResolveError::NoResolver);
                };
                queue.queue.push_back(job);
                self.dispatch(&mut state, &key.entity);
            }
        }
        answer.await.unwrap_or(Err(ResolveError::Closed))
    }

    /// A change of `key` was seen: subscribe requests of it already in
    /// flight may have read the rows before the change, so no later
    /// subscribe joins them.
    pub(crate) fn note_change(&self, key: &ChangeKey) {
        // Always under the lock, never skipped on a lock-free hint: the
        // request a joiner finds must be one this call has seen.
        let mut state = self.inner.state.lock().unwrap();
        state.joinable.remove(key);
    }

    /// Whether a subscribe request of `key` for `secret` is in flight and
    /// joinable now.
    pub(crate) fn can_join(&self, key: &ChangeKey, secret: &str) -> bool {
        let state = self.inner.state.lock().unwrap();
        state
            .joinable
            .get(key)
            .is_some_and(|requests| requests.iter().any(|(s, _)| **s == *secret))
    }

    /// Any key may have changed (the bus lost changes): no subscribe request
    /// in flight is joined.
    pub(crate) fn note_all_changed(&self) {
        self.inner.state.lock().unwrap().joinable.clear();
    }

    /// Sends queued jobs of `entity` while some resolver has room.
    fn dispatch(&self, state: &mut State, entity: &Arc<str>) {
        let batch_size = self.inner.config.batch_size;
        loop {
            let State {
                resolvers,
                entities,
                in_flight,
                deadlines,
                joinable,
                ..
            } = &mut *state;
            let Some(queue) = entities.get_mut(entity) else {
                return;
            };
            // Jobs whose caller went away (client disconnected) are dropped.
            while queue.queue.front().is_some_and(|j| j.reply.is_closed()) {
                queue.queue.pop_front();
            }
            if queue.queue.is_empty() {
                return;
            }
            let count = queue.resolvers.len();
            let Some(turn) = (0..count).find(|i| {
                let id = queue.resolvers[(queue.next + i) % count];
                resolvers
                    .get(&id)
                    .is_some_and(|s| !s.draining && s.in_flight < s.max_in_flight)
            }) else {
                // Every resolver is at capacity: the jobs wait here and batch up.
                return;
            };
            let resolver_id = queue.resolvers[(queue.next + turn) % count];
            queue.next = (queue.next + turn + 1) % count;

            let first = queue.queue.pop_front().expect("not empty");
            let (secret, reason, shared) = (first.secret.clone(), first.reason, first.shared);
            let mut ids: Vec<String> = vec![first.id.to_string()];
            let mut jobs = vec![first];
            // Look for companions among the next jobs only, so a long queue of
            // distinct secrets costs O(queue) per request, not O(queue²).
            let mut i = 0;
            let mut scanned = 0;
            while i < queue.queue.len() && ids.len() < batch_size && scanned < BATCH_SCAN_LIMIT {
                scanned += 1;
                let job = &queue.queue[i];
                // One request carries one secret, reason and `shared` flag.
                if job.reason != reason || job.secret != secret || job.shared != shared {
                    i += 1;
                    continue;
                }
                let job = queue.queue.remove(i).expect("index checked");
                if job.reply.is_closed() {
                    continue;
                }
                if !ids.iter().any(|id| **id == *job.id) {
                    ids.push(job.id.to_string());
                }
                jobs.push(job);
            }

            let request_id = self.inner.next_request.fetch_add(1, Relaxed);
            let message = NodeMessage {
                kind: Some(node_message::Kind::Request(ResolveRequest {
                    request_id,
                    entity: entity.to_string(),
                    ids,
                    secret: secret.to_string(),
                    reason: reason as i32,
                    shared,
                })),
            };
            let slot = resolvers.get_mut(&resolver_id).expect("found above");
            match slot.tx.try_send(Ok(message)) {
                Ok(()) => {
                    slot.in_flight += 1;
                    self.inner.metrics.resolve_request(reason);
                    // A subscribe request (never a change's: those carry
                    // their own reason to the backend) is one later local
                    // subscribes of its keys and secret may join.
                    let is_joinable = reason == Reason::Subscribe && !shared;
                    if is_joinable {
                        for (i, job) in jobs.iter().enumerate() {
                            if jobs[..i].iter().any(|j| j.id == job.id) {
                                continue;
                            }
                            let key = ChangeKey {
                                entity: entity.clone(),
                                id: job.id.clone(),
                            };
                            joinable
                                .entry(key)
                                .or_default()
                                .push((secret.clone(), request_id));
                        }
                    }
                    let deadline = Instant::now() + self.inner.config.timeout;
                    in_flight.insert(
                        request_id,
                        InFlight {
                            resolver: resolver_id,
                            entity: entity.clone(),
                            jobs,
                            joinable: is_joinable,
                        },
                    );
                    deadlines.push_back((deadline, request_id));
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Can't happen while pass-through leaves room for
                    // max_in_flight requests; if it does, wait for the next
                    // completion or job to try again.
                    tracing::warn!(
                        resolver.id = resolver_id,
                        "resolver channel full; requests wait"
                    );
                    for job in jobs.into_iter().rev() {
                        queue.queue.push_front(job);
                    }
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // The stream is ending and will deregister (moving its
                    // in-flight requests); meanwhile it gets no more requests.
                    slot.in_flight = slot.max_in_flight;
                    for job in jobs.into_iter().rev() {
                        queue.queue.push_front(job);
                    }
                }
            }
        }
    }

    /// Hands the answer of `request_id` (from resolver `from`) to its jobs.
    /// `results` are the response's key results, already interpreted.
    pub(crate) fn complete(
        &self,
        from: ResolverId,
        request_id: u64,
        results: HashMap<String, Resolved>,
    ) {
        let mut state = self.inner.state.lock().unwrap();
        let Some(flight) = state.in_flight.remove(&request_id) else {
            tracing::debug!(
                resolver.id = from,
                request_id,
                "answer to an unknown or expired request"
            );
            return;
        };
        if flight.resolver != from {
            tracing::warn!(
                resolver.id = from,
                request_id,
                "answer to a request of another stream, ignored"
            );
            state.in_flight.insert(request_id, flight);
            return;
        }
        if let Some(slot) = state.resolvers.get_mut(&from) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
        forget_joinable(&mut state.joinable, request_id, &flight);
        for job in flight.jobs {
            // A batch may hold several jobs of one id (different callers):
            // each gets the same (cheaply cloned) outcome.
            let outcome = results
                .get(&*job.id)
                .cloned()
                .unwrap_or_else(|| Err(ResolveError::MissingResult(job.id.clone())));
            let _ = job.reply.send(outcome);
        }
        self.dispatch(&mut state, &flight.entity);
    }

    /// Re-queues (or fails, after [`MAX_ATTEMPTS`]) requests past their deadline.
    pub(crate) fn expire(&self, now: Instant) {
        let mut state = self.inner.state.lock().unwrap();
        // Jobs that waited in a queue past their deadline. Queues are in
        // arrival order (jobs put back in front are older still), so the
        // expired ones are at the front.
        for queue in state.entities.values_mut() {
            while queue.queue.front().is_some_and(|job| job.give_up <= now) {
                let job = queue.queue.pop_front().expect("checked");
                Metrics::inc(&self.inner.metrics.resolve_timeouts_total);
                let _ = job.reply.send(Err(ResolveError::Timeout));
            }
        }
        let mut expired: Vec<u64> = Vec::new();
        while let Some(&(deadline, request_id)) = state.deadlines.front() {
            if deadline > now {
                break;
            }
            state.deadlines.pop_front();
            // Answered (or moved to another stream) meanwhile: nothing to do.
            if state.in_flight.contains_key(&request_id) {
                expired.push(request_id);
            }
        }
        let mut touched: Vec<Arc<str>> = Vec::new();
        for request_id in expired {
            let flight = state.in_flight.remove(&request_id).expect("listed above");
            forget_joinable(&mut state.joinable, request_id, &flight);
            Metrics::inc(&self.inner.metrics.resolve_timeouts_total);
            tracing::warn!(resolver.id = flight.resolver, request_id, entity = %flight.entity, "resolve request passed its deadline");
            if let Some(slot) = state.resolvers.get_mut(&flight.resolver) {
                slot.in_flight = slot.in_flight.saturating_sub(1);
            }
            let Some(queue) = state.entities.get_mut(&flight.entity) else {
                for job in flight.jobs {
                    let _ = job.reply.send(Err(ResolveError::NoResolver));
                }
                continue;
            };
            for mut job in flight.jobs.into_iter().rev() {
                job.attempts += 1;
                if job.attempts >= MAX_ATTEMPTS {
                    let _ = job.reply.send(Err(ResolveError::Timeout));
                } else {
                    queue.queue.push_front(job);
                }
            }
            if !touched.contains(&flight.entity) {
                touched.push(flight.entity);
            }
        }
        for entity in touched {
            self.dispatch(&mut state, &entity);
        }
    }

    /// Runs [`Self::expire`] periodically until the node shuts down.
    async fn run_deadlines(self, tasks: Tasks) {
        let tick = (self.inner.config.timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tasks.cancelled() => return,
                _ = interval.tick() => self.expire(Instant::now()),
            }
        }
    }

    /// Forwards a client's pass-through message to one resolver per distinct
    /// name among those that asked for them. Returns how many got it.
    pub(crate) fn pass_through(&self, connection_id: &str, secret: &str, payload: Bytes) -> usize {
        let mut state = self.inner.state.lock().unwrap();
        state.pass_through_turn = state.pass_through_turn.wrapping_add(1);
        let turn = state.pass_through_turn;
        let mut by_name: HashMap<Arc<str>, Vec<&Slot>> = HashMap::new();
        for slot in state.resolvers.values().filter(|s| s.pass_through) {
            by_name.entry(slot.name.clone()).or_default().push(slot);
        }
        let mut sent = 0;
        for (_, mut replicas) in by_name {
            replicas.sort_by_key(|s| s.tx.capacity());
            // Prefer a replica with room; rotate among equals.
            let start = turn % replicas.len();
            let chosen = (0..replicas.len())
                .map(|i| replicas[(start + i) % replicas.len()])
                .find(|s| {
                    s.tx.capacity() > (s.max_in_flight - s.in_flight.min(s.max_in_flight)) as usize
                });
            let Some(slot) = chosen else { continue };
            let message = NodeMessage {
                kind: Some(node_message::Kind::PassThrough(PassThrough {
                    connection_id: connection_id.to_string(),
                    secret: secret.to_string(),
                    payload: payload.clone(),
                })),
            };
            if slot.tx.try_send(Ok(message)).is_ok() {
                sent += 1;
            }
        }
        if sent > 0 {
            Metrics::inc(&self.inner.metrics.pass_through_total);
        }
        sent
    }

    /// Whether any resolver wants pass-through messages.
    pub(crate) fn has_pass_through(&self) -> bool {
        let state = self.inner.state.lock().unwrap();
        state.resolvers.values().any(|s| s.pass_through)
    }

    /// Registered streams per name (`Register.name`), for the metrics.
    pub(crate) fn streams_by_name(&self) -> Vec<(Arc<str>, usize)> {
        let state = self.inner.state.lock().unwrap();
        let mut counts: HashMap<&Arc<str>, usize> = HashMap::new();
        for slot in state.resolvers.values() {
            *counts.entry(&slot.name).or_default() += 1;
        }
        counts.into_iter().map(|(n, c)| (n.clone(), c)).collect()
    }

    /// Registered streams.
    pub(crate) fn resolver_count(&self) -> usize {
        self.inner.state.lock().unwrap().resolvers.len()
    }

    /// Shutdown: fails every job and drops every stream's channel, which ends
    /// the response streams.
    pub(crate) fn close(&self) {
        let mut state = self.inner.state.lock().unwrap();
        state.closed = true;
        state.resolvers.clear();
        self.inner.entities.send_replace(Vec::new());
        for (_, queue) in state.entities.drain() {
            for job in queue.queue {
                let _ = job.reply.send(Err(ResolveError::Closed));
            }
        }
        state.joinable.clear();
        state.deadlines.clear();
        for (_, flight) in state.in_flight.drain() {
            for job in flight.jobs {
                let _ = job.reply.send(Err(ResolveError::Closed));
            }
        }
    }
}

/// Adds `job` (a subscribe of `key`) to a joinable subscribe request of the
/// same key and secret; gives it back when there is none.
fn join(state: &mut State, key: &ChangeKey, job: Job) -> Result<(), Job> {
    let request = state
        .joinable
        .get(key)
        .and_then(|requests| requests.iter().find(|(secret, _)| *secret == job.secret))
        .map(|(_, request)| *request);
    match request.and_then(|r| state.in_flight.get_mut(&r)) {
        Some(flight) => {
            flight.jobs.push(job);
            Ok(())
        }
        None => Err(job),
    }
}

/// Drops the joinable entries of `flight` (request `request_id`), which is
/// leaving `in_flight`.
fn forget_joinable(
    joinable: &mut HashMap<ChangeKey, Vec<(Arc<str>, u64)>>,
    request_id: u64,
    flight: &InFlight,
) {
    if !flight.joinable {
        return;
    }
    for job in &flight.jobs {
        let key = ChangeKey {
            entity: flight.entity.clone(),
            id: job.id.clone(),
        };
        if let Some(requests) = joinable.get_mut(&key) {
            requests.retain(|(_, r)| *r != request_id);
            if requests.is_empty() {
                joinable.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::EntityRegistration;

    fn pool(batch_size: usize) -> ResolverPool {
        ResolverPool::new(
            &ResolveConfig {
                batch_size,
                timeout: Duration::from_secs(5),
                default_max_in_flight: 1,
                max_resolver_streams: 4,
            },
            Arc::new(Metrics::default()),
        )
    }

    fn register(
        pool: &ResolverPool,
        name: &str,
        mode: FetchMode,
    ) -> (ResolverId, mpsc::Receiver<StreamItem>) {
        let reg = Register {
            name: name.into(),
            entities: vec![EntityRegistration {
                entity: "items".into(),
                fetch_mode: mode as i32,
            }],
            pass_through: true,
            max_in_flight: 1,
        };
        let (tx, rx) = mpsc::channel(pool.channel_capacity(&reg));
        let id = pool.allocate_id();
        pool.register(id, &reg, tx).unwrap();
        (id, rx)
    }

    fn request(rx: &mut mpsc::Receiver<StreamItem>) -> ResolveRequest {
        match rx.try_recv().expect("a request").unwrap().kind {
            Some(node_message::Kind::Request(r)) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    /// Change resolves of `items/{id}` (empty secret), one task each, in order.
    async fn spawn_resolves(
        pool: &ResolverPool,
        jobs: &[(&'static str, bool)],
    ) -> Vec<tokio::task::JoinHandle<Resolved>> {
        let mut tasks = Vec::new();
        for &(id, shared) in jobs {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                pool.resolve(&key(id), Arc::from(""), Reason::Change, shared)
                    .await
            }));
            tokio::task::yield_now().await;
        }
        tasks
    }

    /// Waits until `n` jobs of `items` wait in its queue.
    async fn wait_queued(pool: &ResolverPool, n: usize) {
        while pool.inner.state.lock().unwrap().entities["items"]
            .queue
            .len()
            < n
        {
            tokio::task::yield_now().await;
        }
    }

    fn ok(rows: &[&'static str]) -> Resolved {
        Ok(Rows {
            rows: rows
                .iter()
                .map(|r| Bytes::from_static(r.as_bytes()))
                .collect(),
            version: 0,
        })
    }

    fn key(id: &str) -> ChangeKey {
        ChangeKey::new("items", id).unwrap()
    }

    #[tokio::test]
    async fn jobs_wait_for_capacity_and_then_batch() {
        let pool = pool(10);
        let (rid, mut rx) = register(&pool, "svc", FetchMode::Shared);
        let tasks =
            spawn_resolves(&pool, &[("1", true), ("2", true), ("3", true), ("2", true)]).await;
        wait_queued(&pool, 3).await;
        let first = request(&mut rx);
        assert_eq!(first.ids, vec!["1"]);
        assert!(
            rx.try_recv().is_err(),
            "max_in_flight 1 holds the rest back"
        );
        pool.complete(
            rid,
            first.request_id,
            HashMap::from([("1".to_string(), ok(&["1"]))]),
        );
        let second = request(&mut rx);
        assert_eq!(
            second.ids,
            vec!["2", "3"],
            "queued jobs share one request, ids once"
        );
        pool.complete(
            rid,
            second.request_id,
            HashMap::from([("2".to_string(), ok(&["2"])), ("3".to_string(), ok(&["3"]))]),
        );
        for task in tasks {
            assert!(task.await.unwrap().is_ok());
        }
    }

    /// Subscribes of `items/{id}` with `secret` on one task each, in order;
    /// each waits until its job is queued or joined.
    async fn spawn_subscribes(
        pool: &ResolverPool,
        jobs: &[(&'static str, &'static str, bool)],
    ) -> Vec<tokio::task::JoinHandle<Resolved>> {
        let mut tasks = Vec::new();
        for &(id, secret, may_join) in jobs {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                pool.resolve_subscribe(&key(id), Arc::from(secret), may_join)
                    .await
            }));
            tokio::task::yield_now().await;
        }
        tasks
    }

    fn joined(pool: &ResolverPool) -> u64 {
        pool.inner.metrics.resolve_joined_total.load(Relaxed)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn subscribes_of_a_key_and_secret_join_the_request_in_flight() {
        let pool = pool(10);
        let (rid, mut rx) = register(&pool, "svc", FetchMode::PerSubscriber);
        let tasks = spawn_subscribes(
            &pool,
            &[("1", "s", true), ("1", "s", true), ("1", "s", true)],
        )
        .await;
        let first = request(&mut rx);
        assert_eq!(first.ids, vec!["1"]);
        assert_eq!(first.reason, Reason::Subscribe as i32);
        assert_eq!(joined(&pool), 2);
        pool.complete(
            rid,
            first.request_id,
            HashMap::from([("1".to_string(), ok(&["{\"n\":1}"]))]),
        );
        for task in tasks {
            let rows = task.await.unwrap().expect("rows");
            assert_eq!(rows.rows, vec![Bytes::from_static(b"{\"n\":1}")]);
        }
        assert!(rx.try_recv().is_err(), "one request for three subscribes");
        assert!(pool.inner.state.lock().unwrap().joinable.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn only_the_same_key_and_secret_with_leave_to_join_joins() {
        let pool = pool(10);
        let (rid, mut rx) = register(&pool, "svc", FetchMode::PerSubscriber);
        let tasks = spawn_subscribes(
            &pool,
            &[
                ("1", "s", true),
                ("1", "other", true),
                ("2", "s", true),
                ("1", "s", false),
            ],
        )
        .await;
        // A change resolve of the key with the same secret never joins.
        let change = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.resolve(&key("1"), Arc::from("s"), Reason::Change, false)
                    .await
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(joined(&pool), 0);
        let mut requests = Vec::new();
        while requests.len() < 4 {
            let req = request(&mut rx);
            let results = req.ids.iter().map(|id| (id.clone(), ok(&["{}"]))).collect();
            pool.complete(rid, req.request_id, results);
            requests.push((req.ids, req.secret, req.reason));
            tokio::task::yield_now().await;
        }
        let sub = Reason::Subscribe as i32;
        let ids = |ids: &[&str]| ids.iter().map(|id| id.to_string()).collect::<Vec<_>>();
        assert_eq!(
            requests,
            vec![
                (ids(&["1"]), "s".to_string(), sub),
                // Queued behind max_in_flight 1, in arrival order; jobs of
                // one secret batch as before.
                (ids(&["1"]), "other".to_string(), sub),
                (ids(&["2", "1"]), "s".to_string(), sub),
                (ids(&["1"]), "s".to_string(), Reason::Change as i32),
            ]
        );
        for task in tasks {
            assert!(task.await.unwrap().is_ok());
        }
        assert!(change.await.unwrap().is_ok());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn after_a_change_of_the_key_a_subscribe_sends_a_request_of_its_own() {
        let pool = ResolverPool::new(
            &ResolveConfig {
                batch_size: 10,
                timeout: Duration::from_secs(5),
                default_max_in_flight: 4,
                max_resolver_streams: 4,
            },
            Arc::new(Metrics::default()),
        );
        let reg = Register {
            name: "svc".into(),
            entities: vec![EntityRegistration {
                entity: "items".into(),
                fetch_mode: FetchMode::PerSubscriber as i32,
            }],
            pass_through: false,
            max_in_flight: 4,
        };
        let (tx, mut rx) = mpsc::channel(pool.channel_capacity(&reg));
        let rid = pool.allocate_id();
        pool.register(rid, &reg, tx).unwrap();

        let before = spawn_subscribes(&pool, &[("1", "s", true)]).await;
        let first = request(&mut rx);
        pool.note_change(&key("2"));
        let joining = spawn_subscribes(&pool, &[("1", "s", true)]).await;
        assert_eq!(joined(&pool), 1, "a change of another key changes nothing");
        pool.note_change(&key("1"));
        let after = spawn_subscribes(&pool, &[("1", "s", true), ("1", "s", true)]).await;
        let second = request(&mut rx);
        assert_eq!(second.ids, vec!["1"]);
        assert_eq!(joined(&pool), 2, "the second request is joined in turn");
        assert!(rx.try_recv().is_err());
        pool.complete(
            rid,
            second.request_id,
            HashMap::from([("1".to_string(), ok(&["\"new\""]))]),
        );
        pool.complete(
            rid,
            first.request_id,
            HashMap::from([("1".to_string(), ok(&["\"old\""]))]),
        );
        let rows = |r: Resolved| r.expect("rows").rows;
        for task in before.into_iter().chain(joining) {
            assert_eq!(
                rows(task.await.unwrap()),
                vec![Bytes::from_static(b"\"old\"")]
            );
        }
        for task in after {
            assert_eq!(
                rows(task.await.unwrap()),
                vec![Bytes::from_static(b"\"new\"")]
            );
        }

        // A lost change on the bus ends every join.
        let lost = spawn_subscribes(&pool, &[("3", "s", true)]).await;
        let third = request(&mut rx);
        pool.note_all_changed();
        let fresh = spawn_subscribes(&pool, &[("3", "s", true)]).await;
        let fourth = request(&mut rx);
        assert_eq!(fourth.ids, vec!["3"]);
        for req in [third, fourth] {
            pool.complete(
                rid,
                req.request_id,
                HashMap::from([("3".to_string(), ok(&["{}"]))]),
            );
        }
        for task in lost.into_iter().chain(fresh) {
            assert!(task.await.unwrap().is_ok());
        }
        assert!(pool.inner.state.lock().unwrap().joinable.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn joiners_of_a_request_on_a_dead_stream_move_with_it() {
        let pool = pool(10);
        let (a, mut rx_a) = register(&pool, "svc", FetchMode::PerSubscriber);
        let (b, mut rx_b) = register(&pool, "svc", FetchMode::PerSubscriber);
        let tasks = spawn_subscribes(&pool, &[("1", "s", true), ("1", "s", true)]).await;
        let (dead, mut rx_live, live) = match (rx_a.try_recv(), rx_b.try_recv()) {
            (Ok(_), Err(_)) => (a, rx_b, b),
            (Err(_), Ok(_)) => (b, rx_a, a),
            other => panic!("one request expected, got {other:?}"),
        };
        assert_eq!(joined(&pool), 1);
        pool.deregister(dead);
        let moved = request(&mut rx_live);
        assert_eq!(moved.ids, vec!["1"], "both jobs in one request, id once");
        pool.complete(
            live,
            moved.request_id,
            HashMap::from([("1".to_string(), ok(&["{}"]))]),
        );
        for task in tasks {
            assert!(task.await.unwrap().is_ok());
        }
        assert!(pool.inner.state.lock().unwrap().joinable.is_empty());
    }

    #[tokio::test]
    async fn shared_and_other_jobs_never_share_a_request() {
        let pool = pool(10);
        let (rid, mut rx) = register(&pool, "svc", FetchMode::Shared);
        // Same entity, empty secret and reason for all: only `shared` differs.
        let tasks = spawn_resolves(
            &pool,
            &[("1", true), ("2", true), ("3", false), ("4", true)],
        )
        .await;
        wait_queued(&pool, 3).await;
        let mut seen = Vec::new();
        for _ in 0..3 {
            let req = request(&mut rx);
            seen.push((req.ids.clone(), req.shared));
            let results = req.ids.iter().map(|id| (id.clone(), ok(&["{}"]))).collect();
            pool.complete(rid, req.request_id, results);
        }
        let ids = |ids: &[&str]| ids.iter().map(|id| id.to_string()).collect::<Vec<_>>();
        assert_eq!(
            seen,
            vec![
                (ids(&["1"]), true),
                (ids(&["2", "4"]), true),
                (ids(&["3"]), false),
            ]
        );
        for task in tasks {
            assert!(task.await.unwrap().is_ok());
        }
    }

    #[tokio::test]
    async fn a_dead_stream_hands_its_requests_to_another() {
        let pool = pool(10);
        let (a, mut rx_a) = register(&pool, "svc", FetchMode::Shared);
        let (b, mut rx_b) = register(&pool, "svc", FetchMode::Shared);
        let task = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.resolve(&key("1"), Arc::from(""), Reason::Change, true)
                    .await
            })
        };
        let (dead, mut rx_other, other) = loop {
            tokio::task::yield_now().await;
            if let Ok(Ok(_)) = rx_a.try_recv() {
                break (a, rx_b, b);
            }
            if let Ok(Ok(_)) = rx_b.try_recv() {
                break (b, rx_a, a);
            }
        };
        pool.deregister(dead);
        let retried = request(&mut rx_other);
        pool.complete(
            other,
            retried.request_id,
            HashMap::from([("1".to_string(), ok(&["{}"]))]),
        );
        assert!(task.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn missing_results_and_unknown_entities() {
        let pool = pool(10);
        assert!(matches!(
            pool.resolve(
                &ChangeKey::new("nope", "1").unwrap(),
                Arc::from(""),
                Reason::Subscribe,
                false
            )
            .await,
            Err(ResolveError::NoResolver)
        ));
        let (rid, mut rx) = register(&pool, "svc", FetchMode::Shared);
        let task = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.resolve(&key("1"), Arc::from("s"), Reason::Subscribe, false)
                    .await
            })
        };
        let req = loop {
            tokio::task::yield_now().await;
            if let Ok(Ok(NodeMessage {
                kind: Some(node_message::Kind::Request(r)),
            })) = rx.try_recv()
            {
                break r;
            }
        };
        assert_eq!(req.secret, "s");
        assert_eq!(req.reason, Reason::Subscribe as i32);
        assert!(!req.shared);
        pool.complete(rid, req.request_id, HashMap::new());
        let err = task.await.unwrap().unwrap_err();
        assert!(matches!(&err, ResolveError::MissingResult(id) if &**id == "1"));
        assert_eq!(err.kind(), ResolveErrorKind::InvalidAnswer);
        assert_eq!(err.resolver_message(), None, "nothing of it is for clients");
    }

    #[test]
    fn conflicting_fetch_modes_are_refused() {
        let pool = pool(10);
        let _keep = register(&pool, "a", FetchMode::Shared);
        let reg = Register {
            name: "b".into(),
            entities: vec![EntityRegistration {
                entity: "items".into(),
                fetch_mode: FetchMode::PerSubscriber as i32,
            }],
            pass_through: false,
            max_in_flight: 0,
        };
        let (tx, _rx) = mpsc::channel(1);
        assert!(matches!(
            pool.register(9, &reg, tx),
            Err(RegisterError::Conflict(_))
        ));
    }

    #[test]
    fn invalid_rows_become_errors() {
        let result = KeyResult {
            id: "1".into(),
            status: crate::proto::v1::Status::Ok as i32,
            rows: vec![Bytes::from_static(b"{oops")],
            version: 0,
            message: String::new(),
        };
        let err = read_key_result(result).unwrap_err();
        assert!(matches!(
            err,
            ResolveError::InvalidRow(RowError::NotJson(_))
        ));
        assert_eq!(err.kind(), ResolveErrorKind::InvalidAnswer);
        assert_eq!(err.resolver_message(), None);
        assert!(
            std::error::Error::source(&err).is_some(),
            "the row error is kept"
        );
    }

    #[test]
    fn statuses_are_read_with_the_resolvers_own_message() {
        use crate::proto::v1::Status as S;
        let result = |status: i32, message: &str| KeyResult {
            id: "1".into(),
            status,
            rows: Vec::new(),
            version: 0,
            message: message.into(),
        };
        let err = read_key_result(result(S::Forbidden as i32, "not yours")).unwrap_err();
        assert_eq!(err.kind(), ResolveErrorKind::Forbidden);
        assert_eq!(err.resolver_message(), Some("not yours"));
        let err = read_key_result(result(S::Error as i32, "")).unwrap_err();
        assert_eq!(err.kind(), ResolveErrorKind::Failed);
        assert_eq!(err.resolver_message(), None, "empty: the edge picks one");
        let err = read_key_result(result(99, "")).unwrap_err();
        assert!(matches!(err, ResolveError::UnknownStatus(99)));
    }

    #[test]
    fn node_to_node_results_carry_no_internal_text() {
        let invalid = read_key_result(KeyResult {
            id: "1".into(),
            status: crate::proto::v1::Status::Ok as i32,
            rows: vec![Bytes::from_static(b"{oops")],
            version: 0,
            message: String::new(),
        });
        let sent = key_result(invalid, "1");
        assert_eq!(sent.status, crate::proto::v1::Status::Error as i32);
        assert_eq!(sent.message, "the resolver sent an invalid answer");
        let sent = key_result(Err(ResolveError::Failed("db down".into())), "1");
        assert_eq!(sent.message, "db down", "the resolver's own message passes");
        let back = read_key_result(key_result(ok(&["{}", "[1]"]), "1")).unwrap();
        assert_eq!(back.rows.len(), 2);
    }

    fn register_message(entities: usize, duplicate: bool) -> Register {
        let mut entities: Vec<EntityRegistration> = (0..entities)
            .map(|i| EntityRegistration {
                entity: format!("e{i}"),
                fetch_mode: FetchMode::Shared as i32,
            })
            .collect();
        if duplicate {
            entities.push(entities[0].clone());
        }
        Register {
            name: "svc".into(),
            entities,
            pass_through: false,
            max_in_flight: 1,
        }
    }

    #[test]
    fn registers_are_bounded_and_checked_in_linear_time() {
        let pool = pool(10);
        let (tx, _rx) = mpsc::channel(1);
        let too_many = register_message(MAX_ENTITIES_PER_STREAM + 1, false);
        assert!(
            matches!(pool.register(1, &too_many, tx.clone()), Err(RegisterError::Invalid(m)) if m.contains("at most"))
        );
        let twice = register_message(MAX_ENTITIES_PER_STREAM - 1, true);
        assert!(
            matches!(pool.register(2, &twice, tx.clone()), Err(RegisterError::Invalid(m)) if m.contains("twice"))
        );
        assert!(
            pool.register(
                3,
                &register_message(MAX_ENTITIES_PER_STREAM, false),
                tx.clone()
            )
            .is_ok()
        );
        // max_resolver_streams is 4 here.
        for id in 4..7 {
            pool.register(id, &register_message(1, false), tx.clone())
                .unwrap();
        }
        assert!(matches!(
            pool.register(7, &register_message(1, false), tx),
            Err(RegisterError::Full(_))
        ));
    }

    #[test]
    fn versions_above_2_pow_53_are_invalid_answers() {
        let result = |version| KeyResult {
            id: "1".into(),
            status: crate::proto::v1::Status::Ok as i32,
            rows: vec![],
            version,
            message: String::new(),
        };
        assert!(read_key_result(result(MAX_VERSION)).is_ok());
        let err = read_key_result(result(MAX_VERSION + 1)).unwrap_err();
        assert_eq!(err.kind(), ResolveErrorKind::InvalidAnswer);
    }

    /// Deadlines are kept in the order requests were sent: an expiry looks
    /// at the front only, and answered requests leave no trace behind it.
    #[tokio::test]
    async fn only_unanswered_requests_expire_and_answered_ones_leave_the_deadlines() {
        let pool = pool(1);
        // Room for three requests at once, one id each (batch size 1).
        let reg = Register {
            name: "svc".into(),
            entities: vec![EntityRegistration {
                entity: "items".into(),
                fetch_mode: FetchMode::Shared as i32,
            }],
            pass_through: false,
            max_in_flight: 3,
        };
        let (tx, mut rx) = mpsc::channel(pool.channel_capacity(&reg));
        let rid = pool.allocate_id();
        pool.register(rid, &reg, tx).unwrap();
        let tasks = spawn_resolves(&pool, &[("1", true), ("2", true), ("3", true)]).await;
        let sent: Vec<ResolveRequest> = (0..3).map(|_| request(&mut rx)).collect();
        assert_eq!(pool.inner.state.lock().unwrap().deadlines.len(), 3);
        // The first two are answered; the third is not.
        for request in &sent[..2] {
            let id = request.ids[0].clone();
            pool.complete(rid, request.request_id, HashMap::from([(id, ok(&["1"]))]));
        }
        // Not yet due: nothing expires, nothing is dropped.
        pool.expire(Instant::now());
        assert_eq!(pool.inner.state.lock().unwrap().deadlines.len(), 3);
        // Due: the third is retried (sent again), the answered ones are gone.
        pool.expire(Instant::now() + Duration::from_secs(5) + Duration::from_millis(1));
        let retried = request(&mut rx);
        assert_eq!(retried.ids, ["3"]);
        let state = pool.inner.state.lock().unwrap();
        assert_eq!(state.deadlines.len(), 1, "only the retry's deadline");
        assert_eq!(state.deadlines[0].1, retried.request_id);
        drop(state);
        for task in tasks {
            task.abort();
        }
    }

    #[tokio::test]
    async fn a_queued_job_fails_with_timeout_past_its_deadline() {
        let pool = pool(10);
        let (_rid, mut rx) = register(&pool, "svc", FetchMode::Shared);
        // max_in_flight 1: the first job is sent, the second waits in the queue.
        let (first, second) = {
            let (a, b) = (pool.clone(), pool.clone());
            (
                tokio::spawn(async move {
                    a.resolve(&key("1"), Arc::from(""), Reason::Change, true)
                        .await
                }),
                tokio::spawn(async move {
                    b.resolve(&key("2"), Arc::from(""), Reason::Change, true)
                        .await
                }),
            )
        };
        wait_queued(&pool, 1).await;
        let _sent = request(&mut rx);
        let later =
            Instant::now() + Duration::from_secs(5) * MAX_ATTEMPTS + Duration::from_millis(1);
        pool.expire(later);
        assert!(matches!(second.await.unwrap(), Err(ResolveError::Timeout)));
        assert!(
            pool.inner.state.lock().unwrap().entities["items"]
                .queue
                .is_empty()
        );
        first.abort();
    }
}
