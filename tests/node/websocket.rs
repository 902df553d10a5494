//! Websocket protocol: subscribe, push, unsubscribe, bad input, compat mode,
//! pass-through, disconnect cleanup and slow clients.

use entity_sync_testkit as common;

use std::time::Duration;

use common::{
    DEADLINE, ResolverData, ResolverOptions, TestNode, TestResolver, WsClient, notify_one,
    parse_push, wait_until,
};
use entity_sync_backend::{FetchMode, Reason};
use serde_json::{Value, json};

/// A node with one resolver serving `items` (SHARED) and `docs`
/// (PER_SUBSCRIBER).
async fn setup() -> (TestNode, TestResolver, ResolverData) {
    let (node, resolver, data) = TestNode::start_with_resolver(
        |_| {},
        ResolverOptions::new("backend")
            .entity("items", FetchMode::Shared)
            .entity("docs", FetchMode::PerSubscriber),
    )
    .await;
    (node, resolver, data)
}

#[tokio::test]
async fn subscribe_acknowledges_then_pushes_snapshot() {
    let (node, resolver, data) = setup().await;
    data.set_rows("items", "100", &[r#"{"id":100,"name":"first"}"#]);

    let mut client = node.client().await;
    client.send_secret("s-1").await;
    client.send_subscribe("items", "100").await;
    assert_eq!(
        client.recv_json().await,
        json!({"action": "subscribed", "body": {"entity": "items", "id": "100"}})
    );
    let push = client.recv_json().await;
    let (_version, rows) = parse_push(&push, "items", "100");
    assert_eq!(rows, vec![json!({"id": 100, "name": "first"})]);
    client.silent().await;

    // Exactly one SUBSCRIBE resolve, carrying the subscriber's secret.
    let subscribes = resolver.requests_for(Reason::Subscribe, "items", "100");
    assert_eq!(subscribes.len(), 1, "{subscribes:?}");
    assert_eq!(subscribes[0].secret, "s-1");
    assert_eq!(subscribes[0].ids, vec!["100".to_owned()]);

    let stats = node.stats();
    assert_eq!(
        (stats.connections, stats.subscriptions, stats.keys),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn numeric_id_is_turned_into_its_decimal_string() {
    let (node, resolver, data) = setup().await;
    data.set_rows("items", "100", &[r#"{"id":100}"#]);

    let mut client = node.client().await;
    client
        .send_json(json!({"action": "subscribe", "body": {"entity": "items", "id": 100}}))
        .await;
    client.expect_subscribed("items", "100").await;
    let (_, rows) = client.expect_push("items", "100").await;
    assert_eq!(rows, vec![json!({"id": 100})]);
    assert_eq!(resolver.requests()[0].ids, vec!["100".to_owned()]);
}

#[tokio::test]
async fn notify_pushes_to_exactly_the_subscribers_of_the_key() {
    let (node, _resolver, data) = setup().await;
    data.set_rows("items", "1", &[r#"{"v":"a"}"#]);
    data.set_rows("items", "2", &[r#"{"v":"b"}"#]);

    let mut a = node.client().await;
    let mut b = node.client().await;
    let mut other_key = node.client().await;
    let mut no_subscription = node.client().await;
    a.subscribe("items", "1").await;
    b.subscribe("items", "1").await;
    other_key.subscribe("items", "2").await;

    data.set_rows("items", "1", &[r#"{"v":"a2"}"#]);
    let seq = notify_one(node.grpc(), "items", "1").await;

    for client in [&mut a, &mut b] {
        let (version, rows) = client.expect_push("items", "1").await;
        assert_eq!(version, seq);
        assert_eq!(rows, vec![json!({"v": "a2"})]);
    }
    a.silent().await;
    b.silent().await;
    other_key.silent().await;
    no_subscription.silent().await;
}

#[tokio::test]
async fn push_carries_all_rows_verbatim_in_resolver_order() {
    let (node, _resolver, data) = setup().await;
    // Keys deliberately not sorted: the rows must reach the client byte for byte.
    let rows = [
        r#"{"z":1,"a":2}"#,
        r#"[3,2,1]"#,
        r#""text""#,
        r#"{"ref":{"y":null,"b":true}}"#,
    ];
    data.set_rows("items", "100", &rows);

    let mut client = node.client().await;
    client.send_subscribe("items", "100").await;
    client.expect_subscribed("items", "100").await;
    let snapshot = client.recv_text().await;
    let version = serde_json::from_str::<Value>(&snapshot).unwrap()["body"]["version"]
        .as_u64()
        .expect("version");
    assert_eq!(
        snapshot,
        format!(
            r#"{{"action":"push","body":{{"entity":"items","id":"100","version":{version},"rows":[{}]}}}}"#,
            rows.join(",")
        )
    );

    let changed = [r#"{"z":9,"a":8}"#, r#"{"second":2}"#, r#"{"third":3}"#];
    data.set_rows("items", "100", &changed);
    let seq = notify_one(node.grpc(), "items", "100").await;
    assert_eq!(
        client.recv_text().await,
        format!(
            r#"{{"action":"push","body":{{"entity":"items","id":"100","version":{seq},"rows":[{}]}}}}"#,
            changed.join(",")
        )
    );
}

#[tokio::test]
async fn duplicate_subscribe_resends_subscribed_and_fresh_snapshot() {
    let (node, resolver, data) = setup().await;
    data.set_rows("items", "1", &[r#"{"v":1}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;

    data.set_rows("items", "1", &[r#"{"v":2}"#]);
    let (_, rows) = client.subscribe("items", "1").await;
    assert_eq!(rows, vec![json!({"v": 2})]);
    assert_eq!(
        resolver.requests_for(Reason::Subscribe, "items", "1").len(),
        2
    );
    let stats = node.stats();
    assert_eq!((stats.subscriptions, stats.keys), (1, 1));
}

#[tokio::test]
async fn reconnecting_client_gets_a_fresh_snapshot() {
    let (node, _resolver, data) = setup().await;
    data.set_rows("items", "1", &[r#"{"v":1}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    drop(client.into_inner());
    node.wait_stats("client gone", |s| s.connections == 0).await;

    // Changes while the client was away.
    data.set_rows("items", "1", &[r#"{"v":2}"#]);
    notify_one(node.grpc(), "items", "1").await;
    data.set_rows("items", "1", &[r#"{"v":3}"#]);
    let seq = notify_one(node.grpc(), "items", "1").await;

    let mut again = node.client().await;
    let (version, rows) = again.subscribe("items", "1").await;
    assert_eq!((version, rows), (seq, vec![json!({"v": 3})]));
}

#[tokio::test]
async fn unsubscribe_stops_pushes_and_unknown_key_is_not_subscribed() {
    let (node, resolver, data) = setup().await;
    data.set_rows("items", "1", &[r#"{"v":1}"#]);
    let mut client = node.client().await;
    client.subscribe("items", "1").await;

    client.send_unsubscribe("items", "1").await;
    assert_eq!(
        client.recv_json().await,
        json!({"action": "unsubscribed", "body": {"entity": "items", "id": "1"}})
    );
    node.wait_stats("subscription gone", |s| s.subscriptions == 0 && s.keys == 0)
        .await;

    notify_one(node.grpc(), "items", "1").await;
    client.silent().await;
    assert_eq!(resolver.change_count("items", "1"), 0);

    client.send_unsubscribe("items", "1").await;
    client
        .expect_error("not_subscribed", Some(("items", "1")))
        .await;
    client.send_unsubscribe("items", "never").await;
    client
        .expect_error("not_subscribed", Some(("items", "never")))
        .await;
    // The connection still works.
    client.subscribe("items", "1").await;
}

/// Every bad input gets its error code, and the same connection subscribes
/// fine afterwards.
#[tokio::test]
async fn bad_input_gets_stable_error_codes_and_connection_carries_on() {
    let (node, _resolver, data) = TestNode::start_with_resolver(
        |c| c.ws.max_message_bytes = 1024,
        ResolverOptions::new("backend").entity("items", FetchMode::Shared),
    )
    .await;
    data.set_rows("items", "ok", &[r#"{"fine":true}"#]);

    let mut client = node.client().await;
    let mut bystander = node.client().await;
    bystander.subscribe("items", "ok").await;

    let long = "x".repeat(129);
    let text_cases: Vec<(String, &str)> = vec![
        ("this is not json".into(), "invalid_json"),
        ("{\"action\":".into(), "invalid_json"),
        ("[1,2,3]".into(), "invalid_json"),
        ("\"subscribe\"".into(), "invalid_json"),
        ("42".into(), "invalid_json"),
        (json!({"action": "dance", "body": {}}).to_string(), "unknown_action"),
        (json!({"action": 5, "body": {}}).to_string(), "unknown_action"),
        (json!({"action": "SUBSCRIBE", "body": {"entity": "items", "id": "1"}}).to_string(), "unknown_action"),
        (json!({"action": "subscribe"}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": "items/1"}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"id": "1"}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "items"}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "", "id": "1"}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "items", "id": ""}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": long, "id": "1"}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "items", "id": long}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "items", "id": true}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "items", "id": {"n": 1}}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": 7, "id": "1"}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "it.ems", "id": "1"}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "items", "id": "*"}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "items", "id": "a>b"}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "items", "id": "a b"}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "items", "id": "a\u{1}b"}}).to_string(), "invalid_body"),
        (json!({"action": "subscribe", "body": {"entity": "items\t", "id": "1"}}).to_string(), "invalid_body"),
        (json!({"action": "unsubscribe", "body": {"entity": "items"}}).to_string(), "invalid_body"),
        (json!({"action": "unsubscribe", "body": 3}).to_string(), "invalid_body"),
        (json!({"action": "secret", "body": 123}).to_string(), "invalid_body"),
        (json!({"action": "secret", "body": {"s": "x"}}).to_string(), "invalid_body"),
        (json!({"action": "secret"}).to_string(), "invalid_body"),
        // Larger than max_message_bytes (1024) but under the 2x hard cap.
        (json!({"action": "subscribe", "body": {"entity": "items", "id": "1"}, "pad": "p".repeat(1500)}).to_string(), "message_too_large"),
    ];

    for (i, (text, code)) in text_cases.iter().enumerate() {
        client.send_text(text).await;
        let body = client.expect_error(code, None).await;
        if *code != "invalid_body" {
            assert!(
                body.get("entity").is_none() && body.get("id").is_none(),
                "case {i}: {code} does not concern a key, body: {body}"
            );
        }
        // The same connection carries on.
        let id = format!("after-{i}");
        data.set_rows("items", &id, &[r#"{"fine":true}"#]);
        client.subscribe("items", &id).await;
        client.send_unsubscribe("items", &id).await;
        assert_eq!(client.recv_json().await["action"], "unsubscribed");
    }

    client.send_binary(b"\x00\x01binary").await;
    let body = client.expect_error("binary_unsupported", None).await;
    assert!(body.get("entity").is_none(), "{body}");
    data.set_rows("items", "after-binary", &[r#"{"fine":true}"#]);
    client.subscribe("items", "after-binary").await;

    // Nothing of this reached the other client, which still gets its pushes.
    bystander.silent().await;
    let seq = notify_one(node.grpc(), "items", "ok").await;
    assert_eq!(bystander.expect_push("items", "ok").await.0, seq);
    let stats = node.stats();
    assert_eq!(stats.connections, 2);
}

#[tokio::test]
async fn frame_above_hard_cap_is_closed_with_1009() {
    let node = TestNode::start(|c| c.ws.max_message_bytes = 1024).await;
    let mut client = node.client().await;
    let mut other = node.client().await;
    let huge = json!({"pad": "p".repeat(1024 * 2 + 100)}).to_string();
    client.send_text(&huge).await;
    assert_eq!(client.recv_close().await, 1009);
    node.wait_stats("closed connection removed", |s| s.connections == 1)
        .await;
    // The other client is unaffected.
    other.send_text("nope").await;
    other.expect_error("invalid_json", None).await;
}

#[tokio::test]
async fn too_many_subscriptions_then_room_after_unsubscribe() {
    let (node, _resolver, data) = TestNode::start_with_resolver(
        |c| c.ws.max_subscriptions = 2,
        ResolverOptions::new("backend").entity("items", FetchMode::Shared),
    )
    .await;
    for id in ["1", "2", "3"] {
        data.set_rows("items", id, &[r#"{}"#]);
    }
    let mut client = node.client().await;
    client.subscribe("items", "1").await;
    client.subscribe("items", "2").await;
    client.send_subscribe("items", "3").await;
    client.expect_error("too_many_subscriptions", None).await;
    client.silent().await;
    assert_eq!(node.stats().subscriptions, 2);

    // Re-subscribing a held key is not a new subscription.
    client.subscribe("items", "2").await;

    // Another connection has its own limit.
    let mut other = node.client().await;
    other.subscribe("items", "3").await;

    client.send_unsubscribe("items", "1").await;
    assert_eq!(client.recv_json().await["action"], "unsubscribed");
    client.subscribe("items", "3").await;
    assert_eq!(node.stats().subscriptions, 3);
}

#[tokio::test]
async fn compat_mode_sends_each_row_as_a_bare_frame() {
    let (node, _resolver, data) = TestNode::start_with_resolver(
        |c| c.ws.compat_bare_rows = true,
        ResolverOptions::new("backend").entity("items", FetchMode::Shared),
    )
    .await;
    data.set_rows("items", "1", &[r#"{"z":1,"a":2}"#, r#"{"ref":"x"}"#]);

    let mut client = node.client().await;
    client.send_subscribe("items", "1").await;
    // No `subscribed` envelope: the rows, each verbatim in its own frame.
    assert_eq!(client.recv_text().await, r#"{"z":1,"a":2}"#);
    assert_eq!(client.recv_text().await, r#"{"ref":"x"}"#);
    client.silent().await;

    data.set_rows("items", "1", &[r#"{"z":3}"#, r#"{"ref":"y"}"#, r#"[1]"#]);
    notify_one(node.grpc(), "items", "1").await;
    assert_eq!(client.recv_text().await, r#"{"z":3}"#);
    assert_eq!(client.recv_text().await, r#"{"ref":"y"}"#);
    assert_eq!(client.recv_text().await, r#"[1]"#);
    client.silent().await;

    // No `unsubscribed` envelope either, but pushes stop.
    client.send_unsubscribe("items", "1").await;
    client.silent().await;
    node.wait_stats("unsubscribed", |s| s.subscriptions == 0)
        .await;
    notify_one(node.grpc(), "items", "1").await;
    client.silent().await;

    // Errors stay envelopes.
    client.send_subscribe("ghosts", "1").await;
    client
        .expect_error("no_resolver", Some(("ghosts", "1")))
        .await;
}

#[tokio::test]
async fn pass_through_reaches_one_resolver_per_name_with_secret_and_exact_payload() {
    let node = TestNode::start_default().await;
    let data = ResolverData::new();
    let chat_a = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("chat").pass_through(true),
        &data,
    )
    .await;
    let chat_b = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("chat").pass_through(true),
        &data,
    )
    .await;
    let audit = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("audit").pass_through(true),
        &data,
    )
    .await;
    let not_interested = TestResolver::connect(
        node.grpc(),
        ResolverOptions::new("rows").entity("items", FetchMode::Shared),
        &data,
    )
    .await;

    let mut client = node.client().await;
    client.send_secret("my-super-secret-secret-123").await;
    let payload = r#"{"type":"chat",  "text":"hi there","n":[1,2]}"#;
    client.send_text(payload).await;

    let total = || chat_a.pass_throughs().len() + chat_b.pass_throughs().len();
    wait_until("pass-through delivered", || {
        total() >= 1 && !audit.pass_throughs().is_empty()
    })
    .await;
    common::assert_stays("exactly one per name", || {
        total() == 1 && audit.pass_throughs().len() == 1
    })
    .await;
    let chat = chat_a
        .pass_throughs()
        .into_iter()
        .chain(chat_b.pass_throughs())
        .next()
        .unwrap();
    let audited = audit.pass_throughs().remove(0);
    for seen in [&chat, &audited] {
        assert_eq!(seen.secret, "my-super-secret-secret-123");
        assert_eq!(seen.payload, payload.as_bytes());
        assert!(!seen.connection_id.is_empty());
    }
    assert_eq!(chat.connection_id, audited.connection_id);
    assert!(not_interested.pass_throughs().is_empty());
    // No answer frame to a pass-through.
    client.silent().await;

    // Another connection has another id; the secret is per connection.
    let mut second = node.client().await;
    second.send_text(r#"{"hello":1}"#).await;
    wait_until("second pass-through", || audit.pass_throughs().len() == 2).await;
    let second_seen = audit.pass_throughs().remove(1);
    assert_eq!(second_seen.secret, "");
    assert_eq!(second_seen.payload, br#"{"hello":1}"#);
    assert_ne!(second_seen.connection_id, audited.connection_id);
}

#[tokio::test]
async fn pass_through_without_interested_resolver_is_no_pass_through() {
    let (node, resolver, data) = setup().await;
    data.set_rows("items", "1", &[r#"{}"#]);
    let mut client = node.client().await;
    client.send_text(r#"{"type":"chat"}"#).await;
    let body = client.expect_error("no_pass_through", None).await;
    assert!(body.get("entity").is_none(), "{body}");
    assert!(resolver.pass_throughs().is_empty());
    client.subscribe("items", "1").await;
}

#[tokio::test]
async fn disconnecting_clients_leave_the_registry_empty() {
    let (node, _resolver, data) = setup().await;
    for id in ["1", "2", "3"] {
        data.set_rows("items", id, &[r#"{}"#]);
    }
    let mut polite = node.client().await;
    let mut abrupt = node.client().await;
    for id in ["1", "2", "3"] {
        polite.subscribe("items", id).await;
    }
    data.set_rows("docs", "x", &[r#"{}"#]);
    abrupt.subscribe("items", "1").await;
    abrupt.subscribe("docs", "x").await;
    let stats = node.stats();
    assert_eq!(
        (stats.connections, stats.subscriptions, stats.keys),
        (2, 5, 4)
    );

    polite.close().await;
    node.wait_stats("polite client gone", |s| {
        s.connections == 1 && s.subscriptions == 2 && s.keys == 2
    })
    .await;

    // Dropping the TCP connection without a close handshake.
    drop(abrupt.into_inner());
    node.wait_stats("abrupt client gone", |s| {
        s.connections == 0 && s.subscriptions == 0 && s.keys == 0
    })
    .await;
}

/// A client that never reads is closed with 1008 once its queue passes
/// outbound_max_bytes; another client keeps getting its pushes meanwhile.
/// (Pushes go straight into the socket while it takes them: the queue
/// fills only once the kernel's buffers are full, so the close frame waits
/// behind them until the client reads.)
#[tokio::test]
async fn slow_client_is_closed_with_1008_and_others_keep_their_pushes() {
    let (node, _resolver, data) = TestNode::start_with_resolver(
        |c| {
            c.ws.outbound_max_bytes = 64 * 1024;
            c.resolve.timeout = Duration::from_secs(10);
        },
        ResolverOptions::new("backend").entity("blob", FetchMode::Shared),
    )
    .await;
    let big_row = json!({"blob": "b".repeat(32 * 1024)}).to_string();
    let keys: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    for id in &keys {
        data.set_rows("blob", id, &[&big_row]);
    }

    let mut fast = node.client().await;
    fast.subscribe("blob", "0").await;

    let mut slow = WsClient::connect_small_buffer(node.ws_url()).await;
    for id in &keys {
        slow.send_subscribe("blob", id).await;
    }

    // Each round changes every key; the fast client's push proves the round
    // was dispatched. The slow client never reads.
    let mut rounds = 0;
    while node.metric("entity_sync_slow_client_closes_total").await < 1.0 {
        rounds += 1;
        assert!(
            rounds <= 100,
            "slow client not closed after 100 rounds: {:?}",
            node.stats()
        );
        let refs: Vec<(&str, &str)> = keys.iter().map(|id| ("blob", id.as_str())).collect();
        let response = common::notify(node.grpc(), &refs).await;
        let seq0 = response.sequences[0];
        let (_, rows) = fast.push_at_least("blob", "0", seq0).await;
        assert_eq!(rows.len(), 1);
    }

    let (code, _skipped) = slow.drain_until_close(DEADLINE * 2).await;
    assert_eq!(code, 1008, "slow client close code");
    assert_eq!(
        node.metric("entity_sync_slow_client_closes_total").await,
        1.0,
        "one slow client, one close"
    );

    // The fast client carries on.
    let seq = notify_one(node.grpc(), "blob", "0").await;
    fast.push_at_least("blob", "0", seq).await;
    node.wait_stats("slow client's subscriptions gone", |s| {
        s.connections == 1 && s.subscriptions == 1
    })
    .await;
}
