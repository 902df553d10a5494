//! Writing to the socket: a write that waits on the peer only within
//! `--write-timeout`, and how it ended.

use std::{io, time::Duration};

use futures_util::FutureExt;

use crate::websocket::session::close::{closed_by, stalled};
use crate::websocket::session::context::SessionContext;
use crate::{dispatcher::registry::Connection, websocket::outbox::CloseReason};

/// How a write to the socket ended.
pub(super) enum Waited {
    Done(io::Result<()>),
    /// The connection's queue closed meanwhile (overflow or shutdown).
    Closed(CloseReason),
    /// It made no way within `--write-timeout`.
    Stalled,
}

impl Waited {
    /// `None`: the session carries on; `Some(close)`: it ends, with that
    /// close frame (`None`: the socket failed, no close frame).
    pub(super) fn ends(
        self,
        ctx: &SessionContext,
        conn: &Connection,
    ) -> Option<Option<(u16, &'static str)>> {
        match self {
            Waited::Done(Ok(())) => None,
            Waited::Done(Err(_)) => Some(None),
            Waited::Closed(reason) => Some(Some(closed_by(reason, &ctx.metrics, conn))),
            Waited::Stalled => Some(Some(stalled(ctx, conn))),
        }
    }
}

/// Runs `write`; when the socket cannot take it at once, waits at most
/// `limit`, or until the connection's queue closes. The timer is armed only
/// then: a write that completes at once (the usual case) costs none.
pub(super) async fn within(
    write: impl Future<Output = io::Result<()>>,
    conn: &Connection,
    limit: Duration,
) -> Waited {
    let mut write = std::pin::pin!(write);
    if let Some(done) = write.as_mut().now_or_never() {
        return Waited::Done(done);
    }
    // Boxed: the timer is large, and every idle session's future would
    // carry room for it.
    Box::pin(async move {
        tokio::select! {
            done = write => Waited::Done(done),
            reason = conn.outbox.closed() => Waited::Closed(reason),
            () = tokio::time::sleep(limit) => Waited::Stalled,
        }
    })
    .await
}
