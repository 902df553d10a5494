//! The `NATS` section: the JetStream bus and the cluster link over it.

use std::{path::PathBuf, time::Duration};

use clap::Args;

use crate::config::values::{Secret, defaults, parse_duration};

/// The NATS JetStream bus (and the cluster resolves over the same connection).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "NATS")]
pub struct NatsConfig {
    /// NATS server URL(s), comma-separated. Unset: the in-process bus (single node).
    #[arg(
        id = "nats_url",
        value_name = "NATS_URL",
        long = "nats-url",
        env = "ENTITY_SYNC_NATS_URL",
        hide_env_values = true
    )]
    pub url: Option<String>,

    /// Prefix of NATS subjects and of the stream name.
    #[arg(
        id = "nats_prefix",
        value_name = "NATS_PREFIX",
        long = "nats-prefix",
        env = "ENTITY_SYNC_NATS_PREFIX",
        default_value = "es"
    )]
    pub prefix: String,

    /// Replicas of the JetStream stream when the node creates it.
    #[arg(
        id = "nats_replicas",
        value_name = "NATS_REPLICAS",
        long = "nats-replicas",
        env = "ENTITY_SYNC_NATS_REPLICAS",
        default_value_t = 1
    )]
    pub replicas: usize,

    /// How long the stream keeps change keys when the node creates it. A node
    /// away for longer than this resyncs (re-resolves every subscribed key).
    #[arg(id = "nats_max_age", value_name = "NATS_MAX_AGE", long = "nats-max-age", env = "ENTITY_SYNC_NATS_MAX_AGE", default_value = "24h", value_parser = parse_duration)]
    pub max_age: Duration,

    /// How long a starting node keeps retrying a NATS it cannot reach yet (or
    /// a JetStream that cannot set up the stream yet) before it exits 1.
    /// Refused credentials and bad URLs fail at once.
    #[arg(id = "nats_startup_timeout", value_name = "NATS_STARTUP_TIMEOUT", long = "nats-startup-timeout", env = "ENTITY_SYNC_NATS_STARTUP_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub startup_timeout: Duration,

    /// Bytes the stream may hold when the node creates it (-1: no limit).
    #[arg(id = "nats_max_bytes", value_name = "NATS_MAX_BYTES", long = "nats-max-bytes", env = "ENTITY_SYNC_NATS_MAX_BYTES", default_value_t = 1 << 30, allow_negative_numbers = true)]
    pub max_bytes: i64,

    /// NATS credentials file (JWT + nkey seed).
    #[arg(
        id = "nats_creds",
        value_name = "NATS_CREDS",
        long = "nats-creds",
        env = "ENTITY_SYNC_NATS_CREDS",
        hide_env_values = true
    )]
    pub creds: Option<PathBuf>,

    /// NATS auth token.
    #[arg(
        id = "nats_token",
        value_name = "NATS_TOKEN",
        long = "nats-token",
        env = "ENTITY_SYNC_NATS_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<Secret>,

    /// CA certificate (PEM) to verify the NATS server with.
    #[arg(
        id = "nats_tls_ca",
        value_name = "NATS_TLS_CA",
        long = "nats-tls-ca",
        env = "ENTITY_SYNC_NATS_TLS_CA"
    )]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for NATS mutual TLS (with --nats-tls-key).
    #[arg(
        id = "nats_tls_cert",
        value_name = "NATS_TLS_CERT",
        long = "nats-tls-cert",
        env = "ENTITY_SYNC_NATS_TLS_CERT"
    )]
    pub tls_cert: Option<PathBuf>,

    /// Client key (PEM) for NATS mutual TLS.
    #[arg(
        id = "nats_tls_key",
        value_name = "NATS_TLS_KEY",
        long = "nats-tls-key",
        env = "ENTITY_SYNC_NATS_TLS_KEY"
    )]
    pub tls_key: Option<PathBuf>,

    /// Refuse a NATS connection without TLS.
    #[arg(
        id = "nats_require_tls",
        long = "nats-require-tls",
        env = "ENTITY_SYNC_NATS_REQUIRE_TLS",
        default_value_t = false
    )]
    pub require_tls: bool,

    /// Resolve each change of a SHARED key once for the whole cluster (one
    /// node claims it from the stream, resolves it and publishes the rows to
    /// the nodes that hold the key). Off: every node holding the key resolves
    /// it itself.
    #[arg(
        id = "cluster_relay",
        value_name = "BOOL",
        long = "cluster-relay",
        env = "ENTITY_SYNC_CLUSTER_RELAY",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub cluster_relay: bool,

    /// How long a node waits for the relay's rows of a change to a key it
    /// holds before it resolves the change itself (a relay node that died is
    /// replaced sooner: its claim passes to another node after 2 s).
    #[arg(id = "relay_timeout", value_name = "RELAY_TIMEOUT", long = "relay-timeout", env = "ENTITY_SYNC_RELAY_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub relay_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        defaults()
    }
}
