//! The resolver pool: backend `Resolve` streams, and the requests the node sends them.
//!
//! Jobs (resolve one key for one secret) queue per entity. A queue is drained
//! into requests while some resolver of the entity has room under its
//! `max_in_flight`; jobs with the same secret and reason share a request (up
//! to the batch size), so under load the backend sees O(distinct keys)
//! requests. Requests of a stream that dies, or that pass their deadline, go
//! back to the front of the queue and on to another resolver.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{
    cluster::ClusterLink,
    key::{ChangeKey, validate_part},
    metrics::Metrics,
    proto::v1::{
        FetchMode, KeyResult, NodeMessage, PassThrough, Reason, Register, ResolveRequest,
        node_message,
    },
    protocol::validate_row,
};

/// Identifies one `Resolve` stream within a node.
pub type ResolverId = u64;

/// What a stream's outbound channel carries.
pub type StreamItem = Result<NodeMessage, Status>;

/// Messages beyond `max_in_flight` a stream's channel can hold (pass-through).
pub const PASS_THROUGH_HEADROOM: usize = 256;
/// Upper bound on a resolver's `max_in_flight`.
pub const MAX_IN_FLIGHT_CAP: u32 = 4096;
/// Queued jobs examined for companions when building one request.
pub const BATCH_SCAN_LIMIT: usize = 1024;
/// Attempts of one job (deadline passes) before it fails with `Timeout`.
pub const MAX_ATTEMPTS: u32 = 3;

/// Outcome of resolving one key for one secret.
#[derive(Debug, Clone)]
pub enum Resolved {
    Rows {
        rows: Vec<Bytes>,
        version: u64,
    },
    NotFound(String),
    Forbidden(String),
    /// The resolver answered ERROR, or its answer was malformed.
    Error(String),
    /// No resolver answered within the deadline, after retries.
    Timeout,
    /// No resolver serves the entity.
    NoResolver,
    /// The node is shutting down.
    Closed,
}

impl Resolved {
    /// Interprets one `KeyResult`, validating its rows.
    pub fn from_result(result: KeyResult) -> Self {
        use crate::proto::v1::Status as S;
        match S::try_from(result.status) {
            Ok(S::Ok) => {
                for row in &result.rows {
                    if let Err(err) = validate_row(row) {
                        return Resolved::Error(format!("resolver sent an invalid row: {err}"));
                    }
                }
                Resolved::Rows {
                    rows: result.rows,
                    version: result.version,
                }
            }
            Ok(S::NotFound) => Resolved::NotFound(result.message),
            Ok(S::Forbidden) => Resolved::Forbidden(result.message),
            Ok(S::Error) => Resolved::Error(result.message),
            Ok(S::Unspecified) | Err(_) => {
                Resolved::Error(format!("resolver sent status {}", result.status))
            }
        }
    }

    /// The `KeyResult` for `id` that [`Resolved::from_result`] reads back
    /// (node-to-node answers in a cluster). Failures without a status of
    /// their own become ERROR with a message.
    pub fn into_key_result(self, id: &str) -> KeyResult {
        use crate::proto::v1::Status as S;
        let (status, rows, version, message) = match self {
            Resolved::Rows { rows, version } => (S::Ok, rows, version, String::new()),
            Resolved::NotFound(m) => (S::NotFound, Vec::new(), 0, m),
            Resolved::Forbidden(m) => (S::Forbidden, Vec::new(), 0, m),
            Resolved::Error(m) => (S::Error, Vec::new(), 0, m),
            Resolved::Timeout => (S::Error, Vec::new(), 0, "resolver timed out".into()),
            Resolved::NoResolver | Resolved::Closed => {
                (S::Error, Vec::new(), 0, "no resolver".into())
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
}

/// Why a `Register` was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("node is shutting down")]
    Closed,
}

/// Pool settings (from [`crate::config::Config`]).
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub batch_size: usize,
    pub timeout: Duration,
    pub default_max_in_flight: u32,
}

struct Job {
    id: Arc<str>,
    secret: Arc<str>,
    reason: Reason,
    reply: oneshot::Sender<Resolved>,
    attempts: u32,
}

struct InFlight {
    resolver: ResolverId,
    entity: Arc<str>,
    jobs: Vec<Job>,
    deadline: Instant,
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
    pass_through_turn: usize,
    closed: bool,
}

/// The resolver pool: a cheap-clone handle.
#[derive(Clone)]
pub struct ResolverPool {
    inner: Arc<Inner>,
}

struct Inner {
    /// One std `Mutex` for the whole pool: every operation is a handful of
    /// map updates and channel `try_send`s, never an `.await`, and the rate
    /// is per request (batched), not per delivery.
    state: Mutex<State>,
    config: PoolConfig,
    metrics: Arc<Metrics>,
    next_request: AtomicU64,
    next_resolver: AtomicU64,
    /// Resolvers on other nodes (cluster bus only).
    remote: Option<ClusterLink>,
    /// Fetch modes of entities served only on other nodes, as they reported them.
    remote_modes: Mutex<HashMap<Arc<str>, FetchMode>>,
    /// Entities with a local resolver, for the cluster-resolve server.
    entities: watch::Sender<Vec<(Arc<str>, FetchMode)>>,
}

impl ResolverPool {
    pub fn new(config: PoolConfig, metrics: Arc<Metrics>, remote: Option<ClusterLink>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                config,
                metrics,
                next_request: AtomicU64::new(1),
                next_resolver: AtomicU64::new(1),
                remote,
                remote_modes: Mutex::new(HashMap::new()),
                entities: watch::Sender::new(Vec::new()),
            }),
        }
    }

    /// Follows the set of entities served by local resolvers.
    pub fn watch_entities(&self) -> watch::Receiver<Vec<(Arc<str>, FetchMode)>> {
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
    pub fn allocate_id(&self) -> ResolverId {
        self.inner.next_resolver.fetch_add(1, Relaxed)
    }

    /// Channel capacity for a stream with this `max_in_flight`.
    pub fn channel_capacity(&self, register: &Register) -> usize {
        self.max_in_flight(register) as usize + PASS_THROUGH_HEADROOM
    }

    fn max_in_flight(&self, register: &Register) -> u32 {
        match register.max_in_flight {
            0 => self.inner.config.default_max_in_flight,
            n => n.min(MAX_IN_FLIGHT_CAP),
        }
    }

    /// Adds a resolver stream. `tx` is the stream's outbound channel.
    pub fn register(
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
        let mut wanted: Vec<(Arc<str>, FetchMode)> = Vec::new();
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
            if wanted.iter().any(|(e, _)| **e == *reg.entity) {
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
    pub fn deregister(&self, id: ResolverId) {
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
                    let _ = job.reply.send(Resolved::NoResolver);
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
    pub fn drain(&self, id: ResolverId) {
        let mut state = self.inner.state.lock().unwrap();
        let Some(slot) = state.resolvers.get_mut(&id) else {
            return;
        };
        slot.draining = true;
        slot.pass_through = false;
    }

    /// The fetch mode of `entity` on a local resolver.
    pub fn local_fetch_mode(&self, entity: &str) -> Option<FetchMode> {
        let state = self.inner.state.lock().unwrap();
        state.entities.get(entity).map(|q| q.mode)
    }

    /// The fetch mode of `entity`: a local resolver's, else what another node
    /// reported, else (in a cluster) PER_SUBSCRIBER, the mode that never
    /// shares rows between secrets. `None`: nobody can resolve it.
    pub fn fetch_mode(&self, entity: &str) -> Option<FetchMode> {
        if let Some(mode) = self.local_fetch_mode(entity) {
            return Some(mode);
        }
        self.inner.remote.as_ref()?;
        let remote = self.inner.remote_modes.lock().unwrap();
        Some(
            remote
                .get(entity)
                .copied()
                .unwrap_or(FetchMode::PerSubscriber),
        )
    }

    /// Resolves `key` for `secret` on a local resolver or, when none serves
    /// the entity, on another node. Waits for the answer (or its failure).
    pub async fn resolve(&self, key: &ChangeKey, secret: Arc<str>, reason: Reason) -> Resolved {
        let local = self.resolve_local(key, secret.clone(), reason).await;
        let (Resolved::NoResolver, Some(remote)) = (&local, &self.inner.remote) else {
            return local;
        };
        self.inner.metrics.resolve_request(reason);
        Metrics::inc(&self.inner.metrics.cluster_resolves_total);
        // Boxed: the request-reply future is large, and every resolve future
        // (one per pending subscribe) would otherwise carry its size.
        let (outcome, mode) = Box::pin(remote.resolve(key, &secret, reason)).await;
        if let Some(mode) = mode {
            let mode = if mode == FetchMode::Unspecified {
                FetchMode::PerSubscriber
            } else {
                mode
            };
            self.inner
                .remote_modes
                .lock()
                .unwrap()
                .insert(key.entity.clone(), mode);
        }
        outcome
    }

    /// Resolves `key` on a local resolver only.
    pub async fn resolve_local(
        &self,
        key: &ChangeKey,
        secret: Arc<str>,
        reason: Reason,
    ) -> Resolved {
        let (reply, answer) = oneshot::channel();
        {
            let mut state = self.inner.state.lock().unwrap();
            if state.closed {
                return Resolved::Closed;
            }
            let Some(queue) = state.entities.get_mut(&*key.entity) else {
                return Resolved::NoResolver;
            };
            queue.queue.push_back(Job {
                id: key.id.clone(),
                secret,
                reason,
                reply,
                attempts: 0,
            });
            self.dispatch(&mut state, &key.entity);
        }
        answer.await.unwrap_or(Resolved::Closed)
    }

    /// Sends queued jobs of `entity` while some resolver has room.
    fn dispatch(&self, state: &mut State, entity: &Arc<str>) {
        let batch_size = self.inner.config.batch_size;
        loop {
            let State {
                resolvers,
                entities,
                in_flight,
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
            let (secret, reason) = (first.secret.clone(), first.reason);
            let mut ids: Vec<String> = vec![first.id.to_string()];
            let mut jobs = vec![first];
            // Look for companions among the next jobs only, so a long queue of
            // distinct secrets costs O(queue) per request, not O(queue²).
            let mut i = 0;
            let mut scanned = 0;
            while i < queue.queue.len() && ids.len() < batch_size && scanned < BATCH_SCAN_LIMIT {
                scanned += 1;
                let job = &queue.queue[i];
                if job.reason != reason || job.secret != secret {
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
                })),
            };
            let slot = resolvers.get_mut(&resolver_id).expect("found above");
            match slot.tx.try_send(Ok(message)) {
                Ok(()) => {
                    slot.in_flight += 1;
                    self.inner.metrics.resolve_request(reason);
                    in_flight.insert(
                        request_id,
                        InFlight {
                            resolver: resolver_id,
                            entity: entity.clone(),
                            jobs,
                            deadline: Instant::now() + self.inner.config.timeout,
                        },
                    );
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
    pub fn complete(&self, from: ResolverId, request_id: u64, results: HashMap<String, Resolved>) {
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
        for job in flight.jobs {
            // A batch may hold several jobs of one id (different callers):
            // each gets the same (cheaply cloned) outcome.
            let outcome = results.get(&*job.id).cloned().unwrap_or_else(|| {
                Resolved::Error(format!("resolver returned no result for id {:?}", job.id))
            });
            let _ = job.reply.send(outcome);
        }
        self.dispatch(&mut state, &flight.entity);
    }

    /// Re-queues (or fails, after [`MAX_ATTEMPTS`]) requests past their deadline.
    pub fn expire(&self, now: Instant) {
        let mut state = self.inner.state.lock().unwrap();
        let expired: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut touched: Vec<Arc<str>> = Vec::new();
        for request_id in expired {
            let flight = state.in_flight.remove(&request_id).expect("listed above");
            Metrics::inc(&self.inner.metrics.resolve_timeouts_total);
            tracing::warn!(resolver.id = flight.resolver, request_id, entity = %flight.entity, "resolve request passed its deadline");
            if let Some(slot) = state.resolvers.get_mut(&flight.resolver) {
                slot.in_flight = slot.in_flight.saturating_sub(1);
            }
            let Some(queue) = state.entities.get_mut(&flight.entity) else {
                for job in flight.jobs {
                    let _ = job.reply.send(Resolved::NoResolver);
                }
                continue;
            };
            for mut job in flight.jobs.into_iter().rev() {
                job.attempts += 1;
                if job.attempts >= MAX_ATTEMPTS {
                    let _ = job.reply.send(Resolved::Timeout);
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

    /// Runs [`Self::expire`] periodically until `cancel`.
    pub async fn run_deadlines(self, cancel: CancellationToken) {
        let tick = (self.inner.config.timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = interval.tick() => self.expire(Instant::now()),
            }
        }
    }

    /// Forwards a client's pass-through message to one resolver per distinct
    /// name among those that asked for them. Returns how many got it.
    pub fn pass_through(&self, connection_id: &str, secret: &str, payload: Bytes) -> usize {
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
    pub fn has_pass_through(&self) -> bool {
        let state = self.inner.state.lock().unwrap();
        state.resolvers.values().any(|s| s.pass_through)
    }

    /// Registered streams.
    pub fn resolver_count(&self) -> usize {
        self.inner.state.lock().unwrap().resolvers.len()
    }

    /// Shutdown: fails every job and drops every stream's channel, which ends
    /// the response streams.
    pub fn close(&self) {
        let mut state = self.inner.state.lock().unwrap();
        state.closed = true;
        state.resolvers.clear();
        self.inner.entities.send_replace(Vec::new());
        for (_, queue) in state.entities.drain() {
            for job in queue.queue {
                let _ = job.reply.send(Resolved::Closed);
            }
        }
        for (_, flight) in state.in_flight.drain() {
            for job in flight.jobs {
                let _ = job.reply.send(Resolved::Closed);
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
            PoolConfig {
                batch_size,
                timeout: Duration::from_secs(5),
                default_max_in_flight: 1,
            },
            Arc::new(Metrics::default()),
            None,
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

    fn ok(rows: &[&'static str]) -> Resolved {
        Resolved::Rows {
            rows: rows
                .iter()
                .map(|r| Bytes::from_static(r.as_bytes()))
                .collect(),
            version: 0,
        }
    }

    fn key(id: &str) -> ChangeKey {
        ChangeKey::new("items", id).unwrap()
    }

    #[tokio::test]
    async fn jobs_wait_for_capacity_and_then_batch() {
        let pool = pool(10);
        let (rid, mut rx) = register(&pool, "svc", FetchMode::Shared);
        let mut tasks = Vec::new();
        for id in ["1", "2", "3", "2"] {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                pool.resolve(&key(id), Arc::from(""), Reason::Change).await
            }));
            tokio::task::yield_now().await;
        }
        while pool.inner.state.lock().unwrap().entities["items"]
            .queue
            .len()
            < 3
        {
            tokio::task::yield_now().await;
        }
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
            assert!(matches!(task.await.unwrap(), Resolved::Rows { .. }));
        }
    }

    #[tokio::test]
    async fn a_dead_stream_hands_its_requests_to_another() {
        let pool = pool(10);
        let (a, mut rx_a) = register(&pool, "svc", FetchMode::Shared);
        let (b, mut rx_b) = register(&pool, "svc", FetchMode::Shared);
        let task = {
            let pool = pool.clone();
            tokio::spawn(
                async move { pool.resolve(&key("1"), Arc::from(""), Reason::Change).await },
            )
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
        assert!(matches!(task.await.unwrap(), Resolved::Rows { .. }));
    }

    #[tokio::test]
    async fn missing_results_and_unknown_entities() {
        let pool = pool(10);
        assert!(matches!(
            pool.resolve(
                &ChangeKey::new("nope", "1").unwrap(),
                Arc::from(""),
                Reason::Subscribe
            )
            .await,
            Resolved::NoResolver
        ));
        let (rid, mut rx) = register(&pool, "svc", FetchMode::Shared);
        let task = {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.resolve(&key("1"), Arc::from("s"), Reason::Subscribe)
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
        pool.complete(rid, req.request_id, HashMap::new());
        assert!(matches!(task.await.unwrap(), Resolved::Error(_)));
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
        assert!(matches!(Resolved::from_result(result), Resolved::Error(_)));
    }
}
