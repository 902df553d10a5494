//! What every session shares: settings, handles, and the node-wide ping
//! timer and shutdown that reach sessions through their outbox.

use std::sync::Arc;

use crate::{
    config::WsConfig, dispatcher::Dispatcher, dispatcher::registry::Registry,
    ops::metrics::Metrics, ops::tasks::Tasks, resolving::Resolvers,
};

/// Settings and handles every session needs.
pub(crate) struct SessionContext {
    pub(crate) config: WsConfig,
    pub(crate) registry: Registry,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) resolvers: Resolvers,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) tasks: Tasks,
    pub(crate) node_id: Arc<str>,
}

impl SessionContext {
    /// Builds what sessions share from `config`, and starts the node-wide
    /// ping timer (until the node shuts down) and the task that closes every
    /// connection's queue when the node shuts down. Both reach sessions
    /// through their outbox: an idle session waits for nothing else than its
    /// socket and its outbox.
    pub(crate) fn start(
        config: &WsConfig,
        registry: Registry,
        dispatcher: Dispatcher,
        resolvers: Resolvers,
        metrics: Arc<Metrics>,
        node_id: Arc<str>,
        tasks: &Tasks,
    ) -> Arc<Self> {
        let period = config.ping_interval;
        let (ticker, pinged) = (tasks.clone(), registry.clone());
        tasks.spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.tick().await;
            loop {
                tokio::select! {
                    _ = ticker.cancelled() => return,
                    _ = interval.tick() => pinged.for_each_connection(|conn| conn.outbox.ping()),
                }
            }
        });
        // A session opened after this ran sees the token cancelled itself
        // (see `serve`).
        let (shutdown, open) = (tasks.clone(), registry.clone());
        tasks.spawn(async move {
            shutdown.cancelled().await;
            open.for_each_connection(|conn| conn.outbox.shut_down());
        });
        Arc::new(Self {
            config: config.clone(),
            registry,
            dispatcher,
            resolvers,
            metrics,
            tasks: tasks.clone(),
            node_id,
        })
    }
}
