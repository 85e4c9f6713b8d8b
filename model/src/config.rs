//! The model's architecture: a serde mirror of Hugging Face `config.json`, validated into the
//! runtime [`Config`] that every block is built from.
//!
//! One decoder block serves every family; a family is only a mapping from its config to the block's
//! options (QKV bias, per-head Q/K norm, Gemma's sandwich norms and `(1 + w)` norm weights, the
//! embedding scale, the MLP's activation, sliding-window layers with their own rope base, final-logit
//! soft-capping). Adding a family is a `match` arm here plus its tests.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// `rope_scaling` as Llama 3.x (`llama3`) and Gemma 3 (`linear`) write it; other types are refused
/// at validation.
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    // Fields of the families beyond Llama. Absent fields are not written back, so a Llama package's
    // manifest, and with it its fingerprint, is what it was before these existed.
    /// Gemma's name for `hidden_act`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Attention span of the sliding-window layers (Mistral: every layer; Gemma 3: the local ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2/Qwen3: whether `sliding_window` is used at all (their configs carry a window they do
    /// not use).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen2/Qwen3: layers from this index on use the window, when it is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Gemma 3: every n-th layer is global, the rest slide (older configs; newer ones list `layer_types`).
    #[serde(default, alias = "_sliding_window_pattern", skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// Per layer: `full_attention` or `sliding_attention`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3: the rope base of the sliding-window layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma: attention scores are scaled by `query_pre_attn_scalar^-0.5` instead of `head_dim^-0.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 2's; refused when set (Gemma 3 has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
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

/// The model families hat runs, by `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
}

/// What `hat split` accepts, for refusals.
pub const SUPPORTED_MODEL_TYPES: &str = "llama, mistral, qwen2, qwen3, gemma3, gemma3_text";

impl Family {
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Some(match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3" | "gemma3_text" => Family::Gemma3,
            _ => return None,
        })
    }

    fn from_architecture(arch: &str) -> Option<Self> {
        Some(match arch {
            "LlamaForCausalLM" => Family::Llama,
            "MistralForCausalLM" => Family::Mistral,
            "Qwen2ForCausalLM" => Family::Qwen2,
            "Qwen3ForCausalLM" => Family::Qwen3,
            "Gemma3ForCausalLM" => Family::Gemma3,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3",
        }
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// Validated architecture, with derived sizes filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub family: Family,
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
    pub activation: Activation,
    /// RMSNorm over each head's queries and keys before rope (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Added to every RMSNorm weight at load: Gemma's norms multiply by `1 + w`.
    pub norm_weight_offset: f64,
    /// Gemma's four norms per block: the attention and MLP outputs are normalised before the residual.
    pub sandwich_norms: bool,
    /// The embedding is multiplied by this (Gemma: sqrt(hidden_size)).
    pub embed_scale: Option<f64>,
    /// Attention scores are multiplied by this.
    pub attn_scale: f64,
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends only within `sliding_window`.
    pub sliding_layers: Vec<bool>,
    /// Rope base of the sliding layers, where it differs from `rope_theta`.
    pub rope_local_theta: Option<f64>,
    pub final_logit_softcap: Option<f64>,
}

impl Config {
    /// The config a draft model's own layers (the draft head's, the adapter's) are built with:
    /// they attend to their whole context with the global rope. Their layer 0 is not the model's
    /// layer 0, so the model's pattern of sliding layers does not apply to them.
    pub fn for_draft(&self) -> Config {
        Config { sliding_layers: vec![false; self.num_layers], sliding_window: None, ..self.clone() }
    }

    /// The attention span of layer `i`: `Some(window)` on a sliding-window layer.
    pub fn window(&self, layer: usize) -> Option<usize> {
        match self.sliding_layers.get(layer) {
            Some(true) => self.sliding_window,
            _ => None,
        }
    }
}

impl HfConfig {
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| ModelError::InvalidConfig(format!("config.json: {e}")))
    }

    /// Checks that this is a model family hat can run and derives the runtime config.
    pub fn validate(&self) -> Result<Config> {
        let family = match self.model_type.as_deref() {
            Some(t) => Family::from_model_type(t).ok_or_else(|| ModelError::UnsupportedArchitecture(t.to_string()))?,
            None => match self.architectures.first() {
                Some(a) => Family::from_architecture(a).ok_or_else(|| ModelError::UnsupportedArchitecture(a.clone()))?,
                None => return Err(ModelError::UnsupportedArchitecture("<no model_type or architectures given>".into())),
            },
        };
        let gemma = family == Family::Gemma3;
        let act_name = self.hidden_activation.as_deref().or(self.hidden_act.as_deref());
        let activation = match act_name {
            None if gemma => Activation::GeluTanh,
            None | Some("silu") | Some("swish") => Activation::Silu,
            Some("gelu_pytorch_tanh") | Some("gelu_tanh") => Activation::GeluTanh,
            Some(other) => {
                return Err(ModelError::InvalidConfig(format!(
                    "hidden activation `{other}` is not supported (supported: silu, gelu_pytorch_tanh)"
                )))
            }
        };
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        if self.num_attention_heads == 0 || num_kv_heads == 0 || !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(ModelError::InvalidConfig(format!(
                "num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                self.num_attention_heads, num_kv_heads
            )));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(ModelError::InvalidConfig(format!(
                "hidden_size {} is not a multiple of num_attention_heads {} and no head_dim is given",
                self.hidden_size, self.num_attention_heads
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
            if !matches!(s.rope_type.as_str(), "llama3" | "linear" | "default") {
                return Err(ModelError::InvalidConfig(format!(
                    "rope_scaling type `{}` is not supported (supported: llama3, linear)",
                    s.rope_type
                )));
            }
            if s.rope_type == "linear" && s.factor.is_none_or(|f| f <= 0.0) {
                return Err(ModelError::InvalidConfig("linear rope_scaling needs a positive factor".into()));
            }
        }
        if let Some(cap) = self.attn_logit_softcapping {
            return Err(ModelError::InvalidConfig(format!(
                "attn_logit_softcapping ({cap}) is not supported (a Gemma 2 feature; Gemma 3 has none)"
            )));
        }
        let sliding_layers = self.sliding_layers(family)?;
        if sliding_layers.iter().any(|&s| s) && self.sliding_window.is_none_or(|w| w == 0) {
            return Err(ModelError::InvalidConfig("sliding-window layers need a positive sliding_window".into()));
        }
        Ok(Config {
            family,
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
            // Qwen2's attention always has Q/K/V biases; its config does not say so.
            attention_bias: self.attention_bias || family == Family::Qwen2,
            mlp_bias: self.mlp_bias,
            activation,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            norm_weight_offset: if gemma { 1.0 } else { 0.0 },
            sandwich_norms: gemma,
            embed_scale: gemma.then(|| (self.hidden_size as f64).sqrt()),
            attn_scale: 1.0 / self.query_pre_attn_scalar.filter(|_| gemma).unwrap_or(head_dim as f64).sqrt(),
            sliding_window: self.sliding_window.filter(|_| sliding_layers.iter().any(|&s| s)),
            sliding_layers,
            rope_local_theta: if gemma { Some(self.rope_local_base_freq.unwrap_or(10_000.0)) } else { None },
            final_logit_softcap: self.final_logit_softcapping,
        })
    }

    /// Which layers slide: `layer_types` where given, else the family's rule.
    fn sliding_layers(&self, family: Family) -> Result<Vec<bool>> {
        let n = self.num_hidden_layers;
        if let Some(types) = &self.layer_types {
            if types.len() != n {
                return Err(ModelError::InvalidConfig(format!("layer_types lists {} layers for {n}", types.len())));
            }
            return types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(false),
                    "sliding_attention" => Ok(true),
                    other => Err(ModelError::InvalidConfig(format!("layer type `{other}` is not supported"))),
                })
                .collect();
        }
        Ok(match family {
            Family::Llama => vec![false; n],
            Family::Mistral => vec![self.sliding_window.is_some(); n],
            Family::Qwen2 | Family::Qwen3 => {
                let from = self.max_window_layers.unwrap_or(0);
                (0..n).map(|i| self.use_sliding_window == Some(true) && self.sliding_window.is_some() && i >= from).collect()
            }
            Family::Gemma3 => {
                let pattern = self.sliding_window_pattern.unwrap_or(6).max(1);
                (0..n).map(|i| self.sliding_window.is_some() && (i + 1) % pattern != 0).collect()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<Config> {
        HfConfig::from_json(json)?.validate()
    }

    const BASE: &str =
        r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 12, "num_attention_heads": 4, "vocab_size": 100"#;

    #[test]
    fn gemma3_slides_on_five_layers_of_six_and_drafts_globally() -> Result<()> {
        let c = config(&format!(r#"{{"model_type": "gemma3_text", {BASE}, "sliding_window": 512, "sliding_window_pattern": 6}}"#))?;
        let global: Vec<usize> = (0..12).filter(|&i| c.window(i).is_none()).collect();
        assert_eq!(global, vec![5, 11]);
        assert_eq!(c.window(0), Some(512));
        assert_eq!((c.rope_local_theta, c.norm_weight_offset, c.activation), (Some(10_000.0), 1.0, Activation::GeluTanh));
        assert_eq!(c.embed_scale, Some(8.0));
        let d = c.for_draft();
        assert!((0..12).all(|i| d.window(i).is_none()), "draft layers attend globally");
        Ok(())
    }

    #[test]
    fn qwen2_has_biases_and_an_unused_window() -> Result<()> {
        let c = config(&format!(r#"{{"model_type": "qwen2", {BASE}, "sliding_window": 4096, "use_sliding_window": false}}"#))?;
        assert!(c.attention_bias && !c.qk_norm);
        assert!((0..12).all(|i| c.window(i).is_none()));
        let c = config(&format!(
            r#"{{"model_type": "qwen2", {BASE}, "sliding_window": 64, "use_sliding_window": true, "max_window_layers": 8}}"#
        ))?;
        assert_eq!((0..12).filter(|&i| c.window(i).is_some()).collect::<Vec<_>>(), vec![8, 9, 10, 11]);
        Ok(())
    }

    #[test]
    fn a_llama_config_serialises_as_before() -> Result<()> {
        let hf = HfConfig::from_json(&format!(r#"{{"model_type": "llama", {BASE}}}"#))?;
        let text = serde_json::to_string(&hf).map_err(|e| ModelError::InvalidConfig(e.to_string()))?;
        for field in ["sliding_window", "layer_types", "query_pre_attn_scalar", "hidden_activation", "rope_local_base_freq"] {
            assert!(!text.contains(field), "{field} appears in {text}: manifests and fingerprints would change");
        }
        Ok(())
    }
}
