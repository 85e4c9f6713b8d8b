//! Decides what `--model` names and loads it into one in-memory form: Hugging Face tensor names, the
//! LM head materialised, a tokenizer and its special tokens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use hat_model::manifest::TokenizerInfo;
use hat_model::{names, Config, HfConfig};

use crate::error::{Result, SplitError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// `org/name` on the Hugging Face hub (or its local cache).
    Hub(String),
    /// A directory with config.json, tokenizer.json and safetensors.
    Dir(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
}

impl ModelSource {
    /// A path that exists wins; otherwise `org/name` is a hub id; anything else is a missing path.
    pub fn parse(arg: &str) -> Result<Self> {
        let path = Path::new(arg);
        if path.is_dir() {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        if path.is_file() {
            return Ok(ModelSource::Gguf(path.to_path_buf()));
        }
        if looks_like_hub_id(arg) {
            return Ok(ModelSource::Hub(arg.to_string()));
        }
        Err(SplitError::MissingPath(path.to_path_buf()))
    }
}

fn looks_like_hub_id(arg: &str) -> bool {
    let parts: Vec<&str> = arg.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        && !arg.ends_with(".gguf")
}

/// A model ready to cut. Tensors keep their source dtype; conversion happens when shards are written.
#[derive(Debug)]
pub struct LoadedModel {
    pub source: String,
    pub hf_config: HfConfig,
    pub config: Config,
    pub tensors: HashMap<String, Tensor>,
    /// A GGUF source's matrices in their own block types (Q/K rows already in hat's rope layout), for
    /// `--device-quant keep` / `--cloud-quant keep`; `None` for other sources.
    pub quantized: Option<HashMap<String, std::sync::Arc<candle_core::quantized::QTensor>>>,
    pub tokenizer_json: String,
    pub tokenizer: TokenizerInfo,
}

pub fn load_model(source: &ModelSource, progress: bool) -> Result<LoadedModel> {
    match source {
        ModelSource::Hub(id) => {
            let dir = crate::hub::fetch(id, progress)?;
            crate::hf_dir::load(&dir, id)
        }
        ModelSource::Dir(dir) => crate::hf_dir::load(dir, &dir.display().to_string()),
        ModelSource::Gguf(path) => crate::gguf::load(path, progress),
    }
}

/// Makes the tensor set complete and uniform: a tied LM head becomes a real `lm_head.weight`, tensors
/// hat does not use are dropped, and every tensor the architecture needs is checked for presence and
/// shape, naming the tensor and the source when one is wrong.
pub fn normalise_tensors(tensors: &mut HashMap<String, Tensor>, cfg: &Config, source: &str) -> Result<()> {
    if !tensors.contains_key(names::LM_HEAD) {
        let embed = tensors.get(names::EMBED_TOKENS).cloned().ok_or_else(|| missing(names::EMBED_TOKENS, source))?;
        tensors.insert(names::LM_HEAD.to_string(), embed);
    }
    tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
    let h = cfg.hidden_size;
    let mut expected: Vec<(String, Vec<usize>)> = vec![
        (names::EMBED_TOKENS.into(), vec![cfg.vocab_size, h]),
        (names::FINAL_NORM.into(), vec![h]),
        (names::LM_HEAD.into(), vec![cfg.vocab_size, h]),
    ];
    let layer = names::layer_tensors(cfg);
    for l in 0..cfg.num_layers {
        expected.extend(layer.iter().map(|(suffix, shape)| (format!("{}.{l}.{suffix}", names::LAYERS_PREFIX), shape.clone())));
    }
    for (name, shape) in &expected {
        let t = tensors.get(name).ok_or_else(|| missing(name, source))?;
        if t.dims() != shape.as_slice() {
            return Err(
                hat_model::ModelError::ShapeMismatch { name: name.clone(), actual: t.dims().to_vec(), expected: shape.clone() }.into()
            );
        }
    }
    if tensors.len() != expected.len() {
        let known: std::collections::HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
        let mut extra: Vec<&String> = tensors.keys().filter(|n| !known.contains(n.as_str())).collect();
        extra.sort();
        return Err(SplitError::BadInput(format!(
            "{source} has tensors a {} model of this config does not use: {}",
            cfg.family.name(),
            extra.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(())
}

fn missing(name: &str, source: &str) -> SplitError {
    hat_model::ModelError::MissingTensor { name: name.to_string(), source_desc: source.to_string() }.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_paths() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_hub_id("./missing"));
        assert!(!looks_like_hub_id("/abs/path"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("dir/model.gguf"));
        assert!(matches!(ModelSource::parse("/definitely/not/here"), Err(SplitError::MissingPath(_))));
    }
}
