//! The GPU side of the twin tests: the same `Backend` calls run on the CPU (the reference) and
//! on CUDA. Without a GPU (or without `--features cuda`) each test prints one skip line and
//! passes; with `SEMSHARE_REQUIRE_GPU=1` (the GPU bundle's run script) it fails instead, so a
//! GPU run can never silently skip.

use semshare::backend::Backend;

fn required() -> bool {
    std::env::var("SEMSHARE_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

fn skip(test: &str, why: &str) {
    assert!(!required(), "{test}: SEMSHARE_REQUIRE_GPU=1 but {why}");
    eprintln!("SKIP {test}: {why}");
}

/// The CUDA device, or None after printing a skip line.
#[cfg(feature = "cuda")]
pub fn cuda_or_skip(test: &str) -> Option<semshare::backend::cuda::Cuda> {
    if !semshare::backend::cuda::available() {
        skip(test, "no CUDA GPU (libcuda missing or no device)");
        return None;
    }
    // A GPU is there: failing to open it is a failure, not a skip.
    Some(semshare::backend::cuda::Cuda::new(0).unwrap_or_else(|e| panic!("{test}: opening the GPU failed: {e}")))
}

/// The GPU behind the `Backend` trait, or None after printing a skip line.
pub fn gpu_or_skip(test: &str) -> Option<Box<dyn Backend>> {
    #[cfg(feature = "cuda")]
    {
        cuda_or_skip(test).map(|c| Box::new(c) as Box<dyn Backend>)
    }
    #[cfg(not(feature = "cuda"))]
    {
        skip(test, "this build has no CUDA support (--features cuda)");
        None
    }
}

/// Leave NaN-filled blocks of `elems` f32 at the top of the device pool, so the next
/// allocations of that size (an op's output) start as NaN: an element the op forgets to write
/// shows up in the comparison.
pub fn poison(dev: &mut dyn Backend, elems: &[usize]) {
    let mut held = Vec::new();
    for &n in elems {
        for _ in 0..2 {
            let mut t = dev.alloc(&[n.max(1)]).expect("alloc");
            dev.fill(t.view_mut(), f32::NAN).expect("fill");
            held.push(t);
        }
    }
    drop(held); // back to the free lists, newest on top
}

/// Same NaN positions (none, for an output written whole) and relative-norm error ≤ `tol`
/// over the rest: an element the GPU left poisoned, or wrote where the CPU did not, fails.
pub fn compare_twins(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g.is_nan() != w.is_nan()) {
        panic!("{what}: element {i} is {} on the GPU and {} on the CPU (unwritten or wrong)", got[i], want[i]);
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want).filter(|(g, _)| !g.is_nan()) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    let err = if den > 0.0 { (num / den).sqrt() } else { num.sqrt() };
    super::report(what, err);
    assert!(err <= tol, "{what}: relative error {err:.3e} > {tol:.0e}");
}

/// Whether the GPU tests run on the emulated device, which computes what the PTX says in the
/// order it says it (a card's compiler may fuse a multiply and an add): where a test holds
/// the emulated device to the CPU's bits, a card gets a tolerance.
pub fn emulated() -> bool {
    #[cfg(feature = "cuda")]
    return semshare::backend::cuda::emulated();
    #[cfg(not(feature = "cuda"))]
    false
}
