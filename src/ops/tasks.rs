//! One shutdown path: the tracker every task of a node is spawned on, and the token that stops them all.

use std::future::Future;

use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFuture},
    task::TaskTracker,
};

/// A node's tasks: a cheap-clone handle every component spawns through, so
/// that shutdown reaches each loop and waits for each task.
#[derive(Clone, Default)]
pub(crate) struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    /// Spawns `task`, tracked. It must end soon after [`Tasks::cancelled`] completes.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }

    /// Completes once the node starts shutting down. (The token's own
    /// future, not an `async fn` around it: sessions hold one each.)
    pub(crate) fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The node's token, for loops that outlive this handle's borrow and for
    /// child tokens that stop part of the work early.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.cancel
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }
}
