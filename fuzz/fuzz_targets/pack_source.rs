//! Arbitrary bytes as a source directory (files split at a separator line), packed and reopened.
//! The code is `harness::pack_source` (fuzz/harness.rs), which tests/fuzz_regressions.rs replays.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::pack_source(data));
