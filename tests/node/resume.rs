//! Resume by version: a subscribe that carries the version the client holds
//! gets `subscribed` with `current: true` and no snapshot while the key has
//! not changed after it, and `subscribed` with a snapshot otherwise (the key
//! changed, or a version the node cannot place). Authorization still runs.

use entity_sync_testkit as common;

use common::{Entry, ResolverOptions, TestNode, notify_one};
use entity_sync::proto::v1::Status as KeyStatus;
use entity_sync_backend::FetchMode;
use serde_json::{Value, json};

const CURRENT: &str = "entity_sync_resumed_current_total";
const SNAPSHOT: &str = "entity_sync_resumed_snapshot_total";

fn resume(entity: &str, id: &str, version: u64) -> Value {
    json!({"action": "subscribe", "body": {"entity": entity, "id": id, "version": version}})
}

fn current(entity: &str, id: &str) -> Value {
    json!({"action": "subscribed", "body": {"entity": entity, "id": id, "current": true}})
}

async fn node() -> (TestNode, common::TestResolver, common::ResolverData) {
    TestNode::start_with_resolver(
        |_| {},
        ResolverOptions::new("backend")
            .entity("items", FetchMode::Shared)
            .entity("docs", FetchMode::PerSubscriber),
    )
    .await
}

#[tokio::test]
async fn a_version_still_the_latest_resumes_without_a_snapshot() {
    let (node, resolver, data) = node().await;
    for entity in ["items", "docs"] {
        data.set_rows(entity, "1", &[r#"{"n":1}"#]);
        let mut first = node.client().await;
        first.send_secret("s").await;
        let (held, _) = first.subscribe(entity, "1").await;

        // A new connection (a reconnect) that holds that version.
        let mut again = node.client().await;
        again.send_secret("s").await;
        let requests = resolver.requests().len();
        again.send_json(resume(entity, "1", held)).await;
        assert_eq!(again.recv_json().await, current(entity, "1"), "{entity}");
        again.silent().await;
        // Authorized all the same: the resolver was asked, with the secret.
        assert_eq!(resolver.requests().len(), requests + 1, "{entity}");

        // The resumed subscription is live: a change reaches it.
        data.set_rows(entity, "1", &[r#"{"n":2}"#]);
        let version = notify_one(node.grpc(), entity, "1").await;
        let (pushed, rows) = again.expect_push(entity, "1").await;
        assert_eq!((pushed, rows), (version, vec![json!({"n": 2})]), "{entity}");
    }
    assert_eq!(node.metric(CURRENT).await, 2.0);
    assert_eq!(node.metric(SNAPSHOT).await, 0.0);
}

#[tokio::test]
async fn a_changed_key_or_a_version_the_node_cannot_place_gets_a_snapshot() {
    let (node, _resolver, data) = node().await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let mut client = node.client().await;
    let (held, _) = client.subscribe("items", "1").await;
    data.set_rows("items", "1", &[r#"{"n":2}"#]);
    let changed = notify_one(node.grpc(), "items", "1").await;
    client.expect_push("items", "1").await;

    // Held before the change: a snapshot with the change.
    let mut behind = node.client().await;
    behind.send_json(resume("items", "1", held)).await;
    behind.expect_subscribed("items", "1").await;
    let (version, rows) = behind.expect_push("items", "1").await;
    assert!(version >= changed, "{version} < {changed}");
    assert_eq!(rows, [json!({"n": 2})]);

    // Above every version the bus has given out: a snapshot.
    let mut ahead = node.client().await;
    ahead.send_json(resume("items", "1", (1 << 53) - 1)).await;
    ahead.expect_subscribed("items", "1").await;
    assert_eq!(ahead.expect_push("items", "1").await.1, [json!({"n": 2})]);

    // The change's own version is current.
    let mut caught_up = node.client().await;
    caught_up.send_json(resume("items", "1", changed)).await;
    assert_eq!(caught_up.recv_json().await, current("items", "1"));
    caught_up.silent().await;
    assert_eq!(node.metric(SNAPSHOT).await, 2.0);
    assert_eq!(node.metric(CURRENT).await, 1.0);
}

#[tokio::test]
async fn a_refused_resume_is_refused_like_any_subscribe() {
    let (node, _resolver, data) = node().await;
    data.set_rows("docs", "1", &[r#"{"n":1}"#]);
    let mut client = node.client().await;
    let (held, _) = client.subscribe("docs", "1").await;
    data.set(
        "docs",
        "1",
        Entry::status(KeyStatus::Forbidden, "not yours"),
    );
    let mut other = node.client().await;
    other.send_json(resume("docs", "1", held)).await;
    other.expect_error("forbidden", Some(("docs", "1"))).await;
    other.silent().await;
}

#[tokio::test]
async fn a_resolver_that_sets_versions_decides_what_is_current() {
    let (node, _resolver, data) = node().await;
    data.set(
        "items",
        "1",
        Entry {
            version: 7,
            ..Entry::ok(&[r#"{"n":1}"#])
        },
    );
    let mut client = node.client().await;
    client.send_json(resume("items", "1", 7)).await;
    assert_eq!(client.recv_json().await, current("items", "1"));
    let mut older = node.client().await;
    older.send_json(resume("items", "1", 6)).await;
    older.expect_subscribed("items", "1").await;
    assert_eq!(older.expect_push("items", "1").await.0, 7);
}

#[tokio::test]
async fn a_bad_version_is_an_invalid_body_and_nothing_else() {
    let (node, _resolver, data) = node().await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let mut client = node.client().await;
    client
        .send_json(
            json!({"action": "subscribe", "body": {"entity": "items", "id": "1", "version": -1}}),
        )
        .await;
    let error = client.expect_error("invalid_body", None).await;
    assert_eq!(
        error["message"],
        "body.version must be an integer from 0 to 2^53-1, the version of a push"
    );
    // The connection stays and subscribes.
    client.subscribe("items", "1").await;
}

/// A change stored while a resume is being authorized: the resolve that
/// authorizes it may already see the change's rows, but the client holds
/// the rows of its own version, so the change is pushed all the same.
#[tokio::test]
async fn a_change_during_a_resume_is_pushed_even_if_the_resolve_saw_it() {
    let (node, resolver, data) = TestNode::start_with_resolver(
        |c| c.ws.push_unchanged_rows = false,
        ResolverOptions::new("backend").entity("items", FetchMode::Shared),
    )
    .await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let mut first = node.client().await;
    let (held, _) = first.subscribe("items", "1").await;

    let mut again = node.client().await;
    resolver.hold("items");
    again.send_json(resume("items", "1", held)).await;
    common::wait_until("the resume's resolve is held", || {
        resolver.held_count() == 1
    })
    .await;
    // The change lands after the node placed the version, before the
    // authorizing resolve answers (which then sees it).
    data.set_rows("items", "1", &[r#"{"n":2}"#]);
    let changed = notify_one(node.grpc(), "items", "1").await;
    resolver.release().await;
    first.expect_push("items", "1").await;
    assert_eq!(again.recv_json().await, current("items", "1"));
    let (version, rows) = again.expect_push("items", "1").await;
    assert!(version >= changed, "{version} < {changed}");
    assert_eq!(rows, [json!({"n": 2})]);
}
