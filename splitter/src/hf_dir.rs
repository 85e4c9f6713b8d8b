//! A Hugging Face model directory: `config.json`, `tokenizer.json`, optional `tokenizer_config.json`
//! and `generation_config.json`, and weights as one `*.safetensors` file or shards with an index.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use hat_model::manifest::{SpecialToken, TokenizerInfo};
use hat_model::HfConfig;
use serde_json::Value;

use crate::error::{Result, SplitError};
use crate::source::{normalise_tensors, LoadedModel};

pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

pub fn load(dir: &Path, source: &str) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let config_text = read_text(&config_path)?;
    let hf_config = HfConfig::from_json(&config_text).map_err(|e| SplitError::Corrupt {
        path: config_path.clone(),
        kind: "config.json",
        reason: e.to_string(),
    })?;
    let config = hf_config.validate()?;

    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer_json = read_text(&tokenizer_path)?;
    let tokenizer = tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes()).map_err(|e| SplitError::Corrupt {
        path: tokenizer_path.clone(),
        kind: "tokenizer.json",
        reason: e.to_string(),
    })?;
    let info = tokenizer_info(dir, &tokenizer)?;

    let mut tensors = HashMap::new();
    for file in weight_files(dir)? {
        tensors.extend(read_safetensors(&file)?);
    }
    normalise_tensors(&mut tensors, &config, source)?;
    Ok(LoadedModel { source: source.to_string(), hf_config, config, tensors, quantized: None, tokenizer_json, tokenizer: info })
}

/// The safetensors files to read: the index's shards, or every `*.safetensors` in the directory.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(SAFETENSORS_INDEX);
    if index.exists() {
        let v: Value = serde_json::from_str(&read_text(&index)?).map_err(|e| SplitError::Corrupt {
            path: index.clone(),
            kind: "safetensors index",
            reason: e.to_string(),
        })?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| SplitError::Corrupt {
            path: index.clone(),
            kind: "safetensors index",
            reason: "no `weight_map` object".into(),
        })?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        return files
            .into_iter()
            .map(|f| {
                let p = dir.join(f);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(SplitError::MissingPath(p))
                }
            })
            .collect();
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| SplitError::io(format!("cannot list {}", dir.display()), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(SplitError::BadInput(format!("{} has no *.safetensors weights", dir.display())));
    }
    Ok(files)
}

/// Reads one safetensors file, validating its header and data layout before any tensor is built.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).map_err(|e| SplitError::io(format!("cannot read {}", path.display()), e))?;
    safetensors::SafeTensors::deserialize(&bytes).map_err(|e| SplitError::Corrupt {
        path: path.to_path_buf(),
        kind: "safetensors",
        reason: format!("{e} (truncated or corrupt?)"),
    })?;
    candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| SplitError::Corrupt {
        path: path.to_path_buf(),
        kind: "safetensors",
        reason: e.to_string(),
    })
}

fn read_text(path: &Path) -> Result<String> {
    if !path.exists() {
        return Err(SplitError::MissingPath(path.to_path_buf()));
    }
    std::fs::read_to_string(path).map_err(|e| SplitError::io(format!("cannot read {}", path.display()), e))
}

/// Chat template and special tokens from `tokenizer_config.json` and `generation_config.json`.
fn tokenizer_info(dir: &Path, tokenizer: &tokenizers::Tokenizer) -> Result<TokenizerInfo> {
    let read_json = |name: &str| -> Result<Option<Value>> {
        let p = dir.join(name);
        if !p.exists() {
            return Ok(None);
        }
        serde_json::from_str(&read_text(&p)?).map(Some).map_err(|e| SplitError::Corrupt { path: p, kind: "JSON", reason: e.to_string() })
    };
    let tok_cfg = read_json("tokenizer_config.json")?.unwrap_or(Value::Null);
    let gen_cfg = read_json("generation_config.json")?.unwrap_or(Value::Null);

    let special = |content: &str| tokenizer.token_to_id(content).map(|id| SpecialToken { id, content: content.to_string() });
    let by_id = |id: u32| tokenizer.id_to_token(id).map(|content| SpecialToken { id, content });
    let token_field = |key: &str| -> Option<SpecialToken> {
        match tok_cfg.get(key)? {
            Value::String(s) => special(s),
            Value::Object(o) => o.get("content").and_then(Value::as_str).and_then(special),
            _ => None,
        }
    };

    let chat_template = match tok_cfg.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(str::to_string),
        _ => None,
    };
    let mut eos_tokens: Vec<SpecialToken> = token_field("eos_token").into_iter().collect();
    let gen_eos: Vec<u32> = match gen_cfg.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
        _ => vec![],
    };
    for id in gen_eos {
        if !eos_tokens.iter().any(|t| t.id == id) {
            eos_tokens.extend(by_id(id));
        }
    }
    Ok(TokenizerInfo {
        file: "tokenizer.json".into(),
        chat_template,
        bos_token: token_field("bos_token"),
        eos_tokens,
        pad_token: token_field("pad_token"),
    })
}
