//! Arbitrary bytes as a checkpoint (metadata and tensors), loaded and its model built.
//! The code is `harness::checkpoint` (fuzz/harness.rs), which tests/fuzz_regressions.rs replays.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::checkpoint(data));
