//! Sinusoidal position encodings of packed sequences (the text side's ψ2 input). The CUDA
//! backend uploads a table made here once and copies its rows per item on the device
//! (`kernels/rows.cu::segment_rows`), so both devices give the same bits.

/// PE(t)_{2i} = sin(t / 10000^{2i/d}), PE(t)_{2i+1} = cos(t / 10000^{2i/d}).
pub fn position_encoding(t: usize, dim: usize, out: &mut [f32]) {
    for (i, o) in out[..dim].iter_mut().enumerate() {
        let freq = (10000f64).powf(-((i / 2 * 2) as f64) / dim as f64);
        let a = t as f64 * freq;
        *o = if i % 2 == 0 { a.sin() } else { a.cos() } as f32;
    }
}

/// Rows `0..rows` of the encoding table, `[rows, dim]`.
pub fn table(rows: usize, dim: usize) -> Vec<f32> {
    let mut table = vec![0.0; rows * dim];
    for (t, row) in table.chunks_exact_mut(dim.max(1)).enumerate() {
        position_encoding(t, dim, row);
    }
    table
}

/// The position encodings of every packed row.
pub fn positions(lengths: &[usize], dim: usize) -> Vec<f32> {
    let total: usize = lengths.iter().sum();
    let table = table(lengths.iter().copied().max().unwrap_or(0), dim);
    let mut out = Vec::with_capacity(total * dim);
    for &l in lengths {
        out.extend_from_slice(&table[..l * dim]);
    }
    out
}
