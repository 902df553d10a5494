//! What operators see: trace ids followed from `Notify` to the push in the
//! logs of the real binary (one node, and two over a real nats-server),
//! `/metrics` moving with activity, the Grafana dashboard's queries naming
//! only metrics a node exports, `/readyz` and gRPC health saying why they are
//! not ready, `--print-config` and `--help`.

use entity_sync_testkit as common;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::{
    DEADLINE, NodeProcess, ResolverData, ResolverOptions, TestNode, TestResolver, WsClient,
    http::{http_get, metric_value},
    nats::NatsServer,
    notify_one,
};
use entity_sync_backend::{
    FetchMode,
    proto::v1::{EntityKey, NotifyRequest, entity_sync_client::EntitySyncClient},
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const BIN: &str = env!("CARGO_BIN_EXE_entity-sync");
/// Waits that span a NATS restart and the client's reconnect.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(20);
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Calls `Notify` for `entity/id` with `metadata` (name, value) pairs;
/// returns the response's `x-trace-id` and the key's sequence.
async fn notify_with(
    grpc: &str,
    entity: &str,
    id: &str,
    metadata: &[(&str, &str)],
) -> (String, u64) {
    let mut client = EntitySyncClient::connect(grpc.to_owned()).await.unwrap();
    let mut request = tonic::Request::new(NotifyRequest {
        keys: vec![EntityKey {
            entity: entity.into(),
            id: id.into(),
        }],
        idempotency_key: String::new(),
    });
    for (name, value) in metadata {
        let name = tonic::metadata::MetadataKey::from_bytes(name.as_bytes()).unwrap();
        request.metadata_mut().insert(name, value.parse().unwrap());
    }
    let response = client.notify(request).await.expect("Notify");
    let trace = response
        .metadata()
        .get("x-trace-id")
        .expect("the answer names its trace id")
        .to_str()
        .unwrap()
        .to_owned();
    (trace, response.into_inner().sequences[0])
}

/// Log lines of `log` that contain every one of `needles`.
fn lines_with(log: &Path, needles: &[&str]) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .map(str::to_owned)
        .collect()
}

/// Waits until `log` has a line with every one of `needles` (logs are
/// written as they happen; the wait only covers the write after the push).
async fn wait_log(log: &Path, needles: &[&str]) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(line) = lines_with(log, needles).into_iter().next() {
            return line;
        }
        if Instant::now() >= deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("no log line with {needles:?} in:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn spawn_node(args: &[String], rust_log: &str) -> NodeProcess {
    // A push per notify, rows changed or not (the tests notify unchanged rows).
    let mut args = args.to_vec();
    args.push("--push-unchanged-rows".into());
    let mut node = NodeProcess::spawn(Path::new(BIN), &args, None, rust_log).unwrap();
    node.wait_ready(Duration::from_secs(20)).await.unwrap();
    node
}

fn log_of(node: &mut NodeProcess) -> PathBuf {
    node.guard().log().to_owned()
}

/// The gRPC health status of `service` ("" for the whole server).
async fn health(grpc: &str, service: &str) -> Result<i32, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(grpc.to_owned())
        .unwrap()
        .connect()
        .await
        .map_err(|err| tonic::Status::unavailable(err.to_string()))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status)
}

/// Polls until `/readyz` and gRPC health agree on `(status, body)` and
/// `serving`.
async fn wait_readiness(node: &TestNode, status: u16, body: &str, serving: ServingStatus) {
    let deadline = Instant::now() + RECONNECT_DEADLINE;
    loop {
        let ready = node.http_get("/readyz").await;
        let all = health(node.grpc(), "").await.ok();
        let service = health(node.grpc(), "entitysync.v1.EntitySync").await.ok();
        let want = Some(serving as i32);
        if ready == (status, body.to_owned()) && all == want && service == want {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "readiness is {ready:?}, health {all:?}/{service:?}; expected {status} {body:?} {serving:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Trace ids in the logs
// ---------------------------------------------------------------------------

/// The caller's `x-trace-id` is on the notify, dispatch, resolve and push
/// lines of the node's log, and comes back in the answer; an unusable one is
/// replaced by a fresh id and never written to the log.
#[tokio::test]
async fn a_callers_trace_id_follows_the_change_to_the_push_in_the_log() {
    let mut node = spawn_node(&[], "entity_sync=debug").await;
    let log = log_of(&mut node);
    let data = ResolverData::new();
    data.set_rows("items", "1", &[r#"{"id":1}"#]);
    let _resolver = TestResolver::connect(
        &node.grpc_url(),
        ResolverOptions::new("svc").entity("items", FetchMode::Shared),
        &data,
    )
    .await;
    let mut client = WsClient::connect(&node.ws_url()).await;
    client.subscribe("items", "1").await;

    let (echoed, seq) = notify_with(&node.grpc_url(), "items", "1", &[("x-trace-id", TRACE)]).await;
    assert_eq!(echoed, TRACE);
    let (version, _) = client.expect_push("items", "1").await;
    assert_eq!(version, seq);
    let field = format!("trace_id={TRACE}");
    for message in [
        "notify accepted",
        "change dispatched",
        "change resolved",
        "pushed",
    ] {
        let line = wait_log(&log, &[message, &field]).await;
        assert!(line.contains("DEBUG"), "{line}");
    }
    assert!(
        wait_log(&log, &["pushed", &field])
            .await
            .contains("delivered=1")
    );

    // W3C traceparent, upper case: its trace-id, in lower case.
    let upper = "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01";
    let (echoed, _) = notify_with(&node.grpc_url(), "items", "1", &[("traceparent", upper)]).await;
    assert_eq!(echoed, "0af7651916cd43dd8448eb211c80319c");
    client.expect_push("items", "1").await;
    wait_log(
        &log,
        &["pushed", "trace_id=0af7651916cd43dd8448eb211c80319c"],
    )
    .await;

    // Junk: a fresh id instead, and the junk is nowhere in the log.
    let junk = "<script>alert(1)</script>-0123456789";
    let (fresh, _) = notify_with(&node.grpc_url(), "items", "1", &[("x-trace-id", junk)]).await;
    assert_eq!(fresh.len(), 32);
    assert!(fresh.bytes().all(|b| b.is_ascii_hexdigit()), "{fresh}");
    client.expect_push("items", "1").await;
    wait_log(&log, &["pushed", &format!("trace_id={fresh}")]).await;
    wait_log(
        &log,
        &[
            "unusable trace id header ignored",
            &format!("trace_id={fresh}"),
        ],
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("script"), "{text}");

    // The command line's notify names the trace id, its own or the node's.
    let run = |args: Vec<String>| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let server = node.grpc_url();
    let given = "00000000000000000000000000c0ffee";
    let stderr = tokio::task::spawn_blocking({
        let server = server.clone();
        move || {
            run(vec![
                "notify".into(),
                format!("--server={server}"),
                format!("--trace-id={given}"),
                "items/1".into(),
            ])
        }
    })
    .await
    .unwrap();
    assert_eq!(stderr, format!("trace id {given}\n"));
    client.expect_push("items", "1").await;
    wait_log(&log, &["pushed", &format!("trace_id={given}")]).await;
    let stderr = tokio::task::spawn_blocking(move || {
        run(vec![
            "notify".into(),
            format!("--server={server}"),
            "items/1".into(),
        ])
    })
    .await
    .unwrap();
    let made = stderr.strip_prefix("trace id ").unwrap().trim_end();
    client.expect_push("items", "1").await;
    wait_log(&log, &["notify accepted", &format!("trace_id={made}")]).await;

    // Without a header each call gets its own id.
    let (a, _) = notify_with(&node.grpc_url(), "items", "1", &[]).await;
    let (b, _) = notify_with(&node.grpc_url(), "items", "1", &[]).await;
    assert_ne!(a, b);
    assert!(!a.contains('-') && a.len() == 32, "{a}");
}

/// Over a real nats-server: the node that accepts the `Notify` logs the
/// trace id, and the node whose client gets the push logs the same id on its
/// dispatch, resolve and push lines (the id travels in the JetStream
/// message's headers).
#[tokio::test]
async fn a_trace_id_crosses_nodes_over_jetstream() {
    let nats = NatsServer::start().await;
    let args = vec![format!("--nats-url={}", nats.url())];
    let mut a = spawn_node(&args, "entity_sync=debug").await;
    let mut b = spawn_node(&args, "entity_sync=debug").await;
    let (log_a, log_b) = (log_of(&mut a), log_of(&mut b));
    let data = ResolverData::new();
    data.set_rows("items", "9", &[r#"{"id":9}"#]);
    let _resolver = TestResolver::connect(
        &b.grpc_url(),
        ResolverOptions::new("svc").entity("items", FetchMode::Shared),
        &data,
    )
    .await;
    let mut client = WsClient::connect(&b.ws_url()).await;
    client.subscribe("items", "9").await;

    let (echoed, seq) = notify_with(&a.grpc_url(), "items", "9", &[("x-trace-id", TRACE)]).await;
    assert_eq!(echoed, TRACE);
    let (version, rows) = client.expect_push("items", "9").await;
    assert_eq!((version, rows), (seq, vec![json!({"id": 9})]));
    let field = format!("trace_id={TRACE}");
    wait_log(&log_a, &["notify accepted", &field]).await;
    for message in ["change dispatched", "change resolved", "pushed"] {
        wait_log(&log_b, &[message, &field]).await;
    }
    assert!(lines_with(&log_b, &["notify accepted", &field]).is_empty());
    // The push happened on B: A has no subscriber, so it neither resolves nor pushes.
    assert!(lines_with(&log_a, &["pushed", &field]).is_empty());
    assert_eq!(
        b.metric("entity_sync_notify_to_push_seconds_count").await,
        Ok(1.0)
    );
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// Resolve latency by entity and status, notify-to-push latency, resolver
/// streams by name, readiness and bus lag move exactly with what happened.
#[tokio::test]
async fn metrics_move_with_resolves_pushes_and_resolvers() {
    let (node, _resolver, data) = TestNode::start_with_resolver(
        |_| {},
        ResolverOptions::new("svc").entity("items", FetchMode::Shared),
    )
    .await;
    let data2 = ResolverData::new();
    let _second = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("svc").entity("items", FetchMode::Shared),
        &data2,
    )
    .await;
    let _other = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("lists-backend").entity("lists", FetchMode::PerSubscriber),
        &data2,
    )
    .await;
    data.set_rows("items", "1", &[r#"{"id":1}"#]);
    data2.set_rows("items", "1", &[r#"{"id":1}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    client.send_subscribe("items", "404").await;
    client
        .expect_error("not_found", Some(("items", "404")))
        .await;
    client.send_subscribe("nothing", "1").await;
    client
        .expect_error("no_resolver", Some(("nothing", "1")))
        .await;

    for _ in 0..3 {
        let seq = notify_one(node.grpc(), "items", "1").await;
        client.push_at_least("items", "1", seq).await;
    }
    let (status, text) = node.http_get("/metrics").await;
    assert_eq!(status, 200);
    let value = |name: &str| metric_value(&text, name);
    let count = |entity: &str, status: &str| {
        value(&format!(
            "entity_sync_resolve_duration_seconds_count{{entity=\"{entity}\",status=\"{status}\"}}"
        ))
    };
    // One subscribe and three changes of items/1 resolved OK.
    assert_eq!(count("items", "ok"), Some(4.0), "{text}");
    assert_eq!(count("items", "not_found"), Some(1.0), "{text}");
    // An entity no resolver registered has no label of its own.
    assert_eq!(count("other", "no_resolver"), Some(1.0), "{text}");
    assert_eq!(count("nothing", "no_resolver"), None, "{text}");
    assert_eq!(
        value(
            "entity_sync_resolve_duration_seconds_bucket{entity=\"items\",status=\"ok\",le=\"+Inf\"}"
        ),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        value("entity_sync_notify_to_push_seconds_count"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        value("entity_sync_notify_to_push_seconds_bucket{le=\"+Inf\"}"),
        Some(3.0)
    );
    assert!(value("entity_sync_notify_to_push_seconds_sum").unwrap() > 0.0);
    assert_eq!(
        value("entity_sync_resolver_streams{name=\"svc\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value("entity_sync_resolver_streams{name=\"lists-backend\"}"),
        Some(1.0)
    );
    assert_eq!(value("entity_sync_resolvers"), Some(3.0));
    assert_eq!(value("entity_sync_ready"), Some(1.0));
    assert_eq!(value("entity_sync_bus_lag"), Some(0.0));
    assert_eq!(value("entity_sync_outbox_replaced_total"), Some(0.0));
    // The three change pushes (a snapshot is not a fan-out).
    assert_eq!(value("entity_sync_pushes_total"), Some(3.0), "{text}");
    assert_eq!(value("entity_sync_resyncs_total"), Some(0.0));
    assert_eq!(value("entity_sync_slow_client_closes_total"), Some(0.0));
    // Existing series keep their names and labels.
    assert_eq!(
        value("entity_sync_resolve_requests_total{reason=\"change\"}"),
        Some(3.0)
    );
    assert_eq!(
        value("entity_sync_client_errors_total{code=\"not_found\"}"),
        Some(1.0)
    );
    assert_eq!(value("entity_sync_notify_keys_total"), Some(3.0));
}

/// More than 64 entities, all of them a client's invention: none gets a
/// label of its own (no resolver answered for them), all count as `other`.
#[tokio::test]
async fn client_chosen_entities_cannot_grow_the_label_set() {
    let node = TestNode::start_default().await;
    let mut client = node.client().await;
    for i in 0..70 {
        let entity = format!("e{i}");
        client.send_subscribe(&entity, "1").await;
        client
            .expect_error("no_resolver", Some((&entity, "1")))
            .await;
    }
    let (_, text) = node.http_get("/metrics").await;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("entity_sync_resolve_duration_seconds_count{"))
        .collect();
    assert_eq!(
        series,
        ["entity_sync_resolve_duration_seconds_count{entity=\"other\",status=\"no_resolver\"} 70"],
        "{text}"
    );
}

/// Clients subscribe to 100 entities no resolver serves before the real one
/// registers: they take none of the 64 entity labels, and the real entity,
/// once a resolver answers for it, gets its own.
#[tokio::test]
async fn bogus_entities_cannot_squat_the_entity_labels() {
    let node = TestNode::start_default().await;
    let mut client = node.client().await;
    for i in 0..100 {
        let entity = format!("bogus{i}");
        client.send_subscribe(&entity, "1").await;
        client
            .expect_error("no_resolver", Some((&entity, "1")))
            .await;
    }
    let data = ResolverData::new();
    let _resolver = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("svc").entity("real", FetchMode::Shared),
        &data,
    )
    .await;
    data.set_rows("real", "1", &[r#"{"id":1}"#]);
    client.subscribe("real", "1").await;
    let (_, text) = node.http_get("/metrics").await;
    assert_eq!(
        metric_value(
            &text,
            "entity_sync_resolve_duration_seconds_count{entity=\"real\",status=\"ok\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "entity_sync_resolve_duration_seconds_count{entity=\"other\",status=\"no_resolver\"}"
        ),
        Some(100.0),
        "{text}"
    );
    assert!(!text.contains("entity=\"bogus"), "{text}");
}

/// The JetStream bus: head and lag follow the stream (lag 0 once the node
/// has consumed everything stored).
#[tokio::test]
async fn bus_head_and_lag_on_jetstream() {
    let nats = NatsServer::start().await;
    let url = nats.url();
    let (node, _resolver, data) = TestNode::start_with_resolver(
        move |c| c.nats.url = Some(url),
        ResolverOptions::new("svc").entity("items", FetchMode::Shared),
    )
    .await;
    data.set_rows("items", "1", &[r#"{"id":1}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    let mut last = 0;
    for _ in 0..5 {
        last = notify_one(node.grpc(), "items", "1").await;
        client.push_at_least("items", "1", last).await;
    }
    assert_eq!(last, 5, "a fresh stream numbers from 1");
    assert_eq!(node.metric("entity_sync_bus_head_sequence").await, 5.0);
    assert_eq!(node.metric("entity_sync_bus_lag").await, 0.0);
    assert_eq!(node.metric("entity_sync_changes_consumed_total").await, 5.0);
    assert_eq!(node.metric("entity_sync_bus_connected").await, 1.0);
}

// ---------------------------------------------------------------------------
// The dashboard
// ---------------------------------------------------------------------------

/// Every `entity_sync_*` name in an expression of the dashboard.
fn dashboard_metric_names(dashboard: &Value) -> Vec<String> {
    fn walk(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map {
                    if key == "expr"
                        && let Some(expr) = v.as_str()
                    {
                        let mut rest = expr;
                        while let Some(at) = rest.find("entity_sync_") {
                            let tail = &rest[at..];
                            let end = tail
                                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                                .unwrap_or(tail.len());
                            out.push(tail[..end].to_owned());
                            rest = &tail[end..];
                        }
                    } else {
                        walk(v, out);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut names = Vec::new();
    walk(dashboard, &mut names);
    names.sort();
    names.dedup();
    names
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/entity-sync.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let names = dashboard_metric_names(&dashboard);
    for wanted in [
        "entity_sync_resolve_duration_seconds_bucket",
        "entity_sync_notify_to_push_seconds_bucket",
        "entity_sync_bus_lag",
        "entity_sync_resolver_streams",
        "entity_sync_outbox_replaced_total",
        "entity_sync_slow_client_closes_total",
        "entity_sync_resyncs_total",
        "entity_sync_ready",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "the dashboard shows {wanted}: {names:?}"
        );
    }

    // A node after some activity, so histograms and labelled series exist.
    let (node, _resolver, data) = TestNode::start_with_resolver(
        |_| {},
        ResolverOptions::new("svc").entity("items", FetchMode::Shared),
    )
    .await;
    data.set_rows("items", "1", &[r#"{"id":1}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    let seq = notify_one(node.grpc(), "items", "1").await;
    client.push_at_least("items", "1", seq).await;
    let (_, text) = node.http_get("/metrics").await;
    let exported: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for name in &names {
        assert!(
            exported.contains(&name.as_str()),
            "{name} is not in /metrics:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------
// Readiness
// ---------------------------------------------------------------------------

/// NATS goes away: `/readyz` answers 503 `not ready: bus down` and gRPC
/// health NOT_SERVING (the whole server and the service); back to 200 and
/// SERVING once NATS is back.
#[tokio::test]
async fn readiness_says_the_bus_is_down_and_recovers() {
    let mut nats = NatsServer::start().await;
    let url = nats.url();
    let node = TestNode::start(move |c| c.nats.url = Some(url)).await;
    wait_readiness(&node, 200, "ready\n", ServingStatus::Serving).await;
    assert_eq!(node.metric("entity_sync_ready").await, 1.0);

    nats.stop();
    wait_readiness(
        &node,
        503,
        "not ready: bus down\n",
        ServingStatus::NotServing,
    )
    .await;
    assert_eq!(node.metric("entity_sync_ready").await, 0.0);
    assert_eq!(node.metric("entity_sync_bus_connected").await, 0.0);

    nats.restart().await;
    wait_readiness(&node, 200, "ready\n", ServingStatus::Serving).await;
    assert_eq!(node.metric("entity_sync_ready").await, 1.0);
}

/// On SIGTERM the node turns NOT_SERVING and says why (draining) before its
/// listeners close, then exits 0.
#[tokio::test]
async fn sigterm_turns_health_not_serving_with_the_reason_draining() {
    let mut node = spawn_node(&[], "info").await;
    let log = log_of(&mut node);
    assert_eq!(
        health(&node.grpc_url(), "").await.unwrap(),
        ServingStatus::Serving as i32
    );
    assert_eq!(
        http_get(node.ws, "/readyz").await,
        Ok((200, "ready\n".into()))
    );
    node.guard().signal(libc::SIGTERM);
    let status = node
        .guard()
        .wait_exit(Duration::from_secs(20))
        .expect("the node exits");
    assert_eq!(status.code(), Some(0));
    let line = wait_log(&log, &["not ready", "reason=draining"]).await;
    assert!(line.contains("NOT_SERVING"), "{line}");
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

#[test]
fn print_config_shows_the_effective_configuration_without_secrets() {
    let out = Command::new(BIN)
        .args([
            "--print-config",
            "--nats-url=nats://alice:hunter2-url-pass@127.0.0.1:4222,tls://tok3n-in-url@n2:4222",
            "--ws-path=/sync/",
        ])
        .env("ENTITY_SYNC_NATS_TOKEN", "env-token-s3cret")
        .env("ENTITY_SYNC_MAX_SUBSCRIPTIONS", "77")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for secret in [
        "hunter2-url-pass",
        "tok3n-in-url",
        "env-token-s3cret",
        "alice",
    ] {
        assert!(!stdout.contains(secret), "{secret} printed:\n{stdout}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains(secret));
    }
    for line in [
        "--nats-url=nats://***@127.0.0.1:4222,tls://***@n2:4222  # command line",
        "--nats-token=***  # env ENTITY_SYNC_NATS_TOKEN",
        "--max-subscriptions=77  # env ENTITY_SYNC_MAX_SUBSCRIPTIONS",
        "--ws-path=/sync/  # command line",
        "--ws-addr=0.0.0.0:8080  # default",
        "--nats-creds=(unset)  # default",
    ] {
        assert!(stdout.lines().any(|l| l == line), "{line:?} in:\n{stdout}");
    }
    for heading in [
        "WebSocket",
        "gRPC",
        "Security/TLS",
        "NATS",
        "Resolve",
        "Operations",
    ] {
        assert!(
            stdout.lines().any(|l| l == format!("# {heading}")),
            "{heading}"
        );
    }
    // The node did not start: nothing listens, nothing was logged.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn print_config_of_an_invalid_configuration_exits_1() {
    let out = Command::new(BIN)
        .args(["--print-config", "--resolve-batch-size=0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("--resolve-batch-size=0  # command line")
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resolve-batch-size"));
}

#[test]
fn help_groups_flags_by_concern() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    // Each heading, and under it a flag of its own.
    let sections = [
        ("WebSocket:", "--ws-path"),
        ("gRPC:", "--max-notify-keys"),
        ("Security/TLS:", "--grpc-tokens-file"),
        ("NATS:", "--nats-url"),
        ("Resolve:", "--resolve-timeout"),
        ("Operations:", "--print-config"),
    ];
    for (heading, flag) in sections {
        let at = help
            .lines()
            .position(|l| l == heading)
            .unwrap_or_else(|| panic!("{heading} in:\n{help}"));
        let section: Vec<&str> = help
            .lines()
            .skip(at + 1)
            .take_while(|l| !l.is_empty())
            .collect();
        assert!(
            section.iter().any(|l| l.trim_start().starts_with(flag)),
            "{flag} under {heading}:\n{help}"
        );
    }
    let notify = Command::new(BIN)
        .args(["notify", "--help"])
        .output()
        .unwrap();
    let notify = String::from_utf8_lossy(&notify.stdout);
    for flag in ["--token", "--tls-ca", "--tls-cert", "--tls-key"] {
        assert!(notify.contains(flag), "{flag} in:\n{notify}");
    }
}

/// `--help` shows each flag's environment variable, and its value unless
/// the flag hides it: a credential set in the environment never appears.
#[test]
fn help_never_prints_a_credential_from_the_environment() {
    const MARKER: &str = "m4rker-s3cret";
    let credentials = [
        (
            "ENTITY_SYNC_NATS_URL",
            format!("nats://alice:{MARKER}-url@127.0.0.1:4222"),
        ),
        ("ENTITY_SYNC_NATS_TOKEN", format!("{MARKER}-token")),
        ("ENTITY_SYNC_NATS_CREDS", format!("/run/{MARKER}-creds")),
        (
            "ENTITY_SYNC_GRPC_TOKENS_FILE",
            format!("/run/{MARKER}-tokens"),
        ),
        ("ENTITY_SYNC_NOTIFY_TOKEN", format!("{MARKER}-notify")),
    ];
    for args in [&["--help"][..], &["notify", "--help"], &["-h"]] {
        let out = Command::new(BIN)
            .args(args)
            .envs(credentials.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !text.contains(MARKER),
            "{args:?} printed a credential:\n{text}"
        );
        assert!(!text.contains("alice"), "{args:?}:\n{text}");
    }
    // The variables are still named, and values that are no credential still shown.
    let out = Command::new(BIN)
        .arg("--help")
        .env("ENTITY_SYNC_NATS_URL", "nats://bob:pw@127.0.0.1:4222")
        .env("ENTITY_SYNC_NATS_PREFIX", "shown-prefix")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("ENTITY_SYNC_NATS_URL"), "{help}");
    assert!(
        help.contains("ENTITY_SYNC_NATS_PREFIX=shown-prefix"),
        "{help}"
    );
}
