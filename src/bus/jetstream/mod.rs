//! The NATS JetStream bus: change keys on `{prefix}.changes.{entity}.{id}` in one stream, consumed by every node.
//!
//! `publish` stores a call's keys as atomic batches of up to 1,000 (one
//! commit and one PubAck per batch, see `batch`) when the server is 2.12 or
//! newer and the stream allows them; else it publishes each key and awaits
//! its PubAck. Each node reads the stream with an ordered push
//! consumer starting right after the last sequence it processed; a gap in the
//! sequence means changes left the stream's retention while the node was
//! away, and the node re-resolves every subscribed key (resync). The consumer
//! also probes the stream every second and says whether this node receives
//! changes ([`JetStreamBus::availability`], for readiness).

mod batch;
mod consumer;
mod refresh;
pub(crate) mod relay_feed;
mod setup;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::{Client, HeaderMap, connection::State, header::NATS_MESSAGE_ID, jetstream};
use tokio::sync::{Semaphore, mpsc};

use crate::{
    bus::{
        error::{BusError, PublishError},
        event::{BusEvent, Change, EVENT_BUFFER, LastChange, Receipt},
        head::HeadReads,
    },
    config::NatsConfig,
    key::Key,
    ops::metrics::Metrics,
    ops::tasks::Tasks,
    ops::trace::{BUS_NOTIFIED_HEADER, BUS_TRACE_HEADER, ChangeMeta},
};
pub(crate) use consumer::Unavailable;
use consumer::{Availability, Consumer};

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
    /// The stream's first sequence as last read (it only grows).
    first: AtomicU64,
    closed: AtomicBool,
    /// Whether a call's keys go as atomic batches (server 2.12+ and the
    /// stream allows them), else one message each.
    atomic: bool,
    /// This node's open batches (see [`batch::BATCHES_IN_FLIGHT`]).
    batch_slots: Semaphore,
    /// Batches sent, for their ids.
    batches: AtomicU64,
    /// Whether this node receives changes, as its consumer finds out.
    availability: Arc<Availability>,
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
        let atomic_server = setup::atomic_server(&version);
        let (stream, info) = setup::open_stream(&client, config, atomic_server, &cancel).await?;
        let atomic = atomic_server && setup::atomic_batches(&client, config, &info).await;
        let start = info.state.last_sequence;
        tracing::info!(
            stream = %setup::stream_name(&config.prefix),
            server.version = %version,
            first_version = info.state.first_sequence,
            last_seq = start,
            replicas = info.config.num_replicas,
            atomic_notify = atomic,
            "JetStream bus ready"
        );

        let head = Arc::new(AtomicU64::new(start));
        let availability = Arc::new(Availability::default());
        let bus = JetStreamBus {
            inner: Arc::new(Inner {
                client: client.clone(),
                js,
                stream: stream.clone(),
                prefix: config.prefix.clone(),
                head: head.clone(),
                head_reads: HeadReads::default(),
                first: AtomicU64::new(info.state.first_sequence),
                closed: AtomicBool::new(false),
                atomic,
                batch_slots: Semaphore::new(batch::BATCHES_IN_FLIGHT),
                batches: AtomicU64::new(0),
                availability: availability.clone(),
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
            availability,
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
                    inner
                        .first
                        .fetch_max(info.state.first_sequence, Ordering::AcqRel);
                }
            })
            .await;
        self.head()
    }

    /// The key's last change, asked of the stream's leader (one request;
    /// when the stream holds none, a read of the stream's first sequence,
    /// shared with snapshots' head reads).
    pub(super) async fn last_change(&self, key: &Key) -> LastChange {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let subject = format!("{}.changes.{}.{}", self.inner.prefix, key.entity, key.id);
        let asked = self.inner.stream.get_last_raw_message_by_subject(&subject);
        match tokio::time::timeout(HEAD_TIMEOUT, asked).await {
            Ok(Ok(message)) => LastChange::At(message.sequence),
            Ok(Err(err)) if err.kind() == LastRawMessageErrorKind::NoMessageFound => {
                // Read after the answer: changes of the key before the
                // stream's first sequence may have left it.
                self.stream_head().await;
                let first = self.inner.first.load(Ordering::Acquire);
                LastChange::NoneAfter(first.saturating_sub(1))
            }
            Ok(Err(err)) => {
                tracing::debug!(key = %key, %err, "cannot read a key's last change");
                LastChange::Unknown
            }
            Err(_) => LastChange::Unknown,
        }
    }

    /// Starts pulling the relay feed: changes this node claims to resolve
    /// for the whole cluster.
    pub(super) fn relay_feed(&self, tasks: &Tasks) -> relay_feed::RelayFeed {
        relay_feed::start(
            self.inner.stream.clone(),
            &self.inner.prefix,
            tasks.token().clone(),
            tasks,
        )
    }

    pub(super) fn is_connected(&self) -> bool {
        self.inner.client.connection_state() == State::Connected
    }

    /// Whether this node receives changes, short of the connection (see
    /// [`is_connected`](Self::is_connected)): its stream answers and its
    /// consumer is not stalled.
    pub(super) fn availability(&self) -> Result<(), Unavailable> {
        self.inner.availability.get()
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
        let call = Call {
            idempotency_key,
            // Written once per call; every key of it carries them.
            trace: meta.trace.to_string(),
            notified_at: meta.notified_at_us.to_string(),
        };
        let mut sequences = Vec::with_capacity(keys.len());
        let mut duplicates = 0;
        // One key is one message either way: it goes as a plain publish
        // (no batch headers stored with it).
        if !self.inner.atomic || keys.len() == 1 {
            duplicates += self.publish_each(&keys, 0, &call, &mut sequences).await?;
        } else {
            // Whole batches, in order: a failure leaves the batches before
            // it stored and nothing of the others.
            for (index, chunk) in keys.chunks(batch::MAX_BATCH).enumerate() {
                let offset = index * batch::MAX_BATCH;
                match self.publish_batch(chunk, offset, &call).await {
                    Ok(first) => {
                        let last = first + chunk.len() as u64 - 1;
                        self.inner.head.fetch_max(last, Ordering::AcqRel);
                        sequences.extend(first..=last);
                    }
                    // Some key of the batch was stored before under its
                    // message id (a retried call): one by one, the stored
                    // keys answer their sequences as duplicates and any
                    // missing one is stored.
                    Err(err) if batch::refusal_code(&err) == Some(batch::ERR_DUPLICATE_MSG_ID) => {
                        duplicates += self
                            .publish_each(chunk, offset, &call, &mut sequences)
                            .await?;
                    }
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(Receipt {
            duplicate: duplicates == sequences.len() && !sequences.is_empty(),
            sequences,
        })
    }

    /// Stores `keys` (at most [`batch::MAX_BATCH`], the call's keys from
    /// `offset` on) as one atomic batch; returns the first key's sequence
    /// (the others follow it). A batch refused because too many are open on
    /// the stream is sent again, a few times.
    async fn publish_batch(
        &self,
        keys: &[Key],
        offset: usize,
        call: &Call<'_>,
    ) -> Result<u64, BusError> {
        let inner = &self.inner;
        let _slot = inner
            .batch_slots
            .acquire()
            .await
            .map_err(|_| BusError::Closed)?;
        let mut pause = batch::INFLIGHT_PAUSE;
        let mut attempt = 1;
        loop {
            let messages = keys
                .iter()
                .enumerate()
                .map(|(i, key)| batch::Message {
                    subject: self.subject(key),
                    headers: call.headers(offset + i),
                })
                .collect();
            let id = batch::new_batch_id(&inner.batches);
            match batch::publish(&inner.client, &id, messages).await {
                Ok(stored) => return Ok(stored.first),
                Err(err)
                    if batch::refusal_code(&err) == Some(batch::ERR_TOO_MANY_INFLIGHT)
                        && attempt < batch::INFLIGHT_ATTEMPTS =>
                {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Stores `keys` (the call's keys from `offset` on) one message each,
    /// appending their sequences to `sequences`; returns how many were
    /// duplicates. PubAcks are awaited in windows: async-nats keeps at most
    /// a few thousand in flight, and collecting more un-awaited ack futures
    /// than that hangs.
    async fn publish_each(
        &self,
        keys: &[Key],
        offset: usize,
        call: &Call<'_>,
        sequences: &mut Vec<u64>,
    ) -> Result<usize, BusError> {
        let mut duplicates = 0;
        for (window_index, window) in keys.chunks(ACK_WINDOW).enumerate() {
            let mut acks = Vec::with_capacity(window.len());
            for (i, key) in window.iter().enumerate() {
                let index = offset + window_index * ACK_WINDOW + i;
                let ack = self
                    .inner
                    .js
                    .publish_with_headers(
                        self.subject(key),
                        call.headers(index),
                        bytes::Bytes::new(),
                    )
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
        Ok(duplicates)
    }

    fn subject(&self, key: &Key) -> String {
        format!("{}.changes.{}.{}", self.inner.prefix, key.entity, key.id)
    }
}

/// What every key of one `publish` carries.
struct Call<'a> {
    idempotency_key: &'a str,
    trace: String,
    notified_at: String,
}

impl Call<'_> {
    /// The headers of the call's key number `index`.
    fn headers(&self, index: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(BUS_TRACE_HEADER, self.trace.as_str());
        headers.insert(BUS_NOTIFIED_HEADER, self.notified_at.as_str());
        if !self.idempotency_key.is_empty() {
            // One message id per key of the call.
            headers.insert(
                NATS_MESSAGE_ID,
                format!("{}#{index}", self.idempotency_key).as_str(),
            );
        }
        headers
    }
}

/// A publish or its PubAck that failed.
fn unacknowledged(err: jetstream::context::PublishError) -> BusError {
    BusError::Unavailable {
        source: PublishError::Nats(err),
    }
}

/// The change a stream message carries: its key from the subject (after
/// the first `prefix_len` bytes, `{prefix}.changes.`), its trace from the
/// headers.
fn change_of(message: &async_nats::Message, prefix_len: usize, version: u64) -> Option<Change> {
    let key = message
        .subject
        .as_str()
        .get(prefix_len..)
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(entity, id)| Key::new(entity, id).ok())?;
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    };
    let meta = ChangeMeta::from_bus_headers(header(BUS_TRACE_HEADER), header(BUS_NOTIFIED_HEADER));
    Some(Change { key, version, meta })
}
