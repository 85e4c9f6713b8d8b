//! The two token-exposing baselines `hat bench` compares HAT with, implemented for real:
//! - `cloud`: the device sends the prompt's token ids and the cloud runs the whole model, streaming
//!   the reply's ids back ([`generate_cloud`]);
//! - `sd`: classic speculative decoding. The device's small model (input submodel + adapter + output
//!   submodel, the same draft model HAT uses) drafts token ids, and the cloud runs the whole model to
//!   verify them ([`generate_sd`]).
//!
//! Both send token ids over the network, so they are only for comparison; a cloud refuses them unless
//! it holds the unsplit model ([`WholeModel`]).

use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;
use hat_model::{KvCache, Submodel};

use crate::draft::Adapter;
use crate::error::{Result, RuntimeError};
use crate::generate::{ids_tensor, token_budget, DraftCounts, Emitter, GenerateOptions, Generation};
use crate::link::{Counters, FramedConn};
use crate::middle::Traffic;
use crate::package::{CloudPackage, DevicePackage};
use crate::protocol::{ClientMsg, ServerMsg, PROTOCOL_VERSION};
use crate::remote::CloudOptions;
use crate::sampling::{argmax, logits_rows};

/// The unsplit model, as three submodels run back to back: what a cloud serving the baselines holds.
#[derive(Debug, Clone)]
pub struct WholeModel {
    input: Submodel,
    middle: Submodel,
    output: Submodel,
}

/// The whole model's KV caches, one per submodel.
#[derive(Debug, Clone)]
pub struct WholeCache([KvCache; 3]);

impl WholeCache {
    pub fn len(&self) -> usize {
        self.0[2].len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn truncate(&mut self, len: usize) {
        self.0.iter_mut().for_each(|c| c.truncate(len));
    }
}

impl WholeModel {
    pub fn new(device: &DevicePackage, cloud: &CloudPackage) -> Result<Self> {
        device.check_pair(&cloud.manifest, &cloud.dir)?;
        Ok(Self { input: device.input.clone(), middle: cloud.middle.clone(), output: device.output.clone() })
    }

    pub fn new_cache(&self) -> WholeCache {
        WholeCache([self.input.new_cache(), self.middle.new_cache(), self.output.new_cache()])
    }

    pub fn max_context(&self) -> usize {
        self.input.config().max_position_embeddings
    }

    pub fn vocab_size(&self) -> usize {
        self.input.config().vocab_size
    }

    /// Runs `ids` at positions `start..` and returns the greedy next token of every position, or of
    /// the last one only (the LM head then runs once).
    pub fn greedy(&self, ids: &[u32], start: usize, last_only: bool, cache: &mut WholeCache) -> Result<Vec<u32>> {
        let [ci, cm, co] = &mut cache.0;
        let x = self.input.embed(&ids_tensor(ids, self.input.device())?)?;
        let h = self.input.forward_layers(&x, start, ci)?;
        let h = self.middle.forward_layers(&h, start, cm)?;
        let h = self.output.forward_layers(&h, start, co)?;
        let h = if last_only { h.narrow(1, ids.len() - 1, 1)? } else { h };
        let logits = logits_rows(&self.output.head(&h)?.squeeze(0)?)?;
        Ok(logits.iter().map(|row| argmax(row)).collect())
    }
}

/// The device's small model for the `sd` baseline: input submodel, adapter and output submodel with
/// caches of their own, fed token ids only.
#[derive(Debug)]
pub struct SmallModel {
    input: Submodel,
    adapter: Adapter,
    output: Submodel,
    caches: [KvCache; 3],
    /// Tokens at positions `0..`, fed or not.
    context: Vec<u32>,
}

impl SmallModel {
    pub fn new(device: &DevicePackage, adapter: Adapter) -> Self {
        let caches = [device.input.new_cache(), adapter.layers.new_cache(), device.output.new_cache()];
        Self { input: device.input.clone(), adapter, output: device.output.clone(), caches, context: Vec::new() }
    }

    /// Runs the context not yet in the caches and returns its final hidden states.
    ///
    /// # Shapes
    /// -> (1, new positions, hidden)
    fn feed(&mut self) -> Result<Tensor> {
        let start = self.caches[2].len();
        let [ci, ca, co] = &mut self.caches;
        let x = self.input.embed(&ids_tensor(&self.context[start..], self.input.device())?)?;
        let h = self.input.forward_layers(&x, start, ci)?;
        let h = self.adapter.forward(&h, start, ca)?;
        Ok(self.output.forward_layers(&h, start, co)?)
    }

    /// Feeds the context not yet in the caches and returns the greedy next token.
    fn next_token(&mut self) -> Result<u32> {
        let h = self.feed()?;
        let last = h.narrow(1, h.dim(1)? - 1, 1)?;
        Ok(argmax(&logits_rows(&self.output.head(&last)?.squeeze(0)?)?[0]))
    }

    /// Starts over on a new prompt (positions `0..`), filling the caches.
    pub fn prefill(&mut self, prompt: &[u32]) -> Result<()> {
        self.rewind(0);
        self.context = prompt.to_vec();
        self.feed()?;
        Ok(())
    }

    /// Drafts `k` tokens after the context plus `last`.
    fn propose(&mut self, last: u32, k: usize) -> Result<Vec<u32>> {
        self.context.push(last);
        let mut out = Vec::with_capacity(k);
        for _ in 0..k {
            let t = self.next_token()?;
            self.context.push(t);
            out.push(t);
        }
        Ok(out)
    }

    /// Keeps the first `len` positions of the context.
    fn rewind(&mut self, len: usize) {
        self.context.truncate(len);
        self.caches.iter_mut().for_each(|c| c.truncate(len));
    }
}

/// A session with a cloud that serves the token baselines.
#[derive(Debug)]
pub struct TokenCloud {
    conn: FramedConn,
    addr: String,
    timeout: Duration,
    counters: Arc<Counters>,
}

impl TokenCloud {
    /// Connects, shakes hands and opens a session (no retries: this is a benchmark client).
    pub fn connect(opts: &CloudOptions, fingerprint: &str, max_context: usize) -> Result<Self> {
        opts.check_transport()?;
        let counters = Arc::new(Counters::default());
        let conn = opts.open(opts.link, counters.clone()).map_err(|e| opts.io_error(&e, 1))?;
        let mut me = Self { conn, addr: opts.addr.clone(), timeout: opts.reply_timeout, counters };
        let hello =
            ClientMsg::Hello { version: PROTOCOL_VERSION, fingerprint: fingerprint.to_string(), auth_token: opts.auth_token.clone() };
        match me.call(&hello)? {
            ServerMsg::Welcome { .. } => {}
            other => return Err(me.unexpected(other)),
        }
        match me.call(&ClientMsg::Open { max_context: max_context as u32 })? {
            ServerMsg::Opened { .. } => Ok(me),
            other => Err(me.unexpected(other)),
        }
    }

    fn unexpected(&self, msg: ServerMsg) -> RuntimeError {
        match msg {
            ServerMsg::Error { code, message } => {
                RuntimeError::CloudRefused { addr: self.addr.clone(), code: format!("{code:?}"), message }
            }
            other => RuntimeError::CloudProtocol { addr: self.addr.clone(), reason: format!("unexpected reply {other:?}") },
        }
    }

    fn recv(&mut self) -> Result<ServerMsg> {
        let body = self.conn.recv(self.timeout).map_err(|e| lost(&self.addr, e))?;
        ServerMsg::decode(&body).map_err(|e| RuntimeError::CloudProtocol { addr: self.addr.clone(), reason: e.to_string() })
    }

    fn call(&mut self, msg: &ClientMsg) -> Result<ServerMsg> {
        self.send(msg)?;
        self.recv()
    }

    fn send(&mut self, msg: &ClientMsg) -> Result<()> {
        self.conn.send(&msg.encode()).map_err(|e| lost(&self.addr, e))
    }

    /// The whole model's greedy token after each of `ids` (positions `start..`), or after the last.
    pub fn greedy(&mut self, ids: &[u32], start: usize, last_only: bool) -> Result<Vec<u32>> {
        match self.call(&ClientMsg::Tokens { start: start as u32, last_only, ids: ids.to_vec() })? {
            ServerMsg::TokenIds { ids, .. } => Ok(ids),
            other => Err(self.unexpected(other)),
        }
    }

    pub fn traffic(&self) -> Traffic {
        self.counters.traffic(0)
    }
}

/// The connection failed (the benchmark client does not retry).
fn lost(addr: &str, e: std::io::Error) -> RuntimeError {
    RuntimeError::CloudUnreachable { addr: addr.to_string(), attempts: 1, last: e.to_string() }
}

/// The `cloud` baseline: the cloud generates greedily and streams ids back.
pub fn generate_cloud(cloud: &mut TokenCloud, prompt: &[u32], opts: &GenerateOptions, on_token: impl FnMut(u32)) -> Result<Generation> {
    let budget = token_budget(prompt, opts, usize::MAX)?;
    let before = cloud.traffic();
    let mut out = Emitter::new(budget, opts, on_token);
    cloud.send(&ClientMsg::Generate { max_tokens: budget as u32, eos: opts.eos.clone(), prompt: prompt.to_vec() })?;
    let mut first = None;
    // Each streamed token after the first is one cloud decode step.
    let mut steps = 0;
    while out.remaining() > 0 {
        let ids = match cloud.recv()? {
            ServerMsg::TokenIds { ids, .. } => ids,
            other => return Err(cloud.unexpected(other)),
        };
        for t in ids {
            out.push(t);
            if first.is_some() {
                steps += 1;
            }
            first.get_or_insert_with(|| cloud.traffic());
        }
    }
    let traffic = cloud.traffic().since(&before);
    Ok(out.finish(prompt.len(), steps, DraftCounts::default(), traffic, first.map(|f| f.since(&before))))
}

/// The `sd` baseline: greedy speculative decoding with drafts of up to `draft_len` token ids per
/// round, verified by the whole model in the cloud. The small model prefills while the cloud does.
pub fn generate_sd(
    cloud: &mut TokenCloud,
    small: &mut SmallModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    draft_len: usize,
    on_token: impl FnMut(u32),
) -> Result<Generation> {
    if !opts.sampling.is_greedy() {
        return Err(RuntimeError::BadInput("the sd baseline is greedy only".into()));
    }
    let budget = token_budget(prompt, opts, small.input.config().max_position_embeddings)?;
    let before = cloud.traffic();
    let mut out = Emitter::new(budget, opts, on_token);
    let mut counts = DraftCounts::default();
    let mut rounds = 0;
    if budget == 0 {
        return Ok(out.finish(prompt.len(), 0, counts, cloud.traffic().since(&before), None));
    }
    cloud.send(&ClientMsg::Tokens { start: 0, last_only: true, ids: prompt.to_vec() })?;
    small.prefill(prompt)?;
    let mut last = match cloud.recv()? {
        ServerMsg::TokenIds { ids, .. } if ids.len() == 1 => ids[0],
        other => return Err(cloud.unexpected(other)),
    };
    let first_traffic = cloud.traffic().since(&before);
    let mut pos = prompt.len();
    let mut going = out.push(last);
    while going {
        let k = draft_len.min(out.remaining() - 1);
        let draft = small.propose(last, k)?;
        let mut ids = vec![last];
        ids.extend_from_slice(&draft);
        let target = cloud.greedy(&ids, pos, false)?;
        let verdict = verify_greedy_ids(&draft, &target);
        rounds += 1;
        counts.drafted += draft.len();
        counts.accepted += verdict.0;
        counts.first_accepted += usize::from(verdict.0 > 0);
        for t in draft[..verdict.0].iter().chain([&verdict.1]) {
            going = out.push(*t);
            if !going {
                break;
            }
        }
        pos += verdict.0 + 1;
        small.rewind(pos);
        last = verdict.1;
    }
    let traffic = cloud.traffic().since(&before);
    Ok(out.finish(prompt.len(), rounds, counts, traffic, Some(first_traffic)))
}

/// Greedy verification against the target's token ids: (accepted drafts, the next token).
fn verify_greedy_ids(draft: &[u32], target: &[u32]) -> (usize, u32) {
    let accepted = draft.iter().zip(target).take_while(|(d, t)| d == t).count();
    (accepted, target[accepted])
}
