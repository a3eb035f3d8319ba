//! `semshare export`: an index's vectors for vector databases. `npy`: `PATH` (float32 `[N, D]`)
//! and its ids beside it (`semshare::index::export_ids_path`); `jsonl`: one
//! `{"id", "vector", "payload": {"labels": [...]}}` per line (Qdrant, Milvus). Beside them, the
//! export's manifest (`PATH.export.json`) lists the files it wrote with their checksums: the
//! formats are other tools', so only the manifest can tell an export of ours from a user's
//! array or JSON lines of the same shape.

use std::path::{Path, PathBuf};

use semshare::cli::Args;
use semshare::data::checksum::{checksum, checksum_file, format_checksum};
use semshare::index::npy::npy_bytes;
use semshare::index::{Index, export_ids_path};
use semshare::io::{Staged, claim_file_output, open_regular, read_text, refuse_overlap, stage};
use semshare::{Error, Result};

/// One line of a JSON-lines export.
#[derive(serde::Serialize)]
struct Line<'a> {
    id: &'a str,
    vector: &'a [f32],
    payload: serde_json::Map<String, serde_json::Value>,
}

/// `PATH.export.json`: what one export wrote. `--force` replaces a file only while this lists
/// it as it is now (its size and checksum), so neither a user's file nor an export edited since
/// is ever replaced.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Manifest {
    written_by: String,
    version: String,
    /// The index exported, as the command named it.
    index: String,
    format: String,
    items: usize,
    dim: usize,
    files: Vec<Written>,
}

/// A file of an export, named relative to its manifest's folder (they are siblings).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Written {
    file: String,
    bytes: u64,
    checksum: String,
}

const WRITTEN_BY: &str = "semshare export";

pub fn run(args: &Args) -> Result<()> {
    let index_path = args.path("index")?;
    let out = args.path("out")?;
    let format = args.need("format")?;
    if !["npy", "jsonl"].contains(&format) {
        return Err(Error::config(format!("--format {format}: expected npy or jsonl")));
    }
    let force = args.has("force");
    let manifest_path = manifest_path(&out)?;
    let mut outputs = vec![(out.clone(), if format == "npy" { ".npy export" } else { "JSON-lines export" })];
    if format == "npy" {
        outputs.push((export_ids_path(&out), "ids file of an export"));
    }
    for (path, _) in outputs.iter().chain([&(manifest_path.clone(), "export's manifest")]) {
        refuse_overlap(path, &index_path, "index (--index)")?;
    }
    claim_file_output(&manifest_path, "export's manifest", force, |p| read_manifest(p).is_some())?;
    for (path, what) in &outputs {
        claim_file_output(path, what, force, |p| listed(&manifest_path, p))?;
    }

    let index = Index::open(&index_path)?;
    let (n, dim) = (index.len(), index.dim());
    let contents = if format == "npy" {
        let ids: String = index.ids().map(|id| format!("{id}\n")).collect();
        vec![npy_bytes(index.vectors(), &[n, dim])?, ids.into_bytes()]
    } else {
        vec![jsonl_bytes(&index)]
    };
    let mut files = Vec::new();
    for ((path, _), bytes) in outputs.iter().zip(&contents) {
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        files.push(Written { file, bytes: bytes.len() as u64, checksum: format_checksum(checksum(bytes)) });
    }
    let manifest = Manifest {
        written_by: WRITTEN_BY.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        index: index_path.display().to_string(),
        format: format.into(),
        items: n,
        dim,
        files,
    };
    let json = |m: &Manifest| serde_json::to_string_pretty(m).expect("a manifest serialises") + "\n";
    // Every file written and synced before any replaces the old export: a full disk or a kill
    // while they are written leaves the old one whole. While the files are renamed, a manifest
    // listing both the old export's files and the new ones is in place, so a kill between the
    // renames leaves files a later --force still knows as ours.
    let mut staged: Vec<Staged> = Vec::new();
    for ((path, _), bytes) in outputs.iter().zip(&contents) {
        staged.push(stage(path, bytes)?);
    }
    let old_files = read_manifest(&manifest_path).map(|m| m.files).unwrap_or_default();
    let both = Manifest { files: manifest.files.iter().cloned().chain(old_files).collect(), ..manifest.clone() };
    let final_manifest = stage(&manifest_path, json(&manifest).as_bytes())?;
    stage(&manifest_path, json(&both).as_bytes())?.commit()?;
    for file in staged {
        file.commit()?;
    }
    final_manifest.commit()?;
    match format {
        "npy" => println!(
            "wrote {n} vectors of dimension {dim} to {} and their ids to {} ({} lists them)",
            out.display(),
            outputs[1].0.display(),
            manifest_path.display()
        ),
        _ => println!("wrote {n} items of dimension {dim} to {} ({} lists it)", out.display(), manifest_path.display()),
    }
    Ok(())
}

/// `out` with `.export.json` appended to its name: `gallery.npy` → `gallery.npy.export.json`
/// (an npy and a JSON-lines export of one stem keep apart).
fn manifest_path(out: &Path) -> Result<PathBuf> {
    let name = out.file_name().ok_or_else(|| Error::config(format!("--out {}: not a file path", out.display())))?;
    let mut name = name.to_owned();
    name.push(".export.json");
    Ok(out.with_file_name(name))
}

fn read_manifest(path: &Path) -> Option<Manifest> {
    let text = read_text(path, 1 << 20).ok()?;
    serde_json::from_str::<Manifest>(&text).ok().filter(|m| m.written_by == WRITTEN_BY)
}

/// Whether the export manifest at `manifest` lists `file` with its present size and checksum.
fn listed(manifest: &Path, file: &Path) -> bool {
    let (Some(m), Some(name)) = (read_manifest(manifest), file.file_name()) else { return false };
    let Ok((f, len)) = open_regular(file) else { return false };
    let mut sum = None;
    m.files.iter().filter(|w| std::ffi::OsStr::new(&w.file) == name && w.bytes == len).any(|w| {
        let sum = sum.get_or_insert_with(|| checksum_file(&f, len).ok().map(format_checksum));
        sum.as_ref() == Some(&w.checksum)
    })
}

/// The JSON-lines export of `index`: its labels by name where it knows them.
fn jsonl_bytes(index: &Index) -> Vec<u8> {
    let dim = index.dim();
    let mut text = String::new();
    for (i, (id, vector)) in index.ids().zip(index.vectors().chunks_exact(dim)).enumerate() {
        let mut payload = serde_json::Map::new();
        if let Some(row) = index.labels(i) {
            let on = row.iter().enumerate().filter(|(_, v)| **v == 1).map(|(c, _)| c);
            let labels: Vec<serde_json::Value> = match index.label_names() {
                Some(names) => on.map(|c| names[c].as_str().into()).collect(),
                None => on.map(serde_json::Value::from).collect(),
            };
            payload.insert("labels".into(), labels.into());
        }
        let line = Line { id, vector, payload };
        // The writer prints each f32 in its shortest round-trip form.
        text += &serde_json::to_string(&line).expect("a line serialises");
        text.push('\n');
    }
    text.into_bytes()
}
