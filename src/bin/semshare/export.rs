//! `semshare export`: an index's vectors for vector databases. `npy`: `PATH` (float32 `[N, D]`)
//! and its ids beside it (`semshare::index::export_ids_path`); `jsonl`: one
//! `{"id", "vector", "payload": {"labels": [...]}}` per line (Qdrant, Milvus).

use std::path::Path;

use semshare::cli::Args;
use semshare::index::npy::{npy_bytes, parse_npy, read_npy};
use semshare::index::{Index, export_ids_path};
use semshare::io::{atomic_write, claim_file_output, read_text, refuse_overlap, stage};
use semshare::{Error, Result};

/// One line of a JSON-lines export.
#[derive(serde::Serialize)]
struct Line<'a> {
    id: &'a str,
    vector: &'a [f32],
    payload: serde_json::Map<String, serde_json::Value>,
}

pub fn run(args: &Args) -> Result<()> {
    let index_path = args.path("index")?;
    let out = args.path("out")?;
    let format = args.need("format")?;
    if !["npy", "jsonl"].contains(&format) {
        return Err(Error::config(format!("--format {format}: expected npy or jsonl")));
    }
    refuse_overlap(&out, &index_path, "index (--index)")?;
    let force = args.has("force");
    let index = Index::open(&index_path)?;
    let (n, dim) = (index.len(), index.dim());
    if format == "npy" {
        let ids_path = export_ids_path(&out);
        refuse_overlap(&ids_path, &index_path, "index (--index)")?;
        // An .npy is an export of ours only with its ids file beside it, one line a row.
        let ours_npy = |p: &Path| read_npy(p).is_ok_and(|a| a.shape.len() == 2) && ours_ids(&export_ids_path(p), p);
        claim_file_output(&out, ".npy export", force, ours_npy)?;
        claim_file_output(&ids_path, "ids file of an export", force, |p| ours_ids(p, &out))?;
        // Both written and synced before either replaces anything: a full disk or a kill
        // while they are written leaves the old pair whole; only the two renames lie between
        // the new vectors and their ids.
        let ids: String = index.ids().map(|id| format!("{id}\n")).collect();
        let ids = stage(&ids_path, ids.as_bytes())?;
        let npy = stage(&out, &npy_bytes(index.vectors(), &[n, dim])?)?;
        npy.commit()?;
        ids.commit()?;
        println!("wrote {n} vectors of dimension {dim} to {} and their ids to {}", out.display(), ids_path.display());
    } else {
        claim_file_output(&out, "JSON-lines export", force, ours_jsonl)?;
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
        atomic_write(&out, text.as_bytes())?;
        println!("wrote {n} items of dimension {dim} to {}", out.display());
    }
    Ok(())
}

/// An ids file an npy export wrote: one line per row of the `.npy` beside it.
fn ours_ids(ids: &Path, npy: &Path) -> bool {
    let rows = std::fs::read(npy).ok().and_then(|b| parse_npy(&b).ok()).map(|a| a.shape.first().copied().unwrap_or(0));
    let lines = read_text(ids, u64::MAX).ok().map(|t| t.lines().count());
    rows.is_some() && rows == lines
}

/// A JSON-lines export: every line an object of exactly `id` (a string), `vector` (numbers)
/// and `payload` (an object), as [`Line`] writes them; another tool's dump of ids and vectors
/// is not ours to replace.
fn ours_jsonl(path: &Path) -> bool {
    let Ok(text) = read_text(path, u64::MAX) else { return false };
    let line_is_ours = |l: &str| {
        serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.as_object().cloned()).is_some_and(|o| {
            o.len() == 3
                && o.get("id").is_some_and(serde_json::Value::is_string)
                && o.get("vector")
                    .and_then(|v| v.as_array())
                    .is_some_and(|a| a.iter().all(serde_json::Value::is_number))
                && o.get("payload").is_some_and(serde_json::Value::is_object)
        })
    };
    !text.is_empty() && text.lines().all(line_is_ours)
}
