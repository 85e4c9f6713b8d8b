//! The cloud's batched verification engine on the real default model (split 2/2): a session's rows
//! give the same bits in a batch as alone, at every cached length, after rollbacks, in f32 and in
//! q8_0; sessions through a batching cloud give `--mode local`'s tokens, and 64 at once give their
//! solo tokens; the KV budget refuses a session it cannot hold and admits it once room is free. Off
//! the CPU's f32 path (bf16 here, a GPU's default), a verification round runs row by row and equals
//! one-row steps bit for bit.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use candle_core::{Device, Tensor};
use hat_model::{Quant, Submodel};
use hat_runtime::protocol::{ClientMsg, ErrorCode, ServerMsg, PROTOCOL_VERSION};
use hat_runtime::{
    generate, BatchConfig, CloudOptions, CloudPackage, CloudServer, DevicePackage, DeviceRuntime, GenerateOptions, LocalPipeline, Mode,
    ServerConfig,
};
use hat_splitter::{load_model, split_model, ModelSource, SplitOptions};
use hat_tests::{default_artifacts, default_model_gguf, max_abs_diff, tiny_artifacts, TinyLlama, PROMPTS};

fn q8_artifacts() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let dir = hat_tests::fixture_dir();
        let out = dir.path().join("q8_0");
        let model = load_model(&ModelSource::Gguf(default_model_gguf()), false).expect("load default model");
        let opts = SplitOptions { device_quant: Quant::Q8_0, cloud_quant: Quant::Q8_0, ..SplitOptions::new(2, 2, out.clone()) };
        split_model(&model, &opts).expect("split");
        (dir, out)
    })
    .1
}

fn states(rows: usize, hidden: usize, seed: f32) -> Tensor {
    // Hidden states of the right scale, with one large dimension as the real model has.
    let x = Tensor::randn(0f32, 1.0, (1, rows, hidden), &Device::Cpu).expect("randn");
    let big = Tensor::zeros((1, rows, hidden), candle_core::DType::F32, &Device::Cpu).expect("zeros");
    let big =
        big.slice_assign(&[0..1, 0..rows, 7..8], &Tensor::full(100f32 + seed, (1, rows, 1), &Device::Cpu).expect("full")).expect("set");
    (x + big).expect("add")
}

/// Three rounds over five sessions: prefill of different lengths, verification-sized steps, then
/// rollbacks (a message that starts before the cached end) with one session idle and one sending a
/// round with leaves (rows that see only part of the round). Returns the
/// largest difference between a batched row and the same row computed alone, and the largest
/// magnitude in the solo rows.
fn batched_minus_solo(middle: &Submodel) -> (f32, f32) {
    let hidden = middle.config().hidden_size;
    let rounds: [&[(usize, usize, usize)]; 3] = [
        // (session, start, rows)
        &[(0, 0, 17), (1, 0, 5), (2, 0, 1), (3, 0, 9), (4, 0, 32)],
        &[(0, 17, 5), (1, 5, 1), (2, 1, 3), (3, 9, 1), (4, 32, 2)],
        &[(0, 19, 2), (1, 6, 5), (2, 2, 1), (4, 30, 4)],
    ];
    let mut batched: Vec<_> = (0..5).map(|_| middle.new_cache()).collect();
    let mut solo: Vec<_> = (0..5).map(|_| middle.new_cache()).collect();
    let (mut worst, mut scale) = (0f32, 0f32);
    for (r, round) in rounds.iter().enumerate() {
        let inputs: Vec<(Tensor, usize)> =
            round.iter().map(|&(s, start, rows)| (states(rows, hidden, (r * 5 + s) as f32), start)).collect();
        let sessions: Vec<usize> = round.iter().map(|&(s, _, _)| s).collect();
        // Session 1's last round: a chain of 3 rows, a leaf beside its second draft, one past its end.
        let depths: Vec<Option<&[usize]>> = sessions.iter().map(|&s| (r == 2 && s == 1).then_some(&[0usize, 1, 2, 1, 3][..])).collect();
        let mut refs: Vec<_> = batched.iter_mut().enumerate().filter(|(i, _)| sessions.contains(i)).map(|(_, c)| c).collect();
        let outs = middle.forward_layers_batch(&inputs, &depths, &mut refs).expect("batched forward");
        for (((out, (x, start)), &s), t) in outs.iter().zip(&inputs).zip(&sessions).zip(&depths) {
            let alone = middle.forward_layers_tree(x, *start, *t, &mut solo[s]).expect("solo forward");
            assert_eq!(out.dims(), alone.dims());
            worst = worst.max(max_abs_diff(out, &alone));
            scale = scale.max(alone.abs().and_then(|a| a.max_all()).and_then(|m| m.to_scalar::<f32>()).expect("max"));
        }
    }
    (worst, scale)
}

/// q8_0 (the default package): bit for bit. Every matmul is candle's quantized kernel, which
/// quantizes and multiplies each input row on its own.
#[test]
fn a_batched_row_is_bit_identical_to_the_row_alone_in_q8_0() {
    let cloud = CloudPackage::open(&q8_artifacts().join("cloud"), &Device::Cpu).expect("cloud");
    let (diff, _) = batched_minus_solo(&cloud.middle);
    assert_eq!(diff, 0.0, "q8_0: batched rows differ from solo rows by {diff}");
}

/// f32: candle's dense matmul (the gemm crate) picks its kernel and blocking by the number of rows,
/// so a row's last bits depend on how many rows it is multiplied with. That was already so without
/// batching (a verification round of k + 1 rows against a one-row decode step); batching adds other
/// sessions' rows. The difference stays at float rounding (measured 7-9e-4 on rows of magnitude
/// about 230, 3-4e-6 relative; the bound is 1e-5), and greedy tokens through a batching cloud equal `--mode
/// local` (`hat_cloud.rs`, 8 concurrent sessions on this f32 package).
#[test]
fn a_batched_row_stays_within_rounding_of_the_row_alone_in_f32() {
    let cloud = CloudPackage::open(&default_artifacts().join("cloud"), &Device::Cpu).expect("cloud");
    let (diff, scale) = batched_minus_solo(&cloud.middle);
    assert!(diff <= 1e-5 * scale, "f32: batched rows differ from solo rows by {diff} at magnitude {scale}");
}

/// Largest value of `metric` (a histogram's `_sum` and `_count`) in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_tokens: n, ..Default::default() }
}

/// Sessions on threads, each generating its prompt through `addr`.
fn concurrent(device: &DeviceRuntime, addr: String, prompts: &[Vec<u32>], n: usize, mode: Mode) -> Vec<Vec<u32>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let addr = addr.clone();
                scope.spawn(move || {
                    let mut session = device.connect(CloudOptions::new(addr)).expect("connect");
                    session.generate(p, &greedy(n), mode, |_| {}).expect("generate").tokens
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("session thread")).collect()
    })
}

#[test]
fn sessions_through_a_batching_cloud_equal_local_and_64_at_once_equal_their_solo_output() {
    let dir = q8_artifacts();
    let device = DeviceRuntime::open(&dir.join("device")).expect("device");
    let cloud = CloudPackage::open(&dir.join("cloud"), &Device::Cpu).expect("cloud");
    let package = DevicePackage::open(&dir.join("device"), &Device::Cpu).expect("device package");
    // A wide window, so concurrent sessions surely share batches.
    let batch = BatchConfig { window: Duration::from_millis(20), ..BatchConfig::default() };
    let cfg = ServerConfig { log: false, max_sessions: 64, max_context: 256, batch: Some(batch), ..Default::default() };
    let server = CloudServer::start(&cloud, cfg, "127.0.0.1:0").expect("cloud");
    let addr = server.local_addr().to_string();

    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| device.prompt_ids(p, true).expect("encode")).collect();
    let local: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut pipeline = LocalPipeline::new(&package, &cloud).expect("pipeline");
            generate(&mut pipeline, p, &greedy(24), |_| {}).expect("local").tokens
        })
        .collect();
    for mode in [Mode::UShape, Mode::Hat { draft_len: 4 }] {
        let got = concurrent(&device, addr.clone(), &prompts, 24, mode);
        assert_eq!(got, local, "{mode:?}: batched sessions differ from --mode local");
    }

    // 64 sessions at once: 8 copies of each prompt, each must give its prompt's solo tokens.
    let many: Vec<Vec<u32>> = (0..64).map(|i| prompts[i % prompts.len()].clone()).collect();
    let got = concurrent(&device, addr.clone(), &many, 8, Mode::UShape);
    for (i, tokens) in got.iter().enumerate() {
        assert_eq!(tokens[..], local[i % prompts.len()][..8], "session {i} of 64");
    }
    let text = server.metrics().encode();
    let (sum, count) = (metric(&text, "hat:cloud_batch_sessions_sum"), metric(&text, "hat:cloud_batch_sessions_count"));
    assert!(count > 0.0 && sum / count > 1.5, "batches held {sum} sessions in {count} forwards: the engine did not batch");
}

/// A raw client: hello, then open a session of `context` positions; the reply to the open.
fn open_session(addr: std::net::SocketAddr, fingerprint: &str, context: u32) -> (std::net::TcpStream, ServerMsg) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut call = |m: ClientMsg| {
        s.write_all(&hat_runtime::protocol::frame(&m.encode())).expect("write");
        ServerMsg::decode(&hat_runtime::link::read_frame(&mut s, 1 << 20).expect("reply")).expect("message")
    };
    let hello = ClientMsg::Hello { version: PROTOCOL_VERSION, fingerprint: fingerprint.into(), auth_token: None };
    assert!(matches!(call(hello), ServerMsg::Welcome { .. }));
    let reply = call(ClientMsg::Open { max_context: context });
    (s, reply)
}

#[test]
fn the_kv_budget_refuses_a_session_it_cannot_hold_and_admits_it_once_room_is_free() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tiny_artifacts(tmp.path(), &TinyLlama::default(), 1, 1);
    let cloud = CloudPackage::open(&out.join("cloud"), &Device::Cpu).expect("cloud");
    let per_position = hat_runtime::server::kv_bytes_per_position(&cloud.middle);
    // Room for two sessions of 64 positions, not three.
    let cfg = ServerConfig { log: false, kv_budget: Some(per_position * 64 * 2 + per_position * 10), ..Default::default() };
    let server = CloudServer::start(&cloud, cfg, "127.0.0.1:0").expect("cloud");
    let fp = cloud.manifest.fingerprint.clone();
    let (a, ra) = open_session(server.local_addr(), &fp, 64);
    let (_b, rb) = open_session(server.local_addr(), &fp, 64);
    assert!(matches!(ra, ServerMsg::Opened { max_context: 64, .. }), "{ra:?}");
    assert!(matches!(rb, ServerMsg::Opened { max_context: 64, .. }), "{rb:?}");
    let (_c, rc) = open_session(server.local_addr(), &fp, 64);
    match rc {
        ServerMsg::Error { code: ErrorCode::Busy, message } => assert!(message.contains("KV budget"), "{message}"),
        other => panic!("wanted busy, got {other:?}"),
    }
    // A smaller session still fits the remainder.
    let (_d, rd) = open_session(server.local_addr(), &fp, 8);
    assert!(matches!(rd, ServerMsg::Opened { .. }), "{rd:?}");
    drop(a);
    // The closed session's reservation comes back (the server sees the close shortly).
    let mut admitted = false;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(20));
        if let (_e, ServerMsg::Opened { .. }) = open_session(server.local_addr(), &fp, 64) {
            admitted = true;
            break;
        }
    }
    assert!(admitted, "the budget was not given back when a session closed");
}

/// Off the CPU's f32 path (here the middle in bf16 on the CPU, as a GPU cloud runs a dense package)
/// a verification-sized forward runs its rows one at a time: its output, and the cache it leaves,
/// equal those of one-row steps bit for bit, so `hat` gets `ushape`'s bits from the same cloud. The
/// states come back in the caller's dtype.
#[test]
fn off_the_cpu_f32_path_a_verification_round_equals_one_row_steps() {
    let cloud = CloudPackage::open_with(&default_artifacts().join("cloud"), &Device::Cpu, Some(candle_core::DType::BF16)).expect("bf16");
    let middle = &cloud.middle;
    let hidden = middle.config().hidden_size;
    let prompt = states(9, hidden, 0.0);
    let round = states(5, hidden, 1.0);
    let (mut whole, mut steps) = (middle.new_cache(), middle.new_cache());
    middle.forward_layers(&prompt, 0, &mut whole).expect("prefill");
    middle.forward_layers(&prompt, 0, &mut steps).expect("prefill");
    let at_once = middle.forward_layers(&round, 9, &mut whole).expect("round");
    assert_eq!(at_once.dtype(), candle_core::DType::F32, "states come back in the caller's dtype");
    let one_by_one: Vec<Tensor> =
        (0..5).map(|i| middle.forward_layers(&round.narrow(1, i, 1).expect("row"), 9 + i, &mut steps).expect("step")).collect();
    assert_eq!(max_abs_diff(&at_once, &Tensor::cat(&one_by_one, 1).expect("cat")), 0.0);
    // The caches agree too: a rollback to the middle of the round and one more row give the same bits.
    let next = states(1, hidden, 2.0);
    let a = middle.forward_layers(&next, 12, &mut whole).expect("after rollback");
    let b = middle.forward_layers(&next, 12, &mut steps).expect("after rollback");
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}
