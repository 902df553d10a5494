//! Websocket keep-alive: the node pings on its interval, a client that
//! answers stays, a client that stays silent past the idle timeout is closed.

use entity_sync_testkit as common;

use std::time::Duration;

use common::{TestNode, WsClient};
use futures_util::StreamExt;
use tokio::{
    io::AsyncReadExt,
    time::{Instant, timeout},
};
use tokio_tungstenite::tungstenite::Message;

async fn node() -> TestNode {
    TestNode::start(|config| {
        config.ws.ping_interval = Duration::from_millis(100);
        config.ws.idle_timeout = Duration::from_millis(300);
    })
    .await
}

#[tokio::test]
async fn a_client_answering_pings_stays_past_the_idle_timeout() {
    let mut node = node().await;
    let mut ws = WsClient::connect(node.ws_url()).await.into_inner();
    // Reading makes tokio-tungstenite answer each ping with a pong.
    let until = Instant::now() + Duration::from_millis(1000);
    let mut pings = 0;
    while let Ok(frame) = timeout(until.saturating_duration_since(Instant::now()), ws.next()).await
    {
        match frame {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected only pings, got {other:?}"),
        }
    }
    assert!(
        pings >= 5,
        "pinged {pings} times in 1 s at a 100 ms interval"
    );
    assert_eq!(
        node.stats().connections,
        1,
        "the answering client is still connected"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_idle_timeout() {
    let mut node = node().await;
    let mut ws = WsClient::connect(node.ws_url()).await.into_inner();
    // Stay silent (no reads, so no pongs) for well past the idle timeout.
    tokio::time::sleep(Duration::from_millis(800)).await;
    node.wait_stats("the silent connection to be closed", |s| s.connections == 0)
        .await;
    // Read the raw bytes (a websocket client would try to answer the pings
    // first and fail on the closed socket): pings, then the close frame.
    let mut bytes = Vec::new();
    timeout(Duration::from_secs(5), ws.get_mut().read_to_end(&mut bytes))
        .await
        .expect("the node closes the socket")
        .expect("read");
    let reason = b"idle timeout";
    let mut close = vec![0x88, (2 + reason.len()) as u8, 0x03, 0xE8]; // FIN+close, 1000
    close.extend_from_slice(reason);
    assert!(
        bytes.ends_with(&close),
        "expected the stream to end with a 1000 \"idle timeout\" close frame: {bytes:02x?}"
    );
    node.shutdown().await;
}
