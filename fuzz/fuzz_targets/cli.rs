//! Arbitrary bytes as a command line (one argument per line), parsed as the binary parses it.
//! The code is `harness::cli` (fuzz/harness.rs), which tests/fuzz_regressions.rs replays.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::cli(data));
