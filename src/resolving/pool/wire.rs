//! Resolver answers on the wire: reading a `KeyResult` into rows or an
//! error, and writing one back for another node.

use bytes::Bytes;

use super::error::{ResolveError, ResolveErrorKind};
use crate::{proto::v1::KeyResult, websocket::protocol::validate_row};

/// Largest version a resolver may give: 2^53, the last integer a browser's
/// JavaScript number holds exactly (versions above it would compare wrong).
pub(crate) const MAX_VERSION: u64 = 1 << 53;

/// Outcome of resolving one key for one secret.
pub(crate) type Resolved = Result<Rows, ResolveError>;

/// A key's rows, as a resolver returned them.
#[derive(Debug, Clone)]
pub(crate) struct Rows {
    /// Each one JSON value (validated on arrival), in the resolver's order.
    pub(crate) rows: Vec<Bytes>,
    /// The resolver's own version of the rows; 0 when it gave none.
    pub(crate) version: u64,
}

/// Interprets one `KeyResult` from a resolver (or another node), validating its rows.
pub(crate) fn read_key_result(result: KeyResult) -> Resolved {
    use crate::proto::v1::Status as S;
    match S::try_from(result.status) {
        Ok(S::Ok) => {
            for row in &result.rows {
                validate_row(row).map_err(ResolveError::InvalidRow)?;
            }
            if result.version > MAX_VERSION {
                return Err(ResolveError::VersionTooLarge(result.version));
            }
            Ok(Rows {
                rows: result.rows,
                version: result.version,
            })
        }
        Ok(S::NotFound) => Err(ResolveError::NotFound(result.message)),
        Ok(S::Forbidden) => Err(ResolveError::Forbidden(result.message)),
        Ok(S::Error) => Err(ResolveError::Failed(result.message)),
        Ok(S::Unspecified) | Err(_) => Err(ResolveError::UnknownStatus(result.status)),
    }
}

/// The `KeyResult` for `id` that [`read_key_result`] reads back (a node's
/// answer to another node). Failures without a status of their own become
/// ERROR with a fixed message, never the inner error's text: the other node
/// may show the message to its clients.
pub(crate) fn key_result(outcome: Resolved, id: &str) -> KeyResult {
    use crate::proto::v1::Status as S;
    let (status, rows, version, message) = match outcome {
        Ok(Rows { rows, version }) => (S::Ok, rows, version, String::new()),
        Err(ResolveError::NotFound(m)) => (S::NotFound, Vec::new(), 0, m),
        Err(ResolveError::Forbidden(m)) => (S::Forbidden, Vec::new(), 0, m),
        Err(ResolveError::Failed(m)) => (S::Error, Vec::new(), 0, m),
        Err(err) => {
            let message = match err.kind() {
                ResolveErrorKind::Timeout => "resolver timed out",
                ResolveErrorKind::NoResolver | ResolveErrorKind::Closed => "no resolver",
                _ => "the resolver sent an invalid answer",
            };
            (S::Error, Vec::new(), 0, message.to_string())
        }
    };
    KeyResult {
        id: id.to_string(),
        status: status as i32,
        rows,
        version,
        message,
    }
}

/// A successful answer of `rows` without a version (for the pool's tests).
#[cfg(test)]
pub(super) fn ok(rows: &[&'static str]) -> Resolved {
    Ok(Rows {
        rows: rows
            .iter()
            .map(|r| Bytes::from_static(r.as_bytes()))
            .collect(),
        version: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::websocket::protocol::RowError;

    #[test]
    fn invalid_rows_become_errors() {
        let result = KeyResult {
            id: "1".into(),
            status: crate::proto::v1::Status::Ok as i32,
            rows: vec![Bytes::from_static(b"{oops")],
            version: 0,
            message: String::new(),
        };
        let err = read_key_result(result).unwrap_err();
        assert!(matches!(
            err,
            ResolveError::InvalidRow(RowError::NotJson(_))
        ));
        assert_eq!(err.kind(), ResolveErrorKind::InvalidAnswer);
        assert_eq!(err.resolver_message(), None);
        assert!(
            std::error::Error::source(&err).is_some(),
            "the row error is kept"
        );
    }

    #[test]
    fn statuses_are_read_with_the_resolvers_own_message() {
        use crate::proto::v1::Status as S;
        let result = |status: i32, message: &str| KeyResult {
            id: "1".into(),
            status,
            rows: Vec::new(),
            version: 0,
            message: message.into(),
        };
        let err = read_key_result(result(S::Forbidden as i32, "not yours")).unwrap_err();
        assert_eq!(err.kind(), ResolveErrorKind::Forbidden);
        assert_eq!(err.resolver_message(), Some("not yours"));
        let err = read_key_result(result(S::Error as i32, "")).unwrap_err();
        assert_eq!(err.kind(), ResolveErrorKind::Failed);
        assert_eq!(err.resolver_message(), None, "empty: the edge picks one");
        let err = read_key_result(result(99, "")).unwrap_err();
        assert!(matches!(err, ResolveError::UnknownStatus(99)));
    }

    #[test]
    fn node_to_node_results_carry_no_internal_text() {
        let invalid = read_key_result(KeyResult {
            id: "1".into(),
            status: crate::proto::v1::Status::Ok as i32,
            rows: vec![Bytes::from_static(b"{oops")],
            version: 0,
            message: String::new(),
        });
        let sent = key_result(invalid, "1");
        assert_eq!(sent.status, crate::proto::v1::Status::Error as i32);
        assert_eq!(sent.message, "the resolver sent an invalid answer");
        let sent = key_result(Err(ResolveError::Failed("db down".into())), "1");
        assert_eq!(sent.message, "db down", "the resolver's own message passes");
        for (err, message) in [
            (ResolveError::Timeout, "resolver timed out"),
            (ResolveError::NoResolver, "no resolver"),
            (ResolveError::Closed, "no resolver"),
        ] {
            assert_eq!(key_result(Err(err), "1").message, message);
        }
        let back = read_key_result(key_result(ok(&["{}", "[1]"]), "1")).unwrap();
        assert_eq!(back.rows.len(), 2);
    }

    #[test]
    fn versions_above_2_pow_53_are_invalid_answers() {
        let result = |version| KeyResult {
            id: "1".into(),
            status: crate::proto::v1::Status::Ok as i32,
            rows: vec![],
            version,
            message: String::new(),
        };
        assert!(read_key_result(result(MAX_VERSION)).is_ok());
        let err = read_key_result(result(MAX_VERSION + 1)).unwrap_err();
        assert_eq!(err.kind(), ResolveErrorKind::InvalidAnswer);
    }
}
