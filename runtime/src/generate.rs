//! Autoregressive generation over any token model: the three submodels run in one process
//! (`--mode local`), or the unsplit model, which the tests use as the reference.

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use hat_model::{KvCache, Submodel};

use crate::error::{Result, RuntimeError};
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

fn ids_tensor(ids: &[u32], device: &Device) -> Result<Tensor> {
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// Input, middle and output submodels stitched together in one process.
#[derive(Debug, Clone)]
pub struct LocalPipeline {
    input: Submodel,
    middle: Submodel,
    output: Submodel,
    input_cache: KvCache,
    middle_cache: KvCache,
    output_cache: KvCache,
}

impl LocalPipeline {
    pub fn new(device: &DevicePackage, cloud: &CloudPackage) -> Result<Self> {
        device.check_pair(&cloud.manifest, &cloud.dir)?;
        Ok(Self::from_submodels(device.input.clone(), cloud.middle.clone(), device.output.clone()))
    }

    pub fn from_submodels(input: Submodel, middle: Submodel, output: Submodel) -> Self {
        Self {
            input_cache: input.new_cache(),
            middle_cache: middle.new_cache(),
            output_cache: output.new_cache(),
            input,
            middle,
            output,
        }
    }
}

impl TokenModel for LocalPipeline {
    fn hidden(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        let x = self.input.embed(&ids_tensor(ids, self.input.device())?)?;
        let h = self.input.forward_layers(&x, pos, &mut self.input_cache)?;
        let h = self.middle.forward_layers(&h, pos, &mut self.middle_cache)?;
        Ok(self.output.forward_layers(&h, pos, &mut self.output_cache)?)
    }

    fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.output.head(hidden)?)
    }

    fn context_len(&self) -> usize {
        self.input.config().max_position_embeddings
    }

    fn device(&self) -> &Device {
        self.input.device()
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
}

impl Generation {
    /// Decode throughput: generated tokens after the first, per second.
    pub fn decode_tokens_per_s(&self) -> f64 {
        let secs = self.tbt.as_secs_f64();
        if secs > 0.0 { 1.0 / secs } else { 0.0 }
    }
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` as each token is chosen.
pub fn generate(model: &mut impl TokenModel, prompt: &[u32], opts: &GenerateOptions, mut on_token: impl FnMut(u32)) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(RuntimeError::BadInput("the prompt is empty".into()));
    }
    let context = model.context_len();
    if prompt.len() >= context {
        return Err(RuntimeError::ContextOverflow { prompt: prompt.len(), max_new: opts.max_tokens, context });
    }
    let max_tokens = opts.max_tokens.min(context - prompt.len());
    let mut sampler = Sampler::new(opts.sampling);
    let mut tokens = Vec::with_capacity(max_tokens);
    let start = Instant::now();
    let mut ttft = Duration::ZERO;
    let mut first_at = start;
    let mut last_at = start;
    let mut stopped_by_eos = false;
    let mut logits = if max_tokens > 0 { Some(model.logits_last(prompt, 0)?) } else { None };
    while let Some(l) = logits.take() {
        let next = sampler.sample(&l)?;
        let now = Instant::now();
        if tokens.is_empty() {
            ttft = now - start;
            first_at = now;
        }
        last_at = now;
        tokens.push(next);
        on_token(next);
        if opts.eos.contains(&next) {
            stopped_by_eos = true;
            break;
        }
        if tokens.len() < max_tokens {
            logits = Some(model.logits_last(&[next], prompt.len() + tokens.len() - 1)?);
        }
    }
    let tbt = if tokens.len() > 1 { (last_at - first_at) / (tokens.len() as u32 - 1) } else { Duration::ZERO };
    Ok(Generation { tokens, prompt_tokens: prompt.len(), ttft, tbt, stopped_by_eos })
}
