//! The device's client for `hat serve cloud`. It keeps a log of the hidden-state messages that still
//! shape the cloud's cache, so when the connection drops it reconnects (bounded retries with
//! backoff), replays the log into a fresh session and carries on: the cloud ends up with the very
//! cache it had, and the generation gives the tokens it would have given.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use crate::error::{Result, RuntimeError};
use crate::link::{Counters, FramedConn, LinkEmulation, LinkEstimate};
use crate::middle::{Middle, Shape, Traffic};
use crate::protocol::{ClientMsg, ErrorCode, HiddenFrame, ServerMsg, WireFormat, DEFAULT_MAX_FRAME, PROTOCOL_VERSION};
use crate::tls::{is_loopback, tls_failure, ClientTls};

#[derive(Debug, Clone)]
pub struct CloudOptions {
    /// host:port of `hat serve cloud`.
    pub addr: String,
    pub auth_token: Option<String>,
    pub wire: WireFormat,
    pub link: Option<LinkEmulation>,
    /// Connection attempts after a failure before giving up.
    pub retries: u32,
    /// Wait before the first retry; doubles each time, up to 5 s.
    pub backoff: Duration,
    /// How long to wait for one reply before treating the connection as dead.
    pub reply_timeout: Duration,
    /// TLS to the cloud; plain TCP without it.
    pub tls: Option<ClientTls>,
    /// Send the auth token over plain TCP to a cloud that is not on this machine. Off by default:
    /// anyone on the path could read it.
    pub insecure_auth: bool,
}

impl CloudOptions {
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            auth_token: None,
            wire: WireFormat::default(),
            link: None,
            retries: 5,
            backoff: Duration::from_millis(200),
            reply_timeout: Duration::from_secs(120),
            tls: None,
            insecure_auth: false,
        }
    }

    /// Refuses to send the auth token in the clear beyond this machine, unless forced.
    pub fn check_transport(&self) -> Result<()> {
        if self.auth_token.is_some() && self.tls.is_none() && !self.insecure_auth && !is_loopback(&self.addr) {
            return Err(RuntimeError::BadInput(format!(
                "refusing to send the auth token to {} over plain TCP, where anyone on the path can read it: connect with \
                 --tls-ca (or pass --insecure-auth to send it in the clear anyway)",
                self.addr
            )));
        }
        Ok(())
    }

    /// Opens the framed connection, in TLS when configured.
    pub(crate) fn open(&self, link: Option<LinkEmulation>, counters: Arc<Counters>) -> std::io::Result<FramedConn> {
        FramedConn::connect(&self.addr, link, DEFAULT_MAX_FRAME, counters, self.tls.as_ref())
    }

    /// The error for an I/O failure: a TLS failure is final (retrying cannot fix a certificate),
    /// anything else means the cloud is unreachable.
    pub(crate) fn io_error(&self, e: &std::io::Error, attempts: u32) -> RuntimeError {
        match tls_failure(e) {
            Some(t) => RuntimeError::Tls { addr: self.addr.clone(), reason: t.to_string() },
            None => RuntimeError::CloudUnreachable { addr: self.addr.clone(), attempts, last: e.to_string() },
        }
    }
}

/// A message the cloud's cache still depends on.
#[derive(Debug)]
struct Sent {
    start: usize,
    body: Vec<u8>,
    collected: bool,
    sent_at: Instant,
    /// Nothing else was in flight when it left, so its round trip measures the link.
    alone: bool,
    /// A round with leaves ([`ClientMsg::ForwardTree`]).
    tree: bool,
}

/// Bytes of each link probe, each way.
const PROBE_BYTES: usize = 128 << 10;

/// Why one connection attempt failed.
enum Failure {
    /// Worth retrying: the network or the server went away.
    Transient(String),
    /// Retrying cannot help (refused handshake, bad request).
    Fatal(RuntimeError),
    /// TLS failed: a certificate, or one side without TLS. Final too; the address is added later.
    Tls(String),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        match tls_failure(&e) {
            Some(t) => Failure::Tls(t.to_string()),
            None => Failure::Transient(e.to_string()),
        }
    }
}

#[derive(Debug)]
pub struct RemoteMiddle {
    opts: CloudOptions,
    fingerprint: String,
    hidden: usize,
    want_context: usize,
    granted_context: usize,
    device: Device,
    conn: Option<FramedConn>,
    log: Vec<Sent>,
    counters: Arc<Counters>,
    reconnects: u32,
    estimate: Option<LinkEstimate>,
    last_compute: Duration,
    /// Whether the cloud's welcome said it verifies rounds with leaves.
    trees: bool,
}

impl RemoteMiddle {
    /// Connects, shakes hands (protocol version, model fingerprint, auth token) and opens a session
    /// for up to `max_context` positions.
    pub fn connect(opts: CloudOptions, fingerprint: &str, hidden: usize, max_context: usize, device: &Device) -> Result<Self> {
        opts.check_transport()?;
        let mut me = Self {
            opts,
            fingerprint: fingerprint.to_string(),
            hidden,
            want_context: max_context,
            granted_context: 0,
            device: device.clone(),
            conn: None,
            log: Vec::new(),
            counters: Arc::new(Counters::default()),
            reconnects: 0,
            estimate: None,
            last_compute: Duration::ZERO,
            trees: false,
        };
        me.reconnect(None)?;
        me.reconnects = 0;
        Ok(me)
    }

    /// Checks that the cloud answers a hello for this model (version, fingerprint, auth token)
    /// without opening a session: one connection, one round trip, nothing left on the cloud. A
    /// health check's probe.
    pub fn check_cloud(opts: &CloudOptions, fingerprint: &str, timeout: Duration) -> Result<()> {
        opts.check_transport()?;
        let unreachable = |last: String| RuntimeError::CloudUnreachable { addr: opts.addr.clone(), attempts: 1, last };
        let mut conn = opts.open(None, Arc::new(Counters::default())).map_err(|e| opts.io_error(&e, 1))?;
        let hello =
            ClientMsg::Hello { version: PROTOCOL_VERSION, fingerprint: fingerprint.to_string(), auth_token: opts.auth_token.clone() };
        conn.send(&hello.encode()).map_err(|e| opts.io_error(&e, 1))?;
        let body = conn.recv(timeout).map_err(|e| opts.io_error(&e, 1))?;
        match ServerMsg::decode(&body).map_err(|e| unreachable(format!("unreadable reply: {e}")))? {
            ServerMsg::Welcome { .. } => Ok(()),
            ServerMsg::Error { code, message } => {
                Err(RuntimeError::CloudRefused { addr: opts.addr.clone(), code: format!("{code:?}"), message })
            }
            other => Err(unreachable(format!("unexpected reply to hello: {other:?}"))),
        }
    }

    fn refused(&self, code: ErrorCode, message: String) -> RuntimeError {
        RuntimeError::CloudRefused { addr: self.opts.addr.clone(), code: format!("{code:?}"), message }
    }

    fn recv_msg(&self, conn: &mut FramedConn) -> std::result::Result<ServerMsg, Failure> {
        let body = conn.recv(self.opts.reply_timeout)?;
        ServerMsg::decode(&body).map_err(|e| Failure::Transient(format!("unreadable reply: {e}")))
    }

    /// Opens a connection and a session, then replays the log: collected messages have their
    /// replies read and dropped, uncollected ones are left for [`Middle::collect`].
    fn attempt(&self) -> std::result::Result<(FramedConn, usize, bool), Failure> {
        let mut conn = self.opts.open(self.opts.link, self.counters.clone())?;
        let hello =
            ClientMsg::Hello { version: PROTOCOL_VERSION, fingerprint: self.fingerprint.clone(), auth_token: self.opts.auth_token.clone() };
        conn.send(&hello.encode())?;
        let trees = match self.recv_msg(&mut conn)? {
            ServerMsg::Welcome { hidden, trees, .. } if hidden as usize == self.hidden => trees,
            ServerMsg::Welcome { hidden, .. } => {
                return Err(Failure::Fatal(self.refused(
                    ErrorCode::BadHidden,
                    format!("the cloud serves hidden size {hidden}, this device package has {}", self.hidden),
                )))
            }
            ServerMsg::Error { code, message } => return Err(Failure::Fatal(self.refused(code, message))),
            other => return Err(Failure::Transient(format!("unexpected reply to hello: {other:?}"))),
        };
        if !trees && self.log.iter().any(|s| s.tree) {
            return Err(Failure::Fatal(self.refused(
                ErrorCode::BadFrame,
                "this session sent rounds with leaves, and the cloud it reconnected to does not verify them".into(),
            )));
        }
        conn.send(&ClientMsg::Open { max_context: self.want_context as u32 }.encode())?;
        let granted = match self.recv_msg(&mut conn)? {
            ServerMsg::Opened { max_context, .. } => max_context as usize,
            ServerMsg::Error { code, message } if code.is_fatal() => return Err(Failure::Fatal(self.refused(code, message))),
            ServerMsg::Error { message, .. } => return Err(Failure::Transient(message)),
            other => return Err(Failure::Transient(format!("unexpected reply to open: {other:?}"))),
        };
        for s in &self.log {
            conn.send(&s.body)?;
        }
        for _ in self.log.iter().filter(|s| s.collected) {
            match self.recv_msg(&mut conn)? {
                ServerMsg::Hidden { .. } => {}
                ServerMsg::Error { code, message } => return Err(Failure::Fatal(self.refused(code, message))),
                other => return Err(Failure::Transient(format!("unexpected reply during replay: {other:?}"))),
            }
        }
        Ok((conn, granted, trees))
    }

    /// (Re)connects with bounded retries and exponential backoff.
    fn reconnect(&mut self, cause: Option<String>) -> Result<()> {
        self.conn = None;
        let attempts = self.opts.retries + 1;
        let mut last = cause.unwrap_or_default();
        for i in 0..attempts {
            if i > 0 || !last.is_empty() {
                let wait = self.opts.backoff.saturating_mul(1 << i.min(8)).min(Duration::from_secs(5));
                std::thread::sleep(wait);
            }
            match self.attempt() {
                Ok((conn, granted, trees)) => {
                    if self.granted_context != 0 {
                        self.reconnects += 1;
                    }
                    self.granted_context = granted;
                    self.trees = trees;
                    self.conn = Some(conn);
                    return Ok(());
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Tls(reason)) => return Err(RuntimeError::Tls { addr: self.opts.addr.clone(), reason }),
                Err(Failure::Transient(e)) => last = e,
            }
        }
        Err(RuntimeError::CloudUnreachable { addr: self.opts.addr.clone(), attempts, last })
    }

    /// The link as last measured: probes from [`RemoteMiddle::measure_link`], with the round-trip time
    /// then kept up to date from forwards that travelled alone.
    pub fn link_estimate(&self) -> Option<LinkEstimate> {
        self.estimate
    }

    /// Starts from a link estimate measured earlier (by another session to the same cloud), so this
    /// session does not probe again; forwards keep its round-trip time current as usual.
    pub fn set_link_estimate(&mut self, est: LinkEstimate) {
        self.estimate = Some(est);
    }

    /// How long the cloud computed the last collected reply, as it reported.
    pub fn last_compute(&self) -> Duration {
        self.last_compute
    }

    /// Measures the link with probes: the best of three empty pings gives the RTT, then 128 KiB up
    /// (and an empty reply) and 128 KiB down give each direction's throughput. Costs about 2 x 128 KiB
    /// of traffic. Needs nothing in flight.
    pub fn measure_link(&mut self) -> Result<LinkEstimate> {
        if self.log.iter().any(|s| !s.collected) {
            return Err(RuntimeError::BadInput("cannot probe the link with messages in flight".into()));
        }
        let mut rtt = Duration::MAX;
        for _ in 0..3 {
            rtt = rtt.min(self.ping(0, 0)?);
        }
        let over = |t: Duration| (t.saturating_sub(rtt).as_secs_f64()).max(1e-5);
        let up = PROBE_BYTES as f64 * 8.0 / over(self.ping(PROBE_BYTES, 0)?) / 1e6;
        let down = PROBE_BYTES as f64 * 8.0 / over(self.ping(0, PROBE_BYTES)?) / 1e6;
        let est = LinkEstimate { rtt, up_mbps: up, down_mbps: down };
        self.estimate = Some(est);
        Ok(est)
    }

    /// One probe round trip.
    fn ping(&mut self, up: usize, down: usize) -> Result<Duration> {
        let msg = ClientMsg::Ping { reply_bytes: down as u32, pad: vec![0; up] }.encode();
        let addr = self.opts.addr.clone();
        let lost = |e: std::io::Error| RuntimeError::CloudUnreachable { addr: addr.clone(), attempts: 1, last: e.to_string() };
        let conn = self.conn.as_mut().ok_or_else(|| lost(std::io::Error::other("not connected")))?;
        let t0 = Instant::now();
        conn.send(&msg).map_err(lost)?;
        let body = conn.recv(self.opts.reply_timeout).map_err(lost)?;
        let took = t0.elapsed();
        match ServerMsg::decode(&body) {
            Ok(ServerMsg::Pong { .. }) => Ok(took),
            Ok(ServerMsg::Error { code, message }) => Err(self.refused(code, message)),
            other => {
                Err(RuntimeError::CloudProtocol { addr: self.opts.addr.clone(), reason: format!("unexpected reply to a ping: {other:?}") })
            }
        }
    }

    /// Folds one lone round trip into the RTT estimate: its time minus cloud compute and serialisation.
    fn observe(&mut self, took: Duration, compute_us: u32, up_bytes: usize, down_bytes: usize) {
        if let Some(est) = self.estimate.as_mut() {
            let wire = est.up_secs(up_bytes) + est.down_secs(down_bytes) + compute_us as f64 / 1e6;
            let sample = (took.as_secs_f64() - wire).max(0.0);
            est.rtt = Duration::from_secs_f64(0.8 * est.rtt.as_secs_f64() + 0.2 * sample);
        }
    }

    fn send_logged(&mut self, index: usize) -> Result<()> {
        let sent = match self.conn.as_mut() {
            Some(conn) => conn.send(&self.log[index].body).map_err(|e| e.to_string()),
            None => Err("not connected".to_string()),
        };
        // A reconnect replays the whole log, this message included.
        if let Err(e) = sent {
            self.reconnect(Some(e))?;
        }
        Ok(())
    }
}

impl Middle for RemoteMiddle {
    fn submit(&mut self, start: usize, states: &Tensor) -> Result<()> {
        self.submit_tree(start, states, &Shape::default())
    }

    fn submit_tree(&mut self, start: usize, states: &Tensor, shape: &Shape) -> Result<()> {
        // Messages at or after `start` no longer shape the cloud's cache once this one truncates it.
        if self.log.iter().any(|s| s.start >= start && !s.collected) {
            return Err(RuntimeError::BadInput(format!("submit at {start} would discard an uncollected message")));
        }
        let tree = !shape.is_chain();
        if tree && !self.trees {
            return Err(RuntimeError::BadInput("this cloud does not verify rounds with leaves".into()));
        }
        self.log.retain(|s| s.start < start);
        let frame = HiddenFrame::encode(states, start, self.opts.wire)?;
        let alone = self.log.iter().all(|s| s.collected);
        let msg = match shape {
            _ if !tree => ClientMsg::Forward(frame),
            Shape { depths, keep } => {
                let depths = match depths {
                    Some(d) => d
                        .iter()
                        .map(|&d| u16::try_from(d).map_err(|_| RuntimeError::BadInput(format!("row depth {d}"))))
                        .collect::<Result<_>>()?,
                    None => (0..frame.rows).map(|i| i as u16).collect(),
                };
                let keep = keep.map(|k| u32::try_from(k).map_err(|_| RuntimeError::BadInput(format!("slot {k}")))).transpose()?;
                ClientMsg::ForwardTree { keep, depths, frame }
            }
        };
        self.log.push(Sent { start, body: msg.encode(), collected: false, sent_at: Instant::now(), alone, tree });
        self.send_logged(self.log.len() - 1)
    }

    fn runs_trees(&self) -> bool {
        self.trees
    }

    fn collect(&mut self) -> Result<Tensor> {
        let index = self
            .log
            .iter()
            .position(|s| !s.collected)
            .ok_or_else(|| RuntimeError::BadInput("collect() without a submitted message".into()))?;
        loop {
            let got = match self.conn.as_mut() {
                Some(conn) => conn.recv(self.opts.reply_timeout).map_err(|e| e.to_string()),
                None => Err("not connected".to_string()),
            };
            let body = match got {
                Ok(b) => b,
                Err(e) => {
                    self.reconnect(Some(e))?;
                    continue;
                }
            };
            match ServerMsg::decode(&body) {
                Ok(ServerMsg::Hidden { frame: h, compute_us }) if h.start as usize == self.log[index].start => {
                    let t = h
                        .decode(self.hidden, &self.device)
                        .map_err(|e| RuntimeError::CloudProtocol { addr: self.opts.addr.clone(), reason: e.to_string() })?;
                    self.last_compute = Duration::from_micros(compute_us as u64);
                    let sent = &self.log[index];
                    if sent.alone {
                        let (took, up) = (sent.sent_at.elapsed(), sent.body.len() + 4);
                        self.observe(took, compute_us, up, body.len() + 4);
                    }
                    self.log[index].collected = true;
                    return Ok(t);
                }
                Ok(ServerMsg::Error { code, message }) => return Err(self.refused(code, message)),
                Ok(other) => {
                    return Err(RuntimeError::CloudProtocol { addr: self.opts.addr.clone(), reason: format!("unexpected reply {other:?}") })
                }
                Err(e) => return Err(RuntimeError::CloudProtocol { addr: self.opts.addr.clone(), reason: e.to_string() }),
            }
        }
    }

    fn max_context(&self) -> usize {
        self.granted_context
    }

    fn reply_ready(&mut self) -> bool {
        // Not connected: collect reconnects, which is no reason to wait here.
        self.conn.as_mut().is_none_or(|c| c.reply_ready())
    }

    fn traffic(&self) -> Traffic {
        self.counters.traffic(self.reconnects)
    }
}

impl Drop for RemoteMiddle {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            let _ = conn.send(&ClientMsg::Close.encode());
        }
    }
}
