//! Node-wide limits: a node at `max_connections` refuses further websocket
//! upgrades with HTTP 503 and takes new ones once a connection closes.

mod common;

use common::{TestNode, WsClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Sends a websocket upgrade request by hand; returns the HTTP status.
async fn upgrade_status(node: &TestNode) -> u16 {
    let mut stream = TcpStream::connect(node.ws_addr()).await.unwrap();
    let request = "GET /ws/entity-sync/ HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
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
    let mut node = TestNode::start(|config| config.max_connections = 1).await;
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
