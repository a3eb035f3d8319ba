//! `semshare score`: metrics of embeddings from any model.

use crate::common::print_report;
use semshare::Result;
use semshare::cli::Args;
use semshare::eval::{EmbeddingSet, EvalConfig};

pub fn run(args: &Args) -> Result<()> {
    let path = args.path("embeddings")?;
    let set = EmbeddingSet::load(&path)?;
    if !set.is_paired() {
        // On stderr, so that `--json` output stays one JSON document.
        eprintln!(
            "note: R@K left out: {} has {} texts and {} images and no `text.item`, so nothing says which text belongs to which image",
            path.display(),
            set.n_texts(),
            set.n_images()
        );
    }
    print_report(&set.evaluate(&EvalConfig::default())?, args.has("json"));
    Ok(())
}
