//! Arbitrary bytes as a `--config` file, merged into the presets, validated, its model built.
//! The code is `harness::config` (fuzz/harness.rs), which tests/fuzz_regressions.rs replays.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::config(data));
