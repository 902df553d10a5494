//! A new `secret` re-checks every key the connection holds: each is resolved
//! again with the new secret (reason SUBSCRIBE) and answered like a
//! subscribe (`subscribed` and a fresh snapshot, or an error frame that ends
//! the subscription); until then the key gets no push, and nothing resolved
//! for the old secret reaches the connection afterwards. Also
//! `ResolveRequest.shared`, true exactly on SHARED change resolves.

use entity_sync_testkit as common;

use std::time::Duration;

use common::{
    Entry, ResolverData, ResolverOptions, SeenRequest, TestNode, TestResolver, WsClient,
    notify_one, wait_until,
};
use entity_sync_backend::{FetchMode, Reason};
use serde_json::{Value, json};

/// The entity served in each fetch mode by [`setup`].
const MODES: [(&str, FetchMode); 2] = [
    ("items", FetchMode::Shared),
    ("docs", FetchMode::PerSubscriber),
];

/// A node (resolve deadline long enough to hold requests) with one resolver
/// serving `items` SHARED and `docs` PER_SUBSCRIBER.
async fn setup(compat: bool) -> (TestNode, TestResolver, ResolverData) {
    TestNode::start_with_resolver(
        |c| {
            c.resolve.timeout = Duration::from_secs(20);
            c.ws.compat_bare_rows = compat;
        },
        ResolverOptions::new("backend")
            .entity("items", FetchMode::Shared)
            .entity("docs", FetchMode::PerSubscriber),
    )
    .await
}

/// Rows naming the secret they were resolved for; `intruder` is FORBIDDEN.
fn rows_for_secret(data: &ResolverData, entity: &str, id: &str, extra: &str) {
    let mut entry = Entry::ok(&[&format!(r#"{{"for":"$SECRET"{extra}}}"#)]);
    entry.forbidden_secrets.insert("intruder".to_owned());
    data.set(entity, id, entry);
}

/// Subscribes with `secret` and checks the snapshot is for it.
async fn subscribe_as(client: &mut WsClient, secret: &str, entity: &str, id: &str) -> u64 {
    client.send_secret(secret).await;
    let (version, rows) = client.subscribe(entity, id).await;
    assert_eq!(rows, vec![json!({"for": secret})]);
    version
}

fn subscribes(resolver: &TestResolver, entity: &str, id: &str) -> Vec<SeenRequest> {
    resolver.requests_for(Reason::Subscribe, entity, id)
}

fn forbidden_frame(entity: &str, id: &str) -> Value {
    json!({"action": "error", "body": {
        "code": "forbidden",
        "message": "forbidden for this secret",
        "entity": entity,
        "id": id,
    }})
}

#[tokio::test]
async fn a_forbidden_new_secret_ends_the_subscription() {
    for (entity, mode) in MODES {
        let (node, resolver, data) = setup(false).await;
        rows_for_secret(&data, entity, "1", "");
        let mut client = node.client().await;
        subscribe_as(&mut client, "alice", entity, "1").await;

        client.send_secret("intruder").await;
        assert_eq!(
            client.recv_json().await,
            forbidden_frame(entity, "1"),
            "{mode:?}"
        );
        node.wait_stats("subscription ended", |s| {
            s.subscriptions == 0 && s.keys == 0
        })
        .await;
        let seen = subscribes(&resolver, entity, "1");
        assert_eq!(seen.len(), 2, "{mode:?}: {seen:?}");
        assert_eq!(seen[1].secret, "intruder", "{mode:?}");
        assert!(!seen[1].shared, "{mode:?}");
        assert_eq!(node.metric("entity_sync_secret_rechecks_total").await, 1.0);

        // The key changes: nothing reaches the client, nothing is resolved.
        notify_one(node.grpc(), entity, "1").await;
        client.silent().await;
        assert_eq!(resolver.change_count(entity, "1"), 0, "{mode:?}");
    }
}

#[tokio::test]
async fn an_allowed_new_secret_gets_a_fresh_snapshot_for_it() {
    for (entity, mode) in MODES {
        let (node, resolver, data) = setup(false).await;
        rows_for_secret(&data, entity, "1", "");
        let mut client = node.client().await;
        let first = subscribe_as(&mut client, "alice", entity, "1").await;

        client.send_secret("bob").await;
        client.expect_subscribed(entity, "1").await;
        let (version, rows) = client.expect_push(entity, "1").await;
        assert_eq!(rows, vec![json!({"for": "bob"})], "{mode:?}");
        assert!(version >= first, "{mode:?}: versions never go down");
        client.silent().await;
        let seen = subscribes(&resolver, entity, "1");
        assert_eq!(
            seen.iter().map(|r| r.secret.as_str()).collect::<Vec<_>>(),
            ["alice", "bob"],
            "{mode:?}"
        );

        // The same secret again re-checks nothing.
        client.send_secret("bob").await;
        client.silent().await;
        assert_eq!(subscribes(&resolver, entity, "1").len(), 2, "{mode:?}");
        assert_eq!(node.metric("entity_sync_secret_rechecks_total").await, 1.0);

        // Later pushes are resolved for the new secret (PER_SUBSCRIBER) or
        // shared (SHARED); none for the old one.
        rows_for_secret(&data, entity, "1", r#","v":2"#);
        let seq = notify_one(node.grpc(), entity, "1").await;
        let (version, rows) = client.expect_push(entity, "1").await;
        let expected = match mode {
            FetchMode::Shared => json!({"for": "", "v": 2}),
            _ => json!({"for": "bob", "v": 2}),
        };
        assert_eq!((version, rows), (seq, vec![expected]), "{mode:?}");
        client.silent().await;
        let changes = resolver.requests_for(Reason::Change, entity, "1");
        assert_eq!(changes.len(), 1, "{mode:?}: {changes:?}");
        let expected_secret = if mode == FetchMode::Shared { "" } else { "bob" };
        assert_eq!(changes[0].secret, expected_secret, "{mode:?}");
    }
}

/// The compat mode sends no `subscribed`: a re-check answers with the bare
/// rows of the new snapshot, or the error envelope.
#[tokio::test]
async fn compat_mode_rechecks_without_subscribed_frames() {
    for (entity, mode) in MODES {
        let (node, _resolver, data) = setup(true).await;
        rows_for_secret(&data, entity, "1", "");
        let mut client = node.client().await;
        client.send_secret("alice").await;
        client.send_subscribe(entity, "1").await;
        assert_eq!(client.recv_text().await, r#"{"for":"alice"}"#, "{mode:?}");

        client.send_secret("bob").await;
        assert_eq!(client.recv_text().await, r#"{"for":"bob"}"#, "{mode:?}");
        client.silent().await;

        client.send_secret("intruder").await;
        assert_eq!(client.recv_json().await, forbidden_frame(entity, "1"));
        client.silent().await;
        node.wait_stats("subscription ended", |s| s.subscriptions == 0)
            .await;
    }
}

/// A change resolve for the old secret is in flight when the new secret
/// arrives, and answers before the re-check: nothing reaches the client
/// until the re-check answers (SHARED: not even the shared rows), and then
/// only the new secret's snapshot.
#[tokio::test]
async fn a_change_resolved_for_the_old_secret_never_arrives_after_the_new_secret() {
    for (entity, mode) in MODES {
        let (node, resolver, data) = setup(false).await;
        rows_for_secret(&data, entity, "1", "");
        let mut client = node.client().await;
        subscribe_as(&mut client, "alice", entity, "1").await;

        resolver.hold(entity);
        let seq = notify_one(node.grpc(), entity, "1").await;
        wait_until("change resolve in flight", || resolver.held_count() == 1).await;
        client.send_secret("bob").await;
        wait_until("re-check in flight", || resolver.held_count() == 2).await;
        let held = resolver.held();
        assert_eq!(held[0].reason, Reason::Change, "{held:?}");
        assert_eq!(
            (held[1].reason, held[1].secret.as_str()),
            (Reason::Subscribe, "bob"),
            "{held:?}"
        );

        // The old change answers first: it must not reach the client.
        let released = resolver
            .release_matching(|r| r.reason == Reason::Change)
            .await;
        assert_eq!(released, 1);
        client.silent().await;

        // Then the re-check: the new secret's snapshot, nothing else.
        resolver.release().await;
        client.expect_subscribed(entity, "1").await;
        let (version, rows) = client.expect_push(entity, "1").await;
        assert_eq!(rows, vec![json!({"for": "bob"})], "{mode:?}");
        assert!(version >= seq, "{mode:?}: the snapshot covers the change");
        client.silent().await;
    }
}

/// Same race, the other way round: the re-check answers first, the old
/// PER_SUBSCRIBER change resolve after; its rows (the old secret's) are
/// dropped, and a later change is resolved for the new secret only.
#[tokio::test]
async fn an_old_secrets_change_resolve_answering_after_the_recheck_is_dropped() {
    let (node, resolver, data) = setup(false).await;
    rows_for_secret(&data, "docs", "1", "");
    let mut client = node.client().await;
    subscribe_as(&mut client, "alice", "docs", "1").await;

    resolver.hold("docs");
    notify_one(node.grpc(), "docs", "1").await;
    wait_until("change resolve in flight", || resolver.held_count() == 1).await;
    client.send_secret("bob").await;
    wait_until("re-check in flight", || resolver.held_count() == 2).await;

    let released = resolver
        .release_matching(|r| r.reason == Reason::Subscribe)
        .await;
    assert_eq!(released, 1);
    client.expect_subscribed("docs", "1").await;
    let (_, rows) = client.expect_push("docs", "1").await;
    assert_eq!(rows, vec![json!({"for": "bob"})]);

    let change = resolver.held();
    assert_eq!(
        (change[0].reason, change[0].secret.as_str()),
        (Reason::Change, "alice")
    );
    resolver.release().await;
    client.silent().await;

    let seq = notify_one(node.grpc(), "docs", "1").await;
    assert_eq!(
        client.push_at_least("docs", "1", seq).await,
        (seq, vec![json!({"for": "bob"})])
    );
    let last = resolver.requests_for(Reason::Change, "docs", "1");
    assert_eq!(last.last().unwrap().secret, "bob", "{last:?}");
}

/// A subscribe still resolving with the old secret when the new one arrives
/// is answered once, by the re-check: the old answer is dropped, even a
/// FORBIDDEN one.
#[tokio::test]
async fn a_subscribe_in_flight_is_answered_by_the_recheck_only() {
    for (entity, mode) in MODES {
        let (node, resolver, data) = setup(false).await;
        rows_for_secret(&data, entity, "1", "");
        let mut client = node.client().await;
        client.send_secret("intruder").await;
        resolver.hold(entity);
        client.send_subscribe(entity, "1").await;
        wait_until("subscribe in flight", || resolver.held_count() == 1).await;
        client.send_secret("bob").await;
        wait_until("re-check in flight", || resolver.held_count() == 2).await;

        // The old secret's answer (FORBIDDEN) comes first and is dropped.
        resolver.release_matching(|r| r.secret == "intruder").await;
        client.silent().await;
        assert_eq!(node.stats().subscriptions, 1, "{mode:?}");

        resolver.release().await;
        client.expect_subscribed(entity, "1").await;
        let (_, rows) = client.expect_push(entity, "1").await;
        assert_eq!(rows, vec![json!({"for": "bob"})], "{mode:?}");
        client.silent().await;
    }
}

/// Every held key is re-checked, each answered on its own.
#[tokio::test]
async fn every_held_key_is_rechecked() {
    let (node, resolver, data) = setup(false).await;
    for id in ["1", "2", "3"] {
        rows_for_secret(&data, "docs", id, "");
    }
    let mut entry = Entry::ok(&[r#"{"for":"$SECRET"}"#]);
    entry.forbidden_secrets.insert("bob".to_owned());
    data.set("docs", "2", entry);
    let mut client = node.client().await;
    client.send_secret("alice").await;
    for id in ["1", "2", "3"] {
        client.subscribe("docs", id).await;
    }

    client.send_secret("bob").await;
    let mut frames = Vec::new();
    for _ in 0..5 {
        frames.push(client.recv_json().await);
    }
    client.silent().await;
    for id in ["1", "3"] {
        let subscribed = json!({"action": "subscribed", "body": {"entity": "docs", "id": id}});
        let at = frames
            .iter()
            .position(|f| *f == subscribed)
            .unwrap_or_else(|| panic!("no subscribed for {id}: {frames:?}"));
        let push = &frames[at + 1];
        let (_, rows) = common::parse_push(push, "docs", id);
        assert_eq!(rows, vec![json!({"for": "bob"})]);
    }
    assert!(
        frames.contains(&json!({"action": "error", "body": {
            "code": "forbidden",
            "message": "forbidden for this secret",
            "entity": "docs",
            "id": "2",
        }})),
        "{frames:?}"
    );
    node.wait_stats("two subscriptions left", |s| s.subscriptions == 2)
        .await;
    let bob: Vec<_> = resolver
        .requests()
        .into_iter()
        .filter(|r| r.reason == Reason::Subscribe && r.secret == "bob")
        .flat_map(|r| r.ids)
        .collect();
    assert_eq!(bob.len(), 3, "one re-check per held key: {bob:?}");
    assert_eq!(node.metric("entity_sync_secret_rechecks_total").await, 3.0);
}

/// `shared` is true exactly on SHARED change resolves: not on subscribes,
/// not on PER_SUBSCRIBER change resolves, also not for a subscriber with
/// no secret.
#[tokio::test]
async fn shared_marks_exactly_the_shared_change_resolves() {
    let (node, resolver, data) = setup(false).await;
    for (entity, _) in MODES {
        data.set_rows(entity, "1", &[r#"{}"#]);
    }
    let mut alice = node.client().await;
    alice.send_secret("alice").await;
    let mut anonymous = node.client().await;
    for (entity, _) in MODES {
        alice.subscribe(entity, "1").await;
        anonymous.subscribe(entity, "1").await;
        let seq = notify_one(node.grpc(), entity, "1").await;
        alice.push_at_least(entity, "1", seq).await;
        anonymous.push_at_least(entity, "1", seq).await;
    }
    let mut seen: Vec<(String, Reason, String, bool)> = resolver
        .requests()
        .into_iter()
        .map(|r| (r.entity, r.reason, r.secret, r.shared))
        .collect();
    seen.sort_by(|a, b| (&a.0, a.1 as i32, &a.2).cmp(&(&b.0, b.1 as i32, &b.2)));
    let row = |entity: &str, reason, secret: &str, shared| {
        (entity.to_owned(), reason, secret.to_owned(), shared)
    };
    assert_eq!(
        seen,
        vec![
            row("docs", Reason::Subscribe, "", false),
            row("docs", Reason::Subscribe, "alice", false),
            row("docs", Reason::Change, "", false),
            row("docs", Reason::Change, "alice", false),
            row("items", Reason::Subscribe, "", false),
            row("items", Reason::Subscribe, "alice", false),
            row("items", Reason::Change, "", true),
        ]
    );
}

/// A client that keeps changing its secret: a re-check still queued (the
/// resolver is at its `max_in_flight`) is withdrawn when a newer secret
/// comes, so the backend is asked for the last secret only.
#[tokio::test]
async fn superseded_rechecks_still_queued_are_never_sent() {
    let (node, resolver, data) = TestNode::start_with_resolver(
        |c| c.resolve.timeout = Duration::from_secs(20),
        ResolverOptions::new("backend")
            .entity("docs", FetchMode::PerSubscriber)
            .max_in_flight(1),
    )
    .await;
    rows_for_secret(&data, "docs", "1", "");
    let mut client = node.client().await;
    client.send_secret("s0").await;
    resolver.hold("docs");
    client.send_subscribe("docs", "1").await;
    wait_until("subscribe in flight", || resolver.held_count() == 1).await;
    for secret in ["s1", "s2", "s3"] {
        client.send_secret(secret).await;
    }
    // The node took the last secret once the beacon's error came back.
    client.send_unsubscribe("docs", "nothing").await;
    client
        .expect_error("not_subscribed", Some(("docs", "nothing")))
        .await;
    assert_eq!(node.metric("entity_sync_secret_rechecks_total").await, 3.0);

    resolver.release().await;
    client.expect_subscribed("docs", "1").await;
    let (_, rows) = client.expect_push("docs", "1").await;
    assert_eq!(rows, vec![json!({"for": "s3"})]);
    client.silent().await;
    let seen = subscribes(&resolver, "docs", "1");
    assert_eq!(
        seen.iter().map(|r| r.secret.as_str()).collect::<Vec<_>>(),
        ["s0", "s3"],
        "{seen:?}"
    );
}

/// A `secret` longer than 4 KiB gets an error frame of its own code; the
/// connection keeps the secret it had: nothing is re-checked and changes
/// are still resolved for, and pushed with, the old one. 4 KiB exactly is
/// a secret like any other.
#[tokio::test]
async fn a_secret_over_4_kib_is_refused_and_the_old_one_kept() {
    let (node, resolver, data) = setup(false).await;
    rows_for_secret(&data, "docs", "1", "");
    let mut client = node.client().await;
    subscribe_as(&mut client, "alice", "docs", "1").await;

    client.send_secret(&"s".repeat(4097)).await;
    assert_eq!(
        client.recv_text().await,
        r#"{"action":"error","body":{"code":"secret_too_long","message":"secret longer than 4096 bytes; the previous one is kept"}}"#
    );
    client.silent().await;
    assert_eq!(node.metric("entity_sync_secret_rechecks_total").await, 0.0);
    assert_eq!(
        node.metric("entity_sync_client_errors_total{code=\"secret_too_long\"}")
            .await,
        1.0
    );
    assert_eq!(subscribes(&resolver, "docs", "1").len(), 1);

    let seq = notify_one(node.grpc(), "docs", "1").await;
    let (version, rows) = client.expect_push("docs", "1").await;
    assert!(version >= seq);
    assert_eq!(rows, vec![json!({"for": "alice"})]);
    let changes = resolver.requests_for(Reason::Change, "docs", "1");
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].secret, "alice");

    let longest = "k".repeat(4096);
    client.send_secret(&longest).await;
    client.expect_subscribed("docs", "1").await;
    let (_, rows) = client.expect_push("docs", "1").await;
    assert_eq!(rows, vec![json!({"for": longest})]);
    assert_eq!(node.metric("entity_sync_secret_rechecks_total").await, 1.0);
}
