//! Text side (modality-specific): tokens → word embedding → Bi-GRU → ŵ_t = [h→_t ; h←_t],
//! then e_t = φ(ψ1(ŵ_t) + ψ2(PE(t))) with the sinusoidal position encoding PE.

use crate::backend::{Backend, Segments};
use crate::nn::gru::BiGruCache;
use crate::nn::segment::{Location, SegmentEmbedCache};
use crate::nn::{BiGru, Dropout, Embedding, ParamStore, SegmentEmbed};
use crate::tensor::{Ids, Tensor};
use crate::{Error, Result};

use super::config::ModelConfig;

/// Token texts: word embedding E, then the Bi-GRU.
#[derive(Clone, Debug)]
pub struct WordEncoder {
    pub embedding: Embedding,
    pub gru: BiGru,
}

#[derive(Clone, Debug)]
pub struct TextEncoder {
    /// None when texts arrive as pre-extracted segment features (`text_feature_dim` > 0):
    /// ψ1 then reads those features directly.
    pub words: Option<WordEncoder>,
    pub embed: SegmentEmbed,
}

/// What the text side reads: token ids, or segment features `[segments, Dt]`.
pub enum TextInput {
    Tokens(Ids),
    Features(Tensor),
}

pub struct TextCache {
    /// Boxed: the GRU's run buffers make it the largest part of a modality's cache.
    words: Option<Box<(Ids, BiGruCache)>>,
    embed: SegmentEmbedCache,
    drop: Dropout,
}

pub use crate::backend::cpu::positions::position_encoding;

impl TextEncoder {
    pub fn new(store: &mut ParamStore, cfg: &ModelConfig) -> Self {
        if cfg.text_features() {
            return TextEncoder {
                words: None,
                embed: SegmentEmbed::new(store, "text", cfg.text_feature_dim, cfg.dim, cfg.dim),
            };
        }
        TextEncoder {
            words: Some(WordEncoder {
                embedding: Embedding::new(store, "text.embedding", cfg.vocab, cfg.word_dim),
                gru: BiGru::new(store, "text.gru", cfg.word_dim, cfg.gru_hidden),
            }),
            embed: SegmentEmbed::new(store, "text", 2 * cfg.gru_hidden, cfg.dim, cfg.dim),
        }
    }

    pub fn forward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        input: TextInput,
        seg: &Segments,
        drop: Dropout,
    ) -> Result<(Tensor, TextCache)> {
        let (segments, words) = match (input, &self.words) {
            (TextInput::Tokens(tokens), Some(we)) => {
                let vectors = we.embedding.forward(dev, w, &tokens)?;
                let (states, gru) = we.gru.forward(dev, w, vectors, seg)?;
                (states, Some(Box::new((tokens, gru))))
            }
            (TextInput::Features(x), None) => (x, None),
            _ => return Err(Error::config("text batch (tokens or features) does not match the model's text side")),
        };
        let (mut e, embed) = self.embed.forward(dev, w, segments, Location::Positions(seg))?;
        drop.forward(dev, &mut e)?;
        Ok((e, TextCache { words, embed, drop }))
    }

    pub fn backward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        seg: &Segments,
        c: TextCache,
        mut de: Tensor,
    ) -> Result<()> {
        c.drop.backward(dev, &mut de)?;
        // Pre-extracted features are inputs: their gradient is not computed.
        let dsegments = self.embed.backward(dev, w, g, seg, c.embed, &de, c.words.is_some())?;
        if let (Some(we), Some(words), Some(dsegments)) = (&self.words, c.words, dsegments) {
            let (tokens, gru) = *words;
            let dwords = we.gru.backward(dev, w, g, seg, gru, &dsegments)?;
            we.embedding.backward(dev, g, &tokens, &dwords)?;
        }
        Ok(())
    }
}
