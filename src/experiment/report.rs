//! A suite's results: the scores of each run, their mean ± sample standard deviation over seeds,
//! and Table 1 as markdown (`table1.md`) and JSON (`table1.json`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::scores::{Directions, Scores};
use super::suite::SuiteState;
use crate::model::{EmbeddingKind, Variant};
use crate::{Error, Result};

/// Mean and sample standard deviation (denominator n − 1) of one score over seeds.
/// `std` is None for a single seed, where the sample deviation is undefined.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    pub mean: f64,
    pub std: Option<f64>,
}

/// `mean = Σx/n`, `std = sqrt(Σ(x − mean)² / (n − 1))`.
pub fn mean_std(xs: &[f64]) -> Result<MeanStd> {
    if xs.is_empty() {
        return Err(Error::data("mean ± std of no values"));
    }
    if let Some(x) = xs.iter().find(|x| !x.is_finite()) {
        return Err(Error::data(format!("mean ± std of a non-finite value ({x})")));
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let std = (xs.len() > 1).then(|| (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    Ok(MeanStd { mean, std })
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DirectionsSummary {
    pub i2t: MeanStd,
    pub t2i: MeanStd,
    pub avg: MeanStd,
}

fn summarize_directions(xs: &[Directions]) -> Result<DirectionsSummary> {
    let col = |f: fn(&Directions) -> f64| mean_std(&xs.iter().map(f).collect::<Vec<_>>());
    Ok(DirectionsSummary { i2t: col(|d| d.i2t)?, t2i: col(|d| d.t2i)?, avg: col(|d| d.avg)? })
}

/// One row of Table 1: a variant (at one η) over its seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub variant: Variant,
    pub eta: Option<f64>,
    pub seeds: usize,
    pub k: usize,
    pub ndcg: DirectionsSummary,
    pub map_all: DirectionsSummary,
}

impl Summary {
    /// Row label: the variant, with its η when it has one (`ours+con (η=1)`).
    pub fn label(&self) -> String {
        match self.eta {
            Some(eta) => format!("{} (η={eta})", self.variant),
            None => self.variant.to_string(),
        }
    }
}

/// Aggregates one variant's runs (every seed at one η); all must use the same NDCG cut-off.
pub fn summarize(variant: Variant, eta: Option<f64>, runs: &[Scores]) -> Result<Summary> {
    let first = runs.first().ok_or_else(|| Error::data(format!("no finished run of `{variant}` to summarise")))?;
    if let Some(r) = runs.iter().find(|r| r.k != first.k) {
        return Err(Error::data(format!(
            "`{variant}`: runs scored NDCG@{} and NDCG@{} cannot be averaged",
            first.k, r.k
        )));
    }
    Ok(Summary {
        variant,
        eta,
        seeds: runs.len(),
        k: first.k,
        ndcg: summarize_directions(&runs.iter().map(|r| r.ndcg).collect::<Vec<_>>())?,
        map_all: summarize_directions(&runs.iter().map(|r| r.map_all).collect::<Vec<_>>())?,
    })
}

/// One row per (variant, η) of the suite that has at least one finished run scored with
/// `embedding`, in suite order (CCA has no `label` scores, so no row in that table).
pub fn summaries(state: &SuiteState, embedding: EmbeddingKind) -> Result<Vec<Summary>> {
    let mut out = Vec::new();
    let mut seen: Vec<(Variant, Option<f64>)> = Vec::new();
    for key in state.suite.runs() {
        let id = (key.variant, key.eta);
        if seen.contains(&id) {
            continue;
        }
        seen.push(id);
        let runs: Vec<Scores> = state
            .records_of(key.variant, key.eta)
            .iter()
            .filter_map(|r| match embedding {
                EmbeddingKind::Pooled => Some(r.scores),
                EmbeddingKind::Label => r.label,
            })
            .collect();
        if !runs.is_empty() {
            out.push(summarize(key.variant, key.eta, &runs)?);
        }
    }
    Ok(out)
}

/// A suite's rows ranked with each retrieval embedding.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tables {
    /// Ranked with the pooled embedding z (`rows` in the JSON, as before label rows existed).
    #[serde(rename = "rows")]
    pub pooled: Vec<Summary>,
    /// The same checkpoints ranked with the label embedding.
    #[serde(rename = "label_rows")]
    pub label: Vec<Summary>,
    /// The embedding validation ranked with to choose each run's checkpoint
    /// (`TrainConfig::embedding`).
    #[serde(rename = "checkpoints_selected_with")]
    pub selected_with: String,
}

impl Tables {
    pub fn of(state: &SuiteState, selected_with: &str) -> Result<Tables> {
        Ok(Tables {
            pooled: summaries(state, EmbeddingKind::Pooled)?,
            label: summaries(state, EmbeddingKind::Label)?,
            selected_with: selected_with.to_string(),
        })
    }
}

fn cell(m: &MeanStd) -> String {
    match m.std {
        Some(s) => format!("{:.2} ± {:.2}", m.mean, s),
        None => format!("{:.2} ± —", m.mean),
    }
}

/// Table 1 as markdown: a table per retrieval embedding (pooled first), variants as rows,
/// NDCG@k and mAP@all for I2T, T2I and their average.
pub fn table1_markdown(title: &str, tables: &Tables) -> Result<String> {
    let mut s = format!("# {title}\n\n## Ranked with the pooled embedding z\n\n");
    s += &markdown_rows(&tables.pooled)?;
    s += "\n## The same checkpoints ranked with the label embedding\n\n";
    if tables.label.is_empty() {
        s += "No run has label scores yet.\n";
    } else {
        s += &markdown_rows(&tables.label)?;
    }
    s += "\nScores ×100 on the test split: mean ± sample standard deviation over seeds (n − 1 in the \
          denominator; — where one seed makes it undefined). ";
    s += &format!(
        "Each run's checkpoint is the one with the best validation NDCG ranked with the {} embedding; \
         CCA has no classifier, so no label row.\n",
        tables.selected_with
    );
    Ok(s)
}

fn markdown_rows(rows: &[Summary]) -> Result<String> {
    let first = rows.first().ok_or_else(|| Error::data("Table 1 with no rows"))?;
    if let Some(r) = rows.iter().find(|r| r.k != first.k) {
        return Err(Error::data(format!("rows scored NDCG@{} and NDCG@{} in one table", first.k, r.k)));
    }
    let k = first.k;
    let mut s = format!(
        "| method | seeds | NDCG@{k} I2T | NDCG@{k} T2I | NDCG@{k} avg | mAP@all I2T | mAP@all T2I | mAP@all avg |\n"
    );
    s += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in rows {
        let cells = [&r.ndcg.i2t, &r.ndcg.t2i, &r.ndcg.avg, &r.map_all.i2t, &r.map_all.t2i, &r.map_all.avg];
        let cells: Vec<String> = cells.into_iter().map(cell).collect();
        s += &format!("| {} | {} | {} |\n", r.label(), r.seeds, cells.join(" | "));
    }
    Ok(s)
}

#[derive(Serialize)]
struct TablesJson<'a> {
    title: &'a str,
    #[serde(flatten)]
    tables: &'a Tables,
}

/// Writes `dir/<stem>.md` and `dir/<stem>.json` (`table1`, or `eta` for the η sweep's rows
/// beside Table 1), each atomically (a reader sees the previous table or the new one).
pub fn write_table(dir: &Path, stem: &str, title: &str, tables: &Tables) -> Result<()> {
    let md = table1_markdown(title, tables)?;
    let json = serde_json::to_string_pretty(&TablesJson { title, tables })
        .map_err(|e| Error::data(format!("Table 1 as JSON: {e}")))?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::io::atomic_write(&dir.join(format!("{stem}.md")), md.as_bytes())?;
    crate::io::atomic_write(&dir.join(format!("{stem}.json")), json.as_bytes())
}
