//! Hugging Face tensor names. Packages keep these names, with the original layer indices, so a shard
//! can be read by any safetensors tool and matched back to the source model.

pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";
pub const LAYERS_PREFIX: &str = "model.layers";

/// The decoder layer a tensor belongs to, if any: `model.layers.7.mlp.up_proj.weight` -> 7.
pub fn layer_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix(LAYERS_PREFIX)?.strip_prefix('.')?;
    rest.split('.').next()?.parse().ok()
}

/// The tensors one decoder layer must have, by their names relative to `model.layers.{i}`.
pub fn layer_tensor_suffixes(attention_bias: bool, mlp_bias: bool) -> Vec<String> {
    let mut names = vec!["input_layernorm.weight".to_string(), "post_attention_layernorm.weight".to_string()];
    for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        names.push(format!("self_attn.{p}.weight"));
        if attention_bias && p != "o_proj" {
            names.push(format!("self_attn.{p}.bias"));
        }
    }
    for p in ["gate_proj", "up_proj", "down_proj"] {
        names.push(format!("mlp.{p}.weight"));
        if mlp_bias {
            names.push(format!("mlp.{p}.bias"));
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_index_parses_only_layer_tensors() {
        assert_eq!(layer_index("model.layers.7.mlp.up_proj.weight"), Some(7));
        assert_eq!(layer_index("model.layers.12.input_layernorm.weight"), Some(12));
        assert_eq!(layer_index(EMBED_TOKENS), None);
        assert_eq!(layer_index("model.layersX.1.a"), None);
    }
}
