//! Time by op of the CPU backend, for profiling a step (issue 17 item 4): with
//! `SEMSHARE_CPU_PROFILE=1` every `Backend` method of `Cpu` adds its wall time to a table,
//! which [`table`] prints grouped by kind (GEMM, GRU, attention, layer norm, elementwise,
//! copies), then the GEMMs by shape. Off (the default) a call costs one relaxed load of a
//! cached flag.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const ENV: &str = "SEMSHARE_CPU_PROFILE";

static ENABLED: OnceLock<bool> = OnceLock::new();
/// An op and, for a GEMM, its m × k × n (zeros for every other op).
type Key = (&'static str, [usize; 3]);

/// Calls and time by [`Key`].
static TIMES: Mutex<BTreeMap<Key, (u64, Duration)>> = Mutex::new(BTreeMap::new());

pub fn enabled() -> bool {
    *ENABLED.get_or_init(|| std::env::var(ENV).is_ok_and(|v| !v.is_empty() && v != "0"))
}

/// Turns profiling on for this process (as the variable does), unless it was already read.
pub fn enable() {
    let _ = ENABLED.set(true);
}

/// Adds the time until it is dropped to `op`'s row, when profiling is on.
pub struct Timer(Option<(&'static str, [usize; 3], Instant)>);

pub fn time(op: &'static str) -> Timer {
    Timer(enabled().then(|| (op, [0; 3], Instant::now())))
}

/// [`time`] for a GEMM, its row also kept by shape (`m × k × n`).
pub fn time_gemm(op: &'static str, (m, k, n): (usize, usize, usize)) -> Timer {
    Timer(enabled().then(|| (op, [m, k, n], Instant::now())))
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let Some((op, shape, t0)) = self.0 {
            let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
            let row = times.entry((op, shape)).or_default();
            row.0 += 1;
            row.1 += t0.elapsed();
        }
    }
}

/// Forgets what was timed so far (e.g. the warm-up).
pub fn reset() {
    TIMES.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// The kind of work an op is, for the table's grouping.
pub fn kind(op: &str) -> &'static str {
    match op {
        _ if op.starts_with("gemm") => "GEMM",
        "gru_fwd" | "gru_bwd" => "GRU recurrence (GEMMs + gates)",
        "gru_step_fwd" | "gru_step_bwd" => "GRU (gates)",
        "attention_fwd" | "attention_bwd" => "attention",
        "layernorm_fwd"
        | "layernorm_bwd"
        | "residual_layernorm_fwd"
        | "residual_layernorm_bwd"
        | "residual_layernorm" => "layer norm",
        "upload" | "upload_ids" | "download" | "copy" | "fill" | "zeros" | "alloc" | "gather_rows"
        | "scatter_add_rows" | "set_rows" | "set_rows_bwd" => "copies",
        "adamw" | "adamw_masked" | "sum_squares_into" | "step_guard" => "optimizer",
        "bce_with_logits" | "cross_entropy" => "losses",
        "top_k" => "top-k",
        _ => "elementwise",
    }
}

/// Markdown tables of the time so far by kind, by op, then the GEMMs by op and shape, each
/// over `per` repetitions (e.g. the number of steps timed), largest first.
pub fn table(per: usize) -> String {
    let by_shape = TIMES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut times: BTreeMap<&str, (u64, Duration)> = BTreeMap::new();
    for (&(op, _), &(n, d)) in &by_shape {
        let row = times.entry(op).or_default();
        row.0 += n;
        row.1 += d;
    }
    let per = per.max(1) as f64;
    let total: f64 = times.values().map(|(_, d)| d.as_secs_f64()).sum::<f64>() * 1e3 / per;
    let mut kinds: BTreeMap<&str, f64> = BTreeMap::new();
    for (op, (_, d)) in &times {
        *kinds.entry(kind(op)).or_default() += d.as_secs_f64() * 1e3 / per;
    }
    let mut kinds: Vec<_> = kinds.into_iter().collect();
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut out = String::from("| kind | ms | share |\n|---|---|---|\n");
    for (k, ms) in &kinds {
        out += &format!("| {k} | {ms:.2} | {:.1} % |\n", 100.0 * ms / total.max(1e-12));
    }
    out += &format!("| **all ops** | {total:.2} | 100 % |\n\n| op | calls | ms | share |\n|---|---|---|---|\n");
    let mut ops: Vec<_> = times.into_iter().collect();
    ops.sort_by_key(|op| std::cmp::Reverse(op.1.1));
    for (op, (n, d)) in ops {
        let ms = d.as_secs_f64() * 1e3 / per;
        out += &format!("| {op} | {:.0} | {ms:.2} | {:.1} % |\n", n as f64 / per, 100.0 * ms / total.max(1e-12));
    }
    let mut gemms: Vec<_> = by_shape.into_iter().filter(|((_, shape), _)| shape[0] > 0).collect();
    if !gemms.is_empty() {
        gemms.sort_by_key(|g| std::cmp::Reverse(g.1.1));
        out += "\n| GEMM | m × k × n | calls | ms | µs a call |\n|---|---|---|---|---|\n";
        for ((op, [m, k, n]), (calls, d)) in gemms {
            let ms = d.as_secs_f64() * 1e3 / per;
            out += &format!(
                "| {op} | {m} × {k} × {n} | {:.0} | {ms:.2} | {:.0} |\n",
                calls as f64 / per,
                d.as_secs_f64() * 1e6 / calls.max(1) as f64
            );
        }
    }
    out
}
