//! Arbitrary bytes as dataset.json next to the fixture dataset; opened, checked, every item read.
//! The code is `harness::manifest` (fuzz/harness.rs), which tests/fuzz_regressions.rs replays.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::manifest(data));
