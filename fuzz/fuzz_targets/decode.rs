//! The websocket decoder on arbitrary bytes, and the frames built for what it decodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| entity_sync::fuzzing::check_decode(data));
