//! The device-cloud wire protocol. Every frame is a 4-byte big-endian length followed by a body whose
//! first byte names the message. Hidden states travel by position, so the cloud can roll its KV cache
//! back to any start. The split modes (U-shaped and HAT) only ever send hello, open, ping, forward
//! and close, and none of those has a field for token ids or text: raw tokens cannot leave the device
//! through them by construction.
//!
//! Two more messages, [`ClientMsg::Tokens`] and [`ClientMsg::Generate`], carry token ids. They exist
//! only so `hat bench` can run the `cloud` and `sd` baselines against the same server; a cloud refuses
//! them unless it was started with the unsplit model (`--token-baselines`).

use candle_core::{Device, Tensor};

/// Bumped on any incompatible change; the handshake refuses a mismatch.
pub const PROTOCOL_VERSION: u16 = 3;
/// First bytes of a hello, so a stray client (or garbage) is told apart from an old hat.
pub const MAGIC: [u8; 4] = *b"HAT\x00";
/// Default cap on one frame's body, checked before any buffer is allocated for it.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;
pub const LENGTH_PREFIX: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("truncated frame: {0}")]
    Truncated(&'static str),
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("{0}")]
    Invalid(String),
}

type PResult<T> = std::result::Result<T, ProtocolError>;

/// Number format of hidden states on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireDType {
    F32,
    F16,
    Bf16,
}

impl WireDType {
    pub fn bytes(self) -> usize {
        match self {
            WireDType::F32 => 4,
            WireDType::F16 | WireDType::Bf16 => 2,
        }
    }

    fn code(self) -> u8 {
        match self {
            WireDType::F32 => 0,
            WireDType::F16 => 1,
            WireDType::Bf16 => 2,
        }
    }

    fn from_code(c: u8) -> PResult<Self> {
        match c {
            0 => Ok(WireDType::F32),
            1 => Ok(WireDType::F16),
            2 => Ok(WireDType::Bf16),
            other => Err(ProtocolError::Invalid(format!("unknown hidden-state dtype code {other}"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WireDType::F32 => "f32",
            WireDType::F16 => "f16",
            WireDType::Bf16 => "bf16",
        }
    }
}

/// How hidden states are encoded; the device chooses, the cloud answers in kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireFormat {
    pub dtype: WireDType,
    pub zstd: bool,
}

/// f32 by default: the cloud gets exactly the states the device computed, so greedy `hat` and
/// `ushape` equal `--mode local` bit for bit. f16 and bf16 halve the traffic but round the states,
/// which can flip a near-tie.
impl Default for WireFormat {
    fn default() -> Self {
        Self { dtype: WireDType::F32, zstd: false }
    }
}

/// Error classes a cloud reports; the message says what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    BadFrame = 1,
    Version = 2,
    Fingerprint = 3,
    Unauthorized = 4,
    Busy = 5,
    BadHidden = 6,
    Context = 7,
    Position = 8,
    NoSession = 9,
    Internal = 10,
    /// The request needs something this cloud was not started with (the token baselines).
    NotServed = 11,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Self {
        use ErrorCode::*;
        [BadFrame, Version, Fingerprint, Unauthorized, Busy, BadHidden, Context, Position, NoSession, NotServed]
            .into_iter()
            .find(|c| *c as u16 == v)
            .unwrap_or(Internal)
    }

    /// Errors after which retrying the same request cannot help.
    pub fn is_fatal(self) -> bool {
        !matches!(self, ErrorCode::Busy | ErrorCode::Internal)
    }
}

/// Hidden states for positions `start..start + rows`, encoded per [`WireFormat`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HiddenFrame {
    pub start: u32,
    pub rows: u32,
    pub hidden: u32,
    pub format: WireFormat,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    Hello {
        version: u16,
        fingerprint: String,
        auth_token: Option<String>,
    },
    /// Starts a session whose cache may hold up to `max_context` positions.
    Open {
        max_context: u32,
    },
    Forward(HiddenFrame),
    /// A round shaped as a chain with leaves (see `hat_model::attention::attend_tree`): row i sits
    /// at depth `depths[i]`. With `keep`, the leaf the round before left at that slot was accepted:
    /// it takes position `start - 1` before this round runs. Only to a cloud whose welcome says
    /// `trees`.
    ForwardTree {
        keep: Option<u32>,
        depths: Vec<u16>,
        frame: HiddenFrame,
    },
    Close,
    /// Link probe: the cloud answers at once with a [`ServerMsg::Pong`] of `reply_bytes` padding.
    Ping {
        reply_bytes: u32,
        pad: Vec<u8>,
    },
    /// Baseline only (exposes tokens): run the unsplit model on `ids` at positions `start..` and
    /// answer with the greedy next token of each position, or of the last one only.
    Tokens {
        start: u32,
        last_only: bool,
        ids: Vec<u32>,
    },
    /// Baseline only (exposes tokens): greedy generation in the cloud after `prompt`, streamed back
    /// one [`ServerMsg::TokenIds`] per token, until an `eos` id or `max_tokens`.
    Generate {
        max_tokens: u32,
        eos: Vec<u32>,
        prompt: Vec<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMsg {
    Welcome {
        version: u16,
        hidden: u32,
        /// Whether this cloud verifies rounds with leaves ([`ClientMsg::ForwardTree`]).
        trees: bool,
    },
    /// The session is open with at most `max_context` positions.
    Opened {
        session: u64,
        max_context: u32,
    },
    /// Middle-submodel output, and how long the cloud computed it (microseconds), so the device
    /// can tell link time from cloud time.
    Hidden {
        frame: HiddenFrame,
        compute_us: u32,
    },
    Pong {
        pad: Vec<u8>,
    },
    /// Baseline replies: token ids for positions `start..`.
    TokenIds {
        start: u32,
        compute_us: u32,
        ids: Vec<u32>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

const K_HELLO: u8 = 1;
const K_OPEN: u8 = 2;
const K_FORWARD: u8 = 3;
const K_CLOSE: u8 = 4;
const K_PING: u8 = 5;
const K_TOKENS: u8 = 6;
const K_GENERATE: u8 = 7;
const K_FORWARD_TREE: u8 = 8;
const K_WELCOME: u8 = 0x81;
const K_OPENED: u8 = 0x82;
const K_HIDDEN: u8 = 0x83;
const K_PONG: u8 = 0x84;
const K_TOKEN_IDS: u8 = 0x85;
const K_ERROR: u8 = 0xff;

/// Little-endian field reader over a frame body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> PResult<&'a [u8]> {
        if self.buf.len() < n {
            return Err(ProtocolError::Truncated(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> PResult<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> PResult<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> PResult<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> PResult<u64> {
        let lo = self.u32(what)? as u64;
        let hi = self.u32(what)? as u64;
        Ok(lo | hi << 32)
    }
    fn string(&mut self, what: &'static str) -> PResult<String> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::Invalid(format!("{what} is not UTF-8")))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn end(&self, what: &'static str) -> PResult<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Invalid(format!("{} unexpected bytes after {what}", self.buf.len())))
        }
    }
}

fn put_ids(out: &mut Vec<u8>, ids: &[u32]) {
    out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
    ids.iter().for_each(|t| out.extend_from_slice(&t.to_le_bytes()));
}

fn read_ids(r: &mut Reader, what: &'static str) -> PResult<Vec<u32>> {
    let n = r.u32(what)? as usize;
    if n > r.buf.len() / 4 {
        return Err(ProtocolError::Truncated(what));
    }
    (0..n).map(|_| r.u32(what)).collect()
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    // Cut at a character boundary: a cut inside one would make the peer refuse the whole message.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = &s.as_bytes()[..end];
    out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl HiddenFrame {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.start.to_le_bytes());
        out.extend_from_slice(&self.rows.to_le_bytes());
        out.extend_from_slice(&self.hidden.to_le_bytes());
        out.push(self.format.dtype.code());
        out.push(self.format.zstd as u8);
        out.extend_from_slice(&self.payload);
    }

    fn read(r: &mut Reader) -> PResult<Self> {
        let start = r.u32("start")?;
        let rows = r.u32("rows")?;
        let hidden = r.u32("hidden")?;
        let dtype = WireDType::from_code(r.u8("dtype")?)?;
        let zstd = match r.u8("compression")? {
            0 => false,
            1 => true,
            other => return Err(ProtocolError::Invalid(format!("unknown compression code {other}"))),
        };
        Ok(Self { start, rows, hidden, format: WireFormat { dtype, zstd }, payload: r.rest().to_vec() })
    }

    /// Encodes `states` for positions `start..`.
    ///
    /// # Shapes
    /// states: (1, rows, hidden)
    pub fn encode(states: &Tensor, start: usize, format: WireFormat) -> candle_core::Result<Self> {
        let (_, rows, hidden) = states.dims3()?;
        let values = states.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let mut raw = Vec::with_capacity(values.len() * format.dtype.bytes());
        match format.dtype {
            WireDType::F32 => values.iter().for_each(|v| raw.extend_from_slice(&v.to_le_bytes())),
            WireDType::F16 => values.iter().for_each(|v| raw.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            WireDType::Bf16 => values.iter().for_each(|v| raw.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
        let payload =
            if format.zstd { zstd::bulk::compress(&raw, 1).map_err(|e| candle_core::Error::Msg(format!("zstd: {e}")))? } else { raw };
        Ok(Self { start: start as u32, rows: rows as u32, hidden: hidden as u32, format, payload })
    }

    /// Decodes and checks the payload against the expected width; never allocates more than the
    /// declared shape, even for a malicious zstd stream, and refuses a declared shape larger than
    /// one uncompressed frame could carry before allocating anything for it.
    ///
    /// # Shapes
    /// -> (1, rows, hidden) f32
    pub fn decode(&self, expected_hidden: usize, device: &Device) -> PResult<Tensor> {
        if self.hidden as usize != expected_hidden {
            return Err(ProtocolError::Invalid(format!("hidden size {} does not match the model's {expected_hidden}", self.hidden)));
        }
        if self.rows == 0 {
            return Err(ProtocolError::Invalid("a hidden-state frame with 0 rows".into()));
        }
        // The zstd path reserves the declared size up front: 2^32 rows would abort the process.
        let raw_len = (self.rows as usize).checked_mul(expected_hidden).and_then(|n| n.checked_mul(self.format.dtype.bytes()));
        let Some(raw_len) = raw_len.filter(|&len| len <= DEFAULT_MAX_FRAME) else {
            return Err(ProtocolError::Invalid(format!(
                "{} rows x {expected_hidden} x {} is over the {DEFAULT_MAX_FRAME}-byte limit of one message: send fewer rows",
                self.rows,
                self.format.dtype.name()
            )));
        };
        let decompressed;
        let raw: &[u8] = if self.format.zstd {
            decompressed = zstd::bulk::decompress(&self.payload, raw_len)
                .map_err(|e| ProtocolError::Invalid(format!("zstd payload does not decompress to {raw_len} bytes: {e}")))?;
            &decompressed
        } else {
            &self.payload
        };
        if raw.len() != raw_len {
            return Err(ProtocolError::Invalid(format!(
                "payload has {} bytes, {} rows x {} x {} need {raw_len}",
                raw.len(),
                self.rows,
                expected_hidden,
                self.format.dtype.name()
            )));
        }
        let values: Vec<f32> = match self.format.dtype {
            WireDType::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            WireDType::F16 => raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            WireDType::Bf16 => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(ProtocolError::Invalid("hidden states contain NaN or infinity".into()));
        }
        Tensor::from_vec(values, (1, self.rows as usize, expected_hidden), device).map_err(|e| ProtocolError::Invalid(e.to_string()))
    }
}

impl ClientMsg {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            ClientMsg::Hello { version, fingerprint, auth_token } => {
                out.push(K_HELLO);
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&version.to_le_bytes());
                put_string(&mut out, fingerprint);
                out.push(auth_token.is_some() as u8);
                put_string(&mut out, auth_token.as_deref().unwrap_or(""));
            }
            ClientMsg::Open { max_context } => {
                out.push(K_OPEN);
                out.extend_from_slice(&max_context.to_le_bytes());
            }
            ClientMsg::Forward(h) => {
                out.push(K_FORWARD);
                h.put(&mut out);
            }
            ClientMsg::ForwardTree { keep, depths, frame } => {
                out.push(K_FORWARD_TREE);
                out.extend_from_slice(&keep.unwrap_or(u32::MAX).to_le_bytes());
                out.extend_from_slice(&(depths.len() as u32).to_le_bytes());
                depths.iter().for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
                frame.put(&mut out);
            }
            ClientMsg::Close => out.push(K_CLOSE),
            ClientMsg::Ping { reply_bytes, pad } => {
                out.push(K_PING);
                out.extend_from_slice(&reply_bytes.to_le_bytes());
                out.extend_from_slice(pad);
            }
            ClientMsg::Tokens { start, last_only, ids } => {
                out.push(K_TOKENS);
                out.extend_from_slice(&start.to_le_bytes());
                out.push(*last_only as u8);
                put_ids(&mut out, ids);
            }
            ClientMsg::Generate { max_tokens, eos, prompt } => {
                out.push(K_GENERATE);
                out.extend_from_slice(&max_tokens.to_le_bytes());
                put_ids(&mut out, eos);
                put_ids(&mut out, prompt);
            }
        }
        out
    }

    pub fn decode(body: &[u8]) -> PResult<Self> {
        let mut r = Reader { buf: body };
        let msg = match r.u8("kind")? {
            K_HELLO => {
                if r.take(4, "magic")? != MAGIC {
                    return Err(ProtocolError::Invalid("not a hat hello (bad magic)".into()));
                }
                let version = r.u16("version")?;
                let fingerprint = r.string("fingerprint")?;
                let has_token = r.u8("auth flag")? != 0;
                let token = r.string("auth token")?;
                ClientMsg::Hello { version, fingerprint, auth_token: has_token.then_some(token) }
            }
            K_OPEN => ClientMsg::Open { max_context: r.u32("max_context")? },
            K_FORWARD => return Ok(ClientMsg::Forward(HiddenFrame::read(&mut r)?)),
            K_FORWARD_TREE => {
                let keep = Some(r.u32("keep")?).filter(|&k| k != u32::MAX);
                let n = r.u32("depth count")? as usize;
                // Checked against the bytes left before anything is allocated for them.
                let raw = r.take(n.checked_mul(2).ok_or(ProtocolError::Truncated("depths"))?, "depths")?;
                let depths: Vec<u16> = raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
                let frame = HiddenFrame::read(&mut r)?;
                if depths.len() != frame.rows as usize {
                    return Err(ProtocolError::Invalid(format!("{} row depths for {} rows", depths.len(), frame.rows)));
                }
                return Ok(ClientMsg::ForwardTree { keep, depths, frame });
            }
            K_CLOSE => ClientMsg::Close,
            K_PING => return Ok(ClientMsg::Ping { reply_bytes: r.u32("reply_bytes")?, pad: r.rest().to_vec() }),
            K_TOKENS => ClientMsg::Tokens { start: r.u32("start")?, last_only: r.u8("last_only")? != 0, ids: read_ids(&mut r, "ids")? },
            K_GENERATE => {
                ClientMsg::Generate { max_tokens: r.u32("max_tokens")?, eos: read_ids(&mut r, "eos")?, prompt: read_ids(&mut r, "prompt")? }
            }
            other => return Err(ProtocolError::UnknownKind(other)),
        };
        r.end("the message")?;
        Ok(msg)
    }
}

impl ServerMsg {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            ServerMsg::Welcome { version, hidden, trees } => {
                out.push(K_WELCOME);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&hidden.to_le_bytes());
                out.push(*trees as u8);
            }
            ServerMsg::Opened { session, max_context } => {
                out.push(K_OPENED);
                out.extend_from_slice(&(*session as u32).to_le_bytes());
                out.extend_from_slice(&((*session >> 32) as u32).to_le_bytes());
                out.extend_from_slice(&max_context.to_le_bytes());
            }
            ServerMsg::Hidden { frame, compute_us } => {
                out.push(K_HIDDEN);
                out.extend_from_slice(&compute_us.to_le_bytes());
                frame.put(&mut out);
            }
            ServerMsg::Pong { pad } => {
                out.push(K_PONG);
                out.extend_from_slice(pad);
            }
            ServerMsg::TokenIds { start, compute_us, ids } => {
                out.push(K_TOKEN_IDS);
                out.extend_from_slice(&start.to_le_bytes());
                out.extend_from_slice(&compute_us.to_le_bytes());
                put_ids(&mut out, ids);
            }
            ServerMsg::Error { code, message } => {
                out.push(K_ERROR);
                out.extend_from_slice(&(*code as u16).to_le_bytes());
                put_string(&mut out, message);
            }
        }
        out
    }

    pub fn decode(body: &[u8]) -> PResult<Self> {
        let mut r = Reader { buf: body };
        let msg = match r.u8("kind")? {
            K_WELCOME => ServerMsg::Welcome { version: r.u16("version")?, hidden: r.u32("hidden")?, trees: r.u8("trees")? != 0 },
            K_OPENED => ServerMsg::Opened { session: r.u64("session")?, max_context: r.u32("max_context")? },
            K_HIDDEN => {
                let compute_us = r.u32("compute time")?;
                return Ok(ServerMsg::Hidden { compute_us, frame: HiddenFrame::read(&mut r)? });
            }
            K_PONG => return Ok(ServerMsg::Pong { pad: r.rest().to_vec() }),
            K_TOKEN_IDS => {
                ServerMsg::TokenIds { start: r.u32("start")?, compute_us: r.u32("compute time")?, ids: read_ids(&mut r, "ids")? }
            }
            K_ERROR => ServerMsg::Error { code: ErrorCode::from_u16(r.u16("code")?), message: r.string("message")? },
            other => return Err(ProtocolError::UnknownKind(other)),
        };
        r.end("the message")?;
        Ok(msg)
    }
}

/// Prepends the length prefix.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(LENGTH_PREFIX + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states() -> Tensor {
        let v: Vec<f32> = (0..24).map(|i| i as f32 * 0.37 - 3.0).collect();
        Tensor::from_vec(v, (1, 3, 8), &Device::Cpu).expect("tensor")
    }

    #[test]
    fn messages_round_trip() {
        let h = HiddenFrame::encode(&states(), 5, WireFormat { dtype: WireDType::F16, zstd: true }).expect("encode");
        let msgs = [
            ClientMsg::Hello { version: 1, fingerprint: "ab".into(), auth_token: Some("s3cret".into()) },
            ClientMsg::Hello { version: 1, fingerprint: "ab".into(), auth_token: None },
            ClientMsg::Open { max_context: 2048 },
            ClientMsg::Forward(h.clone()),
            ClientMsg::ForwardTree { keep: Some(9), depths: (0..h.rows as u16).collect(), frame: h.clone() },
            ClientMsg::ForwardTree { keep: None, depths: (0..h.rows as u16).collect(), frame: h.clone() },
            ClientMsg::Close,
            ClientMsg::Ping { reply_bytes: 9, pad: vec![0; 5] },
            ClientMsg::Tokens { start: 4, last_only: true, ids: vec![1, 70000, 3] },
            ClientMsg::Generate { max_tokens: 16, eos: vec![2], prompt: vec![5, 6] },
        ];
        for m in msgs {
            assert_eq!(ClientMsg::decode(&m.encode()), Ok(m));
        }
        let msgs = [
            ServerMsg::Welcome { version: 1, hidden: 576, trees: true },
            ServerMsg::Opened { session: (7 << 32) + 3, max_context: 99 },
            ServerMsg::Hidden { frame: h, compute_us: 1234 },
            ServerMsg::Pong { pad: vec![0; 3] },
            ServerMsg::TokenIds { start: 9, compute_us: 5, ids: vec![8, 9] },
            ServerMsg::Error { code: ErrorCode::Context, message: "too long".into() },
        ];
        for m in msgs {
            assert_eq!(ServerMsg::decode(&m.encode()), Ok(m));
        }
    }

    #[test]
    fn hidden_states_survive_every_format() {
        let x = states();
        for dtype in [WireDType::F32, WireDType::F16, WireDType::Bf16] {
            for zstd in [false, true] {
                let f = HiddenFrame::encode(&x, 0, WireFormat { dtype, zstd }).expect("encode");
                let y = f.decode(8, &Device::Cpu).expect("decode");
                let diff = (&x - &y).and_then(|d| d.abs()).and_then(|d| d.flatten_all()).and_then(|d| d.max(0));
                let diff = diff.and_then(|d| d.to_scalar::<f32>()).expect("diff");
                let bound = match dtype {
                    WireDType::F32 => 0.0,
                    WireDType::F16 => 4e-3,
                    WireDType::Bf16 => 3e-2,
                };
                assert!(diff <= bound, "{dtype:?} zstd={zstd}: diff {diff}");
            }
        }
    }

    #[test]
    fn bad_payloads_are_refused() {
        let f = HiddenFrame::encode(&states(), 0, WireFormat { dtype: WireDType::F32, zstd: false }).expect("encode");
        assert!(f.decode(16, &Device::Cpu).is_err(), "wrong hidden size");
        let mut short = f.clone();
        short.payload.pop();
        assert!(short.decode(8, &Device::Cpu).is_err(), "short payload");
        let mut bomb = f.clone();
        bomb.format.zstd = true;
        bomb.payload = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).expect("zstd");
        assert!(bomb.decode(8, &Device::Cpu).is_err(), "oversized zstd stream");
        // A stream that records no size: zstd would reserve the declared 137 GB up front.
        bomb.rows = u32::MAX;
        bomb.payload = vec![7; 9];
        assert!(bomb.decode(8, &Device::Cpu).is_err(), "a declared shape over the frame cap, refused before reserving it");
        let mut nan = f;
        nan.payload[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(nan.decode(8, &Device::Cpu).is_err(), "NaN");
        assert!(ClientMsg::decode(&[0x42, 1, 2]).is_err());
        assert!(ClientMsg::decode(&[]).is_err());
        assert!(ClientMsg::decode(&[K_OPEN, 1]).is_err(), "truncated");
        assert!(ClientMsg::decode(&[K_CLOSE, 0]).is_err(), "trailing bytes");
        assert!(ClientMsg::decode(&[K_TOKENS, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err(), "id count beyond the frame");
    }
}
