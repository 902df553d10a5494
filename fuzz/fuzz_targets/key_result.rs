//! Resolver answers (`KeyResult`) as the node reads them, and the frames built from them.
//!
//! Input: the text form of `entity_sync::fuzzing::answer_from_bytes`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(answer) = entity_sync::fuzzing::answer_from_bytes(data) {
        entity_sync::fuzzing::check_key_result(&answer);
    }
});
