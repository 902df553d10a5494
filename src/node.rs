//! Wiring of a node: builds the bus, registry, resolver pool and dispatcher, serves both ports, shuts down in order.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::server::TcpIncoming;

use crate::{
    bus::{Bus, BusError, JetStreamBus, JetStreamConfig, MemoryBus},
    cluster::{self, ClusterLink},
    config::Config,
    dispatcher::Dispatcher,
    grpc::EntitySyncService,
    http::{self, HttpState},
    metrics::{Metrics, Stats},
    proto::v1::entity_sync_server::EntitySyncServer,
    registry::Registry,
    resolver::{PoolConfig, ResolverPool},
    session::SessionContext,
};

/// Encoded descriptors of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("entitysync_descriptor");

/// The two listeners a node serves on (bind them to port 0 in tests).
pub struct Listeners {
    pub ws: TcpListener,
    pub grpc: TcpListener,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// A running node. Dropping it does not stop it; call [`Node::shutdown`].
pub struct Node {
    ws_addr: SocketAddr,
    grpc_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
    state: HttpState,
    config: Config,
}

impl Node {
    /// Starts serving on `listeners` and returns once both ports accept.
    pub async fn start(listeners: Listeners, config: Config) -> Result<Node, NodeError> {
        config.validate().map_err(NodeError::Config)?;
        // Everything that can fail comes before the first task is spawned.
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|err| NodeError::Reflection(err.to_string()))?;
        let ws_addr = listeners.ws.local_addr()?;
        let grpc_addr = listeners.grpc.local_addr()?;
        let node_id: Arc<str> = if config.node_id.is_empty() {
            Arc::from(random_node_id())
        } else {
            Arc::from(config.node_id.as_str())
        };
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::new();
        let (bus, events, link) = match &config.nats_url {
            None => {
                let (memory, events) = MemoryBus::new();
                (Bus::InProcess(memory), events, None)
            }
            Some(urls) => {
                let js_config = JetStreamConfig {
                    urls: urls.clone(),
                    prefix: config.nats_prefix.clone(),
                    replicas: config.nats_replicas,
                    max_age: config.nats_max_age,
                    max_bytes: config.nats_max_bytes,
                    credentials_file: config.nats_creds.clone(),
                    token: config.nats_token.clone(),
                    tls_ca: config.nats_tls_ca.clone(),
                    tls_cert: config.nats_tls_cert.clone(),
                    tls_key: config.nats_tls_key.clone(),
                    require_tls: config.nats_require_tls,
                    node_id: node_id.to_string(),
                    connect_timeout: std::time::Duration::from_secs(5),
                };
                let (js, events, client) =
                    JetStreamBus::connect(&js_config, metrics.clone(), cancel.clone(), &tracker)
                        .await?;
                let link = ClusterLink::new(client, &config.nats_prefix, config.resolve_timeout);
                (Bus::JetStream(js), events, Some(link))
            }
        };
        let pool = ResolverPool::new(
            PoolConfig {
                batch_size: config.resolve_batch_size,
                timeout: config.resolve_timeout,
                default_max_in_flight: config.default_max_in_flight,
            },
            metrics.clone(),
            link.clone(),
        );
        if let Some(link) = link {
            tracker.spawn(cluster::serve(
                link,
                pool.clone(),
                pool.watch_entities(),
                cancel.clone(),
                tracker.clone(),
            ));
        }
        let dispatcher = Dispatcher::new(
            registry.clone(),
            pool.clone(),
            bus.clone(),
            metrics.clone(),
            tracker.clone(),
            cancel.clone(),
            config.compat_bare_rows,
        );
        tracker.spawn(dispatcher.clone().run(events));
        tracker.spawn(pool.clone().run_deadlines(cancel.clone()));

        let (ping_tx, ping) = tokio::sync::watch::channel(());
        let ping_cancel = cancel.clone();
        let ping_interval = config.ping_interval;
        tracker.spawn(async move {
            let mut interval = tokio::time::interval(ping_interval);
            interval.tick().await;
            loop {
                tokio::select! {
                    _ = ping_cancel.cancelled() => return,
                    _ = interval.tick() => ping_tx.send_replace(()),
                }
            }
        });
        let session = Arc::new(SessionContext {
            registry,
            dispatcher,
            pool: pool.clone(),
            metrics: metrics.clone(),
            cancel: cancel.clone(),
            node_id: node_id.clone(),
            max_message_bytes: config.max_message_bytes,
            max_message_rate: config.max_message_rate,
            max_message_burst: config.max_message_burst,
            max_subscriptions: config.max_subscriptions,
            outbound_max_bytes: config.outbound_max_bytes,
            ping,
            idle_timeout: config.idle_timeout,
            bare_rows: config.compat_bare_rows,
        });
        let state = HttpState {
            session,
            bus: bus.clone(),
            pool: pool.clone(),
            ready: Arc::new(AtomicBool::new(true)),
            next_conn: Arc::new(AtomicU64::new(1)),
            max_connections: config.max_connections,
            allowed_origins: config
                .allowed_origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            tracker: tracker.clone(),
        };

        // HTTP + websocket.
        let app = http::router(&config.ws_path, state.clone())
            .into_make_service_with_connect_info::<SocketAddr>();
        let http_cancel = cancel.clone();
        // Pushes are small and latency matters: no Nagle delay on either port.
        let ws_listener = listeners.ws.tap_io(|stream| {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(%err, "cannot set TCP_NODELAY");
            }
        });
        tracker.spawn(async move {
            let served = axum::serve(ws_listener, app)
                .with_graceful_shutdown(http_cancel.cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::error!(%err, "websocket listener failed");
            }
        });

        // gRPC: the service, health and reflection.
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<EntitySyncServer<EntitySyncService>>()
            .await;
        let service = EntitySyncService {
            bus: bus.clone(),
            pool: pool.clone(),
            metrics: metrics.clone(),
            node_id: node_id.clone(),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
            max_notify_keys: config.max_notify_keys,
            register_timeout: config.register_timeout,
        };
        let grpc_cancel = cancel.clone();
        let incoming = TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
        tracker.spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(reflection)
                .add_service(EntitySyncServer::new(service))
                .serve_with_incoming_shutdown(incoming, grpc_cancel.cancelled_owned())
                .await;
            if let Err(err) = served {
                tracing::error!(%err, "gRPC server failed");
            }
        });
        // Mark NOT_SERVING as soon as shutdown starts, so load balancers move on.
        let health_cancel = cancel.clone();
        tracker.spawn(async move {
            health_cancel.cancelled().await;
            health
                .set_not_serving::<EntitySyncServer<EntitySyncService>>()
                .await;
        });

        tracing::info!(node.id = %node_id, %ws_addr, ws_path = %config.ws_path, %grpc_addr, bus = bus.kind(), "node started");
        Ok(Node {
            ws_addr,
            grpc_addr,
            cancel,
            tracker,
            state,
            config,
        })
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Live registry and pool counts.
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Graceful shutdown: stop accepting, close websockets with 1001, end
    /// resolver streams, wait for every task, at most `shutdown_grace`.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        self.state.ready.store(false, Ordering::Release);
        self.cancel.cancel();
        self.state.pool.close();
        self.state.bus.close().await;
        self.tracker.close();
        if tokio::time::timeout(self.config.shutdown_grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = ?self.config.shutdown_grace,
                remaining = self.tracker.len(),
                "shutdown grace period passed; abandoning remaining tasks"
            );
        } else {
            tracing::info!("shutdown complete");
        }
    }
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

fn random_node_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    let n = RandomState::new().hash_one(std::time::SystemTime::now());
    format!("node-{:08x}", n as u32)
}
