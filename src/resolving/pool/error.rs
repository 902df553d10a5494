//! Why a resolve or a `Register` failed.

use std::sync::Arc;

use crate::websocket::protocol::RowError;

/// Why resolving a key failed.
///
/// Only [`ResolveError::resolver_message`], a resolver's own words, may be
/// shown to a websocket client; whoever builds the client's error frame
/// picks a fixed message for every other case and logs the error.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ResolveError {
    /// The resolver answered NOT_FOUND, with this message.
    #[error("the resolver answered NOT_FOUND")]
    NotFound(String),
    /// The resolver answered FORBIDDEN, with this message.
    #[error("the resolver answered FORBIDDEN")]
    Forbidden(String),
    /// The resolver answered ERROR, with this message.
    #[error("the resolver answered ERROR: {0}")]
    Failed(String),
    #[error("the resolver sent an invalid row")]
    InvalidRow(#[source] RowError),
    #[error("the resolver sent unknown status {0}")]
    UnknownStatus(i32),
    /// Browsers compare versions as JavaScript numbers, exact up to 2^53.
    #[error("the resolver sent version {0}, above 2^53")]
    VersionTooLarge(u64),
    #[error("the resolver's answer has no result for id {0:?}")]
    MissingResult(Arc<str>),
    #[error("undecodable cluster resolve reply")]
    BadClusterReply(#[source] prost::DecodeError),
    /// No resolver answered within the deadline, after retries.
    #[error("no resolver answered in time")]
    Timeout,
    /// No resolver serves the entity.
    #[error("no resolver serves the entity")]
    NoResolver,
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Closed,
}

/// What kind of failure a [`ResolveError`] is, for callers to decide on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResolveErrorKind {
    /// NOT_FOUND from the resolver.
    NotFound,
    /// FORBIDDEN from the resolver.
    Forbidden,
    /// ERROR from the resolver.
    Failed,
    /// The answer was malformed (a row, a status, a missing result, a reply).
    InvalidAnswer,
    Timeout,
    NoResolver,
    Closed,
}

impl ResolveError {
    pub(crate) fn kind(&self) -> ResolveErrorKind {
        match self {
            Self::NotFound(_) => ResolveErrorKind::NotFound,
            Self::Forbidden(_) => ResolveErrorKind::Forbidden,
            Self::Failed(_) => ResolveErrorKind::Failed,
            Self::InvalidRow(_)
            | Self::UnknownStatus(_)
            | Self::MissingResult(_)
            | Self::VersionTooLarge(_)
            | Self::BadClusterReply(_) => ResolveErrorKind::InvalidAnswer,
            Self::Timeout => ResolveErrorKind::Timeout,
            Self::NoResolver => ResolveErrorKind::NoResolver,
            Self::Closed => ResolveErrorKind::Closed,
        }
    }

    /// The message the resolver itself sent with NOT_FOUND, FORBIDDEN or
    /// ERROR, if not empty: the only text of a failure a client may see.
    pub(crate) fn resolver_message(&self) -> Option<&str> {
        match self {
            Self::NotFound(m) | Self::Forbidden(m) | Self::Failed(m) if !m.is_empty() => Some(m),
            _ => None,
        }
    }
}

/// Why a `Register` was refused. Each kind carries the message the backend
/// is told (the `Status` it gets is chosen by kind).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RegisterError {
    /// The `Register` itself is malformed.
    #[error("{0}")]
    Invalid(String),
    /// An entity is already served with another fetch mode.
    #[error("{0}")]
    Conflict(String),
    /// The node holds its maximum of resolver streams.
    #[error("{0}")]
    Full(String),
    #[error("node is shutting down")]
    Closed,
}
