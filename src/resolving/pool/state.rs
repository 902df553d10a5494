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
    effects::{
        Completion, Effect, Expiry, NewJob, NewStream, Replica, ResolverId, SendFailure, Submitted,
        Waiter,
    },
    error::{RegisterError, ResolveError},
    joins::Joinable,
    queues::{EntityQueue, InFlight, Job, Slot, give_up_timer},
    timers::{Timer, Timers},
    wire::Resolved,
};
use crate::{
    config::ResolveConfig,
    key::Key,
    proto::v1::{FetchMode, Reason, ResolveRequest},
};

/// Attempts of one job (deadline passes) before it fails with `Timeout`.
pub(crate) const MAX_ATTEMPTS: u32 = 3;
/// Queued jobs examined for companions when building one request.
const BATCH_SCAN_LIMIT: usize = 1024;

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

/// Jobs in, requests out.
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
            && let Some(request) = self.joinable.find(&new.key, &job.secret, job.shared)
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
        // and secret (or shared flag) may join.
        let joinable = reason == Reason::Subscribe;
        if joinable {
            for (i, job) in jobs.iter().enumerate() {
                if jobs[..i].iter().any(|j| j.id == job.id) {
                    continue;
                }
                let key = Key {
                    entity: entity.clone(),
                    id: job.id.clone(),
                };
                self.joinable.add(key, secret.clone(), shared, request_id);
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
}

/// Answers, unsent requests and deadlines.
impl<W: Waiter> PoolState<W> {
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

/// Streams coming and going.
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
}

/// Single-flight joins, and what the shell reads.
impl<W: Waiter> PoolState<W> {
    /// A change of `key` was seen: no later subscribe joins a request of
    /// it already in flight.
    pub(crate) fn note_change(&mut self, key: &Key) {
        self.joinable.changed(key);
    }

    /// Any key may have changed: no request in flight is joined.
    pub(crate) fn note_all_changed(&mut self) {
        self.joinable.clear();
    }

    /// Whether a subscribe request of `key` for `secret` may be joined now.
    pub(crate) fn can_join(&self, key: &Key, secret: &str, shared: bool) -> bool {
        self.joinable.find(key, secret, shared).is_some()
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

#[cfg(test)]
mod tests {
    use std::{cell::Cell, rc::Rc};

    use super::*;
    use crate::resolving::pool::wire::Rows;

    /// A caller: a number to tell it by, and whether it went away.
    #[derive(Debug, Clone, Default)]
    struct Caller(u32, Rc<Cell<bool>>);

    impl Waiter for Caller {
        fn is_gone(&self) -> bool {
            self.1.get()
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(5);
    const SUB: Reason = Reason::Subscribe;
    const CHANGE: Reason = Reason::Change;

    /// What one round of polling asked for.
    #[derive(Debug, Default)]
    struct Out {
        sent: Vec<(ResolverId, ResolveRequest)>,
        done: Vec<(u32, Resolved)>,
        expired: Vec<Expiry>,
    }

    impl Out {
        fn ids(&self) -> Vec<Vec<String>> {
            self.sent.iter().map(|(_, r)| r.ids.clone()).collect()
        }

        fn done(&self) -> Vec<u32> {
            self.done.iter().map(|(n, _)| *n).collect()
        }
    }

    fn state(batch_size: usize) -> PoolState<Caller> {
        PoolState::new(&ResolveConfig {
            batch_size,
            timeout: TIMEOUT,
            default_max_in_flight: 1,
            max_resolver_streams: 4,
            cache_max_bytes: 0,
        })
    }

    fn stream(max_in_flight: u32) -> NewStream {
        NewStream {
            name: Arc::from("svc"),
            entities: vec![(Arc::from("items"), FetchMode::Shared)],
            max_in_flight,
            pass_through: false,
        }
    }

    fn key(id: &str) -> Key {
        Key::new("items", id).unwrap()
    }

    fn job(id: &str, secret: &str, reason: Reason, may_join: bool) -> NewJob {
        NewJob {
            key: key(id),
            secret: Arc::from(secret),
            reason,
            shared: false,
            may_join,
        }
    }

    /// Polls until nothing is left; every send succeeds.
    fn run(state: &mut PoolState<Caller>, now: Instant) -> Out {
        let mut out = Out::default();
        while let Some(effect) = state.poll(now) {
            match effect {
                Effect::Send { to, request } => out.sent.push((to, request)),
                Effect::Complete { waiter, outcome } => out.done.push((waiter.0, outcome)),
                Effect::Expired(expiry) => out.expired.push(expiry),
            }
        }
        out
    }

    /// Submits `new` for caller `n` and polls, as the shell does.
    fn push(state: &mut PoolState<Caller>, new: NewJob, caller: Caller, now: Instant) -> Out {
        state.submit(new, caller, now);
        run(state, now)
    }

    fn rows() -> Resolved {
        Ok(Rows {
            rows: Vec::new(),
            version: 0,
        })
    }

    /// Every id of `request` answered with no rows.
    fn answer(state: &mut PoolState<Caller>, from: ResolverId, request: &ResolveRequest) {
        let results = request.ids.iter().map(|id| (id.clone(), rows())).collect();
        assert_eq!(
            state.complete(from, request.request_id, &results),
            Completion::Done
        );
    }

    #[test]
    fn jobs_wait_for_capacity_and_then_batch() {
        let t0 = Instant::now();
        let mut state = state(10);
        state.register(1, stream(1)).unwrap();
        let mut out = Out::default();
        for (n, id) in ["1", "2", "3", "2"].into_iter().enumerate() {
            let caller = Caller(n as u32, Rc::default());
            out.sent
                .extend(push(&mut state, job(id, "", CHANGE, false), caller, t0).sent);
        }
        assert_eq!(out.ids(), [["1"]], "max_in_flight 1 holds the rest back");
        assert_eq!(state.queued("items"), 3);
        answer(&mut state, 1, &out.sent[0].1);
        let out = run(&mut state, t0);
        assert_eq!(out.done(), [0]);
        assert_eq!(
            out.ids(),
            [["2", "3"]],
            "queued jobs share one request, ids once"
        );
        answer(&mut state, 1, &out.sent[0].1);
        assert_eq!(run(&mut state, t0).done(), [1, 2, 3]);
        assert_eq!(state.timer_count(), 0, "nothing waits, no timer left");
    }

    #[test]
    fn a_request_carries_one_secret_reason_and_shared_flag_up_to_the_batch_size() {
        let t0 = Instant::now();
        let mut state = state(2);
        state.register(1, stream(1)).unwrap();
        let jobs = [
            ("0", "a", CHANGE, false),
            ("1", "a", CHANGE, false),
            ("2", "b", CHANGE, false),
            ("3", "a", SUB, false),
            ("4", "a", CHANGE, true),
            ("5", "a", CHANGE, false),
            ("6", "a", CHANGE, false),
        ];
        // The first is sent alone; the others queue behind it.
        let mut out = Out::default();
        for (n, (id, secret, reason, shared)) in jobs.into_iter().enumerate() {
            let mut new = job(id, secret, reason, false);
            new.shared = shared;
            let caller = Caller(n as u32, Rc::default());
            out.sent.extend(push(&mut state, new, caller, t0).sent);
        }
        let mut batches = Vec::new();
        while let Some((to, request)) = out.sent.pop() {
            batches.push((request.ids.clone(), request.secret.clone(), request.shared));
            answer(&mut state, to, &request);
            out = run(&mut state, t0);
        }
        let ids = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            batches,
            [
                (ids(&["0"]), "a".to_string(), false),
                (ids(&["1", "5"]), "a".to_string(), false),
                (ids(&["2"]), "b".to_string(), false),
                (ids(&["3"]), "a".to_string(), false),
                (ids(&["4"]), "a".to_string(), true),
                (ids(&["6"]), "a".to_string(), false),
            ]
        );
    }

    #[test]
    fn resolvers_take_turns_under_their_caps_and_a_draining_one_gets_nothing() {
        let t0 = Instant::now();
        let mut state = state(1);
        state.register(1, stream(1)).unwrap();
        state.register(2, stream(2)).unwrap();
        for n in 0..5 {
            state.submit(
                job(&n.to_string(), "", CHANGE, false),
                Caller(n, Rc::default()),
                t0,
            );
        }
        let out = run(&mut state, t0);
        let to: Vec<ResolverId> = out.sent.iter().map(|(to, _)| *to).collect();
        assert_eq!(to, [1, 2, 2], "in turn, while each has room");
        assert_eq!(state.queued("items"), 2);
        state.drain(2);
        answer(&mut state, 2, &out.sent[1].1);
        assert!(run(&mut state, t0).sent.is_empty(), "1 is full, 2 drains");
        answer(&mut state, 1, &out.sent[0].1);
        let next = run(&mut state, t0);
        assert_eq!(next.sent.len(), 1);
        assert_eq!(next.sent[0].0, 1);
        // The draining stream still answers what it holds.
        answer(&mut state, 2, &out.sent[2].1);
    }

    #[test]
    fn subscribes_join_a_request_in_flight_until_a_change_is_seen() {
        let t0 = Instant::now();
        let mut state = state(10);
        state.register(1, stream(8)).unwrap();
        let submit = |state: &mut PoolState<Caller>, n, new| {
            let submitted = state.submit(new, Caller(n, Rc::default()), t0);
            matches!(submitted, Submitted::Joined)
        };
        assert!(!submit(&mut state, 0, job("1", "s", SUB, true)));
        let first = run(&mut state, t0);
        assert!(state.can_join(&key("1"), "s", false));
        assert!(submit(&mut state, 1, job("1", "s", SUB, true)));
        // Another secret, no leave to join (as every change resolve): no join.
        assert!(!submit(&mut state, 2, job("1", "other", SUB, true)));
        assert!(!submit(&mut state, 3, job("1", "s", SUB, false)));
        assert!(!submit(&mut state, 4, job("1", "s", CHANGE, false)));
        let others = run(&mut state, t0);
        assert_eq!(others.sent.len(), 3);
        // A change of another key changes nothing; of the key, ends the joins.
        state.note_change(&key("2"));
        assert!(submit(&mut state, 5, job("1", "s", SUB, true)));
        state.note_change(&key("1"));
        assert!(!state.can_join(&key("1"), "s", false));
        assert!(!submit(&mut state, 6, job("1", "s", SUB, true)));
        let fresh = run(&mut state, t0);
        assert_eq!(fresh.sent.len(), 1);
        assert!(
            submit(&mut state, 7, job("1", "s", SUB, true)),
            "joins the fresh one"
        );
        state.note_all_changed();
        assert!(!submit(&mut state, 8, job("1", "s", SUB, true)));
        let last = run(&mut state, t0);
        assert_eq!(last.sent.len(), 1);

        answer(&mut state, 1, &first.sent[0].1);
        assert_eq!(run(&mut state, t0).done(), [0, 1, 5]);
        answer(&mut state, 1, &fresh.sent[0].1);
        let out = run(&mut state, t0);
        assert_eq!(out.done(), [6, 7]);
        for (to, request) in others.sent.iter().chain(&out.sent).chain(&last.sent) {
            answer(&mut state, *to, request);
        }
        run(&mut state, t0);
        assert!(state.no_joins());
        assert_eq!(state.requests_in_flight(), 0);
    }

    #[test]
    fn deadlines_expire_only_unanswered_requests_and_retry_them() {
        let t0 = Instant::now();
        let mut state = state(1);
        state.register(1, stream(3)).unwrap();
        for n in 0..3 {
            state.submit(
                job(&n.to_string(), "", CHANGE, false),
                Caller(n, Rc::default()),
                t0,
            );
        }
        let sent = run(&mut state, t0).sent;
        assert_eq!(state.next_deadline(), Some(t0 + TIMEOUT));
        for (to, request) in &sent[..2] {
            answer(&mut state, *to, request);
        }
        assert_eq!(state.timer_count(), 1, "answered requests leave the timer");
        state.expire(t0 + TIMEOUT - Duration::from_millis(1));
        assert!(run(&mut state, t0).expired.is_empty(), "not yet due");
        // Attempts 1 and 2 are retried, on the same stream (it has room).
        let mut now = t0;
        for attempt in 1..MAX_ATTEMPTS {
            now += TIMEOUT;
            state.expire(now);
            let out = run(&mut state, now);
            assert_eq!(out.expired.len(), 1, "attempt {attempt}");
            assert_eq!(out.ids(), [["2"]]);
            assert_eq!(state.next_deadline(), Some(now + TIMEOUT));
        }
        // The last attempt fails the job.
        now += TIMEOUT;
        state.expire(now);
        let out = run(&mut state, now);
        assert!(out.sent.is_empty());
        assert!(matches!(out.done[..], [(2, Err(ResolveError::Timeout))]));
        assert_eq!(state.next_deadline(), None);
    }

    #[test]
    fn a_queued_job_gives_up_at_its_own_deadline() {
        let t0 = Instant::now();
        let mut state = state(10);
        state.register(1, stream(1)).unwrap();
        let sent = push(
            &mut state,
            job("1", "", CHANGE, false),
            Caller::default(),
            t0,
        )
        .sent;
        let t1 = t0 + Duration::from_secs(1);
        // Another secret: never batched with the first's retries.
        push(
            &mut state,
            job("2", "other", CHANGE, false),
            Caller(1, Rc::default()),
            t1,
        );
        assert_eq!(sent.len(), 1);
        assert_eq!(state.timer_count(), 2, "the request's and the queued job's");
        // Retries of the first keep the second queued behind max_in_flight.
        let give_up = t1 + TIMEOUT * MAX_ATTEMPTS;
        let before = give_up - Duration::from_millis(1);
        state.expire(before);
        let out = run(&mut state, before);
        assert!(out.done.is_empty(), "not the second yet");
        assert_eq!(out.ids(), [["1"]], "the first is retried");
        assert_eq!(state.queued("items"), 1);
        state.expire(give_up);
        let out = run(&mut state, give_up);
        assert_eq!(out.expired, [Expiry::Queued]);
        assert!(matches!(out.done[..], [(1, Err(ResolveError::Timeout))]));
        assert_eq!(state.queued("items"), 0);
    }

    #[test]
    fn a_dead_stream_hands_its_requests_and_joiners_to_another() {
        let t0 = Instant::now();
        let mut state = state(10);
        let mut per_subscriber = stream(2);
        per_subscriber.entities[0].1 = FetchMode::PerSubscriber;
        state.register(1, per_subscriber).unwrap();
        state.submit(job("1", "s", SUB, true), Caller(0, Rc::default()), t0);
        state.submit(job("2", "t", SUB, true), Caller(1, Rc::default()), t0);
        assert_eq!(run(&mut state, t0).sent.len(), 2);
        assert!(matches!(
            state.submit(job("1", "s", SUB, true), Caller(2, Rc::default()), t0),
            Submitted::Joined
        ));
        let mut other = stream(1);
        other.entities[0].1 = FetchMode::PerSubscriber;
        state.register(2, other).unwrap();
        assert!(state.deregister(1));
        assert!(!state.deregister(1), "once");
        assert!(
            !state.can_join(&key("1"), "s", false),
            "moved requests start over"
        );
        // The oldest request first; the joiner rides with it, its id once.
        let out = run(&mut state, t0);
        assert_eq!(out.ids(), [["1"]]);
        assert_eq!(out.sent[0].0, 2);
        answer(&mut state, 2, &out.sent[0].1);
        let out = run(&mut state, t0);
        assert_eq!(out.done(), [0, 2]);
        assert_eq!(out.ids(), [["2"]]);
        // The last resolver goes: what waits fails with NoResolver.
        state.submit(job("3", "s", SUB, false), Caller(3, Rc::default()), t0);
        assert!(state.deregister(2));
        let out = run(&mut state, t0);
        let failed: Vec<_> = out
            .done
            .iter()
            .map(|(n, r)| (*n, r.as_ref().err().map(|e| e.kind())))
            .collect();
        use crate::resolving::pool::error::ResolveErrorKind::NoResolver;
        assert_eq!(failed, [(1, Some(NoResolver)), (3, Some(NoResolver))]);
        assert_eq!(state.fetch_mode("items"), None);
        assert_eq!(state.timer_count(), 0);
        assert!(matches!(
            state.submit(job("1", "s", SUB, false), Caller(4, Rc::default()), t0),
            Submitted::Refused(ResolveError::NoResolver)
        ));
    }

    #[test]
    fn unsent_requests_go_back_in_front() {
        let t0 = Instant::now();
        let mut state = state(1);
        state.register(1, stream(2)).unwrap();
        state.register(2, stream(2)).unwrap();
        for n in 0..2 {
            state.submit(
                job(&n.to_string(), "", CHANGE, false),
                Caller(n, Rc::default()),
                t0,
            );
        }
        // A full channel: the entity waits for the next event.
        let Some(Effect::Send { to: 1, request }) = state.poll(t0) else {
            panic!("a request to 1 expected");
        };
        state.send_failed(request.request_id, SendFailure::Full);
        assert!(state.poll(t0).is_none());
        assert_eq!(state.queued("items"), 2);
        assert_eq!(state.timer_count(), 2, "both queued, both timed");
        // A closed channel: the next resolver is tried at once.
        state.submit(job("2", "", CHANGE, false), Caller(2, Rc::default()), t0);
        let Some(Effect::Send { to: 2, request }) = state.poll(t0) else {
            panic!("a request to 2 expected");
        };
        assert_eq!(request.ids, ["0"]);
        state.send_failed(request.request_id, SendFailure::Closed);
        let out = run(&mut state, t0);
        let sent: Vec<_> = out
            .sent
            .iter()
            .map(|(to, r)| (*to, r.ids[0].as_str()))
            .collect();
        assert_eq!(sent, [(1, "0"), (1, "1")], "in order, never to 2 again");
        assert_eq!(state.queued("items"), 1);
    }

    #[test]
    fn callers_that_went_away_are_not_sent() {
        let t0 = Instant::now();
        let mut state = state(10);
        state.register(1, stream(1)).unwrap();
        let gone = Rc::new(Cell::new(false));
        let first = push(
            &mut state,
            job("0", "", CHANGE, false),
            Caller::default(),
            t0,
        );
        push(
            &mut state,
            job("1", "", CHANGE, false),
            Caller(1, gone.clone()),
            t0,
        );
        push(
            &mut state,
            job("2", "", CHANGE, false),
            Caller(2, gone.clone()),
            t0,
        );
        push(
            &mut state,
            job("3", "", CHANGE, false),
            Caller(3, Rc::default()),
            t0,
        );
        gone.set(true);
        answer(&mut state, 1, &first.sent[0].1);
        let out = run(&mut state, t0);
        assert_eq!(out.ids(), [["3"]]);
        assert_eq!(state.queued("items"), 0);
        assert_eq!(state.timer_count(), 1, "only the request's");
    }

    #[test]
    fn answers_from_elsewhere_and_missing_results() {
        let t0 = Instant::now();
        let mut state = state(10);
        state.register(1, stream(1)).unwrap();
        state.register(2, stream(1)).unwrap();
        state.submit(job("1", "", CHANGE, false), Caller(0, Rc::default()), t0);
        let out = run(&mut state, t0);
        let (to, request) = &out.sent[0];
        let none = HashMap::new();
        assert_eq!(
            state.complete(3 - to, request.request_id, &none),
            Completion::OtherStream
        );
        assert_eq!(state.complete(*to, 999, &none), Completion::Unknown);
        assert_eq!(
            state.complete(*to, request.request_id, &none),
            Completion::Done
        );
        assert_eq!(
            state.complete(*to, request.request_id, &none),
            Completion::Unknown
        );
        let out = run(&mut state, t0);
        assert!(
            matches!(&out.done[..], [(0, Err(ResolveError::MissingResult(id)))] if &**id == "1")
        );
    }

    #[test]
    fn registers_are_refused_when_full_conflicting_or_closed() {
        let mut state = state(10);
        state.register(1, stream(1)).unwrap();
        let mut conflict = stream(1);
        conflict.entities[0].1 = FetchMode::PerSubscriber;
        let Err(RegisterError::Conflict(m)) = state.register(2, conflict) else {
            panic!("a conflict expected");
        };
        assert_eq!(
            m,
            "entity \"items\" is already served with fetch mode FETCH_MODE_SHARED, not FETCH_MODE_PER_SUBSCRIBER"
        );
        for id in 2..5 {
            state.register(id, stream(1)).unwrap();
        }
        let Err(RegisterError::Full(m)) = state.register(5, stream(1)) else {
            panic!("full expected");
        };
        assert_eq!(
            m,
            "this node holds its maximum of 4 resolver streams (--max-resolver-streams)"
        );
        assert_eq!(state.served(), [(Arc::from("items"), FetchMode::Shared)]);
        assert_eq!(state.streams_by_name(), [(Arc::from("svc"), 4)]);
        state.close();
        assert_eq!(state.resolver_count(), 0);
        assert!(matches!(
            state.register(6, stream(1)),
            Err(RegisterError::Closed)
        ));
    }

    #[test]
    fn close_fails_queued_and_in_flight_jobs() {
        let t0 = Instant::now();
        let mut state = state(10);
        state.register(1, stream(1)).unwrap();
        state.submit(job("1", "", CHANGE, false), Caller(0, Rc::default()), t0);
        state.submit(job("2", "", CHANGE, false), Caller(1, Rc::default()), t0);
        run(&mut state, t0);
        state.close();
        let out = run(&mut state, t0);
        let mut done = out.done();
        done.sort();
        assert_eq!(done, [0, 1]);
        assert!(
            out.done
                .iter()
                .all(|(_, r)| matches!(r, Err(ResolveError::Closed)))
        );
        assert_eq!(state.next_deadline(), None);
        assert!(matches!(
            state.submit(job("1", "", CHANGE, false), Caller(2, Rc::default()), t0),
            Submitted::Refused(ResolveError::Closed)
        ));
    }

    #[test]
    fn pass_through_goes_to_each_name_with_room_reserved_for_requests() {
        let t0 = Instant::now();
        let mut state = state(10);
        let with = |name: &str, pass_through| NewStream {
            name: Arc::from(name),
            entities: vec![(Arc::from("items"), FetchMode::Shared)],
            max_in_flight: 2,
            pass_through,
        };
        state.register(1, with("a", true)).unwrap();
        state.register(2, with("a", true)).unwrap();
        state.register(3, with("b", true)).unwrap();
        state.register(4, with("c", false)).unwrap();
        assert!(state.has_pass_through());
        state.submit(job("1", "", CHANGE, false), Caller(0, Rc::default()), t0);
        let to = run(&mut state, t0).sent[0].0;
        let (turn, mut groups) = state.pass_through_targets();
        assert_eq!(state.pass_through_targets().0, turn.wrapping_add(1));
        for group in &mut groups {
            group.sort_by_key(|r| r.id);
        }
        groups.sort_by_key(|g| g[0].id);
        let reserved = |id| if id == to { 1 } else { 2 };
        assert_eq!(
            groups,
            [
                vec![
                    Replica {
                        id: 1,
                        reserved: reserved(1)
                    },
                    Replica {
                        id: 2,
                        reserved: reserved(2)
                    }
                ],
                vec![Replica {
                    id: 3,
                    reserved: reserved(3)
                }],
            ]
        );
        for id in 1..=3 {
            state.drain(id);
        }
        assert!(!state.has_pass_through(), "a draining stream gets none");
    }
}
