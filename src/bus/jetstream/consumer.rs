//! The consuming loop: an ordered push consumer from the last sequence
//! processed on, batches for the dispatcher, resyncs on gaps, and a new
//! consumer when the old one fails or stalls.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::{
    Client,
    jetstream::{
        self,
        consumer::{DeliverPolicy, push},
        stream,
    },
};
use entity_sync_backend::Backoff;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    bus::event::{BusEvent, Change},
    key::Key,
    ops::metrics::Metrics,
    ops::trace::{BUS_NOTIFIED_HEADER, BUS_TRACE_HEADER, ChangeMeta},
};

/// Most change events handed to the dispatcher in one batch.
const CONSUME_BATCH: usize = 512;
/// How often the consumer compares its position with the stream's.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Deadline of that comparison's stream-info request.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Checks in a row without progress, while the stream is ahead, before the
/// consumer is recreated. A consumer that lived on a server that died gets
/// nothing more, and async-nats's ordered consumer notices only after two
/// missed 5 s heartbeats; recreating one that was merely slow costs a
/// consumer create and nothing else (it resumes after `last`).
const STALL_CHECKS: u32 = 3;
/// First and longest pause before recreating a consumer that failed (steps
/// of a jittered [`Backoff`]: nodes that lost the same server do not all
/// recreate their consumers at the same instant).
const RECREATE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// Reads the stream from `last + 1` on for the dispatcher, recreating its
/// ordered consumer when it fails or stalls.
pub(super) struct Consumer {
    pub(super) client: Client,
    pub(super) stream: jetstream::stream::Stream,
    /// The subjects of changes (`{prefix}.changes.>`).
    pub(super) filter: String,
    pub(super) tx: mpsc::Sender<BusEvent>,
    /// Last stream sequence handed to the dispatcher.
    pub(super) last: u64,
    /// The bus's head, raised as changes are consumed.
    pub(super) head: Arc<AtomicU64>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) cancel: CancellationToken,
}

impl Consumer {
    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::new(RECREATE_BACKOFF.0, RECREATE_BACKOFF.1);
        while !self.cancel.is_cancelled() {
            let started_at = self.last;
            match self.consume().await {
                Ok(()) => return,
                Err(err) => {
                    // A consumer that delivered something worked: the
                    // backoff starts over (a cluster that lost a server
                    // once is not made to wait for earlier failures).
                    if self.last > started_at {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(%err, last_seq = self.last, ?delay, "change consumer stopped; recreating");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Consumes until shutdown (Ok) or a failure that needs a new consumer (Err).
    async fn consume(&mut self) -> Result<(), String> {
        let info = self.stream.get_info().await.map_err(|e| e.to_string())?;
        self.resync_if_expired(&info).await?;
        let client = self.client.clone();
        let consumer = self
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                filter_subject: self.filter.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: self.last + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        let prefix_len = self.filter.len() - 1; // "{prefix}.changes."
        let mut batch: Vec<Change> = Vec::new();
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut progress = (self.last, 0u32);
        loop {
            let next = tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                next = messages.next() => next,
                _ = check.tick() => {
                    self.check_stream(&mut progress).await?;
                    continue;
                }
            };
            let mut next = Some(next);
            // Take what is already there without waiting, up to a batch.
            while let Some(item) = next.take() {
                match item {
                    None => return Err("consumer stream ended".into()),
                    Some(Err(err)) => {
                        // The ordered consumer recreates itself; keep reading.
                        tracing::debug!(%err, "ordered consumer error");
                    }
                    Some(Ok(message)) => {
                        let version = match message.info() {
                            Ok(info) => info.stream_sequence,
                            Err(err) => {
                                tracing::warn!(%err, "message without JetStream info, skipped");
                                continue;
                            }
                        };
                        if version <= self.last {
                            continue;
                        }
                        if version > self.last + 1 {
                            self.flush(&mut batch).await?;
                            self.resync(version).await?;
                        }
                        self.last = version;
                        let subject = message.subject.as_str();
                        match subject
                            .get(prefix_len..)
                            .and_then(|rest| rest.split_once('.'))
                            .and_then(|(entity, id)| Key::new(entity, id).ok())
                        {
                            Some(key) => {
                                let header = |name: &str| {
                                    message
                                        .headers
                                        .as_ref()
                                        .and_then(|h| h.get(name))
                                        .map(|v| v.as_str())
                                };
                                let meta = ChangeMeta::from_bus_headers(
                                    header(BUS_TRACE_HEADER),
                                    header(BUS_NOTIFIED_HEADER),
                                );
                                batch.push(Change { key, version, meta });
                            }
                            None => tracing::warn!(subject, "unparseable change subject, skipped"),
                        }
                    }
                }
                if batch.len() < CONSUME_BATCH {
                    next = messages.next().now_or_never();
                }
            }
            self.flush(&mut batch).await?;
        }
    }

    /// Compares this node's position with the stream's. After a reconnect the
    /// ordered consumer recreates itself and resumes, but it can't tell that
    /// changes expired meanwhile if nothing newer arrives, and a consumer
    /// create lost with a cluster member can leave it waiting forever. So:
    /// changes gone from the stream → resync now; the stream ahead of this
    /// node with no progress for a while → a new consumer (Err).
    async fn check_stream(&mut self, progress: &mut (u64, u32)) -> Result<(), String> {
        let Ok(Ok(info)) = tokio::time::timeout(CHECK_TIMEOUT, self.stream.get_info()).await else {
            return Ok(()); // NATS unreachable: nothing to compare now.
        };
        self.resync_if_expired(&info).await?;
        // The head every node has stored up to: with `last`, the lag gauge.
        self.head
            .fetch_max(info.state.last_sequence, Ordering::AcqRel);
        if info.state.last_sequence > self.last && progress.0 == self.last {
            progress.1 += 1;
            if progress.1 >= STALL_CHECKS {
                return Err(format!(
                    "consumer stalled: the stream is at {}, this node at {}",
                    info.state.last_sequence, self.last
                ));
            }
        } else {
            *progress = (self.last, 0);
        }
        Ok(())
    }

    /// Resyncs when the stream no longer holds the change after the last
    /// one processed (it expired while this node was away).
    async fn resync_if_expired(&mut self, info: &stream::Info) -> Result<(), String> {
        if info.state.first_sequence > self.last + 1 {
            self.resync(info.state.first_sequence).await?;
        }
        Ok(())
    }

    async fn flush(&mut self, batch: &mut Vec<Change>) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        self.head.fetch_max(self.last, Ordering::AcqRel);
        self.tx
            .send(BusEvent::Changes(std::mem::take(batch)))
            .await
            .map_err(|_| "dispatcher gone".to_string())
    }

    async fn resync(&mut self, first_available: u64) -> Result<(), String> {
        Metrics::inc(&self.metrics.resyncs_total);
        tracing::warn!(
            last_processed = self.last,
            first_available,
            "changes left the stream's retention while this node was behind: re-resolving every subscribed key"
        );
        self.last = first_available - 1;
        self.tx
            .send(BusEvent::Resync { version: self.last })
            .await
            .map_err(|_| "dispatcher gone".to_string())
    }
}
