use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, ValueEnum};
use hat_adapter_trainer::{run, DeviceChoice, TrainAdapterOptions};

/// Train the device's draft adapter by distilling the middle submodel.
///
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
    /// Training text: plain text (documents separated by blank lines), or JSON lines with `text` or
    /// chat `messages`. With --self-distill, its prompts are used instead of the shipped ones.
    #[arg(long)]
    data: Option<PathBuf>,
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
    /// Where to train: CUDA needs a build with `--features cuda`.
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
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
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
    o.progress = !quiet;
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
