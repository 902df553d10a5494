//! The JavaScript client's list of error codes is the node's: a code added to
//! one and not the other fails here. Both the TypeScript source and the
//! committed build (what the demo serves and npm ships) are read.

use std::collections::BTreeSet;

use entity_sync::websocket::protocol::ErrorCode;

const SOURCE: (&str, &str) = (
    "clients/js/src/entity-sync.ts",
    include_str!("../../clients/js/src/entity-sync.ts"),
);
const BUILD: (&str, &str) = (
    "clients/js/dist/entity-sync.js",
    include_str!("../../clients/js/dist/entity-sync.js"),
);

/// The quoted strings of the array or set literal that follows `marker`.
fn quoted_after((path, text): (&str, &str), marker: &str) -> BTreeSet<String> {
    let start = text
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} not found in {path}"));
    let rest = &text[start + marker.len()..];
    let end = rest.find(']').expect("the literal ends");
    rest[..end]
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn node_codes() -> BTreeSet<String> {
    ErrorCode::ALL
        .iter()
        .map(|code| code.as_str().to_owned())
        .collect()
}

#[test]
fn the_client_lists_exactly_the_nodes_error_codes() {
    let marker = "export const ERROR_CODES = Object.freeze([";
    assert_eq!(quoted_after(SOURCE, marker), node_codes(), "{}", SOURCE.0);
    assert_eq!(quoted_after(BUILD, marker), node_codes(), "{}", BUILD.0);
}

#[test]
fn the_clients_own_codes_never_collide_with_the_nodes() {
    let marker = "export const CLIENT_ERROR_CODES = Object.freeze([";
    for file in [SOURCE, BUILD] {
        let own = quoted_after(file, marker);
        assert!(!own.is_empty(), "{}", file.0);
        for code in &own {
            assert!(code.starts_with("client_"), "{}: {code}", file.0);
        }
        assert!(own.is_disjoint(&node_codes()), "{}", file.0);
    }
}

#[test]
fn the_clients_code_sets_use_only_node_codes() {
    let node = node_codes();
    for (file, marker) in [
        (
            SOURCE,
            "const SUBSCRIPTION_ENDED: ReadonlySet<string> = new Set<ErrorCode>([",
        ),
        (
            SOURCE,
            "const RETRYABLE: ReadonlySet<string> = new Set<ErrorCode>([",
        ),
        (BUILD, "const SUBSCRIPTION_ENDED = new Set(["),
        (BUILD, "const RETRYABLE = new Set(["),
    ] {
        let used = quoted_after(file, marker);
        assert!(!used.is_empty(), "{}: {marker}", file.0);
        let unknown: Vec<_> = used.difference(&node).collect();
        assert!(
            unknown.is_empty(),
            "{}: {marker} names codes the node never sends: {unknown:?}",
            file.0
        );
    }
}
