//! Arbitrary bytes as the embeddings file of `score`, loaded and scored.
//! The code is `harness::embeddings` (fuzz/harness.rs), which tests/fuzz_regressions.rs replays.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::embeddings(data));
