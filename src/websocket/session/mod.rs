//! One websocket connection: reads client messages, writes queued frames, keeps the connection alive.
//!
//! A single task per connection selects over the socket, the connection's
//! `Outbox` (which also carries the node-wide ping timer's ticks and the
//! node's shutdown) and the snapshot resolves it started. Every frame queued
//! since the last write goes out in one batch with one flush.
//!
//! This file is the session's loop; `context` holds what every session
//! shares, `read` what a client message does, `write` the writes to the
//! socket, `snapshots` the connection's snapshot resolves and `close` how a
//! session ends.

mod close;
mod context;
mod read;
mod snapshots;
mod write;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::time::{Instant, timeout};

pub use close::{CLOSE_GOING_AWAY, CLOSE_IDLE, CLOSE_SLOW_CLIENT, CLOSE_TOO_BIG};
pub(crate) use context::SessionContext;
pub(crate) use write::Socket;

use crate::{
    dispatcher::registry::{ConnId, Connection},
    ops::metrics::Metrics,
    websocket::admission::ConnState,
    websocket::protocol::{ErrorCode, FrameText, ProtocolError},
};
use close::closed_by;
use read::{RateLimit, TokenChecks, Work, on_text, reject};
use snapshots::{Snapshots, snapshot};
use write::{within, write_batch};

/// How long the node waits to get its close frame out.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one upgraded websocket until either side ends it: the connection
/// is opened now, the returned future serves it.
///
/// Not an `async fn`: its future would keep a copy of every argument beside
/// the locals moved out of them for the whole session (the websocket alone
/// is 368 bytes). The async block uses `ws` and `ctx` in place and never
/// sees `id` or `peer`.
pub(crate) fn serve(
    mut ws: impl Socket,
    ctx: Arc<SessionContext>,
    id: ConnId,
    peer: SocketAddr,
    admitted: Arc<ConnState>,
) -> impl Future<Output = ()> {
    let conn = Arc::new(Connection::new(id, ctx.config.outbound_max_bytes));
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
        let mut frames: Vec<FrameText> = Vec::new();
        let mut last_seen = Instant::now();
        let mut limiter = RateLimit::new(
            ctx.config.max_message_rate,
            ctx.config.max_message_burst,
            last_seen,
        );
        // Subscribe-token checks: boxed, made on the first token.
        let mut token_checks: Option<Box<TokenChecks>> = None;

        let close: Option<(u16, &'static str)> = loop {
            tokio::select! {
                biased;
                woken = conn.outbox.ready() => {
                    if let Some(reason) = conn.outbox.take_queued(&mut frames) {
                        break Some(closed_by(reason, &ctx.metrics, &conn));
                    }
                    // A slow reader can block the write; the outbox closing (it
                    // kept filling meanwhile, or the node shuts down) interrupts
                    // it, and so does --write-timeout (a client that stopped
                    // reading would otherwise hold the session here forever).
                    if !frames.is_empty() {
                        let written = within(write_batch(&mut ws, &mut frames), &conn, ctx.config.write_timeout).await;
                        if let Some(close) = written.ends(&ctx, &conn) {
                            break close;
                        }
                    }
                    if woken.ping {
                        if last_seen.elapsed() >= ctx.config.idle_timeout {
                            break Some((CLOSE_IDLE, "idle timeout"));
                        }
                        let sent = within(ws.send(Message::Ping(Bytes::new())), &conn, ctx.config.write_timeout).await;
                        if let Some(close) = sent.ends(&ctx, &conn) {
                            break close;
                        }
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
                message = ws.next() => {
                    last_seen = Instant::now();
                    // What was read is a message now, no longer a partly
                    // read one (the node's read budget, see `admission`).
                    admitted.message_read();
                    match message {
                        None => break None,
                        Some(Err(err)) => {
                            let too_big = matches!(
                                err.into_inner().downcast::<tungstenite::Error>().map(|e| *e),
                                Ok(tungstenite::Error::Capacity(_))
                            );
                            if too_big {
                                break Some((CLOSE_TOO_BIG, "message too big"));
                            }
                            break None;
                        }
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
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Close(_))) => {
                            // tungstenite queued the close reply; get it out.
                            // Boxed, as the close below: once per connection,
                            // and out of every idle session's future.
                            let _ = Box::pin(timeout(CLOSE_WRITE_TIMEOUT, ws.flush())).await;
                            break None;
                        }
                    }
                }
            }
        };

        if let Some((code, reason)) = close {
            tracing::debug!(code, reason, "closing connection");
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let _ = Box::pin(timeout(
                CLOSE_WRITE_TIMEOUT,
                ws.send(Message::Close(Some(frame))),
            ))
            .await;
        }
        drop(snapshots);
        ctx.grants.connection_closed(conn.id);
        ctx.registry.connection_closed(&conn);
        tracing::debug!("connection closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WsConfig;

    /// The size of the future `serve` returns over a real websocket.
    fn size_of_return<F, Fut>(_: F) -> usize
    where
        F: FnOnce(
            axum::extract::ws::WebSocket,
            Arc<SessionContext>,
            ConnId,
            SocketAddr,
            Arc<ConnState>,
        ) -> Fut,
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

    /// A peer that stopped reading: its socket takes `room` messages, then
    /// every write waits (a full send buffer), and it never sends anything.
    struct StalledPeer {
        room: usize,
        written: Arc<std::sync::Mutex<Vec<Message>>>,
    }

    impl futures_util::Stream for StalledPeer {
        type Item = Result<Message, axum::Error>;

        fn poll_next(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Pending
        }
    }

    impl futures_util::Sink<Message> for StalledPeer {
        type Error = axum::Error;

        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), axum::Error>> {
            if self.written.lock().unwrap().len() < self.room {
                std::task::Poll::Ready(Ok(()))
            } else {
                std::task::Poll::Pending
            }
        }

        fn start_send(self: std::pin::Pin<&mut Self>, item: Message) -> Result<(), axum::Error> {
            self.written.lock().unwrap().push(item);
            Ok(())
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), axum::Error>> {
            self.poll_ready(cx)
        }

        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), axum::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A ping written to a client that stopped reading blocks; shutdown still
    /// ends the session (after the bounded attempt at a close frame) instead
    /// of waiting on the socket forever.
    #[tokio::test(start_paused = true)]
    async fn a_ping_blocked_on_a_stalled_peer_does_not_outlive_shutdown() {
        let (metrics, tasks, registry, dispatcher) =
            crate::dispatcher::tests::in_memory_dispatcher().await;
        let config = WsConfig {
            ping_interval: Duration::from_millis(10),
            idle_timeout: Duration::from_secs(3600),
            ..WsConfig::default()
        };
        let ctx = SessionContext::start(&config, dispatcher, metrics, "n".into(), None, &tasks);
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let peer = StalledPeer {
            room: 3,
            written: written.clone(),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], 9));
        let admission =
            crate::websocket::admission::Admission::new(crate::websocket::admission::Limits {
                max_connections: 0,
                max_pending_per_address: 0,
                deadline: Duration::from_secs(10),
                max_reading_bytes: 0,
            });
        let admitted = admission.admit(addr).expect("no limits");
        let session = tokio::spawn(serve(peer, ctx, 1, addr, admitted));
        // Three pings fill the peer; the fourth waits on it.
        while written.lock().unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(registry.connections(), 1);
        assert!(!session.is_finished());
        tasks.token().cancel();
        timeout(Duration::from_secs(60), session)
            .await
            .expect("the session ends on shutdown")
            .unwrap();
        assert_eq!(registry.connections(), 0);
        let written = written.lock().unwrap();
        assert!(
            written.iter().all(|m| matches!(m, Message::Ping(_))),
            "only pings fit: {written:?}"
        );
    }
}
