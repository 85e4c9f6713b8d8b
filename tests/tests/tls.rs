//! TLS between device and cloud on the real default model (split 2/2), with certificates made in
//! the test: a TLS session gives the tokens of a plain one; a wrong CA, a missing client certificate
//! and either side without TLS fail at once with a one-line cause and the cloud serves on; an
//! observer between the two sees neither the auth token nor any hidden-state bytes.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use hat_runtime::protocol::{WireDType, WireFormat};
use hat_runtime::{
    ClientTls, CloudOptions, CloudServer, DeviceRuntime, GenerateOptions, LocalMiddle, Middle, Mode, RemoteMiddle, RuntimeError,
    ServerConfig, ServerTls,
};
use hat_tests::{contains, open_default, recording_proxy, TestPki};

const NEW_TOKENS: usize = 24;
const PROMPTS: [&str; 2] = ["What is the capital of France?", "Write a haiku about the sea."];

struct Real {
    device: DeviceRuntime,
    cloud: hat_runtime::CloudPackage,
    pki: TestPki,
    other: TestPki,
    _dir: tempfile::TempDir,
}

fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        let (device, cloud) = open_default();
        let dir = hat_tests::fixture_dir();
        let pki = TestPki::generate(dir.path(), "good");
        let other = TestPki::generate(dir.path(), "other");
        Real { device, cloud, pki, other, _dir: dir }
    })
}

fn server_tls(pki: &TestPki, mutual: bool) -> ServerTls {
    ServerTls::from_pem_files(&pki.server_cert, &pki.server_key, mutual.then_some(pki.ca.as_path())).expect("server TLS")
}

fn start(tls: Option<ServerTls>, token: Option<&str>) -> CloudServer {
    let cfg = ServerConfig { log: false, tls, auth_token: token.map(Into::into), ..Default::default() };
    CloudServer::start(&real().cloud, cfg, "127.0.0.1:0").expect("cloud server")
}

fn options(addr: impl ToString, tls: Option<ClientTls>) -> CloudOptions {
    let mut o = CloudOptions::new(addr.to_string());
    o.wire = WireFormat { dtype: WireDType::F32, zstd: false };
    o.tls = tls;
    // A wrong setup must fail at once, not after retries.
    o.retries = 1;
    o.backoff = Duration::from_millis(10);
    o
}

fn client(ca: &TestPki, identity: Option<&TestPki>) -> ClientTls {
    let id = identity.map(|p| (p.client_cert.as_path(), p.client_key.as_path()));
    ClientTls::from_pem_files(&ca.ca, id, None).expect("client TLS")
}

fn run(opts: CloudOptions, mode: Mode) -> Vec<Vec<u32>> {
    let r = real();
    let mut session = r.device.connect(opts).expect("connect");
    let greedy = GenerateOptions { max_tokens: NEW_TOKENS, ..Default::default() };
    PROMPTS
        .iter()
        .map(|p| {
            let ids = r.device.prompt_ids(p, true).expect("encode");
            session.generate(&ids, &greedy, mode, |_| {}).expect("generate").tokens
        })
        .collect()
}

#[test]
fn a_tls_session_gives_the_tokens_of_a_plain_one() {
    let r = real();
    let plain = start(None, None);
    let tls = start(Some(server_tls(&r.pki, true)), None);
    for mode in [Mode::UShape, Mode::Hat { draft_len: 4 }] {
        let a = run(options(plain.local_addr(), None), mode);
        let b = run(options(tls.local_addr(), Some(client(&r.pki, Some(&r.pki)))), mode);
        assert_eq!(a, b, "{mode:?}: TLS changed the tokens");
        assert!(a.iter().all(|t| t.len() == NEW_TOKENS), "{mode:?}: full replies");
    }
}

/// The error of a connection that must fail, after checking it came fast and on one line.
fn refused(opts: CloudOptions) -> RuntimeError {
    let r = real();
    let t0 = Instant::now();
    let err = RemoteMiddle::connect(opts, &r.device.package.manifest.fingerprint, r.device.package.config.hidden_size, 64, &Device::Cpu)
        .expect_err("must fail");
    let line = err.to_string();
    assert!(!line.contains('\n'), "one line: {line}");
    // Not retried into a long wait (there is no clock limit on a correct failure, only no retry storm).
    assert!(t0.elapsed() < Duration::from_secs(30), "{line}");
    err
}

/// A good device still gets exactly the middle submodel's output.
fn assert_serving(server: &CloudServer, tls: Option<ClientTls>) {
    let r = real();
    let hidden = r.device.package.config.hidden_size;
    let mut remote =
        RemoteMiddle::connect(options(server.local_addr(), tls), &r.device.package.manifest.fingerprint, hidden, 64, &Device::Cpu)
            .expect("a good device connects");
    let x = Tensor::randn(0f32, 1.0, (1, 3, hidden), &Device::Cpu).expect("randn");
    let a = remote.forward(0, &x).expect("remote");
    let b = LocalMiddle::new(r.cloud.middle.clone()).forward(0, &x).expect("local");
    assert_eq!(hat_tests::max_abs_diff(&a, &b), 0.0);
}

#[test]
fn wrong_certificates_and_plain_peers_fail_with_one_line_and_the_cloud_serves_on() {
    let r = real();
    let server = start(Some(server_tls(&r.pki, true)), None);
    let addr = server.local_addr();
    let good = || Some(client(&r.pki, Some(&r.pki)));

    // The device trusts another CA: the cloud's certificate is refused in the handshake.
    let err = refused(options(addr, Some(client(&r.other, Some(&r.pki)))));
    assert!(matches!(err, RuntimeError::Tls { .. }), "{err}");
    assert!(err.to_string().contains("not signed by the CA given with --tls-ca"), "{err}");
    assert_serving(&server, good());

    // Mutual TLS, and the device has no certificate.
    let err = refused(options(addr, Some(client(&r.pki, None))));
    assert!(err.to_string().contains("requires a client certificate"), "{err}");
    assert_serving(&server, good());

    // A certificate from another CA.
    let err = refused(options(addr, Some(client(&r.pki, Some(&r.other)))));
    assert!(err.to_string().contains("does not accept this client certificate"), "{err}");
    assert_serving(&server, good());

    // Plain TCP against the TLS cloud.
    let err = refused(options(addr, None));
    assert!(err.to_string().contains("--tls-ca"), "{err}");
    assert_serving(&server, good());

    // TLS against a plain cloud.
    let plain = start(None, None);
    let err = refused(options(plain.local_addr(), good()));
    assert!(err.to_string().contains("plain cloud does not speak TLS"), "{err}");
    assert_serving(&plain, None);
    assert_eq!(server.metrics().tls_failures.get(), 4, "each refused handshake is counted");
}

#[test]
fn the_auth_token_goes_in_the_clear_only_to_loopback_or_when_forced() {
    let mut o = options("10.0.0.2:7070", None);
    o.auth_token = Some("secret".into());
    let err = o.check_transport().expect_err("refused");
    assert!(err.to_string().contains("--tls-ca"), "{err}");
    o.insecure_auth = true;
    o.check_transport().expect("forced");
    let mut o = options("127.0.0.1:7070", None);
    o.auth_token = Some("secret".into());
    o.check_transport().expect("loopback");
    let mut o = options("10.0.0.2:7070", Some(client(&real().pki, None)));
    o.auth_token = Some("secret".into());
    o.check_transport().expect("TLS");
}

/// Every 16-byte window at a 64-byte stride of the hidden-state frames a device sent (the frames
/// after the hello and the open, which are small).
fn payload_windows(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut rest = bytes;
    let mut out = Vec::new();
    while rest.len() >= 4 {
        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let body = &rest[4..(4 + n).min(rest.len())];
        if n > 1024 {
            out.extend(body.chunks_exact(64).map(|c| c[16..32].to_vec()));
        }
        rest = &rest[(4 + n).min(rest.len())..];
    }
    out
}

#[test]
fn an_observer_sees_no_auth_token_and_no_hidden_states_under_tls() {
    let r = real();
    let token = "s3cret-token-of-the-cloud";
    let plain = start(None, Some(token));
    let tls = start(Some(server_tls(&r.pki, false)), Some(token));
    let record = |server: &CloudServer, tls: Option<ClientTls>| {
        let (proxy, sent) = recording_proxy(server.local_addr());
        let mut o = options(proxy, tls);
        o.auth_token = Some(token.into());
        // The proxy's certificate check: the cloud's certificate names 127.0.0.1, which the proxy is on.
        let tokens = run(o, Mode::Hat { draft_len: 4 });
        std::thread::sleep(Duration::from_millis(100));
        let bytes = sent.lock().expect("lock").clone();
        (tokens, bytes)
    };
    let (plain_tokens, clear) = record(&plain, None);
    let (tls_tokens, sealed) = record(&tls, Some(client(&r.pki, None)));
    assert_eq!(plain_tokens, tls_tokens);
    // The checks can fail: in the clear, the observer sees the token and the states.
    assert!(contains(&clear, token.as_bytes()), "the plain run carries the token");
    let windows = payload_windows(&clear);
    assert!(windows.len() > 100, "the plain run carries hidden states ({} windows)", windows.len());
    assert!(sealed.len() > clear.len() / 2, "the TLS run carried the traffic ({} bytes)", sealed.len());
    assert!(!contains(&sealed, token.as_bytes()), "the auth token crossed in the clear under TLS");
    let sealed_windows: std::collections::HashSet<&[u8]> = sealed.windows(16).collect();
    let seen = windows.iter().filter(|w| sealed_windows.contains(w.as_slice())).count();
    assert_eq!(seen, 0, "{seen} of {} hidden-state windows crossed in the clear under TLS", windows.len());
}
