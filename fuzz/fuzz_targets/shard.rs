//! Arbitrary bytes as a shard file, opened against the fuzz layouts, every item checked and read.
//! The code is `harness::shard` (fuzz/harness.rs), which tests/fuzz_regressions.rs replays.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::shard(data));
