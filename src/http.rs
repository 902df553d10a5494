//! The HTTP side of the websocket port: the websocket upgrade, `/healthz`, `/readyz` and `/metrics`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use axum::{
    Router,
    extract::{ConnectInfo, State, WebSocketUpgrade},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures_util::FutureExt;
use tracing::Instrument;

use crate::{bus::Bus, metrics::Stats, resolver::ResolverPool, session};

/// Read buffer of each websocket, in bytes. tungstenite allocates it up front
/// and zero-fills it on every read, so it is small on purpose: client messages
/// are small, and idle connections should cost little memory. Larger messages
/// still arrive (the buffer grows for them).
pub const WS_READ_BUFFER_BYTES: usize = 512;
/// Bytes of queued frames after which a write goes out before the batch ends.
pub const WS_WRITE_BUFFER_BYTES: usize = 4096;
/// Hard cap on one client frame, as a multiple of `max_message_bytes`; above
/// it the connection is closed with 1009 instead of getting an error frame.
pub const HARD_CAP_FACTOR: usize = 16;

/// State of the HTTP router.
#[derive(Clone)]
pub struct HttpState {
    pub session: Arc<session::SessionContext>,
    pub bus: Bus,
    pub pool: ResolverPool,
    pub ready: Arc<AtomicBool>,
    pub next_conn: Arc<AtomicU64>,
    /// 0: unlimited.
    pub max_connections: usize,
    /// Empty: any origin.
    pub allowed_origins: Arc<[String]>,
    pub tracker: tokio_util::task::TaskTracker,
}

impl HttpState {
    pub fn stats(&self) -> Stats {
        let registry = &self.session.registry;
        Stats {
            connections: registry.connections(),
            subscriptions: registry.subscriptions(),
            keys: registry.key_count(),
            resolvers: self.pool.resolver_count(),
        }
    }
}

pub fn router(ws_path: &str, state: HttpState) -> Router {
    Router::new()
        .route(ws_path, get(upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(state): State<HttpState>,
    headers: HeaderMap,
) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN)
        && !state.allowed_origins.is_empty()
        && !state
            .allowed_origins
            .iter()
            .any(|allowed| allowed.as_bytes() == origin.as_bytes())
    {
        tracing::info!(%peer, origin = ?origin, "websocket refused: origin not allowed");
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    let ctx = state.session.clone();
    if state.max_connections > 0 && ctx.registry.connections() >= state.max_connections {
        tracing::warn!(%peer, limit = state.max_connections, "connection refused: at --max-connections");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this node holds its maximum number of connections; try another\n",
        )
            .into_response();
    }
    let id = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let hard_cap = ctx.max_message_bytes.saturating_mul(HARD_CAP_FACTOR);
    // Tracked from the moment the upgrade is answered (not when the session
    // starts), so a shutdown right after it still waits for the 1001 close.
    let token = state.tracker.token();
    ws.read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(WS_WRITE_BUFFER_BYTES)
        .max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        .on_upgrade(move |socket| {
            let span = tracing::info_span!("conn", conn.id = id, peer = %peer);
            // `map` holds the token beside the session future; an async
            // block would store the session's arguments and its future both,
            // ~0.5 kB more per connection.
            session::serve(socket, ctx, id, peer)
                .map(move |()| drop(token))
                .instrument(span)
        })
}

async fn readyz(State(state): State<HttpState>) -> Response {
    if !state.ready.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if !state.bus.is_connected() {
        (StatusCode::SERVICE_UNAVAILABLE, "bus disconnected\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let body =
        state
            .session
            .metrics
            .render(state.stats(), state.bus.head(), state.bus.is_connected());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
