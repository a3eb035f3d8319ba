//! `semshare query`: the top-k items of an index for texts, features or pre-computed vectors.

use crate::common::{device, words_for};
use semshare::cli::Args;
use semshare::index::build::{embed_features, read_lines};
use semshare::index::npy::read_npy;
use semshare::index::{Hit, Index, Modality, Origin, search};
use semshare::inference::Embeddings;
use semshare::{Error, Model, Result};

/// What a result line says a query was: its text, or its row in a file.
enum Named {
    Text(String),
    Row(usize),
}

pub fn run(args: &Args) -> Result<()> {
    let start = std::time::Instant::now();
    let index = Index::open(&args.path("index")?)?;
    let opened = start.elapsed();
    let k: usize = args.num("k")?.unwrap_or(10);
    if k == 0 {
        return Err(Error::config("--k must be at least 1"));
    }
    let kinds: Vec<&str> = [
        ("text", args.has("text") || args.has("queries")),
        ("features", args.has("features")),
        ("vectors", args.has("vectors")),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect();
    if kinds.len() != 1 {
        return Err(Error::config(
            "give one kind of query: --text \"...\" / --queries FILE (texts), --features Q.npy, or --vectors Q.npy",
        ));
    }
    if args.has("side") && kinds[0] != "features" {
        return Err(Error::config("--side says what --features are; it does not apply to other queries"));
    }
    let searched;
    let (names, results) = if kinds[0] == "vectors" {
        let path = args.path("vectors")?;
        let q = read_npy(&path)?;
        if q.shape.len() != 2 || q.shape[1] != index.dim() {
            return Err(Error::format(
                &path,
                format!(
                    "query vectors of shape {:?}, the index {} holds dimension {}",
                    q.shape,
                    index.path().display(),
                    index.dim()
                ),
            ));
        }
        // Vectors carry no model; a --checkpoint says which model made them, checked when the
        // index was made by one.
        if let Some(ckpt) = args.get("checkpoint") {
            if !matches!(index.origin(), Origin::Model { .. }) {
                return Err(Error::config(format!(
                    "--checkpoint {ckpt}: the index {} holds raw vectors, made by no model, so there is nothing to check it against",
                    index.path().display()
                )));
            }
            let mut model = Model::load(ckpt, device(args)?)?;
            index.check_model(model_for(&index, &mut model))?;
        }
        let names = (0..q.shape[0]).map(Named::Row).collect();
        let queries = Embeddings { values: q.values, dim: q.shape[1] };
        // Said of this file here; search checks them again, as it does for any caller.
        queries.check_rows("query vector", f64::from(f32::MAX)).map_err(|e| match e {
            Error::Data { what } => Error::format(&path, what),
            e => e,
        })?;
        let mut dev = device(args)?;
        let t = std::time::Instant::now();
        let results = search(dev.as_mut(), &index, &queries, k)?;
        searched = t.elapsed();
        (names, results)
    } else {
        let checkpoint = args.path("checkpoint")?;
        let mut model = Model::load(&checkpoint, device(args)?)?;
        index.check_model(model_for(&index, &mut model))?;
        let (names, emb) = if kinds[0] == "text" {
            words_for(&model)?;
            let mut texts: Vec<String> = args.all("text").into_iter().map(String::from).collect();
            if let Some(path) = args.get("queries") {
                texts.extend(read_lines(std::path::Path::new(path))?);
            }
            if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
                return Err(Error::data(format!("query {i} is empty")));
            }
            let emb = model.embed_texts(&texts)?;
            (texts.into_iter().map(Named::Text).collect::<Vec<_>>(), emb)
        } else {
            let path = args.path("features")?;
            let features = read_npy(&path)?;
            let side = args.get("side").map(str::parse).transpose()?.unwrap_or(Modality::Image);
            let emb = embed_features(&mut model, &features, side).map_err(|e| Error::format(&path, e.to_string()))?;
            ((0..emb.len()).map(Named::Row).collect(), emb)
        };
        let t = std::time::Instant::now();
        let results = search(model.device(), &index, &emb, k)?;
        searched = t.elapsed();
        (names, results)
    };
    print_results(&index, &names, &results, args.has("json"))?;
    if args.has("timing") {
        let (nq, s) = (results.len(), searched.as_secs_f64());
        eprintln!(
            "timing: index opened in {:.3} s; top-{k} of {nq} queries against {} items in {s:.3} s ({:.0} queries/s); {:.3} s in all",
            opened.as_secs_f64(),
            index.len(),
            nq as f64 / s.max(1e-9),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `model` set to embed with the index's embedding, as its items were.
fn model_for<'m>(index: &Index, model: &'m mut Model) -> &'m Model {
    if let Origin::Model { embedding, .. } = index.origin() {
        model.set_embedding(*embedding);
    }
    model
}

/// The results on stdout, which are the command's output: a write that fails (a full disk,
/// `> /dev/full`) is an error; a reader that closed the pipe (`| head -1`) has what it wanted.
fn print_results(index: &Index, names: &[Named], results: &[Vec<Hit>], json: bool) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = (|| -> std::io::Result<()> {
        for (name, hits) in names.iter().zip(results) {
            if json {
                let query = match name {
                    Named::Text(t) => serde_json::Value::from(t.as_str()),
                    Named::Row(i) => serde_json::Value::from(*i),
                };
                let results: Vec<serde_json::Value> = hits
                    .iter()
                    .map(
                        |h| serde_json::json!({"id": index.id(h.item).unwrap_or_default(), "score": shortest(h.score)}),
                    )
                    .collect();
                writeln!(out, "{}", serde_json::json!({"query": query, "results": results}))?;
            } else {
                match name {
                    Named::Text(t) => writeln!(out, "query {t:?}")?,
                    Named::Row(i) => writeln!(out, "query {i}")?,
                }
                for (rank, h) in hits.iter().enumerate() {
                    writeln!(out, "  {:>3}  {:.6}  {}", rank + 1, h.score, index.id(h.item).unwrap_or_default())?;
                }
            }
        }
        out.flush()
    })();
    match written {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("stdout", e)),
        _ => Ok(()),
    }
}

/// The f64 whose decimal form is the f32's shortest round-trip form (`0.8123` rather than
/// `0.8123000264167786`).
fn shortest(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}
