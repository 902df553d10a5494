//! Thin public wrappers over the internals that untrusted input reaches, for the fuzz targets (`fuzz/`) and `tests/fuzz_properties.rs`.
//!
//! Not part of the API (`#[doc(hidden)]`): each function here calls the
//! crate's own code unchanged and only translates its crate-private types
//! into plain ones, so what is fuzzed is what the node runs. The properties
//! checked live with the targets, in `fuzz/src/lib.rs`.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::{
    config::ResolveConfig,
    key::{ChangeKey, validate_part},
    ops::metrics::Metrics,
    proto::v1::{FetchMode, KeyResult, Register},
    resolving::pool::{self, RegisterError, ResolveError, ResolveErrorKind, ResolverPool},
    websocket::protocol::{self, ClientMessage, ErrorCode, Payload, PushFrame},
};

/// Most entities one `Register` may name (`resolver`'s rule).
pub const MAX_ENTITIES_PER_STREAM: usize = crate::resolving::pool::MAX_ENTITIES_PER_STREAM;
/// Largest resolver version accepted: 2^53 (`resolver`'s rule).
pub const MAX_VERSION: u64 = crate::resolving::pool::MAX_VERSION;
/// Longest entity name or id accepted, in bytes (`key`'s rule).
pub const MAX_KEY_PART_BYTES: usize = crate::key::MAX_KEY_PART_BYTES;
/// Upper bound on a resolver's `max_in_flight` (`resolver`'s rule).
pub const MAX_IN_FLIGHT_CAP: u32 = crate::resolving::pool::MAX_IN_FLIGHT_CAP;
/// Channel room a resolver stream gets beyond its `max_in_flight`.
pub const PASS_THROUGH_HEADROOM: usize = crate::resolving::pool::PASS_THROUGH_HEADROOM;

/// A decoded websocket message, with the key as plain strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Subscribe { entity: String, id: String },
    Unsubscribe { entity: String, id: String },
    Secret(String),
    PassThrough,
}

/// A refused websocket message: what the node puts in the `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

/// `protocol::decode`.
pub fn decode(text: &str) -> Result<Decoded, Refused> {
    let plain = |key: ChangeKey| (key.entity.to_string(), key.id.to_string());
    match protocol::decode(text) {
        Ok(ClientMessage::Subscribe(key)) => {
            let (entity, id) = plain(key);
            Ok(Decoded::Subscribe { entity, id })
        }
        Ok(ClientMessage::Unsubscribe(key)) => {
            let (entity, id) = plain(key);
            Ok(Decoded::Unsubscribe { entity, id })
        }
        Ok(ClientMessage::Secret(secret)) => Ok(Decoded::Secret(secret)),
        Ok(ClientMessage::PassThrough) => Ok(Decoded::PassThrough),
        Err(err) => Err(Refused {
            code: err.code,
            message: err.message,
        }),
    }
}

/// `key::validate_part` on both parts: whether `(entity, id)` is a key.
pub fn is_valid_key(entity: &str, id: &str) -> bool {
    ChangeKey::new(entity, id).is_ok()
}

/// `key::validate_part` for an entity name alone (as `Register` checks it).
pub fn is_valid_entity(entity: &str) -> bool {
    validate_part("entity", entity).is_ok()
}

fn key(entity: &str, id: &str) -> ChangeKey {
    ChangeKey::new(entity, id).expect("callers pass a valid key (see is_valid_key)")
}

fn text(frame: protocol::FrameText) -> String {
    String::from_utf8(frame.into_bytes().to_vec()).expect("a FrameText is UTF-8")
}

/// `protocol::subscribed_frame`. Panics on an invalid key.
pub fn subscribed_frame(entity: &str, id: &str) -> String {
    text(protocol::subscribed_frame(&key(entity, id)))
}

/// `protocol::unsubscribed_frame`. Panics on an invalid key.
pub fn unsubscribed_frame(entity: &str, id: &str) -> String {
    text(protocol::unsubscribed_frame(&key(entity, id)))
}

/// `protocol::error_frame`. Panics on an invalid key.
pub fn error_frame(code: ErrorCode, message: &str, key_parts: Option<(&str, &str)>) -> String {
    let key = key_parts.map(|(entity, id)| key(entity, id));
    text(protocol::error_frame(code, message, key.as_ref()))
}

/// `PushFrame::build`: the envelope, or one frame per row when `bare_rows`.
/// Panics on an invalid key.
pub fn push_frames(
    entity: &str,
    id: &str,
    version: u64,
    rows: &[Bytes],
    bare_rows: bool,
) -> Vec<String> {
    match PushFrame::build(&key(entity, id), version, rows, bare_rows).payload {
        Payload::One(frame) => vec![text(frame)],
        Payload::Many(frames) => frames.iter().cloned().map(text).collect(),
    }
}

/// A resolver answer the node refused, reduced to what callers may match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    /// `ResolveError::resolver_message`: the only text a client may see.
    pub resolver_message: Option<String>,
    /// The error frame a subscriber of `key` gets (`dispatcher`'s mapping).
    pub code: ErrorCode,
    pub message: String,
    inner: Arc<str>,
}

impl Failure {
    /// The inner error's `Display` (logged, never sent to a client).
    pub fn detail(&self) -> &str {
        &self.inner
    }
}

/// Which `ResolveError` a [`Failure`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    NotFound,
    Forbidden,
    Failed,
    InvalidRow,
    UnknownStatus,
    VersionTooLarge,
    Other,
}

/// `pool::read_key_result`, as a subscribe of `(entity, id)` handles it:
/// the rows and version, or the failure and its error frame's code and
/// message. Panics on an invalid key.
pub fn read_key_result(
    entity: &str,
    id: &str,
    result: KeyResult,
) -> Result<(Vec<Bytes>, u64), Failure> {
    let err = match pool::read_key_result(result) {
        Ok(rows) => return Ok((rows.rows, rows.version)),
        Err(err) => err,
    };
    let kind = match (&err, err.kind()) {
        (ResolveError::InvalidRow(_), _) => FailureKind::InvalidRow,
        (ResolveError::UnknownStatus(_), _) => FailureKind::UnknownStatus,
        (ResolveError::VersionTooLarge(_), _) => FailureKind::VersionTooLarge,
        (_, ResolveErrorKind::NotFound) => FailureKind::NotFound,
        (_, ResolveErrorKind::Forbidden) => FailureKind::Forbidden,
        (_, ResolveErrorKind::Failed) => FailureKind::Failed,
        _ => FailureKind::Other,
    };
    let (code, message) = crate::dispatcher::subscribe::subscribe_error(&key(entity, id), &err);
    Err(Failure {
        kind,
        resolver_message: err.resolver_message().map(str::to_string),
        code,
        message: message.into_owned(),
        inner: err.to_string().into(),
    })
}

/// `pool::key_result(read_key_result(result), id)`: a node's answer to
/// another node, which reads it back with `read_key_result`.
pub fn relay_key_result(result: KeyResult, id: &str) -> KeyResult {
    pool::key_result(pool::read_key_result(result), id)
}

/// Why a `Register` was refused (`RegisterError`'s variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedRegister {
    Invalid,
    Conflict,
    Full,
    Closed,
}

/// A fresh `ResolverPool` with the default `ResolveConfig`, no tasks, and
/// the streams' receivers kept so that nothing it sends fails.
pub struct Pool {
    pool: ResolverPool,
    next_id: u64,
    receivers: Vec<mpsc::Receiver<pool::StreamItem>>,
}

impl Default for Pool {
    fn default() -> Self {
        Self::new()
    }
}

impl Pool {
    pub fn new() -> Self {
        Self {
            pool: ResolverPool::new(&ResolveConfig::default(), Arc::new(Metrics::default())),
            next_id: 1,
            receivers: Vec::new(),
        }
    }

    /// The default `max_in_flight` (for a `Register` that says 0).
    pub fn default_max_in_flight() -> u32 {
        ResolveConfig::default().default_max_in_flight
    }

    /// `ResolverPool::register` of a new stream, as `grpc` calls it: a
    /// channel of `channel_capacity(register)`, then `register`.
    pub fn register(&mut self, register: &Register) -> Result<(), (RefusedRegister, String)> {
        let (tx, rx) = mpsc::channel(self.pool.channel_capacity(register));
        self.receivers.push(rx);
        let id = self.next_id;
        self.next_id += 1;
        self.pool.register(id, register, tx).map_err(|err| {
            let kind = match err {
                RegisterError::Invalid(_) => RefusedRegister::Invalid,
                RegisterError::Conflict(_) => RefusedRegister::Conflict,
                RegisterError::Full(_) => RefusedRegister::Full,
                RegisterError::Closed => RefusedRegister::Closed,
            };
            (kind, err.to_string())
        })
    }

    /// `ResolverPool::channel_capacity`.
    pub fn channel_capacity(&self, register: &Register) -> usize {
        self.pool.channel_capacity(register)
    }

    /// `ResolverPool::fetch_mode`: how `entity` is served, if it is.
    pub fn fetch_mode(&self, entity: &str) -> Option<FetchMode> {
        self.pool.fetch_mode(entity)
    }

    /// `ResolverPool::watch_entities`: every entity served, sorted.
    pub fn entities(&self) -> Vec<(String, FetchMode)> {
        self.pool
            .watch_entities()
            .borrow()
            .iter()
            .map(|(e, m)| (e.to_string(), *m))
            .collect()
    }
}
