//! A change push whose rows are byte-identical to the last push a connection
//! got for the key is not sent (its version is recorded all the same);
//! snapshots always are; `--push-unchanged-rows` sends every change push.

use entity_sync_testkit as common;

use common::{DEADLINE, Entry, ResolverData, ResolverOptions, TestNode, notify_one};
use entity_sync_backend::FetchMode;
use serde_json::json;
use tokio::time::Instant;

const SKIPPED: &str = "entity_sync_pushes_skipped_unchanged_total";
const STALE: &str = "entity_sync_pushes_skipped_stale_total";

async fn node(push_unchanged_rows: bool) -> (TestNode, common::TestResolver, ResolverData) {
    TestNode::start_with_resolver(
        |c| c.ws.push_unchanged_rows = push_unchanged_rows,
        ResolverOptions::new("backend")
            .entity("items", FetchMode::Shared)
            .entity("docs", FetchMode::PerSubscriber),
    )
    .await
}

/// Waits until the node's counter `name` reads `want`.
async fn wait_metric(node: &TestNode, name: &str, want: f64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let got = node.metric(name).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {got}, want {want}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn versioned(rows: &[&str], version: u64) -> Entry {
    Entry {
        version,
        ..Entry::ok(rows)
    }
}

#[tokio::test]
async fn a_push_with_the_rows_last_sent_is_skipped_and_a_changed_one_sent() {
    for entity in ["items", "docs"] {
        let (node, _resolver, data) = node(false).await;
        data.set_rows(entity, "1", &[r#"{"n":1}"#, r#"{"ref":"a"}"#]);
        let mut client = node.client().await;
        client.send_secret("s").await;
        let (_, rows) = client.subscribe(entity, "1").await;
        assert_eq!(rows, [json!({"n": 1}), json!({"ref": "a"})]);

        // Same rows: resolved, not sent.
        notify_one(node.grpc(), entity, "1").await;
        wait_metric(&node, SKIPPED, 1.0).await;
        client.silent().await;

        // Changed rows: sent, with the version of the notify.
        data.set_rows(entity, "1", &[r#"{"n":2}"#, r#"{"ref":"a"}"#]);
        let seq = notify_one(node.grpc(), entity, "1").await;
        let (version, rows) = client.expect_push(entity, "1").await;
        assert_eq!(version, seq, "{entity}");
        assert_eq!(rows, [json!({"n": 2}), json!({"ref": "a"})]);

        // The same bytes in a different row split are different rows.
        data.set_rows(entity, "1", &[r#"{"n":2}"#]);
        notify_one(node.grpc(), entity, "1").await;
        let (_, rows) = client.expect_push(entity, "1").await;
        assert_eq!(rows, [json!({"n": 2})]);
        client.silent().await;
        assert_eq!(node.metric(SKIPPED).await, 1.0, "{entity}");
    }
}

#[tokio::test]
async fn a_skipped_push_still_records_its_version() {
    let (node, _resolver, data) = node(false).await;
    data.set("items", "1", versioned(&[r#"{"n":1}"#], 10));
    let mut client = node.client().await;
    let (version, _) = client.subscribe("items", "1").await;
    assert_eq!(version, 10);

    // Version 20 with the same rows: not sent, but recorded.
    data.set("items", "1", versioned(&[r#"{"n":1}"#], 20));
    notify_one(node.grpc(), "items", "1").await;
    wait_metric(&node, SKIPPED, 1.0).await;

    // Version 15 is older than the recorded 20: stale, even though the
    // client last got 10 and the rows changed.
    data.set("items", "1", versioned(&[r#"{"n":2}"#], 15));
    notify_one(node.grpc(), "items", "1").await;
    wait_metric(&node, STALE, 1.0).await;
    client.silent().await;

    data.set("items", "1", versioned(&[r#"{"n":3}"#], 25));
    notify_one(node.grpc(), "items", "1").await;
    let (version, rows) = client.expect_push("items", "1").await;
    assert_eq!((version, rows), (25, vec![json!({"n": 3})]));
}

#[tokio::test]
async fn a_snapshot_is_sent_even_with_the_rows_last_sent() {
    let (node, _resolver, data) = node(false).await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    // Subscribing again answers with a fresh snapshot, identical rows or not.
    let (_, rows) = client.subscribe("items", "1").await;
    assert_eq!(rows, [json!({"n": 1})]);
    client.silent().await;
}

#[tokio::test]
async fn push_unchanged_rows_sends_every_change_push() {
    let (node, _resolver, data) = node(true).await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    for _ in 0..2 {
        let seq = notify_one(node.grpc(), "items", "1").await;
        let (version, rows) = client.expect_push("items", "1").await;
        assert_eq!((version, rows), (seq, vec![json!({"n": 1})]));
    }
    assert_eq!(node.metric(SKIPPED).await, 0.0);
}
