//! The second real model, Gemma 3 270M (base, GGUF Q4_K_M; fetched by `scripts/fetch-model.sh`):
//! everything that differs from Llama at once (Q/K norms, four `(1 + w)` norms per block, a scaled
//! embedding, GELU, sliding-window layers with their own rope base, a SentencePiece tokenizer).
//! Split 2/2 with the file's own quantized types, `--mode local` greedy output equals
//! candle-transformers' `quantized_gemma3` on the same file, and `hat` and `ushape` over TCP equal
//! `local` token for token, chunked prefill included, on a 1000-token prompt, longer than the 512-token window.

use std::sync::OnceLock;

use hat_runtime::{
    generate, Chunking, CloudOptions, CloudPackage, CloudServer, DeviceRuntime, GenerateOptions, LocalPipeline, Mode, ServerConfig,
};
use hat_tests::{bench_prompts, fixture_dir, gemma3_gguf, CandleGemma3};

const NEW_TOKENS: usize = 48;

struct Real {
    _dir: tempfile::TempDir,
    model: hat_splitter::LoadedModel,
    /// The split users run: 2/2, the file's own quantized types on both sides.
    device: DeviceRuntime,
    cloud: CloudPackage,
}

fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        let dir = fixture_dir();
        let model = hat_splitter::load_model(&hat_splitter::ModelSource::Gguf(gemma3_gguf()), false).expect("load Gemma 3");
        let (device, cloud) = split(&model, &dir.path().join("keep"), hat_model::Quant::Keep);
        Real { _dir: dir, model, device, cloud }
    })
}

fn split(model: &hat_splitter::LoadedModel, out: &std::path::Path, quant: hat_model::Quant) -> (DeviceRuntime, CloudPackage) {
    let mut opts = hat_splitter::SplitOptions::new(2, 2, out);
    opts.device_quant = quant;
    opts.cloud_quant = quant;
    hat_splitter::split_model(model, &opts).expect("split Gemma 3");
    let device = DeviceRuntime::open(&out.join("device")).expect("device runtime");
    let cloud = CloudPackage::open(&out.join("cloud"), &candle_core::Device::Cpu).expect("cloud package");
    (device, cloud)
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_tokens: n, ..Default::default() }
}

fn local(device: &DeviceRuntime, cloud: &CloudPackage, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut pipeline = LocalPipeline::new(&device.package, cloud).expect("pipeline");
    generate(&mut pipeline, prompt, &greedy(n), |_| {}).expect("local").tokens
}

/// The package split in f32, run whole on the device, gives the tokens of candle-transformers'
/// Gemma 3 on the same dequantized weights; the `keep` split's tokens are printed beside them.
#[test]
fn local_greedy_equals_candle_gemma3() {
    let r = real();
    let dir = fixture_dir();
    let (device, cloud) = split(&r.model, &dir.path().join("f32"), hat_model::Quant::F32);
    let mut reference = CandleGemma3::new(&r.model.hf_config, &r.model.tensors);
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
        "Once upon a time, in a small village by the sea,",
        "The three laws of thermodynamics are",
    ];
    for text in prompts {
        let prompt = device.prompt_ids(text, false).expect("encode");
        assert_eq!(prompt[0], 2, "{text:?}: the tokenizer starts with <bos>");
        let ours = local(&device, &cloud, &prompt, NEW_TOKENS);
        let want = reference.greedy(&prompt, NEW_TOKENS).tokens;
        let keep = local(&r.device, &r.cloud, &prompt, NEW_TOKENS);
        let same = |a: &[u32]| a.iter().zip(&want).take_while(|(x, y)| x == y).count();
        let show = |t: &[u32]| device.package.tokenizer.decode(t, false).unwrap_or_default();
        println!("{text:?}\n  f32:  {:?}\n  keep: {:?} ({} tokens as f32)", show(&ours), show(&keep), same(&keep));
        assert_eq!(ours.len(), NEW_TOKENS, "{text:?}: stopped early");
        assert_eq!(ours, want, "{text:?}: {} tokens agree", same(&ours));
    }
}

/// A prompt past the sliding window, over TCP: `ushape` and `hat` (whole and chunked prefill) give
/// `local`'s tokens.
#[test]
fn hat_and_ushape_over_tcp_equal_local_past_the_window() {
    let r = real();
    let text: String =
        bench_prompts().into_iter().filter(|(_, kind, _)| kind == "long").map(|(_, _, t)| t).collect::<Vec<_>>().join("\n\n");
    let mut prompt = r.device.prompt_ids(&format!("{text}\n\n{text}"), false).expect("encode");
    // Past the window, what a sliding layer keeps beyond it and its first buffer (832 positions),
    // so the caches drop keys, and each next generation in the same session must start afresh.
    prompt.truncate(1000);
    assert_eq!(prompt.len(), 1000, "the long prompts give 1000 tokens");
    let n = 24;
    let want = local(&r.device, &r.cloud, &prompt, n);
    let server = CloudServer::start(&r.cloud, ServerConfig { log: false, ..Default::default() }, "127.0.0.1:0").expect("cloud");
    let mut session = r.device.connect(CloudOptions::new(server.local_addr().to_string())).expect("connect");
    for (mode, chunking) in [
        (Mode::UShape, Chunking::Whole),
        (Mode::Hat { draft_len: 3 }, Chunking::Whole),
        (Mode::Hat { draft_len: 3 }, Chunking::Fixed(96)),
        (Mode::UShape, Chunking::Fixed(257)),
    ] {
        let label = format!("{} with {chunking:?}", mode.name());
        session.set_chunking(chunking);
        let got = session.generate(&prompt, &greedy(n), mode, |_| {}).expect("generate").tokens;
        assert_eq!(got, want, "{label}");
    }
}

/// The GGUF's SentencePiece vocabulary round-trips text, keeps control tokens whole, and falls back
/// to bytes for characters it has no piece for.
#[test]
fn sentencepiece_tokenizer_round_trips() {
    let r = real();
    for text in
        ["Hello world", "  two spaces, then\ttab\nand newline", "naïve café, 東京, emoji 🦀", "<start_of_turn>user\nhi<end_of_turn>"]
    {
        let ids = r.device.prompt_ids(text, false).expect("encode");
        assert_eq!(r.device.package.tokenizer.decode(&ids[1..], false).expect("decode"), text, "{ids:?}");
    }
    let ids = r.device.prompt_ids("<start_of_turn>user", false).expect("encode");
    assert_eq!(ids[1], 105, "<start_of_turn> is one control token: {ids:?}");
    let ids = r.device.prompt_ids("The capital of France is", false).expect("encode");
    assert_eq!(ids.len(), 6, "<bos> and five whole words: {ids:?}");
}
