//! `semshare index`: a gallery index from a dataset split, a file of texts, a feature file or
//! raw vectors (`semshare::index`).

use std::path::{Path, PathBuf};

use crate::common::{device, split_name};
use semshare::cli::Args;
use semshare::data::reader::DatasetReader;
use semshare::index::build::{
    from_features, from_split, from_texts, from_vectors, generated_ids, read_ids, read_lines,
};
use semshare::index::npy::read_npy;
use semshare::index::{Gallery, Index, Modality};
use semshare::io::{claim_file_output, refuse_overlap};
use semshare::{Error, Model, Result};

/// The sources, exactly one of which is given.
const SOURCES: [&str; 4] = ["data", "texts", "features", "vectors"];

pub fn run(args: &Args) -> Result<()> {
    let given: Vec<&str> = SOURCES.into_iter().filter(|s| args.has(s)).collect();
    let source = match given[..] {
        [one] => one,
        [] => {
            return Err(Error::config(
                "give one source: --data DIR, --texts FILE, --features F.npy or --vectors V.npy",
            ));
        }
        _ => return Err(Error::config(format!("give one source, not --{}", given.join(" and --")))),
    };
    // A flag the source does not use is a mistake to report, not to ignore.
    let unused: &[&str] = match source {
        "data" => &["ids"],
        "texts" => &["split", "side"],
        "features" => &["split"],
        _ => &["checkpoint", "split", "side", "embedding", "device"],
    };
    if let Some(flag) = unused.iter().find(|f| args.has(f)) {
        return Err(Error::config(format!("--{flag} does not apply to an index from --{source}")));
    }
    let out = args.path("out")?;
    let input = args.path(source)?;
    refuse_overlap(&out, &input, &format!("input (--{source})"))?;
    for extra in ["checkpoint", "ids"] {
        if let Some(p) = args.get(extra) {
            refuse_overlap(&out, Path::new(p), &format!("input (--{extra})"))?;
        }
    }
    let (existing, _append_lock) = if args.has("append") {
        // Written by rename, a link would be replaced by a file and its target left as it was.
        if std::fs::symlink_metadata(&out).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::refused(&out, "is a symbolic link; --append writes the index itself (name its target)"));
        }
        if !out.exists() {
            return Err(Error::config(format!(
                "--append: {} does not exist yet (build it without --append)",
                out.display()
            )));
        }
        let lock = lock_for_append(&out)?;
        (Some(Index::open(&out)?), Some(lock))
    } else {
        claim_file_output(&out, "gallery index", args.has("force"), |p| Index::open(p).is_ok())?;
        (None, None)
    };
    let side: Option<Modality> = args.get("side").map(str::parse).transpose()?;
    let gallery = if source == "vectors" {
        let vectors = read_npy(&input)?;
        let n = vectors.shape.first().copied().unwrap_or(0);
        from_vectors(vectors, ids(args, &input, n)?).map_err(|e| in_file(&input, e))?
    } else {
        let checkpoint = args.path("checkpoint")?;
        let mut model = Model::load(&checkpoint, device(args)?)?;
        if let Some(e) = args.get("embedding") {
            model.set_embedding(e.parse()?);
        }
        match source {
            "data" => {
                let data = DatasetReader::open(&input)?;
                let split = data.split(split_name(args))?;
                from_split(&mut model, &data.layout, split, side.unwrap_or(Modality::Image))?
            }
            "texts" => {
                crate::common::words_for(&model)?;
                let texts = read_lines(&input)?;
                let ids = ids(args, &input, texts.len())?;
                from_texts(&mut model, &texts, ids).map_err(|e| in_file(&input, e))?
            }
            _ => {
                let features = read_npy(&input)?;
                let ids = ids(args, &input, features.shape.first().copied().unwrap_or(0))?;
                from_features(&mut model, &features, side.unwrap_or(Modality::Image), ids)
                    .map_err(|e| in_file(&input, e))?
            }
        }
    };
    let (added, what) = (gallery.len(), describe(&gallery));
    let gallery = match existing {
        Some(index) => {
            let mut all = index.to_gallery();
            all.append(gallery).map_err(|e| in_file(&out, e))?;
            all
        }
        None => gallery,
    };
    gallery.save(&out)?;
    println!("wrote {} ({added} {what} added, {} in all, dimension {})", out.display(), gallery.len(), gallery.dim);
    Ok(())
}

/// The index at `out` locked against a second `--append` until the file is dropped: one that
/// read the index before this one renamed its new version in would write it without this one's
/// items. The lock holds the file as opened, so one replaced in between is refused too.
fn lock_for_append(out: &Path) -> Result<std::fs::File> {
    let busy = "another `semshare index --append` is adding to this index; run again when it is done";
    let file = std::fs::File::open(out).map_err(|e| Error::io(out, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(Error::refused(out, busy)),
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(out, e)),
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let inode = |m: std::fs::Metadata| (m.dev(), m.ino());
        let held = file.metadata().map(inode).map_err(|e| Error::io(out, e))?;
        if std::fs::metadata(out).map(inode).ok() != Some(held) {
            return Err(Error::refused(out, busy));
        }
    }
    Ok(file)
}

fn describe(g: &Gallery) -> String {
    match &g.origin {
        semshare::index::Origin::Model { modality, embedding, .. } => {
            format!("{} items, {} embedding", modality.name(), embedding.name())
        }
        semshare::index::Origin::Vectors => "raw vectors".into(),
    }
}

/// `--ids FILE`, or `stem/0`, `stem/1`, … after the input file's name.
fn ids(args: &Args, input: &Path, n: usize) -> Result<Vec<String>> {
    match args.get("ids") {
        Some(p) => read_ids(&PathBuf::from(p), n),
        None => {
            let stem = input.file_stem().map_or("item".into(), |s| s.to_string_lossy().into_owned());
            Ok(generated_ids(&stem, n))
        }
    }
}

/// A data error of a file's content, said with the file's name.
fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Data { what } => Error::format(path, what),
        other => other,
    }
}
