//! Sinusoidal position encodings of packed sequences (the text side's ψ2 input). The CUDA
//! backend uploads a table made here once and copies its rows per item on the device
//! (`kernels/rows.cu::segment_rows`), so both devices give the same bits.

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

/// The position encodings of every packed row.
pub fn positions(lengths: &[usize], dim: usize) -> Vec<f32> {
    Table::default().positions(lengths, dim)
}

/// The table's first rows, kept between batches (the CPU backend's `Backend::positions`) and
/// made again only for a longer item or another width, as the CUDA backend keeps its copy.
#[derive(Debug, Default)]
pub struct Table {
    dim: usize,
    rows: usize,
    data: Vec<f32>,
}

impl Table {
    /// The position encodings of every packed row.
    pub fn positions(&mut self, lengths: &[usize], dim: usize) -> Vec<f32> {
        let need = lengths.iter().copied().max().unwrap_or(0);
        if self.dim != dim || self.rows < need {
            *self = Table { dim, rows: need, data: table(need, dim) };
        }
        let total: usize = lengths.iter().sum();
        // A recycled buffer: a fresh one this size (0.8 MB for 32 texts at d 256) costs more
        // in first-touch page faults than the copy.
        let mut out = crate::tensor::host_pool::take(total * dim);
        out.clear();
        for &l in lengths {
            out.extend_from_slice(&self.data[..l * dim]);
        }
        out
    }
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

    /// A kept table gives what a fresh one gives, batch after batch: shorter items (rows kept),
    /// a longer one (the table grows), another width (made again), an empty batch.
    #[test]
    fn a_kept_table_gives_fresh_positions() {
        let mut kept = Table::default();
        for (lengths, dim) in
            [(vec![3, 5], 8), (vec![2], 8), (vec![9, 1, 4], 8), (vec![4], 6), (vec![], 6), (vec![30, 2], 16)]
        {
            let fresh = table(lengths.iter().copied().max().unwrap_or(0), dim);
            let want: Vec<f32> = lengths.iter().flat_map(|&l| fresh[..l * dim].to_vec()).collect();
            let got = kept.positions(&lengths, dim);
            assert_eq!(got.len(), want.len(), "{lengths:?}, dim {dim}");
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{lengths:?}, dim {dim}");
        }
    }
}
