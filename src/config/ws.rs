//! The `WebSocket` section: the websocket + HTTP port and its connections.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;

use crate::config::values::{defaults, parse_duration, parse_ws_path};

/// The websocket + HTTP port, the frames sent, and the limits of each
/// websocket connection.
// Explicit `id`s and value names: field names are short inside a section,
// while argument ids must be unique across sections and the flags keep
// their public names.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "WebSocket")]
pub struct WsConfig {
    /// Websocket + HTTP listen address.
    #[arg(
        id = "ws_addr",
        value_name = "WS_ADDR",
        long = "ws-addr",
        env = "ENTITY_SYNC_WS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub addr: SocketAddr,

    /// Websocket path.
    #[arg(id = "ws_path", value_name = "WS_PATH", long = "ws-path", env = "ENTITY_SYNC_WS_PATH", default_value = "/ws/entity-sync/", value_parser = parse_ws_path)]
    pub path: String,

    /// Compatibility with the original protocol: each row of a push is sent
    /// as its own bare frame, and no `subscribed`/`unsubscribed` frames are sent.
    #[arg(long, env = "ENTITY_SYNC_COMPAT_BARE_ROWS", default_value_t = false)]
    pub compat_bare_rows: bool,

    /// Send a change push even when its rows are byte-identical to the last
    /// push the connection got for that key (by default such a push is not
    /// sent; the node records its version all the same). Snapshots answering
    /// a subscribe are always sent.
    #[arg(long, env = "ENTITY_SYNC_PUSH_UNCHANGED_ROWS", default_value_t = false)]
    pub push_unchanged_rows: bool,

    /// Largest client message accepted, in bytes (larger ones get a
    /// `message_too_large` error; above 2x this the connection is closed with 1009).
    #[arg(long, env = "ENTITY_SYNC_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Origins allowed to open websockets, comma-separated (e.g.
    /// `https://app.example.com`). Empty: any. Requests without an `Origin`
    /// header (non-browser clients) are always allowed.
    #[arg(long, env = "ENTITY_SYNC_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Most connections the websocket port holds at once, websockets and
    /// connections still handshaking alike (0: no limit but the OS's).
    /// Upgrades beyond it are refused with HTTP 503.
    #[arg(long, env = "ENTITY_SYNC_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,

    /// Most connections of the websocket port from one address (IPv6: one
    /// /64) that are not websockets yet (in their TLS handshake or first
    /// request); further ones are closed at once (0: no limit).
    #[arg(
        long,
        env = "ENTITY_SYNC_MAX_PENDING_PER_ADDRESS",
        default_value_t = 256
    )]
    pub max_pending_per_address: usize,

    /// Bytes of client messages being read (received, not yet complete),
    /// node-wide; a connection holding more than 4 KiB of one while the
    /// total is over this is closed (0: no limit).
    #[arg(long, env = "ENTITY_SYNC_MAX_READING_BYTES", default_value_t = 64 << 20)]
    pub max_reading_bytes: usize,

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

    /// Snapshot resolves (subscribes, and re-checks after a new secret) the
    /// node runs at once; more wait their turn in order of arrival. One
    /// connection runs at most 64 of them.
    #[arg(
        long,
        env = "ENTITY_SYNC_MAX_SNAPSHOT_RESOLVES",
        default_value_t = 4096
    )]
    pub max_snapshot_resolves: usize,

    /// Bytes a connection's outbound queue may hold before the client is
    /// closed as too slow (close code 1008). Each connection's kernel send
    /// buffer is set to half of it (Linux doubles that, and caps it at
    /// net.core.wmem_max).
    #[arg(long, env = "ENTITY_SYNC_OUTBOUND_MAX_BYTES", default_value_t = 1024 * 1024)]
    pub outbound_max_bytes: usize,

    /// Websocket ping interval.
    #[arg(long, env = "ENTITY_SYNC_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub ping_interval: Duration,

    /// A write to a websocket that the socket does not take within this
    /// long (a client that stopped reading) closes the connection with 1008.
    #[arg(long, env = "ENTITY_SYNC_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// A connection silent for this long (no frame, no pong) is closed.
    #[arg(long, env = "ENTITY_SYNC_IDLE_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Serve `/metrics` on this address (plain HTTP) instead of the
    /// websocket port, so that scrapes can be firewalled apart from clients.
    #[arg(long, env = "ENTITY_SYNC_METRICS_ADDR", help_heading = "Operations")]
    pub metrics_addr: Option<SocketAddr>,

    /// Time a new connection of the websocket port has to finish its TLS
    /// handshake, and then to deliver its first complete request (the
    /// upgrade); then it is closed. Until then it counts against
    /// --max-connections.
    #[arg(long, env = "ENTITY_SYNC_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Certificate chain (PEM) of the websocket/HTTP port, with
    /// --ws-tls-key: the port then serves `wss://` and `https://` only.
    #[arg(
        id = "ws_tls_cert",
        value_name = "PATH",
        long = "ws-tls-cert",
        env = "ENTITY_SYNC_WS_TLS_CERT",
        help_heading = "Security/TLS"
    )]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --ws-tls-cert.
    #[arg(
        id = "ws_tls_key",
        value_name = "PATH",
        long = "ws-tls-key",
        env = "ENTITY_SYNC_WS_TLS_KEY",
        help_heading = "Security/TLS"
    )]
    pub tls_key: Option<PathBuf>,

    /// A JWKS file (RFC 7517) of the keys that verify signed subscribe
    /// tokens: `oct` (HS256), `EC` P-256 (ES256), `RSA` (RS256), `OKP`
    /// Ed25519 (EdDSA), each with a `kid`. A subscribe carrying a valid token
    /// is authorized without asking a resolver. Re-read on SIGHUP.
    #[arg(
        value_name = "PATH",
        long,
        env = "ENTITY_SYNC_SUBSCRIBE_TOKEN_JWKS",
        hide_env_values = true,
        help_heading = "Security/TLS"
    )]
    pub subscribe_token_jwks: Option<PathBuf>,

    /// When set, a subscribe token's `aud` claim must contain this value.
    #[arg(
        value_name = "AUD",
        long,
        env = "ENTITY_SYNC_SUBSCRIBE_TOKEN_AUDIENCE",
        hide_env_values = true,
        help_heading = "Security/TLS"
    )]
    pub subscribe_token_audience: Option<String>,
}

impl WsConfig {
    /// `(cert, key)` when the port serves TLS (after `Config::validate`).
    pub fn tls_identity(&self) -> Option<(&Path, &Path)> {
        Some((self.tls_cert.as_deref()?, self.tls_key.as_deref()?))
    }
}

impl Default for WsConfig {
    fn default() -> Self {
        defaults()
    }
}
