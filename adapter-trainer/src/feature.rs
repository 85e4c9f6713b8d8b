//! The feature draft head in training: its weights live in a `VarMap` so candle's autograd tracks
//! them; the embedding and the LM head rows of the draft vocabulary are frozen tensors of the model.
//! Each batch runs several unrolled draft steps (EAGLE-3's training-time test): step 0 reads the
//! true fused features, step s feeds step s-1's output back in, and each step's attention sees what
//! the draft cache would hold at inference. The loss is a soft cross-entropy against the model's
//! top-k distribution restricted to the draft vocabulary, plus a SmoothL1 term on the normalised
//! final state, weighted down per step.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use hat_model::Config;
use hat_runtime::draft_head::{head_layer_count, HeadMeta, HeadParts, VOCAB_TENSOR};
use hat_runtime::{DevicePackage, FeatureHead};
use rand::rngs::StdRng;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::teacher::TeacherSet;
use crate::train::{LossValues, Student, TrainConfig};

/// Knobs of the draft head's loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeadLossConfig {
    /// Unrolled draft steps per window (1 is plain teacher forcing).
    pub unroll: usize,
    /// Step s is weighted `step_decay^s`.
    pub step_decay: f64,
    /// Weight of the SmoothL1 term on the RMS-normalised final state.
    pub feature_weight: f64,
}

impl Default for HeadLossConfig {
    fn default() -> Self {
        Self { unroll: 3, step_decay: 0.8, feature_weight: 0.1 }
    }
}

/// Draft vocabulary: the `n` most frequent ids of the training tokens, most frequent first (ties by
/// id), plus every end-of-sequence id, so the head can draft the end of a reply.
pub fn draft_vocab(tokens: &[u32], n: usize, vocab_size: usize, eos: &[u32]) -> Vec<u32> {
    let mut counts = vec![0usize; vocab_size];
    for &t in tokens {
        if (t as usize) < vocab_size {
            counts[t as usize] += 1;
        }
    }
    for &e in eos {
        if (e as usize) < vocab_size {
            counts[e as usize] = usize::MAX;
        }
    }
    let mut ids: Vec<u32> = (0..vocab_size as u32).collect();
    ids.sort_by(|a, b| counts[*b as usize].cmp(&counts[*a as usize]).then(a.cmp(b)));
    ids.truncate(n.min(vocab_size));
    ids
}

pub struct TrainableHead {
    varmap: VarMap,
    parts: HeadParts,
    /// Frozen: the model's embedding and LM-head rows of the draft vocabulary.
    embedding: Tensor,
    head_rows: Tensor,
    pub vocab: Vec<u32>,
    /// Full id -> draft index.
    index: HashMap<u32, usize>,
    cfg: Config,
    device: Device,
}

impl std::fmt::Debug for TrainableHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrainableHead(draft vocabulary {})", self.vocab.len())
    }
}

/// Tensors of a fresh head: the decoder layer is the model's last layer, the final norm the model's;
/// the fused feature starts as the normalised top state plus a little of low and high, and the
/// combination as the fused feature plus the token's embedding.
pub fn initial_tensors(package: &DevicePackage, seed: u64) -> Result<HashMap<String, Tensor>> {
    let cfg = &package.config;
    let d = cfg.hidden_size;
    let cpu = Device::Cpu;
    let last = cfg.num_layers - 1;
    let shard = hat_runtime::package::dense_shard_tensors(&package.dir, &package.manifest, "output")?;
    let prefix = format!("{}.{last}.", hat_model::names::LAYERS_PREFIX);
    let mut t = HashMap::new();
    for (name, w) in &shard {
        if let Some(suffix) = name.strip_prefix(&prefix) {
            t.insert(format!("{}.0.{suffix}", hat_model::names::LAYERS_PREFIX), w.to_dtype(DType::F32)?);
        }
    }
    if t.is_empty() {
        return Err(TrainError::BadInput(format!(
            "{}'s output shard holds no layer {last} to start the draft head from",
            package.dir.display()
        )));
    }
    let norm = package.output.final_norm_weight()?.to_dtype(DType::F32)?.to_device(&cpu)?;
    let ones = Tensor::ones(d, DType::F32, &cpu)?;
    let eye = Tensor::eye(d, DType::F32, &cpu)?;
    let mut rng = <StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let scale = 0.5 / (d as f32).sqrt();
    let mut noise = |rows: usize, cols: usize| -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-scale..scale)).collect();
        Ok(Tensor::from_vec(v, (rows, cols), &cpu)?)
    };
    t.insert("fuse.weight".into(), Tensor::cat(&[noise(d, d)?, noise(d, d)?, eye.clone()], 1)?);
    t.insert("combine.weight".into(), Tensor::cat(&[eye.clone(), eye], 1)?);
    t.insert("low_norm.weight".into(), ones.clone());
    t.insert("high_norm.weight".into(), ones);
    t.insert("top_norm.weight".into(), norm.clone());
    t.insert("norm.weight".into(), norm);
    Ok(t)
}

/// Gives a head `layers` decoder layers. Each added layer starts as a copy of the head's last with
/// its two output projections (attention's and the MLP's, biases included) at zero, so it adds
/// nothing to the residual stream: the grown head computes exactly what the head did, and training
/// brings the new layers in from there. A head never loses layers.
pub fn grow_layers(tensors: &mut HashMap<String, Tensor>, layers: usize) -> Result<()> {
    let have = head_layer_count(tensors.keys());
    if have == 0 || layers < have {
        return Err(TrainError::BadInput(format!(
            "--head-layers {layers}: the starting head has {have} decoder layer(s), and a head can only gain layers"
        )));
    }
    let last = format!("{}.{}.", hat_model::names::LAYERS_PREFIX, have - 1);
    let copies: Vec<(String, Tensor)> =
        tensors.iter().filter_map(|(k, v)| k.strip_prefix(&last).map(|s| (s.to_string(), v.clone()))).collect();
    for i in have..layers {
        for (suffix, t) in &copies {
            let silent = suffix.starts_with("self_attn.o_proj.") || suffix.starts_with("mlp.down_proj.");
            let t = if silent { t.zeros_like()? } else { t.clone() };
            tensors.insert(format!("{}.{i}.{suffix}", hat_model::names::LAYERS_PREFIX), t);
        }
    }
    Ok(())
}

impl TrainableHead {
    pub fn new(tensors: HashMap<String, Tensor>, vocab: Vec<u32>, package: &DevicePackage, device: &Device) -> Result<Self> {
        let cfg = package.config.clone();
        let layers = head_layer_count(tensors.keys());
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().map_err(|_| TrainError::BadInput("var map lock poisoned".into()))?;
            for (name, t) in tensors {
                data.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?);
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let ids = Tensor::new(vocab.as_slice(), &Device::Cpu)?;
        let head_rows = package.output.lm_head_weight()?.to_dtype(DType::F32)?.index_select(&ids, 0)?.to_device(device)?;
        let embedding = package.input.embedding_weight()?.to_dtype(DType::F32)?.to_device(device)?;
        let index = vocab.iter().enumerate().map(|(i, &t)| (t, i)).collect();
        Ok(Self { parts: HeadParts::load(&vb, &cfg, layers)?, varmap, embedding, head_rows, vocab, index, cfg, device: device.clone() })
    }

    /// The head's decoder layers.
    pub fn layers(&self) -> usize {
        self.parts.layer.layer_range().len()
    }

    pub fn vars(&self) -> Vec<(String, Var)> {
        crate::train::sorted_vars(&self.varmap)
    }

    /// Weights, detached, on the CPU (the vocabulary is not among them).
    pub fn weights(&self) -> Result<HashMap<String, Tensor>> {
        self.vars().into_iter().map(|(k, v)| Ok((k, v.as_tensor().detach().to_device(&Device::Cpu)?))).collect()
    }

    /// What a head file holds: the weights in `dtype` and the vocabulary.
    pub fn file_tensors(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let mut t: HashMap<String, Tensor> =
            self.weights()?.into_iter().map(|(k, v)| Ok((k, v.to_dtype(dtype)?))).collect::<Result<_>>()?;
        t.insert(VOCAB_TENSOR.into(), Tensor::new(self.vocab.as_slice(), &Device::Cpu)?);
        Ok(t)
    }

    /// An inference copy on the CPU.
    pub fn to_runtime(&self, package: &DevicePackage, meta: HeadMeta, path: PathBuf) -> Result<FeatureHead> {
        Ok(FeatureHead::from_tensors(self.weights()?, self.vocab.clone(), meta, path, package, &Device::Cpu)?)
    }

    /// The unrolled draft steps over one window's positions `0..m` (entry r: features of position r,
    /// the token at r + 1), each step's final states.
    ///
    /// # Shapes
    /// low, high, top: (m, hidden); next: m ids -> steps x (1, m, hidden)
    pub fn unrolled(&self, low: &Tensor, high: &Tensor, top: &Tensor, next: &[u32], steps: usize) -> Result<Vec<Tensor>> {
        let feats = Tensor::cat(
            &[
                self.parts.low_norm.forward_differentiable(low)?,
                self.parts.high_norm.forward_differentiable(high)?,
                self.parts.top_norm.forward_differentiable(top)?,
            ],
            D::Minus1,
        )?;
        let mut g = self.parts.fuse.forward(&feats)?.unsqueeze(0)?;
        let ids = Tensor::new(next, &self.device)?;
        let e = self.embedding.index_select(&ids, 0)?.unsqueeze(0)?;
        let m = next.len();
        let mut past = Vec::new();
        let mut outs = Vec::with_capacity(steps);
        for _ in 0..steps {
            let x = self.parts.combine.forward(&Tensor::cat(&[&g, &e], D::Minus1)?)?;
            let h = self.parts.layer.forward_unrolled(&x, &mut past)?;
            // The next step's entry r reads this step's output at r - 1.
            g = Tensor::cat(&[Tensor::zeros((1, 1, self.cfg.hidden_size), DType::F32, &self.device)?, h.narrow(1, 0, m - 1)?], 1)?;
            outs.push(h);
        }
        Ok(outs)
    }

    /// Draft-vocabulary logits.
    ///
    /// # Shapes
    /// h: (1, m, hidden) -> (m, draft_vocab)
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.parts.norm.forward_differentiable(&h.squeeze(0)?)?.matmul(&self.head_rows.t()?)?)
    }

    /// The teacher's top-k distribution of rows `rows` restricted to the draft vocabulary and
    /// renormalised, and a 0/1 weight per row (0 where none of the top-k is in the vocabulary).
    ///
    /// # Shapes
    /// -> (rows, draft_vocab), (rows,)
    fn targets(&self, top_ids: &[Vec<u32>], top_p: &[Vec<f32>]) -> Result<(Tensor, Tensor)> {
        let n = self.vocab.len();
        let mut dense = vec![0f32; top_ids.len() * n];
        let mut keep = vec![0f32; top_ids.len()];
        for (r, (ids, ps)) in top_ids.iter().zip(top_p).enumerate() {
            let row = &mut dense[r * n..(r + 1) * n];
            for (id, p) in ids.iter().zip(ps) {
                if let Some(&i) = self.index.get(id) {
                    row[i] += p;
                }
            }
            let z: f32 = row.iter().sum();
            if z > 0.0 {
                row.iter_mut().for_each(|v| *v /= z);
                keep[r] = 1.0;
            }
        }
        let rows = top_ids.len();
        Ok((Tensor::from_vec(dense, (rows, n), &self.device)?, Tensor::from_vec(keep, rows, &self.device)?))
    }
}

/// RMS-normalises each row without a weight, so a few massive dimensions do not rule the loss.
fn rms(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&(x.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?)?)
}

/// One window's loss: per step, soft cross-entropy over the draft vocabulary and SmoothL1 on the
/// normalised state, over the rows the step can reach. Returns (total, feature, ce, first-step
/// top-1 hits, rows).
pub fn window_loss(
    head: &TrainableHead,
    teacher: &TeacherSet,
    seq: usize,
    start: usize,
    len: usize,
    loss: &HeadLossConfig,
) -> Result<(Tensor, f64, f64, usize, usize)> {
    let top = teacher.top.as_ref().ok_or_else(|| TrainError::BadInput("the teacher set has no output states".into()))?;
    let s = teacher.offsets[seq] + start;
    let m = len - 1;
    let dev = &head.device;
    let (low, high, topw) =
        (teacher.x.narrow(0, s, m)?.to_device(dev)?, teacher.y.narrow(0, s, m)?.to_device(dev)?, top.narrow(0, s, m)?.to_device(dev)?);
    let next = &teacher.tokens[s + 1..s + len];
    // Entry r predicts the token after position r + 1: the teacher's distribution at r + 1.
    let ids = teacher.top_ids.narrow(0, s + 1, m)?.to_vec2::<u32>()?;
    let ps = teacher.top_p.narrow(0, s + 1, m)?.to_vec2::<f32>()?;
    let (target, keep) = head.targets(&ids, &ps)?;
    let feature_target = rms(&top.narrow(0, s + 1, m)?.to_device(dev)?)?;
    let outs = head.unrolled(&low, &high, &topw, next, loss.unroll.min(m).max(1))?;
    let mut total: Option<Tensor> = None;
    let (mut feat_sum, mut ce_sum, mut hits) = (0.0, 0.0, 0);
    let mut weight_sum = 0.0;
    for (step, h) in outs.iter().enumerate() {
        // Entries before `step` have no chain of that length.
        let reach: Vec<f32> = (0..m).map(|r| if r >= step { 1.0 } else { 0.0 }).collect();
        let mask = (Tensor::from_vec(reach, m, dev)? * &keep)?;
        let count = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
        let logits = head.logits(h)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let ce = ((&target * &logp)?.sum(D::Minus1)? * &mask)?.sum_all()?.affine(-1.0 / count, 0.0)?;
        let diff = (rms(&h.squeeze(0)?)? - &feature_target)?.abs()?;
        let small = diff.clamp(0f32, 1f32)?;
        let smooth = ((small.sqr()? * 0.5)? + (diff - small)?)?.mean(D::Minus1)?;
        let feat = (smooth * &mask)?.sum_all()?.affine(1.0 / count, 0.0)?;
        let w = loss.step_decay.powi(step as i32);
        weight_sum += w;
        let l = ((&ce + (&feat * loss.feature_weight)?)? * w)?;
        ce_sum += ce.to_scalar::<f32>()? as f64 * w;
        feat_sum += feat.to_scalar::<f32>()? as f64 * w;
        if step == 0 {
            let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            hits = pred.iter().zip(&ids).filter(|(p, t)| head.vocab[**p as usize] == t[0]).count();
        }
        total = Some(match total {
            Some(t) => (t + l)?,
            None => l,
        });
    }
    let total = total.ok_or_else(|| TrainError::BadInput("no unrolled step".into()))?;
    Ok(((total / weight_sum)?, feat_sum / weight_sum, ce_sum / weight_sum, hits, m))
}

/// The draft head as a [`Student`] of the training loop.
pub struct HeadStudent<'a> {
    pub head: &'a TrainableHead,
    pub teacher: &'a TeacherSet,
    pub loss: HeadLossConfig,
}

impl Student for HeadStudent<'_> {
    fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.head.weights()
    }

    fn batch_loss(&self, rng: &mut StdRng, cfg: &TrainConfig) -> Result<(Tensor, LossValues, usize)> {
        let teacher = self.teacher;
        let mut total: Option<Tensor> = None;
        let (mut feat, mut ce, mut hits, mut rows, mut tokens) = (0.0, 0.0, 0, 0, 0);
        for _ in 0..cfg.batch {
            let i = loop {
                let i = rng.random_range(0..teacher.num_sequences());
                if teacher.sequence_len(i) >= 3 {
                    break i;
                }
            };
            let n = teacher.sequence_len(i);
            let len = n.min(cfg.seq_len.max(3));
            let start = if n > len { rng.random_range(0..=n - len) } else { 0 };
            let (l, f, c, h, r) = window_loss(self.head, teacher, i, start, len, &self.loss)?;
            feat += f;
            ce += c;
            hits += h;
            rows += r;
            tokens += len;
            let l = (l / cfg.batch as f64)?;
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l,
            });
        }
        let loss = total.ok_or_else(|| TrainError::BadInput("--batch must be at least 1".into()))?;
        let b = cfg.batch as f64;
        let values =
            LossValues { total: loss.to_scalar::<f32>()? as f64, hidden: feat / b, kl: ce / b, top1: hits as f64 / rows.max(1) as f64 };
        Ok((loss, values, tokens))
    }
}

/// Teacher-forced top-1 of draft step s+1 (s = 0..steps) on the answer positions of held-out
/// sequences: the share of positions where the head's top draft equals the model's own top token.
/// `prompt_lens[i]` is where sequence i's answer starts.
pub fn teacher_forced_top1(head: &TrainableHead, teacher: &TeacherSet, prompt_lens: &[usize], steps: usize) -> Result<Vec<f64>> {
    let top = teacher.top.as_ref().ok_or_else(|| TrainError::BadInput("the teacher set has no output states".into()))?;
    let (mut hits, mut counts) = (vec![0usize; steps], vec![0usize; steps]);
    let dev = &head.device;
    for (i, &prompt_len) in prompt_lens.iter().enumerate().take(teacher.num_sequences()) {
        let (s, n) = (teacher.offsets[i], teacher.sequence_len(i));
        if n < 3 {
            continue;
        }
        let m = n - 1;
        let outs = head.unrolled(
            &teacher.x.narrow(0, s, m)?.to_device(dev)?,
            &teacher.y.narrow(0, s, m)?.to_device(dev)?,
            &top.narrow(0, s, m)?.to_device(dev)?,
            &teacher.tokens[s + 1..s + n],
            steps,
        )?;
        let target = teacher.top_ids.narrow(0, s + 1, m)?.to_vec2::<u32>()?;
        for (step, h) in outs.iter().enumerate() {
            let pred = head.logits(&h.detach())?.argmax(D::Minus1)?.to_vec1::<u32>()?;
            // Entry r predicts the token at r + 2; count entries whose prediction is an answer token
            // and whose chain starts inside the sequence.
            for r in step..m {
                if r + 2 >= prompt_len {
                    counts[step] += 1;
                    hits[step] += usize::from(head.vocab[pred[r] as usize] == target[r][0]);
                }
            }
        }
    }
    Ok(hits.iter().zip(&counts).map(|(h, c)| *h as f64 / (*c).max(1) as f64).collect())
}

/// The off-by-one check of HAT.md: on greedy sequences the teacher's top token at position q must be
/// the sequence's token at q + 1, at every answer position. Returns the share that is.
pub fn alignment(teacher: &TeacherSet, prompt_lens: &[usize]) -> Result<f64> {
    let (mut same, mut count) = (0, 0);
    for (i, &p) in prompt_lens.iter().enumerate() {
        let (s, n) = (teacher.offsets[i], teacher.sequence_len(i));
        if n < 2 || p == 0 {
            continue;
        }
        let ids = teacher.top_ids.narrow(0, s + p - 1, n - p)?.to_vec2::<u32>()?;
        for (q, row) in ids.iter().enumerate() {
            count += 1;
            same += usize::from(row[0] == teacher.tokens[s + p + q]);
        }
    }
    Ok(same as f64 / count.max(1) as f64)
}
