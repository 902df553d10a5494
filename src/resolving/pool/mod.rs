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
//! All of that is [`state::PoolState`], a synchronous state machine that
//! takes the time as an argument and returns what to do as effects.
//! [`ResolverPool`] is its async shell: it holds the state behind a mutex,
//! turns effects into channel sends and answers, and runs the deadline
//! timer. The pool knows nothing of other nodes: reaching their resolvers is
//! `resolve`'s choice, and `cluster` answers them from this pool.

mod effects;
mod error;
mod joins;
mod queues;
mod register;
mod state;
mod timers;
mod wire;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Instant,
};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tonic::Status;

pub(crate) use self::{
    effects::ResolverId,
    error::{RegisterError, ResolveError, ResolveErrorKind},
    register::{MAX_REFRESH_INTERVAL_MS, MIN_REFRESH_INTERVAL_MS, PASS_THROUGH_HEADROOM},
    state::MAX_ATTEMPTS,
    wire::{Resolved, Rows, key_result, read_key_result},
};
// The bounds the fuzz properties check answers and registrations against.
use self::{
    effects::{Completion, Effect, Expiry, NewJob, NewStream, SendFailure, Submitted, Waiter},
    state::PoolState,
};
#[cfg(any(test, fuzzing))]
pub(crate) use self::{
    register::{MAX_ENTITIES_PER_STREAM, MAX_IN_FLIGHT_CAP},
    wire::MAX_VERSION,
};
use crate::{
    config::ResolveConfig,
    key::Key,
    ops::metrics::Metrics,
    ops::tasks::Tasks,
    proto::v1::{FetchMode, NodeMessage, PassThrough, Reason, Register, node_message},
};

/// What a stream's outbound channel carries.
pub(crate) type StreamItem = Result<NodeMessage, Status>;

/// A caller waiting for its job's outcome.
type Reply = oneshot::Sender<Resolved>;

impl Waiter for Reply {
    fn is_gone(&self) -> bool {
        self.is_closed()
    }
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
    locked: Mutex<Locked>,
    config: ResolveConfig,
    metrics: Arc<Metrics>,
    next_resolver: AtomicU64,
    /// Entities with a local resolver, for the cluster-resolve server.
    entities: watch::Sender<Vec<(Arc<str>, FetchMode)>>,
    /// Wakes the deadline timer when a deadline earlier than the one it
    /// sleeps until is set.
    rearm: Notify,
}

/// What the pool's mutex guards.
struct Locked {
    state: PoolState<Reply>,
    /// Each registered stream's outbound channel.
    streams: HashMap<ResolverId, mpsc::Sender<StreamItem>>,
    /// The deadline the timer sleeps until (`None`: none, or not started).
    armed: Option<Instant>,
    /// The refresh intervals the streams registered.
    refresh: register::RefreshIntervals,
}

impl ResolverPool {
    pub(crate) fn new(config: &ResolveConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                locked: Mutex::new(Locked {
                    state: PoolState::new(config),
                    streams: HashMap::new(),
                    armed: None,
                    refresh: register::RefreshIntervals::default(),
                }),
                config: config.clone(),
                metrics,
                next_resolver: AtomicU64::new(1),
                entities: watch::Sender::new(Vec::new()),
                rearm: Notify::new(),
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

    fn lock(&self) -> MutexGuard<'_, Locked> {
        self.inner.locked.lock().unwrap()
    }

    /// Carries out what the state asks for, until it asks nothing more;
    /// wakes the timer if the next deadline moved before the one it sleeps
    /// until.
    fn drive(&self, locked: &mut Locked, now: Instant) {
        let metrics = &self.inner.metrics;
        while let Some(effect) = locked.state.poll(now) {
            match effect {
                Effect::Send { to, request } => {
                    let (request_id, reason) = (request.request_id, request.reason());
                    let message = NodeMessage {
                        kind: Some(node_message::Kind::Request(request)),
                    };
                    let sent = match locked.streams.get(&to) {
                        Some(tx) => tx.try_send(Ok(message)),
                        None => Err(mpsc::error::TrySendError::Closed(Ok(message))),
                    };
                    match sent {
                        Ok(()) => metrics.resolve_request(reason),
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            // Can't happen while pass-through leaves room for
                            // max_in_flight requests.
                            tracing::warn!(
                                resolver.id = to,
                                "resolver channel full; requests wait"
                            );
                            locked.state.send_failed(request_id, SendFailure::Full);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            locked.state.send_failed(request_id, SendFailure::Closed);
                        }
                    }
                }
                Effect::Complete { waiter, outcome } => {
                    let _ = waiter.send(outcome);
                }
                Effect::Expired(Expiry::Queued) => Metrics::inc(&metrics.resolve_timeouts_total),
                Effect::Expired(Expiry::Request {
                    resolver,
                    request_id,
                    entity,
                }) => {
                    Metrics::inc(&metrics.resolve_timeouts_total);
                    tracing::warn!(resolver.id = resolver, request_id, entity = %entity, "resolve request passed its deadline");
                }
            }
        }
        let next = locked.state.next_deadline();
        if next.is_some_and(|next| locked.armed.is_none_or(|armed| next < armed)) {
            locked.armed = next;
            self.inner.rearm.notify_one();
        }
    }
}

/// Streams: registration and what they serve.
impl ResolverPool {
    /// Follows the set of entities served by local resolvers.
    pub(crate) fn watch_entities(&self) -> watch::Receiver<Vec<(Arc<str>, FetchMode)>> {
        self.inner.entities.subscribe()
    }

    fn publish_entities(&self, locked: &Locked) {
        let entities = locked.state.served();
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
        register::max_in_flight(register, self.inner.config.default_max_in_flight)
    }

    /// Adds a resolver stream. `tx` is the stream's outbound channel.
    pub(crate) fn register(
        &self,
        id: ResolverId,
        register: &Register,
        tx: mpsc::Sender<StreamItem>,
    ) -> Result<(), RegisterError> {
        let checked = register::check(register)?;
        let stream = NewStream {
            name: checked.name,
            entities: checked.entities,
            max_in_flight: self.max_in_flight(register),
            pass_through: register.pass_through,
        };
        let mut locked = self.lock();
        locked.state.register(id, stream)?;
        locked.refresh.add(id, checked.refresh);
        locked.streams.insert(id, tx);
        self.drive(&mut locked, Instant::now());
        self.publish_entities(&locked);
        Ok(())
    }

    /// Removes a resolver stream; its in-flight requests go to other resolvers.
    pub(crate) fn deregister(&self, id: ResolverId) {
        let mut locked = self.lock();
        locked.streams.remove(&id);
        locked.refresh.remove(id);
        if !locked.state.deregister(id) {
            return;
        }
        self.drive(&mut locked, Instant::now());
        self.publish_entities(&locked);
    }

    /// Stops sending requests to resolver `id` (it sent `Drain`): queued
    /// jobs wait for the entity's other resolvers; what it holds in flight
    /// is answered by it, or moved on when its stream ends.
    pub(crate) fn drain(&self, id: ResolverId) {
        self.lock().state.drain(id);
    }

    /// The fetch mode of `entity` on a local resolver.
    pub(crate) fn fetch_mode(&self, entity: &str) -> Option<FetchMode> {
        self.lock().state.fetch_mode(entity)
    }

    /// The refresh interval (ms) of `entity` on local resolvers: the
    /// smallest one its streams registered; `None`: none asked for one.
    pub(crate) fn refresh_interval(&self, entity: &str) -> Option<u32> {
        self.lock().refresh.of(entity)
    }

    /// Every entity local resolvers registered with a refresh interval.
    pub(crate) fn refresh_intervals(&self) -> HashMap<Arc<str>, u32> {
        self.lock().refresh.all()
    }
}

/// Jobs: resolves, joins and answers.
impl ResolverPool {
    /// Resolves `key` for `secret` on a local resolver; waits for the
    /// answer (or its failure). `shared`: a SHARED change resolve, whose rows
    /// go to every subscriber (sent as `ResolveRequest.shared`).
    pub(crate) async fn resolve(
        &self,
        key: &Key,
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
        key: &Key,
        secret: Arc<str>,
        shared: bool,
        may_join: bool,
    ) -> Resolved {
        self.submit(key, secret, Reason::Subscribe, shared, may_join)
            .await
    }

    async fn submit(
        &self,
        key: &Key,
        secret: Arc<str>,
        reason: Reason,
        shared: bool,
        may_join: bool,
    ) -> Resolved {
        let (reply, answer) = oneshot::channel();
        {
            let mut locked = self.lock();
            let job = NewJob {
                key: key.clone(),
                secret,
                reason,
                shared,
                may_join,
            };
            let now = Instant::now();
            match locked.state.submit(job, reply, now) {
                Submitted::Joined => Metrics::inc(&self.inner.metrics.resolve_joined_total),
                Submitted::Queued => self.drive(&mut locked, now),
                Submitted::Refused(err) => return Err(err),
            }
        }
        answer.await.unwrap_or(Err(ResolveError::Closed))
    }

    /// A change of `key` was seen: subscribe requests of it already in
    /// flight may have read the rows before the change, so no later
    /// subscribe joins them.
    pub(crate) fn note_change(&self, key: &Key) {
        // Always under the lock, never skipped on a lock-free hint: the
        // request a joiner finds must be one this call has seen.
        self.lock().state.note_change(key);
    }

    /// Whether a subscribe request of `key` for `secret` is in flight and
    /// joinable now.
    pub(crate) fn can_join(&self, key: &Key, secret: &str, shared: bool) -> bool {
        self.lock().state.can_join(key, secret, shared)
    }

    /// Any key may have changed (the bus lost changes): no subscribe request
    /// in flight is joined.
    pub(crate) fn note_all_changed(&self) {
        self.lock().state.note_all_changed();
    }

    /// Hands the answer of `request_id` (from resolver `from`) to its jobs.
    /// `results` are the response's key results, already interpreted.
    pub(crate) fn complete(
        &self,
        from: ResolverId,
        request_id: u64,
        results: HashMap<String, Resolved>,
    ) {
        let mut locked = self.lock();
        match locked.state.complete(from, request_id, &results) {
            Completion::Done => self.drive(&mut locked, Instant::now()),
            Completion::Unknown => tracing::debug!(
                resolver.id = from,
                request_id,
                "answer to an unknown or expired request"
            ),
            Completion::OtherStream => tracing::warn!(
                resolver.id = from,
                request_id,
                "answer to a request of another stream, ignored"
            ),
        }
    }
}

/// Deadlines, pass-through, counts and shutdown.
impl ResolverPool {
    /// Re-queues (or fails, after [`MAX_ATTEMPTS`]) requests past their
    /// deadline, and fails queued jobs that waited too long.
    pub(crate) fn expire(&self, now: Instant) {
        let mut locked = self.lock();
        locked.state.expire(now);
        self.drive(&mut locked, now);
    }

    /// Runs [`Self::expire`] whenever the earliest deadline falls due,
    /// until the node shuts down.
    async fn run_deadlines(self, tasks: Tasks) {
        loop {
            let next = {
                let mut locked = self.lock();
                locked.armed = locked.state.next_deadline();
                locked.armed
            };
            let due = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tasks.cancelled() => return,
                _ = self.inner.rearm.notified() => {}
                _ = due => self.expire(Instant::now()),
            }
        }
    }

    /// Forwards a client's pass-through message to one resolver per distinct
    /// name among those that asked for them. Returns how many got it.
    pub(crate) fn pass_through(&self, connection_id: &str, secret: &str, payload: Bytes) -> usize {
        let mut locked = self.lock();
        let (turn, groups) = locked.state.pass_through_targets();
        let mut sent = 0;
        for replicas in groups {
            let mut replicas: Vec<(&mpsc::Sender<StreamItem>, usize)> = replicas
                .iter()
                .filter_map(|r| locked.streams.get(&r.id).map(|tx| (tx, r.reserved)))
                .collect();
            if replicas.is_empty() {
                continue;
            }
            replicas.sort_by_key(|(tx, _)| tx.capacity());
            // Prefer a replica with room; rotate among equals.
            let start = turn % replicas.len();
            let chosen = (0..replicas.len())
                .map(|i| replicas[(start + i) % replicas.len()])
                .find(|(tx, reserved)| tx.capacity() > *reserved);
            let Some((tx, _)) = chosen else { continue };
            let message = NodeMessage {
                kind: Some(node_message::Kind::PassThrough(PassThrough {
                    connection_id: connection_id.to_string(),
                    secret: secret.to_string(),
                    payload: payload.clone(),
                })),
            };
            if tx.try_send(Ok(message)).is_ok() {
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
        self.lock().state.has_pass_through()
    }

    /// Registered streams per name (`Register.name`), for the metrics.
    pub(crate) fn streams_by_name(&self) -> Vec<(Arc<str>, usize)> {
        self.lock().state.streams_by_name()
    }

    /// Registered streams.
    pub(crate) fn resolver_count(&self) -> usize {
        self.lock().state.resolver_count()
    }

    /// Shutdown: fails every job and drops every stream's channel, which ends
    /// the response streams.
    pub(crate) fn close(&self) {
        let mut locked = self.lock();
        locked.state.close();
        locked.streams.clear();
        locked.refresh.clear();
        self.inner.entities.send_replace(Vec::new());
        self.drive(&mut locked, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proto::v1::{EntityRegistration, ResolveRequest};
    use crate::resolving::pool::wire::ok;

    fn pool(batch_size: usize) -> ResolverPool {
        ResolverPool::new(
            &ResolveConfig {
                batch_size,
                timeout: Duration::from_secs(5),
                default_max_in_flight: 1,
                max_resolver_streams: 4,
                cache_max_bytes: 0,
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
                refresh_interval_ms: 0,
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
        while pool.lock().state.queued("items") < n {
            tokio::task::yield_now().await;
        }
    }

    fn key(id: &str) -> Key {
        Key::new("items", id).unwrap()
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
                pool.resolve_subscribe(&key(id), Arc::from(secret), false, may_join)
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
        assert!(pool.lock().state.no_joins());
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
                cache_max_bytes: 0,
            },
            Arc::new(Metrics::default()),
        );
        let reg = Register {
            name: "svc".into(),
            entities: vec![EntityRegistration {
                entity: "items".into(),
                fetch_mode: FetchMode::PerSubscriber as i32,
                refresh_interval_ms: 0,
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
        assert!(pool.lock().state.no_joins());
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
        assert!(pool.lock().state.no_joins());
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
                &Key::new("nope", "1").unwrap(),
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
                refresh_interval_ms: 0,
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

    fn register_message(entities: usize, duplicate: bool) -> Register {
        let mut entities: Vec<EntityRegistration> = (0..entities)
            .map(|i| EntityRegistration {
                entity: format!("e{i}"),
                fetch_mode: FetchMode::Shared as i32,
                refresh_interval_ms: 0,
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

    /// Deadlines sit on a timer: answered requests leave it at once, and
    /// an expiry takes only what is due.
    #[tokio::test]
    async fn only_unanswered_requests_expire_and_answered_ones_leave_the_deadlines() {
        let pool = pool(1);
        // Room for three requests at once, one id each (batch size 1).
        let reg = Register {
            name: "svc".into(),
            entities: vec![EntityRegistration {
                entity: "items".into(),
                fetch_mode: FetchMode::Shared as i32,
                refresh_interval_ms: 0,
            }],
            pass_through: false,
            max_in_flight: 3,
        };
        let (tx, mut rx) = mpsc::channel(pool.channel_capacity(&reg));
        let rid = pool.allocate_id();
        pool.register(rid, &reg, tx).unwrap();
        let tasks = spawn_resolves(&pool, &[("1", true), ("2", true), ("3", true)]).await;
        let sent: Vec<ResolveRequest> = (0..3).map(|_| request(&mut rx)).collect();
        assert_eq!(pool.lock().state.timer_count(), 3);
        // The first two are answered; the third is not.
        for request in &sent[..2] {
            let id = request.ids[0].clone();
            pool.complete(rid, request.request_id, HashMap::from([(id, ok(&["1"]))]));
        }
        assert_eq!(pool.lock().state.timer_count(), 1, "answered: gone");
        // Not yet due: nothing expires.
        pool.expire(Instant::now());
        assert!(rx.try_recv().is_err());
        assert_eq!(pool.lock().state.timer_count(), 1);
        // Due: the third is retried (sent again).
        pool.expire(Instant::now() + Duration::from_secs(5) + Duration::from_millis(1));
        let retried = request(&mut rx);
        assert_eq!(retried.ids, ["3"]);
        assert_ne!(retried.request_id, sent[2].request_id);
        assert_eq!(
            pool.lock().state.timer_count(),
            1,
            "only the retry's deadline"
        );
        assert_eq!(pool.inner.metrics.resolve_timeouts_total.load(Relaxed), 1);
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
        assert!(pool.lock().state.queued("items") == 0);
        first.abort();
    }

    /// The timer task sleeps until the earliest deadline the state reports
    /// and is woken when an earlier one is set (none was at its start).
    #[tokio::test]
    async fn the_deadline_timer_retries_and_then_times_out() {
        let tasks = Tasks::default();
        let config = ResolveConfig {
            batch_size: 10,
            timeout: Duration::from_millis(40),
            default_max_in_flight: 1,
            max_resolver_streams: 4,
            cache_max_bytes: 0,
        };
        let pool = ResolverPool::start(&config, Arc::new(Metrics::default()), &tasks);
        let (_rid, mut rx) = register(&pool, "svc", FetchMode::Shared);
        let started = Instant::now();
        let outcome = pool
            .resolve(&key("1"), Arc::from(""), Reason::Change, true)
            .await;
        assert!(matches!(outcome, Err(ResolveError::Timeout)));
        assert!(started.elapsed() >= Duration::from_millis(40) * MAX_ATTEMPTS);
        let mut attempts = 0;
        while let Ok(Ok(_)) = rx.try_recv() {
            attempts += 1;
        }
        assert_eq!(attempts, MAX_ATTEMPTS, "sent once per attempt");
        assert_eq!(pool.lock().state.timer_count(), 0);
        tasks.token().cancel();
    }

    #[tokio::test]
    async fn a_closed_channel_hands_its_requests_to_another_stream() {
        let pool = pool(10);
        let (a, rx_a) = register(&pool, "svc", FetchMode::Shared);
        let (b, mut rx_b) = register(&pool, "svc", FetchMode::Shared);
        // Stream `a` ends before it deregisters.
        drop(rx_a);
        let mut tasks = Vec::new();
        for id in ["1", "2"] {
            tasks.extend(spawn_resolves(&pool, &[(id, true)]).await);
            // `b` has room for one request at a time.
            let req = request(&mut rx_b);
            assert_eq!(req.ids, [id]);
            let results = HashMap::from([(id.to_string(), ok(&["{}"]))]);
            pool.complete(b, req.request_id, results);
        }
        for task in tasks {
            assert!(task.await.unwrap().is_ok());
        }
        pool.deregister(a);
        assert_eq!(pool.resolver_count(), 1);
    }

    #[tokio::test]
    async fn close_fails_every_job_and_refuses_new_ones() {
        let pool = pool(10);
        let (_rid, mut rx) = register(&pool, "svc", FetchMode::Shared);
        let tasks = spawn_resolves(&pool, &[("1", true), ("2", true)]).await;
        wait_queued(&pool, 1).await;
        let _sent = request(&mut rx);
        pool.close();
        for task in tasks {
            assert!(matches!(task.await.unwrap(), Err(ResolveError::Closed)));
        }
        assert!(rx.recv().await.is_none(), "the stream's channel is dropped");
        assert!(pool.watch_entities().borrow().is_empty());
        let again = pool
            .resolve(&key("1"), Arc::from(""), Reason::Change, true)
            .await;
        assert!(matches!(again, Err(ResolveError::Closed)));
        let (tx, _rx) = mpsc::channel(1);
        let refused = pool.register(9, &register_message(1, false), tx);
        assert!(matches!(refused, Err(RegisterError::Closed)));
    }
}
