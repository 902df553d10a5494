//! The subscribe flow: a subscription's snapshot resolve, its activation, or its error frame.
//!
//! It shares the dispatcher's state because it must agree with the change
//! flow on versions and missed changes: a snapshot's version is read from the
//! bus before it is resolved, and a change consumed while it was resolving
//! makes the change flow resolve the key again for it.

use std::{borrow::Cow, sync::Arc, sync::atomic::Ordering, time::Duration};

use super::Dispatcher;
use crate::{
    dispatcher::registry::{Activation, Connection},
    key::Key,
    ops::metrics::Metrics,
    ops::trace::ChangeMeta,
    proto::v1::FetchMode,
    resolving::{ResolveError, ResolveErrorKind, Rows, cache::Placed},
    websocket::protocol::{
        ErrorCode, PushFrame, error_frame, subscribed_current_frame, subscribed_frame,
    },
};

/// Longest a subscribe waits for this node's bus consumer to catch up, so
/// that it may join a snapshot resolve of its key already in flight.
const JOIN_WAIT: Duration = Duration::from_millis(20);
/// After such a wait ran out, subscribes do not wait for this long: a
/// consumer that far behind would only add the wait to every subscribe.
const JOIN_WAIT_BACKOFF: Duration = Duration::from_secs(1);

impl Dispatcher {
    /// Whether a subscribe may wait for the bus consumer to join a resolve:
    /// not within [`JOIN_WAIT_BACKOFF`] of a wait that ran out.
    fn may_wait_to_join(&self) -> bool {
        let expired = self.inner.join_wait_expired_ms.load(Ordering::Relaxed);
        expired == 0
            || self.inner.started.elapsed().as_millis() as u64
                >= expired + JOIN_WAIT_BACKOFF.as_millis() as u64
    }

    /// Resolves the snapshot of a subscription that the session has added to
    /// the registry as pending (a subscribe, or the re-check of a held key
    /// after a new secret), with the connection's `secret` of `epoch` as it
    /// was when the session took the message. Then activates it, or ends it
    /// with an error frame; either only while `epoch` is still the
    /// connection's (else a newer re-check decides). Dropping the future
    /// (the connection closed) is fine. `resume`: the version the client
    /// holds; when the key has not changed after it, the subscription
    /// becomes active with `subscribed` `current: true` and no snapshot.
    ///
    /// `by_token`: a valid subscribe token authorized the subscription. For
    /// a SHARED entity no resolver is asked to authorize it then: a version
    /// placed as current needs nothing, a current node cache entry is the
    /// snapshot, else one shared resolve (empty secret) that concurrent
    /// token subscribes of the key join. A PER_SUBSCRIBER entity's rows
    /// depend on the secret: resolved with it as for any subscribe.
    pub(crate) async fn subscribe(
        &self,
        conn: Arc<Connection>,
        key: Key,
        secret: Arc<str>,
        epoch: u64,
        resume: Option<u64>,
        by_token: bool,
    ) {
        let superseded = conn.clone();
        tokio::select! {
            // Checked first: a re-check a newer secret made moot does no
            // work at all, not even a read of the bus head.
            biased;
            () = superseded.superseded(epoch) => {}
            () = self.snapshot(conn, key, secret, epoch, resume, by_token) => {}
        }
    }

    /// [`Self::subscribe`] while `epoch` is current: waits for one of the
    /// node's `--max-snapshot-resolves` (in order of arrival, so a
    /// connection with many keys cannot starve others), then resolves.
    async fn snapshot(
        &self,
        conn: Arc<Connection>,
        key: Key,
        secret: Arc<str>,
        epoch: u64,
        resume: Option<u64>,
        by_token: bool,
    ) {
        let Ok(_permit) = self.inner.snapshot_permits.acquire().await else {
            return;
        };
        // A token subscribe of a SHARED entity needs no resolver to
        // authorize it. An entity no resolver here serves and no other node
        // reported yet is asked for shared: a node serving it as
        // PER_SUBSCRIBER refuses that (and says so), and the secret's
        // resolve follows.
        let resolvers = &self.inner.resolvers;
        let shared = by_token
            && match resolvers.known_fetch_mode(&key.entity) {
                Some(mode) => mode == FetchMode::Shared,
                None => resolvers.has_cluster(),
            };
        // Read before resolving: the snapshot reflects every change up to it.
        let base = self.inner.bus.snapshot_version().await.max(self.applied());
        // Joining a snapshot resolve already in flight for this key and
        // secret is right only if every change up to `base` has been
        // scheduled (and so has stopped joins of requests sent before it);
        // later changes are this subscription's missed ones, which the
        // registry notes.
        let mut may_join = self.applied() >= base;
        // A shared request carries no secret.
        let join_secret = if shared { "" } else { &*secret };
        if !may_join && self.may_wait_to_join() && resolvers.can_join(&key, join_secret, shared) {
            // A resolve of this key and secret is in flight: worth waiting
            // a moment for this node to consume the changes up to `base`
            // (it is usually a few milliseconds behind the bus's head), not
            // longer than a resolve of its own would take.
            let mut applied = self.inner.applied_watch.subscribe();
            let caught_up = applied.wait_for(|applied| *applied >= base);
            may_join = matches!(tokio::time::timeout(JOIN_WAIT, caught_up).await, Ok(Ok(_)));
            if !may_join {
                let now = self.inner.started.elapsed().as_millis() as u64;
                self.inner
                    .join_wait_expired_ms
                    .store(now.max(1), Ordering::Relaxed);
            }
        }
        // Authorized as any subscribe (the resolve with the secret); a
        // resume's version is placed meanwhile. The compatibility mode has
        // no `subscribed` frame to say `current` with.
        let resume = resume.filter(|_| !self.inner.bare_rows);
        if shared
            && self
                .answer_from_node_state(&conn, &key, epoch, resume, base)
                .await
        {
            return;
        }
        let resolving = async {
            if !shared {
                return resolvers.resolve_subscribe(&key, secret, may_join).await;
            }
            let outcome = resolvers.resolve_shared_subscribe(&key, may_join).await;
            if outcome.is_err()
                && resolvers.known_fetch_mode(&key.entity) == Some(FetchMode::PerSubscriber)
            {
                // Asked for shared before the mode was known: the rows
                // depend on the secret after all.
                return resolvers.resolve_subscribe(&key, secret, may_join).await;
            }
            outcome
        };
        let (result, unchanged) = match resume {
            // Placed already (not current) by `answer_from_node_state`.
            Some(_) if shared => (resolving.await, false),
            None => (resolving.await, false),
            Some(held) => tokio::join!(resolving, self.unchanged_since(&key, held, base)),
        };
        let err = match result {
            Ok(Rows { rows, version }) => {
                let answered = version;
                let version = if answered != 0 { answered } else { base };
                let frame = PushFrame::build(&key, version, &rows, self.inner.bare_rows);
                if self.inner.resolvers.fetch_mode(&key.entity) == Some(FetchMode::Shared) {
                    self.inner
                        .resolvers
                        .cache()
                        .store(&key, &frame, answered == 0, self.applied());
                    if let Some(relay) = self.inner.resolvers.relay() {
                        relay.hold(&key);
                    }
                }
                // A resolver that sets versions says itself whether the
                // client's is still the latest.
                let current = resume.filter(|&held| {
                    if answered != 0 {
                        held == answered
                    } else {
                        unchanged
                    }
                });
                let metrics = &self.inner.metrics;
                let activation = match current {
                    Some(held) => {
                        Metrics::inc(&metrics.resumed_current_total);
                        self.inner.registry.activate_held(
                            &key,
                            conn.id,
                            epoch,
                            subscribed_current_frame(&key),
                            held,
                        )
                    }
                    None => {
                        if resume.is_some() {
                            Metrics::inc(&metrics.resumed_snapshot_total);
                        }
                        let ack = (!self.inner.bare_rows).then(|| subscribed_frame(&key));
                        self.inner
                            .registry
                            .activate(&key, conn.id, epoch, ack, &frame)
                    }
                };
                if activation == (Activation::Active { missed: true }) {
                    // A change came in while the snapshot was being resolved;
                    // the snapshot may predate it. Resolved here: the relay
                    // may have found no holder of the key then.
                    self.schedule_as(key, self.applied(), ChangeMeta::default(), true);
                }
                return;
            }
            Err(err) => err,
        };
        let (code, message) = subscribe_error(&key, &err);
        let error = error_frame(code, &message, Some(&key));
        if self.inner.registry.reject(&key, &conn, epoch, error) {
            self.inner.metrics.client_error(code);
        }
    }
}

impl Dispatcher {
    /// A token subscribe of a SHARED key answered from what the node holds,
    /// with no resolve: a version placed as current (`subscribed` `current`),
    /// or the node cache's current entry as the snapshot. False when
    /// neither can answer (the caller resolves).
    async fn answer_from_node_state(
        &self,
        conn: &Connection,
        key: &Key,
        epoch: u64,
        resume: Option<u64>,
        base: u64,
    ) -> bool {
        let metrics = &self.inner.metrics;
        let activation = if let Some(held) = resume
            && self.unchanged_since(key, held, base).await
        {
            Metrics::inc(&metrics.resumed_current_total);
            self.inner.registry.activate_held(
                key,
                conn.id,
                epoch,
                subscribed_current_frame(key),
                held,
            )
        } else {
            // The newest rows this node has seen of the key: changes it has
            // not consumed yet reach the subscription as pushes once it is
            // active, and one consumed while it is pending makes the change
            // flow resolve it again (`missed`). So, unlike a version to
            // place, the snapshot needs no catching up to `base`.
            let Some(frame) = self.inner.resolvers.cache().current(key) else {
                return false;
            };
            if resume.is_some() {
                Metrics::inc(&metrics.resumed_snapshot_total);
            }
            let ack = (!self.inner.bare_rows).then(|| subscribed_frame(key));
            self.inner
                .registry
                .activate(key, conn.id, epoch, ack, &frame)
        };
        if let Some(relay) = self.inner.resolvers.relay() {
            relay.hold(key);
        }
        if activation == (Activation::Active { missed: true }) {
            self.schedule_as(key.clone(), self.applied(), ChangeMeta::default(), true);
        }
        true
    }

    /// Whether `key` has not changed after `held`, a version a resuming
    /// client holds, up to `base`, the bus head read for this subscribe. The
    /// node cache answers when this node is caught up to `base`; else the
    /// bus. A version above `base` (no node has pushed it yet) or one the bus
    /// cannot place is not current.
    async fn unchanged_since(&self, key: &Key, held: u64, base: u64) -> bool {
        if held > base {
            return false;
        }
        let caught_up = self.applied() >= base;
        if self.inner.resolvers.cache().place(key, held, caught_up) == Placed::Current {
            return true;
        }
        self.inner.bus.last_change(key).await.unchanged_since(held)
    }
}

/// The code and message of the error frame for a subscribe whose snapshot
/// resolve failed. Only a resolver's own message reaches the client; every
/// other failure gets a fixed message here, and its detail goes to the log.
pub(crate) fn subscribe_error<'a>(key: &Key, err: &'a ResolveError) -> (ErrorCode, Cow<'a, str>) {
    let own = |default: &'static str| Cow::Borrowed(err.resolver_message().unwrap_or(default));
    match err.kind() {
        ResolveErrorKind::NotFound => (ErrorCode::NotFound, own("no such key")),
        ResolveErrorKind::Forbidden => (ErrorCode::Forbidden, own("access denied")),
        ResolveErrorKind::Failed => (ErrorCode::ResolverError, own("the resolver failed")),
        ResolveErrorKind::InvalidAnswer => {
            tracing::warn!(key = %key, %err, "snapshot resolve failed");
            (
                ErrorCode::ResolverError,
                "the resolver sent an invalid answer".into(),
            )
        }
        ResolveErrorKind::Timeout => {
            tracing::info!(key = %key, %err, "snapshot resolve failed");
            (
                ErrorCode::ResolverTimeout,
                "no resolver answered in time".into(),
            )
        }
        ResolveErrorKind::NoResolver => {
            tracing::debug!(key = %key, %err, "snapshot resolve failed");
            (
                ErrorCode::NoResolver,
                format!("no resolver serves entity {:?}", &*key.entity).into(),
            )
        }
        ResolveErrorKind::Closed => (ErrorCode::NoResolver, "the node is shutting down".into()),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::{proto::internal::v1::ClusterResolveReply, websocket::protocol::RowError};

    fn key() -> Key {
        Key::new("items", "1").unwrap()
    }

    #[test]
    fn internal_failures_get_a_fixed_client_message() {
        let not_json = serde_json::from_slice::<serde_json::Value>(b"{oops").unwrap_err();
        let internal = [
            (
                ResolveError::InvalidRow(RowError::NotJson(Arc::new(not_json))),
                ErrorCode::ResolverError,
                "the resolver sent an invalid answer",
            ),
            (
                ResolveError::UnknownStatus(42),
                ErrorCode::ResolverError,
                "the resolver sent an invalid answer",
            ),
            (
                ResolveError::MissingResult(Arc::from("1")),
                ErrorCode::ResolverError,
                "the resolver sent an invalid answer",
            ),
            (
                ResolveError::BadClusterReply(
                    ClusterResolveReply::decode(&b"\xff\xff"[..]).unwrap_err(),
                ),
                ErrorCode::ResolverError,
                "the resolver sent an invalid answer",
            ),
            (
                ResolveError::Timeout,
                ErrorCode::ResolverTimeout,
                "no resolver answered in time",
            ),
            (
                ResolveError::NoResolver,
                ErrorCode::NoResolver,
                "no resolver serves entity \"items\"",
            ),
            (
                ResolveError::Closed,
                ErrorCode::NoResolver,
                "the node is shutting down",
            ),
        ];
        for (err, code, message) in internal {
            let (got_code, got_message) = subscribe_error(&key(), &err);
            assert_eq!((got_code, &*got_message), (code, message), "{err:?}");
        }
    }

    #[test]
    fn a_resolvers_own_message_reaches_the_client() {
        let cases = [
            (
                ResolveError::NotFound("gone".into()),
                ErrorCode::NotFound,
                "gone",
            ),
            (
                ResolveError::NotFound(String::new()),
                ErrorCode::NotFound,
                "no such key",
            ),
            (
                ResolveError::Forbidden("not yours".into()),
                ErrorCode::Forbidden,
                "not yours",
            ),
            (
                ResolveError::Forbidden(String::new()),
                ErrorCode::Forbidden,
                "access denied",
            ),
            (
                ResolveError::Failed("db down".into()),
                ErrorCode::ResolverError,
                "db down",
            ),
            (
                ResolveError::Failed(String::new()),
                ErrorCode::ResolverError,
                "the resolver failed",
            ),
        ];
        for (err, code, message) in cases {
            let (got_code, got_message) = subscribe_error(&key(), &err);
            assert_eq!((got_code, &*got_message), (code, message), "{err:?}");
        }
    }
}
