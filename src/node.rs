//! Wiring of a node: starts each component from its config section, serves both ports, shuts down in order.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{
    bus::{Bus, BusError},
    config::{Config, ConfigError},
    dispatcher::Dispatcher,
    dispatcher::registry::Registry,
    grpc::auth::Auth,
    grpc::{self, EntitySyncService},
    ops::metrics::{Metrics, Stats},
    ops::tasks::Tasks,
    ops::tls,
    resolving::Resolvers,
    resolving::cluster::ClusterLink,
    resolving::pool::ResolverPool,
    resolving::relay::Relay,
    websocket::http::{self, HttpState},
    websocket::session::SessionContext,
    websocket::tokens::{JwksError, SubscribeTokens},
};

pub use crate::grpc::auth::TokensFileError;
pub use crate::ops::tls::TlsError;

/// Encoded descriptors of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = entity_sync_proto::FILE_DESCRIPTOR_SET;

/// The two listeners a node serves on (bind them to port 0 in tests).
pub struct Listeners {
    pub ws: TcpListener,
    pub grpc: TcpListener,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(#[source] tonic_reflection::server::Error),
    /// Its message already includes its causes (see [`BusError::kind`] to
    /// match on it): the error chain stops here, so that printing the chain
    /// does not repeat them.
    #[error("{0}")]
    Bus(BusError),
    #[error(transparent)]
    Credentials(#[from] TokensFileError),
    /// `--subscribe-token-jwks` does not load.
    #[error(transparent)]
    SubscribeTokenKeys(#[from] JwksError),
    /// A `--grpc-tls-*` or `--ws-tls-*` file is unreadable or unusable.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

impl From<BusError> for NodeError {
    fn from(err: BusError) -> Self {
        NodeError::Bus(err)
    }
}

/// A running node. [`Node::shutdown`] stops it gracefully; dropping it
/// stops it too, without waiting for the drain.
pub struct Node {
    ws_addr: SocketAddr,
    grpc_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    grpc_client_auth: bool,
    tasks: Tasks,
    bus: Bus,
    http: HttpState,
    shutdown_grace: Duration,
    auth: Auth,
    tokens: Option<SubscribeTokens>,
    /// Stops the node if it is dropped without a shutdown.
    guard: NodeDropGuard,
}

/// Stops a node's tasks when the [`Node`] goes away, the way mini-redis's
/// `DbDropGuard` stops its purge task: cancels the token every loop selects
/// on, and fails what waits for a resolver. Both are synchronous, so it
/// needs no runtime.
struct NodeDropGuard {
    tasks: Tasks,
    pool: ResolverPool,
}

impl Drop for NodeDropGuard {
    fn drop(&mut self) {
        self.tasks.token().cancel();
        self.pool.close();
    }
}

impl Node {
    /// Starts serving on `listeners` and returns once both ports accept.
    pub async fn start(listeners: Listeners, config: Config) -> Result<Node, NodeError> {
        config.validate()?;
        // Everything that can fail comes before the first task is spawned.
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(NodeError::Reflection)?;
        let grpc_tls = tls::grpc_acceptor(&config.grpc)?;
        let ws_tls = tls::ws_acceptor(&config.ws)?;
        let metrics_listener = match config.ws.metrics_addr {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        let metrics_addr = metrics_listener
            .as_ref()
            .map(TcpListener::local_addr)
            .transpose()?;
        let ws_addr = listeners.ws.local_addr()?;
        let grpc_addr = listeners.grpc.local_addr()?;
        config.grpc.check_exposure(grpc_addr)?;
        // The addresses actually bound (port 0 gets one from the system), before
        // anything that waits: what a parent process reads. Its own target, so
        // that a filter can let this one line through.
        tracing::info!(
            target: "entity_sync::node::listening",
            %ws_addr,
            %grpc_addr,
            metrics_addr = metrics_addr.map(tracing::field::display),
            "listening"
        );
        let auth = match &config.grpc.tokens_file {
            Some(path) => Auth::from_file(path)?,
            None => Auth::open(),
        };
        let tokens = match &config.ws.subscribe_token_jwks {
            Some(path) => Some(SubscribeTokens::load(
                path,
                config.ws.subscribe_token_audience.clone(),
            )?),
            None => None,
        };
        let hangups = (auth.enabled() || tokens.is_some())
            .then(hangup_signal)
            .transpose()?;
        let node_id: Arc<str> = if config.node_id.is_empty() {
            Arc::from(random_node_id())
        } else {
            Arc::from(config.node_id.as_str())
        };
        let tasks = Tasks::default();
        let metrics = Arc::new(Metrics::default());
        // The bus spawns its consumer only once it is connected: the last fallible step.
        let (bus, events, nats) =
            Bus::start(&config.nats, &node_id, metrics.clone(), &tasks).await?;

        let pool = ResolverPool::start(&config.resolve, metrics.clone(), &tasks);
        let guard = NodeDropGuard {
            tasks: tasks.clone(),
            pool: pool.clone(),
        };
        let nats_client = nats.clone();
        let link = nats.map(|client| {
            ClusterLink::start(
                client,
                &config.nats.prefix,
                config.resolve.timeout,
                &pool,
                &tasks,
            )
        });
        let resolvers = Resolvers::with_cache(
            pool.clone(),
            link,
            config.resolve.cache_max_bytes,
            metrics.clone(),
        );
        if config.nats.cluster_relay
            && let (Some(client), Some(feed)) = (&nats_client, bus.relay_feed(&tasks))
        {
            resolvers.set_relay(Relay::start(
                client.clone(),
                &config.nats.prefix,
                config.nats.relay_timeout,
                feed,
                resolvers.clone(),
                metrics.clone(),
                &tasks,
            ));
        }
        let registry = Registry::with_push_unchanged_rows(config.ws.push_unchanged_rows);
        let dispatcher = Dispatcher::start(
            &config.ws,
            registry.clone(),
            resolvers.clone(),
            bus.clone(),
            events,
            metrics.clone(),
            &tasks,
        );
        let sessions = SessionContext::start(
            &config.ws,
            dispatcher,
            metrics.clone(),
            node_id.clone(),
            tokens.clone(),
            &tasks,
        );
        let http = http::serve(
            listeners.ws,
            ws_tls,
            metrics_listener,
            sessions,
            bus.clone(),
        );
        if let Some(hangups) = hangups {
            reload_on_sighup(auth.clone(), tokens.clone(), hangups, &tasks);
        }
        let service = EntitySyncService::new(
            &config.grpc,
            auth.clone(),
            bus.clone(),
            pool,
            metrics,
            node_id.clone(),
            &tasks,
        );
        grpc::serve(listeners.grpc, grpc_tls, service, reflection).await;

        let grpc_client_auth = config.grpc.verifies_client_certs();
        tracing::info!(
            node.id = %node_id,
            %ws_addr,
            ws_path = %config.ws.path,
            ws_tls = config.ws.tls_identity().is_some(),
            %grpc_addr,
            grpc_tls = config.grpc.tls_identity().is_some(),
            grpc_client_auth,
            bus = bus.kind(),
            "node started"
        );
        Ok(Node {
            ws_addr,
            grpc_addr,
            metrics_addr,
            grpc_client_auth,
            tasks,
            bus,
            http,
            shutdown_grace: config.shutdown_grace,
            auth,
            tokens,
            guard,
        })
    }

    /// Reads `--grpc-tokens-file` again, as SIGHUP does: new tokens work at
    /// once, and the `Resolve` streams of removed (or narrowed) credentials
    /// end. A file that does not parse leaves the current credentials in
    /// force. Returns how many credentials are in force.
    pub fn reload_credentials(&self) -> Result<usize, TokensFileError> {
        self.auth.reload()
    }

    /// Reads `--subscribe-token-jwks` again, as SIGHUP does: tokens signed
    /// with new keys verify at once, with removed keys no longer. A file
    /// that does not load leaves the keys in force. Returns how many keys
    /// are in force; `None` without the flag.
    pub fn reload_subscribe_token_keys(&self) -> Option<Result<usize, JwksError>> {
        self.tokens.as_ref().map(SubscribeTokens::reload)
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Where `/metrics` is served when `--metrics-addr` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Whether the gRPC port verifies client certificates (mutual TLS,
    /// `--grpc-tls-client-ca`): every call then comes from a client holding a
    /// certificate the configured CA signed.
    pub fn grpc_client_auth(&self) -> bool {
        self.grpc_client_auth
    }

    /// Live registry and pool counts.
    pub fn stats(&self) -> Stats {
        self.http.stats()
    }

    /// Graceful shutdown: stop accepting, close websockets with 1001, end
    /// resolver streams, wait for every task, at most `shutdown_grace`.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        // Readiness, the listeners and every loop follow the token.
        self.tasks.token().cancel();
        self.guard.pool.close();
        self.bus.close().await;
        let tracker = self.tasks.tracker();
        tracker.close();
        if tokio::time::timeout(self.shutdown_grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?self.shutdown_grace,
                remaining = tracker.len(),
                "shutdown grace period passed; abandoning remaining tasks"
            );
        } else {
            tracing::info!("shutdown complete");
        }
    }
}

#[cfg(unix)]
type Hangups = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangups = ();

/// SIGHUP, installed before the node serves: once it is, a SIGHUP never
/// takes its default action (terminating the process).
fn hangup_signal() -> std::io::Result<Hangups> {
    #[cfg(unix)]
    return tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    #[cfg(not(unix))]
    Ok(())
}

/// Re-reads the tokens file and the subscribe-token JWKS (those configured)
/// on every SIGHUP until the node stops.
fn reload_on_sighup(auth: Auth, tokens: Option<SubscribeTokens>, hangups: Hangups, tasks: &Tasks) {
    #[cfg(unix)]
    {
        let mut hangups = hangups;
        let stop = tasks.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    received = hangups.recv() => if received.is_none() { return },
                }
                if auth.enabled()
                    && let Err(err) = auth.reload()
                {
                    tracing::error!(%err, "SIGHUP: the tokens file was not reloaded; the previous credentials stay in force");
                }
                if let Some(tokens) = &tokens
                    && let Err(err) = tokens.reload()
                {
                    tracing::error!(%err, "SIGHUP: the subscribe-token JWKS was not reloaded; the previous keys stay in force");
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (auth, tokens, hangups, tasks);
}

/// Runs a node until `shutdown` completes, then shuts it down gracefully.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let node = Node::start(listeners, config).await?;
    shutdown.await;
    node.shutdown().await;
    Ok(())
}

/// A node id for a node configured without one: 32 random bits, enough to
/// tell a cluster's nodes apart in logs and metrics.
fn random_node_id() -> String {
    format!("node-{:08x}", fastrand::u32(..))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

    use super::*;

    async fn listeners() -> Listeners {
        Listeners {
            ws: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    #[tokio::test]
    async fn dropping_a_node_stops_it() {
        let node = Node::start(listeners().await, Config::default())
            .await
            .unwrap();
        let url = format!("ws://{}/ws/entity-sync/", node.ws_addr());
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        drop(node);
        let closed = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("the session ends without a shutdown call");
        match closed {
            Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
            other => panic!("expected a 1001 close, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_invalid_config_is_refused_before_anything_starts() {
        let mut config = Config::default();
        config.resolve.batch_size = 0;
        let err = Node::start(listeners().await, config).await.err().unwrap();
        assert!(
            matches!(
                &err,
                NodeError::Config(ConfigError::Invalid {
                    flag: "--resolve-batch-size",
                    ..
                })
            ),
            "{err}"
        );
    }
}
