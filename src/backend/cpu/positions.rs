//! Sinusoidal position encodings (the text side's ψ2 input), and a table's rows copied to each
//! item's rows by position and summed back. The CUDA backend uploads a table made here once
//! (`kernels/rows.cu` has the rows' kernels), so both devices give the same bits.

/// PE(t)_{2i} = sin(t / 10000^{2i/d}), PE(t)_{2i+1} = cos(t / 10000^{2i/d}).
pub fn position_encoding(t: usize, dim: usize, out: &mut [f32]) {
    for (i, o) in out[..dim].iter_mut().enumerate() {
        *o = encode(t, i, frequency(i, dim));
    }
}

/// Column i's 1 / 10000^{2⌊i/2⌋/d}.
fn frequency(i: usize, dim: usize) -> f64 {
    (10000f64).powf(-((i / 2 * 2) as f64) / dim as f64)
}

fn encode(t: usize, i: usize, freq: f64) -> f32 {
    let a = t as f64 * freq;
    (if i.is_multiple_of(2) { a.sin() } else { a.cos() }) as f32
}

/// Rows `0..rows` of the encoding table, `[rows, dim]`: `position_encoding`'s values, with each
/// column's frequency (a `powf`, most of the cost) computed once rather than once per row.
pub fn table(rows: usize, dim: usize) -> Vec<f32> {
    let freqs: Vec<f64> = (0..dim).map(|i| frequency(i, dim)).collect();
    let mut table = vec![0.0; rows * dim];
    for (t, row) in table.chunks_exact_mut(dim.max(1)).enumerate() {
        for (i, (o, &freq)) in row.iter_mut().zip(&freqs).enumerate() {
            *o = encode(t, i, freq);
        }
    }
    table
}

/// The table's first rows, kept between batches (the CPU backend's `Backend::position_table`)
/// and made again only for more rows or another width, as the CUDA backend keeps its copy.
#[derive(Debug, Default)]
pub struct Table {
    dim: usize,
    rows: usize,
    data: Vec<f32>,
}

impl Table {
    /// Rows `0..rows` of the encoding table, `[rows, dim]`.
    pub fn rows(&mut self, rows: usize, dim: usize) -> &[f32] {
        if self.dim != dim || self.rows < rows {
            *self = Table { dim, rows, data: table(rows, dim) };
        }
        &self.data[..rows * dim]
    }
}

/// `[tokens, d]` from `table` (`[≥ longest item, d]`): item b's row t is the table's row t
/// (`Backend::segment_rows`).
pub fn segment_rows(table: &[f32], d: usize, offsets: &[usize]) -> crate::tensor::HostBuf {
    // A recycled buffer: a fresh one this size (0.8 MB for 32 texts at d 256) costs more in
    // first-touch page faults than the copy.
    let mut out = crate::tensor::host_pool::dirty(offsets.last().map_or(0, |&t| t * d));
    for w in offsets.windows(2) {
        let rows = (w[1] - w[0]) * d;
        out[w[0] * d..w[0] * d + rows].copy_from_slice(&table[..rows]);
    }
    out
}

/// Its backward, `[rows, d]`: row t is Σ over the items b that have a row t of dy's row
/// `offsets[b] + t`, added item after item (the CUDA kernel's order: the same bits).
pub fn segment_rows_bwd(dy: &[f32], d: usize, offsets: &[usize], rows: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * d];
    for w in offsets.windows(2) {
        let item = &dy[w[0] * d..w[1] * d];
        for (o, g) in out.iter_mut().zip(item) {
            *o += g;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table (each column's frequency computed once) is `position_encoding`, bit for bit.
    #[test]
    fn table_rows_are_the_encoding_bitwise() {
        for dim in [1, 2, 7, 256] {
            let t = table(70, dim);
            let mut row = vec![0.0f32; dim];
            for (p, got) in t.chunks_exact(dim).enumerate() {
                position_encoding(p, dim, &mut row);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(got), bits(&row), "position {p}, dim {dim}");
            }
        }
    }

    /// A kept table gives what a fresh one gives, call after call: fewer rows (kept), more
    /// (the table grows), another width (made again), none.
    #[test]
    fn a_kept_table_gives_fresh_rows() {
        let mut kept = Table::default();
        for (rows, dim) in [(5, 8), (2, 8), (9, 8), (4, 6), (0, 6), (30, 16)] {
            let fresh = table(rows, dim);
            let got = kept.rows(rows, dim);
            assert_eq!(got.len(), fresh.len(), "{rows} rows, dim {dim}");
            assert!(got.iter().zip(&fresh).all(|(a, b)| a.to_bits() == b.to_bits()), "{rows} rows, dim {dim}");
        }
    }

    /// Rows by position and their backward against the definitions, on items of several
    /// lengths (one empty, one longer than the rest).
    #[test]
    fn segment_rows_and_their_backward_match_the_definition() {
        let d = 3;
        let offsets = [0, 2, 2, 7, 8];
        let table: Vec<f32> = (0..7 * d).map(|i| i as f32).collect();
        let rows = segment_rows(&table, d, &offsets);
        for w in offsets.windows(2) {
            for t in 0..w[1] - w[0] {
                assert_eq!(rows[(w[0] + t) * d..][..d], table[t * d..][..d], "item at {}, row {t}", w[0]);
            }
        }
        let dy: Vec<f32> = (0..8 * d).map(|i| (i * i) as f32 * 0.5).collect();
        let back = segment_rows_bwd(&dy, d, &offsets, 9);
        for t in 0..9 {
            for c in 0..d {
                let mut want = 0.0f32;
                for w in offsets.windows(2) {
                    if t < w[1] - w[0] {
                        want += dy[(w[0] + t) * d + c];
                    }
                }
                assert_eq!(back[t * d + c].to_bits(), want.to_bits(), "row {t}, column {c}");
            }
        }
    }
}
