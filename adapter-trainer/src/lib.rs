//! `hat train-adapter`: distils the middle submodel into the device's adapter, so that input
//! submodel -> adapter -> output submodel drafts tokens the cloud accepts. The teacher targets are
//! computed once and cached; training uses candle autograd on the CPU, or on CUDA when built with
//! the `cuda` feature; checkpoints make `--resume` lose no finished step; held-out acceptance is
//! measured before and after. `audit` and `inversion` are `hat audit`: how much of the text the
//! cloud could read back from the states it receives, fitted with the same candle autograd.

pub mod adapter;
pub mod audit;
pub mod data;
pub mod distill;
pub mod error;
pub mod eval;
pub mod feature;
pub mod feature_run;
pub mod inversion;
pub mod optim;
pub mod teacher;
pub mod train;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use hat_runtime::draft::{INIT_ADAPTER, TRAINED_ADAPTER};
use hat_runtime::package::{default_device, CLOUD_DIR, DEVICE_DIR};
use hat_runtime::{generate, AdapterOrigin, CloudPackage, DevicePackage, GenerateOptions, LocalPipeline, SamplingOptions};
use serde::{Deserialize, Serialize};
use sha2::Digest;

pub use error::{Result, TrainError};
pub use eval::EvalResult;
pub use feature::HeadLossConfig;
pub use feature_run::{run_feature, HeadReport};
pub use optim::AdamWConfig;
pub use train::{LossConfig, TrainConfig};

use crate::adapter::TrainableAdapter;
use crate::data::{chat_prompt, prompt_lines, read_data, tokenize, Example, HELDOUT_PROMPTS, SHIPPED_PROMPTS};
use crate::optim::AdamW;
use crate::teacher::{teacher_key, TeacherSet};
use crate::train::{Checkpoint, CheckpointMeta};

pub const REPORT_FILE: &str = "adapter-report.json";
/// Checkpoints and cached teacher targets, inside the device package.
pub const WORK_DIR: &str = "adapter-train";

/// Whether this build can train on CUDA.
pub use hat_runtime::gpu::CUDA_BUILT;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

/// Where training runs: CUDA when asked for (or, under `auto`, when compiled in and a GPU opens).
pub fn select_device(choice: DeviceChoice) -> Result<Device> {
    use hat_runtime::gpu::{open, ComputeDevice};
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        // A CPU build's refusal comes from `open` too.
        DeviceChoice::Cuda => open(ComputeDevice::Cuda(0)).map_err(|e| TrainError::CudaUnavailable(e.to_string())),
        DeviceChoice::Auto if CUDA_BUILT => Ok(open(ComputeDevice::Cuda(0)).unwrap_or(Device::Cpu)),
        DeviceChoice::Auto => Ok(Device::Cpu),
    }
}

#[derive(Debug, Clone)]
pub struct TrainAdapterOptions {
    pub artifacts: PathBuf,
    /// Training data files (`--data`, repeatable), read in order.
    pub data: Vec<PathBuf>,
    /// Responses the full split model generates for self-distillation.
    pub self_distill: Option<usize>,
    /// New tokens per self-distilled response.
    pub distill_tokens: usize,
    pub steps: Option<usize>,
    pub epochs: Option<f64>,
    pub device: DeviceChoice,
    pub adapter_layers: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub seed: u64,
    pub resume: bool,
    pub optimizer: AdamWConfig,
    pub loss: LossConfig,
    pub top_k: usize,
    /// Held-out prompts and new tokens for the before/after evaluation, at `eval_draft_len`.
    pub eval_prompts: usize,
    pub eval_tokens: usize,
    pub eval_draft_len: usize,
    pub checkpoint_every: usize,
    pub progress: bool,
    /// Stop as if interrupted once this many steps are done (tests of `--resume`).
    pub stop_after: Option<usize>,
    /// Draft head: prompts answered at once in self-distillation.
    pub distill_batch: usize,
    /// Draft head: answers per training prompt; the first is greedy, the rest are sampled at
    /// `distill_temperature`.
    pub distill_samples: usize,
    pub distill_temperature: f64,
    /// Draft head: start from this head file's weights and draft vocabulary instead of the model's
    /// last layer.
    pub init_head: Option<PathBuf>,
    /// Draft head: its decoder layers (`None`: the `--init-head`'s, or one); layers added to a
    /// starting head begin silent (see [`feature::grow_layers`]).
    pub head_layers: Option<usize>,
    /// Draft head: tokens in the draft vocabulary.
    pub draft_vocab: usize,
    pub head_loss: HeadLossConfig,
    /// Draft head: the confidence threshold written into the head, and those evaluated.
    pub threshold: f32,
    pub thresholds: Vec<f32>,
    /// The command line, recorded in the head.
    pub made_by: String,
}

impl TrainAdapterOptions {
    pub fn new(artifacts: impl Into<PathBuf>) -> Self {
        Self {
            artifacts: artifacts.into(),
            data: Vec::new(),
            self_distill: None,
            distill_tokens: 128,
            steps: None,
            epochs: None,
            device: DeviceChoice::Auto,
            adapter_layers: 1,
            batch: 4,
            seq_len: 128,
            seed: 0,
            resume: false,
            optimizer: AdamWConfig::default(),
            loss: LossConfig::default(),
            top_k: 16,
            eval_prompts: 8,
            eval_tokens: 48,
            eval_draft_len: 4,
            checkpoint_every: 25,
            progress: true,
            stop_after: None,
            distill_batch: 16,
            distill_samples: 1,
            distill_temperature: 0.8,
            init_head: None,
            head_layers: None,
            draft_vocab: hat_runtime::draft_head::DEFAULT_DRAFT_VOCAB,
            head_loss: HeadLossConfig::default(),
            threshold: 0.0,
            thresholds: vec![0.05, 0.1, 0.2, 0.3, 0.5],
            made_by: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub adapter: PathBuf,
    pub device: String,
    pub adapter_layers: usize,
    pub steps: usize,
    pub sequences: usize,
    pub teacher_positions: usize,
    pub train_tokens: usize,
    pub train_seconds: f64,
    pub final_loss: Option<train::LossValues>,
    pub first_loss: Option<train::LossValues>,
    /// Total loss of every step.
    pub loss_curve: Vec<f64>,
    pub before: EvalResult,
    pub after: EvalResult,
    pub config: TrainConfig,
}

fn bar(enabled: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template("{prefix:18} [{bar:30}] {pos}/{len} {elapsed}<{eta} {msg}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
    b.set_style(style);
    b.set_prefix(what.to_string());
    b
}

/// Training sequences: the data file's examples, then self-distilled prompt + response pairs.
fn sequences(opts: &TrainAdapterOptions, device: &DevicePackage, cloud: &CloudPackage) -> Result<Vec<Vec<u32>>> {
    let context = device.config.max_position_embeddings;
    let mut examples = Vec::new();
    for p in &opts.data {
        examples.extend(read_data(p)?);
    }
    let mut seqs = Vec::new();
    if opts.self_distill.is_none() {
        for ex in &examples {
            let ids = tokenize(device, ex)?;
            // Long documents become several windows; each must fit the context.
            seqs.extend(ids.chunks(context.min(opts.seq_len.max(2) * 4)).filter(|c| c.len() >= 2).map(<[u32]>::to_vec));
        }
    }
    if let Some(n) = opts.self_distill {
        let prompts: Vec<String> = if examples.is_empty() {
            prompt_lines(SHIPPED_PROMPTS)
        } else {
            examples.iter().map(Example::prompt).filter(|p| !p.trim().is_empty()).collect()
        };
        if prompts.is_empty() {
            return Err(TrainError::BadInput("no prompts to self-distill from".into()));
        }
        // Generations are cached by everything that decides them, so a rerun (or --resume) reuses them.
        let what = format!("{}|{n}|{}|{}|{prompts:?}", device.manifest.fingerprint, opts.distill_tokens, opts.seed);
        let key = &hex::encode(sha2::Sha256::digest(what.as_bytes()))[..16];
        let cache = device.dir.join(WORK_DIR).join(format!("self-distill-{key}.json"));
        if let Some(cached) = std::fs::read_to_string(&cache).ok().and_then(|t| serde_json::from_str::<Vec<Vec<u32>>>(&t).ok()) {
            seqs.extend(cached);
            return Ok(seqs);
        }
        let mut generated = Vec::with_capacity(n);
        let b = bar(opts.progress, n as u64, "self-distilling");
        for i in 0..n {
            let prompt = chat_prompt(device, &prompts[i % prompts.len()])?;
            if prompt.len() + 1 >= context {
                return Err(TrainError::BadInput(format!(
                    "prompt {} has {} tokens, longer than the model's context of {context}",
                    i % prompts.len() + 1,
                    prompt.len()
                )));
            }
            let mut pipeline = LocalPipeline::new(device, cloud)?;
            let sampling = SamplingOptions { temperature: 0.7, top_p: Some(0.95), seed: opts.seed.wrapping_add(i as u64) };
            let gen_opts = GenerateOptions {
                max_tokens: opts.distill_tokens.min(context - prompt.len() - 1),
                sampling,
                eos: device.eos_ids(),
                ..Default::default()
            };
            let g = generate(&mut pipeline, &prompt, &gen_opts, |_| {})?;
            generated.push([prompt, g.tokens].concat());
            b.inc(1);
        }
        b.finish_and_clear();
        let json = serde_json::to_string(&generated).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        write_atomically(&cache, |tmp| {
            std::fs::write(tmp, &json).map_err(|e| TrainError::io(format!("cannot write {}", tmp.display()), e))
        })?;
        seqs.extend(generated);
    }
    if seqs.is_empty() {
        return Err(TrainError::BadInput("no training data: give --data FILE and/or --self-distill N".into()));
    }
    Ok(seqs)
}

/// Held-out prompts, tokenized.
fn heldout(device: &DevicePackage, n: usize) -> Result<Vec<Vec<u32>>> {
    prompt_lines(HELDOUT_PROMPTS).iter().take(n).map(|p| chat_prompt(device, p)).collect()
}

pub fn run(opts: &TrainAdapterOptions) -> Result<TrainReport> {
    if opts.adapter_layers == 0 || opts.batch == 0 || opts.seq_len < 2 {
        return Err(TrainError::BadInput("--adapter-layers and --batch must be at least 1, --seq-len at least 2".into()));
    }
    let Opened { train_device, device_dir, device, cloud, work } = open_packages(opts)?;

    // Data and teacher targets (both cached by content).
    let seqs = sequences(opts, &device, &cloud)?;
    let key = teacher_key(&device.manifest.fingerprint, &seqs, opts.top_k);
    let teacher_path = work.join(format!("teacher-{key}.safetensors"));
    let teacher = if teacher_path.is_file() {
        TeacherSet::load(&teacher_path)?
    } else {
        let b = bar(opts.progress, seqs.len() as u64, "teacher targets");
        let t = TeacherSet::compute(&device, &cloud, &seqs, opts.top_k, false, &b)?;
        b.finish_and_clear();
        t.save(&teacher_path)?;
        t
    };

    let config = train_config(opts, teacher.num_positions());
    let steps = config.steps;

    // The output submodel on the training device, frozen.
    let output = if train_device.is_cpu() { device.output.clone() } else { DevicePackage::open(&device_dir, &train_device)?.output };
    let checkpoint = Checkpoint { dir: work.clone() };
    let init_file = device_dir.join(INIT_ADAPTER);
    let (adapter, mut opt, meta) = if opts.resume {
        if !checkpoint.exists() {
            return Err(TrainError::BadInput(format!("nothing to resume: no checkpoint in {}; run without --resume", work.display())));
        }
        let meta = checkpoint.load_meta()?;
        if meta.teacher_key != key || meta.adapter_layers != opts.adapter_layers {
            return Err(TrainError::Checkpoint(format!(
                "the checkpoint in {} was made with other data or --adapter-layers; run without --resume to start over",
                work.display()
            )));
        }
        let tensors = checkpoint.load_tensors()?;
        let weights = train::weights_only(&tensors);
        let adapter = TrainableAdapter::from_tensors(weights, &device.config, opts.adapter_layers, &train_device)?;
        let mut opt = AdamW::new(adapter.vars(), config.optimizer)?;
        opt.restore(&tensors, meta.step)?;
        let meta = CheckpointMeta { config: TrainConfig { steps, ..meta.config.clone() }, ..meta };
        (adapter, opt, meta)
    } else {
        // The bias starts at the mean gap between the middle's output and its input, so the layers
        // only have to learn what varies from position to position.
        let bias = (teacher.y.mean(0)? - teacher.x.mean(0)?)?.to_device(&train_device)?;
        let adapter = TrainableAdapter::from_init(&init_file, &device.config, opts.adapter_layers, &bias, &train_device)?;
        let opt = AdamW::new(adapter.vars(), config.optimizer)?;
        let meta = CheckpointMeta {
            step: 0,
            config: config.clone(),
            teacher_key: key.clone(),
            adapter_layers: opts.adapter_layers,
            losses: Vec::new(),
            train_tokens: 0,
            train_seconds: 0.0,
            before: None,
        };
        (adapter, opt, meta)
    };

    let prompts = heldout(&device, opts.eval_prompts)?;
    let mut meta = meta;
    let before = match meta.before {
        Some(b) => b,
        None => {
            let b = eval::evaluate(
                &device,
                &cloud,
                adapter.to_runtime(AdapterOrigin::Custom("initial"))?,
                &prompts,
                opts.eval_tokens,
                opts.eval_draft_len,
            )?;
            meta.before = Some(b);
            b
        }
    };

    let b = bar(opts.progress, steps as u64, "training");
    let student = train::AdapterStudent { adapter: &adapter, output: &output, teacher: &teacher };
    let meta = train::train(&student, &mut opt, meta, &checkpoint, interrupt_flag(), opts.stop_after, &b)?;
    b.finish_and_clear();

    let trained = device_dir.join(TRAINED_ADAPTER);
    let after = eval::evaluate(
        &device,
        &cloud,
        adapter.to_runtime(AdapterOrigin::Trained(trained.clone()))?,
        &prompts,
        opts.eval_tokens,
        opts.eval_draft_len,
    )?;
    let report = TrainReport {
        adapter: trained.clone(),
        device: format!("{train_device:?}"),
        adapter_layers: opts.adapter_layers,
        steps: meta.step,
        sequences: teacher.num_sequences(),
        teacher_positions: teacher.num_positions(),
        train_tokens: meta.train_tokens,
        train_seconds: meta.train_seconds,
        final_loss: meta.losses.last().copied(),
        first_loss: meta.losses.first().copied(),
        loss_curve: meta.losses.iter().map(|l| l.total).collect(),
        before,
        after,
        config: meta.config.clone(),
    };
    write_atomically(&trained, |tmp| Ok(candle_core::safetensors::save(&adapter.tensors()?, tmp)?))?;
    let json = serde_json::to_string_pretty(&report).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
    write_atomically(&device_dir.join(REPORT_FILE), |tmp| {
        std::fs::write(tmp, &json).map_err(|e| TrainError::io(format!("cannot write {}", tmp.display()), e))
    })?;
    Ok(report)
}

/// The packages training reads, opened on the CPU and checked to be one split, and the work folder.
struct Opened {
    train_device: Device,
    device_dir: PathBuf,
    device: DevicePackage,
    cloud: CloudPackage,
    work: PathBuf,
}

fn open_packages(opts: &TrainAdapterOptions) -> Result<Opened> {
    let train_device = select_device(opts.device)?;
    let cpu = default_device();
    let device_dir = opts.artifacts.join(DEVICE_DIR);
    let device = DevicePackage::open(&device_dir, &cpu)?;
    let cloud = CloudPackage::open(&opts.artifacts.join(CLOUD_DIR), &cpu)?;
    device.check_pair(&cloud.manifest, &cloud.dir)?;
    let work = device_dir.join(WORK_DIR);
    std::fs::create_dir_all(&work).map_err(|e| TrainError::io(format!("cannot create {}", work.display()), e))?;
    Ok(Opened { train_device, device_dir, device, cloud, work })
}

/// Steps (from --steps, or --epochs over `positions` teacher positions) and the rest of the loop's
/// settings.
fn train_config(opts: &TrainAdapterOptions, positions: usize) -> TrainConfig {
    let steps = match (opts.steps, opts.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => ((e * positions as f64) / (opts.batch * opts.seq_len) as f64).ceil().max(1.0) as usize,
        (None, None) => 200,
    };
    TrainConfig {
        steps,
        batch: opts.batch,
        seq_len: opts.seq_len,
        seed: opts.seed,
        checkpoint_every: opts.checkpoint_every,
        optimizer: opts.optimizer,
        loss: opts.loss,
    }
}

/// Writes to a temporary name beside `path`, then renames, so `path` is never half-written.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension("partial");
    write(&tmp)?;
    train::rename(&tmp, path)
}

/// Set by Ctrl-C; the training loop checks it between steps and saves a checkpoint.
fn interrupt_flag() -> &'static AtomicBool {
    static FLAG: AtomicBool = AtomicBool::new(false);
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        // Another handler (an embedding program's) wins; training then just runs to the end.
        let _ = ctrlc::set_handler(|| FLAG.store(true, Ordering::SeqCst));
    });
    &FLAG
}
