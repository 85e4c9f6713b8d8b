//! `hat serve cloud`: the middle submodel behind a TCP port. Each device connection is one tokio
//! task; each open session has its own KV cache, and the model runs on the blocking pool. Every frame
//! is checked before it is used (size before allocation, then dtype, width, positions, context), and
//! a bad one gets an error frame: the server never panics on input and keeps serving the others.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hat_model::{KvCache, Submodel};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::baseline::{WholeCache, WholeModel};
use crate::engine::{BatchConfig, Engine};
use crate::error::{Result, RuntimeError};
use crate::metrics::CloudMetrics;
use crate::package::CloudPackage;
use crate::protocol::{ClientMsg, ErrorCode, HiddenFrame, ServerMsg, DEFAULT_MAX_FRAME, LENGTH_PREFIX, PROTOCOL_VERSION};
use crate::tls::ServerTls;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Sessions open at once; more are refused as busy (devices retry).
    pub max_sessions: usize,
    /// Positions one session's cache may hold.
    pub max_context: usize,
    /// When set, a device must present this token in its hello.
    pub auth_token: Option<String>,
    /// Largest frame body accepted.
    pub max_frame: usize,
    /// A connection that says nothing for this long is closed.
    pub idle_timeout: Duration,
    /// One stderr line per session and per refused connection.
    pub log: bool,
    /// The unsplit model, for `hat bench`'s token baselines (`cloud`, `sd`). Without it, messages
    /// that carry token ids are refused.
    pub baselines: Option<Arc<WholeModel>>,
    /// TLS for every connection (mutual when it holds a client CA); plain TCP without it.
    pub tls: Option<ServerTls>,
    /// Batched verification (see `engine`); `None` runs each forward alone.
    pub batch: Option<BatchConfig>,
    /// Bytes all sessions' KV caches may reserve together: each session reserves its granted
    /// context's worth when it opens, and one that would pass the budget is refused as busy.
    pub kv_budget: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_sessions: 16,
            max_context: usize::MAX,
            auth_token: None,
            max_frame: DEFAULT_MAX_FRAME,
            idle_timeout: Duration::from_secs(600),
            log: true,
            baselines: None,
            tls: None,
            batch: Some(BatchConfig::default()),
            kv_budget: None,
        }
    }
}

struct Shared {
    middle: Arc<Submodel>,
    fingerprint: String,
    hidden: usize,
    max_context: usize,
    auth_digest: Option<[u8; 32]>,
    cfg: ServerConfig,
    sessions: Arc<Semaphore>,
    /// Sessions open now (the engine waits for their requests only while some are not in its batch).
    open: Arc<AtomicUsize>,
    /// KV-cache bytes reserved by open sessions.
    kv_reserved: Arc<AtomicUsize>,
    engine: Option<Engine>,
    next_session: AtomicU64,
    metrics: Arc<CloudMetrics>,
}

impl Shared {
    fn log(&self, line: std::fmt::Arguments) {
        if self.cfg.log {
            eprintln!("hat-cloud: {line}");
        }
    }
}

/// A running cloud server; dropping it (or [`CloudServer::shutdown`]) stops it at once, cutting
/// every connection as a crash would.
pub struct CloudServer {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    metrics: Arc<CloudMetrics>,
}

impl std::fmt::Debug for CloudServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CloudServer({})", self.addr)
    }
}

/// KV-cache bytes one position costs in the middle submodel (keys and values in its compute dtype).
pub fn kv_bytes_per_position(middle: &Submodel) -> usize {
    let c = middle.config();
    middle.layer_range().len() * 2 * c.num_kv_heads * c.head_dim * middle.dtype().size_in_bytes()
}

impl CloudServer {
    /// Binds `listen` and starts serving `package`'s middle submodel in the background.
    pub fn start(package: &CloudPackage, cfg: ServerConfig, listen: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("hat-cloud")
            .max_blocking_threads(cfg.max_sessions.max(1) + 2)
            .build()
            .map_err(|e| RuntimeError::Io { context: "cannot start the server runtime".into(), source: e })?;
        let listener = runtime
            .block_on(TcpListener::bind(listen))
            .map_err(|e| RuntimeError::Io { context: format!("cannot listen on {listen}"), source: e })?;
        let addr = listener.local_addr().map_err(|e| RuntimeError::Io { context: "local address".into(), source: e })?;
        let model_context = package.middle.config().max_position_embeddings;
        let middle = Arc::new(package.middle.clone());
        let metrics = Arc::new(CloudMetrics::default());
        let open = Arc::new(AtomicUsize::new(0));
        // The engine's task lives on this runtime.
        let engine = cfg.batch.map(|b| {
            let _guard = runtime.enter();
            Engine::start(middle.clone(), b, open.clone(), metrics.clone())
        });
        let shared = Arc::new(Shared {
            middle,
            fingerprint: package.manifest.fingerprint.clone(),
            hidden: package.middle.config().hidden_size,
            max_context: cfg.max_context.min(model_context),
            auth_digest: cfg.auth_token.as_deref().map(digest),
            sessions: Arc::new(Semaphore::new(cfg.max_sessions.max(1))),
            open,
            kv_reserved: Arc::new(AtomicUsize::new(0)),
            engine,
            next_session: AtomicU64::new(1),
            metrics,
            cfg,
        });
        let kv_mb = kv_bytes_per_position(&package.middle) as f64 * shared.max_context as f64 / 1e6;
        let budget = match shared.cfg.kv_budget {
            Some(b) => format!("KV budget {:.0} MB in all", b as f64 / 1e6),
            None => "no KV budget".to_string(),
        };
        let batching = match &shared.cfg.batch {
            Some(b) => format!("batched (window {:?}, up to {} rows)", b.window, b.max_rows),
            None => "unbatched".to_string(),
        };
        shared.log(format_args!(
            "serving layers {:?} on {addr}: up to {} sessions x {} positions (KV cache up to {:.0} MB each), {budget}, {batching}, {}, auth {}{}",
            package.middle.layer_range(),
            shared.cfg.max_sessions,
            shared.max_context,
            kv_mb,
            match &shared.cfg.tls {
                Some(t) if t.mutual() => "TLS with client certificates",
                Some(_) => "TLS",
                None => "plain TCP (no TLS)",
            },
            if shared.auth_digest.is_some() { "required" } else { "off" },
            if shared.cfg.baselines.is_some() { "; ALSO SERVES THE TOKEN BASELINES (token ids cross the network)" } else { "" }
        ));
        let metrics = shared.metrics.clone();
        runtime.spawn(accept_loop(listener, shared));
        Ok(Self { runtime: Some(runtime), addr, metrics })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's Prometheus metrics, live.
    pub fn metrics(&self) -> Arc<CloudMetrics> {
        self.metrics.clone()
    }

    /// Serves until Ctrl-C.
    pub fn run_until_ctrl_c(mut self) -> Result<()> {
        if let Some(rt) = self.runtime.take() {
            rt.block_on(tokio::signal::ctrl_c()).map_err(|e| RuntimeError::Io { context: "waiting for Ctrl-C".into(), source: e })?;
            rt.shutdown_background();
        }
        Ok(())
    }

    /// Stops at once, as a crash would: every connection is cut mid-conversation. Returns once the
    /// listener is closed, so the address can be bound again.
    pub fn shutdown(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for CloudServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A message for positions `start..start + rows` may neither skip positions the session never
/// received (it holds `held`) nor run past its context.
fn check_positions(start: usize, rows: usize, held: usize, max_context: usize) -> std::result::Result<(), ServerMsg> {
    if start > held {
        Err(error(ErrorCode::Position, format!("start position {start} skips ahead: the session holds {held} positions")))
    } else if start + rows > max_context {
        Err(error(ErrorCode::Context, format!("positions up to {} exceed this session's context of {max_context}", start + rows)))
    } else {
        Ok(())
    }
}

fn micros(since: Instant) -> u32 {
    since.elapsed().as_micros().min(u32::MAX as u128) as u32
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                match shared.cfg.tls.clone() {
                    None => {
                        tokio::spawn(serve_connection(stream, peer, shared));
                    }
                    Some(tls) => {
                        // The handshake runs in the connection's own task: a slow or silent peer
                        // holds up no one else.
                        tokio::spawn(async move {
                            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => serve_connection(stream, peer, shared).await,
                                Ok(Err(e)) => {
                                    shared.metrics.tls_failures.inc();
                                    shared.log(format_args!("{peer}: refused: TLS handshake failed: {}", handshake_failure(&e)));
                                }
                                Err(_) => {
                                    shared.metrics.tls_failures.inc();
                                    shared.log(format_args!("{peer}: refused: no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:?}"));
                                }
                            }
                        });
                    }
                }
            }
            Err(e) => {
                shared.log(format_args!("accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One open session: its cache and what it has done, for the log line.
struct Session {
    id: u64,
    cache: Option<KvCache>,
    /// The unsplit model's cache, for the token baselines.
    whole: Option<WholeCache>,
    max_context: usize,
    messages: u64,
    positions: u64,
    opened: Instant,
    _permit: OwnedSemaphorePermit,
    _kv: KvReservation,
}

/// A session's share of the KV budget, given back when the session ends.
struct KvReservation {
    pool: Arc<AtomicUsize>,
    bytes: usize,
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        self.pool.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

enum Step {
    Reply(ServerMsg),
    /// Replies produced one by one on the blocking pool (cloud-side generation); the task hands the
    /// session's cache back when it ends.
    Stream(tokio::sync::mpsc::Receiver<ServerMsg>, tokio::task::JoinHandle<WholeCache>),
    /// Reply, then drop the connection (handshake refusals, broken framing).
    ReplyAndClose(ServerMsg),
    Silent,
}

/// The reply to a forward that ran, batched or alone, counted in the session and the metrics.
fn computed(session: &mut Session, metrics: &CloudMetrics, rows: usize, frame: HiddenFrame, compute_us: u32) -> Step {
    session.messages += 1;
    session.positions += rows as u64;
    metrics.positions.inc_by(rows as u64);
    metrics.forward_seconds.observe(f64::from(compute_us) / 1e6);
    Step::Reply(ServerMsg::Hidden { frame, compute_us })
}

fn error(code: ErrorCode, message: impl Into<String>) -> ServerMsg {
    ServerMsg::Error { code, message: message.into() }
}

struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    greeted: bool,
    session: Option<Session>,
}

/// The largest pong: link probes ask for 128 KiB.
const MAX_PONG: usize = 1 << 20;

/// How long a device may take over the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One line on why a device's TLS handshake failed, with what the operator can do about it.
fn handshake_failure(e: &std::io::Error) -> String {
    use rustls::{AlertDescription, CertificateError, Error};
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return e.to_string();
    };
    let hint = match err {
        Error::InvalidMessage(_) => " (a device without --tls-ca? this cloud speaks only TLS)",
        Error::NoCertificatesPresented => " (this cloud requires client certificates: the device must pass --tls-cert and --tls-key)",
        Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => {
            " (the device's certificate is not signed by --client-ca)"
        }
        Error::AlertReceived(AlertDescription::UnknownCA | AlertDescription::BadCertificate) => {
            " (the device does not trust this cloud's certificate: give it the CA with --tls-ca)"
        }
        _ => "",
    };
    format!("{err}{hint}")
}

async fn serve_connection<S>(stream: S, peer: SocketAddr, shared: Arc<Shared>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let codec =
        LengthDelimitedCodec::builder().length_field_length(LENGTH_PREFIX).big_endian().max_frame_length(shared.cfg.max_frame).new_codec();
    let mut framed = Framed::new(stream, codec);
    let metrics = shared.metrics.clone();
    // Every reply goes through here, so bytes and error classes are counted once.
    let encode = |m: &ServerMsg| {
        if let ServerMsg::Error { code, .. } = m {
            metrics.error(*code);
        }
        let body = Bytes::from(m.encode());
        metrics.bytes_out.inc_by((body.len() + LENGTH_PREFIX) as u64);
        body
    };
    let idle = shared.cfg.idle_timeout;
    let mut conn = Connection { shared, peer, greeted: false, session: None };
    let mut end = "device disconnected";
    loop {
        let frame = match tokio::time::timeout(idle, framed.next()).await {
            Err(_) => {
                let _ = framed.send(encode(&error(ErrorCode::BadFrame, "idle timeout"))).await;
                end = "idle timeout";
                break;
            }
            Ok(None) => break,
            // Gone without a goodbye (a TLS peer that skipped close_notify, a reset): no one to answer.
            Ok(Some(Err(e))) if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) => break,
            Ok(Some(Err(e))) => {
                if !conn.greeted {
                    conn.shared
                        .log(format_args!("{peer}: refused: bad first frame ({e}); a device speaking TLS to this plain cloud sends one"));
                }
                // Broken framing (an oversized length prefix included): the stream cannot be resynchronised.
                let _ = framed.send(encode(&error(ErrorCode::BadFrame, format!("bad frame: {e}")))).await;
                end = "bad frame";
                break;
            }
            Ok(Some(Ok(body))) => {
                metrics.bytes_in.inc_by((body.len() + LENGTH_PREFIX) as u64);
                body
            }
        };
        let (reply, close) = match conn.handle(&frame).await {
            Step::Reply(m) => (Some(m), false),
            Step::ReplyAndClose(m) => (Some(m), true),
            Step::Silent => (None, false),
            Step::Stream(mut rx, done) => {
                let mut sent = true;
                while let Some(m) = rx.recv().await {
                    sent = sent && framed.send(encode(&m)).await.is_ok();
                }
                let cache = done.await.ok();
                if let Some(s) = conn.session.as_mut() {
                    s.whole = cache;
                }
                if !sent {
                    end = "write failed";
                    break;
                }
                (None, false)
            }
        };
        if let Some(m) = reply {
            if framed.send(encode(&m)).await.is_err() {
                end = "write failed";
                break;
            }
        }
        if close {
            end = "refused";
            break;
        }
    }
    conn.end_session(end);
}

impl Connection {
    async fn handle(&mut self, body: &[u8]) -> Step {
        let msg = match ClientMsg::decode(body) {
            Ok(m) => m,
            Err(e) if !self.greeted => {
                self.shared.log(format_args!("{}: refused: not a hat hello ({e})", self.peer));
                return Step::ReplyAndClose(error(ErrorCode::BadFrame, format!("expected a hat hello: {e}")));
            }
            Err(e) => return Step::Reply(error(ErrorCode::BadFrame, e.to_string())),
        };
        match msg {
            ClientMsg::Hello { version, fingerprint, auth_token } => self.hello(version, &fingerprint, auth_token.as_deref()),
            _ if !self.greeted => Step::ReplyAndClose(error(ErrorCode::BadFrame, "the first message must be a hello")),
            ClientMsg::Open { max_context } => self.open(max_context as usize),
            ClientMsg::Forward(h) => self.forward(h, None, None).await,
            ClientMsg::ForwardTree { keep, depths, frame } => {
                let depths = depths.into_iter().map(usize::from).collect::<Vec<_>>();
                self.forward(frame, Some(depths), keep.map(|k| k as usize)).await
            }
            ClientMsg::Ping { reply_bytes, .. } => {
                // Capped well below the frame limit: a 9-byte ping must not make the cloud send 64 MiB.
                let n = (reply_bytes as usize).min(MAX_PONG).min(self.shared.cfg.max_frame.saturating_sub(16));
                Step::Reply(ServerMsg::Pong { pad: vec![0; n] })
            }
            ClientMsg::Tokens { start, last_only, ids } => self.tokens(start as usize, last_only, ids).await,
            ClientMsg::Generate { max_tokens, eos, prompt } => self.generate(max_tokens as usize, eos, prompt),
            ClientMsg::Close => {
                self.end_session("closed by device");
                Step::Silent
            }
        }
    }

    fn hello(&mut self, version: u16, fingerprint: &str, token: Option<&str>) -> Step {
        let refuse = |code, msg: String| {
            self.shared.log(format_args!("{}: refused: {msg}", self.peer));
            Step::ReplyAndClose(error(code, msg))
        };
        if self.greeted {
            return Step::Reply(error(ErrorCode::BadFrame, "hello sent twice"));
        }
        if version != PROTOCOL_VERSION {
            return refuse(
                ErrorCode::Version,
                format!("protocol version {version} is not supported; this cloud speaks version {PROTOCOL_VERSION} (use the same hat release on both sides)"),
            );
        }
        if fingerprint != self.shared.fingerprint {
            return refuse(
                ErrorCode::Fingerprint,
                format!(
                    "model fingerprint mismatch: the device package is {fingerprint}, this cloud serves {}; \
                     use the device and cloud halves of one `hat split` output",
                    self.shared.fingerprint
                ),
            );
        }
        if let Some(expected) = &self.shared.auth_digest {
            // Digests compare in constant time with respect to the secret's content.
            if token.map(digest).as_ref() != Some(expected) {
                let what = if token.is_some() { "wrong" } else { "missing" };
                return refuse(ErrorCode::Unauthorized, format!("auth token {what}: pass the cloud's token with --auth-token-file"));
            }
        }
        self.greeted = true;
        Step::Reply(ServerMsg::Welcome {
            version: PROTOCOL_VERSION,
            hidden: self.shared.hidden as u32,
            trees: self.shared.middle.runs_trees(),
        })
    }

    fn open(&mut self, requested: usize) -> Step {
        if self.session.is_some() {
            return Step::Reply(error(ErrorCode::BadFrame, "a session is already open on this connection; close it first"));
        }
        if requested == 0 {
            return Step::Reply(error(ErrorCode::Context, "a session needs a context of at least 1 position"));
        }
        let permit = match self.shared.sessions.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.shared.log(format_args!("{}: busy, refused a session", self.peer));
                return Step::Reply(error(
                    ErrorCode::Busy,
                    format!("the cloud is at its limit of {} sessions; retry later", self.shared.cfg.max_sessions),
                ));
            }
        };
        let max_context = requested.min(self.shared.max_context);
        let kv = match self.reserve_kv(max_context) {
            Ok(kv) => kv,
            Err(step) => return step,
        };
        let id = self.shared.next_session.fetch_add(1, Ordering::Relaxed);
        self.shared.metrics.sessions.inc();
        self.shared.metrics.sessions_open.inc();
        self.shared.open.fetch_add(1, Ordering::Relaxed);
        self.session = Some(Session {
            id,
            cache: Some(self.shared.middle.new_cache_limited(max_context)),
            whole: None,
            max_context,
            messages: 0,
            positions: 0,
            opened: Instant::now(),
            _permit: permit,
            _kv: kv,
        });
        Step::Reply(ServerMsg::Opened { session: id, max_context: max_context as u32 })
    }

    /// A round's rows at `frame.start`; with `depths`, a round with leaves, and with `keep`, the
    /// round before's accepted leaf at that slot first takes position `start - 1`.
    async fn forward(&mut self, frame: HiddenFrame, depths: Option<Vec<usize>>, keep: Option<usize>) -> Step {
        let hidden = self.shared.hidden;
        let trees = self.shared.middle.runs_trees();
        let Some(session) = self.session.as_mut() else {
            return Step::Reply(error(ErrorCode::NoSession, "forward before open"));
        };
        let Some(mut cache) = session.cache.take() else {
            return Step::Reply(error(ErrorCode::Internal, "session cache lost"));
        };
        let (start, rows) = (frame.start as usize, frame.rows as usize);
        // The round's shape is checked, and the kept leaf moved, before anything else touches the
        // cache: a refused round leaves it as it was.
        let shaped = match &depths {
            Some(_) if !trees => Err(error(ErrorCode::BadFrame, "this cloud does not verify rounds with leaves")),
            Some(d) => hat_model::attention::check_depths(d, rows).map_err(|e| error(ErrorCode::BadFrame, e.to_string())),
            None => Ok(()),
        }
        .and_then(|()| match keep {
            Some(slot) => start
                .checked_sub(1)
                .ok_or_else(|| error(ErrorCode::BadFrame, "a kept leaf at position 0"))
                .and_then(|to| cache.promote(slot, to).map_err(|e| error(ErrorCode::BadFrame, e.to_string()))),
            None => Ok(()),
        });
        if let Err(e) = shaped {
            session.cache = Some(cache);
            return Step::Reply(e);
        }
        let check = check_positions(start, rows, cache.len(), session.max_context)
            .and_then(|()| frame.decode(hidden, &candle_core::Device::Cpu).map_err(|e| error(ErrorCode::BadHidden, e.to_string())));
        let states = match check {
            Ok(s) => s,
            Err(e) => {
                session.cache = Some(cache);
                return Step::Reply(e);
            }
        };
        let format = frame.format;
        if let Some(engine) = self.shared.engine.clone() {
            let Some(done) = engine.forward(states, start, depths, cache).await else {
                session.cache = Some(self.shared.middle.new_cache_limited(session.max_context));
                return Step::Reply(error(ErrorCode::Internal, "the batch engine failed"));
            };
            session.cache = Some(done.cache);
            let compute_us = done.compute.as_micros().min(u32::MAX as u128) as u32;
            let out = done.result.and_then(|h| HiddenFrame::encode(&h, start, format).map_err(|e| e.to_string()));
            return match out {
                Ok(frame) => computed(session, &self.shared.metrics, rows, frame, compute_us),
                Err(e) => Step::Reply(error(ErrorCode::Internal, format!("middle forward failed: {e}"))),
            };
        }
        let middle = self.shared.middle.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let out = middle.forward_layers_tree(&states, start, depths.as_deref(), &mut cache).map_err(|e| e.to_string());
            let compute_us = micros(t0);
            let out = out.and_then(|h| HiddenFrame::encode(&h, start, format).map_err(|e| e.to_string()));
            (out.map(|frame| (frame, compute_us)), cache)
        })
        .await;
        match joined {
            Ok((Ok((frame, compute_us)), cache)) => {
                session.cache = Some(cache);
                computed(session, &self.shared.metrics, rows, frame, compute_us)
            }
            Ok((Err(e), mut cache)) => {
                // A half-applied forward leaves layers at different lengths: start the cache over.
                cache.truncate(0);
                session.cache = Some(cache);
                Step::Reply(error(ErrorCode::Internal, format!("middle forward failed: {e}")))
            }
            Err(e) => {
                session.cache = Some(self.shared.middle.new_cache());
                Step::Reply(error(ErrorCode::Internal, format!("middle forward panicked: {e}")))
            }
        }
    }

    /// The unsplit model and this session's cache of it, or the reply that refuses a baseline.
    fn baseline_session(&mut self, start: usize, ids: &[u32]) -> std::result::Result<(Arc<WholeModel>, WholeCache), Step> {
        let Some(model) = self.shared.cfg.baselines.clone() else {
            return Err(Step::Reply(error(
                ErrorCode::NotServed,
                "this cloud does not serve the token baselines; start it with --token-baselines DEVICE_DIR (benchmarks only: it exposes tokens)",
            )));
        };
        let Some(session) = self.session.as_mut() else {
            return Err(Step::Reply(error(ErrorCode::NoSession, "tokens before open")));
        };
        let mut cache = session.whole.take().unwrap_or_else(|| model.new_cache());
        let vocab = model.vocab_size();
        let check = if ids.is_empty() {
            Err(error(ErrorCode::BadFrame, "no token ids"))
        } else if let Some(t) = ids.iter().find(|&&t| t as usize >= vocab) {
            Err(error(ErrorCode::BadFrame, format!("token id {t} is outside the vocabulary ({vocab} ids)")))
        } else {
            check_positions(start, ids.len(), cache.len(), session.max_context.min(model.max_context()))
        };
        if let Err(e) = check {
            session.whole = Some(cache);
            return Err(Step::Reply(e));
        }
        cache.truncate(start);
        session.messages += 1;
        session.positions += ids.len() as u64;
        Ok((model, cache))
    }

    /// Baseline: the whole model's greedy token(s) after `ids`.
    async fn tokens(&mut self, start: usize, last_only: bool, ids: Vec<u32>) -> Step {
        let (model, mut cache) = match self.baseline_session(start, &ids) {
            Ok(x) => x,
            Err(step) => return step,
        };
        let joined = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let out = model.greedy(&ids, start, last_only, &mut cache).map_err(|e| e.to_string());
            (out, micros(t0), cache)
        })
        .await;
        let Ok((out, compute_us, mut cache)) = joined else {
            return Step::Reply(error(ErrorCode::Internal, "whole-model forward panicked"));
        };
        if out.is_err() {
            cache.truncate(0);
        }
        if let Some(s) = self.session.as_mut() {
            s.whole = Some(cache);
        }
        match out {
            Ok(ids) => Step::Reply(ServerMsg::TokenIds { start: start as u32, compute_us, ids }),
            Err(e) => Step::Reply(error(ErrorCode::Internal, format!("whole-model forward failed: {e}"))),
        }
    }

    /// Baseline: greedy generation in the cloud, one message per token.
    fn generate(&mut self, max_tokens: usize, eos: Vec<u32>, prompt: Vec<u32>) -> Step {
        let (model, mut cache) = match self.baseline_session(0, &prompt) {
            Ok(x) => x,
            Err(step) => return step,
        };
        let context = self.session.as_ref().map_or(0, |s| s.max_context).min(model.max_context());
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let done = tokio::task::spawn_blocking(move || {
            // The session's granted context bounds the reply, not only the model's.
            let room = context.saturating_sub(prompt.len());
            let (mut ids, mut pos) = (prompt, 0);
            for _ in 0..max_tokens.min(room) {
                let t0 = Instant::now();
                let next = match model.greedy(&ids, pos, true, &mut cache) {
                    Ok(next) => next[0],
                    Err(e) => {
                        let _ = tx.blocking_send(error(ErrorCode::Internal, format!("whole-model forward failed: {e}")));
                        cache.truncate(0);
                        break;
                    }
                };
                pos += ids.len();
                let msg = ServerMsg::TokenIds { start: pos as u32, compute_us: micros(t0), ids: vec![next] };
                if tx.blocking_send(msg).is_err() || eos.contains(&next) {
                    break;
                }
                ids = vec![next];
            }
            cache
        });
        Step::Stream(rx, done)
    }

    /// Reserves `positions` positions of KV cache from the budget, or refuses as busy.
    fn reserve_kv(&self, positions: usize) -> std::result::Result<KvReservation, Step> {
        let bytes = kv_bytes_per_position(&self.shared.middle).saturating_mul(positions);
        let pool = self.shared.kv_reserved.clone();
        let Some(budget) = self.shared.cfg.kv_budget else {
            pool.fetch_add(bytes, Ordering::Relaxed);
            return Ok(KvReservation { pool, bytes });
        };
        let taken = pool.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| (r + bytes <= budget).then_some(r + bytes));
        match taken {
            Ok(_) => Ok(KvReservation { pool, bytes }),
            Err(held) => {
                self.shared.log(format_args!("{}: busy, the KV budget is spoken for", self.peer));
                Err(Step::Reply(error(
                    ErrorCode::Busy,
                    format!(
                        "the cloud's KV budget ({:.0} MB) is spoken for: open sessions hold {:.0} MB and {positions} positions need {:.0} MB; \
                         retry later, or ask for a shorter context",
                        budget as f64 / 1e6,
                        held as f64 / 1e6,
                        bytes as f64 / 1e6
                    ),
                )))
            }
        }
    }

    fn end_session(&mut self, how: &str) {
        if let Some(s) = self.session.take() {
            self.shared.metrics.sessions_open.dec();
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
            self.shared.log(format_args!(
                "session {} from {}: {} messages, {} positions computed, {} cached at the end, {:.2} s, {how}",
                s.id,
                self.peer,
                s.messages,
                s.positions,
                s.cache.as_ref().map_or(0, KvCache::len),
                s.opened.elapsed().as_secs_f64()
            ));
        }
    }
}
