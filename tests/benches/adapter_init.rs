//! Which middle layer makes the best initial adapter? For every middle layer of the default model
//! (split 2/2), the adapter is a copy of that layer; each drafts with `--draft-len 4` against the
//! middle submodel in this process, greedy, on a few prompts. Prints the mean tokens per round
//! (accept_len) for each layer, plus the zero adapter (skip the middle) and the oracle (the middle
//! itself) as floor and ceiling.
//!
//! `cargo bench -p hat-tests --bench adapter_init` (env: HAT_BENCH_TOKENS, default 24).

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use hat_model::{Submodel, SubmodelKind};
use hat_runtime::{generate_speculative, Adapter, AdapterOrigin, CloudPackage, DevicePackage, Drafter, GenerateOptions, LocalPipeline};
use hat_splitter::{load_model, split_model, ModelSource, SplitOptions};
use hat_tests::default_model_gguf;

const PROMPTS: [&str; 3] = [
    "The history of the printing press begins in",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nGive me three tips for sleeping better.<|im_end|>\n<|im_start|>assistant\n",
];

fn main() {
    // As `hat` does: the allocator keeps freed buffers.
    hat_model::cpu::keep_freed_memory();
    let tokens: usize = std::env::var("HAT_BENCH_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("artifacts");
    let model = load_model(&ModelSource::Gguf(default_model_gguf()), false).expect("load");
    split_model(&model, &SplitOptions::new(2, 2, out.clone())).expect("split");
    let cfg = model.config.clone();
    let middle_range = 2..cfg.num_layers - 2;
    let dev = Device::Cpu;
    let device = DevicePackage::open(&out.join("device"), &dev).expect("device");
    let cloud = CloudPackage::open(&out.join("cloud"), &dev).expect("cloud");
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| device.tokenizer.encode(*p, false).expect("encode").get_ids().to_vec()).collect();
    let opts = GenerateOptions { max_tokens: tokens, ..Default::default() };

    let mut candidates = vec![Adapter::zeros(&cfg, &dev).expect("zeros")];
    for l in middle_range.clone() {
        let vb = VarBuilder::from_tensors(model.tensors.clone(), DType::F32, &dev);
        let layer = Submodel::load(vb, &cfg, SubmodelKind::Middle, l..l + 1).expect("layer");
        candidates.push(Adapter::from_submodel(layer, AdapterOrigin::MiddleLayer(l)));
    }
    candidates.push(Adapter::from_submodel(cloud.middle.clone(), AdapterOrigin::Custom("oracle (the middle submodel)")));
    drop(model);

    println!("draft-len 4, {tokens} tokens, {} prompts; accept_len = tokens per round", prompts.len());
    let mut best = (0.0, String::new());
    for adapter in candidates {
        let name = adapter.origin.to_string();
        let middle_layer = matches!(adapter.origin, AdapterOrigin::MiddleLayer(_));
        let mut drafter = Drafter::new(adapter);
        let (mut gained, mut rounds) = (0usize, 0usize);
        for p in &prompts {
            let mut pipeline = LocalPipeline::new(&device, &cloud).expect("pipeline");
            let g = generate_speculative(&mut pipeline, &mut drafter, p, &opts, 4, |_| {}).expect("generate");
            gained += g.tokens.len() - 1;
            rounds += g.rounds;
        }
        let accept_len = gained as f64 / rounds as f64;
        println!("{name:40} accept_len {accept_len:.3}");
        if middle_layer && accept_len > best.0 {
            best = (accept_len, name);
        }
    }
    println!("best middle layer: {} ({:.3})", best.1, best.0);
}
