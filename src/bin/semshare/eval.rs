//! `semshare eval`: a checkpoint's retrieval metrics on a split.

use crate::common::{Trained, print_report, split_name};
use semshare::Result;
use semshare::cli::Args;
use semshare::eval::EvalConfig;
use semshare::inference::evaluate_split;

pub fn run(args: &Args) -> Result<()> {
    let Trained { mut dev, data, net, params, kind } = Trained::open(args)?;
    let report = evaluate_split(dev.as_mut(), &net, &params, &data, split_name(args), kind, &EvalConfig::default())?;
    print_report(&report, args.has("json"));
    Ok(())
}
