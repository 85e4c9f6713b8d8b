//! Hugging Face tensor names. Packages keep these names, with the original layer indices, so a shard
//! can be read by any safetensors tool and matched back to the source model.

pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";
pub const LAYERS_PREFIX: &str = "model.layers";

use crate::config::Config;

/// The decoder layer a tensor belongs to, if any: `model.layers.7.mlp.up_proj.weight` -> 7.
pub fn layer_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix(LAYERS_PREFIX)?.strip_prefix('.')?;
    rest.split('.').next()?.parse().ok()
}

/// The tensors one decoder layer of `cfg`'s family must have, by their names relative to
/// `model.layers.{i}`, with their shapes.
pub fn layer_tensors(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (q, kv) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let mut t: Vec<(String, Vec<usize>)> =
        vec![("input_layernorm.weight".into(), vec![h]), ("post_attention_layernorm.weight".into(), vec![h])];
    if cfg.sandwich_norms {
        t.push(("pre_feedforward_layernorm.weight".into(), vec![h]));
        t.push(("post_feedforward_layernorm.weight".into(), vec![h]));
    }
    for (p, out, inp) in [("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)] {
        t.push((format!("self_attn.{p}.weight"), vec![out, inp]));
        if cfg.attention_bias && p != "o_proj" {
            t.push((format!("self_attn.{p}.bias"), vec![out]));
        }
    }
    if cfg.qk_norm {
        t.push(("self_attn.q_norm.weight".into(), vec![d]));
        t.push(("self_attn.k_norm.weight".into(), vec![d]));
    }
    for (p, out, inp) in [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)] {
        t.push((format!("mlp.{p}.weight"), vec![out, inp]));
        if cfg.mlp_bias {
            t.push((format!("mlp.{p}.bias"), vec![out]));
        }
    }
    t
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
