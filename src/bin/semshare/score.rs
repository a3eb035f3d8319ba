//! `semshare score`: metrics of embeddings from any model.

use crate::common::print_report;
use semshare::Result;
use semshare::cli::Args;
use semshare::eval::{EmbeddingSet, EvalConfig};

pub fn run(args: &Args) -> Result<()> {
    let set = EmbeddingSet::load(&args.path("embeddings")?)?;
    print_report(&set.evaluate(&EvalConfig::default())?, args.has("json"));
    Ok(())
}
