//! Cluster resolve: a node with no local resolver for an entity asks a node that has one, over NATS request-reply.
//!
//! Nodes with local resolvers of entity `E` answer on `{prefix}.resolve.E` in
//! the queue group `{prefix}-resolvers` (one of them answers each request).
//! Requests are protobuf `ResolveRequest`s, replies `ClusterResolveReply`s,
//! so a backend connected to any one node serves clients on every node.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::{Client, RequestErrorKind};
use bytes::Bytes;
use futures_util::{StreamExt, future::join_all};
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    key::Key,
    ops::tasks::Tasks,
    proto::{
        internal::v1::ClusterResolveReply,
        v1::{FetchMode, Reason, ResolveRequest},
    },
    resolving::pool::{
        MAX_ATTEMPTS, ResolveError, ResolveErrorKind, Resolved, ResolverPool, key_result,
        read_key_result,
    },
};

/// Pause before asking again when no node answered (first retry; grows linearly).
const NO_RESPONDERS_RETRY: Duration = Duration::from_millis(50);
/// Most ids one cluster request may carry (nodes send one; anything larger
/// is not from a node and is ignored).
pub(crate) const MAX_CLUSTER_REQUEST_IDS: usize = 64;
/// Cluster requests this node answers at once; beyond it a request is left
/// unanswered and its sender retries (reaching another node, or this one
/// later). Bounds the tasks a flood of requests can start.
pub(crate) const MAX_CLUSTER_ANSWERS_IN_FLIGHT: usize = 1024;
/// Replies go only to inbox subjects (request-reply's reply subjects), so a
/// request cannot make this node publish a resolver's rows anywhere else.
const INBOX_PREFIX: &str = "_INBOX.";

/// The requesting side: how this node reaches resolvers on other nodes.
#[derive(Clone)]
pub(crate) struct ClusterLink {
    client: Client,
    prefix: String,
    timeout: Duration,
}

impl ClusterLink {
    /// Starts answering other nodes' resolves for the entities the local
    /// `pool` serves (until the node shuts down), and returns the link to
    /// theirs. `timeout` bounds each request to another node.
    pub(crate) fn start(
        client: Client,
        prefix: &str,
        timeout: Duration,
        pool: &ResolverPool,
        tasks: &Tasks,
    ) -> Self {
        let link = Self {
            client,
            prefix: prefix.to_string(),
            timeout,
        };
        tasks.spawn(serve(
            link.clone(),
            pool.clone(),
            pool.watch_entities(),
            tasks.clone(),
        ));
        link
    }

    fn subject(&self, entity: &str) -> String {
        format!("{}.resolve.{entity}", self.prefix)
    }

    /// Resolves `key` on another node. Also returns what the answering node
    /// knows of the entity (when it answered). `shared` travels in the
    /// request, and the answering node hands it on to its backend.
    pub(crate) async fn resolve(
        &self,
        key: &Key,
        secret: &str,
        reason: Reason,
        shared: bool,
    ) -> (Resolved, Option<Reported>) {
        let payload: Bytes = ResolveRequest {
            request_id: 0,
            entity: key.entity.to_string(),
            ids: vec![key.id.to_string()],
            secret: secret.to_string(),
            reason: reason as i32,
            shared,
        }
        .encode_to_vec()
        .into();
        let subject = self.subject(&key.entity);
        let mut no_responders = 0;
        for attempt in 1..=MAX_ATTEMPTS {
            let answer = tokio::time::timeout(
                self.timeout,
                self.client.request(subject.clone(), payload.clone()),
            )
            .await;
            let message = match answer {
                Ok(Ok(message)) => message,
                Ok(Err(err)) if err.kind() == RequestErrorKind::NoResponders => {
                    // Nobody serves the entity, or a node that just got its
                    // resolver is still subscribing: look again shortly.
                    no_responders += 1;
                    if attempt < MAX_ATTEMPTS {
                        tokio::time::sleep(NO_RESPONDERS_RETRY * attempt).await;
                    }
                    continue;
                }
                Ok(Err(err)) => {
                    tracing::debug!(%err, attempt, key = %key, "cluster resolve failed");
                    continue;
                }
                Err(_) => {
                    tracing::debug!(attempt, key = %key, "cluster resolve timed out");
                    continue;
                }
            };
            let reply = match ClusterResolveReply::decode(message.payload) {
                Ok(reply) => reply,
                Err(err) => return (Err(ResolveError::BadClusterReply(err)), None),
            };
            let reported = Reported {
                mode: FetchMode::try_from(reply.fetch_mode).ok(),
                refresh_interval_ms: reply.refresh_interval_ms,
            };
            let result = reply
                .results
                .into_iter()
                .find(|r| *r.id == *key.id)
                .map(read_key_result)
                .unwrap_or_else(|| Err(ResolveError::MissingResult(key.id.clone())));
            return (result, Some(reported));
        }
        if no_responders == MAX_ATTEMPTS {
            (Err(ResolveError::NoResolver), None)
        } else {
            (Err(ResolveError::Timeout), None)
        }
    }
}

/// What a node that answered a cluster resolve reported of the entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reported {
    /// Its fetch mode (`None`: a value this node doesn't know).
    pub(crate) mode: Option<FetchMode>,
    /// Its refresh interval in ms (0: none).
    pub(crate) refresh_interval_ms: u32,
}

/// The answering side: serves `{prefix}.resolve.{entity}` for every entity
/// with a local resolver, following the pool's set of entities.
async fn serve(
    link: ClusterLink,
    pool: ResolverPool,
    mut entities: watch::Receiver<Vec<(Arc<str>, FetchMode)>>,
    tasks: Tasks,
) {
    let mut serving: HashMap<Arc<str>, CancellationToken> = HashMap::new();
    loop {
        let current = entities.borrow_and_update().clone();
        serving.retain(|entity, token| {
            let keep = current.iter().any(|(e, _)| e == entity);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (entity, _) in current {
            if serving.contains_key(&entity) {
                continue;
            }
            let token = tasks.token().child_token();
            serving.insert(entity.clone(), token.clone());
            let span = tracing::info_span!("cluster_resolve", entity = %entity);
            tasks.spawn(
                serve_entity(link.clone(), pool.clone(), entity, token, tasks.clone())
                    .instrument(span),
            );
        }
        tokio::select! {
            _ = tasks.cancelled() => return,
            changed = entities.changed() => if changed.is_err() { return },
        }
    }
}

async fn serve_entity(
    link: ClusterLink,
    pool: ResolverPool,
    entity: Arc<str>,
    token: CancellationToken,
    tasks: Tasks,
) {
    let subject = link.subject(&entity);
    let group = format!("{}-resolvers", link.prefix);
    let mut subscriber = match link.client.queue_subscribe(subject.clone(), group).await {
        Ok(subscriber) => subscriber,
        Err(err) => {
            tracing::error!(%err, subject, "cannot serve cluster resolves");
            return;
        }
    };
    tracing::debug!(subject, "serving cluster resolves");
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_CLUSTER_ANSWERS_IN_FLIGHT));
    loop {
        let message = tokio::select! {
            _ = token.cancelled() => break,
            message = subscriber.next() => message,
        };
        let Some(message) = message else { break };
        let Some(reply) = message.reply.clone() else {
            continue;
        };
        if !reply.starts_with(INBOX_PREFIX) {
            tracing::warn!(reply = %reply, "cluster resolve with a reply subject that is not an inbox, ignored");
            continue;
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            tracing::debug!("cluster resolves at capacity; the sender retries");
            continue;
        };
        let (pool, client, entity) = (pool.clone(), link.client.clone(), entity.clone());
        tasks.spawn(
            async move {
                let _permit = permit;
                let request = match ResolveRequest::decode(message.payload) {
                    Ok(request) if request.entity == *entity && request.ids.len() <= MAX_CLUSTER_REQUEST_IDS => request,
                    Ok(request) => {
                        tracing::warn!(entity = %request.entity, ids = request.ids.len(), "cluster resolve for another entity or with too many ids, ignored");
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(%err, "undecodable cluster resolve request");
                        return;
                    }
                };
                if let Some(answer) = answer(&pool, request).await {
                    let _ = client.publish(reply, answer.encode_to_vec().into()).await;
                }
            }
            .in_current_span(),
        );
    }
    let _ = subscriber.unsubscribe().await;
}

/// Resolves a cluster request on local resolvers. `None` when this node no
/// longer serves the entity: the requester then retries, reaching another node.
async fn answer(pool: &ResolverPool, request: ResolveRequest) -> Option<ClusterResolveReply> {
    let mode = pool.fetch_mode(&request.entity)?;
    let reason = Reason::try_from(request.reason).unwrap_or(Reason::Change);
    let shared_reason = matches!(reason, Reason::Change | Reason::Subscribe);
    if request.shared && !(mode == FetchMode::Shared && shared_reason) {
        // `shared` asks the backend for rows meant for everyone, with no
        // secret checked: only a SHARED entity's change resolve, or its
        // snapshot for a subscribe a token authorized, is that. A requester
        // with an outdated mode learns this one from the reply (and retries
        // the change); anything else is not a node's request.
        tracing::warn!(
            entity = %request.entity,
            mode = mode.as_str_name(),
            reason = reason.as_str_name(),
            "cluster resolve asking for shared rows of an entity that is not SHARED, refused"
        );
        let mut refused = refuse_shared(mode, &request.ids);
        refused.refresh_interval_ms = pool.refresh_interval(&request.entity).unwrap_or(0);
        return Some(refused);
    }
    let secret: Arc<str> = Arc::from(request.secret.as_str());
    let keys: Vec<Key> = request
        .ids
        .iter()
        .filter_map(|id| Key::new(&request.entity, id).ok())
        .collect();
    let outcomes = join_all(
        keys.iter()
            .map(|key| pool.resolve(key, secret.clone(), reason, request.shared)),
    )
    .await;
    if outcomes
        .iter()
        .any(|o| matches!(o, Err(ResolveError::NoResolver | ResolveError::Closed)))
    {
        return None;
    }
    let results = keys
        .iter()
        .zip(outcomes)
        .map(|(key, outcome)| {
            // The requester only hears a fixed message for these: the detail stays here.
            if let Err(err) = &outcome
                && matches!(
                    err.kind(),
                    ResolveErrorKind::InvalidAnswer | ResolveErrorKind::Timeout
                )
            {
                tracing::warn!(key = %key, %err, "cluster resolve answered with a failure");
            }
            key_result(outcome, &key.id)
        })
        .collect();
    Some(ClusterResolveReply {
        fetch_mode: mode as i32,
        results,
        refresh_interval_ms: pool.refresh_interval(&request.entity).unwrap_or(0),
    })
}

/// The reply to a request for shared rows that this node does not honour:
/// an ERROR result per id, and the entity's real fetch mode.
fn refuse_shared(mode: FetchMode, ids: &[String]) -> ClusterResolveReply {
    let refused = || {
        Err(ResolveError::Failed(
            "shared rows are only resolved for a change of a SHARED entity".into(),
        ))
    };
    ClusterResolveReply {
        fetch_mode: mode as i32,
        results: ids.iter().map(|id| key_result(refused(), id)).collect(),
        refresh_interval_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::ResolveConfig,
        ops::metrics::Metrics,
        proto::v1::{EntityRegistration, Register, Status, node_message},
        resolving::pool::StreamItem,
    };
    use tokio::sync::mpsc;

    /// A pool with one resolver serving `items` SHARED and `docs`
    /// PER_SUBSCRIBER, and the resolver's end of its stream.
    fn pool() -> (ResolverPool, mpsc::Receiver<StreamItem>) {
        let pool = ResolverPool::new(
            &ResolveConfig {
                batch_size: 64,
                timeout: Duration::from_secs(5),
                default_max_in_flight: 8,
                max_resolver_streams: 4,
                cache_max_bytes: 0,
            },
            Arc::new(Metrics::default()),
        );
        let entity = |entity: &str, mode: FetchMode| EntityRegistration {
            entity: entity.into(),
            fetch_mode: mode as i32,
            refresh_interval_ms: 0,
        };
        let register = Register {
            name: "backend".into(),
            entities: vec![
                entity("items", FetchMode::Shared),
                entity("docs", FetchMode::PerSubscriber),
            ],
            pass_through: false,
            max_in_flight: 8,
        };
        let (tx, rx) = mpsc::channel(pool.channel_capacity(&register));
        pool.register(pool.allocate_id(), &register, tx).unwrap();
        (pool, rx)
    }

    fn request(entity: &str, reason: Reason, shared: bool) -> ResolveRequest {
        ResolveRequest {
            request_id: 0,
            entity: entity.into(),
            ids: vec!["1".into(), "2".into()],
            secret: String::new(),
            reason: reason as i32,
            shared,
        }
    }

    /// `shared` is honoured only for a change or a subscribe of a SHARED
    /// entity: a PER_SUBSCRIBER entity's rows never reach the backend as
    /// shared; the reply is an error per id with the entity's mode, and the
    /// backend is not asked.
    #[tokio::test]
    async fn shared_requests_must_match_the_mode_and_the_reason() {
        let (pool, mut rx) = pool();
        for (entity, reason, mode) in [
            ("docs", Reason::Change, FetchMode::PerSubscriber),
            ("docs", Reason::Subscribe, FetchMode::PerSubscriber),
            ("items", Reason::Unspecified, FetchMode::Shared),
        ] {
            // Refused at once (an honoured request would wait for the backend).
            let reply = tokio::time::timeout(
                Duration::from_secs(1),
                answer(&pool, request(entity, reason, true)),
            )
            .await
            .unwrap_or_else(|_| panic!("{entity} {reason:?}: sent to the backend"))
            .expect("a reply");
            assert_eq!(reply.fetch_mode, mode as i32, "{entity} {reason:?}");
            let statuses: Vec<(String, i32)> = reply
                .results
                .iter()
                .map(|r| (r.id.clone(), r.status))
                .collect();
            assert_eq!(
                statuses,
                [
                    ("1".to_string(), Status::Error as i32),
                    ("2".to_string(), Status::Error as i32)
                ],
                "{entity} {reason:?}"
            );
            assert!(rx.try_recv().is_err(), "{entity} {reason:?}: backend asked");
        }

        // A SHARED change resolve, and a SHARED snapshot for a subscribe a
        // token authorized, go to the backend, `shared` as sent.
        drop((pool, rx));
        for reason in [Reason::Change, Reason::Subscribe] {
            let (fresh, mut rx) = self::pool();
            let asked = tokio::spawn({
                let pool = fresh.clone();
                async move { answer(&pool, request("items", reason, true)).await }
            });
            let sent = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the backend is asked")
                .expect("stream open")
                .expect("a message");
            let Some(node_message::Kind::Request(sent)) = sent.kind else {
                panic!("expected a resolve request, got {sent:?}");
            };
            assert!(sent.shared);
            assert_eq!(sent.reason, reason as i32);
            asked.abort();
        }
    }
}
