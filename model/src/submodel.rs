//! A submodel is a contiguous run of decoder layers, plus the embedding when it starts the model (the
//! device's input submodel) or the final norm and LM head when it ends it (the device's output
//! submodel). The unsplit model is the submodel that holds everything.

use std::ops::Range;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, LayerCache};
use crate::layer::{DecoderLayer, Norm, Segment};
use crate::names::LAYERS_PREFIX;
use crate::rope::Ropes;
use crate::weights::{Proj, Weights};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmodelKind {
    /// Embedding + the first layers (device).
    Input,
    /// Layers only (cloud).
    Middle,
    /// The last layers + final norm + LM head (device).
    Output,
    /// Embedding + every layer + final norm + LM head: the unsplit model.
    Full,
}

impl SubmodelKind {
    fn has_embedding(self) -> bool {
        matches!(self, SubmodelKind::Input | SubmodelKind::Full)
    }
    fn has_head(self) -> bool {
        matches!(self, SubmodelKind::Output | SubmodelKind::Full)
    }
}

#[derive(Debug, Clone)]
pub struct Submodel {
    kind: SubmodelKind,
    layer_range: Range<usize>,
    embed_tokens: Option<Embedding>,
    layers: Vec<DecoderLayer>,
    norm: Option<Norm>,
    lm_head: Option<Proj>,
    rope: Ropes,
    cfg: Config,
    dtype: DType,
    device: Device,
}

/// Forwards of at most this many rows run row by row off the CPU's f32 path (see
/// [`Submodel::forward_layers`]): a verification round is at most `--draft-len` + 1 rows.
pub const ROW_BY_ROW_MAX: usize = 16;

impl Submodel {
    /// Loads layers `layer_range` (original indices) and, depending on `kind`, the embedding or head.
    pub fn load(vb: VarBuilder, cfg: &Config, kind: SubmodelKind, layer_range: Range<usize>) -> Result<Self> {
        Self::load_weights(&Weights::from(vb), cfg, kind, layer_range)
    }

    /// [`Submodel::load`] from dense or quantized weights.
    pub fn load_weights(w: &Weights, cfg: &Config, kind: SubmodelKind, layer_range: Range<usize>) -> Result<Self> {
        if layer_range.end > cfg.num_layers || layer_range.start > layer_range.end {
            return Err(ModelError::InvalidConfig(format!(
                "layer range {layer_range:?} does not fit a model of {} layers",
                cfg.num_layers
            )));
        }
        let embed_tokens =
            if kind.has_embedding() { Some(w.embedding(cfg.vocab_size, cfg.hidden_size, "model.embed_tokens")?) } else { None };
        let layers_w = w.pp(LAYERS_PREFIX);
        let layers = layer_range.clone().map(|i| DecoderLayer::load(&layers_w.pp(i), cfg, i)).collect::<Result<Vec<_>>>()?;
        let (norm, lm_head) = if kind.has_head() {
            (
                Some(Norm::load_offset(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_offset, w.vb().pp("model.norm"))?),
                Some(w.proj(cfg.hidden_size, cfg.vocab_size, false, "lm_head")?),
            )
        } else {
            (None, None)
        };
        let rope = Ropes::new(cfg, w.dtype(), w.device())?;
        Ok(Self {
            kind,
            layer_range,
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            cfg: cfg.clone(),
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    pub fn kind(&self) -> SubmodelKind {
        self.kind
    }

    pub fn layer_range(&self) -> Range<usize> {
        self.layer_range.clone()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Only decoder layers `range` (original indices, inside this submodel's), without embedding or
    /// head, sharing this submodel's weights. The privacy audit chains such slices of the input and
    /// middle submodels to read the states after any depth without loading the weights again.
    pub fn layer_slice(&self, range: Range<usize>) -> Result<Submodel> {
        let own = &self.layer_range;
        if range.start < own.start || range.end > own.end || range.start > range.end {
            return Err(ModelError::InvalidConfig(format!("layers {range:?} are not inside this submodel's layers {own:?}")));
        }
        let layers = self.layers[range.start - own.start..range.end - own.start].to_vec();
        Ok(Self {
            kind: SubmodelKind::Middle,
            layer_range: range,
            embed_tokens: None,
            layers,
            norm: None,
            lm_head: None,
            rope: self.rope.clone(),
            cfg: self.cfg.clone(),
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    /// A cache for this submodel's layers; a sliding-window layer's keeps only its window (see
    /// `crate::kv_cache`).
    pub fn new_cache(&self) -> KvCache {
        self.new_cache_limited(usize::MAX)
    }

    /// A cache whose buffers stop growing at `positions` (a session's granted context).
    pub fn new_cache_limited(&self, positions: usize) -> KvCache {
        let windows: Vec<Option<usize>> = self.layers.iter().map(DecoderLayer::window).collect();
        KvCache::with_windows(&windows, positions)
    }

    /// # Shapes
    /// ids: (batch, seq) u32 -> (batch, seq, hidden)
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let e = self.embed_tokens.as_ref().ok_or_else(|| missing_part(self.kind, "embedding"))?;
        let x = e.forward(ids)?;
        Ok(match self.cfg.embed_scale {
            Some(scale) => (x * scale)?,
            None => x,
        })
    }

    /// Checks that `seq` rows at `pos` fit the context and the cache, and rolls the cache back to `pos`.
    fn check_positions(&self, pos: usize, seq: usize, cache: &mut KvCache) -> Result<()> {
        if cache.num_layers() != self.layers.len() {
            return Err(ModelError::InvalidConfig(format!("cache has {} layers, submodel has {}", cache.num_layers(), self.layers.len())));
        }
        if pos + seq > self.rope.max_positions() {
            return Err(ModelError::InvalidConfig(format!(
                "positions up to {} exceed the model's context of {}",
                pos + seq,
                self.rope.max_positions()
            )));
        }
        cache.truncate(pos);
        if cache.len() != pos {
            return Err(ModelError::InvalidConfig(if cache.len() > pos {
                format!(
                    "cannot roll back to position {pos}: the sliding-window cache keeps positions from {} on (at most {} back)",
                    cache.start(),
                    crate::kv_cache::REWIND
                )
            } else {
                format!("cannot run at position {pos}: the cache holds only {} positions", cache.len())
            }));
        }
        Ok(())
    }

    /// Runs this submodel's decoder layers on new positions `pos..pos + seq`; the cache must hold
    /// exactly `pos` positions already (truncate it first to roll back). `hidden` may live on
    /// another device or in another dtype (the cloud on a GPU gets states from the wire on the CPU
    /// in f32): it moves to this submodel's device and dtype once, and the output comes back to
    /// where `hidden` was, once. On the submodel's own device and dtype both moves are no-ops.
    ///
    /// Off the CPU's f32 path (a GPU, or another dtype), a row's last bits depend on how many rows
    /// share its matmuls. There a forward of at most [`ROW_BY_ROW_MAX`] rows (a verification round)
    /// runs its rows one at a time, each exactly as a one-token step would: `hat` then gets the
    /// bits `ushape` gets from the same cloud. Longer forwards (prompt chunks) run whole.
    ///
    /// # Shapes
    /// hidden: (batch, seq, hidden) -> (batch, seq, hidden)
    pub fn forward_layers(&self, hidden: &Tensor, pos: usize, cache: &mut KvCache) -> Result<Tensor> {
        self.forward_layers_tree(hidden, pos, None, cache)
    }

    /// [`Submodel::forward_layers`] for a round shaped as a chain with leaves: row i at position
    /// `pos + depths[i]`, seeing rows `0..depths[i]` and itself (see `attention::attend_tree`); the
    /// cache then holds row i at slot `pos + i`, and [`KvCache::promote`] moves an accepted leaf to
    /// its position. `None` is a chain. Trees run on the CPU in f32 only (the row-by-row path
    /// elsewhere cannot shape them); [`Submodel::runs_trees`] says whether this one does.
    ///
    /// # Shapes
    /// hidden: (batch, seq, hidden) -> (batch, seq, hidden)
    pub fn forward_layers_tree(&self, hidden: &Tensor, pos: usize, depths: Option<&[usize]>, cache: &mut KvCache) -> Result<Tensor> {
        let seq = hidden.dim(1)?;
        if let Some(t) = depths {
            crate::attention::check_depths(t, seq)?;
        }
        // A chain given as depths runs as a chain (and so anywhere).
        let depths = depths.filter(|t| !crate::attention::is_chain(t));
        if depths.is_some() && !self.runs_trees() {
            return Err(ModelError::InvalidConfig("draft trees run on the CPU in f32 only".into()));
        }
        self.check_positions(pos, seq, cache)?;
        let h = hidden.to_device(&self.device)?.to_dtype(self.dtype)?;
        let out = if self.row_by_row(seq) {
            let rows = (0..seq).map(|i| self.run_layers(h.narrow(1, i, 1)?, pos + i, None, cache)).collect::<Result<Vec<_>>>()?;
            Tensor::cat(&rows, 1)?
        } else {
            self.run_layers(h, pos, depths, cache)?
        };
        Ok(out.to_device(hidden.device())?.to_dtype(hidden.dtype())?)
    }

    /// Whether [`Submodel::forward_layers_tree`] takes rounds with leaves here.
    pub fn runs_trees(&self) -> bool {
        self.device.is_cpu() && self.dtype == DType::F32
    }

    /// Whether a forward of `rows` rows runs them one at a time (see [`Submodel::forward_layers`]).
    fn row_by_row(&self, rows: usize) -> bool {
        (2..=ROW_BY_ROW_MAX).contains(&rows) && !(self.device.is_cpu() && self.dtype == DType::F32)
    }

    fn run_layers(&self, mut h: Tensor, pos: usize, depths: Option<&[usize]>, cache: &mut KvCache) -> Result<Tensor> {
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward_tree(&h, &self.rope, pos, depths, cache.layer_mut(i))?;
        }
        Ok(h)
    }

    /// [`Submodel::forward_layers`] for several sessions at once, as one batch: `inputs[i]` is
    /// session i's new rows and their first position, `caches[i]` its cache. Each output equals, bit
    /// for bit, what `forward_layers` gives that session alone (see `DecoderLayer::forward_ragged`);
    /// off the CPU or in another dtype the sessions simply run one after another (a GPU's matmuls
    /// are not row by row, so stacking sessions there would change their bits).
    ///
    /// # Shapes
    /// inputs: (1, seq_i, hidden) each -> (1, seq_i, hidden) each. `depths[i]` shapes session i's
    /// rows as in [`Submodel::forward_layers_tree`] (`None`: a chain).
    pub fn forward_layers_batch(
        &self,
        inputs: &[(Tensor, usize)],
        depths: &[Option<&[usize]>],
        caches: &mut [&mut KvCache],
    ) -> Result<Vec<Tensor>> {
        if inputs.len() != caches.len() || inputs.len() != depths.len() {
            return Err(ModelError::InvalidConfig(format!("{} inputs, {} shapes and {} caches", inputs.len(), depths.len(), caches.len())));
        }
        let home = inputs.iter().all(|(h, _)| h.device().same_device(&self.device) && h.dtype() == self.dtype);
        if !(self.device.is_cpu() && self.dtype == DType::F32 && home) || inputs.len() == 1 {
            return inputs
                .iter()
                .zip(depths)
                .zip(caches.iter_mut())
                .map(|(((h, pos), t), c)| self.forward_layers_tree(h, *pos, *t, c))
                .collect();
        }
        let mut segments = Vec::with_capacity(inputs.len());
        for (((h, pos), t), cache) in inputs.iter().zip(depths).zip(caches.iter_mut()) {
            let (b, seq, _) = h.dims3()?;
            if b != 1 {
                return Err(ModelError::InvalidConfig(format!("a batched session sends one sequence, not {b}")));
            }
            if let Some(t) = t {
                crate::attention::check_depths(t, seq)?;
            }
            self.check_positions(*pos, seq, cache)?;
            segments.push(Segment { pos: *pos, seq, depths: *t });
        }
        let rows: Vec<&Tensor> = inputs.iter().map(|(h, _)| h).collect();
        let mut x = Tensor::cat(&rows, 1)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let mut layer_caches: Vec<&mut LayerCache> = caches.iter_mut().map(|c| c.layer_mut(i)).collect();
            x = layer.forward_ragged(&x, &self.rope, &segments, &mut layer_caches)?;
        }
        let mut out = Vec::with_capacity(segments.len());
        let mut offset = 0;
        for Segment { seq, .. } in segments {
            out.push(x.narrow(1, offset, seq)?);
            offset += seq;
        }
        Ok(out)
    }

    /// Runs every layer on positions `0..seq` without a cache, differentiably (training). The
    /// submodel's own weights are constants unless they were loaded from a `VarMap`.
    ///
    /// # Shapes
    /// hidden: (batch, seq, hidden) -> (batch, seq, hidden)
    pub fn forward_differentiable(&self, hidden: &Tensor) -> Result<Tensor> {
        let mut h = hidden.clone();
        for layer in &self.layers {
            h = layer.forward_differentiable(&h, &self.rope)?;
        }
        Ok(h)
    }

    /// One unrolled draft step through every layer (training-time test of a draft head); `past`
    /// holds each layer's keys and values of the earlier steps (see `DecoderLayer::forward_unrolled`).
    ///
    /// # Shapes
    /// hidden: (batch, seq, hidden) -> (batch, seq, hidden)
    pub fn forward_unrolled(&self, hidden: &Tensor, past: &mut Vec<Vec<(Tensor, Tensor)>>) -> Result<Tensor> {
        past.resize_with(self.layers.len(), Vec::new);
        let mut h = hidden.clone();
        for (layer, past) in self.layers.iter().zip(past.iter_mut()) {
            h = layer.forward_unrolled(&h, &self.rope, past)?;
        }
        Ok(h)
    }

    /// Final-logit soft-capping, where the family sets it: `cap * tanh(logits / cap)`.
    fn cap_logits(&self, logits: Tensor) -> Result<Tensor> {
        Ok(match self.cfg.final_logit_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    /// The LM head's weight (the output submodel's or the unsplit model's), dense (a dequantized copy
    /// when the head is quantized).
    ///
    /// # Shapes
    /// -> (vocab, hidden)
    pub fn lm_head_weight(&self) -> Result<Tensor> {
        self.lm_head.as_ref().ok_or_else(|| missing_part(self.kind, "LM head"))?.weight()
    }

    /// The ggml types this submodel's matrices run in, by name and count (empty when all dense).
    pub fn quant_types(&self) -> Vec<(&'static str, usize)> {
        let mut counts: std::collections::BTreeMap<&'static str, usize> = Default::default();
        let projs = self.layers.iter().flat_map(DecoderLayer::projs).chain(self.lm_head.iter());
        for t in projs.filter_map(Proj::quant_type) {
            *counts.entry(crate::weights::ggml_name(t)).or_default() += 1;
        }
        counts.into_iter().collect()
    }

    /// The final norm's weight.
    ///
    /// # Shapes
    /// -> (hidden,)
    pub fn final_norm_weight(&self) -> Result<&Tensor> {
        Ok(self.norm.as_ref().ok_or_else(|| missing_part(self.kind, "final norm"))?.weight())
    }

    /// The embedding matrix.
    ///
    /// # Shapes
    /// -> (vocab, hidden)
    pub fn embedding_weight(&self) -> Result<&Tensor> {
        Ok(self.embed_tokens.as_ref().ok_or_else(|| missing_part(self.kind, "embedding"))?.embeddings())
    }

    /// [`Submodel::head`], differentiably.
    ///
    /// # Shapes
    /// hidden: (batch, seq, hidden) -> (batch, seq, vocab)
    pub fn head_differentiable(&self, hidden: &Tensor) -> Result<Tensor> {
        let (norm, lm_head) = match (&self.norm, &self.lm_head) {
            (Some(n), Some(l)) => (n, l),
            _ => return Err(missing_part(self.kind, "LM head")),
        };
        self.cap_logits(lm_head.forward(&norm.forward_differentiable(hidden)?)?)
    }

    /// Final norm and LM head.
    ///
    /// # Shapes
    /// hidden: (batch, seq, hidden) -> (batch, seq, vocab)
    pub fn head(&self, hidden: &Tensor) -> Result<Tensor> {
        let (norm, lm_head) = match (&self.norm, &self.lm_head) {
            (Some(n), Some(l)) => (n, l),
            _ => return Err(missing_part(self.kind, "LM head")),
        };
        let rows = if hidden.rank() == 3 { hidden.dim(1)? } else { 1 };
        if self.row_by_row(rows) {
            let logits = (0..rows)
                .map(|i| self.cap_logits(lm_head.forward(&norm.forward(&hidden.narrow(1, i, 1)?)?)?))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&logits, 1)?);
        }
        self.cap_logits(lm_head.forward(&norm.forward(hidden)?)?)
    }
}

fn missing_part(kind: SubmodelKind, part: &str) -> ModelError {
    ModelError::InvalidConfig(format!("the {kind:?} submodel has no {part}"))
}
