//! The gRPC service `entitysync.v1.EntitySync`: `Notify` from backends, and their `Resolve` streams.

use std::{collections::HashMap, sync::Arc};

use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming, transport::server::TcpIncoming};
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};
use tracing::Instrument;

use crate::{
    auth::{Auth, Entities, Role, scoped_idempotency_key},
    bus::{Bus, BusError},
    config::GrpcConfig,
    key::ChangeKey,
    metrics::Metrics,
    proto::v1::{
        NodeMessage, NotifyRequest, NotifyResponse, Registered, ResolverMessage,
        entity_sync_server::{EntitySync, EntitySyncServer},
        node_message, resolver_message,
    },
    resolver::{RegisterError, Resolved, ResolverPool, read_key_result},
    tasks::Tasks,
    trace::{ChangeMeta, TRACE_ID_HEADER, TraceId},
};

/// Longest idempotency key accepted, in bytes.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// The service implementation; one per node. Backends' `Resolve` streams
/// register in the local resolver pool.
pub(crate) struct EntitySyncService {
    config: GrpcConfig,
    auth: Auth,
    bus: Bus,
    pool: ResolverPool,
    metrics: Arc<Metrics>,
    node_id: Arc<str>,
    tasks: Tasks,
}

impl EntitySyncService {
    pub(crate) fn new(
        config: &GrpcConfig,
        auth: Auth,
        bus: Bus,
        pool: ResolverPool,
        metrics: Arc<Metrics>,
        node_id: Arc<str>,
        tasks: &Tasks,
    ) -> Self {
        Self {
            config: config.clone(),
            auth,
            bus,
            pool,
            metrics,
            node_id,
            tasks: tasks.clone(),
        }
    }
}

/// Serves the gRPC port on `listener` with `server` (plaintext or TLS, see
/// `tls::grpc_server`) until the node shuts down: `service`,
/// standard health (NOT_SERVING while the bus is down and as soon as
/// shutdown starts, so load balancers move on) and `reflection`.
pub(crate) async fn serve<R: ServerReflection>(
    listener: TcpListener,
    mut server: tonic::transport::Server,
    service: EntitySyncService,
    reflection: ServerReflectionServer<R>,
) {
    let tasks = service.tasks.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<EntitySyncServer<EntitySyncService>>()
        .await;
    crate::health::follow_readiness(
        health,
        &[<EntitySyncServer<EntitySyncService> as tonic::server::NamedService>::NAME],
        service.bus.clone(),
        &tasks,
    );
    // Small messages, latency matters: no Nagle delay.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let shutdown = tasks.token().clone().cancelled_owned();
    tasks.spawn(async move {
        let served = server
            .add_service(health_service)
            .add_service(reflection)
            .add_service(EntitySyncServer::new(service))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        if let Err(err) = served {
            tracing::error!(%err, "gRPC server failed");
        }
    });
}

impl From<BusError> for Status {
    fn from(err: BusError) -> Self {
        Status::unavailable(format!("the bus did not store the keys: {err}"))
    }
}

impl From<RegisterError> for Status {
    fn from(err: RegisterError) -> Self {
        match err {
            RegisterError::Invalid(m) => Status::invalid_argument(m),
            RegisterError::Conflict(m) => Status::failed_precondition(m),
            RegisterError::Full(m) => Status::resource_exhausted(m),
            RegisterError::Closed => Status::unavailable("the node is shutting down"),
        }
    }
}

#[tonic::async_trait]
impl EntitySync for EntitySyncService {
    async fn notify(
        &self,
        request: Request<NotifyRequest>,
    ) -> Result<Response<NotifyResponse>, Status> {
        let granted = self.auth.check(request.metadata(), Role::Notifier)?;
        let (trace, junk) = TraceId::from_metadata(request.metadata());
        if junk {
            // The header's text is the caller's: never logged.
            tracing::debug!(trace_id = %trace, "Notify: unusable trace id header ignored");
        }
        // Accepted now: the notify-to-push latency starts here.
        let meta = ChangeMeta::accepted_now(trace);
        // Without a token, a verified client certificate scopes the key (a
        // reference-counted handle: nothing is copied unless it is used).
        let peer_certs = request.peer_certs();
        let request = request.into_inner();
        if request.keys.is_empty() {
            return Err(Status::invalid_argument("keys must not be empty"));
        }
        if request.keys.len() > self.config.max_notify_keys {
            return Err(Status::invalid_argument(format!(
                "{} keys in one call; the limit is {}",
                request.keys.len(),
                self.config.max_notify_keys
            )));
        }
        if request.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(Status::invalid_argument(format!(
                "idempotency_key is longer than {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
            )));
        }
        let keys = request
            .keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                ChangeKey::new(&k.entity, &k.id)
                    .map_err(|err| Status::invalid_argument(format!("keys[{i}]: {err}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let count = keys.len() as u64;
        let idempotency_key = scoped_idempotency_key(
            &granted,
            peer_certs
                .as_ref()
                .and_then(|certs| certs.first())
                .map(|c| c.as_ref()),
            &request.idempotency_key,
        );
        let receipt = self
            .bus
            .publish(keys, &idempotency_key, meta)
            .await
            .inspect_err(|err| tracing::debug!(trace_id = %trace, %err, "Notify failed"))?;
        tracing::debug!(
            trace_id = %trace,
            keys = count,
            first_seq = receipt.sequences.first().copied().unwrap_or(0),
            duplicate = receipt.duplicate,
            "notify accepted"
        );
        if receipt.duplicate {
            Metrics::inc(&self.metrics.notify_duplicates_total);
        } else {
            self.metrics
                .notify_keys_total
                .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        }
        let mut response = Response::new(NotifyResponse {
            accepted: receipt.sequences.len() as u32,
            sequences: receipt.sequences,
            duplicate: receipt.duplicate,
        });
        if let Ok(value) = trace.to_string().parse() {
            response.metadata_mut().insert(TRACE_ID_HEADER, value);
        }
        Ok(response)
    }

    type ResolveStream = ReceiverStream<Result<NodeMessage, Status>>;

    async fn resolve(
        &self,
        request: Request<Streaming<ResolverMessage>>,
    ) -> Result<Response<Self::ResolveStream>, Status> {
        let granted = self.auth.check(request.metadata(), Role::Resolver)?;
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.config.register_timeout, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "no Register within {:?} of opening the stream",
                    self.config.register_timeout
                ))
            })??;
        let register = match first.and_then(|m| m.kind) {
            Some(resolver_message::Kind::Register(register)) => register,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message on a Resolve stream must be Register",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "stream ended (or sent an empty message) before Register",
                ));
            }
        };
        if let Some(credential) = &granted {
            if let Some(entity) = register
                .entities
                .iter()
                .find(|e| !credential.entities.allows(&e.entity))
            {
                tracing::info!(token.id = %credential.id, entity = %entity.entity, "Register refused: entity not allowed for the token");
                return Err(Status::permission_denied(format!(
                    "this token may not register entity {:?}",
                    entity.entity
                )));
            }
            // A pass-through backend receives every client's messages and
            // secrets: only a credential trusted with every entity may.
            if register.pass_through && credential.entities != Entities::All {
                return Err(Status::permission_denied(
                    "pass-through needs a resolver token for every entity (`*`)",
                ));
            }
        }
        let mut revocations = self.auth.watch();
        let id = self.pool.allocate_id();
        let (tx, rx) = mpsc::channel(self.pool.channel_capacity(&register));
        // Registered goes first, before the pool can send any request.
        tx.try_send(Ok(NodeMessage {
            kind: Some(node_message::Kind::Registered(Registered {
                node_id: self.node_id.to_string(),
                resolver_id: id.to_string(),
            })),
        }))
        .expect("a fresh channel has room");
        self.pool.register(id, &register, tx.clone())?;
        let entities: Vec<&str> = register
            .entities
            .iter()
            .map(|e| e.entity.as_str())
            .collect();
        let token_id = granted.as_ref().map(|c| c.id.clone());
        let span = tracing::info_span!(
            "resolver",
            resolver.id = id,
            resolver.name = %register.name,
            token.id = token_id.as_deref().unwrap_or("-"),
        );
        span.in_scope(|| {
            tracing::info!(
                ?peer,
                ?entities,
                pass_through = register.pass_through,
                "resolver registered"
            );
        });
        let pool = self.pool.clone();
        let tasks = self.tasks.clone();
        self.tasks.spawn(
            async move {
                let ended = loop {
                    let message = tokio::select! {
                        _ = tasks.cancelled() => break "node shutting down",
                        // The tokens file was reloaded: a removed or narrowed
                        // credential loses its stream.
                        changed = async { revocations.as_mut().expect("guarded").changed().await },
                            if revocations.is_some() =>
                        {
                            let still = changed.is_ok()
                                && granted.as_ref().is_none_or(|c| {
                                    c.still_in(&revocations.as_mut().expect("guarded").borrow_and_update())
                                });
                            if still {
                                continue;
                            }
                            let _ = tx
                                .send(Err(Status::permission_denied(
                                    "the credential of this stream was revoked",
                                )))
                                .await;
                            break "credential revoked";
                        }
                        message = inbound.message() => message,
                    };
                    match message {
                        Ok(Some(ResolverMessage {
                            kind: Some(resolver_message::Kind::Response(response)),
                        })) => {
                            let results: HashMap<String, Resolved> = response
                                .results
                                .into_iter()
                                .map(|r| (r.id.clone(), read_key_result(r)))
                                .collect();
                            pool.complete(id, response.request_id, results);
                        }
                        Ok(Some(ResolverMessage {
                            kind: Some(resolver_message::Kind::Register(_)),
                        })) => {
                            let _ = tx
                                .send(Err(Status::invalid_argument(
                                    "Register may be sent only once per stream",
                                )))
                                .await;
                            break "protocol error: second Register";
                        }
                        Ok(Some(ResolverMessage {
                            kind: Some(resolver_message::Kind::Drain(_)),
                        })) => {
                            tracing::info!("resolver draining: no more requests on this stream");
                            pool.drain(id);
                        }
                        Ok(Some(ResolverMessage { kind: None })) => {}
                        Ok(None) => break "backend closed the stream",
                        Err(status) => {
                            tracing::debug!(%status, "resolver stream error");
                            break "stream error";
                        }
                    }
                };
                pool.deregister(id);
                tracing::info!(reason = ended, "resolver stream ended");
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
