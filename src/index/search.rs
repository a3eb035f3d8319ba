//! Exact top-k of queries against an index, by `Backend::top_k` (inner product; the rows are
//! normalised, so cosine). On the CPU the gallery is searched straight from the map; another
//! device gets it uploaded.

use super::file::Index;
use crate::backend::Backend;
use crate::inference::Embeddings;
use crate::tensor::View;
use crate::{Error, Result};

/// One result: the item's position in the index and its score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub item: usize,
    pub score: f32,
}

/// The top `k` items of `index` for each of `queries` (used as given: pass normalised rows for
/// cosine; [`Model`](crate::Model)'s embeddings are), best first, ties to the lower item. `k`
/// above the index's size returns every item. Queries of another width than the index's, a
/// non-finite value or a norm past f32's range are errors.
pub fn search(dev: &mut dyn Backend, index: &Index, queries: &Embeddings, k: usize) -> Result<Vec<Vec<Hit>>> {
    let dim = index.dim();
    if k == 0 {
        return Err(Error::config("k must be at least 1"));
    }
    if queries.dim != dim {
        return Err(Error::data(format!(
            "queries of width {}, the index {} holds width {dim}",
            queries.dim,
            index.path().display()
        )));
    }
    // The index's rows are unit vectors, so a score is at most its query's norm.
    queries.check_rows("query", f64::from(f32::MAX))?;
    let queries = queries.values.as_slice();
    let k = k.min(index.len());
    let (ids, scores) = if dev.on_host() {
        dev.top_k(View::Cpu(queries), View::Cpu(index.vectors()), dim, k)?
    } else {
        let q = dev.upload(queries, &[queries.len() / dim, dim])?;
        let g = dev.upload(index.vectors(), &[index.len(), dim])?;
        dev.top_k(q.view(), g.view(), dim, k)?
    };
    Ok(ids
        .chunks_exact(k)
        .zip(scores.chunks_exact(k))
        .map(|(ids, scores)| ids.iter().zip(scores).map(|(&i, &score)| Hit { item: i as usize, score }).collect())
        .collect())
}
