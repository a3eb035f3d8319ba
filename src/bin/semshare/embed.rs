//! `semshare embed`: a split's embeddings, L2-normalised, into a file for `score`.

use crate::common::{Trained, split_name};
use semshare::Result;
use semshare::cli::Args;
use semshare::eval::EmbeddingSet;
use semshare::eval::metrics::normalize_rows;
use semshare::inference::embed_split;
use semshare::io::{claim_file_output, refuse_overlap};

pub fn run(args: &Args) -> Result<()> {
    let Trained { mut dev, data, net, params, kind } = Trained::open(args)?;
    let split = data.split(split_name(args))?;
    let out = args.path("out")?;
    refuse_overlap(&out, &args.path("checkpoint")?, "checkpoint (--checkpoint)")?;
    refuse_overlap(&out, &data.dir, "dataset (--data)")?;
    claim_file_output(&out, "embeddings file", args.has("force"), EmbeddingSet::written_by_semshare)?;
    let (mut ie, mut te, dim) = embed_split(dev.as_mut(), &net, &params, &data.layout, split, kind)?;
    // Unit rows, as `eval` ranks them (it normalises too, so the metrics are the same).
    normalize_rows(&mut ie, dim);
    normalize_rows(&mut te, dim);
    let c = data.meta().num_labels;
    let set = EmbeddingSet::new(ie, split.image_labels(), te, split.text_labels(), dim, c, Some(split.text_items()))?;
    set.save(&out)?;
    println!(
        "wrote {} image and {} text embeddings of width {dim} to {}",
        split.num_images(),
        split.num_texts(),
        out.display()
    );
    if let Some(db) = data.database().filter(|_| split.name == "test") {
        eprintln!(
            "note: `score` ranks these test items among themselves; `eval` ranks them against the database split ({} images), so their figures differ",
            db.num_images()
        );
    }
    Ok(())
}
