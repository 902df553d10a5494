//! One websocket connection: reads client messages, writes queued frames, keeps the connection alive.
//!
//! A single task per connection selects over the socket, the connection's
//! `Outbox` (which also carries the node-wide ping timer's ticks and the
//! node's shutdown) and the snapshot resolves it started. Every frame queued
//! since the last write goes out in one vectored write; a frame for an idle
//! plain-TCP connection is written by its producer and never wakes the
//! session (see `outbox`).
//!
//! This file is the session's loop; `context` holds what every session
//! shares, `io` the connection's socket, `read` what a client message does,
//! `write` a write bounded by `--write-timeout`, `snapshots` the
//! connection's snapshot resolves and `close` how a session ends.

mod close;
mod context;
mod io;
mod read;
mod snapshots;
mod write;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::WebSocketStream;
use tungstenite::{Message, protocol::Role};

pub use close::{CLOSE_GOING_AWAY, CLOSE_IDLE, CLOSE_SLOW_CLIENT, CLOSE_TOO_BIG};
pub(crate) use context::SessionContext;
pub(crate) use io::{TlsIo, Upgraded, own_read_ahead};

use crate::{
    dispatcher::registry::{ConnId, Connection},
    ops::metrics::Metrics,
    websocket::admission::ConnState,
    websocket::protocol::{ErrorCode, FrameText, ProtocolError},
};
use close::closed_by;
use io::{Out, next_message, read_config};
use read::{RateLimit, TokenChecks, Work, on_text, reject};
use snapshots::{Snapshots, snapshot};
use write::within;

/// How long the node waits to get its close frame out.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one upgraded websocket until either side ends it: the connection
/// is opened now, the returned future serves it.
///
/// Not an `async fn`: its future would keep a copy of every argument beside
/// the locals moved out of them for the whole session. The async block uses
/// what it needs in place and never sees `id` or `peer`.
pub(crate) fn serve(
    upgraded: Upgraded,
    ctx: Arc<SessionContext>,
    id: ConnId,
    peer: SocketAddr,
    admitted: Arc<ConnState>,
) -> impl Future<Output = ()> {
    let conn = Arc::new(Connection::new(id, ctx.config.outbound_max_bytes));
    let (read_side, write_to) = upgraded.split(admitted.clone(), &conn.outbox);
    let mut ws = WebSocketStream::from_raw_socket(
        read_side,
        Role::Server,
        Some(read_config(ctx.config.max_message_bytes)),
    )
    .now_or_never()
    .expect("a websocket over an open socket is made at once");
    let mut out = Out::new(write_to);
    ctx.registry.connection_opened(&conn);
    // Listed first, then checked: either the shutdown task finds this
    // connection or the token is cancelled already.
    if ctx.tasks.is_cancelled() {
        conn.outbox.shut_down();
    }
    Metrics::inc(&ctx.metrics.connections_total);
    tracing::debug!(%peer, "connection opened");
    async move {
        // Snapshot resolves under way and waiting; created on the first
        // subscribe and dropped when done, so an idle connection holds none.
        let mut snapshots: Option<Box<Snapshots<_>>> = None;
        let mut last_seen = Instant::now();
        let mut limiter = RateLimit::new(
            ctx.config.max_message_rate,
            ctx.config.max_message_burst,
            last_seen,
        );
        // Subscribe-token checks: boxed, made on the first token.
        let mut token_checks: Option<Box<TokenChecks>> = None;
        // The websocket layer may hold a message already (see `next_message`).
        let mut more_to_read = true;

        // What ends the session: a close frame to send last (the node's
        // own, or the echo of the client's), or none (the socket failed).
        let last: Option<FrameText> = loop {
            tokio::select! {
                biased;
                woken = conn.outbox.ready() => {
                    if woken.ping {
                        if last_seen.elapsed() >= ctx.config.idle_timeout {
                            break Some(close_frame(CLOSE_IDLE, "idle timeout"));
                        }
                        conn.outbox.control(None, FrameText::ping());
                    }
                    if let Err(reason) = out.take_from(&conn.outbox) {
                        let (code, reason) = closed_by(reason, &ctx.metrics, &conn);
                        break Some(close_frame(code, reason));
                    }
                    // A slow reader can block the write; the outbox closing (it
                    // kept filling meanwhile, or the node shuts down) interrupts
                    // it, and so does --write-timeout (a client that stopped
                    // reading would otherwise hold the session here forever).
                    if !out.is_empty() {
                        let written = within(out.write(), &conn, ctx.config.write_timeout).await;
                        if let Some(close) = written.ends(&ctx, &conn) {
                            break close.map(|(code, reason)| close_frame(code, reason));
                        }
                        conn.outbox.written();
                    }
                }
                Some(()) = async { snapshots.as_mut().expect("checked").running.next().await },
                    if snapshots.as_ref().is_some_and(|s| !s.running.is_empty()) =>
                {
                    let running = snapshots.as_mut().expect("checked");
                    running.fill(|next| snapshot(&ctx, &conn, next));
                    if running.running.is_empty() {
                        snapshots = None;
                    }
                }
                message = next_message(&mut ws, &mut more_to_read) => {
                    last_seen = Instant::now();
                    // What was read is a message now, no longer a partly
                    // read one (the node's read budget, see `admission`).
                    admitted.message_read();
                    // A pong, or the echo of a close: the websocket layer's.
                    let reply = ws.get_mut().take_replies().map(FrameText::raw);
                    if let Some(Ok(Message::Close(_))) = message {
                        break reply;
                    }
                    if let Some(reply) = reply {
                        conn.outbox.control(None, reply);
                    }
                    match message {
                        None => break None,
                        Some(Err(tungstenite::Error::Capacity(_))) => {
                            break Some(close_frame(CLOSE_TOO_BIG, "message too big"));
                        }
                        Some(Err(_)) => break None,
                        Some(Ok(Message::Text(_) | Message::Binary(_))) if !limiter.allow(last_seen) => {
                            let message = format!(
                                "message dropped: over {} messages per second",
                                ctx.config.max_message_rate
                            );
                            reject(&ctx, &conn, ProtocolError::new(ErrorCode::RateLimited, message));
                        }
                        Some(Ok(Message::Text(text))) => match on_text(&ctx, &conn, text, &mut limiter, &mut token_checks) {
                            Work::Nothing => {}
                            Work::Forget(key) => {
                                if let Some(waiting) = snapshots.as_mut() {
                                    waiting.waiting.retain(|w| w.key != key);
                                }
                            }
                            Work::Snapshots { keys, replace } => {
                                let queue = snapshots.get_or_insert_with(|| Box::new(Snapshots::new()));
                                if replace {
                                    // A new secret re-checks every held key:
                                    // what waits for an older one is moot.
                                    queue.waiting.clear();
                                }
                                queue.waiting.extend(keys);
                                queue.fill(|next| snapshot(&ctx, &conn, next));
                            }
                        },
                        Some(Ok(Message::Binary(_))) => reject(
                            &ctx,
                            &conn,
                            ProtocolError::new(
                                ErrorCode::BinaryUnsupported,
                                "binary frames are not supported; send JSON text frames",
                            ),
                        ),
                        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_) | Message::Close(_))) => {}
                    }
                }
            }
        };

        // Nothing is written directly from here on; a frame the socket took
        // part of goes out whole before the close frame.
        let rest = conn.outbox.end();
        if let Some(last) = last {
            out.keep_begun();
            out.frames().extend(rest);
            out.frames().push(last.into_wire());
            // Then the client's close reply, and whatever it sent before it,
            // is read: a socket closed with unread input is reset, and a
            // reset makes the client drop what it has not read yet, the
            // close frame too. Boxed: once per connection, and out of every
            // idle session's future.
            let _ = Box::pin(timeout(CLOSE_WRITE_TIMEOUT, async {
                out.write().await?;
                while let Some(Ok(message)) = ws.next().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
                Ok::<(), std::io::Error>(())
            }))
            .await;
        }
        drop(snapshots);
        ctx.grants.connection_closed(conn.id);
        ctx.registry.connection_closed(&conn);
        tracing::debug!("connection closed");
    }
}

/// The node's close frame, logged.
fn close_frame(code: u16, reason: &'static str) -> FrameText {
    tracing::debug!(code, reason, "closing connection");
    FrameText::close(code, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `serve` returns.
    fn size_of_return<F, Fut>(_: F) -> usize
    where
        F: FnOnce(Upgraded, Arc<SessionContext>, ConnId, SocketAddr, Arc<ConnState>) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every idle connection holds one session future: keep it small. (As an
    /// `async fn`, `serve` kept a second copy of its arguments: 1,256 bytes.)
    #[test]
    fn the_session_future_stays_small() {
        let size = size_of_return(serve);
        eprintln!("session future: {size} bytes");
        assert!(size <= 720, "session future: {size} bytes");
    }
}
