//! Errors of the backend clients: a kind to match on, the gRPC code when the node sent one.

use std::{fmt, sync::Arc};

/// What went wrong, broadly; match on this rather than on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The builder was given something unusable (no name, a bad URL, ...).
    Config,
    /// The node could not be reached.
    Connect,
    /// The node refused the call for good: invalid, unauthenticated, not
    /// permitted. Retrying the same call will not help.
    Rejected,
    /// The node (or its bus) could not take the call now, and retries ran out.
    Unavailable,
    /// A `Resolve` stream broke, or the node broke the protocol.
    Stream,
}

/// A failure of [`Backend`](crate::Backend) or [`Notifier`](crate::Notifier).
/// Its [`source`](std::error::Error::source) is what it came from, when
/// anything did: the node's `tonic::Status`, or the transport's error.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    code: Option<tonic::Code>,
    message: String,
    /// Shared, so that an error stays cheap to clone.
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Equal when kind, code and message are (whatever their sources).
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        (self.kind, self.code, &self.message) == (other.kind, other.code, &other.message)
    }
}

impl Eq for Error {}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            code: None,
            message: message.into(),
            source: None,
        }
    }

    /// The same error, coming from `source`.
    pub(crate) fn with_source(
        mut self,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Classifies a status the node (or the transport) answered with.
    pub(crate) fn from_status(status: &tonic::Status) -> Self {
        use tonic::Code::*;
        let kind = match status.code() {
            // The client's own deadline expiring (tonic answers CANCELLED
            // "Timeout expired" for it) says the node did not answer in
            // time, not that the call was refused: worth another attempt.
            Cancelled if is_client_timeout(status) => ErrorKind::Unavailable,
            InvalidArgument | FailedPrecondition | Unauthenticated | PermissionDenied
            | Unimplemented | OutOfRange | AlreadyExists | NotFound => ErrorKind::Rejected,
            Unavailable | DeadlineExceeded | ResourceExhausted | Aborted => ErrorKind::Unavailable,
            _ => ErrorKind::Stream,
        };
        // A failure of the transport (a TLS alert, a reset connection) says
        // only "transport error": its causes say what happened.
        let message = with_causes(
            status.message().to_owned(),
            std::error::Error::source(status),
        );
        Self {
            kind,
            code: Some(status.code()),
            message,
            source: Some(Arc::new(status.clone())),
        }
    }

    /// The broad kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The gRPC code the node answered with, if the failure came from it.
    pub fn code(&self) -> Option<tonic::Code> {
        self.code
    }

    /// The node's message, or ours.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether trying the same thing again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self.kind {
            ErrorKind::Connect | ErrorKind::Unavailable | ErrorKind::Stream => true,
            // A fetch-mode conflict clears once the other registration leaves
            // (a rolling deploy that changes an entity's mode).
            ErrorKind::Rejected => self.code == Some(tonic::Code::FailedPrecondition),
            ErrorKind::Config => false,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ErrorKind::Config => "invalid configuration",
            ErrorKind::Connect => "cannot connect to the node",
            ErrorKind::Rejected => "rejected by the node",
            ErrorKind::Unavailable => "the node is unavailable",
            ErrorKind::Stream => "resolve stream failed",
        };
        match self.code {
            Some(code) => write!(f, "{kind} ({code:?}): {}", self.message),
            None => write!(f, "{kind}: {}", self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// Whether `status` is tonic's report of the call's own deadline expiring
/// on the client side (a `TimeoutExpired` in its causes), as opposed to a
/// CANCELLED the node sent.
fn is_client_timeout(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// `text: cause: its cause: ...`, leaving out a cause that only repeats the
/// text before it (tonic's and rustls's errors often do).
pub(crate) fn with_causes(
    mut text: String,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> String {
    while let Some(err) = source {
        let cause = err.to_string();
        if !text.ends_with(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = err.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_kept_as_the_source() {
        let err = Error::from_status(&tonic::Status::unavailable("bus down"));
        let source = std::error::Error::source(&err).expect("a source");
        let status = source
            .downcast_ref::<tonic::Status>()
            .expect("the node's status");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "bus down");
        // Clones share it; equality ignores it.
        assert_eq!(err.clone(), err);
        assert!(std::error::Error::source(&err.clone()).is_some());
        let own = Error::new(ErrorKind::Config, "no name");
        assert!(std::error::Error::source(&own).is_none());
    }

    #[test]
    fn statuses_are_classified() {
        let refused = Error::from_status(&tonic::Status::permission_denied("no"));
        assert_eq!(refused.kind(), ErrorKind::Rejected);
        assert!(!refused.is_retryable());
        let conflict = Error::from_status(&tonic::Status::failed_precondition("mode"));
        assert_eq!(conflict.kind(), ErrorKind::Rejected);
        assert!(conflict.is_retryable());
        let down = Error::from_status(&tonic::Status::unavailable("bus"));
        assert_eq!(down.kind(), ErrorKind::Unavailable);
        assert!(down.is_retryable());
        assert_eq!(
            down.to_string(),
            "the node is unavailable (Unavailable): bus"
        );
    }

    #[test]
    fn the_clients_own_deadline_expiring_is_retryable() {
        // What tonic's channel answers when a call's timeout passes.
        let expired = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(expired.code(), tonic::Code::Cancelled);
        let error = Error::from_status(&expired);
        assert_eq!(error.kind(), ErrorKind::Unavailable);
        assert!(error.is_retryable());
        // A CANCELLED the node itself sent is not a timeout.
        let cancelled = Error::from_status(&tonic::Status::cancelled("stopped"));
        assert_eq!(cancelled.kind(), ErrorKind::Stream);
    }
}
