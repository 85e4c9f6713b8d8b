//! GGUF llama checkpoints: validated, dequantized to f32, renamed to Hugging Face names, and with Q/K
//! rows un-permuted from llama.cpp's interleaved rope layout back to the half-rotation layout that
//! `hat_model::Rope` uses.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};
use hat_model::config::RopeScaling;
use hat_model::{Family, HfConfig};

use crate::error::{Result, SplitError};
use crate::source::{normalise_tensors, LoadedModel};

pub fn load(path: &Path, progress: bool) -> Result<LoadedModel> {
    let corrupt = |reason: String| SplitError::Corrupt { path: path.to_path_buf(), kind: "GGUF", reason };
    let layout = crate::gguf_check::check(path).map_err(corrupt)?;
    let file = std::fs::File::open(path).map_err(|e| SplitError::io(format!("cannot open {}", path.display()), e))?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| corrupt(e.to_string()))?;
    if content.tensor_data_offset != layout.data_offset || content.tensor_infos.len() != layout.tensors.len() {
        return Err(corrupt("header layout is ambiguous (reader and validator disagree)".into()));
    }
    let md = Metadata(&content.metadata);

    let arch = md.string("general.architecture")?;
    let family = match arch.as_str() {
        "llama" => Family::Llama,
        "qwen2" => Family::Qwen2,
        "qwen3" => Family::Qwen3,
        "gemma3" => Family::Gemma3,
        other => {
            return Err(SplitError::BadInput(format!(
                "GGUF architecture `{other}` is not supported (supported: llama, which Mistral GGUFs also use, qwen2, qwen3, gemma3)"
            )))
        }
    };
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(SplitError::BadInput(
            "this GGUF carries rope_freqs (Llama 3.1-style rope scaling), which hat cannot map back to a config yet; \
             split the Hugging Face safetensors of the model instead"
                .into(),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let tokens_len = md.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map(Vec::len);
    let num_heads = md.usize(&key("attention.head_count"))?;
    let hidden_size = md.usize(&key("embedding_length"))?;
    let num_layers = md.usize(&key("block_count"))?;
    let head_dim = md.opt_usize(&key("attention.key_length"))?.unwrap_or(hidden_size / num_heads.max(1));
    if let Some(value_dim) = md.opt_usize(&key("attention.value_length"))? {
        if value_dim != head_dim {
            return Err(SplitError::BadInput(format!("key length {head_dim} and value length {value_dim} differ; hat needs them equal")));
        }
    }
    if let Some(rope_dim) = md.opt_usize(&key("rope.dimension_count"))? {
        if rope_dim != head_dim {
            return Err(SplitError::BadInput(format!(
                "partial rotary embedding (rope dimension {rope_dim} of head dimension {head_dim}) is not supported"
            )));
        }
    }
    let rope_scaling = match md.opt_string(&key("rope.scaling.type"))?.as_deref() {
        None | Some("none") => None,
        Some("linear") => Some(RopeScaling {
            rope_type: "linear".into(),
            factor: md.float(&key("rope.scaling.factor"))?,
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
        }),
        Some(other) => return Err(SplitError::BadInput(format!("GGUF rope scaling `{other}` is not supported (supported: linear)"))),
    };
    let gemma = family == Family::Gemma3;
    let (model_type, architecture) = match family {
        Family::Llama => ("llama", "LlamaForCausalLM"),
        Family::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Family::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        Family::Mistral => ("mistral", "MistralForCausalLM"),
        Family::Gemma3 => ("gemma3_text", "Gemma3ForCausalLM"),
    };
    let hf_config = HfConfig {
        architectures: vec![architecture.into()],
        model_type: Some(model_type.into()),
        hidden_size,
        intermediate_size: md.usize(&key("feed_forward_length"))?,
        num_hidden_layers: num_layers,
        num_attention_heads: num_heads,
        num_key_value_heads: Some(md.opt_usize(&key("attention.head_count_kv"))?.unwrap_or(num_heads)),
        head_dim: Some(head_dim),
        vocab_size: match md.opt_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => tokens_len.ok_or_else(|| corrupt(format!("no {arch}.vocab_size and no tokenizer tokens")))?,
        },
        rms_norm_eps: md.float(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        rope_theta: md.float(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_scaling,
        max_position_embeddings: md.opt_usize(&key("context_length"))?.unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        mlp_bias: false,
        hidden_act: (!gemma).then(|| "silu".into()),
        hidden_activation: gemma.then(|| "gelu_pytorch_tanh".into()),
        sliding_window: md.opt_usize(&key("attention.sliding_window"))?.filter(|_| gemma),
        // llama.cpp fixes Gemma 3's pattern at 6 (every sixth layer global); a GGUF may say otherwise.
        sliding_window_pattern: gemma.then_some(md.opt_usize(&key("attention.sliding_window_pattern"))?.unwrap_or(6)),
        rope_local_base_freq: if gemma { Some(md.float(&key("rope.local_freq_base"))?.unwrap_or(10_000.0)) } else { None },
        // As llama.cpp: Gemma 3 27B scales by hidden / heads, the others by the head dimension.
        query_pre_attn_scalar: gemma.then(|| if num_layers == 62 { (hidden_size / num_heads.max(1)) as f64 } else { head_dim as f64 }),
        final_logit_softcapping: md.float(&key("final_logit_softcapping"))?,
        ..HfConfig::default()
    };
    let config = hf_config.validate()?;

    let bar = crate::package::progress_bar(progress, content.tensor_infos.len() as u64, "dequantizing GGUF tensors");
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::with_capacity(names.len());
    let mut quantized = HashMap::new();
    for gguf_name in names {
        let hf_name = hf_name(gguf_name, family)
            .ok_or_else(|| SplitError::BadInput(format!("{}: unexpected tensor `{gguf_name}` for a {arch} GGUF", path.display())))?;
        let qtensor = content.tensor(&mut reader, gguf_name, &Device::Cpu).map_err(|e| corrupt(format!("tensor `{gguf_name}`: {e}")))?;
        let mut t = qtensor.dequantize(&Device::Cpu).map_err(|e| SplitError::candle(format!("dequantizing `{gguf_name}`"), e))?;
        if gemma && hf_name.ends_with("norm.weight") {
            // llama.cpp stores Gemma's norm weights as `1 + w`; packages keep Hugging Face's `w`.
            t = (t - 1.0).map_err(|e| SplitError::candle("shifting a Gemma norm", e))?;
        }
        // Only llama.cpp's `llama` converter interleaves Q/K rows; the others keep Hugging Face's layout.
        let rope_heads = if family != Family::Llama {
            None
        } else if hf_name.ends_with("self_attn.q_proj.weight") || hf_name.ends_with("self_attn.q_proj.bias") {
            Some(config.num_heads)
        } else if hf_name.ends_with("self_attn.k_proj.weight") || hf_name.ends_with("self_attn.k_proj.bias") {
            Some(config.num_kv_heads)
        } else {
            None
        };
        if let Some(heads) = rope_heads {
            t = unpermute_rope_rows(&t, heads)?;
        }
        if qtensor.rank() == 2 {
            let q = match rope_heads {
                Some(heads) => {
                    unpermute_quantized_rows(&qtensor, heads).map_err(|e| SplitError::candle(format!("reordering `{gguf_name}`"), e))?
                }
                None => qtensor,
            };
            quantized.insert(hf_name.clone(), std::sync::Arc::new(q));
        }
        tensors.insert(hf_name, t);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let source = path.display().to_string();
    normalise_tensors(&mut tensors, &config, &source)?;
    if !quantized.contains_key(hat_model::names::LM_HEAD) {
        if let Some(embed) = quantized.get(hat_model::names::EMBED_TOKENS).cloned() {
            quantized.insert(hat_model::names::LM_HEAD.to_string(), embed);
        }
    }
    let (tokenizer_json, tokenizer) = crate::gguf_tokenizer::build(&content.metadata).map_err(corrupt)?;
    Ok(LoadedModel { source, hf_config, config, tensors, quantized: Some(quantized), tokenizer_json, tokenizer })
}

/// llama.cpp's converter reorders each head's rows from [first half, second half] to interleaved
/// pairs; this puts them back.
///
/// # Shapes
/// t: (heads * head_dim, in) or (heads * head_dim,) -> same
pub fn unpermute_rope_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    reorder_rope_rows(t, heads, false)
}

/// [`unpermute_rope_rows`] on a quantized matrix: ggml blocks run along a row, so rows move as
/// whole byte runs and the values stay bit for bit the source's.
///
/// # Shapes
/// q: (heads * head_dim, in) -> same
fn unpermute_quantized_rows(q: &QTensor, heads: usize) -> candle_core::Result<QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    let data = q.data()?;
    let row_bytes = cols / q.dtype().block_size() * q.dtype().type_size();
    if row_bytes * rows != data.len() || rows % (2 * heads) != 0 {
        candle_core::bail!("{rows}x{cols} {:?} matrix cannot be reordered for {heads} heads", q.dtype());
    }
    let (head_dim, half) = (rows / heads, rows / heads / 2);
    let mut out = Vec::with_capacity(data.len());
    for h in 0..heads {
        for a in 0..2 {
            for b in 0..half {
                let src = h * head_dim + b * 2 + a;
                out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    QTensor::new(QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, q.dtype())?, (rows, cols))
}

/// The converter's own permutation (the inverse of [`unpermute_rope_rows`]); tests use it to build
/// GGUF-layout weights.
pub fn permute_rope_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    reorder_rope_rows(t, heads, true)
}

/// Views each head's rows as a (2, head_dim / 2) grid, or its transpose, and swaps the two axes.
fn reorder_rope_rows(t: &Tensor, heads: usize, to_interleaved: bool) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rest: usize = dims[1..].iter().product();
    let half = dims[0] / heads / 2;
    let grid = if to_interleaved { (heads, 2, half, rest) } else { (heads, half, 2, rest) };
    t.reshape(grid)
        .and_then(|x| x.transpose(1, 2))
        .and_then(|x| x.contiguous())
        .and_then(|x| x.reshape(dims))
        .map_err(|e| SplitError::candle("reordering Q/K rows for rope", e))
}

/// GGUF tensor name -> Hugging Face tensor name, in `family`'s naming.
pub fn hf_name(gguf: &str, family: Family) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let gemma = family == Family::Gemma3;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        // Gemma's `ffn_norm` is the MLP's input norm; its attention output norm has a name of its own.
        "ffn_norm" if gemma => "pre_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" if gemma => "post_attention_layernorm",
        "post_ffw_norm" if gemma => "post_feedforward_layernorm",
        "attn_q_norm" if matches!(family, Family::Qwen3 | Family::Gemma3) => "self_attn.q_norm",
        "attn_k_norm" if matches!(family, Family::Qwen3 | Family::Gemma3) => "self_attn.k_norm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

struct Metadata<'a>(&'a HashMap<String, Value>);

impl Metadata<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }
    fn bad(key: &str, v: &Value) -> SplitError {
        SplitError::BadInput(format!("GGUF metadata `{key}` has an unexpected value {v:?}"))
    }
    fn string(&self, key: &str) -> Result<String> {
        let v = self.get(key).ok_or_else(|| SplitError::BadInput(format!("GGUF metadata `{key}` is missing")))?;
        v.to_string().cloned().map_err(|_| Self::bad(key, v))
    }
    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        self.get(key).map(|v| v.to_string().cloned().map_err(|_| Self::bad(key, v))).transpose()
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v {
                Value::I32(i) if *i >= 0 => Ok(Some(*i as usize)),
                Value::I64(i) if *i >= 0 => Ok(Some(*i as usize)),
                v => v.to_u64().map(|n| Some(n as usize)).map_err(|_| Self::bad(key, v)),
            },
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| SplitError::BadInput(format!("GGUF metadata `{key}` is missing")))
    }
    /// f32 metadata read back as the decimal it was written from (1e-5, not 9.99999974e-6).
    fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(f)) => Ok(format!("{f}").parse::<f64>().ok()),
            Some(Value::F64(f)) => Ok(Some(*f)),
            Some(v) => Err(Self::bad(key, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hugging_face() {
        let llama = Family::Llama;
        assert_eq!(hf_name("blk.3.attn_q.weight", llama).as_deref(), Some("model.layers.3.self_attn.q_proj.weight"));
        assert_eq!(hf_name("blk.29.ffn_norm.weight", llama).as_deref(), Some("model.layers.29.post_attention_layernorm.weight"));
        assert_eq!(hf_name("token_embd.weight", llama).as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("blk.1.unknown.weight", llama), None);
        assert_eq!(hf_name("blk.1.attn_q_norm.weight", llama), None, "llama has no Q/K norm");
        let gemma = Family::Gemma3;
        assert_eq!(hf_name("blk.2.ffn_norm.weight", gemma).as_deref(), Some("model.layers.2.pre_feedforward_layernorm.weight"));
        assert_eq!(hf_name("blk.2.post_attention_norm.weight", gemma).as_deref(), Some("model.layers.2.post_attention_layernorm.weight"));
        assert_eq!(hf_name("blk.2.post_ffw_norm.weight", gemma).as_deref(), Some("model.layers.2.post_feedforward_layernorm.weight"));
        assert_eq!(hf_name("blk.2.attn_k_norm.weight", Family::Qwen3).as_deref(), Some("model.layers.2.self_attn.k_norm.weight"));
    }

    #[test]
    fn unpermute_inverts_permute() -> Result<()> {
        let t =
            Tensor::arange(0f32, 4.0 * 8.0 * 3.0, &Device::Cpu).and_then(|t| t.reshape((32, 3))).map_err(|e| SplitError::candle("t", e))?;
        let back = unpermute_rope_rows(&permute_rope_rows(&t, 4)?, 4)?;
        let diff = (back - &t).and_then(|d| d.abs()).and_then(|d| d.sum_all()).and_then(|d| d.to_scalar::<f32>());
        assert_eq!(diff.map_err(|e| SplitError::candle("d", e))?, 0.0);
        // The permutation interleaves halves: row 1 of head 0 comes from row head_dim/2.
        let p = permute_rope_rows(&t, 4)?.get(1).and_then(|r| r.to_vec1::<f32>()).map_err(|e| SplitError::candle("p", e))?;
        assert_eq!(p, vec![12.0, 13.0, 14.0]);
        Ok(())
    }
}
