//! The model families beyond Llama, on tiny random models the test writes itself as Hugging Face
//! directories: Llama 3 (rope scaling), Mistral (a sliding window), Qwen2 (Q/K/V biases), Qwen3
//! (per-head Q/K norms, a head size apart from hidden / heads) and Gemma 3 (all of Gemma's block,
//! a window on every other layer, soft-capped logits). For each: the split package's logits equal
//! candle-transformers' own model of that family on the same weights, at the prompt and at decode
//! steps past the window, and `hat` (drafts rejected and drafts accepted) equals `local` token for
//! token. Then: the refusals of what hat does not run.
//!
//! candle counts a sliding window one position wider than Hugging Face and llama.cpp do (it masks
//! key j for query i only when `j + window < i`), so its models are given `window - 1`; and its
//! one-token decode steps skip the window's mask, so the reference runs the whole context in one
//! pass at every step, from a fresh model. candle's Gemma 3 scales attention by `head_dim^-0.5` and
//! ignores `query_pre_attn_scalar`, which every Gemma 3 but the 27B sets to `head_dim`; the fixture
//! does the same.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models as cm;
use hat_runtime::generate::TokenModel;
use hat_runtime::{
    generate, generate_speculative, Adapter, AdapterOrigin, CloudPackage, DeviceRuntime, Drafter, GenerateOptions, LocalPipeline,
};
use hat_tests::{max_abs_diff, TinyLlama};

const PROMPT: [u32; 12] = [5, 9, 17, 3, 40, 41, 8, 22, 63, 12, 30, 7];
const STEPS: usize = 8;

fn fixture(family: &'static str) -> TinyLlama {
    match family {
        // Mistral's head is its own; Qwen3's heads are wider than hidden / heads.
        "mistral" => TinyLlama { family, tied: false, ..Default::default() },
        "qwen3" => TinyLlama { family, head_dim: Some(16), ..Default::default() },
        "gemma3" => TinyLlama { family, head_dim: Some(16), kv_heads: 1, ..Default::default() },
        _ => TinyLlama { family, ..Default::default() },
    }
}

/// candle-transformers' model of the family on `context`, in one pass: the logits at its end.
fn reference(fx: &TinyLlama, src: &Path, context: &[u32]) -> Tensor {
    let dev = Device::Cpu;
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &dev).expect("weights");
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
    let mut c = fx.config_json();
    if matches!(fx.family, "mistral" | "gemma3") {
        c["sliding_window"] = (TinyLlama::WINDOW - 1).into();
    }
    let x = ids(context);
    let logits = match fx.family {
        "llama" | "llama3" => {
            let cfg: cm::llama::LlamaConfig = serde_json::from_value(c).expect("llama config");
            let cfg = cfg.into_config(false);
            let model = cm::llama::Llama::load(vb, &cfg).expect("llama");
            let mut cache = cm::llama::Cache::new(true, DType::F32, &cfg, &dev).expect("cache");
            model.forward(&x, 0, &mut cache)
        }
        "mistral" => {
            let cfg: cm::mistral::Config = serde_json::from_value(c).expect("mistral config");
            cm::mistral::Model::new(&cfg, vb).expect("mistral").forward(&x, 0)
        }
        "qwen2" => {
            let cfg: cm::qwen2::Config = serde_json::from_value(c).expect("qwen2 config");
            cm::qwen2::ModelForCausalLM::new(&cfg, vb).expect("qwen2").forward(&x, 0)
        }
        "qwen3" => {
            let cfg: cm::qwen3::Config = serde_json::from_value(c).expect("qwen3 config");
            cm::qwen3::ModelForCausalLM::new(&cfg, vb).expect("qwen3").forward(&x, 0)
        }
        "gemma3" => {
            let cfg: cm::gemma3::Config = serde_json::from_value(c).expect("gemma3 config");
            cm::gemma3::Model::new(false, &cfg, vb).expect("gemma3").forward(&x, 0)
        }
        other => panic!("no reference for {other}"),
    };
    logits.and_then(|l| l.flatten_all()).expect("reference forward")
}

fn split(src: &Path, out: &Path) -> (DeviceRuntime, CloudPackage) {
    let model = hat_splitter::load_model(&hat_splitter::ModelSource::Dir(src.to_path_buf()), false).expect("load");
    hat_splitter::split_model(&model, &hat_splitter::SplitOptions::new(1, 1, out)).expect("split");
    let dev = Device::Cpu;
    (DeviceRuntime::open(&out.join("device")).expect("device"), CloudPackage::open(&out.join("cloud"), &dev).expect("cloud"))
}

fn ids(t: &[u32]) -> Tensor {
    Tensor::new(t, &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids")
}

fn check_family(family: &'static str) {
    let tmp = tempfile::tempdir().expect("tmp");
    let fx = fixture(family);
    let src: PathBuf = fx.write_dir(&tmp.path().join("src"), 1);
    let (runtime, cloud) = split(&src, &tmp.path().join("out"));
    let device = &runtime.package;
    assert_eq!(device.config.family.name(), if family == "llama3" { "llama" } else { family });

    // Logits at every prompt position's end and at greedy decode steps.
    let mut pipeline = LocalPipeline::new(device, &cloud).expect("pipeline");
    let ours = pipeline.logits_all(&PROMPT, 0).expect("ours").get(PROMPT.len() - 1).expect("last row");
    let want = reference(&fx, &src, &PROMPT);
    let mut worst = max_abs_diff(&ours, &want);
    let scale = want.abs().and_then(|a| a.max(0)).and_then(|m| m.to_scalar::<f32>()).expect("scale");
    let mut next = want.argmax(0).and_then(|t| t.to_scalar::<u32>()).expect("argmax");
    let mut context = PROMPT.to_vec();
    for _ in 0..STEPS {
        let pos = context.len();
        let ours = pipeline.logits_last(&[next], pos).expect("ours step");
        context.push(next);
        let want = reference(&fx, &src, &context);
        worst = worst.max(max_abs_diff(&ours, &want));
        next = want.argmax(0).and_then(|t| t.to_scalar::<u32>()).expect("argmax");
    }
    println!("{family}: logits up to position {} within {worst:.2e} of candle's (largest logit {scale:.2})", context.len());
    assert!(worst <= 1e-4 * scale.max(1.0), "{family}: logits differ from candle's by {worst}");

    // hat equals local, with the package's own adapter (most drafts rejected, so caches roll back)
    // and with the middle itself as the adapter (every draft accepted).
    let opts = GenerateOptions { max_tokens: 24, ..Default::default() };
    let local = generate(&mut LocalPipeline::new(device, &cloud).expect("pipeline"), &PROMPT, &opts, |_| {}).expect("local").tokens;
    let adapter = runtime.adapter().clone();
    let oracle = Adapter::from_submodel(cloud.middle.clone(), AdapterOrigin::Custom("oracle"));
    for (name, adapter) in [("adapter", adapter), ("oracle", oracle)] {
        let mut pipeline = LocalPipeline::new(device, &cloud).expect("pipeline");
        let g = generate_speculative(&mut pipeline, &mut Drafter::new(adapter), &PROMPT, &opts, 3, |_| {}).expect("hat");
        assert_eq!(g.tokens, local, "{family}: hat with the {name}");
        if name == "oracle" {
            assert_eq!(g.accepted, g.drafted, "{family}: the oracle's drafts are all accepted");
        }
    }
}

#[test]
fn llama3_rope_scaling_equals_candle() {
    check_family("llama3");
}

#[test]
fn mistral_sliding_window_equals_candle() {
    check_family("mistral");
}

#[test]
fn qwen2_biases_equal_candle() {
    check_family("qwen2");
}

#[test]
fn qwen3_qk_norm_equals_candle() {
    check_family("qwen3");
}

#[test]
fn gemma3_block_equals_candle() {
    check_family("gemma3");
}

/// What hat does not run is refused in one line that names it and what is supported, before
/// anything is written; so is a config that contradicts itself or its weights.
#[test]
fn unsupported_families_and_contradictions_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    type Edit = dyn Fn(&mut serde_json::Value);
    let cases: [(&str, &Edit, &str); 5] = [
        ("phi3", &|c| c["model_type"] = "phi3".into(), "unsupported architecture `phi3`"),
        ("yarn", &|c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0}), "rope_scaling type `yarn`"),
        ("heads", &|c| c["num_attention_heads"] = 6.into(), "not a multiple of num_attention_heads 6"),
        ("gelu", &|c| c["hidden_act"] = "relu".into(), "hidden activation `relu`"),
        ("qknorm", &|c| c["model_type"] = "qwen3".into(), "self_attn.q_norm.weight"),
    ];
    for (name, edit, want) in cases {
        let src = TinyLlama::default().write_dir(&tmp.path().join(name), 1);
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("read")).expect("json");
        edit(&mut c);
        std::fs::write(src.join("config.json"), c.to_string()).expect("write");
        let err = hat_splitter::load_model(&hat_splitter::ModelSource::Dir(src.clone()), false).expect_err(name).to_string();
        println!("{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
        assert!(!err.contains('\n'), "{name}: one line: {err}");
        if name == "phi3" {
            assert!(err.contains("llama, mistral, qwen2, qwen3 and gemma3"), "{err}");
        }
    }
}
