//! Helpers shared by hat's cross-crate tests: a tiny random Llama written to disk in milliseconds, and
//! the real default model (fetched once by the project's own script, then split once per test binary).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

/// Shape of a tiny Llama fixture.
#[derive(Debug, Clone, Copy)]
pub struct TinyLlama {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub tied: bool,
    pub seed: u64,
}

impl Default for TinyLlama {
    fn default() -> Self {
        Self { hidden: 32, intermediate: 64, layers: 4, heads: 4, kv_heads: 2, vocab: 64, tied: true, seed: 7 }
    }
}

/// Deterministic xorshift values in [-scale, scale].
fn random_values(n: usize, seed: &mut u64, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ((*seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

impl TinyLlama {
    pub fn config_json(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 256,
            "tie_word_embeddings": self.tied,
            "hidden_act": "silu",
            "torch_dtype": "float32"
        })
    }

    /// Hugging Face-named random tensors.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut seed = self.seed.max(1);
        let mut t = |shape: &[usize], scale: f32| {
            let n = shape.iter().product();
            Tensor::from_vec(random_values(n, &mut seed, scale), shape, &dev).expect("tensor")
        };
        let (h, i, d) = (self.hidden, self.intermediate, self.hidden / self.heads);
        let mut m = HashMap::new();
        m.insert("model.embed_tokens.weight".to_string(), t(&[self.vocab, h], 1.0));
        m.insert("model.norm.weight".to_string(), (t(&[h], 0.1) + 1.0).expect("norm"));
        if !self.tied {
            m.insert("lm_head.weight".to_string(), t(&[self.vocab, h], 0.3));
        }
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            m.insert(format!("{p}.input_layernorm.weight"), (t(&[h], 0.1) + 1.0).expect("norm"));
            m.insert(format!("{p}.post_attention_layernorm.weight"), (t(&[h], 0.1) + 1.0).expect("norm"));
            m.insert(format!("{p}.self_attn.q_proj.weight"), t(&[self.heads * d, h], 0.3));
            m.insert(format!("{p}.self_attn.k_proj.weight"), t(&[self.kv_heads * d, h], 0.3));
            m.insert(format!("{p}.self_attn.v_proj.weight"), t(&[self.kv_heads * d, h], 0.3));
            m.insert(format!("{p}.self_attn.o_proj.weight"), t(&[h, self.heads * d], 0.3));
            m.insert(format!("{p}.mlp.gate_proj.weight"), t(&[i, h], 0.3));
            m.insert(format!("{p}.mlp.up_proj.weight"), t(&[i, h], 0.3));
            m.insert(format!("{p}.mlp.down_proj.weight"), t(&[h, i], 0.3));
        }
        m
    }

    /// A word-level tokenizer over `w0 .. w{vocab-4}` plus three chat specials.
    pub fn tokenizer_json(&self) -> serde_json::Value {
        let mut vocab = serde_json::Map::new();
        let specials = ["<unk>", "<|im_start|>", "<|im_end|>"];
        for (i, s) in specials.iter().enumerate() {
            vocab.insert(s.to_string(), json!(i));
        }
        for i in specials.len()..self.vocab {
            vocab.insert(format!("w{i}"), json!(i));
        }
        let added: Vec<_> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        })
    }

    /// Writes config.json, tokenizer files and weights (one file, or `shards` files with an index).
    pub fn write_dir(&self, dir: &Path, shards: usize) -> PathBuf {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join("config.json"), self.config_json().to_string()).expect("config");
        std::fs::write(dir.join("tokenizer.json"), self.tokenizer_json().to_string()).expect("tokenizer");
        let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        std::fs::write(
            dir.join("tokenizer_config.json"),
            json!({"chat_template": template, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}).to_string(),
        )
        .expect("tokenizer_config");
        let tensors = self.tensors();
        if shards <= 1 {
            candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).expect("save");
        } else {
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            let mut weight_map = serde_json::Map::new();
            for (k, chunk) in names.chunks(names.len().div_ceil(shards)).enumerate() {
                let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards);
                let part: HashMap<String, Tensor> = chunk.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
                candle_core::safetensors::save(&part, dir.join(&file)).expect("save shard");
                for n in chunk {
                    weight_map.insert((*n).clone(), json!(file));
                }
            }
            std::fs::write(dir.join("model.safetensors.index.json"), json!({"metadata": {}, "weight_map": weight_map}).to_string())
                .expect("index");
        }
        dir.to_path_buf()
    }
}

/// Max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).expect("a") - b.to_dtype(DType::F32).expect("b")).expect("sub");
    d.abs().expect("abs").flatten_all().expect("flat").max(0).expect("max").to_scalar::<f32>().expect("scalar")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The default model's GGUF, fetched by `scripts/fetch-default-model.sh` (idempotent) on first use.
pub fn default_model_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("HAT_DEFAULT_MODEL") {
            return PathBuf::from(p);
        }
        let script = repo_root().join("scripts/fetch-default-model.sh");
        let out = std::process::Command::new("bash").arg(&script).output().expect("run fetch-default-model.sh");
        assert!(out.status.success(), "fetch-default-model.sh failed: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8(out.stdout).expect("utf8 path").trim())
    })
    .clone()
}
