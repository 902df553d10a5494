//! Graceful shutdown: websockets closed with 1001 ("going away"), resolver
//! streams ended, listeners closed.

use entity_sync_testkit as common;

use common::{TestNode, wait_until};
use entity_sync_backend::FetchMode;

#[tokio::test]
async fn shutdown_closes_websockets_with_1001_and_ends_resolver_streams() {
    let (mut node, resolver, data) = TestNode::with_resolver("items", FetchMode::Shared).await;
    data.set_rows("items", "1", &[r#"{"v":1}"#]);
    let mut subscribed = node.client().await;
    subscribed.subscribe("items", "1").await;
    let mut idle = node.client().await;
    let ws_addr = node.ws_addr();

    node.shutdown().await;

    assert_eq!(subscribed.recv_close().await, 1001);
    assert_eq!(idle.recv_close().await, 1001);
    wait_until("resolver stream ended", || resolver.ended().is_some()).await;

    // The listeners are gone: no new websocket connections.
    assert!(
        tokio::net::TcpStream::connect(ws_addr).await.is_err(),
        "websocket listener still accepts after shutdown"
    );
}
