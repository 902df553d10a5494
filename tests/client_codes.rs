//! The browser client's list of error codes is the node's: a code added to
//! one and not the other fails here.

use std::collections::BTreeSet;

use entity_sync::protocol::ErrorCode;

const CLIENT: &str = include_str!("../client/entity-sync.js");

/// The quoted strings of the array or set literal that follows `marker`.
fn quoted_after(marker: &str) -> BTreeSet<String> {
    let start = CLIENT
        .find(marker)
        .unwrap_or_else(|| panic!("{marker:?} not found in client/entity-sync.js"));
    let rest = &CLIENT[start + marker.len()..];
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
    let client = quoted_after("export const ERROR_CODES = Object.freeze([");
    assert_eq!(client, node_codes());
}

#[test]
fn the_clients_code_sets_use_only_node_codes() {
    let node = node_codes();
    for marker in [
        "const SUBSCRIPTION_ENDED = new Set([",
        "const RETRYABLE = new Set([",
    ] {
        let used = quoted_after(marker);
        assert!(!used.is_empty(), "{marker}");
        let unknown: Vec<_> = used.difference(&node).collect();
        assert!(
            unknown.is_empty(),
            "{marker} names codes the node never sends: {unknown:?}"
        );
    }
}
