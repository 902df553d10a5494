//! The gRPC service `entitysync.v1.EntitySync`: `Notify` from backends, and their `Resolve` streams.

use std::{collections::HashMap, sync::Arc, time::Duration};

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
/// Most of a caller's deadline a `Notify` keeps for its answer's way back.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// The deadline a caller sent with its call (`grpc-timeout`: at most 8
/// digits and a unit), if any.
fn call_deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long a `Notify` under `deadline` may wait for the bus: a tenth less
/// (at most [`DEADLINE_MARGIN`]), so that DEADLINE_EXCEEDED reaches the
/// caller before its own timer, and before the gRPC server's own end of the
/// call at that deadline (CANCELLED "Timeout expired", which says less).
fn bus_budget(deadline: Duration) -> Duration {
    deadline - (deadline / 10).min(DEADLINE_MARGIN)
}

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
        let deadline = call_deadline(request.metadata());
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
        let publish = self.bus.publish(keys, &idempotency_key, meta);
        let published = match deadline {
            // A publish cut short may have stored some keys: the caller's
            // retry under the same idempotency key stores the rest once.
            Some(deadline) => tokio::time::timeout(bus_budget(deadline), publish)
                .await
                .map_err(|_| {
                    tracing::debug!(trace_id = %trace, ?deadline, "Notify: the bus did not answer within the call's deadline");
                    Status::deadline_exceeded(
                        "the bus did not store the keys within the call's deadline; retry with the same idempotency key",
                    )
                })?,
            None => publish.await,
        };
        let receipt = published
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

#[cfg(test)]
mod tests {
    use super::*;

    fn deadline_of(value: &str) -> Option<Duration> {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grpc-timeout", value.parse().unwrap());
        call_deadline(&metadata)
    }

    #[test]
    fn call_deadlines_are_read_in_every_unit_and_junk_is_none() {
        assert_eq!(deadline_of("2S"), Some(Duration::from_secs(2)));
        assert_eq!(deadline_of("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(deadline_of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(deadline_of("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(deadline_of("250u"), Some(Duration::from_micros(250)));
        assert_eq!(
            deadline_of("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for junk in ["", "S", "123456789S", "12x", "-1S", "1.5S", "+5S"] {
            assert_eq!(deadline_of(junk), None, "{junk:?}");
        }
        assert_eq!(call_deadline(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn the_bus_gets_the_deadline_less_a_margin_for_the_answer() {
        assert_eq!(
            bus_budget(Duration::from_secs(2)),
            Duration::from_millis(1900)
        );
        assert_eq!(
            bus_budget(Duration::from_millis(300)),
            Duration::from_millis(270)
        );
        assert_eq!(bus_budget(Duration::ZERO), Duration::ZERO);
    }
}
