//! Statistics of a split's input features: the per-feature mean and standard deviation of the
//! training split that input normalisation (`model::InputNorm`) applies.

use crate::Result;
use crate::data::batches::{image_batch, text_batch};
use crate::data::format::Layout;
use crate::data::reader::SplitReader;
use crate::model::{FeatureNorm, InputNorm};

/// Items read per pass (bounded memory on a large split).
const CHUNK: usize = 256;

/// Per-feature Σx and Σx² (f64) over the rows of `rows` (`[n, dim]`).
fn accumulate(s1: &mut [f64], s2: &mut [f64], rows: &[f32]) {
    for row in rows.chunks_exact(s1.len().max(1)) {
        for ((a, b), &x) in s1.iter_mut().zip(s2.iter_mut()).zip(row) {
            let x = f64::from(x);
            *a += x;
            *b += x * x;
        }
    }
}

/// The normalisation of `split`'s inputs: every region of every image, and every text segment
/// when texts are features, weighted alike (a row is one segment, as the model reads them).
pub fn input_norm(layout: &Layout, split: &SplitReader) -> Result<InputNorm> {
    let dr = layout.meta.feature_dim;
    let (mut s1, mut s2, mut rows) = (vec![0f64; dr], vec![0f64; dr], 0usize);
    let images: Vec<usize> = (0..split.num_images()).collect();
    for c in images.chunks(CHUNK) {
        let b = image_batch(layout, split, c)?;
        accumulate(&mut s1, &mut s2, &b.features.to_f32());
        rows += b.features.len() / dr.max(1);
    }
    let image = FeatureNorm::from_moments(&s1, &s2, rows);
    let dt = layout.text_feature_dim;
    let text = if dt == 0 {
        None
    } else {
        let (mut s1, mut s2, mut rows) = (vec![0f64; dt], vec![0f64; dt], 0usize);
        let texts: Vec<usize> = (0..split.num_texts()).collect();
        for c in texts.chunks(CHUNK) {
            let b = text_batch(layout, split, c)?;
            accumulate(&mut s1, &mut s2, &b.features.to_f32());
            rows += b.features.len() / dt;
        }
        Some(FeatureNorm::from_moments(&s1, &s2, rows))
    };
    Ok(InputNorm { image, text })
}
