//! Fuzzes the shard parser: arbitrary bytes as a shard file, opened against fixed layouts (token
//! texts and feature texts), then every item read and checked. Any panic is a bug; errors are
//! the expected outcome. See docs/FORMAT.md, "Fuzzing".
#![no_main]

use libfuzzer_sys::fuzz_target;
use semshare::data::Meta;
use semshare::data::format::{Layout, reserved_vocab};
use semshare::data::shard::Shard;

fn layout(text_feature_dim: usize) -> Layout {
    let mut vocab = reserved_vocab();
    vocab.extend((3..20).map(|i| format!("w{i}")));
    let meta = Meta {
        name: "fuzz".into(),
        regions: 4,
        feature_dim: 8,
        max_tokens: 6,
        num_labels: 3,
        num_object_classes: 7,
        vocab,
        label_names: vec!["a".into(), "b".into(), "c".into()],
    };
    Layout { meta, text_feature_dim }
}

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("semshare-fuzz-{}.safetensors", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    for layout in [layout(0), layout(5)] {
        let Ok(shard) = Shard::open(&path, &layout, None) else { continue };
        let mut buf = Vec::new();
        for i in 0..shard.num_images() {
            let _ = shard.check_image(&layout, i);
            buf.resize(shard.feature_len(&layout, i), 0);
            let _ = shard.read_features(&layout, i, &mut buf);
        }
        for j in 0..shard.num_texts() {
            let _ = shard.check_text(&layout, j);
            let _ = shard.text_item(j);
        }
    }
});
