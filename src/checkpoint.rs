//! Checkpoints: one safetensors file holding every parameter under its stable name (so it
//! loads in PyTorch or numpy with no mapping table), the AdamW moments as two flat tensors,
//! and in the metadata the model configuration, the step and the trainer's state, and what
//! inference needs from the training data ([`InferenceSpec`]: vocabulary, label names, input
//! shapes and dtypes, the retrieval embedding, the input normalisation), so that a checkpoint is
//! a self-contained model.
//! Written atomically: a crash mid-write leaves the previous checkpoint intact.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::data::checksum::Checksum;
use crate::data::format::{FeatureDtype, Layout, RESERVED_TOKENS};
use crate::io::{Staged, bytes_to_f32, f32_to_bytes, open_regular, safetensors_bytes, stage};
use crate::model::{EmbeddingKind, InputNorm, ModelConfig, SemShare};
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
    /// What inference needs beyond the parameters; each part is None in a checkpoint written
    /// before it was recorded.
    pub spec: InferenceSpec,
}

/// What a model needs from its training data to be used without it. Stored in the metadata
/// under the keys `vocab`, `labels` (JSON arrays of strings), `inputs` (JSON), `embedding` and
/// `normalization` (JSON).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InferenceSpec {
    /// The vocabulary, id order: 0 `[PAD]`, 1 `[UNK]`, 2 `[MASK]`, then words (V entries).
    pub vocab: Option<Vec<String>>,
    /// The C label names, in the order of the label embedding's coordinates.
    pub label_names: Option<Vec<String>>,
    /// The shapes and dtypes of the inputs the model was trained on.
    pub inputs: Option<InputSpec>,
    /// The retrieval embedding the checkpoint was selected with (`TrainConfig::embedding`).
    pub embedding: Option<EmbeddingKind>,
    /// The training split's feature statistics every input is normalised with; None: the
    /// features as they come (also what a checkpoint written before it was recorded means).
    pub normalization: Option<InputNorm>,
}

/// The inputs a model was trained on: widths equal the model's, the dtypes are how the
/// dataset stored its features (inference widens every dtype to f32).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Dr and its storage dtype.
    pub region_dim: usize,
    pub region_dtype: FeatureDtype,
    /// R: most regions per image.
    pub max_regions: usize,
    /// Dt (0 when texts are token ids) and its storage dtype.
    pub text_feature_dim: usize,
    pub text_dtype: Option<FeatureDtype>,
    /// T: most tokens (or text segments) per text.
    pub max_tokens: usize,
}

impl InferenceSpec {
    /// Refuses a dataset whose words or labels are not the ones the model was trained on: the
    /// same counts with other entries would read its tokens as other words and score its items
    /// against other classes. Names the first entry that differs. What the spec does not record
    /// (an old checkpoint's vocabulary or label names) is not compared.
    pub fn check_data(&self, layout: &Layout) -> Result<()> {
        let m = &layout.meta;
        let vocab =
            self.vocab.as_ref().filter(|_| !layout.text_features()).map(|v| ("vocabulary", "word", v, &m.vocab));
        let labels = self.label_names.as_ref().map(|n| ("labels", "label", n, &m.label_names));
        for (list, entry, ours, theirs) in vocab.into_iter().chain(labels) {
            if ours.len() != theirs.len() {
                return Err(Error::config(format!(
                    "dataset `{}` has {} entries in its {list}, the checkpoint {}",
                    m.name,
                    theirs.len(),
                    ours.len()
                )));
            }
            if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
                return Err(Error::config(format!(
                    "dataset `{}` is not the data this model was trained on: its {entry} {i} is `{}`, the checkpoint's `{}`",
                    m.name, theirs[i], ours[i]
                )));
            }
        }
        Ok(())
    }

    /// The spec of a model trained on a dataset of `layout` whose features are stored as
    /// `region_dtype` and `text_dtype`, selected by `embedding`.
    pub fn of(
        layout: &Layout,
        region_dtype: FeatureDtype,
        text_dtype: Option<FeatureDtype>,
        embedding: EmbeddingKind,
    ) -> InferenceSpec {
        let m = &layout.meta;
        InferenceSpec {
            vocab: Some(m.vocab.clone()),
            label_names: Some(m.label_names.clone()),
            inputs: Some(InputSpec {
                region_dim: m.feature_dim,
                region_dtype,
                max_regions: m.regions,
                text_feature_dim: layout.text_feature_dim,
                text_dtype,
                max_tokens: m.max_tokens,
            }),
            embedding: Some(embedding),
            normalization: None,
        }
    }

    fn write(&self, meta: &mut BTreeMap<&str, String>) {
        fn json(v: &impl Serialize) -> String {
            serde_json::to_string(v).expect("spec serialises")
        }
        if let Some(v) = &self.vocab {
            meta.insert("vocab", json(v));
        }
        if let Some(l) = &self.label_names {
            meta.insert("labels", json(l));
        }
        if let Some(i) = &self.inputs {
            meta.insert("inputs", json(i));
        }
        if let Some(e) = self.embedding {
            meta.insert("embedding", e.name().to_string());
        }
        if let Some(n) = &self.normalization {
            meta.insert("normalization", json(n));
        }
    }

    /// The spec in `meta`, checked against `model`; a part that is absent stays None.
    fn read(
        meta: &std::collections::HashMap<String, String>,
        model: &ModelConfig,
    ) -> std::result::Result<Self, String> {
        fn parse<T: serde::de::DeserializeOwned>(
            meta: &std::collections::HashMap<String, String>,
            key: &str,
        ) -> std::result::Result<Option<T>, String> {
            meta.get(key).map(|s| serde_json::from_str(s).map_err(|e| format!("metadata `{key}`: {e}"))).transpose()
        }
        let embedding =
            meta.get("embedding").map(|e| e.parse::<EmbeddingKind>()).transpose().map_err(|e| e.to_string())?;
        let spec = InferenceSpec {
            vocab: parse(meta, "vocab")?,
            label_names: parse(meta, "labels")?,
            inputs: parse(meta, "inputs")?,
            embedding,
            normalization: parse(meta, "normalization")?,
        };
        spec.check(model)?;
        Ok(spec)
    }

    /// Each part that is present agrees with `model`.
    fn check(&self, model: &ModelConfig) -> std::result::Result<(), String> {
        if let Some(v) = &self.vocab {
            if v.len() != model.vocab {
                return Err(format!(
                    "metadata `vocab` has {} entries, the model's vocabulary {}",
                    v.len(),
                    model.vocab
                ));
            }
            if v.iter().zip(RESERVED_TOKENS).any(|(a, b)| a != b) {
                return Err(format!("metadata `vocab` does not start with {}", RESERVED_TOKENS.join(" ")));
            }
        }
        if let Some(l) = &self.label_names
            && l.len() != model.labels
        {
            return Err(format!("metadata `labels` has {} names, the model {} labels", l.len(), model.labels));
        }
        if let Some(n) = &self.normalization {
            n.check(model.region_dim, model.text_feature_dim).map_err(|e| format!("metadata `normalization`: {e}"))?;
        }
        if let Some(i) = &self.inputs
            && (i.region_dim != model.region_dim || i.text_feature_dim != model.text_feature_dim)
        {
            return Err(format!(
                "metadata `inputs` has widths Dr {} and Dt {}, the model {} and {}",
                i.region_dim, i.text_feature_dim, model.region_dim, model.text_feature_dim
            ));
        }
        Ok(())
    }
}

impl Checkpoint {
    /// The model's identity for the indexes built with it: `fnv1a64x4` (the dataset checksum)
    /// over the model configuration (JSON), the vocabulary if stored (it decides how a string
    /// is tokenised) and the parameters (little-endian f32), as 16 hex digits. The optimizer
    /// state, the step and the rest of the spec are left out: they do not change an embedding.
    pub fn fingerprint(&self) -> String {
        let mut sum = Checksum::new();
        sum.update(serde_json::to_string(&self.model).expect("config serialises").as_bytes());
        if let Some(vocab) = &self.spec.vocab {
            sum.update(serde_json::to_string(vocab).expect("strings serialise").as_bytes());
        }
        sum.update(&(self.params.len() as u64).to_le_bytes());
        for chunk in self.params.chunks(1 << 16) {
            sum.update(&f32_to_bytes(chunk));
        }
        format!("{:016x}", sum.finish())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.stage(path)?.commit()
    }

    /// The checkpoint written beside `path` and synced, not yet in place ([`crate::io::stage`]):
    /// a run that replaces another stages both of its checkpoints before committing either.
    pub fn stage(&self, path: &Path) -> Result<Staged> {
        let net = SemShare::new(&self.model)?;
        if self.params.len() != net.store.total {
            return Err(Error::shape(
                "checkpoint",
                format!("{} parameters for a model of {}", self.params.len(), net.store.total),
            ));
        }
        let not_written = |e: String| Error::format(path, format!("not written: {e}"));
        self.spec.check(&self.model).map_err(not_written)?;
        // What `load` refuses is not written.
        for info in &net.store.infos {
            check_values(&info.name, &self.params[info.param.offset..][..info.param.len], false)
                .map_err(not_written)?;
        }
        if let Some((m, v)) = &self.optimizer {
            for (name, moment, nonnegative) in [(EXP_AVG, m, false), (EXP_AVG_SQ, v, true)] {
                if moment.len() != net.store.total {
                    return Err(not_written(format!(
                        "tensor `{name}` has {} values for {} parameters",
                        moment.len(),
                        net.store.total
                    )));
                }
                check_values(name, moment, nonnegative).map_err(not_written)?;
            }
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
        let meta = BTreeMap::from([
            ("format", FORMAT.to_string()),
            ("model", serde_json::to_string(&self.model).expect("config serialises")),
            ("step", self.step.to_string()),
            ("state", self.state.clone()),
        ]);
        let mut meta = meta;
        self.spec.write(&mut meta);
        let bytes = safetensors_bytes(views, &meta).map_err(|e| Error::format(path, e))?;
        stage(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Checkpoint> {
        Self::load_with(path, true)
    }

    /// Whether `path` is a regular file whose safetensors header names this format: what may be
    /// replaced as a checkpoint semshare wrote. Reads the header only.
    pub fn is_checkpoint(path: &Path) -> bool {
        Self::header_entry(path, "format").is_some_and(|f| f == FORMAT)
    }

    /// The trainer state (`state` in the metadata) of the checkpoint at `path`, read from its
    /// header alone; None when `path` is not a checkpoint semshare wrote or has none.
    pub fn read_state(path: &Path) -> Option<String> {
        Self::is_checkpoint(path).then(|| Self::header_entry(path, "state")).flatten()
    }

    /// One entry of a safetensors file's metadata, reading the header only.
    fn header_entry(path: &Path, key: &str) -> Option<String> {
        let (file, _) = open_regular(path).ok()?;
        // SAFETY: read-only map of a file that checkpoints replace by rename, never in place.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.ok()?;
        let (_, header) = SafeTensors::read_metadata(&bytes).ok()?;
        header.metadata().as_ref()?.get(key).cloned()
    }

    /// [`Checkpoint::load`] for inference: the optimizer moments (two thirds of a training
    /// checkpoint) are checked for presence, dtype and shape but not converted, and `optimizer`
    /// is None; a query's start-up does not pay for them.
    pub fn load_for_inference(path: &Path) -> Result<Checkpoint> {
        Self::load_with(path, false)
    }

    fn load_with(path: &Path, with_optimizer: bool) -> Result<Checkpoint> {
        let (file, _) = open_regular(path)?;
        // SAFETY: read-only map; checkpoints are replaced by rename (`atomic_write`), never
        // modified in place. Mapped rather than read: the file is parsed where it lies.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
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
        let spec = InferenceSpec::read(&meta, &model).map_err(bad)?;
        let net = SemShare::new(&model).map_err(|e| bad(e.to_string()))?;
        // Every tensor's dtype and shape is checked against the model before anything is
        // allocated: the metadata alone may ask for any size, the tensors are in the file.
        let checked = |name: &str, shape: &[usize]| -> Result<TensorView<'_>> {
            let t = st.tensor(name).map_err(|_| bad(format!("tensor `{name}` is missing")))?;
            if t.dtype() != Dtype::F32 {
                return Err(bad(format!("tensor `{name}` is {:?}, expected F32", t.dtype())));
            }
            if t.shape() != shape || t.data().len() != 4 * shape.iter().product::<usize>() {
                return Err(bad(format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.shape())));
            }
            Ok(t)
        };
        let total = [net.store.total];
        let mut views = Vec::with_capacity(net.store.infos.len());
        for info in &net.store.infos {
            views.push(checked(&info.name, &info.shape)?);
        }
        let moments = match (st.tensor(EXP_AVG).is_ok(), st.tensor(EXP_AVG_SQ).is_ok()) {
            (true, true) => Some((checked(EXP_AVG, &total)?, checked(EXP_AVG_SQ, &total)?)),
            (false, false) => None,
            _ => return Err(bad("only one of the two optimizer moments is present".into())),
        };
        let values = |name: &str, t: &TensorView<'_>, nonnegative: bool| -> Result<Vec<f32>> {
            let v = bytes_to_f32(t.data());
            check_values(name, &v, nonnegative).map_err(bad)?;
            Ok(v)
        };
        let mut params = vec![0.0f32; net.store.total];
        for (info, view) in net.store.infos.iter().zip(&views) {
            let v = values(&info.name, view, false)?;
            params[info.param.offset..info.param.offset + info.param.len].copy_from_slice(&v);
        }
        let optimizer = match moments {
            Some(_) if !with_optimizer => None,
            Some((m, v)) => Some((values(EXP_AVG, &m, false)?, values(EXP_AVG_SQ, &v, true)?)),
            None => None,
        };
        Ok(Checkpoint { model, params, optimizer, step, state, spec })
    }
}

/// Every value finite, and with `nonnegative` none below zero (a second moment is a mean of
/// squares: negative means corrupt, and AdamW would take its square root); says where not.
fn check_values(name: &str, v: &[f32], nonnegative: bool) -> std::result::Result<(), String> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(format!("tensor `{name}` holds a non-finite value at element {i}"));
    }
    if nonnegative && let Some(i) = v.iter().position(|&x| x < 0.0) {
        return Err(format!("tensor `{name}` holds a negative value {} at element {i}", v[i]));
    }
    Ok(())
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
        Checkpoint {
            model,
            params,
            optimizer: Some((m.clone(), m)),
            step: 42,
            state: "{\"best\":1.5}".into(),
            spec: InferenceSpec::default(),
        }
    }

    #[test]
    fn the_fingerprint_follows_what_changes_an_embedding_and_survives_a_round_trip() {
        let c = sample();
        let f = c.fingerprint();
        assert_eq!(f.len(), 16);
        let same = Checkpoint { optimizer: None, step: 7, state: String::new(), ..sample() };
        assert_eq!(same.fingerprint(), f, "optimizer, step and state do not embed");
        let mut param = sample();
        param.params[3] = f32::from_bits(param.params[3].to_bits() ^ 1);
        let config = Checkpoint { model: ModelConfig { lambda: 0.5, ..tiny() }, ..sample() };
        let words: Vec<String> = (0..11).map(|i| format!("w{i}")).collect();
        let vocab = Checkpoint { spec: InferenceSpec { vocab: Some(words), ..InferenceSpec::default() }, ..sample() };
        for (what, other) in [("a parameter's last bit", param), ("the config", config), ("the vocabulary", vocab)] {
            assert_ne!(other.fingerprint(), f, "{what}");
        }
        let path = std::env::temp_dir().join(format!("semshare-ckpt-fp-{}.safetensors", std::process::id()));
        c.save(&path).unwrap();
        assert_eq!(Checkpoint::load_for_inference(&path).unwrap().fingerprint(), f);
        assert_eq!(Checkpoint::load_for_inference(&path).unwrap().optimizer, None);
        std::fs::remove_file(&path).unwrap();
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
    fn the_inference_spec_round_trips_and_is_checked_against_the_model() {
        let dir = std::env::temp_dir().join(format!("semshare-ckpt-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.safetensors");
        let mut c = sample();
        let mut vocab: Vec<String> = RESERVED_TOKENS.iter().map(|s| s.to_string()).collect();
        vocab.extend((3..11).map(|i| format!("w{i}")));
        c.spec = InferenceSpec {
            vocab: Some(vocab),
            label_names: Some(vec!["sky".into(), "sea".into(), "dog".into()]),
            inputs: Some(InputSpec {
                region_dim: 6,
                region_dtype: FeatureDtype::F16,
                max_regions: 4,
                text_feature_dim: 0,
                text_dtype: None,
                max_tokens: 5,
            }),
            embedding: Some(EmbeddingKind::Label),
            normalization: Some(InputNorm {
                image: crate::model::FeatureNorm {
                    mean: vec![0.5, -1.0, 0.0, 2.0, 1e-7, 3.25],
                    inv_std: vec![1.0 / 3.0; 6],
                },
                text: None,
            }),
        };
        c.save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap().spec, c.spec);
        // A checkpoint of an older build has no spec: it loads, with every part None.
        c.spec = InferenceSpec::default();
        c.save(&path).unwrap();
        assert_eq!(Checkpoint::load(&path).unwrap().spec, InferenceSpec::default());
        // A spec that disagrees with the model is neither written nor read.
        c.spec.label_names = Some(vec!["sky".into()]);
        let e = c.save(&path).unwrap_err().to_string();
        assert!(e.contains("s.safetensors") && e.contains("`labels` has 1 names"), "{e}");
        let mut meta = std::collections::HashMap::from([("labels".to_string(), "[\"sky\"]".to_string())]);
        assert!(InferenceSpec::read(&meta, &c.model).unwrap_err().contains("`labels` has 1 names"));
        meta.insert("labels".into(), "[\"a\",\"b\",\"c\"]".into());
        meta.insert("embedding".into(), "mean".into());
        assert!(InferenceSpec::read(&meta, &c.model).unwrap_err().contains("unknown embedding `mean`"));
        meta.insert("embedding".into(), "label".into());
        meta.insert("normalization".into(), r#"{"image":{"mean":[0.0],"inv_std":[1.0]},"text":null}"#.into());
        let e = InferenceSpec::read(&meta, &c.model).unwrap_err();
        assert!(e.contains("`normalization`") && e.contains("1 means"), "{e}");
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
