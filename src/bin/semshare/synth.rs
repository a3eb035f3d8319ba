//! `semshare synth`: a synthetic dataset, or MIRFlickr-25K's real labels and tags with
//! synthetic regions (`--preset flickr-tags`).

use semshare::cli::Args;
use semshare::data::flickr_tags::{FlickrTagsConfig, RealTags, generate_flickr_tags};
use semshare::data::pack::is_synth_source;
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::data::writer::claim_dataset_output;
use semshare::io::{claim_output, refuse_replacing};
use semshare::{Error, Result};

pub fn run(args: &Args) -> Result<()> {
    if args.get("preset") == Some("flickr-tags") {
        return synth_flickr_tags(args);
    }
    for flag in ["labels", "format"] {
        if args.has(flag) {
            return Err(Error::config(format!("--{flag} is only for --preset flickr-tags")));
        }
    }
    let name = args.get("preset").unwrap_or("balanced");
    let preset: SynthPreset = name.parse().map_err(|_| {
        Error::config(format!("unknown preset `{name}` (balanced, weak-image, weak-text, flickr-tags)"))
    })?;
    let mut cfg = SynthConfig::preset(preset, args.num("seed")?.unwrap_or(0));
    if let Some(n) = args.num("train")? {
        cfg.train = n;
    }
    if let Some(n) = args.num("val")? {
        cfg.val = n;
    }
    if let Some(n) = args.num("test")? {
        cfg.test = n;
    }
    let out = args.path("out")?;
    claim_dataset_output(&out, args.has("force"))?;
    let data = generate(&cfg)?;
    data.save(&out)?;
    println!(
        "wrote {} ({} / {} / {} images in train / val / test) to {}",
        data.meta.name,
        data.train.num_images(),
        data.val.num_images(),
        data.test.num_images(),
        out.display()
    );
    Ok(())
}

fn synth_flickr_tags(args: &Args) -> Result<()> {
    let mut cfg = FlickrTagsConfig::new(args.num("seed")?.unwrap_or(0));
    for (flag, field) in [("train", &mut cfg.train), ("val", &mut cfg.val), ("test", &mut cfg.queries)] {
        if let Some(n) = args.num(flag)? {
            *field = n;
        }
    }
    let source = match args.get("format").unwrap_or("dataset") {
        "dataset" => false,
        "source" => true,
        f => return Err(Error::config(format!("unknown --format `{f}` (expected dataset or source)"))),
    };
    let labels = args.path("labels")?;
    let out = args.path("out")?;
    refuse_replacing(&out, &labels, "labels directory (--labels)")?;
    if source {
        claim_output(&out, "source directory", args.has("force"), is_synth_source)?;
    } else {
        claim_dataset_output(&out, args.has("force"))?;
    }
    let data = generate_flickr_tags(&cfg, &RealTags::load(&labels)?)?;
    let sizes = format!(
        "{} / {} / {} queries / {} retrieval",
        data.train.num_images(),
        data.val.num_images(),
        data.test.num_images(),
        data.database.num_images()
    );
    let name = data.meta.name.clone();
    let (truncated, t) = (data.truncated, data.meta.max_tokens);
    if source {
        data.save_source(&out)?;
        println!("wrote source directory {name} (train / val / test {sizes}) to {}", out.display());
    } else {
        data.save(&out, 256 << 20)?;
        println!("wrote {name} (train / val / test {sizes}) to {}", out.display());
    }
    if truncated > 0 {
        println!("{truncated} items have more than {t} tags: their texts keep the first {t} (most frequent)");
    }
    Ok(())
}
