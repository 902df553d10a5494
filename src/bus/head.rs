//! Reads of the stream's head, batched: however many snapshots ask at once, one request is in flight.
//!
//! A snapshot's version must be at or above every change any node stored
//! before the subscribe, so each snapshot needs a read of the stream's head
//! that *started* after it was asked for. One read serves every caller that
//! asked before it started: callers that arrive while a read is in flight
//! wait for the next one, which starts when that one ends. However many
//! subscribes (or `secret` re-checks) a client sends, the node sends at most
//! one `$JS.API.STREAM.INFO` request at a time, about one per round trip.

use std::{future::Future, pin::pin, sync::Mutex};

use tokio::sync::Notify;

/// Batches reads of the head; the read itself is the caller's (see [`HeadReads::read`]).
#[derive(Default)]
pub(crate) struct HeadReads {
    /// A std `Mutex`: a few integer updates, never held across `.await`.
    state: Mutex<Rounds>,
    /// Woken when a read ends (or its reader went away).
    ended: Notify,
}

#[derive(Default)]
struct Rounds {
    /// Reads started so far (the number of the latest one).
    started: u64,
    /// The latest read that ended.
    finished: u64,
    /// A read is in flight.
    running: bool,
}

impl HeadReads {
    /// Completes once a read that started after this call has ended: either
    /// one started by another caller, or `read` itself, run here when no read
    /// is in flight. `read` must store what it read where callers find it
    /// (the bus keeps the highest head in an atomic).
    pub(crate) async fn read<F, Fut>(&self, read: F)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = ()>,
    {
        // The read in flight now (number `started`) may have been sent before
        // this call: only a later one serves it.
        let needed = self.state.lock().unwrap().started + 1;
        let mut read = Some(read);
        loop {
            let mut ended = pin!(self.ended.notified());
            // Registered before the check, so an end in between is not missed.
            ended.as_mut().enable();
            let round = {
                let mut state = self.state.lock().unwrap();
                if state.finished >= needed {
                    return;
                }
                if state.running {
                    None
                } else {
                    state.running = true;
                    state.started += 1;
                    Some(state.started)
                }
            };
            if let Some(round) = round {
                let guard = Running {
                    reads: self,
                    round,
                    done: false,
                };
                // A caller runs at most one read: `needed` <= `round`.
                let read = read.take().expect("one read per caller");
                read().await;
                guard.finish();
                return;
            }
            ended.await;
        }
    }

    /// Reads started so far.
    #[cfg(test)]
    fn started(&self) -> u64 {
        self.state.lock().unwrap().started
    }
}

/// The read in flight; its end (or its reader dropping it) lets the next start.
struct Running<'a> {
    reads: &'a HeadReads,
    round: u64,
    done: bool,
}

impl Running<'_> {
    fn finish(mut self) {
        self.done = true;
        self.end(true);
    }

    fn end(&self, done: bool) {
        let mut state = self.reads.state.lock().unwrap();
        state.running = false;
        if done {
            state.finished = state.finished.max(self.round);
        }
        drop(state);
        self.reads.ended.notify_waiters();
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // Dropped mid-read (its subscribe was cancelled): the waiters start
        // a read of their own.
        if !self.done {
            self.end(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
        time::Duration,
    };

    use futures_util::future::join_all;

    use super::*;

    #[tokio::test]
    async fn a_thousand_concurrent_callers_share_two_reads() {
        let reads = Arc::new(HeadReads::default());
        let (release, gate) = tokio::sync::watch::channel(false);
        let sent = Arc::new(AtomicU64::new(0));
        let callers = (0..1000).map(|_| {
            let (reads, sent, mut gate) = (reads.clone(), sent.clone(), gate.clone());
            async move {
                reads
                    .read(|| async move {
                        sent.fetch_add(1, Ordering::Relaxed);
                        let _ = gate.wait_for(|open| *open).await;
                    })
                    .await
            }
        });
        let all = tokio::spawn(join_all(callers));
        // The first caller's read is in flight; everyone else waits for the next.
        while sent.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        release.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .expect("every caller is served")
            .unwrap();
        assert_eq!(sent.load(Ordering::Relaxed), 2);
        assert_eq!(reads.started(), 2);
    }

    #[tokio::test]
    async fn a_caller_is_served_only_by_a_read_started_after_it() {
        let reads = Arc::new(HeadReads::default());
        let (release_first, first_gate) = tokio::sync::oneshot::channel::<()>();
        let first = tokio::spawn({
            let reads = reads.clone();
            async move {
                reads
                    .read(|| async move {
                        let _ = first_gate.await;
                    })
                    .await
            }
        });
        while reads.started() == 0 {
            tokio::task::yield_now().await;
        }
        // Asked while read 1 is in flight: read 1 does not serve it.
        let second = tokio::spawn({
            let reads = reads.clone();
            async move { reads.read(|| async {}).await }
        });
        tokio::task::yield_now().await;
        release_first.send(()).unwrap();
        first.await.unwrap();
        second.await.unwrap();
        assert_eq!(
            reads.started(),
            2,
            "the second caller ran a read of its own"
        );
    }

    #[tokio::test]
    async fn a_reader_that_goes_away_hands_over_to_a_waiter() {
        let reads = Arc::new(HeadReads::default());
        let stuck = tokio::spawn({
            let reads = reads.clone();
            async move { reads.read(std::future::pending::<()>).await }
        });
        while reads.started() == 0 {
            tokio::task::yield_now().await;
        }
        let waiter = tokio::spawn({
            let reads = reads.clone();
            async move { reads.read(|| async {}).await }
        });
        tokio::task::yield_now().await;
        stuck.abort();
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("the waiter reads itself")
            .unwrap();
        assert_eq!(reads.started(), 2);
    }
}
