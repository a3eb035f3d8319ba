//! Checkpoints: one safetensors file holding every parameter under its stable name (so it
//! loads in PyTorch or numpy with no mapping table), the AdamW moments as two flat tensors,
//! and in the metadata the model configuration, the step and the trainer's state.
//! Written atomically: a crash mid-write leaves the previous checkpoint intact.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::io::{atomic_write, bytes_to_f32, f32_to_bytes, read};
use crate::model::{ModelConfig, SemShare};
use crate::{Error, Result};

pub const FORMAT: &str = "semshare.checkpoint.v1";
const EXP_AVG: &str = "optimizer.exp_avg";
const EXP_AVG_SQ: &str = "optimizer.exp_avg_sq";

/// Everything a checkpoint holds, on the host.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub model: ModelConfig,
    /// The flat parameter buffer, in the layout of `SemShare::new(&model).store`.
    pub params: Vec<f32>,
    /// AdamW's first and second moments (absent in an inference-only export).
    pub optimizer: Option<(Vec<f32>, Vec<f32>)>,
    pub step: u64,
    /// Trainer state as JSON (schedule position, best validation score, ...).
    pub state: String,
}

impl Checkpoint {
    pub fn save(&self, path: &Path) -> Result<()> {
        let net = SemShare::new(&self.model)?;
        if self.params.len() != net.store.total {
            return Err(Error::shape(
                "checkpoint",
                format!("{} parameters for a model of {}", self.params.len(), net.store.total),
            ));
        }
        let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = net
            .store
            .infos
            .iter()
            .map(|i| {
                (
                    i.name.clone(),
                    i.shape.clone(),
                    f32_to_bytes(&self.params[i.param.offset..i.param.offset + i.param.len]),
                )
            })
            .collect();
        if let Some((m, v)) = &self.optimizer {
            blobs.push((EXP_AVG.into(), vec![m.len()], f32_to_bytes(m)));
            blobs.push((EXP_AVG_SQ.into(), vec![v.len()], f32_to_bytes(v)));
        }
        let views = blobs
            .iter()
            .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.as_str(), v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::format(path, e.to_string()))?;
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("model".to_string(), serde_json::to_string(&self.model).expect("config serialises")),
            ("step".to_string(), self.step.to_string()),
            ("state".to_string(), self.state.clone()),
        ]);
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::format(path, e.to_string()))?;
        atomic_write(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Checkpoint> {
        let bytes = read(path)?;
        let bad = |what: String| Error::format(path, format!("not a valid semshare checkpoint: {what}"));
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        match meta.get("format") {
            Some(f) if f == FORMAT => {}
            Some(f) => return Err(bad(format!("format `{f}`, expected `{FORMAT}`"))),
            None => return Err(bad("no `format` in the metadata".into())),
        }
        let model: ModelConfig =
            serde_json::from_str(meta.get("model").ok_or_else(|| bad("no model configuration".into()))?)
                .map_err(|e| bad(format!("model configuration: {e}")))?;
        let step = meta.get("step").and_then(|s| s.parse().ok()).ok_or_else(|| bad("missing or bad `step`".into()))?;
        let state = meta.get("state").cloned().unwrap_or_default();
        let net = SemShare::new(&model).map_err(|e| bad(e.to_string()))?;
        let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = st.tensor(name).map_err(|_| bad(format!("tensor `{name}` is missing")))?;
            if t.dtype() != Dtype::F32 {
                return Err(bad(format!("tensor `{name}` is {:?}, expected F32", t.dtype())));
            }
            if t.shape() != shape {
                return Err(bad(format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.shape())));
            }
            let v = bytes_to_f32(t.data());
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                return Err(bad(format!("tensor `{name}` holds a non-finite value at element {i}")));
            }
            Ok(v)
        };
        // Appended in layout order rather than allocated up front: the metadata may claim any
        // size, the tensors found in the file bound what is allocated (tests/fuzz-regressions/).
        let mut params = Vec::new();
        for info in &net.store.infos {
            params.extend_from_slice(&tensor(&info.name, &info.shape)?);
        }
        let optimizer = match (st.tensor(EXP_AVG).is_ok(), st.tensor(EXP_AVG_SQ).is_ok()) {
            (true, true) => Some((tensor(EXP_AVG, &[net.store.total])?, tensor(EXP_AVG_SQ, &[net.store.total])?)),
            (false, false) => None,
            _ => {
                return Err(bad("only one of the two optimizer moments is present".into()));
            }
        };
        Ok(Checkpoint { model, params, optimizer, step, state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            region_dim: 6,
            max_regions: 4,
            word_dim: 5,
            gru_hidden: 3,
            dim: 8,
            layers: 1,
            heads: 2,
            ffn: 12,
            max_tokens: 5,
            vocab: 11,
            labels: 3,
            object_classes: 4,
            ..ModelConfig::small()
        }
    }

    fn sample() -> Checkpoint {
        let model = tiny();
        let net = SemShare::new(&model).unwrap();
        let n = net.store.total;
        let params = net.store.init_values(5);
        let m: Vec<f32> = (0..n).map(|i| i as f32 * 1e-3).collect();
        Checkpoint { model, params, optimizer: Some((m.clone(), m)), step: 42, state: "{\"best\":1.5}".into() }
    }

    #[test]
    fn round_trip_is_exact_and_names_are_pytorch_like() {
        let dir = std::env::temp_dir().join(format!("semshare-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.safetensors");
        let c = sample();
        c.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back.params, c.params);
        assert_eq!(back.optimizer, c.optimizer);
        assert_eq!((back.step, back.state.as_str()), (42, "{\"best\":1.5}"));
        assert_eq!(back.model, c.model);
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("shared.layers.0.attn.qkv.weight").unwrap().shape(), &[24, 8]);
        assert_eq!(st.tensor("text.gru.weight_hh_l0_reverse").unwrap().shape(), &[9, 3]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_give_errors_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("semshare-ckpt-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.safetensors");
        sample().save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let bad = dir.join("bad.safetensors");
        for cut in [0, 3, 8, 20, good.len() / 2, good.len() - 1] {
            std::fs::write(&bad, &good[..cut]).unwrap();
            let e = Checkpoint::load(&bad).unwrap_err().to_string();
            assert!(e.contains("bad.safetensors"), "{e}");
        }
        let mut flipped = good.clone();
        flipped[10] ^= 0xFF;
        std::fs::write(&bad, &flipped).unwrap();
        assert!(Checkpoint::load(&bad).is_err());
        let e = Checkpoint::load(&dir.join("missing.safetensors")).unwrap_err().to_string();
        assert!(e.contains("missing.safetensors"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
