//! One websocket connection: reads client messages, writes queued frames, keeps the connection alive.
//!
//! A single task per connection selects over the socket, the connection's
//! `Outbox` (which also carries the node-wide ping timer's ticks and the
//! node's shutdown) and the snapshot resolves it started. Every frame queued
//! since the last write goes out in one batch with one flush.

use std::{collections::VecDeque, net::SocketAddr, sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt, StreamExt, stream::FuturesUnordered};
use tokio::time::{Instant, timeout};

use crate::{
    config::WsConfig,
    dispatcher::Dispatcher,
    dispatcher::registry::{AddPending, ConnId, Connection, Registry},
    key::ChangeKey,
    ops::metrics::Metrics,
    ops::tasks::Tasks,
    resolving::Resolvers,
    websocket::admission::ConnState,
    websocket::outbox::CloseReason,
    websocket::protocol::{
        self, ClientMessage, ErrorCode, FrameText, ProtocolError, error_frame, unsubscribed_frame,
    },
};

/// Close code sent on node shutdown ("going away": reconnect elsewhere).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code for a client too slow to keep its outbound queue under the bound.
pub const CLOSE_SLOW_CLIENT: u16 = 1008;
/// Close code for a frame above the hard size cap.
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code when the peer stayed silent past the idle timeout.
pub const CLOSE_IDLE: u16 = 1000;
/// How long the node waits to get its close frame out.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Snapshot resolves (subscribes and re-checks) one connection runs at once;
/// more wait in its queue. So one connection holds at most this many of the
/// node's `--max-snapshot-resolves`, and its queue at most one entry per key.
pub(crate) const SNAPSHOTS_PER_CONNECTION: usize = 64;

/// Settings and handles every session needs.
pub(crate) struct SessionContext {
    pub(crate) config: WsConfig,
    pub(crate) registry: Registry,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) resolvers: Resolvers,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tasks: Tasks,
    pub(crate) node_id: Arc<str>,
}

impl SessionContext {
    /// Builds what sessions share from `config`, and starts the node-wide
    /// ping timer (until the node shuts down) and the task that closes every
    /// connection's queue when the node shuts down. Both reach sessions
    /// through their outbox: an idle session waits for nothing else than its
    /// socket and its outbox.
    pub(crate) fn start(
        config: &WsConfig,
        registry: Registry,
        dispatcher: Dispatcher,
        resolvers: Resolvers,
        metrics: Arc<Metrics>,
        node_id: Arc<str>,
        tasks: &Tasks,
    ) -> Arc<Self> {
        let period = config.ping_interval;
        let (ticker, pinged) = (tasks.clone(), registry.clone());
        tasks.spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.tick().await;
            loop {
                tokio::select! {
                    _ = ticker.cancelled() => return,
                    _ = interval.tick() => pinged.for_each_connection(|conn| conn.outbox.ping()),
                }
            }
        });
        // A session opened after this ran sees the token cancelled itself
        // (see `serve`).
        let (shutdown, open) = (tasks.clone(), registry.clone());
        tasks.spawn(async move {
            shutdown.cancelled().await;
            open.for_each_connection(|conn| conn.outbox.shut_down());
        });
        Arc::new(Self {
            config: config.clone(),
            registry,
            dispatcher,
            resolvers,
            metrics,
            tasks: tasks.clone(),
            node_id,
        })
    }
}

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

        let close: Option<(u16, &'static str)> = loop {
            tokio::select! {
                biased;
                woken = conn.outbox.ready() => {
                    if let Some(reason) = conn.outbox.drain(&mut frames) {
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
                        Some(Ok(Message::Text(text))) => match on_text(&ctx, &conn, text, &mut limiter) {
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
        ctx.registry.connection_closed(&conn);
        tracing::debug!("connection closed");
    }
}

/// Token bucket for a connection's inbound messages: `rate` per second on
/// average, up to `burst` at once. `rate == 0` allows everything.
struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes a token if there is one.
    fn allow(&mut self, now: Instant) -> bool {
        self.allow_n(1, now)
    }

    /// Takes `n` tokens if there are that many (a message that makes the
    /// node do `n` messages' worth of work).
    fn allow_n(&mut self, n: usize, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// A snapshot resolve to start: its key, with the connection's secret and
/// epoch as they were when the session handled the message (so a `secret`
/// message handled after it makes it outdated, see `Registry::recheck`).
pub(crate) struct Waiting {
    key: ChangeKey,
    secret: Arc<str>,
    epoch: u64,
}

/// A connection's snapshot resolves: at most [`SNAPSHOTS_PER_CONNECTION`]
/// running, the rest waiting in order.
struct Snapshots<F> {
    running: FuturesUnordered<F>,
    waiting: VecDeque<Waiting>,
}

impl<F: Future<Output = ()>> Snapshots<F> {
    fn new() -> Self {
        Self {
            running: FuturesUnordered::new(),
            waiting: VecDeque::new(),
        }
    }

    /// Starts waiting resolves while there is room.
    fn fill(&mut self, start: impl Fn(Waiting) -> F) {
        while self.running.len() < SNAPSHOTS_PER_CONNECTION {
            let Some(next) = self.waiting.pop_front() else {
                return;
            };
            self.running.push(start(next));
        }
    }
}

/// What a client message asks of the session's snapshot resolves.
enum Work {
    Nothing,
    /// Start these (after the ones waiting); `replace`: a new secret, whose
    /// re-checks supersede everything still waiting.
    Snapshots {
        keys: Vec<Waiting>,
        replace: bool,
    },
    /// The client unsubscribed: a resolve of the key still waiting is moot.
    Forget(ChangeKey),
}

/// How a write to the socket ended.
enum Waited {
    Done(Result<(), axum::Error>),
    /// The connection's queue closed meanwhile (overflow or shutdown).
    Closed(CloseReason),
    /// It made no way within `--write-timeout`.
    Stalled,
}

impl Waited {
    /// `None`: the session carries on; `Some(close)`: it ends, with that
    /// close frame (`None`: the socket failed, no close frame).
    fn ends(self, ctx: &SessionContext, conn: &Connection) -> Option<Option<(u16, &'static str)>> {
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
async fn within(
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

/// The close code and reason for a connection whose socket took no write
/// within `--write-timeout`: a client that stopped reading.
fn stalled(ctx: &SessionContext, conn: &Connection) -> (u16, &'static str) {
    Metrics::inc(&ctx.metrics.slow_client_closes_total);
    tracing::info!(
        conn.id = conn.id,
        timeout = ?ctx.config.write_timeout,
        "closing slow client: a write made no way within --write-timeout"
    );
    (CLOSE_SLOW_CLIENT, "write timed out: client not reading")
}

/// The close code and reason for a queue closed with `reason`.
fn closed_by(reason: CloseReason, metrics: &Metrics, conn: &Connection) -> (u16, &'static str) {
    match reason {
        CloseReason::Overflow => slow_client(metrics, conn),
        CloseReason::Shutdown => (CLOSE_GOING_AWAY, "server shutting down"),
    }
}

/// The close code and reason for a connection whose outbound queue
/// overflowed. The one place a slow client's close is counted: whatever
/// overflowed the queue (a fan-out, a snapshot, an error frame), its
/// session ends here, once.
fn slow_client(metrics: &Metrics, conn: &Connection) -> (u16, &'static str) {
    Metrics::inc(&metrics.slow_client_closes_total);
    tracing::info!(
        conn.id = conn.id,
        bound = conn.outbox.max_bytes(),
        "closing slow client: outbound queue over its bound"
    );
    (CLOSE_SLOW_CLIENT, "outbound queue full: client too slow")
}

/// Writes `frames` in order, then flushes once; `frames` is empty when it
/// completes. A hand-made future of two references: a loop of `feed`s
/// would hold an iterator and a message across its waits, 160 bytes in
/// every idle session's future.
fn write_batch<'a>(
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
fn text_message(frame: FrameText) -> Message {
    Message::Text(frame.into_utf8())
}

fn reject(ctx: &SessionContext, conn: &Connection, err: ProtocolError) {
    ctx.metrics.client_error(err.code);
    conn.outbox
        .control(None, error_frame(err.code, &err.message, None));
}

/// The snapshot resolve of a key pending in the registry, with the secret
/// and epoch it was asked with.
fn snapshot(
    ctx: &SessionContext,
    conn: &Arc<Connection>,
    waiting: Waiting,
) -> impl Future<Output = ()> + use<> {
    let dispatcher = ctx.dispatcher.clone();
    let conn = conn.clone();
    let Waiting { key, secret, epoch } = waiting;
    async move { dispatcher.subscribe(conn, key, secret, epoch).await }
}

/// `key` to resolve with the connection's secret as it is now.
fn waiting(conn: &Connection, key: ChangeKey) -> Waiting {
    let (secret, epoch) = conn.secret_epoch();
    Waiting { key, secret, epoch }
}

/// Handles one text frame; returns the snapshot resolves it asks for (one
/// for a subscribe, one per held key for a new secret). `limiter` is the
/// connection's message budget, which already took this message's token.
fn on_text(
    ctx: &Arc<SessionContext>,
    conn: &Arc<Connection>,
    text: Utf8Bytes,
    limiter: &mut RateLimit,
) -> Work {
    if text.len() > ctx.config.max_message_bytes {
        reject(
            ctx,
            conn,
            ProtocolError::new(
                ErrorCode::MessageTooLarge,
                format!(
                    "message is {} bytes; the limit is {}",
                    text.len(),
                    ctx.config.max_message_bytes
                ),
            ),
        );
        return Work::Nothing;
    }
    let message = match protocol::decode(&text) {
        Ok(message) => message,
        Err(err) => {
            reject(ctx, conn, err);
            return Work::Nothing;
        }
    };
    match message {
        ClientMessage::Subscribe(key) => {
            let added = ctx
                .registry
                .add_pending(&key, conn, ctx.config.max_subscriptions);
            if added == AddPending::InFlight {
                return Work::Nothing;
            }
            if added == AddPending::Full {
                ctx.metrics.client_error(ErrorCode::TooManySubscriptions);
                let message = format!(
                    "this connection already holds {} subscriptions, the limit",
                    ctx.config.max_subscriptions
                );
                conn.outbox.control(
                    Some(&key),
                    error_frame(ErrorCode::TooManySubscriptions, &message, Some(&key)),
                );
                return Work::Nothing;
            }
            Work::Snapshots {
                keys: vec![waiting(conn, key)],
                replace: false,
            }
        }
        ClientMessage::Unsubscribe(key) => {
            if ctx.registry.remove(&key, conn) {
                conn.outbox.forget(&key);
                if !ctx.config.compat_bare_rows {
                    conn.outbox.control(Some(&key), unsubscribed_frame(&key));
                }
                return Work::Forget(key);
            } else {
                ctx.metrics.client_error(ErrorCode::NotSubscribed);
                conn.outbox.control(
                    Some(&key),
                    error_frame(
                        ErrorCode::NotSubscribed,
                        "this connection is not subscribed to that key",
                        Some(&key),
                    ),
                );
            }
            Work::Nothing
        }
        ClientMessage::Secret(secret) => {
            // A new secret costs a re-check of every held key: the
            // connection's message budget pays for each (beyond this
            // message's own token), so a client cycling secrets costs the
            // backend what as many subscribes would. The same secret again
            // changes nothing and costs nothing.
            let held = conn.key_count();
            if *conn.secret() == *secret {
                return Work::Nothing;
            }
            if !limiter.allow_n(held, Instant::now()) {
                reject(
                    ctx,
                    conn,
                    ProtocolError::new(
                        ErrorCode::RateLimited,
                        format!(
                            "secret dropped: it would re-check {held} keys, over this connection's \
                             budget of {} messages per second; send it again later",
                            ctx.config.max_message_rate
                        ),
                    ),
                );
                return Work::Nothing;
            }
            if !conn.set_secret(&secret) {
                return Work::Nothing;
            }
            // Every held key (at most `max_subscriptions`) is pending again
            // and re-resolved with the new secret, reason SUBSCRIBE, exactly
            // like a subscribe: `subscribed` (not in compat mode) and a fresh
            // snapshot, or an error frame that ends the subscription. The
            // resolves batch in the pool (same secret and reason).
            let keys = ctx.registry.recheck(conn);
            if !keys.is_empty() {
                ctx.metrics
                    .secret_rechecks_total
                    .fetch_add(keys.len() as u64, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(keys = keys.len(), "new secret: re-checking held keys");
            }
            let (secret, epoch) = conn.secret_epoch();
            Work::Snapshots {
                keys: keys
                    .into_iter()
                    .map(|key| Waiting {
                        key,
                        secret: secret.clone(),
                        epoch,
                    })
                    .collect(),
                replace: true,
            }
        }
        ClientMessage::PassThrough => {
            let connection_id = format!("{}-{}", ctx.node_id, conn.id);
            let sent =
                ctx.resolvers
                    .pass_through(&connection_id, &conn.secret(), Bytes::from(text));
            if sent == 0 {
                let err = if ctx.resolvers.has_pass_through() {
                    ProtocolError::new(
                        ErrorCode::Overloaded,
                        "pass-through resolvers are not keeping up; message dropped",
                    )
                } else {
                    ProtocolError::new(
                        ErrorCode::NoPassThrough,
                        "no backend accepts messages without an action",
                    )
                };
                reject(ctx, conn, err);
            }
            Work::Nothing
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::*;
    use crate::{
        dispatcher::registry::{Audience, Connection},
        key::ChangeKey,
        websocket::protocol::PushFrame,
    };

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

    #[test]
    fn a_slow_client_is_counted_when_its_session_closes_it() {
        let metrics = Metrics::default();
        let registry = Registry::new();
        let conn = Arc::new(Connection::new(1, 1024));
        let key = ChangeKey::new("items", "1").unwrap();
        registry.add_pending(&key, &conn, 10);
        registry.activate(&key, 1, 0, None, &PushFrame::build(&key, 1, &[], false));
        let big = Bytes::from(format!("\"{}\"", "x".repeat(2048)));
        let fan = registry.fan_out(
            &key,
            &PushFrame::build(&key, 2, &[big], false),
            Audience::All,
        );
        assert_eq!(fan.delivered, 0, "the queue overflowed");
        assert_eq!(metrics.slow_client_closes_total.load(Relaxed), 0);
        // What the session's loop does when it finds the queue closed.
        let reason = conn.outbox.drain(&mut Vec::new());
        assert_eq!(reason, Some(CloseReason::Overflow));
        assert_eq!(slow_client(&metrics, &conn).0, CLOSE_SLOW_CLIENT);
        assert_eq!(metrics.slow_client_closes_total.load(Relaxed), 1);
    }

    #[test]
    fn frames_become_text_messages_unchanged() {
        let frame = FrameText::from(String::from(r#"{"action":"push"}"#));
        let Message::Text(text) = text_message(frame) else {
            panic!("a text message expected")
        };
        assert_eq!(text.as_str(), r#"{"action":"push"}"#);
    }

    #[test]
    fn rate_limit_allows_the_burst_then_the_rate() {
        let start = Instant::now();
        let mut limit = RateLimit::new(10, 3, start);
        assert!((0..3).all(|_| limit.allow(start)), "the burst passes");
        assert!(!limit.allow(start), "then nothing until tokens refill");
        assert!(
            limit.allow(start + Duration::from_millis(100)),
            "one per 100 ms"
        );
        assert!(!limit.allow(start + Duration::from_millis(150)));
        // Idle time refills up to the burst, not beyond.
        let later = start + Duration::from_secs(60);
        assert!((0..3).all(|_| limit.allow(later)));
        assert!(!limit.allow(later));
    }

    #[test]
    fn zero_rate_means_no_limit() {
        let start = Instant::now();
        let mut limit = RateLimit::new(0, 1, start);
        assert!((0..10_000).all(|_| limit.allow(start)));
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
        let pool = crate::resolving::pool::ResolverPool::new(
            &crate::config::ResolveConfig::default(),
            metrics.clone(),
        );
        let resolvers = Resolvers::new(pool, None, metrics.clone());
        let ctx = SessionContext::start(
            &config,
            registry.clone(),
            dispatcher,
            resolvers,
            metrics,
            "n".into(),
            &tasks,
        );
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
