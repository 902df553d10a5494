//! The properties the fuzz targets check, on the node's own code: compiled
//! for the crate's unit tests and for cargo-fuzz builds (`--cfg fuzzing`)
//! only, never into the node.
//!
//! Each `check_*` function takes one arbitrary input, runs the crate's
//! internals on it (the websocket decoder, the frames, a resolver's
//! `KeyResult`, `Register` on a resolver pool) and panics when a property
//! fails: no panic inside the node, and every frame the node would send is
//! JSON that says what the input said. The targets in `fuzz/` call them for
//! as long as libFuzzer runs; the tests below run them on a bounded number
//! of generated cases (and the targets' seeds) on every `cargo test`.

use std::{collections::BTreeMap, collections::HashSet, sync::Arc};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::{
    config::ResolveConfig,
    dispatcher::subscribe::subscribe_error,
    key::{Key, MAX_KEY_PART_BYTES},
    ops::metrics::Metrics,
    proto::v1::{EntityRegistration, FetchMode, KeyResult, Register},
    resolving::pool::{
        self, MAX_ENTITIES_PER_STREAM, MAX_IN_FLIGHT_CAP, MAX_VERSION, PASS_THROUGH_HEADROOM,
        RegisterError, ResolveError, ResolveErrorKind, ResolverPool, Rows,
    },
    websocket::protocol::{self, ClientMessage, ErrorCode, FrameText, Payload, PushFrame},
};

/// Longest message an `error` frame for a refused client message may carry:
/// the node quotes at most a prefix of what the client sent, never all of it.
pub const MAX_REFUSAL_MESSAGE_BYTES: usize = 1024;

fn text(frame: FrameText) -> String {
    frame.text().to_owned()
}

fn parse(frame: &str) -> Value {
    serde_json::from_str(frame).unwrap_or_else(|err| panic!("frame is not JSON ({err}): {frame}"))
}

fn assert_key_body(frame: &Value, action: &str, key: &Key) {
    assert_eq!(frame["action"], action, "{frame}");
    assert_eq!(frame["body"]["entity"], &*key.entity, "{frame}");
    assert_eq!(frame["body"]["id"], &*key.id, "{frame}");
}

/// `protocol::error_frame`, checked: JSON with the code (one of
/// `ErrorCode::ALL`), the message and the key, if any.
fn check_error_frame(code: ErrorCode, message: &str, key: Option<&Key>) {
    assert!(
        ErrorCode::ALL.contains(&code),
        "{code:?} is not in ErrorCode::ALL"
    );
    let frame = parse(&text(protocol::error_frame(code, message, key)));
    assert_eq!(frame["action"], "error", "{frame}");
    assert_eq!(frame["body"]["code"], code.as_str(), "{frame}");
    assert_eq!(frame["body"]["message"], message, "{frame}");
    match key {
        Some(key) => assert_key_body(&frame, "error", key),
        None => assert!(frame["body"].get("entity").is_none(), "{frame}"),
    }
}

/// `PushFrame::build`'s frames as text: the envelope, or one per row when `bare_rows`.
fn push_frames(key: &Key, version: u64, rows: &[Bytes], bare_rows: bool) -> Vec<String> {
    match PushFrame::build(key, version, rows, bare_rows).payload {
        Payload::One(frame) => vec![text(frame)],
        Payload::Many(frames) => frames.iter().cloned().map(text).collect(),
    }
}

/// The websocket decoder on one text message (non-UTF-8 input is skipped:
/// a websocket text message is UTF-8), and the frames the node builds for
/// what it decodes or refuses.
pub fn check_decode(data: &[u8]) {
    let Ok(text_message) = std::str::from_utf8(data) else {
        return;
    };
    let decoded = protocol::decode(text_message);
    let json: Option<Value> = serde_json::from_str(text_message).ok();
    let object = json.as_ref().and_then(Value::as_object);
    match decoded {
        Err(refused) => {
            if object.is_none() {
                assert_eq!(refused.code, ErrorCode::InvalidJson, "{text_message:?}");
            }
            assert!(
                refused.message.len() <= MAX_REFUSAL_MESSAGE_BYTES,
                "a refusal quotes too much: {} bytes",
                refused.message.len()
            );
            check_error_frame(refused.code, &refused.message, None);
        }
        Ok(ClientMessage::PassThrough) => {
            let object = object.expect("a pass-through message is a JSON object");
            assert!(!object.contains_key("action"), "{text_message:?}");
        }
        Ok(ClientMessage::Ping) => {
            let object = object.expect("a ping is a JSON object");
            assert_eq!(object["action"], "ping");
        }
        Ok(ClientMessage::Secret(secret)) => {
            let object = object.expect("a secret message is a JSON object");
            assert_eq!(object["action"], "secret");
            assert_eq!(object["body"], secret.as_str());
        }
        Ok(ClientMessage::Subscribe {
            key,
            version,
            token,
        }) => {
            let sent_token = object.and_then(|o| o["body"].get("token"));
            match &token {
                Some(token) => assert_eq!(sent_token.and_then(Value::as_str), Some(&**token)),
                None => assert!(sent_token.is_none_or(Value::is_null), "{sent_token:?}"),
            }
            check_decoded_key(object, "subscribe", &key);
            // The version is the body's, a non-negative integer exact in
            // JavaScript, or absent.
            let sent = object.and_then(|o| o["body"].get("version"));
            match version {
                Some(version) => {
                    assert!(version <= protocol::MAX_CLIENT_VERSION);
                    assert_eq!(sent.and_then(Value::as_u64), Some(version));
                }
                None => assert!(sent.is_none_or(Value::is_null), "{sent:?}"),
            }
            let frame = parse(&text(protocol::subscribed_frame(&key)));
            assert_key_body(&frame, "subscribed", &key);
            let frame = parse(&text(protocol::subscribed_current_frame(&key)));
            assert_key_body(&frame, "subscribed", &key);
            assert_eq!(frame["body"]["current"], true);
            // The snapshot push and a refusal for the key are JSON too.
            for rows in [&[][..], &[Bytes::from_static(b"{\"a\":[1,\"x\"]}")][..]] {
                for frame in push_frames(&key, 7, rows, false) {
                    assert_key_body(&parse(&frame), "push", &key);
                }
            }
            check_error_frame(ErrorCode::Forbidden, "no", Some(&key));
        }
        Ok(ClientMessage::Unsubscribe(key)) => {
            check_decoded_key(object, "unsubscribe", &key);
            let frame = parse(&text(protocol::unsubscribed_frame(&key)));
            assert_key_body(&frame, "unsubscribed", &key);
        }
    }
}

/// A decoded (un)subscribe names the key the message's body named, the key
/// is valid, and the message the node would expect for it decodes the same.
fn check_decoded_key(object: Option<&serde_json::Map<String, Value>>, action: &str, key: &Key) {
    let (entity, id) = (&*key.entity, &*key.id);
    let object = object.expect("a decoded key came from a JSON object");
    assert_eq!(object["action"], action);
    assert!(Key::new(entity, id).is_ok(), "{entity:?}/{id:?}");
    assert!(entity.len() <= MAX_KEY_PART_BYTES && id.len() <= MAX_KEY_PART_BYTES);
    let body = &object["body"];
    assert_eq!(body["entity"], entity);
    match &body["id"] {
        Value::String(sent) => assert_eq!(sent, id),
        Value::Number(sent) => assert_eq!(sent.to_string(), id),
        other => panic!("decoded id {id:?} from {other}"),
    }
    let again = serde_json::json!({"action": action, "body": {"entity": entity, "id": id}});
    let expected = match action {
        "subscribe" => ClientMessage::Subscribe {
            key: key.clone(),
            version: None,
            token: None,
        },
        _ => ClientMessage::Unsubscribe(key.clone()),
    };
    assert_eq!(protocol::decode(&again.to_string()), Ok(expected));
}

/// One resolver answer, as the proto's `KeyResult` carries it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub id: String,
    pub status: i32,
    pub rows: Vec<Vec<u8>>,
    pub version: u64,
    pub message: String,
}

impl Answer {
    fn key_result(&self) -> KeyResult {
        KeyResult {
            id: self.id.clone(),
            status: self.status,
            rows: self.rows.iter().cloned().map(Bytes::from).collect(),
            version: self.version,
            message: self.message.clone(),
        }
    }
}

/// The message a subscriber sees for a failure: the resolver's own when it
/// sent one for NOT_FOUND/FORBIDDEN/ERROR, else a fixed one.
const INVALID_ANSWER: &str = "the resolver sent an invalid answer";

/// A resolver's answer as the node handles it (`pool::read_key_result`, then
/// the subscribe flow's error frame): OK rows are accepted exactly when each
/// is one JSON value and the version is at most 2^53, and the push frame
/// built from them is JSON holding them in order; every failure gives an
/// error frame whose code is in `ErrorCode::ALL` and whose message is the
/// resolver's own or a fixed one, never an inner error's text. A node's
/// relay of the answer to another node (`pool::key_result`) reads back the
/// same.
pub fn check_key_result(answer: &Answer) {
    let key = Key::new("items", &answer.id)
        .or_else(|_| Key::new("items", "1"))
        .expect("a valid key");
    // The rule, as a client sees it: each row is one JSON value (in
    // UTF-8) that serde_json, strict and with its default nesting limit of
    // 128, still reads as a `Value` three levels down, where the push frame
    // puts it: no lone surrogate escape, no number beyond f64, at most 124
    // levels deep.
    let rows_are_json = answer.rows.iter().all(|row| {
        let mut framed = b"{\"body\":{\"rows\":[".to_vec();
        framed.extend_from_slice(row);
        framed.extend_from_slice(b"]}}");
        std::str::from_utf8(row).is_ok()
            && serde_json::from_slice::<serde::de::IgnoredAny>(row).is_ok()
            && serde_json::from_slice::<Value>(&framed).is_ok()
    });
    match (answer.status, pool::read_key_result(answer.key_result())) {
        (1, Ok(Rows { rows, version })) => {
            assert!(rows_are_json, "accepted a row that is not JSON");
            assert!(version <= MAX_VERSION, "accepted version {version}");
            assert_eq!(version, answer.version);
            assert_eq!(rows.len(), answer.rows.len());
            for (got, sent) in rows.iter().zip(&answer.rows) {
                assert_eq!(&got[..], &sent[..], "rows are kept verbatim, in order");
            }
            check_push_frames(&key, version, &rows);
        }
        (1, Err(err)) => {
            if !rows_are_json {
                assert!(matches!(err, ResolveError::InvalidRow(_)), "{err:?}");
            } else {
                assert!(answer.version > MAX_VERSION, "refused {answer:?}: {err:?}");
                assert!(
                    matches!(err, ResolveError::VersionTooLarge(v) if v == answer.version),
                    "{err:?}"
                );
            }
            check_failure(&key, &err, ErrorCode::ResolverError, INVALID_ANSWER);
        }
        (status @ 2..=4, Err(err)) => {
            let (kind, code, default) = match status {
                2 => (
                    ResolveErrorKind::NotFound,
                    ErrorCode::NotFound,
                    "no such key",
                ),
                3 => (
                    ResolveErrorKind::Forbidden,
                    ErrorCode::Forbidden,
                    "access denied",
                ),
                _ => (
                    ResolveErrorKind::Failed,
                    ErrorCode::ResolverError,
                    "the resolver failed",
                ),
            };
            assert_eq!(err.kind(), kind);
            let own = (!answer.message.is_empty()).then_some(answer.message.as_str());
            assert_eq!(err.resolver_message(), own);
            check_failure(&key, &err, code, own.unwrap_or(default));
        }
        (status, Err(err)) => {
            assert!(!(1..=4).contains(&status));
            assert!(
                matches!(err, ResolveError::UnknownStatus(s) if s == status),
                "{err:?}"
            );
            check_failure(&key, &err, ErrorCode::ResolverError, INVALID_ANSWER);
        }
        (status, Ok(_)) => panic!("status {status} was accepted as OK"),
    }
    check_relay(answer);
}

/// The error frame a subscriber of `key` gets for `err` (the subscribe
/// flow's mapping): `code` and `message`, as JSON.
fn check_failure(key: &Key, err: &ResolveError, code: ErrorCode, message: &str) {
    let (got_code, got_message) = subscribe_error(key, err);
    assert_eq!(got_code, code, "{err:?}");
    assert_eq!(got_message, message, "{err:?}");
    check_error_frame(got_code, &got_message, Some(key));
}

/// The push frames built from accepted rows: the envelope is JSON with the
/// key, the version and the rows in order; bare frames are the rows verbatim.
fn check_push_frames(key: &Key, version: u64, rows: &[Bytes]) {
    let frames = push_frames(key, version, rows, false);
    assert_eq!(frames.len(), 1);
    let frame = parse(&frames[0]);
    assert_key_body(&frame, "push", key);
    assert_eq!(frame["body"]["version"].as_u64(), Some(version), "{frame}");
    let pushed = frame["body"]["rows"].as_array().expect("rows is an array");
    assert_eq!(pushed.len(), rows.len());
    for (pushed, row) in pushed.iter().zip(rows) {
        let row: Value = serde_json::from_slice(row).expect("an accepted row is a Value");
        assert_eq!(pushed, &row);
    }
    let bare = push_frames(key, version, rows, true);
    assert_eq!(bare.len(), rows.len());
    for (frame, row) in bare.iter().zip(rows) {
        assert_eq!(
            frame.as_bytes(),
            &row[..],
            "a bare frame is its row verbatim"
        );
    }
}

/// A node's answer to another node (`pool::key_result`) reads back as the
/// same outcome; failures without a status of their own become ERROR with a
/// fixed message.
fn check_relay(answer: &Answer) {
    let first = pool::read_key_result(answer.key_result());
    let relayed = pool::key_result(first.clone(), &answer.id);
    assert_eq!(relayed.id, answer.id);
    match (first, pool::read_key_result(relayed)) {
        (Ok(a), Ok(b)) => assert_eq!((a.rows, a.version), (b.rows, b.version)),
        (Err(a), Err(b)) => match a.kind() {
            ResolveErrorKind::NotFound | ResolveErrorKind::Forbidden | ResolveErrorKind::Failed => {
                assert_eq!(
                    (a.kind(), a.resolver_message()),
                    (b.kind(), b.resolver_message())
                );
            }
            _ => {
                assert_eq!(b.kind(), ResolveErrorKind::Failed);
                assert_eq!(b.resolver_message(), Some(INVALID_ANSWER));
            }
        },
        (a, b) => panic!("relayed answer changed: {a:?} -> {b:?}"),
    }
}

/// One `Register`, with each entity as `(name, fetch_mode)`.
#[derive(Debug, Clone)]
pub struct Reg {
    pub name: String,
    pub entities: Vec<(String, i32)>,
    pub pass_through: bool,
    pub max_in_flight: u32,
}

impl Reg {
    fn register(&self) -> Register {
        Register {
            name: self.name.clone(),
            entities: self
                .entities
                .iter()
                .map(|(entity, fetch_mode)| EntityRegistration {
                    entity: entity.clone(),
                    fetch_mode: *fetch_mode,
                    refresh_interval_ms: 0,
                })
                .collect(),
            pass_through: self.pass_through,
            max_in_flight: self.max_in_flight,
        }
    }
}

/// The documented rules of an entity name (the key rules): 1 to 128 bytes,
/// no `.`, `*`, `>`, whitespace or control characters.
fn entity_ok(entity: &str) -> bool {
    !entity.is_empty()
        && entity.len() <= MAX_KEY_PART_BYTES
        && !entity
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control())
}

/// The documented rules of one `Register`, alone: the modes it asks for
/// (UNSPECIFIED read as PER_SUBSCRIBER), or `None` when it is invalid.
fn model(reg: &Reg) -> Option<Vec<(String, FetchMode)>> {
    let name = reg.name.trim();
    if name.is_empty() || name.len() > 128 {
        return None;
    }
    if reg.entities.is_empty() && !reg.pass_through {
        return None;
    }
    if reg.entities.len() > MAX_ENTITIES_PER_STREAM {
        return None;
    }
    let mut wanted: Vec<(String, FetchMode)> = Vec::new();
    let mut named = HashSet::new();
    for (entity, mode) in &reg.entities {
        if !entity_ok(entity) || !named.insert(entity.as_str()) {
            return None;
        }
        let mode = match *mode {
            0 | 2 => FetchMode::PerSubscriber,
            1 => FetchMode::Shared,
            _ => return None,
        };
        wanted.push((entity.clone(), mode));
    }
    Some(wanted)
}

/// Why a `Register` was refused, by `RegisterError`'s variant.
fn refusal(err: &RegisterError) -> &'static str {
    match err {
        RegisterError::Invalid(_) => "invalid",
        RegisterError::Conflict(_) => "conflict",
        RegisterError::Full(_) => "full",
        RegisterError::Closed => "closed",
    }
}

/// `Register` on a fresh pool (default `ResolveConfig`, no tasks), then the
/// next ones on the same pool (more streams), as the gRPC handler calls it
/// (a channel of `channel_capacity`, then `register`): each is accepted
/// exactly when the documented rules say so (valid alone, and no entity
/// already served with another fetch mode), never panics, and afterwards the
/// pool serves exactly the entities of the accepted ones, with their modes,
/// and sizes the stream's channel from `max_in_flight` (0 = the default,
/// capped at 4,096).
pub fn check_registers(regs: &[Reg]) {
    let config = ResolveConfig::default();
    let pool = ResolverPool::new(&config, Arc::new(Metrics::default()));
    // The streams' receivers, kept so that nothing the pool sends fails.
    let mut receivers = Vec::new();
    // Sorted by name, as the pool lists them.
    let mut served: BTreeMap<String, FetchMode> = BTreeMap::new();
    for (stream, reg) in (1..).zip(regs) {
        let register = reg.register();
        let in_flight = match reg.max_in_flight {
            0 => config.default_max_in_flight,
            n => n.min(MAX_IN_FLIGHT_CAP),
        };
        let capacity = pool.channel_capacity(&register);
        assert_eq!(capacity, in_flight as usize + PASS_THROUGH_HEADROOM);
        let (tx, rx) = mpsc::channel(capacity);
        receivers.push(rx);
        let result = pool.register(stream, &register, tx);
        let expected = match model(reg) {
            None => Err("invalid"),
            Some(wanted) => {
                let conflict = wanted
                    .iter()
                    .any(|(e, m)| served.get(e).is_some_and(|served| served != m));
                if conflict {
                    Err("conflict")
                } else {
                    served.extend(wanted);
                    Ok(())
                }
            }
        };
        assert_eq!(
            result.as_ref().copied().map_err(refusal),
            expected,
            "{reg:?}: {result:?}"
        );
        if let Err(err) = &result {
            assert!(!err.to_string().is_empty());
        }
        let listed: Vec<(String, FetchMode)> = pool
            .watch_entities()
            .borrow()
            .iter()
            .map(|(e, m)| (e.to_string(), *m))
            .collect();
        assert!(
            listed.iter().map(|(e, m)| (e, m)).eq(served.iter()),
            "{listed:?}"
        );
        for (entity, mode) in &served {
            assert_eq!(pool.fetch_mode(entity), Some(*mode));
        }
    }
}

/// Reads an [`Answer`] from the `key_result` target's text form, so that its
/// seeds are written by hand: `<status> <version>`, the id, the message,
/// then one row per line (rows are bytes; a row holds no newline, which
/// JSON never needs). `None` when the first line is not two integers.
pub fn answer_from_bytes(data: &[u8]) -> Option<Answer> {
    let mut lines = data.split(|b| *b == b'\n');
    let head = String::from_utf8_lossy(lines.next()?).into_owned();
    let (status, version) = head.split_once(' ')?;
    let (status, version) = (status.parse().ok()?, version.parse().ok()?);
    let mut text = || String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
    let (id, message) = (text(), text());
    Some(Answer {
        id,
        status,
        rows: lines.map(<[u8]>::to_vec).collect(),
        version,
        message,
    })
}

/// Reads the `register` target's text form: one `Register` per line, its
/// fields split by tabs: name, pass_through (`1` or not), max_in_flight
/// (unparsable = 0), then one `entity=fetch_mode` per field (the last `=`
/// splits; no `=` = mode 0). A tab or newline in a name or an entity is
/// thus not expressible; both are whitespace, which the rules refuse in an
/// entity and trim from a name's ends.
pub fn regs_from_bytes(data: &[u8]) -> Vec<Reg> {
    String::from_utf8_lossy(data)
        .lines()
        .map(|line| {
            let mut fields = line.split('\t');
            let name = fields.next().unwrap_or_default().to_string();
            let pass_through = fields.next() == Some("1");
            let max_in_flight = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
            let entities = fields
                .map(|field| match field.rsplit_once('=') {
                    Some((entity, mode)) => (entity.to_string(), mode.parse().unwrap_or(0)),
                    None => (field.to_string(), 0),
                })
                .collect();
            Reg {
                name,
                entities,
                pass_through,
                max_in_flight,
            }
        })
        .collect()
}

/// The properties as bounded property tests: a fixed number of generated
/// cases each (a few seconds in all), so every test run covers the
/// websocket decoder, resolver answers and `Register` validation without
/// libFuzzer. Inputs are generated near the rules' edges (key characters,
/// 128-byte limits, 2^53, fetch modes, duplicates) as well as at random.
/// Cases proptest once shrank a failure to are kept in
/// `src/fuzzing.proptest-regressions` and run first.
#[cfg(test)]
mod tests {
    use proptest::{prelude::*, test_runner::FileFailurePersistence};
    use serde_json::{Value, json};

    use super::*;

    const CASES: u32 = 2000;

    /// Key parts near the rules: ordinary, empty, 128/129 bytes, each refused
    /// character, non-ASCII, JSON escapes.
    fn key_part() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-z0-9_:-]{1,12}",
            1 => Just(String::new()),
            1 => Just("x".repeat(128)),
            1 => Just("x".repeat(129)),
            1 => Just("é".repeat(64)),
            1 => Just("é".repeat(65)),
            2 => "[a-z]{0,3}[.*> \t\u{7}\u{0}\u{85}\u{2028}\"\\\\/é😀]{1,2}[a-z]{0,3}",
            2 => any::<String>(),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            any::<String>().prop_map(Value::String),
            key_part().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key_part(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Client messages: the protocol's own (with keys near the rules and ids as
    /// numbers), near misses, and arbitrary text.
    fn client_message() -> impl Strategy<Value = String> {
        let action = prop_oneof![
            Just(json!("subscribe")),
            Just(json!("unsubscribe")),
            Just(json!("secret")),
            Just(json!("jump")),
            Just(json!(7)),
            any::<String>().prop_map(Value::String),
        ];
        let id = prop_oneof![
            key_part().prop_map(Value::String),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            json_value(),
        ];
        let body = prop_oneof![
            (key_part(), id).prop_map(|(entity, id)| json!({"entity": entity, "id": id})),
            key_part().prop_map(Value::String),
            json_value(),
        ];
        prop_oneof![
            4 => (action, body).prop_map(|(action, body)| json!({"action": action, "body": body}).to_string()),
            1 => json_value().prop_map(|v| v.to_string()),
            1 => any::<String>(),
            1 => "[{}\\[\\]\":,a-z0-9 ]{0,40}",
        ]
    }

    /// Rows: JSON values, and bytes that are almost JSON or not at all.
    fn row() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => json_value().prop_map(|v| v.to_string().into_bytes()),
            1 => prop::collection::vec(any::<u8>(), 0..16),
            1 => prop::sample::select(vec![
                &b""[..], b"{", b"1 2", b"1e400", b"-0", b"\"\\ud800\"", b"\xff", b"\"\xc3\"",
                b" [] ", b"{\"a\":1,\"a\":2}", b"null", b"\"</script>\"", b"\"\\ud83d\\ude00\"", b"[\"\\udc00\"]",
            ])
            .prop_map(<[u8]>::to_vec),
            // Nesting, mostly near the limit (124 levels in a row).
            1 => prop_oneof![120usize..130, 1usize..300].prop_map(|depth| {
                let mut row = "[".repeat(depth);
                row.push_str(&"]".repeat(depth));
                row.into_bytes()
            }),
        ]
    }

    fn answer() -> impl Strategy<Value = Answer> {
        let status = prop_oneof![4 => 0i32..6, 1 => any::<i32>()];
        let max = MAX_VERSION;
        let version = prop_oneof![Just(0u64), (max - 2)..=(max + 2), any::<u64>(), 0u64..1000,];
        (
            key_part(),
            status,
            prop::collection::vec(row(), 0..6),
            version,
            any::<String>(),
        )
            .prop_map(|(id, status, rows, version, message)| Answer {
                id,
                status,
                rows,
                version,
                message,
            })
    }

    /// Entity names from a small set, so that registers repeat and clash.
    fn entity_name() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec!["items", "users", "orders"]).prop_map(str::to_string),
            1 => key_part(),
        ]
    }

    fn reg() -> impl Strategy<Value = Reg> {
        let name = prop_oneof![
            4 => "[a-z-]{1,10}",
            1 => Just(String::new()),
            1 => Just("  \t ".to_string()),
            1 => Just(format!(" {} ", "n".repeat(128))),
            1 => Just("n".repeat(129)),
            1 => any::<String>(),
        ];
        let mode = prop_oneof![4 => 0i32..3, 1 => any::<i32>()];
        let entities = prop_oneof![
            40 => prop::collection::vec((entity_name(), mode), 0..5),
            1 => (1020usize..1030).prop_map(|n| (0..n).map(|i| (format!("e{i}"), 0)).collect()),
        ];
        let max_in_flight = prop_oneof![Just(0u32), 1u32..10, 4090u32..4100, any::<u32>()];
        (name, entities, any::<bool>(), max_in_flight).prop_map(
            |(name, entities, pass_through, max_in_flight)| Reg {
                name,
                entities,
                pass_through,
                max_in_flight,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: CASES,
            // Beside this file: src/fuzzing.proptest-regressions.
            failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
                "proptest-regressions",
            ))),
            ..ProptestConfig::default()
        })]

        #[test]
        fn decoder_frames_what_it_decodes(message in client_message()) {
            check_decode(message.as_bytes());
        }

        #[test]
        fn decoder_takes_any_bytes(data in prop::collection::vec(any::<u8>(), 0..64)) {
            check_decode(&data);
        }

        #[test]
        fn resolver_answers_are_read_as_documented(answer in answer()) {
            check_key_result(&answer);
        }

        #[test]
        fn registers_follow_the_rules(regs in prop::collection::vec(reg(), 1..6)) {
            check_registers(&regs);
        }
    }

    /// The fuzz targets' hand-written seeds (`fuzz/corpus/`) pass too.
    #[test]
    fn fuzz_seed_corpus_passes() {
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        let seeds = |target: &str| -> Vec<Vec<u8>> {
            let seeds: Vec<Vec<u8>> = std::fs::read_dir(corpus.join(target))
                .unwrap_or_else(|err| panic!("fuzz/corpus/{target}: {err}"))
                .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
                .collect();
            assert!(!seeds.is_empty(), "fuzz/corpus/{target} is empty");
            seeds
        };
        for seed in seeds("decode") {
            check_decode(&seed);
        }
        for seed in seeds("key_result") {
            let answer = answer_from_bytes(&seed).expect("a seed is an answer");
            check_key_result(&answer);
        }
        for seed in seeds("register") {
            check_registers(&regs_from_bytes(&seed));
        }
    }
}
