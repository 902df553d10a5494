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

/// Sends `request` as it is; returns the response's status line and body.
async fn raw_response(node: &TestNode, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(node.ws_addr()).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    // Every answer but a 101 closes the connection.
    tokio::time::timeout(common::DEADLINE, stream.read_to_end(&mut got))
        .await
        .expect("the node answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// The websocket path answers what is not a websocket upgrade with a
/// status and a line that say what is missing.
#[tokio::test]
async fn a_request_that_is_not_a_websocket_upgrade_is_refused_clearly() {
    let mut node = TestNode::start(|_| {}).await;
    let (status, body) = raw_response(
        &node,
        "GET /ws/entity-sync/ HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 426 Upgrade Required");
    assert_eq!(
        body,
        "this is a websocket endpoint: send Connection: Upgrade and Upgrade: websocket\n"
    );
    let (status, body) = raw_response(
        &node,
        "GET /ws/entity-sync/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 8\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert_eq!(body, "Sec-WebSocket-Version must be 13\n");
    let (status, body) = raw_response(
        &node,
        "GET /ws/entity-sync/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert_eq!(body, "Sec-WebSocket-Key missing\n");
    // A well-formed upgrade still works.
    assert_eq!(upgrade_status(&node).await, 101);
    node.shutdown().await;
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

/// `ping` (with any body, or none) is answered with `pong` and nothing else,
/// and counts toward the message rate like any message.
#[tokio::test]
async fn ping_is_answered_with_pong_and_counts_toward_the_rate() {
    let mut node = TestNode::start(|config| {
        config.ws.max_message_rate = 2;
        config.ws.max_message_burst = 3;
    })
    .await;
    let mut client = node.client().await;
    client.send_text(r#"{"action":"ping"}"#).await;
    client
        .send_text(r#"{"action":"ping","body":{"t":1}}"#)
        .await;
    client.send_text(r#"{"action":"ping","body":"x"}"#).await;
    client.send_text(r#"{"action":"ping"}"#).await;
    for expected in [
        r#"{"action":"pong"}"#,
        r#"{"action":"pong"}"#,
        r#"{"action":"pong"}"#,
    ] {
        assert_eq!(client.recv_text().await, expected);
    }
    let frame = client.recv_json().await;
    assert_eq!(frame["body"]["code"], "rate_limited", "{frame}");
    client.silent().await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    client.send_text(r#"{"action":"ping"}"#).await;
    assert_eq!(client.recv_text().await, r#"{"action":"pong"}"#);
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

/// What a client's frames can make the node spend: a burst of new secrets
/// on a connection holding many keys costs a bounded number of bus reads
/// and resolves (the node's budget, not the client's burst, sets it).
mod frame_costs {
    use std::{net::SocketAddr, time::Duration};

    use entity_sync_backend::{FetchMode, Reason};
    use entity_sync_testkit::{
        Entry, ResolverOptions, TestNode, TestResolver, http::http_get, nats::NatsServer,
        nats::nats_server_bin,
    };
    use serde_json::{Value, json};

    /// JetStream API requests a nats-server answered so far (its own
    /// monitoring endpoint, `/jsz`).
    async fn js_api_requests(monitor: SocketAddr) -> u64 {
        let (status, body) = http_get(monitor, "/jsz").await.unwrap();
        assert_eq!(status, 200, "{body}");
        let jsz: Value = serde_json::from_str(&body).unwrap();
        jsz["api"]["total"].as_u64().expect("api.total")
    }

    /// Ids the resolver was asked to resolve for subscribes (re-checks are subscribes).
    fn resolved_ids(resolver: &TestResolver) -> usize {
        resolver
            .requests()
            .iter()
            .filter(|r| r.reason == Reason::Subscribe)
            .map(|r| r.ids.len())
            .sum()
    }

    /// Ids of the requests the resolver withholds now.
    fn held_ids(resolver: &TestResolver) -> usize {
        resolver.held().iter().map(|r| r.ids.len()).sum()
    }

    #[tokio::test]
    async fn one_connection_runs_64_snapshot_resolves_at_once_and_others_get_theirs() {
        const KEYS: usize = 300;
        let (mut node, resolver, data) = TestNode::start_with_resolver(
            |c| {
                c.ws.max_snapshot_resolves = 100;
                c.resolve.timeout = Duration::from_secs(20);
            },
            ResolverOptions::new("backend")
                .entity("docs", FetchMode::PerSubscriber)
                .entity("items", FetchMode::Shared)
                .max_in_flight(1000),
        )
        .await;
        resolver.hold("docs");
        let mut greedy = node.client().await;
        for i in 0..KEYS {
            data.set_rows("docs", &i.to_string(), &[r#"{"v":1}"#]);
            greedy.send_subscribe("docs", &i.to_string()).await;
        }
        entity_sync_testkit::wait_until("64 ids withheld", || held_ids(&resolver) >= 64).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(held_ids(&resolver), 64, "one connection's resolves at once");
        // The node has room for others: another connection subscribes now.
        data.set_rows("items", "1", &[r#"{"v":2}"#]);
        let mut other = node.client().await;
        let (_, rows) = other.subscribe("items", "1").await;
        assert_eq!(rows, vec![json!({"v": 2})]);
        // Released, the greedy connection gets every key, in turns of 64.
        resolver.release().await;
        let frames = greedy
            .recv_until_quiet(Duration::from_millis(500), Duration::from_secs(30))
            .await;
        assert_eq!(frames.len(), 2 * KEYS, "subscribed and a snapshot per key");
        node.shutdown().await;
    }

    /// Keys of 1 MB each a stalled client subscribes to: 6 MB in all, more
    /// than loopback socket buffers hold.
    const BIG_KEYS: usize = 6;

    /// A node (with `write_timeout`) and a client with a 4 kB receive
    /// buffer that subscribed to [`BIG_KEYS`] keys of 1 MB and reads nothing.
    async fn stalled_on_big_snapshots(
        write_timeout: Duration,
    ) -> (TestNode, TestResolver, entity_sync_testkit::ws::Ws) {
        let (node, resolver, data) = TestNode::start_with_resolver(
            |c| {
                c.ws.write_timeout = write_timeout;
                c.ws.outbound_max_bytes = 64 << 20;
            },
            ResolverOptions::new("backend").entity("docs", FetchMode::Shared),
        )
        .await;
        let big = format!(r#""{}""#, "x".repeat(1 << 20));
        let options = entity_sync_testkit::ws::ConnectOptions {
            recv_buffer: Some(4096),
            ..Default::default()
        };
        let mut stalled = entity_sync_testkit::connect(node.ws_url(), &options)
            .await
            .unwrap();
        for i in 0..BIG_KEYS {
            data.set_rows("docs", &i.to_string(), &[&big]);
            let subscribe =
                json!({"action": "subscribe", "body": {"entity": "docs", "id": i.to_string()}});
            futures_util::SinkExt::send(&mut stalled, subscribe.to_string().into())
                .await
                .unwrap();
        }
        // The resolver's data is shared with it: nothing else needs `data`.
        drop(data);
        (node, resolver, stalled)
    }

    /// A client that subscribes and then never reads: the snapshots fill
    /// the socket's buffers and the node's write blocks. The node closes it
    /// after --write-timeout (1008), though the queue is under its bound and
    /// the key is quiet (nothing else would ever end it).
    #[tokio::test]
    async fn a_client_that_stops_reading_is_closed_after_the_write_timeout() {
        let (mut node, _resolver, stalled) = stalled_on_big_snapshots(Duration::from_secs(1)).await;
        // Resolving and framing 6 MB takes a few seconds in a debug build.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while node.stats().connections > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stalled connection is still open: {:?}",
                node.stats()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            node.metric("entity_sync_slow_client_closes_total").await,
            1.0
        );
        drop(stalled);
        node.shutdown().await;
    }

    /// The same stalled client, and a node shutting down: its session,
    /// blocked on the full socket (the write timeout is an hour), still
    /// ends. The client then reads every frame the node began, whole, and
    /// the 1001 close after them.
    #[tokio::test]
    async fn a_shutdown_ends_a_session_blocked_on_a_client_that_stopped_reading() {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;

        let (mut node, resolver, mut stalled) =
            stalled_on_big_snapshots(Duration::from_secs(3600)).await;
        entity_sync_testkit::wait_until("every snapshot resolved", || {
            resolver.requests().len() >= BIG_KEYS
        })
        .await;
        // More than the `subscribed` frames arrived: a push has begun.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut peeked = [0u8; 2048];
        while stalled.get_ref().peek(&mut peeked).await.unwrap() < peeked.len() {
            assert!(tokio::time::Instant::now() < deadline, "no push began");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let drained = async {
            // The node has begun closing by now; the client reads again.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut texts = Vec::new();
            let mut close = None;
            while let Ok(Some(message)) =
                tokio::time::timeout(Duration::from_secs(20), stalled.next()).await
            {
                match message {
                    Ok(Message::Text(text)) => texts.push(text.to_string()),
                    Ok(Message::Close(frame)) => {
                        close = frame.map(|f| u16::from(f.code));
                        break;
                    }
                    Ok(_) => {}
                    Err(err) => panic!("the stream broke after {} frames: {err}", texts.len()),
                }
            }
            (texts, close)
        };
        let ((), (texts, close)) = tokio::join!(node.shutdown(), drained);
        assert_eq!(close, Some(1001), "after {} frames", texts.len());
        let pushes = texts
            .iter()
            .map(|text| serde_json::from_str::<Value>(text).expect("whole JSON frames"))
            .filter(|frame| frame["action"] == "push")
            .count();
        assert!((1..=BIG_KEYS).contains(&pushes), "{pushes} pushes");
    }

    #[tokio::test]
    async fn a_burst_of_new_secrets_costs_bounded_bus_reads_and_resolves() {
        const KEYS: usize = 256;
        const SECRETS: usize = 100;
        let nats = NatsServer::start_binary(
            &nats_server_bin(),
            Some("jetstream {}\nhttp: 127.0.0.1:-1\n"),
        )
        .await;
        let monitor = nats.monitor_addr().expect("a monitoring port");
        let (mut node, resolver, data) = TestNode::start_with_resolver(
            |c| c.nats.url = Some(nats.url()),
            ResolverOptions::new("backend").entity("docs", FetchMode::PerSubscriber),
        )
        .await;
        let mut client = node.client().await;
        for i in 0..KEYS {
            data.set("docs", &i.to_string(), Entry::ok(&[r#"{"for":"$SECRET"}"#]));
            client.send_subscribe("docs", &i.to_string()).await;
        }
        let frames = client
            .recv_until_quiet(Duration::from_millis(500), Duration::from_secs(30))
            .await;
        assert_eq!(frames.len(), 2 * KEYS, "subscribed and a snapshot per key");

        let (api_before, ids_before) = (js_api_requests(monitor).await, resolved_ids(&resolver));
        for n in 0..SECRETS {
            client.send_secret(&format!("secret-{n:03}")).await;
        }
        let frames = client
            .recv_until_quiet(Duration::from_secs(1), Duration::from_secs(60))
            .await;
        let api = js_api_requests(monitor).await - api_before;
        let ids = resolved_ids(&resolver) - ids_before;
        let limited = frames
            .iter()
            .filter(|f| f["body"]["code"] == "rate_limited")
            .count();
        eprintln!(
            "{SECRETS} secrets on {KEYS} keys: {limited} rate-limited, \
             {api} JetStream API requests, {ids} ids resolved, {} frames",
            frames.len()
        );
        // A secret's re-check of 256 keys costs 256 messages of the budget
        // (2,048 at once): the first few secrets pass, in order.
        let accepted = SECRETS - limited;
        assert!((1..=8).contains(&accepted), "{accepted} secrets accepted");
        // Every key ends re-checked with the last secret the node took.
        let last = format!("secret-{:03}", accepted - 1);
        for i in 0..KEYS {
            let id = i.to_string();
            let pushes: Vec<&Value> = frames
                .iter()
                .filter(|f| f["action"] == "push" && f["body"]["id"] == id.as_str())
                .collect();
            let latest = pushes.last().unwrap_or_else(|| panic!("no push for {id}"));
            assert_eq!(latest["body"]["rows"], json!([{"for": last}]), "key {id}");
        }
        // Bus reads: batched, not one per re-check (25,600 re-checks asked).
        assert!(api <= 100, "{api} JetStream API requests");
        // Resolves: superseded re-checks stop before any work; at most the
        // connection's 64 running ones per accepted secret, and the last
        // secret's full round.
        assert!(ids <= accepted * 64 + KEYS, "{ids} ids resolved");
        node.shutdown().await;
    }
}

/// The websocket port's connections: one request per plain HTTP
/// connection, HTTP/1.1 only, `--max-connections` decided at accept,
/// per-address caps on connections that are not websockets, and a
/// node-wide budget of partly read messages.
mod port_connections {
    use std::{net::SocketAddr, time::Duration};

    use entity_sync_testkit::{TestNode, WsClient};
    use futures_util::future::join_all;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpSocket, TcpStream},
        time::{Instant, timeout},
    };

    const UPGRADE: &str = "GET /ws/entity-sync/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    /// Connects from `source` (any 127.0.0.0/8 address is this host's).
    async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        socket.connect(to).await.unwrap()
    }

    /// Reads until the node closes the socket (EOF or reset) or `wait` passes;
    /// returns what was read, and whether it was closed.
    async fn read_to_close(stream: &mut TcpStream, wait: Duration) -> (String, bool) {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, stream.read(&mut buf)).await {
                Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
                Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[tokio::test]
    async fn a_plain_http_connection_serves_one_request_and_closes() {
        let node = TestNode::start(|_| {}).await;
        let mut stream = TcpStream::connect(node.ws_addr()).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        // Keep-alive asked for (HTTP/1.1's default); the node answers and
        // closes: no connection idles between requests.
        let (answer, closed) = read_to_close(&mut stream, Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
        assert!(closed, "the connection stays open after its answer");
    }

    #[tokio::test]
    async fn http2_without_tls_is_refused() {
        let node = TestNode::start(|_| {}).await;
        let stream = TcpStream::connect(node.ws_addr()).await.unwrap();
        let (mut client, connection) = h2::client::handshake(stream).await.unwrap();
        tokio::spawn(connection);
        let request =
            tonic::codegen::http::Request::get(format!("http://{}/healthz", node.ws_addr()))
                .body(())
                .unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 505);
    }

    #[tokio::test]
    async fn concurrent_upgrades_never_pass_max_connections() {
        const MAX: usize = 10;
        let node = TestNode::start(|c| c.ws.max_connections = MAX).await;
        let addr = node.ws_addr();
        let attempts = (0..50)
            .map(|_| async move { upgrade_on(TcpStream::connect(addr).await.unwrap()).await });
        let answers = join_all(attempts).await;
        let upgraded = answers.iter().filter(|(status, _)| status == "101").count();
        let refused = answers.iter().filter(|(status, _)| status == "503").count();
        assert_eq!((upgraded, refused), (MAX, 50 - MAX));
        node.wait_stats("the admitted websockets", |s| s.connections == MAX)
            .await;
    }

    /// The upgrade status of a raw upgrade request on `stream`.
    async fn upgrade_on(mut stream: TcpStream) -> (String, TcpStream) {
        stream.write_all(UPGRADE.as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.unwrap();
        let status = String::from_utf8_lossy(&buf[..n])
            .split(' ')
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        (status, stream)
    }

    /// Two upgrades at once on a node with room for one, many times over, on
    /// two worker threads: the check and the count of a connection must not
    /// interleave with another's.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_upgrades_at_once_never_both_take_the_last_place() {
        let node = TestNode::start(|c| c.ws.max_connections = 1).await;
        let addr = node.ws_addr();
        for round in 0..200 {
            let (a, b) = tokio::join!(TcpStream::connect(addr), TcpStream::connect(addr));
            let (a, b) = tokio::join!(
                tokio::spawn(upgrade_on(a.unwrap())),
                tokio::spawn(upgrade_on(b.unwrap()))
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            let upgraded = [&a.0, &b.0].iter().filter(|s| **s == "101").count();
            assert!(upgraded <= 1, "round {round}: both took the last place");
            drop((a, b));
            node.wait_stats("both closed", |s| s.connections == 0).await;
        }
    }

    #[tokio::test]
    async fn one_address_cannot_hold_the_port_with_silent_sockets() {
        let node = TestNode::start(|c| {
            c.ws.max_pending_per_address = 4;
            c.ws.handshake_timeout = Duration::from_secs(30);
        })
        .await;
        let addr = node.ws_addr();
        let mut silent = Vec::new();
        for _ in 0..4 {
            silent.push(connect_from([127, 0, 0, 1], addr).await);
        }
        // The fifth from that address is closed at once, long before the
        // handshake timeout would close it.
        let mut fifth = connect_from([127, 0, 0, 1], addr).await;
        let (_, closed) = read_to_close(&mut fifth, Duration::from_secs(5)).await;
        assert!(closed, "a fifth silent socket from one address is kept");
        for stream in &mut silent {
            let (_, closed) = read_to_close(stream, Duration::from_millis(100)).await;
            assert!(!closed, "a socket within the cap was closed");
        }
        // Other addresses are unaffected.
        let options = entity_sync_testkit::ws::ConnectOptions {
            source: Some([127, 0, 0, 2].into()),
            ..Default::default()
        };
        let mut other = WsClient::connect_with(node.ws_url(), &options).await;
        other.send_unsubscribe("items", "1").await;
        other
            .expect_error("not_subscribed", Some(("items", "1")))
            .await;
        // A websocket leaves its address's count: the address may connect again.
        drop(silent);
        let mut again = WsClient::connect(node.ws_url()).await;
        again.send_unsubscribe("items", "1").await;
        again
            .expect_error("not_subscribed", Some(("items", "1")))
            .await;
    }

    /// Upgrades a raw socket; returns it once the 101 is read.
    async fn upgraded(addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(UPGRADE.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
        stream
    }

    #[tokio::test]
    async fn half_sent_large_messages_are_held_within_the_read_budget() {
        const BUDGET: usize = 256 * 1024;
        const SENT: usize = 100 * 1024;
        let node = TestNode::start(|c| {
            c.ws.max_message_bytes = 64 * 1024;
            c.ws.max_reading_bytes = BUDGET;
        })
        .await;
        let mut stalled = Vec::new();
        for _ in 0..4 {
            let mut stream = upgraded(node.ws_addr()).await;
            // A masked text frame announcing 120 KiB (under the 128 KiB hard
            // cap), of which 100 KiB arrive; then nothing.
            let mut frame = vec![0x81, 0xFF];
            frame.extend_from_slice(&(120u64 * 1024).to_be_bytes());
            frame.extend_from_slice(&[0, 0, 0, 0]);
            frame.extend(std::iter::repeat_n(b'a', SENT));
            stream.write_all(&frame).await.unwrap();
            stalled.push(stream);
        }
        // Two fit in the budget; the node closes the others.
        let mut open = 0;
        for stream in &mut stalled {
            let (_, closed) = read_to_close(stream, Duration::from_secs(2)).await;
            open += usize::from(!closed);
        }
        assert_eq!(
            open,
            BUDGET / SENT,
            "connections left holding partial messages"
        );
        // Small messages still pass, however full the budget is.
        let mut client = WsClient::connect(node.ws_url()).await;
        client.send_unsubscribe("items", "1").await;
        client
            .expect_error("not_subscribed", Some(("items", "1")))
            .await;
    }
}
