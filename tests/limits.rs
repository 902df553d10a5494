//! Node-wide limits: a node at `max_connections` refuses further websocket
//! upgrades with HTTP 503 and takes new ones once a connection closes; the
//! resolve limits: one snapshot resolve per held key however often a client
//! subscribes, version resets on resubscribe, versions above 2^53 refused,
//! resolver streams per node capped.

use entity_sync_testkit as common;

use common::{TestNode, WsClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Sends a websocket upgrade request by hand; returns the HTTP status.
async fn upgrade_status(node: &TestNode) -> u16 {
    upgrade_status_from(node, None).await
}

/// The same, with an `Origin` header when given.
async fn upgrade_status_from(node: &TestNode, origin: Option<&str>) -> u16 {
    let mut stream = TcpStream::connect(node.ws_addr()).await.unwrap();
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET /ws/entity-sync/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 512];
    let n = stream.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response {head:?}"))
}

#[tokio::test]
async fn upgrades_beyond_max_connections_get_503() {
    let mut node = TestNode::start(|config| config.ws.max_connections = 1).await;
    let first = WsClient::connect(node.ws_url()).await;
    node.wait_stats("one connection", |s| s.connections == 1)
        .await;
    assert_eq!(upgrade_status(&node).await, 503);
    first.close().await;
    node.wait_stats("no connection", |s| s.connections == 0)
        .await;
    assert_eq!(upgrade_status(&node).await, 101);
    node.shutdown().await;
}

#[tokio::test]
async fn messages_over_the_rate_get_rate_limited_and_the_connection_carries_on() {
    let mut node = TestNode::start(|config| {
        config.ws.max_message_rate = 2;
        config.ws.max_message_burst = 3;
    })
    .await;
    let mut client = node.client().await;
    for _ in 0..5 {
        client.send_text("not json").await;
    }
    for expected in [
        "invalid_json",
        "invalid_json",
        "invalid_json",
        "rate_limited",
        "rate_limited",
    ] {
        let frame = client.recv_json().await;
        assert_eq!(frame["action"], "error");
        assert_eq!(frame["body"]["code"], expected, "{frame}");
    }
    // Half a second refills one token (2 per second): the connection carries on.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    client.send_text("still not json").await;
    assert_eq!(client.recv_json().await["body"]["code"], "invalid_json");
    client.silent().await;
    node.shutdown().await;
}

#[tokio::test]
async fn only_allowed_origins_may_open_websockets() {
    let mut node = TestNode::start(|config| {
        config.ws.allowed_origins = vec![
            "https://app.example".into(),
            "http://localhost:3000/".into(),
        ];
    })
    .await;
    assert_eq!(
        upgrade_status_from(&node, Some("https://evil.example")).await,
        403
    );
    assert_eq!(
        upgrade_status_from(&node, Some("https://app.example")).await,
        101
    );
    assert_eq!(
        upgrade_status_from(&node, Some("http://localhost:3000")).await,
        101
    );
    // Non-browser clients send no Origin; the check protects browsers.
    assert_eq!(upgrade_status_from(&node, None).await, 101);
    node.shutdown().await;
}

mod resolve_limits {
    use entity_sync_backend::{FetchMode, Reason};
    use entity_sync_testkit::{
        Entry, ResolverOptions, TestNode, TestResolver, notify_one, wait_until,
    };
    use serde_json::json;

    fn items() -> ResolverOptions {
        ResolverOptions::new("svc").entity("items", FetchMode::Shared)
    }

    #[tokio::test]
    async fn a_repeated_subscribe_starts_one_resolve() {
        let (node, resolver, data) = TestNode::with_resolver("items", FetchMode::Shared).await;
        data.set_rows("items", "1", &[r#"{"id":1}"#]);
        resolver.hold("items");
        let mut client = node.client().await;
        for _ in 0..50 {
            client.send_subscribe("items", "1").await;
        }
        wait_until("the snapshot resolve reached the resolver", || {
            resolver.held_count() == 1
        })
        .await;
        // The session handles a connection's messages in order: once this
        // answer arrives, all 50 subscribes were handled. One resolve.
        client.send_unsubscribe("items", "2").await;
        client
            .expect_error("not_subscribed", Some(("items", "2")))
            .await;
        assert_eq!(
            resolver.requests_for(Reason::Subscribe, "items", "1").len(),
            1
        );
        resolver.release().await;
        client.expect_subscribed("items", "1").await;
        let (_, rows) = client.expect_push("items", "1").await;
        assert_eq!(rows, vec![json!({"id": 1})]);
        client.silent().await;
        // Once answered, subscribing again re-resolves (a fresh snapshot).
        let (_, rows) = client.subscribe("items", "1").await;
        assert_eq!(rows, vec![json!({"id": 1})]);
        assert_eq!(
            resolver.requests_for(Reason::Subscribe, "items", "1").len(),
            2
        );
    }

    #[tokio::test]
    async fn a_resubscribe_resets_the_version_held_for_the_key() {
        let (node, _resolver, data) = TestNode::with_resolver("items", FetchMode::Shared).await;
        let versioned = |v: u64| Entry {
            version: v,
            ..Entry::ok(&[r#"{"id":1}"#])
        };
        data.set("items", "1", versioned(1_000_000));
        let mut client = node.client().await;
        let (version, _) = client.subscribe("items", "1").await;
        assert_eq!(version, 1_000_000);
        // The backend's versions went back (a bug, a restore): pushes at
        // lower versions are skipped...
        data.set("items", "1", versioned(5));
        notify_one(node.grpc(), "items", "1").await;
        client.silent().await;
        // ...until the client resubscribes: its snapshot resets the version.
        let (version, _) = client.subscribe("items", "1").await;
        assert_eq!(version, 5);
        data.set("items", "1", versioned(6));
        notify_one(node.grpc(), "items", "1").await;
        let (version, _) = client.expect_push("items", "1").await;
        assert_eq!(version, 6);
    }

    #[tokio::test]
    async fn a_version_above_2_pow_53_is_a_resolver_error() {
        let (node, _resolver, data) = TestNode::with_resolver("items", FetchMode::Shared).await;
        data.set(
            "items",
            "1",
            Entry {
                version: (1 << 53) + 1,
                ..Entry::ok(&[r#"{"id":1}"#])
            },
        );
        let mut client = node.client().await;
        client.send_subscribe("items", "1").await;
        client
            .expect_error("resolver_error", Some(("items", "1")))
            .await;
    }

    #[tokio::test]
    async fn resolver_streams_per_node_are_capped() {
        let (node, _first, data) =
            TestNode::start_with_resolver(|c| c.resolve.max_resolver_streams = 1, items()).await;
        let refused = TestResolver::try_connect(node.grpc(), items(), &data)
            .await
            .err()
            .expect("a second stream is refused");
        assert_eq!(
            refused.code(),
            Some(tonic::Code::ResourceExhausted),
            "{refused}"
        );
        assert_eq!(node.stats().resolvers, 1);
    }
}

mod handshake_limits {
    use std::time::Duration;

    use entity_sync_testkit::{TestNode, WsClient};
    use tokio::{io::AsyncReadExt, net::TcpStream, time::Instant};

    #[tokio::test]
    async fn a_socket_that_sends_no_request_is_closed_after_the_handshake_timeout() {
        let node = TestNode::start(|c| c.ws.handshake_timeout = Duration::from_millis(300)).await;
        let started = Instant::now();
        let mut silent = TcpStream::connect(node.ws_addr()).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .expect("the node closes the socket");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(300),
            "closed after {waited:?}"
        );
        // A client that upgrades in time is not affected, and keeps its
        // websocket past the timeout.
        let mut client = WsClient::connect(node.ws_url()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.send_unsubscribe("items", "1").await;
        client
            .expect_error("not_subscribed", Some(("items", "1")))
            .await;
    }

    #[tokio::test]
    async fn sockets_still_handshaking_count_against_max_connections() {
        let node = TestNode::start(|c| c.ws.max_connections = 1).await;
        let silent = TcpStream::connect(node.ws_addr()).await.unwrap();
        // Accepted (and counted) once the node saw it; poll the upgrade.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if super::upgrade_status(&node).await == 503 {
                break;
            }
            assert!(Instant::now() < deadline, "a silent socket did not count");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(silent);
        let deadline = Instant::now() + Duration::from_secs(5);
        while super::upgrade_status(&node).await != 101 {
            assert!(Instant::now() < deadline, "the closed socket still counts");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
