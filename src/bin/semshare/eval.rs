//! `semshare eval`: a checkpoint's retrieval metrics on a split.

use crate::args::Args;
use crate::common::{device, load_data, print_report, split_name};
use semshare::Result;
use semshare::eval::EvalConfig;
use semshare::inference::{evaluate_split, load_model};
use semshare::model::EmbeddingKind;

pub fn run(args: &Args) -> Result<()> {
    let mut dev = device(args)?;
    let data = load_data(args)?;
    let (net, params) = load_model(dev.as_mut(), &args.path("checkpoint")?)?;
    semshare::train::check_fits(&data.layout, &net.cfg)?;
    let kind: EmbeddingKind = args.get("embedding").unwrap_or("pooled").parse()?;
    let report = evaluate_split(dev.as_mut(), &net, &params, &data, split_name(args), kind, &EvalConfig::default())?;
    print_report(&report, args.has("json"));
    Ok(())
}
