//! Decode speed on the default model, side by side in one run: hat's local split pipeline (f32
//! packages), and candle-transformers' quantized_llama on the same GGUF, with native Q4_1 matmuls
//! and with f32 matmuls. Rounds are interleaved so machine noise hits every contender alike.
//!
//! `cargo bench -p hat-tests --bench decode` (env: HAT_BENCH_ROUNDS, HAT_BENCH_TOKENS).

use std::time::Instant;

use candle_core::Device;
use hat_runtime::{generate, CloudPackage, DevicePackage, GenerateOptions, LocalPipeline, SamplingOptions};
use hat_splitter::{load_model, split_model, ModelSource, SplitOptions};
use hat_tests::{default_model_gguf, median, CandleLlama};

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    // As `hat` does: the allocator keeps freed buffers.
    hat_model::cpu::keep_freed_memory();
    let rounds = env_usize("HAT_BENCH_ROUNDS", 5);
    let tokens = env_usize("HAT_BENCH_TOKENS", 64);
    let gguf = default_model_gguf();
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("artifacts");

    let t = Instant::now();
    let model = load_model(&ModelSource::Gguf(gguf), false).expect("load");
    let load_s = t.elapsed().as_secs_f64();
    let opts = SplitOptions::new(2, 2, out.clone());
    let report = split_model(&model, &opts).expect("split");
    let split_s = t.elapsed().as_secs_f64();
    drop(model);
    println!("split (GGUF load + dequantize {load_s:.2} s, write+hash {:.2} s): {split_s:.2} s total", report.elapsed.as_secs_f64());

    let t = Instant::now();
    let device = DevicePackage::open(&out.join("device"), &Device::Cpu).expect("device");
    let cloud = CloudPackage::open(&out.join("cloud"), &Device::Cpu).expect("cloud");
    println!("open packages (read + sha256 check): {:.2} s", t.elapsed().as_secs_f64());
    let mut hat = LocalPipeline::new(&device, &cloud).expect("pipeline");
    let mut q4 = CandleLlama::load(false);
    let mut qf32 = CandleLlama::load(true);

    let prompt = device.tokenizer.encode("The history of the printing press begins in", true).expect("encode").get_ids().to_vec();
    let gen_opts = GenerateOptions { max_tokens: tokens, sampling: SamplingOptions::default(), eos: vec![], ..Default::default() };
    let names = ["hat local (f32, split 2/2)", "candle quantized_llama Q4_1", "candle quantized_llama f32 matmuls"];
    let mut tok_s: [Vec<f64>; 3] = Default::default();
    let mut ttft: [Vec<f64>; 3] = Default::default();
    for _ in 0..rounds {
        let g = generate(&mut hat, &prompt, &gen_opts, |_| {}).expect("generate");
        tok_s[0].push(g.decode_tokens_per_s());
        ttft[0].push(g.ttft.as_secs_f64() * 1e3);
        for (i, m) in [(1, &mut q4), (2, &mut qf32)] {
            let run = m.greedy(&prompt, tokens);
            tok_s[i].push(1.0 / run.tbt.as_secs_f64());
            ttft[i].push(run.ttft.as_secs_f64() * 1e3);
        }
    }
    println!("{} prompt tokens, {tokens} generated, {rounds} interleaved rounds, medians:", prompt.len());
    let base = median(tok_s[0].clone());
    for i in 0..3 {
        let s = median(tok_s[i].clone());
        println!("  {:38} decode {:6.1} tok/s  TTFT {:6.1} ms  ({:.2}x hat)", names[i], s, median(ttft[i].clone()), s / base);
    }
}
