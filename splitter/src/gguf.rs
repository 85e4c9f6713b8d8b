//! GGUF llama checkpoints: validated, dequantized to f32, renamed to Hugging Face names, and with Q/K
//! rows un-permuted from llama.cpp's interleaved rope layout back to the half-rotation layout that
//! `hat_model::Rope` uses.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};
use hat_model::{HfConfig, ModelError};

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
    if arch != "llama" {
        return Err(ModelError::UnsupportedArchitecture(arch).into());
    }
    if content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(SplitError::BadInput(
            "this GGUF carries rope_freqs (Llama 3.1-style rope scaling), which hat cannot map back to a config yet; \
             split the Hugging Face safetensors of the model instead"
                .into(),
        ));
    }
    let tokens_len = md.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map(Vec::len);
    let num_heads = md.usize("llama.attention.head_count")?;
    let hidden_size = md.usize("llama.embedding_length")?;
    let head_dim = md.opt_usize("llama.attention.key_length")?.unwrap_or(hidden_size / num_heads.max(1));
    if let Some(rope_dim) = md.opt_usize("llama.rope.dimension_count")? {
        if rope_dim != head_dim {
            return Err(SplitError::BadInput(format!(
                "partial rotary embedding (rope dimension {rope_dim} of head dimension {head_dim}) is not supported"
            )));
        }
    }
    let hf_config = HfConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: Some("llama".into()),
        hidden_size,
        intermediate_size: md.usize("llama.feed_forward_length")?,
        num_hidden_layers: md.usize("llama.block_count")?,
        num_attention_heads: num_heads,
        num_key_value_heads: Some(md.opt_usize("llama.attention.head_count_kv")?.unwrap_or(num_heads)),
        head_dim: Some(head_dim),
        vocab_size: match md.opt_usize("llama.vocab_size")? {
            Some(v) => v,
            None => tokens_len.ok_or_else(|| corrupt("no llama.vocab_size and no tokenizer tokens".into()))?,
        },
        rms_norm_eps: md.float("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        rope_theta: md.float("llama.rope.freq_base")?.unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: md.opt_usize("llama.context_length")?.unwrap_or(4096),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        mlp_bias: false,
        hidden_act: Some("silu".into()),
    };
    let config = hf_config.validate()?;

    let bar = crate::package::progress_bar(progress, content.tensor_infos.len() as u64, "dequantizing GGUF tensors");
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::with_capacity(names.len());
    let mut quantized = HashMap::new();
    for gguf_name in names {
        let hf_name = hf_name(gguf_name)
            .ok_or_else(|| SplitError::BadInput(format!("{}: unexpected tensor `{gguf_name}` for a llama GGUF", path.display())))?;
        let qtensor = content.tensor(&mut reader, gguf_name, &Device::Cpu).map_err(|e| corrupt(format!("tensor `{gguf_name}`: {e}")))?;
        let mut t = qtensor.dequantize(&Device::Cpu).map_err(|e| SplitError::candle(format!("dequantizing `{gguf_name}`"), e))?;
        let rope_heads = if hf_name.ends_with("self_attn.q_proj.weight") || hf_name.ends_with("self_attn.q_proj.bias") {
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

/// GGUF tensor name -> Hugging Face tensor name.
pub fn hf_name(gguf: &str) -> Option<String> {
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
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
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
        assert_eq!(hf_name("blk.3.attn_q.weight").as_deref(), Some("model.layers.3.self_attn.q_proj.weight"));
        assert_eq!(hf_name("blk.29.ffn_norm.weight").as_deref(), Some("model.layers.29.post_attention_layernorm.weight"));
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("blk.1.unknown.weight"), None);
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
