//! The wire protocol against random and mutated input, on stable Rust (proptest). The decoders never
//! panic, and what they allocate is bounded by the frame they were given, not by the sizes it
//! declares. A live cloud (tiny random Llama) fed random sequences of valid, mutated and garbage
//! frames over raw TCP answers only well-formed frames, ends every connection, leaks no session
//! and serves a well-behaved device afterwards. A device fed random cloud replies returns a result
//! or an error, never a panic or an abort.
//!
//! CI runs a few hundred cases in a few seconds; `HAT_FUZZ_CASES=N` runs N cases per property.

// The allocation tracker below is a `GlobalAlloc`, which is unsafe to implement: it is the only way
// to check "refused before allocating" rather than just "refused".
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{ErrorKind, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use hat_runtime::baseline::WholeModel;
use hat_runtime::link::read_frame;
use hat_runtime::protocol::{
    frame, ClientMsg, ErrorCode, HiddenFrame, ServerMsg, WireDType, WireFormat, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use hat_runtime::{CloudOptions, CloudPackage, CloudServer, DevicePackage, LocalMiddle, Middle, RemoteMiddle, ServerConfig};
use hat_tests::{tiny_artifacts, TinyLlama};
use proptest::collection::vec;
use proptest::prelude::*;

/// Counts, per thread, the largest single allocation since [`largest_allocation_of`] started.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // A const-initialised thread local without a destructor: reading it never allocates.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static TRACKING: Tracking = Tracking;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_allocation_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// A hidden-state frame may decode to at most one frame's worth of states (f16 and bf16 widen to
/// f32, hence twice the cap); parsing a message costs at most a copy of its body (ids collect by
/// doubling, hence twice).
const HIDDEN_DECODE_BOUND: usize = 2 * DEFAULT_MAX_FRAME + (1 << 16);

fn message_bound(body: &[u8]) -> usize {
    2 * body.len() + 256
}

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("HAT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    // Failures are kept as named tests below, not as files written into the source tree.
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

const HIDDEN: usize = 32;

// ---- strategies -------------------------------------------------------------------------------

fn wire_format() -> impl Strategy<Value = WireFormat> {
    (prop_oneof![Just(WireDType::F32), Just(WireDType::F16), Just(WireDType::Bf16)], any::<bool>())
        .prop_map(|(dtype, zstd)| WireFormat { dtype, zstd })
}

/// Row counts where bugs live: small ones, the frame cap's edge, and absurd ones.
fn rows() -> impl Strategy<Value = u32> {
    let at_cap = (DEFAULT_MAX_FRAME / (HIDDEN * 2)) as u32;
    prop_oneof![
        6 => 0u32..16,
        1 => at_cap - 2..at_cap + 2,
        1 => 1u32 << 20..1 << 24,
        1 => Just(u32::MAX),
        1 => any::<u32>(),
    ]
}

/// Any frame at all: random fields, random payload.
fn hidden_frame() -> impl Strategy<Value = HiddenFrame> {
    (any::<u32>(), rows(), prop_oneof![3 => Just(HIDDEN as u32), 1 => any::<u32>()], wire_format(), vec(any::<u8>(), 0..256))
        .prop_map(|(start, rows, hidden, format, payload)| HiddenFrame { start, rows, hidden, format, payload })
}

/// A frame that decodes: finite states of the right width, encoded as a device would.
fn states_frame(start: impl Strategy<Value = u32>, rows: impl Strategy<Value = usize>) -> impl Strategy<Value = HiddenFrame> {
    (start, rows, wire_format())
        .prop_flat_map(|(start, rows, format)| (Just(start), Just(rows), Just(format), vec(-4f32..4.0, rows * HIDDEN)))
        .prop_map(|(start, rows, format, values)| {
            let t = Tensor::from_vec(values, (1, rows, HIDDEN), &Device::Cpu).expect("tensor");
            HiddenFrame::encode(&t, start as usize, format).expect("encode")
        })
}

/// Text, now and then right at the 64 KiB limit of a string field with a multi-byte character
/// across it.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => any::<String>(),
        1 => (u16::MAX as usize - 4..u16::MAX as usize + 1, prop_oneof![Just('\u{e9}'), Just('\u{20ac}'), Just('\u{1d11e}'), any::<char>()])
            .prop_map(|(n, c)| "a".repeat(n) + &c.to_string().repeat(3)),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    use ErrorCode::*;
    proptest::sample::select(vec![
        BadFrame,
        Version,
        Fingerprint,
        Unauthorized,
        Busy,
        BadHidden,
        Context,
        Position,
        NoSession,
        Internal,
        NotServed,
    ])
}

fn client_msg() -> impl Strategy<Value = ClientMsg> {
    prop_oneof![
        (any::<u16>(), text(), proptest::option::of(text())).prop_map(|(version, fingerprint, auth_token)| ClientMsg::Hello {
            version,
            fingerprint,
            auth_token
        }),
        any::<u32>().prop_map(|max_context| ClientMsg::Open { max_context }),
        hidden_frame().prop_map(ClientMsg::Forward),
        states_frame(any::<u32>(), 1usize..4).prop_map(ClientMsg::Forward),
        (proptest::option::of(0u32..u32::MAX), vec(any::<u16>(), 4), states_frame(any::<u32>(), 1usize..4))
            .prop_map(|(keep, d, frame)| ClientMsg::ForwardTree { keep, depths: d[..frame.rows as usize].to_vec(), frame }),
        Just(ClientMsg::Close),
        (any::<u32>(), vec(any::<u8>(), 0..64)).prop_map(|(reply_bytes, pad)| ClientMsg::Ping { reply_bytes, pad }),
        (any::<u32>(), any::<bool>(), vec(any::<u32>(), 0..32)).prop_map(|(start, last_only, ids)| ClientMsg::Tokens {
            start,
            last_only,
            ids
        }),
        (any::<u32>(), vec(any::<u32>(), 0..8), vec(any::<u32>(), 0..32)).prop_map(|(max_tokens, eos, prompt)| ClientMsg::Generate {
            max_tokens,
            eos,
            prompt
        }),
    ]
}

fn server_msg() -> impl Strategy<Value = ServerMsg> {
    prop_oneof![
        (any::<u16>(), any::<u32>(), any::<bool>()).prop_map(|(version, hidden, trees)| ServerMsg::Welcome { version, hidden, trees }),
        (any::<u64>(), any::<u32>()).prop_map(|(session, max_context)| ServerMsg::Opened { session, max_context }),
        (hidden_frame(), any::<u32>()).prop_map(|(frame, compute_us)| ServerMsg::Hidden { frame, compute_us }),
        (states_frame(any::<u32>(), 1usize..4), any::<u32>()).prop_map(|(frame, compute_us)| ServerMsg::Hidden { frame, compute_us }),
        vec(any::<u8>(), 0..64).prop_map(|pad| ServerMsg::Pong { pad }),
        (any::<u32>(), any::<u32>(), vec(any::<u32>(), 0..32)).prop_map(|(start, compute_us, ids)| ServerMsg::TokenIds {
            start,
            compute_us,
            ids
        }),
        (error_code(), text()).prop_map(|(code, message)| ServerMsg::Error { code, message }),
    ]
}

/// One change to an encoded message; positions are taken modulo its length.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize, u8),
    Truncate(usize),
    Append(Vec<u8>),
    /// Overwrite 1, 2 or 4 bytes (a kind, a length or count field, a dtype...) with a value.
    Overwrite(usize, usize, u32),
    Remove(usize, usize),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let value = prop_oneof![Just(0u32), Just(u32::MAX), Just(0xffff), Just(0x8000_0000), 0u32..300, any::<u32>()];
    prop_oneof![
        3 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        1 => vec(any::<u8>(), 1..16).prop_map(Mutation::Append),
        3 => (any::<usize>(), proptest::sample::select(vec![1usize, 2, 4]), value).prop_map(|(at, w, v)| Mutation::Overwrite(at, w, v)),
        1 => (any::<usize>(), 1usize..8).prop_map(|(at, n)| Mutation::Remove(at, n)),
        1 => (any::<usize>(), 1usize..8).prop_map(|(at, n)| Mutation::Duplicate(at, n)),
    ]
}

fn mutate(mut body: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = body.len();
        match m {
            Mutation::FlipBit(at, bit) if len > 0 => body[at % len] ^= 1 << bit,
            Mutation::Truncate(at) => body.truncate(at % (len + 1)),
            Mutation::Append(extra) => body.extend_from_slice(extra),
            Mutation::Overwrite(at, width, v) if len > 0 => {
                let at = at % len;
                let end = (at + width).min(len);
                body[at..end].copy_from_slice(&v.to_le_bytes()[..end - at]);
            }
            Mutation::Remove(at, n) if len > 0 => {
                let at = at % len;
                body.drain(at..(at + n).min(len));
            }
            Mutation::Duplicate(at, n) if len > 0 => {
                let at = at % len;
                let piece = body[at..(at + n).min(len)].to_vec();
                body.splice(at..at, piece);
            }
            _ => {}
        }
    }
    body
}

// ---- decoders ---------------------------------------------------------------------------------

/// Every decoder on `body`: no panic, and allocations bounded by the body (and by the frame cap for
/// the hidden states it carries).
fn decode_everything(body: &[u8]) -> Result<(), TestCaseError> {
    let (client, largest) = largest_allocation_of(|| ClientMsg::decode(body));
    prop_assert!(largest <= message_bound(body), "ClientMsg::decode of {} bytes allocated {largest}", body.len());
    let (server, largest) = largest_allocation_of(|| ServerMsg::decode(body));
    prop_assert!(largest <= message_bound(body), "ServerMsg::decode of {} bytes allocated {largest}", body.len());
    let frames = [client.ok().and_then(forward_frame), server.ok().and_then(hidden_frame_of)];
    for f in frames.into_iter().flatten() {
        decode_states(&f)?;
    }
    Ok(())
}

fn forward_frame(m: ClientMsg) -> Option<HiddenFrame> {
    match m {
        ClientMsg::Forward(f) | ClientMsg::ForwardTree { frame: f, .. } => Some(f),
        _ => None,
    }
}

fn hidden_frame_of(m: ServerMsg) -> Option<HiddenFrame> {
    match m {
        ServerMsg::Hidden { frame, .. } => Some(frame),
        _ => None,
    }
}

/// `HiddenFrame::decode` at the model's width and at the width the frame claims.
fn decode_states(f: &HiddenFrame) -> Result<(), TestCaseError> {
    for width in [HIDDEN, f.hidden as usize] {
        let (out, largest) = largest_allocation_of(|| f.decode(width, &Device::Cpu));
        prop_assert!(
            largest <= HIDDEN_DECODE_BOUND,
            "decoding {} rows x {} ({:?}) from {} payload bytes allocated {largest} bytes",
            f.rows,
            width,
            f.format,
            f.payload.len()
        );
        if let Ok(t) = out {
            prop_assert_eq!(t.dims(), &[1, f.rows as usize, width][..]);
        }
    }
    Ok(())
}

fn has_long_string(m: &ClientMsg) -> bool {
    matches!(m, ClientMsg::Hello { fingerprint, auth_token, .. }
        if fingerprint.len() > u16::MAX as usize || auth_token.as_ref().is_some_and(|t| t.len() > u16::MAX as usize))
}

proptest! {
    #![proptest_config(cases(512))]

    #[test]
    fn random_bodies_never_panic(body in vec(any::<u8>(), 0..512)) {
        decode_everything(&body)?;
    }

    /// Random bytes behind each valid kind byte, so every message's parser is reached.
    #[test]
    fn random_bodies_of_every_kind_never_panic(
        kind in proptest::sample::select(vec![1u8, 2, 3, 4, 5, 6, 7, 0x81, 0x82, 0x83, 0x84, 0x85, 0xff]),
        rest in vec(any::<u8>(), 0..256),
    ) {
        let body: Vec<u8> = std::iter::once(kind).chain(rest).collect();
        decode_everything(&body)?;
    }

    /// What is encoded decodes to itself (strings over the 64 KiB field limit are cut, and stay
    /// text); changed by bit flips, truncation, length and count fields set to extremes and the
    /// like, it decodes or is refused, within bounds.
    #[test]
    fn client_messages_round_trip_and_mutants_are_harmless(m in client_msg(), mutations in vec(mutation(), 1..5)) {
        let body = m.encode();
        let back = ClientMsg::decode(&body).map_err(|e| TestCaseError::fail(format!("own encoding refused: {e}")))?;
        prop_assert_eq!(back.encode(), body.clone());
        prop_assert!(back == m || has_long_string(&m));
        decode_everything(&mutate(body, &mutations))?;
    }

    #[test]
    fn server_messages_round_trip_and_mutants_are_harmless(m in server_msg(), mutations in vec(mutation(), 1..5)) {
        let body = m.encode();
        let back = ServerMsg::decode(&body).map_err(|e| TestCaseError::fail(format!("own encoding refused: {e}")))?;
        prop_assert_eq!(back.encode(), body.clone());
        let long = matches!(&m, ServerMsg::Error { message, .. } if message.len() > u16::MAX as usize);
        prop_assert!(back == m || long);
        decode_everything(&mutate(body, &mutations))?;
    }

    /// Hidden-state frames with any declared shape, format and payload.
    #[test]
    fn hidden_frames_decode_or_refuse_within_bounds(f in hidden_frame()) {
        decode_states(&f)?;
    }
}

/// Found by the fuzzer: a zstd payload declaring 2^32 - 1 rows made `decode` reserve the declared
/// size (terabytes: the process aborted) before finding the payload was garbage.
#[test]
fn zstd_frame_declaring_absurd_rows_is_refused_before_allocating() {
    for rows in [u32::MAX, 1 << 24, (DEFAULT_MAX_FRAME / (HIDDEN * 4)) as u32 + 1] {
        let f = HiddenFrame {
            start: 0,
            rows,
            hidden: HIDDEN as u32,
            format: WireFormat { dtype: WireDType::F32, zstd: true },
            payload: vec![7; 9],
        };
        let (out, largest) = largest_allocation_of(|| f.decode(HIDDEN, &Device::Cpu));
        let err = out.expect_err("refused").to_string();
        assert!(largest < 1 << 20, "{rows} rows: allocated {largest} bytes before refusing ({err})");
    }
}

/// Found by the fuzzer: a string over the 64 KiB field limit was cut inside a UTF-8 character, so
/// the peer refused the whole message as not UTF-8.
#[test]
fn strings_cut_at_the_field_limit_stay_utf8() {
    let message = "a".repeat(u16::MAX as usize - 1) + "\u{e9}\u{e9}";
    let body = ServerMsg::Error { code: ErrorCode::Fingerprint, message }.encode();
    match ServerMsg::decode(&body) {
        Ok(ServerMsg::Error { code: ErrorCode::Fingerprint, message }) => assert_eq!(message.len(), u16::MAX as usize - 1),
        other => panic!("{other:?}"),
    }
}

// ---- a live cloud -----------------------------------------------------------------------------

struct Live {
    _dir: tempfile::TempDir,
    device: DevicePackage,
    cloud: CloudPackage,
    /// A cloud as deployed, and one that also serves the token baselines.
    servers: [CloudServer; 2],
}

const IDLE: Duration = Duration::from_secs(2);

fn live() -> &'static Live {
    static LIVE: OnceLock<Live> = OnceLock::new();
    LIVE.get_or_init(|| {
        let dir = hat_tests::fixture_dir();
        let out = tiny_artifacts(dir.path(), &TinyLlama::default(), 1, 1);
        let device = DevicePackage::open(&out.join("device"), &Device::Cpu).expect("device");
        let cloud = CloudPackage::open(&out.join("cloud"), &Device::Cpu).expect("cloud");
        let cfg = ServerConfig { log: false, max_context: 64, max_sessions: 4, idle_timeout: IDLE, ..Default::default() };
        let whole = Arc::new(WholeModel::new(&device, &cloud).expect("whole model"));
        let servers = [
            CloudServer::start(&cloud, cfg.clone(), "127.0.0.1:0").expect("server"),
            CloudServer::start(&cloud, ServerConfig { baselines: Some(whole), ..cfg }, "127.0.0.1:0").expect("server"),
        ];
        Live { _dir: dir, device, cloud, servers }
    })
}

fn fingerprint() -> String {
    live().device.manifest.fingerprint.clone()
}

/// Messages a device, or a benchmark, could send, in and out of range.
fn plausible_msg() -> impl Strategy<Value = ClientMsg> {
    let id = prop_oneof![4 => 0u32..64, 1 => any::<u32>()];
    prop_oneof![
        2 => (prop_oneof![4 => Just(PROTOCOL_VERSION), 1 => any::<u16>()], prop_oneof![4 => Just(fingerprint()), 1 => text()], proptest::option::of("[a-z]{0,8}"))
            .prop_map(|(version, fingerprint, auth_token)| ClientMsg::Hello { version, fingerprint, auth_token }),
        3 => prop_oneof![Just(0u32), 1u32..100, Just(u32::MAX)].prop_map(|max_context| ClientMsg::Open { max_context }),
        8 => states_frame(prop_oneof![3 => Just(0u32), 1 => 0u32..72], prop_oneof![6 => 1usize..8, 1 => 30usize..70]).prop_map(ClientMsg::Forward),
        1 => hidden_frame().prop_map(ClientMsg::Forward),
        // Rounds with leaves: a chain, then rows at smaller depths (valid or not), and a kept slot.
        3 => (proptest::option::of(0u32..80), vec(0u16..6, 8), states_frame(prop_oneof![3 => Just(0u32), 1 => 0u32..72], 1usize..8))
            .prop_map(|(keep, d, frame)| {
                let depths = (0..frame.rows as u16).map(|i| if i < 3 { i } else { d[i as usize].min(i) }).collect();
                ClientMsg::ForwardTree { keep, depths, frame }
            }),
        1 => Just(ClientMsg::Close),
        2 => (prop_oneof![30 => 0u32..4096, 1 => Just(u32::MAX)], vec(any::<u8>(), 0..64)).prop_map(|(reply_bytes, pad)| ClientMsg::Ping { reply_bytes, pad }),
        1 => (0u32..72, any::<bool>(), vec(id.clone(), 0..10)).prop_map(|(start, last_only, ids)| ClientMsg::Tokens { start, last_only, ids }),
        1 => (prop_oneof![0u32..8, Just(u32::MAX)], vec(id.clone(), 0..3), vec(id, 0..10))
            .prop_map(|(max_tokens, eos, prompt)| ClientMsg::Generate { max_tokens, eos, prompt }),
    ]
}

/// Bytes to write: a framed message, a framed mutant, a message under a wrong length prefix, or
/// raw garbage.
fn chunk() -> impl Strategy<Value = Vec<u8>> {
    let length = prop_oneof![Just(0u32), 0u32..64, Just(DEFAULT_MAX_FRAME as u32 + 1), any::<u32>()];
    prop_oneof![
        12 => plausible_msg().prop_map(|m| frame(&m.encode())),
        4 => (plausible_msg(), vec(mutation(), 1..4)).prop_map(|(m, muts)| frame(&mutate(m.encode(), &muts))),
        1 => (plausible_msg(), length).prop_map(|(m, n)| {
            let mut bytes = frame(&m.encode());
            bytes[..4].copy_from_slice(&n.to_be_bytes());
            bytes
        }),
        1 => vec(any::<u8>(), 0..64),
    ]
}

/// A connection: usually a proper hello (and open) first, then anything.
fn conversation() -> impl Strategy<Value = (usize, bool, bool, Vec<Vec<u8>>)> {
    (0usize..2, proptest::bool::weighted(0.85), proptest::bool::weighted(0.7), vec(chunk(), 0..12))
}

/// Writes `chunks` on a fresh connection, half-closes, and reads every reply until the cloud closes;
/// returns the replies' kinds (a 64 MiB pong is not kept). Fails on a reply that is not a
/// well-formed server message, or a read that waits past the cloud's idle timeout plus a margin (a
/// hang).
fn converse(server: SocketAddr, chunks: &[Vec<u8>]) -> Result<Vec<String>, TestCaseError> {
    let mut stream = TcpStream::connect(server).map_err(|e| TestCaseError::fail(format!("connect: {e}")))?;
    let patience = IDLE + Duration::from_secs(8);
    stream.set_read_timeout(Some(patience)).expect("timeout");
    stream.set_write_timeout(Some(patience)).expect("timeout");
    let mut reader = stream.try_clone().expect("clone");
    let replies = std::thread::spawn(move || {
        let mut replies = Vec::new();
        loop {
            match read_frame(&mut reader, DEFAULT_MAX_FRAME) {
                Ok(body) => match ServerMsg::decode(&body) {
                    Ok(m) => replies.push(reply_kind(&m)),
                    Err(e) => return Err(format!("the cloud sent a malformed reply ({e}): {body:02x?}")),
                },
                Err(e) if matches!(e.kind(), ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset) => return Ok(replies),
                Err(e) => return Err(format!("no reply and no close within {patience:?}: {e}")),
            }
        }
    });
    for c in chunks {
        // The cloud may close first (a refused hello, broken framing): then the rest is moot.
        if stream.write_all(c).is_err() {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
    replies.join().expect("reader thread").map_err(TestCaseError::fail)
}

/// The cloud still computes exactly the middle submodel's output for a well-behaved device.
fn assert_still_serving(server: &CloudServer) {
    let t = live();
    let mut opts = CloudOptions::new(server.local_addr().to_string());
    opts.retries = 20;
    opts.backoff = Duration::from_millis(20);
    let hidden = t.device.config.hidden_size;
    let mut remote = RemoteMiddle::connect(opts, &t.device.manifest.fingerprint, hidden, 64, &Device::Cpu).expect("good client connects");
    let mut local = LocalMiddle::new(t.cloud.middle.clone());
    let x = Tensor::randn(0f32, 1.0, (1, 5, hidden), &Device::Cpu).expect("randn");
    let a = remote.forward(0, &x).expect("remote");
    let b = local.forward(0, &x).expect("local");
    assert_eq!(hat_tests::max_abs_diff(&a, &b), 0.0);
}

/// A reply's kind, and an error's class, for the tally of what the conversations reached.
fn reply_kind(m: &ServerMsg) -> String {
    match m {
        ServerMsg::Welcome { .. } => "Welcome".into(),
        ServerMsg::Opened { .. } => "Opened".into(),
        ServerMsg::Hidden { .. } => "Hidden".into(),
        ServerMsg::Pong { .. } => "Pong".into(),
        ServerMsg::TokenIds { .. } => "TokenIds".into(),
        ServerMsg::Error { code: ErrorCode::Internal, message } => format!("Error::Internal({})", message.split(':').next().unwrap_or("")),
        ServerMsg::Error { code, .. } => format!("Error::{code:?}"),
    }
}

fn wait_sessions_closed(server: &CloudServer) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.metrics().sessions_open.get() != 0 {
        assert!(Instant::now() < deadline, "{} sessions still open: a connection's session leaked", server.metrics().sessions_open.get());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// This process's resident memory, now (`VmRSS`) or at its peak (`VmHWM`).
fn rss_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status.lines().find_map(|l| l.strip_prefix(field)).map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>());
    kb.and_then(Result::ok).unwrap_or(0) * 1024
}

#[test]
fn live_cloud_survives_random_conversations() {
    let t = live();
    let started = Instant::now();
    let mut runner = proptest::test_runner::TestRunner::new(cases(96));
    let seen = std::sync::Mutex::new(std::collections::BTreeMap::new());
    let result = runner.run(&conversation(), |(which, hello, open, chunks)| {
        let mut bytes = Vec::new();
        if hello {
            bytes.push(frame(&ClientMsg::Hello { version: PROTOCOL_VERSION, fingerprint: fingerprint(), auth_token: None }.encode()));
            if open {
                bytes.push(frame(&ClientMsg::Open { max_context: 64 }.encode()));
            }
        }
        bytes.extend(chunks);
        let replies = converse(t.servers[which].local_addr(), &bytes)?;
        let mut seen = seen.lock().expect("tally");
        for kind in replies {
            *seen.entry(kind).or_insert(0usize) += 1;
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    for server in &t.servers {
        wait_sessions_closed(server);
        assert_still_serving(server);
    }
    let (now, peak) = (rss_bytes("VmRSS:"), rss_bytes("VmHWM:"));
    let n = cases(96).cases;
    eprintln!(
        "{n} conversations in {:.1} s; RSS of this test process {} MB now, {} MB at its peak",
        started.elapsed().as_secs_f64(),
        now >> 20,
        peak >> 20
    );
    let seen = seen.into_inner().expect("tally");
    eprintln!("replies seen (shrinking included): {seen:?}");
    assert!(peak < 1 << 30, "peak RSS {} MB", peak >> 20);
    // Whatever a client sends is refused as the client's fault (out-of-range token ids included),
    // never reported as a failure of the cloud itself.
    let internal: Vec<_> = seen.keys().filter(|k| k.starts_with("Error::Internal")).collect();
    assert!(internal.is_empty(), "client input reached the cloud as an internal error: {internal:?}");
}

/// A device that stops mid-frame is cut off after the idle timeout, not waited for forever.
#[test]
fn stalled_frame_is_cut_off_after_the_idle_timeout() {
    let t = live();
    let mut s = TcpStream::connect(t.servers[0].local_addr()).expect("connect");
    s.set_read_timeout(Some(IDLE * 5)).expect("timeout");
    let hello = frame(&ClientMsg::Hello { version: PROTOCOL_VERSION, fingerprint: fingerprint(), auth_token: None }.encode());
    s.write_all(&hello).expect("hello");
    assert!(matches!(ServerMsg::decode(&read_frame(&mut s, 1 << 20).expect("welcome")), Ok(ServerMsg::Welcome { .. })));
    let t0 = Instant::now();
    s.write_all(&[0, 0, 1, 0, 3, 0]).expect("half a frame");
    match ServerMsg::decode(&read_frame(&mut s, 1 << 20).expect("an error frame")) {
        Ok(ServerMsg::Error { code: ErrorCode::BadFrame, message }) => assert!(message.contains("idle"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(read_frame(&mut s, 1 << 20).is_err(), "closed after the error");
    eprintln!("stalled frame cut off after {:.1} s (idle timeout {IDLE:?})", t0.elapsed().as_secs_f64());
}

// ---- a device against a hostile cloud ---------------------------------------------------------

/// Replies a cloud could send to a device's hello, open and first forward (at position 0).
fn cloud_reply(good: ServerMsg) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => Just(frame(&good.encode())),
        2 => (Just(good), vec(mutation(), 1..4)).prop_map(|(m, muts)| frame(&mutate(m.encode(), &muts))),
        2 => server_msg().prop_map(|m| frame(&m.encode())),
        1 => vec(any::<u8>(), 0..32).prop_map(|b| frame(&b)),
        // A length prefix over the cap (a stray TLS record, say): refused before reading on.
        1 => (0x0400_0001u32.., vec(any::<u8>(), 0..8)).prop_map(|(n, b)| n.to_be_bytes().into_iter().chain(b).collect()),
    ]
}

fn hostile_forward_reply() -> impl Strategy<Value = Vec<u8>> {
    let hostile = (rows(), wire_format(), vec(any::<u8>(), 0..256)).prop_map(|(rows, format, payload)| {
        let frame = HiddenFrame { start: 0, rows, hidden: HIDDEN as u32, format, payload };
        ServerMsg::Hidden { frame, compute_us: 1 }
    });
    prop_oneof![
        3 => hostile.prop_map(|m| frame(&m.encode())),
        2 => (states_frame(Just(0u32), 1usize..4), any::<u32>()).prop_map(|(frame, compute_us)| ServerMsg::Hidden { frame, compute_us }).prop_flat_map(cloud_reply),
        1 => server_msg().prop_map(|m| frame(&m.encode())),
    ]
}

/// A one-connection cloud that reads three frames and answers each with the scripted bytes.
fn scripted_cloud(replies: Vec<Vec<u8>>) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handle = std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else { return };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        for reply in replies {
            if read_frame(&mut s, DEFAULT_MAX_FRAME).is_err() || s.write_all(&reply).is_err() {
                return;
            }
        }
        // Then hold the connection until the device is done with it.
        let _ = read_frame(&mut s, DEFAULT_MAX_FRAME);
    });
    (addr, handle)
}

proptest! {
    #![proptest_config(cases(128))]

    /// Whatever the cloud answers, the device returns a result or an error, with allocations
    /// bounded by the frame cap.
    #[test]
    fn device_survives_any_cloud_reply(
        welcome in cloud_reply(ServerMsg::Welcome { version: PROTOCOL_VERSION, hidden: HIDDEN as u32, trees: true }),
        opened in cloud_reply(ServerMsg::Opened { session: 1, max_context: 64 }),
        hidden in hostile_forward_reply(),
    ) {
        let (addr, cloud) = scripted_cloud(vec![welcome, opened, hidden]);
        let mut opts = CloudOptions::new(addr.to_string());
        opts.retries = 0;
        opts.backoff = Duration::from_millis(5);
        opts.reply_timeout = Duration::from_secs(10);
        let x = Tensor::zeros((1, 2, HIDDEN), candle_core::DType::F32, &Device::Cpu).expect("zeros");
        let (_, largest) = largest_allocation_of(|| {
            RemoteMiddle::connect(opts, &fingerprint(), HIDDEN, 64, &Device::Cpu).and_then(|mut remote| remote.forward(0, &x))
        });
        prop_assert!(largest <= HIDDEN_DECODE_BOUND, "the device allocated {largest} bytes for one reply");
        cloud.join().expect("scripted cloud");
    }
}
