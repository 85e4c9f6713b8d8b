//! Helpers shared by hat's cross-crate tests: a tiny random Llama written to disk in milliseconds, and
//! the real default model (fetched once by the project's own script, then split once per test binary).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

/// Shape of a tiny random model: a Llama, or with `family` set, a Llama 3 (`llama3`, with rope
/// scaling), Mistral (`mistral`, a 4-position sliding window), Qwen2 (`qwen2`), Qwen3 (`qwen3`) or
/// Gemma 3 (`gemma3`, a 4-position window on every other layer and final-logit soft-capping), with
/// each family's own tensors and config fields.
#[derive(Debug, Clone, Copy)]
pub struct TinyLlama {
    pub family: &'static str,
    /// Per-head size when it is not `hidden / heads`.
    pub head_dim: Option<usize>,
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
        Self {
            family: "llama",
            head_dim: None,
            hidden: 32,
            intermediate: 64,
            layers: 4,
            heads: 4,
            kv_heads: 2,
            vocab: 64,
            tied: true,
            seed: 7,
        }
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
    /// The window of the sliding-window families' fixtures.
    pub const WINDOW: usize = 4;

    pub fn config_json(&self) -> serde_json::Value {
        let mut c = json!({
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
        });
        let extra = match self.family {
            "llama" => json!({}),
            "llama3" => json!({
                "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 64},
            }),
            "mistral" => json!({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": Self::WINDOW}),
            "qwen2" => json!({
                "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "rope_theta": 1000000.0,
                "sliding_window": 128, "max_window_layers": self.layers, "use_sliding_window": false,
            }),
            "qwen3" => json!({
                "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": self.head_dim(), "attention_bias": false,
                "sliding_window": null, "max_window_layers": self.layers, "use_sliding_window": false,
            }),
            "gemma3" => json!({
                "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_act": null,
                "hidden_activation": "gelu_pytorch_tanh", "head_dim": self.head_dim(), "attention_bias": false,
                "query_pre_attn_scalar": self.head_dim(), "sliding_window": Self::WINDOW, "sliding_window_pattern": 2,
                "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": null, "rms_norm_eps": 1e-6,
            }),
            other => panic!("no tiny {other} fixture"),
        };
        for (k, v) in extra.as_object().expect("object") {
            c[k] = v.clone();
        }
        c
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden / self.heads)
    }

    /// Hugging Face-named random tensors.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut seed = self.seed.max(1);
        let mut t = |shape: &[usize], scale: f32| {
            let n = shape.iter().product();
            Tensor::from_vec(random_values(n, &mut seed, scale), shape, &dev).expect("tensor")
        };
        let (h, i, d) = (self.hidden, self.intermediate, self.head_dim());
        // Gemma's norms multiply by 1 + w, so its weights sit around 0.
        let one = if self.family == "gemma3" { 0.0 } else { 1.0 };
        let mut m = HashMap::new();
        m.insert("model.embed_tokens.weight".to_string(), t(&[self.vocab, h], 1.0));
        m.insert("model.norm.weight".to_string(), (t(&[h], 0.1) + one).expect("norm"));
        if !self.tied {
            m.insert("lm_head.weight".to_string(), t(&[self.vocab, h], 0.3));
        }
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            m.insert(format!("{p}.input_layernorm.weight"), (t(&[h], 0.1) + one).expect("norm"));
            m.insert(format!("{p}.post_attention_layernorm.weight"), (t(&[h], 0.1) + one).expect("norm"));
            m.insert(format!("{p}.self_attn.q_proj.weight"), t(&[self.heads * d, h], 0.3));
            m.insert(format!("{p}.self_attn.k_proj.weight"), t(&[self.kv_heads * d, h], 0.3));
            m.insert(format!("{p}.self_attn.v_proj.weight"), t(&[self.kv_heads * d, h], 0.3));
            m.insert(format!("{p}.self_attn.o_proj.weight"), t(&[h, self.heads * d], 0.3));
            m.insert(format!("{p}.mlp.gate_proj.weight"), t(&[i, h], 0.3));
            m.insert(format!("{p}.mlp.up_proj.weight"), t(&[i, h], 0.3));
            m.insert(format!("{p}.mlp.down_proj.weight"), t(&[h, i], 0.3));
            if self.family == "qwen2" {
                m.insert(format!("{p}.self_attn.q_proj.bias"), t(&[self.heads * d], 0.3));
                m.insert(format!("{p}.self_attn.k_proj.bias"), t(&[self.kv_heads * d], 0.3));
                m.insert(format!("{p}.self_attn.v_proj.bias"), t(&[self.kv_heads * d], 0.3));
            }
            if matches!(self.family, "qwen3" | "gemma3") {
                m.insert(format!("{p}.self_attn.q_norm.weight"), (t(&[d], 0.1) + one).expect("norm"));
                m.insert(format!("{p}.self_attn.k_norm.weight"), (t(&[d], 0.1) + one).expect("norm"));
            }
            if self.family == "gemma3" {
                m.insert(format!("{p}.pre_feedforward_layernorm.weight"), t(&[h], 0.1));
                m.insert(format!("{p}.post_feedforward_layernorm.weight"), t(&[h], 0.1));
            }
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

/// The median of a bench's samples (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Max |a - b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).expect("a") - b.to_dtype(DType::F32).expect("b")).expect("sub");
    d.abs().expect("abs").flatten_all().expect("flat").max(0).expect("max").to_scalar::<f32>().expect("scalar")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The default model's GGUF, fetched by `scripts/fetch-model.sh` (idempotent) on first use, or
/// `$HAT_DEFAULT_MODEL`.
pub fn default_model_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var("HAT_DEFAULT_MODEL") {
        Ok(p) => PathBuf::from(p),
        Err(_) => fetch_model("smollm2"),
    })
    .clone()
}

/// Gemma 3 270M (base, Q4_K_M), fetched by `scripts/fetch-model.sh gemma3-270m` on first use.
pub fn gemma3_gguf() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| fetch_model("gemma3-270m")).clone()
}

fn fetch_model(name: &str) -> PathBuf {
    let script = repo_root().join("scripts/fetch-model.sh");
    let out = std::process::Command::new("bash").arg(&script).arg(name).output().expect("run fetch-model.sh");
    assert!(out.status.success(), "fetch-model.sh {name} failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).expect("utf8 path").trim())
}

/// candle-transformers' own GGUF llama on the default model: the independent reference that tests
/// compare against and benches race.
pub struct CandleLlama(candle_transformers::models::quantized_llama::ModelWeights);

/// One greedy run of [`CandleLlama`].
#[derive(Debug)]
pub struct ReferenceRun {
    pub tokens: Vec<u32>,
    /// Logits at the prompt's last position.
    ///
    /// # Shapes
    /// (vocab,)
    pub first_logits: Tensor,
    pub ttft: std::time::Duration,
    /// Mean time between generated tokens.
    pub tbt: std::time::Duration,
}

impl CandleLlama {
    /// Loads the default GGUF. With `f32_matmuls`, every weight is dequantized and multiplied in f32
    /// (`CANDLE_DEQUANTIZE_ALL`); otherwise the native quantized kernels run. candle reads that switch
    /// once per thread when it first builds a matmul, so loading happens on a fresh thread, and a lock
    /// keeps two loads from seeing each other's setting.
    pub fn load(f32_matmuls: bool) -> Self {
        static LOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = LOADING.lock().unwrap_or_else(|e| e.into_inner());
        let path = default_model_gguf();
        std::thread::spawn(move || {
            if f32_matmuls {
                std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
            } else {
                std::env::remove_var("CANDLE_DEQUANTIZE_ALL");
            }
            let mut file = std::fs::File::open(&path).expect("open gguf");
            let content = candle_core::quantized::gguf_file::Content::read(&mut file).expect("read gguf");
            let model = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
                .expect("quantized_llama");
            std::env::remove_var("CANDLE_DEQUANTIZE_ALL");
            CandleLlama(model)
        })
        .join()
        .expect("loader thread")
    }

    /// Greedy decoding of `n >= 1` tokens after `prompt`, from an empty cache.
    pub fn greedy(&mut self, prompt: &[u32], n: usize) -> ReferenceRun {
        self.0.clear_kv_cache();
        greedy_reference(|x, pos| self.0.forward(x, pos), prompt, n)
    }
}

/// candle-transformers' Gemma 3 (`gemma3`, the dense model after Hugging Face's), on the weights a
/// split reads: the reference for Gemma 3 270M. Its quantized twin (`quantized_gemma3` in candle
/// 0.11) runs the MLP with SiLU where Gemma uses GELU, so it is not a reference for anything; the
/// dense model in f32 on the dequantized GGUF matrices and a package split in f32 from the same file
/// do the same arithmetic up to the order of float operations.
pub struct CandleGemma3(candle_transformers::models::gemma3::Model);

impl CandleGemma3 {
    /// The model from Hugging Face-named f32 tensors (norm weights as Hugging Face stores them).
    pub fn new(cfg: &hat_model::HfConfig, tensors: &HashMap<String, Tensor>) -> Self {
        let c = json!({
            "attention_bias": cfg.attention_bias,
            "head_dim": cfg.head_dim,
            "hidden_activation": cfg.hidden_activation.as_deref().unwrap_or("gelu_pytorch_tanh"),
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_key_value_heads": cfg.num_key_value_heads,
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_local_base_freq": cfg.rope_local_base_freq.unwrap_or(10_000.0),
            "vocab_size": cfg.vocab_size,
            "final_logit_softcapping": cfg.final_logit_softcapping,
            "attn_logit_softcapping": null,
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar.expect("a Gemma config") as usize,
            "sliding_window": cfg.sliding_window.expect("a Gemma config"),
            "sliding_window_pattern": cfg.sliding_window_pattern.unwrap_or(6),
            "max_position_embeddings": cfg.max_position_embeddings,
        });
        let c: candle_transformers::models::gemma3::Config = serde_json::from_value(c).expect("candle gemma3 config");
        let vb = candle_nn::VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        Self(candle_transformers::models::gemma3::Model::new(false, &c, vb).expect("candle gemma3"))
    }

    /// Greedy decoding of `n >= 1` tokens after `prompt`, from an empty cache.
    pub fn greedy(&mut self, prompt: &[u32], n: usize) -> ReferenceRun {
        self.0.clear_kv_cache();
        greedy_reference(|x, pos| self.0.forward(x, pos)?.squeeze(1), prompt, n)
    }
}

/// Greedy decoding through a reference model's `forward(ids, position) -> last logits`.
fn greedy_reference(mut forward: impl FnMut(&Tensor, usize) -> candle_core::Result<Tensor>, prompt: &[u32], n: usize) -> ReferenceRun {
    assert!(n >= 1, "generate at least one token");
    let start = std::time::Instant::now();
    let mut first_at = start;
    let mut tokens = Vec::with_capacity(n);
    let mut first_logits = None;
    let mut input = prompt.to_vec();
    let mut pos = 0;
    for _ in 0..n {
        let x = Tensor::new(input.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
        let logits = forward(&x, pos).expect("forward").squeeze(0).expect("squeeze");
        let next = logits.argmax(0).and_then(|t| t.to_scalar::<u32>()).expect("argmax");
        if first_logits.is_none() {
            first_at = std::time::Instant::now();
            first_logits = Some(logits);
        }
        pos += input.len();
        tokens.push(next);
        input = vec![next];
    }
    let tbt = if n > 1 { first_at.elapsed() / (n as u32 - 1) } else { std::time::Duration::ZERO };
    ReferenceRun { tokens, first_logits: first_logits.expect("n >= 1"), ttft: first_at - start, tbt }
}

/// A temporary directory for a fixture a test binary keeps in a static (statics are never dropped,
/// so it outlives the process): made under `$TMPDIR/hat-tests/`, named after this process, once the
/// ones left there by test processes that have ended are removed. Without the sweep every run of
/// the suite left about 650 MB per test binary behind.
pub fn fixture_dir() -> tempfile::TempDir {
    let root = std::env::temp_dir().join("hat-tests");
    std::fs::create_dir_all(&root).expect("create the fixtures' directory");
    for entry in std::fs::read_dir(&root).expect("read the fixtures' directory").flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.split('-').next()).and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| p != std::process::id() && !process_alive(p)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    tempfile::Builder::new().prefix(&format!("{}-", std::process::id())).tempdir_in(&root).expect("fixture directory")
}

/// Whether process `pid` still runs (where that cannot be told, assume so and remove nothing).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// The default model split 2/2 in f32 (with its default initial adapter), once per test binary.
pub fn default_artifacts() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = fixture_dir();
        let out = dir.path().join("artifacts");
        let model = hat_splitter::load_model(&hat_splitter::ModelSource::Gguf(default_model_gguf()), false).expect("load default model");
        hat_splitter::split_model(&model, &hat_splitter::SplitOptions::new(2, 2, out.clone())).expect("split");
        (dir, out)
    })
    .1
}

/// The device runtime and the cloud package of [`default_artifacts`].
pub fn open_default() -> (hat_runtime::DeviceRuntime, hat_runtime::CloudPackage) {
    let dir = default_artifacts();
    let device = hat_runtime::DeviceRuntime::open(&dir.join("device")).expect("device runtime");
    let cloud = hat_runtime::CloudPackage::open(&dir.join("cloud"), &Device::Cpu).expect("cloud package");
    (device, cloud)
}

/// The first long benchmark prompt as a chat turn, cut to its first `n` tokens.
pub fn long_prompt(device: &hat_runtime::DeviceRuntime, n: usize) -> Vec<u32> {
    let (_, _, text) = bench_prompts().into_iter().find(|(_, kind, _)| kind == "long").expect("a long prompt");
    let mut prompt = device.prompt_ids(&text, true).expect("encode");
    prompt.truncate(n);
    assert_eq!(prompt.len(), n, "the long prompt has fewer than {n} tokens");
    prompt
}

/// A tiny fixture split `input`/`output` into `dir/artifacts`.
pub fn tiny_artifacts(dir: &Path, fixture: &TinyLlama, input: usize, output: usize) -> PathBuf {
    let src = fixture.write_dir(&dir.join("model"), 1);
    let model = hat_splitter::load_model(&hat_splitter::ModelSource::Dir(src), false).expect("load fixture");
    let out = dir.join("artifacts");
    hat_splitter::split_model(&model, &hat_splitter::SplitOptions::new(input, output, out.clone())).expect("split fixture");
    out
}

/// Varied prompts for lossless checks on the default model: chat turns, prose, code, lists, another
/// language, numbers.
pub const PROMPTS: [&str; 8] = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The history of the printing press begins in",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nGive me three tips for sleeping better.<|im_end|>\n<|im_start|>assistant\n",
    "Ingredients for a simple pancake recipe:\n1.",
    "La tour Eiffel est",
    "Q: What is 17 times 23?\nA:",
    "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\nExplain photosynthesis in one paragraph.<|im_end|>\n<|im_start|>assistant\n",
];

/// The shipped benchmark prompts (`profiles/bench-prompts.jsonl`): (name, kind, text).
pub fn bench_prompts() -> Vec<(String, String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../profiles/bench-prompts.jsonl");
    let text = std::fs::read_to_string(&path).expect("bench prompts");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            let field = |k: &str| v[k].as_str().expect("string field").to_string();
            (field("name"), field("kind"), field("text"))
        })
        .collect()
}

/// Pearson's statistic of `counts` against probabilities `p`, pooling bins with expected count under
/// 5, and the 0.1 % critical value for its degrees of freedom (Wilson-Hilferty, rounded up).
pub fn chi_square(counts: &[usize], p: &[f64]) -> (f64, f64) {
    let n: usize = counts.iter().sum();
    let (mut stat, mut bins) = (0.0, 0usize);
    let (mut pool_o, mut pool_e) = (0.0, 0.0);
    for (c, q) in counts.iter().zip(p) {
        let e = q * n as f64;
        if e < 5.0 {
            pool_o += *c as f64;
            pool_e += e;
            continue;
        }
        stat += (*c as f64 - e).powi(2) / e;
        bins += 1;
    }
    if pool_e > 0.0 {
        stat += (pool_o - pool_e).powi(2) / pool_e.max(1e-9);
        bins += 1;
    }
    let dof = bins.saturating_sub(1) as f64;
    (stat, dof + 3.09 * (2.0 * dof).sqrt() + 3.0)
}

/// The exact distribution of the second token generated after `prompt` when sampling with `sampler`:
/// P(t2) = sum over t1 of p(t1 | prompt) p(t2 | prompt, t1).
pub fn second_token_distribution(
    model: &mut impl hat_runtime::TokenModel,
    prompt: &[u32],
    sampler: &hat_runtime::Sampler,
) -> (Vec<f32>, Vec<f64>) {
    use hat_runtime::sampling::logits_rows;
    let p1 = sampler.distribution(&logits_rows(&model.logits_last(prompt, 0).expect("logits")).expect("rows")[0]);
    let mut exact = vec![0f64; p1.len()];
    for (t1, w) in p1.iter().enumerate() {
        let ids: Vec<u32> = prompt.iter().copied().chain([t1 as u32]).collect();
        let p2 = sampler.distribution(&logits_rows(&model.logits_last(&ids, 0).expect("logits")).expect("rows")[0]);
        p2.iter().enumerate().for_each(|(t2, v)| exact[t2] += *w as f64 * *v as f64);
    }
    (p1, exact)
}

/// Forwards every connection to `target`, recording every byte the device sends (the cloud's
/// replies pass through unrecorded): what an observer on the path, or the operator, would see.
pub fn recording_proxy(target: std::net::SocketAddr) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let addr = listener.local_addr().expect("addr");
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = sent.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let Ok(mut server) = TcpStream::connect(target) else { return };
            let (mut c2, mut s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
            let record = record.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = client.read(&mut buf) {
                    if n == 0 || server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    record.lock().expect("lock").extend_from_slice(&buf[..n]);
                }
                let _ = server.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (addr, sent)
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// PEM files for TLS tests, made on the fly: a CA, a server certificate for `localhost` and
/// 127.0.0.1 and a client certificate, both signed by the CA.
#[derive(Debug, Clone)]
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TestPki {
    /// Writes a fresh CA and its two certificates into `dir` (files named after `name`).
    pub fn generate(dir: &Path, name: &str) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let write = |file: String, text: String| {
            let p = dir.join(file);
            std::fs::write(&p, text).expect("write PEM");
            p
        };
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, role: &str| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.distinguished_name.push(DnType::CommonName, format!("{name} {role}"));
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("sign");
            (write(format!("{name}-{role}.pem"), cert.pem()), write(format!("{name}-{role}.key"), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], ExtendedKeyUsagePurpose::ServerAuth, "server");
        let (client_cert, client_key) = leaf(vec!["hat-device".into()], ExtendedKeyUsagePurpose::ClientAuth, "client");
        Self { ca: write(format!("{name}-ca.pem"), ca_cert.pem()), server_cert, server_key, client_cert, client_key }
    }
}
