//! GGUF conversion on a tiny model written in memory: Q/K un-permutation restores the Hugging Face
//! weights exactly, the tokenizer keeps control tokens whole, and corrupt files fail cleanly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use hat_splitter::gguf::permute_rope_rows;
use hat_splitter::{load_model, ModelSource, SplitError};
use hat_tests::{max_abs_diff, TinyLlama};

/// GPT-2's byte-to-unicode table: the 256 single-byte tokens of a byte-level BPE vocabulary.
fn byte_tokens() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut pairs: Vec<(u32, u32)> = printable.into_iter().zip(chars).collect();
    pairs.sort();
    pairs.into_iter().map(|(_, c)| char::from_u32(c).expect("char").to_string()).collect()
}

struct Gguf {
    metadata: Vec<(String, Value)>,
    tensors: Vec<(String, Tensor)>,
}

impl Gguf {
    /// The fixture in llama.cpp's layout: GGUF names, Q/K rows permuted for interleaved rope.
    fn from_fixture(fx: &TinyLlama) -> Self {
        let mut tokens = byte_tokens();
        tokens.extend(["Ġh".to_string(), "<|im_start|>".to_string(), "<|im_end|>".to_string()]);
        let mut types = vec![Value::I32(1); tokens.len()];
        let n = types.len();
        types[n - 2] = Value::I32(3);
        types[n - 1] = Value::I32(3);
        let s = |v: &str| Value::String(v.to_string());
        let metadata = vec![
            ("general.architecture".to_string(), s("llama")),
            ("llama.block_count".into(), Value::U32(fx.layers as u32)),
            ("llama.context_length".into(), Value::U32(256)),
            ("llama.embedding_length".into(), Value::U32(fx.hidden as u32)),
            ("llama.feed_forward_length".into(), Value::U32(fx.intermediate as u32)),
            ("llama.attention.head_count".into(), Value::U32(fx.heads as u32)),
            ("llama.attention.head_count_kv".into(), Value::U32(fx.kv_heads as u32)),
            ("llama.rope.freq_base".into(), Value::F32(10000.0)),
            ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
            ("llama.vocab_size".into(), Value::U32(fx.vocab as u32)),
            ("tokenizer.ggml.model".into(), s("gpt2")),
            ("tokenizer.ggml.pre".into(), s("smollm")),
            ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect())),
            ("tokenizer.ggml.token_type".into(), Value::Array(types)),
            ("tokenizer.ggml.merges".into(), Value::Array(vec![s("Ġ h")])),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(n as u32 - 1)),
            ("tokenizer.chat_template".into(), s("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")),
        ];
        let hf = fx.tensors();
        let mut tensors = Vec::new();
        for (name, t) in hf {
            let gguf_name = gguf_name(&name);
            let t = if name.contains("q_proj") {
                permute_rope_rows(&t, fx.heads).expect("permute q")
            } else if name.contains("k_proj") {
                permute_rope_rows(&t, fx.kv_heads).expect("permute k")
            } else {
                t
            };
            tensors.push((gguf_name, t));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Self { metadata, tensors }
    }

    fn set(&mut self, key: &str, value: Value) {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), value));
    }

    fn write(&self, path: &Path) -> PathBuf {
        let q: Vec<(String, QTensor)> =
            self.tensors.iter().map(|(n, t)| (n.clone(), QTensor::quantize(t, GgmlDType::F32).expect("qtensor"))).collect();
        let md: Vec<(&str, &Value)> = self.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = q.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let mut f = std::fs::File::create(path).expect("create");
        gguf_file::write(&mut f, &md, &ts).expect("write gguf");
        path.to_path_buf()
    }
}

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => return "token_embd.weight".into(),
        "model.norm.weight" => return "output_norm.weight".into(),
        "lm_head.weight" => return "output.weight".into(),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.").expect("layer tensor");
    let (layer, rest) = rest.split_once('.').expect("layer index");
    let part = [
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
    ]
    .iter()
    .find_map(|(h, g)| rest.strip_prefix(h).map(|suffix| format!("blk.{layer}.{g}{suffix}")))
    .expect("known tensor");
    part
}

fn fixture() -> TinyLlama {
    TinyLlama { vocab: 259, ..TinyLlama::default() }
}

fn load(path: &Path) -> Result<hat_splitter::LoadedModel, SplitError> {
    load_model(&ModelSource::Gguf(path.to_path_buf()), false)
}

#[test]
fn gguf_conversion_restores_hugging_face_weights_and_tokenizer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fx = fixture();
    let path = Gguf::from_fixture(&fx).write(&tmp.path().join("tiny.gguf"));
    let model = load(&path).expect("load gguf");
    let hf: HashMap<String, Tensor> = fx.tensors();
    for (name, t) in &hf {
        let got = model.tensors.get(name).unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(max_abs_diff(got, t), 0.0, "{name} differs after conversion");
    }
    assert!(model.hf_config.tie_word_embeddings);
    assert_eq!(model.config.num_kv_heads, fx.kv_heads);
    assert!((model.hf_config.rms_norm_eps - 1e-5).abs() < 1e-12, "eps read back as the decimal it was written from");

    let tok = tokenizers::Tokenizer::from_bytes(model.tokenizer_json.as_bytes()).expect("tokenizer");
    let ids = tok.encode("<|im_start|> h<|im_end|>", false).expect("encode");
    assert_eq!(ids.get_ids(), &[257, 256, 258], "control tokens must stay whole and `Ġh` must merge");
    assert_eq!(model.tokenizer.eos_tokens.first().map(|t| t.id), Some(258));
    assert!(model.tokenizer.chat_template.is_some());
}

#[test]
fn truncated_gguf_is_refused_with_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = Gguf::from_fixture(&fixture()).write(&tmp.path().join("tiny.gguf"));
    let bytes = std::fs::read(&path).expect("read");
    for cut in [10, bytes.len() / 3, bytes.len() - 7] {
        let short = tmp.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&short, &bytes[..cut]).expect("write");
        let err = load(&short).expect_err("truncated");
        assert!(matches!(err, SplitError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("truncated") || err.to_string().contains("ends"), "{err}");
    }
}

#[test]
fn zero_alignment_and_absurd_lengths_do_not_crash() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut g = Gguf::from_fixture(&fixture());
    g.set("general.alignment", Value::U32(0));
    let err = load(&g.write(&tmp.path().join("align0.gguf"))).expect_err("alignment 0");
    assert!(err.to_string().contains("general.alignment"), "{err}");

    let good = Gguf::from_fixture(&fixture()).write(&tmp.path().join("good.gguf"));
    let mut bytes = std::fs::read(&good).expect("read");
    // The first metadata key's length prefix sits right after magic, version and two counts.
    bytes[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let huge = tmp.path().join("huge.gguf");
    std::fs::write(&huge, &bytes).expect("write");
    let err = load(&huge).expect_err("huge string");
    assert!(matches!(err, SplitError::Corrupt { .. }), "{err}");

    let garbage = tmp.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model at all").expect("write");
    assert!(load(&garbage).expect_err("garbage").to_string().contains("magic"));
}

#[test]
fn non_llama_gguf_names_its_architecture() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut g = Gguf::from_fixture(&fixture());
    g.set("general.architecture", Value::String("falcon".into()));
    let err = load(&g.write(&tmp.path().join("falcon.gguf"))).expect_err("falcon");
    let err = err.to_string();
    assert!(err.contains("GGUF architecture `falcon` is not supported") && err.contains("qwen2, qwen3, gemma3"), "{err}");
}
