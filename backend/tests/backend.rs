//! The SDK against a real node (in-process, on port 0) with real websocket
//! clients: serving, concurrency, failures, reconnects, drain, notify retries.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use entity_sync::node::Listeners;
use entity_sync_backend::{
    Answer, Answers, Backend, BackendState, ErrorKind, FetchMode, Notifier, PassThrough,
    ResolveRequest, each_id,
};
use entity_sync_testkit::{DEADLINE, TestNode, wait_until};
use serde_json::json;
use tokio::{
    net::TcpListener,
    sync::{Notify, oneshot, watch},
    task::JoinHandle,
    time::timeout,
};

/// A backend of `node` serving `items` from `handler`, running until the
/// returned sender fires (or is dropped).
struct Running {
    state: watch::Receiver<BackendState>,
    stop: Option<oneshot::Sender<()>>,
    serve: JoinHandle<Result<(), entity_sync_backend::Error>>,
}

impl Running {
    fn start(backend: Backend) -> Running {
        let state = backend.state();
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = tokio::spawn(backend.serve(async {
            let _ = stopped.await;
        }));
        Running {
            state,
            stop: Some(stop),
            serve,
        }
    }

    /// Waits until registered on a node other than `except`; its node id.
    async fn registered(&mut self, except: &str) -> String {
        timeout(DEADLINE * 2, async {
            loop {
                if let BackendState::Registered { node_id, .. } = &*self.state.borrow_and_update()
                    && node_id != except
                {
                    return node_id.clone();
                }
                self.state.changed().await.expect("backend state");
            }
        })
        .await
        .expect("the backend registers")
    }

    async fn stop(mut self) -> Result<(), entity_sync_backend::Error> {
        let _ = self.stop.take().expect("running").send(());
        timeout(DEADLINE * 3, self.serve)
            .await
            .expect("serve returns after shutdown")
            .expect("serve task")
    }
}

fn quick(builder: entity_sync_backend::BackendBuilder) -> Backend {
    builder
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build()
        .expect("valid backend")
}

async fn item(req: ResolveRequest) -> Answers {
    req.ids()
        .iter()
        .map(|id| {
            (
                id.clone(),
                Answer::row(json!({"id": id, "secret": req.secret()})),
            )
        })
        .collect()
}

#[tokio::test]
async fn serves_rows_and_notifies_in_one_call_each() {
    let node = TestNode::start_default().await;
    let mut backend = Running::start(quick(Backend::builder(node.grpc()).name("grocery").entity(
        "items",
        FetchMode::PerSubscriber,
        item,
    )));
    let node_id = backend.registered("").await;
    assert!(node_id.starts_with("node-"), "{node_id}");

    let mut client = node.client().await;
    client.send_secret("s1").await;
    let (_, rows) = client.subscribe("items", "7").await;
    assert_eq!(rows, vec![json!({"id": "7", "secret": "s1"})]);

    let notifier = Notifier::connect(node.grpc()).await.expect("notifier");
    let receipt = notifier
        .notify([("items", 7)])
        .await
        .expect("notify accepted");
    assert_eq!((receipt.accepted, receipt.attempts), (1, 1));
    assert!(!receipt.duplicate);
    let (version, rows) = client
        .push_at_least("items", "7", receipt.sequences[0])
        .await;
    assert_eq!(version, receipt.sequences[0]);
    assert_eq!(rows, vec![json!({"id": "7", "secret": "s1"})]);

    backend.stop().await.expect("clean stop");
    node.wait_stats("resolver gone", |s| s.resolvers == 0).await;
}

#[tokio::test]
async fn requests_are_answered_concurrently_up_to_max_in_flight() {
    const IN_FLIGHT: usize = 4;
    let node = TestNode::start_default().await;
    // Each request waits until IN_FLIGHT of them run at once: answered one
    // at a time, none would ever finish.
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let all_in = Arc::new(Notify::new());
    let handler = {
        let (running, peak, all_in) = (running.clone(), peak.clone(), all_in.clone());
        move |req: ResolveRequest| {
            let (running, peak, all_in) = (running.clone(), peak.clone(), all_in.clone());
            async move {
                let now = running.fetch_add(1, Ordering::AcqRel) + 1;
                peak.fetch_max(now, Ordering::AcqRel);
                if now >= IN_FLIGHT {
                    all_in.notify_waiters();
                } else {
                    let _ = timeout(DEADLINE, all_in.notified()).await;
                }
                Answers::all(&req, Answer::row(json!({"ok": true})))
            }
        }
    };
    let mut backend = Running::start(quick(
        Backend::builder(node.grpc())
            .name("wide")
            .entity("items", FetchMode::Shared, handler)
            .max_in_flight(IN_FLIGHT as u32),
    ));
    backend.registered("").await;
    let mut clients = Vec::new();
    for i in 0..IN_FLIGHT {
        let mut client = node.client().await;
        client.send_subscribe("items", &i.to_string()).await;
        clients.push(client);
    }
    for (i, client) in clients.iter_mut().enumerate() {
        client.expect_subscribed("items", &i.to_string()).await;
        let (_, rows) = client.expect_push("items", &i.to_string()).await;
        assert_eq!(rows, vec![json!({"ok": true})]);
    }
    assert_eq!(peak.load(Ordering::Acquire), IN_FLIGHT);
    backend.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_failing_or_panicking_handler_answers_error_and_the_stream_lives_on() {
    let node = TestNode::start_default().await;
    let handler = each_id(|id, _req| async move {
        match id.as_str() {
            "panics" => panic!("handler bug"),
            "fails" => Answer::error("database down"),
            _ => Answer::row(json!({"id": id})),
        }
    });
    async fn errs(_: ResolveRequest) -> Result<Answers, std::io::Error> {
        Err(std::io::Error::other(
            "connection refused: password=hunter2",
        ))
    }
    let mut backend = Running::start(quick(
        Backend::builder(node.grpc())
            .name("flaky")
            .entity("items", FetchMode::Shared, handler)
            .entity("docs", FetchMode::Shared, errs),
    ));
    backend.registered("").await;
    let mut client = node.client().await;

    client.send_subscribe("items", "panics").await;
    let body = client
        .expect_error("resolver_error", Some(("items", "panics")))
        .await;
    assert_eq!(body["message"], "the backend failed to resolve this key");

    client.send_subscribe("items", "fails").await;
    let body = client
        .expect_error("resolver_error", Some(("items", "fails")))
        .await;
    assert_eq!(
        body["message"], "database down",
        "the handler's own message"
    );

    client.send_subscribe("docs", "1").await;
    let body = client
        .expect_error("resolver_error", Some(("docs", "1")))
        .await;
    assert_eq!(
        body["message"], "the backend failed to resolve this key",
        "an Err's text stays in the backend's logs"
    );

    // The same stream still serves.
    let (_, rows) = client.subscribe("items", "ok").await;
    assert_eq!(rows, vec![json!({"id": "ok"})]);
    assert_eq!(node.stats().resolvers, 1);
    backend.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_restarted_node_is_registered_with_again_without_restarting_the_backend() {
    let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ws_addr, grpc_addr) = (ws.local_addr().unwrap(), grpc.local_addr().unwrap());
    let mut node = TestNode::start_on(Listeners { ws, grpc }, TestNode::test_config())
        .await
        .unwrap();
    let mut backend = Running::start(quick(Backend::builder(node.grpc()).name("grocery").entity(
        "items",
        FetchMode::Shared,
        item,
    )));
    let first = backend.registered("").await;
    let mut client = node.client().await;
    client.subscribe("items", "1").await;

    node.shutdown().await;
    assert_eq!(client.recv_close().await, 1001);
    let ws = TcpListener::bind(ws_addr)
        .await
        .expect("same websocket port");
    let grpc = TcpListener::bind(grpc_addr).await.expect("same gRPC port");
    let node = TestNode::start_on(Listeners { ws, grpc }, TestNode::test_config())
        .await
        .unwrap();
    let second = backend.registered(&first).await;
    assert_ne!(first, second);

    let mut client = node.client().await;
    let (_, rows) = client.subscribe("items", "1").await;
    assert_eq!(rows, vec![json!({"id": "1", "secret": ""})]);
    backend.stop().await.expect("clean stop");
}

#[tokio::test]
async fn shutdown_drains_answers_what_is_in_flight_and_new_work_goes_elsewhere() {
    let node = TestNode::start_default().await;
    let gate = Arc::new(Notify::new());
    let served_by_a = Arc::new(AtomicUsize::new(0));
    let a_handler = {
        let (gate, served) = (gate.clone(), served_by_a.clone());
        move |req: ResolveRequest| {
            let (gate, served) = (gate.clone(), served.clone());
            async move {
                served.fetch_add(1, Ordering::AcqRel);
                gate.notified().await;
                Answers::all(&req, Answer::row(json!({"by": "a"})))
            }
        }
    };
    let b_handler =
        |req: ResolveRequest| async move { Answers::all(&req, Answer::row(json!({"by": "b"}))) };
    let mut a = Running::start(quick(Backend::builder(node.grpc()).name("svc").entity(
        "items",
        FetchMode::Shared,
        a_handler,
    )));
    a.registered("").await;

    // A holds a subscribe resolve...
    let mut held = node.client().await;
    held.send_subscribe("items", "1").await;
    wait_until("A got the request", || {
        served_by_a.load(Ordering::Acquire) == 1
    })
    .await;
    // ...then B comes, and A is told to stop.
    let mut b = Running::start(quick(Backend::builder(node.grpc()).name("svc").entity(
        "items",
        FetchMode::Shared,
        b_handler,
    )));
    b.registered("").await;
    let stopping = tokio::spawn(a.stop());
    // A sent Drain: new work goes to B only, while A still holds its request.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for id in ["2", "3", "4"] {
        let mut client = node.client().await;
        let (_, rows) = client.subscribe("items", id).await;
        assert_eq!(rows, vec![json!({"by": "b"})], "items/{id}");
    }
    assert_eq!(served_by_a.load(Ordering::Acquire), 1);
    assert!(!stopping.is_finished(), "A waits for its handler");

    // A answers what it held, then ends its stream.
    gate.notify_waiters();
    held.expect_subscribed("items", "1").await;
    let (_, rows) = held.expect_push("items", "1").await;
    assert_eq!(rows, vec![json!({"by": "a"})]);
    stopping.await.unwrap().expect("clean stop");
    node.wait_stats("A deregistered", |s| s.resolvers == 1)
        .await;
    b.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_registration_refused_for_good_ends_serve_with_the_error() {
    let node = TestNode::start_default().await;
    let backend = Backend::builder(node.grpc())
        .name("bad")
        .entity("not.an.entity", FetchMode::Shared, item)
        .build()
        .unwrap();
    let err = timeout(DEADLINE, backend.serve(std::future::pending()))
        .await
        .expect("serve gives up")
        .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
    assert!(err.message().contains("entity"), "{err}");
}

#[tokio::test]
async fn pass_through_messages_reach_the_handler_with_the_connection_and_secret() {
    let node = TestNode::start_default().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut backend = Running::start(quick(
        Backend::builder(node.grpc())
            .name("chat")
            .pass_through(move |message: PassThrough| {
                let _ = tx.send((
                    message.connection_id().to_owned(),
                    message.secret().to_owned(),
                    message.json::<serde_json::Value>().unwrap(),
                ));
                std::future::ready(())
            }),
    ));
    let node_id = backend.registered("").await;
    let mut client = node.client().await;
    client.send_secret("s3").await;
    client
        .send_json(json!({"type": "chat", "text": "hi"}))
        .await;
    let (connection, secret, payload) = timeout(DEADLINE, rx.recv()).await.unwrap().unwrap();
    assert!(
        connection.starts_with(&format!("{node_id}-")),
        "{connection}"
    );
    assert_eq!(secret, "s3");
    assert_eq!(payload, json!({"type": "chat", "text": "hi"}));
    backend.stop().await.expect("clean stop");
}

#[tokio::test]
async fn notify_retries_until_the_node_is_up_and_refusals_are_not_retried() {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    drop(grpc);
    let notifier = Notifier::builder(format!("http://{grpc_addr}"))
        .retry_for(Duration::from_secs(20))
        .connect_lazy()
        .unwrap();
    // Nothing listens yet: the first attempts fail, then the node comes up.
    let call = {
        let notifier = notifier.clone();
        tokio::spawn(async move { notifier.notify([("items", "1")]).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = TcpListener::bind(grpc_addr)
        .await
        .expect("the port is free");
    let _node = TestNode::start_on(Listeners { ws, grpc }, TestNode::test_config())
        .await
        .unwrap();
    let receipt = timeout(DEADLINE * 4, call)
        .await
        .expect("notify returns")
        .unwrap()
        .expect("accepted once the node is up");
    assert!(receipt.attempts > 1, "{receipt:?}");
    assert_eq!(receipt.accepted, 1);
    assert!(!receipt.duplicate);

    let refused = notifier
        .notify([("items", "bad.id")])
        .await
        .expect_err("an invalid key is refused");
    assert_eq!(refused.kind(), ErrorKind::Rejected);
    assert_eq!(refused.code(), Some(tonic::Code::InvalidArgument));
}

/// A stand-in node whose `Notify` hangs (never answers) for its first
/// `hang_first` calls, then answers CANCELLED "Timeout expired" up to call
/// `cancel_until`, then accepts; it records each call's idempotency key.
/// A hung call is what a node whose bus stopped answering looks like to a
/// notifier, which only its own deadline ends, or the node's: tonic's server
/// ends a call at the deadline the client sent with CANCELLED "Timeout
/// expired", and that answer can arrive before the client's own timer fires.
#[derive(Clone)]
struct HangingNode {
    hang_first: usize,
    cancel_until: usize,
    keys: Arc<std::sync::Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl entity_sync::proto::v1::entity_sync_server::EntitySync for HangingNode {
    async fn notify(
        &self,
        request: tonic::Request<entity_sync::proto::v1::NotifyRequest>,
    ) -> Result<tonic::Response<entity_sync::proto::v1::NotifyResponse>, tonic::Status> {
        let request = request.into_inner();
        let call = {
            let mut keys = self.keys.lock().unwrap();
            keys.push(request.idempotency_key.clone());
            keys.len()
        };
        if call <= self.hang_first {
            std::future::pending::<()>().await;
        }
        if call <= self.cancel_until {
            return Err(tonic::Status::cancelled("Timeout expired"));
        }
        Ok(tonic::Response::new(
            entity_sync::proto::v1::NotifyResponse {
                accepted: request.keys.len() as u32,
                sequences: vec![call as u64; request.keys.len()],
                duplicate: call > 1,
            },
        ))
    }

    type ResolveStream = tokio_stream::wrappers::ReceiverStream<
        Result<entity_sync::proto::v1::NodeMessage, tonic::Status>,
    >;

    async fn resolve(
        &self,
        _request: tonic::Request<tonic::Streaming<entity_sync::proto::v1::ResolverMessage>>,
    ) -> Result<tonic::Response<Self::ResolveStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this test"))
    }
}

/// Serves `node` on a loopback port; its URL. The server lives as long as
/// the test's runtime.
async fn serve_hanging(node: HangingNode) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(entity_sync::proto::v1::entity_sync_server::EntitySyncServer::new(node))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    format!("http://{addr}")
}

/// Notifies once against `node`, which must accept on the third call; checks
/// that every attempt carried one generated idempotency key.
async fn accepted_on_the_third_attempt(node: HangingNode) {
    let url = serve_hanging(node.clone()).await;
    let notifier = Notifier::builder(url)
        .retry_for(Duration::from_secs(10))
        .call_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let receipt = timeout(DEADLINE * 2, notifier.notify([("items", "1")]))
        .await
        .expect("notify returns")
        .expect("accepted on the third attempt");
    assert_eq!(receipt.attempts, 3, "{receipt:?}");
    assert_eq!(receipt.accepted, 1);
    let keys = node.keys.lock().unwrap().clone();
    assert_eq!(keys.len(), 3, "three calls: {keys:?}");
    assert_eq!(keys[0].len(), 32, "a generated idempotency key: {keys:?}");
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "one key for every attempt: {keys:?}"
    );
}

/// Regression: an attempt that the notifier's own deadline ended (tonic
/// reports CANCELLED "Timeout expired") used to be a final error. It is
/// retried, under the same idempotency key, until the node answers.
#[tokio::test]
async fn notify_retries_an_attempt_its_own_deadline_ended_under_the_same_key() {
    accepted_on_the_third_attempt(HangingNode {
        hang_first: 2,
        cancel_until: 0,
        keys: Arc::default(),
    })
    .await;
}

/// Regression: a node's own end of a call at its deadline (CANCELLED
/// "Timeout expired", sent by the node's gRPC server) was a final error for
/// the notifier, so a notify during a bus outage could fail without a retry.
/// Retried like the notifier's own deadline, under the same key.
#[tokio::test]
async fn notify_retries_an_attempt_the_node_cancelled_at_its_deadline() {
    accepted_on_the_third_attempt(HangingNode {
        hang_first: 0,
        cancel_until: 2,
        keys: Arc::default(),
    })
    .await;
}

/// Regression: the retry window is the call's deadline. Against a node that
/// never answers, `notify` gives up once the window is spent (UNAVAILABLE,
/// retryable), not after one more full attempt deadline.
#[tokio::test]
async fn notify_against_a_hung_node_returns_within_its_retry_window() {
    let node = HangingNode {
        hang_first: usize::MAX,
        cancel_until: 0,
        keys: Arc::default(),
    };
    let url = serve_hanging(node.clone()).await;
    let notifier = Notifier::builder(url)
        .retry_for(Duration::from_millis(1500))
        .call_timeout(Duration::from_millis(1000))
        .connect()
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let error = timeout(DEADLINE * 2, notifier.notify([("items", "1")]))
        .await
        .expect("notify returns")
        .expect_err("never answered");
    let took = started.elapsed();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.is_retryable());
    // First attempt 1 s, then what is left of the 1.5 s window.
    assert!(
        took < Duration::from_millis(2500),
        "notify took {took:?} for a 1.5 s window"
    );
    let keys = node.keys.lock().unwrap().clone();
    assert!(keys.len() >= 2, "retried: {keys:?}");
    assert!(keys.iter().all(|k| *k == keys[0]), "one key: {keys:?}");
}
