//! The gRPC service `entitysync.v1.EntitySync`: `Notify` from backends, and their `Resolve` streams; the port's limits.

pub(crate) mod auth;
mod gate;
mod listener;
mod notify;
mod quota;
mod resolve;
mod service;

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};

use crate::proto::v1::{
    NodeMessage, NotifyRequest, NotifyResponse, ResolverMessage,
    entity_sync_server::{EntitySync, EntitySyncServer},
};
use notify::notify_message_limit;
use resolve::MAX_RESOLVER_MESSAGE_BYTES;
pub(crate) use service::EntitySyncService;

/// Largest health or reflection request: a service or symbol name, a few
/// bytes. These answer without a token, so a larger message is refused
/// from its length prefix rather than buffered.
const MAX_OPEN_MESSAGE_BYTES: usize = 4 * 1024;

/// Serves the gRPC port on `listener` (plaintext, or TLS with `tls`, see
/// `tls::grpc_acceptor`) until the node shuts down: `service` behind its
/// credential gate, standard health (NOT_SERVING while the bus is down and
/// as soon as shutdown starts, so load balancers move on) and `reflection`.
///
/// The port's limits: connections and handshakes under way are capped and
/// a handshake has a deadline (`listener`); each connection may carry
/// --grpc-max-concurrent-streams calls, is pinged every
/// --grpc-keepalive-interval, and is asked to go away at
/// --grpc-max-connection-age.
pub(crate) async fn serve<R: ServerReflection>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: EntitySyncService,
    reflection: ServerReflectionServer<R>,
) {
    let tasks = service.tasks.clone();
    let config = service.config.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<EntitySyncServer<EntitySyncService>>()
        .await;
    crate::ops::health::follow_readiness(
        health,
        &[<EntitySyncServer<EntitySyncService> as tonic::server::NamedService>::NAME],
        service.bus.clone(),
        &tasks,
    );
    let auth = service.auth.clone();
    let service = Arc::new(service);
    let gate = gate::Gate::new(
        auth,
        EntitySyncServer::from_arc(service.clone())
            .max_decoding_message_size(notify_message_limit(config.max_notify_keys)),
        EntitySyncServer::from_arc(service).max_decoding_message_size(MAX_RESOLVER_MESSAGE_BYTES),
    );
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_connection_age(config.max_connection_age)
        .add_service(health_service.max_decoding_message_size(MAX_OPEN_MESSAGE_BYTES))
        .add_service(reflection.max_decoding_message_size(MAX_OPEN_MESSAGE_BYTES))
        .add_service(gate);
    let shutdown = tasks.token().clone().cancelled_owned();
    let incoming_tasks = tasks.clone();
    tasks.spawn(async move {
        let served = match tls {
            None => {
                let incoming = listener::plaintext(listener, &config, &incoming_tasks);
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
            Some(acceptor) => {
                let incoming = listener::tls(listener, acceptor, &config, &incoming_tasks);
                router
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
            }
        };
        if let Err(err) = served {
            tracing::error!(%err, "gRPC server failed");
        }
    });
}

#[tonic::async_trait]
impl EntitySync for EntitySyncService {
    async fn notify(
        &self,
        request: Request<NotifyRequest>,
    ) -> Result<Response<NotifyResponse>, Status> {
        self.handle_notify(request).await
    }

    type ResolveStream = ReceiverStream<Result<NodeMessage, Status>>;

    async fn resolve(
        &self,
        request: Request<Streaming<ResolverMessage>>,
    ) -> Result<Response<Self::ResolveStream>, Status> {
        self.open_resolve(request).await
    }
}
