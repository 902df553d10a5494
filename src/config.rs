//! Node configuration: command-line flags, each with an `ENTITY_SYNC_*` environment variable.
//!
//! [`Config`] is made of one section per component ([`WsConfig`],
//! [`GrpcConfig`], [`NatsConfig`], [`ResolveConfig`]), each flattened into
//! the one command line, so a component is built from its own section.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;

/// Everything a node needs to run. Every field has a flag and an
/// environment variable of the same name (`--ws-addr` ↔ `ENTITY_SYNC_WS_ADDR`);
/// [`Config::default`] gives the documented defaults.
#[derive(Debug, Clone, Args)]
pub struct Config {
    #[command(flatten)]
    pub ws: WsConfig,

    #[command(flatten)]
    pub grpc: GrpcConfig,

    #[command(flatten)]
    pub nats: NatsConfig,

    #[command(flatten)]
    pub resolve: ResolveConfig,

    /// This node's id in logs and `Registered` messages (random when empty).
    #[arg(
        long,
        env = "ENTITY_SYNC_NODE_ID",
        default_value = "",
        help_heading = "Operations"
    )]
    pub node_id: String,

    /// Upper bound of the drain on shutdown.
    #[arg(long, env = "ENTITY_SYNC_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration, help_heading = "Operations")]
    pub shutdown_grace: Duration,
}

/// A credential given on the command line: its `Debug` output is redacted,
/// so a logged or printed configuration never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, to hand to the client that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(redacted)")
    }
}

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
    /// closed as too slow (close code 1008).
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
}

impl WsConfig {
    /// `(cert, key)` when the port serves TLS (after [`Config::validate`]).
    pub fn tls_identity(&self) -> Option<(&Path, &Path)> {
        Some((self.tls_cert.as_deref()?, self.tls_key.as_deref()?))
    }
}

/// The gRPC port: `Notify` and the backends' `Resolve` streams.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "gRPC")]
pub struct GrpcConfig {
    /// gRPC listen address.
    #[arg(
        id = "grpc_addr",
        value_name = "GRPC_ADDR",
        long = "grpc-addr",
        env = "ENTITY_SYNC_GRPC_ADDR",
        default_value = "0.0.0.0:50051"
    )]
    pub addr: SocketAddr,

    /// How long a new `Resolve` stream has to send its `Register`.
    #[arg(long, env = "ENTITY_SYNC_REGISTER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub register_timeout: Duration,

    /// Most keys in one `Notify` call.
    #[arg(long, env = "ENTITY_SYNC_MAX_NOTIFY_KEYS", default_value_t = 10_000)]
    pub max_notify_keys: usize,

    /// Credentials of backends, one per line: `ROLE TOKEN [ENTITIES]` (ROLE
    /// `notifier` or `resolver`; ENTITIES, the entities the line may notify
    /// or register, comma-separated, or `*` for all, the default; `#` starts
    /// a comment). Calls then need `authorization: Bearer TOKEN`. Re-read on
    /// SIGHUP.
    #[arg(
        id = "grpc_tokens_file",
        value_name = "PATH",
        long = "grpc-tokens-file",
        env = "ENTITY_SYNC_GRPC_TOKENS_FILE",
        hide_env_values = true,
        help_heading = "Security/TLS"
    )]
    pub tokens_file: Option<PathBuf>,

    /// Most `Resolve` streams one credential may hold on this node (a token's
    /// `token.id`; with client certificates only, the certificate; with no
    /// credentials at all, the peer's IP address). A `Register` beyond it is
    /// refused with RESOURCE_EXHAUSTED, so one backend cannot take every
    /// slot of --max-resolver-streams from the others.
    #[arg(
        long,
        env = "ENTITY_SYNC_MAX_RESOLVER_STREAMS_PER_CREDENTIAL",
        default_value_t = 64
    )]
    pub max_resolver_streams_per_credential: usize,

    /// Most connections the gRPC port holds at once; one beyond it is closed
    /// as soon as it is accepted.
    #[arg(
        id = "grpc_max_connections",
        value_name = "GRPC_MAX_CONNECTIONS",
        long = "grpc-max-connections",
        env = "ENTITY_SYNC_GRPC_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    pub max_connections: usize,

    /// Most gRPC connections still in their handshake at once (TLS, then the
    /// HTTP/2 preface); one beyond it is closed as soon as it is accepted.
    #[arg(
        id = "grpc_max_handshakes",
        value_name = "GRPC_MAX_HANDSHAKES",
        long = "grpc-max-handshakes",
        env = "ENTITY_SYNC_GRPC_MAX_HANDSHAKES",
        default_value_t = 128
    )]
    pub max_handshakes: usize,

    /// Time a new gRPC connection has to finish its TLS handshake (with TLS)
    /// and send the HTTP/2 connection preface; then it is closed.
    #[arg(id = "grpc_handshake_timeout", value_name = "GRPC_HANDSHAKE_TIMEOUT", long = "grpc-handshake-timeout", env = "ENTITY_SYNC_GRPC_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,

    /// Most concurrent calls (HTTP/2 streams) on one gRPC connection; the
    /// node announces it in its SETTINGS, and clients queue calls beyond it.
    #[arg(
        id = "grpc_max_concurrent_streams",
        value_name = "GRPC_MAX_CONCURRENT_STREAMS",
        long = "grpc-max-concurrent-streams",
        env = "ENTITY_SYNC_GRPC_MAX_CONCURRENT_STREAMS",
        default_value_t = 128
    )]
    pub max_concurrent_streams: u32,

    /// Interval of the node's HTTP/2 pings on each gRPC connection; a peer
    /// that does not answer one within --grpc-keepalive-timeout is closed.
    #[arg(id = "grpc_keepalive_interval", value_name = "GRPC_KEEPALIVE_INTERVAL", long = "grpc-keepalive-interval", env = "ENTITY_SYNC_GRPC_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,

    /// How long the node waits for the answer to a keepalive ping.
    #[arg(id = "grpc_keepalive_timeout", value_name = "GRPC_KEEPALIVE_TIMEOUT", long = "grpc-keepalive-timeout", env = "ENTITY_SYNC_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,

    /// Age after which a gRPC connection is asked to go away (HTTP/2
    /// GOAWAY): it takes no new calls, an idle one closes at once, and calls
    /// under way (a `Resolve` stream) go on until they end. Clients open a
    /// new connection for their next call. Bounds how long an idle
    /// connection is held.
    #[arg(id = "grpc_max_connection_age", value_name = "GRPC_MAX_CONNECTION_AGE", long = "grpc-max-connection-age", env = "ENTITY_SYNC_GRPC_MAX_CONNECTION_AGE", default_value = "30m", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// Serve gRPC without credentials on a non-loopback address (anyone who
    /// reaches the port can then register as a resolver and call Notify).
    #[arg(
        id = "grpc_insecure",
        long = "grpc-insecure",
        env = "ENTITY_SYNC_GRPC_INSECURE",
        default_value_t = false,
        help_heading = "Security/TLS"
    )]
    pub insecure: bool,

    /// Accept bearer tokens (--grpc-tokens-file) on a non-loopback gRPC
    /// address without TLS. Without TLS every token, and every subscriber
    /// secret the node sends to resolvers, crosses the network in clear:
    /// give this only when something else encrypts the link (a service mesh
    /// with mutual TLS, a VPN, an IPsec tunnel).
    #[arg(
        id = "grpc_allow_cleartext_tokens",
        long = "grpc-allow-cleartext-tokens",
        env = "ENTITY_SYNC_GRPC_ALLOW_CLEARTEXT_TOKENS",
        default_value_t = false,
        help_heading = "Security/TLS"
    )]
    pub allow_cleartext_tokens: bool,

    /// Certificate chain (PEM) of the gRPC port, with --grpc-tls-key: the
    /// port then speaks TLS only.
    #[arg(
        id = "grpc_tls_cert",
        value_name = "PATH",
        long = "grpc-tls-cert",
        env = "ENTITY_SYNC_GRPC_TLS_CERT",
        help_heading = "Security/TLS"
    )]
    pub tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --grpc-tls-cert.
    #[arg(
        id = "grpc_tls_key",
        value_name = "PATH",
        long = "grpc-tls-key",
        env = "ENTITY_SYNC_GRPC_TLS_KEY",
        help_heading = "Security/TLS"
    )]
    pub tls_key: Option<PathBuf>,

    /// CA certificate(s) (PEM): gRPC clients must present a certificate one
    /// of them signed (mutual TLS). Needs --grpc-tls-cert and --grpc-tls-key.
    #[arg(
        id = "grpc_tls_client_ca",
        value_name = "PATH",
        long = "grpc-tls-client-ca",
        env = "ENTITY_SYNC_GRPC_TLS_CLIENT_CA",
        help_heading = "Security/TLS"
    )]
    pub tls_client_ca: Option<PathBuf>,
}

impl GrpcConfig {
    /// `(cert, key)` when the port speaks TLS (after [`Config::validate`]).
    pub fn tls_identity(&self) -> Option<(&Path, &Path)> {
        Some((self.tls_cert.as_deref()?, self.tls_key.as_deref()?))
    }

    /// Whether every gRPC client must present a certificate signed by
    /// --grpc-tls-client-ca (mutual TLS). Valid once [`Config::validate`]
    /// passed, which refuses a client CA without a server certificate.
    pub fn verifies_client_certs(&self) -> bool {
        self.tls_client_ca.is_some() && self.tls_identity().is_some()
    }

    /// Whether callers must prove who they are (a tokens file; client
    /// certificates count too).
    pub fn authenticates_callers(&self) -> bool {
        self.tokens_file.is_some() || self.verifies_client_certs()
    }

    /// The safe default: a gRPC port reachable from the network (`bound`,
    /// the address actually listened on) must not let anyone register as a
    /// resolver (receiving every subscriber's secret) or call Notify.
    ///
    /// Bearer tokens on such a port need TLS: without it every token, and
    /// every subscriber secret the node sends to resolvers, crosses the
    /// network in clear (unless --grpc-allow-cleartext-tokens says that
    /// something else encrypts the link).
    pub fn check_exposure(&self, bound: SocketAddr) -> Result<(), ConfigError> {
        if bound.ip().is_loopback() {
            return Ok(());
        }
        if self.tokens_file.is_some()
            && self.tls_identity().is_none()
            && !self.allow_cleartext_tokens
        {
            return Err(ConfigError::CleartextTokens { addr: bound });
        }
        if self.authenticates_callers() || self.insecure {
            return Ok(());
        }
        Err(ConfigError::Unauthenticated { addr: bound })
    }
}

/// A configuration the node refuses to start with. Each names the flag to
/// change ([`ConfigError::flag`]); match on the variant, not the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Two flags that go together were not given together.
    #[error("{0} and {1} go together: give both, or neither")]
    Together(&'static str, &'static str),
    /// A flag that needs others was given without them.
    #[error("{flag} needs {needs}")]
    Needs {
        flag: &'static str,
        needs: &'static str,
    },
    /// A value outside what the flag accepts.
    #[error("{flag} {rule}")]
    Invalid {
        flag: &'static str,
        rule: &'static str,
    },
    /// A gRPC port reachable from the network that would let anyone register
    /// as a resolver (receiving every subscriber's secret) or call `Notify`.
    #[error(
        "--grpc-addr {addr} is reachable from the network but no backend credentials are set: \
         give --grpc-tokens-file (bearer tokens) or --grpc-tls-client-ca (client \
         certificates), or --grpc-insecure to serve without them"
    )]
    Unauthenticated { addr: SocketAddr },
    /// Bearer tokens on a network-reachable gRPC port without TLS.
    #[error(
        "--grpc-addr {addr} is reachable from the network and --grpc-tokens-file is \
         set, but the port has no TLS: bearer tokens and the subscriber secrets sent \
         to resolvers would cross the network in clear. Give --grpc-tls-cert and \
         --grpc-tls-key, or --grpc-allow-cleartext-tokens if something else encrypts \
         the link (a service mesh, a VPN)"
    )]
    CleartextTokens { addr: SocketAddr },
}

impl ConfigError {
    /// The flag to change.
    pub fn flag(&self) -> &'static str {
        match self {
            ConfigError::Together(flag, _) => flag,
            ConfigError::Needs { flag, .. } | ConfigError::Invalid { flag, .. } => flag,
            ConfigError::Unauthenticated { .. } => "--grpc-tokens-file",
            ConfigError::CleartextTokens { .. } => "--grpc-tls-cert",
        }
    }
}

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
}

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
}

/// Parses an empty command line for `T`, ignoring the environment, so the
/// defaults live in one place (the attributes above).
fn defaults<T: Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("entity-sync").no_binary_name(true));
    let ids: Vec<_> = cmd.get_arguments().map(|a| a.get_id().clone()).collect();
    let cmd = ids
        .into_iter()
        .fold(cmd, |cmd, id| cmd.mut_arg(id, |arg| arg.env(None::<&str>)));
    let matches = cmd
        .try_get_matches_from(Vec::<String>::new())
        .expect("defaults parse");
    T::from_arg_matches(&matches).expect("defaults are valid")
}

impl Default for Config {
    fn default() -> Self {
        defaults()
    }
}

impl Default for WsConfig {
    fn default() -> Self {
        defaults()
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        defaults()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        defaults()
    }
}

impl Default for ResolveConfig {
    fn default() -> Self {
        defaults()
    }
}

impl Config {
    /// Cross-field checks clap can't express; the error names the flag.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let (ws, grpc, nats, resolve) = (&self.ws, &self.grpc, &self.nats, &self.resolve);
        if grpc.tls_cert.is_some() != grpc.tls_key.is_some() {
            return Err(ConfigError::Together("--grpc-tls-cert", "--grpc-tls-key"));
        }
        if grpc.tls_client_ca.is_some() && grpc.tls_cert.is_none() {
            return Err(ConfigError::Needs {
                flag: "--grpc-tls-client-ca",
                needs: "--grpc-tls-cert and --grpc-tls-key (mutual TLS runs over the port's own TLS)",
            });
        }
        for (value, flag) in [
            (grpc.max_connections, "--grpc-max-connections"),
            (grpc.max_handshakes, "--grpc-max-handshakes"),
            (
                grpc.max_concurrent_streams as usize,
                "--grpc-max-concurrent-streams",
            ),
            (
                grpc.max_resolver_streams_per_credential,
                "--max-resolver-streams-per-credential",
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    flag,
                    rule: "must be at least 1",
                });
            }
        }
        for (value, flag) in [
            (grpc.handshake_timeout, "--grpc-handshake-timeout"),
            (grpc.keepalive_interval, "--grpc-keepalive-interval"),
            (grpc.keepalive_timeout, "--grpc-keepalive-timeout"),
            (grpc.max_connection_age, "--grpc-max-connection-age"),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid {
                    flag,
                    rule: "must be > 0",
                });
            }
        }
        if ws.tls_cert.is_some() != ws.tls_key.is_some() {
            return Err(ConfigError::Together("--ws-tls-cert", "--ws-tls-key"));
        }
        if ws.max_message_bytes < 256 {
            return Err(ConfigError::Invalid {
                flag: "--max-message-bytes",
                rule: "must be at least 256",
            });
        }
        if ws.outbound_max_bytes < 1024 {
            return Err(ConfigError::Invalid {
                flag: "--outbound-max-bytes",
                rule: "must be at least 1024",
            });
        }
        if resolve.batch_size == 0 {
            return Err(ConfigError::Invalid {
                flag: "--resolve-batch-size",
                rule: "must be at least 1",
            });
        }
        if resolve.default_max_in_flight == 0 {
            return Err(ConfigError::Invalid {
                flag: "--default-max-in-flight",
                rule: "must be at least 1",
            });
        }
        if ws.max_subscriptions == 0 {
            return Err(ConfigError::Invalid {
                flag: "--max-subscriptions",
                rule: "must be at least 1",
            });
        }
        if ws.max_snapshot_resolves == 0 {
            return Err(ConfigError::Invalid {
                flag: "--max-snapshot-resolves",
                rule: "must be at least 1",
            });
        }
        if ws.ping_interval.is_zero() || ws.idle_timeout < ws.ping_interval {
            return Err(ConfigError::Invalid {
                flag: "--idle-timeout",
                rule: "must be at least --ping-interval, which must be > 0",
            });
        }
        if ws.write_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                flag: "--write-timeout",
                rule: "must be > 0",
            });
        }
        if resolve.timeout.is_zero() {
            return Err(ConfigError::Invalid {
                flag: "--resolve-timeout",
                rule: "must be > 0",
            });
        }
        if !(1..=5).contains(&nats.replicas) {
            return Err(ConfigError::Invalid {
                flag: "--nats-replicas",
                rule: "must be 1 to 5",
            });
        }
        if nats.prefix.is_empty()
            || !nats
                .prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::Invalid {
                flag: "--nats-prefix",
                rule: "must be non-empty and use only A-Z a-z 0-9 - _",
            });
        }
        Ok(())
    }
}

/// Headings of the node's flags in `--help` (and `--print-config`), in order.
pub const HELP_HEADINGS: [&str; 6] = [
    "WebSocket",
    "gRPC",
    "Security/TLS",
    "NATS",
    "Resolve",
    "Operations",
];

/// The effective configuration as `matches` resolved it from the command
/// line, `ENTITY_SYNC_*` variables and defaults: one `--flag=value  # source`
/// line per flag of `cmd`, grouped under its help heading. Values of flags
/// whose environment values are hidden (tokens) are never shown, and
/// credentials in URLs are masked.
pub fn describe(cmd: &clap::Command, matches: &clap::ArgMatches) -> String {
    use clap::parser::ValueSource;
    use std::fmt::Write;
    let shown: Vec<&clap::Arg> = cmd
        .get_arguments()
        .filter(|arg| {
            arg.get_long()
                .is_some_and(|long| !matches!(long, "help" | "version" | "print-config"))
        })
        .collect();
    fn heading_of(arg: &clap::Arg) -> &str {
        arg.get_help_heading().unwrap_or("Other")
    }
    let mut headings: Vec<&str> = HELP_HEADINGS.to_vec();
    for arg in &shown {
        if !headings.contains(&heading_of(arg)) {
            headings.push(heading_of(arg));
        }
    }
    let mut out = String::new();
    for heading in headings {
        let args: Vec<&&clap::Arg> = shown.iter().filter(|a| heading_of(a) == heading).collect();
        if args.is_empty() {
            continue;
        }
        let _ = writeln!(out, "# {heading}");
        for arg in args {
            let id = arg.get_id().as_str();
            let raw = matches.try_get_raw(id).ok().flatten().map(|values| {
                values
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(",")
            });
            let value = match raw {
                None => "(unset)".to_string(),
                // The URLs hide their environment value in `--help` (they
                // may carry `user:password@`); here they show without it.
                Some(v) if id == "nats_url" => scrub_urls(&v),
                Some(v) if arg.is_hide_env_values_set() && !v.is_empty() => "***".to_string(),
                Some(v) if v.contains('@') => scrub_urls(&v),
                Some(v) => v,
            };
            let source = match matches.value_source(id) {
                Some(ValueSource::CommandLine) => "command line".to_string(),
                Some(ValueSource::EnvVariable) => {
                    arg.get_env().map_or("environment".to_string(), |env| {
                        format!("env {}", env.to_string_lossy())
                    })
                }
                Some(ValueSource::DefaultValue) => "default".to_string(),
                _ => "default".to_string(),
            };
            let long = arg.get_long().unwrap_or_default();
            let _ = writeln!(out, "--{long}={value}  # {source}");
        }
    }
    out
}

/// `urls` (comma-separated) with any `user:password@` or `token@` removed.
pub fn scrub_urls(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
            let rest = match rest.find(['/', '?']) {
                Some(end) => rest[..end]
                    .rsplit_once('@')
                    .map_or(rest.to_owned(), |(_, host)| {
                        format!("***@{host}{}", &rest[end..])
                    }),
                None => rest
                    .rsplit_once('@')
                    .map_or(rest.to_owned(), |(_, host)| format!("***@{host}")),
            };
            if scheme.is_empty() {
                rest
            } else {
                format!("{scheme}://{rest}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
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

/// Parses a duration flag: `250ms`, `5s`, `2m`, `1h`, or anything else
/// [`humantime::parse_duration`] reads (`1h 30m`, `2min`).
///
/// A bare number is seconds: humantime wants a unit, but the flags took
/// `--shutdown-grace=7` before and deployments may still say so.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|err| format!("{s:?} is not a duration like 500ms, 5s, 2m or 1h ({err})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let mut config = Config::default();
        config.nats.token = Some("nats-token-value".parse().unwrap());
        let printed = format!("{config:?}");
        assert!(!printed.contains("nats-token-value"), "{printed}");
        assert!(printed.contains("Secret(redacted)"));
    }

    #[test]
    fn an_exposed_grpc_port_needs_credentials_or_insecure() {
        let mut grpc = Config::default().grpc;
        let exposed: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let err = grpc.check_exposure(exposed).unwrap_err();
        assert_eq!(err, ConfigError::Unauthenticated { addr: exposed });
        let message = err.to_string();
        for flag in [
            "--grpc-tokens-file",
            "--grpc-tls-client-ca",
            "--grpc-insecure",
        ] {
            assert!(message.contains(flag), "{message}");
        }
        assert!(
            grpc.check_exposure("127.0.0.1:50051".parse().unwrap())
                .is_ok()
        );
        assert!(grpc.check_exposure("[::1]:50051".parse().unwrap()).is_ok());
        grpc.insecure = true;
        assert!(grpc.check_exposure(exposed).is_ok());
        grpc.insecure = false;
        grpc.tls_client_ca = Some("ca.pem".into());
        grpc.tls_cert = Some("cert.pem".into());
        grpc.tls_key = Some("key.pem".into());
        assert!(grpc.check_exposure(exposed).is_ok());
    }

    #[test]
    fn tokens_on_an_exposed_grpc_port_need_tls_or_an_explicit_flag() {
        let mut grpc = Config::default().grpc;
        let exposed: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        grpc.tokens_file = Some("tokens".into());
        let err = grpc.check_exposure(exposed).unwrap_err();
        assert_eq!(err, ConfigError::CleartextTokens { addr: exposed });
        assert_eq!(err.flag(), "--grpc-tls-cert");
        let message = err.to_string();
        for flag in [
            "--grpc-tokens-file",
            "--grpc-tls-cert",
            "--grpc-tls-key",
            "--grpc-allow-cleartext-tokens",
        ] {
            assert!(message.contains(flag), "{message}");
        }
        // `--grpc-insecure` is about serving without credentials: no excuse here.
        grpc.insecure = true;
        assert!(grpc.check_exposure(exposed).is_err());
        grpc.insecure = false;
        // On loopback the tokens never leave the host.
        assert!(
            grpc.check_exposure("127.0.0.1:50051".parse().unwrap())
                .is_ok()
        );
        grpc.allow_cleartext_tokens = true;
        assert!(grpc.check_exposure(exposed).is_ok());
        grpc.allow_cleartext_tokens = false;
        grpc.tls_cert = Some("cert.pem".into());
        grpc.tls_key = Some("key.pem".into());
        assert!(grpc.check_exposure(exposed).is_ok());
    }
    use clap::{CommandFactory, Parser};

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::default();
        assert_eq!(c.ws.addr.to_string(), "0.0.0.0:8080");
        assert_eq!(c.ws.path, "/ws/entity-sync/");
        assert_eq!(c.grpc.addr.to_string(), "0.0.0.0:50051");
        assert_eq!(c.nats.url, None);
        assert_eq!(c.nats.prefix, "es");
        assert_eq!(c.resolve.timeout, Duration::from_secs(5));
        assert!(c.validate().is_ok());
        assert_eq!(WsConfig::default().addr, c.ws.addr);
        assert_eq!(NatsConfig::default().prefix, c.nats.prefix);
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn flags_keep_their_public_names() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "entity-sync",
            "--ws-addr=127.0.0.1:1",
            "--grpc-addr=127.0.0.1:2",
            "--nats-url=nats://a:4222",
            "--nats-prefix=p",
            "--resolve-timeout=2s",
            "--resolve-batch-size=3",
            "--default-max-in-flight=4",
            "--max-subscriptions=5",
        ])
        .unwrap();
        let c = cli.config;
        assert_eq!(c.ws.addr.port(), 1);
        assert_eq!(c.grpc.addr.port(), 2);
        assert_eq!(c.nats.url.as_deref(), Some("nats://a:4222"));
        assert_eq!(c.nats.prefix, "p");
        assert_eq!(c.resolve.timeout, Duration::from_secs(2));
        assert_eq!(c.resolve.batch_size, 3);
        assert_eq!(c.resolve.default_max_in_flight, 4);
        assert_eq!(c.ws.max_subscriptions, 5);
    }

    #[test]
    fn tls_flags_and_their_combinations() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["entity-sync"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).unwrap().config
        };
        let c = parse(&[
            "--grpc-tls-cert=/c.pem",
            "--grpc-tls-key=/k.pem",
            "--grpc-tls-client-ca=/ca.pem",
            "--ws-tls-cert=/wc.pem",
            "--ws-tls-key=/wk.pem",
        ]);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            c.grpc.tls_identity(),
            Some((Path::new("/c.pem"), Path::new("/k.pem")))
        );
        assert!(c.grpc.verifies_client_certs());
        assert_eq!(
            c.ws.tls_identity(),
            Some((Path::new("/wc.pem"), Path::new("/wk.pem")))
        );
        let plain = Config::default();
        assert!(!plain.grpc.verifies_client_certs());
        assert_eq!(plain.grpc.tls_identity(), None);
        assert_eq!(plain.ws.tls_identity(), None);
        let tls_only = parse(&["--grpc-tls-cert=/c.pem", "--grpc-tls-key=/k.pem"]);
        assert!(!tls_only.grpc.verifies_client_certs());

        let refused = |args: &[&str]| parse(args).validate().unwrap_err();
        let grpc_pair = ConfigError::Together("--grpc-tls-cert", "--grpc-tls-key");
        assert_eq!(refused(&["--grpc-tls-cert=/c.pem"]), grpc_pair);
        assert_eq!(refused(&["--grpc-tls-key=/k.pem"]), grpc_pair);
        assert_eq!(
            grpc_pair.to_string(),
            "--grpc-tls-cert and --grpc-tls-key go together: give both, or neither"
        );
        let needs = refused(&["--grpc-tls-client-ca=/ca.pem"]);
        assert!(
            matches!(
                needs,
                ConfigError::Needs {
                    flag: "--grpc-tls-client-ca",
                    ..
                }
            ),
            "{needs:?}"
        );
        assert!(
            needs
                .to_string()
                .starts_with("--grpc-tls-client-ca needs --grpc-tls-cert and --grpc-tls-key")
        );
        assert_eq!(
            refused(&["--ws-tls-key=/k.pem"]),
            ConfigError::Together("--ws-tls-cert", "--ws-tls-key")
        );
        let invalid = refused(&["--nats-replicas=7"]);
        assert_eq!(invalid.flag(), "--nats-replicas");
        assert_eq!(invalid.to_string(), "--nats-replicas must be 1 to 5");
    }

    #[test]
    fn the_description_masks_secrets_and_names_sources() {
        let cmd = Cli::command();
        let matches = cmd
            .clone()
            .try_get_matches_from([
                "entity-sync",
                "--nats-url=nats://alice:pa55word@127.0.0.1:4222",
                "--nats-token=tok-value-1234",
                "--ws-path=/sync/",
            ])
            .unwrap();
        let text = describe(&cmd, &matches);
        assert!(!text.contains("pa55word"), "{text}");
        assert!(!text.contains("tok-value-1234"), "{text}");
        assert!(
            text.contains("--nats-url=nats://***@127.0.0.1:4222  # command line\n"),
            "{text}"
        );
        assert!(
            text.contains("--nats-token=***  # command line\n"),
            "{text}"
        );
        assert!(
            text.contains("--ws-path=/sync/  # command line\n"),
            "{text}"
        );
        assert!(
            text.contains("--grpc-addr=0.0.0.0:50051  # default\n"),
            "{text}"
        );
        assert!(text.contains("--nats-creds=(unset)  # default\n"), "{text}");
        let order: Vec<usize> = HELP_HEADINGS
            .iter()
            .map(|h| text.find(&format!("# {h}\n")).expect(h))
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{text}");
    }

    /// `--help` prints each flag's environment value unless it is hidden:
    /// every flag that can carry a credential (or names the file holding
    /// one) hides it.
    #[test]
    fn credential_flags_hide_their_environment_values() {
        let cmd = Cli::command();
        // `--grpc-allow-cleartext-tokens` is a switch about tokens, not one.
        let credential = |id: &str| {
            id != "grpc_allow_cleartext_tokens"
                && ["token", "creds", "password", "secret", "nats_url"]
                    .iter()
                    .any(|word| id.contains(word))
        };
        let flags: Vec<&clap::Arg> = cmd
            .get_arguments()
            .filter(|arg| credential(arg.get_id().as_str()))
            .collect();
        let ids: Vec<&str> = flags.iter().map(|a| a.get_id().as_str()).collect();
        assert_eq!(
            ids,
            ["grpc_tokens_file", "nats_url", "nats_creds", "nats_token"]
        );
        for arg in flags {
            assert!(arg.get_env().is_some(), "{}", arg.get_id());
            assert!(arg.is_hide_env_values_set(), "{}", arg.get_id());
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration(" 30m "), Ok(Duration::from_secs(1800)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("").is_err());
        let err = parse_duration("5 parsecs").unwrap_err();
        assert!(
            err.starts_with(r#""5 parsecs" is not a duration like 500ms, 5s, 2m or 1h"#),
            "{err}"
        );
    }
}
