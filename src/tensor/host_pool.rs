//! Recycled f32 buffers for CPU tensors. A training step allocates a few hundred activation
//! buffers of 0.1–4 MB and frees them again; from the system allocator each one came back as
//! fresh pages (mmap, page faults, zeroing: ≈7% of a step). Dropped CPU tensors return their
//! buffer here and the kernels take zeroed buffers from here. Bounded: beyond `MAX_BYTES`
//! buffers go back to the allocator.

use std::sync::Mutex;

const MAX_BYTES: usize = 256 << 20;
/// Buffers smaller than this are not worth pooling.
const MIN_LEN: usize = 4096;

struct Pool {
    free: Vec<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { free: Vec::new(), bytes: 0 });

/// A zero-filled buffer of `n` elements.
pub fn zeroed(n: usize) -> Vec<f32> {
    let mut v = take(n);
    v.clear();
    v.resize(n, 0.0);
    v
}

/// A buffer of `n` elements with unspecified (but initialised) contents, for outputs that are
/// overwritten whole (a GEMM with beta = 0): a recycled buffer is truncated, not cleared.
pub fn dirty(n: usize) -> Vec<f32> {
    let mut v = take(n);
    if v.len() >= n {
        v.truncate(n);
    } else {
        v.resize(n, 0.0);
    }
    v
}

/// A recycled buffer (its old contents still there) with capacity for at least `n` elements,
/// or a new empty one.
pub fn take(n: usize) -> Vec<f32> {
    if n >= MIN_LEN {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        // Best fit among buffers no more than twice the request, and first among those whose
        // old contents already cover n: `dirty` takes them as they are, where a shorter one is
        // zero-filled up to n (image and text batches alternate between sizes; that fill was
        // 2.3 % of a one-thread bf16 embedding's samples, session 32).
        let best = pool
            .free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= n && v.capacity() <= 2 * n)
            .min_by_key(|(_, v)| (v.len() < n, v.capacity()))
            .map(|(i, _)| i);
        if let Some(i) = best {
            let v = pool.free.swap_remove(i);
            pool.bytes -= v.capacity() * 4;
            return v;
        }
    }
    Vec::with_capacity(n)
}

/// Hand a buffer back for reuse.
pub fn give(v: Vec<f32>) {
    if v.capacity() < MIN_LEN {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.bytes + v.capacity() * 4 <= MAX_BYTES {
        pool.bytes += v.capacity() * 4;
        pool.free.push(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Of two buffers of the same capacity, `dirty` takes the one whose old contents already
    /// cover the request (no zero fill), whichever was given back first.
    #[test]
    fn dirty_prefers_a_buffer_already_long_enough() {
        // A capacity no other test allocates, so the pool's other buffers cannot tie with it.
        let n = 1_234_567;
        let mut short = Vec::with_capacity(n);
        short.resize(n / 2, 1.0f32);
        let mut long = Vec::with_capacity(n);
        long.resize(n, 2.0f32);
        assert_eq!((short.capacity(), long.capacity()), (n, n), "the allocator rounded a capacity");
        let want = long.as_ptr();
        give(short);
        give(long);
        let got = dirty(n - 1);
        assert_eq!(got.as_ptr(), want);
        assert_eq!(got.len(), n - 1);
    }
}
