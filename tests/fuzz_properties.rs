//! The fuzz targets' properties (`fuzz/src/lib.rs`) as bounded property tests, run by `cargo test`.
//!
//! The same checks cargo-fuzz runs for as long as one likes, here with a
//! fixed number of generated cases each (a few seconds in all), so every
//! test run covers the websocket decoder, resolver answers and `Register`
//! validation without libFuzzer. Inputs are generated near the rules'
//! edges (key characters, 128-byte limits, 2^53, fetch modes, duplicates)
//! as well as at random.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use checks::{Answer, Reg, check_decode, check_key_result, check_registers};
use proptest::prelude::*;
use serde_json::{Value, json};

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
    let max = entity_sync::fuzzing::MAX_VERSION;
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
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

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
        let answer = checks::answer_from_bytes(&seed).expect("a seed is an answer");
        check_key_result(&answer);
    }
    for seed in seeds("register") {
        check_registers(&checks::regs_from_bytes(&seed));
    }
}
