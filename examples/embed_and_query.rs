//! Load a trained model, embed a gallery of images, and query it with captions written as plain
//! strings: the library's inference API end to end, on the demo's data.
//!
//!   cargo run --release -- demo                          # trains into $TMPDIR/semshare-demo
//!   cargo run --release --example embed_and_query        # or: -- DEMO_DIR [QUERIES]
//!
//! The gallery is every image of the demo's test split, given to the model as its region
//! features and boxes; the queries are test captions turned back into words, so that they go
//! through the tokeniser as a user's text would. A hit is relevant when its image shares a label
//! with the caption's image; the last line is the precision@5 over all queries.

use std::io::Write;
use std::path::{Path, PathBuf};

use semshare::backend::open;
use semshare::data::batches::{image_batch, text_batch};
use semshare::data::reader::DatasetReader;
use semshare::inference::Regions;
use semshare::{Error, Model, Result};

const K: usize = 5;

// `tests/example_embed_and_query.rs` includes this file and calls `run`.
#[cfg_attr(test, allow(dead_code))]
fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("semshare-demo"));
    let queries = match args.next().map(|n| n.parse()) {
        Some(Ok(n)) => n,
        Some(Err(_)) => fail(Error::config("QUERIES must be a count of captions")),
        None => 20,
    };
    run(&dir, queries, &mut std::io::stdout().lock()).unwrap_or_else(fail);
}

fn fail<T>(e: Error) -> T {
    eprintln!("embed_and_query: {e}");
    std::process::exit(1);
}

/// Loads the demo's model from `dir`, embeds its test images and answers `queries` captions,
/// writing the hits to `out`.
pub fn run(dir: &Path, queries: usize, out: &mut dyn Write) -> Result<()> {
    let checkpoint = dir.join("best.safetensors");
    if !checkpoint.exists() {
        return Err(Error::config(format!(
            "no {} (run `cargo run --release -- demo` first, or pass the demo's --out directory)",
            checkpoint.display()
        )));
    }
    let mut model = Model::load(&checkpoint, open("auto")?)?;
    let data = DatasetReader::open(dir.join("data"))?;
    let test = data.split("test")?;
    let c = data.meta().num_labels;

    // The gallery: each test image as its regions, read straight from the dataset's shards.
    let all: Vec<usize> = (0..test.num_images()).collect();
    let images = image_batch(&data.layout, test, &all)?;
    let (dr, mut region) = (model.config().region_dim, 0);
    let features = images.features.to_f32(); // fp16 or bf16 shards: widened here
    let regions: Vec<Regions> = images
        .lengths
        .iter()
        .map(|&n| {
            let r = Regions::new(&features[region * dr..(region + n) * dr])
                .with_boxes(&images.boxes[region * 5..(region + n) * 5]);
            region += n;
            r
        })
        .collect();
    let gallery = model.embed_images(&regions)?;
    let io = |e: std::io::Error| Error::data(format!("writing the answers: {e}"));
    writeln!(
        out,
        "gallery: {} images embedded ({} embedding, width {})",
        gallery.len(),
        model.embedding().name(),
        gallery.dim
    )
    .map_err(io)?;

    // Queries: the first captions of the split, as strings of the stored vocabulary's words.
    let vocab = model.spec().vocab.clone().ok_or_else(|| Error::config("this checkpoint holds no vocabulary"))?;
    let texts: Vec<usize> = (0..test.num_texts().min(queries)).collect();
    let tokens = text_batch(&data.layout, test, &texts)?;
    let mut start = 0;
    let captions: Vec<String> = tokens
        .lengths
        .iter()
        .map(|&n| {
            let words: Vec<&str> =
                tokens.tokens[start..start + n].iter().map(|&t| vocab[t as usize].as_str()).collect();
            start += n;
            words.join(" ")
        })
        .collect();
    let embedded = model.embed_texts(&captions)?;
    let hits = model.search(&embedded, &gallery, K)?;

    let (image_labels, names) = (test.image_labels(), &data.meta().label_names);
    let labels_of = |i: usize| -> Vec<&str> {
        (0..c).filter(|&l| image_labels[i * c + l] != 0).map(|l| names[l].as_str()).collect()
    };
    let mut relevant = 0;
    for (j, (caption, hit)) in captions.iter().zip(&hits).enumerate() {
        let truth = test.text_image(j);
        let own: Vec<&str> = labels_of(truth);
        writeln!(out, "\n{caption:?}  (image {truth}: {})", own.join(", ")).map_err(io)?;
        for (&id, &score) in hit.ids.iter().zip(&hit.scores) {
            let theirs = labels_of(id as usize);
            let shared = theirs.iter().any(|l| own.contains(l));
            relevant += shared as usize;
            let mark = if id as usize == truth { "  <- its own image" } else { "" };
            let sign = if shared { "+ " } else { "  " };
            writeln!(out, "  {score:.3}  image {id:>4}  {sign}{}{mark}", theirs.join(", ")).map_err(io)?;
        }
    }
    let precision = relevant as f64 / (K * hits.len()) as f64;
    writeln!(out, "\nprecision@{K} over {} queries: {precision:.3} (a hit counts when it shares a label)", hits.len())
        .map_err(io)
}
