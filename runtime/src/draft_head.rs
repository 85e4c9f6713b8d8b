//! The feature-conditioned draft head (after EAGLE-3), hat's default draft model. Every verification
//! round hands the device, for each verified position, the input submodel's output (low), the
//! middle's output (high) and the output submodel's final state (top). The head fuses them, adds the
//! embedding of the next token, runs one decoder layer and reads a draft LM head restricted to the
//! most frequent tokens. Later drafts feed the head's own output back in place of the fused feature.
//! A draft step runs no output layers and no full-vocabulary head, and nothing new leaves the device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{linear_no_bias, Linear, VarBuilder};
use hat_model::layer::Norm;
use hat_model::weights::QuantMap;
use hat_model::{Config, KvCache, Proj, Submodel, SubmodelKind, Weights};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RuntimeError};
use crate::package::DevicePackage;

/// The trained head in a device package (`hat train-adapter --draft-head feature`, or shipped).
pub const DRAFT_HEAD_FILE: &str = "draft-head.safetensors";
/// Key of the head's description in the safetensors header.
pub const HEAD_META_KEY: &str = "hat-draft-head";
pub const HEAD_FORMAT_VERSION: u32 = 1;
/// Tokens in the draft vocabulary unless training says otherwise.
pub const DEFAULT_DRAFT_VOCAB: usize = 8192;
/// Name of the draft vocabulary tensor (full-vocabulary ids, most frequent first).
pub const VOCAB_TENSOR: &str = "vocab";

/// What a head file says about itself: the split it was made for and how it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadMeta {
    pub version: u32,
    /// Fingerprint of the split package the head was trained on.
    pub fingerprint: String,
    /// Input / middle / output layers, e.g. "2/26/2".
    pub split: String,
    pub source: String,
    /// Default confidence threshold: drafting stops when the head's top-1 probability falls below it.
    pub threshold: f32,
    /// How the head was made (the command line), for the record.
    #[serde(default)]
    pub made_by: String,
}

/// `input/middle/output` layer counts of a package.
pub fn split_label(package: &DevicePackage) -> String {
    split_of(&package.manifest)
}

fn split_of(manifest: &hat_model::Manifest) -> String {
    let s = &manifest.split;
    format!("{}/{}/{}", s.input_layers, s.num_layers - s.input_layers - s.output_layers, s.output_layers)
}

/// Draft heads the project trained and ships inside the binary, so a fresh `hat split` of the same
/// model and split drafts well at once: (name, head file).
pub const SHIPPED_HEADS: &[(&str, &[u8])] =
    &[("SmolLM2-135M-Instruct Q4_1 GGUF, split 2/26/2", include_bytes!("../heads/smollm2-135m-instruct-2-2.safetensors"))];

/// The shipped head made for this package's weights and split (whatever their storage), if any.
pub fn shipped_head(manifest: &hat_model::Manifest) -> Option<(&'static str, &'static [u8])> {
    let split = split_of(manifest);
    SHIPPED_HEADS.iter().copied().find(|(name, bytes)| {
        read_head_meta(bytes, Path::new(name)).is_ok_and(|m| m.fingerprint == manifest.weights_fingerprint() && m.split == split)
    })
}

/// Writes the shipped head that fits the device package in `dir` as its draft head (through a
/// rename); returns its name, or `None` when no shipped head was made for this model and split.
pub fn install_shipped_head(dir: &Path) -> Result<Option<&'static str>> {
    let manifest = hat_model::Manifest::read(dir)?;
    let Some((name, bytes)) = shipped_head(&manifest) else { return Ok(None) };
    let path = dir.join(DRAFT_HEAD_FILE);
    let tmp = path.with_extension("partial");
    let io = |e: std::io::Error| RuntimeError::Io { context: format!("cannot write {}", path.display()), source: e };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    Ok(Some(name))
}

impl HeadMeta {
    /// Refuses a head made for another model or split, naming both.
    pub fn check(&self, path: &Path, package: &DevicePackage) -> Result<()> {
        let split = split_label(package);
        if self.fingerprint != package.manifest.weights_fingerprint() || self.split != split {
            return Err(RuntimeError::Adapter(format!(
                "{} was made for model {} split {} (fingerprint {}), but this package is {} split {} (fingerprint {}); \
                 train one with `hat train-adapter --draft-head feature`",
                path.display(),
                self.source,
                self.split,
                short(&self.fingerprint),
                package.manifest.source,
                split,
                short(package.manifest.weights_fingerprint())
            )));
        }
        Ok(())
    }
}

/// A dense (out, in) matrix as a q8_0 projection (in hat's q8_0 kernel where it runs, else with its
/// rows padded for candle's tiled kernel, see `Proj::quantized`).
fn q8_0(w: &Tensor) -> Result<Proj> {
    let q = Arc::new(QTensor::quantize(&w.to_dtype(DType::F32)?, GgmlDType::Q8_0)?);
    Ok(Proj::quantized(q, None, true)?)
}

fn short(fp: &str) -> &str {
    &fp[..fp.len().min(12)]
}

/// Reads the description from a head file's header without loading the tensors.
pub fn read_head_meta(bytes: &[u8], path: &Path) -> Result<HeadMeta> {
    let bad = |why: String| RuntimeError::Adapter(format!("{} is not a hat draft head: {why}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let text = meta.metadata().as_ref().and_then(|m| m.get(HEAD_META_KEY)).ok_or_else(|| bad(format!("no `{HEAD_META_KEY}` entry")))?;
    let meta: HeadMeta = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    if meta.version != HEAD_FORMAT_VERSION {
        return Err(bad(format!("format version {} (this hat reads {HEAD_FORMAT_VERSION})", meta.version)));
    }
    Ok(meta)
}

/// A head file's contents (`bytes`, read from `path`), refused when it was made for another model or
/// split than `package`: its description, its weights (every tensor but the vocabulary) and its draft
/// vocabulary.
pub fn read_head(
    bytes: &[u8],
    path: &Path,
    package: &DevicePackage,
    device: &Device,
) -> Result<(HeadMeta, HashMap<String, Tensor>, Vec<u32>)> {
    let meta = read_head_meta(bytes, path)?;
    meta.check(path, package)?;
    let bad = |why: String| RuntimeError::Adapter(format!("{}: {why}", path.display()));
    let mut tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| bad(e.to_string()))?;
    let vocab = tensors.remove(VOCAB_TENSOR).ok_or_else(|| bad(format!("no `{VOCAB_TENSOR}` tensor")))?;
    let vocab = vocab.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    Ok((meta, tensors, vocab))
}

/// Writes head tensors with their description, through a temporary file and a rename.
pub fn save_head(tensors: &HashMap<String, Tensor>, meta: &HeadMeta, path: &Path) -> Result<()> {
    let json = serde_json::to_string(meta).map_err(|e| RuntimeError::Adapter(e.to_string()))?;
    let info: HashMap<String, String> = [(HEAD_META_KEY.to_string(), json)].into();
    let tmp = path.with_extension("partial");
    let io = |e: std::io::Error| RuntimeError::Io { context: format!("cannot write {}", tmp.display()), source: e };
    let data: Vec<(String, Tensor)> = tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let views: Vec<(&str, &Tensor)> = data.iter().map(|(k, v)| (k.as_str(), v)).collect();
    safetensors::tensor::serialize_to_file(views, Some(info), &tmp)
        .map_err(|e| RuntimeError::Adapter(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The head's own layers, under the tensor names of its file: what inference ([`FeatureHead`]) and
/// training (`hat_adapter_trainer::feature::TrainableHead`) both load.
#[derive(Debug, Clone)]
pub struct HeadParts {
    pub low_norm: Norm,
    pub high_norm: Norm,
    pub top_norm: Norm,
    /// [low; high; top] (3d) -> d.
    pub fuse: Linear,
    /// [fused; next token's embedding] (2d) -> d.
    pub combine: Linear,
    /// The head's decoder layers (`model.layers.0.*` to `model.layers.{n-1}.*`; one unless trained
    /// with `--head-layers`).
    pub layer: Submodel,
    pub norm: Norm,
}

/// How many decoder layers a head's tensors hold: one more than the highest `model.layers.{i}` (0
/// when none).
pub fn head_layer_count<'a>(names: impl IntoIterator<Item = &'a String>) -> usize {
    names.into_iter().filter_map(|n| hat_model::names::layer_index(n)).map(|i| i + 1).max().unwrap_or(0)
}

impl HeadParts {
    /// Loads a head of `layers` decoder layers.
    pub fn load(vb: &VarBuilder, cfg: &Config, layers: usize) -> hat_model::Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            low_norm: Norm::load(d, eps, vb.pp("low_norm"))?,
            high_norm: Norm::load(d, eps, vb.pp("high_norm"))?,
            top_norm: Norm::load(d, eps, vb.pp("top_norm"))?,
            fuse: linear_no_bias(3 * d, d, vb.pp("fuse"))?,
            combine: linear_no_bias(2 * d, d, vb.pp("combine"))?,
            layer: Submodel::load(vb.clone(), &cfg.for_draft(), SubmodelKind::Middle, 0..layers)?,
            norm: Norm::load(d, eps, vb.pp("norm"))?,
        })
    }
}

/// The draft head's weights, ready for inference.
#[derive(Debug, Clone)]
pub struct FeatureHead {
    parts: HeadParts,
    /// Full-vocabulary ids of the draft vocabulary.
    vocab: Vec<u32>,
    /// `parts.fuse` and `parts.combine` as inference runs them (see [`FeatureHead::from_tensors`]).
    fuse: Proj,
    combine: Proj,
    /// The model's LM head rows of the draft vocabulary, as a (draft_vocab, hidden) projection.
    head_rows: Proj,
    /// # Shapes
    /// (vocab, hidden)
    embedding: Tensor,
    pub(crate) full_vocab: usize,
    pub meta: HeadMeta,
    pub path: PathBuf,
}

impl FeatureHead {
    /// The package's head file, if it has one: `Ok(None)` when absent, an error when it was made for
    /// another model or split or is damaged.
    pub fn load_from_package(package: &DevicePackage, device: &Device) -> Result<Option<Self>> {
        let path = package.dir.join(DRAFT_HEAD_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        Self::load(&path, package, device).map(Some)
    }

    pub fn load(path: &Path, package: &DevicePackage, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::Io { context: format!("cannot read {}", path.display()), source: e })?;
        let (meta, tensors, vocab) = read_head(&bytes, path, package, device)?;
        Self::from_tensors(tensors, vocab, meta, path.to_path_buf(), package, device)
    }

    /// Builds a head from its tensors (every name but `vocab`) and the draft vocabulary.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        vocab: Vec<u32>,
        meta: HeadMeta,
        path: PathBuf,
        package: &DevicePackage,
        device: &Device,
    ) -> Result<Self> {
        let cfg = &package.config;
        let bad = |why: String| RuntimeError::Adapter(format!("{}: {why}", path.display()));
        if vocab.is_empty() || vocab.iter().any(|&t| t as usize >= cfg.vocab_size) {
            return Err(bad(format!("the draft vocabulary must hold 1 to {} ids below {}", cfg.vocab_size, cfg.vocab_size)));
        }
        let layers = head_layer_count(tensors.keys());
        if layers == 0 {
            return Err(bad("it holds no decoder layer".into()));
        }
        let dtype = package.input.dtype();
        let ids = Tensor::new(vocab.as_slice(), device)?;
        let rows = package.output.lm_head_weight()?.to_device(device)?.index_select(&ids, 0)?.contiguous()?;
        let embedding = package.input.embedding_weight()?.to_device(device)?;
        // On a device package in q8_0, the head's matrices run in q8_0 too: a draft step reads
        // about 4x fewer bytes (the head layer and the draft LM head are some 35 MB in f32, and a
        // one-row step is bound by reading them). Drafts are only proposals, so this changes no
        // output token, only which drafts are offered.
        let quantize = device.is_cpu() && package.output.quant_types().iter().any(|(t, _)| *t == "q8_0");
        let (parts, fuse, combine, head_rows) = if quantize {
            let mut quant = QuantMap::new();
            for (name, t) in &tensors {
                if name.starts_with("model.layers.") && t.rank() == 2 {
                    quant.insert(name.clone(), Arc::new(QTensor::quantize(&t.to_dtype(DType::F32)?, GgmlDType::Q8_0)?));
                }
            }
            let vb = VarBuilder::from_tensors(tensors, dtype, device);
            let mut parts = HeadParts::load(&vb, cfg, layers).map_err(|e| bad(e.to_string()))?;
            parts.layer = Submodel::load_weights(&Weights::mixed(vb, quant), &cfg.for_draft(), SubmodelKind::Middle, 0..layers)
                .map_err(|e| bad(e.to_string()))?;
            let (fuse, combine) = (q8_0(parts.fuse.weight())?, q8_0(parts.combine.weight())?);
            (parts, fuse, combine, q8_0(&rows)?)
        } else {
            let vb = VarBuilder::from_tensors(tensors, dtype, device);
            let parts = HeadParts::load(&vb, cfg, layers).map_err(|e| bad(e.to_string()))?;
            let (fuse, combine) = (Proj::Dense(parts.fuse.clone()), Proj::Dense(parts.combine.clone()));
            (parts, fuse, combine, Proj::Dense(Linear::new(rows, None)))
        };
        Ok(Self { parts, fuse, combine, vocab, head_rows, embedding, full_vocab: cfg.vocab_size, meta, path })
    }

    pub fn vocab(&self) -> &[u32] {
        &self.vocab
    }

    pub fn config(&self) -> &Config {
        self.parts.layer.config()
    }

    pub fn new_cache(&self) -> KvCache {
        self.parts.layer.new_cache()
    }

    /// Fuses the three verified features of each position.
    ///
    /// # Shapes
    /// low, high, top: (1, seq, hidden) -> (1, seq, hidden)
    pub fn fuse(&self, low: &Tensor, high: &Tensor, top: &Tensor) -> Result<Tensor> {
        let x = Tensor::cat(
            &[self.parts.low_norm.forward(low)?, self.parts.high_norm.forward(high)?, self.parts.top_norm.forward(top)?],
            D::Minus1,
        )?;
        Ok(self.fuse.forward(&x)?)
    }

    /// Runs the head at positions `pos..` of its cache: `g` is the fused feature (or the head's own
    /// previous output) of each position, `next` the token that follows it.
    ///
    /// # Shapes
    /// g: (1, seq, hidden) -> (1, seq, hidden)
    pub fn step(&self, g: &Tensor, next: &[u32], pos: usize, cache: &mut KvCache) -> Result<Tensor> {
        let ids = Tensor::new(next, g.device())?;
        let e = self.embedding.index_select(&ids, 0)?.unsqueeze(0)?;
        let x = self.combine.forward(&Tensor::cat(&[g, &e], D::Minus1)?)?;
        Ok(self.parts.layer.forward_layers(&x, pos, cache)?)
    }

    /// Draft-vocabulary logits of one position.
    ///
    /// # Shapes
    /// h: (1, 1, hidden) -> (draft_vocab,)
    pub fn logits(&self, h: &Tensor) -> Result<Vec<f32>> {
        let n = self.parts.norm.forward(h)?;
        Ok(self.head_rows.forward(&n)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }

    /// Full-vocabulary logits with every id outside the draft vocabulary at -inf (sampling: the
    /// rejection rule needs q over the whole vocabulary).
    pub fn full_logits(&self, draft: &[f32]) -> Vec<f32> {
        let mut full = vec![f32::NEG_INFINITY; self.full_vocab];
        for (&id, &l) in self.vocab.iter().zip(draft) {
            full[id as usize] = l;
        }
        full
    }
}

// The drafter that runs this head lives in `feature_drafter`; its items keep their paths here.
pub use crate::feature_drafter::{
    lookup, second, top1, FeatureDrafter, Overlap, Speculation, DEFAULT_LEAF_THRESHOLD, DEFAULT_LEAVES, FALLBACK_THRESHOLD, LOOKUP_MAX_N,
    LOOKUP_MIN_N, PROMPT_WINDOW,
};
