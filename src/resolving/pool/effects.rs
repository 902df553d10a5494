//! What the pool's state machine takes in and gives out: the interface
//! between the state (`PoolState`) and the shell that drives it.

use std::sync::Arc;

use super::{error::ResolveError, wire::Resolved};
use crate::{
    key::Key,
    proto::v1::{FetchMode, Reason, ResolveRequest},
};

/// Identifies one `Resolve` stream within a node.
pub(crate) type ResolverId = u64;

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
    /// reports it with `PoolState::send_failed` before polling again.
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
    pub(crate) key: Key,
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
