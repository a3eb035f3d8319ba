//! The checksum of dataset files (`fnv1a64x4`, docs/FORMAT.md §Checksums): four interleaved
//! FNV-1a lanes, so a whole shard hashes at memory speed.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// `fnv1a64x4`: FNV-1a over little-endian 64-bit words in four interleaved lanes (fast on large
/// shards), precisely:
///
/// 1. lanes `h[0..4] = FNV_OFFSET`; for every full 32-byte block, word j (bytes 8j..8j+8, little
///    endian) updates `h[j] = (h[j] ^ word) * FNV_PRIME` (wrapping).
/// 2. the remaining `len % 32` bytes go through plain byte-wise FNV-1a 64 from `FNV_OFFSET` → `t`.
/// 3. `f = FNV_OFFSET`; for x in `[h0, h1, h2, h3, t, len]`: `f = (f ^ x) * FNV_PRIME`.
/// 4. the result is the SplitMix64 finaliser of `f`.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut sum = Checksum::new();
    sum.update(bytes);
    sum.finish()
}

/// [`checksum`] over chunks of any size (a file read by pread in blocks).
#[derive(Clone, Debug)]
pub struct Checksum {
    h: [u64; 4],
    /// Bytes of an unfinished 32-byte block.
    pending: Vec<u8>,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    pub fn new() -> Self {
        Checksum { h: [FNV_OFFSET; 4], pending: Vec::with_capacity(32), len: 0 }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len() as u64;
        if !self.pending.is_empty() {
            let take = (32 - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() < 32 {
                return;
            }
            let block: [u8; 32] = self.pending[..].try_into().expect("32 bytes");
            self.pending.clear();
            self.block(&block);
        }
        let mut blocks = bytes.chunks_exact(32);
        for block in &mut blocks {
            self.block(block);
        }
        self.pending.extend_from_slice(blocks.remainder());
    }

    fn block(&mut self, block: &[u8]) {
        for (j, lane) in self.h.iter_mut().enumerate() {
            let w = u64::from_le_bytes(block[8 * j..8 * j + 8].try_into().expect("8 bytes"));
            *lane = (*lane ^ w).wrapping_mul(FNV_PRIME);
        }
    }

    pub fn finish(self) -> u64 {
        let mut t = FNV_OFFSET;
        for &b in &self.pending {
            t = (t ^ b as u64).wrapping_mul(FNV_PRIME);
        }
        let h = self.h;
        let mut f = FNV_OFFSET;
        for x in [h[0], h[1], h[2], h[3], t, self.len] {
            f = (f ^ x).wrapping_mul(FNV_PRIME);
        }
        f = (f ^ (f >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        f = (f ^ (f >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        f ^ (f >> 31)
    }
}

/// [`checksum`] of the first `len` bytes of `file` from its start, read in 1 MiB pieces rather
/// than through a memory map: a file truncated meanwhile is an I/O error, not a SIGBUS.
pub fn checksum_file(mut file: &std::fs::File, len: u64) -> std::io::Result<u64> {
    use std::io::{Read, Seek};
    file.rewind()?;
    let mut sum = Checksum::new();
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(1 << 20)];
    let mut left = len;
    while left > 0 {
        let n = buf.len().min(left as usize);
        file.read_exact(&mut buf[..n])?;
        sum.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(sum.finish())
}

pub fn format_checksum(c: u64) -> String {
    format!("fnv1a64x4:{c:016x}")
}
