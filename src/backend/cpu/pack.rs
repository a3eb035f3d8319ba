//! Operands packed into the micro-kernel's slivers (microkernel.rs): rows of A or columns of
//! B, `MR` or `NR` lines side by side for each group of k, converted to the kernel's element
//! type on the way. gemm.rs packs each block as it multiplies it, or once for a frozen
//! weight (`PackedB`).

use std::cell::RefCell;

use super::microkernel::{KC_MAX, Layout, Micro, Packed};

/// What a packing reads: f32 values, or bf16 values stored in 2 bytes (their 16 bits).
#[derive(Clone, Copy, Debug)]
pub enum Source {
    F32(*const f32),
    Bf16(*const u16),
}

impl Source {
    /// The element `elements` on from this one.
    ///
    /// # Safety
    /// That element lies inside the same allocation.
    pub unsafe fn offset(self, elements: isize) -> Source {
        // SAFETY: as the caller guarantees.
        unsafe {
            match self {
                Source::F32(p) => Source::F32(p.offset(elements)),
                Source::Bf16(p) => Source::Bf16(p.offset(elements)),
            }
        }
    }
}

thread_local! {
    /// A bf16 block widened to f32 for the packings that read f32 ([`pack`]).
    static WIDENED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Packs `len` lines (rows of A or columns of B; `line` steps from one to the next, `along`
/// along one) of `kc` elements into slivers of `w` lines laid out as `layout` says (K's `A` or
/// `B`, microkernel.rs): sliver s holds, for each group of `layout.group` steps of k, lines
/// s·w .. s·w + w, each line's group together; zero past the last line and past kc (up to
/// `layout.padded(kc)`). Then the kernel's `finish_pack` (a bf16 kernel on fp32 units rounds
/// the slivers there, after the fp32 packing's fast moves).
///
/// A bf16 source in 2 bytes: AMX's A as stored (lines along k, long groups) is copied run by
/// run, bits as they are; any other block is widened to f32 (exactly: a bf16 is the high half
/// of an f32) and packed as an f32 block is, so every layout keeps one packing.
///
/// # Safety
/// Every element of the `len` × `kc` block lies inside the allocation behind `src`, and the
/// CPU has the features of K's path (as for [`Micro::tile`]).
#[allow(clippy::too_many_arguments)]
pub unsafe fn pack<K: Micro>(
    dst: &mut [K::Packed],
    src: Source,
    line: isize,
    along: isize,
    len: usize,
    kc: usize,
    w: usize,
    layout: Layout,
) {
    let src = match src {
        Source::F32(p) => p,
        Source::Bf16(p) => {
            // SAFETY: as the caller guarantees.
            unsafe { pack_bf16::<K>(dst, p, line, along, len, kc, w, layout) };
            return;
        }
    };
    let slivers = len.next_multiple_of(w) * layout.padded(kc);
    'placed: {
        let g = layout.group;
        let kp = layout.padded(kc);
        let zero = K::Packed::from_f32(0.0);
        // One run converted at a time (vectorised: `Micro::convert`), then placed.
        let mut run = [zero; KC_MAX];
        // bf16 slivers' lines, converted whole before their transpose (below); unused, and
        // optimised away, for every other kernel.
        #[cfg(target_arch = "x86_64")]
        let mut words = [zero; 32 * KC_MAX];
        if line == 1 && along != 1 {
            // The lines side by side (B as stored, Aᵀ): step k in the outer loop, so that each
            // row of the source is read once, front to back, for every sliver. Sliver by sliver,
            // a transposed A (rows 3 KiB apart) fell into a few cache sets and missed L1 at every
            // step (the weight-gradient GEMM ran 1.7x torch.mm's time).
            let dst = &mut dst[..len.next_multiple_of(w) * kp];
            if !len.is_multiple_of(w) || kp > kc {
                dst.fill(zero);
            }
            #[cfg(target_arch = "x86_64")]
            if K::AVX_PACK && K::Packed::IS_F32 {
                // SAFETY: the path has AVX (`AVX_PACK`); an fp32 sliver is f32 (`IS_F32`, g = 1);
                // the block is inside `src` (pack's contract) and dst holds its slivers.
                unsafe {
                    let dst = dst.as_mut_ptr() as *mut f32;
                    // The kernels' widths as constants: each sliver row a few fixed moves.
                    match w {
                        6 => pack_side_by_side_avx::<6>(dst, src, along, len, kc, w),
                        8 => pack_side_by_side_avx::<8>(dst, src, along, len, kc, w),
                        16 => pack_side_by_side_avx::<16>(dst, src, along, len, kc, w),
                        32 => pack_side_by_side_avx::<32>(dst, src, along, len, kc, w),
                        _ => pack_side_by_side_avx::<0>(dst, src, along, len, kc, w),
                    }
                };
                break 'placed;
            }
            if g == 2 {
                // bf16: two steps of k at a time, each sliver's group row made by the kernel's
                // `interleave_pairs` (zeros for the second step past an odd kc).
                let zeros = [0.0f32; 32];
                // SAFETY: step q < kc of lines 0..len is inside the block.
                let step = |q: usize| unsafe { std::slice::from_raw_parts(src.offset(q as isize * along), len) };
                for p in (0..kc).step_by(2) {
                    let (first, second) = (step(p), (p + 1 < kc).then(|| step(p + 1)));
                    for s0 in (0..len).step_by(w) {
                        let lines = w.min(len - s0);
                        let out = &mut dst[s0 * kp + p * w..][..2 * lines];
                        let b = second.map_or(&zeros[..lines], |r| &r[s0..s0 + lines]);
                        // SAFETY: the CPU has K's features (pack's contract); out holds 2 · lines.
                        unsafe { K::interleave_pairs(&first[s0..s0 + lines], b, out) };
                    }
                }
                break 'placed;
            }
            #[cfg(target_arch = "x86_64")]
            if K::AVX_PACK && g == 32 && w == 32 && size_of::<K::Packed>() == 2 {
                // AMX's A transposed (a weight gradient's dYᵀ): for each 32 steps of k, the pairs
                // of steps interleaved into words for each sliver's 32 lines (`interleave_pairs`:
                // `[pair][line]`), then those 16 × 32 words transposed 8 × 8 into each line's 16
                // words (`[line][pair]`, one tile row). Element by element this took several
                // times the tiles' own time per block.
                let zeros = [0.0f32; 32];
                // SAFETY: step q < kc of lines 0..len is inside the block.
                let step = |q: usize| unsafe { std::slice::from_raw_parts(src.offset(q as isize * along), len) };
                for t in 0..kp / 32 {
                    for s0 in (0..len).step_by(w) {
                        let lines = w.min(len - s0);
                        let pairs = &mut words[..32 * 32];
                        pairs.fill(zero);
                        for (q, p) in (t * 32..kc.min(t * 32 + 32)).step_by(2).enumerate() {
                            let second = if p + 1 < kc { &step(p + 1)[s0..s0 + lines] } else { &zeros[..lines] };
                            // SAFETY: the CPU has K's features (pack's contract); 2 · lines fit.
                            unsafe { K::interleave_pairs(&step(p)[s0..s0 + lines], second, &mut pairs[q * 64..]) };
                        }
                        // SAFETY: the path has AVX (`AVX_PACK`); `pairs` holds 16 rows of 32
                        // words, and group t of sliver s0 / w is 32 lines of 16 words.
                        unsafe {
                            let out = dst[s0 * kp + t * 32 * w..][..32 * w].as_mut_ptr() as *mut f32;
                            let out = std::slice::from_raw_parts_mut(out, 16 * w);
                            pack_lines_avx(out, pairs.as_ptr() as *const f32, 32, 32, 16);
                        }
                    }
                }
                break 'placed;
            }
            if g > 2 {
                // Longer groups on a kernel without AVX packing: each value to its place.
                for p in 0..kc {
                    // SAFETY: step p of lines 0..len is inside the block.
                    let row = unsafe { std::slice::from_raw_parts(src.offset(p as isize * along), len) };
                    for (l, &v) in row.iter().enumerate() {
                        dst[l / w * w * kp + (p / g * w + l % w) * g + p % g] = K::Packed::from_f32(v);
                    }
                }
                break 'placed;
            }
            // fp32 on the portable path (g = 1): each step's lines copied into their slivers.
            for p in 0..kc {
                // SAFETY: step p of lines 0..len is inside the block.
                let row = unsafe { std::slice::from_raw_parts(src.offset(p as isize * along), len) };
                for s0 in (0..len).step_by(w) {
                    place(&mut dst[s0 * kp + p * w..], &row[s0..w.min(len - s0) + s0]);
                }
            }
            break 'placed;
        }
        for (s, sliver) in dst[..len.next_multiple_of(w) * kp].chunks_exact_mut(w * kp).enumerate() {
            let first = s * w;
            let lines = w.min(len - first);
            // SAFETY (all reads): line first + l < len and p < kc are inside the block.
            let base = unsafe { src.offset(first as isize * line) };
            if lines < w || kp > kc {
                sliver.fill(zero);
            }
            if along == 1 {
                // Each line contiguous (A as stored, Bᵀ as the weights are): read along it.
                #[cfg(target_arch = "x86_64")]
                if K::AVX_PACK && K::Packed::IS_F32 && lines == w && w.is_multiple_of(8) {
                    // SAFETY: the path has AVX (`AVX_PACK`); an fp32 sliver is f32 (`IS_F32`);
                    // lines < len and p < kc are inside the block.
                    unsafe {
                        let sliver = std::slice::from_raw_parts_mut(sliver.as_mut_ptr() as *mut f32, sliver.len());
                        pack_lines_avx(sliver, base, line, kc, w);
                    }
                    continue;
                }
                #[cfg(target_arch = "x86_64")]
                if K::AVX_PACK && g == 2 && size_of::<K::Packed>() == 2 && lines == w && w.is_multiple_of(8) && w <= 32
                {
                    // bf16: each line converted whole into `words` (a pair of k is one 32-bit word,
                    // the unit a `vdpbf16ps` lane takes), then the words transposed 8 × 8 as fp32
                    // lines are: moves of 32-bit patterns, never arithmetic on them.
                    for l in 0..w {
                        let from = unsafe { std::slice::from_raw_parts(base.offset(l as isize * line), kc) };
                        // SAFETY: the CPU has K's features (pack's contract).
                        unsafe { K::convert(from, &mut words[l * kp..l * kp + kc]) };
                        words[l * kp + kc..(l + 1) * kp].fill(zero);
                    }
                    // SAFETY: the path has AVX (`AVX_PACK`); `words` holds w lines of kp / 2 words
                    // and the sliver kp / 2 · w words (2-byte elements, g = 2).
                    unsafe {
                        let out = std::slice::from_raw_parts_mut(sliver.as_mut_ptr() as *mut f32, sliver.len() / 2);
                        pack_lines_avx(out, words.as_ptr() as *const f32, (kp / 2) as isize, kp / 2, w);
                    }
                    continue;
                }
                if g > 2 {
                    // Long groups (AMX's A): a line's group is a contiguous run of the sliver, so
                    // each is converted straight into place.
                    for l in 0..lines {
                        let from = unsafe { std::slice::from_raw_parts(base.offset(l as isize * line), kc) };
                        // SAFETY: the CPU has K's features (pack's contract).
                        unsafe { K::convert_runs(from, &mut sliver[l * g..], g, w * g) };
                    }
                    continue;
                }
                for l in 0..lines {
                    let from = unsafe { std::slice::from_raw_parts(base.offset(l as isize * line), kc) };
                    if K::Packed::IS_F32 {
                        for (p, &v) in from.iter().enumerate() {
                            sliver[p * w + l] = K::Packed::from_f32(v);
                        }
                        continue;
                    }
                    let per = run.len();
                    for (p0, chunk) in from.chunks(per).enumerate().map(|(c, ch)| (c * per, ch)) {
                        // SAFETY: the CPU has K's features (pack's contract).
                        unsafe { K::convert(chunk, &mut run[..chunk.len()]) };
                        for (i, &v) in run[..chunk.len()].iter().enumerate() {
                            let p = p0 + i;
                            sliver[(p / g * w + l) * g + p % g] = v;
                        }
                    }
                }
            } else {
                for p in 0..kc {
                    let out = &mut sliver[p / g * w * g + p % g..];
                    for l in 0..lines {
                        out[l * g] =
                            K::Packed::from_f32(unsafe { *base.offset(l as isize * line + p as isize * along) });
                    }
                }
            }
        }
    }
    // SAFETY: the CPU has K's features (pack's contract).
    unsafe { K::finish_pack(&mut dst[..slivers]) }
}

/// [`pack`] of a bf16 source in 2 bytes.
///
/// # Safety
/// As for [`pack`].
#[allow(clippy::too_many_arguments)]
unsafe fn pack_bf16<K: Micro>(
    dst: &mut [K::Packed],
    src: *const u16,
    line: isize,
    along: isize,
    len: usize,
    kc: usize,
    w: usize,
    layout: Layout,
) {
    let (g, kp) = (layout.group, layout.padded(kc));
    if along == 1 && g > 2 && size_of::<K::Packed>() == 2 {
        // AMX's A: each line's group of g steps is a contiguous run of its sliver.
        for (s, sliver) in dst[..len.next_multiple_of(w) * kp].chunks_exact_mut(w * kp).enumerate() {
            let lines = w.min(len - s * w);
            if lines < w || kp > kc {
                sliver.fill(K::Packed::default());
            }
            // The only 2-byte packed type is `Bf16`, a u16's bits (repr(transparent)).
            let out = sliver.as_mut_ptr() as *mut u16;
            for l in 0..lines {
                for p0 in (0..kc).step_by(g) {
                    // SAFETY: line s·w + l and steps p0.. < kc are inside the block; the run's
                    // place in the sliver is inside it (kp ≥ kc).
                    unsafe {
                        let from = src.offset((s * w + l) as isize * line + p0 as isize);
                        let to = out.add(p0 / g * w * g + l * g);
                        if g == 32 && p0 + 32 <= kc {
                            // A whole tile row, 64 bytes: moved in registers (a run of unknown
                            // length was a `memmove` call per 64 bytes: 6 % of an embedding).
                            (to as *mut [u16; 32]).write_unaligned((from as *const [u16; 32]).read_unaligned());
                        } else {
                            std::ptr::copy_nonoverlapping(from, to, g.min(kc - p0));
                        }
                    }
                }
            }
        }
        // SAFETY: the CPU has K's features (pack's contract).
        unsafe { K::finish_pack(&mut dst[..len.next_multiple_of(w) * kp]) };
        return;
    }
    // Widened in the block's own orientation, so that the f32 packing takes the same branch.
    let (wide_line, wide_along) = if along == 1 { (kc as isize, 1) } else { (1, len as isize) };
    let mut widen = |wide: &mut Vec<f32>| {
        wide.clear();
        wide.resize(len * kc, 0.0);
        // Runs contiguous in the source (a line along k, or a step across the lines) widened
        // whole, at the path's width: element by element, B's widening made a bf16 training
        // step 1.6 times as long.
        let (runs, run, step, across) = if along == 1 { (len, kc, line, 1) } else { (kc, len, along, line) };
        for r in 0..runs {
            let out = &mut wide[r * run..(r + 1) * run];
            if across == 1 {
                // SAFETY: run r's `run` elements are contiguous inside the block.
                let bits = unsafe { std::slice::from_raw_parts(src.offset(r as isize * step), run) };
                super::elementwise::widen_run(bits, out);
            } else {
                for (i, w) in out.iter_mut().enumerate() {
                    // SAFETY: element i of run r is inside the block.
                    let b = unsafe { *src.offset(r as isize * step + i as isize * across) };
                    *w = f32::from_bits((b as u32) << 16);
                }
            }
        }
        // SAFETY: `wide` holds the whole block in the orientation given; as the caller
        // guarantees for the rest.
        unsafe { pack::<K>(dst, Source::F32(wide.as_ptr()), wide_line, wide_along, len, kc, w, layout) };
    };
    WIDENED.with(|cell| match cell.try_borrow_mut() {
        Ok(mut wide) => widen(&mut wide),
        Err(_) => widen(&mut Vec::new()),
    });
}

/// `out[i] = lines[i]`, with the slivers' usual widths as fixed sizes (moved in registers;
/// a length known only at run time became a `memmove` call per 8 floats).
#[inline(always)]
fn place<T: Packed>(out: &mut [T], lines: &[f32]) {
    fn fixed<T: Packed, const N: usize>(out: &mut [T], lines: &[f32; N]) {
        for (o, &v) in out[..N].iter_mut().zip(lines) {
            *o = T::from_f32(v);
        }
    }
    if let Ok(l) = <&[f32; 8]>::try_from(lines) {
        fixed(out, l)
    } else if let Ok(l) = <&[f32; 32]>::try_from(lines) {
        fixed(out, l)
    } else if let Ok(l) = <&[f32; 16]>::try_from(lines) {
        fixed(out, l)
    } else {
        for (o, &v) in out.iter_mut().zip(lines) {
            *o = T::from_f32(v);
        }
    }
}

/// fp32 lines side by side (B as stored, Aᵀ): step p of all `len` lines is one contiguous run
/// of the source, moved into row p of each `w`-wide sliver 8 floats to a register (then 4,
/// then one: the avx2 kernel's A slivers are 6 wide). Copied in Rust, each sliver row became a
/// libc `memcpy` call: 11 % of attention's time, whose per-head products are 36 × 64 × 36
/// (`place`, the portable paths' version).
///
/// The runs lie `along` apart: a weight gradient's dYᵀ has rows of 3 KiB (d 768), so each run
/// is on another page, where the hardware prefetcher does not follow, and every line of it
/// was a cache miss: this copy was a quarter of that GEMM's time on Zen 3. So the run
/// `AHEAD` steps on is prefetched. `W` is `w` when the caller knows it at compile time (0:
/// not), so that a whole sliver's row is a few fixed moves, not a loop.
///
/// # Safety
/// The CPU has AVX; steps 0..kc of lines 0..len are inside `src`; `dst` holds
/// ⌈len / w⌉ slivers of kc · w floats; W is 0 or w.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn pack_side_by_side_avx<const W: usize>(
    dst: *mut f32,
    src: *const f32,
    along: isize,
    len: usize,
    kc: usize,
    w: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller guarantees: reads run p, elements < len; writes row p < kc,
    // columns < w, of sliver s0 / w.
    const AHEAD: usize = 8;
    unsafe {
        for p in 0..kc {
            let run = src.offset(p as isize * along);
            if p + AHEAD < kc {
                // A hint only: no fault, whatever the address.
                let ahead = run.offset(AHEAD as isize * along) as *const i8;
                let mut byte = 0;
                while byte < len * 4 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(byte));
                    byte += 64;
                }
                // The run's last line, when the run does not start on a line.
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(len * 4).wrapping_sub(1));
            }
            for s0 in (0..len).step_by(w) {
                let (out, from) = (dst.add(s0 * kc + p * w), run.add(s0));
                let lines = if W > 0 && s0 + W <= len { W } else { w.min(len - s0) };
                let mut l = 0;
                while l + 8 <= lines {
                    _mm256_storeu_ps(out.add(l), _mm256_loadu_ps(from.add(l)));
                    l += 8;
                }
                if l + 4 <= lines {
                    _mm_storeu_ps(out.add(l), _mm_loadu_ps(from.add(l)));
                    l += 4;
                }
                if l + 2 <= lines {
                    _mm_store_sd(out.add(l) as *mut f64, _mm_load_sd(from.add(l) as *const f64));
                    l += 2;
                }
                for l in l..lines {
                    *out.add(l) = *from.add(l);
                }
            }
        }
    }
}

/// A full fp32 sliver of `w` (a multiple of 8) contiguous lines, `line` apart: 8 × 8 blocks
/// (8 lines × 8 steps of k) loaded as rows and stored transposed, the k steps past the last
/// whole block one by one. Packing this way (the activations, and the weights used
/// transposed, are read along k) took a sixth of `query`'s time element by element.
///
/// # Safety
/// The CPU has AVX; lines < w and k < kc are inside the allocation behind `base`, and
/// `sliver` holds kc · w floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn pack_lines_avx(sliver: &mut [f32], base: *const f32, line: isize, kc: usize, w: usize) {
    assert!(sliver.len() >= kc * w);
    // SAFETY: as the caller guarantees; the sliver holds kc rows of w.
    unsafe { transpose_lines_avx(sliver.as_mut_ptr(), w, base, line, kc, w) }
}

/// Lines 0..w (w a multiple of 8) of kc elements, `line` apart, transposed as
/// [`pack_lines_avx`] does: `out[p · stride + l]` = element p of line l (attention's keys,
/// too).
///
/// # Safety
/// The CPU has AVX; lines < w and k < kc are inside the allocation behind `base`; `out` holds
/// rows p < kc of `stride` ≥ w floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
pub(super) unsafe fn transpose_lines_avx(
    out: *mut f32,
    stride: usize,
    base: *const f32,
    line: isize,
    kc: usize,
    w: usize,
) {
    use std::arch::x86_64::*;
    let k8 = kc / 8 * 8;
    // SAFETY: as the caller guarantees; stores go to rows p < kc, columns l < w of out.
    unsafe {
        for l0 in (0..w).step_by(8) {
            let row = |i: usize| base.offset((l0 + i) as isize * line);
            for p0 in (0..k8).step_by(8) {
                let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(row(i).add(p0)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                // s_j: k steps j and j + 4 of lines 0..4 (s0..s3) or 4..8 (s4..s7).
                let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let s1 = _mm256_shuffle_ps::<0xee>(t0, t2);
                let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let s3 = _mm256_shuffle_ps::<0xee>(t1, t3);
                let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let s5 = _mm256_shuffle_ps::<0xee>(t4, t6);
                let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let s7 = _mm256_shuffle_ps::<0xee>(t5, t7);
                let cols = [
                    _mm256_permute2f128_ps::<0x20>(s0, s4),
                    _mm256_permute2f128_ps::<0x20>(s1, s5),
                    _mm256_permute2f128_ps::<0x20>(s2, s6),
                    _mm256_permute2f128_ps::<0x20>(s3, s7),
                    _mm256_permute2f128_ps::<0x31>(s0, s4),
                    _mm256_permute2f128_ps::<0x31>(s1, s5),
                    _mm256_permute2f128_ps::<0x31>(s2, s6),
                    _mm256_permute2f128_ps::<0x31>(s3, s7),
                ];
                for (i, c) in cols.into_iter().enumerate() {
                    _mm256_storeu_ps(out.add((p0 + i) * stride + l0), c);
                }
            }
            for p in k8..kc {
                for i in 0..8 {
                    *out.add(p * stride + l0 + i) = *row(i).add(p);
                }
            }
        }
    }
}

/// `buf` grown to hold `len` elements from a 64-byte boundary (a packed B row of one sliver is
/// a whole number of cache lines, so no load of the micro-kernel splits two), and that part.
pub fn aligned<T: Packed>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    let per_line = 64 / size_of::<T>();
    if buf.len() < len + per_line {
        buf.resize(len + per_line, T::default());
    }
    let skip = buf.as_ptr().align_offset(64).min(per_line - 1);
    &mut buf[skip..skip + len]
}
