//! `hat audit`: plays the curious cloud operator. It computes the hidden states a split at each depth
//! would upload, fits the attacks of [`crate::inversion`] on public text, and measures how many
//! held-out tokens they read back, next to what that depth costs the device per token.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use hat_model::manifest::{sha256_file, Manifest, SplitSpec};
use hat_model::{KvCache, Submodel};
use hat_runtime::package::{CLOUD_DIR, DEVICE_DIR};
use hat_runtime::{CloudPackage, DevicePackage};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::{prompt_lines, HELDOUT_PROMPTS, SHIPPED_PROMPTS};
use crate::error::{Result, TrainError};
use crate::inversion::{self, MlpConfig, Recovery, Standardizer};

pub const AUDIT_FILE: &str = "audit.json";
pub const AUDIT_FORMAT: &str = "hat-audit";
/// Recovery still grows past this on the default model (4000 -> 8000 -> 11800 fit tokens: 92 -> 96 ->
/// 97% top-1 at depth 8), so the audit's numbers are lower bounds; at 8000 a depth's attacks take about
/// 15 s on two cores.
pub const DEFAULT_FIT_TOKENS: usize = 8000;
/// Public text the attacks are fitted on by default: the project's own prompts, in the binary.
const FIT_TEXTS: [(&str, &str); 2] = [
    ("adapter-trainer/prompts/draft-head.txt", include_str!("../prompts/draft-head.txt")),
    ("adapter-trainer/prompts/self-distill.txt", SHIPPED_PROMPTS),
];
const HELDOUT_NAME: &str = "adapter-trainer/prompts/heldout.txt";
/// Ridge penalties, as multiples of the fitting rows (a standardised Gram matrix has about n on its
/// diagonal).
const RIDGE_LAMBDAS: [f64; 6] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1];
/// Every tenth fit line is the validation slice that picks the ridge penalty.
const VALIDATION_EVERY: usize = 10;
/// The decode step timed per depth: one new token after this many cached positions.
const TIMING_CONTEXT: usize = 64;
const TIMING_REPS: usize = 15;

#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// The directory `hat split --out` wrote.
    pub artifacts: PathBuf,
    /// Layers run before the states are read; `None`: powers of two and the split's own depth.
    pub depths: Option<Vec<usize>>,
    /// Fit text, one sequence per line (`None`: the shipped prompts).
    pub fit_text: Option<PathBuf>,
    /// Held-out text, one sequence per line (`None`: the shipped held-out prompts).
    pub heldout_text: Option<PathBuf>,
    pub fit_tokens: usize,
    pub mlp: MlpConfig,
    /// Mitigation experiment: Gaussian noise of these multiples of each dimension's standard deviation
    /// added to the states at the split's depth.
    pub noise: Vec<f64>,
    pub progress: bool,
    /// Write DIR/audit.json and the cached copy.
    pub save: bool,
    /// Where the cached copy goes (see [`cache_dir`]); `None`: nowhere.
    pub cache_dir: Option<PathBuf>,
}

impl AuditOptions {
    pub fn new(artifacts: impl Into<PathBuf>) -> Self {
        Self {
            artifacts: artifacts.into(),
            depths: None,
            fit_text: None,
            heldout_text: None,
            fit_tokens: DEFAULT_FIT_TOKENS,
            mlp: MlpConfig::default(),
            noise: Vec::new(),
            progress: true,
            save: true,
            cache_dir: cache_dir(),
        }
    }
}

/// Where a set of sequences came from and how many tokens were scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextSet {
    pub source: String,
    pub lines: usize,
    /// Tokens used (special tokens such as BOS excluded).
    pub tokens: usize,
}

/// Every attack at one depth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepthAudit {
    /// Decoder layers run before the states are read (a split's `--input-layers`).
    pub depth: usize,
    /// Cosine of the raw state with each embedding row; nothing learned.
    pub nearest: Recovery,
    /// Ridge regression from standardised states to the token's embedding.
    pub linear: Recovery,
    /// The ridge penalty chosen on the validation slice, as a multiple of the fitting rows.
    pub linear_lambda: f64,
    pub mlp: Recovery,
    /// The best of the attacks, per measure.
    pub best: Recovery,
    /// The attack with the best top-1.
    pub best_attack: String,
    /// Median time of one decode step (one new token, a cache of `timing_context` positions) through
    /// the embedding and these layers, on this machine.
    pub device_ms_per_token: f64,
    /// Time spent fitting and scoring this depth's attacks.
    pub attack_seconds: f64,
}

/// The mitigation experiment at one noise level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseAudit {
    pub depth: usize,
    /// Noise standard deviation, as a multiple of each dimension's standard deviation on the fit set.
    pub noise_std: f64,
    /// Attacks fitted on noisy fit states (the operator knows the mechanism) and scored on noisy
    /// held-out states.
    pub linear: Recovery,
    pub mlp: Recovery,
    pub best_top1: f64,
    /// Share of held-out positions whose greedy next token changes when the uploaded states are noisy.
    pub greedy_changed: f64,
    pub positions: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditReport {
    pub format: String,
    /// Identifies the stored weights whatever the split (see [`model_key`]); the cache is keyed by it.
    pub model_key: String,
    pub fingerprint: String,
    pub weights_fingerprint: String,
    pub source: String,
    pub split: SplitSpec,
    pub storage: String,
    pub fit: TextSet,
    /// Fit tokens held back to choose the ridge penalty (then refitted on all).
    pub validation_tokens: usize,
    pub heldout: TextSet,
    /// Fit lines dropped because the held-out text has them too.
    pub fit_lines_dropped_as_heldout: usize,
    /// Sanity row: the nearest-embedding attack on the embeddings themselves (depth 0).
    pub embedding_nearest: Recovery,
    pub depths: Vec<DepthAudit>,
    pub mlp_config: MlpConfig,
    pub ridge_lambdas: Vec<f64>,
    pub timing_context: usize,
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub noise: Vec<NoiseAudit>,
}

impl AuditReport {
    pub fn depth(&self, depth: usize) -> Option<&DepthAudit> {
        self.depths.iter().find(|d| d.depth == depth)
    }
}

/// The default depths: 1, 2, 4, 8, ... and the split's own, up to the deepest a split can upload.
pub fn default_depths(split: &SplitSpec) -> Vec<usize> {
    let max = max_depth(split);
    let mut d: Vec<usize> = std::iter::successors(Some(1usize), |d| Some(d * 2)).take_while(|d| *d <= max).collect();
    d.push(split.input_layers.min(max));
    d.sort_unstable();
    d.dedup();
    d
}

/// The deepest states a split can send: after every layer but the output submodel's.
fn max_depth(split: &SplitSpec) -> usize {
    split.num_layers - split.output_layers
}

fn check_depths(depths: &[usize], split: &SplitSpec) -> Result<Vec<usize>> {
    let max = max_depth(split);
    if depths.is_empty() {
        return Err(TrainError::BadInput("--input-layers is empty: give depths such as 1,2,4".into()));
    }
    for &d in depths {
        if d == 0 {
            return Err(TrainError::BadInput(format!(
                "--input-layers 0 is not a split (the device always runs at least one layer); choose depths in 1..={max}"
            )));
        }
        if d > max {
            return Err(TrainError::BadInput(format!(
                "--input-layers {d} is beyond this model: it has {} layers and a split keeps at least its last {} on the \
                 device (this package's output submodel), so depths go up to {max}",
                split.num_layers, split.output_layers
            )));
        }
    }
    let mut d = depths.to_vec();
    d.sort_unstable();
    d.dedup();
    Ok(d)
}

/// Non-empty lines of a text file, or one line of error that names it.
fn read_lines(path: &Path, what: &str) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| TrainError::BadInput(format!("cannot read the {what} text {}: {e}", path.display())))?;
    let lines = prompt_lines(&text);
    if lines.is_empty() {
        return Err(TrainError::BadData { path: path.to_path_buf(), reason: format!("the {what} text has no non-empty line") });
    }
    Ok(lines)
}

/// One sequence: its ids and which positions are scored (not special tokens).
struct Encoded {
    ids: Vec<u32>,
    scored: Vec<bool>,
}

impl Encoded {
    fn targets(&self) -> Vec<u32> {
        self.ids.iter().zip(&self.scored).filter(|(_, s)| **s).map(|(t, _)| *t).collect()
    }
}

fn encode(device: &DevicePackage, line: &str, specials: &HashSet<u32>) -> Result<Encoded> {
    let enc = device.tokenizer.encode(line, true).map_err(|e| TrainError::BadInput(format!("cannot tokenize `{line}`: {e}")))?;
    let context = device.config.max_position_embeddings;
    let ids: Vec<u32> = enc.get_ids().iter().take(context).copied().collect();
    let mask = enc.get_special_tokens_mask();
    let scored = ids.iter().enumerate().map(|(i, t)| mask.get(i).is_none_or(|m| *m == 0) && !specials.contains(t)).collect();
    Ok(Encoded { ids, scored })
}

/// The texts of an audit, encoded: fit lines until `fit_tokens` tokens, and every held-out line.
struct Texts {
    fit: Vec<Encoded>,
    fit_info: TextSet,
    heldout: Vec<Encoded>,
    heldout_info: TextSet,
    dropped: usize,
}

fn texts(device: &DevicePackage, opts: &AuditOptions) -> Result<Texts> {
    let specials: HashSet<u32> = device.tokenizer.get_added_tokens_decoder().iter().filter(|(_, t)| t.special).map(|(id, _)| *id).collect();
    let (heldout_lines, heldout_source) = match &opts.heldout_text {
        Some(p) => (read_lines(p, "held-out")?, p.display().to_string()),
        None => (prompt_lines(HELDOUT_PROMPTS), HELDOUT_NAME.to_string()),
    };
    let (fit_lines, fit_source) = match &opts.fit_text {
        Some(p) => (read_lines(p, "fit")?, p.display().to_string()),
        None => (FIT_TEXTS.iter().flat_map(|(_, t)| prompt_lines(t)).collect(), FIT_TEXTS.map(|(n, _)| n).join(" + ")),
    };
    // A held-out line seen in fitting would measure memory, not inversion.
    let held: HashSet<&str> = heldout_lines.iter().map(String::as_str).collect();
    let before = fit_lines.len();
    let fit_lines: Vec<&String> = fit_lines.iter().filter(|l| !held.contains(l.as_str())).collect();
    let dropped = before - fit_lines.len();

    let mut fit = Vec::new();
    let mut fit_tokens = 0;
    for line in fit_lines {
        if fit_tokens >= opts.fit_tokens {
            break;
        }
        let e = encode(device, line, &specials)?;
        fit_tokens += e.scored.iter().filter(|s| **s).count();
        fit.push(e);
    }
    if fit_tokens < opts.fit_tokens {
        return Err(TrainError::BadInput(format!(
            "the fit text ({fit_source}) has {fit_tokens} tokens, the audit needs {} (--fit-tokens): give a longer --text \
             or a smaller --fit-tokens",
            opts.fit_tokens
        )));
    }
    let heldout = heldout_lines.iter().map(|l| encode(device, l, &specials)).collect::<Result<Vec<_>>>()?;
    let heldout_tokens = heldout.iter().map(|e| e.scored.iter().filter(|s| **s).count()).sum();
    if heldout_tokens == 0 {
        return Err(TrainError::BadInput(format!("the held-out text ({heldout_source}) has no token to score")));
    }
    Ok(Texts {
        fit_info: TextSet { source: fit_source, lines: fit.len(), tokens: fit_tokens },
        heldout_info: TextSet { source: heldout_source, lines: heldout.len(), tokens: heldout_tokens },
        fit,
        heldout,
        dropped,
    })
}

/// The first layers of the model as single-layer slices of the input and middle submodels, each with
/// its own cache, so states after any depth come out of one pass.
struct LayerStack<'a> {
    input: &'a Submodel,
    layers: Vec<Submodel>,
    caches: Vec<KvCache>,
}

impl<'a> LayerStack<'a> {
    fn new(device: &'a DevicePackage, cloud: &CloudPackage, depth: usize) -> Result<Self> {
        let mut layers = Vec::with_capacity(depth);
        for i in 0..depth {
            let from = if device.input.layer_range().contains(&i) { &device.input } else { &cloud.middle };
            layers.push(from.layer_slice(i..i + 1)?);
        }
        let caches = layers.iter().map(Submodel::new_cache).collect();
        Ok(Self { input: &device.input, layers, caches })
    }

    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(self.input.embed(&Tensor::new(ids, self.input.device())?.unsqueeze(0)?)?)
    }

    /// States of new positions `pos..` after each of `depths` (ascending), from the embeddings `h`.
    ///
    /// # Shapes
    /// h: (1, seq, hidden) -> one (seq, hidden) per depth
    fn run(&mut self, mut h: Tensor, pos: usize, depths: &[usize]) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(depths.len());
        let last = depths.last().copied().unwrap_or(0);
        if depths.first() == Some(&0) {
            out.push(h.squeeze(0)?);
        }
        for (i, (layer, cache)) in self.layers.iter().zip(self.caches.iter_mut()).enumerate().take(last) {
            h = layer.forward_layers(&h, pos, cache)?;
            if depths.contains(&(i + 1)) {
                out.push(h.squeeze(0)?);
            }
        }
        Ok(out)
    }

    /// Median milliseconds of one decode step (the last id of `ids`) through the embedding and the
    /// first `depth` layers, with the ids before it cached.
    fn decode_ms(&mut self, ids: &[u32], depth: usize) -> Result<f64> {
        let (token, prefix) = ids.split_last().ok_or_else(|| TrainError::BadInput("no ids to time a decode step with".into()))?;
        self.run(self.embed(prefix)?, 0, &[depth])?;
        let mut times = Vec::with_capacity(TIMING_REPS);
        for rep in 0..TIMING_REPS + 2 {
            let start = Instant::now();
            // forward_layers rolls each cache back to `prefix.len()` first, so every rep is the same step.
            self.run(self.embed(&[*token])?, prefix.len(), &[depth])?;
            if rep >= 2 {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }
}

/// The scored positions' states of every sequence, per depth, stacked.
///
/// # Shapes
/// -> one (tokens, hidden) per depth
fn collect_states(stack: &mut LayerStack, seqs: &[Encoded], depths: &[usize], bar: &indicatif::ProgressBar) -> Result<Vec<Tensor>> {
    let mut per_depth: Vec<Vec<Tensor>> = vec![Vec::new(); depths.len()];
    for seq in seqs {
        let rows: Vec<u32> = (0..seq.ids.len() as u32).filter(|&i| seq.scored[i as usize]).collect();
        if !rows.is_empty() {
            let rows = Tensor::new(rows.as_slice(), stack.input.device())?;
            for (all, states) in per_depth.iter_mut().zip(stack.run(stack.embed(&seq.ids)?, 0, depths)?) {
                all.push(states.index_select(&rows, 0)?);
            }
        }
        bar.inc(1);
    }
    per_depth.into_iter().map(|t| Ok(Tensor::cat(&t, 0)?.to_dtype(DType::F32)?)).collect()
}

/// The learned attacks on (possibly noisy) states of one depth: (linear, its lambda, mlp).
struct Learned {
    linear: Recovery,
    lambda: f64,
    mlp: Recovery,
}

struct Scoring<'a> {
    embedding: &'a Tensor,
    vocab_unit: &'a Tensor,
    fit_targets: &'a [u32],
    validation: &'a [bool],
    heldout_targets: &'a [u32],
    mlp: MlpConfig,
}

impl Scoring<'_> {
    fn learned(&self, fit: &Tensor, heldout: &Tensor) -> Result<Learned> {
        let s = Standardizer::fit(fit)?;
        let (x, xh) = (s.apply(fit)?, s.apply(heldout)?);
        let ridge = inversion::fit_ridge(&x, self.fit_targets, self.validation, self.embedding, &RIDGE_LAMBDAS)?;
        let linear = Recovery::from_ranks(&inversion::target_ranks(&ridge.predict(&xh)?, self.vocab_unit, self.heldout_targets)?);
        let mlp = inversion::train_mlp(&x, self.fit_targets, self.embedding, &self.mlp, &ridge)?;
        let mlp = Recovery::from_ranks(&inversion::target_ranks(&mlp.predict(&xh)?, self.vocab_unit, self.heldout_targets)?);
        Ok(Learned { linear, lambda: ridge.lambda, mlp })
    }
}

fn progress_bar(enabled: bool, len: usize, what: &str) -> indicatif::ProgressBar {
    crate::bar(enabled, len as u64, what)
}

/// Runs the audit and, unless `opts.save` is off, writes DIR/audit.json and the cached copy that
/// `hat split` reads.
pub fn run(opts: &AuditOptions) -> Result<AuditReport> {
    let start = Instant::now();
    let cpu = Device::Cpu;
    let device_dir = opts.artifacts.join(DEVICE_DIR);
    let cloud_dir = opts.artifacts.join(CLOUD_DIR);
    if !device_dir.is_dir() {
        return Err(TrainError::BadInput(format!(
            "{} is missing: give --artifacts the directory `hat split --out` wrote",
            device_dir.display()
        )));
    }
    if !cloud_dir.is_dir() {
        return Err(TrainError::BadInput(format!(
            "{} is missing: the audit needs the cloud package's middle layers to compute the states that splits deeper \
             than the device's input layers upload; give --artifacts the whole `hat split --out` directory",
            cloud_dir.display()
        )));
    }
    let device = DevicePackage::open(&device_dir, &cpu)?;
    let cloud = CloudPackage::open(&cloud_dir, &cpu)?;
    device.check_pair(&cloud.manifest, &cloud.dir)?;
    let split = device.manifest.split;
    let depths = check_depths(opts.depths.as_deref().unwrap_or(&default_depths(&split)), &split)?;
    if opts.fit_tokens < 2 * device.config.hidden_size {
        return Err(TrainError::BadInput(format!(
            "--fit-tokens {} is too few to fit a map from {}-wide states: use at least {}",
            opts.fit_tokens,
            device.config.hidden_size,
            2 * device.config.hidden_size
        )));
    }
    let texts = texts(&device, opts)?;

    // States at the requested depths, plus the embeddings (the sanity row) and the split's own depth
    // when the noise experiment needs it.
    let mut wanted = depths.clone();
    wanted.push(0);
    if !opts.noise.is_empty() {
        wanted.push(split.input_layers);
    }
    wanted.sort_unstable();
    wanted.dedup();
    let deepest = wanted.last().copied().unwrap_or(0);
    let mut stack = LayerStack::new(&device, &cloud, deepest)?;
    let bar = progress_bar(opts.progress, texts.fit.len() + texts.heldout.len(), "hidden states");
    let fit_states = collect_states(&mut stack, &texts.fit, &wanted, &bar)?;
    let heldout_states = collect_states(&mut stack, &texts.heldout, &wanted, &bar)?;
    bar.finish_and_clear();
    let at = |states: &[Tensor], depth: usize| -> Result<Tensor> {
        let i = wanted.iter().position(|d| *d == depth).ok_or_else(|| TrainError::BadInput(format!("no states at depth {depth}")))?;
        Ok(states[i].clone())
    };

    let embedding = device.input.embedding_weight()?.to_dtype(DType::F32)?;
    let vocab_unit = inversion::unit_rows(&embedding)?;
    let fit_targets: Vec<u32> = texts.fit.iter().flat_map(Encoded::targets).collect();
    let heldout_targets: Vec<u32> = texts.heldout.iter().flat_map(Encoded::targets).collect();
    let validation: Vec<bool> =
        texts.fit.iter().enumerate().flat_map(|(i, e)| vec![i % VALIDATION_EVERY == VALIDATION_EVERY - 1; e.targets().len()]).collect();
    let scoring = Scoring {
        embedding: &embedding,
        vocab_unit: &vocab_unit,
        fit_targets: &fit_targets,
        validation: &validation,
        heldout_targets: &heldout_targets,
        mlp: opts.mlp,
    };
    let nearest = |states: &Tensor| -> Result<Recovery> {
        Ok(Recovery::from_ranks(&inversion::target_ranks(states, &vocab_unit, &heldout_targets)?))
    };
    let embedding_nearest = nearest(&at(&heldout_states, 0)?)?;

    // The timed step: the fit text's ids run together, TIMING_CONTEXT of them cached, then one more.
    let timing_ids: Vec<u32> = texts.fit.iter().flat_map(|e| e.ids.iter().copied()).take(TIMING_CONTEXT + 1).collect();
    let bar = progress_bar(opts.progress, depths.len(), "attacks");
    let mut rows = Vec::with_capacity(depths.len());
    for &depth in &depths {
        bar.set_message(format!("depth {depth}"));
        let started = Instant::now();
        let (fit, held) = (at(&fit_states, depth)?, at(&heldout_states, depth)?);
        let near = nearest(&held)?;
        let learned = scoring.learned(&fit, &held)?;
        let attacks = [("nearest", near), ("linear", learned.linear), ("mlp", learned.mlp)];
        let best_attack = attacks.iter().fold(attacks[0], |b, a| if a.1.top1 > b.1.top1 { *a } else { b }).0.to_string();
        let best = Recovery {
            top1: attacks.iter().map(|a| a.1.top1).fold(0.0, f64::max),
            top10: attacks.iter().map(|a| a.1.top10).fold(0.0, f64::max),
        };
        let attack_seconds = started.elapsed().as_secs_f64();
        let device_ms_per_token = stack.decode_ms(&timing_ids, depth)?;
        rows.push(DepthAudit {
            depth,
            nearest: near,
            linear: learned.linear,
            linear_lambda: learned.lambda,
            mlp: learned.mlp,
            best,
            best_attack,
            device_ms_per_token,
            attack_seconds,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();

    let noise = if opts.noise.is_empty() {
        Vec::new()
    } else {
        let depth = split.input_layers;
        let (fit, held) = (at(&fit_states, depth)?, at(&heldout_states, depth)?);
        noise_experiment(&device, &cloud, &texts.heldout, (&fit, &held), &scoring, &opts.noise, opts.progress)?
    };

    let report = AuditReport {
        format: AUDIT_FORMAT.to_string(),
        model_key: model_key(&opts.artifacts)?,
        fingerprint: device.manifest.fingerprint.clone(),
        weights_fingerprint: device.manifest.weights_fingerprint().to_string(),
        source: device.manifest.source.clone(),
        split,
        storage: format!(
            "device {}, cloud {}",
            device.manifest.quant.as_deref().unwrap_or(&device.manifest.dtype),
            cloud.manifest.quant.as_deref().unwrap_or(&cloud.manifest.dtype)
        ),
        validation_tokens: validation.iter().filter(|v| **v).count(),
        fit: texts.fit_info,
        heldout: texts.heldout_info,
        fit_lines_dropped_as_heldout: texts.dropped,
        embedding_nearest,
        depths: rows,
        mlp_config: opts.mlp,
        ridge_lambdas: RIDGE_LAMBDAS.to_vec(),
        timing_context: timing_ids.len().saturating_sub(1),
        seconds: start.elapsed().as_secs_f64(),
        noise,
    };
    if opts.save {
        save(&report, &opts.artifacts, opts.cache_dir.as_deref())?;
    }
    Ok(report)
}

/// Noise on the uploaded states at the split's depth: what the best attacks still recover, and how
/// often the model's greedy next token changes (the price: noise is not lossless).
fn noise_experiment(
    device: &DevicePackage,
    cloud: &CloudPackage,
    heldout: &[Encoded],
    (fit, held): (&Tensor, &Tensor),
    scoring: &Scoring,
    scales: &[f64],
    progress: bool,
) -> Result<Vec<NoiseAudit>> {
    let depth = device.manifest.split.input_layers;
    let std = Standardizer::fit(fit)?.std()?;
    let (mut middle_cache, mut output_cache) = (cloud.middle.new_cache(), device.output.new_cache());
    let mut greedy = |states: &Tensor| -> Result<Vec<u32>> {
        let h = cloud.middle.forward_layers(&states.unsqueeze(0)?, 0, &mut middle_cache)?;
        let h = device.output.forward_layers(&h, 0, &mut output_cache)?;
        inversion::argmax_rows(&device.output.head(&h)?.squeeze(0)?)
    };
    let mut input_cache = device.input.new_cache();
    let uploads = heldout
        .iter()
        .map(|e| {
            let h = device.input.embed(&Tensor::new(e.ids.as_slice(), device.input.device())?.unsqueeze(0)?)?;
            Ok(device.input.forward_layers(&h, 0, &mut input_cache)?.squeeze(0)?)
        })
        .collect::<Result<Vec<Tensor>>>()?;
    let clean = uploads.iter().map(&mut greedy).collect::<Result<Vec<_>>>()?;
    let positions: usize = clean.iter().map(Vec::len).sum();
    let bar = progress_bar(progress, scales.len(), "noise");
    let mut out = Vec::with_capacity(scales.len());
    for (k, &scale) in scales.iter().enumerate() {
        let seed = 1000 * k as u64;
        let learned =
            scoring.learned(&inversion::add_noise(fit, &std, scale, seed)?, &inversion::add_noise(held, &std, scale, seed + 1)?)?;
        let mut changed = 0;
        for (i, (states, clean)) in uploads.iter().zip(&clean).enumerate() {
            let noisy = greedy(&inversion::add_noise(states, &std, scale, seed + 2 + i as u64)?)?;
            changed += noisy.iter().zip(clean).filter(|(a, b)| a != b).count();
        }
        out.push(NoiseAudit {
            depth,
            noise_std: scale,
            linear: learned.linear,
            mlp: learned.mlp,
            best_top1: learned.linear.top1.max(learned.mlp.top1),
            greedy_changed: changed as f64 / positions.max(1) as f64,
            positions,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// Identifies the weights an audit measured, whatever the split: sha256 over the config, the
/// tokenizer and every tensor of the input, middle and output shards as stored (name, type, shape,
/// bytes), in name order. The packages' fingerprints cover the cut points too, so a split of the
/// same model at another depth would not find the audit through them.
pub fn model_key(artifacts: &Path) -> Result<String> {
    let device_dir = artifacts.join(DEVICE_DIR);
    let cloud_dir = artifacts.join(CLOUD_DIR);
    let device = Manifest::read(&device_dir)?;
    let cloud = Manifest::read(&cloud_dir)?;
    let mut tensors = BTreeMap::new();
    for (dir, manifest, stem) in [(&device_dir, &device, "input"), (&cloud_dir, &cloud, "middle"), (&device_dir, &device, "output")] {
        let shard = manifest.shard(stem).ok_or_else(|| {
            TrainError::BadInput(format!("{} lists no {stem} shard", dir.join(hat_model::manifest::MANIFEST_FILE).display()))
        })?;
        tensor_digests(&dir.join(&shard.file), &mut tensors)?;
    }
    let mut h = Sha256::new();
    h.update(serde_json::to_string(&device.config).map_err(|e| TrainError::BadInput(e.to_string()))?.as_bytes());
    if let Some(t) = &device.tokenizer {
        h.update(sha256_file(&device_dir.join(&t.file))?.as_bytes());
    }
    for (name, digest) in &tensors {
        h.update(name.as_bytes());
        h.update(digest);
    }
    Ok(hex::encode(h.finalize()))
}

/// sha256 of each tensor of a shard (type, shape and stored bytes), by name.
fn tensor_digests(path: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
    let io = |e| TrainError::io(format!("cannot read {}", path.display()), e);
    if path.extension().is_some_and(|e| e == "gguf") {
        let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
        let content = gguf_file::Content::read(&mut file).map_err(|e| TrainError::BadInput(format!("{}: {e}", path.display())))?;
        for (name, info) in &content.tensor_infos {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            let mut data = vec![0u8; bytes];
            file.seek(SeekFrom::Start(content.tensor_data_offset + info.offset)).map_err(io)?;
            file.read_exact(&mut data).map_err(io)?;
            let mut h = Sha256::new();
            h.update(format!("{:?} {:?}", info.ggml_dtype, info.shape.dims()).as_bytes());
            h.update(&data);
            out.insert(name.clone(), h.finalize().to_vec());
        }
    } else {
        for (name, t) in candle_core::safetensors::load(path, &Device::Cpu)? {
            let mut h = Sha256::new();
            h.update(format!("{:?} {:?}", t.dtype(), t.dims()).as_bytes());
            for v in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
                h.update(v.to_le_bytes());
            }
            out.insert(name, h.finalize().to_vec());
        }
    }
    Ok(())
}

/// hat's cache directory: `$HAT_CACHE_DIR`, else `${XDG_CACHE_HOME:-~/.cache}/hat` (as
/// `scripts/fetch-default-model.sh` finds it).
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(|k| std::env::var_os(k))
}

fn cache_dir_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Option<PathBuf> {
    let env = |k: &str| var(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("HAT_CACHE_DIR").or_else(|| env("XDG_CACHE_HOME").or_else(|| env("HOME").map(|h| h.join(".cache"))).map(|c| c.join("hat")))
}

/// Where the audit of the weights with this key is cached, under hat's cache directory `cache`.
pub fn cached_audit_path(cache: &Path, key: &str) -> PathBuf {
    cache.join("audits").join(format!("{key}.json"))
}

/// Writes DIR/audit.json and the copy in `cache`; returns the paths written.
pub fn save(report: &AuditReport, artifacts: &Path, cache: Option<&Path>) -> Result<Vec<PathBuf>> {
    let json = serde_json::to_string_pretty(report).map_err(|e| TrainError::BadInput(e.to_string()))? + "\n";
    let mut paths = vec![artifacts.join(AUDIT_FILE)];
    paths.extend(cache.map(|c| cached_audit_path(c, &report.model_key)));
    for path in &paths {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| TrainError::io(format!("cannot create {}", dir.display()), e))?;
        }
        crate::write_atomically(path, |tmp| {
            std::fs::write(tmp, &json).map_err(|e| TrainError::io(format!("cannot write {}", tmp.display()), e))
        })?;
    }
    Ok(paths)
}

/// The audit of the weights in `artifacts` cached in `cache`, if one was made (by any split of them).
pub fn cached_audit(artifacts: &Path, cache: &Path) -> Result<Option<AuditReport>> {
    let path = cached_audit_path(cache, &model_key(artifacts)?);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    Ok(serde_json::from_str::<AuditReport>(&text).ok().filter(|r| r.format == AUDIT_FORMAT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(n: usize, i: usize, o: usize) -> SplitSpec {
        SplitSpec::new(n, i, o).expect("split")
    }

    #[test]
    fn default_depths_are_powers_of_two_and_the_split_up_to_the_last_uploadable_layer() {
        assert_eq!(default_depths(&split(30, 2, 2)), vec![1, 2, 4, 8, 16]);
        assert_eq!(default_depths(&split(30, 3, 2)), vec![1, 2, 3, 4, 8, 16]);
        assert_eq!(default_depths(&split(4, 1, 1)), vec![1, 2]);
    }

    #[test]
    fn depths_outside_the_model_are_refused_with_the_range() {
        let s = split(30, 2, 2);
        assert_eq!(check_depths(&[8, 2, 2], &s).expect("ok"), vec![2, 8]);
        let zero = check_depths(&[0, 2], &s).expect_err("zero").to_string();
        assert!(zero.contains("1..=28"), "{zero}");
        let deep = check_depths(&[29], &s).expect_err("deep").to_string();
        assert!(deep.contains("30 layers") && deep.contains("up to 28"), "{deep}");
        assert!(check_depths(&[], &s).is_err());
    }

    #[test]
    fn cache_dir_follows_the_fetch_script() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            cache_dir_from(move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| std::ffi::OsString::from(v)))
        };
        assert_eq!(env(&[("HOME", "/home/u")]), Some(PathBuf::from("/home/u/.cache/hat")));
        assert_eq!(env(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/x")]), Some(PathBuf::from("/x/hat")));
        assert_eq!(env(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", ""), ("HAT_CACHE_DIR", "/h")]), Some(PathBuf::from("/h")));
        assert_eq!(env(&[]), None);
        assert_eq!(cached_audit_path(Path::new("/h"), "k"), PathBuf::from("/h/audits/k.json"));
    }
}
