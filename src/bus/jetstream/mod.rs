//! The NATS JetStream bus: change keys on `{prefix}.changes.{entity}.{id}` in one stream, consumed by every node.
//!
//! `publish` awaits each key's PubAck (in windows: async-nats keeps at most
//! a few thousand acks in flight, and collecting more un-awaited ack futures
//! than that hangs). Each node reads the stream with an ordered push
//! consumer starting right after the last sequence it processed; a gap in the
//! sequence means changes left the stream's retention while the node was
//! away, and the node re-resolves every subscribed key (resync).

mod consumer;
mod refresh;
mod setup;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::{Client, HeaderMap, connection::State, header::NATS_MESSAGE_ID, jetstream};
use tokio::sync::mpsc;

use crate::{
    bus::{
        error::{BusError, PublishError},
        event::{BusEvent, EVENT_BUFFER, Receipt},
        head::HeadReads,
    },
    config::NatsConfig,
    key::Key,
    ops::metrics::Metrics,
    ops::tasks::Tasks,
    ops::trace::{BUS_NOTIFIED_HEADER, BUS_TRACE_HEADER, ChangeMeta},
};
use consumer::Consumer;

/// PubAck futures awaited together; well under async-nats's in-flight limit.
const ACK_WINDOW: usize = 1000;
/// Deadline of the stream-head query made for snapshots (one at a time).
const HEAD_TIMEOUT: Duration = Duration::from_millis(250);

/// The JetStream bus: a cheap-clone handle.
#[derive(Clone)]
pub struct JetStreamBus {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    prefix: String,
    /// Highest sequence acknowledged to this node's publishes or consumed
    /// (shared with the consumer).
    head: Arc<AtomicU64>,
    /// Snapshots' reads of the stream's head, batched.
    head_reads: HeadReads,
    closed: AtomicBool,
}

impl JetStreamBus {
    /// Connects to `urls` (comma-separated), checks the server version,
    /// makes sure the stream exists with compatible settings, and starts
    /// consuming. Returns the bus, the receiver the dispatcher consumes, and
    /// the NATS client (for cluster resolves).
    pub(super) async fn connect(
        config: &NatsConfig,
        urls: &str,
        node_id: &str,
        metrics: Arc<Metrics>,
        tasks: &Tasks,
    ) -> Result<(Self, mpsc::Receiver<BusEvent>, Client), BusError> {
        let cancel = tasks.token().clone();
        let client = setup::connect(config, urls, node_id, &cancel).await?;
        let version = setup::server_version(&client)?;
        let js = jetstream::new(client.clone());
        let (stream, info) = setup::open_stream(&client, config, &cancel).await?;
        let start = info.state.last_sequence;
        tracing::info!(
            stream = %setup::stream_name(&config.prefix),
            server.version = %version,
            first_version = info.state.first_sequence,
            last_seq = start,
            replicas = info.config.num_replicas,
            "JetStream bus ready"
        );

        let head = Arc::new(AtomicU64::new(start));
        let bus = JetStreamBus {
            inner: Arc::new(Inner {
                client: client.clone(),
                js,
                stream: stream.clone(),
                prefix: config.prefix.clone(),
                head: head.clone(),
                head_reads: HeadReads::default(),
                closed: AtomicBool::new(false),
            }),
        };
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let consumer = Consumer {
            client: client.clone(),
            stream,
            filter: setup::changes_subjects(&config.prefix),
            tx,
            last: start,
            head,
            metrics,
            cancel,
        };
        tasks.spawn(consumer.run());
        Ok((bus, rx, client))
    }

    pub(super) fn head(&self) -> u64 {
        self.inner.head.load(Ordering::Acquire)
    }

    /// The stream's last sequence, asked of NATS: every change acknowledged
    /// by any node before this call is at or below it, so a snapshot taken
    /// after it never carries a lower version than a push a client got from
    /// another node. Falls back to this node's own head when NATS doesn't
    /// answer in time. Concurrent calls share one request (see `HeadReads`).
    pub(super) async fn stream_head(&self) -> u64 {
        let inner = &self.inner;
        inner
            .head_reads
            .read(|| async {
                if let Ok(Ok(info)) =
                    tokio::time::timeout(HEAD_TIMEOUT, inner.stream.get_info()).await
                {
                    inner
                        .head
                        .fetch_max(info.state.last_sequence, Ordering::AcqRel);
                }
            })
            .await;
        self.head()
    }

    pub(super) fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    pub(super) async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        let _ = self.inner.client.flush().await;
    }

    pub(super) async fn publish(
        &self,
        keys: Vec<Key>,
        idempotency_key: &str,
        meta: ChangeMeta,
    ) -> Result<Receipt, BusError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        if !self.is_connected() {
            return Err(BusError::Unavailable {
                source: PublishError::NotConnected,
            });
        }
        let mut sequences = Vec::with_capacity(keys.len());
        let mut duplicates = 0;
        // Written once per call; every key of it carries them.
        let trace = meta.trace.to_string();
        let notified_at = meta.notified_at_us.to_string();
        for (window_index, window) in keys.chunks(ACK_WINDOW).enumerate() {
            let mut acks = Vec::with_capacity(window.len());
            for (i, key) in window.iter().enumerate() {
                let subject = format!("{}.changes.{}.{}", self.inner.prefix, key.entity, key.id);
                let mut headers = HeaderMap::new();
                headers.insert(BUS_TRACE_HEADER, trace.as_str());
                headers.insert(BUS_NOTIFIED_HEADER, notified_at.as_str());
                if !idempotency_key.is_empty() {
                    // One message id per key of the call.
                    let index = window_index * ACK_WINDOW + i;
                    headers.insert(
                        NATS_MESSAGE_ID,
                        format!("{idempotency_key}#{index}").as_str(),
                    );
                }
                let ack = self
                    .inner
                    .js
                    .publish_with_headers(subject, headers, bytes::Bytes::new())
                    .await
                    .map_err(unacknowledged)?;
                acks.push(ack);
            }
            for ack in acks {
                let ack = ack.await.map_err(unacknowledged)?;
                if ack.duplicate {
                    duplicates += 1;
                }
                self.inner.head.fetch_max(ack.sequence, Ordering::AcqRel);
                sequences.push(ack.sequence);
            }
        }
        Ok(Receipt {
            duplicate: duplicates == sequences.len() && !sequences.is_empty(),
            sequences,
        })
    }
}

/// A publish or its PubAck that failed.
fn unacknowledged(err: jetstream::context::PublishError) -> BusError {
    BusError::Unavailable {
        source: PublishError::Nats(err),
    }
}
