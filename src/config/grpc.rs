//! The `gRPC` section: the port of `Notify` and the backends' `Resolve` streams.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;

use crate::config::error::ConfigError;
use crate::config::values::{defaults, parse_duration};

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
    /// `(cert, key)` when the port speaks TLS (after `Config::validate`).
    pub fn tls_identity(&self) -> Option<(&Path, &Path)> {
        Some((self.tls_cert.as_deref()?, self.tls_key.as_deref()?))
    }

    /// Whether every gRPC client must present a certificate signed by
    /// --grpc-tls-client-ca (mutual TLS). Valid once `Config::validate`
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

impl Default for GrpcConfig {
    fn default() -> Self {
        defaults()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exposed_grpc_port_needs_credentials_or_insecure() {
        let mut grpc = GrpcConfig::default();
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
        let mut grpc = GrpcConfig::default();
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
}
