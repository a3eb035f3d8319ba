//! Image side (modality-specific): a region x_t with box b_t becomes
//! e_t = φ(ψ1(x̂_t) + ψ2(b_t)), where x̂_t is the learned `[MASK]` feature if t is masked.

use crate::Result;
use crate::backend::{Backend, Segments};
use crate::nn::segment::{Location, SegmentEmbedCache};
use crate::nn::{Dropout, Init, Param, ParamStore, SegmentEmbed};
use crate::tensor::{Ids, Tensor};

use super::config::ModelConfig;

#[derive(Clone, Debug)]
pub struct ImageEncoder {
    pub mask_feature: Param,
    pub embed: SegmentEmbed,
}

pub struct ImageCache {
    embed: SegmentEmbedCache,
    masked: Option<Ids>,
    drop: Dropout,
}

impl ImageEncoder {
    pub fn new(store: &mut ParamStore, cfg: &ModelConfig) -> Self {
        ImageEncoder {
            mask_feature: store.add("image.mask_feature", &[cfg.region_dim], Init::Normal(0.02), false),
            embed: SegmentEmbed::new(store, "image", cfg.region_dim, 5, cfg.dim),
        }
    }

    pub fn forward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        mut features: Tensor,
        boxes: Tensor,
        masked: Option<Ids>,
        drop: Dropout,
    ) -> Result<(Tensor, ImageCache)> {
        if let Some(rows) = &masked {
            dev.set_rows(&mut features, rows, self.mask_feature.of(w))?;
        }
        let (mut e, embed) = self.embed.forward(dev, w, features, Location::Rows(boxes))?;
        drop.forward(dev, &mut e)?;
        Ok((e, ImageCache { embed, masked, drop }))
    }

    pub fn backward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        seg: &Segments,
        c: ImageCache,
        mut de: Tensor,
    ) -> Result<()> {
        c.drop.backward(dev, &mut de)?;
        // Only the masked rows carry a gradient anywhere: into the [MASK] feature. The
        // features are data, so with no masked row their gradient is not computed.
        let dfeatures = self.embed.backward(dev, w, g, seg, c.embed, &de, c.masked.is_some())?;
        if let (Some(rows), Some(mut dfeatures)) = (&c.masked, dfeatures) {
            dev.set_rows_bwd(&mut dfeatures, rows, self.mask_feature.of_mut(g))?;
        }
        Ok(())
    }
}
