//! Notify: versions, validation, idempotency; health and HTTP endpoints.

use common::http::metric_value;
use entity_sync_testkit as common;

use common::{
    ResolverData, ResolverOptions, TestNode, TestResolver, notify, notify_one, try_notify,
};
use entity_sync_backend::FetchMode;
use serde_json::json;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn setup() -> (TestNode, TestResolver, ResolverData) {
    let (node, resolver, data) = TestNode::start_with_resolver(
        |c| c.grpc.max_notify_keys = 3,
        ResolverOptions::new("backend").entity("items", FetchMode::Shared),
    )
    .await;
    for id in ["1", "2"] {
        data.set_rows("items", id, &[&format!(r#"{{"id":"{id}"}}"#)]);
    }
    (node, resolver, data)
}

#[tokio::test]
async fn push_versions_are_the_notify_sequences() {
    let (node, _resolver, _data) = setup().await;
    let mut client = node.client().await;
    let (v0, _) = client.subscribe("items", "1").await;

    // A change to another key moves the bus head; a new snapshot reflects it.
    let s1 = notify_one(node.grpc(), "unrelated", "x").await;
    assert!(s1 > v0, "sequence {s1} after snapshot version {v0}");
    let (snapshot, _) = client.subscribe("items", "2").await;
    assert_eq!(snapshot, s1, "snapshot version is the bus head");
    client.silent().await;

    let s2 = notify_one(node.grpc(), "items", "1").await;
    assert!(s2 > s1);
    assert_eq!(client.expect_push("items", "1").await.0, s2);

    let both = notify(node.grpc(), &[("items", "2"), ("items", "1")]).await;
    assert_eq!(both.accepted, 2);
    assert_eq!(both.sequences.len(), 2);
    let (s3, s4) = (both.sequences[0], both.sequences[1]);
    assert!(s2 < s3 && s3 < s4, "sequences increase: {s2} {s3} {s4}");
    let mut got = Vec::new();
    for _ in 0..2 {
        let frame = client.recv_json().await;
        let id = frame["body"]["id"].as_str().expect("id").to_owned();
        let (version, _) = common::parse_push(&frame, "items", &id);
        got.push((id, version));
    }
    got.sort();
    assert_eq!(got, vec![("1".to_owned(), s4), ("2".to_owned(), s3)]);
    client.silent().await;
}

#[tokio::test]
async fn invalid_notifies_are_invalid_argument_and_apply_nothing() {
    let (node, resolver, _data) = setup().await;
    let mut client = node.client().await;
    client.subscribe("items", "1").await;

    let long = "x".repeat(129);
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![],
        vec![("", "1")],
        vec![("items", "")],
        vec![("it.ems", "1")],
        vec![("items", "1*")],
        vec![("items", ">")],
        vec![("items", "a b")],
        vec![("items", "a\nb")],
        vec![(long.as_str(), "1")],
        vec![("items", long.as_str())],
        // A valid key next to an invalid one: the whole call is refused.
        vec![("items", "1"), ("items", "bad.id")],
        // More than max_notify_keys (3).
        vec![
            ("items", "1"),
            ("items", "2"),
            ("items", "3"),
            ("items", "4"),
        ],
    ];
    for keys in &cases {
        let status = try_notify(node.grpc(), keys, "")
            .await
            .err()
            .unwrap_or_else(|| panic!("notify {keys:?} must fail"));
        assert_eq!(
            status.code(),
            Some(tonic::Code::InvalidArgument),
            "{keys:?}: {status:?}"
        );
    }
    client.silent().await;
    assert_eq!(resolver.change_count("items", "1"), 0);

    // Exactly max_notify_keys is fine.
    let ok = notify(
        node.grpc(),
        &[("items", "1"), ("items", "2"), ("items", "3")],
    )
    .await;
    assert_eq!(ok.accepted, 3);
    assert_eq!(client.expect_push("items", "1").await.0, ok.sequences[0]);
}

#[tokio::test]
async fn duplicate_idempotency_key_is_acknowledged_but_not_applied() {
    let (node, resolver, _data) = setup().await;
    let mut client = node.client().await;
    client.subscribe("items", "1").await;

    let keys = [("items", "1"), ("items", "2")];
    let first = try_notify(node.grpc(), &keys, "order-42")
        .await
        .expect("notify");
    assert!(!first.duplicate);
    assert_eq!(first.accepted, 2);
    assert_eq!(client.expect_push("items", "1").await.0, first.sequences[0]);

    let again = try_notify(node.grpc(), &keys, "order-42")
        .await
        .expect("notify");
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.sequences, first.sequences);
    client.silent().await;
    assert_eq!(resolver.change_count("items", "1"), 1);

    let other = try_notify(node.grpc(), &keys, "order-43")
        .await
        .expect("notify");
    assert!(!other.duplicate);
    assert!(other.sequences[0] > first.sequences[1]);
    assert_eq!(client.expect_push("items", "1").await.0, other.sequences[0]);
    assert_eq!(resolver.change_count("items", "1"), 2);
}

#[tokio::test]
async fn notify_without_subscribers_is_accepted_and_resolves_nothing() {
    let (node, resolver, _data) = setup().await;
    let mut watcher = node.client().await;
    watcher.subscribe("items", "2").await;
    let response = notify(
        node.grpc(),
        &[("items", "1"), ("nobody", "here"), ("items", "2")],
    )
    .await;
    assert_eq!(response.accepted, 3);
    assert!(response.sequences[0] < response.sequences[1]);
    assert!(response.sequences[1] < response.sequences[2]);
    // The watcher's push shows the node consumed all three keys.
    watcher
        .push_at_least("items", "2", response.sequences[2])
        .await;
    assert_eq!(resolver.change_count("items", "1"), 0);

    // A later subscriber gets a snapshot at the bus head.
    let mut client = node.client().await;
    let (version, rows) = client.subscribe("items", "1").await;
    assert_eq!(version, response.sequences[2]);
    assert_eq!(rows, vec![json!({"id": "1"})]);
    client.silent().await;
    assert_eq!(resolver.change_count("items", "1"), 0);
}

#[tokio::test]
async fn grpc_health_is_serving() {
    let node = TestNode::start_default().await;
    let channel = tonic::transport::Endpoint::from_shared(node.grpc().to_owned())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut health = HealthClient::new(channel);
    for service in ["", "entitysync.v1.EntitySync"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|s| panic!("health check {service:?}: {s:?}"))
            .into_inner();
        assert_eq!(
            response.status,
            ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
}

#[tokio::test]
async fn http_health_ready_and_metrics() {
    let (node, _resolver, _data) = setup().await;
    let mut client = node.client().await;
    client.subscribe("items", "1").await;

    let (status, body) = node.http_get("/healthz").await;
    assert_eq!(status, 200);
    assert!(body.contains("ok"), "{body}");
    assert_eq!(node.http_get("/readyz").await.0, 200);
    let (status, metrics) = node.http_get("/metrics").await;
    assert_eq!(status, 200);
    for (name, expected) in [
        ("entity_sync_connections", 1.0),
        ("entity_sync_subscriptions", 1.0),
        ("entity_sync_resolvers", 1.0),
    ] {
        assert_eq!(
            metric_value(&metrics, name),
            Some(expected),
            "{name} in:\n{metrics}"
        );
    }
    for name in [
        "entity_sync_pushes_total",
        "entity_sync_resolve_requests_total",
        "entity_sync_notify_keys_total",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }
}

#[tokio::test]
async fn metrics_can_move_to_their_own_address() {
    let node = TestNode::start(|c| c.ws.metrics_addr = Some("127.0.0.1:0".parse().unwrap())).await;
    let addr = node.metrics_addr().expect("a metrics address");
    assert_ne!(addr, node.ws_addr());
    let (status, body) = common::http::http_get(addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("entity_sync_connections 0"), "{body}");
    // Not on the websocket port any more; health and readiness stay there.
    assert_eq!(node.http_get("/metrics").await.0, 404);
    assert_eq!(node.http_get("/healthz").await.0, 200);
    assert_eq!(node.http_get("/readyz").await.0, 200);
    let (status, _) = common::http::http_get(addr, "/healthz").await.unwrap();
    assert_eq!(status, 404, "the metrics address serves /metrics only");
}
