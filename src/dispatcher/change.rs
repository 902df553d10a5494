//! The change flow of one key: its change resolve (per secret, or once for
//! everyone), retried with backoff while the key has subscribers, and the
//! outcome applied: a push fanned out, a revocation, or a retry.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use entity_sync_backend::Backoff;
use futures_util::future::join_all;

use super::Dispatcher;
use crate::{
    dispatcher::registry::Audience,
    key::Key,
    ops::metrics::Metrics,
    ops::trace::ChangeMeta,
    proto::v1::{FetchMode, Reason},
    resolving::{ResolveErrorKind, Resolved, Rows, relay::Waited},
    websocket::protocol::{ErrorCode, PushFrame, error_frame},
};

/// First retry delay of a failed change resolve (jittered, see
/// [`Backoff`]); doubles up to [`RETRY_MAX`].
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// How a resolve attempt ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Attempt {
    Done,
    Retry,
}

impl Dispatcher {
    /// `local`: resolve here even when the cluster relay is on (the key's
    /// rows subscription may have started after this change was relayed).
    pub(super) async fn resolve_loop(
        &self,
        key: Key,
        mut version: u64,
        mut meta: ChangeMeta,
        mut local: bool,
    ) {
        let mut failures: u32 = 0;
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
        loop {
            if self.inner.tasks.is_cancelled() {
                self.land(&key);
                return;
            }
            let attempt = self.resolve_change(&key, version, meta, local).await;
            local = false;
            if attempt == Attempt::Retry {
                failures += 1;
                if !self.inner.registry.has_active(&key) {
                    self.land(&key);
                    return;
                }
                Metrics::inc(&self.inner.metrics.resolve_retries_total);
                let delay = backoff.next_delay();
                tracing::debug!(failures, ?delay, "change resolve failed, retrying");
                tokio::select! {
                    _ = self.inner.tasks.cancelled() => {
                        self.land(&key);
                        return;
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                if let Some((pending, pending_meta)) = self.take_pending(&key)
                    && pending >= version
                {
                    (version, meta) = (pending, pending_meta);
                }
                continue;
            }
            failures = 0;
            backoff.reset();
            // Done: run once more if changes came in meanwhile, else land.
            let mut flights = self.inner.flights.lock().unwrap();
            match flights.get_mut(&key).and_then(|f| f.pending.take()) {
                Some((pending, pending_meta)) => (version, meta) = (pending, pending_meta),
                None => {
                    flights.remove(&key);
                    return;
                }
            }
        }
    }

    fn take_pending(&self, key: &Key) -> Option<(u64, ChangeMeta)> {
        let mut flights = self.inner.flights.lock().unwrap();
        flights.get_mut(key).and_then(|f| f.pending.take())
    }

    fn land(&self, key: &Key) {
        self.inner.flights.lock().unwrap().remove(key);
    }

    async fn resolve_change(
        &self,
        key: &Key,
        version: u64,
        meta: ChangeMeta,
        local: bool,
    ) -> Attempt {
        let Some(mode) = self.inner.resolvers.fetch_mode(&key.entity) else {
            return Attempt::Retry;
        };
        match mode {
            FetchMode::Shared => {
                if let Some(relay) = self.inner.resolvers.relay() {
                    relay.hold(key);
                    if !local {
                        if relay.wait(key, version, meta).await == Waited::Arrived {
                            // Pushed when it came; again for subscribers
                            // that were pending then (the others skip it).
                            if let Some(frame) = relay.latest(key) {
                                let fan = self.inner.registry.catch_up(key, &frame, Audience::All);
                                self.inner
                                    .metrics
                                    .pushes_total
                                    .fetch_add(fan.delivered as u64, Ordering::Relaxed);
                            }
                            return Attempt::Done;
                        }
                        Metrics::inc(&self.inner.metrics.relay_fallbacks_total);
                        tracing::debug!(key = %key, version, "relayed rows did not come; resolving here");
                    }
                }
                let result = self
                    .inner
                    .resolvers
                    .resolve(key, Arc::from(""), Reason::Change, true)
                    .await;
                self.apply(key, version, meta, result, Audience::All).0
            }
            _ => {
                let secrets = self.inner.registry.active_secrets(key);
                let results = join_all(secrets.iter().map(|secret| {
                    self.inner
                        .resolvers
                        .resolve(key, secret.clone(), Reason::Change, false)
                }))
                .await;
                let mut attempt = Attempt::Done;
                for (secret, result) in secrets.iter().zip(results) {
                    if self
                        .apply(key, version, meta, result, Audience::Secret(secret))
                        .0
                        == Attempt::Retry
                    {
                        attempt = Attempt::Retry;
                    }
                }
                attempt
            }
        }
    }

    /// Applies a change resolve's outcome; returns the push it fanned out, if any.
    pub(super) fn apply(
        &self,
        key: &Key,
        version: u64,
        meta: ChangeMeta,
        result: Resolved,
        audience: Audience<'_>,
    ) -> (Attempt, Option<PushFrame>) {
        tracing::debug!(
            key = %key,
            version,
            trace_id = %meta.trace,
            status = crate::resolving::status_label(&result),
            "change resolved"
        );
        let err = match result {
            Ok(Rows {
                rows,
                version: answered,
            }) => {
                let version = if answered != 0 { answered } else { version };
                let frame = PushFrame::build(key, version, &rows, self.inner.bare_rows);
                if matches!(audience, Audience::All) {
                    // SHARED: these rows are every subscriber's.
                    self.inner
                        .resolvers
                        .cache()
                        .store(key, &frame, answered == 0, self.applied());
                }
                self.fan_out(key, &frame, audience, meta);
                return (Attempt::Done, Some(frame));
            }
            Err(err) => err,
        };
        match err.kind() {
            // The row is gone: subscribers learn it from an empty push and
            // stay subscribed in case it comes back.
            ResolveErrorKind::NotFound => {
                let frame = PushFrame::build(key, version, &[], self.inner.bare_rows);
                self.fan_out(key, &frame, audience, meta);
                (Attempt::Done, Some(frame))
            }
            ResolveErrorKind::Forbidden => {
                let message = err
                    .resolver_message()
                    .unwrap_or("access to this key was revoked");
                let error = error_frame(ErrorCode::Forbidden, message, Some(key));
                let revoked = self.inner.registry.revoke(key, audience, &error);
                let metrics = &self.inner.metrics;
                metrics
                    .revocations_total
                    .fetch_add(revoked as u64, Ordering::Relaxed);
                metrics.client_errors[ErrorCode::Forbidden.index()]
                    .fetch_add(revoked as u64, Ordering::Relaxed);
                tracing::info!(key = %key, revoked, trace_id = %meta.trace, "subscriptions revoked by resolver");
                (Attempt::Done, None)
            }
            ResolveErrorKind::Failed | ResolveErrorKind::InvalidAnswer => {
                tracing::warn!(key = %key, %err, trace_id = %meta.trace, "change resolve failed");
                (Attempt::Retry, None)
            }
            ResolveErrorKind::Timeout | ResolveErrorKind::NoResolver => (Attempt::Retry, None),
            ResolveErrorKind::Closed => (Attempt::Done, None),
        }
    }

    fn fan_out(&self, key: &Key, frame: &PushFrame, audience: Audience<'_>, meta: ChangeMeta) {
        let fan = self.inner.registry.fan_out(key, frame, audience);
        let metrics = &self.inner.metrics;
        // Once per fan-out, not per subscriber.
        if fan.delivered > 0
            && let Some(took) = meta.since_notified()
        {
            metrics.notify_to_push(took);
        }
        tracing::debug!(
            key = %key,
            version = frame.version,
            delivered = fan.delivered,
            trace_id = %meta.trace,
            "pushed"
        );
        if fan.replaced > 0 {
            metrics
                .outbox_replaced_total
                .fetch_add(fan.replaced as u64, Ordering::Relaxed);
        }
        metrics
            .pushes_total
            .fetch_add(fan.delivered as u64, Ordering::Relaxed);
        metrics.push_bytes_total.fetch_add(
            (fan.delivered * frame.payload.len()) as u64,
            Ordering::Relaxed,
        );
        metrics
            .pushes_skipped_stale_total
            .fetch_add(fan.stale as u64, Ordering::Relaxed);
        if fan.unchanged > 0 {
            metrics
                .pushes_skipped_unchanged_total
                .fetch_add(fan.unchanged as u64, Ordering::Relaxed);
        }
        // A connection this closed as too slow is counted by its session,
        // which sees every such close, whatever frame overflowed the queue.
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, atomic::Ordering::Relaxed};

    use bytes::Bytes;

    use crate::{
        dispatcher::{
            registry::{Audience, Connection},
            tests::in_memory_dispatcher,
        },
        key::Key,
        ops::trace::{ChangeMeta, TraceId},
        websocket::{outbox::CloseReason, protocol::PushFrame},
    };

    fn key() -> Key {
        Key::new("items", "1").unwrap()
    }

    #[tokio::test]
    async fn a_push_that_replaces_an_unwritten_one_is_counted_and_timed() {
        let (metrics, tasks, registry, dispatcher) = in_memory_dispatcher().await;
        let conn = Arc::new(Connection::new(1, 1 << 20));
        registry.add_pending(&key(), &conn, 10);
        registry.activate(
            &key(),
            conn.id,
            0,
            None,
            &PushFrame::build(&key(), 1, &[], false),
        );
        // The snapshot is written; what follows waits unwritten.
        assert!(conn.outbox.take_queued(&mut Vec::new()).is_ok());
        let meta = ChangeMeta::accepted_now(TraceId::generate());
        for version in [2, 3, 4] {
            // Rows that change: unchanged rows would not be sent.
            let rows = [Bytes::from(version.to_string())];
            dispatcher.fan_out(
                &key(),
                &PushFrame::build(&key(), version, &rows, false),
                Audience::All,
                meta,
            );
        }
        // 3 replaces 2, 4 replaces 3.
        assert_eq!(metrics.outbox_replaced_total.load(Relaxed), 2);
        assert_eq!(metrics.pushes_total.load(Relaxed), 3);
        let text = metrics.render(crate::ops::metrics::Live::default());
        assert!(
            text.contains("entity_sync_notify_to_push_seconds_count 3\n"),
            "{text}"
        );
        // A change without an accept time (a resync) is not timed.
        dispatcher.fan_out(
            &key(),
            &PushFrame::build(&key(), 5, &[Bytes::from_static(b"5")], false),
            Audience::All,
            ChangeMeta::default(),
        );
        let text = metrics.render(crate::ops::metrics::Live::default());
        assert!(
            text.contains("entity_sync_notify_to_push_seconds_count 3\n"),
            "{text}"
        );
        tasks.token().cancel();
    }

    #[tokio::test]
    async fn a_fan_out_overflow_is_left_to_the_session_to_count() {
        let (metrics, tasks, registry, dispatcher) = in_memory_dispatcher().await;
        let conn = Arc::new(Connection::new(1, 1024));
        registry.add_pending(&key(), &conn, 10);
        registry.activate(
            &key(),
            conn.id,
            0,
            None,
            &PushFrame::build(&key(), 1, &[], false),
        );
        let big = Bytes::from(format!("\"{}\"", "x".repeat(2048)));
        dispatcher.fan_out(
            &key(),
            &PushFrame::build(&key(), 2, &[big], false),
            Audience::All,
            ChangeMeta::default(),
        );
        assert_eq!(
            conn.outbox.take_queued(&mut Vec::new()),
            Err(CloseReason::Overflow)
        );
        assert_eq!(metrics.slow_client_closes_total.load(Relaxed), 0);
        assert_eq!(metrics.pushes_total.load(Relaxed), 0);
        tasks.token().cancel();
    }
}
