//! [`Backend`]: registers the entities on a node's `Resolve` stream and answers
//! its requests, reconnecting until shutdown.
//!
//! One stream at a time: connect, send `Register`, wait for `Registered`,
//! then answer each request in its own task (the node keeps at most
//! `max_in_flight` outstanding). When the stream breaks, the node hands what
//! this backend held to other resolvers; the backend waits a jittered,
//! growing delay and registers again. On shutdown it sends `Drain`, answers
//! what it already received, and ends the stream.

use std::{
    collections::HashMap, future::Future, panic::AssertUnwindSafe, pin::Pin, sync::Arc,
    time::Duration,
};

use futures_util::FutureExt;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tracing::Instrument;

use crate::{
    Error, ErrorKind, FetchMode, Handler, PassThrough, PassThroughHandler, ResolveRequest,
    backoff::Backoff,
    connect::NodeEndpoint,
    proto::v1::{
        self as pb, EntityRegistration, NodeMessage, Register, ResolverMessage, node_message,
        resolver_message,
    },
    request::Answer,
};

/// Requests the node may keep outstanding on the stream, unless set.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 64;
/// First reconnect delay, unless set.
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_millis(100);
/// Longest reconnect delay, unless set.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(10);
/// How long shutdown waits for handlers still running, unless set.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the node may take to answer `Register` with `Registered`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// After the last answer, how long the backend waits for the node to end the
/// stream (so the answers are flushed before the connection drops).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// What an ERROR answer says when a handler failed or panicked: the
/// handler's own error stays in this backend's logs.
const HANDLER_FAILED: &str = "the backend failed to resolve this key";

/// Where a [`Backend`] stands, as [`Backend::state`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendState {
    /// Connecting and registering.
    Connecting,
    /// Registered: the node sends requests.
    Registered {
        node_id: String,
        resolver_id: String,
    },
    /// The last stream failed or ended; the backend tries again after a delay.
    Disconnected { error: Error },
    /// `serve` returned.
    Stopped,
}

/// Serves entities to entity-sync nodes. Build it with [`Backend::builder`],
/// then run [`Backend::serve`].
pub struct Backend {
    endpoint: NodeEndpoint,
    name: String,
    /// Each entity, its fetch mode and its refresh interval in ms (0: none).
    entities: Vec<(String, FetchMode, u32)>,
    handlers: HashMap<String, Arc<dyn Handler>>,
    pass_through: Option<Arc<dyn PassThroughHandler>>,
    max_in_flight: u32,
    reconnect: (Duration, Duration),
    drain_timeout: Duration,
    state: watch::Sender<BackendState>,
}

/// Configures a [`Backend`].
pub struct BackendBuilder {
    endpoint: NodeEndpoint,
    name: String,
    entities: Vec<EntitySpec>,
    pass_through: Option<Arc<dyn PassThroughHandler>>,
    max_in_flight: u32,
    reconnect: (Duration, Duration),
    drain_timeout: Duration,
    /// A `refresh_every` called before any `entity` (refused by `build`).
    refresh_without_entity: bool,
}

/// An entity as [`BackendBuilder`] collects it: name, fetch mode, handler,
/// refresh interval.
type EntitySpec = (String, FetchMode, Arc<dyn Handler>, Option<Duration>);

/// Shortest refresh interval the node accepts ([`BackendBuilder::refresh_every`]).
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// Longest refresh interval the node accepts ([`BackendBuilder::refresh_every`]).
pub const MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

impl Backend {
    /// A backend of the node at `endpoint` (`http://host:50051`, or
    /// `https://host:50051` with [`tls`](BackendBuilder::tls)).
    pub fn builder(endpoint: impl Into<String>) -> BackendBuilder {
        BackendBuilder {
            endpoint: NodeEndpoint::new(endpoint),
            name: String::new(),
            entities: Vec::new(),
            pass_through: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            reconnect: (DEFAULT_RECONNECT_MIN, DEFAULT_RECONNECT_MAX),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            refresh_without_entity: false,
        }
    }

    /// Follows the backend's state (registered, disconnected, ...), e.g. for
    /// a health check.
    pub fn state(&self) -> watch::Receiver<BackendState> {
        self.state.subscribe()
    }

    /// Serves until `shutdown` completes: connects, registers, answers, and
    /// reconnects with jittered exponential backoff whenever the stream
    /// breaks. On shutdown it drains (answers what it holds) and returns
    /// `Ok`. Returns an error only when the node refuses the registration for
    /// good (invalid, unauthenticated, not permitted).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut stopping = false;
        let mut backoff = Backoff::new(self.reconnect.0, self.reconnect.1);
        let result = loop {
            self.state.send_replace(BackendState::Connecting);
            let span = tracing::info_span!(
                "resolver",
                resolver.name = %self.name,
                resolver.id = tracing::field::Empty,
                node.id = tracing::field::Empty,
            );
            let ended = self
                .stream(&mut shutdown, &mut stopping, &mut backoff)
                .instrument(span)
                .await;
            if stopping {
                break Ok(());
            }
            let error = match ended {
                Ok(()) => Error::new(ErrorKind::Stream, "the node ended the stream"),
                Err(error) if !error.is_retryable() => {
                    tracing::error!(%error, "the node refused this backend; not retrying");
                    break Err(error);
                }
                Err(error) => error,
            };
            let delay = backoff.next_delay();
            tracing::warn!(%error, ?delay, "resolve stream lost; reconnecting");
            self.state
                .send_replace(BackendState::Disconnected { error });
            tokio::select! {
                () = &mut shutdown => break Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
        };
        self.state.send_replace(BackendState::Stopped);
        result
    }

    /// One stream's life. `Ok(())` when the node ended it (or on shutdown,
    /// with `stopping` set).
    async fn stream(
        &self,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
        stopping: &mut bool,
        backoff: &mut Backoff,
    ) -> Result<(), Error> {
        let registered = tokio::select! {
            () = shutdown.as_mut() => {
                *stopping = true;
                return Ok(());
            }
            registered = self.register() => registered?,
        };
        let (tx, mut inbound, registered) = registered;
        let span = tracing::Span::current();
        span.record("resolver.id", registered.resolver_id.as_str());
        span.record("node.id", registered.node_id.as_str());
        tracing::info!(entities = ?self.entities.iter().map(|(e, _, _)| e).collect::<Vec<_>>(), "registered");
        backoff.reset();
        self.state.send_replace(BackendState::Registered {
            node_id: registered.node_id,
            resolver_id: registered.resolver_id,
        });

        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                () = shutdown.as_mut() => {
                    *stopping = true;
                    break;
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => self.dispatch(message, &tx, &mut tasks),
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(Error::from_status(&status)),
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        self.drain(tx, inbound, tasks).await;
        Ok(())
    }

    /// Connects, sends `Register` and waits for `Registered`.
    async fn register(
        &self,
    ) -> Result<
        (
            mpsc::Sender<ResolverMessage>,
            Streaming<NodeMessage>,
            pb::Registered,
        ),
        Error,
    > {
        let channel = self.endpoint.connect().await?;
        let mut client = self.endpoint.client(channel)?;
        // Answers and pass-through acks share the channel; a full channel
        // makes handlers wait, which the node's in-flight cap bounds anyway.
        let (tx, rx) = mpsc::channel(self.max_in_flight as usize + 16);
        let register = Register {
            name: self.name.clone(),
            entities: self
                .entities
                .iter()
                .map(|(entity, mode, refresh_ms)| EntityRegistration {
                    entity: entity.clone(),
                    fetch_mode: *mode as i32,
                    refresh_interval_ms: *refresh_ms,
                })
                .collect(),
            pass_through: self.pass_through.is_some(),
            max_in_flight: self.max_in_flight,
        };
        // Queued before the call: the node reads `Register` first.
        tx.try_send(ResolverMessage {
            kind: Some(resolver_message::Kind::Register(register)),
        })
        .expect("a fresh channel has room");
        let exchange = async {
            let mut inbound = client
                .resolve(ReceiverStream::new(rx))
                .await
                .map_err(|status| Error::from_status(&status))?
                .into_inner();
            match inbound.message().await {
                Ok(Some(NodeMessage {
                    kind: Some(node_message::Kind::Registered(registered)),
                })) => Ok((inbound, registered)),
                Ok(Some(other)) => Err(Error::new(
                    ErrorKind::Stream,
                    format!("expected Registered first, got {other:?}"),
                )),
                Ok(None) => Err(Error::new(
                    ErrorKind::Stream,
                    "the node ended the stream before Registered",
                )),
                Err(status) => Err(Error::from_status(&status)),
            }
        };
        let (inbound, registered) = tokio::time::timeout(REGISTER_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("no Registered within {REGISTER_TIMEOUT:?}"),
                )
            })??;
        Ok((tx, inbound, registered))
    }

    /// Starts the task that answers one node message.
    fn dispatch(
        &self,
        message: NodeMessage,
        tx: &mpsc::Sender<ResolverMessage>,
        tasks: &mut JoinSet<()>,
    ) {
        match message.kind {
            Some(node_message::Kind::Request(request)) => {
                let handler = self.handlers.get(&request.entity).cloned();
                let (request_id, request) = ResolveRequest::from_proto(request);
                let span = tracing::debug_span!(
                    "resolve",
                    request.id = request_id,
                    entity = %request.entity(),
                    ids = request.ids().len(),
                    reason = ?request.reason(),
                );
                tasks.spawn(answer(handler, request_id, request, tx.clone()).instrument(span));
            }
            Some(node_message::Kind::PassThrough(message)) => {
                let Some(handler) = self.pass_through.clone() else {
                    tracing::debug!("pass-through message without a handler, dropped");
                    return;
                };
                let message = PassThrough::from_proto(message);
                tasks.spawn(
                    async move {
                        if AssertUnwindSafe(handler.receive(message))
                            .catch_unwind()
                            .await
                            .is_err()
                        {
                            tracing::error!("the pass-through handler panicked");
                        }
                    }
                    .in_current_span(),
                );
            }
            Some(node_message::Kind::Registered(_)) => {
                tracing::warn!("a second Registered on one stream, ignored");
            }
            // A message kind of a newer node: nothing to do with it.
            None => {}
        }
    }

    /// Shutdown of a live stream: `Drain`, finish the handlers (bounded),
    /// end the stream, wait briefly for the node to close its side.
    async fn drain(
        &self,
        tx: mpsc::Sender<ResolverMessage>,
        mut inbound: Streaming<NodeMessage>,
        mut tasks: JoinSet<()>,
    ) {
        let drain = ResolverMessage {
            kind: Some(resolver_message::Kind::Drain(pb::Drain {})),
        };
        if tx.send(drain).await.is_err() {
            return; // the node is gone already
        }
        tracing::info!(in_flight = tasks.len(), "draining");
        let deadline = tokio::time::sleep(self.drain_timeout);
        tokio::pin!(deadline);
        let mut node_open = true;
        while !tasks.is_empty() {
            tokio::select! {
                () = &mut deadline => {
                    tracing::warn!(
                        unanswered = tasks.len(),
                        timeout = ?self.drain_timeout,
                        "drain timed out; the node retries the rest elsewhere"
                    );
                    tasks.abort_all();
                    break;
                }
                Some(_) = tasks.join_next() => {}
                // Requests the node sent before it read `Drain` are answered too.
                message = inbound.message(), if node_open => match message {
                    Ok(Some(message)) => self.dispatch(message, &tx, &mut tasks),
                    _ => node_open = false,
                },
            }
        }
        while tasks.join_next().await.is_some() {}
        // Every task's sender is gone with its task: dropping ours ends the
        // request stream, and the node deregisters this resolver.
        drop(tx);
        if node_open {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
                while let Ok(Some(_)) = inbound.message().await {}
            })
            .await;
        }
        tracing::info!("drained");
    }
}

/// Runs the handler of one request (catching errors and panics) and sends
/// its answer.
async fn answer(
    handler: Option<Arc<dyn Handler>>,
    request_id: u64,
    request: ResolveRequest,
    tx: mpsc::Sender<ResolverMessage>,
) {
    let entity = request.entity().to_owned();
    let ids = request.ids().to_vec();
    let results = match handler {
        None => {
            tracing::warn!("request for an entity this backend did not register");
            let answer = Answer::error("this backend does not serve the entity");
            ids.into_iter()
                .map(|id| answer.clone().into_result(id))
                .collect()
        }
        Some(handler) => match AssertUnwindSafe(handler.resolve(request))
            .catch_unwind()
            .await
        {
            Ok(Ok(answers)) => answers.into_results(&entity, &ids),
            Ok(Err(err)) => {
                tracing::warn!(%err, "the resolve handler failed");
                failed(ids)
            }
            Err(_) => {
                tracing::error!("the resolve handler panicked");
                failed(ids)
            }
        },
    };
    let message = ResolverMessage {
        kind: Some(resolver_message::Kind::Response(pb::ResolveResponse {
            request_id,
            results,
        })),
    };
    // A failed send means the stream ended; the node retries elsewhere.
    let _ = tx.send(message).await;
}

fn failed(ids: Vec<String>) -> Vec<pb::KeyResult> {
    let answer = Answer::error(HANDLER_FAILED);
    ids.into_iter()
        .map(|id| answer.clone().into_result(id))
        .collect()
}

impl BackendBuilder {
    /// The service name. Backends sharing a name are replicas of one service:
    /// the node spreads requests over them, and sends each pass-through
    /// message to one of them.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Serves `entity` with `handler`. `mode`: [`FetchMode::Shared`] resolves
    /// once per change for every subscriber (authorize at subscribe);
    /// [`FetchMode::PerSubscriber`] once per distinct secret.
    pub fn entity(
        mut self,
        entity: impl Into<String>,
        mode: FetchMode,
        handler: impl Handler,
    ) -> Self {
        self.entities
            .push((entity.into(), mode, Arc::new(handler), None));
        self
    }

    /// Asks the node to re-resolve each subscribed key of the entity added
    /// last (by [`entity`](Self::entity)) about every `interval`, even when
    /// no [`Notifier`](crate::Notifier) call came: a safety net for writes
    /// that forgot to notify. The requests arrive with reason
    /// [`Reason::Change`](crate::Reason::Change); rows that did not change
    /// push nothing to clients. `interval` must be 1 s to 24 h
    /// ([`MIN_REFRESH_INTERVAL`], [`MAX_REFRESH_INTERVAL`]), whole
    /// milliseconds; else [`build`](Self::build) refuses. When several
    /// backends register the entity with different intervals, the node uses
    /// the smallest.
    ///
    /// ```
    /// use std::time::Duration;
    /// use entity_sync_backend::{Answers, Backend, FetchMode, ResolveRequest};
    ///
    /// async fn items(_request: ResolveRequest) -> Answers {
    ///     Answers::new()
    /// }
    ///
    /// let backend = Backend::builder("http://127.0.0.1:50051")
    ///     .name("items-service")
    ///     .entity("items", FetchMode::Shared, items)
    ///     .refresh_every(Duration::from_secs(30))
    ///     .build()
    ///     .expect("a valid configuration");
    /// # drop(backend);
    /// ```
    pub fn refresh_every(mut self, interval: Duration) -> Self {
        match self.entities.last_mut() {
            Some(entity) => entity.3 = Some(interval),
            None => self.refresh_without_entity = true,
        }
        self
    }

    /// Receives the client messages that carry no `action`.
    pub fn pass_through(mut self, handler: impl PassThroughHandler) -> Self {
        self.pass_through = Some(Arc::new(handler));
        self
    }

    /// Most requests the node keeps outstanding on this backend's stream,
    /// answered concurrently (default 64).
    pub fn max_in_flight(mut self, max_in_flight: u32) -> Self {
        self.max_in_flight = max_in_flight;
        self
    }

    /// Reconnect delays: from `min`, doubling up to `max`, jittered.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect = (min, max);
        self
    }

    /// How long a connection attempt may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.endpoint.connect_timeout = timeout;
        self
    }

    /// A resolver token of the node's `--grpc-tokens-file`, sent as
    /// `authorization: Bearer TOKEN` (never logged).
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.endpoint.token = Some(crate::Secret::new(token.into()));
        self
    }

    /// Connects over TLS (the node's URL must then be `https://`); see [`Tls`](crate::Tls).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::Tls) -> Self {
        self.endpoint.tls = Some(tls);
        self
    }

    /// How long shutdown waits for handlers still running (default 10 s).
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<Backend, Error> {
        let config = |message: String| Error::new(ErrorKind::Config, message);
        if self.name.trim().is_empty() {
            return Err(config(
                "a backend needs a name (BackendBuilder::name)".into(),
            ));
        }
        if self.entities.is_empty() && self.pass_through.is_none() {
            return Err(config(
                "register at least one entity or a pass-through handler".into(),
            ));
        }
        if self.max_in_flight == 0 {
            return Err(config("max_in_flight must be at least 1".into()));
        }
        self.endpoint.endpoint()?;
        self.endpoint.credentials()?;
        if self.refresh_without_entity {
            return Err(config(
                "refresh_every applies to the entity added before it; none was".into(),
            ));
        }
        let mut handlers = HashMap::new();
        let mut entities = Vec::new();
        for (entity, mode, handler, refresh) in self.entities {
            let refresh_ms = match refresh {
                None => 0,
                Some(interval) => refresh_ms(&entity, interval).map_err(config)?,
            };
            if handlers.insert(entity.clone(), handler).is_some() {
                return Err(config(format!("entity {entity:?} registered twice")));
            }
            entities.push((entity, mode, refresh_ms));
        }
        Ok(Backend {
            endpoint: self.endpoint,
            name: self.name,
            entities,
            handlers,
            pass_through: self.pass_through,
            max_in_flight: self.max_in_flight,
            reconnect: self.reconnect,
            drain_timeout: self.drain_timeout,
            state: watch::Sender::new(BackendState::Connecting),
        })
    }

    /// Builds and serves: see [`Backend::serve`].
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        self.build()?.serve(shutdown).await
    }
}

/// `interval` in whole milliseconds, within what the node accepts.
fn refresh_ms(entity: &str, interval: Duration) -> Result<u32, String> {
    if !(MIN_REFRESH_INTERVAL..=MAX_REFRESH_INTERVAL).contains(&interval)
        || !interval.subsec_nanos().is_multiple_of(1_000_000)
    {
        return Err(format!(
            "entity {entity:?}: refresh interval {interval:?} must be whole milliseconds from 1 s to 24 h"
        ));
    }
    // At most 86,400,000: fits.
    Ok(interval.as_millis() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Answers;

    fn answers(_: ResolveRequest) -> std::future::Ready<Answers> {
        std::future::ready(Answers::new())
    }

    #[test]
    fn the_builder_refuses_what_the_node_would() {
        let err = |b: BackendBuilder| b.build().err().expect("refused").kind();
        let base = || Backend::builder("http://127.0.0.1:1");
        assert_eq!(
            err(base().entity("a", FetchMode::Shared, answers)),
            ErrorKind::Config
        );
        assert_eq!(err(base().name("svc")), ErrorKind::Config);
        assert_eq!(
            err(base()
                .name("svc")
                .entity("a", FetchMode::Shared, answers)
                .entity("a", FetchMode::Shared, answers)),
            ErrorKind::Config
        );
        assert_eq!(
            err(Backend::builder("not a url")
                .name("svc")
                .entity("a", FetchMode::Shared, answers)),
            ErrorKind::Config
        );
        assert!(
            base()
                .name("svc")
                .entity("a", FetchMode::Shared, answers)
                .build()
                .is_ok()
        );
    }

    #[test]
    fn refresh_every_sets_the_entity_added_last_within_the_node_bounds() {
        let base = || {
            Backend::builder("http://127.0.0.1:1").name("svc").entity(
                "a",
                FetchMode::Shared,
                answers,
            )
        };
        let built = base()
            .refresh_every(Duration::from_millis(1_500))
            .entity("b", FetchMode::PerSubscriber, answers)
            .build()
            .unwrap();
        assert_eq!(
            built.entities,
            vec![
                ("a".to_string(), FetchMode::Shared, 1_500),
                ("b".to_string(), FetchMode::PerSubscriber, 0)
            ]
        );
        let refused = |b: BackendBuilder| b.build().err().expect("refused").to_string();
        assert!(
            refused(base().refresh_every(Duration::from_millis(999)))
                .contains("must be whole milliseconds from 1 s to 24 h")
        );
        assert!(
            refused(base().refresh_every(MAX_REFRESH_INTERVAL + Duration::from_millis(1)))
                .contains("entity \"a\"")
        );
        assert!(
            refused(base().refresh_every(Duration::from_micros(1_000_500)))
                .contains("whole milliseconds")
        );
        assert!(base().refresh_every(MAX_REFRESH_INTERVAL).build().is_ok());
        assert!(
            refused(
                Backend::builder("http://127.0.0.1:1")
                    .name("svc")
                    .refresh_every(Duration::from_secs(5))
                    .entity("a", FetchMode::Shared, answers)
            )
            .contains("refresh_every applies to the entity added before it")
        );
    }

    #[tokio::test]
    async fn a_failing_or_panicking_handler_answers_error_for_its_ids() {
        async fn fails(_: ResolveRequest) -> Result<Answers, std::io::Error> {
            Err(std::io::Error::other("database down: password=hunter2"))
        }
        async fn panics(_: ResolveRequest) -> Answers {
            panic!("boom")
        }
        for handler in [Arc::new(fails) as Arc<dyn Handler>, Arc::new(panics)] {
            let (tx, mut rx) = mpsc::channel(1);
            let request = ResolveRequest::new("items", ["1", "2"], "", crate::Reason::Change);
            answer(Some(handler), 9, request, tx).await;
            let Some(resolver_message::Kind::Response(response)) = rx.recv().await.unwrap().kind
            else {
                panic!("expected a response");
            };
            assert_eq!(response.request_id, 9);
            let ids: Vec<_> = response.results.iter().map(|r| r.id.as_str()).collect();
            assert_eq!(ids, ["1", "2"]);
            for result in &response.results {
                assert_eq!(result.status, pb::Status::Error as i32);
                assert_eq!(
                    result.message, HANDLER_FAILED,
                    "the handler's error stays here"
                );
            }
        }
    }
}
