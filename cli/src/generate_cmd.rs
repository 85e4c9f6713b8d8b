use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hat_runtime::chat::render_user_prompt;
use hat_runtime::package::{CLOUD_DIR, DEVICE_DIR};
use hat_runtime::{generate, CloudPackage, DevicePackage, GenerateOptions, LocalPipeline, SamplingOptions};

/// Generate a reply with a split model.
///
/// `--mode local` runs the input, middle and output submodels in this one process.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// The directory `hat split --out` wrote (holding device/ and cloud/).
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
    /// Print one JSON object: text, tokens, prompt_tokens, ttft_ms, tbt_ms and more.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// All three submodels in this process.
    Local,
}

pub fn run(args: GenerateArgs, quiet: bool) -> Result<()> {
    if args.temperature < 0.0 || !args.temperature.is_finite() {
        bail!("--temperature must be a finite number >= 0");
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
    }
    let dev = hat_runtime::package::default_device();
    let device = DevicePackage::open(&args.artifacts.join(DEVICE_DIR), &dev)?;
    let cloud = CloudPackage::open(&args.artifacts.join(CLOUD_DIR), &dev)?;
    let mut pipeline = LocalPipeline::new(&device, &cloud)?;

    let info = device.manifest.tokenizer.as_ref();
    let (text, add_special) = if args.chat {
        let template = info
            .and_then(|t| t.chat_template.as_deref())
            .context("this model has no chat template; drop --chat")?;
        let bos = info.and_then(|t| t.bos_token.as_ref()).map(|t| t.content.as_str());
        let eos = info.and_then(|t| t.eos_tokens.first()).map(|t| t.content.as_str());
        (render_user_prompt(template, &args.prompt, bos, eos)?, false)
    } else {
        (args.prompt.clone(), true)
    };
    let encoding = device
        .tokenizer
        .encode(text.as_str(), add_special)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let prompt_ids = encoding.get_ids().to_vec();

    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingOptions { temperature: args.temperature, top_p: args.top_p, seed: args.seed },
        eos: device.eos_ids(),
    };
    let mut stream = TextStream::new(&device.tokenizer, !args.json);
    let gen = generate(&mut pipeline, &prompt_ids, &opts, |t| stream.push(t))?;
    stream.finish();
    let text = device.tokenizer.decode(&gen.tokens, true).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    if args.json {
        let out = serde_json::json!({
            "mode": "local",
            "text": text,
            "tokens": gen.tokens,
            "prompt_tokens": gen.prompt_tokens,
            "ttft_ms": gen.ttft.as_secs_f64() * 1e3,
            "tbt_ms": gen.tbt.as_secs_f64() * 1e3,
            "decode_tok_s": gen.decode_tokens_per_s(),
            "stopped_by_eos": gen.stopped_by_eos,
        });
        println!("{}", serde_json::to_string(&out)?);
    } else if !quiet {
        eprintln!(
            "[{} prompt tokens, {} generated, TTFT {:.1} ms, TBT {:.1} ms ({:.1} tok/s)]",
            gen.prompt_tokens,
            gen.tokens.len(),
            gen.ttft.as_secs_f64() * 1e3,
            gen.tbt.as_secs_f64() * 1e3,
            gen.decode_tokens_per_s()
        );
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
