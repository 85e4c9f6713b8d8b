//! HAT over TCP on the real default model (split 2/2): greedy output equals `--mode local` token for
//! token in every mode and wire format; the oracle adapter accepts every draft; the bytes the device
//! sends hold neither the prompt's text nor its token ids; a cloud crash mid-generation is survived
//! with identical tokens; eight concurrent sessions each give their solo output; a cloud computing in
//! bf16 (a GPU cloud's default path) gives `hat` exactly `ushape`'s tokens.

use std::net::{SocketAddr, TcpListener};
use std::sync::OnceLock;
use std::time::Duration;

use candle_core::Device;
use hat_runtime::protocol::{ClientMsg, WireDType, WireFormat, DEFAULT_MAX_FRAME};
use hat_runtime::{
    generate, Adapter, AdapterOrigin, CloudOptions, CloudPackage, CloudServer, DeviceRuntime, GenerateOptions, Generation, LocalPipeline,
    Mode, ServerConfig,
};
use hat_tests::{contains, default_artifacts, open_default, recording_proxy, PROMPTS};

const NEW_TOKENS: usize = 64;

struct Real {
    device: DeviceRuntime,
    cloud: CloudPackage,
    prompts: Vec<Vec<u32>>,
    /// `--mode local` greedy output for each prompt, f32 throughout: the reference.
    local: Vec<Vec<u32>>,
}

fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        let (device, cloud) = open_default();
        let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| device.prompt_ids(p, false).expect("encode")).collect();
        let mut local = Vec::new();
        for p in &prompts {
            let mut pipeline = LocalPipeline::new(&device.package, &cloud).expect("pipeline");
            local.push(generate(&mut pipeline, p, &greedy(NEW_TOKENS), |_| {}).expect("local").tokens);
        }
        Real { device, cloud, prompts, local }
    })
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_tokens: n, ..Default::default() }
}

fn start_cloud() -> CloudServer {
    CloudServer::start(&real().cloud, ServerConfig { log: false, ..Default::default() }, "127.0.0.1:0").expect("cloud server")
}

fn options(server: SocketAddr, dtype: WireDType, zstd: bool) -> CloudOptions {
    let mut o = CloudOptions::new(server.to_string());
    o.wire = WireFormat { dtype, zstd };
    o
}

/// Generates for every prompt on one session.
fn run_prompts(device: &DeviceRuntime, opts: CloudOptions, mode: Mode, n: usize) -> Vec<Generation> {
    run_first_prompts(device, opts, mode, n, PROMPTS.len())
}

/// Generates for the first `count` prompts on one session (variants of a mode that every prompt has
/// already checked: they exercise a mechanism, and four prompts of 64 tokens give it hundreds of rounds).
fn run_first_prompts(device: &DeviceRuntime, opts: CloudOptions, mode: Mode, n: usize, count: usize) -> Vec<Generation> {
    let mut session = device.connect(opts).expect("connect");
    real().prompts.iter().take(count).map(|p| session.generate(p, &greedy(n), mode, |_| {}).expect("generate")).collect()
}

const VARIANT_PROMPTS: usize = 4;

fn assert_matches_local(label: &str, gens: &[Generation]) {
    let r = real();
    for (i, g) in gens.iter().enumerate() {
        let want = &r.local[i][..g.tokens.len()];
        assert_eq!(g.tokens.len(), NEW_TOKENS.min(r.local[i].len()), "{label}, prompt {i}: length");
        assert_eq!(g.tokens, want, "{label}, prompt {i}: tokens differ from --mode local");
    }
    let rounds: usize = gens.iter().map(|g| g.rounds).sum();
    let gained: usize = gens.iter().map(|g| g.tokens.len() - 1).sum();
    eprintln!("{label}: all {} prompts equal --mode local; accept_len {:.3}", gens.len(), gained as f64 / rounds as f64);
}

#[test]
fn f32_wire_ushape_and_hat_draft_1_equal_local() {
    let server = start_cloud();
    let d = &real().device;
    let addr = server.local_addr();
    assert_matches_local("ushape f32", &run_prompts(d, options(addr, WireDType::F32, false), Mode::UShape, NEW_TOKENS));
    assert_matches_local("hat k=1 f32", &run_prompts(d, options(addr, WireDType::F32, false), Mode::Hat { draft_len: 1 }, NEW_TOKENS));
}

#[test]
fn f32_wire_hat_draft_4_and_8_with_and_without_zstd_equal_local() {
    let server = start_cloud();
    let d = &real().device;
    let addr = server.local_addr();
    assert_matches_local("hat k=4 f32+zstd", &run_prompts(d, options(addr, WireDType::F32, true), Mode::Hat { draft_len: 4 }, NEW_TOKENS));
    let k8 = run_first_prompts(d, options(addr, WireDType::F32, false), Mode::Hat { draft_len: 8 }, NEW_TOKENS, VARIANT_PROMPTS);
    assert_matches_local("hat k=8 f32", &k8);
}

/// Rounding hidden states to f16 is a change of the computation, so it may flip a near-tie against
/// the f32 reference. Speculation itself must add nothing: hat over f16 equals ushape over f16.
#[test]
fn f16_wire_hat_equals_ushape_and_divergence_from_f32_is_reported() {
    let server = start_cloud();
    let r = real();
    let addr = server.local_addr();
    let run = |dtype, zstd, mode| run_first_prompts(&r.device, options(addr, dtype, zstd), mode, NEW_TOKENS, VARIANT_PROMPTS);
    let ushape = run(WireDType::F16, false, Mode::UShape);
    let hat = run(WireDType::F16, false, Mode::Hat { draft_len: 4 });
    let hat_zstd = run(WireDType::F16, true, Mode::Hat { draft_len: 4 });
    for i in 0..VARIANT_PROMPTS {
        assert_eq!(hat[i].tokens, ushape[i].tokens, "prompt {i}: hat f16 differs from ushape f16");
        assert_eq!(hat_zstd[i].tokens, ushape[i].tokens, "prompt {i}: hat f16+zstd differs from ushape f16");
        let first_diff = ushape[i].tokens.iter().zip(&r.local[i]).position(|(a, b)| a != b);
        eprintln!(
            "f16 wire, prompt {i}: {}",
            first_diff.map_or("identical to f32 local".into(), |t| format!("diverges from f32 local at token {t}"))
        );
    }
}

#[test]
fn oracle_adapter_accepts_every_draft_and_zero_adapter_almost_none() {
    let r = real();
    let server = start_cloud();
    let addr = server.local_addr();
    let k = 4;
    // 1 token from the prompt's round, then 5 full rounds of k + 1.
    let n = 1 + 5 * (k + 1);
    let oracle = DeviceRuntime::open(&default_artifacts().join("device"))
        .expect("device")
        .with_adapter(Adapter::from_submodel(r.cloud.middle.clone(), AdapterOrigin::Custom("oracle")));
    let gens = run_prompts(&oracle, options(addr, WireDType::F32, false), Mode::Hat { draft_len: k }, n);
    for (i, g) in gens.iter().enumerate() {
        assert_eq!(g.tokens, r.local[i][..n], "oracle, prompt {i}");
        assert_eq!((g.accepted, g.drafted, g.rounds), (5 * k, 5 * k, 5), "oracle, prompt {i}: every draft accepted");
        assert_eq!(g.accept_len(), (k + 1) as f64);
    }

    let zeros = DeviceRuntime::open(&default_artifacts().join("device"))
        .expect("device")
        .with_adapter(Adapter::zeros(&r.device.package.config, &Device::Cpu).expect("zeros"));
    let gens = run_first_prompts(&zeros, options(addr, WireDType::F32, false), Mode::Hat { draft_len: k }, NEW_TOKENS, VARIANT_PROMPTS);
    assert_matches_local("hat k=4, zero adapter", &gens);
    let (accepted, drafted) = gens.iter().fold((0, 0), |(a, d), g| (a + g.accepted, d + g.drafted));
    eprintln!("zero adapter: {accepted} of {drafted} drafts accepted");
    assert!(accepted * 10 < drafted, "the zero adapter accepted {accepted} of {drafted}");
}

/// An adapter that is most of the middle drafts well but not perfectly: rounds mix acceptance and
/// rejection at every offset, where position bookkeeping bugs would show.
#[test]
fn partial_adapter_mixes_accepts_and_rejects_and_stays_exact() {
    let r = real();
    let server = start_cloud();
    let middle_range = r.cloud.middle.layer_range();
    let vb = middle_vb(&default_artifacts().join("cloud/middle.safetensors"));
    let cfg = &r.device.package.config;
    let layers =
        hat_model::Submodel::load(vb, cfg, hat_model::SubmodelKind::Middle, middle_range.start..middle_range.end - 3).expect("layers");
    let device = DeviceRuntime::open(&default_artifacts().join("device"))
        .expect("device")
        .with_adapter(Adapter::from_submodel(layers, AdapterOrigin::Custom("middle minus its last 3 layers")));
    let opts = options(server.local_addr(), WireDType::F32, false);
    let gens = run_first_prompts(&device, opts, Mode::Hat { draft_len: 4 }, NEW_TOKENS, VARIANT_PROMPTS);
    assert_matches_local("hat k=4, partial adapter", &gens);
    let (accepted, drafted) = gens.iter().fold((0, 0), |(a, d), g| (a + g.accepted, d + g.drafted));
    eprintln!("partial adapter: {accepted} of {drafted} drafts accepted");
    assert!(accepted > 0 && accepted < drafted, "wanted a mix, got {accepted} of {drafted}");
}

fn middle_vb(path: &std::path::Path) -> candle_nn::VarBuilder<'static> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).expect("load middle");
    candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &Device::Cpu)
}

#[test]
fn device_sends_neither_prompt_text_nor_token_ids() {
    let r = real();
    let server = start_cloud();
    let (proxy, sent) = recording_proxy(server.local_addr());
    let text = "My secret diagnosis is hypertension; my account number is 4417-1234.";
    let prompt = r.device.prompt_ids(text, true).expect("encode");
    for (mode, dtype) in [(Mode::UShape, WireDType::F32), (Mode::Hat { draft_len: 4 }, WireDType::F16)] {
        let mut session = r.device.connect(options(proxy, dtype, false)).expect("connect");
        let g = session.generate(&prompt, &greedy(16), mode, |_| {}).expect("generate");
        drop(session);
        std::thread::sleep(Duration::from_millis(100));
        let bytes = sent.lock().expect("lock").clone();
        assert!(bytes.len() > 10_000, "the proxy saw the traffic ({} bytes)", bytes.len());
        for word in ["secret", "diagnosis", "hypertension", "4417", "account"] {
            assert!(!contains(&bytes, word.as_bytes()), "{word:?} crossed the network in {mode:?}");
        }
        // Any two consecutive token ids, in every integer encoding a leak could use.
        let ids: Vec<u32> = prompt.iter().chain(&g.tokens).copied().collect();
        for pair in ids.windows(2) {
            let encodings: [Vec<u8>; 4] = [
                pair.iter().flat_map(|t| t.to_le_bytes()).collect(),
                pair.iter().flat_map(|t| t.to_be_bytes()).collect(),
                pair.iter().flat_map(|t| (*t as u16).to_le_bytes()).collect(),
                pair.iter().flat_map(|t| (*t as u16).to_be_bytes()).collect(),
            ];
            for e in encodings {
                assert!(!contains(&bytes, &e), "token ids {pair:?} appear in the device's bytes ({mode:?})");
            }
        }
        // And structurally: every frame is a hello, open, hidden states or close.
        let mut rest = bytes.as_slice();
        let mut frames = 0;
        while !rest.is_empty() {
            let body = hat_runtime::link::read_frame(&mut rest, DEFAULT_MAX_FRAME).expect("well-formed frames");
            ClientMsg::decode(&body).expect("a client message");
            frames += 1;
        }
        eprintln!("{mode:?}: {} bytes in {frames} frames, no text, no token ids", bytes.len());
        sent.lock().expect("lock").clear();
    }
}

#[test]
fn cloud_crash_mid_generation_is_survived_with_identical_tokens() {
    let r = real();
    let server = start_cloud();
    let addr = server.local_addr();
    let mut opts = options(addr, WireDType::F32, false);
    opts.retries = 20;
    opts.backoff = Duration::from_millis(100);
    let mut session = r.device.connect(opts).expect("connect");
    let mut server = Some(server);
    let mut restarted = None;
    let g = session
        .generate(&r.prompts[1], &greedy(NEW_TOKENS), Mode::Hat { draft_len: 4 }, |_| {
            if let Some(s) = server.take().filter(|_| restarted.is_none()) {
                s.shutdown();
                // The cloud comes back on the same address a little later.
                restarted = Some(std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    CloudServer::start(&real().cloud, ServerConfig { log: false, ..Default::default() }, &addr.to_string())
                        .expect("restart")
                }));
            }
        })
        .expect("generation survives the crash");
    let _restarted = restarted.expect("crash happened").join().expect("restart thread");
    assert_eq!(g.tokens, r.local[1], "tokens after reconnecting");
    assert!(g.traffic.reconnects >= 1, "reconnected");
    eprintln!("survived the crash with {} reconnect(s)", g.traffic.reconnects);
}

#[test]
fn unreachable_cloud_is_a_clear_error() {
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let mut opts = CloudOptions::new(port.to_string());
    opts.retries = 2;
    opts.backoff = Duration::from_millis(10);
    let err = real().device.connect(opts).expect_err("nobody listens");
    let msg = err.to_string();
    assert!(msg.contains(&port.to_string()) && msg.contains("3 attempts"), "{msg}");
}

#[test]
fn eight_concurrent_sessions_each_match_their_solo_output() {
    let r = real();
    let server = start_cloud();
    let addr = server.local_addr();
    let n = 24;
    let results: Vec<(usize, Generation)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                s.spawn(move || {
                    let mode = if i % 2 == 0 { Mode::Hat { draft_len: 1 + i % 5 } } else { Mode::UShape };
                    let mut session = r.device.connect(options(addr, WireDType::F32, i % 3 == 0)).expect("connect");
                    (i, session.generate(&r.prompts[i], &greedy(n), mode, |_| {}).expect("generate"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("session thread")).collect()
    });
    for (i, g) in results {
        assert_eq!(g.tokens, r.local[i][..n], "session {i} differs from its solo output");
    }
}

/// The cloud off the CPU-f32 path, as a GPU cloud runs a dense package by default: the middle in
/// bf16 (states cross into bf16 and back once per forward, attention through candle's masked
/// matmuls, batches one session after another). Speculation must add nothing there either: `hat`
/// equals `ushape` against the same cloud. bf16 is a quality trade, so its agreement with the f32
/// reference is reported, not required, beyond the first token.
#[test]
fn bf16_cloud_hat_equals_ushape_and_agreement_with_f32_is_reported() {
    let r = real();
    let cloud = CloudPackage::open_with(&default_artifacts().join("cloud"), &Device::Cpu, Some(candle_core::DType::BF16)).expect("bf16");
    assert_eq!(cloud.middle.dtype(), candle_core::DType::BF16);
    let server = CloudServer::start(&cloud, ServerConfig { log: false, ..Default::default() }, "127.0.0.1:0").expect("cloud server");
    let n = 20;
    let mut session = r.device.connect(options(server.local_addr(), WireDType::F32, false)).expect("connect");
    for i in [0, 6] {
        let ushape = session.generate(&r.prompts[i], &greedy(n), Mode::UShape, |_| {}).expect("ushape");
        let hat = session.generate(&r.prompts[i], &greedy(n), Mode::Hat { draft_len: 4 }, |_| {}).expect("hat");
        assert_eq!(hat.tokens, ushape.tokens, "prompt {i}: hat differs from ushape on the bf16 cloud");
        assert_eq!(ushape.tokens[0], r.local[i][0], "prompt {i}: bf16 changes the first token");
        let same = ushape.tokens.iter().zip(&r.local[i]).take_while(|(a, b)| a == b).count();
        eprintln!("bf16 cloud, prompt {i}: {same} of {n} tokens equal f32 local before the first difference");
    }
}
