//! The consuming loop: an ordered push consumer from the last sequence
//! processed on, batches for the dispatcher, resyncs on gaps, and a new
//! consumer when the old one fails or stalls; and whether this node receives
//! changes ([`Availability`]), from a probe of the stream every second.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
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
use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;

use super::change_of;
use crate::{
    bus::event::{BusEvent, Change},
    ops::metrics::Metrics,
};

/// Most change events handed to the dispatcher in one batch.
const CONSUME_BATCH: usize = 512;
/// How often the consumer probes the stream (asks for its info) and
/// compares its position with the stream's.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Deadline of that probe: a stream that does not answer within it is
/// unreachable from this node (no leader, or this node's NATS server cut
/// off from the cluster), and the node not ready. So readiness turns within
/// `CHECK_EVERY + CHECK_TIMEOUT` (2 s) of the stream going away.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the stream is probed while it is unreachable: the node is
/// ready again, and its consumer recreated, this soon after it answers.
const RETRY_UNREACHABLE_EVERY: Duration = Duration::from_millis(250);
/// A stream leader whose followers (enough of them for a quorum) were not
/// heard from for this long has lost its quorum: it still answers, from its
/// own server, but stores nothing more.
const QUORUM_SILENCE: Duration = Duration::from_secs(3);
/// Checks in a row without progress, while the stream is ahead, before the
/// node says its consumer stalled (not ready) and recreates it. A consumer
/// that lived on a server that died or was cut off from the cluster gets
/// nothing more, and async-nats's ordered consumer notices only after two
/// missed 5 s heartbeats; recreating one that was merely slow costs a
/// consumer create and nothing else (it resumes after `last`).
const STALL_CHECKS: u32 = 2;
/// First and longest pause before recreating a consumer that failed (steps
/// of a jittered [`Backoff`]: nodes that lost the same server do not all
/// recreate their consumers at the same instant).
const RECREATE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// Why this node does not receive changes although connected to NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// The stream does not answer from this node's NATS server (it has no
    /// leader, or the server is cut off from the rest of the cluster), or
    /// its leader lost its quorum: `Notify` fails and no changes arrive.
    StreamUnreachable,
    /// The stream is ahead of this node and its consumer delivers nothing.
    Stalled,
}

impl Unavailable {
    fn as_str(self) -> &'static str {
        match self {
            Unavailable::StreamUnreachable => "stream unreachable",
            Unavailable::Stalled => "consumer stalled",
        }
    }
}

/// Whether this node receives changes, as its consumer last found out: a
/// cheap-to-read cell shared with the bus (and so readiness).
#[derive(Debug, Default)]
pub(crate) struct Availability(AtomicU8);

impl Availability {
    const AVAILABLE: u8 = 0;
    const UNREACHABLE: u8 = 1;
    const STALLED: u8 = 2;

    /// Available (`Ok`), or why not.
    pub(crate) fn get(&self) -> Result<(), Unavailable> {
        match self.0.load(Ordering::Acquire) {
            Self::UNREACHABLE => Err(Unavailable::StreamUnreachable),
            Self::STALLED => Err(Unavailable::Stalled),
            _ => Ok(()),
        }
    }

    /// Records `now`; whether that changed anything. The caller logs.
    fn set(&self, now: Result<(), Unavailable>) -> bool {
        let value = match now {
            Ok(()) => Self::AVAILABLE,
            Err(Unavailable::StreamUnreachable) => Self::UNREACHABLE,
            Err(Unavailable::Stalled) => Self::STALLED,
        };
        self.0.swap(value, Ordering::AcqRel) != value
    }
}

/// Why a consumer stopped, short of shutdown.
enum Interrupted {
    /// The stream did not answer the first probe: probe again soon.
    Unreachable,
    /// The stream answers again after it did not: the consumer that lived
    /// through the outage may be gone or waiting out a backoff, so a new
    /// one, at once (it resumes after `last`).
    Reachable,
    /// Anything else: a new consumer after a backoff.
    Failed(String),
}

impl From<String> for Interrupted {
    fn from(err: String) -> Self {
        Interrupted::Failed(err)
    }
}

/// A stream-info request in flight, bounded by [`CHECK_TIMEOUT`].
type Probe = Pin<Box<dyn Future<Output = Result<stream::Info, String>> + Send>>;

/// Reads the stream from `last + 1` on for the dispatcher, recreating its
/// ordered consumer when it fails or stalls, and says whether this node
/// receives changes.
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
    /// What the probes found, for readiness.
    pub(super) availability: Arc<Availability>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) cancel: CancellationToken,
}

impl Consumer {
    pub(super) async fn run(mut self) {
        let mut backoff = Backoff::new(RECREATE_BACKOFF.0, RECREATE_BACKOFF.1);
        while !self.cancel.is_cancelled() {
            let started_at = self.last;
            let delay = match self.consume().await {
                Ok(()) => return,
                Err(Interrupted::Reachable) => {
                    backoff.reset();
                    tracing::debug!(
                        last_seq = self.last,
                        "the change stream answers again; new consumer"
                    );
                    continue;
                }
                Err(Interrupted::Unreachable) => RETRY_UNREACHABLE_EVERY,
                Err(Interrupted::Failed(err)) => {
                    // A consumer that delivered something worked: the
                    // backoff starts over (a cluster that lost a server
                    // once is not made to wait for earlier failures).
                    if self.last > started_at {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(%err, last_seq = self.last, ?delay, "change consumer stopped; recreating");
                    delay
                }
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// A stream-info request, bounded by [`CHECK_TIMEOUT`].
    fn probe(&self) -> Probe {
        let stream = self.stream.clone();
        Box::pin(async move {
            match tokio::time::timeout(CHECK_TIMEOUT, stream.get_info()).await {
                Ok(Ok(info)) => Ok(info),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err(format!("no stream info within {CHECK_TIMEOUT:?}")),
            }
        })
    }

    /// Consumes until shutdown (Ok) or something that needs a new consumer.
    async fn consume(&mut self) -> Result<(), Interrupted> {
        let info = match self.probe().await {
            Ok(info) => info,
            Err(err) => {
                self.unreachable(&err);
                return Err(Interrupted::Unreachable);
            }
        };
        if let Some(why) = no_quorum(info.cluster.as_ref()) {
            // Cut off: a new consumer would get nothing either.
            self.unreachable(&why);
            return Err(Interrupted::Unreachable);
        }
        self.resync_if_expired(&info).await?;
        let client = self.client.clone();
        let created = self
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                filter_subject: self.filter.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: self.last + 1,
                },
                ..Default::default()
            })
            .await;
        // Without a consumer nothing arrives: unavailable, and tried again
        // soon (JetStream answers "temporarily unavailable" for a while
        // after its stream got a leader again).
        let consumer = match created {
            Ok(consumer) => consumer,
            Err(err) => {
                self.unreachable(&format!("cannot create the consumer: {err}"));
                return Err(Interrupted::Unreachable);
            }
        };
        let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
        self.reachable(&info);
        let prefix_len = self.filter.len() - 1; // "{prefix}.changes."
        let mut batch: Vec<Change> = Vec::new();
        // The next probe: due at `next_check`, or in flight. Probes run
        // beside the consuming (a slow answer holds no change back).
        let mut next_check = Instant::now() + CHECK_EVERY;
        let mut probe: Option<Probe> = None;
        let mut progress = (self.last, 0u32);
        loop {
            let next = tokio::select! {
                _ = self.cancel.cancelled() => return Ok(()),
                next = messages.next() => next,
                _ = tokio::time::sleep_until(next_check), if probe.is_none() => {
                    probe = Some(self.probe());
                    continue;
                }
                answer = async { probe.as_mut().expect("guarded").await }, if probe.is_some() => {
                    probe = None;
                    let reachable = self.check_stream(answer, &mut progress).await?;
                    next_check = Instant::now() + if reachable { CHECK_EVERY } else { RETRY_UNREACHABLE_EVERY };
                    continue;
                }
            };
            let mut next = Some(next);
            // Take what is already there without waiting, up to a batch.
            while let Some(item) = next.take() {
                match item {
                    None => return Err(Interrupted::Failed("consumer stream ended".into())),
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
                        match change_of(&message, prefix_len, version) {
                            Some(change) => batch.push(change),
                            None => tracing::warn!(
                                subject = %message.subject,
                                "unparseable change subject, skipped"
                            ),
                        }
                    }
                }
                if batch.len() < CONSUME_BATCH {
                    next = messages.next().now_or_never();
                }
            }
            self.flush(&mut batch).await?;
            if self.last > progress.0 {
                self.flowing();
            }
        }
    }

    /// Reads a probe's answer: whether the stream answered. After a
    /// reconnect the ordered consumer recreates itself and resumes, but it
    /// can't tell that changes expired meanwhile if nothing newer arrives,
    /// and a consumer create lost with a cluster member can leave it waiting
    /// forever; after an outage of the stream it may be waiting out a long
    /// backoff. So: no answer (or a leader without quorum) → unavailable;
    /// an answer after none → a new consumer now (Err); changes gone from
    /// the stream → resync now; the stream ahead of this node with no
    /// progress for a while → not ready, then a new consumer (Err).
    async fn check_stream(
        &mut self,
        answer: Result<stream::Info, String>,
        progress: &mut (u64, u32),
    ) -> Result<bool, Interrupted> {
        let info = match answer {
            Ok(info) => info,
            Err(err) => {
                self.unreachable(&err);
                return Ok(false);
            }
        };
        if let Some(why) = no_quorum(info.cluster.as_ref()) {
            self.unreachable(&why);
            return Ok(false);
        }
        if self.availability.get() == Err(Unavailable::StreamUnreachable) {
            // Available again once the new consumer exists.
            return Err(Interrupted::Reachable);
        }
        self.resync_if_expired(&info).await?;
        // The head every node has stored up to: with `last`, the lag gauge.
        self.head
            .fetch_max(info.state.last_sequence, Ordering::AcqRel);
        if info.state.last_sequence > self.last && progress.0 == self.last {
            progress.1 += 1;
            if progress.1 >= STALL_CHECKS {
                if self.availability.set(Err(Unavailable::Stalled)) {
                    tracing::warn!(
                        reason = Unavailable::Stalled.as_str(),
                        stream_seq = info.state.last_sequence,
                        last_seq = self.last,
                        "bus unavailable: the stream is ahead and this node's consumer delivers nothing"
                    );
                }
                return Err(Interrupted::Failed(format!(
                    "consumer stalled: the stream is at {}, this node at {}",
                    info.state.last_sequence, self.last
                )));
            }
        } else {
            *progress = (self.last, 0);
            self.flowing();
        }
        Ok(true)
    }

    /// The stream did not answer (`why`): unavailable, said once.
    fn unreachable(&self, why: &str) {
        if self.availability.set(Err(Unavailable::StreamUnreachable)) {
            tracing::warn!(
                reason = Unavailable::StreamUnreachable.as_str(),
                error = why,
                last_seq = self.last,
                "bus unavailable: the change stream does not answer from this node's NATS server"
            );
        }
    }

    /// The stream answered: available again if it did not before.
    fn reachable(&self, info: &stream::Info) {
        if self.availability.get() == Err(Unavailable::StreamUnreachable) {
            self.availability.set(Ok(()));
            tracing::info!(
                stream_seq = info.state.last_sequence,
                last_seq = self.last,
                leader = info.cluster.as_ref().and_then(|c| c.leader.as_deref()),
                "bus available again: the change stream answers; new consumer"
            );
        }
    }

    /// Changes flow (or none are due): a stalled consumer no longer is.
    fn flowing(&self) {
        if self.availability.get() == Err(Unavailable::Stalled) {
            self.availability.set(Ok(()));
            tracing::info!(last_seq = self.last, "bus available again: changes flow");
        }
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

/// Why the stream, although it answered the probe, cannot store changes:
/// it has no leader (a replica answered for it), or its leader heard from
/// fewer of its replicas than a quorum within [`QUORUM_SILENCE`] (it is cut
/// off from them, and steps down only later). `None` when it can: a leader
/// with its quorum, a single replica, or a server outside any cluster.
fn no_quorum(cluster: Option<&stream::ClusterInfo>) -> Option<String> {
    let cluster = cluster?;
    let Some(leader) = &cluster.leader else {
        // Clustered (a raft group, replicas listed) and no leader.
        return (cluster.raft_group.is_some() || !cluster.replicas.is_empty())
            .then(|| "the stream has no leader".to_owned());
    };
    if cluster.replicas.is_empty() {
        return None;
    }
    // The leader lists the other replicas.
    let members = cluster.replicas.len() + 1;
    let heard = 1 + cluster
        .replicas
        .iter()
        .filter(|peer| !peer.offline && peer.active < QUORUM_SILENCE)
        .count();
    (heard < members / 2 + 1).then(|| {
        format!("the stream leader {leader} heard from {heard} of {members} replicas within {QUORUM_SILENCE:?}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::stream::{ClusterInfo, PeerInfo};

    fn peer(name: &str, active_ms: u64, offline: bool) -> PeerInfo {
        PeerInfo {
            name: name.to_owned(),
            current: true,
            active: Duration::from_millis(active_ms),
            offline,
            lag: None,
        }
    }

    fn cluster(replicas: Vec<PeerInfo>) -> ClusterInfo {
        ClusterInfo {
            leader: Some("n0".to_owned()),
            replicas,
            ..ClusterInfo::default()
        }
    }

    #[test]
    fn a_stream_without_leader_or_whose_leader_hears_from_too_few_replicas_has_no_quorum() {
        // No cluster info, or a single replica: nothing to judge.
        assert_eq!(no_quorum(None), None);
        assert_eq!(no_quorum(Some(&cluster(vec![]))), None);
        // A server outside any cluster names itself leader, or no one.
        assert_eq!(no_quorum(Some(&ClusterInfo::default())), None);
        // A replica answering for a stream without leader lists every peer.
        let leaderless = ClusterInfo {
            leader: None,
            raft_group: Some("S-R3F-abc".to_owned()),
            replicas: vec![peer("n0", 10, false), peer("n1", 10, false)],
            ..ClusterInfo::default()
        };
        assert_eq!(
            no_quorum(Some(&leaderless)).as_deref(),
            Some("the stream has no leader")
        );
        // Three replicas: the leader and one follower heard from are a quorum.
        let one_heard = cluster(vec![peer("n1", 400, false), peer("n2", 9_000, false)]);
        assert_eq!(no_quorum(Some(&one_heard)), None);
        let one_offline = cluster(vec![peer("n1", 100, false), peer("n2", 100, true)]);
        assert_eq!(no_quorum(Some(&one_offline)), None);
        // Neither follower heard from within QUORUM_SILENCE: no quorum.
        let silent = cluster(vec![peer("n1", 3_000, false), peer("n2", 12_000, false)]);
        assert_eq!(
            no_quorum(Some(&silent)).as_deref(),
            Some("the stream leader n0 heard from 1 of 3 replicas within 3s")
        );
        let offline = cluster(vec![peer("n1", 10, true), peer("n2", 10, true)]);
        assert!(no_quorum(Some(&offline)).is_some());
        // Five replicas: three are needed.
        let five = |active: [u64; 4]| {
            cluster(
                active
                    .iter()
                    .enumerate()
                    .map(|(i, ms)| peer(&format!("n{}", i + 1), *ms, false))
                    .collect(),
            )
        };
        assert_eq!(no_quorum(Some(&five([10, 10, 9_000, 9_000]))), None);
        assert!(no_quorum(Some(&five([10, 9_000, 9_000, 9_000]))).is_some());
    }

    #[test]
    fn availability_records_the_latest_finding_and_says_when_it_changed() {
        let availability = Availability::default();
        assert_eq!(availability.get(), Ok(()));
        assert!(!availability.set(Ok(())));
        assert!(availability.set(Err(Unavailable::StreamUnreachable)));
        assert!(!availability.set(Err(Unavailable::StreamUnreachable)));
        assert_eq!(availability.get(), Err(Unavailable::StreamUnreachable));
        assert!(availability.set(Err(Unavailable::Stalled)));
        assert_eq!(availability.get(), Err(Unavailable::Stalled));
        assert!(availability.set(Ok(())));
        assert_eq!(availability.get(), Ok(()));
    }
}
