//! Hugging Face hub models through `hf-hub`: files come from the local cache (`HF_HOME`) when present,
//! are downloaded otherwise, and `HF_HUB_OFFLINE` forbids the download.

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

use crate::error::{Result, SplitError};
use crate::hf_dir::SAFETENSORS_INDEX;

const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 2] = ["tokenizer_config.json", "generation_config.json"];

pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")).unwrap_or(false)
}

/// Makes every file of `model_id` that hat needs present in one snapshot directory and returns it.
pub fn fetch(model_id: &str, progress: bool) -> Result<PathBuf> {
    let cache = Cache::from_env();
    if offline() {
        return from_cache(&cache, model_id);
    }
    let api = ApiBuilder::from_env().with_progress(progress).build().map_err(|e| hub_error(model_id, "<api>", e))?;
    let repo = api.repo(Repo::model(model_id.to_string()));
    let get = |file: &str| repo.get(file).map_err(|e| hub_error(model_id, file, e));

    let config = get(REQUIRED[0])?;
    get(REQUIRED[1])?;
    for file in OPTIONAL {
        // Optional files are often absent; their absence only loses a chat template or an EOS id.
        let _ = repo.get(file);
    }
    match repo.get(SAFETENSORS_INDEX) {
        Ok(index) => {
            for shard in index_shards(&index)? {
                get(&shard)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    Ok(config.parent().map(PathBuf::from).unwrap_or_default())
}

fn from_cache(cache: &Cache, model_id: &str) -> Result<PathBuf> {
    let repo = cache.model(model_id.to_string());
    let not_cached = || SplitError::HubOffline { model: model_id.to_string(), cache: cache.path().clone() };
    let config = repo.get(REQUIRED[0]).ok_or_else(not_cached)?;
    repo.get(REQUIRED[1]).ok_or_else(not_cached)?;
    if let Some(index) = repo.get(SAFETENSORS_INDEX) {
        for shard in index_shards(&index)? {
            repo.get(&shard).ok_or_else(not_cached)?;
        }
    } else {
        repo.get("model.safetensors").ok_or_else(not_cached)?;
    }
    Ok(config.parent().map(PathBuf::from).unwrap_or_default())
}

fn index_shards(index: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| SplitError::io(format!("cannot read {}", index.display()), e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| SplitError::Corrupt {
        path: index.to_path_buf(),
        kind: "safetensors index",
        reason: e.to_string(),
    })?;
    let mut shards: Vec<String> = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .map(|m| m.values().filter_map(|f| f.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    shards.sort();
    shards.dedup();
    Ok(shards)
}

fn hub_error(model: &str, file: &str, e: impl std::fmt::Display) -> SplitError {
    SplitError::Hub { model: model.to_string(), file: file.to_string(), reason: e.to_string() }
}
