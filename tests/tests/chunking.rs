//! Chunked, pipelined prefill on the real default model gives exactly the tokens of an unchunked one,
//! at chunk sizes that divide the prompt and sizes that do not, in this process and over TCP. Also:
//! the shipped benchmark prompts are as short and as long as they claim, and the cloud's token
//! baselines reproduce the unsplit model.

use std::sync::{Arc, OnceLock};

use hat_runtime::baseline::{generate_cloud, generate_sd, SmallModel, TokenCloud, WholeModel};
use hat_runtime::protocol::{WireDType, WireFormat};
use hat_runtime::{
    generate, generate_speculative, Chunking, CloudOptions, CloudPackage, CloudServer, DeviceRuntime, Drafter, GenerateOptions,
    LocalPipeline, Mode, ServerConfig,
};
use hat_tests::{bench_prompts, long_prompt, open_default};

const NEW_TOKENS: usize = 24;
/// 402 = 2 x 3 x 67: 67 and 201 divide it, the others do not.
const PROMPT_LEN: usize = 402;
const CHUNKS: [usize; 6] = [7, 64, 67, 96, 201, 401];

struct Real {
    device: DeviceRuntime,
    cloud: CloudPackage,
    /// A real passage, cut to `PROMPT_LEN` tokens.
    prompt: Vec<u32>,
}

fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        let (device, cloud) = open_default();
        let prompt = long_prompt(&device, PROMPT_LEN);
        Real { device, cloud, prompt }
    })
}

fn greedy() -> GenerateOptions {
    GenerateOptions { max_tokens: NEW_TOKENS, ..Default::default() }
}

/// HAT decoding in one process with the prompt sent in chunks of `chunk`.
fn local_hat(chunk: Option<usize>) -> Vec<u32> {
    let r = real();
    let mut pipeline = LocalPipeline::new(&r.device.package, &r.cloud).expect("pipeline");
    let mut drafter = Drafter::new(r.device.adapter().clone());
    let opts = GenerateOptions { prefill_chunk: chunk, ..greedy() };
    generate_speculative(&mut pipeline, &mut drafter, &r.prompt, &opts, 3, |_| {}).expect("generate").tokens
}

#[test]
fn chunked_prefill_gives_the_unchunked_tokens_in_process() {
    let r = real();
    let whole = local_hat(None);
    let mut pipeline = LocalPipeline::new(&r.device.package, &r.cloud).expect("pipeline");
    let reference = generate(&mut pipeline, &r.prompt, &greedy(), |_| {}).expect("one token per step").tokens;
    assert_eq!(whole, reference, "HAT with the prompt in one piece equals plain decoding");
    for chunk in CHUNKS {
        let got = local_hat(Some(chunk));
        let first_diff = got.iter().zip(&whole).position(|(a, b)| a != b);
        println!("chunk {chunk:>3} ({} chunks): first differing token {first_diff:?}", PROMPT_LEN.div_ceil(chunk));
        assert_eq!(got, whole, "chunk size {chunk}");
    }
}

#[test]
fn chunked_prefill_gives_the_unchunked_tokens_over_tcp() {
    let r = real();
    let server = CloudServer::start(&r.cloud, ServerConfig { log: false, ..Default::default() }, "127.0.0.1:0").expect("cloud");
    for dtype in [WireDType::F32, WireDType::F16] {
        let mut opts = CloudOptions::new(server.local_addr().to_string());
        opts.wire = WireFormat { dtype, zstd: false };
        let mut session = r.device.connect(opts).expect("connect");
        let whole = session.generate(&r.prompt, &greedy(), Mode::Hat { draft_len: 3 }, |_| {}).expect("whole").tokens;
        for chunk in [64, 67, 96] {
            session.set_chunking(Chunking::Fixed(chunk));
            let got = session.generate(&r.prompt, &greedy(), Mode::Hat { draft_len: 3 }, |_| {}).expect("chunked");
            assert_eq!(session.last_chunk(), Some(chunk));
            assert_eq!(got.tokens, whole, "{dtype:?} chunk {chunk}");
            // Every position crossed the network exactly once in each direction during prefill.
            let rows_up = got.prefill_traffic.bytes_up as usize / (r.device.package.config.hidden_size * dtype.bytes());
            assert_eq!(rows_up, PROMPT_LEN, "{dtype:?} chunk {chunk}: prompt positions uploaded");
        }
        session.set_chunking(Chunking::Whole);
        if dtype == WireDType::F32 {
            assert_eq!(whole, local_hat(None), "f32 over TCP equals in-process");
        }
    }
}

#[test]
fn shipped_bench_prompts_are_short_and_long_as_labelled() {
    let r = real();
    let prompts = bench_prompts();
    assert!(prompts.iter().filter(|p| p.1 == "short").count() >= 4 && prompts.iter().filter(|p| p.1 == "long").count() >= 3);
    for (name, kind, text) in prompts {
        let n = r.device.prompt_ids(&text, true).expect("encode").len();
        match kind.as_str() {
            "short" => assert!(n < 64, "{name}: {n} tokens"),
            "long" => assert!(n > 1000 && n < 2048, "{name}: {n} tokens"),
            other => panic!("{name}: unknown kind {other}"),
        }
    }
}

#[test]
fn token_baselines_reproduce_the_unsplit_model_and_are_refused_without_it() {
    let r = real();
    let prompt = &r.prompt[..120];
    let mut pipeline = LocalPipeline::new(&r.device.package, &r.cloud).expect("pipeline");
    let reference = generate(&mut pipeline, prompt, &greedy(), |_| {}).expect("local").tokens;

    let plain = CloudServer::start(&r.cloud, ServerConfig { log: false, ..Default::default() }, "127.0.0.1:0").expect("cloud");
    let opts = CloudOptions::new(plain.local_addr().to_string());
    let fp = &r.device.package.manifest.fingerprint;
    let err = TokenCloud::connect(&opts, fp, 2048).and_then(|mut c| c.greedy(&[1, 2, 3], 0, true)).expect_err("no baselines here");
    assert!(err.to_string().contains("--token-baselines"), "{err}");

    let whole = Arc::new(WholeModel::new(&r.device.package, &r.cloud).expect("whole model"));
    let cfg = ServerConfig { log: false, baselines: Some(whole), ..Default::default() };
    let server = CloudServer::start(&r.cloud, cfg, "127.0.0.1:0").expect("cloud with baselines");
    let opts = CloudOptions::new(server.local_addr().to_string());
    let mut cloud = TokenCloud::connect(&opts, fp, 2048).expect("connect");
    let got = generate_cloud(&mut cloud, prompt, &greedy(), |_| {}).expect("cloud mode");
    assert_eq!(got.tokens, reference, "cloud mode");
    let mut small = SmallModel::new(&r.device.package, r.device.adapter().clone());
    let sd = generate_sd(&mut cloud, &mut small, prompt, &greedy(), 4, |_| {}).expect("sd mode");
    assert_eq!(sd.tokens, reference, "sd mode");
    assert!(sd.rounds > 0 && sd.drafted >= sd.rounds, "sd drafted: {} drafts in {} rounds", sd.drafted, sd.rounds);
    // The sd baseline moves token ids, not hidden states: a few bytes per token.
    assert!(sd.traffic.bytes_up < 100 * (NEW_TOKENS as u64 + prompt.len() as u64));
}
