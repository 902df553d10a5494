//! The relay feed: every change handed to exactly one node of the cluster, to be resolved once for all of them.
//!
//! One durable pull consumer, `{prefix}-relay`, shared by every node: JetStream
//! delivers each change to one puller. The node that gets a change claims
//! it: it says it is still working while it resolves (progress acks), and
//! acknowledges once the rows are published (or nobody holds the key). A node
//! that dies, stalls or loses NATS stops acknowledging, and the change is
//! delivered to another node after [`ACK_WAIT`]. So no acknowledged change
//! is dropped while any node pulls.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    message::AckKind,
};
use entity_sync_backend::Backoff;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::change_of;
use crate::bus::event::Change;

/// How long a claimed change may go without an acknowledgement or a
/// progress report before JetStream gives it to another node.
pub(crate) const ACK_WAIT: Duration = Duration::from_secs(2);
/// How often a node working on a claim reports progress.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Claims outstanding in the whole cluster; JetStream holds back the rest.
const MAX_ACK_PENDING: i64 = 10_000;
/// Deliveries of one change before JetStream gives up on it (each node that
/// holds the key still resolves it itself after `--relay-timeout`).
const MAX_DELIVER: i64 = 20;
/// Changes one pull asks for.
const PULL_BATCH: usize = 256;
/// Claims buffered between the feed and the relay.
const FEED_BUFFER: usize = 1024;

/// One change this node claimed from the relay feed.
pub(crate) struct Claim {
    pub(crate) change: Change,
    message: jetstream::Message,
}

impl Claim {
    /// Still working on it: JetStream waits another [`ACK_WAIT`].
    pub(crate) async fn progress(&self) {
        let _ = self.message.ack_with(AckKind::Progress).await;
    }

    /// Handled: the rows are published, or nobody holds the key.
    pub(crate) async fn done(&self) {
        if let Err(err) = self.message.ack().await {
            tracing::debug!(%err, key = %self.change.key, "relay claim ack failed");
        }
    }

    /// Not handled now: deliver it again (to any node) after `delay`.
    pub(crate) async fn retry(&self, delay: Duration) {
        let _ = self.message.ack_with(AckKind::Nak(Some(delay))).await;
    }
}

/// The relay feed as this node pulls it.
pub(crate) struct RelayFeed {
    /// The changes this node claimed.
    pub(crate) claims: mpsc::Receiver<Claim>,
    /// The first version the feed is known to cover: changes from it on are
    /// claimed by some node; older ones (stored before the relay consumer
    /// existed, or before this node could look it up) may not be.
    /// `u64::MAX` until this node has pulled.
    pub(crate) covers_from: Arc<AtomicU64>,
}

/// Starts pulling the relay feed of `stream` (subjects `{prefix}.changes.>`):
/// claims go to the returned receiver until `cancel`.
pub(super) fn start(
    stream: jetstream::stream::Stream,
    prefix: &str,
    cancel: CancellationToken,
    tasks: &crate::ops::tasks::Tasks,
) -> RelayFeed {
    let (tx, rx) = mpsc::channel(FEED_BUFFER);
    let covers_from = Arc::new(AtomicU64::new(u64::MAX));
    let feed = Feed {
        stream,
        name: format!("{prefix}-relay"),
        filter: format!("{prefix}.changes.>"),
        tx,
        covers_from: covers_from.clone(),
        cancel,
    };
    tasks.spawn(feed.run());
    RelayFeed {
        claims: rx,
        covers_from,
    }
}

struct Feed {
    stream: jetstream::stream::Stream,
    name: String,
    filter: String,
    tx: mpsc::Sender<Claim>,
    covers_from: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl Feed {
    async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        while !self.cancel.is_cancelled() {
            match self.pull().await {
                Ok(()) => return,
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(%err, ?delay, consumer = %self.name, "relay feed failed; pulling again");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Pulls until cancelled (`Ok`) or the consumer fails (`Err`).
    async fn pull(&self) -> Result<(), String> {
        let config = pull::Config {
            durable_name: Some(self.name.clone()),
            description: Some("entity-sync relay: each change to one node".into()),
            filter_subject: self.filter.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            max_ack_pending: MAX_ACK_PENDING,
            max_deliver: MAX_DELIVER,
            // A new cluster starts with the changes after it: older ones
            // were pushed, or are resolved by every node's own resync.
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        };
        let consumer: jetstream::consumer::PullConsumer = self
            .stream
            .get_or_create_consumer(&self.name, config)
            .await
            .map_err(|err| format!("cannot create the relay consumer: {err}"))?;
        // Every change after what the consumer had delivered when it was
        // looked up is claimed by some node (earlier ones too, unless the
        // consumer was created just now; not knowing which, this node
        // resolves those itself).
        let delivered = consumer.cached_info().delivered.stream_sequence;
        self.covers_from
            .fetch_min(delivered.saturating_add(1), Ordering::AcqRel);
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|err| format!("cannot pull the relay feed: {err}"))?;
        let prefix_len = self.filter.len() - 1;
        loop {
            let next = tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                next = messages.next() => next,
            };
            let message = match next {
                None => return Err("the relay feed ended".into()),
                Some(Err(err)) => return Err(format!("relay feed: {err}")),
                Some(Ok(message)) => message,
            };
            let Ok(info) = message.info() else {
                continue;
            };
            let version = info.stream_sequence;
            let Some(change) = change_of(&message, prefix_len, version) else {
                tracing::warn!(subject = %message.subject, "unparseable change subject in the relay feed, skipped");
                let _ = message.ack().await;
                continue;
            };
            if self.tx.send(Claim { change, message }).await.is_err() {
                return Ok(());
            }
        }
    }
}
