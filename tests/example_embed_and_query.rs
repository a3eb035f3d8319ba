//! `examples/embed_and_query.rs` end to end on a small demo's data (issue 13, item 7): the
//! demo trains a model, the example loads it, embeds the test images as a gallery and queries
//! it with captions written as strings.

mod common;

#[path = "../examples/embed_and_query.rs"]
mod example;

use common::cli::{ok, semshare, tmp};

#[test]
fn embeds_a_gallery_and_answers_captions() {
    let dir = tmp("example", "demo");
    let d = dir.to_str().unwrap();
    ok(&semshare(&[
        "demo", "--device", "cpu", "--steps", "4", "--train", "64", "--val", "16", "--test", "40", "--out", d,
    ]));

    let mut out = Vec::new();
    example::run(&dir, 6, &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with("gallery: 40 images embedded"), "{out}");
    // Six queries of five hits each, scores non-increasing, then the summary line.
    let queries = out.split("\n\n").filter(|q| q.starts_with('"')).collect::<Vec<_>>();
    assert_eq!(queries.len(), 6, "{out}");
    for q in &queries {
        let scores: Vec<f32> =
            q.lines().skip(1).map(|l| l.split_whitespace().next().unwrap().parse().unwrap()).collect();
        assert_eq!(scores.len(), 5, "{q}");
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{q}");
        assert!(scores.iter().all(|s| s.abs() <= 1.0 + 1e-5), "cosines: {q}");
    }
    assert!(out.contains("precision@5 over 6 queries: "), "{out}");

    // Without a trained model it says what to run.
    let empty = tmp("example", "empty");
    let err = example::run(&empty, 6, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("run `cargo run --release -- demo` first"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&empty);
}
