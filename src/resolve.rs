//! Where a key is resolved: on the local resolver pool, or, when no local resolver serves its entity, on another node over NATS.
//!
//! [`Resolvers`] is what the dispatcher and the sessions ask; it is the only
//! module that knows both the local pool ([`crate::resolver`]) and the
//! cluster link ([`crate::cluster`]), and neither of those knows it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;

use crate::{
    cluster::ClusterLink,
    key::ChangeKey,
    metrics::Metrics,
    proto::v1::{FetchMode, Reason},
    resolver::ResolverPool,
};

pub(crate) use crate::resolver::{ResolveError, ResolveErrorKind, Resolved, Rows};

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
    metrics: Arc<Metrics>,
}

impl Resolvers {
    pub(crate) fn new(
        local: ResolverPool,
        remote: Option<ClusterLink>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                local,
                remote,
                remote_modes: Mutex::new(HashMap::new()),
                metrics,
            }),
        }
    }

    /// Resolves `key` for `secret` on a local resolver or, when none serves
    /// the entity, on another node. Waits for the answer (or its failure).
    /// `shared`: a SHARED change resolve (empty secret, rows for every
    /// subscriber), carried to the backend as `ResolveRequest.shared`, also
    /// through another node.
    pub(crate) async fn resolve(
        &self,
        key: &ChangeKey,
        secret: Arc<str>,
        reason: Reason,
        shared: bool,
    ) -> Resolved {
        let local = self
            .inner
            .local
            .resolve(key, secret.clone(), reason, shared)
            .await;
        let (Err(ResolveError::NoResolver), Some(remote)) = (&local, &self.inner.remote) else {
            return local;
        };
        self.inner.metrics.resolve_request(reason);
        Metrics::inc(&self.inner.metrics.cluster_resolves_total);
        // Boxed: the request-reply future is large, and every resolve future
        // (one per pending subscribe) would otherwise carry its size.
        let (outcome, mode) = Box::pin(remote.resolve(key, &secret, reason, shared)).await;
        if let Some(mode) = mode {
            let mode = if mode == FetchMode::Unspecified {
                FetchMode::PerSubscriber
            } else {
                mode
            };
            self.inner
                .remote_modes
                .lock()
                .unwrap()
                .insert(key.entity.clone(), mode);
        }
        outcome
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

    /// Resolver streams registered on this node.
    pub(crate) fn local_count(&self) -> usize {
        self.inner.local.resolver_count()
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
        let key = ChangeKey::new("items", "1").unwrap();
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
}
