//! The memory a model needs, estimated before anything is allocated: a configuration that
//! cannot fit is refused with the estimate, instead of meeting an allocation failure (an abort)
//! half-way. Deliberately rough (f32 everywhere, the largest segment count for every item):
//! it is there to stop sizes that are off by orders of magnitude.

use super::SemShare;
use crate::backend::Backend;
use crate::{Error, Result};

/// Bytes, estimated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// Parameters, and for training their gradients and AdamW's two moments.
    pub params: f64,
    /// What a forward pass of `batch` items keeps for its backward (both modalities when
    /// training), and the gradients flowing back through it.
    pub activations: f64,
}

impl MemoryEstimate {
    pub fn of(net: &SemShare, batch: usize, training: bool) -> MemoryEstimate {
        let c = &net.cfg;
        let f = |x: usize| x as f64;
        let buffers = if training { 4.0 } else { 1.0 };
        let params = 4.0 * f(net.store.total) * buffers;
        let segments = f(c.max_regions.max(c.max_tokens));
        let (d, h) = (f(c.dim), f(c.gru_hidden));
        // Per segment and block: q, k, v, attention output, two residuals, two norms, the FFN's
        // two f-wide rows, and one attention row per head.
        let per_block = 8.0 * d + 2.0 * f(c.ffn) + f(c.heads) * segments;
        let encoders = f(c.region_dim.max(c.text_feature_dim)) + f(c.word_dim) + 8.0 * h + 3.0 * d;
        // Classifier row, and the context heads' logits of the masked segments.
        let heads = f(c.labels) + c.mask_prob as f64 * f(c.vocab + c.object_classes);
        let per_segment = f(c.layers) * per_block + encoders + heads;
        let modalities = if training { 2.0 * 2.0 } else { 1.0 };
        let activations = 4.0 * f(batch) * segments * per_segment * modalities;
        MemoryEstimate { params, activations }
    }

    pub fn total(&self) -> f64 {
        self.params + self.activations
    }
}

fn gib(bytes: f64) -> String {
    format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
}

/// Refuses a model (at `batch` items per pass) that needs more memory than `dev` has free:
/// the host's for the CPU, the GPU's for CUDA.
pub fn check_memory(dev: &dyn Backend, net: &SemShare, batch: usize, training: bool) -> Result<()> {
    let Some(available) = dev.available_memory() else { return Ok(()) };
    let need = MemoryEstimate::of(net, batch, training);
    if need.total() > available as f64 {
        let what = if training { "training" } else { "inference" };
        return Err(Error::config(format!(
            "this model needs about {} for {what} ({} parameters: {}; activations at batch {batch}: {}), \
             more than the {} available on the {} device: make it or the batch smaller",
            gib(need.total()),
            net.store.total,
            gib(need.params),
            gib(need.activations),
            gib(available as f64),
            dev.name()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn the_estimate_passes_the_presets_and_stops_orders_of_magnitude() {
        let gib = |b: f64| b / (1u64 << 30) as f64;
        let paper = MemoryEstimate::of(&SemShare::new(&ModelConfig::paper()).unwrap(), 128, true);
        assert!((1.0..40.0).contains(&gib(paper.total())), "paper preset, batch 128: {paper:?}");
        let small = MemoryEstimate::of(&SemShare::new(&ModelConfig::small()).unwrap(), 32, true);
        assert!(gib(small.total()) < 2.0, "{small:?}");
        let wide = ModelConfig { dim: 65536, ..ModelConfig::small() };
        let wide = MemoryEstimate::of(&SemShare::new(&wide).unwrap(), 32, true);
        assert!(gib(wide.params) > 100.0, "{wide:?}");
    }
}
