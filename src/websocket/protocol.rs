//! The websocket protocol: decoding client messages and encoding the JSON frames the node sends.
//!
//! Inbound messages are the original entity-sync ones, unchanged. Outbound
//! frames are JSON envelopes (`subscribed`, `unsubscribed`, `push`, `error`);
//! a push frame is built once per resolve result and shared by every
//! subscriber it goes to.

use std::{fmt, sync::Arc};

use bytes::Bytes;
use serde_json::Value;

use crate::key::{Key, KeyError, validate_part};

/// One outbound websocket frame as it goes on the wire: its header (final
/// fragment, opcode, unmasked length) and then its payload, in one
/// [`Bytes`]. A clone is a reference count: a push frame is framed once and
/// the same bytes go to every subscriber, written as they are.
///
/// Every constructor but the session's own control frames
/// ([`FrameText::ping`], [`FrameText::raw`]) makes a text frame whose
/// payload is UTF-8 (JSON).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct FrameText {
    wire: Bytes,
    /// Bytes of `wire` before the payload.
    header: u8,
}

/// The longest server frame header: two bytes and a 64-bit length.
pub(crate) const MAX_HEADER: usize = 10;
const OP_TEXT: u8 = 0x1;
const OP_PING: u8 = 0x9;
const OP_CLOSE: u8 = 0x8;

/// The header of an unmasked final frame of `len` payload bytes, and its length.
fn header(opcode: u8, len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut head = [0u8; MAX_HEADER];
    head[0] = 0x80 | opcode;
    if len < 126 {
        head[1] = len as u8;
        (head, 2)
    } else if let Ok(short) = u16::try_from(len) {
        head[1] = 126;
        head[2..4].copy_from_slice(&short.to_be_bytes());
        (head, 4)
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (head, 10)
    }
}

impl FrameText {
    /// A frame of `opcode` carrying a copy of `payload`.
    fn framed(opcode: u8, payload: &[u8]) -> Self {
        let (head, n) = header(opcode, payload.len());
        let mut wire = Vec::with_capacity(n + payload.len());
        wire.extend_from_slice(&head[..n]);
        wire.extend_from_slice(payload);
        Self {
            wire: Bytes::from(wire),
            header: n as u8,
        }
    }

    /// The text frame of `buf[MAX_HEADER..]`: the header goes into the
    /// room left at the front, so the payload is not copied.
    pub(crate) fn from_reserved(mut buf: Vec<u8>) -> Self {
        debug_assert!(std::str::from_utf8(&buf[MAX_HEADER..]).is_ok());
        let (head, n) = header(OP_TEXT, buf.len() - MAX_HEADER);
        let start = MAX_HEADER - n;
        buf[start..MAX_HEADER].copy_from_slice(&head[..n]);
        let mut wire = Bytes::from(buf);
        bytes::Buf::advance(&mut wire, start);
        Self {
            wire,
            header: n as u8,
        }
    }

    pub(crate) fn from_static(text: &'static str) -> Self {
        Self::framed(OP_TEXT, text.as_bytes())
    }

    /// A websocket ping with no payload.
    pub(crate) fn ping() -> Self {
        Self::framed(OP_PING, &[])
    }

    /// A close frame with `code` and `reason` (at most 123 bytes).
    pub(crate) fn close(code: u16, reason: &str) -> Self {
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
        Self::framed(OP_CLOSE, &payload)
    }

    /// Bytes framed already (the websocket layer's replies: pongs, the
    /// close echo), written as they are.
    pub(crate) fn raw(wire: Bytes) -> Self {
        Self { wire, header: 0 }
    }

    /// Bytes of the payload.
    pub(crate) fn len(&self) -> usize {
        self.wire.len() - usize::from(self.header)
    }

    /// What goes on the wire.
    pub(crate) fn wire(&self) -> &Bytes {
        &self.wire
    }

    /// What goes on the wire.
    pub(crate) fn into_wire(self) -> Bytes {
        self.wire
    }

    /// The payload of a text frame.
    pub(crate) fn text(&self) -> &str {
        std::str::from_utf8(&self.wire[usize::from(self.header)..]).unwrap_or("")
    }

    #[cfg(test)]
    pub(crate) fn as_str(&self) -> &str {
        self.text()
    }
}

/// The payload of a final text frame's wire bytes.
#[cfg(test)]
pub(crate) fn text_of_wire(wire: &[u8]) -> String {
    let header = match wire[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    assert_eq!(wire[0], 0x81, "a final text frame");
    String::from_utf8(wire[header..].to_vec()).unwrap()
}

impl From<String> for FrameText {
    fn from(text: String) -> Self {
        Self::framed(OP_TEXT, text.as_bytes())
    }
}

impl TryFrom<Bytes> for FrameText {
    type Error = std::str::Utf8Error;

    fn try_from(bytes: Bytes) -> Result<Self, Self::Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Self::framed(OP_TEXT, &bytes))
    }
}

impl fmt::Debug for FrameText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.text(), f)
    }
}

/// A decoded client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientMessage {
    /// `version`: the version of the key the client holds (resume), if it
    /// said one.
    Subscribe {
        key: Key,
        version: Option<u64>,
        /// A signed subscribe token (compact JWS), verified by the session.
        token: Option<Box<str>>,
    },
    Unsubscribe(Key),
    Secret(String),
    /// `{"action":"ping"}` (any body): answered with `pong`, so a client
    /// that cannot see websocket pings (a browser) can tell a dead
    /// connection from a quiet one.
    Ping,
    /// A JSON object without `action`: forwarded verbatim to pass-through resolvers.
    PassThrough,
}

/// Stable error codes carried by `error` frames. Clients may match on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidJson,
    UnknownAction,
    InvalidBody,
    MessageTooLarge,
    BinaryUnsupported,
    TooManySubscriptions,
    NotSubscribed,
    Forbidden,
    NotFound,
    NoResolver,
    ResolverError,
    ResolverTimeout,
    NoPassThrough,
    Overloaded,
    RateLimited,
    /// A `secret` longer than [`MAX_SECRET_BYTES`]; the connection's secret is unchanged.
    SecretTooLong,
    /// A subscribe token that does not verify, is for another entity, id or
    /// audience, is not valid yet, or is too large; or a node that accepts
    /// no tokens. No subscription, no backend call.
    TokenInvalid,
    /// A subscribe token past its `exp`; or the token of a held key expired
    /// and the node ended that subscription.
    TokenExpired,
}

impl ErrorCode {
    /// Every code, for metrics and docs.
    pub const ALL: [ErrorCode; 18] = [
        Self::InvalidJson,
        Self::UnknownAction,
        Self::InvalidBody,
        Self::MessageTooLarge,
        Self::BinaryUnsupported,
        Self::TooManySubscriptions,
        Self::NotSubscribed,
        Self::Forbidden,
        Self::NotFound,
        Self::NoResolver,
        Self::ResolverError,
        Self::ResolverTimeout,
        Self::NoPassThrough,
        Self::Overloaded,
        Self::RateLimited,
        Self::SecretTooLong,
        Self::TokenInvalid,
        Self::TokenExpired,
    ];

    /// The code as it appears in `error` frames, e.g. `not_found`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::UnknownAction => "unknown_action",
            Self::InvalidBody => "invalid_body",
            Self::MessageTooLarge => "message_too_large",
            Self::BinaryUnsupported => "binary_unsupported",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::NotSubscribed => "not_subscribed",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::NoResolver => "no_resolver",
            Self::ResolverError => "resolver_error",
            Self::ResolverTimeout => "resolver_timeout",
            Self::NoPassThrough => "no_pass_through",
            Self::Overloaded => "overloaded",
            Self::RateLimited => "rate_limited",
            Self::SecretTooLong => "secret_too_long",
            Self::TokenInvalid => "token_invalid",
            Self::TokenExpired => "token_expired",
        }
    }

    /// Index into [`ErrorCode::ALL`], used by per-code counters.
    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|c| *c == self).unwrap_or(0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused client message: a code and a message safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub(crate) struct ProtocolError {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl ProtocolError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

fn invalid_body(message: impl Into<String>) -> ProtocolError {
    ProtocolError::new(ErrorCode::InvalidBody, message)
}

/// Longest `secret` a client may send, in bytes. A connection's secret is
/// sent with every resolve of its keys and, for PER_SUBSCRIBER entities,
/// hashed to find its subscribers on every change: a bound keeps both small
/// (tokens are far shorter; a frame may be up to `--max-message-bytes`).
pub const MAX_SECRET_BYTES: usize = 4096;

/// Decodes one text frame.
pub(crate) fn decode(text: &str) -> Result<ClientMessage, ProtocolError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|err| ProtocolError::new(ErrorCode::InvalidJson, format!("not JSON: {err}")))?;
    let Value::Object(mut object) = value else {
        return Err(ProtocolError::new(
            ErrorCode::InvalidJson,
            "expected a JSON object",
        ));
    };
    let action = match object.get("action") {
        None => return Ok(ClientMessage::PassThrough),
        Some(Value::String(action)) => action.as_str(),
        Some(_) => {
            return Err(ProtocolError::new(
                ErrorCode::UnknownAction,
                "action must be a string",
            ));
        }
    };
    match action {
        "subscribe" => {
            let body = object.get("body");
            let key = decode_key(body)?;
            let version = decode_version(body)?;
            let token = decode_token(body)?;
            Ok(ClientMessage::Subscribe {
                key,
                version,
                token,
            })
        }
        "unsubscribe" => decode_key(object.get("body")).map(ClientMessage::Unsubscribe),
        "secret" => match object.remove("body") {
            Some(Value::String(secret)) if secret.len() > MAX_SECRET_BYTES => {
                Err(ProtocolError::new(
                    ErrorCode::SecretTooLong,
                    format!(
                        "secret longer than {MAX_SECRET_BYTES} bytes; the previous one is kept"
                    ),
                ))
            }
            Some(Value::String(secret)) => Ok(ClientMessage::Secret(secret)),
            _ => Err(invalid_body("secret body must be a string")),
        },
        "ping" => Ok(ClientMessage::Ping),
        other => Err(ProtocolError::new(
            ErrorCode::UnknownAction,
            format!(
                "unknown action {:?}; expected subscribe, unsubscribe, secret or ping",
                truncate(other, 64)
            ),
        )),
    }
}

fn decode_key(body: Option<&Value>) -> Result<Key, ProtocolError> {
    let Some(Value::Object(body)) = body else {
        return Err(invalid_body(
            "body must be an object with entity and id, e.g. {\"entity\":\"items\",\"id\":\"100\"}",
        ));
    };
    let entity = match body.get("entity") {
        Some(Value::String(entity)) => entity.as_str(),
        _ => return Err(invalid_body("body.entity must be a string")),
    };
    let id_number;
    let id = match body.get("id") {
        Some(Value::String(id)) => id.as_str(),
        // The original protocol's clients sometimes send numeric ids.
        Some(Value::Number(n)) => {
            id_number = n.to_string();
            id_number.as_str()
        }
        _ => return Err(invalid_body("body.id must be a string or a number")),
    };
    let to_body_error = |err: KeyError| invalid_body(format!("body.{err}"));
    validate_part("entity", entity).map_err(to_body_error)?;
    validate_part("id", id).map_err(to_body_error)?;
    Ok(Key::new(entity, id).expect("validated above"))
}

/// The largest version a client may send: versions are integers exact in
/// JavaScript (2^53 - 1).
pub const MAX_CLIENT_VERSION: u64 = (1 << 53) - 1;

/// `body.version` of a subscribe: absent or `null` (no resume), else a
/// non-negative integer a client can have received.
fn decode_version(body: Option<&Value>) -> Result<Option<u64>, ProtocolError> {
    match body.and_then(|body| body.get("version")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(version) if version <= MAX_CLIENT_VERSION => Ok(Some(version)),
            _ => Err(invalid_body(
                "body.version must be an integer from 0 to 2^53-1, the version of a push",
            )),
        },
        Some(_) => Err(invalid_body(
            "body.version must be an integer from 0 to 2^53-1, the version of a push",
        )),
    }
}

/// `body.token` of a subscribe: absent or `null` (none), else a string
/// (its size and signature are checked by the session).
fn decode_token(body: Option<&Value>) -> Result<Option<Box<str>>, ProtocolError> {
    match body.and_then(|body| body.get("token")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(token)) => Ok(Some(token.as_str().into())),
        Some(_) => Err(invalid_body(
            "body.token must be a string, a compact JWS signed by the application",
        )),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What a push carries on the wire: one envelope, or (compatibility mode)
/// one bare frame per row.
#[derive(Clone, Debug)]
pub(crate) enum Payload {
    One(FrameText),
    Many(Arc<[FrameText]>),
}

impl Payload {
    pub(crate) fn len(&self) -> usize {
        match self {
            Payload::One(frame) => frame.len(),
            Payload::Many(frames) => frames.iter().map(|f| f.len()).sum(),
        }
    }
}

/// A push for one key, built once and cloned (reference-counted) into every
/// subscriber's outbound queue.
#[derive(Clone, Debug)]
pub(crate) struct PushFrame {
    pub(crate) version: u64,
    pub(crate) payload: Payload,
    /// Keyed digest of the rows (each row's length and bytes, in order):
    /// what a subscriber's last push of the key is compared with to skip a
    /// push whose rows did not change. Computed once per push, not per
    /// subscriber; compared only on this node (see [`RowsDigest`]).
    pub(crate) rows_digest: u64,
}

impl PushFrame {
    /// Builds the push for `key`. `rows` must each be valid JSON (see
    /// [`validate_row`]); they are copied into the frame verbatim, never
    /// parsed again.
    pub(crate) fn build(key: &Key, version: u64, rows: &[Bytes], bare_rows: bool) -> Self {
        let payload = if bare_rows {
            let frames: Vec<FrameText> = rows.iter().map(row_frame).collect();
            Payload::Many(frames.into())
        } else {
            let rows_len: usize = rows.iter().map(|r| r.len() + 1).sum();
            let mut out =
                Vec::with_capacity(MAX_HEADER + 64 + key.entity.len() + key.id.len() + rows_len);
            // Room for the websocket header, written once the length is known.
            out.resize(MAX_HEADER, 0);
            out.extend_from_slice(b"{\"action\":\"push\",\"body\":{");
            write_key_fields(&mut out, key);
            out.extend_from_slice(b",\"version\":");
            out.extend_from_slice(version.to_string().as_bytes());
            out.extend_from_slice(b",\"rows\":[");
            for (i, row) in rows.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(row);
            }
            out.extend_from_slice(b"]}}");
            Payload::One(FrameText::from_reserved(out))
        };
        Self {
            version,
            payload,
            rows_digest: ROWS_DIGEST.digest(rows),
        }
    }
}

/// The digest of row lists that decides whether a push is unchanged:
/// SipHash-1-3 (std's `RandomState`) under a random key. With a known key
/// (std's `DefaultHasher::new()` is keyed with zeros) a writer could search
/// two different rows of one digest (a 2^32 birthday search), and the
/// second would never be pushed. Under a secret key two different row lists
/// share a digest with probability about 2^-64, however they were chosen.
///
/// The key is drawn once per process (one node per process). Digests never
/// leave the node: each node digests the rows it resolved or was answered
/// with, and compares them with the digests of its own earlier pushes, so
/// nodes need no common key.
pub(crate) struct RowsDigest(std::hash::RandomState);

/// This process's [`RowsDigest`].
static ROWS_DIGEST: std::sync::LazyLock<RowsDigest> = std::sync::LazyLock::new(RowsDigest::new);

impl RowsDigest {
    /// A digest under a fresh random key.
    pub(crate) fn new() -> Self {
        Self(std::hash::RandomState::new())
    }

    /// The digest of each row's length and bytes, in order.
    pub(crate) fn digest(&self, rows: &[Bytes]) -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = self.0.build_hasher();
        hasher.write_usize(rows.len());
        for row in rows {
            hasher.write_usize(row.len());
            hasher.write(row);
        }
        hasher.finish()
    }
}

fn row_frame(row: &Bytes) -> FrameText {
    FrameText::try_from(row.clone()).unwrap_or_else(|_| FrameText::from_static("null"))
}

/// A buffer for a text frame's payload, with room for its header.
fn text_buf(payload_capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_HEADER + payload_capacity);
    out.resize(MAX_HEADER, 0);
    out
}

fn utf8(out: Vec<u8>) -> FrameText {
    // Every part written is UTF-8 (JSON-escaped strings, digits, validated rows).
    FrameText::from_reserved(out)
}

/// Deepest nesting of arrays and objects a row may have. A push frame puts
/// its rows three levels down (`{"body":{"rows":[…]}}`); with this the whole
/// frame nests at most 127 levels, the most serde_json (the testkit's and
/// the bench's clients) reads by default.
pub(crate) const MAX_ROW_DEPTH: usize = 124;

/// Checks that a resolver row is one JSON value in UTF-8 that a strict
/// client parses: nested at most [`MAX_ROW_DEPTH`] levels, strings with no
/// lone surrogate escape (`"\ud800"`), numbers within f64's range. Rows are
/// validated once, when they arrive, so a broken backend can't send clients
/// a frame they refuse.
///
/// Not `IgnoredAny`: serde_json skips what it ignores without a nesting
/// limit and without decoding strings' escapes, so it accepted rows whose
/// push frame serde_json itself then refused (found by the `key_result`
/// fuzz property, `src/fuzzing.rs`). One pass, and no allocation
/// unless a string has escapes.
pub(crate) fn validate_row(row: &[u8]) -> Result<(), RowError> {
    use serde::de::DeserializeSeed;
    std::str::from_utf8(row).map_err(RowError::NotUtf8)?;
    let mut deserializer = serde_json::Deserializer::from_slice(row);
    let checked = StrictValue { depth: 0 }
        .deserialize(&mut deserializer)
        .and_then(|()| deserializer.end());
    checked.map_err(|err| RowError::NotJson(Arc::new(err)))
}

/// Deserializes (and drops) one JSON value nested `depth` levels down,
/// refusing more than [`MAX_ROW_DEPTH`].
#[derive(Clone, Copy)]
struct StrictValue {
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for StrictValue {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StrictValue {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a JSON value nested at most {MAX_ROW_DEPTH} levels")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.nested()?;
        while map.next_key_seed(inner)?.is_some() {
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

impl StrictValue {
    fn nested<E: serde::de::Error>(self) -> Result<Self, E> {
        if self.depth >= MAX_ROW_DEPTH {
            return Err(E::custom(format_args!(
                "nested deeper than {MAX_ROW_DEPTH} levels"
            )));
        }
        Ok(Self {
            depth: self.depth + 1,
        })
    }
}

/// Why a resolver row was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum RowError {
    #[error("row is not UTF-8")]
    NotUtf8(#[source] std::str::Utf8Error),
    /// In an `Arc`: the outcome holding it is cloned to every caller of a batch.
    #[error("row is not a JSON value")]
    NotJson(#[source] Arc<serde_json::Error>),
}

fn write_json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// Writes `"entity":…,"id":…` (JSON-escaped).
fn write_key_fields(out: &mut Vec<u8>, key: &Key) {
    out.extend_from_slice(b"\"entity\":");
    write_json_string(out, &key.entity);
    out.extend_from_slice(b",\"id\":");
    write_json_string(out, &key.id);
}

fn key_envelope(action: &str, key: &Key) -> FrameText {
    let mut out = text_buf(48 + key.entity.len() + key.id.len());
    out.extend_from_slice(b"{\"action\":\"");
    out.extend_from_slice(action.as_bytes());
    out.extend_from_slice(b"\",\"body\":{");
    write_key_fields(&mut out, key);
    out.extend_from_slice(b"}}");
    utf8(out)
}

/// `{"action":"subscribed","body":{"entity":…,"id":…}}`
pub(crate) fn subscribed_frame(key: &Key) -> FrameText {
    key_envelope("subscribed", key)
}

/// `{"action":"subscribed","body":{"entity":…,"id":…,"current":true}}`: the
/// answer to a subscribe whose `version` is still the key's latest; no
/// snapshot follows.
pub(crate) fn subscribed_current_frame(key: &Key) -> FrameText {
    let mut out = text_buf(64 + key.entity.len() + key.id.len());
    out.extend_from_slice(b"{\"action\":\"subscribed\",\"body\":{");
    write_key_fields(&mut out, key);
    out.extend_from_slice(b",\"current\":true}}");
    utf8(out)
}

/// `{"action":"pong"}`: the answer to `ping`.
pub(crate) fn pong_frame() -> FrameText {
    FrameText::from_static(r#"{"action":"pong"}"#)
}

/// `{"action":"unsubscribed","body":{"entity":…,"id":…}}`
pub(crate) fn unsubscribed_frame(key: &Key) -> FrameText {
    key_envelope("unsubscribed", key)
}

/// `{"action":"error","body":{"code":…,"message":…[,"entity":…,"id":…]}}`
pub(crate) fn error_frame(code: ErrorCode, message: &str, key: Option<&Key>) -> FrameText {
    let mut out = text_buf(64 + message.len());
    out.extend_from_slice(b"{\"action\":\"error\",\"body\":{\"code\":\"");
    out.extend_from_slice(code.as_str().as_bytes());
    out.extend_from_slice(b"\",\"message\":");
    write_json_string(&mut out, message);
    if let Some(key) = key {
        out.push(b',');
        write_key_fields(&mut out, key);
    }
    out.extend_from_slice(b"}}");
    utf8(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(entity: &str, id: &str) -> Key {
        Key::new(entity, id).unwrap()
    }

    /// Frames the node makes are read back whole by a websocket client's
    /// own parser (tungstenite's), at each header length's edges.
    #[test]
    fn frames_are_framed_as_rfc_6455_says() {
        use tungstenite::protocol::frame::{FrameHeader, coding::OpCode};
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let text = "x".repeat(len);
            for frame in [
                FrameText::from(text.clone()),
                FrameText::from_reserved({
                    let mut buf = text_buf(len);
                    buf.extend_from_slice(text.as_bytes());
                    buf
                }),
            ] {
                let wire = frame.wire().clone();
                let mut cursor = std::io::Cursor::new(&wire[..]);
                let (header, length) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
                assert!(header.is_final);
                assert_eq!(
                    header.opcode,
                    OpCode::Data(tungstenite::protocol::frame::coding::Data::Text)
                );
                assert!(header.mask.is_none(), "server frames are not masked");
                assert_eq!(length, len as u64);
                assert_eq!(cursor.position() as usize + len, wire.len());
                assert_eq!(frame.len(), len);
                assert_eq!(frame.text(), text);
            }
        }
        let close = FrameText::close(1008, "outbound queue full: client too slow").into_wire();
        let mut cursor = std::io::Cursor::new(&close[..]);
        let (header, length) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        assert_eq!(
            header.opcode,
            OpCode::Control(tungstenite::protocol::frame::coding::Control::Close)
        );
        assert_eq!(&close[2..4], &1008u16.to_be_bytes());
        assert_eq!(&close[4..], b"outbound queue full: client too slow");
        assert_eq!(length as usize, close.len() - 2);
        assert_eq!(&FrameText::ping().into_wire()[..], &[0x89, 0x00]);
    }

    fn code(text: &str) -> ErrorCode {
        decode(text).unwrap_err().code
    }

    #[test]
    fn decodes_original_messages() {
        assert_eq!(
            decode(r#"{"action":"subscribe","body":{"entity":"items","id":"100"}}"#),
            Ok(ClientMessage::Subscribe {
                key: key("items", "100"),
                version: None,
                token: None
            })
        );
        assert_eq!(
            decode(r#"{"action":"unsubscribe","body":{"entity":"items","id":"100"}}"#),
            Ok(ClientMessage::Unsubscribe(key("items", "100")))
        );
        assert_eq!(
            decode(r#"{"action":"secret","body":"my-super-secret-secret-123"}"#),
            Ok(ClientMessage::Secret("my-super-secret-secret-123".into()))
        );
        assert_eq!(
            decode(r#"{"type":"chat","text":"hi"}"#),
            Ok(ClientMessage::PassThrough)
        );
    }

    #[test]
    fn a_subscribe_may_carry_the_version_it_holds() {
        let subscribe = |body: &str| decode(&format!(r#"{{"action":"subscribe","body":{body}}}"#));
        assert_eq!(
            subscribe(r#"{"entity":"items","id":"100","version":42}"#),
            Ok(ClientMessage::Subscribe {
                key: key("items", "100"),
                version: Some(42),
                token: None
            })
        );
        assert_eq!(
            subscribe(r#"{"entity":"items","id":"100","version":null}"#),
            Ok(ClientMessage::Subscribe {
                key: key("items", "100"),
                version: None,
                token: None
            })
        );
        assert_eq!(
            subscribe(&format!(
                r#"{{"entity":"items","id":"1","version":{MAX_CLIENT_VERSION}}}"#
            )),
            Ok(ClientMessage::Subscribe {
                key: key("items", "1"),
                version: Some(MAX_CLIENT_VERSION),
                token: None
            })
        );
        for bad in ["-1", "1.5", "\"42\"", "9007199254740992", "true", "{}"] {
            let err = subscribe(&format!(r#"{{"entity":"items","id":"1","version":{bad}}}"#))
                .unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidBody, "{bad}");
            assert_eq!(
                err.message,
                "body.version must be an integer from 0 to 2^53-1, the version of a push"
            );
        }
        assert_eq!(
            subscribe(r#"{"entity":"items","id":"1","version":3,"token":"a.b.c"}"#),
            Ok(ClientMessage::Subscribe {
                key: key("items", "1"),
                version: Some(3),
                token: Some("a.b.c".into())
            })
        );
        for bad in ["1", "[]", "{}", "true"] {
            let err =
                subscribe(&format!(r#"{{"entity":"items","id":"1","token":{bad}}}"#)).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidBody, "{bad}");
        }
        assert_eq!(
            subscribed_current_frame(&key("items", "100")).as_str(),
            r#"{"action":"subscribed","body":{"entity":"items","id":"100","current":true}}"#
        );
    }

    #[test]
    fn numeric_ids_become_strings() {
        assert_eq!(
            decode(r#"{"action":"subscribe","body":{"entity":"items","id":100}}"#),
            Ok(ClientMessage::Subscribe {
                key: key("items", "100"),
                version: None,
                token: None
            })
        );
    }

    #[test]
    fn ping_with_any_body_or_none() {
        for text in [
            r#"{"action":"ping"}"#,
            r#"{"action":"ping","body":null}"#,
            r#"{"action":"ping","body":{"t":1}}"#,
        ] {
            assert_eq!(decode(text), Ok(ClientMessage::Ping), "{text}");
        }
        assert_eq!(pong_frame().as_str(), r#"{"action":"pong"}"#);
    }

    #[test]
    fn bad_input_has_stable_codes() {
        assert_eq!(code("not json"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code("\"subscribe\""), ErrorCode::InvalidJson);
        assert_eq!(
            code(r#"{"action":"jump","body":{}}"#),
            ErrorCode::UnknownAction
        );
        assert_eq!(code(r#"{"action":7}"#), ErrorCode::UnknownAction);
        assert_eq!(code(r#"{"action":"subscribe"}"#), ErrorCode::InvalidBody);
        assert_eq!(
            code(r#"{"action":"subscribe","body":"items/1"}"#),
            ErrorCode::InvalidBody
        );
        assert_eq!(
            code(r#"{"action":"subscribe","body":{"entity":"items"}}"#),
            ErrorCode::InvalidBody
        );
        assert_eq!(
            code(r#"{"action":"subscribe","body":{"entity":"","id":"1"}}"#),
            ErrorCode::InvalidBody
        );
        assert_eq!(
            code(r#"{"action":"subscribe","body":{"entity":"a.b","id":"1"}}"#),
            ErrorCode::InvalidBody
        );
        assert_eq!(
            code(r#"{"action":"subscribe","body":{"entity":"items","id":true}}"#),
            ErrorCode::InvalidBody
        );
        assert_eq!(
            code(r#"{"action":"secret","body":42}"#),
            ErrorCode::InvalidBody
        );
    }

    #[test]
    fn secrets_are_at_most_4_kib() {
        let secret = |len: usize| {
            serde_json::json!({"action": "secret", "body": "s".repeat(len)}).to_string()
        };
        assert_eq!(
            decode(&secret(MAX_SECRET_BYTES)),
            Ok(ClientMessage::Secret("s".repeat(MAX_SECRET_BYTES)))
        );
        let err = decode(&secret(MAX_SECRET_BYTES + 1)).unwrap_err();
        assert_eq!(err.code, ErrorCode::SecretTooLong);
        assert_eq!(
            err.message,
            "secret longer than 4096 bytes; the previous one is kept"
        );
        // Bytes, not characters: 2,049 two-byte characters are too long.
        let wide = serde_json::json!({"action": "secret", "body": "é".repeat(2049)});
        assert_eq!(code(&wide.to_string()), ErrorCode::SecretTooLong);
    }

    #[test]
    fn codes_are_distinct_and_indexed() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i);
        }
        let names: std::collections::HashSet<&str> =
            ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }

    #[test]
    fn push_frame_keeps_rows_verbatim_and_in_order() {
        let rows = [
            Bytes::from_static(br#"{"id":100,"name":"milk"}"#),
            Bytes::from_static(br#"{"id":7,"kind":"ref"}"#),
        ];
        let frame = PushFrame::build(&key("items", "100"), 42, &rows, false);
        let Payload::One(text) = &frame.payload else {
            panic!("envelope expected")
        };
        assert_eq!(
            text.as_str(),
            r#"{"action":"push","body":{"entity":"items","id":"100","version":42,"rows":[{"id":100,"name":"milk"},{"id":7,"kind":"ref"}]}}"#
        );
        let parsed: Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(parsed["body"]["rows"][1]["kind"], "ref");
    }

    /// The digest is keyed: not the fixed-key SipHash anyone can compute,
    /// and different under two keys; equal rows still digest equal.
    #[test]
    fn the_rows_digest_is_keyed() {
        use std::hash::Hasher;
        let rows = [
            Bytes::from_static(br#"{"id":1}"#),
            Bytes::from_static(b"[2]"),
        ];
        let mut unkeyed = std::hash::DefaultHasher::new();
        unkeyed.write_usize(rows.len());
        for row in &rows {
            unkeyed.write_usize(row.len());
            unkeyed.write(row);
        }
        let pushed = PushFrame::build(&key("items", "1"), 1, &rows, false).rows_digest;
        assert_ne!(pushed, unkeyed.finish(), "a digest anyone can compute");
        let again = PushFrame::build(&key("items", "1"), 2, &rows.clone(), true).rows_digest;
        assert_eq!(pushed, again, "the same rows, the same digest");
        let (a, b) = (RowsDigest::new(), RowsDigest::new());
        assert_eq!(a.digest(&rows), a.digest(&rows));
        assert_ne!(a.digest(&rows), b.digest(&rows), "two keys");
        assert_ne!(a.digest(&rows), a.digest(&rows[..1]));
    }

    #[test]
    fn bare_rows_are_one_frame_each() {
        let rows = [Bytes::from_static(b"{\"a\":1}"), Bytes::from_static(b"[2]")];
        let frame = PushFrame::build(&key("items", "1"), 1, &rows, true);
        let Payload::Many(frames) = &frame.payload else {
            panic!("bare frames expected")
        };
        let texts: Vec<&str> = frames.iter().map(|f| f.as_str()).collect();
        assert_eq!(texts, vec!["{\"a\":1}", "[2]"]);
        assert_eq!(frame.payload.len(), 10);
    }

    #[test]
    fn envelopes_escape_strings() {
        let k = key("items", "x\"y");
        assert_eq!(
            subscribed_frame(&k).as_str(),
            r#"{"action":"subscribed","body":{"entity":"items","id":"x\"y"}}"#
        );
        assert_eq!(
            error_frame(ErrorCode::Forbidden, "no \"access\"", Some(&k)).as_str(),
            r#"{"action":"error","body":{"code":"forbidden","message":"no \"access\"","entity":"items","id":"x\"y"}}"#
        );
        assert_eq!(
            error_frame(ErrorCode::InvalidJson, "bad", None).as_str(),
            r#"{"action":"error","body":{"code":"invalid_json","message":"bad"}}"#
        );
    }

    #[test]
    fn rows_are_validated() {
        assert!(validate_row(br#"{"a":1}"#).is_ok());
        assert!(validate_row(b"42").is_ok());
        assert!(validate_row(b"{\"a\":").is_err());
        assert!(validate_row(b"").is_err());
        assert!(validate_row(b"\xff").is_err());
        assert!(validate_row(b"1 2").is_err());
    }

    /// Regressions (found by the `key_result` fuzz property): rows that
    /// serde_json's `IgnoredAny` accepted but whose push frame serde_json
    /// refused: nested 125 levels or deeper (`IgnoredAny` has no limit; the
    /// frame adds three), and a lone surrogate escape.
    #[test]
    fn rows_are_what_a_strict_client_parses() {
        let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let framed = |row: &str| {
            let frame = PushFrame::build(
                &key("items", "1"),
                1,
                &[Bytes::from(row.to_string())],
                false,
            );
            let Payload::One(text) = &frame.payload else {
                panic!("envelope expected")
            };
            serde_json::from_str::<Value>(text.as_str()).is_ok()
        };
        let deepest = nested(MAX_ROW_DEPTH);
        assert!(validate_row(deepest.as_bytes()).is_ok());
        assert!(framed(&deepest));
        for refused in [nested(MAX_ROW_DEPTH + 1), nested(127), nested(100_000)] {
            assert!(!framed(&refused));
            assert!(matches!(
                validate_row(refused.as_bytes()),
                Err(RowError::NotJson(_))
            ));
        }
        let objects = format!(
            "{}1{}",
            "{\"a\":".repeat(MAX_ROW_DEPTH + 1),
            "}".repeat(MAX_ROW_DEPTH + 1)
        );
        assert!(validate_row(objects.as_bytes()).is_err());
        for refused in [r#""\ud800""#, r#"["\udc00x"]"#, r#"{"\ud800":1}"#, "1e400"] {
            assert!(!framed(refused), "{refused}");
            assert!(validate_row(refused.as_bytes()).is_err(), "{refused}");
        }
        for accepted in [
            r#""\ud83d\ude00""#,
            r#"{"a":"]]]","b":[{"c":null}]}"#,
            "-0",
            "1e308",
        ] {
            assert!(framed(accepted), "{accepted}");
            assert!(validate_row(accepted.as_bytes()).is_ok(), "{accepted}");
        }
    }
}
