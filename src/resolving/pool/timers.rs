//! The pool's deadlines, in the order they fall due.

use std::{collections::BTreeSet, sync::Arc, time::Instant};

/// What falls due.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Timer {
    /// A request in flight passes its deadline.
    Request(u64),
    /// A job queued for `entity` has waited as long as it may.
    GiveUp { entity: Arc<str>, job: u64 },
}

/// Deadlines keyed by when they fall due: the earliest is found, and due
/// ones popped, without looking at the others. A timer whose reason went
/// away (the request was answered, the job sent) is removed at once, so
/// only live timers wait here.
#[derive(Debug, Default)]
pub(super) struct Timers {
    due: BTreeSet<(Instant, Timer)>,
}

impl Timers {
    pub(super) fn insert(&mut self, at: Instant, timer: Timer) {
        self.due.insert((at, timer));
    }

    pub(super) fn remove(&mut self, at: Instant, timer: Timer) {
        self.due.remove(&(at, timer));
    }

    /// When the earliest timer falls due.
    pub(super) fn next(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }

    /// Takes the timers due at `now`, earliest first.
    pub(super) fn pop_due(&mut self, now: Instant) -> Vec<Timer> {
        let mut due = Vec::new();
        while self.due.first().is_some_and(|(at, _)| *at <= now) {
            due.push(self.due.pop_first().expect("checked").1);
        }
        due
    }

    pub(super) fn clear(&mut self) {
        self.due.clear();
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.due.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn only_due_timers_pop_earliest_first() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut timers = Timers::default();
        timers.insert(t0 + 3 * s, Timer::Request(3));
        timers.insert(t0 + s, Timer::Request(1));
        let give_up = Timer::GiveUp {
            entity: Arc::from("items"),
            job: 7,
        };
        timers.insert(t0 + 2 * s, give_up.clone());
        timers.insert(t0 + 4 * s, Timer::Request(4));
        timers.remove(t0 + 4 * s, Timer::Request(4));
        assert_eq!(timers.next(), Some(t0 + s));
        assert!(timers.pop_due(t0).is_empty());
        assert_eq!(timers.pop_due(t0 + 2 * s), vec![Timer::Request(1), give_up]);
        assert_eq!(timers.next(), Some(t0 + 3 * s));
        assert_eq!(timers.pop_due(t0 + 10 * s), vec![Timer::Request(3)]);
        assert_eq!(timers.next(), None);
    }
}
