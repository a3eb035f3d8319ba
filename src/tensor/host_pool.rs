//! Recycled f32 buffers for CPU tensors. A training step allocates a few hundred activation
//! buffers of 0.1–4 MB and frees them again; from the system allocator each one came back as
//! fresh pages (mmap, page faults, zeroing: ≈7% of a step). Dropped CPU tensors return their
//! buffer here and the kernels take zeroed buffers from here. Bounded: beyond `MAX_BYTES`
//! buffers go back to the allocator.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

const MAX_BYTES: usize = 256 << 20;
/// Buffers smaller than this are not worth pooling.
const MIN_LEN: usize = 4096;
/// The line every pooled buffer's first element starts on.
const LINE: usize = 64;
/// The f32s a buffer may skip to reach a line (the allocator aligns to at least 4 bytes).
const SLACK: usize = LINE / 4 - 1;

struct Pool {
    free: Vec<Vec<f32>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool { free: Vec::new(), bytes: 0 });

/// A CPU tensor's buffer: `len` f32s from the first 64-byte line boundary of `words` (a
/// pooled buffer), or from the start of a `Vec` a caller handed over (`From<Vec<f32>>`, not
/// moved or copied). On a line, a kernel's 64-byte row stores and loads touch one line each,
/// not two, and AMX tiles can be loaded from the rows where they lie: the bf16 GEMM took
/// 5 % longer into a C 16 bytes off a line, and packing A, which rows on lines make
/// unnecessary, was 11 % of it (Xeon VM, session 37).
#[derive(Debug, Default)]
pub struct HostBuf {
    words: Vec<f32>,
    skip: usize,
    len: usize,
}

impl From<Vec<f32>> for HostBuf {
    fn from(words: Vec<f32>) -> Self {
        HostBuf { len: words.len(), words, skip: 0 }
    }
}

impl Deref for HostBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.words[self.skip..self.skip + self.len]
    }
}

impl DerefMut for HostBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.words[self.skip..self.skip + self.len]
    }
}

/// How many f32s from `v`'s start to its first 64-byte line.
fn skip_of(v: &[f32]) -> usize {
    v.as_ptr().align_offset(LINE).min(SLACK)
}

/// A zero-filled buffer of `n` elements.
pub fn zeroed(n: usize) -> HostBuf {
    let mut b = dirty(n);
    b.fill(0.0);
    b
}

/// A buffer of `n` elements with unspecified (but initialised) contents, for outputs that are
/// overwritten whole (a GEMM with beta = 0): a recycled buffer's old contents are kept, not
/// cleared.
pub fn dirty(n: usize) -> HostBuf {
    let mut words = take(n);
    let skip = skip_of(&words);
    // Room for the line's skip too, so the resize below never moves the buffer off its line.
    debug_assert!(words.capacity() >= skip + n);
    if words.len() >= skip + n {
        words.truncate(skip + n);
    } else {
        words.resize(skip + n, 0.0);
    }
    HostBuf { words, skip, len: n }
}

/// A recycled buffer (its old contents still there) with room for `n` elements from its first
/// line, or a new empty one.
fn take(n: usize) -> Vec<f32> {
    let room = |v: &Vec<f32>| skip_of(v) + n;
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
            .filter(|(_, v)| v.capacity() >= room(v) && v.capacity() <= 2 * n)
            .min_by_key(|(_, v)| (v.len() < room(v), v.capacity()))
            .map(|(i, _)| i);
        if let Some(i) = best {
            let v = pool.free.swap_remove(i);
            pool.bytes -= v.capacity() * 4;
            return v;
        }
    }
    Vec::with_capacity(n + SLACK)
}

/// Hand a buffer back for reuse: its whole allocation, wherever its line started.
pub fn give(buf: HostBuf) {
    let v = buf.words;
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
        give(short.into());
        give(long.into());
        let got = dirty(n - 1 - SLACK);
        assert_eq!(got.words.as_ptr(), want);
        assert_eq!(got.len(), n - 1 - SLACK);
        give(got);
        // Given back, it covers the same request again from its line: taken as it is.
        let again = dirty(n - 1 - SLACK);
        assert_eq!(again.words.as_ptr(), want);
    }

    /// Every buffer `dirty` and `zeroed` hand out starts on a 64-byte line, new or recycled,
    /// and holds what was asked; `zeroed`'s are zero.
    #[test]
    fn pooled_buffers_start_on_a_line() {
        for n in [1, 15, 16, 4095, 4096, 10_000, 123_457] {
            let b = dirty(n);
            assert_eq!((b.as_ptr() as usize % LINE, b.len()), (0, n), "dirty({n})");
            give(b);
            let z = zeroed(n);
            assert_eq!(z.as_ptr() as usize % LINE, 0, "zeroed({n})");
            assert!(z.iter().all(|&v| v == 0.0), "zeroed({n})");
            give(z);
        }
    }
}
