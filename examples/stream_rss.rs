//! Peak resident memory while streaming a dataset through the loader (docs/results/loader.md).
//!
//!   cargo run --release --example stream_rss -- gen /tmp/semshare-4g 58000   # ≈ 4.3 GB
//!   cargo run --release --example stream_rss -- stream /tmp/semshare-4g
//!
//! `stream` reads one epoch of shuffled batches of 128 (pool of 4 buffers) and prints VmHWM
//! (peak resident set) next to the pool's size and the bytes streamed. Generation runs as its
//! own process so that the writer's buffers do not count.

use std::sync::Arc;
use std::time::Instant;

use semshare::data::loader::Loader;
use semshare::data::reader::DatasetReader;

#[path = "../benches/support/gen.rs"]
mod generator;

fn status(key: &str) -> String {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find(|l| l.starts_with(key)).map(|l| l[key.len()..].trim().to_string()).unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["gen", dir, images] => {
            let t = Instant::now();
            generator::ensure(std::path::Path::new(dir), images.parse().expect("image count"));
            println!("generated {dir} in {:.1}s", t.elapsed().as_secs_f64());
        }
        ["stream", dir] => {
            const BATCH: usize = 128;
            const POOL: usize = 4;
            let data = Arc::new(DatasetReader::open(dir).expect("a dataset"));
            let n = data.split("train").expect("train").num_images();
            let steps = (n / BATCH) as u64;
            println!("after open: VmHWM {} VmRSS {}", status("VmHWM:"), status("VmRSS:"));
            let t = Instant::now();
            let mut loader = Loader::new(data, "train", BATCH, 0, 0..steps, POOL).expect("loader");
            let mut bytes = 0usize;
            let mut peak_file = String::new();
            while let Some(b) = loader.next_batch() {
                bytes += b.expect("batch").images.feature_bytes();
                peak_file = status("RssFile:");
            }
            println!("RssFile at the last batch: {peak_file}");
            let secs = t.elapsed().as_secs_f64();
            println!(
                "streamed {:.2} GB of fp16 features ({n} images, {steps} batches) in {secs:.1}s ({:.2} GB/s)",
                bytes as f64 / 1e9,
                bytes as f64 / 1e9 / secs
            );
            let pool_mb = (POOL * BATCH * generator::IMAGE_BYTES) as f64 / 1e6;
            println!("buffer pool: {POOL} × {BATCH} images = {pool_mb:.0} MB of features");
            println!(
                "VmHWM {}  VmRSS {} (RssAnon {}, RssFile {})",
                status("VmHWM:"),
                status("VmRSS:"),
                status("RssAnon:"),
                status("RssFile:")
            );
        }
        _ => eprintln!("usage: stream_rss gen DIR IMAGES | stream DIR"),
    }
}
