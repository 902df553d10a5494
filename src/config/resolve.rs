//! The `Resolve` section: resolve requests to backend resolvers.

use std::time::Duration;

use clap::Args;

use crate::config::values::{defaults, parse_duration};

/// Resolve requests to backend resolvers: deadlines, batching, in-flight caps.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Resolve")]
pub struct ResolveConfig {
    /// Deadline of one resolve request; then it is retried on another resolver.
    #[arg(id = "resolve_timeout", value_name = "RESOLVE_TIMEOUT", long = "resolve-timeout", env = "ENTITY_SYNC_RESOLVE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Most ids batched into one resolve request.
    #[arg(
        id = "resolve_batch_size",
        value_name = "RESOLVE_BATCH_SIZE",
        long = "resolve-batch-size",
        env = "ENTITY_SYNC_RESOLVE_BATCH_SIZE",
        default_value_t = 64
    )]
    pub batch_size: usize,

    /// Requests in flight per resolver stream when its `Register` says 0.
    #[arg(long, env = "ENTITY_SYNC_DEFAULT_MAX_IN_FLIGHT", default_value_t = 32)]
    pub default_max_in_flight: u32,

    /// Most `Resolve` streams one node holds; a `Register` beyond it is
    /// refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "ENTITY_SYNC_MAX_RESOLVER_STREAMS", default_value_t = 1024)]
    pub max_resolver_streams: usize,

    /// Bound of the node cache, the latest rows and version of each SHARED
    /// key with subscribers on this node (least recently used keys leave
    /// first). It places resumed subscribes' versions without a bus request.
    /// 0 turns it off.
    #[arg(long, env = "ENTITY_SYNC_CACHE_MAX_BYTES", default_value_t = 64 << 20)]
    pub cache_max_bytes: usize,
}

impl Default for ResolveConfig {
    fn default() -> Self {
        defaults()
    }
}
