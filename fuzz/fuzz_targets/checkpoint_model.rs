//! Arbitrary bytes as the model configuration in a checkpoint's metadata, loaded as a checkpoint.
//! The code is `harness::checkpoint_model` (fuzz/harness.rs), which tests/fuzz_regressions.rs replays.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::checkpoint_model(data));
