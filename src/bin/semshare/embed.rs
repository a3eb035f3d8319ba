//! `semshare embed`: a split's embeddings into a file for `score`.

use crate::args::Args;
use crate::common::{device, load_data, split_name};
use semshare::Result;
use semshare::eval::EmbeddingSet;
use semshare::inference::{embed_split, load_model};
use semshare::io::{claim_output, refuse_overlap};
use semshare::model::EmbeddingKind;

pub fn run(args: &Args) -> Result<()> {
    let mut dev = device(args)?;
    let data = load_data(args)?;
    let (net, params) = load_model(dev.as_mut(), &args.path("checkpoint")?)?;
    semshare::train::check_fits(&data.layout, &net.cfg)?;
    let kind: EmbeddingKind = args.get("embedding").unwrap_or("pooled").parse()?;
    let split = data.split(split_name(args))?;
    let out = args.path("out")?;
    refuse_overlap(&out, &args.path("checkpoint")?, "checkpoint (--checkpoint)")?;
    refuse_overlap(&out, &data.dir, "dataset (--data)")?;
    claim_output(&out, "embeddings file", args.has("force"), |p| EmbeddingSet::load(p).is_ok())?;
    let (ie, te, dim) = embed_split(dev.as_mut(), &net, &params, &data.layout, split, kind)?;
    let c = data.meta().num_labels;
    let set = EmbeddingSet::new(ie, split.image_labels(), te, split.text_labels(), dim, c, Some(split.text_items()))?;
    set.save(&out)?;
    println!(
        "wrote {} image and {} text embeddings of width {dim} to {}",
        split.num_images(),
        split.num_texts(),
        out.display()
    );
    Ok(())
}
