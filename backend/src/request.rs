//! What a handler is given (a resolve request, a pass-through message) and what it answers.

use std::{collections::HashMap, fmt};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

use crate::proto::v1::{self as pb, Reason};

/// A subscriber's secret. Its `Debug` output is redacted, so a request can
/// be logged whole without leaking it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub(crate) fn new(secret: String) -> Self {
        Self(secret)
    }

    /// The secret itself, to check it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the subscriber sent no secret (or this is a shared resolve).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("Secret(none)")
        } else {
            f.write_str("Secret(redacted)")
        }
    }
}

/// The node asks for the current rows of some ids of one entity.
#[derive(Debug, Clone)]
pub struct ResolveRequest {
    entity: String,
    ids: Vec<String>,
    secret: Secret,
    reason: Reason,
    shared: bool,
}

impl ResolveRequest {
    pub(crate) fn from_proto(request: pb::ResolveRequest) -> (u64, Self) {
        let reason = Reason::try_from(request.reason).unwrap_or(Reason::Unspecified);
        (
            request.request_id,
            Self {
                entity: request.entity,
                ids: request.ids,
                secret: Secret::new(request.secret),
                reason,
                shared: request.shared,
            },
        )
    }

    /// A request built by hand, to unit-test a handler (not shared; see
    /// [`shared`](Self::shared)).
    pub fn new(
        entity: impl Into<String>,
        ids: impl IntoIterator<Item = impl Into<String>>,
        secret: impl Into<String>,
        reason: Reason,
    ) -> Self {
        Self {
            entity: entity.into(),
            ids: ids.into_iter().map(Into::into).collect(),
            secret: Secret::new(secret.into()),
            reason,
            shared: false,
        }
    }

    /// The same request marked as a SHARED change resolve (or not), to
    /// unit-test a handler.
    pub fn shared(mut self, shared: bool) -> Self {
        self.shared = shared;
        self
    }

    /// The entity, one the backend registered.
    pub fn entity(&self) -> &str {
        &self.entity
    }

    /// The ids to answer, each once. Answer every one.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// The subscriber's secret: empty for a client that sent none, and for a
    /// change resolve of a SHARED entity (whose subscribers were authorized
    /// when they subscribed). [`is_shared`](Self::is_shared) tells the two
    /// apart: never authorize an empty secret on a shared request as an
    /// anonymous client, and never answer an anonymous client as if shared.
    ///
    /// A client that sends a new secret has every key it holds asked again
    /// with it (reason SUBSCRIBE), so answering FORBIDDEN there ends that
    /// client's subscription.
    pub fn secret(&self) -> &str {
        self.secret.expose()
    }

    /// Whether the rows go to subscribers the node authorized already
    /// (`ResolveRequest.shared`), for an entity registered with
    /// `FETCH_MODE_SHARED`; the secret is empty. Either reason CHANGE (a
    /// change's rows for every subscriber of the key, each authorized when
    /// it subscribed) or reason SUBSCRIBE (the snapshot for subscribers whose
    /// signed subscribe token the node verified). Never true for a subscribe
    /// the backend must authorize with its secret.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Why the node asks: a client subscribes, or the key changed.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// Whether a client is subscribing (authorize it now).
    pub fn is_subscribe(&self) -> bool {
        self.reason == Reason::Subscribe
    }
}

/// How one id is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    status: pb::Status,
    rows: Vec<Bytes>,
    version: u64,
    message: String,
}

impl Answer {
    /// The key's rows, each serialized to JSON, in order (a row and the rows
    /// it refers to, say). A row that cannot be serialized makes the whole
    /// answer an error (logged here; the client sees `resolver_error`).
    pub fn rows<T: Serialize>(rows: impl IntoIterator<Item = T>) -> Answer {
        let mut out = Vec::new();
        for row in rows {
            match serde_json::to_vec(&row) {
                Ok(json) => out.push(Bytes::from(json)),
                Err(err) => {
                    tracing::warn!(%err, "a row could not be serialized to JSON");
                    return Answer::error("the backend could not serialize a row");
                }
            }
        }
        Answer::json_rows(out)
    }

    /// A key with one row.
    pub fn row<T: Serialize>(row: T) -> Answer {
        Answer::rows([row])
    }

    /// Rows that already are JSON texts (from the database, say). The node
    /// checks each is one JSON value; an invalid one fails the key.
    pub fn json_rows(rows: impl IntoIterator<Item = impl Into<Bytes>>) -> Answer {
        Answer {
            status: pb::Status::Ok,
            rows: rows.into_iter().map(Into::into).collect(),
            version: 0,
            message: String::new(),
        }
    }

    /// No such key: subscribing fails with `not_found`; a subscriber of a key
    /// that is gone gets a push with no rows.
    pub fn not_found() -> Answer {
        Answer::status(pb::Status::NotFound, String::new())
    }

    /// This secret may not read the key: subscribing fails with `forbidden`,
    /// and on a change the subscription ends. `message` reaches the client.
    pub fn forbidden(message: impl Into<String>) -> Answer {
        Answer::status(pb::Status::Forbidden, message.into())
    }

    /// The backend could not answer now; the node retries changes with
    /// backoff. `message` reaches a subscribing client: keep internals out.
    pub fn error(message: impl Into<String>) -> Answer {
        Answer::status(pb::Status::Error, message.into())
    }

    fn status(status: pb::Status, message: String) -> Answer {
        Answer {
            status,
            rows: Vec::new(),
            version: 0,
            message,
        }
    }

    /// The backend's own version of the rows (a row version, an update
    /// counter). Pushes carry it instead of the bus sequence; it must grow
    /// with every change of the key. 0 (the default) means "use the bus's".
    pub fn version(mut self, version: u64) -> Answer {
        self.version = version;
        self
    }

    /// Whether this answer carries rows.
    pub fn is_ok(&self) -> bool {
        self.status == pb::Status::Ok
    }

    /// The rows, as JSON texts.
    pub fn json(&self) -> &[Bytes] {
        &self.rows
    }

    pub(crate) fn into_result(self, id: String) -> pb::KeyResult {
        pb::KeyResult {
            id,
            status: self.status as i32,
            rows: self.rows,
            version: self.version,
            message: self.message,
        }
    }
}

/// A handler's answers, by id. Collect them from `(id, Answer)` pairs, or
/// [`insert`](Answers::insert) one at a time. An id of the request left
/// unanswered is answered as an error.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answers(HashMap<String, Answer>);

impl Answers {
    pub fn new() -> Answers {
        Answers::default()
    }

    /// The same answer for every id of `request` (`not_found`, say).
    pub fn all(request: &ResolveRequest, answer: Answer) -> Answers {
        request
            .ids()
            .iter()
            .map(|id| (id.clone(), answer.clone()))
            .collect()
    }

    pub fn insert(&mut self, id: impl Into<String>, answer: Answer) -> &mut Answers {
        self.0.insert(id.into(), answer);
        self
    }

    pub fn get(&self, id: &str) -> Option<&Answer> {
        self.0.get(id)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One result per requested id, in the request's order.
    pub(crate) fn into_results(mut self, entity: &str, ids: &[String]) -> Vec<pb::KeyResult> {
        ids.iter()
            .map(|id| match self.0.remove(id) {
                Some(answer) => answer.into_result(id.clone()),
                None => {
                    tracing::warn!(entity, key.id = %id, "the handler gave no answer for an id");
                    Answer::error("the backend gave no answer for this id").into_result(id.clone())
                }
            })
            .collect()
    }
}

impl<K: Into<String>> FromIterator<(K, Answer)> for Answers {
    fn from_iter<T: IntoIterator<Item = (K, Answer)>>(iter: T) -> Self {
        Answers(iter.into_iter().map(|(k, a)| (k.into(), a)).collect())
    }
}

impl<K: Into<String>> Extend<(K, Answer)> for Answers {
    fn extend<T: IntoIterator<Item = (K, Answer)>>(&mut self, iter: T) {
        self.0.extend(iter.into_iter().map(|(k, a)| (k.into(), a)));
    }
}

/// A client's websocket message without an `action`, forwarded by the node
/// to backends that registered for pass-through.
#[derive(Debug, Clone)]
pub struct PassThrough {
    connection_id: String,
    secret: Secret,
    payload: Bytes,
}

impl PassThrough {
    pub(crate) fn from_proto(message: pb::PassThrough) -> Self {
        Self {
            connection_id: message.connection_id,
            secret: Secret::new(message.secret),
            payload: message.payload,
        }
    }

    /// Which connection sent it (unique across the cluster's nodes).
    pub fn connection_id(&self) -> &str {
        &self.connection_id
    }

    /// The connection's secret when it sent the message.
    pub fn secret(&self) -> &str {
        self.secret.expose()
    }

    /// The message as the client sent it (a JSON text).
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// The message parsed as `T`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let request = ResolveRequest::new("items", ["1"], "hunter2", Reason::Subscribe);
        let debug = format!("{request:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("Secret(redacted)"), "{debug}");
        assert_eq!(request.secret(), "hunter2");
    }

    #[test]
    fn shared_comes_from_the_proto_field() {
        let proto = |shared| pb::ResolveRequest {
            request_id: 7,
            entity: "items".into(),
            ids: vec!["1".into()],
            secret: String::new(),
            reason: Reason::Change as i32,
            shared,
        };
        let (id, shared) = ResolveRequest::from_proto(proto(true));
        assert_eq!(id, 7);
        assert!(shared.is_shared());
        assert_eq!(shared.secret(), "");
        let (_, anonymous) = ResolveRequest::from_proto(proto(false));
        assert!(!anonymous.is_shared());
        let by_hand = ResolveRequest::new("items", ["1"], "", Reason::Change);
        assert!(!by_hand.is_shared());
        assert!(by_hand.shared(true).is_shared());
    }

    #[test]
    fn rows_serialize_in_order_and_unanswered_ids_become_errors() {
        #[derive(Serialize)]
        struct Row {
            id: u32,
        }
        let answers: Answers = [("1", Answer::rows([Row { id: 1 }, Row { id: 7 }]).version(3))]
            .into_iter()
            .collect();
        let results = answers.into_results("items", &["1".to_owned(), "2".to_owned()]);
        assert_eq!(results.len(), 2);
        assert_eq!(results[0].id, "1");
        assert_eq!(results[0].status, pb::Status::Ok as i32);
        assert_eq!(
            results[0].rows,
            vec![Bytes::from(r#"{"id":1}"#), Bytes::from(r#"{"id":7}"#)]
        );
        assert_eq!(results[0].version, 3);
        assert_eq!(results[1].id, "2");
        assert_eq!(results[1].status, pb::Status::Error as i32);
    }

    #[test]
    fn unserializable_rows_become_an_error() {
        // A map with non-string keys has no JSON form.
        let row: HashMap<(u8, u8), u8> = HashMap::from([((1, 2), 3)]);
        let answer = Answer::row(row);
        assert!(!answer.is_ok());
        assert_eq!(answer.status, pb::Status::Error);
    }
}
