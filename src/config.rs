//! Node configuration: command-line flags, each with an `ENTITY_SYNC_*` environment variable.

use std::{net::SocketAddr, time::Duration};

use clap::Args;

/// Everything a node needs to run. Every field has a flag and an
/// environment variable of the same name (`--ws-addr` ↔ `ENTITY_SYNC_WS_ADDR`);
/// [`Config::default`] gives the documented defaults.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Websocket + HTTP listen address.
    #[arg(long, env = "ENTITY_SYNC_WS_ADDR", default_value = "0.0.0.0:8080")]
    pub ws_addr: SocketAddr,

    /// Websocket path.
    #[arg(long, env = "ENTITY_SYNC_WS_PATH", default_value = "/ws/entity-sync/", value_parser = parse_ws_path)]
    pub ws_path: String,

    /// gRPC listen address.
    #[arg(long, env = "ENTITY_SYNC_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,

    /// NATS server URL(s), comma-separated. Unset: the in-process bus (single node).
    #[arg(long, env = "ENTITY_SYNC_NATS_URL")]
    pub nats_url: Option<String>,

    /// Prefix of NATS subjects and of the stream name.
    #[arg(long, env = "ENTITY_SYNC_NATS_PREFIX", default_value = "es")]
    pub nats_prefix: String,

    /// Replicas of the JetStream stream when the node creates it.
    #[arg(long, env = "ENTITY_SYNC_NATS_REPLICAS", default_value_t = 1)]
    pub nats_replicas: usize,

    /// How long the stream keeps change keys when the node creates it. A node
    /// away for longer than this resyncs (re-resolves every subscribed key).
    #[arg(long, env = "ENTITY_SYNC_NATS_MAX_AGE", default_value = "24h", value_parser = parse_duration)]
    pub nats_max_age: Duration,

    /// Bytes the stream may hold when the node creates it (-1: no limit).
    #[arg(long, env = "ENTITY_SYNC_NATS_MAX_BYTES", default_value_t = 1 << 30, allow_negative_numbers = true)]
    pub nats_max_bytes: i64,

    /// NATS credentials file (JWT + nkey seed).
    #[arg(long, env = "ENTITY_SYNC_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,

    /// NATS auth token.
    #[arg(long, env = "ENTITY_SYNC_NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,

    /// CA certificate (PEM) to verify the NATS server with.
    #[arg(long, env = "ENTITY_SYNC_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,

    /// Client certificate (PEM) for NATS mutual TLS (with --nats-tls-key).
    #[arg(long, env = "ENTITY_SYNC_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<std::path::PathBuf>,

    /// Client key (PEM) for NATS mutual TLS.
    #[arg(long, env = "ENTITY_SYNC_NATS_TLS_KEY")]
    pub nats_tls_key: Option<std::path::PathBuf>,

    /// Refuse a NATS connection without TLS.
    #[arg(long, env = "ENTITY_SYNC_NATS_REQUIRE_TLS", default_value_t = false)]
    pub nats_require_tls: bool,

    /// This node's id in logs and `Registered` messages (random when empty).
    #[arg(long, env = "ENTITY_SYNC_NODE_ID", default_value = "")]
    pub node_id: String,

    /// Compatibility with the original protocol: each row of a push is sent
    /// as its own bare frame, and no `subscribed`/`unsubscribed` frames are sent.
    #[arg(long, env = "ENTITY_SYNC_COMPAT_BARE_ROWS", default_value_t = false)]
    pub compat_bare_rows: bool,

    /// Largest client message accepted, in bytes (larger ones get a
    /// `message_too_large` error; above 16x this the connection is closed with 1009).
    #[arg(long, env = "ENTITY_SYNC_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Origins allowed to open websockets, comma-separated (e.g.
    /// `https://app.example.com`). Empty: any. Requests without an `Origin`
    /// header (non-browser clients) are always allowed.
    #[arg(long, env = "ENTITY_SYNC_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Most websocket connections this node holds at once (0: no limit but the
    /// OS's). Upgrades beyond it are refused with HTTP 503.
    #[arg(long, env = "ENTITY_SYNC_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Messages per second one connection may send, on average (0: no limit).
    /// Messages over it are dropped with a `rate_limited` error frame.
    #[arg(long, env = "ENTITY_SYNC_MAX_MESSAGE_RATE", default_value_t = 200)]
    pub max_message_rate: u32,

    /// Messages a connection may send at once above that rate (e.g. a page
    /// subscribing to all its keys when it loads).
    #[arg(long, env = "ENTITY_SYNC_MAX_MESSAGE_BURST", default_value_t = 2048)]
    pub max_message_burst: u32,

    /// Most subscriptions one connection may hold.
    #[arg(long, env = "ENTITY_SYNC_MAX_SUBSCRIPTIONS", default_value_t = 1024)]
    pub max_subscriptions: usize,

    /// Bytes a connection's outbound queue may hold before the client is
    /// closed as too slow (close code 1008).
    #[arg(long, env = "ENTITY_SYNC_OUTBOUND_MAX_BYTES", default_value_t = 1024 * 1024)]
    pub outbound_max_bytes: usize,

    /// Websocket ping interval.
    #[arg(long, env = "ENTITY_SYNC_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A connection silent for this long (no frame, no pong) is closed.
    #[arg(long, env = "ENTITY_SYNC_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Deadline of one resolve request; then it is retried on another resolver.
    #[arg(long, env = "ENTITY_SYNC_RESOLVE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub resolve_timeout: Duration,

    /// Most ids batched into one resolve request.
    #[arg(long, env = "ENTITY_SYNC_RESOLVE_BATCH_SIZE", default_value_t = 64)]
    pub resolve_batch_size: usize,

    /// Requests in flight per resolver stream when its `Register` says 0.
    #[arg(long, env = "ENTITY_SYNC_DEFAULT_MAX_IN_FLIGHT", default_value_t = 32)]
    pub default_max_in_flight: u32,

    /// How long a new `Resolve` stream has to send its `Register`.
    #[arg(long, env = "ENTITY_SYNC_REGISTER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub register_timeout: Duration,

    /// Upper bound of the drain on shutdown.
    #[arg(long, env = "ENTITY_SYNC_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Most keys in one `Notify` call.
    #[arg(long, env = "ENTITY_SYNC_MAX_NOTIFY_KEYS", default_value_t = 10_000)]
    pub max_notify_keys: usize,
}

impl Default for Config {
    fn default() -> Self {
        use clap::{Command, FromArgMatches};
        // Parse an empty command line so the defaults live in one place (the
        // attributes above). Environment variables are deliberately ignored here.
        let cmd = Config::augment_args(Command::new("entity-sync").no_binary_name(true));
        let cmd = strip_env(cmd);
        let matches = cmd
            .try_get_matches_from(Vec::<String>::new())
            .expect("defaults parse");
        Config::from_arg_matches(&matches).expect("defaults are valid")
    }
}

fn strip_env(cmd: clap::Command) -> clap::Command {
    let ids: Vec<_> = cmd.get_arguments().map(|a| a.get_id().clone()).collect();
    ids.into_iter()
        .fold(cmd, |cmd, id| cmd.mut_arg(id, |arg| arg.env(None::<&str>)))
}

impl Config {
    /// Cross-field checks clap can't express. Returns a message for the user.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_message_bytes < 256 {
            return Err("--max-message-bytes must be at least 256".into());
        }
        if self.outbound_max_bytes < 1024 {
            return Err("--outbound-max-bytes must be at least 1024".into());
        }
        if self.resolve_batch_size == 0 {
            return Err("--resolve-batch-size must be at least 1".into());
        }
        if self.default_max_in_flight == 0 {
            return Err("--default-max-in-flight must be at least 1".into());
        }
        if self.max_subscriptions == 0 {
            return Err("--max-subscriptions must be at least 1".into());
        }
        if self.ping_interval.is_zero() || self.idle_timeout < self.ping_interval {
            return Err(
                "--idle-timeout must be at least --ping-interval, which must be > 0".into(),
            );
        }
        if self.resolve_timeout.is_zero() {
            return Err("--resolve-timeout must be > 0".into());
        }
        if !(1..=5).contains(&self.nats_replicas) {
            return Err("--nats-replicas must be 1 to 5".into());
        }
        if self.nats_prefix.is_empty()
            || !self
                .nats_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err("--nats-prefix must be non-empty and use only A-Z a-z 0-9 - _".into());
        }
        Ok(())
    }
}

fn parse_ws_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err("must start with '/'".into());
    }
    if s.contains(['?', '#', ' ']) {
        return Err("must be a plain path".into());
    }
    Ok(s.to_string())
}

/// Parses `250ms`, `5s`, `2m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s, 2m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::default();
        assert_eq!(c.ws_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(c.ws_path, "/ws/entity-sync/");
        assert_eq!(c.grpc_addr.to_string(), "0.0.0.0:50051");
        assert_eq!(c.nats_url, None);
        assert_eq!(c.nats_prefix, "es");
        assert_eq!(c.resolve_timeout, Duration::from_secs(5));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }
}
