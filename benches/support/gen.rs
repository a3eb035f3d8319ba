//! A large synthetic dataset for the loader figures: fp16 region features of 36 × 1024 per image
//! (DESIGN.md's benchmark shapes), one 32-token text per image, 24 labels; random bits, written
//! through the dataset writer in 256 MiB shards. Shared by `benches/loader.rs` and
//! `examples/stream_rss.rs`.

use std::path::Path;

use semshare::data::Meta;
use semshare::data::format::{FeatureDtype, Layout, reserved_vocab};
use semshare::data::writer::{DatasetWriter, ImageRecord, TextRecord};

pub const R: usize = 36;
pub const DR: usize = 1024;
pub const T: usize = 32;
pub const C: usize = 24;
pub const IMAGE_BYTES: usize = R * DR * 2;

/// Writes `images` train images (and a 16-image val and test) to `dir` unless a dataset with
/// that many train images is already there.
pub fn ensure(dir: &Path, images: usize) {
    if let Ok(d) = semshare::data::reader::DatasetReader::open(dir)
        && d.split("train").map(|s| s.num_images()).ok() == Some(images)
    {
        return;
    }
    let mut vocab = reserved_vocab();
    vocab.extend((3..10_000).map(|i| format!("w{i}")));
    let meta = Meta {
        name: "loader-bench".into(),
        regions: R,
        feature_dim: DR,
        max_tokens: T,
        num_labels: C,
        num_object_classes: 0,
        vocab,
        label_names: (0..C).map(|c| format!("label{c}")).collect(),
    };
    let mut w = DatasetWriter::create(dir, Layout { meta, text_feature_dim: 0 }, 256 << 20).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut features = vec![0u8; IMAGE_BYTES];
    let boxes: Vec<u8> = [0.1f32, 0.1, 0.6, 0.6, 0.25].repeat(R).iter().flat_map(|x| x.to_le_bytes()).collect();
    let tokens: Vec<u8> = (0..T as u32).flat_map(|t| (3 + t).to_le_bytes()).collect();
    for (split, n) in [("train", images), ("val", 16), ("test", 16)] {
        w.begin_split(split).unwrap();
        for i in 0..n {
            for pair in features.chunks_exact_mut(8) {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                // Four f16 values in [0, 1): exponent ≤ 14, never NaN or infinite.
                pair.copy_from_slice(&(state & 0x3bff_3bff_3bff_3bff).to_le_bytes());
            }
            let mut labels = [0u8; C];
            labels[i % C] = 1;
            let image = ImageRecord {
                features: &features,
                feature_dtype: FeatureDtype::F16,
                boxes: &boxes,
                count: R as u16,
                classes: None,
                labels: &labels,
            };
            w.push(&image, &[TextRecord { content: &tokens, dtype: None, length: T as u16 }]).unwrap();
        }
    }
    w.finish().unwrap();
}
