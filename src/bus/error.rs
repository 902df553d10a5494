//! What the bus reports when it cannot start or store: [`BusError`], with a
//! [`BusErrorKind`] to match on and the NATS client's own error as source.
//!
//! Messages carry the cause's text too (they are what logs, the node's
//! startup error and `Notify`'s UNAVAILABLE say); URLs in them are shown
//! without their credentials.

use std::path::PathBuf;

use async_nats::{
    ConnectErrorKind,
    jetstream::{
        context::{self, CreateStreamErrorKind, PublishErrorKind, RequestErrorKind},
        stream::RetentionPolicy,
    },
};

/// What kind of failure a [`BusError`] is: match on this, not on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BusErrorKind {
    /// The bus is shut down.
    Closed,
    /// NATS or JetStream cannot take requests now (not connected, no
    /// JetStream responding, the connection dropped mid-request).
    Unavailable,
    /// The connection failed at the network level (refused, reset,
    /// unreachable).
    Io,
    /// A server's name did not resolve.
    Dns,
    /// The server refused the node's credentials.
    Auth,
    /// TLS setup or handshake failed.
    Tls,
    /// NATS did not answer in time.
    Timeout,
    /// The node's NATS settings are unusable: a bad or missing URL, an
    /// unreadable credentials file, half a TLS key pair.
    Config,
    /// The server is older than the oldest one supported.
    ServerTooOld,
    /// The stream exists with settings the bus cannot work with, or
    /// JetStream refused to create it.
    StreamConfig,
}

/// Bus failures. `Notify` maps them to `UNAVAILABLE`.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the bus is shut down")]
    Closed,
    #[error("NATS did not acknowledge the publish: {source}")]
    Unavailable {
        #[source]
        source: PublishError,
    },
    /// `url`: the configured URLs, without credentials.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: ConnectError,
    },
    #[error(
        "nats-server {version} is too old: entity-sync needs 2.10 or newer (older servers silently ignore consumer and stream options it relies on)"
    )]
    ServerTooOld { version: String },
    #[error("JetStream stream {stream}: {source}")]
    Stream {
        stream: String,
        #[source]
        source: StreamError,
    },
}

impl BusError {
    /// What kind of failure this is.
    pub fn kind(&self) -> BusErrorKind {
        match self {
            BusError::Closed => BusErrorKind::Closed,
            BusError::Unavailable { source } => source.kind(),
            BusError::Connect { source, .. } => source.kind(),
            BusError::ServerTooOld { .. } => BusErrorKind::ServerTooOld,
            BusError::Stream { source, .. } => source.kind(),
        }
    }
}

/// Why the node could not connect to NATS.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("credentials file {}: {source}", path.display())]
    Credentials {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--nats-tls-cert and --nats-tls-key go together")]
    HalfKeyPair,
    /// `url`: the URL as given, without credentials.
    #[error("bad URL {url:?}: {source}")]
    BadUrl {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no URL given")]
    NoUrl,
    /// The NATS client's connection attempt failed.
    #[error("{0}")]
    Nats(#[source] async_nats::ConnectError),
}

impl ConnectError {
    pub fn kind(&self) -> BusErrorKind {
        match self {
            ConnectError::Credentials { .. }
            | ConnectError::HalfKeyPair
            | ConnectError::BadUrl { .. }
            | ConnectError::NoUrl => BusErrorKind::Config,
            ConnectError::Nats(err) => match err.kind() {
                ConnectErrorKind::ServerParse => BusErrorKind::Config,
                ConnectErrorKind::Dns => BusErrorKind::Dns,
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                    BusErrorKind::Auth
                }
                ConnectErrorKind::TimedOut => BusErrorKind::Timeout,
                ConnectErrorKind::Tls => BusErrorKind::Tls,
                ConnectErrorKind::Io => BusErrorKind::Io,
                ConnectErrorKind::MaxReconnects => BusErrorKind::Unavailable,
            },
        }
    }
}

/// Why the bus could not set up or use its stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Creating (or looking up) the stream failed.
    #[error("{0}")]
    Create(#[source] context::CreateStreamError),
    /// Asking for the stream's state failed.
    #[error("{0}")]
    Info(#[source] context::RequestError),
    #[error(
        "exists with subjects {actual:?}, expected {expected:?}; use another --nats-prefix or fix the stream"
    )]
    Subjects {
        actual: Vec<String>,
        expected: Vec<String>,
    },
    #[error("exists with retention {0:?}, expected Limits (every node must read every change)")]
    Retention(RetentionPolicy),
    #[error("exists with max_msgs_per_subject set: sequence gaps would look like lost changes")]
    MaxMessagesPerSubject,
}

impl StreamError {
    pub fn kind(&self) -> BusErrorKind {
        match self {
            StreamError::Create(err) => match err.kind() {
                CreateStreamErrorKind::TimedOut => BusErrorKind::Timeout,
                CreateStreamErrorKind::JetStreamUnavailable
                | CreateStreamErrorKind::NotFound
                | CreateStreamErrorKind::Response
                | CreateStreamErrorKind::ResponseParse => BusErrorKind::Unavailable,
                CreateStreamErrorKind::EmptyStreamName
                | CreateStreamErrorKind::InvalidStreamName
                | CreateStreamErrorKind::DomainAndExternalSet => BusErrorKind::Config,
                CreateStreamErrorKind::JetStream(_) => BusErrorKind::StreamConfig,
            },
            StreamError::Info(err) => request_kind(err.kind()),
            StreamError::Subjects { .. }
            | StreamError::Retention(_)
            | StreamError::MaxMessagesPerSubject => BusErrorKind::StreamConfig,
        }
    }
}

/// Why a publish was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to NATS")]
    NotConnected,
    /// Sending the message or awaiting its PubAck failed.
    #[error("{0}")]
    Nats(#[source] context::PublishError),
    /// Sending a message of an atomic batch failed (nothing of the batch is
    /// stored: the server drops a batch that is never committed).
    #[error("{0}")]
    BatchSend(#[source] async_nats::PublishError),
    /// The commit of an atomic batch got no answer.
    #[error("{0}")]
    BatchCommit(#[source] async_nats::RequestError),
    /// JetStream refused an atomic batch: nothing of it is stored.
    /// `code` is JetStream's error code (`err_code`).
    #[error("JetStream refused the batch: {description} (error {code})")]
    BatchRefused { code: u64, description: String },
    /// The commit's answer was not a batch acknowledgement: the stream's
    /// leader does not know atomic batches (a server older than 2.12 in the
    /// cluster) and may have stored the messages one by one.
    #[error(
        "the batch was not stored atomically (acknowledged {count:?} of {expected} messages): is every server of the cluster 2.12 or newer?"
    )]
    NotAtomic { count: Option<u64>, expected: usize },
    /// The commit's answer was not JSON JetStream sends.
    #[error("unreadable batch acknowledgement: {0}")]
    BadAck(#[source] serde_json::Error),
}

impl PublishError {
    pub fn kind(&self) -> BusErrorKind {
        match self {
            PublishError::NotConnected
            | PublishError::BatchSend(_)
            | PublishError::BatchRefused { .. }
            | PublishError::NotAtomic { .. }
            | PublishError::BadAck(_) => BusErrorKind::Unavailable,
            PublishError::Nats(err) => match err.kind() {
                PublishErrorKind::TimedOut => BusErrorKind::Timeout,
                _ => BusErrorKind::Unavailable,
            },
            PublishError::BatchCommit(err) => match err.kind() {
                async_nats::RequestErrorKind::TimedOut => BusErrorKind::Timeout,
                _ => BusErrorKind::Unavailable,
            },
        }
    }
}

fn request_kind(kind: RequestErrorKind) -> BusErrorKind {
    match kind {
        RequestErrorKind::TimedOut => BusErrorKind::Timeout,
        RequestErrorKind::InvalidSubject => BusErrorKind::Config,
        RequestErrorKind::NoResponders | RequestErrorKind::Other => BusErrorKind::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn kinds_follow_the_nats_error_and_messages_keep_its_text() {
        let refused = BusError::Connect {
            url: "nats://***@n1:4222".into(),
            source: ConnectError::Nats(async_nats::ConnectError::with_source(
                ConnectErrorKind::Io,
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            )),
        };
        assert_eq!(refused.kind(), BusErrorKind::Io);
        assert!(
            refused
                .to_string()
                .starts_with("cannot connect to NATS at nats://***@n1:4222: IO error: "),
            "{refused}"
        );
        let source = refused.source().expect("a source");
        assert!(source.downcast_ref::<ConnectError>().is_some());

        let auth = ConnectError::Nats(ConnectErrorKind::AuthorizationViolation.into());
        assert_eq!(auth.kind(), BusErrorKind::Auth);
        assert_eq!(ConnectError::HalfKeyPair.kind(), BusErrorKind::Config);

        let ack = BusError::Unavailable {
            source: PublishError::Nats(PublishErrorKind::TimedOut.into()),
        };
        assert_eq!(ack.kind(), BusErrorKind::Timeout);
        assert_eq!(
            ack.to_string(),
            "NATS did not acknowledge the publish: timed out: didn't receive ack in time"
        );
        let down = BusError::Unavailable {
            source: PublishError::NotConnected,
        };
        assert_eq!(down.kind(), BusErrorKind::Unavailable);
        assert_eq!(
            down.to_string(),
            "NATS did not acknowledge the publish: not connected to NATS"
        );

        let stream = BusError::Stream {
            stream: "es_changes".into(),
            source: StreamError::MaxMessagesPerSubject,
        };
        assert_eq!(stream.kind(), BusErrorKind::StreamConfig);
        let not_ready = StreamError::Create(CreateStreamErrorKind::JetStreamUnavailable.into());
        assert_eq!(not_ready.kind(), BusErrorKind::Unavailable);
        assert_eq!(BusError::Closed.kind(), BusErrorKind::Closed);
    }
}
