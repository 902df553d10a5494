//! The gRPC service `entitysync.v1.EntitySync`: `Notify` from backends, and their `Resolve` streams; the port's limits.

pub(crate) mod auth;
mod gate;
mod listener;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};
use tracing::Instrument;

use crate::{
    bus::{Bus, BusError},
    config::GrpcConfig,
    grpc::auth::{Auth, Entities, Granted, Role, TokenSet, certificate_id, scoped_idempotency_key},
    key::{ChangeKey, MAX_KEY_PART_BYTES},
    ops::metrics::Metrics,
    ops::tasks::Tasks,
    ops::trace::{ChangeMeta, TRACE_ID_HEADER, TraceId},
    proto::v1::{
        NodeMessage, NotifyRequest, NotifyResponse, Registered, ResolverMessage,
        entity_sync_server::{EntitySync, EntitySyncServer},
        node_message, resolver_message,
    },
    resolving::pool::{RegisterError, Resolved, ResolverPool, read_key_result},
};

/// Longest idempotency key accepted, in bytes.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Most of a caller's deadline a `Notify` keeps for its answer's way back.
const DEADLINE_MARGIN: Duration = Duration::from_millis(100);
/// Largest message a backend may send on its `Resolve` stream: a
/// `ResolveResponse` carries the rows of up to --resolve-batch-size ids, so
/// this is what one batch's rows may weigh (tonic's default, made explicit).
const MAX_RESOLVER_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest health or reflection request: a service or symbol name, a few
/// bytes. These answer without a token, so a larger message is refused
/// from its length prefix rather than buffered.
const MAX_OPEN_MESSAGE_BYTES: usize = 4 * 1024;
/// Room in a `Notify` bound for fields a newer client may add.
const NOTIFY_SLACK_BYTES: usize = 1024;

/// Largest `NotifyRequest` that can be valid with `max_notify_keys` keys:
/// each key at most two parts of [`MAX_KEY_PART_BYTES`] with their protobuf
/// tags and lengths (3 bytes each, and 3 for the key itself), the
/// idempotency key the same way. tonic refuses a larger message from its
/// length prefix (RESOURCE_EXHAUSTED), before reading it.
fn notify_message_limit(max_notify_keys: usize) -> usize {
    let per_key = 3 + 2 * (3 + MAX_KEY_PART_BYTES);
    max_notify_keys
        .saturating_mul(per_key)
        .saturating_add(3 + MAX_IDEMPOTENCY_KEY_BYTES + NOTIFY_SLACK_BYTES)
}

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
    quotas: StreamQuotas,
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
            quotas: StreamQuotas::new(config.max_resolver_streams_per_credential),
            auth,
            bus,
            pool,
            metrics,
            node_id,
            tasks: tasks.clone(),
        }
    }
}

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

/// `token.id` of a call's credential for logs ("-" without tokens).
fn token_id(granted: &Granted) -> &str {
    granted.as_ref().map_or("-", |c| c.id.as_str())
}

/// What a stream whose credential was removed (or narrowed) is told.
fn revoked_status() -> Status {
    Status::permission_denied("the credential of this stream was revoked")
}

/// Whether the credentials in force no longer hold `granted` (marking
/// them seen, so [`revocation`] waits for the next reload).
fn revoked_now(
    revocations: &mut Option<watch::Receiver<Arc<TokenSet>>>,
    granted: &Granted,
) -> bool {
    match (revocations, granted) {
        (Some(current), Some(credential)) => !credential.still_in(&current.borrow_and_update()),
        _ => false,
    }
}

/// Completes once a reload removes or narrows `granted` (never without
/// tokens). Cancel-safe: it only waits on the watch.
async fn revocation(revocations: &mut Option<watch::Receiver<Arc<TokenSet>>>, granted: &Granted) {
    let (Some(current), Some(credential)) = (revocations.as_mut(), granted) else {
        return std::future::pending().await;
    };
    loop {
        // The sender lives as long as the node's `Auth`: gone, nothing is allowed.
        if current.changed().await.is_err() || !credential.still_in(&current.borrow_and_update()) {
            return;
        }
    }
}

/// Whom a `Resolve` stream counts against for
/// --max-resolver-streams-per-credential: its token; without one, its
/// client certificate; without either (an open port), its peer's IP address.
fn quota_key(
    granted: &Granted,
    peer_certs: Option<&Vec<tonic::transport::CertificateDer<'static>>>,
    peer: Option<SocketAddr>,
) -> String {
    if let Some(credential) = granted {
        return format!("token {}", credential.id);
    }
    if let Some(cert) = peer_certs.and_then(|certs| certs.first()) {
        return format!("certificate {}", certificate_id(cert));
    }
    match peer {
        Some(peer) => format!("address {}", peer.ip()),
        None => "unknown".to_owned(),
    }
}

/// `Resolve` streams held per credential (see [`quota_key`]); a cheap-clone handle.
#[derive(Clone)]
struct StreamQuotas {
    held: Arc<Mutex<HashMap<String, usize>>>,
    max: usize,
}

/// One stream's place in its credential's quota, given back on drop.
struct QuotaSlot {
    quotas: StreamQuotas,
    key: String,
}

impl StreamQuotas {
    fn new(max: usize) -> Self {
        StreamQuotas {
            held: Arc::default(),
            max,
        }
    }

    /// A slot for `key`, or RESOURCE_EXHAUSTED naming the flag.
    fn take(&self, key: String) -> Result<QuotaSlot, Status> {
        let mut held = self.held.lock().unwrap();
        let count = held.entry(key.clone()).or_default();
        if *count >= self.max {
            tracing::info!(credential = %key, max = self.max, "Register refused: the credential holds its maximum of resolver streams");
            return Err(Status::resource_exhausted(format!(
                "this credential holds its maximum of {} resolver streams on this node \
                 (--max-resolver-streams-per-credential)",
                self.max
            )));
        }
        *count += 1;
        Ok(QuotaSlot {
            quotas: self.clone(),
            key,
        })
    }
}

impl Drop for QuotaSlot {
    fn drop(&mut self) {
        let mut held = self.quotas.held.lock().unwrap();
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
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

impl EntitySyncService {
    /// The credential the gate checked for this call, or (a call that did
    /// not pass the gate) the check made now.
    fn granted<T>(&self, request: &Request<T>, role: Role) -> Result<Granted, Status> {
        match request.extensions().get::<gate::Checked>() {
            Some(gate::Checked(granted)) => Ok(granted.clone()),
            None => self.auth.check(request.metadata(), role),
        }
    }
}

#[tonic::async_trait]
impl EntitySync for EntitySyncService {
    async fn notify(
        &self,
        request: Request<NotifyRequest>,
    ) -> Result<Response<NotifyResponse>, Status> {
        let granted = self.granted(&request, Role::Notifier)?;
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
        // A notifier scoped to entities: the whole call is refused if any key
        // is outside its list, before anything is stored.
        if let Some(credential) = &granted
            && let Some(key) = keys.iter().find(|k| !credential.entities.allows(&k.entity))
        {
            tracing::info!(token.id = %credential.id, entity = %key.entity, "Notify refused: entity not allowed for the token");
            return Err(Status::permission_denied(format!(
                "this token may not notify entity {:?}",
                &*key.entity
            )));
        }
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
        let granted = self.granted(&request, Role::Resolver)?;
        // Reloads are followed from the stream's first byte: a credential
        // removed while the stream waits for its Register never registers.
        let mut revocations = self.auth.watch();
        if revoked_now(&mut revocations, &granted) {
            return Err(revoked_status());
        }
        let peer = request.remote_addr();
        let quota_key = quota_key(&granted, request.peer_certs().as_deref(), peer);
        tracing::debug!(?peer, "Resolve stream opened; waiting for its Register");
        let mut inbound = request.into_inner();
        let first = tokio::select! {
            first = tokio::time::timeout(self.config.register_timeout, inbound.message()) => first
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "no Register within {:?} of opening the stream",
                        self.config.register_timeout
                    ))
                })??,
            () = revocation(&mut revocations, &granted) => {
                tracing::info!(token.id = token_id(&granted), "Resolve stream refused: its credential was revoked before Register");
                return Err(revoked_status());
            }
        };
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
        // A reload that came with the Register, after the wait above.
        if revoked_now(&mut revocations, &granted) {
            tracing::info!(
                token.id = token_id(&granted),
                "Resolve stream refused: its credential was revoked before Register"
            );
            return Err(revoked_status());
        }
        let quota = self.quotas.take(quota_key)?;
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
                        () = revocation(&mut revocations, &granted) => {
                            let _ = tx.send(Err(revoked_status())).await;
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
                drop(quota);
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
    fn the_largest_valid_notify_fits_its_bound() {
        use crate::proto::v1::EntityKey;
        use prost::Message;
        let part = "x".repeat(MAX_KEY_PART_BYTES);
        for keys in [1, 10, 10_000] {
            let request = NotifyRequest {
                keys: vec![
                    EntityKey {
                        entity: part.clone(),
                        id: part.clone(),
                    };
                    keys
                ],
                idempotency_key: "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES),
            };
            let limit = notify_message_limit(keys);
            assert!(request.encoded_len() <= limit, "{keys} keys");
            // And not much more: the slack only.
            assert!(
                limit - request.encoded_len() <= NOTIFY_SLACK_BYTES,
                "{keys} keys"
            );
        }
        // The default --max-notify-keys: well below tonic's 4 MiB.
        assert_eq!(notify_message_limit(10_000), 2_651_283);
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
