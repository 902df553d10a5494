//! The gRPC port under a client that does not play by the rules, driven
//! with a raw HTTP/2 client (`h2`) and raw TCP: credentials checked before
//! any request body is read, a size cap per call, a cap on streams per
//! connection, keepalive pings, a deadline for the handshake, caps on
//! connections and on handshakes under way, and the node's memory under an
//! unauthenticated flood of half-sent requests.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use bytes::Bytes;
use entity_sync_testkit::{DEADLINE, NodeProcess, TestNode, process::TempDir, procstat::rss_kib};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
    time::timeout,
};
use tonic::codegen::http;

const BIN: &str = env!("CARGO_BIN_EXE_entity-sync");
const NOTIFY: &str = "/entitysync.v1.EntitySync/Notify";
const RESOLVE: &str = "/entitysync.v1.EntitySync/Resolve";
const HEALTH: &str = "/grpc.health.v1.Health/Check";
const NOTIFIER: &str = "notifier-token-0123456789";
/// gRPC status codes as they appear in `grpc-status`.
const UNAUTHENTICATED: &str = "16";
/// What tonic answers a message over its decoding limit.
const OUT_OF_RANGE: &str = "11";
/// The HTTP/2 connection preface a client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// A tokens file with one notifier line, in a temp dir.
fn tokens_file() -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new("grpc-limits");
    let path = dir.path().join("tokens");
    std::fs::write(&path, format!("notifier {NOTIFIER}\n")).unwrap();
    (dir, path)
}

/// An HTTP/2 connection to `addr`; the connection task's handle ends when
/// the connection does.
async fn h2_connect(addr: SocketAddr) -> (h2::client::SendRequest<Bytes>, JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (send, task)
}

/// Polls until a new connection to `addr` gets its health check answered
/// SERVING (a slot of the port came back); panics with `what` after [`DEADLINE`].
async fn wait_for_a_health_answer(addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let tcp = TcpStream::connect(addr).await.unwrap();
        if let Ok(Ok((send, connection))) =
            timeout(Duration::from_secs(1), h2::client::handshake(tcp)).await
        {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            if let Ok(mut send) = send.ready().await {
                let (response, mut stream) = send
                    .send_request(grpc_request(addr, HEALTH, None), false)
                    .unwrap();
                stream.send_data(message_prefix(0), true).unwrap();
                if let Ok(Ok(status)) = timeout(Duration::from_secs(1), grpc_status(response)).await
                {
                    assert_eq!(status, "0");
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn grpc_request(addr: SocketAddr, path: &str, token: Option<&str>) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(()).unwrap()
}

/// The 5-byte prefix of a gRPC message of `len` bytes (not compressed).
fn message_prefix(len: u32) -> Bytes {
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&len.to_be_bytes());
    Bytes::from(prefix)
}

/// The `grpc-status` of a response: in its headers (a trailers-only
/// answer) or in its trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> Result<String, String> {
    let response = response.await.map_err(|err| format!("stream: {err}"))?;
    if let Some(status) = response.headers().get("grpc-status") {
        return Ok(status.to_str().unwrap().to_owned());
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        data.map_err(|err| format!("body: {err}"))?;
    }
    let trailers = body
        .trailers()
        .await
        .map_err(|err| format!("trailers: {err}"))?
        .ok_or("no trailers")?;
    Ok(trailers
        .get("grpc-status")
        .ok_or("no grpc-status")?
        .to_str()
        .unwrap()
        .to_owned())
}

/// Opens a call on `path` that announces a message of `declared` bytes and
/// sends only `sent` of them (the stream stays open).
fn half_sent_call(
    send: &mut h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    declared: u32,
    sent: &Bytes,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let (response, mut stream) = send
        .send_request(grpc_request(addr, path, token), false)
        .unwrap();
    stream.send_data(message_prefix(declared), false).unwrap();
    stream.send_data(sent.clone(), false).unwrap();
    (response, stream)
}

/// One health check over `send`: proves the connection works (and that the
/// server's SETTINGS arrived).
async fn health_check(send: h2::client::SendRequest<Bytes>, addr: SocketAddr) -> String {
    let mut send = send.ready().await.unwrap();
    let (response, mut stream) = send
        .send_request(grpc_request(addr, HEALTH, None), false)
        .unwrap();
    stream.send_data(message_prefix(0), true).unwrap();
    timeout(DEADLINE, grpc_status(response))
        .await
        .expect("health answers")
        .unwrap()
}

/// Whether the peer closed `socket` within `within` (reads until EOF or an error).
async fn closed_within(socket: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn credentials_are_checked_before_any_request_body_is_read() {
    let (_dir, tokens) = tokens_file();
    let node = TestNode::start(|c| c.grpc.tokens_file = Some(tokens)).await;
    let addr = node.grpc_addr();
    let (send, _connection) = h2_connect(addr).await;
    let mut send = send.ready().await.unwrap();
    // Each call announces a 4 MiB message and sends 64 KiB of it: the answer
    // must come now, from the headers alone.
    let part = Bytes::from(vec![0u8; 64 * 1024]);
    let mut calls = Vec::new();
    for i in 0..20 {
        let token = (i % 2 == 1).then_some("not-a-known-token-000000");
        calls.push(half_sent_call(
            &mut send,
            addr,
            NOTIFY,
            token,
            4 * 1024 * 1024 - 5,
            &part,
        ));
    }
    calls.push(half_sent_call(
        &mut send,
        addr,
        RESOLVE,
        None,
        4 * 1024 * 1024 - 5,
        &part,
    ));
    for (i, (response, _stream)) in calls.into_iter().enumerate() {
        let status = timeout(DEADLINE, grpc_status(response))
            .await
            .unwrap_or_else(|_| panic!("call {i}: no answer before its body was complete"));
        assert_eq!(status.as_deref(), Ok(UNAUTHENTICATED), "call {i}");
    }
}

#[tokio::test]
async fn a_notify_larger_than_its_bound_is_refused_before_its_body_arrives() {
    // 10 keys of at most 128-byte parts, and an idempotency key: a few kB.
    let node = TestNode::start(|c| c.grpc.max_notify_keys = 10).await;
    let addr = node.grpc_addr();
    let (send, _connection) = h2_connect(addr).await;
    let mut send = send.ready().await.unwrap();
    let part = Bytes::from(vec![0u8; 1024]);
    let (response, _stream) = half_sent_call(&mut send, addr, NOTIFY, None, 64 * 1024, &part);
    let status = timeout(DEADLINE, grpc_status(response))
        .await
        .expect("refused from the message's length prefix");
    assert_eq!(status.as_deref(), Ok(OUT_OF_RANGE));
    // The connection goes on serving.
    assert_eq!(health_check(send, addr).await, "0");
}

/// Health and reflection answer without a token (load balancers, grpcurl):
/// their requests are a few bytes, and a larger one is refused from its
/// length prefix, so they cannot be used to make the node buffer.
#[tokio::test]
async fn health_and_reflection_refuse_large_messages_from_their_prefix() {
    let (_dir, tokens) = tokens_file();
    let node = TestNode::start(|c| c.grpc.tokens_file = Some(tokens)).await;
    let addr = node.grpc_addr();
    let (send, _connection) = h2_connect(addr).await;
    let mut send = send.ready().await.unwrap();
    let part = Bytes::from(vec![0u8; 64 * 1024]);
    let reflection = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    // Health answers OUT_OF_RANGE; the reflection stream ends (tonic's
    // reflection service closes it OK when its inbound stream fails).
    for (path, expected) in [(HEALTH, OUT_OF_RANGE), (reflection, "0")] {
        let (response, _stream) =
            half_sent_call(&mut send, addr, path, None, 4 * 1024 * 1024 - 5, &part);
        let status = timeout(DEADLINE, grpc_status(response))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer before the body was complete"));
        assert_eq!(status.as_deref(), Ok(expected), "{path}");
    }
    assert_eq!(health_check(send, addr).await, "0");
}

#[tokio::test]
async fn a_connection_is_told_its_stream_cap() {
    for (configured, expected) in [(None, 128), (Some(8), 8)] {
        let node = TestNode::start(|c| {
            if let Some(max) = configured {
                c.grpc.max_concurrent_streams = max;
            }
        })
        .await;
        let addr = node.grpc_addr();
        let (send, _connection) = h2_connect(addr).await;
        assert_eq!(health_check(send.clone(), addr).await, "0");
        assert_eq!(send.current_max_send_streams(), expected, "{configured:?}");
    }
}

#[tokio::test]
async fn a_connection_without_a_preface_is_closed_after_the_handshake_timeout() {
    let node = TestNode::start(|c| c.grpc.handshake_timeout = Duration::from_secs(1)).await;
    let addr = node.grpc_addr();
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Half a preface, then nothing.
    silent.write_all(&PREFACE[..10]).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "a connection that never finished its preface is still open"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed early: {waited:?}"
    );
    // A connection that sent its preface is kept past the deadline.
    let (send, connection) = h2_connect(addr).await;
    assert_eq!(health_check(send.clone(), addr).await, "0");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!connection.is_finished());
    assert_eq!(health_check(send, addr).await, "0");
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let node = TestNode::start(|c| c.grpc.max_connections = 4).await;
    let addr = node.grpc_addr();
    let mut held = Vec::new();
    for _ in 0..4 {
        let (send, connection) = h2_connect(addr).await;
        assert_eq!(health_check(send.clone(), addr).await, "0");
        held.push((send, connection));
    }
    let mut fifth = TcpStream::connect(addr).await.unwrap();
    let _ = fifth.write_all(PREFACE).await;
    assert!(
        closed_within(&mut fifth, Duration::from_secs(2)).await,
        "a fifth connection was kept"
    );
    // A slot freed is a slot taken again.
    held.pop();
    wait_for_a_health_answer(addr, "the freed slot was not reused").await;
}

#[tokio::test]
async fn handshakes_under_way_are_capped() {
    let node = TestNode::start(|c| c.grpc.max_handshakes = 2).await;
    let addr = node.grpc_addr();
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut third, Duration::from_secs(2)).await,
        "a third connection in its handshake was kept"
    );
    // The stalled ones still hold their slots; once they go, others get in.
    for socket in &mut stalled {
        socket.write_all(&PREFACE[..4]).await.unwrap();
    }
    drop(stalled);
    wait_for_a_health_answer(addr, "no handshake slot came back").await;
}

#[tokio::test]
async fn a_peer_that_does_not_answer_keepalive_pings_is_closed() {
    let node = TestNode::start(|c| {
        c.grpc.keepalive_interval = Duration::from_secs(1);
        c.grpc.keepalive_timeout = Duration::from_secs(1);
    })
    .await;
    let started = Instant::now();
    let mut mute = TcpStream::connect(node.grpc_addr()).await.unwrap();
    // A complete preface, then silence: no SETTINGS ack, no PING ack.
    mute.write_all(PREFACE).await.unwrap();
    mute.write_all(&EMPTY_SETTINGS).await.unwrap();
    assert!(
        closed_within(&mut mute, Duration::from_secs(8)).await,
        "a peer that answers no ping is still connected"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn an_old_idle_connection_is_asked_to_go_away_and_closes() {
    let node = TestNode::start(|c| c.grpc.max_connection_age = Duration::from_secs(1)).await;
    let addr = node.grpc_addr();
    let (send, connection) = h2_connect(addr).await;
    assert_eq!(health_check(send.clone(), addr).await, "0");
    // `send` stays: the client itself would close a connection it can no
    // longer use.
    timeout(Duration::from_secs(6), connection)
        .await
        .expect("the idle connection is closed once it is older than the age")
        .unwrap();
    drop(send);
}

/// The flood the review measured: many unauthenticated connections, each
/// with many calls announcing a 4 MiB message and sending 1 MiB of it.
/// Each must be refused from its headers, and the node's resident memory
/// must stay bounded (figures printed for the report).
#[tokio::test]
async fn an_unauthenticated_flood_of_half_sent_requests_keeps_the_node_small() {
    const CONNECTIONS: usize = 4;
    const CALLS: usize = 64;
    let (_dir, tokens) = tokens_file();
    let mut node = NodeProcess::spawn(
        Path::new(BIN),
        &[format!("--grpc-tokens-file={}", tokens.display())],
        None,
        "warn",
    )
    .unwrap();
    node.wait_ready(DEADLINE).await.unwrap();
    let pid = node.pid();
    let addr = node.grpc;
    let before = rss_kib(pid).unwrap();
    let part = Bytes::from(vec![0u8; 1024 * 1024]);
    let mut connections = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..CONNECTIONS {
        let (send, connection) = h2_connect(addr).await;
        let mut send = send.ready().await.unwrap();
        for _ in 0..CALLS {
            let mut ready = send.ready().await.unwrap();
            calls.push(half_sent_call(
                &mut ready,
                addr,
                NOTIFY,
                None,
                4 * 1024 * 1024 - 5,
                &part,
            ));
            send = ready;
        }
        connections.push((send, connection));
    }
    let started = Instant::now();
    let mut answered = 0;
    let mut peak = before;
    for (response, _stream) in calls.iter_mut().map(|(r, s)| (r, s)) {
        let remaining = Duration::from_secs(10).saturating_sub(started.elapsed());
        if let Ok(Ok(status)) = timeout(remaining, grpc_status_ref(response)).await {
            assert_eq!(status, UNAUTHENTICATED);
            answered += 1;
        }
        peak = peak.max(rss_kib(pid).unwrap());
    }
    // Whatever is in flight has arrived by now: give the node a moment more
    // to read it, then measure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid).unwrap();
    peak = peak.max(after);
    println!(
        "flood: {CONNECTIONS} connections x {CALLS} calls, each 1 MiB of a 4 MiB message, no token: \
         {answered} answered; node RSS before {before} KiB, after {after} KiB, peak {peak} KiB \
         (+{} KiB)",
        peak.saturating_sub(before)
    );
    assert_eq!(answered, CONNECTIONS * CALLS, "calls not refused in time");
    assert!(
        peak.saturating_sub(before) < 48 * 1024,
        "RSS grew by {} KiB",
        peak.saturating_sub(before)
    );
    drop(calls);
    drop(connections);
}

/// [`grpc_status`] of a response future held by reference.
async fn grpc_status_ref(response: &mut h2::client::ResponseFuture) -> Result<String, String> {
    let response = response.await.map_err(|err| format!("stream: {err}"))?;
    if let Some(status) = response.headers().get("grpc-status") {
        return Ok(status.to_str().unwrap().to_owned());
    }
    Err(format!("an answer with headers {:?}", response.headers()))
}
