//! The NATS JetStream bus: change keys on `{prefix}.changes.{entity}.{id}` in one stream, consumed by every node.
//!
//! `publish` awaits each key's PubAck (in windows: async-nats keeps at most
//! a few thousand acks in flight, and collecting more un-awaited ack futures
//! than that hangs). Each node reads the stream with an ordered push
//! consumer starting right after the last sequence it processed; a gap in the
//! sequence means changes left the stream's retention while the node was
//! away, and the node re-resolves every subscribed key (resync).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::{
    Client, ConnectOptions, HeaderMap,
    connection::State,
    header::NATS_MESSAGE_ID,
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

use super::{BusError, BusEvent, ChangeEvent, EVENT_BUFFER, Receipt, head::HeadReads};
use crate::{
    config::{NatsConfig, scrub_urls},
    key::ChangeKey,
    ops::metrics::Metrics,
    ops::tasks::Tasks,
    ops::trace::{BUS_NOTIFIED_HEADER, BUS_TRACE_HEADER, ChangeMeta},
};

/// PubAck futures awaited together; well under async-nats's in-flight limit.
pub const ACK_WINDOW: usize = 1000;
/// Most change events handed to the dispatcher in one batch.
const CONSUME_BATCH: usize = 512;
/// Deadline of the stream-head query made for snapshots (one at a time).
const HEAD_TIMEOUT: Duration = Duration::from_millis(250);
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
/// Deadline of each JetStream API request made to set up and consume the
/// stream (stream info and create, consumer create, and the ordered
/// consumer's own recreations). A request can be lost with a cluster member
/// (sent through a server that died, or while the stream elects a leader);
/// without this it waits out the connection's 10 s request timeout before
/// the next attempt. Publish acks keep their own wait.
const API_TIMEOUT: Duration = Duration::from_secs(2);
/// First and longest pause before recreating a consumer that failed (steps
/// of a jittered [`Backoff`]: nodes that lost the same server do not all
/// recreate their consumers at the same instant).
const RECREATE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// Oldest nats-server accepted (major, minor).
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 10);

/// How long one connection attempt to NATS may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest pause between startup attempts (steps of a jittered
/// [`Backoff`]).
const STARTUP_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));
/// How often the client pings its server. async-nats' default (a minute)
/// leaves a half-open link (a peer that vanished without a FIN) unnoticed
/// for minutes; two unanswered pings make the client reconnect.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Retries `attempt` with backoff while it fails with an error `retryable`
/// accepts and `window` lasts (`--nats-startup-timeout`: servers started
/// together with the nodes, a cluster still electing its leaders); stops
/// early on shutdown.
async fn at_startup<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    window: Duration,
    cancel: &CancellationToken,
    retryable: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> F,
) -> Result<Result<T, E>, BusError> {
    let deadline = tokio::time::Instant::now() + window;
    let mut backoff = Backoff::new(STARTUP_BACKOFF.0, STARTUP_BACKOFF.1);
    loop {
        let err = match attempt().await {
            Ok(value) => return Ok(Ok(value)),
            Err(err) => err,
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !retryable(&err) || left.is_zero() {
            return Ok(Err(err));
        }
        // The last pause ends with the window and one more attempt is made
        // then: the jittered pauses would otherwise give up to half of it away.
        let pause = backoff.next_delay().min(left);
        tracing::warn!(error = %err, retry_in = ?pause, "{what} failed; retrying");
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = cancel.cancelled() => return Err(BusError::Closed),
        }
    }
}

/// Connection failures worth another attempt while starting: the server is
/// not up yet or dropped the connection. Refused credentials, a bad address
/// or a TLS mismatch stay as they are.
fn connect_retryable(err: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind as Kind;
    matches!(err.kind(), Kind::Io | Kind::TimedOut | Kind::Dns)
}

/// `addr` without the user and password of its URL (sent in the handshake
/// instead, see `connect`).
fn without_credentials(addr: async_nats::ServerAddr) -> async_nats::ServerAddr {
    let mut url = addr.into_inner();
    // Both fail only for URLs that cannot carry credentials, which then
    // carry none.
    let _ = url.set_password(None);
    let _ = url.set_username("");
    async_nats::ServerAddr::from_url(url).expect("the scheme was accepted before")
}

/// Name of the stream (`{prefix}_changes`).
fn stream_name(prefix: &str) -> String {
    format!("{prefix}_changes")
}

/// The stream's subjects, which the consumer also filters on.
fn changes_subjects(prefix: &str) -> String {
    format!("{prefix}.changes.>")
}

fn stream_config(config: &NatsConfig) -> stream::Config {
    stream::Config {
        name: stream_name(&config.prefix),
        description: Some("entity-sync change keys".into()),
        subjects: vec![changes_subjects(&config.prefix)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        num_replicas: config.replicas,
        max_age: config.max_age,
        max_bytes: config.max_bytes,
        // JetStream refuses a duplicate window longer than max_age.
        duplicate_window: super::memory::DEDUP_WINDOW.min(config.max_age),
        ..Default::default()
    }
}

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
    /// Highest sequence acknowledged to this node's publishes or consumed.
    head: AtomicU64,
    /// Snapshots' reads of the stream's head, batched.
    head_reads: HeadReads,
    closed: AtomicBool,
}

/// `%XX` escapes of a URL's user or password decoded (invalid ones kept).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses "2.10.3", "v2.11.0-RC.1" into (major, minor).
pub fn parse_version(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim().trim_start_matches('v').split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
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
        // URLs may carry credentials (`nats://user:password@host`): errors
        // and logs name them without.
        let connect_error = |reason: String| BusError::Connect {
            url: scrub_urls(urls),
            reason,
        };
        let mut options = ConnectOptions::new()
            .name(format!("entity-sync {node_id}"))
            .connection_timeout(CONNECT_TIMEOUT)
            .ping_interval(PING_INTERVAL)
            .max_reconnects(None)
            .retain_servers_order()
            .event_callback(|event| async move {
                tracing::info!(%event, "NATS connection event");
            });
        if let Some(path) = &config.creds {
            options = options.credentials_file(path).await.map_err(|err| {
                connect_error(format!("credentials file {}: {err}", path.display()))
            })?;
        }
        if let Some(token) = &config.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some(ca) = &config.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            (None, None) => {}
            _ => {
                return Err(connect_error(
                    "--nats-tls-cert and --nats-tls-key go together".into(),
                ));
            }
        }
        if config.require_tls {
            options = options.require_tls(true);
        }
        let addrs: Vec<async_nats::ServerAddr> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse()
                    .map_err(|err| connect_error(format!("bad URL {:?}: {err}", scrub_urls(u))))
            })
            .collect::<Result<_, _>>()?;
        if addrs.is_empty() {
            return Err(connect_error("no URL given".into()));
        }
        // `nats://user:password@host`: async-nats does not send URL
        // credentials by itself.
        if let Some(addr) = addrs.iter().find(|a| a.has_user_pass()) {
            let user = percent_decode(addr.username().unwrap_or_default());
            let password = percent_decode(addr.password().unwrap_or_default());
            options = options.user_and_password(user, password);
        }
        // ...and it logs a server's address, URL and all, at debug level on
        // every connection attempt: it gets the addresses without them.
        let addrs: Vec<async_nats::ServerAddr> =
            addrs.into_iter().map(without_credentials).collect();
        let cancel = tasks.token().clone();
        let window = config.startup_timeout;
        let client = at_startup(
            "connecting to NATS",
            window,
            &cancel,
            connect_retryable,
            || options.clone().connect(addrs.clone()),
        )
        .await?
        .map_err(|err| connect_error(err.to_string()))?;

        let version = client.server_info().version;
        match parse_version(&version) {
            Some(v) if v >= MIN_SERVER_VERSION => {}
            _ => return Err(BusError::ServerTooOld { version }),
        }

        let js = jetstream::new(client.clone());
        // The stream handle (and the consumers made from it) ask with the
        // shorter deadline; `js` publishes.
        let api = jetstream::ContextBuilder::new()
            .timeout(API_TIMEOUT)
            .build(client.clone());
        let wanted = stream_config(config);
        let stream_error = |reason: String| BusError::Stream {
            stream: wanted.name.clone(),
            reason,
        };
        // A fresh cluster answers "JetStream not ready" or times out while
        // it elects its leaders; nodes started with it wait for it.
        let (stream, info) = at_startup(
            "setting up the JetStream stream",
            window,
            &cancel,
            |_: &String| true,
            || async {
                let mut stream = api
                    .get_or_create_stream(wanted.clone())
                    .await
                    .map_err(|err| err.to_string())?;
                let info = stream.info().await.map_err(|err| err.to_string())?.clone();
                Ok((stream, info))
            },
        )
        .await?
        .map_err(stream_error)?;
        check_stream(&wanted, &info.config).map_err(stream_error)?;
        let start = info.state.last_sequence;
        tracing::info!(
            stream = %wanted.name,
            server.version = %version,
            first_seq = info.state.first_sequence,
            last_seq = start,
            replicas = info.config.num_replicas,
            "JetStream bus ready"
        );

        let bus = JetStreamBus {
            inner: Arc::new(Inner {
                client: client.clone(),
                js: js.clone(),
                stream: stream.clone(),
                prefix: config.prefix.clone(),
                head: AtomicU64::new(start),
                head_reads: HeadReads::default(),
                closed: AtomicBool::new(false),
            }),
        };
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let consumer = Consumer {
            bus: bus.clone(),
            stream,
            filter: changes_subjects(&config.prefix),
            tx,
            last: start,
            metrics,
            cancel: tasks.token().clone(),
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
        keys: Vec<ChangeKey>,
        idempotency_key: &str,
        meta: ChangeMeta,
    ) -> Result<Receipt, BusError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(BusError::Closed);
        }
        if !self.is_connected() {
            return Err(BusError::Unavailable("not connected to NATS".into()));
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
                    .map_err(|err| BusError::Unavailable(err.to_string()))?;
                acks.push(ack);
            }
            for ack in acks {
                let ack = ack
                    .await
                    .map_err(|err| BusError::Unavailable(err.to_string()))?;
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

/// Refuses an existing stream whose settings would break the bus (never
/// changes it silently); differences that only tune it are logged.
fn check_stream(wanted: &stream::Config, actual: &stream::Config) -> Result<(), String> {
    if actual.subjects != wanted.subjects {
        return Err(format!(
            "exists with subjects {:?}, expected {:?}; use another --nats-prefix or fix the stream",
            actual.subjects, wanted.subjects
        ));
    }
    if actual.retention != wanted.retention {
        return Err(format!(
            "exists with retention {:?}, expected Limits (every node must read every change)",
            actual.retention
        ));
    }
    if actual.max_messages_per_subject > 0 {
        return Err(
            "exists with max_msgs_per_subject set: sequence gaps would look like lost changes"
                .into(),
        );
    }
    if actual.num_replicas != wanted.num_replicas
        || actual.max_age != wanted.max_age
        || actual.max_bytes != wanted.max_bytes
    {
        tracing::warn!(
            replicas = actual.num_replicas,
            max_age = ?actual.max_age,
            max_bytes = actual.max_bytes,
            "the stream exists with other limits than configured; keeping the existing ones"
        );
    }
    Ok(())
}

struct Consumer {
    bus: JetStreamBus,
    stream: jetstream::stream::Stream,
    filter: String,
    tx: mpsc::Sender<BusEvent>,
    /// Last stream sequence handed to the dispatcher.
    last: u64,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
}

impl Consumer {
    async fn run(mut self) {
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
        let client = self.bus.inner.client.clone();
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
        let mut batch: Vec<ChangeEvent> = Vec::new();
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
                        let seq = match message.info() {
                            Ok(info) => info.stream_sequence,
                            Err(err) => {
                                tracing::warn!(%err, "message without JetStream info, skipped");
                                continue;
                            }
                        };
                        if seq <= self.last {
                            continue;
                        }
                        if seq > self.last + 1 {
                            self.flush(&mut batch).await?;
                            self.resync(seq).await?;
                        }
                        self.last = seq;
                        let subject = message.subject.as_str();
                        match subject
                            .get(prefix_len..)
                            .and_then(|rest| rest.split_once('.'))
                            .and_then(|(entity, id)| ChangeKey::new(entity, id).ok())
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
                                batch.push(ChangeEvent { key, seq, meta });
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
        self.bus
            .inner
            .head
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

    async fn flush(&mut self, batch: &mut Vec<ChangeEvent>) -> Result<(), String> {
        if batch.is_empty() {
            return Ok(());
        }
        self.bus.inner.head.fetch_max(self.last, Ordering::AcqRel);
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
            .send(BusEvent::Resync { seq: self.last })
            .await
            .map_err(|_| "dispatcher gone".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_scrubbed_from_urls() {
        assert_eq!(
            scrub_urls("nats://alice:s3cret@n1:4222, tls://tok3n@n2:4222/x,n3:4222"),
            "nats://***@n1:4222,tls://***@n2:4222/x,n3:4222"
        );
        assert_eq!(scrub_urls("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(scrub_urls("user:pw@host:4222"), "***@host:4222");
        assert_eq!(percent_decode("p%40ss%3Aw%2"), "p@ss:w%2");
    }

    #[test]
    fn addresses_lose_their_credentials() {
        let addr: async_nats::ServerAddr = "nats://user:pa%40ss@127.0.0.1:4333".parse().unwrap();
        let bare = without_credentials(addr);
        assert_eq!(bare.as_url_str(), "nats://127.0.0.1:4333");
        assert!(!bare.has_user_pass());
        assert!(!format!("{bare:?}").contains("pa%40ss"));
        let tls: async_nats::ServerAddr = "tls://[::1]:4222".parse().unwrap();
        assert_eq!(without_credentials(tls).as_url_str(), "tls://[::1]:4222");
    }

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("2.10.3"), Some((2, 10)));
        assert_eq!(parse_version("v2.11.0-RC.1"), Some((2, 11)));
        assert_eq!(parse_version("2.9.10"), Some((2, 9)));
        assert!(parse_version("2.9.10") < Some(MIN_SERVER_VERSION));
        assert!(parse_version("3.0.0") >= Some(MIN_SERVER_VERSION));
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn incompatible_streams_are_refused() {
        let config = NatsConfig {
            prefix: "es".into(),
            max_age: Duration::from_secs(3600),
            max_bytes: -1,
            ..NatsConfig::default()
        };
        let wanted = stream_config(&config);
        assert_eq!(wanted.name, "es_changes");
        assert!(check_stream(&wanted, &wanted).is_ok());
        let mut other = wanted.clone();
        other.subjects = vec!["other.>".into()];
        assert!(check_stream(&wanted, &other).is_err());
        let mut other = wanted.clone();
        other.retention = stream::RetentionPolicy::WorkQueue;
        assert!(check_stream(&wanted, &other).is_err());
        let mut other = wanted.clone();
        other.max_age = Duration::from_secs(1);
        assert!(
            check_stream(&wanted, &other).is_ok(),
            "tuning differences only warn"
        );
    }
}
