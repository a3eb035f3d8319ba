//! Retrieval and its metrics (DESIGN.md §1, "Retrieval" and "Metrics").
//!
//! Ranking: rows are L2-normalised (a zero row stays zero), the gallery is ranked by cosine
//! similarity, descending, ties broken by the lower gallery index first. Similarities come from
//! one SGEMM per block of queries (so a 20k gallery × 2k queries never needs the full matrix at
//! once); sorting and the per-query metrics run in parallel over the queries of a block.
//!
//! Metrics, with relevance `rel = y_q · y_g` (the number of shared labels):
//! - NDCG@k: `DCG@k = Σ_{r=1..k} rel_r / log2(r+1)`, `IDCG@k` the same over the gallery's
//!   relevances sorted descending, NDCG = DCG/IDCG, 0 when IDCG = 0; k beyond the gallery uses the
//!   whole gallery.
//! - mAP@all: relevant iff rel ≥ 1; AP = mean of the precision at each relevant rank; a query
//!   without any relevant item scores 0.
//! - P@k: relevant items in the top k divided by `min(k, gallery size)` (so k beyond the gallery is
//!   the precision of the whole gallery, not a value pulled down by missing items).
//! - PR curve: `P` rank cutoffs `k_i = ceil(i·G/P)`, i = 1..P; mean over queries of precision and
//!   recall at each cutoff (recall of a query without relevant items is 0), as (recall, precision)
//!   pairs in [0, 1].
//! - R@K of the paired item (instance-level): an image query hits if any of its texts is in the
//!   top K; a text query hits if its image is. Queries without any paired item (an image no text
//!   points to) are left out of R@K's mean. Without a pairing (`evaluate_unpaired`, the gallery
//!   protocol) there is no R@K: the report's `recall` is empty.
//!
//! Every score except the PR curve is a mean over queries ×100.

use crate::backend::Precision;
use crate::backend::cpu::dispatch;
use crate::backend::cpu::gemm::{Strided, gemm_strided};
use crate::backend::cpu::topk::rank_key;
use crate::{Error, Result};
use rayon::prelude::*;
use serde::Serialize;

/// Similarities computed per SGEMM call, at most (16 MiB of f32).
const SIM_BLOCK_FLOATS: usize = 1 << 22;

/// One modality's items: embeddings `[n, dim]` and multi-hot labels `[n, num_labels]`,
/// both row-major. `n` is derived from `emb.len() / dim` and checked against the labels.
#[derive(Clone, Copy, Debug)]
pub struct Side<'a> {
    pub emb: &'a [f32],
    pub dim: usize,
    pub labels: &'a [u8],
    pub num_labels: usize,
}

impl<'a> Side<'a> {
    pub fn new(emb: &'a [f32], dim: usize, labels: &'a [u8], num_labels: usize) -> Self {
        Side { emb, dim, labels, num_labels }
    }

    /// Number of items (`emb.len() / dim`; 0 when `dim` is 0). Not validated.
    pub fn rows(&self) -> usize {
        self.emb.len().checked_div(self.dim).unwrap_or(0)
    }

    /// Checks shapes, label values (0 or 1) and finiteness; returns the number of items.
    /// `name` ("images", "texts") goes into the error messages.
    pub fn validate(&self, name: &str) -> Result<usize> {
        if self.dim == 0 {
            return Err(Error::data(format!("{name}: embedding dimension is 0")));
        }
        if self.num_labels == 0 {
            return Err(Error::data(format!("{name}: number of labels is 0")));
        }
        if !self.emb.len().is_multiple_of(self.dim) {
            return Err(Error::data(format!(
                "{name}: {} embedding values is not a whole number of rows of dimension {}",
                self.emb.len(),
                self.dim
            )));
        }
        let n = self.emb.len() / self.dim;
        if n == 0 {
            return Err(Error::data(format!("{name}: no items")));
        }
        if n > u32::MAX as usize {
            return Err(Error::data(format!("{name}: {n} items is more than 2^32 - 1")));
        }
        if Some(self.labels.len()) != n.checked_mul(self.num_labels) {
            return Err(Error::data(format!(
                "{name}: {} label values for {n} items × {} labels",
                self.labels.len(),
                self.num_labels
            )));
        }
        if let Some(i) = self.emb.iter().position(|x| !x.is_finite()) {
            return Err(Error::data(format!(
                "{name}: embedding row {} has a non-finite value ({}) at column {}",
                i / self.dim,
                self.emb[i],
                i % self.dim
            )));
        }
        if let Some(i) = self.labels.iter().position(|&v| v > 1) {
            return Err(Error::data(format!(
                "{name}: labels row {} has value {} at label {} (multi-hot labels must be 0 or 1)",
                i / self.num_labels,
                self.labels[i],
                i % self.num_labels
            )));
        }
        Ok(n)
    }
}

/// Which cutoffs to report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalConfig {
    /// k of NDCG@k (each ≥ 1).
    pub ndcg_ks: Vec<usize>,
    /// k of P@k (each ≥ 1).
    pub precision_ks: Vec<usize>,
    /// K of R@K of the paired item (each ≥ 1).
    pub recall_ks: Vec<usize>,
    /// Points of the precision–recall curve; 0 skips the curve.
    pub pr_points: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            ndcg_ks: vec![10, 100, 500],
            precision_ks: vec![10, 100, 500],
            recall_ks: vec![1, 5, 10],
            pr_points: 20,
        }
    }
}

impl EvalConfig {
    pub fn validate(&self) -> Result<()> {
        for (what, ks) in [("NDCG@k", &self.ndcg_ks), ("P@k", &self.precision_ks), ("R@K", &self.recall_ks)] {
            if ks.contains(&0) {
                return Err(Error::config(format!("evaluation: {what} needs k ≥ 1, got 0")));
            }
        }
        Ok(())
    }
}

/// The scores of one retrieval direction. All ×100 except `pr_curve`, which holds
/// (recall, precision) pairs in [0, 1].
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct DirectionMetrics {
    pub ndcg: Vec<(usize, f64)>,
    pub map_all: f64,
    pub precision: Vec<(usize, f64)>,
    pub pr_curve: Vec<(f64, f64)>,
    /// R@K of the paired item; empty, and absent from the JSON, when nothing pairs queries with
    /// gallery items (the gallery protocol, unpaired embeddings) or no K was asked for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recall: Vec<(usize, f64)>,
}

fn lookup(v: &[(usize, f64)], k: usize) -> Option<f64> {
    v.iter().find(|&&(kk, _)| kk == k).map(|&(_, x)| x)
}

impl DirectionMetrics {
    pub fn ndcg_at(&self, k: usize) -> Option<f64> {
        lookup(&self.ndcg, k)
    }
    pub fn precision_at(&self, k: usize) -> Option<f64> {
        lookup(&self.precision, k)
    }
    pub fn recall_at(&self, k: usize) -> Option<f64> {
        lookup(&self.recall, k)
    }

    /// Elementwise mean of two directions computed with the same [`EvalConfig`]
    /// (the PR curves are averaged point by point).
    pub fn mean(a: &DirectionMetrics, b: &DirectionMetrics) -> DirectionMetrics {
        let pairs = |x: &[(usize, f64)], y: &[(usize, f64)]| -> Vec<(usize, f64)> {
            x.iter().zip(y).map(|(&(k, u), &(_, v))| (k, (u + v) / 2.0)).collect()
        };
        DirectionMetrics {
            ndcg: pairs(&a.ndcg, &b.ndcg),
            map_all: (a.map_all + b.map_all) / 2.0,
            precision: pairs(&a.precision, &b.precision),
            pr_curve: a
                .pr_curve
                .iter()
                .zip(&b.pr_curve)
                .map(|(&(r1, p1), &(r2, p2))| ((r1 + r2) / 2.0, (p1 + p2) / 2.0))
                .collect(),
            recall: pairs(&a.recall, &b.recall),
        }
    }
}

/// I2T (image queries, text gallery), T2I (text queries, image gallery) and their mean.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct Report {
    pub i2t: DirectionMetrics,
    pub t2i: DirectionMetrics,
    pub avg: DirectionMetrics,
}

impl Report {
    /// A fixed-width text table: one row per score, columns I2T, T2I, Avg.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, [f64; 3])> = Vec::new();
        let dirs = [&self.i2t, &self.t2i, &self.avg];
        for (i, &(k, _)) in self.i2t.ndcg.iter().enumerate() {
            rows.push((format!("NDCG@{k}"), dirs.map(|d| d.ndcg[i].1)));
        }
        rows.push(("mAP@all".to_string(), dirs.map(|d| d.map_all)));
        for (i, &(k, _)) in self.i2t.precision.iter().enumerate() {
            rows.push((format!("P@{k}"), dirs.map(|d| d.precision[i].1)));
        }
        for (i, &(k, _)) in self.i2t.recall.iter().enumerate() {
            rows.push((format!("R@{k}"), dirs.map(|d| d.recall[i].1)));
        }
        let mut s = format!("{:<10}{:>9}{:>9}{:>9}\n", "metric", "I2T", "T2I", "Avg");
        for (name, v) in rows {
            s += &format!("{name:<10}{:>9.2}{:>9.2}{:>9.2}\n", v[0], v[1], v[2]);
        }
        s
    }

    /// Pretty-printed JSON of the whole report (PR curves included).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialise report: {e}\"}}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Per-query primitives. `rels_in_rank_order[r]` is the relevance of the item at rank r + 1.

/// Relevance of a pair: the number of shared labels `y_q · y_g` (multi-hot rows).
pub fn relevance(yq: &[u8], yg: &[u8]) -> u32 {
    yq.iter().zip(yg).map(|(&a, &b)| u32::from(a != 0 && b != 0)).sum()
}

/// `DCG@k = Σ_{r=1..min(k, len)} rel_r / log2(r + 1)`.
pub fn dcg_at_k(rels_in_rank_order: &[u32], k: usize) -> f64 {
    rels_in_rank_order.iter().take(k).enumerate().map(|(i, &rel)| f64::from(rel) / ((i + 2) as f64).log2()).sum()
}

/// NDCG@k of one query in [0, 1]: DCG@k over the ranking divided by IDCG@k, the DCG@k of
/// `all_rels` (the relevances of the whole gallery, any order) sorted descending. 0 when IDCG = 0.
pub fn ndcg_at_k(rels_in_rank_order: &[u32], all_rels: &[u32], k: usize) -> f64 {
    let mut ideal = all_rels.to_vec();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg = dcg_at_k(&ideal, k);
    if idcg > 0.0 { dcg_at_k(rels_in_rank_order, k) / idcg } else { 0.0 }
}

/// IDCG@k from a histogram of the gallery's relevances (`hist[v]` = items with relevance v).
fn idcg_from_hist(hist: &[u32], k: usize) -> f64 {
    let mut idcg = 0.0;
    let mut r = 0usize; // items placed so far
    for (v, &count) in hist.iter().enumerate().skip(1).rev() {
        for _ in 0..count {
            if r == k {
                return idcg;
            }
            idcg += v as f64 / ((r + 2) as f64).log2();
            r += 1;
        }
    }
    idcg
}

/// Average precision over the full ranking (relevant iff rel ≥ 1); 0 without relevant items.
pub fn average_precision(rels_in_rank_order: &[u32]) -> f64 {
    let (mut hits, mut sum) = (0usize, 0.0);
    for (i, &rel) in rels_in_rank_order.iter().enumerate() {
        if rel > 0 {
            hits += 1;
            sum += hits as f64 / (i + 1) as f64;
        }
    }
    if hits == 0 { 0.0 } else { sum / hits as f64 }
}

/// Precision at k (relevant iff rel ≥ 1) in [0, 1]: relevant items among the top
/// `min(k, len)` divided by `min(k, len)`; 0 for an empty ranking or k = 0.
pub fn precision_at_k(rels_in_rank_order: &[u32], k: usize) -> f64 {
    let k = k.min(rels_in_rank_order.len());
    if k == 0 {
        return 0.0;
    }
    rels_in_rank_order[..k].iter().filter(|&&r| r > 0).count() as f64 / k as f64
}

/// The PR curve's rank cutoffs `k_i = ceil(i·G/P)`, i = 1..P (repeats when P > G).
pub fn pr_cutoffs(gallery: usize, points: usize) -> Vec<usize> {
    (1..=points).map(|i| (i * gallery).div_ceil(points)).collect()
}

/// One query's precision–recall curve at [`pr_cutoffs`]: (recall, precision) pairs in [0, 1].
/// Recall is 0 when the query has no relevant item.
pub fn pr_curve(rels_in_rank_order: &[u32], points: usize) -> Vec<(f64, f64)> {
    let total = rels_in_rank_order.iter().filter(|&&r| r > 0).count();
    let (mut hits, mut seen) = (0usize, 0usize);
    let mut out = Vec::with_capacity(points);
    for k in pr_cutoffs(rels_in_rank_order.len(), points) {
        while seen < k {
            hits += usize::from(rels_in_rank_order[seen] > 0);
            seen += 1;
        }
        let recall = if total == 0 { 0.0 } else { hits as f64 / total as f64 };
        let precision = if k == 0 { 0.0 } else { hits as f64 / k as f64 };
        out.push((recall, precision));
    }
    out
}

/// L2-normalises each row of `emb` (`[n, dim]`) in place; a zero row stays zero.
pub fn normalize_rows(emb: &mut [f32], dim: usize) {
    if dim == 0 {
        return;
    }
    for row in emb.chunks_exact_mut(dim) {
        let norm = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
        if norm > 0.0 {
            let inv = 1.0 / norm;
            for x in row {
                *x = (f64::from(*x) * inv) as f32;
            }
        }
    }
}

/// The gallery indices ordered by similarity, descending; ties go to the lower index first
/// (`rank_key`, the order of `Backend::top_k` too).
pub fn rank_order(sims: &[f32]) -> Vec<u32> {
    let mut keys: Vec<u64> = sims.iter().enumerate().map(|(i, &s)| rank_key(s, i as u32)).collect();
    keys.sort_unstable();
    keys.into_iter().map(|k| k as u32).collect()
}

// ---------------------------------------------------------------------------------------------
// Evaluation.

/// Retrieval scores in both directions. `text_item[j]` is the image text `j` describes (the
/// paired item of R@K). Every input is validated: consistent lengths, equal embedding widths and
/// label counts, labels 0/1, finite embeddings, `text_item[j] < n_images`.
pub fn evaluate(images: &Side, texts: &Side, text_item: &[u32], cfg: &EvalConfig) -> Result<Report> {
    evaluate_blocked(images, texts, Some(text_item), cfg, SIM_BLOCK_FLOATS)
}

/// Retrieval scores of images and texts with no pairing (nothing says which text describes which
/// image, so the counts may differ): the label metrics only. R@K asks whether the paired item
/// was found, so it is not reported (`cfg.recall_ks` is ignored; `recall` is empty).
pub fn evaluate_unpaired(images: &Side, texts: &Side, cfg: &EvalConfig) -> Result<Report> {
    evaluate_blocked(images, texts, None, cfg, SIM_BLOCK_FLOATS)
}

fn evaluate_blocked(
    images: &Side,
    texts: &Side,
    text_item: Option<&[u32]>,
    cfg: &EvalConfig,
    block_floats: usize,
) -> Result<Report> {
    dispatch::active()?; // a bad SEMSHARE_CPU is reported here, not replaced in direction()
    let unpaired;
    let cfg = match text_item {
        Some(_) => cfg,
        None => {
            unpaired = EvalConfig { recall_ks: Vec::new(), ..cfg.clone() };
            &unpaired
        }
    };
    cfg.validate()?;
    let n_img = images.validate("images")?;
    let n_txt = texts.validate("texts")?;
    if images.dim != texts.dim {
        return Err(Error::data(format!(
            "image embeddings have dimension {} but text embeddings {}",
            images.dim, texts.dim
        )));
    }
    if images.num_labels != texts.num_labels {
        return Err(Error::data(format!("images have {} labels but texts {}", images.num_labels, texts.num_labels)));
    }
    if let Some(items) = text_item
        && items.len() != n_txt
    {
        return Err(Error::data(format!("text_item has {} entries for {n_txt} texts", items.len())));
    }
    let text_item = text_item.unwrap_or(&[]);
    if let Some(j) = text_item.iter().position(|&i| i as usize >= n_img) {
        return Err(Error::data(format!(
            "texts: row {j} pairs with image {} but there are {n_img} images",
            text_item[j]
        )));
    }

    let img = Prepared::new(images);
    let txt = Prepared::new(texts);

    // I2T: the texts of each image (CSR); T2I: the one image of each text; none when unpaired.
    let mut img_offsets = vec![0usize; n_img + 1];
    for &i in text_item {
        img_offsets[i as usize + 1] += 1;
    }
    for i in 0..n_img {
        img_offsets[i + 1] += img_offsets[i];
    }
    let mut fill = img_offsets.clone();
    let mut img_texts = vec![0u32; text_item.len()];
    for (j, &i) in text_item.iter().enumerate() {
        img_texts[fill[i as usize]] = j as u32;
        fill[i as usize] += 1;
    }
    let i2t_pairs = |q: usize| &img_texts[img_offsets[q]..img_offsets[q + 1]];
    let t2i_pairs = |q: usize| text_item.get(q).map_or(&[][..], std::slice::from_ref);

    let i2t = direction(&img, &txt, &i2t_pairs, cfg, block_floats);
    let t2i = direction(&txt, &img, &t2i_pairs, cfg, block_floats);
    let avg = DirectionMetrics::mean(&i2t, &t2i);
    Ok(Report { i2t, t2i, avg })
}

/// The gallery protocol (MIRFlickr: 2,000 test queries against the ~18,000-item database):
/// I2T ranks the gallery's texts for each query image, T2I the gallery's images for each query
/// text, relevance by shared labels as always. Queries are not in the gallery, so no item is
/// paired with a query and R@K is not reported (`cfg.recall_ks` is ignored).
pub fn evaluate_against_gallery(
    query_images: &Side,
    query_texts: &Side,
    gallery_images: &Side,
    gallery_texts: &Side,
    cfg: &EvalConfig,
) -> Result<Report> {
    let cfg = EvalConfig { recall_ks: Vec::new(), ..cfg.clone() };
    cfg.validate()?;
    let sides = [
        ("query images", query_images),
        ("query texts", query_texts),
        ("gallery images", gallery_images),
        ("gallery texts", gallery_texts),
    ];
    for (name, side) in sides {
        side.validate(name)?;
        if side.dim != query_images.dim || side.num_labels != query_images.num_labels {
            return Err(Error::data(format!(
                "{name}: embedding width {} and {} labels, query images have {} and {}",
                side.dim, side.num_labels, query_images.dim, query_images.num_labels
            )));
        }
    }
    let no_pairs = |_: usize| -> &[u32] { &[] };
    let [qi, qt, gi, gt] = sides.map(|(_, s)| Prepared::new(s));
    let i2t = direction(&qi, &gt, &no_pairs, &cfg, SIM_BLOCK_FLOATS);
    let t2i = direction(&qt, &gi, &no_pairs, &cfg, SIM_BLOCK_FLOATS);
    let avg = DirectionMetrics::mean(&i2t, &t2i);
    Ok(Report { i2t, t2i, avg })
}

/// A validated side, ready for ranking: normalised embeddings and labels packed as bits.
struct Prepared {
    n: usize,
    dim: usize,
    emb: Vec<f32>,
    words: usize,
    bits: Vec<u64>,
}

impl Prepared {
    fn new(side: &Side) -> Self {
        let n = side.rows();
        let mut emb = side.emb.to_vec();
        normalize_rows(&mut emb, side.dim);
        let words = side.num_labels.div_ceil(64);
        let mut bits = vec![0u64; n * words];
        for (r, row) in side.labels.chunks_exact(side.num_labels).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                if v != 0 {
                    bits[r * words + c / 64] |= 1 << (c % 64);
                }
            }
        }
        Prepared { n, dim: side.dim, emb, words, bits }
    }

    fn label_bits(&self, i: usize) -> &[u64] {
        &self.bits[i * self.words..(i + 1) * self.words]
    }
}

/// What one query contributes.
struct QueryStats {
    ndcg: Vec<f64>,
    ap: f64,
    precision: Vec<f64>,
    pr: Vec<(f64, f64)>,
    /// 0-based rank of the best-ranked paired item; None without paired items.
    first_pair: Option<usize>,
}

fn direction<'p>(
    q: &Prepared,
    g: &Prepared,
    pairs: &(dyn Fn(usize) -> &'p [u32] + Sync),
    cfg: &EvalConfig,
    block_floats: usize,
) -> DirectionMetrics {
    let (nq, ng) = (q.n, g.n);
    let block = (block_floats / ng).clamp(1, nq);
    let mut sims = vec![0f32; block * ng];
    let mut stats: Vec<QueryStats> = Vec::with_capacity(nq);
    for start in (0..nq).step_by(block) {
        let rows = block.min(nq - start);
        let sims = &mut sims[..rows * ng];
        // sims[rows, ng] = Q[start.., dim] · Gᵀ[dim, ng]
        // SAFETY: Q's block is rows×dim (row stride dim), G is ng×dim read as its transpose
        // (row stride 1, column stride dim), sims is rows×ng (row stride ng); all in bounds.
        unsafe {
            gemm_strided(
                dispatch::current(),
                Precision::F32,
                rows,
                q.dim,
                ng,
                1.0,
                q.emb[start * q.dim..].as_ptr(),
                Strided::rows(q.dim),
                g.emb.as_ptr(),
                Strided::transposed(g.dim),
                0.0,
                sims.as_mut_ptr(),
                Strided::rows(ng),
            );
        }
        let block_stats: Vec<QueryStats> = sims
            .par_chunks(ng)
            .enumerate()
            .map_init(
                || (Vec::<u64>::with_capacity(ng), Vec::<u32>::with_capacity(ng)),
                |(keys, rels), (r, row)| query_stats(q, g, start + r, row, pairs(start + r), cfg, keys, rels),
            )
            .collect();
        stats.extend(block_stats);
    }
    summarise(&stats, cfg)
}

#[allow(clippy::too_many_arguments)]
fn query_stats(
    q: &Prepared,
    g: &Prepared,
    qi: usize,
    sims: &[f32],
    paired: &[u32],
    cfg: &EvalConfig,
    keys: &mut Vec<u64>,
    rels: &mut Vec<u32>,
) -> QueryStats {
    keys.clear();
    keys.extend(sims.iter().enumerate().map(|(j, &s)| rank_key(s, j as u32)));
    keys.sort_unstable();
    let yq = q.label_bits(qi);
    let rel = |j: usize| -> u32 { yq.iter().zip(g.label_bits(j)).map(|(a, b)| (a & b).count_ones()).sum() };
    rels.clear();
    rels.extend(keys.iter().map(|&k| rel(k as u32 as usize)));
    let max_rel = rels.iter().copied().max().unwrap_or(0) as usize;
    let mut hist = vec![0u32; max_rel + 1];
    for &r in rels.iter() {
        hist[r as usize] += 1;
    }
    let ndcg = cfg
        .ndcg_ks
        .iter()
        .map(|&k| {
            let idcg = idcg_from_hist(&hist, k);
            if idcg > 0.0 { dcg_at_k(rels, k) / idcg } else { 0.0 }
        })
        .collect();
    let first_pair = paired.iter().filter_map(|&j| keys.binary_search(&rank_key(sims[j as usize], j)).ok()).min();
    QueryStats {
        ndcg,
        ap: average_precision(rels),
        precision: cfg.precision_ks.iter().map(|&k| precision_at_k(rels, k)).collect(),
        pr: pr_curve(rels, cfg.pr_points),
        first_pair,
    }
}

fn summarise(stats: &[QueryStats], cfg: &EvalConfig) -> DirectionMetrics {
    let n = stats.len().max(1) as f64;
    let mean = |f: &dyn Fn(&QueryStats) -> f64| stats.iter().map(f).sum::<f64>() / n;
    let with_pair = stats.iter().filter(|s| s.first_pair.is_some()).count();
    DirectionMetrics {
        ndcg: (cfg.ndcg_ks.iter().enumerate()).map(|(i, &k)| (k, 100.0 * mean(&|s| s.ndcg[i]))).collect(),
        map_all: 100.0 * mean(&|s| s.ap),
        precision: (cfg.precision_ks.iter().enumerate())
            .map(|(i, &k)| (k, 100.0 * mean(&|s| s.precision[i])))
            .collect(),
        pr_curve: (0..cfg.pr_points).map(|p| (mean(&|s| s.pr[p].0), mean(&|s| s.pr[p].1))).collect(),
        recall: cfg
            .recall_ks
            .iter()
            .map(|&k| {
                let hits = stats.iter().filter(|s| s.first_pair.is_some_and(|r| r < k)).count();
                let r = if with_pair == 0 { 0.0 } else { 100.0 * hits as f64 / with_pair as f64 };
                (k, r)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;

    /// 1 / log2(3): the discount of rank 2.
    const D2: f64 = 0.630_929_753_571_457_4;

    fn close(got: f64, want: f64) {
        assert!((got - want).abs() < 1e-6, "got {got}, want {want}");
    }

    fn cfg(ndcg: &[usize], prec: &[usize], recall: &[usize], pr_points: usize) -> EvalConfig {
        EvalConfig { ndcg_ks: ndcg.to_vec(), precision_ks: prec.to_vec(), recall_ks: recall.to_vec(), pr_points }
    }

    #[test]
    fn primitives_by_hand() {
        // rels [1, 2, 0, 1]: DCG@2 = 1/1 + 2/log2(3) = 1 + 2·D2; ideal [2, 1, 1, 0] gives
        // IDCG@2 = 2 + D2.
        let rels = [1, 2, 0, 1];
        close(dcg_at_k(&rels, 2), 1.0 + 2.0 * D2);
        close(ndcg_at_k(&rels, &rels, 2), (1.0 + 2.0 * D2) / (2.0 + D2)); // 0.859719
        // DCG@4 adds 1/log2(5); IDCG@4 adds 1/log2(4) = 0.5.
        let dcg4 = 1.0 + 2.0 * D2 + 1.0 / 5f64.log2();
        close(ndcg_at_k(&rels, &rels, 4), dcg4 / (2.0 + D2 + 0.5));
        // Relevant at ranks 1, 2, 4: AP = (1/1 + 2/2 + 3/4) / 3 = 0.916667.
        close(average_precision(&rels), (1.0 + 1.0 + 0.75) / 3.0);
        close(precision_at_k(&rels, 3), 2.0 / 3.0);
        // G = 4, 2 points: cutoffs ceil(4/2) = 2 and 4; 3 relevant in all.
        assert_eq!(pr_cutoffs(4, 2), vec![2, 4]);
        assert_eq!(pr_cutoffs(3, 2), vec![2, 3]); // ceil(1.5) = 2
        assert_eq!(pr_cutoffs(2, 4), vec![1, 1, 2, 2]);
        let pr = pr_curve(&rels, 2);
        close(pr[0].0, 2.0 / 3.0);
        close(pr[0].1, 1.0);
        close(pr[1].0, 1.0);
        close(pr[1].1, 0.75);
        assert_eq!(relevance(&[1, 1, 0, 1], &[1, 0, 0, 1]), 2);
        // The histogram IDCG agrees with the sorted one: rels {2: 1, 1: 2, 0: 1}.
        close(idcg_from_hist(&[1, 2, 1], 2), 2.0 + D2);
        close(idcg_from_hist(&[1, 2, 1], 10), 2.0 + D2 + 0.5);
    }

    #[test]
    fn no_relevant_item_scores_zero() {
        assert_eq!(ndcg_at_k(&[0, 0, 0], &[0, 0, 0], 2), 0.0);
        assert_eq!(average_precision(&[0, 0, 0]), 0.0);
        assert_eq!(pr_curve(&[0, 0], 1), vec![(0.0, 0.0)]);

        // Image 0 has no label; image 1 = [1, 0]. Texts t0 = [1, 0], t1 = [0, 1], t2 = [1, 1].
        // Both images embed as (1, 0); texts (1, 0), (0, 1), (-1, 0): every image ranks t0, t1, t2.
        // Image 0: rels [0, 0, 0] → NDCG 0, AP 0, P@2 0, (R, P) at cutoff 3 = (0, 0).
        // Image 1: rels [1, 0, 1] → NDCG@2 = 1 / (1 + D2) = 0.613147, AP = (1 + 2/3)/2 = 0.833333,
        // P@2 = 0.5, (R, P) at cutoff 3 = (1, 2/3).
        let img_emb = [1.0, 0.0, 1.0, 0.0];
        let img_lab = [0, 0, 1, 0];
        let txt_emb = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0];
        let txt_lab = [1, 0, 0, 1, 1, 1];
        let images = Side::new(&img_emb, 2, &img_lab, 2);
        let texts = Side::new(&txt_emb, 2, &txt_lab, 2);
        let r = evaluate(&images, &texts, &[0, 1, 1], &cfg(&[2], &[2], &[1], 1)).unwrap();
        close(r.i2t.ndcg_at(2).unwrap(), 50.0 / (1.0 + D2)); // 30.657360
        close(r.i2t.map_all, 50.0 * (1.0 + 2.0 / 3.0) / 2.0); // 41.666667
        close(r.i2t.precision_at(2).unwrap(), 25.0);
        close(r.i2t.pr_curve[0].0, 0.5);
        close(r.i2t.pr_curve[0].1, 1.0 / 3.0);
    }

    #[test]
    fn k_larger_than_gallery_uses_whole_gallery() {
        // rels [1, 0, 2], k = 10: DCG = 1 + 0 + 2/log2(4) = 2; IDCG over [2, 1, 0] = 2 + D2.
        close(ndcg_at_k(&[1, 0, 2], &[1, 0, 2], 10), 2.0 / (2.0 + D2)); // 0.760188
        // P@10 divides by min(10, 3) = 3.
        close(precision_at_k(&[1, 0, 2], 10), 2.0 / 3.0);

        // Same data as `no_relevant_item_scores_zero`, k = 10 > 3 texts. Image 1, rels [1, 0, 1]:
        // DCG = 1 + 1/log2(4) = 1.5, IDCG = 1 + D2 → 0.919721; image 0 scores 0 → mean 45.986039.
        // P@10: image 1 has 2 of 3 → 66.67, image 0 → 0; mean 33.33.
        let img_emb = [1.0, 0.0, 1.0, 0.0];
        let img_lab = [0, 0, 1, 0];
        let txt_emb = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0];
        let txt_lab = [1, 0, 0, 1, 1, 1];
        let images = Side::new(&img_emb, 2, &img_lab, 2);
        let texts = Side::new(&txt_emb, 2, &txt_lab, 2);
        let r = evaluate(&images, &texts, &[0, 1, 1], &cfg(&[10], &[10], &[10], 0)).unwrap();
        close(r.i2t.ndcg_at(10).unwrap(), 50.0 * 1.5 / (1.0 + D2));
        close(r.i2t.precision_at(10).unwrap(), 100.0 / 3.0);
        assert!(r.i2t.pr_curve.is_empty());
        // R@10 with 3 texts: every paired item is in the "top 10".
        close(r.i2t.recall_at(10).unwrap(), 100.0);
        close(r.t2i.recall_at(10).unwrap(), 100.0);
    }

    #[test]
    fn ties_go_to_lower_gallery_index() {
        // -0.0 and 0.0 tie as well.
        assert_eq!(rank_order(&[0.5, 0.9, 0.5, -0.0, 0.0, 0.9]), vec![1, 5, 0, 2, 3, 4]);
        assert_eq!(rank_order(&[0.0, -0.0, -1.0, 1.0]), vec![3, 0, 1, 2]);

        // Query (1, 0), label [1]. Gallery: g0 = (0, 1) rel 0, g1 = (2, 0) rel 0,
        // g2 = (1, 0) rel 1. g1 and g2 tie at cosine 1 → order g1, g2, g0 → rels [0, 1, 0]:
        // AP = 1/2, NDCG@1 = 0, NDCG@2 = D2 / 1 = 0.630930. The wrong tie order would give
        // AP = 1 and NDCG@1 = 1.
        let q_emb = [1.0, 0.0];
        let q_lab = [1];
        let g_emb = [0.0, 1.0, 2.0, 0.0, 1.0, 0.0];
        let g_lab = [0, 0, 1];
        let images = Side::new(&q_emb, 2, &q_lab, 1);
        let texts = Side::new(&g_emb, 2, &g_lab, 1);
        let r = evaluate(&images, &texts, &[0, 0, 0], &cfg(&[1, 2], &[1], &[1], 0)).unwrap();
        close(r.i2t.map_all, 50.0);
        close(r.i2t.ndcg_at(1).unwrap(), 0.0);
        close(r.i2t.ndcg_at(2).unwrap(), 100.0 * D2);
        close(r.i2t.precision_at(1).unwrap(), 0.0);
    }

    #[test]
    fn several_captions_per_image() {
        // Images i0 = (1, 0), i1 = (0, 1). Texts t0 = (0, 1), t1 = (1, 0), t2 = (1, 1),
        // t3 = (-1, 0); t0, t1 describe i0 and t2, t3 describe i1.
        // I2T: i0 ranks t1 (1), t2 (.707), t0 (0), t3 (-1): its caption t1 is first → hit @1.
        //      i1 ranks t0 (1), t2 (.707), t1 (0), t3 (0): its first caption is t2 at rank 2.
        //      R@1 = 50, R@2 = 100.
        // T2I: t0 ranks i1, i0 → its image i0 at rank 2; t1 ranks i0 first → 1;
        //      t2 ties (.707 both) → i0, i1 → i1 at rank 2; t3 ranks i1 (0), i0 (-1) → 1.
        //      R@1 = 50, R@2 = 100.
        let img_emb = [1.0, 0.0, 0.0, 1.0];
        let txt_emb = [0.0, 1.0, 1.0, 0.0, 1.0, 1.0, -1.0, 0.0];
        let img_lab = [1, 1];
        let txt_lab = [1, 1, 1, 1];
        let images = Side::new(&img_emb, 2, &img_lab, 1);
        let texts = Side::new(&txt_emb, 2, &txt_lab, 1);
        let c = cfg(&[1], &[1], &[1, 2, 3], 0);
        let r = evaluate(&images, &texts, &[0, 0, 1, 1], &c).unwrap();
        let recalls = |d: &DirectionMetrics| d.recall.clone();
        assert_eq!(recalls(&r.i2t), vec![(1, 50.0), (2, 100.0), (3, 100.0)]);
        assert_eq!(recalls(&r.t2i), vec![(1, 50.0), (2, 100.0), (3, 100.0)]);
        assert_eq!(recalls(&r.avg), vec![(1, 50.0), (2, 100.0), (3, 100.0)]);

        // An image no text points to (i2) is left out of I2T R@K: still 50 / 100.
        let img_emb = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0];
        let img_lab = [1, 1, 1];
        let images = Side::new(&img_emb, 2, &img_lab, 1);
        let r = evaluate(&images, &texts, &[0, 0, 1, 1], &c).unwrap();
        assert_eq!(recalls(&r.i2t), vec![(1, 50.0), (2, 100.0), (3, 100.0)]);
    }

    /// The full 3 images × 4 texts example, both directions, worked by hand.
    #[test]
    fn full_three_by_four_example() {
        // Images: i0 = (1, 0), i1 = (0, 1), i2 = (-1, 0); labels [0,1,1], [1,0,0], [1,1,0].
        // Texts: t0 = (1, 0), t1 = (0.8, 0.6), t2 = (0, 1), t3 = (-1, 0);
        //        labels [1,1,0], [0,1,1], [1,0,0], [0,1,0]; text_item = [1, 0, 2, 0].
        // rel(image, text):  t0 t1 t2 t3
        //               i0:   1  2  0  1
        //               i1:   1  0  1  0
        //               i2:   2  1  1  1
        let img_emb = [1.0, 0.0, 0.0, 1.0, -1.0, 0.0];
        let img_lab = [0, 1, 1, 1, 0, 0, 1, 1, 0];
        let txt_emb = [1.0, 0.0, 0.8, 0.6, 0.0, 1.0, -1.0, 0.0];
        let txt_lab = [1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0];
        let images = Side::new(&img_emb, 2, &img_lab, 3);
        let texts = Side::new(&txt_emb, 2, &txt_lab, 3);
        let c = cfg(&[2], &[2], &[1, 2, 3], 2);
        let r = evaluate(&images, &texts, &[1, 0, 2, 0], &c).unwrap();

        // I2T rankings and rels:
        //   i0: sims 1, .8, 0, -1  → t0 t1 t2 t3, rels [1,2,0,1]
        //       NDCG@2 = (1 + 2·D2)/(2 + D2) = 0.859719; AP = (1 + 1 + 3/4)/3 = 0.916667; P@2 = 1
        //   i1: sims 0, .6, 1, 0   → t2 t1 t0 t3 (t0, t3 tie), rels [1,0,1,0]
        //       NDCG@2 = 1/(1 + D2) = 0.613147; AP = (1 + 2/3)/2 = 0.833333; P@2 = 0.5
        //   i2: sims -1, -.8, 0, 1 → t3 t2 t1 t0, rels [1,1,1,2]
        //       NDCG@2 = (1 + D2)/(2 + D2) = 0.619906; AP = 1; P@2 = 1
        // NDCG@2 = 100 · (0.859719 + 0.613147 + 0.619906)/3 = 69.759071; mAP = 91.666667;
        // P@2 = 83.333333.
        close(r.i2t.ndcg_at(2).unwrap(), 69.759_070_863_390_7);
        close(r.i2t.map_all, 275.0 / 3.0);
        close(r.i2t.precision_at(2).unwrap(), 250.0 / 3.0);
        // PR, G = 4, cutoffs 2 and 4. k = 2: recalls 2/3, 1/2, 2/4; precisions 1, 1/2, 1.
        // k = 4: recall 1 for all; precisions 3/4, 2/4, 1.
        close(r.i2t.pr_curve[0].0, 5.0 / 9.0);
        close(r.i2t.pr_curve[0].1, 2.5 / 3.0);
        close(r.i2t.pr_curve[1].0, 1.0);
        close(r.i2t.pr_curve[1].1, 0.75);
        // Paired texts: i0 ← {t1, t3}: t1 at rank 2; i1 ← {t0}: rank 3; i2 ← {t2}: rank 2.
        close(r.i2t.recall_at(1).unwrap(), 0.0);
        close(r.i2t.recall_at(2).unwrap(), 200.0 / 3.0);
        close(r.i2t.recall_at(3).unwrap(), 100.0);

        // T2I rankings and rels:
        //   t0 (1, 0):    i0 i1 i2, rels [1,1,2]: NDCG@2 = (1 + D2)/(2 + D2) = 0.619906, AP 1
        //   t1 (.8, .6):  i0 i1 i2, rels [2,0,1]: NDCG@2 = 2/(2 + D2) = 0.760188, AP 0.833333
        //   t2 (0, 1):    i1 i0 i2 (i0, i2 tie), rels [1,0,1]: 1/(1 + D2) = 0.613147, AP 0.833333
        //   t3 (-1, 0):   i2 i1 i0, rels [1,0,1]: 0.613147, AP 0.833333
        // NDCG@2 = 65.159704; mAP = (1 + 3·0.833333)/4 = 87.5; P@2 = (1 + .5 + .5 + .5)/4 = 62.5.
        close(r.t2i.ndcg_at(2).unwrap(), 65.159_703_806_171_28);
        close(r.t2i.map_all, 87.5);
        close(r.t2i.precision_at(2).unwrap(), 62.5);
        // Paired image of t0..t3 = i1, i0, i2, i0 at ranks 2, 1, 3, 3.
        close(r.t2i.recall_at(1).unwrap(), 25.0);
        close(r.t2i.recall_at(2).unwrap(), 50.0);
        close(r.t2i.recall_at(3).unwrap(), 100.0);

        close(r.avg.ndcg_at(2).unwrap(), 67.459_387_334_780_98);
        close(r.avg.map_all, (275.0 / 3.0 + 87.5) / 2.0);
        close(r.avg.recall_at(2).unwrap(), (200.0 / 3.0 + 50.0) / 2.0);

        // Query blocks of any size give the same report (1 row per SGEMM and more).
        for block in [1, 4, 5, 8, 12] {
            assert_eq!(evaluate_blocked(&images, &texts, Some(&[1, 0, 2, 0]), &c, block).unwrap(), r);
        }

        let table = r.table();
        assert!(table.contains("NDCG@2"), "{table}");
        assert!(table.contains("69.76"), "{table}");
        assert!(table.contains("mAP@all"), "{table}");
        assert!(table.contains("R@3"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["t2i"]["map_all"], 87.5);
        assert_eq!(json["i2t"]["recall"][2][0], 3);

        // Without the pairing: the same label metrics, R@K left out (and absent from the JSON).
        let unpaired = evaluate_unpaired(&images, &texts, &c).unwrap();
        let strip = |d: &DirectionMetrics| DirectionMetrics { recall: Vec::new(), ..d.clone() };
        assert_eq!((strip(&r.i2t), strip(&r.t2i), strip(&r.avg)), (unpaired.i2t, unpaired.t2i, unpaired.avg));
        let json: serde_json::Value =
            serde_json::from_str(&evaluate_unpaired(&images, &texts, &c).unwrap().to_json()).unwrap();
        assert!(json["i2t"].get("recall").is_none() && json["avg"].get("ndcg").is_some(), "{json}");
        assert!(!evaluate_unpaired(&images, &texts, &c).unwrap().table().contains("R@"));
    }

    #[test]
    fn bad_input_is_an_error_naming_side_and_row() {
        let img_emb = [1.0, 0.0, 0.0, 1.0];
        let img_lab = [1, 0, 0, 1];
        let txt_emb = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let txt_lab = [1, 0, 0, 1, 1, 1];
        let c = EvalConfig::default();
        let img = Side::new(&img_emb, 2, &img_lab, 2);
        let txt = Side::new(&txt_emb, 2, &txt_lab, 2);
        assert!(evaluate(&img, &txt, &[0, 1, 1], &c).is_ok());
        let err = |r: Result<Report>| r.unwrap_err().to_string();

        let nan = [1.0, 0.0, 0.0, 1.0, 1.0, f32::NAN];
        let e = err(evaluate(&img, &Side::new(&nan, 2, &txt_lab, 2), &[0, 1, 1], &c));
        assert!(e.contains("texts") && e.contains("row 2"), "{e}");
        let inf = [1.0, 0.0, f32::INFINITY, 1.0];
        let e = err(evaluate(&Side::new(&inf, 2, &img_lab, 2), &txt, &[0, 1, 1], &c));
        assert!(e.contains("images") && e.contains("row 1"), "{e}");
        let lab2 = [1, 0, 2, 1];
        let e = err(evaluate(&Side::new(&img_emb, 2, &lab2, 2), &txt, &[0, 1, 1], &c));
        assert!(e.contains("images") && e.contains("row 1") && e.contains("value 2"), "{e}");
        let e = err(evaluate(&img, &txt, &[0, 2, 1], &c));
        assert!(e.contains("row 1") && e.contains("image 2"), "{e}");
        let e = err(evaluate(&img, &txt, &[0, 1], &c));
        assert!(e.contains("text_item"), "{e}");
        let e = err(evaluate(&img, &Side::new(&txt_emb, 3, &txt_lab[..4], 2), &[0, 1], &c));
        assert!(e.contains("dimension"), "{e}");
        let e = err(evaluate(&img, &Side::new(&txt_emb[..5], 2, &txt_lab, 2), &[0, 1, 1], &c));
        assert!(e.contains("texts"), "{e}");
        let e = err(evaluate(&img, &Side::new(&txt_emb, 2, &txt_lab[..4], 2), &[0, 1, 1], &c));
        assert!(e.contains("texts") && e.contains("label values"), "{e}");
        let e = err(evaluate(&img, &Side::new(&txt_emb, 2, &txt_lab, 1), &[0, 1, 1], &c));
        assert!(e.contains("texts"), "{e}");
        let e = err(evaluate(&Side::new(&img_emb, 0, &img_lab, 2), &txt, &[0, 1, 1], &c));
        assert!(e.contains("images") && e.contains("dimension"), "{e}");
        let e = err(evaluate(&Side::new(&[], 2, &[], 2), &txt, &[0, 1, 1], &c));
        assert!(e.contains("images") && e.contains("no items"), "{e}");
        let zero_k = EvalConfig { ndcg_ks: vec![0], ..EvalConfig::default() };
        let e = err(evaluate(&img, &txt, &[0, 1, 1], &zero_k));
        assert!(e.contains("NDCG"), "{e}");
    }

    // ---- property tests --------------------------------------------------------------------

    struct Data {
        dim: usize,
        c: usize,
        img_emb: Vec<f32>,
        img_lab: Vec<u8>,
        txt_emb: Vec<f32>,
        txt_lab: Vec<u8>,
        text_item: Vec<u32>,
    }

    impl Data {
        fn random(seed: u64, n_img: usize, n_txt: usize, dim: usize, c: usize) -> Data {
            let mut rng = Rng::new(seed);
            let mut emb = |n: usize| (0..n * dim).map(|_| rng.normal() as f32).collect::<Vec<_>>();
            let (img_emb, txt_emb) = (emb(n_img), emb(n_txt));
            let mut rng = Rng::derive(seed, 1);
            let mut lab = |n: usize| (0..n * c).map(|_| rng.bernoulli(0.4) as u8).collect();
            let (img_lab, txt_lab) = (lab(n_img), lab(n_txt));
            let mut rng = Rng::derive(seed, 2);
            let text_item = (0..n_txt).map(|_| rng.below(n_img) as u32).collect();
            Data { dim, c, img_emb, img_lab, txt_emb, txt_lab, text_item }
        }
        fn images(&self) -> Side<'_> {
            Side::new(&self.img_emb, self.dim, &self.img_lab, self.c)
        }
        fn texts(&self) -> Side<'_> {
            Side::new(&self.txt_emb, self.dim, &self.txt_lab, self.c)
        }
        fn eval(&self, cfg: &EvalConfig) -> Report {
            evaluate(&self.images(), &self.texts(), &self.text_item, cfg).unwrap()
        }
    }

    fn cos64(a: &[f32], b: &[f32]) -> f64 {
        let dot = |x: &[f32], y: &[f32]| -> f64 { x.iter().zip(y).map(|(&u, &v)| f64::from(u) * f64::from(v)).sum() };
        let (na, nb) = (dot(a, a).sqrt(), dot(b, b).sqrt());
        if na == 0.0 || nb == 0.0 { 0.0 } else { dot(a, b) / (na * nb) }
    }

    /// The smallest gap between two f64 cosine similarities of one query, over all queries.
    fn min_gap(q: &Side, g: &Side) -> f64 {
        let mut gap = f64::INFINITY;
        for qr in q.emb.chunks(q.dim) {
            let mut s: Vec<f64> = g.emb.chunks(g.dim).map(|gr| cos64(qr, gr)).collect();
            s.sort_by(f64::total_cmp);
            for w in s.windows(2) {
                gap = gap.min(w[1] - w[0]);
            }
        }
        gap
    }

    /// The definition, written the obvious way: f64 cosine, a stable sort, the primitives.
    fn naive_direction(q: &Side, g: &Side, paired: &[Vec<u32>], cfg: &EvalConfig) -> DirectionMetrics {
        let (nq, ng) = (q.rows(), g.rows());
        let (mut ndcg, mut ap) = (vec![0.0; cfg.ndcg_ks.len()], 0.0);
        let mut prec = vec![0.0; cfg.precision_ks.len()];
        let mut pr = vec![(0.0, 0.0); cfg.pr_points];
        let (mut hits, mut with_pair) = (vec![0usize; cfg.recall_ks.len()], 0usize);
        for (qi, qrow) in q.emb.chunks(q.dim).enumerate() {
            let sims: Vec<f64> = (0..ng).map(|j| cos64(qrow, &g.emb[j * g.dim..(j + 1) * g.dim])).collect();
            let mut order: Vec<usize> = (0..ng).collect();
            order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a])); // stable: ties keep index order
            let yq = &q.labels[qi * q.num_labels..(qi + 1) * q.num_labels];
            let rel = |j: usize| relevance(yq, &g.labels[j * g.num_labels..(j + 1) * g.num_labels]);
            let all: Vec<u32> = (0..ng).map(rel).collect();
            let ranked: Vec<u32> = order.iter().map(|&j| all[j]).collect();
            for (i, &k) in cfg.ndcg_ks.iter().enumerate() {
                ndcg[i] += ndcg_at_k(&ranked, &all, k);
            }
            ap += average_precision(&ranked);
            for (i, &k) in cfg.precision_ks.iter().enumerate() {
                prec[i] += precision_at_k(&ranked, k);
            }
            for (acc, p) in pr.iter_mut().zip(pr_curve(&ranked, cfg.pr_points)) {
                acc.0 += p.0;
                acc.1 += p.1;
            }
            if !paired[qi].is_empty() {
                with_pair += 1;
                let best = order.iter().position(|j| paired[qi].contains(&(*j as u32))).unwrap();
                for (h, &k) in hits.iter_mut().zip(&cfg.recall_ks) {
                    *h += usize::from(best < k);
                }
            }
        }
        let n = nq as f64;
        DirectionMetrics {
            ndcg: cfg.ndcg_ks.iter().zip(ndcg).map(|(&k, v)| (k, 100.0 * v / n)).collect(),
            map_all: 100.0 * ap / n,
            precision: cfg.precision_ks.iter().zip(prec).map(|(&k, v)| (k, 100.0 * v / n)).collect(),
            pr_curve: pr.into_iter().map(|(r, p)| (r / n, p / n)).collect(),
            recall: (cfg.recall_ks.iter().zip(hits))
                .map(|(&k, h)| (k, if with_pair == 0 { 0.0 } else { 100.0 * h as f64 / with_pair as f64 }))
                .collect(),
        }
    }

    fn assert_metrics_close(got: &DirectionMetrics, want: &DirectionMetrics) {
        let pairs = |a: &[(usize, f64)], b: &[(usize, f64)]| {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert_eq!(x.0, y.0);
                assert!((x.1 - y.1).abs() < 1e-9, "{got:?} vs {want:?}");
            }
        };
        pairs(&got.ndcg, &want.ndcg);
        pairs(&got.precision, &want.precision);
        pairs(&got.recall, &want.recall);
        assert!((got.map_all - want.map_all).abs() < 1e-9, "{got:?} vs {want:?}");
        assert_eq!(got.pr_curve.len(), want.pr_curve.len());
        for (x, y) in got.pr_curve.iter().zip(&want.pr_curve) {
            assert!((x.0 - y.0).abs() < 1e-12 && (x.1 - y.1).abs() < 1e-12);
        }
    }

    fn in_range(d: &DirectionMetrics) -> bool {
        let pct = |v: f64| (0.0..=100.0).contains(&v);
        d.ndcg.iter().all(|&(_, v)| pct(v))
            && d.precision.iter().all(|&(_, v)| pct(v))
            && d.recall.iter().all(|&(_, v)| pct(v))
            && pct(d.map_all)
            && d.pr_curve.iter().all(|&(r, p)| (0.0..=1.0).contains(&r) && (0.0..=1.0).contains(&p))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// evaluate agrees with the naive f64 definition, and every score is within bounds.
        #[test]
        fn evaluate_matches_naive_definition_and_bounds(
            n_img in 1usize..7, n_txt in 1usize..10, dim in 2usize..6, c in 1usize..5,
            points in 0usize..6, block in 1usize..40, seed: u64,
        ) {
            let d = Data::random(seed, n_img, n_txt, dim, c);
            prop_assume!(min_gap(&d.images(), &d.texts()) > 1e-4);
            prop_assume!(min_gap(&d.texts(), &d.images()) > 1e-4);
            let cfg = cfg(&[1, 3, 12], &[1, 2, 12], &[1, 2, 5], points);
            let r = evaluate_blocked(&d.images(), &d.texts(), Some(&d.text_item), &cfg, block).unwrap();
            let mut img_texts = vec![Vec::new(); n_img];
            for (j, &i) in d.text_item.iter().enumerate() {
                img_texts[i as usize].push(j as u32);
            }
            let txt_img: Vec<Vec<u32>> = d.text_item.iter().map(|&i| vec![i]).collect();
            assert_metrics_close(&r.i2t, &naive_direction(&d.images(), &d.texts(), &img_texts, &cfg));
            assert_metrics_close(&r.t2i, &naive_direction(&d.texts(), &d.images(), &txt_img, &cfg));
            prop_assert!(in_range(&r.i2t) && in_range(&r.t2i) && in_range(&r.avg));
        }

        /// A gallery ranked by relevance, descending, scores NDCG 100 at every k.
        #[test]
        fn perfect_ranking_scores_100(g in 1usize..20, c in 1usize..6, seed: u64) {
            let mut rng = Rng::new(seed);
            let mut q_lab: Vec<u8> = (0..c).map(|_| rng.bernoulli(0.5) as u8).collect();
            q_lab[rng.below(c)] = 1;
            let mut g_lab: Vec<u8> = (0..g * c).map(|_| rng.bernoulli(0.5) as u8).collect();
            g_lab[..c].copy_from_slice(&q_lab); // at least one relevant item
            let rels: Vec<u32> = g_lab.chunks(c).map(|y| relevance(&q_lab, y)).collect();
            let mut by_rel: Vec<usize> = (0..g).collect();
            by_rel.sort_by(|&a, &b| rels[b].cmp(&rels[a]));
            // The item at position p of by_rel sits at angle p/g from the query (1, 0).
            let mut g_emb = vec![0f32; 2 * g];
            for (p, &j) in by_rel.iter().enumerate() {
                let theta = p as f64 / g as f64;
                g_emb[2 * j] = theta.cos() as f32;
                g_emb[2 * j + 1] = theta.sin() as f32;
            }
            let q_emb = [1.0, 0.0];
            let ks = [1, 2, 5, g, g + 7];
            let cfg = cfg(&ks, &[1], &[1], 3);
            let r = evaluate(&Side::new(&q_emb, 2, &q_lab, c), &Side::new(&g_emb, 2, &g_lab, c),
                &vec![0; g], &cfg).unwrap();
            for &(k, v) in &r.i2t.ndcg {
                prop_assert!((v - 100.0).abs() < 1e-9, "NDCG@{k} = {v}");
            }
            prop_assert!(in_range(&r.i2t) && in_range(&r.t2i));
            // The primitive agrees, and a reversed ranking is no better.
            let mut sorted = rels.clone();
            sorted.sort_by(|a, b| b.cmp(a));
            prop_assert_eq!(ndcg_at_k(&sorted, &rels, 3), 1.0);
            sorted.reverse();
            prop_assert!(ndcg_at_k(&sorted, &rels, 3) <= 1.0);
        }

        /// Scaling rows by powers of two changes nothing, bit for bit, even with zero rows and
        /// duplicated rows (exact ties).
        #[test]
        fn invariant_to_power_of_two_scaling(
            n_img in 1usize..6, n_txt in 1usize..9, dim in 1usize..5, c in 1usize..4, seed: u64,
        ) {
            let mut d = Data::random(seed, n_img, n_txt, dim, c);
            let mut rng = Rng::derive(seed, 9);
            // Zero one text row, duplicate another.
            let z = rng.below(n_txt);
            d.txt_emb[z * dim..(z + 1) * dim].fill(0.0);
            let (a, b) = (rng.below(n_txt), rng.below(n_txt));
            let row: Vec<f32> = d.txt_emb[a * dim..(a + 1) * dim].to_vec();
            d.txt_emb[b * dim..(b + 1) * dim].copy_from_slice(&row);
            let cfg = EvalConfig::default();
            let before = d.eval(&cfg);
            for row in d.img_emb.chunks_mut(dim).chain(d.txt_emb.chunks_mut(dim)) {
                let s = 2f32.powi(rng.below(41) as i32 - 20);
                row.iter_mut().for_each(|x| *x *= s);
            }
            prop_assert_eq!(d.eval(&cfg), before);
        }

        /// Any positive scale per row changes nothing when no two similarities are nearly tied.
        #[test]
        fn invariant_to_positive_scaling(
            n_img in 1usize..6, n_txt in 1usize..9, dim in 2usize..5, c in 1usize..4, seed: u64,
        ) {
            let mut d = Data::random(seed, n_img, n_txt, dim, c);
            prop_assume!(min_gap(&d.images(), &d.texts()) > 1e-4);
            prop_assume!(min_gap(&d.texts(), &d.images()) > 1e-4);
            let cfg = cfg(&[1, 2, 500], &[1, 3], &[1, 2], 4);
            let before = d.eval(&cfg);
            let mut rng = Rng::derive(seed, 5);
            for row in d.img_emb.chunks_mut(dim).chain(d.txt_emb.chunks_mut(dim)) {
                let s = (rng.uniform() * 14.0 - 7.0).exp() as f32; // e^-7 .. e^7
                row.iter_mut().for_each(|x| *x *= s);
            }
            prop_assert_eq!(d.eval(&cfg), before);
        }
    }
}
