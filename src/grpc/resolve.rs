//! `Resolve`: a backend's stream, from its Register to its end (results
//! for the pool, Drain, a revoked credential, a second Register).

use std::{collections::HashMap, sync::Arc};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{
    grpc::{
        auth::{Entities, Granted, Role, TokenSet},
        quota::{QuotaSlot, quota_key},
        service::EntitySyncService,
    },
    ops::tasks::Tasks,
    proto::v1::{NodeMessage, Registered, ResolverMessage, node_message, resolver_message},
    resolving::pool::{RegisterError, Resolved, ResolverId, ResolverPool, read_key_result},
};

/// Largest message a backend may send on its `Resolve` stream: a
/// `ResolveResponse` carries the rows of up to --resolve-batch-size ids, so
/// this is what one batch's rows may weigh (tonic's default, made explicit).
pub(super) const MAX_RESOLVER_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

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
    /// `Resolve`: waits for the stream's Register, checks it against the
    /// call's credential and quota, registers the stream in the pool, and
    /// reads the backend's results until the stream ends.
    pub(super) async fn open_resolve(
        &self,
        request: Request<Streaming<ResolverMessage>>,
    ) -> Result<Response<ReceiverStream<Result<NodeMessage, Status>>>, Status> {
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
        let stream = OpenStream {
            id,
            inbound,
            tx,
            revocations,
            granted,
            pool: self.pool.clone(),
            tasks: self.tasks.clone(),
            quota,
        };
        self.tasks.spawn(stream.follow().instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A registered `Resolve` stream: read until it ends, then deregistered.
struct OpenStream {
    id: ResolverId,
    inbound: Streaming<ResolverMessage>,
    tx: mpsc::Sender<Result<NodeMessage, Status>>,
    revocations: Option<watch::Receiver<Arc<TokenSet>>>,
    granted: Granted,
    pool: ResolverPool,
    tasks: Tasks,
    /// Given back when the stream ends.
    quota: QuotaSlot,
}

impl OpenStream {
    /// Hands the backend's results to the pool until the stream ends (the
    /// backend closed it, an error, a second Register, a revoked
    /// credential, shutdown).
    async fn follow(mut self) {
        let ended = loop {
            let message = tokio::select! {
                _ = self.tasks.cancelled() => break "node shutting down",
                // The tokens file was reloaded: a removed or narrowed
                // credential loses its stream.
                () = revocation(&mut self.revocations, &self.granted) => {
                    let _ = self.tx.send(Err(revoked_status())).await;
                    break "credential revoked";
                }
                message = self.inbound.message() => message,
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
                    self.pool.complete(self.id, response.request_id, results);
                }
                Ok(Some(ResolverMessage {
                    kind: Some(resolver_message::Kind::Register(_)),
                })) => {
                    let _ = self
                        .tx
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
                    self.pool.drain(self.id);
                }
                Ok(Some(ResolverMessage { kind: None })) => {}
                Ok(None) => break "backend closed the stream",
                Err(status) => {
                    tracing::debug!(%status, "resolver stream error");
                    break "stream error";
                }
            }
        };
        self.pool.deregister(self.id);
        drop(self.quota);
        tracing::info!(reason = ended, "resolver stream ended");
    }
}
