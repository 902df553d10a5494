//! The properties the fuzz targets check, shared with `tests/fuzz_properties.rs` (which includes this file by path).
//!
//! Each `check_*` function takes one arbitrary input, runs the node's own
//! code on it (through `entity_sync::fuzzing`) and panics when a property
//! fails: no panic inside the node, and every frame the node would send is
//! JSON that says what the input said. Only `entity_sync`, `bytes`, `serde`
//! and `serde_json` are used, so the file compiles in both crates.

use bytes::Bytes;
use entity_sync::{
    fuzzing::{
        self, Decoded, FailureKind, MAX_ENTITIES_PER_STREAM, MAX_IN_FLIGHT_CAP, MAX_KEY_PART_BYTES,
        MAX_VERSION, PASS_THROUGH_HEADROOM, Pool, RefusedRegister,
    },
    proto::v1::{EntityRegistration, FetchMode, KeyResult, Register},
    websocket::protocol::ErrorCode,
};
use serde_json::Value;

/// Longest message an `error` frame for a refused client message may carry:
/// the node quotes at most a prefix of what the client sent, never all of it.
pub const MAX_REFUSAL_MESSAGE_BYTES: usize = 1024;

fn parse(frame: &str) -> Value {
    serde_json::from_str(frame).unwrap_or_else(|err| panic!("frame is not JSON ({err}): {frame}"))
}

fn assert_key_body(frame: &Value, action: &str, entity: &str, id: &str) {
    assert_eq!(frame["action"], action, "{frame}");
    assert_eq!(frame["body"]["entity"], entity, "{frame}");
    assert_eq!(frame["body"]["id"], id, "{frame}");
}

fn assert_error_frame(frame: &str, code: ErrorCode, message: &str, key: Option<(&str, &str)>) {
    assert!(
        ErrorCode::ALL.contains(&code),
        "{code:?} is not in ErrorCode::ALL"
    );
    let frame = parse(frame);
    assert_eq!(frame["action"], "error", "{frame}");
    assert_eq!(frame["body"]["code"], code.as_str(), "{frame}");
    assert_eq!(frame["body"]["message"], message, "{frame}");
    match key {
        Some((entity, id)) => assert_key_body(&frame, "error", entity, id),
        None => assert!(frame["body"].get("entity").is_none(), "{frame}"),
    }
}

/// The websocket decoder on one text message (non-UTF-8 input is skipped:
/// a websocket text message is UTF-8), and the frames the node builds for
/// what it decodes or refuses.
pub fn check_decode(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let decoded = fuzzing::decode(text);
    let json: Option<Value> = serde_json::from_str(text).ok();
    let object = json.as_ref().and_then(Value::as_object);
    match decoded {
        Err(refused) => {
            if object.is_none() {
                assert_eq!(refused.code, ErrorCode::InvalidJson, "{text:?}");
            }
            assert!(
                refused.message.len() <= MAX_REFUSAL_MESSAGE_BYTES,
                "a refusal quotes too much: {} bytes",
                refused.message.len()
            );
            let frame = fuzzing::error_frame(refused.code, &refused.message, None);
            assert_error_frame(&frame, refused.code, &refused.message, None);
        }
        Ok(Decoded::PassThrough) => {
            let object = object.expect("a pass-through message is a JSON object");
            assert!(!object.contains_key("action"), "{text:?}");
        }
        Ok(Decoded::Secret(secret)) => {
            let object = object.expect("a secret message is a JSON object");
            assert_eq!(object["action"], "secret");
            assert_eq!(object["body"], secret.as_str());
        }
        Ok(Decoded::Subscribe { entity, id }) => {
            check_decoded_key(object, "subscribe", &entity, &id);
            let frame = parse(&fuzzing::subscribed_frame(&entity, &id));
            assert_key_body(&frame, "subscribed", &entity, &id);
            // The snapshot push and a refusal for the key are JSON too.
            for rows in [&[][..], &[Bytes::from_static(b"{\"a\":[1,\"x\"]}")][..]] {
                for frame in fuzzing::push_frames(&entity, &id, 7, rows, false) {
                    assert_key_body(&parse(&frame), "push", &entity, &id);
                }
            }
            let frame = fuzzing::error_frame(ErrorCode::Forbidden, "no", Some((&entity, &id)));
            assert_error_frame(&frame, ErrorCode::Forbidden, "no", Some((&entity, &id)));
        }
        Ok(Decoded::Unsubscribe { entity, id }) => {
            check_decoded_key(object, "unsubscribe", &entity, &id);
            let frame = parse(&fuzzing::unsubscribed_frame(&entity, &id));
            assert_key_body(&frame, "unsubscribed", &entity, &id);
        }
    }
}

/// A decoded (un)subscribe names the key the message's body named, the key
/// is valid, and the message the node would expect for it decodes the same.
fn check_decoded_key(
    object: Option<&serde_json::Map<String, Value>>,
    action: &str,
    entity: &str,
    id: &str,
) {
    let object = object.expect("a decoded key came from a JSON object");
    assert_eq!(object["action"], action);
    assert!(fuzzing::is_valid_key(entity, id), "{entity:?}/{id:?}");
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
        "subscribe" => Decoded::Subscribe {
            entity: entity.into(),
            id: id.into(),
        },
        _ => Decoded::Unsubscribe {
            entity: entity.into(),
            id: id.into(),
        },
    };
    assert_eq!(fuzzing::decode(&again.to_string()), Ok(expected));
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

/// A resolver's answer as the node handles it: OK rows are accepted exactly
/// when each is one JSON value and the version is at most 2^53, and the push
/// frame built from them is JSON holding them in order; every failure gives
/// an error frame whose code is in `ErrorCode::ALL` and whose message is the
/// resolver's own or a fixed one, never an inner error's text. A node's
/// relay of the answer to another node reads back the same.
pub fn check_key_result(answer: &Answer) {
    let entity = "items";
    let id = if fuzzing::is_valid_key(entity, &answer.id) {
        answer.id.as_str()
    } else {
        "1"
    };
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
    let outcome = fuzzing::read_key_result(entity, id, answer.key_result());
    match (answer.status, outcome) {
        (1, Ok((rows, version))) => {
            assert!(rows_are_json, "accepted a row that is not JSON");
            assert!(version <= MAX_VERSION, "accepted version {version}");
            assert_eq!(version, answer.version);
            assert_eq!(rows.len(), answer.rows.len());
            for (got, sent) in rows.iter().zip(&answer.rows) {
                assert_eq!(&got[..], &sent[..], "rows are kept verbatim, in order");
            }
            check_push_frames(entity, id, version, &rows);
        }
        (1, Err(failure)) => {
            let expected = if !rows_are_json {
                FailureKind::InvalidRow
            } else {
                assert!(
                    answer.version > MAX_VERSION,
                    "refused {answer:?}: {failure:?}"
                );
                FailureKind::VersionTooLarge
            };
            assert_eq!(failure.kind, expected, "{failure:?}");
            check_failure(
                entity,
                id,
                &failure,
                ErrorCode::ResolverError,
                INVALID_ANSWER,
            );
        }
        (status @ 2..=4, Err(failure)) => {
            let (kind, code, default) = match status {
                2 => (FailureKind::NotFound, ErrorCode::NotFound, "no such key"),
                3 => (
                    FailureKind::Forbidden,
                    ErrorCode::Forbidden,
                    "access denied",
                ),
                _ => (
                    FailureKind::Failed,
                    ErrorCode::ResolverError,
                    "the resolver failed",
                ),
            };
            assert_eq!(failure.kind, kind);
            let own = (!answer.message.is_empty()).then(|| answer.message.clone());
            assert_eq!(failure.resolver_message, own);
            let message = own.as_deref().unwrap_or(default);
            check_failure(entity, id, &failure, code, message);
        }
        (_, Err(failure)) => {
            assert!(!(1..=4).contains(&answer.status));
            assert_eq!(failure.kind, FailureKind::UnknownStatus);
            check_failure(
                entity,
                id,
                &failure,
                ErrorCode::ResolverError,
                INVALID_ANSWER,
            );
        }
        (status, Ok(_)) => panic!("status {status} was accepted as OK"),
    }
    check_relay(answer);
}

fn check_failure(
    entity: &str,
    id: &str,
    failure: &fuzzing::Failure,
    code: ErrorCode,
    message: &str,
) {
    assert_eq!(failure.code, code, "{failure:?}");
    assert_eq!(failure.message, message, "{failure:?}");
    let frame = fuzzing::error_frame(failure.code, &failure.message, Some((entity, id)));
    assert_error_frame(&frame, code, message, Some((entity, id)));
}

/// The push frames built from accepted rows: the envelope is JSON with the
/// key, the version and the rows in order; bare frames are the rows verbatim.
pub fn check_push_frames(entity: &str, id: &str, version: u64, rows: &[Bytes]) {
    let frames = fuzzing::push_frames(entity, id, version, rows, false);
    assert_eq!(frames.len(), 1);
    let frame = parse(&frames[0]);
    assert_key_body(&frame, "push", entity, id);
    assert_eq!(frame["body"]["version"].as_u64(), Some(version), "{frame}");
    let pushed = frame["body"]["rows"].as_array().expect("rows is an array");
    assert_eq!(pushed.len(), rows.len());
    for (pushed, row) in pushed.iter().zip(rows) {
        let row: Value = serde_json::from_slice(row).expect("an accepted row is a Value");
        assert_eq!(pushed, &row);
    }
    let bare = fuzzing::push_frames(entity, id, version, rows, true);
    assert_eq!(bare.len(), rows.len());
    for (frame, row) in bare.iter().zip(rows) {
        assert_eq!(
            frame.as_bytes(),
            &row[..],
            "a bare frame is its row verbatim"
        );
    }
}

/// A node's answer to another node (`key_result`) reads back as the same
/// outcome; failures without a status of their own become ERROR with a
/// fixed message.
fn check_relay(answer: &Answer) {
    let relayed = fuzzing::relay_key_result(answer.key_result(), &answer.id);
    assert_eq!(relayed.id, answer.id);
    let first = fuzzing::read_key_result("items", "1", answer.key_result());
    let again = fuzzing::read_key_result("items", "1", relayed);
    match (first, again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => match a.kind {
            FailureKind::NotFound | FailureKind::Forbidden | FailureKind::Failed => {
                assert_eq!((a.kind, a.resolver_message), (b.kind, b.resolver_message));
            }
            _ => {
                assert_eq!(b.kind, FailureKind::Failed);
                assert_eq!(b.resolver_message.as_deref(), Some(INVALID_ANSWER));
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
    let mut named = std::collections::HashSet::new();
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

/// `Register` on a fresh pool, then the next ones on the same pool (more
/// streams): each is accepted exactly when the documented rules say so
/// (valid alone, and no entity already served with another fetch mode),
/// never panics, and afterwards the pool serves exactly the entities of the
/// accepted ones, with their modes, and sizes the stream's channel from
/// `max_in_flight` (0 = the default, capped at 4,096).
pub fn check_registers(regs: &[Reg]) {
    let mut pool = Pool::new();
    // Sorted by name, as the pool lists them.
    let mut served: std::collections::BTreeMap<String, FetchMode> = Default::default();
    for reg in regs {
        let register = reg.register();
        let in_flight = match reg.max_in_flight {
            0 => Pool::default_max_in_flight(),
            n => n.min(MAX_IN_FLIGHT_CAP),
        };
        assert_eq!(
            pool.channel_capacity(&register),
            in_flight as usize + PASS_THROUGH_HEADROOM
        );
        let result = pool.register(&register);
        let expected = match model(reg) {
            None => Err(RefusedRegister::Invalid),
            Some(wanted) => {
                let conflict = wanted
                    .iter()
                    .any(|(e, m)| served.get(e).is_some_and(|served| served != m));
                if conflict {
                    Err(RefusedRegister::Conflict)
                } else {
                    served.extend(wanted);
                    Ok(())
                }
            }
        };
        assert_eq!(
            result.as_ref().map_err(|(kind, _)| *kind),
            expected.as_ref().map_err(|k| *k),
            "{reg:?}: {result:?}"
        );
        if let Err((_, message)) = &result {
            assert!(!message.is_empty());
        }
        let listed = pool.entities();
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
