//! A resolver for tests, built on `entity-sync-backend`: serves rows the test
//! sets, records what the node asked, can hold answers back or delay them,
//! and can be killed abruptly.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use entity_sync_backend::{
    Answer, Answers, Backend, BackendState, Error, FetchMode, PassThrough, Reason, ResolveRequest,
    proto::v1::{
        NodeMessage, Register, ResolverMessage, Status as KeyStatus,
        entity_sync_client::EntitySyncClient, node_message, resolver_message,
    },
};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
    time::timeout,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::DEADLINE;

/// What the resolver answers for one key.
#[derive(Debug, Clone)]
pub struct Entry {
    pub status: KeyStatus,
    /// JSON texts; `$SECRET` is replaced by the request's secret.
    pub rows: Vec<String>,
    pub version: u64,
    pub message: String,
    /// Secrets answered FORBIDDEN even though `status` is OK.
    pub forbidden_secrets: HashSet<String>,
}

impl Entry {
    pub fn ok(rows: &[&str]) -> Entry {
        Entry {
            status: KeyStatus::Ok,
            rows: rows.iter().map(|r| r.to_string()).collect(),
            version: 0,
            message: String::new(),
            forbidden_secrets: HashSet::new(),
        }
    }

    pub fn status(status: KeyStatus, message: &str) -> Entry {
        Entry {
            status,
            rows: Vec::new(),
            version: 0,
            message: message.to_owned(),
            forbidden_secrets: HashSet::new(),
        }
    }
}

/// The rows a resolver serves, keyed by (entity, id); shared by every resolver
/// built from it and changeable by the test at any time. Keys not present are
/// answered NOT_FOUND.
#[derive(Clone, Default)]
pub struct ResolverData {
    // std Mutex: only held for short map operations, never across `.await`.
    inner: Arc<Mutex<HashMap<(String, String), Entry>>>,
}

impl ResolverData {
    pub fn new() -> ResolverData {
        ResolverData::default()
    }

    pub fn set(&self, entity: &str, id: &str, entry: Entry) {
        self.inner
            .lock()
            .unwrap()
            .insert((entity.to_owned(), id.to_owned()), entry);
    }

    pub fn set_rows(&self, entity: &str, id: &str, rows: &[&str]) {
        self.set(entity, id, Entry::ok(rows));
    }

    pub fn set_status(&self, entity: &str, id: &str, status: KeyStatus) {
        let mut map = self.inner.lock().unwrap();
        let entry = map
            .entry((entity.to_owned(), id.to_owned()))
            .or_insert_with(|| Entry::ok(&[]));
        entry.status = status;
    }

    fn answer(&self, entity: &str, id: &str, secret: &str) -> Answer {
        let map = self.inner.lock().unwrap();
        match map.get(&(entity.to_owned(), id.to_owned())) {
            None => Answer::not_found(),
            Some(entry) if entry.forbidden_secrets.contains(secret) => {
                Answer::forbidden("forbidden for this secret")
            }
            Some(entry) => match entry.status {
                KeyStatus::Ok => Answer::json_rows(
                    entry
                        .rows
                        .iter()
                        .map(|r| r.replace("$SECRET", secret).into_bytes()),
                )
                .version(entry.version),
                KeyStatus::NotFound => Answer::not_found(),
                KeyStatus::Forbidden => Answer::forbidden(entry.message.clone()),
                KeyStatus::Error | KeyStatus::Unspecified => Answer::error(entry.message.clone()),
            },
        }
    }

    fn answers(&self, seen: &SeenRequest) -> Answers {
        seen.ids
            .iter()
            .map(|id| (id.clone(), self.answer(&seen.entity, id, &seen.secret)))
            .collect()
    }
}

/// One `ResolveRequest` as the resolver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub entity: String,
    pub ids: Vec<String>,
    pub secret: String,
    pub reason: Reason,
    /// `ResolveRequest.shared`: a SHARED change resolve.
    pub shared: bool,
}

/// One `PassThrough` as the resolver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenPassThrough {
    pub connection_id: String,
    pub secret: String,
    pub payload: Vec<u8>,
}

/// How a [`TestResolver`] registers and behaves.
#[derive(Clone)]
pub struct ResolverOptions {
    pub name: String,
    pub entities: Vec<(String, FetchMode)>,
    pub pass_through: bool,
    pub max_in_flight: u32,
    /// Artificial delay before each response.
    pub delay: Duration,
    /// Bearer token (a resolver line of the node's tokens file).
    pub token: Option<String>,
    /// TLS to the node (its URL is then `https://`).
    pub tls: Option<entity_sync_backend::Tls>,
    /// Entities registered with a refresh interval, and the interval.
    pub refresh: Vec<(String, Duration)>,
}

impl ResolverOptions {
    pub fn new(name: &str) -> ResolverOptions {
        ResolverOptions {
            name: name.to_owned(),
            entities: Vec::new(),
            pass_through: false,
            max_in_flight: 0,
            delay: Duration::ZERO,
            token: None,
            tls: None,
            refresh: Vec::new(),
        }
    }

    /// Registers `entity` (added with [`entity`](Self::entity)) with a
    /// refresh interval.
    pub fn refresh_every(mut self, entity: &str, interval: Duration) -> Self {
        self.refresh.push((entity.to_owned(), interval));
        self
    }

    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_owned());
        self
    }

    pub fn tls(mut self, tls: entity_sync_backend::Tls) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn entity(mut self, entity: &str, mode: FetchMode) -> Self {
        self.entities.push((entity.to_owned(), mode));
        self
    }

    pub fn pass_through(mut self, on: bool) -> Self {
        self.pass_through = on;
        self
    }

    pub fn max_in_flight(mut self, n: u32) -> Self {
        self.max_in_flight = n;
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// What the test resolver records and holds.
#[derive(Default)]
struct ResolverState {
    requests: Vec<SeenRequest>,
    pass_throughs: Vec<SeenPassThrough>,
    /// Entities whose requests are withheld until `release`.
    hold: HashSet<String>,
    /// Withheld requests: each waits for a sender it signals once it has
    /// read the data it answers with.
    held: Vec<(SeenRequest, oneshot::Sender<oneshot::Sender<()>>)>,
    /// `Some(why)` once a registered stream ended.
    ended: Option<String>,
}

/// A backend resolver on a real `Resolve` stream, through `entity-sync-backend`
/// (so it reconnects after the node comes back, like a real backend).
pub struct TestResolver {
    /// The node that answered the first registration.
    pub node_id: String,
    state: Arc<Mutex<ResolverState>>,
    backend: watch::Receiver<BackendState>,
    stop: Option<oneshot::Sender<()>>,
    serve: Option<JoinHandle<Result<(), Error>>>,
    watcher: JoinHandle<()>,
}

impl TestResolver {
    /// Connects and registers; panics if the node refuses.
    pub async fn connect(
        grpc: &str,
        options: ResolverOptions,
        data: &ResolverData,
    ) -> TestResolver {
        Self::try_connect(grpc, options, data)
            .await
            .unwrap_or_else(|err| panic!("resolver registration failed: {err}"))
    }

    /// Connects and registers; the node's refusal (or the builder's) is
    /// returned as the backend SDK's error.
    pub async fn try_connect(
        grpc: &str,
        options: ResolverOptions,
        data: &ResolverData,
    ) -> Result<TestResolver, Error> {
        let state = Arc::new(Mutex::new(ResolverState::default()));
        let handler = {
            let (state, data, delay) = (state.clone(), data.clone(), options.delay);
            move |request: ResolveRequest| {
                let (state, data) = (state.clone(), data.clone());
                async move {
                    let seen = SeenRequest::of(&request);
                    let gate = {
                        let mut st = state.lock().unwrap();
                        st.requests.push(seen.clone());
                        st.hold.contains(&seen.entity).then(|| {
                            let (wake, woken) = oneshot::channel();
                            st.held.push((seen.clone(), wake));
                            woken
                        })
                    };
                    let done = match gate {
                        Some(woken) => woken.await.ok(),
                        None => None,
                    };
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let answers = data.answers(&seen);
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    answers
                }
            }
        };
        let mut builder = Backend::builder(grpc)
            .name(options.name.clone())
            .max_in_flight(if options.max_in_flight == 0 {
                32
            } else {
                options.max_in_flight
            })
            .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(300))
            .drain_timeout(DEADLINE);
        if let Some(tls) = options.tls.clone() {
            builder = builder.tls(tls);
        }
        for (entity, mode) in &options.entities {
            builder = builder.entity(entity.clone(), *mode, handler.clone());
            if let Some((_, interval)) = options.refresh.iter().find(|(e, _)| e == entity) {
                builder = builder.refresh_every(*interval);
            }
        }
        if let Some(token) = &options.token {
            builder = builder.bearer_token(token.clone());
        }
        if options.pass_through {
            let state = state.clone();
            builder = builder.pass_through(move |message: PassThrough| {
                state.lock().unwrap().pass_throughs.push(SeenPassThrough {
                    connection_id: message.connection_id().to_owned(),
                    secret: message.secret().to_owned(),
                    payload: message.payload().to_vec(),
                });
                std::future::ready(())
            });
        }
        let backend = builder.build()?;
        let mut states = backend.state();
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = tokio::spawn(backend.serve(async {
            let _ = stopped.await;
        }));
        let registered = timeout(DEADLINE, async {
            loop {
                match &*states.borrow_and_update() {
                    BackendState::Registered { node_id, .. } => return Ok(node_id.clone()),
                    BackendState::Disconnected { error } => return Err(Some(error.clone())),
                    BackendState::Connecting | BackendState::Stopped => {}
                }
                if states.changed().await.is_err() {
                    return Err(None);
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("resolver not registered within {DEADLINE:?}"));
        let node_id = match registered {
            Ok(node_id) => node_id,
            Err(error) => {
                // A refusal for good ends `serve` with it; a retryable one
                // (a fetch-mode conflict) is the state's.
                if error.is_some() {
                    serve.abort();
                }
                return Err(match (serve.await, error) {
                    (Ok(Err(refused)), _) => refused,
                    (_, Some(error)) => error,
                    (outcome, None) => panic!("serve ended without an error: {outcome:?}"),
                });
            }
        };
        let watcher = {
            let (state, mut states) = (state.clone(), states.clone());
            tokio::spawn(async move {
                loop {
                    let ended = match &*states.borrow_and_update() {
                        BackendState::Registered { .. } | BackendState::Connecting => None,
                        BackendState::Disconnected { error } => Some(error.to_string()),
                        BackendState::Stopped => Some("stopped".to_owned()),
                    };
                    if let Some(why) = ended {
                        state.lock().unwrap().ended.get_or_insert(why);
                    }
                    if states.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        Ok(TestResolver {
            node_id,
            state,
            backend: states,
            stop: Some(stop),
            serve: Some(serve),
            watcher,
        })
    }

    /// Every ResolveRequest received so far.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Requests received so far with `reason` that include `entity/id`.
    pub fn requests_for(&self, reason: Reason, entity: &str, id: &str) -> Vec<SeenRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.reason == reason && r.entity == entity && r.ids.iter().any(|i| i == id))
            .collect()
    }

    /// Number of CHANGE requests that included `entity/id`.
    pub fn change_count(&self, entity: &str, id: &str) -> usize {
        self.requests_for(Reason::Change, entity, id).len()
    }

    /// Every PassThrough received so far.
    pub fn pass_throughs(&self) -> Vec<SeenPassThrough> {
        self.state.lock().unwrap().pass_throughs.clone()
    }

    /// Number of requests currently withheld.
    pub fn held_count(&self) -> usize {
        self.state.lock().unwrap().held.len()
    }

    /// From now on, requests for `entity` are withheld until [`release`](Self::release).
    pub fn hold(&self, entity: &str) {
        self.state.lock().unwrap().hold.insert(entity.to_owned());
    }

    /// Stops holding and answers every withheld request with the data as it
    /// is now: returns once each has read its data.
    pub async fn release(&self) {
        let held = {
            let mut st = self.state.lock().unwrap();
            st.hold.clear();
            std::mem::take(&mut st.held)
        };
        Self::answer_held(held).await;
    }

    /// Answers the withheld requests that `which` selects (the others stay
    /// withheld, and holding goes on): returns once each has read its data.
    /// Returns how many were released.
    pub async fn release_matching(&self, which: impl Fn(&SeenRequest) -> bool) -> usize {
        let held: Vec<_> = {
            let mut st = self.state.lock().unwrap();
            let (chosen, kept) = std::mem::take(&mut st.held)
                .into_iter()
                .partition(|(seen, _)| which(seen));
            st.held = kept;
            chosen
        };
        let count = held.len();
        Self::answer_held(held).await;
        count
    }

    /// The requests withheld now, in arrival order.
    pub fn held(&self) -> Vec<SeenRequest> {
        let st = self.state.lock().unwrap();
        st.held.iter().map(|(seen, _)| seen.clone()).collect()
    }

    async fn answer_held(held: Vec<(SeenRequest, oneshot::Sender<oneshot::Sender<()>>)>) {
        let mut reads = Vec::new();
        for (_, wake) in held {
            let (done, read) = oneshot::channel();
            if wake.send(done).is_ok() {
                reads.push(read);
            }
        }
        for read in reads {
            let _ = timeout(DEADLINE, read).await;
        }
    }

    /// `Some(why)` once a registered stream ended (the backend reconnects
    /// by itself; see [`wait_registered`](Self::wait_registered)).
    pub fn ended(&self) -> Option<String> {
        self.state.lock().unwrap().ended.clone()
    }

    /// Waits until the backend is registered on a node whose id is not
    /// `except` (a restarted node); returns that node's id.
    pub async fn wait_registered(&mut self, except: &str, wait: Duration) -> String {
        let states = &mut self.backend;
        timeout(wait, async {
            loop {
                if let BackendState::Registered { node_id, .. } = &*states.borrow_and_update()
                    && node_id != except
                {
                    return node_id.clone();
                }
                states.changed().await.expect("backend state");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("not registered again within {wait:?}"))
    }

    /// The backend's registration state as it changes (a watch receiver).
    pub fn states(&self) -> watch::Receiver<BackendState> {
        self.backend.clone()
    }

    /// Graceful stop through the SDK (Drain, answer what is held, end the
    /// stream); returns what `serve` returned.
    pub async fn stop(&mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let serve = self.serve.take().expect("resolver already stopped");
        timeout(DEADLINE * 3, serve)
            .await
            .expect("resolver did not stop in time")
            .expect("serve task")
    }

    /// Drops the stream and its connection abruptly, without answering
    /// anything still held.
    pub fn kill(&mut self) {
        if let Some(serve) = self.serve.take() {
            serve.abort();
        }
        self.stop = None;
        self.watcher.abort();
    }
}

impl Drop for TestResolver {
    fn drop(&mut self) {
        self.kill();
    }
}

impl SeenRequest {
    fn of(request: &ResolveRequest) -> SeenRequest {
        SeenRequest {
            entity: request.entity().to_owned(),
            ids: request.ids().to_vec(),
            secret: request.secret().to_owned(),
            reason: request.reason(),
            shared: request.is_shared(),
        }
    }
}

/// Opens a `Resolve` stream by hand and sends `first` (a `Register`, or
/// anything else) as its first message: for tests of the node's own checks,
/// which the SDK would refuse before sending. `Ok` with the first node
/// message, or the node's refusal.
pub async fn open_raw_stream(
    grpc: &str,
    first: ResolverMessage,
) -> Result<NodeMessage, tonic::Status> {
    let mut client = EntitySyncClient::connect(grpc.to_owned())
        .await
        .expect("grpc connect");
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.expect("queue the first message");
    let mut inbound = timeout(DEADLINE, client.resolve(ReceiverStream::new(rx)))
        .await
        .expect("resolve call timed out")?
        .into_inner();
    let message = timeout(DEADLINE, inbound.message())
        .await
        .expect("no answer within the deadline")?;
    drop(tx);
    message.ok_or_else(|| tonic::Status::unknown("the node ended the stream without a message"))
}

/// A raw `Register` message.
pub fn register_message(
    name: &str,
    entities: &[(&str, FetchMode)],
    pass_through: bool,
) -> ResolverMessage {
    ResolverMessage {
        kind: Some(resolver_message::Kind::Register(Register {
            name: name.to_owned(),
            entities: entities
                .iter()
                .map(
                    |(entity, mode)| entity_sync_backend::proto::v1::EntityRegistration {
                        entity: (*entity).to_owned(),
                        fetch_mode: *mode as i32,
                        refresh_interval_ms: 0,
                    },
                )
                .collect(),
            pass_through,
            max_in_flight: 0,
        })),
    }
}

/// Whether a node message is `Registered`.
pub fn is_registered(message: &NodeMessage) -> bool {
    matches!(message.kind, Some(node_message::Kind::Registered(_)))
}
