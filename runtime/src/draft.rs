//! The proposer. On the device, input submodel -> adapter -> output submodel is a small language
//! model that drafts tokens without the cloud. The adapter stands in for the middle submodel: a
//! trained one (`device/adapter.safetensors`, from `hat train-adapter`) or, until then, a copy of one
//! middle layer that `hat split --adapter-init-layer` put in the device package.
//!
//! Drafting reuses the verify path's caches: the input cache (the input layers see the same tokens
//! on both paths) and the output cache, whose verified prefix gives the output layers the true
//! context. Draft positions appended to the output cache are overwritten when the verify pass
//! rewrites them from the same start position.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use hat_model::{names, Config, KvCache, Submodel, SubmodelKind};

use crate::draft_head::{FeatureDrafter, FeatureHead, Overlap, Speculation};
use crate::error::{Result, RuntimeError};
use crate::generate::SplitPipeline;
use crate::middle::Middle;
use crate::package::DevicePackage;
use crate::sampling::{logits_rows, Sampler};

/// A trained adapter, written by `hat train-adapter`.
pub const TRAINED_ADAPTER: &str = "adapter.safetensors";
/// The adapter `hat split` initialises from one middle layer.
pub const INIT_ADAPTER: &str = "adapter-init.safetensors";

/// Where an adapter's weights came from.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterOrigin {
    Trained(PathBuf),
    /// A copy of this middle layer, made at split time.
    MiddleLayer(usize),
    /// Built in code (tests: the middle submodel itself, or zeros).
    Custom(&'static str),
}

impl std::fmt::Display for AdapterOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AdapterOrigin::Trained(p) => write!(f, "trained ({})", p.display()),
            AdapterOrigin::MiddleLayer(l) => write!(f, "copy of middle layer {l}"),
            AdapterOrigin::Custom(what) => f.write_str(what),
        }
    }
}

/// Name of the adapter's optional output bias in an adapter file.
pub const ADAPTER_BIAS: &str = "adapter.bias";

/// Decoder layers that stand in for the middle submodel, and an optional bias added to their output
/// (training starts it at the mean gap between the middle's output and its input).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub(crate) layers: Submodel,
    bias: Option<Tensor>,
    pub origin: AdapterOrigin,
}

impl Adapter {
    /// The package's trained adapter if there is one, else its initial adapter.
    pub fn load(package: &DevicePackage, device: &Device) -> Result<Self> {
        let trained = package.dir.join(TRAINED_ADAPTER);
        if trained.is_file() {
            let (layers, bias) = load_layers(&trained, &package.config, device, package.input.dtype())?;
            return Ok(Self { layers, bias, origin: AdapterOrigin::Trained(trained) });
        }
        let init = package.dir.join(INIT_ADAPTER);
        if !init.is_file() {
            return Err(RuntimeError::Adapter(format!(
                "{} has no adapter ({TRAINED_ADAPTER} or {INIT_ADAPTER}); re-run `hat split` to add one",
                package.dir.display()
            )));
        }
        let (layers, bias) = load_layers(&init, &package.config, device, package.input.dtype())?;
        let first = layers.layer_range().start;
        Ok(Self { layers, bias, origin: AdapterOrigin::MiddleLayer(first) })
    }

    /// Any run of decoder layers as the adapter; the middle submodel itself is the oracle adapter.
    pub fn from_submodel(layers: Submodel, origin: AdapterOrigin) -> Self {
        Self { layers, bias: None, origin }
    }

    /// Adds a bias to the layers' output.
    ///
    /// # Shapes
    /// bias: (hidden,)
    pub fn with_bias(mut self, bias: Tensor) -> Self {
        self.bias = Some(bias);
        self
    }

    /// Runs the adapter on new positions `pos..` of its own cache.
    ///
    /// # Shapes
    /// x: (1, seq, hidden) -> (1, seq, hidden)
    pub fn forward(&self, x: &Tensor, pos: usize, cache: &mut KvCache) -> Result<Tensor> {
        let a = self.layers.forward_layers(x, pos, cache)?;
        Ok(match &self.bias {
            Some(b) => a.broadcast_add(b)?,
            None => a,
        })
    }

    /// One decoder layer of zeros: the identity, since both residual branches add nothing.
    pub fn zeros(cfg: &Config, device: &Device) -> Result<Self> {
        let vb = VarBuilder::zeros(candle_core::DType::F32, device);
        let layers = Submodel::load(vb, &cfg.for_draft(), SubmodelKind::Middle, 0..1)?;
        Ok(Self { layers, bias: None, origin: AdapterOrigin::Custom("zeros") })
    }

    pub fn new_cache(&self) -> KvCache {
        self.layers.new_cache()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.layer_range().len()
    }
}

/// Loads `model.layers.{i}.*` tensors (the file decides how many layers) and the optional bias.
fn load_layers(path: &Path, cfg: &Config, device: &Device, dtype: candle_core::DType) -> Result<(Submodel, Option<Tensor>)> {
    let bad = |reason: String| RuntimeError::Adapter(format!("{}: {reason}", path.display()));
    let tensors = candle_core::safetensors::load(path, device).map_err(|e| bad(e.to_string()))?;
    let indices: Vec<usize> = tensors.keys().filter_map(|n| names::layer_index(n)).collect();
    let (Some(lo), Some(hi)) = (indices.iter().min(), indices.iter().max()) else {
        return Err(bad("holds no decoder layer".into()));
    };
    if *hi >= cfg.num_layers {
        return Err(bad(format!("layer {hi} is past the model's {} layers", cfg.num_layers)));
    }
    let bias = match tensors.get(ADAPTER_BIAS) {
        Some(b) if b.dims() == [cfg.hidden_size] => Some(b.to_dtype(dtype)?),
        Some(b) => return Err(bad(format!("{ADAPTER_BIAS} has shape {:?}, expected [{}]", b.dims(), cfg.hidden_size))),
        None => None,
    };
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let layers = Submodel::load(vb, &cfg.for_draft(), SubmodelKind::Middle, *lo..*hi + 1).map_err(|e| bad(e.to_string()))?;
    Ok((layers, bias))
}

/// The tokens a draft proposes and what verification needs from it.
#[derive(Debug)]
pub struct Draft {
    /// The chain: each draft follows the ones before it.
    pub tokens: Vec<u32>,
    /// The draft distribution of each token (sampling only; empty when greedy).
    pub q: Vec<Vec<f32>>,
    /// Leaves, as (depth, token): an alternative to draft `depth` (counted from 1), after drafts
    /// `..depth - 1`, verified in the same round but never drafted from. The cloud runs them as
    /// extra rows that see only the chain before them (`hat_model::attention::attend_tree`), so a
    /// leaf the model agrees with gains a token where the chain's draft was rejected. Greedy only.
    pub leaves: Vec<(usize, u32)>,
    /// Input-submodel states of [last accepted token, draft tokens..., leaf tokens...], what the
    /// cloud verifies.
    ///
    /// # Shapes
    /// (1, tokens.len() + 1 + leaves.len(), hidden)
    pub states: Tensor,
}

impl Draft {
    /// A chain of drafts without leaves.
    pub fn chain(tokens: Vec<u32>, q: Vec<Vec<f32>>, states: Tensor) -> Self {
        Self { tokens, q, leaves: Vec::new(), states }
    }

    /// The depth of each row (see [`Draft::leaves`]): the chain's rows at their own, then the
    /// leaves'; `None` without leaves.
    pub fn depths(&self) -> Option<Vec<usize>> {
        depths(self.tokens.len(), &self.leaves)
    }

    /// The first `k` drafts and their leaves (a draft made for a longer budget than is left).
    pub fn truncated(mut self, k: usize) -> Result<Self> {
        if self.tokens.len() > k {
            let n = self.tokens.len();
            let rows: Vec<u32> =
                (0..=k).chain(self.leaves.iter().enumerate().filter(|(_, l)| l.0 <= k).map(|(i, _)| n + 1 + i)).map(|r| r as u32).collect();
            self.leaves.retain(|l| l.0 <= k);
            self.tokens.truncate(k);
            self.q.truncate(k);
            let rows = Tensor::new(rows.as_slice(), self.states.device())?;
            self.states = self.states.index_select(&rows, 1)?;
        }
        Ok(self)
    }
}

/// The row depths of a round of `chain` drafts and `leaves` (see [`Draft::leaves`]); `None` without
/// leaves.
pub fn depths(chain: usize, leaves: &[(usize, u32)]) -> Option<Vec<usize>> {
    (!leaves.is_empty()).then(|| (0..=chain).chain(leaves.iter().map(|l| l.0)).collect())
}

/// What a verification round established, for the drafter to catch up on.
#[derive(Debug)]
pub struct Verified<'a> {
    /// Position of the draft's first state (the last accepted token before the round).
    pub pos: usize,
    /// The tokens the verifier kept: a prefix of the drafts, then the accepted leaf if any.
    pub accepted: &'a [u32],
    /// The input states (low), the middle's output (high) and the output submodel's final states
    /// (top) of the kept path's rows, [last, accepted...], as verification computed them.
    ///
    /// # Shapes
    /// (1, accepted.len() + 1, hidden) each
    pub low: Tensor,
    pub high: Tensor,
    pub top: Tensor,
}

/// The proposer HAT mode drafts with.
#[derive(Debug)]
pub enum Drafter {
    /// The paper's adapter between the input and output submodels (`--draft-head hat`).
    Adapter(Box<AdapterDrafter>),
    /// The feature-conditioned draft head (`--draft-head feature`).
    Feature(Box<FeatureDrafter>),
    /// No drafting: every round is a U-shaped step (a head that could not be used).
    Off,
}

impl Drafter {
    pub fn new(adapter: Adapter) -> Self {
        Drafter::Adapter(Box::new(AdapterDrafter::new(adapter)))
    }

    pub fn feature(head: FeatureHead, threshold: Option<f32>) -> Self {
        Drafter::Feature(Box::new(FeatureDrafter::new(head, threshold)))
    }

    /// Which draft model this is, for reports (`hat generate --json`).
    pub fn describe(&self) -> String {
        match self {
            Drafter::Adapter(d) => format!("hat adapter, {}", d.adapter.origin),
            Drafter::Feature(d) => format!(
                "feature head ({}), threshold {}{}{}{}",
                d.head().path.display(),
                d.threshold(),
                if d.lookup() { ", prompt lookup" } else { "" },
                match d.leaves() {
                    (0, _) => String::new(),
                    (n, t) => format!(", up to {n} leaves at {t}"),
                },
                if d.overlap() == Overlap::Off { "" } else { ", drafting while verifying" }
            ),
            Drafter::Off => "none (U-shaped steps)".into(),
        }
    }

    /// Turns the feature head's prompt lookup on or off (the other drafters have none).
    pub fn with_lookup(mut self, on: bool) -> Self {
        if let Drafter::Feature(d) = &mut self {
            d.set_lookup(on);
        }
        self
    }

    /// Up to `max` leaves per round, each kept when the head's estimate that it is the model's
    /// token (its probability times the chain's before it) reaches `threshold` (see
    /// [`Draft::leaves`]; only the feature head drafts leaves).
    pub fn with_leaves(mut self, max: usize, threshold: f32) -> Self {
        if let Drafter::Feature(d) = &mut self {
            d.set_leaves(max, threshold);
        }
        self
    }

    /// Rows the next round may hold at most (the positions left in the budget): leaves give way
    /// where the drafts fill it.
    pub fn set_room(&mut self, rows: usize) {
        if let Drafter::Feature(d) = self {
            d.set_room(rows);
        }
    }

    /// Whether this generation may verify leaves (the pipeline runs them and decoding is greedy).
    pub fn allow_leaves(&mut self, on: bool) {
        if let Drafter::Feature(d) = self {
            d.allow_leaves(on);
        }
    }

    /// Sets when the feature head drafts the next round while the cloud verifies this one (the
    /// other drafters never do).
    pub fn with_overlap(mut self, overlap: Overlap) -> Self {
        if let Drafter::Feature(d) = &mut self {
            d.set_overlap(overlap);
        }
        self
    }

    /// `hat` or `feature` or `none`.
    pub fn kind(&self) -> &'static str {
        match self {
            Drafter::Adapter(_) => "hat",
            Drafter::Feature(_) => "feature",
            Drafter::Off => "none",
        }
    }

    /// The prompt's input states (positions `0..`), while the cloud works on the prompt.
    ///
    /// # Shapes
    /// input_states: (1, prompt, hidden)
    pub fn prefill(&mut self, input_states: &Tensor) -> Result<()> {
        match self {
            Drafter::Adapter(d) => d.prefill(input_states),
            Drafter::Feature(d) => d.prefill(input_states),
            Drafter::Off => Ok(()),
        }
    }

    /// The prompt's middle and output-submodel states, once the prompt's round is back.
    ///
    /// # Shapes
    /// high, top: (1, prompt, hidden)
    pub fn prefilled(&mut self, prompt: &[u32], high: &Tensor, top: &Tensor) -> Result<()> {
        match self {
            Drafter::Feature(d) => d.prefilled(prompt, high, top),
            _ => Ok(()),
        }
    }

    /// Proposes up to `k` tokens after `last` (at position `pos`); the feature head may stop early.
    pub fn propose<M: Middle>(
        &mut self,
        pipeline: &mut SplitPipeline<M>,
        last: u32,
        pos: usize,
        k: usize,
        sampler: &mut Sampler,
    ) -> Result<Draft> {
        match self {
            Drafter::Adapter(d) => d.propose(pipeline, last, pos, k, sampler),
            Drafter::Feature(d) => d.propose(pipeline, last, pos, k, sampler),
            Drafter::Off => Ok(Draft::chain(Vec::new(), Vec::new(), pipeline.input_states(&[last], pos)?)),
        }
    }

    /// While `draft` (proposed at `pos`) is being verified: the next round, drafted on the
    /// assumption that all of it is accepted ([`FeatureDrafter::speculate`]; only the feature head
    /// speculates).
    pub fn speculate<M: Middle>(
        &mut self,
        pipeline: &mut SplitPipeline<M>,
        draft: &Draft,
        pos: usize,
        k: usize,
        sampler: &mut Sampler,
    ) -> Result<Option<Speculation>> {
        match self {
            Drafter::Feature(d) => d.speculate(pipeline, draft, pos, k, sampler),
            _ => Ok(None),
        }
    }

    /// After [`Drafter::commit`]: the speculation's assumption held and its draft is the next round's.
    pub fn adopt(&mut self, spec: &Speculation) {
        if let Drafter::Feature(d) = self {
            d.adopt(spec);
        }
    }

    /// After verification: positions up to `pos + accepted` are final.
    pub fn commit(&mut self, round: &Verified) -> Result<()> {
        match self {
            Drafter::Adapter(d) => d.commit(&round.low, round.pos, round.pos + round.accepted.len() + 1),
            Drafter::Feature(d) => d.commit(round),
            Drafter::Off => Ok(()),
        }
    }
}

/// Drafts tokens with the adapter and keeps the adapter's cache in step with accepted positions.
#[derive(Debug)]
pub struct AdapterDrafter {
    adapter: Adapter,
    cache: KvCache,
    /// Input states of accepted positions the adapter has not seen yet (`cache.len()..`).
    unseen: Option<Tensor>,
}

impl AdapterDrafter {
    pub fn new(adapter: Adapter) -> Self {
        Self { cache: adapter.layers.new_cache(), adapter, unseen: None }
    }

    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    /// Runs the adapter over the prompt's input states (positions `0..`), while the cloud works.
    ///
    /// # Shapes
    /// input_states: (1, prompt, hidden)
    pub fn prefill(&mut self, input_states: &Tensor) -> Result<()> {
        self.unseen = None;
        self.adapter.layers.forward_layers(input_states, 0, &mut self.cache)?;
        Ok(())
    }

    /// Proposes `k` tokens after `last` (at position `pos`).
    pub fn propose<M: Middle>(
        &mut self,
        pipeline: &mut SplitPipeline<M>,
        last: u32,
        pos: usize,
        k: usize,
        sampler: &mut Sampler,
    ) -> Result<Draft> {
        let mut tokens = Vec::with_capacity(k);
        let mut q = Vec::new();
        let mut states = Vec::with_capacity(k + 1);
        let mut token = last;
        for j in 0..=k {
            let h = pipeline.input_states(&[token], pos + j)?;
            states.push(h.clone());
            if j == k {
                break;
            }
            let (a_in, a_pos) = match self.unseen.take() {
                Some(u) => (Tensor::cat(&[&u, &h], 1)?, self.cache.len()),
                None => (h, pos + j),
            };
            let a = self.adapter.forward(&a_in, a_pos, &mut self.cache)?;
            let a_last = a.narrow(1, a.dim(1)? - 1, 1)?;
            let logits = logits_rows(&pipeline.output_logits_last(&a_last, pos + j)?)?;
            token = if sampler.is_greedy() {
                crate::sampling::argmax(&logits[0])
            } else {
                let dist = sampler.distribution(&logits[0]);
                let t = sampler.draw(&dist);
                q.push(dist);
                t
            };
            tokens.push(token);
        }
        Ok(Draft::chain(tokens, q, Tensor::cat(&states, 1)?))
    }

    /// After verification: positions `..committed` are final. `states` are the draft's input states,
    /// for positions `start..`; those the adapter has not run on are kept for the next draft.
    ///
    /// # Shapes
    /// states: (1, rows, hidden)
    pub fn commit(&mut self, states: &Tensor, start: usize, committed: usize) -> Result<()> {
        self.cache.truncate(committed);
        let have = self.cache.len();
        if have >= committed {
            self.unseen = None;
            return Ok(());
        }
        let mut parts = Vec::new();
        if have < start {
            // Only a draft of length 0 leaves earlier states unseen; they precede this round's.
            let earlier = self.unseen.take().ok_or_else(|| RuntimeError::BadInput("adapter cache fell behind".into()))?;
            parts.push(earlier);
        }
        let from = have.max(start);
        parts.push(states.narrow(1, from - start, committed - from)?);
        self.unseen = Some(Tensor::cat(&parts, 1)?);
        Ok(())
    }
}
