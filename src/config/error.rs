//! The configurations a node refuses to start with.

use std::net::SocketAddr;

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
