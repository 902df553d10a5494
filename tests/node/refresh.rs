//! `EntityRegistration.refresh_interval_ms`: the node re-resolves each
//! subscribed key of the entity about that often without a `Notify`, so a
//! change whose `Notify` never came reaches clients anyway, and unchanged
//! rows push nothing; an interval out of bounds refuses the Register.

use std::time::Duration;

use entity_sync_testkit as common;

use common::resolver::{open_raw_stream, register_message};
use common::{ResolverOptions, TestNode};
use entity_sync_backend::{FetchMode, Reason, proto::v1::resolver_message};
use serde_json::json;

const INTERVAL: Duration = Duration::from_millis(1_000);
const REFRESHED: &str = "entity_sync_refresh_changes_total";
const SKIPPED: &str = "entity_sync_pushes_skipped_unchanged_total";

/// A node (skipping unchanged rows, as by default) whose resolver serves
/// `items` SHARED with a 1 s refresh and `docs` SHARED with none.
async fn node() -> (TestNode, common::TestResolver, common::ResolverData) {
    TestNode::start_with_resolver(
        |c| c.ws.push_unchanged_rows = false,
        ResolverOptions::new("backend")
            .entity("items", FetchMode::Shared)
            .refresh_every("items", INTERVAL)
            .entity("docs", FetchMode::Shared),
    )
    .await
}

#[tokio::test]
async fn a_change_without_notify_reaches_the_client_within_two_intervals() {
    let (node, resolver, data) = node().await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    let mut client = node.client().await;
    let (snapshot, rows) = client.subscribe("items", "1").await;
    assert_eq!(rows, [json!({"n": 1})]);

    // The backend's rows change; nobody calls Notify.
    data.set_rows("items", "1", &[r#"{"n":2}"#]);
    let text = client
        .recv_text_within(INTERVAL * 2 + Duration::from_millis(500))
        .await;
    let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
    let version = frame["body"]["version"].as_u64().expect("a version");
    assert!(version > snapshot, "{version} after {snapshot}");
    assert_eq!(
        frame,
        json!({"action": "push", "body": {"entity": "items", "id": "1", "version": version, "rows": [{"n": 2}]}})
    );
    // A change resolve, shared, as for a Notify.
    let changes = resolver.requests_for(Reason::Change, "items", "1");
    assert!(!changes.is_empty());
    assert!(changes.iter().all(|r| r.shared && r.secret.is_empty()));
    assert!(node.metric(REFRESHED).await >= 1.0);
}

#[tokio::test]
async fn unchanged_rows_are_refreshed_and_push_nothing_until_unsubscribed() {
    let (node, resolver, data) = node().await;
    data.set_rows("items", "1", &[r#"{"n":1}"#]);
    data.set_rows("docs", "1", &[r#"{"d":1}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    client.subscribe("docs", "1").await;

    // About three intervals: a refresh resolve per slot, no frame.
    client
        .expect_silence(INTERVAL * 3 + Duration::from_millis(300))
        .await;
    let refreshes = resolver.change_count("items", "1");
    assert!(
        (2..=4).contains(&refreshes),
        "{refreshes} refresh resolves in 3.3 intervals"
    );
    assert_eq!(node.metric(REFRESHED).await, refreshes as f64);
    assert_eq!(node.metric(SKIPPED).await, refreshes as f64);
    // An entity registered without an interval is not refreshed.
    assert_eq!(resolver.change_count("docs", "1"), 0);

    // Nobody holds the key any more: no more refreshes.
    client.send_unsubscribe("items", "1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = resolver.change_count("items", "1");
    tokio::time::sleep(INTERVAL * 2).await;
    assert_eq!(resolver.change_count("items", "1"), after);
}

#[tokio::test]
async fn an_interval_out_of_bounds_refuses_the_register() {
    let node = TestNode::start_default().await;
    for (ms, bad) in [(500, true), (86_400_001, true), (0, false), (1_000, false)] {
        let mut message = register_message("svc", &[("items", FetchMode::Shared)], false);
        let Some(resolver_message::Kind::Register(register)) = &mut message.kind else {
            unreachable!()
        };
        register.entities[0].refresh_interval_ms = ms;
        let answer = open_raw_stream(node.grpc(), message).await;
        if !bad {
            assert!(answer.is_ok(), "{ms} ms: {answer:?}");
            continue;
        }
        let status = answer.expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status.message(),
            format!(
                "entity \"items\": refresh_interval_ms {ms} is out of range: 0 (none) or 1000 to 86400000"
            )
        );
        assert_eq!(node.stats().resolvers, 0, "{ms} ms: nothing registered");
    }
}
