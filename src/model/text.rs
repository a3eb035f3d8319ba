//! Text side (modality-specific): tokens → word embedding → Bi-GRU → ŵ_t = [h→_t ; h←_t],
//! then e_t = φ(ψ1(ŵ_t) + ψ2(PE(t))) with the sinusoidal position encoding PE.

use crate::Result;
use crate::backend::{Backend, Segments};
use crate::nn::gru::BiGruCache;
use crate::nn::segment::SegmentEmbedCache;
use crate::nn::{BiGru, Dropout, Embedding, ParamStore, SegmentEmbed};
use crate::tensor::{Ids, Tensor};

use super::config::ModelConfig;

#[derive(Clone, Debug)]
pub struct TextEncoder {
    pub embedding: Embedding,
    pub gru: BiGru,
    pub embed: SegmentEmbed,
}

pub struct TextCache {
    tokens: Ids,
    gru: BiGruCache,
    embed: SegmentEmbedCache,
    drop: Dropout,
}

/// PE(t)_{2i} = sin(t / 10000^{2i/d}), PE(t)_{2i+1} = cos(t / 10000^{2i/d}).
pub fn position_encoding(t: usize, dim: usize, out: &mut [f32]) {
    for (i, o) in out[..dim].iter_mut().enumerate() {
        let freq = (10000f64).powf(-((i / 2 * 2) as f64) / dim as f64);
        let a = t as f64 * freq;
        *o = if i % 2 == 0 { a.sin() } else { a.cos() } as f32;
    }
}

/// The position encodings of every packed row.
pub fn positions(lengths: &[usize], dim: usize) -> Vec<f32> {
    let total: usize = lengths.iter().sum();
    let max = lengths.iter().copied().max().unwrap_or(0);
    let mut table = vec![0.0; max * dim];
    for (t, row) in table.chunks_exact_mut(dim).enumerate() {
        position_encoding(t, dim, row);
    }
    let mut out = Vec::with_capacity(total * dim);
    for &l in lengths {
        out.extend_from_slice(&table[..l * dim]);
    }
    out
}

impl TextEncoder {
    pub fn new(store: &mut ParamStore, cfg: &ModelConfig) -> Self {
        TextEncoder {
            embedding: Embedding::new(store, "text.embedding", cfg.vocab, cfg.word_dim),
            gru: BiGru::new(store, "text.gru", cfg.word_dim, cfg.gru_hidden),
            embed: SegmentEmbed::new(store, "text", 2 * cfg.gru_hidden, cfg.dim, cfg.dim),
        }
    }

    pub fn forward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        tokens: Ids,
        positions: Tensor,
        seg: &Segments,
        drop: Dropout,
    ) -> Result<(Tensor, TextCache)> {
        let words = self.embedding.forward(dev, w, &tokens)?;
        let (states, gru) = self.gru.forward(dev, w, words, seg)?;
        let (mut e, embed) = self.embed.forward(dev, w, states, positions)?;
        drop.forward(dev, &mut e)?;
        Ok((e, TextCache { tokens, gru, embed, drop }))
    }

    pub fn backward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        seg: &Segments,
        c: TextCache,
        de: &Tensor,
    ) -> Result<()> {
        let mut de = de.clone();
        c.drop.backward(dev, &mut de)?;
        let dstates = self.embed.backward(dev, w, g, c.embed, &de)?;
        let dwords = self.gru.backward(dev, w, g, seg, c.gru, &dstates)?;
        self.embedding.backward(dev, g, &c.tokens, &dwords)
    }
}
