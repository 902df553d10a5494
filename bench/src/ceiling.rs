//! The machine's ceiling: a bare websocket server inside the bench, no protocol
//! logic, that answers subscribes the way a node does and then writes pre-built
//! push frames (the node's shape and size), one write per frame, to the same
//! clients the node scenarios use.

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::{
    net::TcpListener,
    sync::mpsc,
    task::JoinSet,
    time::{Instant, sleep_until},
};
use tokio_tungstenite::tungstenite::{Message, protocol::WebSocketConfig};
use tokio_util::sync::CancellationToken;

use crate::load::{DriveOutcome, ENTITY, Shared};

/// Each key's subscribers: one outbound queue per connection. A std mutex:
/// taken briefly by a subscribe and once per update, never across `.await`.
type Subscribers = Arc<Mutex<Vec<Vec<mpsc::UnboundedSender<Message>>>>>;

/// The bare server: listens on loopback until `cancel`.
pub struct CeilingServer {
    pub url: String,
    subscribers: Subscribers,
    tasks: JoinSet<()>,
}

impl CeilingServer {
    pub async fn start(
        keys: usize,
        shared: Arc<Shared>,
        cancel: CancellationToken,
    ) -> anyhow::Result<CeilingServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("ws://{}/ws/entity-sync/", listener.local_addr()?);
        let subscribers: Subscribers = Arc::new(Mutex::new(vec![Vec::new(); keys]));
        let mut tasks = JoinSet::new();
        let subs = subscribers.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    _ = cancel.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                conns.spawn(serve(stream, subs.clone(), shared.clone(), cancel.clone()));
                while conns.try_join_next().is_some() {}
            }
            conns.shutdown().await;
        });
        Ok(CeilingServer {
            url,
            subscribers,
            tasks,
        })
    }

    /// Sends every key of `seq` to its subscribers, paced at `rate` updates/s
    /// on an absolute schedule: one pre-built frame per update, shared by
    /// every subscriber's queue. Versions and send times are recorded as the
    /// node scenarios record them.
    pub async fn drive(&self, shared: &Shared, seq: &[u32], rate: f64) -> DriveOutcome {
        let first_ns = shared.now_ns();
        let t0 = Instant::now();
        for (i, &key) in seq.iter().enumerate() {
            sleep_until(t0 + std::time::Duration::from_secs_f64(i as f64 / rate)).await;
            shared.bump(key);
            let frame = Message::text(push_frame(shared, key));
            let subs = self.subscribers.lock().expect("lock");
            for tx in &subs[key as usize] {
                let _ = tx.send(frame.clone());
            }
        }
        DriveOutcome {
            first_ns,
            last_ns: shared.now_ns(),
            sent: seq.len() as u64,
            ..DriveOutcome::default()
        }
    }

    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }
}

/// The node's push frame for `key` at its current version.
fn push_frame(shared: &Shared, key: u32) -> String {
    let id = key.to_string();
    let v = shared.version(key);
    let row = shared.row(&id).unwrap_or_default();
    format!(
        r#"{{"action":"push","body":{{"entity":"{ENTITY}","id":"{id}","version":{v},"rows":[{row}]}}}}"#
    )
}

/// The id of a `subscribe` frame (`None` for anything else).
fn subscribed_id(text: &str) -> Option<u32> {
    if !text.contains(r#""action":"subscribe""#) {
        return None;
    }
    let at = text.find(r#""id":""#)? + 6;
    let len = text[at..].find('"')?;
    text[at..at + len].parse().ok()
}

async fn serve(
    stream: tokio::net::TcpStream,
    subscribers: Subscribers,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    // The node's buffer sizes: small, as an idle-friendly server has them.
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            frame = rx.recv() => {
                // One write (and flush) per frame: what the node does per delivery.
                let Some(frame) = frame else { return };
                if ws.send(frame).await.is_err() {
                    return;
                }
            }
            msg = ws.next() => {
                let Some(Ok(Message::Text(text))) = msg else {
                    if matches!(msg, None | Some(Err(_)) | Some(Ok(Message::Close(_)))) {
                        return;
                    }
                    continue;
                };
                let Some(key) = subscribed_id(text.as_str()) else { continue };
                if key as usize >= shared.keys() {
                    continue;
                }
                subscribers.lock().expect("lock")[key as usize].push(tx.clone());
                let ack = format!(
                    r#"{{"action":"subscribed","body":{{"entity":"{ENTITY}","id":"{key}"}}}}"#
                );
                if ws.feed(Message::text(ack)).await.is_err()
                    || ws.send(Message::text(push_frame(&shared, key))).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_ids_are_read_and_other_frames_ignored() {
        assert_eq!(
            subscribed_id(r#"{"action":"subscribe","body":{"entity":"bench","id":"17"}}"#),
            Some(17)
        );
        assert_eq!(
            subscribed_id(r#"{"action":"unsubscribe","body":{"entity":"bench","id":"17"}}"#),
            None
        );
        assert_eq!(subscribed_id(r#"{"action":"secret","body":"x"}"#), None);
    }

    #[test]
    fn frames_have_the_node_push_shape() {
        let shared = Shared::new(20, &[17, 17], false).unwrap();
        shared.bump(17);
        let frame = push_frame(&shared, 17);
        let push = crate::stats::scan_push(&frame).expect("a push");
        assert_eq!((push.id, push.v), ("17", Some(1)));
        let value: serde_json::Value = serde_json::from_str(&frame).expect("JSON");
        assert_eq!(value["body"]["version"], 1);
        assert!((200..=300).contains(&frame.len()), "{}", frame.len());
    }
}
