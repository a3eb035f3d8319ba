//! `semshare pack`: a source directory (docs/FORMAT.md) into a dataset.

use semshare::cli::Args;
use semshare::data::pack::pack;
use semshare::data::writer::claim_dataset_output;
use semshare::io::refuse_replacing;
use semshare::{Error, Result};

/// Most MiB per shard `pack` takes (1 TiB).
const MAX_SHARD_MB: usize = 1 << 20;

pub fn run(args: &Args) -> Result<()> {
    let mb: usize = args.num("shard-mb")?.unwrap_or(256);
    let shard_bytes = mb
        .checked_mul(1 << 20)
        .filter(|_| (1..=MAX_SHARD_MB).contains(&mb))
        .ok_or_else(|| Error::config(format!("--shard-mb {mb} is outside 1..={MAX_SHARD_MB}")))?;
    let (from, out) = (args.path("from")?, args.path("out")?);
    refuse_replacing(&out, &from, "source directory (--from)")?;
    claim_dataset_output(&out, args.has("force"))?;
    let s = pack(&from, &out, shard_bytes)?;
    for (name, n, m, shards) in &s.splits {
        println!("{name}: {n} images, {m} texts in {shards} shard(s)");
    }
    println!("wrote {}", s.out.display());
    Ok(())
}
