//! The training loop: batches of sequence windows, the distillation loss, AdamW, checkpoints every
//! few steps (and on Ctrl-C), and progress on stderr.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor, D};
use hat_model::Submodel;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::adapter::TrainableAdapter;
use crate::error::{Result, TrainError};
use crate::optim::{learning_rate, AdamW, AdamWConfig};
use crate::teacher::TeacherSet;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    /// Weight of the distribution term (cross-entropy through the frozen output submodel against
    /// the full model's top-k next-token distribution); the hidden-state term has weight 1.
    pub kl_weight: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { kl_weight: 0.1 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub steps: usize,
    /// Sequence windows per step.
    pub batch: usize,
    /// Longest window, in tokens.
    pub seq_len: usize,
    pub seed: u64,
    pub checkpoint_every: usize,
    pub optimizer: AdamWConfig,
    pub loss: LossConfig,
}

/// The loss terms of one batch, as numbers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LossValues {
    pub total: f64,
    /// The hidden-state (adapter) or feature (draft head) term.
    pub hidden: f64,
    /// The distribution term.
    pub kl: f64,
    /// Teacher-forced top-1 agreement of the first draft on the batch (draft head only).
    #[serde(default)]
    pub top1: f64,
}

/// What the training loop trains: its weights and the loss of one random batch.
pub trait Student {
    /// Current weights, detached, on the CPU.
    fn tensors(&self) -> Result<std::collections::HashMap<String, Tensor>>;
    /// The loss of one batch drawn with `rng`, its values, and the tokens it covered.
    fn batch_loss(&self, rng: &mut StdRng, cfg: &TrainConfig) -> Result<(Tensor, LossValues, usize)>;
}

/// The paper's adapter as a [`Student`]: windows of the teacher set through the frozen output submodel.
pub struct AdapterStudent<'a> {
    pub adapter: &'a TrainableAdapter,
    pub output: &'a Submodel,
    pub teacher: &'a TeacherSet,
}

impl Student for AdapterStudent<'_> {
    fn tensors(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        self.adapter.tensors()
    }

    fn batch_loss(&self, rng: &mut StdRng, cfg: &TrainConfig) -> Result<(Tensor, LossValues, usize)> {
        let device = self.output.device().clone();
        let teacher = self.teacher;
        let mut total: Option<Tensor> = None;
        let (mut hidden_sum, mut kl_sum, mut tokens) = (0.0, 0.0, 0);
        for _ in 0..cfg.batch {
            let i = rng.random_range(0..teacher.num_sequences());
            let n = teacher.sequence_len(i);
            let len = n.min(cfg.seq_len);
            let start = if n > len { rng.random_range(0..=n - len) } else { 0 };
            let (x, y, ids, p) = teacher.window(i, start, len)?;
            let (x, y, ids, p) = (x.to_device(&device)?, y.to_device(&device)?, ids.to_device(&device)?, p.to_device(&device)?);
            let (l, h, k) = window_loss(self.adapter, self.output, &x, &y, &ids, &p, &cfg.loss)?;
            hidden_sum += h.to_scalar::<f32>()? as f64;
            kl_sum += k.to_scalar::<f32>()? as f64;
            tokens += len;
            let l = (l / cfg.batch as f64)?;
            total = Some(match total {
                Some(t) => (t + l)?,
                None => l,
            });
        }
        let Some(loss) = total else { return Err(TrainError::BadInput("--batch must be at least 1".into())) };
        let values = LossValues {
            total: loss.to_scalar::<f32>()? as f64,
            hidden: hidden_sum / cfg.batch as f64,
            kl: kl_sum / cfg.batch as f64,
            top1: 0.0,
        };
        Ok((loss, values, tokens))
    }
}

/// The distillation loss of one window.
///
/// # Shapes
/// x, y: (seq, hidden); top_ids: (seq, k) u32; top_p: (seq, k)
pub fn window_loss(
    adapter: &TrainableAdapter,
    output: &Submodel,
    x: &Tensor,
    y: &Tensor,
    top_ids: &Tensor,
    top_p: &Tensor,
    cfg: &LossConfig,
) -> Result<(Tensor, Tensor, Tensor)> {
    let a = adapter.forward_differentiable(&x.unsqueeze(0)?)?;
    let y = y.unsqueeze(0)?;
    // Relative squared error: late-layer states have a few huge dimensions, so normalise by the target.
    let hidden = ((&a - &y)?.sqr()?.mean_all()? / y.sqr()?.mean_all()?)?;
    let logits = output.head_differentiable(&output.forward_differentiable(&a)?)?.squeeze(0)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(top_ids, 1)?;
    let kl = ((picked * top_p)?.sum(D::Minus1)?.mean_all()? * -1.0)?;
    let total = (&hidden + (&kl * cfg.kl_weight)?)?;
    Ok((total, hidden, kl))
}

/// What a checkpoint records besides the weights and optimiser moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub step: usize,
    pub config: TrainConfig,
    pub teacher_key: String,
    pub adapter_layers: usize,
    pub losses: Vec<LossValues>,
    pub train_tokens: usize,
    pub train_seconds: f64,
    /// Evaluation of the initial adapter, kept so a resumed run need not redo it.
    pub before: Option<crate::eval::EvalResult>,
}

pub struct Checkpoint {
    pub dir: PathBuf,
}

impl Checkpoint {
    fn weights(&self) -> PathBuf {
        self.dir.join("checkpoint.safetensors")
    }
    fn meta(&self) -> PathBuf {
        self.dir.join("checkpoint.json")
    }

    pub fn exists(&self) -> bool {
        self.meta().is_file() && self.weights().is_file()
    }

    /// Writes weights and moments, then the metadata, each through a rename, so an interrupted
    /// save leaves the previous checkpoint whole.
    pub fn save(&self, student: &dyn Student, opt: &AdamW, meta: &CheckpointMeta) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| TrainError::io(format!("cannot create {}", self.dir.display()), e))?;
        let mut tensors = student.tensors()?;
        tensors.extend(opt.state()?);
        let tmp = self.weights().with_extension("partial");
        candle_core::safetensors::save(&tensors, &tmp)?;
        rename(&tmp, &self.weights())?;
        let json = serde_json::to_string_pretty(meta).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        let tmp = self.meta().with_extension("partial");
        std::fs::write(&tmp, json).map_err(|e| TrainError::io(format!("cannot write {}", tmp.display()), e))?;
        rename(&tmp, &self.meta())
    }

    pub fn load_meta(&self) -> Result<CheckpointMeta> {
        let text = std::fs::read_to_string(self.meta()).map_err(|e| TrainError::io(format!("cannot read {}", self.meta().display()), e))?;
        serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint(format!("{}: {e}", self.meta().display())))
    }

    pub fn load_tensors(&self) -> Result<std::collections::HashMap<String, Tensor>> {
        Ok(candle_core::safetensors::load(self.weights(), &Device::Cpu)?)
    }
}

/// A checkpoint's weights without the optimiser's moments (`m.*`, `v.*`).
pub fn weights_only(tensors: &std::collections::HashMap<String, Tensor>) -> std::collections::HashMap<String, Tensor> {
    tensors.iter().filter(|(k, _)| !k.starts_with("m.") && !k.starts_with("v.")).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Trainable variables of a var map, in a stable order (the optimiser's moments follow it).
pub fn sorted_vars(varmap: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<(String, candle_core::Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| TrainError::io(format!("cannot move {} to {}", from.display(), to.display()), e))
}

/// Trains from `meta.step` to `cfg.steps`, saving checkpoints; returns the final metadata. Ctrl-C
/// (`interrupted`) or reaching `stop_at` saves a checkpoint and ends with [`TrainError::Interrupted`].
pub fn train(
    student: &dyn Student,
    opt: &mut AdamW,
    mut meta: CheckpointMeta,
    checkpoint: &Checkpoint,
    interrupted: &AtomicBool,
    stop_at: Option<usize>,
    bar: &indicatif::ProgressBar,
) -> Result<CheckpointMeta> {
    let cfg = meta.config.clone();
    let started = Instant::now();
    let seconds_before = meta.train_seconds;
    let tokens_before = meta.train_tokens;
    bar.set_position(meta.step as u64);
    while meta.step < cfg.steps {
        if interrupted.load(Ordering::SeqCst) || stop_at.is_some_and(|s| meta.step >= s) {
            checkpoint.save(student, opt, &meta)?;
            return Err(TrainError::Interrupted { step: meta.step, total: cfg.steps });
        }
        // The batch depends only on the seed and the step, so a resumed run sees the same data.
        let mut rng = StdRng::seed_from_u64(cfg.seed ^ (meta.step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let (loss, values, tokens) = student.batch_loss(&mut rng, &cfg)?;
        let grads = loss.backward()?;
        let lr = learning_rate(&cfg.optimizer, meta.step, cfg.steps);
        opt.step(&grads, lr)?;
        meta.losses.push(values);
        meta.step += 1;
        meta.train_tokens += tokens;
        meta.train_seconds = seconds_before + started.elapsed().as_secs_f64();
        let tok_s = (meta.train_tokens - tokens_before) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        bar.set_position(meta.step as u64);
        let top1 = if values.top1 > 0.0 { format!(", top-1 {:.3}", values.top1) } else { String::new() };
        bar.set_message(format!("loss {:.4} (hidden {:.4}, kl {:.3}{top1}), {tok_s:.0} tok/s", values.total, values.hidden, values.kl));
        if meta.step.is_multiple_of(cfg.checkpoint_every.max(1)) || meta.step == cfg.steps {
            checkpoint.save(student, opt, &meta)?;
        }
    }
    Ok(meta)
}
