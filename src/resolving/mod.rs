//! Where a key is resolved: on the local resolver pool, or, when no local resolver serves its entity, on another node over NATS.
//!
//! [`Resolvers`] is what the dispatcher and the sessions ask; it is the only
//! module that knows both the local pool ([`crate::resolving::pool`]) and the
//! cluster link ([`crate::resolving::cluster`]), and neither of those knows it.

pub(crate) mod cache;
pub(crate) mod cluster;
pub(crate) mod pool;
pub(crate) mod relay;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;

use crate::{
    key::Key,
    ops::metrics::Metrics,
    proto::v1::{FetchMode, Reason},
    resolving::cache::NodeCache,
    resolving::cluster::ClusterLink,
    resolving::pool::ResolverPool,
};

pub(crate) use crate::resolving::pool::{ResolveError, ResolveErrorKind, Resolved, Rows};

/// The `status` label of a resolve's outcome, in metrics and logs.
pub(crate) fn status_label(outcome: &Resolved) -> &'static str {
    match outcome {
        Ok(_) => "ok",
        Err(err) => match err.kind() {
            ResolveErrorKind::NotFound => "not_found",
            ResolveErrorKind::Forbidden => "forbidden",
            ResolveErrorKind::Failed => "error",
            ResolveErrorKind::InvalidAnswer => "invalid",
            ResolveErrorKind::Timeout => "timeout",
            ResolveErrorKind::NoResolver => "no_resolver",
            ResolveErrorKind::Closed => "closed",
        },
    }
}

/// The resolvers a node can reach: a cheap-clone handle.
#[derive(Clone)]
pub(crate) struct Resolvers {
    inner: Arc<Inner>,
}

struct Inner {
    local: ResolverPool,
    /// Resolvers on other nodes (cluster bus only).
    remote: Option<ClusterLink>,
    /// Fetch modes of entities served only on other nodes, as they reported
    /// them. A std `Mutex`: one map update per cluster resolve, never held
    /// across `.await`.
    remote_modes: Mutex<HashMap<Arc<str>, FetchMode>>,
    /// The latest rows of the SHARED keys this node holds.
    cache: NodeCache,
    /// The cluster relay, when on (JetStream, `--cluster-relay`).
    relay: std::sync::OnceLock<relay::Relay>,
    /// Refresh intervals (ms) of entities served only on other nodes, as
    /// they last reported them (see [`Resolvers::refresh_intervals`]).
    remote_refresh: Mutex<HashMap<Arc<str>, u32>>,
    metrics: Arc<Metrics>,
}

impl Resolvers {
    #[cfg(test)]
    pub(crate) fn new(
        local: ResolverPool,
        remote: Option<ClusterLink>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cache_max_bytes = crate::config::ResolveConfig::default().cache_max_bytes;
        Self::with_cache(local, remote, cache_max_bytes, metrics)
    }

    /// With a node cache of at most `cache_max_bytes` (`--cache-max-bytes`).
    pub(crate) fn with_cache(
        local: ResolverPool,
        remote: Option<ClusterLink>,
        cache_max_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                local,
                remote,
                remote_modes: Mutex::new(HashMap::new()),
                cache: NodeCache::new(cache_max_bytes, metrics.clone()),
                relay: std::sync::OnceLock::new(),
                remote_refresh: Mutex::new(HashMap::new()),
                metrics,
            }),
        }
    }

    /// The node cache.
    pub(crate) fn cache(&self) -> &NodeCache {
        &self.inner.cache
    }

    /// Routes SHARED change rows through `relay` (set once, at start).
    pub(crate) fn set_relay(&self, relay: relay::Relay) {
        let _ = self.inner.relay.set(relay);
    }

    /// The cluster relay, when on.
    pub(crate) fn relay(&self) -> Option<&relay::Relay> {
        self.inner.relay.get()
    }

    /// Resolves `key` for `secret` on a local resolver or, when none serves
    /// the entity, on another node. Waits for the answer (or its failure).
    /// `shared`: a SHARED change resolve (empty secret, rows for every
    /// subscriber), carried to the backend as `ResolveRequest.shared`, also
    /// through another node.
    pub(crate) async fn resolve(
        &self,
        key: &Key,
        secret: Arc<str>,
        reason: Reason,
        shared: bool,
    ) -> Resolved {
        let started = std::time::Instant::now();
        let outcome = self
            .resolve_anywhere(key, secret, reason, shared, false)
            .await;
        self.inner
            .metrics
            .resolve_done(&key.entity, status_label(&outcome), started.elapsed());
        outcome
    }

    /// Resolves the snapshot of a subscribe on this node. On a local
    /// resolver it may join a subscribe request of the same key and secret
    /// already in flight (single-flight, see
    /// [`ResolverPool::resolve_subscribe`] for what `may_join` promises);
    /// through another node it is a request of its own.
    pub(crate) async fn resolve_subscribe(
        &self,
        key: &Key,
        secret: Arc<str>,
        may_join: bool,
    ) -> Resolved {
        let started = std::time::Instant::now();
        let outcome = self
            .resolve_anywhere(key, secret, Reason::Subscribe, false, may_join)
            .await;
        self.inner
            .metrics
            .resolve_done(&key.entity, status_label(&outcome), started.elapsed());
        outcome
    }

    /// A change of `key` was seen (before its subscribers are looked at):
    /// subscribe requests sent before it are no longer joined.
    pub(crate) fn note_change(&self, key: &Key) {
        self.inner.local.note_change(key);
    }

    /// The snapshot of a SHARED key for a subscribe a token authorized:
    /// one shared request (empty secret, `shared`), which concurrent token
    /// subscribes of the key join like [`Self::resolve_subscribe`]'s.
    pub(crate) async fn resolve_shared_subscribe(&self, key: &Key, may_join: bool) -> Resolved {
        let started = std::time::Instant::now();
        let outcome = self
            .resolve_anywhere(key, Arc::from(""), Reason::Subscribe, true, may_join)
            .await;
        self.inner
            .metrics
            .resolve_done(&key.entity, status_label(&outcome), started.elapsed());
        outcome
    }

    /// Whether a subscribe of `key` for `secret` (or a shared one) finds a
    /// local subscribe request to join (if it may).
    pub(crate) fn can_join(&self, key: &Key, secret: &str, shared: bool) -> bool {
        self.inner.local.can_join(key, secret, shared)
    }

    /// Changes were lost on the bus: no subscribe request in flight is joined.
    pub(crate) fn note_all_changed(&self) {
        self.inner.local.note_all_changed();
    }

    async fn resolve_anywhere(
        &self,
        key: &Key,
        secret: Arc<str>,
        reason: Reason,
        shared: bool,
        may_join: bool,
    ) -> Resolved {
        let local = if reason == Reason::Subscribe {
            self.inner
                .local
                .resolve_subscribe(key, secret.clone(), shared, may_join)
                .await
        } else {
            self.inner
                .local
                .resolve(key, secret.clone(), reason, shared)
                .await
        };
        let (Err(ResolveError::NoResolver), Some(remote)) = (&local, &self.inner.remote) else {
            return local;
        };
        self.inner.metrics.resolve_request(reason);
        Metrics::inc(&self.inner.metrics.cluster_resolves_total);
        // Boxed: the request-reply future is large, and every resolve future
        // (one per pending subscribe) would otherwise carry its size.
        let (outcome, reported) = Box::pin(remote.resolve(key, &secret, reason, shared)).await;
        if let Some(reported) = reported {
            if let Some(mode) = reported.mode {
                self.learn_remote_mode(&key.entity, mode);
            }
            self.learn_remote_refresh(&key.entity, reported.refresh_interval_ms);
        }
        outcome
    }

    /// Records the fetch mode another node reported for `entity`. A report
    /// never contradicts what this node knows: once any node said
    /// PER_SUBSCRIBER, a later SHARED is refused (a stale or hostile reply
    /// must not make this node fan one secret's rows out to everyone).
    fn learn_remote_mode(&self, entity: &Arc<str>, reported: FetchMode) {
        let reported = match reported {
            FetchMode::Unspecified => FetchMode::PerSubscriber,
            mode => mode,
        };
        let mut modes = self.inner.remote_modes.lock().unwrap();
        match modes.get(entity) {
            None => {
                modes.insert(entity.clone(), reported);
            }
            Some(known) if *known == reported => {}
            Some(FetchMode::PerSubscriber) => {
                tracing::warn!(entity = %entity, "another node reported SHARED for an entity known as PER_SUBSCRIBER; keeping PER_SUBSCRIBER");
            }
            Some(_) => {
                tracing::warn!(entity = %entity, "another node reported PER_SUBSCRIBER for an entity known as SHARED; switching to PER_SUBSCRIBER");
                modes.insert(entity.clone(), FetchMode::PerSubscriber);
            }
        }
    }

    /// The fetch mode of `entity`: a local resolver's, else what another node
    /// reported, else (in a cluster) PER_SUBSCRIBER, the mode that never
    /// shares rows between secrets. `None`: nobody can resolve it.
    pub(crate) fn fetch_mode(&self, entity: &str) -> Option<FetchMode> {
        if let Some(mode) = self.inner.local.fetch_mode(entity) {
            return Some(mode);
        }
        self.inner.remote.as_ref()?;
        let remote = self.inner.remote_modes.lock().unwrap();
        Some(
            remote
                .get(entity)
                .copied()
                .unwrap_or(FetchMode::PerSubscriber),
        )
    }

    /// Records the refresh interval another node reported for `entity` (0:
    /// none). The latest report wins; a value outside the bounds a Register
    /// may ask for is clamped into them, so no reply makes this node refresh
    /// more often than a backend could have asked.
    fn learn_remote_refresh(&self, entity: &Arc<str>, reported_ms: u32) {
        let mut known = self.inner.remote_refresh.lock().unwrap();
        if reported_ms == 0 {
            known.remove(entity);
        } else {
            let ms =
                reported_ms.clamp(pool::MIN_REFRESH_INTERVAL_MS, pool::MAX_REFRESH_INTERVAL_MS);
            known.insert(entity.clone(), ms);
        }
    }

    /// The refresh interval (ms) of every entity that has one: a local
    /// resolver's registration, else what the node that answered this
    /// node's last cluster resolve of the entity reported.
    pub(crate) fn refresh_intervals(&self) -> HashMap<Arc<str>, u32> {
        let local = self.inner.local.refresh_intervals();
        let mut all = self.inner.remote_refresh.lock().unwrap().clone();
        // A local resolver's registration decides for its entities: a
        // local resolver without an interval turns off the remote one.
        let unserved = |entity: &Arc<str>| self.inner.local.fetch_mode(entity).is_none();
        all.retain(|entity, _| unserved(entity));
        all.extend(local);
        all
    }

    /// Forwards a client's pass-through message to local resolvers that
    /// asked for them. Returns how many got it.
    pub(crate) fn pass_through(&self, connection_id: &str, secret: &str, payload: Bytes) -> usize {
        self.inner
            .local
            .pass_through(connection_id, secret, payload)
    }

    /// Whether any local resolver wants pass-through messages.
    pub(crate) fn has_pass_through(&self) -> bool {
        self.inner.local.has_pass_through()
    }

    /// Resolver streams registered on this node, per name.
    pub(crate) fn local_streams_by_name(&self) -> Vec<(Arc<str>, usize)> {
        self.inner.local.streams_by_name()
    }

    /// Resolver streams registered on this node.
    pub(crate) fn local_count(&self) -> usize {
        self.inner.local.resolver_count()
    }
}

impl relay::SharedResolver for Resolvers {
    async fn resolve_shared(&self, key: &Key) -> Resolved {
        self.resolve(key, Arc::from(""), Reason::Change, true).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::ResolveConfig;

    #[tokio::test]
    async fn without_a_cluster_an_unserved_entity_has_no_resolver() {
        let metrics = Arc::new(Metrics::default());
        let pool = ResolverPool::new(
            &ResolveConfig {
                timeout: Duration::from_secs(1),
                ..ResolveConfig::default()
            },
            metrics.clone(),
        );
        let resolvers = Resolvers::new(pool, None, metrics.clone());
        assert_eq!(resolvers.fetch_mode("items"), None);
        let key = Key::new("items", "1").unwrap();
        let outcome = resolvers
            .resolve(&key, Arc::from(""), Reason::Subscribe, false)
            .await;
        assert!(matches!(outcome, Err(ResolveError::NoResolver)));
        assert_eq!(
            metrics
                .cluster_resolves_total
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn a_remote_report_never_turns_per_subscriber_into_shared() {
        let metrics = Arc::new(Metrics::default());
        let pool = ResolverPool::new(&ResolveConfig::default(), metrics.clone());
        let resolvers = Resolvers::new(pool, None, metrics);
        let items: Arc<str> = Arc::from("items");
        resolvers.learn_remote_mode(&items, FetchMode::Unspecified);
        resolvers.learn_remote_mode(&items, FetchMode::Shared);
        let known = |r: &Resolvers| r.inner.remote_modes.lock().unwrap().get("items").copied();
        assert_eq!(known(&resolvers), Some(FetchMode::PerSubscriber));
        let docs: Arc<str> = Arc::from("docs");
        resolvers.learn_remote_mode(&docs, FetchMode::Shared);
        resolvers.learn_remote_mode(&docs, FetchMode::PerSubscriber);
        resolvers.learn_remote_mode(&docs, FetchMode::Shared);
        let docs_mode = resolvers
            .inner
            .remote_modes
            .lock()
            .unwrap()
            .get("docs")
            .copied();
        assert_eq!(docs_mode, Some(FetchMode::PerSubscriber));
    }

    #[test]
    fn remote_refresh_intervals_are_clamped_and_a_local_registration_decides() {
        use crate::proto::v1::{EntityRegistration, Register};
        let metrics = Arc::new(Metrics::default());
        let pool = ResolverPool::new(&ResolveConfig::default(), metrics.clone());
        let resolvers = Resolvers::new(pool.clone(), None, metrics);
        let (items, docs, tags): (Arc<str>, Arc<str>, Arc<str>) =
            (Arc::from("items"), Arc::from("docs"), Arc::from("tags"));
        resolvers.learn_remote_refresh(&items, 10);
        resolvers.learn_remote_refresh(&docs, u32::MAX);
        resolvers.learn_remote_refresh(&tags, 5_000);
        assert_eq!(
            resolvers.refresh_intervals(),
            HashMap::from([
                (items.clone(), pool::MIN_REFRESH_INTERVAL_MS),
                (docs.clone(), pool::MAX_REFRESH_INTERVAL_MS),
                (tags.clone(), 5_000),
            ])
        );
        resolvers.learn_remote_refresh(&tags, 0);
        // A local stream serves items without an interval and docs with one.
        let entity = |entity: &str, ms: u32| EntityRegistration {
            entity: entity.into(),
            fetch_mode: FetchMode::Shared as i32,
            refresh_interval_ms: ms,
        };
        let register = Register {
            name: "local".into(),
            entities: vec![entity("items", 0), entity("docs", 2_000)],
            pass_through: false,
            max_in_flight: 1,
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(pool.channel_capacity(&register));
        pool.register(pool.allocate_id(), &register, tx).unwrap();
        assert_eq!(
            resolvers.refresh_intervals(),
            HashMap::from([(docs, 2_000)])
        );
    }
}
