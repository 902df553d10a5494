//! `Register` validation: registrations in a row on a fresh resolver pool.
//!
//! Input: the text form of `entity_sync::fuzzing::regs_from_bytes` (at most 16 used).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut regs = entity_sync::fuzzing::regs_from_bytes(data);
    regs.truncate(16);
    entity_sync::fuzzing::check_registers(&regs);
});
