//! Fused losses: the loss and its gradient in one pass, the gradient written over the logits.

use super::elementwise::{exp_shifted, sigmoid};
use super::simd;
use crate::backend::IGNORE_TARGET;

/// Mean over all entries of `max(x,0) − x·y + log(1 + e^{−|x|})` (stable BCE-with-logits).
/// Gradient of the mean, times `scale`, replaces the logits. Returns the mean loss.
pub fn bce_with_logits(logits: &mut [f32], targets: &[f32], scale: f32) -> f32 {
    let n = logits.len().max(1) as f32;
    let mut loss = 0.0f64;
    for (x, &y) in logits.iter_mut().zip(targets) {
        let v = *x;
        loss += (v.max(0.0) - v * y + (-v.abs()).exp().ln_1p()) as f64;
        *x = (sigmoid(v) - y) * scale / n;
    }
    (loss / n as f64) as f32
}

/// Mean over rows of `−log softmax(x)[target]`; the gradient of the mean, times `scale`,
/// replaces the logits (rows whose target is `IGNORE_TARGET`: no loss, a zero gradient, not
/// counted). Returns the mean loss. Rows are compiled for the path
/// (`simd::vectorised!`, `exp_shifted`).
pub fn cross_entropy(logits: &mut [f32], classes: usize, targets: &[u32], scale: f32) -> f32 {
    let n = targets.iter().filter(|&&t| t != IGNORE_TARGET).count().max(1) as f32;
    let mut loss = 0.0f64;
    simd::vectorised!({
        for (row, &t) in logits.chunks_exact_mut(classes).zip(targets) {
            if t == IGNORE_TARGET {
                row.fill(0.0);
                continue;
            }
            let t = t as usize;
            // The target's shifted logit before exponentiating: ln(exp(x_t − max)) underflows
            // to −∞ once the gap passes ~103.
            let logit = row[t];
            let (max, sum) = exp_shifted(row);
            loss += (sum.ln() - (logit - max)) as f64;
            let k = scale / (sum * n);
            row.iter_mut().for_each(|v| *v *= k);
            row[t] -= scale / n;
        }
    });
    (loss / n as f64) as f32
}
