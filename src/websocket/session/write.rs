//! Writing to the socket: what a session writes to, a batch of frames with
//! one flush, and a write that waits on the peer only within `--write-timeout`.

use std::time::Duration;

use axum::extract::ws::Message;
use futures_util::{FutureExt, SinkExt};

use crate::websocket::session::close::{closed_by, stalled};
use crate::websocket::session::context::SessionContext;
use crate::{
    dispatcher::registry::Connection,
    websocket::{outbox::CloseReason, protocol::FrameText},
};

/// What a session reads messages from and writes them to: an upgraded
/// [`WebSocket`](axum::extract::ws::WebSocket) (generic so the loop can be
/// driven over any socket).
pub(crate) trait Socket:
    futures_util::Stream<Item = Result<Message, axum::Error>>
    + futures_util::Sink<Message, Error = axum::Error>
    + Unpin
{
}

impl<S> Socket for S where
    S: futures_util::Stream<Item = Result<Message, axum::Error>>
        + futures_util::Sink<Message, Error = axum::Error>
        + Unpin
{
}

/// How a write to the socket ended.
pub(super) enum Waited {
    Done(Result<(), axum::Error>),
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
    write: impl Future<Output = Result<(), axum::Error>>,
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

/// Writes `frames` in order, then flushes once; `frames` is empty when it
/// completes. A hand-made future of two references: a loop of `feed`s
/// would hold an iterator and a message across its waits, 160 bytes in
/// every idle session's future.
pub(super) fn write_batch<'a>(
    ws: &'a mut impl Socket,
    frames: &'a mut Vec<FrameText>,
) -> impl Future<Output = Result<(), axum::Error>> + 'a {
    // Taken from the end: reversed once, popped in order.
    frames.reverse();
    std::future::poll_fn(move |cx| {
        while !frames.is_empty() {
            std::task::ready!(ws.poll_ready_unpin(cx))?;
            let frame = frames.pop().expect("not empty");
            ws.start_send_unpin(text_message(frame))?;
        }
        ws.poll_flush_unpin(cx)
    })
}

/// The websocket message of a frame: no copy, no UTF-8 check.
pub(super) fn text_message(frame: FrameText) -> Message {
    Message::Text(frame.into_utf8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_become_text_messages_unchanged() {
        let frame = FrameText::from(String::from(r#"{"action":"push"}"#));
        let Message::Text(text) = text_message(frame) else {
            panic!("a text message expected")
        };
        assert_eq!(text.as_str(), r#"{"action":"push"}"#);
    }
}
