//! Layers with explicit forward and backward (manual autograd).
//!
//! The convention, stated once:
//! - `forward` returns the output and a cache: a named struct of exactly what `backward` needs.
//! - `backward` consumes the cache, ACCUMULATES (`+=`) parameter gradients into the flat
//!   gradient buffer (so the two modalities, and micro-batches, add up for free) and RETURNS
//!   the input gradient (written, `=`). On the residual stream the caller adds.
//! - `w` is the flat parameter buffer, `g` the flat gradient buffer (same layout).

pub mod attention;
pub mod block;
pub mod embedding;
pub mod gru;
pub mod layernorm;
pub mod linear;
pub mod params;
pub mod segment;

pub use attention::MultiHeadAttention;
pub use block::EncoderBlock;
pub use embedding::Embedding;
pub use gru::BiGru;
pub use layernorm::LayerNorm;
pub use linear::Linear;
pub use params::{Bf16Copy, Init, Param, ParamStore, Weights};
pub use segment::SegmentEmbed;

use crate::Result;
use crate::backend::Backend;
use crate::tensor::Tensor;

/// Dropout at one call site: probability and the seed of its mask (p = 0: evaluation).
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    pub const OFF: Dropout = Dropout { p: 0.0, seed: 0 };

    /// The dropout of a sub-site (layer i, position k): same p, an independent mask.
    pub fn site(self, site: u64) -> Dropout {
        Dropout { p: self.p, seed: crate::rng::Rng::derive(self.seed, site).next_u64() }
    }

    pub fn forward(self, dev: &mut dyn Backend, x: &mut Tensor) -> Result<()> {
        if self.p > 0.0 { dev.dropout_fwd(x, self.p, self.seed) } else { Ok(()) }
    }

    pub fn backward(self, dev: &mut dyn Backend, dy: &mut Tensor) -> Result<()> {
        if self.p > 0.0 { dev.dropout_bwd(dy, self.p, self.seed) } else { Ok(()) }
    }
}
