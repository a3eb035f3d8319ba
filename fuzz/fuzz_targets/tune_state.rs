//! Arbitrary bytes through `harness::tune_state` (fuzz/harness.rs), which tests/fuzz_regressions.rs replays.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::tune_state(data));
