//! Eq. 3: e_t = φ(ψ1(x̂_t) + ψ2(l_t)), φ = GELU(LayerNorm(·)).
//! ψ1 reads the segment's content, ψ2 its location (a box, or a position encoding).
//! ψ2(PE(t)) depends on the position alone, so it is computed once per position.

use super::layernorm::{LayerNorm, LayerNormCache};
use super::linear::Linear;
use super::params::ParamStore;
use crate::Result;
use crate::backend::{Backend, Segments};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct SegmentEmbed {
    pub psi1: Linear,
    pub psi2: Linear,
    pub norm: LayerNorm,
}

/// l_t, what ψ2 reads: a row of data per segment (an image region's box), or the segment's
/// position t in its item, whose encoding PE(t) depends on t alone.
pub enum Location<'s> {
    Rows(Tensor),
    Positions(&'s Segments),
}

/// ψ2's input as the backward needs it: the rows, or the table of PE(t) it was applied to.
enum Located {
    Rows(Tensor),
    Positions(Tensor),
}

pub struct SegmentEmbedCache {
    x: Tensor,
    loc: Located,
    norm: LayerNormCache,
    normed: Tensor,
}

impl SegmentEmbed {
    pub fn new(store: &mut ParamStore, name: &str, content: usize, location: usize, dim: usize) -> Self {
        SegmentEmbed {
            psi1: Linear::new(store, &format!("{name}.psi1"), content, dim, true),
            psi2: Linear::new(store, &format!("{name}.psi2"), location, dim, true),
            norm: LayerNorm::new(store, &format!("{name}.norm"), dim),
        }
    }

    pub fn forward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        x: Tensor,
        loc: Location,
    ) -> Result<(Tensor, SegmentEmbedCache)> {
        let (s, loc) = match loc {
            Location::Rows(l) => {
                let mut s = self.psi1.forward(dev, w, &x)?;
                self.psi2.forward_into(dev, w, &l, &mut s)?;
                (s, Located::Rows(l))
            }
            Location::Positions(seg) => {
                // ψ2(PE(t)) for each position t once, then copied to every item's row t: a
                // GEMM of the longest item's rows in place of one of the batch's.
                let table = dev.position_table(seg.max_len.max(1), self.psi2.inputs)?;
                let located = self.psi2.forward(dev, w, &table)?;
                let mut s = dev.segment_rows(&located, seg)?;
                self.psi1.forward_into(dev, w, &x, &mut s)?;
                (s, Located::Positions(table))
            }
        };
        let (normed, norm) = self.norm.forward(dev, w, s)?;
        let e = dev.gelu_fwd(&normed)?;
        Ok((e, SegmentEmbedCache { x, loc, norm, normed }))
    }

    /// The parameters' gradients, and with `content_grad` dx, the content's (None without:
    /// features that are data need none, and its GEMM is not run). The location is data and
    /// gets none; `seg` is the batch's (a position's gradient sums its rows over the items).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dev: &mut dyn Backend,
        w: &Tensor,
        g: &mut Tensor,
        seg: &Segments,
        c: SegmentEmbedCache,
        de: &Tensor,
        content_grad: bool,
    ) -> Result<Option<Tensor>> {
        let dnormed = dev.gelu_bwd(&c.normed, de)?;
        let ds = self.norm.backward(dev, w, g, c.norm, &dnormed)?;
        match &c.loc {
            Located::Rows(l) => self.psi2.backward_params(dev, g, l.view(), &ds)?,
            Located::Positions(table) => {
                let dtable = dev.segment_rows_bwd(&ds, seg, table.rows())?;
                self.psi2.backward_params(dev, g, table.view(), &dtable)?;
            }
        }
        if !content_grad {
            return self.psi1.backward_params(dev, g, c.x.view(), &ds).map(|()| None);
        }
        self.psi1.backward(dev, w, g, &c.x, &ds).map(Some)
    }
}
