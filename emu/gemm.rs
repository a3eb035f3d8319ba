//! cuBLAS SGEMM on the CPU: the same column-major arguments, every operand checked against the
//! live allocations before anything is read or written. Columns of C are split over threads;
//! each column accumulates in f32 (cuBLAS's order differs, as the CPU twin's does: the twin
//! tests' tolerances cover it). Operands stored as bf16 are widened as they are read; a bf16 C
//! is read widened and written rounded to nearest even, after the f32 sum, as cuBLAS does.

pub use crate::sgemm_abi::{R_16BF, R_32F, ROUND_BF16, ROUND_TF32, Sgemm};

/// Bytes per element of a storage type (bf16 or f32).
fn width(ty: i32) -> i64 {
    if ty == R_16BF { 2 } else { 4 }
}

/// Element `i` of an array of `ty` at `p`, as f32.
///
/// # Safety
/// The element lies in a live allocation.
unsafe fn load(p: u64, i: usize, ty: i32) -> f32 {
    if ty == R_16BF {
        f32::from_bits((*(p as *const u16).add(i) as u32) << 16)
    } else {
        *(p as *const f32).add(i)
    }
}

/// Writes `x` as `ty` stores it (bf16: to nearest, ties to even; a NaN stays a NaN).
///
/// # Safety
/// The element lies in a live allocation no other thread writes.
unsafe fn store(p: u64, i: usize, ty: i32, x: f32) {
    if ty == R_16BF {
        let b = x.to_bits();
        let h = if x.is_nan() { (b >> 16) as u16 | 0x40 } else { (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16 };
        *(p as *mut u16).add(i) = h;
    } else {
        *(p as *mut f32).add(i) = x;
    }
}

#[allow(clippy::too_many_arguments)]
fn operand(
    name: &str,
    ptr: u64,
    ty: i32,
    trans: bool,
    rows: i64,
    cols: i64,
    ld: i64,
    stride: i64,
    batch: i64,
) -> Result<(), String> {
    // Stored (not transposed) shape: op(X) = X is rows × cols; op(X) = Xᵀ stores cols × rows.
    let (sr, sc) = if trans { (cols, rows) } else { (rows, cols) };
    if sr == 0 || sc == 0 {
        return Ok(());
    }
    let last = (sc - 1) * ld + (sr - 1) + (batch - 1) * stride;
    let first = (batch - 1) * stride.min(0);
    let w = width(ty);
    let start = ptr as i64 + w * first;
    crate::check_range(
        start as u64,
        (w * (last - first + 1)) as u64,
        &format!("cuBLAS sgemm operand {name} ({sr}x{sc}, ld {ld}, stride {stride}, batch {batch})"),
    )
}

/// An operand as the GEMM's `round` mode reads it.
fn rounded(x: f32, round: i32) -> f32 {
    let b = x.to_bits();
    match round {
        _ if !x.is_finite() => x,
        // To nearest (ties away) at 10 mantissa bits.
        ROUND_TF32 => f32::from_bits(b.wrapping_add(0x1000) & !0x1fff),
        // To nearest, ties to even, at 7 mantissa bits (`__float2bfloat16_rn`).
        ROUND_BF16 => f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000),
        _ => x,
    }
}

pub fn run(g: &Sgemm) -> Result<(), String> {
    let (m, n, k, batch) = (g.m as i64, g.n as i64, g.k as i64, g.batch as i64);
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    let (ta, tb) = (g.trans_a != 0, g.trans_b != 0);
    if k > 0 && g.alpha != 0.0 {
        operand("A", g.a, g.ab_type, ta, m, k, g.lda as i64, g.stride_a, batch)?;
        operand("B", g.b, g.ab_type, tb, k, n, g.ldb as i64, g.stride_b, batch)?;
    }
    operand("C", g.c, g.c_type, false, m, n, g.ldc as i64, g.stride_c, batch)?;
    if g.bias != 0 {
        crate::check_range(g.bias, (width(g.bias_type) * m) as u64, &format!("cuBLASLt bias ({m} values)"))?;
    }
    let (bias, ab, cty) = (g.bias, g.ab_type, g.c_type);
    let (mu, nu, ku) = (m as usize, n as usize, k as usize);
    let workers = std::thread::available_parallelism().map(|x| x.get()).unwrap_or(1).min(nu).max(1);
    for bi in 0..batch {
        let a = (g.a as i64 + width(ab) * bi * g.stride_a) as u64;
        let b = (g.b as i64 + width(ab) * bi * g.stride_b) as u64;
        let c = (g.c as i64 + width(cty) * bi * g.stride_c) as u64;
        // op(A) as a contiguous column-major m × k copy, so the inner loop is unit-stride.
        let mut aop = vec![0f32; mu * ku];
        if k > 0 && g.alpha != 0.0 {
            for p in 0..ku {
                for i in 0..mu {
                    // SAFETY: every index is inside the range `operand` checked.
                    let v = unsafe {
                        if ta {
                            load(a, i * g.lda as usize + p, ab)
                        } else {
                            load(a, p * g.lda as usize + i, ab)
                        }
                    };
                    aop[p * mu + i] = rounded(v, g.round);
                }
            }
        }
        let aop = &aop;
        let cols_per = nu.div_ceil(workers);
        std::thread::scope(|s| {
            for w in 0..workers {
                let (j0, j1) = (w * cols_per, ((w + 1) * cols_per).min(nu));
                s.spawn(move || {
                    let mut acc = vec![0f32; mu];
                    for j in j0..j1 {
                        acc.fill(0.0);
                        if k > 0 && g.alpha != 0.0 {
                            for p in 0..ku {
                                // SAFETY: inside the checked range of B.
                                let bv = unsafe {
                                    if tb {
                                        load(b, p * g.ldb as usize + j, ab)
                                    } else {
                                        load(b, j * g.ldb as usize + p, ab)
                                    }
                                };
                                let bv = rounded(bv, g.round);
                                let col = &aop[p * mu..(p + 1) * mu];
                                for (x, &av) in acc.iter_mut().zip(col) {
                                    *x += av * bv;
                                }
                            }
                        }
                        let col = j * g.ldc as usize;
                        for (i, &x) in acc.iter().enumerate() {
                            // SAFETY: inside the checked range of C; columns are split between
                            // threads, so no two write one element.
                            unsafe {
                                // beta = 0 does not read C (it may hold NaN), as in cuBLAS.
                                let mut v =
                                    if g.beta == 0.0 { g.alpha * x } else { g.alpha * x + g.beta * load(c, col + i, cty) };
                                // The epilogue's bias, added in f32 before D is stored.
                                if bias != 0 {
                                    v += load(bias, i, g.bias_type);
                                }
                                store(c, col + i, cty, v);
                            }
                        }
                    }
                });
            }
        });
    }
    Ok(())
}
