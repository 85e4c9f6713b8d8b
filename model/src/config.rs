//! The model's architecture: a serde mirror of Hugging Face `config.json`, validated into the
//! runtime [`Config`] that every block is built from.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// `rope_scaling` as Llama 3.x writes it; other scaling types are refused at validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

/// Mirrors the fields of a Hugging Face Llama `config.json` that hat uses. Unknown fields are ignored
/// on read, so any Llama-family config loads; the manifest stores this struct as written here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    4096
}

/// Validated architecture, with derived sizes filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
}

impl HfConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| ModelError::InvalidConfig(format!("config.json: {e}")))
    }

    /// Checks that this is a Llama-family model hat can run and derives the runtime config.
    pub fn validate(&self) -> Result<Config> {
        let arch = self.architectures.first().cloned().or_else(|| self.model_type.clone());
        let is_llama = self.architectures.iter().any(|a| a == "LlamaForCausalLM")
            || (self.architectures.is_empty() && self.model_type.as_deref() == Some("llama"));
        if !is_llama {
            return Err(ModelError::UnsupportedArchitecture(arch.unwrap_or_else(|| "<none given>".into())));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(ModelError::InvalidConfig(format!("hidden_act `{act}` is not supported (only silu)")));
            }
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if self.num_attention_heads == 0 || num_kv_heads == 0 || !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(ModelError::InvalidConfig(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_attention_heads, num_kv_heads
            )));
        }
        let head_dim = self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads);
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(ModelError::InvalidConfig(format!("head_dim {head_dim} must be even and positive")));
        }
        if self.num_hidden_layers == 0 || self.hidden_size == 0 || self.vocab_size == 0 {
            return Err(ModelError::InvalidConfig("hidden_size, num_hidden_layers and vocab_size must be positive".into()));
        }
        if let Some(s) = &self.rope_scaling {
            if s.rope_type != "llama3" && s.rope_type != "default" {
                return Err(ModelError::InvalidConfig(format!("rope_scaling type `{}` is not supported (supported: llama3)", s.rope_type)));
            }
        }
        Ok(Config {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: self.rope_scaling.clone().filter(|s| s.rope_type != "default"),
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            attention_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
        })
    }
}
