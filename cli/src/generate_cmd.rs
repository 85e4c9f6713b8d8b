use std::io::Write;
use std::path::PathBuf;

use crate::bench_report::RoundMs;
use crate::common::{chunking, CloudConnArgs, DraftArgs};
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use hat_runtime::chat::prompt_ids;
use hat_runtime::package::{default_device, CLOUD_DIR, DEVICE_DIR};
use hat_runtime::{generate, CloudPackage, DeviceRuntime, GenerateOptions, Generation, LocalPipeline, SamplingOptions};

/// Generate a reply with a split model.
///
/// `--mode local` runs the input, middle and output submodels in this one process. `--mode ushape`
/// and `--mode hat` run the device side here against `hat serve cloud` at `--cloud`: only hidden
/// states are sent, never text or token ids. `ushape` makes one round trip per token; `hat` drafts
/// `--draft-len` tokens on the device and has the cloud verify them in one round trip, with exactly
/// `ushape`'s output. Greedy, both equal the unsplit model bit for bit with `--wire f32` (the
/// default); f16 and bf16 round hidden states on the wire and can flip a near-tie.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The directory `hat split --out` wrote (holding device/, and cloud/ for --mode local).
    #[arg(long)]
    artifacts: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as one user turn.
    #[arg(long)]
    chat: bool,
    /// Where the submodels run.
    #[arg(long, value_enum, default_value_t = Mode::Local)]
    mode: Mode,
    #[command(flatten)]
    link: CloudConnArgs,
    #[command(flatten)]
    draft: DraftArgs,
    /// Maximum new tokens (generation also stops at an end-of-sequence token).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus sampling threshold (with --temperature > 0).
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed for sampling.
    #[arg(long, default_value_t = 299_792_458)]
    seed: u64,
    /// Print one JSON object: mode, text, tokens, ttft_ms, tbt_ms, accept_len, rounds, bytes_up,
    /// bytes_down and more.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// All three submodels in this process.
    Local,
    /// U-shaped: middle in the cloud, one round trip per token.
    Ushape,
    /// HAT: device drafts, cloud verifies.
    Hat,
}

fn check_args(args: &GenerateArgs) -> Result<()> {
    if args.temperature < 0.0 || !args.temperature.is_finite() {
        bail!("--temperature must be a finite number >= 0");
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
    }
    if args.mode == Mode::Hat && args.draft.draft_len == 0 {
        bail!("--draft-len must be at least 1");
    }
    if args.mode != Mode::Local && args.link.cloud.is_none() {
        bail!("--mode {:?} needs --cloud HOST:PORT (start the cloud with `hat serve cloud`)", args.mode);
    }
    args.link.check()
}

pub fn run(args: GenerateArgs, quiet: bool) -> Result<()> {
    check_args(&args)?;
    let dev = default_device();
    let device = args.draft.apply(DeviceRuntime::open(&args.artifacts.join(DEVICE_DIR))?);
    if args.mode == Mode::Hat && !quiet && !args.json {
        if let Some(note) = device.draft_note() {
            eprintln!("note: {note}");
        }
    }
    let prompt = prompt_ids(&device.package, &args.prompt, args.chat)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingOptions { temperature: args.temperature, top_p: args.top_p, seed: args.seed },
        eos: device.eos_ids(),
        ..Default::default()
    };
    let tokenizer = &device.package.tokenizer;
    let mut stream = TextStream::new(tokenizer, !args.json);
    let mut chunk = None;
    let mut draft_head = String::new();
    let gen = match (args.mode, args.link.cloud.as_deref()) {
        (Mode::Local, _) => {
            let cloud = CloudPackage::open(&args.artifacts.join(CLOUD_DIR), &dev)?;
            let mut pipeline = LocalPipeline::new(&device.package, &cloud)?;
            generate(&mut pipeline, &prompt, &opts, |t| stream.push(t))?
        }
        (mode, Some(addr)) => {
            let mut session = device.connect(args.link.options(addr)?)?;
            if mode == Mode::Hat {
                session.set_chunking(chunking(args.draft.chunk_size, &device, quiet || args.json)?);
            }
            let mode = match mode {
                Mode::Hat => hat_runtime::Mode::Hat { draft_len: args.draft.draft_len },
                _ => hat_runtime::Mode::UShape,
            };
            let gen = session.generate(&prompt, &opts, mode, |t| stream.push(t))?;
            chunk = session.last_chunk();
            draft_head = session.drafter().describe();
            gen
        }
        (_, None) => unreachable!("checked by check_args"),
    };
    stream.finish();
    report(&args, &device, &gen, chunk, &draft_head, quiet)
}

fn report(
    args: &GenerateArgs,
    device: &DeviceRuntime,
    gen: &Generation,
    chunk: Option<usize>,
    draft_head: &str,
    quiet: bool,
) -> Result<()> {
    let text = device.package.tokenizer.decode(&gen.tokens, true).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let mode = format!("{:?}", args.mode).to_lowercase();
    let decode_tokens = gen.tokens.len().saturating_sub(1).max(1) as f64;
    if args.json {
        let mut out = serde_json::json!({
            "mode": mode,
            "text": text,
            "tokens": gen.tokens,
            "prompt_tokens": gen.prompt_tokens,
            "ttft_ms": gen.ttft.as_secs_f64() * 1e3,
            "tbt_ms": gen.tbt.as_secs_f64() * 1e3,
            "decode_tok_s": gen.decode_tokens_per_s(),
            "stopped_by_eos": gen.stopped_by_eos,
            "accept_len": gen.accept_len(),
            "rounds": gen.rounds,
            "bytes_up": gen.traffic.bytes_up,
            "bytes_down": gen.traffic.bytes_down,
            "reconnects": gen.traffic.reconnects,
        });
        if args.mode == Mode::Hat {
            out["draft_len"] = args.draft.draft_len.into();
            out["drafted"] = gen.drafted.into();
            out["accepted"] = gen.accepted.into();
            out["speculated"] = gen.speculated.into();
            out["prepared"] = gen.prepared.into();
            out["leaves"] = gen.leaves.into();
            out["leaves_accepted"] = gen.leaves_accepted.into();
            out["adapter"] = device.adapter().origin.to_string().into();
            out["draft_head"] = draft_head.into();
            out["prefill_chunk"] = chunk.into();
            if let Some(t) = gen.round_time {
                out["round_ms"] = serde_json::to_value(RoundMs::per_round(t, gen.rounds))?;
            }
        }
        if args.mode != Mode::Local {
            out["wire"] = args.link.wire_label().into();
        }
        println!("{}", serde_json::to_string(&out)?);
    } else if !quiet {
        let mut line = format!(
            "[{mode}: {} prompt tokens, {} generated, TTFT {:.1} ms, TBT {:.1} ms ({:.1} tok/s)",
            gen.prompt_tokens,
            gen.tokens.len(),
            gen.ttft.as_secs_f64() * 1e3,
            gen.tbt.as_secs_f64() * 1e3,
            gen.decode_tokens_per_s()
        );
        if args.mode != Mode::Local {
            line += &format!(
                ", {} round trips, {:.2} tokens each, {:.0} B up / {:.0} B down per token",
                gen.rounds,
                gen.accept_len(),
                gen.traffic.bytes_up as f64 / (gen.prompt_tokens as f64 + decode_tokens),
                gen.traffic.bytes_down as f64 / (gen.prompt_tokens as f64 + decode_tokens),
            );
        }
        if let Some(c) = chunk {
            line += &format!(", prompt in chunks of {c}");
        }
        if gen.traffic.reconnects > 0 {
            line += &format!(", {} reconnects", gen.traffic.reconnects);
        }
        eprintln!("{line}]");
    }
    Ok(())
}

/// Prints text as tokens arrive, holding back bytes that do not yet form whole characters.
struct TextStream<'a> {
    tokenizer: &'a tokenizers::Tokenizer,
    tokens: Vec<u32>,
    printed: usize,
    enabled: bool,
}

impl<'a> TextStream<'a> {
    fn new(tokenizer: &'a tokenizers::Tokenizer, enabled: bool) -> Self {
        Self { tokenizer, tokens: Vec::new(), printed: 0, enabled }
    }

    fn push(&mut self, token: u32) {
        if !self.enabled {
            return;
        }
        self.tokens.push(token);
        if let Ok(text) = self.tokenizer.decode(&self.tokens, true) {
            if text.len() > self.printed && !text.ends_with('\u{fffd}') && text.is_char_boundary(self.printed) {
                print!("{}", &text[self.printed..]);
                let _ = std::io::stdout().flush();
                self.printed = text.len();
            }
        }
    }

    fn finish(&mut self) {
        if self.enabled {
            if let Ok(text) = self.tokenizer.decode(&self.tokens, true) {
                if text.is_char_boundary(self.printed) {
                    print!("{}", &text[self.printed..]);
                }
            }
            println!();
        }
    }
}
