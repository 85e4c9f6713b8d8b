//! Decode speed on the default model, side by side in one run: hat's local split pipeline (f32
//! packages), and candle-transformers' quantized_llama on the same GGUF, with native Q4_1 matmuls
//! and with f32 matmuls. Rounds are interleaved so machine noise hits every contender alike.
//!
//! `cargo bench -p hat-tests --bench decode` (env: HAT_BENCH_ROUNDS, HAT_BENCH_TOKENS).

use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use hat_runtime::{generate, CloudPackage, DevicePackage, GenerateOptions, LocalPipeline, SamplingOptions};
use hat_splitter::{load_model, split_model, ModelSource, SplitOptions};
use hat_tests::default_model_gguf;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Greedy decode with quantized_llama; returns (TTFT, mean TBT).
fn candle_decode(model: &mut ModelWeights, prompt: &[u32], n: usize) -> (Duration, Duration) {
    model.clear_kv_cache();
    let start = Instant::now();
    let mut input = prompt.to_vec();
    let mut pos = 0;
    let mut first = start;
    for i in 0..n {
        let x = Tensor::new(input.as_slice(), &Device::Cpu).and_then(|t| t.unsqueeze(0)).expect("ids");
        let logits = model.forward(&x, pos).expect("forward").squeeze(0).expect("squeeze");
        let next = logits.argmax(0).and_then(|t| t.to_scalar::<u32>()).expect("argmax");
        if i == 0 {
            first = Instant::now();
        }
        pos += input.len();
        input = vec![next];
    }
    (first - start, (Instant::now() - first) / (n as u32 - 1))
}

fn load_quantized(f32_matmuls: bool) -> ModelWeights {
    std::thread::spawn(move || {
        if f32_matmuls {
            std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
        }
        let path = default_model_gguf();
        let mut file = std::fs::File::open(&path).expect("open");
        let content = gguf_file::Content::read(&mut file).expect("gguf");
        let m = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("model");
        std::env::remove_var("CANDLE_DEQUANTIZE_ALL");
        m
    })
    .join()
    .expect("loader thread")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rounds = env_usize("HAT_BENCH_ROUNDS", 5);
    let tokens = env_usize("HAT_BENCH_TOKENS", 64);
    let gguf = default_model_gguf();
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("artifacts");

    let t = Instant::now();
    let model = load_model(&ModelSource::Gguf(gguf), false).expect("load");
    let load_s = t.elapsed().as_secs_f64();
    let opts = SplitOptions { input_layers: 2, output_layers: 2, dtype: DType::F32, out: out.clone(), progress: false };
    let report = split_model(&model, &opts).expect("split");
    let split_s = t.elapsed().as_secs_f64();
    drop(model);
    println!("split (GGUF load + dequantize {load_s:.2} s, write+hash {:.2} s): {split_s:.2} s total", report.elapsed.as_secs_f64());

    let t = Instant::now();
    let device = DevicePackage::open(&out.join("device"), &Device::Cpu).expect("device");
    let cloud = CloudPackage::open(&out.join("cloud"), &Device::Cpu).expect("cloud");
    println!("open packages (read + sha256 check): {:.2} s", t.elapsed().as_secs_f64());
    let mut hat = LocalPipeline::new(&device, &cloud).expect("pipeline");
    let mut q4 = load_quantized(false);
    // Built on its own thread too; thread-local switch is read when a thread first builds a QMatMul.
    let mut qf32 = load_quantized(true);

    let prompt = device.tokenizer.encode("The history of the printing press begins in", true).expect("encode").get_ids().to_vec();
    let gen_opts = GenerateOptions { max_tokens: tokens, sampling: SamplingOptions::default(), eos: vec![] };
    let names = ["hat local (f32, split 2/2)", "candle quantized_llama Q4_1", "candle quantized_llama f32 matmuls"];
    let mut tok_s: [Vec<f64>; 3] = Default::default();
    let mut ttft: [Vec<f64>; 3] = Default::default();
    for _ in 0..rounds {
        let g = generate(&mut hat, &prompt, &gen_opts, |_| {}).expect("generate");
        tok_s[0].push(g.decode_tokens_per_s());
        ttft[0].push(g.ttft.as_secs_f64() * 1e3);
        for (i, m) in [(1, &mut q4), (2, &mut qf32)] {
            let (first, tbt) = candle_decode(m, &prompt, tokens);
            tok_s[i].push(1.0 / tbt.as_secs_f64());
            ttft[i].push(first.as_secs_f64() * 1e3);
        }
    }
    println!("{} prompt tokens, {tokens} generated, {rounds} interleaved rounds, medians:", prompt.len());
    let base = median(tok_s[0].clone());
    for i in 0..3 {
        let s = median(tok_s[i].clone());
        println!("  {:38} decode {:6.1} tok/s  TTFT {:6.1} ms  ({:.2}x hat)", names[i], s, median(ttft[i].clone()), s / base);
    }
}
