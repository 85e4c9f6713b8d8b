use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use hat_adapter_trainer::{run, run_feature, DeviceChoice, HeadLossConfig, HeadReport, TrainAdapterOptions};

/// Train the device's draft model: the feature draft head (default) or the paper's adapter.
///
/// --draft-head feature (default) trains hat's draft head: it reads the input submodel's, the
/// middle's and the output submodel's states of verified positions plus the next token's embedding,
/// runs one decoder layer (started from the model's last layer) and a draft LM head over the most
/// frequent tokens. The full split model first answers the prompts (adapter-trainer/prompts/
/// draft-head.txt, or --data's) greedily in batches; the teacher states are cached; training unrolls
/// --unroll self-feeding steps. Writes DIR/device/draft-head.safetensors (f16) and
/// draft-head-report.json with held-out teacher-forced top-1 per draft step and live accept_len.
///
/// --draft-head hat trains the paper's adapter, as follows.
/// The adapter (decoder layers of the model's width, initialised from the middle layer `hat split`
/// copied) learns to map the input submodel's states to the middle submodel's output. The loss is
/// the relative squared error to the middle's output plus a weighted cross-entropy, through the
/// frozen output submodel, against the full model's next-token distribution. Teacher targets are
/// computed once and cached in DIR/device/adapter-train/. Writes DIR/device/adapter.safetensors
/// (which `hat generate --mode hat` then uses) and DIR/device/adapter-report.json, with the held-out
/// acceptance before and after. Ctrl-C saves a checkpoint; --resume continues from it.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The directory `hat split --out` wrote (device/ and cloud/ are both needed: the cloud's
    /// middle submodel is the teacher).
    #[arg(long)]
    artifacts: PathBuf,
    /// Training data. For `--draft-head hat`: plain text (documents separated by blank lines), or
    /// JSON lines with `text` or chat `messages`; with --self-distill, their prompts are used instead
    /// of the shipped ones. For `--draft-head feature`: the prompts to self-distil from instead of the
    /// shipped ones, one per line (or the first user turn of each JSON line). Repeatable: the feature
    /// head distils and caches each file's answers on their own, so adding a file computes only its own.
    #[arg(long)]
    data: Vec<PathBuf>,
    /// Generate N responses with the full split model and train on them (self-distillation).
    #[arg(long)]
    self_distill: Option<usize>,
    /// New tokens per self-distilled response.
    #[arg(long, default_value_t = 128)]
    distill_tokens: usize,
    /// Optimiser steps (default 200).
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    /// Passes over the teacher positions, instead of --steps.
    #[arg(long)]
    epochs: Option<f64>,
    /// Where to train: auto (CUDA when this build has it and a GPU opens, else the CPU), cpu, or
    /// cuda (needs a CUDA build: scripts/build-cuda.sh).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Decoder layers in the adapter.
    #[arg(long, default_value_t = 1)]
    adapter_layers: usize,
    /// Sequence windows per step.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Longest training window, in tokens.
    #[arg(long, default_value_t = 128)]
    seq_len: usize,
    /// Peak learning rate (AdamW, linear warmup then cosine decay).
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Weight of the distribution term against the hidden-state term.
    #[arg(long, default_value_t = 0.1)]
    kl_weight: f64,
    /// Held-out prompts for the before/after evaluation.
    #[arg(long, default_value_t = 8)]
    eval_prompts: usize,
    /// New tokens per held-out prompt in the evaluation.
    #[arg(long, default_value_t = 48)]
    eval_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from the checkpoint in DIR/device/adapter-train/.
    #[arg(long)]
    resume: bool,
    /// Save a checkpoint and stop once this many steps are done, as Ctrl-C would (train in pieces;
    /// --resume continues, and may set a new --steps).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Which draft model to train.
    #[arg(long, value_enum, default_value_t = HeadArg::Feature)]
    draft_head: HeadArg,
    /// Draft head: tokens in its draft vocabulary (the most frequent in the training text).
    #[arg(long, default_value_t = hat_runtime::draft_head::DEFAULT_DRAFT_VOCAB)]
    draft_vocab: usize,
    /// Draft head: unrolled self-feeding steps per window (1 is plain teacher forcing).
    #[arg(long, default_value_t = 3)]
    unroll: usize,
    /// Draft head: weight of unrolled step s is DECAY^s.
    #[arg(long, default_value_t = 0.8)]
    step_decay: f64,
    /// Draft head: weight of the SmoothL1 term on the normalised final state.
    #[arg(long, default_value_t = 0.1)]
    feature_weight: f64,
    /// Draft head: prompts of equal length answered at once while self-distilling.
    #[arg(long, default_value_t = 16)]
    distill_batch: usize,
    /// Draft head: answers per training prompt while self-distilling. The first is greedy; the others
    /// are sampled at --distill-temperature, so the head also learns what the model does after
    /// tokens its greedy text never takes.
    #[arg(long, default_value_t = 1)]
    distill_samples: usize,
    /// Draft head: temperature of the sampled answers (--distill-samples above 1).
    #[arg(long, default_value_t = 0.8)]
    distill_temperature: f64,
    /// Draft head: start from this head file (its weights and draft vocabulary; it must have been
    /// made for this model and split) instead of the model's last layer, to train an existing head
    /// further on new data.
    #[arg(long)]
    init_head: Option<PathBuf>,
    /// Draft head: its decoder layers (default: the --init-head's, else 1). Layers added to an
    /// existing head start as copies of its last with their output projections at zero, so the
    /// grown head drafts exactly as before and training brings the new layers in. A second layer
    /// took a q8_0 draft step from 0.33 to 0.47 ms on one core of the development CPU.
    #[arg(long)]
    head_layers: Option<usize>,
    /// Draft head: the confidence threshold stored in the head (drafting stops below it).
    #[arg(long, default_value_t = 0.0)]
    threshold: f32,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum HeadArg {
    /// The feature-conditioned draft head.
    Feature,
    /// The paper's adapter.
    Hat,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

pub fn run_cmd(args: TrainArgs, quiet: bool) -> Result<()> {
    let mut o = TrainAdapterOptions::new(&args.artifacts);
    o.data = args.data;
    o.self_distill = args.self_distill;
    o.distill_tokens = args.distill_tokens;
    o.steps = args.steps;
    o.epochs = args.epochs;
    o.device = match args.device {
        DeviceArg::Auto => DeviceChoice::Auto,
        DeviceArg::Cpu => DeviceChoice::Cpu,
        DeviceArg::Cuda => DeviceChoice::Cuda,
    };
    o.adapter_layers = args.adapter_layers;
    o.batch = args.batch;
    o.seq_len = args.seq_len;
    o.optimizer.lr = args.lr;
    o.loss.kl_weight = args.kl_weight;
    o.eval_prompts = args.eval_prompts;
    o.eval_tokens = args.eval_tokens;
    o.seed = args.seed;
    o.resume = args.resume;
    o.stop_after = args.stop_after;
    o.progress = !quiet;
    if args.draft_head == HeadArg::Feature {
        o.draft_vocab = args.draft_vocab;
        o.head_loss = HeadLossConfig { unroll: args.unroll, step_decay: args.step_decay, feature_weight: args.feature_weight };
        o.distill_batch = args.distill_batch;
        o.distill_samples = args.distill_samples;
        o.distill_temperature = args.distill_temperature;
        o.init_head = args.init_head;
        o.head_layers = args.head_layers;
        o.threshold = args.threshold;
        o.made_by = std::env::args().map(|a| if a.contains(' ') { format!("'{a}'") } else { a }).collect::<Vec<_>>().join(" ");
        let r = run_feature(&o)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
        print_head_report(&r);
        return Ok(());
    }
    let r = run(&o)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("adapter: {} ({} layer(s), trained on {})", r.adapter.display(), r.adapter_layers, r.device);
    println!(
        "training: {} steps, {} tokens from {} sequences ({} teacher positions), {:.1} s",
        r.steps, r.train_tokens, r.sequences, r.teacher_positions, r.train_seconds
    );
    if let (Some(a), Some(b)) = (r.first_loss, r.final_loss) {
        println!("loss: {:.4} -> {:.4} (hidden {:.4} -> {:.4}, kl {:.3} -> {:.3})", a.total, b.total, a.hidden, b.hidden, a.kl, b.kl);
    }
    println!("held-out, draft length {}:", r.after.draft_len);
    println!("  accept_len (tokens per round): {:.3} -> {:.3}", r.before.accept_len, r.after.accept_len);
    println!("  top-1 agreement:               {:.3} -> {:.3}", r.before.top1, r.after.top1);
    Ok(())
}

fn print_head_report(r: &HeadReport) {
    let steps = |v: &[f64]| v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(" / ");
    println!(
        "draft head: {} ({} decoder layer(s), draft vocabulary {}, trained on {})",
        r.head.display(),
        r.head_layers,
        r.draft_vocab,
        r.device
    );
    println!(
        "data: {} self-distilled sequences, {} teacher positions; alignment check {:.4}; held-out answer tokens in the draft vocabulary {:.3}",
        r.sequences, r.teacher_positions, r.alignment, r.heldout_vocab_coverage
    );
    println!(
        "training: {} steps, {} tokens, {:.1} s ({:.0} tokens/s); distilling {:.1} s, teacher {:.1} s",
        r.steps, r.train_tokens, r.train_seconds, r.train_tokens_per_s, r.distill_seconds, r.teacher_seconds
    );
    println!("held-out ({} sequences), draft length {}:", r.heldout_sequences, r.after.fixed.draft_len);
    println!("  teacher-forced top-1 per draft step: {} -> {}", steps(&r.before.teacher_forced_top1), steps(&r.after.teacher_forced_top1));
    println!("  accept_len (tokens per round):       {:.3} -> {:.3}", r.before.fixed.accept_len, r.after.fixed.accept_len);
    println!("  first-draft acceptance:              {:.3} -> {:.3}", r.before.fixed.top1, r.after.fixed.top1);
    for t in &r.adaptive {
        println!("  threshold {:.2}: accept_len {:.3}, {:.2} drafts per round", t.threshold, t.result.accept_len, t.drafts_per_round);
    }
}
