//! A connection's snapshot resolves: the ones running, at most
//! [`SNAPSHOTS_PER_CONNECTION`], and the ones waiting for room, each with the
//! secret and epoch it was asked with.

use std::{collections::VecDeque, sync::Arc};

use futures_util::stream::FuturesUnordered;

use crate::websocket::session::context::SessionContext;
use crate::{dispatcher::registry::Connection, key::Key};

/// Snapshot resolves (subscribes and re-checks) one connection runs at once;
/// more wait in its queue. So one connection holds at most this many of the
/// node's `--max-snapshot-resolves`, and its queue at most one entry per key.
pub(crate) const SNAPSHOTS_PER_CONNECTION: usize = 64;

/// A snapshot resolve to start: its key, with the connection's secret and
/// epoch as they were when the session handled the message (so a `secret`
/// message handled after it makes it outdated, see `Registry::recheck`).
pub(crate) struct Waiting {
    pub(super) key: Key,
    pub(super) secret: Arc<str>,
    pub(super) epoch: u64,
    /// The version of the key the client said it holds (a subscribe's
    /// `version`): resumed without a snapshot if the key has not changed since.
    pub(super) resume: Option<u64>,
    /// A valid subscribe token authorized it (see `Dispatcher::subscribe`).
    pub(super) by_token: bool,
}

/// A connection's snapshot resolves: at most [`SNAPSHOTS_PER_CONNECTION`]
/// running, the rest waiting in order.
pub(super) struct Snapshots<F> {
    pub(super) running: FuturesUnordered<F>,
    pub(super) waiting: VecDeque<Waiting>,
}

impl<F: Future<Output = ()>> Snapshots<F> {
    pub(super) fn new() -> Self {
        Self {
            running: FuturesUnordered::new(),
            waiting: VecDeque::new(),
        }
    }

    /// Starts waiting resolves while there is room.
    pub(super) fn fill(&mut self, start: impl Fn(Waiting) -> F) {
        while self.running.len() < SNAPSHOTS_PER_CONNECTION {
            let Some(next) = self.waiting.pop_front() else {
                return;
            };
            self.running.push(start(next));
        }
    }
}

/// The snapshot resolve of a key pending in the registry, with the secret
/// and epoch it was asked with.
pub(super) fn snapshot(
    ctx: &SessionContext,
    conn: &Arc<Connection>,
    waiting: Waiting,
) -> impl Future<Output = ()> + use<> {
    let dispatcher = ctx.dispatcher.clone();
    let conn = conn.clone();
    let Waiting {
        key,
        secret,
        epoch,
        resume,
        by_token,
    } = waiting;
    async move {
        dispatcher
            .subscribe(conn, key, secret, epoch, resume, by_token)
            .await
    }
}

/// `key` to resolve with the connection's secret as it is now.
pub(super) fn waiting(conn: &Connection, key: Key) -> Waiting {
    let (secret, epoch) = conn.secret_epoch();
    Waiting {
        key,
        secret,
        epoch,
        resume: None,
        by_token: false,
    }
}
