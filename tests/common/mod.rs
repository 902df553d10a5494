//! Helpers shared by the integration tests: a real node on port 0, real
//! websocket clients, real gRPC resolvers and notifies.
//!
//! Nothing here sleeps for readiness: the node is ready once `Node::start`
//! returned (its listeners were bound before), and every "wait" is either a
//! receive with a deadline or a condition polled until a deadline.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use entity_sync::{
    config::Config,
    node::{Listeners, Node},
    proto::v1::{
        EntityKey, EntityRegistration, FetchMode, KeyResult, NodeMessage, NotifyRequest,
        NotifyResponse, Reason, Register, ResolveRequest, ResolveResponse, ResolverMessage,
        Status as KeyStatus, entity_sync_client::EntitySyncClient, node_message, resolver_message,
    },
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, timeout},
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::{
    WebSocketStream, client_async,
    tungstenite::{self, Message},
};

/// How long a receive or a polled condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// The window in which "nothing more must happen" is checked.
pub const SILENCE: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// Node
// ---------------------------------------------------------------------------

/// A real node with both listeners bound on 127.0.0.1:0.
pub struct TestNode {
    node: Option<Node>,
    ws_url: String,
    grpc: String,
}

impl TestNode {
    /// Starts a node with test-friendly defaults, then `modify` applied on top.
    pub async fn start(modify: impl FnOnce(&mut Config)) -> TestNode {
        let ws = TcpListener::bind("127.0.0.1:0").await.expect("bind ws");
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        let mut config = Config {
            resolve_timeout: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(3),
            ..Config::default()
        };
        modify(&mut config);
        let ws_path = config.ws_path.clone();
        let node = Node::start(Listeners { ws, grpc }, config)
            .await
            .expect("node starts");
        let ws_url = format!("ws://{}{}", node.ws_addr(), ws_path);
        let grpc = format!("http://{}", node.grpc_addr());
        TestNode {
            node: Some(node),
            ws_url,
            grpc,
        }
    }

    /// Starts a node with the test defaults only.
    pub async fn start_default() -> TestNode {
        TestNode::start(|_| {}).await
    }

    /// Starts a node with the test defaults and one resolver, "backend",
    /// serving `entity` in `mode` from the returned (empty) data.
    pub async fn with_resolver(
        entity: &str,
        mode: FetchMode,
    ) -> (TestNode, TestResolver, ResolverData) {
        TestNode::start_with_resolver(|_| {}, ResolverOptions::new("backend").entity(entity, mode))
            .await
    }

    /// Starts a node (test defaults, then `modify`) and connects one resolver
    /// with `options`, serving from the returned (empty) data.
    pub async fn start_with_resolver(
        modify: impl FnOnce(&mut Config),
        options: ResolverOptions,
    ) -> (TestNode, TestResolver, ResolverData) {
        let node = TestNode::start(modify).await;
        let data = ResolverData::new();
        let resolver = TestResolver::connect(node.grpc(), options, &data).await;
        (node, resolver, data)
    }

    pub fn ws_url(&self) -> &str {
        &self.ws_url
    }

    /// The gRPC endpoint, `http://127.0.0.1:PORT`.
    pub fn grpc(&self) -> &str {
        &self.grpc
    }

    pub fn ws_addr(&self) -> std::net::SocketAddr {
        self.node().ws_addr()
    }

    fn node(&self) -> &Node {
        self.node.as_ref().expect("node already shut down")
    }

    /// The registry counts right now.
    pub fn stats(&self) -> StatsView {
        let s = self.node().stats();
        StatsView {
            connections: s.connections,
            subscriptions: s.subscriptions,
            keys: s.keys,
            resolvers: s.resolvers,
        }
    }

    /// Polls `stats()` until `cond` holds; panics with the last counts after
    /// [`DEADLINE`].
    pub async fn wait_stats(&self, what: &str, cond: impl Fn(&StatsView) -> bool) -> StatsView {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let s = self.stats();
            if cond(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for stats: {what}; last stats: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Opens a websocket client to this node.
    pub async fn client(&self) -> WsClient {
        WsClient::connect(&self.ws_url).await
    }

    /// Graceful shutdown of the node.
    pub async fn shutdown(&mut self) {
        let node = self.node.take().expect("node already shut down");
        node.shutdown().await;
    }
}

/// A copy of the node's registry counts (Debug, comparable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsView {
    pub connections: usize,
    pub subscriptions: usize,
    pub keys: usize,
    pub resolvers: usize,
}

/// Polls `cond` until it holds; panics after [`DEADLINE`] with `what`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        if Instant::now() >= deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks that `cond` stays true for the whole [`SILENCE`] window (used to
/// prove that nothing *more* happens, like [`WsClient::expect_silence`]).
pub async fn assert_stays(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + SILENCE;
    while Instant::now() < end {
        assert!(cond(), "condition no longer holds: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cond(), "condition no longer holds: {what}");
}

// ---------------------------------------------------------------------------
// HTTP endpoints
// ---------------------------------------------------------------------------

/// A minimal HTTP/1.1 GET on the node's websocket port; (status, body).
pub async fn http_get(node: &TestNode, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(node.ws_addr()).await.expect("connect");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        response
    };
    let response = timeout(DEADLINE, exchange)
        .await
        .expect("http response timed out");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad http response: {text}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

// ---------------------------------------------------------------------------
// Websocket client
// ---------------------------------------------------------------------------

/// A websocket client speaking the entity-sync JSON protocol.
pub struct WsClient {
    ws: WebSocketStream<TcpStream>,
}

impl WsClient {
    pub async fn connect(url: &str) -> WsClient {
        let addr = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .expect("ws url");
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Self::handshake(url, stream).await
    }

    /// Connects with a tiny socket receive buffer, so that a client that does
    /// not read backs up into the node's outbound queue quickly.
    pub async fn connect_small_buffer(url: &str) -> WsClient {
        let addr: std::net::SocketAddr = url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .expect("ws url")
            .parse()
            .expect("socket addr");
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("tcp connect");
        Self::handshake(url, stream).await
    }

    async fn handshake(url: &str, stream: TcpStream) -> WsClient {
        let (ws, _response) = timeout(DEADLINE, client_async(url, stream))
            .await
            .expect("websocket handshake timed out")
            .expect("websocket handshake");
        WsClient { ws }
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        timeout(DEADLINE, self.ws.send(Message::text(text.to_owned())))
            .await
            .expect("send timed out")
            .expect("send text");
    }

    pub async fn send_binary(&mut self, data: &[u8]) {
        timeout(
            DEADLINE,
            self.ws.send(Message::binary(Bytes::copy_from_slice(data))),
        )
        .await
        .expect("send timed out")
        .expect("send binary");
    }

    /// The next data or close frame (pings and pongs skipped), within `wait`.
    async fn next_frame(&mut self, wait: Duration) -> Option<Result<Message, tungstenite::Error>> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => return Some(Err(tungstenite::Error::ConnectionClosed)),
            }
        }
    }

    /// The next text frame, verbatim. Panics on timeout or any other frame.
    pub async fn recv_text(&mut self) -> String {
        self.recv_text_within(DEADLINE).await
    }

    /// The next text frame, verbatim, within `wait`.
    pub async fn recv_text_within(&mut self, wait: Duration) -> String {
        match self.next_frame(wait).await {
            None => panic!("no frame received within {wait:?}"),
            Some(Ok(Message::Text(text))) => text.as_str().to_owned(),
            Some(other) => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next text frame, parsed as JSON.
    pub async fn recv_json(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}"))
    }

    /// Asserts that no frame arrives within `window`.
    pub async fn expect_silence(&mut self, window: Duration) {
        if let Some(frame) = self.next_frame(window).await {
            panic!("expected silence for {window:?}, got {frame:?}");
        }
    }

    /// Asserts that no frame arrives within [`SILENCE`].
    pub async fn silent(&mut self) {
        self.expect_silence(SILENCE).await;
    }

    /// The next frame must be a close frame; returns its code.
    pub async fn recv_close(&mut self) -> u16 {
        match self.next_frame(DEADLINE).await {
            None => panic!("no close frame within {DEADLINE:?}"),
            Some(Ok(Message::Close(Some(frame)))) => u16::from(frame.code),
            Some(other) => panic!("expected a close frame with a code, got {other:?}"),
        }
    }

    /// Reads and discards data frames until a close frame; returns its code and
    /// the number of data frames skipped.
    pub async fn drain_until_close(&mut self, wait: Duration) -> (u16, usize) {
        let deadline = Instant::now() + wait;
        let mut skipped = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                None => panic!("no close frame within {wait:?} ({skipped} data frames read)"),
                Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), skipped),
                Some(Ok(Message::Text(_) | Message::Binary(_))) => skipped += 1,
                Some(other) => {
                    panic!("expected a close frame, got {other:?} after {skipped} data frames")
                }
            }
        }
    }

    /// Sends a close frame and waits for the node to finish the handshake.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = timeout(DEADLINE, async { while self.ws.next().await.is_some() {} }).await;
    }

    // ---- protocol shorthands ----

    pub async fn send_secret(&mut self, secret: &str) {
        self.send_json(json!({"action": "secret", "body": secret}))
            .await;
    }

    pub async fn send_subscribe(&mut self, entity: &str, id: &str) {
        self.send_json(json!({"action": "subscribe", "body": {"entity": entity, "id": id}}))
            .await;
    }

    pub async fn send_unsubscribe(&mut self, entity: &str, id: &str) {
        self.send_json(json!({"action": "unsubscribe", "body": {"entity": entity, "id": id}}))
            .await;
    }

    /// Next frame must be exactly `{"action":"subscribed","body":{entity,id}}`.
    pub async fn expect_subscribed(&mut self, entity: &str, id: &str) {
        let frame = self.recv_json().await;
        assert_eq!(
            frame,
            json!({"action": "subscribed", "body": {"entity": entity, "id": id}}),
            "expected subscribed for {entity}/{id}"
        );
    }

    /// Next frame must be a push for `entity/id`; returns (version, rows).
    pub async fn expect_push(&mut self, entity: &str, id: &str) -> (u64, Vec<Value>) {
        let frame = self.recv_json().await;
        parse_push(&frame, entity, id)
    }

    /// Subscribes and expects `subscribed` then the snapshot push; returns the
    /// snapshot (version, rows).
    pub async fn subscribe(&mut self, entity: &str, id: &str) -> (u64, Vec<Value>) {
        self.send_subscribe(entity, id).await;
        self.expect_subscribed(entity, id).await;
        self.expect_push(entity, id).await
    }

    /// Reads pushes for `entity/id` until one with `version >= min_version`;
    /// versions must never go down. Returns that push's (version, rows).
    pub async fn push_at_least(
        &mut self,
        entity: &str,
        id: &str,
        min_version: u64,
    ) -> (u64, Vec<Value>) {
        self.push_at_least_within(entity, id, min_version, DEADLINE)
            .await
    }

    /// Like [`push_at_least`](Self::push_at_least), each frame within `wait`.
    pub async fn push_at_least_within(
        &mut self,
        entity: &str,
        id: &str,
        min_version: u64,
        wait: Duration,
    ) -> (u64, Vec<Value>) {
        let mut last = 0;
        loop {
            let text = self.recv_text_within(wait).await;
            let frame: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}"));
            let (version, rows) = parse_push(&frame, entity, id);
            assert!(
                version >= last,
                "push versions went down: {last} then {version}"
            );
            last = version;
            if version >= min_version {
                return (version, rows);
            }
        }
    }

    /// Next frame must be an error frame with `code`; `key` (when given) must be
    /// its entity/id. Returns the body.
    pub async fn expect_error(&mut self, code: &str, key: Option<(&str, &str)>) -> Value {
        let frame = self.recv_json().await;
        assert_eq!(
            frame["action"], "error",
            "expected an error frame, got {frame}"
        );
        let body = &frame["body"];
        assert_eq!(body["code"], code, "wrong error code in {frame}");
        assert!(
            body["message"].is_string(),
            "error message missing in {frame}"
        );
        if let Some((entity, id)) = key {
            assert_eq!(body["entity"], entity, "wrong entity in {frame}");
            assert_eq!(body["id"], id, "wrong id in {frame}");
        }
        body.clone()
    }

    /// Access to the raw stream, e.g. to drop the TCP connection abruptly.
    pub fn into_inner(self) -> WebSocketStream<TcpStream> {
        self.ws
    }
}

/// Checks that `frame` is a push envelope for `entity/id` with exactly the
/// keys entity, id, version, rows; returns (version, rows).
pub fn parse_push(frame: &Value, entity: &str, id: &str) -> (u64, Vec<Value>) {
    assert_eq!(
        frame["action"], "push",
        "expected a push for {entity}/{id}, got {frame}"
    );
    let body = frame["body"]
        .as_object()
        .unwrap_or_else(|| panic!("push body not an object: {frame}"));
    assert_eq!(
        body.len(),
        4,
        "push body must have entity, id, version, rows: {frame}"
    );
    assert_eq!(body["entity"], entity, "push for the wrong key: {frame}");
    assert_eq!(body["id"], id, "push for the wrong key: {frame}");
    let version = body["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("push version not u64: {frame}"));
    let rows = body["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("push rows not an array: {frame}"))
        .clone();
    (version, rows)
}

// ---------------------------------------------------------------------------
// Resolver
// ---------------------------------------------------------------------------

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

    fn answer(&self, entity: &str, id: &str, secret: &str) -> KeyResult {
        let map = self.inner.lock().unwrap();
        match map.get(&(entity.to_owned(), id.to_owned())) {
            None => KeyResult {
                id: id.to_owned(),
                status: KeyStatus::NotFound as i32,
                rows: Vec::new(),
                version: 0,
                message: "no such key".to_owned(),
            },
            Some(entry) if entry.forbidden_secrets.contains(secret) => KeyResult {
                id: id.to_owned(),
                status: KeyStatus::Forbidden as i32,
                rows: Vec::new(),
                version: 0,
                message: "forbidden for this secret".to_owned(),
            },
            Some(entry) => KeyResult {
                id: id.to_owned(),
                status: entry.status as i32,
                rows: entry
                    .rows
                    .iter()
                    .map(|r| Bytes::from(r.replace("$SECRET", secret)))
                    .collect(),
                version: entry.version,
                message: entry.message.clone(),
            },
        }
    }
}

/// One `ResolveRequest` as the resolver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    pub request_id: u64,
    pub entity: String,
    pub ids: Vec<String>,
    pub secret: String,
    pub reason: Reason,
}

/// One `PassThrough` as the resolver saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenPassThrough {
    pub connection_id: String,
    pub secret: String,
    pub payload: Vec<u8>,
}

#[derive(Default)]
struct ResolverState {
    requests: Vec<SeenRequest>,
    pass_throughs: Vec<SeenPassThrough>,
    /// Entities whose requests are withheld until `release`.
    hold: HashSet<String>,
    held: Vec<SeenRequest>,
    /// `Some` once the node ended the stream (`Ok` = clean end).
    ended: Option<Result<(), tonic::Status>>,
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
}

impl ResolverOptions {
    pub fn new(name: &str) -> ResolverOptions {
        ResolverOptions {
            name: name.to_owned(),
            entities: Vec::new(),
            pass_through: false,
            max_in_flight: 0,
            delay: Duration::ZERO,
        }
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

/// A backend resolver on a real `Resolve` stream.
pub struct TestResolver {
    pub node_id: String,
    data: ResolverData,
    state: Arc<Mutex<ResolverState>>,
    out: Option<mpsc::Sender<ResolverMessage>>,
    tasks: Vec<JoinHandle<()>>,
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
            .unwrap_or_else(|status| panic!("resolver registration failed: {status:?}"))
    }

    /// Connects and registers; the node's refusal is returned as its status.
    pub async fn try_connect(
        grpc: &str,
        options: ResolverOptions,
        data: &ResolverData,
    ) -> Result<TestResolver, tonic::Status> {
        let mut client = EntitySyncClient::connect(grpc.to_owned())
            .await
            .expect("grpc connect");
        let (out_tx, out_rx) = mpsc::channel::<ResolverMessage>(1024);
        let register = Register {
            name: options.name.clone(),
            entities: options
                .entities
                .iter()
                .map(|(entity, mode)| EntityRegistration {
                    entity: entity.clone(),
                    fetch_mode: *mode as i32,
                })
                .collect(),
            pass_through: options.pass_through,
            max_in_flight: options.max_in_flight,
        };
        out_tx
            .send(ResolverMessage {
                kind: Some(resolver_message::Kind::Register(register)),
            })
            .await
            .expect("queue register");
        let mut inbound = timeout(DEADLINE, client.resolve(ReceiverStream::new(out_rx)))
            .await
            .expect("resolve call timed out")?
            .into_inner();
        let first = timeout(DEADLINE, inbound.message())
            .await
            .expect("no Registered within deadline")?;
        let node_id = match first {
            Some(NodeMessage {
                kind: Some(node_message::Kind::Registered(registered)),
            }) => registered.node_id,
            other => panic!("expected Registered as the first node message, got {other:?}"),
        };

        let state = Arc::new(Mutex::new(ResolverState::default()));
        let (delayed_tx, mut delayed_rx) = mpsc::unbounded_channel::<(Instant, SeenRequest)>();

        // Reads node messages: records them, answers, holds or delays.
        let reader = {
            let state = state.clone();
            let data = data.clone();
            let out = out_tx.clone();
            let delay = options.delay;
            tokio::spawn(async move {
                // Keep the client (and its connection) alive with the stream.
                let _client = client;
                loop {
                    let message = match inbound.message().await {
                        Ok(Some(message)) => message,
                        Ok(None) => {
                            state.lock().unwrap().ended = Some(Ok(()));
                            return;
                        }
                        Err(status) => {
                            state.lock().unwrap().ended = Some(Err(status));
                            return;
                        }
                    };
                    match message.kind {
                        Some(node_message::Kind::Request(request)) => {
                            let seen = seen_request(&request);
                            let answer_now = {
                                let mut st = state.lock().unwrap();
                                st.requests.push(seen.clone());
                                if st.hold.contains(&seen.entity) {
                                    st.held.push(seen.clone());
                                    false
                                } else {
                                    true
                                }
                            };
                            if !answer_now {
                                continue;
                            }
                            if delay.is_zero() {
                                let _ = out.send(response_for(&data, &seen)).await;
                            } else {
                                let _ = delayed_tx.send((Instant::now() + delay, seen));
                            }
                        }
                        Some(node_message::Kind::PassThrough(pt)) => {
                            state.lock().unwrap().pass_throughs.push(SeenPassThrough {
                                connection_id: pt.connection_id,
                                secret: pt.secret,
                                payload: pt.payload.to_vec(),
                            });
                        }
                        Some(node_message::Kind::Registered(r)) => {
                            panic!("unexpected second Registered: {r:?}")
                        }
                        None => panic!("node message without kind"),
                    }
                }
            })
        };
        // Answers delayed requests once their time has come.
        let delayer = {
            let data = data.clone();
            let out = out_tx.clone();
            tokio::spawn(async move {
                while let Some((at, seen)) = delayed_rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    let _ = out.send(response_for(&data, &seen)).await;
                }
            })
        };

        Ok(TestResolver {
            node_id,
            data: data.clone(),
            state,
            out: Some(out_tx),
            tasks: vec![reader, delayer],
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

    /// From now on, requests for `entity` are withheld until [`release`].
    pub fn hold(&self, entity: &str) {
        self.state.lock().unwrap().hold.insert(entity.to_owned());
    }

    /// Stops holding and answers every withheld request (with the data as it
    /// is now).
    pub async fn release(&self) {
        let held = {
            let mut st = self.state.lock().unwrap();
            st.hold.clear();
            std::mem::take(&mut st.held)
        };
        let out = self.out.as_ref().expect("resolver was killed");
        for seen in held {
            out.send(response_for(&self.data, &seen))
                .await
                .expect("send held response");
        }
    }

    /// `Some` once the node ended the stream.
    pub fn ended(&self) -> Option<Result<(), tonic::Status>> {
        self.state.lock().unwrap().ended.clone()
    }

    /// Drops the stream and its connection abruptly, without answering
    /// anything still held.
    pub fn kill(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        self.out = None;
    }
}

impl Drop for TestResolver {
    fn drop(&mut self) {
        self.kill();
    }
}

fn seen_request(request: &ResolveRequest) -> SeenRequest {
    SeenRequest {
        request_id: request.request_id,
        entity: request.entity.clone(),
        ids: request.ids.clone(),
        secret: request.secret.clone(),
        reason: Reason::try_from(request.reason).unwrap_or(Reason::Unspecified),
    }
}

fn response_for(data: &ResolverData, seen: &SeenRequest) -> ResolverMessage {
    ResolverMessage {
        kind: Some(resolver_message::Kind::Response(ResolveResponse {
            request_id: seen.request_id,
            results: seen
                .ids
                .iter()
                .map(|id| data.answer(&seen.entity, id, &seen.secret))
                .collect(),
        })),
    }
}

// ---------------------------------------------------------------------------
// Notify
// ---------------------------------------------------------------------------

/// A `NotifyRequest` for `keys` (entity, id) with an idempotency key ("" for
/// none).
pub fn notify_request(keys: &[(&str, &str)], idempotency_key: &str) -> NotifyRequest {
    NotifyRequest {
        keys: keys
            .iter()
            .map(|(entity, id)| EntityKey {
                entity: entity.to_string(),
                id: id.to_string(),
            })
            .collect(),
        idempotency_key: idempotency_key.to_owned(),
    }
}

/// Calls `Notify` with `keys`; panics unless OK.
pub async fn notify(grpc: &str, keys: &[(&str, &str)]) -> NotifyResponse {
    try_notify(grpc, keys, "")
        .await
        .unwrap_or_else(|status| panic!("notify {keys:?} failed: {status:?}"))
}

/// Calls `Notify` with `keys` and an idempotency key ("" for none).
pub async fn try_notify(
    grpc: &str,
    keys: &[(&str, &str)],
    idempotency_key: &str,
) -> Result<NotifyResponse, tonic::Status> {
    let mut client = EntitySyncClient::connect(grpc.to_owned())
        .await
        .expect("grpc connect");
    timeout(
        DEADLINE,
        client.notify(notify_request(keys, idempotency_key)),
    )
    .await
    .expect("notify timed out")
    .map(|r| r.into_inner())
}

/// The single sequence of a one-key notify.
pub async fn notify_one(grpc: &str, entity: &str, id: &str) -> u64 {
    let response = notify(grpc, &[(entity, id)]).await;
    assert_eq!(
        response.sequences.len(),
        1,
        "one sequence per key: {response:?}"
    );
    response.sequences[0]
}
pub mod nats;
