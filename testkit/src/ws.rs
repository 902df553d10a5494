//! Websocket clients of a node: [`connect`] with socket options (shared with
//! the bench), and [`WsClient`], which speaks the JSON protocol and asserts
//! exact frames.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpSocket, TcpStream},
    time::{Instant, timeout},
};
use tokio_tungstenite::{
    WebSocketStream, client_async_with_config,
    tungstenite::{self, Message, protocol::WebSocketConfig},
};

use crate::{DEADLINE, SILENCE};

/// A client websocket over TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// A client websocket over TLS (`wss://`).
pub type Wss = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A [`WsClient`] over TLS.
pub type WssClient = WsClient<tokio_rustls::client::TlsStream<TcpStream>>;

/// How [`connect`] sets up the socket.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Source address (spreading clients over 127.0.0.1..N gives each its
    /// own ephemeral port range); `None`: the system's choice.
    pub source: Option<Ipv4Addr>,
    /// `SO_RCVBUF`, to make a client that stops reading back up quickly.
    pub recv_buffer: Option<u32>,
    /// tungstenite's read buffer (it zero-fills it before reads: small is
    /// cheap); `None`: the library's default.
    pub read_buffer: Option<usize>,
}

/// Connects to `url` (`ws://host:port/path`) with `options`; TCP_NODELAY on.
pub async fn connect(url: &str, options: &ConnectOptions) -> Result<Ws, String> {
    let addr: SocketAddr = url
        .strip_prefix("ws://")
        .and_then(|rest| rest.split('/').next())
        .and_then(|addr| addr.parse().ok())
        .ok_or_else(|| format!("{url:?} is not ws://IP:PORT/path"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if let Some(source) = options.source {
        socket
            .bind(SocketAddr::from((source, 0)))
            .map_err(|e| format!("binding source address {source}: {e}"))?;
    }
    if let Some(size) = options.recv_buffer {
        socket
            .set_recv_buffer_size(size)
            .map_err(|e| format!("SO_RCVBUF: {e}"))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut config = WebSocketConfig::default();
    if let Some(size) = options.read_buffer {
        config = config.read_buffer_size(size).write_buffer_size(0);
    }
    let (ws, _response) = client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    Ok(ws)
}

/// Connects to `url` (`wss://host:port/path`, host an IP or `localhost`)
/// trusting the CA certificates in `ca_pem` only; TCP_NODELAY on.
pub async fn connect_wss(url: &str, ca_pem: &str) -> Result<Wss, String> {
    let authority = url
        .strip_prefix("wss://")
        .and_then(|rest| rest.split('/').next())
        .ok_or_else(|| format!("{url:?} is not wss://HOST:PORT/path"))?;
    let (host, _port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("{url:?} has no port"))?;
    let tcp = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let tls = crate::tls::connect(tcp, host, ca_pem, b"http/1.1").await?;
    let (ws, _response) = client_async_with_config(url, tls, None)
        .await
        .map_err(|e| format!("websocket handshake: {e}"))?;
    Ok(ws)
}

/// A websocket client speaking the entity-sync JSON protocol, over TCP
/// (`WsClient`, the default) or TLS ([`WssClient`]).
pub struct WsClient<S = TcpStream> {
    ws: WebSocketStream<S>,
}

impl WssClient {
    /// Connects over `wss://`, trusting `ca_pem` only; panics on failure.
    pub async fn connect_tls(url: &str, ca_pem: &str) -> WssClient {
        let ws = timeout(DEADLINE, connect_wss(url, ca_pem))
            .await
            .expect("wss connect timed out")
            .unwrap_or_else(|err| panic!("wss connect to {url}: {err}"));
        WsClient { ws }
    }
}

impl WsClient {
    pub async fn connect(url: &str) -> WsClient {
        Self::connect_with(url, &ConnectOptions::default()).await
    }

    /// Connects with a tiny socket receive buffer, so that a client that does
    /// not read backs up into the node's outbound queue quickly.
    pub async fn connect_small_buffer(url: &str) -> WsClient {
        let options = ConnectOptions {
            recv_buffer: Some(4096),
            ..ConnectOptions::default()
        };
        Self::connect_with(url, &options).await
    }

    pub async fn connect_with(url: &str, options: &ConnectOptions) -> WsClient {
        let ws = timeout(DEADLINE, connect(url, options))
            .await
            .expect("websocket connect timed out")
            .unwrap_or_else(|err| panic!("websocket connect to {url}: {err}"));
        WsClient { ws }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        timeout(DEADLINE, self.ws.send(Message::text(text.to_owned())))
            .await
            .expect("send timed out")
            .expect("send text");
    }

    pub async fn send_binary(&mut self, data: &[u8]) {
        timeout(
            DEADLINE,
            self.ws.send(Message::binary(Bytes::copy_from_slice(data))),
        )
        .await
        .expect("send timed out")
        .expect("send binary");
    }

    /// The next data or close frame (pings and pongs skipped), within `wait`.
    async fn next_frame(&mut self, wait: Duration) -> Option<Result<Message, tungstenite::Error>> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(frame)) => return Some(frame),
                Ok(None) => return Some(Err(tungstenite::Error::ConnectionClosed)),
            }
        }
    }

    /// The next text frame, verbatim. Panics on timeout or any other frame.
    pub async fn recv_text(&mut self) -> String {
        self.recv_text_within(DEADLINE).await
    }

    /// The next text frame, verbatim, within `wait`.
    pub async fn recv_text_within(&mut self, wait: Duration) -> String {
        match self.next_frame(wait).await {
            None => panic!("no frame received within {wait:?}"),
            Some(Ok(Message::Text(text))) => text.as_str().to_owned(),
            Some(other) => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next text frame, parsed as JSON.
    pub async fn recv_json(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}"))
    }

    /// Every JSON text frame until none came for `quiet` (at most `wait` in
    /// all: a node that never goes quiet fails the test).
    pub async fn recv_until_quiet(&mut self, quiet: Duration, wait: Duration) -> Vec<Value> {
        let deadline = Instant::now() + wait;
        let mut frames = Vec::new();
        while let Some(frame) = self.next_frame(quiet).await {
            assert!(
                Instant::now() < deadline,
                "no quiet {quiet:?} within {wait:?}"
            );
            match frame {
                Ok(Message::Text(text)) => frames.push(
                    serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}")),
                ),
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
        frames
    }

    /// Asserts that no frame arrives within `window`.
    pub async fn expect_silence(&mut self, window: Duration) {
        if let Some(frame) = self.next_frame(window).await {
            panic!("expected silence for {window:?}, got {frame:?}");
        }
    }

    /// Asserts that no frame arrives within [`SILENCE`].
    pub async fn silent(&mut self) {
        self.expect_silence(SILENCE).await;
    }

    /// The next frame must be a close frame; returns its code.
    pub async fn recv_close(&mut self) -> u16 {
        match self.next_frame(DEADLINE).await {
            None => panic!("no close frame within {DEADLINE:?}"),
            Some(Ok(Message::Close(Some(frame)))) => u16::from(frame.code),
            Some(other) => panic!("expected a close frame with a code, got {other:?}"),
        }
    }

    /// Reads and discards data frames until a close frame; returns its code and
    /// the number of data frames skipped.
    pub async fn drain_until_close(&mut self, wait: Duration) -> (u16, usize) {
        let deadline = Instant::now() + wait;
        let mut skipped = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                None => panic!("no close frame within {wait:?} ({skipped} data frames read)"),
                Some(Ok(Message::Close(Some(frame)))) => return (u16::from(frame.code), skipped),
                Some(Ok(Message::Text(_) | Message::Binary(_))) => skipped += 1,
                Some(other) => {
                    panic!("expected a close frame, got {other:?} after {skipped} data frames")
                }
            }
        }
    }

    /// Sends a close frame and waits for the node to finish the handshake.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = timeout(DEADLINE, async { while self.ws.next().await.is_some() {} }).await;
    }

    // ---- protocol shorthands ----

    pub async fn send_secret(&mut self, secret: &str) {
        self.send_json(json!({"action": "secret", "body": secret}))
            .await;
    }

    pub async fn send_subscribe(&mut self, entity: &str, id: &str) {
        self.send_json(json!({"action": "subscribe", "body": {"entity": entity, "id": id}}))
            .await;
    }

    pub async fn send_unsubscribe(&mut self, entity: &str, id: &str) {
        self.send_json(json!({"action": "unsubscribe", "body": {"entity": entity, "id": id}}))
            .await;
    }

    /// Next frame must be exactly `{"action":"subscribed","body":{entity,id}}`.
    pub async fn expect_subscribed(&mut self, entity: &str, id: &str) {
        let frame = self.recv_json().await;
        assert_eq!(
            frame,
            json!({"action": "subscribed", "body": {"entity": entity, "id": id}}),
            "expected subscribed for {entity}/{id}"
        );
    }

    /// Next frame must be a push for `entity/id`; returns (version, rows).
    pub async fn expect_push(&mut self, entity: &str, id: &str) -> (u64, Vec<Value>) {
        let frame = self.recv_json().await;
        parse_push(&frame, entity, id)
    }

    /// Subscribes and expects `subscribed` then the snapshot push; returns the
    /// snapshot (version, rows).
    pub async fn subscribe(&mut self, entity: &str, id: &str) -> (u64, Vec<Value>) {
        self.send_subscribe(entity, id).await;
        self.expect_subscribed(entity, id).await;
        self.expect_push(entity, id).await
    }

    /// Reads pushes for `entity/id` until one with `version >= min_version`;
    /// versions must never go down. Returns that push's (version, rows).
    pub async fn push_at_least(
        &mut self,
        entity: &str,
        id: &str,
        min_version: u64,
    ) -> (u64, Vec<Value>) {
        self.push_at_least_within(entity, id, min_version, DEADLINE)
            .await
    }

    /// Like [`push_at_least`](Self::push_at_least), each frame within `wait`.
    pub async fn push_at_least_within(
        &mut self,
        entity: &str,
        id: &str,
        min_version: u64,
        wait: Duration,
    ) -> (u64, Vec<Value>) {
        let mut last = 0;
        loop {
            let text = self.recv_text_within(wait).await;
            let frame: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("frame is not JSON ({e}): {text}"));
            let (version, rows) = parse_push(&frame, entity, id);
            assert!(
                version >= last,
                "push versions went down: {last} then {version}"
            );
            last = version;
            if version >= min_version {
                return (version, rows);
            }
        }
    }

    /// Next frame must be an error frame with `code`; `key` (when given) must be
    /// its entity/id. Returns the body.
    pub async fn expect_error(&mut self, code: &str, key: Option<(&str, &str)>) -> Value {
        let frame = self.recv_json().await;
        assert_eq!(
            frame["action"], "error",
            "expected an error frame, got {frame}"
        );
        let body = &frame["body"];
        assert_eq!(body["code"], code, "wrong error code in {frame}");
        assert!(
            body["message"].is_string(),
            "error message missing in {frame}"
        );
        if let Some((entity, id)) = key {
            assert_eq!(body["entity"], entity, "wrong entity in {frame}");
            assert_eq!(body["id"], id, "wrong id in {frame}");
        }
        body.clone()
    }

    /// Access to the raw stream, e.g. to drop the TCP connection abruptly.
    pub fn into_inner(self) -> WebSocketStream<S> {
        self.ws
    }
}

/// Checks that `frame` is a push envelope for `entity/id` with exactly the
/// keys entity, id, version, rows; returns (version, rows).
pub fn parse_push(frame: &Value, entity: &str, id: &str) -> (u64, Vec<Value>) {
    assert_eq!(
        frame["action"], "push",
        "expected a push for {entity}/{id}, got {frame}"
    );
    let body = frame["body"]
        .as_object()
        .unwrap_or_else(|| panic!("push body not an object: {frame}"));
    assert_eq!(
        body.len(),
        4,
        "push body must have entity, id, version, rows: {frame}"
    );
    assert_eq!(body["entity"], entity, "push for the wrong key: {frame}");
    assert_eq!(body["id"], id, "push for the wrong key: {frame}");
    let version = body["version"]
        .as_u64()
        .unwrap_or_else(|| panic!("push version not u64: {frame}"));
    let rows = body["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("push rows not an array: {frame}"))
        .clone();
    (version, rows)
}
