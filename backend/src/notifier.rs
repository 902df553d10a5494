//! [`Notifier`]: tells the nodes which keys changed, retrying under one idempotency key.

use std::{fmt, time::Duration};

use tokio::time::Instant;
use tonic::transport::Channel;

use crate::{
    Error, ErrorKind,
    backoff::Backoff,
    connect::{NodeClient, NodeEndpoint},
    proto::v1::{EntityKey, NotifyRequest},
};

/// How long one `notify` keeps retrying, unless set.
pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(30);
/// Deadline of one attempt, unless set.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// gRPC metadata naming a `Notify` call's trace id, both ways.
const TRACE_ID_HEADER: &str = "x-trace-id";
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// The shortest deadline an attempt is given near the end of the window.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);

/// A changed key: `(entity, id)`. Built from pairs: `("items", "101")`,
/// `("items", 101)`, `(String, String)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub entity: String,
    pub id: String,
}

impl<E: Into<String>, I: fmt::Display> From<(E, I)> for Key {
    fn from((entity, id): (E, I)) -> Self {
        Key {
            entity: entity.into(),
            id: id.to_string(),
        }
    }
}

/// What the node answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// How many keys the bus stored.
    pub accepted: u32,
    /// The bus sequence of each key, in order: pushes of these changes carry
    /// versions at or above them.
    pub sequences: Vec<u64>,
    /// The idempotency key was seen before: an earlier attempt was applied.
    pub duplicate: bool,
    /// Calls it took (1 without retries).
    pub attempts: u32,
    /// The trace id the node logs this change under (its `x-trace-id`
    /// answer): the one given to [`notify_traced`](Notifier::notify_traced),
    /// else one the node made. Empty from a node that sends none.
    pub trace_id: String,
}

/// Calls `Notify` on a node. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Notifier {
    client: NodeClient,
    retry_for: Duration,
    call_timeout: Duration,
    idempotency_keys: bool,
}

/// Configures a [`Notifier`].
pub struct NotifierBuilder {
    endpoint: NodeEndpoint,
    retry_for: Duration,
    call_timeout: Duration,
    idempotency_keys: bool,
}

impl Notifier {
    /// Connects to the node at `endpoint` now, with the defaults.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Notifier, Error> {
        Notifier::builder(endpoint).connect().await
    }

    pub fn builder(endpoint: impl Into<String>) -> NotifierBuilder {
        NotifierBuilder {
            endpoint: NodeEndpoint::new(endpoint),
            retry_for: DEFAULT_RETRY_FOR,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            idempotency_keys: true,
        }
    }

    /// Tells the node that `keys` changed; returns once the bus stored every
    /// one (pushes follow). While the node or its bus is unavailable, it
    /// retries with backoff for up to the retry window, under one
    /// idempotency key, so that a retry of a call that did get through is
    /// not applied twice.
    pub async fn notify<K: Into<Key>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Receipt, Error> {
        let key = if self.idempotency_keys {
            random_idempotency_key()
        } else {
            String::new()
        };
        self.notify_with_key(keys, &key).await
    }

    /// Like [`notify`](Notifier::notify) under the caller's idempotency key
    /// (a change id, say), so that even a notify repeated after a restart of
    /// the caller is applied once within the bus's duplicate window.
    pub async fn notify_with_key<K: Into<Key>>(
        &self,
        keys: impl IntoIterator<Item = K>,
        idempotency_key: &str,
    ) -> Result<Receipt, Error> {
        self.send(keys, idempotency_key, "").await
    }

    /// Like [`notify`](Notifier::notify) (or, with `Some` idempotency key,
    /// [`notify_with_key`](Notifier::notify_with_key)), with the trace id
    /// (32 hex digits, e.g. the caller's W3C trace-id) under which the nodes
    /// log the change from this call to its pushes; every retry carries it.
    /// Empty: the node makes one (see [`Receipt::trace_id`]).
    pub async fn notify_traced<K: Into<Key>>(
        &self,
        keys: impl IntoIterator<Item = K>,
        idempotency_key: Option<&str>,
        trace_id: &str,
    ) -> Result<Receipt, Error> {
        match idempotency_key {
            Some(key) => self.send(keys, key, trace_id).await,
            None if self.idempotency_keys => {
                self.send(keys, &random_idempotency_key(), trace_id).await
            }
            None => self.send(keys, "", trace_id).await,
        }
    }

    async fn send<K: Into<Key>>(
        &self,
        keys: impl IntoIterator<Item = K>,
        idempotency_key: &str,
        trace_id: &str,
    ) -> Result<Receipt, Error> {
        // A value gRPC metadata cannot carry is left out: the node would
        // ignore an invalid id anyway and make its own.
        let trace_header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
            (!trace_id.is_empty())
                .then(|| trace_id.parse().ok())
                .flatten();
        let request = NotifyRequest {
            keys: keys
                .into_iter()
                .map(|k| {
                    let k = k.into();
                    EntityKey {
                        entity: k.entity,
                        id: k.id,
                    }
                })
                .collect(),
            idempotency_key: idempotency_key.to_owned(),
        };
        let give_up = Instant::now() + self.retry_for;
        let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
        let mut attempts = 0;
        loop {
            attempts += 1;
            // The first attempt gets its whole deadline (a zero window means
            // exactly one attempt); a retry gets at most what is left of the
            // window, so that the caller's deadline is the window, not the
            // window plus one more attempt.
            let attempt_timeout = if attempts == 1 {
                self.call_timeout
            } else {
                self.call_timeout
                    .min(give_up.saturating_duration_since(Instant::now()))
                    .max(MIN_ATTEMPT)
            };
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(attempt_timeout);
            if let Some(value) = &trace_header {
                call.metadata_mut().insert(TRACE_ID_HEADER, value.clone());
            }
            let error = match self.client.clone().notify(call).await {
                Ok(response) => {
                    let trace_id = response
                        .metadata()
                        .get(TRACE_ID_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    let response = response.into_inner();
                    return Ok(Receipt {
                        accepted: response.accepted,
                        sequences: response.sequences,
                        duplicate: response.duplicate,
                        attempts,
                        trace_id,
                    });
                }
                Err(status) => Error::from_status(&status),
            };
            // CANCELLED: the call ended before an answer, its outcome
            // unknown (the node's gRPC server ends a call at the deadline
            // this attempt sent, which can arrive before our own timer
            // fires). Safe to repeat under the same idempotency key.
            let cancelled = error.code() == Some(tonic::Code::Cancelled);
            if error.kind() != ErrorKind::Unavailable && !cancelled {
                return Err(error);
            }
            // An attempt whose deadline passed (the node or its bus hung) is
            // retried like an UNAVAILABLE answer, under the same key: if it
            // did get through, the node answers the retry as a duplicate.
            let delay = backoff.next_delay();
            if Instant::now() + delay + MIN_ATTEMPT > give_up {
                tracing::warn!(%error, attempts, "notify failed; retries exhausted");
                return Err(error);
            }
            tracing::debug!(%error, attempts, ?delay, "notify failed; retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

impl NotifierBuilder {
    /// How long one `notify` keeps retrying while the node is unavailable or
    /// does not answer in time (default 30 s; zero: no retry). It is the
    /// call's deadline: a retry is given at most what is left of it, so a
    /// `notify` returns within the window (or the first attempt's deadline,
    /// when that is longer).
    pub fn retry_for(mut self, window: Duration) -> Self {
        self.retry_for = window;
        self
    }

    /// Deadline of each attempt (default 10 s). An attempt past it is
    /// retried under the same idempotency key, within the retry window.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// How long a connection attempt may take (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.endpoint.connect_timeout = timeout;
        self
    }

    /// A notifier token of the node's `--grpc-tokens-file`, sent as
    /// `authorization: Bearer TOKEN` (never logged).
    pub fn bearer_token(mut self, token: impl Into<String>) -> Self {
        self.endpoint.token = Some(crate::Secret::new(token.into()));
        self
    }

    /// Connects over TLS (the node's URL must then be `https://`); see [`Tls`](crate::Tls).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: crate::Tls) -> Self {
        self.endpoint.tls = Some(tls);
        self
    }

    /// Whether `notify` sends a fresh idempotency key with each call
    /// (default on). Off, a retried call may be applied twice, which costs
    /// one more resolve and nothing else.
    pub fn idempotency_keys(mut self, on: bool) -> Self {
        self.idempotency_keys = on;
        self
    }

    /// Connects now; fails if the node cannot be reached.
    pub async fn connect(self) -> Result<Notifier, Error> {
        self.endpoint.credentials()?;
        let channel = self.endpoint.connect().await?;
        self.with_channel(channel)
    }

    /// Connects on first use (and again after the node comes back); fails
    /// only on a bad URL.
    pub fn connect_lazy(self) -> Result<Notifier, Error> {
        let channel = self.endpoint.connect_lazy()?;
        self.with_channel(channel)
    }

    fn with_channel(self, channel: Channel) -> Result<Notifier, Error> {
        Ok(Notifier {
            client: self.endpoint.client(channel)?,
            retry_for: self.retry_for,
            call_timeout: self.call_timeout,
            idempotency_keys: self.idempotency_keys,
        })
    }
}

/// 128 random bits in hex: unique enough that two calls never share one.
fn random_idempotency_key() -> String {
    format!("{:032x}", fastrand::u128(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_pairs() {
        assert_eq!(
            Key::from(("items", 101)),
            Key {
                entity: "items".into(),
                id: "101".into()
            }
        );
        assert_eq!(Key::from((String::from("a"), String::from("b"))).id, "b");
    }

    #[test]
    fn idempotency_keys_differ() {
        let (a, b) = (random_idempotency_key(), random_idempotency_key());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
