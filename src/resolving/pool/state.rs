//! The pool's bookkeeping as a synchronous state machine.
//!
//! [`PoolState`] holds the queues, the requests in flight, the single-flight
//! joins and the deadlines, and does no I/O: the time comes in as arguments,
//! and what must happen comes out of [`PoolState::poll`] as [`Effect`]s
//! (send this request on that stream, hand this outcome to that caller). A
//! caller is an opaque [`Waiter`] the state only asks whether anyone still
//! waits on it. The async shell in the parent module owns the channels and
//! the clock and drives it.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    error::{RegisterError, ResolveError},
    joins::Joinable,
    timers::{Timer, Timers},
    wire::Resolved,
};
use crate::{
    config::ResolveConfig,
    key::ChangeKey,
    proto::v1::{FetchMode, Reason, ResolveRequest},
};

/// Identifies one `Resolve` stream within a node.
pub(crate) type ResolverId = u64;

/// Attempts of one job (deadline passes) before it fails with `Timeout`.
pub(crate) const MAX_ATTEMPTS: u32 = 3;
/// Queued jobs examined for companions when building one request.
const BATCH_SCAN_LIMIT: usize = 1024;

/// Whoever waits for a job's outcome.
pub(crate) trait Waiter {
    /// Nobody waits any more (the caller went away): the job is dropped
    /// instead of sent.
    fn is_gone(&self) -> bool;
}

/// What the state asks its driver to do, in order.
#[derive(Debug)]
pub(crate) enum Effect<W> {
    /// Send `request` on stream `to`. If it cannot be sent, the driver
    /// reports it with [`PoolState::send_failed`] before polling again.
    Send {
        to: ResolverId,
        request: ResolveRequest,
    },
    /// Hand `outcome` to `waiter`.
    Complete { waiter: W, outcome: Resolved },
    /// Something timed out (counted; its jobs' outcomes follow).
    Expired(Expiry),
}

/// What timed out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Expiry {
    /// A queued job waited as long as it may and fails with `Timeout`.
    Queued,
    /// A request in flight passed its deadline: its jobs are retried.
    Request {
        resolver: ResolverId,
        request_id: u64,
        entity: Arc<str>,
    },
}

/// Why a [`Effect::Send`] could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendFailure {
    /// The stream's channel is full: the entity's jobs wait for the next
    /// completion or job.
    Full,
    /// The stream is ending: it gets no more requests until it deregisters.
    Closed,
}

/// What became of a submitted job.
#[derive(Debug)]
pub(crate) enum Submitted {
    /// It joined a subscribe request already in flight.
    Joined,
    /// It waits in its entity's queue (or is being sent).
    Queued,
    /// It was refused at once.
    Refused(ResolveError),
}

/// What an answer was to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    /// A request of the stream in flight: its jobs are answered.
    Done,
    /// An unknown request, or one that expired or moved meanwhile.
    Unknown,
    /// A request of another stream (ignored).
    OtherStream,
}

/// A job to submit: resolve `key` for `secret`.
pub(crate) struct NewJob {
    pub(crate) key: ChangeKey,
    pub(crate) secret: Arc<str>,
    pub(crate) reason: Reason,
    /// A SHARED change resolve (`ResolveRequest.shared`).
    pub(crate) shared: bool,
    /// May join a subscribe request of the same key and secret in flight.
    pub(crate) may_join: bool,
}

/// A stream to register (its `Register`, checked).
pub(crate) struct NewStream {
    pub(crate) name: Arc<str>,
    pub(crate) entities: Vec<(Arc<str>, FetchMode)>,
    pub(crate) max_in_flight: u32,
    pub(crate) pass_through: bool,
}

/// A stream that may get a pass-through message, and how much of its
/// channel must stay free for the requests it may still be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Replica {
    pub(crate) id: ResolverId,
    pub(crate) reserved: usize,
}

struct Job<W> {
    id: Arc<str>,
    secret: Arc<str>,
    reason: Reason,
    shared: bool,
    waiter: W,
    attempts: u32,
    /// A job waiting this long (queued or in flight, over its attempts)
    /// fails with `Timeout`: a queue whose resolvers never have room does
    /// not hold callers forever.
    give_up: Instant,
    /// Names the job's give-up timer.
    serial: u64,
}

struct InFlight<W> {
    resolver: ResolverId,
    entity: Arc<str>,
    jobs: Vec<Job<W>>,
    /// A subscribe request listed in `joinable` (for its ids and secret).
    joinable: bool,
    deadline: Instant,
}

struct Slot {
    name: Arc<str>,
    in_flight: u32,
    max_in_flight: u32,
    pass_through: bool,
    entities: Vec<Arc<str>>,
    /// The backend sent `Drain`: it answers what it holds, gets nothing new.
    draining: bool,
    /// Its requests in flight.
    requests: BTreeSet<u64>,
}

struct EntityQueue<W> {
    mode: FetchMode,
    resolvers: Vec<ResolverId>,
    next: usize,
    queue: VecDeque<Job<W>>,
}

fn give_up_timer<W>(entity: &Arc<str>, job: &Job<W>) -> Timer {
    Timer::GiveUp {
        entity: entity.clone(),
        job: job.serial,
    }
}

impl<W> EntityQueue<W> {
    /// Queues `job` last; its give-up timer runs while it waits.
    fn push_back(&mut self, entity: &Arc<str>, job: Job<W>, timers: &mut Timers) {
        timers.insert(job.give_up, give_up_timer(entity, &job));
        self.queue.push_back(job);
    }

    /// Puts `jobs` back in front, in their order.
    fn push_front(&mut self, entity: &Arc<str>, jobs: Vec<Job<W>>, timers: &mut Timers) {
        for job in jobs.into_iter().rev() {
            timers.insert(job.give_up, give_up_timer(entity, &job));
            self.queue.push_front(job);
        }
    }

    /// Takes the job at `index` out of the queue (and its timer).
    fn take(&mut self, index: usize, entity: &Arc<str>, timers: &mut Timers) -> Option<Job<W>> {
        let job = self.queue.remove(index)?;
        timers.remove(job.give_up, give_up_timer(entity, &job));
        Some(job)
    }
}

/// The pool's state: see the module's documentation.
pub(crate) struct PoolState<W> {
    batch_size: usize,
    timeout: Duration,
    max_streams: usize,
    resolvers: HashMap<ResolverId, Slot>,
    entities: HashMap<Arc<str>, EntityQueue<W>>,
    in_flight: HashMap<u64, InFlight<W>>,
    timers: Timers,
    joinable: Joinable,
    /// Entities whose queues may have jobs to send, in the order they
    /// became so; [`PoolState::poll`] sends from the first until it can't.
    dirty: VecDeque<Arc<str>>,
    dirty_set: HashSet<Arc<str>>,
    /// Outcomes and expiries, handed out before any request.
    effects: VecDeque<Effect<W>>,
    next_request: u64,
    next_job: u64,
    pass_through_turn: usize,
    closed: bool,
}

impl<W: Waiter> PoolState<W> {
    pub(crate) fn new(config: &ResolveConfig) -> Self {
        Self {
            batch_size: config.batch_size,
            timeout: config.timeout,
            max_streams: config.max_resolver_streams,
            resolvers: HashMap::new(),
            entities: HashMap::new(),
            in_flight: HashMap::new(),
            timers: Timers::default(),
            joinable: Joinable::default(),
            dirty: VecDeque::new(),
            dirty_set: HashSet::new(),
            effects: VecDeque::new(),
            next_request: 1,
            next_job: 1,
            pass_through_turn: 0,
            closed: false,
        }
    }

    /// The next thing to do, if any; call until `None` after every other
    /// call. `now` dates the deadlines of the requests it sends.
    pub(crate) fn poll(&mut self, now: Instant) -> Option<Effect<W>> {
        if let Some(effect) = self.effects.pop_front() {
            return Some(effect);
        }
        while let Some(entity) = self.dirty.front().cloned() {
            if let Some(send) = self.next_request(&entity, now) {
                return Some(send);
            }
            self.dirty.pop_front();
            self.dirty_set.remove(&entity);
        }
        None
    }

    /// When [`Self::expire`] has something to do next.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.next()
    }

    fn mark(&mut self, entity: &Arc<str>) {
        if self.dirty_set.insert(entity.clone()) {
            self.dirty.push_back(entity.clone());
        }
    }

    fn unmark(&mut self, entity: &Arc<str>) {
        if self.dirty_set.remove(entity) {
            self.dirty.retain(|e| e != entity);
        }
    }

    /// Queues a job (or joins it to a request in flight); its outcome comes
    /// out as an [`Effect::Complete`] for `waiter`.
    pub(crate) fn submit(&mut self, new: NewJob, waiter: W, now: Instant) -> Submitted {
        if self.closed {
            return Submitted::Refused(ResolveError::Closed);
        }
        let job = Job {
            id: new.key.id.clone(),
            secret: new.secret,
            reason: new.reason,
            shared: new.shared,
            waiter,
            attempts: 0,
            give_up: now + self.timeout * MAX_ATTEMPTS,
            serial: self.next_job,
        };
        self.next_job += 1;
        if new.may_join
            && let Some(request) = self.joinable.find(&new.key, &job.secret)
            && let Some(flight) = self.in_flight.get_mut(&request)
        {
            flight.jobs.push(job);
            return Submitted::Joined;
        }
        let Some(queue) = self.entities.get_mut(&*new.key.entity) else {
            return Submitted::Refused(ResolveError::NoResolver);
        };
        queue.push_back(&new.key.entity, job, &mut self.timers);
        self.mark(&new.key.entity);
        Submitted::Queued
    }

    /// Builds the next request of `entity`, if a job waits and a resolver
    /// has room, and counts it in flight.
    fn next_request(&mut self, entity: &Arc<str>, now: Instant) -> Option<Effect<W>> {
        let queue = self.entities.get_mut(entity)?;
        // Jobs whose caller went away (client disconnected) are dropped.
        while queue.queue.front().is_some_and(|j| j.waiter.is_gone()) {
            queue.take(0, entity, &mut self.timers);
        }
        let count = queue.resolvers.len();
        if queue.queue.is_empty() || count == 0 {
            return None;
        }
        // When every resolver is at capacity the jobs wait here and batch up.
        let turn = (0..count).find(|i| {
            let id = queue.resolvers[(queue.next + i) % count];
            self.resolvers
                .get(&id)
                .is_some_and(|s| !s.draining && s.in_flight < s.max_in_flight)
        })?;
        let resolver = queue.resolvers[(queue.next + turn) % count];
        queue.next = (queue.next + turn + 1) % count;

        let first = queue.take(0, entity, &mut self.timers).expect("not empty");
        let (secret, reason, shared) = (first.secret.clone(), first.reason, first.shared);
        let mut ids: Vec<String> = vec![first.id.to_string()];
        let mut jobs = vec![first];
        // Look for companions among the next jobs only, so a long queue of
        // distinct secrets costs O(queue) per request, not O(queue²).
        let (mut i, mut scanned) = (0, 0);
        while i < queue.queue.len() && ids.len() < self.batch_size && scanned < BATCH_SCAN_LIMIT {
            scanned += 1;
            let job = &queue.queue[i];
            // One request carries one secret, reason and `shared` flag.
            if job.reason != reason || job.secret != secret || job.shared != shared {
                i += 1;
                continue;
            }
            let job = queue
                .take(i, entity, &mut self.timers)
                .expect("index checked");
            if job.waiter.is_gone() {
                continue;
            }
            if !ids.iter().any(|id| **id == *job.id) {
                ids.push(job.id.to_string());
            }
            jobs.push(job);
        }

        let request_id = self.next_request;
        self.next_request += 1;
        let slot = self.resolvers.get_mut(&resolver).expect("found above");
        slot.in_flight += 1;
        slot.requests.insert(request_id);
        // A subscribe request (never a change's: those carry their own
        // reason to the backend) is one later local subscribes of its keys
        // and secret may join.
        let joinable = reason == Reason::Subscribe && !shared;
        if joinable {
            for (i, job) in jobs.iter().enumerate() {
                if jobs[..i].iter().any(|j| j.id == job.id) {
                    continue;
                }
                let key = ChangeKey {
                    entity: entity.clone(),
                    id: job.id.clone(),
                };
                self.joinable.add(key, secret.clone(), request_id);
            }
        }
        let deadline = now + self.timeout;
        self.timers.insert(deadline, Timer::Request(request_id));
        self.in_flight.insert(
            request_id,
            InFlight {
                resolver,
                entity: entity.clone(),
                jobs,
                joinable,
                deadline,
            },
        );
        Some(Effect::Send {
            to: resolver,
            request: ResolveRequest {
                request_id,
                entity: entity.to_string(),
                ids,
                secret: secret.to_string(),
                reason: reason as i32,
                shared,
            },
        })
    }

    /// Takes request `request_id` out of the flight: its timer, its joins,
    /// its place on its stream.
    fn land(&mut self, request_id: u64) -> Option<InFlight<W>> {
        let flight = self.in_flight.remove(&request_id)?;
        self.timers
            .remove(flight.deadline, Timer::Request(request_id));
        if flight.joinable {
            let ids = flight.jobs.iter().map(|j| &j.id);
            self.joinable.forget(&flight.entity, ids, request_id);
        }
        if let Some(slot) = self.resolvers.get_mut(&flight.resolver) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
            slot.requests.remove(&request_id);
        }
        Some(flight)
    }

    /// The request last polled could not be sent: its jobs go back to the
    /// front of their queue.
    pub(crate) fn send_failed(&mut self, request_id: u64, failure: SendFailure) {
        let Some(flight) = self.land(request_id) else {
            return;
        };
        match failure {
            // Wait for the next completion or job to try again.
            SendFailure::Full => self.unmark(&flight.entity),
            // The stream will deregister (moving its requests in flight);
            // meanwhile the entity's other resolvers are tried.
            SendFailure::Closed => {
                if let Some(slot) = self.resolvers.get_mut(&flight.resolver) {
                    slot.in_flight = slot.max_in_flight;
                }
            }
        }
        if let Some(queue) = self.entities.get_mut(&flight.entity) {
            queue.push_front(&flight.entity, flight.jobs, &mut self.timers);
        }
    }

    /// Hands the answer of `request_id` (from stream `from`) to its jobs.
    /// `results` are the response's key results, already interpreted.
    pub(crate) fn complete(
        &mut self,
        from: ResolverId,
        request_id: u64,
        results: &HashMap<String, Resolved>,
    ) -> Completion {
        match self.in_flight.get(&request_id) {
            None => return Completion::Unknown,
            Some(flight) if flight.resolver != from => return Completion::OtherStream,
            Some(_) => {}
        }
        let flight = self.land(request_id).expect("checked above");
        for job in flight.jobs {
            // A batch may hold several jobs of one id (different callers):
            // each gets the same (cheaply cloned) outcome.
            let outcome = results
                .get(&*job.id)
                .cloned()
                .unwrap_or_else(|| Err(ResolveError::MissingResult(job.id.clone())));
            self.effects.push_back(Effect::Complete {
                waiter: job.waiter,
                outcome,
            });
        }
        self.mark(&flight.entity);
        Completion::Done
    }

    /// Fires the timers due at `now`: queued jobs that waited too long fail
    /// with `Timeout`; requests past their deadline are retried (their jobs
    /// back in front), or fail after [`MAX_ATTEMPTS`]. Timers set while
    /// doing so wait for the next call, after the retries were sent.
    pub(crate) fn expire(&mut self, now: Instant) {
        for timer in self.timers.pop_due(now) {
            match timer {
                Timer::GiveUp { entity, job } => self.give_up(&entity, job),
                Timer::Request(request_id) => self.retry(request_id),
            }
        }
    }

    fn give_up(&mut self, entity: &Arc<str>, serial: u64) {
        let Some(queue) = self.entities.get_mut(entity) else {
            return;
        };
        // Queues are in arrival order (jobs put back in front are older
        // still): the job is almost always the first.
        let Some(index) = queue.queue.iter().position(|j| j.serial == serial) else {
            return;
        };
        let job = queue.queue.remove(index).expect("found");
        self.effects.push_back(Effect::Expired(Expiry::Queued));
        self.effects.push_back(Effect::Complete {
            waiter: job.waiter,
            outcome: Err(ResolveError::Timeout),
        });
    }

    fn retry(&mut self, request_id: u64) {
        let Some(flight) = self.land(request_id) else {
            return;
        };
        self.effects.push_back(Effect::Expired(Expiry::Request {
            resolver: flight.resolver,
            request_id,
            entity: flight.entity.clone(),
        }));
        let Some(queue) = self.entities.get_mut(&flight.entity) else {
            for job in flight.jobs {
                self.effects.push_back(Effect::Complete {
                    waiter: job.waiter,
                    outcome: Err(ResolveError::NoResolver),
                });
            }
            return;
        };
        let mut again = Vec::with_capacity(flight.jobs.len());
        for mut job in flight.jobs {
            job.attempts += 1;
            if job.attempts >= MAX_ATTEMPTS {
                self.effects.push_back(Effect::Complete {
                    waiter: job.waiter,
                    outcome: Err(ResolveError::Timeout),
                });
            } else {
                again.push(job);
            }
        }
        queue.push_front(&flight.entity, again, &mut self.timers);
        self.mark(&flight.entity);
    }
}

impl<W: Waiter> PoolState<W> {
    /// Adds stream `id`, unless the pool is closed or full, or one of its
    /// entities is already served with another fetch mode.
    pub(crate) fn register(&mut self, id: ResolverId, new: NewStream) -> Result<(), RegisterError> {
        if self.closed {
            return Err(RegisterError::Closed);
        }
        if self.resolvers.len() >= self.max_streams {
            return Err(RegisterError::Full(format!(
                "this node holds its maximum of {} resolver streams (--max-resolver-streams)",
                self.max_streams
            )));
        }
        for (entity, mode) in &new.entities {
            if let Some(existing) = self.entities.get(entity)
                && existing.mode != *mode
            {
                return Err(RegisterError::Conflict(format!(
                    "entity {entity:?} is already served with fetch mode {}, not {}",
                    existing.mode.as_str_name(),
                    mode.as_str_name()
                )));
            }
        }
        for (entity, mode) in &new.entities {
            let queue = self
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
        let entities: Vec<Arc<str>> = new.entities.into_iter().map(|(e, _)| e).collect();
        // Jobs may be queued for these entities (a resolver came back).
        for entity in &entities {
            self.mark(entity);
        }
        self.resolvers.insert(
            id,
            Slot {
                name: new.name,
                in_flight: 0,
                max_in_flight: new.max_in_flight,
                pass_through: new.pass_through,
                entities,
                draining: false,
                requests: BTreeSet::new(),
            },
        );
        Ok(())
    }

    /// Removes stream `id`; its requests in flight go back to the front of
    /// their queues, for other resolvers; the queues of entities no
    /// resolver serves any more fail with `NoResolver`. False if unknown.
    pub(crate) fn deregister(&mut self, id: ResolverId) -> bool {
        let Some(slot) = self.resolvers.remove(&id) else {
            return false;
        };
        for entity in &slot.entities {
            if let Some(queue) = self.entities.get_mut(entity) {
                queue.resolvers.retain(|r| *r != id);
            }
        }
        // The newest first, so that the oldest ends up in front.
        for &request_id in slot.requests.iter().rev() {
            let Some(flight) = self.land(request_id) else {
                continue;
            };
            if let Some(queue) = self.entities.get_mut(&flight.entity) {
                queue.push_front(&flight.entity, flight.jobs, &mut self.timers);
            }
        }
        for entity in &slot.entities {
            let orphan = self
                .entities
                .get(entity)
                .is_some_and(|q| q.resolvers.is_empty());
            if !orphan {
                self.mark(entity);
                continue;
            }
            let queue = self.entities.remove(entity).expect("checked above");
            self.unmark(entity);
            for job in queue.queue {
                self.timers.remove(job.give_up, give_up_timer(entity, &job));
                self.effects.push_back(Effect::Complete {
                    waiter: job.waiter,
                    outcome: Err(ResolveError::NoResolver),
                });
            }
        }
        true
    }

    /// Stops sending requests to stream `id` (it sent `Drain`).
    pub(crate) fn drain(&mut self, id: ResolverId) {
        if let Some(slot) = self.resolvers.get_mut(&id) {
            slot.draining = true;
            slot.pass_through = false;
        }
    }

    /// Shutdown: every job fails with `Closed`, every stream is forgotten.
    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.resolvers.clear();
        for (_, queue) in self.entities.drain() {
            for job in queue.queue {
                self.effects.push_back(Effect::Complete {
                    waiter: job.waiter,
                    outcome: Err(ResolveError::Closed),
                });
            }
        }
        self.joinable.clear();
        self.timers.clear();
        self.dirty.clear();
        self.dirty_set.clear();
        for (_, flight) in self.in_flight.drain() {
            for job in flight.jobs {
                self.effects.push_back(Effect::Complete {
                    waiter: job.waiter,
                    outcome: Err(ResolveError::Closed),
                });
            }
        }
    }

    /// A change of `key` was seen: no later subscribe joins a request of
    /// it already in flight.
    pub(crate) fn note_change(&mut self, key: &ChangeKey) {
        self.joinable.changed(key);
    }

    /// Any key may have changed: no request in flight is joined.
    pub(crate) fn note_all_changed(&mut self) {
        self.joinable.clear();
    }

    /// Whether a subscribe request of `key` for `secret` may be joined now.
    pub(crate) fn can_join(&self, key: &ChangeKey, secret: &str) -> bool {
        self.joinable.find(key, secret).is_some()
    }

    /// The fetch mode of `entity`, if a stream serves it.
    pub(crate) fn fetch_mode(&self, entity: &str) -> Option<FetchMode> {
        self.entities.get(entity).map(|q| q.mode)
    }

    /// The entities served, sorted.
    pub(crate) fn served(&self) -> Vec<(Arc<str>, FetchMode)> {
        let mut entities: Vec<(Arc<str>, FetchMode)> = self
            .entities
            .iter()
            .map(|(e, q)| (e.clone(), q.mode))
            .collect();
        entities.sort();
        entities
    }

    /// The streams that asked for pass-through messages, grouped by name,
    /// and the turn to start each group's rotation at (one more per call).
    pub(crate) fn pass_through_targets(&mut self) -> (usize, Vec<Vec<Replica>>) {
        self.pass_through_turn = self.pass_through_turn.wrapping_add(1);
        let mut by_name: HashMap<&Arc<str>, Vec<Replica>> = HashMap::new();
        for (&id, slot) in self.resolvers.iter().filter(|(_, s)| s.pass_through) {
            let reserved = slot.max_in_flight - slot.in_flight.min(slot.max_in_flight);
            by_name.entry(&slot.name).or_default().push(Replica {
                id,
                reserved: reserved as usize,
            });
        }
        (self.pass_through_turn, by_name.into_values().collect())
    }

    /// Whether any stream wants pass-through messages.
    pub(crate) fn has_pass_through(&self) -> bool {
        self.resolvers.values().any(|s| s.pass_through)
    }

    /// Registered streams per name.
    pub(crate) fn streams_by_name(&self) -> Vec<(Arc<str>, usize)> {
        let mut counts: HashMap<&Arc<str>, usize> = HashMap::new();
        for slot in self.resolvers.values() {
            *counts.entry(&slot.name).or_default() += 1;
        }
        counts.into_iter().map(|(n, c)| (n.clone(), c)).collect()
    }

    /// Registered streams.
    pub(crate) fn resolver_count(&self) -> usize {
        self.resolvers.len()
    }
}

/// What tests look at.
#[cfg(test)]
impl<W> PoolState<W> {
    pub(crate) fn queued(&self, entity: &str) -> usize {
        self.entities.get(entity).map_or(0, |q| q.queue.len())
    }

    pub(crate) fn no_joins(&self) -> bool {
        self.joinable.is_empty()
    }

    pub(crate) fn timer_count(&self) -> usize {
        self.timers.len()
    }

    pub(crate) fn requests_in_flight(&self) -> usize {
        self.in_flight.len()
    }
}
