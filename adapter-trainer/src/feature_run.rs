//! `hat train-adapter --draft-head feature`, end to end: batched self-distillation, the draft
//! vocabulary, teacher features (cached), the alignment check, training with unrolled steps, and a
//! held-out evaluation before and after (teacher-forced top-1 per draft step, and live accept_len at
//! a fixed draft length and at adaptive thresholds). Writes DIR/device/draft-head.safetensors (f16)
//! and draft-head-report.json.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::DType;
use hat_runtime::draft_head::{read_head, save_head, split_label, HeadMeta, DRAFT_HEAD_FILE, HEAD_FORMAT_VERSION};
use hat_runtime::sampling::SamplingOptions;
use hat_runtime::{CloudPackage, DevicePackage, Drafter};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::data::{chat_prompt, held_out_prompts, prompt_lines, read_prompts, HELDOUT_PROMPTS};
use crate::distill::{distill, Distilled};
use crate::error::{Result, TrainError};
use crate::eval::{evaluate_drafter, EvalResult};
use crate::feature::{
    alignment, draft_vocab, grow_layers, initial_tensors, teacher_forced_top1, HeadLossConfig, HeadStudent, TrainableHead,
};
use crate::optim::AdamW;
use crate::teacher::{teacher_key_for, TeacherSet};
use crate::train::{Checkpoint, CheckpointMeta, TrainConfig};
use crate::{bar, interrupt_flag, open_packages, train_config, write_atomically, Opened, TrainAdapterOptions, WORK_DIR};

/// The prompts the project ships for training the draft head (none of them held out).
pub const HEAD_PROMPTS: &str = include_str!("../prompts/draft-head.txt");
pub const HEAD_REPORT_FILE: &str = "draft-head-report.json";

/// Held-out measurement of a draft head.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadEval {
    /// Teacher-forced top-1 of draft steps 1, 2, 3... on held-out answers.
    pub teacher_forced_top1: Vec<f64>,
    /// Live speculative decoding at the fixed draft length (no early stop).
    pub fixed: EvalResult,
}

/// Live decoding at one confidence threshold.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThresholdEval {
    pub threshold: f32,
    pub result: EvalResult,
    /// Mean drafts proposed per round.
    pub drafts_per_round: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadReport {
    pub head: PathBuf,
    pub device: String,
    pub made_by: String,
    pub draft_vocab: usize,
    /// The head's decoder layers.
    #[serde(default = "one")]
    pub head_layers: usize,
    /// Share of held-out answer tokens inside the draft vocabulary (a ceiling on acceptance).
    pub heldout_vocab_coverage: f64,
    pub sequences: usize,
    /// Answers per training prompt (the first greedy, the rest sampled at `distill_temperature`).
    #[serde(default = "one")]
    pub answers_per_prompt: usize,
    #[serde(default)]
    pub distill_temperature: f64,
    /// The head file training started from, when not the model's last layer.
    #[serde(default)]
    pub init_head: Option<PathBuf>,
    pub teacher_positions: usize,
    pub heldout_sequences: usize,
    /// Share of answer positions where the teacher's top token is the next token of the greedy text
    /// (1.0 means features and targets line up).
    pub alignment: f64,
    pub distill_seconds: f64,
    pub teacher_seconds: f64,
    pub steps: usize,
    pub train_tokens: usize,
    pub train_seconds: f64,
    pub train_tokens_per_s: f64,
    pub loss_curve: Vec<f64>,
    pub top1_curve: Vec<f64>,
    pub before: HeadEval,
    pub after: HeadEval,
    pub adaptive: Vec<ThresholdEval>,
    pub threshold: f32,
    pub config: TrainConfig,
    pub loss: HeadLossConfig,
}

fn one() -> usize {
    1
}

/// Distilled answers, cached by everything that decides them.
fn distilled(
    opts: &TrainAdapterOptions,
    device: &DevicePackage,
    cloud: &CloudPackage,
    prompts: &[String],
    what: &str,
    sampling: SamplingOptions,
) -> Result<(Vec<Distilled>, f64)> {
    let ids = prompts.iter().map(|p| chat_prompt(device, p)).collect::<Result<Vec<_>>>()?;
    let context = device.config.max_position_embeddings;
    if let Some((i, p)) = ids.iter().enumerate().find(|(_, p)| p.len() + 1 >= context) {
        return Err(TrainError::BadInput(format!("prompt {} has {} tokens, longer than the model's context of {context}", i + 1, p.len())));
    }
    let mut key = format!("{}|{}|{ids:?}", device.manifest.fingerprint, opts.distill_tokens);
    if !sampling.is_greedy() {
        key += &format!("|sampled {} {}", sampling.temperature, sampling.seed);
    }
    let key = &hex::encode(sha2::Sha256::digest(key.as_bytes()))[..16];
    let cache = distill_cache(&device.dir.join(WORK_DIR), key);
    if let Some(d) = std::fs::read_to_string(&cache).ok().and_then(|t| serde_json::from_str::<Vec<Distilled>>(&t).ok()) {
        return Ok((d, 0.0));
    }
    let started = Instant::now();
    let b = bar(opts.progress, ids.len() as u64, &format!("distilling {what}"));
    let d = distill(device, cloud, &ids, opts.distill_tokens, opts.distill_batch, sampling, &b)?;
    b.finish_and_clear();
    let json = serde_json::to_string(&d).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    write_atomically(&cache, |tmp| std::fs::write(tmp, &json).map_err(|e| TrainError::io(format!("cannot write {}", tmp.display()), e)))?;
    Ok((d, started.elapsed().as_secs_f64()))
}

/// Where the answers with this key are cached: named by the key alone, so a file's answers are
/// found whatever its place among `--data`. (Earlier releases also named the place,
/// `distill-train-data4-KEY.json`, and a run that listed the same files in another order answered
/// them all again; such a file is still found.)
fn distill_cache(work: &Path, key: &str) -> PathBuf {
    let named = work.join(format!("distill-{key}.json"));
    if named.exists() {
        return named;
    }
    let suffix = format!("-{key}.json");
    std::fs::read_dir(work)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("distill-") && n.ends_with(&suffix)))
        .unwrap_or(named)
}

fn teacher(
    opts: &TrainAdapterOptions,
    device: &DevicePackage,
    cloud: &CloudPackage,
    seqs: &[Vec<u32>],
    what: &str,
) -> Result<(TeacherSet, f64, String)> {
    let key = teacher_key_for(&device.manifest.fingerprint, seqs, opts.top_k, true);
    let path = device.dir.join(WORK_DIR).join(format!("teacher-{key}.safetensors"));
    if path.is_file() {
        return Ok((TeacherSet::load(&path)?, 0.0, key));
    }
    let started = Instant::now();
    let b = bar(opts.progress, seqs.len() as u64, &format!("teacher {what}"));
    let t = TeacherSet::compute(device, cloud, seqs, opts.top_k, true, &b)?;
    b.finish_and_clear();
    t.save(&path)?;
    Ok((t, started.elapsed().as_secs_f64(), key))
}

/// Where training starts.
struct Start {
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
    /// `--init-head`'s draft vocabulary and the first hex digits of its file's SHA-256.
    init: Option<(Vec<u32>, String)>,
}

/// `--init-head`'s weights and vocabulary (checked against the package like any head), or the
/// model's last layer and no vocabulary yet; grown to `--head-layers`.
fn start_tensors(opts: &TrainAdapterOptions, device: &DevicePackage) -> Result<Start> {
    let mut start = match &opts.init_head {
        None => Start { tensors: initial_tensors(device, opts.seed)?, init: None },
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| TrainError::io(format!("cannot read --init-head {}", path.display()), e))?;
            let (_, t, vocab) = read_head(&bytes, path, device, &candle_core::Device::Cpu)?;
            let tensors = t.into_iter().map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
            let digest = hex::encode(sha2::Sha256::digest(&bytes))[..12].to_string();
            Start { tensors, init: Some((vocab, digest)) }
        }
    };
    if let Some(layers) = opts.head_layers {
        grow_layers(&mut start.tensors, layers)?;
    }
    Ok(start)
}

fn head_eval(
    opts: &TrainAdapterOptions,
    head: &TrainableHead,
    device: &DevicePackage,
    cloud: &CloudPackage,
    heldout: (&TeacherSet, &[usize], &[Vec<u32>]),
    meta: &HeadMeta,
) -> Result<HeadEval> {
    let (t, prompt_lens, prompts) = heldout;
    let teacher_forced_top1 = teacher_forced_top1(head, t, prompt_lens, opts.head_loss.unroll.max(3))?;
    let runtime = head.to_runtime(device, meta.clone(), device.dir.join(DRAFT_HEAD_FILE))?;
    let fixed = evaluate_drafter(
        device,
        cloud,
        Drafter::feature(runtime, Some(0.0)).with_leaves(0, 0.0),
        prompts,
        opts.eval_tokens,
        opts.eval_draft_len,
    )?;
    Ok(HeadEval { teacher_forced_top1, fixed })
}

pub fn run_feature(opts: &TrainAdapterOptions) -> Result<HeadReport> {
    if opts.batch == 0 || opts.seq_len < 3 || opts.draft_vocab == 0 || opts.head_loss.unroll == 0 || opts.distill_samples == 0 {
        return Err(TrainError::BadInput(
            "--batch, --draft-vocab, --unroll and --distill-samples must be at least 1, --seq-len at least 3".into(),
        ));
    }
    if opts.distill_samples > 1 && !(opts.distill_temperature > 0.0 && opts.distill_temperature.is_finite()) {
        return Err(TrainError::BadInput(format!(
            "--distill-temperature must be above 0 to sample answers (got {})",
            opts.distill_temperature
        )));
    }
    let Opened { train_device, device_dir, device, cloud, work } = open_packages(opts)?;
    // Before any distilling: a bad --init-head fails at once.
    let Start { tensors: start, init } = start_tensors(opts, &device)?;

    // Prompts: each data file's, or the shipped set; the held-out prompts are never among them.
    let heldout_prompts: Vec<String> = prompt_lines(HELDOUT_PROMPTS).into_iter().take(opts.eval_prompts).collect();
    let mut files: Vec<Vec<String>> = if opts.data.is_empty() {
        vec![prompt_lines(HEAD_PROMPTS)]
    } else {
        opts.data.iter().map(|p| read_prompts(p)).collect::<Result<Vec<_>>>()?
    };
    // Every held-out prompt stays out, written or invented, not just the ones this run evaluates on.
    let never = held_out_prompts();
    let mut left = opts.self_distill.unwrap_or(usize::MAX);
    for prompts in &mut files {
        prompts.retain(|p| !never.contains(p));
        prompts.truncate(left);
        left -= prompts.len();
    }
    if files.iter().all(Vec::is_empty) {
        return Err(TrainError::BadInput("no prompts to self-distill from".into()));
    }
    let greedy = SamplingOptions::default();
    // One part per file and answer set, each with its own distillation and teacher cache, so a later
    // run with another file or more samples computes only the new parts. The greedy parts come first:
    // the alignment check reads them.
    let named: Vec<(String, &[String])> = files
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.is_empty())
        .map(|(file, p)| (if file == 0 { "train".to_string() } else { format!("train-data{}", file + 1) }, p.as_slice()))
        .collect();
    let (mut parts, mut greedy_lens, mut t1) = (Vec::new(), Vec::new(), 0.0);
    for (name, prompts) in &named {
        let (first, t) = distilled(opts, &device, &cloud, prompts, name, greedy)?;
        greedy_lens.extend(first.iter().map(|d| d.prompt_len));
        parts.push(first);
        t1 += t;
    }
    for sample in 1..opts.distill_samples {
        let sampling = SamplingOptions {
            temperature: opts.distill_temperature,
            top_p: None,
            seed: opts.seed.wrapping_mul(1_000_003).wrapping_add(sample as u64),
        };
        for (name, prompts) in &named {
            let (more, t) = distilled(opts, &device, &cloud, prompts, &format!("{name}-sample{sample}"), sampling)?;
            parts.push(more);
            t1 += t;
        }
    }
    let (held_seqs, t2) = distilled(opts, &device, &cloud, &heldout_prompts, "heldout", greedy)?;
    let part_seqs: Vec<Vec<Vec<u32>>> = parts.iter().map(|p| p.iter().map(|d| d.tokens.clone()).collect()).collect();
    let held: Vec<Vec<u32>> = held_seqs.iter().map(|d| d.tokens.clone()).collect();
    let held_lens: Vec<usize> = held_seqs.iter().map(|d| d.prompt_len).collect();
    let held_prompts: Vec<Vec<u32>> = held_seqs.iter().map(|d| d.tokens[..d.prompt_len].to_vec()).collect();

    let (vocab, init) = match init {
        Some((v, digest)) => (v, format!("-init{digest}")),
        None => (draft_vocab(&part_seqs.concat().concat(), opts.draft_vocab, device.config.vocab_size, &device.eos_ids()), String::new()),
    };
    let in_vocab: std::collections::HashSet<u32> = vocab.iter().copied().collect();
    let held_answers: Vec<u32> = held_seqs.iter().flat_map(|d| d.tokens[d.prompt_len..].iter().copied()).collect();
    let coverage = held_answers.iter().filter(|t| in_vocab.contains(t)).count() as f64 / held_answers.len().max(1) as f64;

    let (mut sets, mut keys, mut t3) = (Vec::new(), Vec::new(), 0.0);
    for (i, seqs) in part_seqs.iter().enumerate() {
        let (set, t, key) = teacher(opts, &device, &cloud, seqs, &format!("train {}/{}", i + 1, part_seqs.len()))?;
        sets.push(set);
        keys.push(key);
        t3 += t;
    }
    let train_teacher = TeacherSet::concat(sets)?;
    let key = match keys.as_slice() {
        [one] => one.clone(),
        many => hex::encode(sha2::Sha256::digest(many.join("+").as_bytes()))[..16].to_string(),
    };
    let (held_teacher, t4, _) = teacher(opts, &device, &cloud, &held, "heldout")?;
    // Only greedy answers (the first of each prompt's) must follow the teacher's top token.
    let aligned = alignment(&train_teacher, &greedy_lens)?;

    let config = train_config(opts, train_teacher.num_positions());
    let steps = config.steps;
    let meta_for = |threshold: f32| HeadMeta {
        version: HEAD_FORMAT_VERSION,
        fingerprint: device.manifest.weights_fingerprint().to_string(),
        split: split_label(&device),
        source: device.manifest.source.clone(),
        threshold,
        made_by: opts.made_by.clone(),
    };
    let checkpoint = Checkpoint { dir: work.join("feature") };
    // One-layer heads keep the key they had before `--head-layers`.
    let layers = hat_runtime::draft_head::head_layer_count(start.keys());
    let ckpt_key = format!("{key}-v{}{init}{}", vocab.len(), if layers > 1 { format!("-L{layers}") } else { String::new() });
    let (head, mut opt, mut meta) = if opts.resume {
        if !checkpoint.exists() {
            return Err(TrainError::BadInput(format!(
                "nothing to resume: no checkpoint in {}; run without --resume",
                checkpoint.dir.display()
            )));
        }
        let meta = checkpoint.load_meta()?;
        if meta.teacher_key != ckpt_key {
            return Err(TrainError::Checkpoint(format!(
                "the checkpoint in {} was made with other data, --draft-vocab or --head-layers; run without --resume to start over",
                checkpoint.dir.display()
            )));
        }
        let tensors = checkpoint.load_tensors()?;
        let weights = crate::train::weights_only(&tensors);
        let head = TrainableHead::new(weights, vocab, &device, &train_device)?;
        let mut opt = AdamW::new(head.vars(), config.optimizer)?;
        opt.restore(&tensors, meta.step)?;
        let meta = CheckpointMeta { config: TrainConfig { steps, ..meta.config.clone() }, ..meta };
        (head, opt, meta)
    } else {
        let head = TrainableHead::new(start.clone(), vocab, &device, &train_device)?;
        let opt = AdamW::new(head.vars(), config.optimizer)?;
        let meta = CheckpointMeta {
            step: 0,
            config: config.clone(),
            teacher_key: ckpt_key,
            adapter_layers: layers,
            losses: Vec::new(),
            train_tokens: 0,
            train_seconds: 0.0,
            before: None,
        };
        (head, opt, meta)
    };
    let heldout = (&held_teacher, held_lens.as_slice(), held_prompts.as_slice());
    // The starting head is measured afresh each time (the checkpoint keeps only the adapter's numbers).
    let before = if opts.resume {
        let fresh = TrainableHead::new(start, head.vocab.clone(), &device, &train_device)?;
        head_eval(opts, &fresh, &device, &cloud, heldout, &meta_for(0.0))?
    } else {
        head_eval(opts, &head, &device, &cloud, heldout, &meta_for(0.0))?
    };
    meta.before.get_or_insert(before.fixed);

    let b = bar(opts.progress, steps as u64, "training");
    let student = HeadStudent { head: &head, teacher: &train_teacher, loss: opts.head_loss };
    let meta = crate::train::train(&student, &mut opt, meta, &checkpoint, interrupt_flag(), opts.stop_after, &b)?;
    b.finish_and_clear();

    // Measured as it is saved: the weights rounded to the file's f16, as the starting head was read
    // from its file. (Until stage 8 the report measured the f32 weights, which the shipped file
    // does not hold: stage 8's 1.679 was 1.642 from its file.)
    let rounded =
        head.weights()?.into_iter().map(|(k, v)| Ok((k, v.to_dtype(DType::F16)?.to_dtype(DType::F32)?))).collect::<Result<_>>()?;
    let saved = TrainableHead::new(rounded, head.vocab.clone(), &device, &train_device)?;
    let after = head_eval(opts, &saved, &device, &cloud, heldout, &meta_for(0.0))?;
    let mut adaptive = Vec::new();
    for &threshold in &opts.thresholds {
        let runtime = saved.to_runtime(&device, meta_for(threshold), device_dir.join(DRAFT_HEAD_FILE))?;
        let result = evaluate_drafter(
            &device,
            &cloud,
            Drafter::feature(runtime, None).with_leaves(0, 0.0),
            &held_prompts,
            opts.eval_tokens,
            opts.eval_draft_len,
        )?;
        adaptive.push(ThresholdEval { threshold, drafts_per_round: result.drafted as f64 / result.rounds.max(1) as f64, result });
    }

    let path = device_dir.join(DRAFT_HEAD_FILE);
    let head_meta = meta_for(opts.threshold);
    save_head(&head.file_tensors(DType::F16)?, &head_meta, &path)?;
    let report = HeadReport {
        head: path,
        device: format!("{train_device:?}"),
        made_by: opts.made_by.clone(),
        draft_vocab: head.vocab.len(),
        head_layers: head.layers(),
        heldout_vocab_coverage: coverage,
        sequences: train_teacher.num_sequences(),
        answers_per_prompt: opts.distill_samples,
        distill_temperature: if opts.distill_samples > 1 { opts.distill_temperature } else { 0.0 },
        init_head: opts.init_head.clone(),
        teacher_positions: train_teacher.num_positions(),
        heldout_sequences: held_teacher.num_sequences(),
        alignment: aligned,
        distill_seconds: t1 + t2,
        teacher_seconds: t3 + t4,
        steps: meta.step,
        train_tokens: meta.train_tokens,
        train_seconds: meta.train_seconds,
        train_tokens_per_s: meta.train_tokens as f64 / meta.train_seconds.max(1e-9),
        loss_curve: meta.losses.iter().map(|l| l.total).collect(),
        top1_curve: meta.losses.iter().map(|l| l.top1).collect(),
        before,
        after,
        adaptive,
        threshold: opts.threshold,
        config: meta.config.clone(),
        loss: opts.head_loss,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    write_atomically(&device_dir.join(HEAD_REPORT_FILE), |tmp| {
        std::fs::write(tmp, &json).map_err(|e| TrainError::io(format!("cannot write {}", tmp.display()), e))
    })?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::distill_cache;

    /// A file's cached answers are found by their key, wherever the file stood among `--data`,
    /// and under the older name that also held its place.
    #[test]
    fn distilled_answers_are_found_by_their_key_alone() {
        let dir = tempfile::tempdir().expect("tmp");
        let work = dir.path();
        assert_eq!(distill_cache(work, "0f66a68ad49e29e1"), work.join("distill-0f66a68ad49e29e1.json"));
        std::fs::write(work.join("distill-train-data6-0f66a68ad49e29e1.json"), "[]").expect("write");
        std::fs::write(work.join("distill-train-data2-1d39df070a500d5f.json"), "[]").expect("write");
        assert_eq!(distill_cache(work, "0f66a68ad49e29e1"), work.join("distill-train-data6-0f66a68ad49e29e1.json"));
        std::fs::write(work.join("distill-1d39df070a500d5f.json"), "[]").expect("write");
        assert_eq!(distill_cache(work, "1d39df070a500d5f"), work.join("distill-1d39df070a500d5f.json"));
        assert_eq!(distill_cache(work, "ffffffffffffffff"), work.join("distill-ffffffffffffffff.json"));
    }
}
