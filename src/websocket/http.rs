//! The HTTP side of the websocket port: the websocket upgrade, `/healthz`, `/readyz` and `/metrics`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{
    Router,
    extract::{ConnectInfo, Request, State, connect_info::Connected},
    http::{HeaderMap, HeaderValue, StatusCode, Version, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    serve::{IncomingStream, Listener, ListenerExt},
};
use futures_util::FutureExt;
use hyper_util::{rt::TokioIo, server::conn::auto::upgrade::downcast};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::{
    bus::Bus,
    config::WsConfig,
    ops::health,
    ops::metrics::{self, Live, Stats},
    ops::tasks::Tasks,
    ops::tls::TlsListener,
    websocket::admission::{self, Admission, Admitting, ConnInfo, Deadlined},
    websocket::session::{self, TlsIo, Upgraded},
};

/// State of the HTTP router: a cheap-clone handle.
#[derive(Clone)]
pub(crate) struct HttpState {
    sessions: Arc<session::SessionContext>,
    bus: Bus,
    next_conn: Arc<AtomicU64>,
    /// `--allowed-origins`, normalized. Empty: any origin.
    allowed_origins: Arc<[String]>,
    /// The port's connections: counts, caps, deadlines.
    admission: Admission,
}

impl HttpState {
    /// Live registry and pool counts.
    pub(crate) fn stats(&self) -> Stats {
        let registry = &self.sessions.registry;
        Stats {
            connections: registry.connections(),
            subscriptions: registry.subscriptions(),
            keys: registry.key_count(),
            resolvers: self.sessions.resolvers.local_count(),
        }
    }

    /// Accepting websockets while the node is not shutting down.
    fn ready(&self) -> bool {
        !self.sessions.tasks.is_cancelled()
    }

    /// What a scrape reads from the live node.
    fn live(&self) -> Live {
        let other: Arc<str> = Arc::from(metrics::OTHER_LABEL);
        let readiness = health::readiness(&self.sessions.tasks, &self.bus);
        Live {
            stats: self.stats(),
            bus_head: self.bus.head(),
            bus_connected: self.bus.is_connected(),
            bus_lag: self
                .bus
                .head()
                .saturating_sub(self.sessions.dispatcher.applied()),
            ready: readiness.is_ok(),
            not_ready: readiness.err(),
            bus_available: self.bus.is_connected() && self.bus.availability().is_ok(),
            resolver_streams: metrics::fold_resolver_names(
                self.sessions.resolvers.local_streams_by_name(),
                &other,
            ),
        }
    }
}

/// Serves the websocket port on `listener` (path, origins and limits from
/// the sessions' `WsConfig`) until the node shuts down; over TLS only when
/// `tls` is given.
pub(crate) fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    metrics_listener: Option<TcpListener>,
    sessions: Arc<session::SessionContext>,
    bus: Bus,
) -> HttpState {
    let config = &sessions.config;
    let tasks = sessions.tasks.clone();
    let state = HttpState {
        allowed_origins: config
            .allowed_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_string())
            .filter(|o| !o.is_empty())
            .collect(),
        next_conn: Arc::new(AtomicU64::new(1)),
        bus,
        sessions: sessions.clone(),
        admission: Admission::new(limits(config)),
    };
    let mut app = Router::new()
        .route(&config.path, get(upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    // `/metrics` on its own address, or beside the websockets.
    let metrics_only = Router::new().route("/metrics", get(metrics));
    match metrics_listener {
        Some(listener) => {
            let metrics_app = metrics_only
                .layer(middleware::from_fn(http1_once))
                .with_state(state.clone());
            // Scrapers only: no websockets, no read budget to share.
            let limits = admission::Limits {
                max_connections: 0,
                max_reading_bytes: 0,
                ..limits(config)
            };
            spawn_server(
                Admitting::new(listener, Admission::new(limits)),
                metrics_app,
                &tasks,
            );
        }
        None => app = app.merge(metrics_only),
    }
    let app = app
        .layer(middleware::from_fn(http1_once))
        .with_state(state.clone());
    // Pushes are small and latency matters: no Nagle delay. What a client
    // that stops reading holds in the kernel is bounded too (see
    // `send_buffer_bytes`), not left to the kernel's autotuning (4 MiB).
    let send_buffer = send_buffer_bytes(config.outbound_max_bytes);
    let listener = listener.tap_io(move |stream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, "cannot set TCP_NODELAY");
        }
        if let Err(err) = socket2::SockRef::from(&*stream).set_send_buffer_size(send_buffer) {
            tracing::debug!(%err, "cannot set SO_SNDBUF");
        }
    });
    // Every connection is counted, capped and deadlined from its accept
    // (see `admission`); TLS runs on top, so its handshake is too.
    let admitting = Admitting::new(listener, state.admission.clone());
    match tls {
        None => spawn_server(admitting, app, &tasks),
        Some(acceptor) => spawn_server(
            TlsListener::new(admitting, acceptor, config.handshake_timeout),
            app,
            &tasks,
        ),
    }
    state
}

/// The kernel send buffer asked for each connection: half the outbound
/// queue's bound, which Linux doubles (for its own bookkeeping) and caps at
/// `net.core.wmem_max`. A client that stops reading then holds at most
/// about `--outbound-max-bytes` in the kernel beside as much in its queue,
/// and what waits for it waits in the queue, where a newer push of a key
/// replaces an older one.
fn send_buffer_bytes(outbound_max_bytes: usize) -> usize {
    outbound_max_bytes / 2
}

/// The port's connection limits from `config`.
fn limits(config: &WsConfig) -> admission::Limits {
    admission::Limits {
        max_connections: config.max_connections,
        max_pending_per_address: config.max_pending_per_address,
        deadline: config.handshake_timeout,
        max_reading_bytes: config.max_reading_bytes,
    }
}

/// HTTP/1.1 only (hyper would also take HTTP/2 without TLS, h2c: many
/// requests on one connection, none of which a browser sends here), and one
/// request per connection unless it becomes a websocket: every other answer
/// closes the connection, so none idles between requests.
async fn http1_once(request: Request, next: Next) -> Response {
    if request.version() > Version::HTTP_11 {
        return (StatusCode::HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.1 only\n").into_response();
    }
    let mut response = next.run(request).await;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Runs axum on `listener` as a node task, until the node shuts down.
fn spawn_server<L>(listener: L, app: Router, tasks: &Tasks)
where
    L: Listener<Addr = SocketAddr>,
    for<'a> ConnInfo: Connected<IncomingStream<'a, L>>,
{
    let app = app.into_make_service_with_connect_info::<ConnInfo>();
    let shutdown = tasks.token().clone().cancelled_owned();
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        if let Err(err) = served {
            tracing::error!(%err, "websocket listener failed");
        }
    });
}

/// Answers a websocket upgrade (RFC 6455 section 4.2) and, once hyper hands
/// the connection over, serves it as a session.
async fn upgrade(
    ConnectInfo(info): ConnectInfo<ConnInfo>,
    State(state): State<HttpState>,
    mut request: Request,
) -> Response {
    let peer = info.peer;
    let headers = request.headers();
    if let Err(refusal) = check_upgrade(headers) {
        return refusal.into_response();
    }
    let Some(accept) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|key| tungstenite::handshake::derive_accept_key(key.as_bytes()))
    else {
        return (StatusCode::BAD_REQUEST, "Sec-WebSocket-Key missing\n").into_response();
    };
    if !state.ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN)
        && !state.allowed_origins.is_empty()
        && !state
            .allowed_origins
            .iter()
            .any(|allowed| allowed.as_bytes() == origin.as_bytes())
    {
        // The origin is the client's text: at debug level only, and the
        // refusal counted in a line at most once a second.
        tracing::debug!(%peer, origin = ?origin, "websocket refused: origin not allowed");
        state
            .admission
            .note_refusal("websocket upgrades refused: origin not allowed (--allowed-origins)");
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return (
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded\n",
        )
            .into_response();
    };
    let ctx = state.sessions.clone();
    // Decided when the connection was accepted (see `admission`): sockets
    // still handshaking count too, and concurrent upgrades cannot pass the
    // limit together.
    if !info.state.within_limit() {
        tracing::debug!(%peer, limit = ctx.config.max_connections, "connection refused: at --max-connections");
        state
            .admission
            .note_refusal("websocket upgrades refused: at --max-connections");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this node holds its maximum number of connections; try another\n",
        )
            .into_response();
    }
    let id = state.next_conn.fetch_add(1, Ordering::Relaxed);
    // Tracked from the moment the upgrade is answered (not when the session
    // starts), so a shutdown right after it still waits for the 1001 close.
    let token = ctx.tasks.tracker().token();
    // No longer deadlined or pending for its address: the session's own
    // timeouts (idle, write) take over.
    info.state.upgraded();
    let admitted = info.state;
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!(%peer, %err, "websocket upgrade failed");
                return;
            }
        };
        let Some(upgraded) = take_over(upgraded) else {
            tracing::error!(%peer, "websocket upgrade: the connection is of an unknown kind");
            return;
        };
        let span = tracing::info_span!("conn", conn.id = id, peer = %peer);
        // `map` holds the token beside the session future; an async block
        // would store the session's arguments and its future both. Opened
        // in the span, so its log lines carry the connection's id too.
        span.in_scope(|| session::serve(upgraded, ctx, id, peer, admitted))
            .map(move |()| drop(token))
            .instrument(span)
            .await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
        .header(header::UPGRADE, HeaderValue::from_static("websocket"))
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(axum::body::Body::empty())
        .expect("a valid response")
}

/// A websocket upgrade request, or why it is not one.
fn check_upgrade(headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "this is a websocket endpoint: send Connection: Upgrade and Upgrade: websocket\n",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|version| version.as_bytes() != b"13")
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Version must be 13\n",
        ));
    }
    Ok(())
}

/// The connection hyper served, as the session takes it over.
fn take_over(upgraded: hyper::upgrade::Upgraded) -> Option<Upgraded> {
    let upgraded = match downcast::<TokioIo<Deadlined<TcpStream>>>(upgraded) {
        Ok(parts) => {
            return Some(Upgraded::Tcp {
                socket: parts.io.into_inner().into_inner(),
                read_ahead: session::own_read_ahead(&parts.read_buf),
            });
        }
        Err(upgraded) => upgraded,
    };
    let parts = downcast::<TokioIo<TlsIo>>(upgraded).ok()?;
    Some(Upgraded::Tls {
        stream: Box::new(parts.io.into_inner()),
        read_ahead: session::own_read_ahead(&parts.read_buf),
    })
}

/// 200 `ready`, or 503 `not ready: REASON` (`draining`, `bus down`, `bus
/// unavailable`, `bus stalled`).
async fn readyz(State(state): State<HttpState>) -> Response {
    match health::readiness(&state.sessions.tasks, &state.bus) {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let body = state.sessions.metrics.render(state.live());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}
