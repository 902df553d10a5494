//! The service's state: what each call of `entitysync.v1.EntitySync` uses.

use std::sync::Arc;

use tonic::{Request, Status};

use crate::{
    bus::Bus,
    config::GrpcConfig,
    grpc::{
        auth::{Auth, Granted, Role},
        gate,
        quota::StreamQuotas,
    },
    ops::{metrics::Metrics, tasks::Tasks},
    resolving::pool::ResolverPool,
};

/// The service implementation; one per node. Backends' `Resolve` streams
/// register in the local resolver pool.
pub(crate) struct EntitySyncService {
    pub(super) config: GrpcConfig,
    pub(super) auth: Auth,
    pub(super) quotas: StreamQuotas,
    pub(super) bus: Bus,
    pub(super) pool: ResolverPool,
    pub(super) metrics: Arc<Metrics>,
    pub(super) node_id: Arc<str>,
    pub(super) tasks: Tasks,
}

impl EntitySyncService {
    pub(crate) fn new(
        config: &GrpcConfig,
        auth: Auth,
        bus: Bus,
        pool: ResolverPool,
        metrics: Arc<Metrics>,
        node_id: Arc<str>,
        tasks: &Tasks,
    ) -> Self {
        Self {
            config: config.clone(),
            quotas: StreamQuotas::new(config.max_resolver_streams_per_credential),
            auth,
            bus,
            pool,
            metrics,
            node_id,
            tasks: tasks.clone(),
        }
    }
}

impl EntitySyncService {
    /// The credential the gate checked for this call, or (a call that did
    /// not pass the gate) the check made now.
    pub(super) fn granted<T>(&self, request: &Request<T>, role: Role) -> Result<Granted, Status> {
        match request.extensions().get::<gate::Checked>() {
            Some(gate::Checked(granted)) => Ok(granted.clone()),
            None => self.auth.check(request.metadata(), role),
        }
    }
}
