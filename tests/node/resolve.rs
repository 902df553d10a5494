//! Resolvers: fetch modes, statuses, coalescing, batching, failover and the
//! registration handshake.

use entity_sync_testkit as common;

use std::{collections::BTreeSet, time::Duration};

use common::resolver::{open_raw_stream, register_message};
use common::{
    Entry, ResolverData, ResolverOptions, TestNode, TestResolver, notify, notify_one, wait_until,
};
use entity_sync_backend::{
    FetchMode, Reason,
    proto::v1::{ResolveResponse, ResolverMessage, Status as KeyStatus, resolver_message},
};
use serde_json::json;

#[tokio::test]
async fn per_subscriber_resolves_once_per_distinct_secret() {
    let (node, resolver, data) = TestNode::with_resolver("docs", FetchMode::PerSubscriber).await;
    data.set_rows("docs", "7", &[r#"{"for":"$SECRET","v":1}"#]);

    let mut clients = Vec::new();
    for secret in ["s1", "s1", "s2"] {
        let mut client = node.client().await;
        client.send_secret(secret).await;
        let (_, rows) = client.subscribe("docs", "7").await;
        assert_eq!(rows, vec![json!({"for": secret, "v": 1})]);
        clients.push((secret, client));
    }
    let subscribe_secrets: Vec<String> = resolver
        .requests_for(Reason::Subscribe, "docs", "7")
        .into_iter()
        .map(|r| r.secret)
        .collect();
    assert_eq!(subscribe_secrets, vec!["s1", "s1", "s2"]);

    data.set_rows("docs", "7", &[r#"{"for":"$SECRET","v":2}"#]);
    let seq = notify_one(node.grpc(), "docs", "7").await;
    for (secret, client) in &mut clients {
        let (version, rows) = client.expect_push("docs", "7").await;
        assert_eq!(version, seq);
        assert_eq!(
            rows,
            vec![json!({"for": secret, "v": 2})],
            "rows of the subscriber's own secret"
        );
    }
    for (_, client) in &mut clients {
        client.silent().await;
    }
    let changes = resolver.requests_for(Reason::Change, "docs", "7");
    let secrets: BTreeSet<String> = changes.iter().map(|r| r.secret.clone()).collect();
    assert_eq!(
        changes.len(),
        2,
        "one CHANGE resolve per distinct secret: {changes:?}"
    );
    assert_eq!(secrets, BTreeSet::from(["s1".to_owned(), "s2".to_owned()]));
}

#[tokio::test]
async fn unspecified_fetch_mode_is_per_subscriber() {
    let (node, resolver, data) = TestNode::with_resolver("docs", FetchMode::Unspecified).await;
    data.set_rows("docs", "1", &[r#"{"for":"$SECRET"}"#]);
    let mut a = node.client().await;
    a.send_secret("a").await;
    a.subscribe("docs", "1").await;
    let mut b = node.client().await;
    b.send_secret("b").await;
    b.subscribe("docs", "1").await;

    let seq = notify_one(node.grpc(), "docs", "1").await;
    assert_eq!(
        a.expect_push("docs", "1").await,
        (seq, vec![json!({"for": "a"})])
    );
    assert_eq!(
        b.expect_push("docs", "1").await,
        (seq, vec![json!({"for": "b"})])
    );
    a.silent().await;
    assert_eq!(resolver.change_count("docs", "1"), 2);
}

#[tokio::test]
async fn shared_resolves_once_per_change_with_empty_secret() {
    let (node, resolver, data) = TestNode::with_resolver("items", FetchMode::Shared).await;
    data.set_rows("items", "1", &[r#"{"v":1}"#]);

    let mut clients = Vec::new();
    for secret in ["a", "b", "c"] {
        let mut client = node.client().await;
        client.send_secret(secret).await;
        client.subscribe("items", "1").await;
        clients.push(client);
    }
    // SUBSCRIBE resolves carry each subscriber's secret even in SHARED mode.
    let subscribe_secrets: Vec<String> = resolver
        .requests_for(Reason::Subscribe, "items", "1")
        .into_iter()
        .map(|r| r.secret)
        .collect();
    assert_eq!(subscribe_secrets, vec!["a", "b", "c"]);

    for round in 1..=2u32 {
        data.set_rows("items", "1", &[&format!(r#"{{"v":{}}}"#, round + 1)]);
        let seq = notify_one(node.grpc(), "items", "1").await;
        for client in &mut clients {
            let (version, rows) = client.expect_push("items", "1").await;
            assert_eq!(version, seq);
            assert_eq!(rows, vec![json!({"v": round + 1})]);
        }
        for client in &mut clients {
            client.silent().await;
        }
        let changes = resolver.requests_for(Reason::Change, "items", "1");
        assert_eq!(
            changes.len(),
            round as usize,
            "one CHANGE resolve per change: {changes:?}"
        );
        assert!(changes.iter().all(|r| r.secret.is_empty()), "{changes:?}");
    }
}

#[tokio::test]
async fn forbidden_on_subscribe_creates_no_subscription() {
    let (node, resolver, data) = TestNode::with_resolver("docs", FetchMode::PerSubscriber).await;
    let mut entry = Entry::ok(&[r#"{"secret":"stuff"}"#]);
    entry.forbidden_secrets.insert("intruder".to_owned());
    data.set("docs", "1", entry);

    let mut intruder = node.client().await;
    intruder.send_secret("intruder").await;
    intruder.send_subscribe("docs", "1").await;
    intruder
        .expect_error("forbidden", Some(("docs", "1")))
        .await;
    intruder.silent().await;
    node.wait_stats("no subscription", |s| s.subscriptions == 0 && s.keys == 0)
        .await;

    let mut owner = node.client().await;
    owner.send_secret("owner").await;
    owner.subscribe("docs", "1").await;

    let seq = notify_one(node.grpc(), "docs", "1").await;
    assert_eq!(owner.expect_push("docs", "1").await.0, seq);
    intruder.silent().await;
    let changes = resolver.requests_for(Reason::Change, "docs", "1");
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].secret, "owner");
}

#[tokio::test]
async fn forbidden_on_change_revokes_the_subscription() {
    let (node, resolver, data) = TestNode::with_resolver("docs", FetchMode::PerSubscriber).await;
    data.set_rows("docs", "1", &[r#"{"v":1}"#]);
    let mut client = node.client().await;
    client.send_secret("s").await;
    client.subscribe("docs", "1").await;
    assert_eq!(node.stats().subscriptions, 1);

    data.set_status("docs", "1", KeyStatus::Forbidden);
    notify_one(node.grpc(), "docs", "1").await;
    client.expect_error("forbidden", Some(("docs", "1"))).await;
    node.wait_stats("revoked subscription gone", |s| {
        s.subscriptions == 0 && s.keys == 0
    })
    .await;

    // Even once allowed again, the revoked subscription gets nothing.
    data.set_status("docs", "1", KeyStatus::Ok);
    notify_one(node.grpc(), "docs", "1").await;
    client.silent().await;
    assert_eq!(resolver.change_count("docs", "1"), 1);
    // But the connection can subscribe again.
    client.subscribe("docs", "1").await;
}

#[tokio::test]
async fn not_found_on_subscribe_creates_no_subscription() {
    let (node, _resolver, data) = TestNode::with_resolver("items", FetchMode::Shared).await;
    let mut client = node.client().await;
    client.send_subscribe("items", "missing").await;
    client
        .expect_error("not_found", Some(("items", "missing")))
        .await;
    client.silent().await;
    node.wait_stats("no subscription", |s| s.subscriptions == 0 && s.keys == 0)
        .await;

    data.set_rows("items", "missing", &[r#"{}"#]);
    notify_one(node.grpc(), "items", "missing").await;
    client.silent().await;
}

#[tokio::test]
async fn not_found_on_change_pushes_empty_rows_and_keeps_subscription() {
    let (node, _resolver, data) = TestNode::with_resolver("items", FetchMode::Shared).await;
    data.set_rows("items", "1", &[r#"{"v":1}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;

    data.set_status("items", "1", KeyStatus::NotFound);
    let seq = notify_one(node.grpc(), "items", "1").await;
    assert_eq!(client.expect_push("items", "1").await, (seq, vec![]));
    assert_eq!(node.stats().subscriptions, 1);

    data.set_rows("items", "1", &[r#"{"v":"back"}"#]);
    let seq = notify_one(node.grpc(), "items", "1").await;
    assert_eq!(
        client.expect_push("items", "1").await,
        (seq, vec![json!({"v": "back"})])
    );
}

#[tokio::test]
async fn subscribe_without_resolver_is_no_resolver() {
    let (node, _resolver, data) = TestNode::with_resolver("items", FetchMode::Shared).await;
    data.set_rows("items", "1", &[r#"{}"#]);
    let mut client = node.client().await;
    client.send_subscribe("ghosts", "1").await;
    client
        .expect_error("no_resolver", Some(("ghosts", "1")))
        .await;
    node.wait_stats("no subscription", |s| s.subscriptions == 0 && s.keys == 0)
        .await;
    client.subscribe("items", "1").await;
}

#[tokio::test]
async fn resolver_error_on_subscribe_carries_the_resolver_message() {
    let (node, _resolver, data) = TestNode::with_resolver("items", FetchMode::Shared).await;
    data.set(
        "items",
        "1",
        Entry::status(KeyStatus::Error, "database down"),
    );
    data.set_rows("items", "bad-row", &[r#"{"ok":1}"#, "{not json"]);

    let mut client = node.client().await;
    client.send_subscribe("items", "1").await;
    let body = client
        .expect_error("resolver_error", Some(("items", "1")))
        .await;
    assert_eq!(body["message"], "database down");

    // A row that is not JSON makes the result an ERROR.
    client.send_subscribe("items", "bad-row").await;
    client
        .expect_error("resolver_error", Some(("items", "bad-row")))
        .await;
    node.wait_stats("no subscription", |s| s.subscriptions == 0 && s.keys == 0)
        .await;
}

#[tokio::test]
async fn unanswered_subscribe_is_resolver_timeout() {
    let (node, resolver, data) = TestNode::start_with_resolver(
        |c| c.resolve.timeout = Duration::from_millis(300),
        ResolverOptions::new("backend").entity("items", FetchMode::Shared),
    )
    .await;
    data.set_rows("items", "1", &[r#"{}"#]);
    resolver.hold("items");
    let mut client = node.client().await;
    client.send_subscribe("items", "1").await;
    client
        .expect_error("resolver_timeout", Some(("items", "1")))
        .await;
    node.wait_stats("no subscription", |s| s.subscriptions == 0 && s.keys == 0)
        .await;
}

#[tokio::test]
async fn resolver_version_is_used_when_given() {
    let (node, resolver, data) = TestNode::with_resolver("items", FetchMode::Shared).await;
    let mut entry = Entry::ok(&[r#"{"v":1}"#]);
    entry.version = 1_000;
    data.set("items", "1", entry.clone());
    let mut client = node.client().await;
    assert_eq!(client.subscribe("items", "1").await.0, 1_000);

    entry.version = 1_005;
    entry.rows = vec![r#"{"v":2}"#.to_owned()];
    data.set("items", "1", entry);
    notify_one(node.grpc(), "items", "1").await;
    assert_eq!(
        client.expect_push("items", "1").await,
        (1_005, vec![json!({"v": 2})])
    );

    // A push older than the one the subscription already holds is not sent.
    let mut stale = Entry::ok(&[r#"{"v":"stale"}"#]);
    stale.version = 900;
    data.set("items", "1", stale);
    notify_one(node.grpc(), "items", "1").await;
    client.silent().await;
    assert_eq!(resolver.change_count("items", "1"), 2);
}

/// A new secret applies to later resolves; the keys already held are
/// re-checked with it at once (more in `tests/node/secrets.rs`).
#[tokio::test]
async fn a_new_secret_applies_to_later_resolves() {
    let (node, resolver, data) = TestNode::with_resolver("docs", FetchMode::PerSubscriber).await;
    data.set_rows("docs", "1", &[r#"{"for":"$SECRET"}"#]);
    let mut client = node.client().await;
    client.send_secret("old").await;
    let (_, rows) = client.subscribe("docs", "1").await;
    assert_eq!(rows, vec![json!({"for": "old"})]);

    client.send_secret("new").await;
    client.expect_subscribed("docs", "1").await;
    let (_, rows) = client.expect_push("docs", "1").await;
    assert_eq!(rows, vec![json!({"for": "new"})]);
    data.set_rows("docs", "2", &[r#"{"for":"$SECRET"}"#]);
    let (_, rows) = client.subscribe("docs", "2").await;
    assert_eq!(rows, vec![json!({"for": "new"})]);

    let seq = notify_one(node.grpc(), "docs", "1").await;
    assert_eq!(
        client.expect_push("docs", "1").await,
        (seq, vec![json!({"for": "new"})])
    );
    let changes = resolver.requests_for(Reason::Change, "docs", "1");
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0].secret, "new");
}

/// A burst of notifies of one key while its CHANGE resolve is in flight
/// causes exactly one more resolve, and the client ends on the latest state.
#[tokio::test]
async fn burst_during_inflight_resolve_coalesces_into_one_more_resolve() {
    let (node, resolver, data) = TestNode::start_with_resolver(
        |c| c.resolve.timeout = Duration::from_secs(20),
        ResolverOptions::new("backend")
            .entity("items", FetchMode::Shared)
            .entity("beacon", FetchMode::Shared),
    )
    .await;
    data.set_rows("items", "1", &[r#"{"v":0}"#]);
    data.set_rows("beacon", "1", &[r#"{}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    let mut beacon = node.client().await;
    beacon.subscribe("beacon", "1").await;

    resolver.hold("items");
    notify_one(node.grpc(), "items", "1").await;
    wait_until("first CHANGE resolve in flight", || {
        resolver.held_count() == 1
    })
    .await;

    let mut last = 0;
    for n in 1..=20 {
        data.set_rows("items", "1", &[&format!(r#"{{"v":{n}}}"#)]);
        last = notify_one(node.grpc(), "items", "1").await;
    }
    // The beacon's push shows the node consumed every notify above.
    let beacon_seq = notify_one(node.grpc(), "beacon", "1").await;
    beacon.push_at_least("beacon", "1", beacon_seq).await;
    assert_eq!(resolver.change_count("items", "1"), 1);
    client.silent().await;

    resolver.release().await;
    let (version, rows) = client.push_at_least("items", "1", last).await;
    assert_eq!(version, last, "latest change wins");
    assert_eq!(rows, vec![json!({"v": 20})]);
    client.silent().await;
    assert_eq!(
        resolver.change_count("items", "1"),
        2,
        "CHANGE requests: {:?}",
        resolver.requests_for(Reason::Change, "items", "1")
    );
}

/// Pending keys of one entity go out together: with one request in flight
/// allowed, the keys changed meanwhile come in one batched request.
#[tokio::test]
async fn pending_change_resolves_are_batched() {
    let (node, resolver, data) = TestNode::start_with_resolver(
        |c| c.resolve.timeout = Duration::from_secs(20),
        ResolverOptions::new("backend")
            .entity("items", FetchMode::Shared)
            .max_in_flight(1),
    )
    .await;
    // On its own stream, so the held request does not take its capacity.
    let _beacon_resolver = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("beacons").entity("beacon", FetchMode::Shared),
        &data,
    )
    .await;
    let ids = ["1", "2", "3", "4", "5"];
    let mut client = node.client().await;
    for id in ids {
        data.set_rows("items", id, &[&format!(r#"{{"id":"{id}"}}"#)]);
        client.subscribe("items", id).await;
    }
    data.set_rows("beacon", "1", &[r#"{}"#]);
    let mut beacon = node.client().await;
    beacon.subscribe("beacon", "1").await;

    resolver.hold("items");
    let first = notify_one(node.grpc(), "items", "1").await;
    wait_until("first CHANGE resolve in flight", || {
        resolver.held_count() == 1
    })
    .await;
    let rest = notify(
        node.grpc(),
        &[
            ("items", "2"),
            ("items", "3"),
            ("items", "4"),
            ("items", "5"),
        ],
    )
    .await;
    let beacon_seq = notify_one(node.grpc(), "beacon", "1").await;
    beacon.push_at_least("beacon", "1", beacon_seq).await;

    resolver.release().await;
    let mut seen = Vec::new();
    for _ in ids {
        let frame = client.recv_json().await;
        let id = frame["body"]["id"].as_str().expect("id").to_owned();
        let (version, rows) = common::parse_push(&frame, "items", &id);
        let expected = if id == "1" {
            first
        } else {
            rest.sequences[ids.iter().position(|i| *i == id).unwrap() - 1]
        };
        assert_eq!(version, expected, "version of {id}");
        assert_eq!(rows, vec![json!({"id": id})]);
        seen.push(id);
    }
    seen.sort();
    assert_eq!(seen, ids);
    client.silent().await;
    let changes: Vec<_> = resolver
        .requests()
        .into_iter()
        .filter(|r| r.reason == Reason::Change && r.entity == "items")
        .collect();
    assert_eq!(
        changes.len(),
        2,
        "keys changed meanwhile are batched: {changes:?}"
    );
    assert_eq!(changes[1].ids.len(), 4, "{changes:?}");
}

/// Two resolvers serve one entity; the one holding requests dies; every
/// subscriber still gets its push.
#[tokio::test]
async fn killed_resolver_in_flight_requests_move_to_the_other() {
    let node = TestNode::start(|c| c.resolve.timeout = Duration::from_secs(20)).await;
    let data = ResolverData::new();
    let options = ResolverOptions::new("backend")
        .entity("items", FetchMode::Shared)
        .max_in_flight(1);
    let mut first = TestResolver::connect(node.grpc(), options.clone(), &data).await;
    let mut second = TestResolver::connect(node.grpc(), options, &data).await;
    assert_eq!(node.stats().resolvers, 2);

    let ids = ["1", "2", "3", "4"];
    let mut clients = Vec::new();
    for id in ids {
        data.set_rows("items", id, &[&format!(r#"{{"id":"{id}","v":1}}"#)]);
        let mut client = node.client().await;
        client.subscribe("items", id).await;
        clients.push(client);
    }
    first.hold("items");
    second.hold("items");
    let mut sequences = Vec::new();
    for id in ids {
        data.set_rows("items", id, &[&format!(r#"{{"id":"{id}","v":2}}"#)]);
        sequences.push(notify_one(node.grpc(), "items", id).await);
    }
    wait_until("a CHANGE resolve in flight", || {
        first.held_count() + second.held_count() > 0
    })
    .await;
    let (victim, survivor) = if first.held_count() > 0 {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    let lost_ids: BTreeSet<String> = victim
        .requests()
        .into_iter()
        .filter(|r| r.reason == Reason::Change)
        .flat_map(|r| r.ids)
        .collect();
    victim.kill();
    survivor.release().await;
    node.wait_stats("dead resolver unregistered", |s| s.resolvers == 1)
        .await;

    for ((id, seq), client) in ids.iter().zip(&sequences).zip(&mut clients) {
        let (version, rows) = client.push_at_least("items", id, *seq).await;
        assert_eq!(version, *seq);
        assert_eq!(rows, vec![json!({"id": id, "v": 2})]);
    }
    let survivor_ids: BTreeSet<String> = survivor
        .requests()
        .into_iter()
        .filter(|r| r.reason == Reason::Change)
        .flat_map(|r| r.ids)
        .collect();
    assert!(
        lost_ids.is_subset(&survivor_ids),
        "in-flight ids {lost_ids:?} were re-sent to the survivor, which saw {survivor_ids:?}"
    );
}

/// With no resolver at all for a while, a change is delivered once one
/// registers again (retry with backoff while the key has subscribers).
#[tokio::test]
async fn change_during_resolver_outage_is_delivered_when_a_resolver_returns() {
    let node = TestNode::start_default().await;
    let data = ResolverData::new();
    let options = ResolverOptions::new("backend").entity("items", FetchMode::Shared);
    let mut first = TestResolver::connect(node.grpc(), options.clone(), &data).await;
    data.set_rows("items", "1", &[r#"{"v":1}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;

    first.kill();
    node.wait_stats("resolver gone", |s| s.resolvers == 0).await;
    data.set_rows("items", "1", &[r#"{"v":2}"#]);
    let seq = notify_one(node.grpc(), "items", "1").await;

    let second = TestResolver::connect(node.grpc(), options, &data).await;
    // Allow for the node's retry backoff.
    let (version, rows) = client
        .push_at_least_within("items", "1", seq, Duration::from_secs(15))
        .await;
    assert_eq!((version, rows), (seq, vec![json!({"v": 2})]));
    assert!(second.change_count("items", "1") >= 1);
    assert_eq!(node.stats().subscriptions, 1);
}

#[tokio::test]
async fn registration_is_acknowledged_with_the_node_id() {
    let (node, resolver, data) = TestNode::start_with_resolver(
        |c| c.node_id = "node-under-test".to_owned(),
        ResolverOptions::new("backend").entity("items", FetchMode::Shared),
    )
    .await;
    assert_eq!(resolver.node_id, "node-under-test");
    let pass_only = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("chat").pass_through(true),
        &data,
    )
    .await;
    assert_eq!(node.stats().resolvers, 2);
    drop(pass_only);
    node.wait_stats("dropped resolver unregistered", |s| s.resolvers == 1)
        .await;
}

#[tokio::test]
async fn first_message_other_than_register_is_invalid_argument() {
    let node = TestNode::start_default().await;
    let response = ResolverMessage {
        kind: Some(resolver_message::Kind::Response(ResolveResponse {
            request_id: 1,
            results: vec![],
        })),
    };
    let status = open_raw_stream(node.grpc(), response)
        .await
        .expect_err("a stream must start with Register");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(node.stats().resolvers, 0);
}

#[tokio::test]
async fn invalid_registrations_are_refused() {
    let (node, _ok, data) = TestNode::with_resolver("items", FetchMode::Shared).await;

    let conflict = TestResolver::try_connect(
        node.grpc(),
        ResolverOptions::new("other").entity("items", FetchMode::PerSubscriber),
        &data,
    )
    .await
    .err()
    .expect("conflicting fetch mode must be refused");
    assert_eq!(
        conflict.code(),
        Some(tonic::Code::FailedPrecondition),
        "{conflict:?}"
    );

    // What the SDK refuses before sending, the node refuses too.
    let no_name = open_raw_stream(
        node.grpc(),
        register_message("", &[("docs", FetchMode::Shared)], false),
    )
    .await
    .expect_err("a register without a name must be refused");
    assert_eq!(no_name.code(), tonic::Code::InvalidArgument, "{no_name:?}");

    let nothing = open_raw_stream(node.grpc(), register_message("idle", &[], false))
        .await
        .expect_err("no entities and no pass-through must be refused");
    assert_eq!(nothing.code(), tonic::Code::InvalidArgument, "{nothing:?}");

    let twice = open_raw_stream(
        node.grpc(),
        register_message(
            "dup",
            &[("docs", FetchMode::Shared), ("docs", FetchMode::Shared)],
            false,
        ),
    )
    .await
    .expect_err("an entity named twice must be refused");
    assert_eq!(twice.code(), tonic::Code::InvalidArgument, "{twice:?}");

    // Same mode as the live registration is fine.
    let _same = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("replica").entity("items", FetchMode::Shared),
        &data,
    )
    .await;
    assert_eq!(node.stats().resolvers, 2);
}

/// Waits until the node's metric `name` reads `value`.
async fn wait_metric(node: &TestNode, name: &str, value: f64) {
    for _ in 0..500 {
        if node.metric(name).await == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} never reached {value}: {}", node.metric(name).await);
}

/// Subscribes of one key and secret that arrive while its subscribe resolve
/// is in flight join it (single-flight: one request, the id once); after a
/// change of the key is seen, a subscribe sends a request of its own, since
/// the one in flight may have read the rows before the change.
#[tokio::test]
async fn subscribes_join_the_resolve_in_flight_until_the_key_changes() {
    let (node, resolver, data) = TestNode::start_with_resolver(
        |c| c.resolve.timeout = Duration::from_secs(20),
        ResolverOptions::new("backend").entity("items", FetchMode::Shared),
    )
    .await;
    data.set_rows("items", "1", &[r#"{"v":1}"#]);
    resolver.hold("items");
    let joined = "entity_sync_resolve_joined_total";
    let mut early = Vec::new();
    for _ in 0..5 {
        let mut client = node.client().await;
        client.send_subscribe("items", "1").await;
        early.push(client);
    }
    wait_metric(&node, joined, 4.0).await;
    let held = resolver.held();
    assert_eq!(held.len(), 1, "one request for five subscribes: {held:?}");
    assert_eq!(held[0].ids, vec!["1"]);
    // Answered; holding goes on.
    assert_eq!(resolver.release_matching(|_| true).await, 1);
    for client in &mut early {
        client.expect_subscribed("items", "1").await;
        let (_, rows) = client.expect_push("items", "1").await;
        assert_eq!(rows, vec![json!({"v": 1})]);
    }

    // A subscribe in flight, then a change of the key: the change's resolve
    // is held too, and a subscribe after it does not join the old request.
    let mut before = node.client().await;
    before.send_subscribe("items", "1").await;
    wait_until("the second subscribe is held", || {
        resolver.held_count() == 1
    })
    .await;
    data.set_rows("items", "1", &[r#"{"v":2}"#]);
    let seq = notify_one(node.grpc(), "items", "1").await;
    wait_until("the change resolve is held", || resolver.held_count() == 2).await;
    let mut after = node.client().await;
    after.send_subscribe("items", "1").await;
    wait_until("the third subscribe is held", || resolver.held_count() == 3).await;
    assert_eq!(
        node.metric(joined).await,
        4.0,
        "nothing joined after the change"
    );
    resolver.release().await;
    for client in [&mut before, &mut after] {
        client.expect_subscribed("items", "1").await;
        let (_, rows) = client.expect_push("items", "1").await;
        assert_eq!(rows, vec![json!({"v": 2})]);
    }
    for client in &mut early {
        assert_eq!(
            client.expect_push("items", "1").await,
            (seq, vec![json!({"v": 2})])
        );
    }
    let subscribes = resolver.requests_for(Reason::Subscribe, "items", "1");
    assert_eq!(subscribes.len(), 3, "{subscribes:?}");
    assert_eq!(
        node.metric("entity_sync_resolve_requests_total{reason=\"subscribe\"}")
            .await,
        3.0
    );
}
