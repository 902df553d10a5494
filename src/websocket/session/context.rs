//! What every session shares: settings, handles, and the node-wide ping
//! timer and shutdown that reach sessions through their outbox.

use std::sync::Arc;

use crate::{
    config::WsConfig,
    dispatcher::Dispatcher,
    dispatcher::registry::Registry,
    ops::metrics::Metrics,
    ops::tasks::Tasks,
    resolving::Resolvers,
    websocket::{grants::Grants, tokens::SubscribeTokens},
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
    /// Verifies subscribe tokens (`--subscribe-token-jwks`), if configured.
    pub(crate) tokens: Option<SubscribeTokens>,
    /// Subscriptions held on a token, ended when it expires.
    pub(crate) grants: Grants,
}

impl SessionContext {
    /// Builds what sessions share from `config`, and starts the node-wide
    /// ping timer (until the node shuts down) and the task that closes every
    /// connection's queue when the node shuts down. Both reach sessions
    /// through their outbox: an idle session waits for nothing else than its
    /// socket and its outbox.
    pub(crate) fn start(
        config: &WsConfig,
        dispatcher: Dispatcher,
        metrics: Arc<Metrics>,
        node_id: Arc<str>,
        tokens: Option<SubscribeTokens>,
        tasks: &Tasks,
    ) -> Arc<Self> {
        let registry = dispatcher.registry().clone();
        let resolvers = dispatcher.resolvers().clone();
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
        let grants = Grants::start(
            registry.clone(),
            metrics.clone(),
            config.max_subscriptions,
            tasks,
        );
        Arc::new(Self {
            config: config.clone(),
            tokens,
            grants,
            registry,
            dispatcher,
            resolvers,
            metrics,
            tasks: tasks.clone(),
            node_id,
        })
    }
}
