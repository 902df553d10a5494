//! Multi-node tests: several real nodes on real nats-servers (JetStream),
//! real websocket clients and gRPC resolvers. Each test starts its own NATS
//! on dynamic ports; every wait has a deadline.

use common::http::metric_value;
use entity_sync_testkit as common;

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::{
    ResolverData, ResolverOptions, TestNode, TestResolver, WsClient,
    nats::{NatsCluster, NatsServer, TcpProxy},
    notify_one, parse_push,
};
use entity_sync::{
    bus::{BusError, BusErrorKind},
    config::Config,
    node::{Listeners, Node, NodeError},
};
use entity_sync_backend::{FetchMode, Key, Notifier, Reason, Receipt};
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};

/// Waits that span a NATS reconnect or a JetStream leader election.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Node logs for failing tests (`RUST_LOG=entity_sync=debug` for more);
/// the test writer shows them only when a test fails.
pub(crate) fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("entity_sync=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A node on NATS at `nats_url` (comma-separated URLs) with `prefix`.
async fn nats_node(nats_url: &str, prefix: &str, modify: impl FnOnce(&mut Config)) -> TestNode {
    init_tracing();
    let nats_url = nats_url.to_owned();
    let prefix = prefix.to_owned();
    TestNode::start(move |config| {
        config.nats.url = Some(nats_url);
        config.nats.prefix = prefix;
        modify(config);
    })
    .await
}

/// A resolver serving `items` (SHARED) from `data`.
async fn items_resolver(node: &TestNode, name: &str, data: &ResolverData) -> TestResolver {
    TestResolver::connect(
        node.grpc(),
        ResolverOptions::new(name).entity("items", FetchMode::Shared),
        data,
    )
    .await
}

/// `Notify(keys)` once with `idempotency_key`; a call not answered within
/// `wait` fails (DEADLINE_EXCEEDED), so callers can retry.
async fn notify_within(
    grpc: &str,
    keys: &[(&str, &str)],
    idempotency_key: &str,
    wait: Duration,
) -> Result<Receipt, entity_sync_backend::Error> {
    let notifier = Notifier::builder(grpc)
        .retry_for(Duration::ZERO)
        .call_timeout(wait)
        .connect_lazy()
        .expect("notifier");
    let keys: Vec<Key> = keys.iter().map(|&k| Key::from(k)).collect();
    notifier.notify_with_key(keys, idempotency_key).await
}

/// The value of the unlabelled sample `name` on the node's `/metrics`.
async fn metric(node: &TestNode, name: &str) -> u64 {
    let (status, body) = node.http_get("/metrics").await;
    assert_eq!(status, 200, "/metrics answered {status}");
    metric_value(&body, name)
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("metric {name} missing from:\n{body}"))
}

/// Polls `/readyz` until it answers `status`.
async fn wait_readyz(node: &TestNode, status: u16, wait: Duration) {
    let end = Instant::now() + wait;
    loop {
        let (got, body) = node.http_get("/readyz").await;
        if got == status {
            return;
        }
        if Instant::now() >= end {
            panic!("/readyz still answers {got} {body:?} after {wait:?}, expected {status}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls `Notify(keys)` on `grpc` until it fails with UNAVAILABLE (the node
/// noticed NATS is gone); panics if it is accepted or never fails so.
async fn wait_notify_unavailable(grpc: &str, keys: &[(&str, &str)]) {
    let end = Instant::now() + RECONNECT_DEADLINE;
    loop {
        match notify_within(grpc, keys, "", Duration::from_secs(6)).await {
            Err(err) if err.code() == Some(tonic::Code::Unavailable) => return,
            Ok(response) => panic!("notify accepted while NATS is down: {response:?}"),
            Err(status) if Instant::now() >= end => {
                panic!("notify never failed with UNAVAILABLE; last: {status:?}")
            }
            // Publishing before the client noticed the loss times out waiting for
            // the PubAck; that is still a failure, and the next call is refused.
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// `Notify(keys)` through the SDK's notifier, which retries an unavailable
/// node or bus under one idempotency key until it is accepted.
async fn notify_retrying(grpc: &str, keys: &[(&str, &str)], idempotency_key: &str) -> Receipt {
    let notifier = Notifier::builder(grpc)
        .retry_for(RECONNECT_DEADLINE)
        .call_timeout(Duration::from_secs(6))
        .connect_lazy()
        .expect("notifier");
    let keys: Vec<Key> = keys.iter().map(|&k| Key::from(k)).collect();
    notifier
        .notify_with_key(keys.clone(), idempotency_key)
        .await
        .unwrap_or_else(|err| panic!("notify {keys:?} never accepted: {err}"))
}

/// A resolver for `items` on `node`, a client subscribed to `items/1`, a
/// change of its rows notified: the client is pushed the new rows within
/// `wait`.
async fn a_change_reaches_a_client(node: &TestNode, wait: Duration) {
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"id":1}"#]);
    let _resolver = items_resolver(node, "svc", &data).await;
    let mut client = WsClient::connect(node.ws_url()).await;
    client.subscribe("items", "1").await;
    data.set_rows("items", "1", &[r#"{"id":1,"v":2}"#]);
    notify_one(node.grpc(), "items", "1").await;
    let text = client.recv_text_within(wait).await;
    let frame: Value = serde_json::from_str(&text).expect("frame is JSON");
    let (_, rows) = parse_push(&frame, "items", "1");
    assert_eq!(rows, vec![json!({"id": 1, "v": 2})]);
}

/// Subscribes on a node that reaches the entity's resolver over NATS. The
/// remote node starts answering `{prefix}.resolve.{entity}` a moment after
/// its resolver registered, so a `no_resolver` answer in that window is
/// retried (it never reaches a resolver).
async fn subscribe_remote(client: &mut WsClient, entity: &str, id: &str) -> (u64, Vec<Value>) {
    let end = Instant::now() + common::DEADLINE;
    loop {
        client.send_subscribe(entity, id).await;
        let frame = client.recv_json().await;
        if frame["action"] == "error"
            && frame["body"]["code"] == "no_resolver"
            && Instant::now() < end
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert_eq!(
            frame,
            json!({"action": "subscribed", "body": {"entity": entity, "id": id}}),
            "expected subscribed for {entity}/{id}"
        );
        return client.expect_push(entity, id).await;
    }
}

/// Pushes for `entity`, read until `done` holds for the latest push per id.
/// Versions per id must never go down. Returns the latest (version, rows) per id.
async fn read_pushes_until(
    name: &str,
    client: &mut WsClient,
    entity: &str,
    wait: Duration,
    mut done: impl FnMut(&HashMap<String, (u64, Vec<Value>)>) -> bool,
) -> HashMap<String, (u64, Vec<Value>)> {
    let end = Instant::now() + wait;
    let mut latest: HashMap<String, (u64, Vec<Value>)> = HashMap::new();
    while !done(&latest) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            panic!(
                "{name}: pushes never reached the expected state within {wait:?}; latest: {latest:?}"
            );
        }
        // The outer timeout fires first, so the panic below shows what arrived.
        let Ok(text) = timeout(left, client.recv_text_within(left + Duration::from_secs(1))).await
        else {
            panic!(
                "{name}: pushes never reached the expected state within {wait:?}; latest: {latest:?}"
            );
        };
        let frame: Value = serde_json::from_str(&text).expect("frame is JSON");
        let id = frame["body"]["id"].as_str().unwrap_or_default().to_owned();
        let (version, rows) = parse_push(&frame, entity, &id);
        if let Some((previous, _)) = latest.get(&id) {
            assert!(
                version >= *previous,
                "{entity}/{id}: version went down {previous} -> {version}"
            );
        }
        latest.insert(id, (version, rows));
    }
    latest
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_notified_on_one_node_reaches_clients_on_the_others() {
    let nats = NatsServer::start().await;
    let mut a = nats_node(&nats.url(), "es", |_| {}).await;
    let mut b = nats_node(&nats.url(), "es", |_| {}).await;
    let mut c = nats_node(&nats.url(), "es", |_| {}).await;
    let data = ResolverData::new();
    data.set_rows("items", "100", &[r#"{"id":100,"name":"old"}"#]);
    let resolver_a = items_resolver(&a, "backend-a", &data).await;
    let resolver_b = items_resolver(&b, "backend-b", &data).await;

    let mut client_a = a.client().await;
    let mut client_b = b.client().await;
    let (_, snapshot) = client_a.subscribe("items", "100").await;
    assert_eq!(snapshot, vec![json!({"id": 100, "name": "old"})]);
    client_b.subscribe("items", "100").await;

    data.set_rows(
        "items",
        "100",
        &[r#"{"id":100,"name":"new"}"#, r#"{"ref":7}"#],
    );
    let seq = notify_one(c.grpc(), "items", "100").await;
    let expected = vec![json!({"id": 100, "name": "new"}), json!({"ref": 7})];
    assert_eq!(
        client_a.expect_push("items", "100").await,
        (seq, expected.clone())
    );
    assert_eq!(client_b.expect_push("items", "100").await, (seq, expected));
    client_a.silent().await;
    client_b.silent().await;
    // SHARED: one CHANGE resolve for the cluster (the relay), on A or B.
    assert_eq!(
        resolver_a.change_count("items", "100") + resolver_b.change_count("items", "100"),
        1
    );

    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolver_on_one_node_serves_subscribers_on_the_others() {
    let nats = NatsServer::start().await;
    let mut a = nats_node(&nats.url(), "es", |_| {}).await;
    let mut b = nats_node(&nats.url(), "es", |_| {}).await;
    let mut c = nats_node(&nats.url(), "es", |_| {}).await;
    let data = ResolverData::new();
    data.set_rows("items", "7", &[r#"{"id":7,"secret":"$SECRET"}"#]);
    let resolver = items_resolver(&b, "backend", &data).await;

    let mut client_a = a.client().await;
    client_a.send_secret("alice").await;
    let mut client_c = c.client().await;
    client_c.send_secret("carol").await;
    let (_, snapshot_a) = subscribe_remote(&mut client_a, "items", "7").await;
    let (_, snapshot_c) = subscribe_remote(&mut client_c, "items", "7").await;
    // SUBSCRIBE resolves carry the subscriber's secret, also across nodes.
    assert_eq!(snapshot_a, vec![json!({"id": 7, "secret": "alice"})]);
    assert_eq!(snapshot_c, vec![json!({"id": 7, "secret": "carol"})]);

    data.set_rows("items", "7", &[r#"{"id":7,"v":2}"#]);
    let seq = notify_one(b.grpc(), "items", "7").await;
    let expected = vec![json!({"id": 7, "v": 2})];
    assert_eq!(
        client_a.expect_push("items", "7").await,
        (seq, expected.clone())
    );
    assert_eq!(client_c.expect_push("items", "7").await, (seq, expected));
    client_a.silent().await;
    client_c.silent().await;

    // Exactly what reached the backend: one SUBSCRIBE per subscriber, one
    // SHARED CHANGE for the whole cluster (the relay), though A and C hold it.
    let subscribes = resolver.requests_for(Reason::Subscribe, "items", "7");
    let mut secrets: Vec<&str> = subscribes.iter().map(|r| r.secret.as_str()).collect();
    secrets.sort_unstable();
    assert_eq!(secrets, ["alice", "carol"]);
    let changes = resolver.requests_for(Reason::Change, "items", "7");
    assert_eq!(changes.len(), 1, "CHANGE requests: {changes:?}");
    assert!(changes.iter().all(|r| r.secret.is_empty()), "{changes:?}");
    // `shared` reaches the backend through the answering node: true on the
    // SHARED change resolves only.
    assert!(changes.iter().all(|r| r.shared), "{changes:?}");
    assert!(!subscribes.iter().any(|r| r.shared), "{subscribes:?}");
    // A's and C's subscribes went to B; so did the change, unless B itself
    // claimed it from the relay.
    let b_relayed = metric(&b, "entity_sync_relay_published_total").await;
    let through_b = metric(&a, "entity_sync_cluster_resolves_total").await
        + metric(&c, "entity_sync_cluster_resolves_total").await;
    assert_eq!(through_b, if b_relayed == 1 { 2 } else { 3 });
    assert_eq!(metric(&b, "entity_sync_cluster_resolves_total").await, 0);

    // A new secret on A re-checks its key through B's resolver.
    data.set_rows("items", "7", &[r#"{"id":7,"secret":"$SECRET"}"#]);
    client_a.send_secret("alice-2").await;
    client_a.expect_subscribed("items", "7").await;
    let (_, rows) = client_a.expect_push("items", "7").await;
    assert_eq!(rows, vec![json!({"id": 7, "secret": "alice-2"})]);
    client_a.silent().await;
    client_c.silent().await;
    let recheck = resolver.requests_for(Reason::Subscribe, "items", "7");
    assert_eq!(recheck.len(), 3, "{recheck:?}");
    assert!(
        recheck.iter().any(|r| r.secret == "alice-2" && !r.shared),
        "{recheck:?}"
    );

    a.shutdown().await;
    b.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_keeps_clients_and_resumes_from_the_last_processed_change() {
    let mut nats = NatsServer::start().await;
    // A reaches NATS through a proxy, so it can miss a change B got accepted.
    let proxy = TcpProxy::start(nats.addr()).await;
    let mut a = nats_node(&proxy.url(), "es", |_| {}).await;
    let mut b = nats_node(&nats.url(), "es", |_| {}).await;
    let data = ResolverData::new();
    for id in ["1", "2", "3"] {
        data.set_rows("items", id, &[&format!(r#"{{"id":{id},"v":1}}"#)]);
    }
    let _resolver = items_resolver(&a, "backend", &data).await;
    let mut client = a.client().await;
    client.subscribe("items", "1").await;
    client.subscribe("items", "2").await;

    // A loses NATS; B gets a change accepted; then NATS itself goes down.
    proxy.cut();
    wait_readyz(&a, 503, RECONNECT_DEADLINE).await;
    data.set_rows("items", "1", &[r#"{"id":1,"v":2}"#]);
    let before_stop = notify_one(b.grpc(), "items", "1").await;
    nats.stop();
    wait_notify_unavailable(b.grpc(), &[("items", "2")]).await;
    wait_notify_unavailable(a.grpc(), &[("items", "2")]).await;

    // Without NATS, A keeps serving its clients (its resolver is local).
    client.silent().await;
    let (_, snapshot) = client.subscribe("items", "3").await;
    assert_eq!(snapshot, vec![json!({"id": 3, "v": 1})]);

    nats.restart().await;
    proxy.restore();
    wait_readyz(&a, 200, RECONNECT_DEADLINE).await;

    // The change accepted before the stop was never seen by A: it arrives now.
    let push = client
        .push_at_least_within("items", "1", before_stop, RECONNECT_DEADLINE)
        .await;
    assert_eq!(push, (before_stop, vec![json!({"id": 1, "v": 2})]));

    // Changes accepted after the restart are delivered too, on either node.
    data.set_rows("items", "2", &[r#"{"id":2,"v":2}"#]);
    let after_a = notify_retrying(a.grpc(), &[("items", "2")], "after-restart-a").await;
    assert_eq!(after_a.sequences.len(), 1);
    assert!(
        after_a.sequences[0] > before_stop,
        "{after_a:?} vs {before_stop}"
    );
    let push = client
        .push_at_least_within("items", "2", after_a.sequences[0], RECONNECT_DEADLINE)
        .await;
    assert_eq!(push, (after_a.sequences[0], vec![json!({"id": 2, "v": 2})]));

    data.set_rows("items", "3", &[r#"{"id":3,"v":2}"#]);
    let after_b = notify_retrying(b.grpc(), &[("items", "3")], "after-restart-b").await;
    let push = client
        .push_at_least_within("items", "3", after_b.sequences[0], RECONNECT_DEADLINE)
        .await;
    assert_eq!(push, (after_b.sequences[0], vec![json!({"id": 3, "v": 2})]));
    client.silent().await;
    assert_eq!(
        metric(&a, "entity_sync_resyncs_total").await,
        0,
        "nothing was lost"
    );

    a.shutdown().await;
    b.shutdown().await;
}

/// Nodes A (through a proxy) and B on one NATS whose stream keeps at most
/// `max_bytes`; A's resolver serves items/1 and items/2 and A's client
/// subscribed both.
struct RetentionSetup {
    nats: NatsServer,
    proxy: TcpProxy,
    a: TestNode,
    b: TestNode,
    data: ResolverData,
    _resolver: TestResolver,
    client: WsClient,
}

async fn retention_setup(prefix: &str, modify: fn(&mut Config)) -> RetentionSetup {
    let nats = NatsServer::start().await;
    let proxy = TcpProxy::start(nats.addr()).await;
    let a = nats_node(&proxy.url(), prefix, modify).await;
    let b = nats_node(&nats.url(), prefix, modify).await;
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"id":1,"v":1}"#]);
    data.set_rows("items", "2", &[r#"{"id":2,"v":1}"#]);
    let resolver = items_resolver(&a, "backend", &data).await;
    let mut client = a.client().await;
    client.subscribe("items", "1").await;
    client.subscribe("items", "2").await;
    assert_eq!(metric(&a, "entity_sync_resyncs_total").await, 0);
    RetentionSetup {
        nats,
        proxy,
        a,
        b,
        data,
        _resolver: resolver,
        client,
    }
}

/// While A is cut off, B gets a change to items/1 accepted, then publishes
/// 200 changes of unsubscribed keys, which push it out of the 6 KiB stream.
/// Returns the lost change's sequence.
async fn lose_a_change_while_a_is_away(setup: &RetentionSetup, prefix: &str) -> u64 {
    setup.proxy.cut();
    wait_readyz(&setup.a, 503, RECONNECT_DEADLINE).await;
    setup.data.set_rows("items", "1", &[r#"{"id":1,"v":2}"#]);
    let lost = notify_one(setup.b.grpc(), "items", "1").await;
    // One key per call: a call's keys are stored as one atomic batch, and
    // 200 at once would leave the stream before B's own consumer read them.
    let mut last = 0;
    for i in 0..200 {
        last = notify_one(setup.b.grpc(), "filler", &i.to_string()).await;
    }

    let client = async_nats::connect(setup.nats.url())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(format!("{prefix}_changes"))
        .await
        .expect("stream");
    let state = stream.info().await.expect("stream info").state.clone();
    assert!(
        state.first_sequence > lost && state.last_sequence == last && state.messages > 0,
        "the change to items/1 must have left the stream: lost={lost} state={state:?}"
    );
    lost
}

/// After A is back: items/1 arrives with its latest rows although its change
/// was never consumed (resync), items/2 is re-resolved unchanged.
async fn expect_resync(setup: &mut RetentionSetup, lost: u64) {
    setup.proxy.restore();
    wait_readyz(&setup.a, 200, RECONNECT_DEADLINE).await;
    let latest = read_pushes_until(
        "client on A",
        &mut setup.client,
        "items",
        RECONNECT_DEADLINE,
        |latest| {
            latest.get("1").is_some_and(|(_, rows)| rows[0]["v"] == 2) && latest.contains_key("2")
        },
    )
    .await;
    assert_eq!(latest["1"].1, vec![json!({"id": 1, "v": 2})]);
    assert_eq!(latest["2"].1, vec![json!({"id": 2, "v": 1})]);
    assert!(
        latest["1"].0 >= lost,
        "resync push version {} < {lost}",
        latest["1"].0
    );
    setup.client.silent().await;
    assert_eq!(metric(&setup.a, "entity_sync_resyncs_total").await, 1);
    assert_eq!(metric(&setup.b, "entity_sync_resyncs_total").await, 0);
}

/// A stream of at most 6 KiB (a few dozen change keys, each with its trace
/// headers): retention by bytes evicts exactly when the test publishes, so
/// no clock is involved, and leaves room for the publishing node's own
/// consumer to keep up with the 200 fillers.
fn small_stream(config: &mut Config) {
    config.nats.max_bytes = 6 * 1024;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_behind_the_stream_retention_resyncs_its_subscribed_keys() {
    let mut setup = retention_setup("rt", small_stream).await;
    // A has consumed a change before it is cut off.
    setup.data.set_rows("items", "2", &[r#"{"id":2,"v":1}"#]);
    let warm = notify_one(setup.b.grpc(), "items", "2").await;
    assert_eq!(setup.client.expect_push("items", "2").await.0, warm);

    let lost = lose_a_change_while_a_is_away(&setup, "rt").await;
    expect_resync(&mut setup, lost).await;
    setup.a.shutdown().await;
    setup.b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_that_consumed_nothing_yet_resyncs_too() {
    // Same, but A had consumed no change before it was cut off: the stream's
    // sequence 1 is already a change A should have seen.
    let mut setup = retention_setup("rz", small_stream).await;
    let lost = lose_a_change_while_a_is_away(&setup, "rz").await;
    assert_eq!(lost, 1);
    expect_resync(&mut setup, lost).await;
    setup.a.shutdown().await;
    setup.b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_resyncs_when_every_missed_change_expired() {
    let nats = NatsServer::start().await;
    // Changes live one second. The stream is created here with a one-second
    // duplicate window: nats-server refuses a window longer than max_age (see
    // `stream_with_short_max_age_is_created`).
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ex_changes".into(),
        subjects: vec!["ex.changes.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        max_age: Duration::from_secs(1),
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .expect("create stream");
    let proxy = TcpProxy::start(nats.addr()).await;
    let short = |config: &mut Config| config.nats.max_age = Duration::from_secs(1);
    let mut a = nats_node(&proxy.url(), "ex", short).await;
    let mut b = nats_node(&nats.url(), "ex", short).await;
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"id":1,"v":1}"#]);
    let _resolver = items_resolver(&a, "backend", &data).await;
    let mut client = a.client().await;
    client.subscribe("items", "1").await;
    let warm = notify_one(b.grpc(), "items", "1").await;
    assert_eq!(client.expect_push("items", "1").await.0, warm);

    // A is away; its missed change expires; nothing is published after it.
    proxy.cut();
    wait_readyz(&a, 503, RECONNECT_DEADLINE).await;
    data.set_rows("items", "1", &[r#"{"id":1,"v":2}"#]);
    let lost = notify_one(b.grpc(), "items", "1").await;
    let mut stream = js.get_stream("ex_changes").await.expect("stream");
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let state = stream.info().await.expect("stream info").state.clone();
        if state.messages == 0 && state.first_sequence > lost {
            break;
        }
        assert!(Instant::now() < end, "change never expired: {state:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    proxy.restore();
    wait_readyz(&a, 200, RECONNECT_DEADLINE).await;
    let push = client
        .push_at_least_within("items", "1", lost, RECONNECT_DEADLINE)
        .await;
    assert_eq!(push.1, vec![json!({"id": 1, "v": 2})]);
    assert_eq!(metric(&a, "entity_sync_resyncs_total").await, 1);

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_with_short_max_age_is_created() {
    // `--nats-max-age` below the two-minute idempotency window is a valid
    // setting; the node must still create its stream.
    let nats = NatsServer::start().await;
    let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = Config::default();
    config.nats.url = Some(nats.url());
    config.nats.max_age = Duration::from_secs(30);
    let node = Node::start(Listeners { ws, grpc }, config)
        .await
        .expect("node starts with a 30 s stream max age");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_notifies_survive_a_killed_cluster_member() {
    const KEYS_PER_WRITER: usize = 5;
    const NOTIFIES_PER_WRITER: usize = 100;
    const KILL_AFTER: usize = 60;

    let mut cluster = NatsCluster::start(3).await;
    let replicas = |config: &mut Config| config.nats.replicas = 3;
    let mut a = nats_node(&cluster.urls_from(0), "kc", replicas).await;
    let mut b = nats_node(&cluster.urls_from(1), "kc", replicas).await;
    let data = ResolverData::new();
    let ids: Vec<String> = (0..2 * KEYS_PER_WRITER).map(|i| i.to_string()).collect();
    for id in &ids {
        data.set_rows("items", id, &[&format!(r#"{{"id":{id},"rev":-1}}"#)]);
    }
    let _resolver_a = items_resolver(&a, "backend-a", &data).await;
    let _resolver_b = items_resolver(&b, "backend-b", &data).await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;
    for id in &ids {
        client_a.subscribe("items", id).await;
        client_b.subscribe("items", id).await;
    }

    // The stream's leader is the member whose loss hurts most.
    let js =
        async_nats::jetstream::new(async_nats::connect(cluster.url(0)).await.expect("connect"));
    let mut stream = js.get_stream("kc_changes").await.expect("stream");
    let info = stream.info().await.expect("stream info").clone();
    assert_eq!(info.config.num_replicas, 3);
    let leader = info
        .cluster
        .and_then(|c| c.leader)
        .and_then(|name| cluster.index_of(&name))
        .expect("stream has a leader among the members");

    // Two writers, one per node, each owning half of the keys: set the rows,
    // then notify; a failed notify is retried with the same idempotency key.
    let accepted = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for (w, grpc) in [a.grpc().to_owned(), b.grpc().to_owned()]
        .into_iter()
        .enumerate()
    {
        let (data, accepted, failures) = (data.clone(), accepted.clone(), failures.clone());
        let ids: Vec<String> = ids[w * KEYS_PER_WRITER..(w + 1) * KEYS_PER_WRITER].to_vec();
        writers.push(tokio::spawn(async move {
            let mut last_seq: HashMap<String, u64> = HashMap::new();
            let end = Instant::now() + Duration::from_secs(40);
            for n in 0..NOTIFIES_PER_WRITER {
                let id = &ids[n % KEYS_PER_WRITER];
                data.set_rows("items", id, &[&format!(r#"{{"id":{id},"rev":{n}}}"#)]);
                loop {
                    let result = notify_within(
                        &grpc,
                        &[("items", id)],
                        &format!("w{w}-{n}"),
                        Duration::from_secs(6),
                    )
                    .await;
                    match result {
                        Ok(response) => {
                            assert_eq!(response.sequences.len(), 1);
                            last_seq.insert(id.clone(), response.sequences[0]);
                            accepted.fetch_add(1, Ordering::AcqRel);
                            break;
                        }
                        Err(status) => {
                            failures.fetch_add(1, Ordering::AcqRel);
                            assert!(Instant::now() < end, "writer {w} stuck: {status:?}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            last_seq
        }));
    }

    let end = Instant::now() + Duration::from_secs(20);
    while accepted.load(Ordering::Acquire) < KILL_AFTER {
        assert!(Instant::now() < end, "writers too slow before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed_at = Instant::now();
    cluster.kill(leader);
    let mut last_seq = HashMap::new();
    for writer in writers {
        let seqs = timeout(Duration::from_secs(45), writer)
            .await
            .expect("writers finish")
            .expect("writer panicked");
        last_seq.extend(seqs);
    }
    assert_eq!(accepted.load(Ordering::Acquire), 2 * NOTIFIES_PER_WRITER);
    eprintln!(
        "killed member {leader} (stream leader); {} failed notify attempts retried; writers done {:?} after the kill",
        failures.load(Ordering::Acquire),
        killed_at.elapsed()
    );

    // Both nodes' clients end with every key in its latest state, at a
    // version no older than the key's last accepted notify.
    for (name, client) in [("A", &mut client_a), ("B", &mut client_b)] {
        let expected: HashMap<String, Vec<Value>> = ids
            .iter()
            .map(|id| {
                let rev = NOTIFIES_PER_WRITER - KEYS_PER_WRITER
                    + id.parse::<usize>().unwrap() % KEYS_PER_WRITER;
                (
                    id.clone(),
                    vec![json!({"id": id.parse::<u64>().unwrap(), "rev": rev})],
                )
            })
            .collect();
        let latest = read_pushes_until(
            &format!("client on {name}"),
            client,
            "items",
            RECONNECT_DEADLINE,
            |latest| {
                ids.iter().all(|id| {
                    latest
                        .get(id)
                        .is_some_and(|(v, r)| *v >= last_seq[id] && *r == expected[id])
                })
            },
        )
        .await;
        for id in &ids {
            assert_eq!(latest[id].1, expected[id], "client on {name}, items/{id}");
        }
    }

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_idempotency_key_is_applied_once_across_nodes() {
    let nats = NatsServer::start().await;
    let mut a = nats_node(&nats.url(), "es", |_| {}).await;
    let mut b = nats_node(&nats.url(), "es", |_| {}).await;
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"id":1}"#]);
    data.set_rows("items", "2", &[r#"{"id":2}"#]);
    let resolver_a = items_resolver(&a, "backend-a", &data).await;
    let resolver_b = items_resolver(&b, "backend-b", &data).await;
    let mut client_a = a.client().await;
    let mut client_b = b.client().await;
    client_a.subscribe("items", "1").await;
    client_b.subscribe("items", "1").await;

    let keys = [("items", "1"), ("items", "2")];
    let first = notify_within(a.grpc(), &keys, "order-42", Duration::from_secs(5))
        .await
        .expect("first notify");
    assert!(!first.duplicate, "{first:?}");
    assert_eq!(first.sequences.len(), 2);
    let seq = first.sequences[0];
    assert_eq!(client_a.expect_push("items", "1").await.0, seq);
    assert_eq!(client_b.expect_push("items", "1").await.0, seq);

    // The retry goes to the other node: the stream deduplicates, not the node.
    for grpc in [b.grpc(), a.grpc()] {
        let again = notify_within(grpc, &keys, "order-42", Duration::from_secs(5))
            .await
            .expect("retried notify");
        assert!(again.duplicate, "{again:?}");
        assert_eq!(again.sequences, first.sequences);
    }
    client_a.silent().await;
    client_b.silent().await;
    // One change, resolved once for the cluster (the relay).
    assert_eq!(
        resolver_a.change_count("items", "1") + resolver_b.change_count("items", "1"),
        1
    );

    // A fresh key is a fresh change.
    let other = notify_within(b.grpc(), &keys[..1], "order-43", Duration::from_secs(5))
        .await
        .expect("notify");
    assert!(!other.duplicate);
    assert_eq!(other.sequences, [first.sequences[1] + 1]);
    assert_eq!(
        client_a.expect_push("items", "1").await.0,
        other.sequences[0]
    );

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_on_one_nats_do_not_see_each_other() {
    let nats = NatsServer::start().await;
    let mut alpha = nats_node(&nats.url(), "alpha", |_| {}).await;
    let mut alpha_2 = nats_node(&nats.url(), "alpha", |_| {}).await;
    let mut beta = nats_node(&nats.url(), "beta", |_| {}).await;
    let mut gamma = nats_node(&nats.url(), "gamma", |_| {}).await;
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"id":1}"#]);
    let resolver_alpha = items_resolver(&alpha, "backend-alpha", &data).await;
    let resolver_beta = items_resolver(&beta, "backend-beta", &data).await;

    let mut client_alpha = alpha.client().await;
    let mut client_alpha_2 = alpha_2.client().await;
    let mut client_beta = beta.client().await;
    client_alpha.subscribe("items", "1").await;
    subscribe_remote(&mut client_alpha_2, "items", "1").await;
    client_beta.subscribe("items", "1").await;

    // gamma's cluster resolves find no resolver: alpha's and beta's answer
    // only on their own prefix.
    let mut client_gamma = gamma.client().await;
    client_gamma.send_subscribe("items", "1").await;
    client_gamma
        .expect_error("no_resolver", Some(("items", "1")))
        .await;

    let seq_alpha = notify_one(alpha.grpc(), "items", "1").await;
    assert_eq!(client_alpha.expect_push("items", "1").await.0, seq_alpha);
    assert_eq!(client_alpha_2.expect_push("items", "1").await.0, seq_alpha);
    client_beta.silent().await;
    assert_eq!(resolver_beta.change_count("items", "1"), 0);

    let seq_beta = notify_one(beta.grpc(), "items", "1").await;
    // Each prefix has its own stream, numbered from 1.
    assert_eq!((seq_alpha, seq_beta), (1, 1));
    assert_eq!(client_beta.expect_push("items", "1").await.0, seq_beta);
    client_alpha.silent().await;
    client_alpha_2.silent().await;
    // alpha: one CHANGE for both alpha nodes (the relay; alpha-2 has no
    // resolver of its own, so whichever claims it, alpha's resolves it).
    assert_eq!(resolver_alpha.change_count("items", "1"), 1);
    assert_eq!(resolver_beta.change_count("items", "1"), 1);

    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    for (name, subject) in [
        ("alpha_changes", "alpha.changes.>"),
        ("beta_changes", "beta.changes.>"),
    ] {
        let mut stream = js.get_stream(name).await.expect("stream exists");
        let info = stream.info().await.expect("info");
        assert_eq!(info.config.subjects, [subject]);
        assert_eq!(info.state.messages, 1, "{name}");
    }

    alpha.shutdown().await;
    alpha_2.shutdown().await;
    beta.shutdown().await;
    gamma.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_older_than_2_10_is_refused() {
    let old = std::path::Path::new("/usr/sbin/nats-server");
    if !old.exists() {
        eprintln!(
            "skipped: {} (Debian's nats-server 2.9) is not installed",
            old.display()
        );
        return;
    }
    match common::nats::server_version(old) {
        Some(version) if version < (2, 10) => {}
        other => {
            eprintln!(
                "skipped: {} is {other:?}, not older than 2.10",
                old.display()
            );
            return;
        }
    }
    let nats = NatsServer::start_binary(old, None).await;
    let ws = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = Config::default();
    config.nats.url = Some(nats.url());
    let started = timeout(
        Duration::from_secs(10),
        Node::start(Listeners { ws, grpc }, config),
    )
    .await
    .expect("Node::start answers");
    match started {
        Err(NodeError::Bus(BusError::ServerTooOld { version })) => {
            assert!(version.starts_with("2.9"), "version {version:?}");
        }
        Err(other) => panic!("expected ServerTooOld, got {other:?}"),
        Ok(node) => {
            node.shutdown().await;
            panic!("a node started on nats-server 2.9");
        }
    }
}

/// A node started before its NATS (servers and nodes started together)
/// keeps retrying within `--nats-startup-timeout` and connects once the
/// server is up; changes then flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_nats_waits_for_it() {
    let mut nats = NatsServer::start().await;
    nats.stop();
    let url = nats.url();
    let starting = tokio::spawn(async move {
        let mut config = TestNode::test_config();
        config.nats.url = Some(url);
        config.nats.prefix = "late".into();
        TestNode::try_start(config).await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!starting.is_finished(), "the node gave up at once");
    nats.restart().await;
    let mut node = timeout(Duration::from_secs(20), starting)
        .await
        .expect("the node connects once NATS is up")
        .unwrap()
        .expect("node starts");
    a_change_reaches_a_client(&node, common::DEADLINE).await;
    node.shutdown().await;
}

/// Nothing listening: the node retries for `--nats-startup-timeout`, then
/// fails with the connection error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gives_up_on_an_unreachable_nats_after_the_startup_timeout() {
    let closed = common::process::ClosedPort::new();
    let port = closed.port();
    let mut config = TestNode::test_config();
    config.nats.url = Some(format!("nats://127.0.0.1:{port}"));
    config.nats.startup_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let result = timeout(Duration::from_secs(15), TestNode::try_start(config))
        .await
        .expect("the node gives up");
    let waited = started.elapsed();
    match result {
        Err(NodeError::Bus(err @ BusError::Connect { .. })) => {
            assert_eq!(err.kind(), BusErrorKind::Io, "{err}")
        }
        Err(other) => panic!("expected a connect error, got {other}"),
        Ok(_) => panic!("connected to nothing"),
    }
    assert!(waited >= Duration::from_millis(500), "no retry: {waited:?}");
}

/// A `Notify` whose bus does not answer (the node's NATS link stalled
/// half-open) ends before the deadline its caller sent, with
/// DEADLINE_EXCEEDED, not the gRPC server's CANCELLED "Timeout expired"
/// (which notifiers used to take for a final error).
#[tokio::test]
async fn a_notify_the_bus_cannot_store_in_time_is_deadline_exceeded() {
    use entity_sync_backend::proto::v1::{
        EntityKey, NotifyRequest, entity_sync_client::EntitySyncClient,
    };
    let nats = NatsServer::start().await;
    let proxy = TcpProxy::start(nats.addr()).await;
    let node = nats_node(&proxy.url(), "deadline", |_| {}).await;
    let mut client = EntitySyncClient::connect(node.grpc().to_owned())
        .await
        .unwrap();
    let request = || {
        let mut request = tonic::Request::new(NotifyRequest {
            keys: vec![EntityKey {
                entity: "items".into(),
                id: "1".into(),
            }],
            idempotency_key: "change-1".into(),
        });
        // The deadline travels in the header only: no timer of this client's
        // own can end the call first, so what comes back is the node's answer.
        request
            .metadata_mut()
            .insert("grpc-timeout", "500m".parse().unwrap());
        request
    };
    proxy.stall();
    let started = Instant::now();
    let status = timeout(Duration::from_secs(10), client.notify(request()))
        .await
        .expect("the node answers")
        .expect_err("the bus cannot store the key");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status.message(),
        "the bus did not store the keys within the call's deadline; retry with the same idempotency key"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

/// A JetStream API request that never gets an answer (lost with a cluster
/// member that died, or while the stream elects a leader) is given up after
/// the bus's 2 s deadline and made again, not after the connection's 10 s
/// request timeout: here the node's first stream lookup and its first
/// consumer create never reach the server. Before the deadline, a consumer
/// recreated after a NATS server died took 10 s more to deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_jetstream_requests_are_made_again_within_seconds() {
    let nats = NatsServer::start().await;
    let proxy = TcpProxy::start(nats.addr()).await;
    proxy.swallow("$JS.API.STREAM.INFO.", 1);
    proxy.swallow("$JS.API.CONSUMER.CREATE.", 1);
    let started = Instant::now();
    let mut node = nats_node(&proxy.url(), "lost", |_| {}).await;
    let setup = started.elapsed();
    assert!(
        setup < Duration::from_secs(6),
        "the lost stream lookup was made again after {setup:?}"
    );
    a_change_reaches_a_client(&node, Duration::from_secs(6)).await;
    assert_eq!(proxy.swallowed(), 2, "both requests were dropped");
    node.shutdown().await;
}
