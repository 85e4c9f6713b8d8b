//! Autoregressive generation, one token per step, over any token model: the three submodels in one
//! process (`--mode local`), U-shaped with the middle in the cloud (`--mode ushape`), or the unsplit
//! model, which the tests use as the reference. Speculative decoding lives in `speculative.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use hat_model::{KvCache, Submodel};

use crate::error::{Result, RuntimeError};
use crate::middle::{LocalMiddle, Middle, Shape, Traffic};
use crate::package::{CloudPackage, DevicePackage};
use crate::sampling::{Sampler, SamplingOptions};

/// A causal language model addressed by position, with its caches inside.
pub trait TokenModel {
    /// Runs `ids` at positions `pos..pos + ids.len()` (dropping any cached state at or after `pos`) and
    /// returns the final hidden states, before the LM head.
    ///
    /// # Shapes
    /// -> (1, ids.len(), hidden)
    fn hidden(&mut self, ids: &[u32], pos: usize) -> Result<Tensor>;

    /// # Shapes
    /// hidden: (1, seq, hidden) -> (1, seq, vocab)
    fn head(&self, hidden: &Tensor) -> Result<Tensor>;

    /// Maximum positions the model supports.
    fn context_len(&self) -> usize;

    fn device(&self) -> &Device;

    /// Network bytes so far (zero for models that run in this process).
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }

    /// Logits of every position.
    ///
    /// # Shapes
    /// -> (ids.len(), vocab)
    fn logits_all(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        let h = self.hidden(ids, pos)?;
        Ok(self.head(&h)?.squeeze(0)?)
    }

    /// Logits of the last position only; the LM head runs once.
    ///
    /// # Shapes
    /// -> (vocab,)
    fn logits_last(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        let h = self.hidden(ids, pos)?;
        let last = h.narrow(1, h.dim(1)? - 1, 1)?;
        Ok(self.head(&last)?.squeeze(0)?.squeeze(0)?)
    }
}

/// `(start, len)` of each chunk when a prompt of `n` positions is sent in chunks of `chunk` (`None`:
/// one piece). `hat profile`'s pipeline model replays this same split.
pub fn prefill_chunks(n: usize, chunk: Option<usize>) -> Vec<(usize, usize)> {
    let size = chunk.unwrap_or(n).clamp(1, n.max(1));
    (0..n).step_by(size).map(|s| (s, size.min(n - s))).collect()
}

pub(crate) fn ids_tensor(ids: &[u32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// Input and output submodels on the device around a middle submodel that runs here
/// ([`LocalMiddle`], `--mode local`) or in the cloud ([`crate::remote::RemoteMiddle`], U-shaped).
/// The input cache serves both the draft and the verify path, since input layers see the same tokens
/// on both.
#[derive(Debug)]
pub struct SplitPipeline<M> {
    input: Submodel,
    output: Submodel,
    input_cache: KvCache,
    output_cache: KvCache,
    middle: M,
    /// The cache slot of the last round's accepted leaf, which the middle moves to its position
    /// with the next round ([`SplitPipeline::keep_leaf`]).
    keep: Option<usize>,
}

/// What the prompt's round gives: the last position's logits, and the middle's output (high) and the
/// output submodel's final states (top) of every prompt position, which the feature draft head reads.
#[derive(Debug)]
pub struct Prefilled {
    /// # Shapes
    /// (vocab,)
    pub logits: Tensor,
    /// # Shapes
    /// (1, prompt, hidden) each
    pub high: Tensor,
    pub top: Tensor,
}

fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    Ok(if parts.len() == 1 { parts.pop().expect("one part") } else { Tensor::cat(&parts, 1)? })
}

/// All three submodels in one process.
pub type LocalPipeline = SplitPipeline<LocalMiddle>;

impl LocalPipeline {
    pub fn new(device: &DevicePackage, cloud: &CloudPackage) -> Result<Self> {
        device.check_pair(&cloud.manifest, &cloud.dir)?;
        Ok(Self::from_submodels(device.input.clone(), cloud.middle.clone(), device.output.clone()))
    }

    pub fn from_submodels(input: Submodel, middle: Submodel, output: Submodel) -> Self {
        SplitPipeline::with_middle(input, output, LocalMiddle::new(middle))
    }
}

impl<M: Middle> SplitPipeline<M> {
    pub fn with_middle(input: Submodel, output: Submodel, middle: M) -> Self {
        Self { input_cache: input.new_cache(), output_cache: output.new_cache(), input, output, middle, keep: None }
    }

    /// Runs the input submodel on `ids` at positions `pos..`.
    ///
    /// # Shapes
    /// -> (1, ids.len(), hidden)
    pub fn input_states(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        let x = self.input.embed(&ids_tensor(ids, self.input.device())?)?;
        Ok(self.input.forward_layers(&x, pos, &mut self.input_cache)?)
    }

    /// [`SplitPipeline::input_states`] for a round with leaves: row i at position `pos + depths[i]`
    /// (see `hat_model::attention::attend_tree`; `None`: a chain).
    ///
    /// # Shapes
    /// -> (1, ids.len(), hidden)
    pub fn input_states_tree(&mut self, ids: &[u32], pos: usize, depths: Option<&[usize]>) -> Result<Tensor> {
        let x = self.input.embed(&ids_tensor(ids, self.input.device())?)?;
        Ok(self.input.forward_layers_tree(&x, pos, depths, &mut self.input_cache)?)
    }

    /// [`SplitPipeline::output_states`] for a round with leaves.
    ///
    /// # Shapes
    /// middle_states: (1, seq, hidden) -> (1, seq, hidden)
    pub fn output_states_tree(&mut self, middle_states: &Tensor, pos: usize, depths: Option<&[usize]>) -> Result<Tensor> {
        Ok(self.output.forward_layers_tree(middle_states, pos, depths, &mut self.output_cache)?)
    }

    /// Sends a round's input states to the middle, shaped by `depths`, with the last round's
    /// accepted leaf (if any) to keep.
    ///
    /// # Shapes
    /// states: (1, rows, hidden)
    pub fn submit_round(&mut self, pos: usize, states: &Tensor, depths: Option<Vec<usize>>) -> Result<()> {
        let shape = Shape { depths, keep: self.keep.take() };
        self.middle.submit_tree(pos, states, &shape)
    }

    /// A round's leaf at cache slot `slot` was accepted as the token at position `at`: the device's
    /// caches keep it there now, and the middle's with the next round.
    pub fn keep_leaf(&mut self, slot: usize, at: usize) -> Result<()> {
        self.input_cache.promote(slot, at)?;
        self.output_cache.promote(slot, at)?;
        self.keep = Some(slot);
        Ok(())
    }

    /// Whether every part of the pipeline verifies rounds with leaves.
    pub fn runs_trees(&self) -> bool {
        self.input.runs_trees() && self.output.runs_trees() && self.middle.runs_trees()
    }

    /// Runs the output submodel and the LM head on middle states at positions `pos..`.
    ///
    /// # Shapes
    /// middle_states: (1, seq, hidden) -> (seq, vocab)
    pub fn output_logits(&mut self, middle_states: &Tensor, pos: usize) -> Result<Tensor> {
        let h = self.output.forward_layers(middle_states, pos, &mut self.output_cache)?;
        Ok(self.output.head(&h)?.squeeze(0)?)
    }

    /// The output submodel's final states (what the LM head reads) of middle states at positions `pos..`.
    ///
    /// # Shapes
    /// middle_states: (1, seq, hidden) -> (1, seq, hidden)
    pub fn output_states(&mut self, middle_states: &Tensor, pos: usize) -> Result<Tensor> {
        Ok(self.output.forward_layers(middle_states, pos, &mut self.output_cache)?)
    }

    /// The LM head's logits for every row of [`SplitPipeline::output_states`]' states, one vector
    /// per row. One call reads the head's weights once for all rows: on the CPU a head is bound by
    /// reading its weights, so four rows cost about 1.2x one row, while four one-row calls cost 4x
    /// (the default model's q8_0 head in the `head_rows` bench: 1.76 ms against 5.89; inside a
    /// live round, where the weights come from further away, the two measured the same). A row's
    /// logits are the same numbers alone or among others (the head's compute is batch-invariant),
    /// so `local` and `ushape`, which run one row, get the same bits.
    ///
    /// # Shapes
    /// top: (1, seq, hidden) -> seq x (vocab,)
    pub fn head_rows(&self, top: &Tensor) -> Result<Vec<Vec<f32>>> {
        let logits = self.output.head(top)?;
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
    }

    /// Logits of the last position only; the LM head runs once.
    ///
    /// # Shapes
    /// middle_states: (1, seq, hidden) -> (vocab,)
    pub fn output_logits_last(&mut self, middle_states: &Tensor, pos: usize) -> Result<Tensor> {
        let h = self.output.forward_layers(middle_states, pos, &mut self.output_cache)?;
        let last = h.narrow(1, h.dim(1)? - 1, 1)?;
        Ok(self.output.head(&last)?.squeeze(0)?.squeeze(0)?)
    }

    /// Prefills the prompt (positions `0..`) and returns the last position's logits with the prompt's
    /// middle and output-submodel states. With `chunk`, the prompt goes to the middle in pieces of that
    /// many positions, pipelined: the device runs the input submodel on every chunk and submits each as
    /// soon as it is ready (so uploads and cloud work on chunk c overlap input work on chunk c+1), then
    /// hands the prompt's input states to `after_input` (the drafter's prefill), then runs the output
    /// submodel on each chunk as it comes back (overlapping the transfers and cloud work on later
    /// chunks). Every position sees the same keys and values as in one piece, so the logits equal the
    /// unchunked ones.
    pub fn prefill(&mut self, prompt: &[u32], chunk: Option<usize>, after_input: impl FnOnce(&Tensor) -> Result<()>) -> Result<Prefilled> {
        let n = prompt.len();
        if n == 0 {
            return Err(RuntimeError::BadInput("the prompt is empty".into()));
        }
        let chunks = prefill_chunks(n, chunk);
        self.keep = None;
        let mut states = Vec::with_capacity(chunks.len());
        for &(s, len) in &chunks {
            let h = self.input_states(&prompt[s..s + len], s)?;
            self.middle.submit(s, &h)?;
            states.push(h);
        }
        after_input(&cat_rows(states)?)?;
        let (mut high, mut top) = (Vec::with_capacity(chunks.len()), Vec::with_capacity(chunks.len()));
        for &(s, _) in &chunks {
            let m = self.middle.collect()?;
            top.push(self.output.forward_layers(&m, s, &mut self.output_cache)?);
            high.push(m);
        }
        let top = cat_rows(top)?;
        let last = top.narrow(1, n - 1, 1)?;
        let logits = self.output.head(&last)?.squeeze(0)?.squeeze(0)?;
        Ok(Prefilled { logits, high: cat_rows(high)?, top })
    }

    pub fn middle(&mut self) -> &mut M {
        &mut self.middle
    }

    pub fn input_submodel(&self) -> &Submodel {
        &self.input
    }

    pub fn output_submodel(&self) -> &Submodel {
        &self.output
    }
}

impl<M: Middle> TokenModel for SplitPipeline<M> {
    fn hidden(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        let h = self.input_states(ids, pos)?;
        let h = self.middle.forward(pos, &h)?;
        Ok(self.output.forward_layers(&h, pos, &mut self.output_cache)?)
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.output.head(hidden)?)
    }

    fn context_len(&self) -> usize {
        self.input.config().max_position_embeddings.min(self.middle.max_context())
    }

    fn device(&self) -> &Device {
        self.input.device()
    }

    fn traffic(&self) -> Traffic {
        self.middle.traffic()
    }
}

/// The whole model as one submodel: the reference the split must reproduce.
#[derive(Debug, Clone)]
pub struct UnsplitModel {
    full: Submodel,
    cache: KvCache,
}

impl UnsplitModel {
    pub fn new(full: Submodel) -> Self {
        Self { cache: full.new_cache(), full }
    }
}

impl TokenModel for UnsplitModel {
    fn hidden(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        let x = self.full.embed(&ids_tensor(ids, self.full.device())?)?;
        Ok(self.full.forward_layers(&x, pos, &mut self.cache)?)
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.full.head(hidden)?)
    }

    fn context_len(&self) -> usize {
        self.full.config().max_position_embeddings
    }

    fn device(&self) -> &Device {
        self.full.device()
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingOptions,
    /// Generation stops after emitting any of these.
    pub eos: Vec<u32>,
    /// Prompt positions per message to the middle in HAT mode's pipelined prefill; `None` sends the
    /// prompt in one piece.
    pub prefill_chunk: Option<usize>,
    /// Set from outside (another thread, or `on_token` itself) to end generation after the token
    /// being emitted: a client that went away, a stop string found in the text.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self { max_tokens: 128, sampling: SamplingOptions::default(), eos: Vec::new(), prefill_chunk: None, cancel: None }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Prompt submitted to first token sampled.
    pub ttft: Duration,
    /// Mean time between consecutive generated tokens.
    pub tbt: Duration,
    pub stopped_by_eos: bool,
    /// Ended by [`GenerateOptions::cancel`].
    pub cancelled: bool,
    /// Steps after the prompt that needed the middle submodel (cloud round trips when it is remote).
    pub rounds: usize,
    /// Draft tokens proposed and accepted over all rounds (zero without drafting).
    pub drafted: usize,
    pub accepted: usize,
    /// Rounds whose first draft was accepted: the draft model's top-1 agreement with the full model,
    /// on its own generations, is this over `rounds` (when drafting).
    pub first_accepted: usize,
    /// Drafting while verifying: rounds drafted while the round before them was with the cloud,
    /// and how many of those the verdict let stand (their drafting cost no time after the reply).
    pub speculated: usize,
    pub prepared: usize,
    /// Leaves verified (alternatives to a draft, never drafted from; see `Draft::leaves`), and
    /// how many of them were accepted. Accepted leaves count in `accepted` too.
    pub leaves: usize,
    pub leaves_accepted: usize,
    /// Network bytes of this generation.
    pub traffic: Traffic,
    /// The part of `traffic` spent before the first token (the prompt's round).
    pub prefill_traffic: Traffic,
    /// Time between consecutive tokens as the caller received them (tokens of one speculative
    /// round arrive together, so some gaps are near zero).
    pub gaps: Vec<Duration>,
    /// Where the decode rounds' time went, summed over them (speculative decoding only).
    pub round_time: Option<RoundTime>,
}

/// Where the time of HAT's decode rounds went, summed over the rounds (the prompt's round
/// excluded). The four parts follow each other, so per round they add up to its length.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RoundTime {
    /// Proposing the drafts: the draft head taking in the last round's verified positions, its
    /// drafting steps (or prompt lookup), and the input submodel over the drafts.
    pub draft: Duration,
    /// From sending the round until the middle's states are back: the link both ways and the
    /// cloud's forward (with drafting while verifying, the next round's drafting done meanwhile).
    pub wait: Duration,
    /// The output submodel and the full LM head over the returned rows, and the verdict.
    pub verify: Duration,
    /// Handing out the round's tokens and queueing the verified positions' features for the head.
    pub commit: Duration,
}

impl Generation {
    /// Mean tokens gained per round, the bonus token included: generated tokens after the first
    /// (which the prompt's round gives) over rounds. 1 without drafting.
    pub fn accept_len(&self) -> f64 {
        if self.rounds == 0 {
            return 0.0;
        }
        (self.tokens.len().saturating_sub(1)) as f64 / self.rounds as f64
    }

    /// Decode throughput: generated tokens after the first, per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let secs = self.tbt.as_secs_f64();
        if secs > 0.0 {
            1.0 / secs
        } else {
            0.0
        }
    }
}

/// Checks the prompt against the context and returns how many tokens may be generated.
pub(crate) fn token_budget(prompt: &[u32], opts: &GenerateOptions, context: usize) -> Result<usize> {
    if prompt.is_empty() {
        return Err(RuntimeError::BadInput("the prompt is empty".into()));
    }
    if prompt.len() >= context {
        return Err(RuntimeError::ContextOverflow { prompt: prompt.len(), max_new: opts.max_tokens, context });
    }
    Ok(opts.max_tokens.min(context - prompt.len()))
}

/// Draft statistics of a generation.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DraftCounts {
    pub drafted: usize,
    pub accepted: usize,
    pub first_accepted: usize,
    pub speculated: usize,
    pub prepared: usize,
    pub leaves: usize,
    pub leaves_accepted: usize,
}

/// Hands tokens to the caller as they are chosen, times them, and says when to stop (end of
/// sequence or budget spent).
pub(crate) struct Emitter<'a, F> {
    tokens: Vec<u32>,
    budget: usize,
    eos: &'a [u32],
    start: Instant,
    first_at: Option<Instant>,
    last_at: Instant,
    gaps: Vec<Duration>,
    stopped_by_eos: bool,
    cancel: Option<&'a AtomicBool>,
    on_token: F,
}

impl<'a, F: FnMut(u32)> Emitter<'a, F> {
    pub(crate) fn new(budget: usize, opts: &'a GenerateOptions, on_token: F) -> Self {
        let now = Instant::now();
        Self {
            tokens: Vec::with_capacity(budget),
            budget,
            eos: &opts.eos,
            start: now,
            first_at: None,
            last_at: now,
            gaps: Vec::new(),
            stopped_by_eos: false,
            cancel: opts.cancel.as_deref(),
            on_token,
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// Tokens still allowed.
    pub(crate) fn remaining(&self) -> usize {
        if self.stopped_by_eos || self.cancelled() {
            0
        } else {
            self.budget - self.tokens.len()
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.tokens.len()
    }

    /// Emits one token; false once generation must stop.
    pub(crate) fn push(&mut self, token: u32) -> bool {
        if self.remaining() == 0 {
            return false;
        }
        let now = Instant::now();
        if self.first_at.is_some() {
            self.gaps.push(now - self.last_at);
        }
        self.first_at.get_or_insert(now);
        self.last_at = now;
        self.tokens.push(token);
        (self.on_token)(token);
        if self.eos.contains(&token) {
            self.stopped_by_eos = true;
        }
        self.remaining() > 0
    }

    /// `prefill` is the traffic up to the first token, when the caller tracked it.
    pub(crate) fn finish(
        self,
        prompt_tokens: usize,
        rounds: usize,
        drafts: DraftCounts,
        traffic: Traffic,
        prefill: Option<Traffic>,
    ) -> Generation {
        let first_at = self.first_at.unwrap_or(self.start);
        let n = self.tokens.len();
        let tbt = if n > 1 { (self.last_at - first_at) / (n as u32 - 1) } else { Duration::ZERO };
        let cancelled = !self.stopped_by_eos && self.cancelled();
        Generation {
            tokens: self.tokens,
            prompt_tokens,
            ttft: first_at - self.start,
            tbt,
            stopped_by_eos: self.stopped_by_eos,
            cancelled,
            rounds,
            drafted: drafts.drafted,
            accepted: drafts.accepted,
            first_accepted: drafts.first_accepted,
            speculated: drafts.speculated,
            prepared: drafts.prepared,
            leaves: drafts.leaves,
            leaves_accepted: drafts.leaves_accepted,
            traffic,
            prefill_traffic: prefill.unwrap_or_default(),
            gaps: self.gaps,
            round_time: None,
        }
    }
}

/// Generates up to `max_tokens` after `prompt`, one token per step, calling `on_token` as each token
/// is chosen.
pub fn generate(model: &mut impl TokenModel, prompt: &[u32], opts: &GenerateOptions, on_token: impl FnMut(u32)) -> Result<Generation> {
    let budget = token_budget(prompt, opts, model.context_len())?;
    let mut sampler = Sampler::new(opts.sampling);
    let traffic_before = model.traffic();
    let mut out = Emitter::new(budget, opts, on_token);
    let mut rounds = 0;
    let mut prefill = None;
    if budget > 0 {
        let mut logits = model.logits_last(prompt, 0)?;
        prefill = Some(model.traffic().since(&traffic_before));
        while out.push(sampler.sample(&logits)?) {
            logits = model.logits_last(&[out.tokens[out.count() - 1]], prompt.len() + out.count() - 1)?;
            rounds += 1;
        }
    }
    let traffic = model.traffic().since(&traffic_before);
    Ok(out.finish(prompt.len(), rounds, DraftCounts::default(), traffic, prefill))
}
