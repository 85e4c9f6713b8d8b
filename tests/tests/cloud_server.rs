//! The cloud server against hostile and mistaken clients, on a tiny random Llama: every bad frame
//! gets an error frame and the server keeps serving others. Also: speculative sampling draws the
//! model's own distribution.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use candle_core::{Device, Tensor};
use hat_runtime::link::read_frame;
use hat_runtime::protocol::{frame, ClientMsg, ErrorCode, HiddenFrame, ServerMsg, WireDType, WireFormat, PROTOCOL_VERSION};
use hat_runtime::{
    generate_speculative, Adapter, CloudOptions, CloudPackage, CloudServer, DevicePackage, Drafter, GenerateOptions, LocalMiddle,
    LocalPipeline, Middle, RemoteMiddle, Sampler, SamplingOptions, ServerConfig,
};
use hat_tests::{chi_square, second_token_distribution, tiny_artifacts, TinyLlama};

struct Tiny {
    _dir: tempfile::TempDir,
    device: DevicePackage,
    cloud: CloudPackage,
}

fn tiny() -> Tiny {
    let dir = tempfile::tempdir().expect("tmp");
    let out = tiny_artifacts(dir.path(), &TinyLlama::default(), 1, 1);
    let device = DevicePackage::open(&out.join("device"), &Device::Cpu).expect("device");
    let cloud = CloudPackage::open(&out.join("cloud"), &Device::Cpu).expect("cloud");
    Tiny { _dir: dir, device, cloud }
}

fn serve(t: &Tiny, cfg: ServerConfig) -> CloudServer {
    CloudServer::start(&t.cloud, ServerConfig { log: false, ..cfg }, "127.0.0.1:0").expect("server")
}

/// A hand-driven client for sending anything at all.
struct Raw(TcpStream);

impl Raw {
    fn connect(server: &CloudServer) -> Self {
        let s = TcpStream::connect(server.local_addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        Raw(s)
    }
    fn send_bytes(&mut self, b: &[u8]) {
        self.0.write_all(b).expect("write");
    }
    fn send(&mut self, m: &ClientMsg) {
        self.send_bytes(&frame(&m.encode()));
    }
    fn recv(&mut self) -> ServerMsg {
        ServerMsg::decode(&read_frame(&mut self.0, 1 << 20).expect("a reply frame")).expect("a server message")
    }
    fn expect_error(&mut self, code: ErrorCode) -> String {
        match self.recv() {
            ServerMsg::Error { code: c, message } if c == code => message,
            other => panic!("wanted a {code:?} error, got {other:?}"),
        }
    }
    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
    fn hello(&mut self, fingerprint: &str, token: Option<&str>) {
        self.send(&ClientMsg::Hello { version: PROTOCOL_VERSION, fingerprint: fingerprint.into(), auth_token: token.map(Into::into) });
    }
}

fn states(rows: usize, hidden: usize) -> Tensor {
    Tensor::randn(0f32, 1.0, (1, rows, hidden), &Device::Cpu).expect("randn")
}

fn forward(start: usize, x: &Tensor) -> ClientMsg {
    ClientMsg::Forward(HiddenFrame::encode(x, start, WireFormat { dtype: WireDType::F32, zstd: false }).expect("encode"))
}

/// After the abuse, a well-behaved device still gets exactly the middle submodel's output.
fn assert_still_serving(t: &Tiny, server: &CloudServer, token: Option<&str>) {
    let mut opts = CloudOptions::new(server.local_addr().to_string());
    opts.wire = WireFormat { dtype: WireDType::F32, zstd: false };
    opts.auth_token = token.map(Into::into);
    let hidden = t.device.config.hidden_size;
    let mut remote = RemoteMiddle::connect(opts, &t.device.manifest.fingerprint, hidden, 64, &Device::Cpu).expect("good client connects");
    let mut local = LocalMiddle::new(t.cloud.middle.clone());
    let x = states(5, hidden);
    let a = remote.forward(0, &x).expect("remote");
    let b = local.forward(0, &x).expect("local");
    assert_eq!(hat_tests::max_abs_diff(&a, &b), 0.0);
}

#[test]
fn garbage_and_oversized_frames_get_an_error_and_the_server_serves_on() {
    let t = tiny();
    let server = serve(&t, ServerConfig::default());
    // An HTTP request: "GET " read as a length is over the frame cap.
    let mut c = Raw::connect(&server);
    c.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(c.expect_error(ErrorCode::BadFrame).contains("bad frame"));
    assert!(c.closed());
    // A length prefix of 2 GB, with nothing behind it: refused before any allocation.
    let mut c = Raw::connect(&server);
    c.send_bytes(&0x7fff_ffffu32.to_be_bytes());
    c.expect_error(ErrorCode::BadFrame);
    assert!(c.closed());
    // A well-framed body that is not a hat message.
    let mut c = Raw::connect(&server);
    c.send_bytes(&frame(b"\x42 random bytes"));
    assert!(c.expect_error(ErrorCode::BadFrame).contains("hello"));
    assert!(c.closed());
    // Truncated random bytes after a good handshake: an error, and the connection stays usable.
    let mut c = Raw::connect(&server);
    c.hello(&t.device.manifest.fingerprint, None);
    assert!(matches!(c.recv(), ServerMsg::Welcome { .. }));
    c.send_bytes(&frame(&[3, 1, 2]));
    c.expect_error(ErrorCode::BadFrame);
    c.send(&ClientMsg::Open { max_context: 16 });
    assert!(matches!(c.recv(), ServerMsg::Opened { .. }));
    assert_still_serving(&t, &server, None);
}

#[test]
fn bad_hidden_states_and_positions_are_refused_per_frame() {
    let t = tiny();
    let server = serve(&t, ServerConfig { max_context: 32, ..Default::default() });
    let hidden = t.device.config.hidden_size;
    let mut c = Raw::connect(&server);
    c.hello(&t.device.manifest.fingerprint, None);
    assert!(matches!(c.recv(), ServerMsg::Welcome { trees: true, .. }), "a CPU cloud verifies rounds with leaves");
    c.send(&forward(0, &states(2, hidden)));
    c.expect_error(ErrorCode::NoSession);
    c.send(&ClientMsg::Open { max_context: 1000 });
    match c.recv() {
        ServerMsg::Opened { max_context, .. } => {
            assert_eq!(max_context, 32, "capped to the server's --max-context")
        }
        other => panic!("{other:?}"),
    }
    // Wrong hidden size.
    c.send(&forward(0, &states(2, hidden * 2)));
    assert!(c.expect_error(ErrorCode::BadHidden).contains("hidden size"));
    // Payload shorter than its header says.
    let mut short = HiddenFrame::encode(&states(2, hidden), 0, WireFormat { dtype: WireDType::F16, zstd: false }).expect("encode");
    short.rows = 3;
    c.send(&ClientMsg::Forward(short));
    c.expect_error(ErrorCode::BadHidden);
    // Past the context.
    c.send(&forward(0, &states(33, hidden)));
    assert!(c.expect_error(ErrorCode::Context).contains("context of 32"));
    // Skipping positions the session never received.
    c.send(&forward(5, &states(1, hidden)));
    c.expect_error(ErrorCode::Position);
    // The same connection still works.
    c.send(&forward(0, &states(3, hidden)));
    assert!(matches!(c.recv(), ServerMsg::Hidden { frame: h, .. } if h.rows == 3));
    // Rounds with leaves: a row that does not extend the chain, a kept slot the cache does not
    // hold and a kept leaf at position 0 are refused, and leave the cache as it was.
    let x = states(3, hidden);
    let f32_wire = WireFormat { dtype: WireDType::F32, zstd: false };
    let tree = |keep: Option<u32>, depths: Vec<u16>, start: usize, rows: usize| ClientMsg::ForwardTree {
        keep,
        depths,
        frame: HiddenFrame::encode(&x.narrow(1, 0, rows).expect("rows"), start, f32_wire).expect("encode"),
    };
    c.send(&tree(None, vec![0, 2, 1], 3, 3));
    assert!(c.expect_error(ErrorCode::BadFrame).contains("extend the chain"));
    c.send(&tree(Some(9), vec![0, 1, 1], 3, 3));
    assert!(c.expect_error(ErrorCode::BadFrame).contains("slot 9"));
    c.send(&tree(Some(2), vec![0], 0, 1));
    assert!(c.expect_error(ErrorCode::BadFrame).contains("position 0"));
    // A chain of two rows and a leaf beside the second (slots 3, 4, 5), then the leaf kept at
    // position 4 and the next round from position 5.
    c.send(&tree(None, vec![0, 1, 1], 3, 3));
    assert!(matches!(c.recv(), ServerMsg::Hidden { frame: h, .. } if h.rows == 3));
    c.send(&tree(Some(5), vec![0], 5, 1));
    assert!(matches!(c.recv(), ServerMsg::Hidden { frame: h, .. } if h.rows == 1 && h.start == 5));
    assert_still_serving(&t, &server, None);
}

#[test]
fn handshake_refuses_wrong_token_fingerprint_and_version_with_clear_errors() {
    let t = tiny();
    let server = serve(&t, ServerConfig { auth_token: Some("correct horse".into()), ..Default::default() });
    let fp = t.device.manifest.fingerprint.clone();
    let mut c = Raw::connect(&server);
    c.hello(&fp, Some("wrong"));
    assert!(c.expect_error(ErrorCode::Unauthorized).contains("wrong"));
    assert!(c.closed());
    let mut c = Raw::connect(&server);
    c.hello(&fp, None);
    assert!(c.expect_error(ErrorCode::Unauthorized).contains("missing"));
    let mut c = Raw::connect(&server);
    c.hello("0123abcd", Some("correct horse"));
    assert!(c.expect_error(ErrorCode::Fingerprint).contains("0123abcd"));
    let mut c = Raw::connect(&server);
    c.send(&ClientMsg::Hello { version: PROTOCOL_VERSION + 1, fingerprint: fp.clone(), auth_token: Some("correct horse".into()) });
    c.expect_error(ErrorCode::Version);

    // The device library turns a refusal into an error that names the cloud and the cause.
    let opts = CloudOptions::new(server.local_addr().to_string());
    let err = RemoteMiddle::connect(opts, &fp, t.device.config.hidden_size, 64, &Device::Cpu).expect_err("no token");
    let msg = err.to_string();
    assert!(msg.contains(&server.local_addr().to_string()) && msg.contains("auth token"), "{msg}");
    let opts = CloudOptions::new(server.local_addr().to_string());
    let err = RemoteMiddle::connect(opts, "0123abcd", t.device.config.hidden_size, 64, &Device::Cpu).expect_err("fingerprint");
    assert!(err.to_string().contains("fingerprint"), "{err}");
    assert_still_serving(&t, &server, Some("correct horse"));
}

#[test]
fn sessions_beyond_the_limit_are_refused_as_busy() {
    let t = tiny();
    let server = serve(&t, ServerConfig { max_sessions: 1, ..Default::default() });
    let fp = &t.device.manifest.fingerprint;
    let mut a = Raw::connect(&server);
    a.hello(fp, None);
    a.recv();
    a.send(&ClientMsg::Open { max_context: 8 });
    assert!(matches!(a.recv(), ServerMsg::Opened { .. }));
    let mut b = Raw::connect(&server);
    b.hello(fp, None);
    b.recv();
    b.send(&ClientMsg::Open { max_context: 8 });
    b.expect_error(ErrorCode::Busy);
    // Closing the first session frees its slot.
    a.send(&ClientMsg::Close);
    std::thread::sleep(Duration::from_millis(50));
    b.send(&ClientMsg::Open { max_context: 8 });
    assert!(matches!(b.recv(), ServerMsg::Opened { .. }));
}

/// With temperature, the first token produced by a speculative round must follow the model's own
/// distribution. The tiny model's vocabulary is small enough to compute that distribution exactly:
/// P(t2) = sum over t1 of p(t1 | prompt) p(t2 | prompt, t1). A chi-square test compares it with the
/// empirical distribution of t2 over many seeds, with a zero adapter whose drafts disagree with the
/// model, so both acceptance and the residual resampling are exercised.
#[test]
fn speculative_sampling_draws_the_models_distribution() {
    let t = tiny();
    let sampling = SamplingOptions { temperature: 0.7, top_p: None, seed: 0 };
    let prompt = [5u32, 17, 9, 30];
    let dist = Sampler::new(sampling);
    let vocab = t.device.config.vocab_size;

    let mut model = LocalPipeline::new(&t.device, &t.cloud).expect("pipeline");
    let (p1, exact) = second_token_distribution(&mut model, &prompt, &dist);

    let samples = 4000;
    let mut counts = vec![0usize; vocab];
    let (mut accepted, mut drafted) = (0, 0);
    let adapter = Adapter::zeros(&t.device.config, &Device::Cpu).expect("zeros");
    let mut drafter = Drafter::new(adapter);
    for seed in 0..samples {
        let opts = GenerateOptions { max_tokens: 5, sampling: SamplingOptions { seed, ..sampling }, eos: vec![], ..Default::default() };
        let g = generate_speculative(&mut model, &mut drafter, &prompt, &opts, 3, |_| {}).expect("generate");
        counts[g.tokens[1] as usize] += 1;
        accepted += g.accepted;
        drafted += g.drafted;
    }
    assert!(accepted > 0 && accepted < drafted, "both branches ran: {accepted} of {drafted} drafts accepted");
    let (stat, critical) = chi_square(&counts, &exact);
    eprintln!("chi-square {stat:.1} (critical ~{critical:.1}); {accepted}/{drafted} drafts accepted");
    assert!(stat < critical, "speculative samples do not follow the model: chi-square {stat:.1} > {critical:.1}");

    // The test has power: the same samples against the distribution of the first token are refused.
    let (wrong, _) = chi_square(&counts, &p1.iter().map(|v| *v as f64).collect::<Vec<_>>());
    assert!(wrong > critical, "the check cannot tell distributions apart ({wrong:.1})");
}
