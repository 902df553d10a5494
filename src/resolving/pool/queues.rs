//! The pool's records: jobs, requests in flight, streams, and the
//! per-entity queues jobs wait in.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::Arc,
    time::Instant,
};

use super::{
    effects::ResolverId,
    timers::{Timer, Timers},
};
use crate::proto::v1::{FetchMode, Reason};

pub(super) struct Job<W> {
    pub(super) id: Arc<str>,
    pub(super) secret: Arc<str>,
    pub(super) reason: Reason,
    pub(super) shared: bool,
    pub(super) waiter: W,
    pub(super) attempts: u32,
    /// A job waiting this long (queued or in flight, over its attempts)
    /// fails with `Timeout`: a queue whose resolvers never have room does
    /// not hold callers forever.
    pub(super) give_up: Instant,
    /// Names the job's give-up timer.
    pub(super) serial: u64,
}

pub(super) struct InFlight<W> {
    pub(super) resolver: ResolverId,
    pub(super) entity: Arc<str>,
    pub(super) jobs: Vec<Job<W>>,
    /// A subscribe request listed in `joinable` (for its ids and secret).
    pub(super) joinable: bool,
    pub(super) deadline: Instant,
}

pub(super) struct Slot {
    pub(super) name: Arc<str>,
    pub(super) in_flight: u32,
    pub(super) max_in_flight: u32,
    pub(super) pass_through: bool,
    pub(super) entities: Vec<Arc<str>>,
    /// The backend sent `Drain`: it answers what it holds, gets nothing new.
    pub(super) draining: bool,
    /// Its requests in flight.
    pub(super) requests: BTreeSet<u64>,
}

pub(super) struct EntityQueue<W> {
    pub(super) mode: FetchMode,
    pub(super) resolvers: Vec<ResolverId>,
    pub(super) next: usize,
    pub(super) queue: VecDeque<Job<W>>,
}

pub(super) fn give_up_timer<W>(entity: &Arc<str>, job: &Job<W>) -> Timer {
    Timer::GiveUp {
        entity: entity.clone(),
        job: job.serial,
    }
}

impl<W> EntityQueue<W> {
    /// Queues `job` last; its give-up timer runs while it waits.
    pub(super) fn push_back(&mut self, entity: &Arc<str>, job: Job<W>, timers: &mut Timers) {
        timers.insert(job.give_up, give_up_timer(entity, &job));
        self.queue.push_back(job);
    }

    /// Puts `jobs` back in front, in their order.
    pub(super) fn push_front(&mut self, entity: &Arc<str>, jobs: Vec<Job<W>>, timers: &mut Timers) {
        for job in jobs.into_iter().rev() {
            timers.insert(job.give_up, give_up_timer(entity, &job));
            self.queue.push_front(job);
        }
    }

    /// Takes the job at `index` out of the queue (and its timer).
    pub(super) fn take(
        &mut self,
        index: usize,
        entity: &Arc<str>,
        timers: &mut Timers,
    ) -> Option<Job<W>> {
        let job = self.queue.remove(index)?;
        timers.remove(job.give_up, give_up_timer(entity, &job));
        Some(job)
    }
}
