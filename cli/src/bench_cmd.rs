use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use hat_profiles::Profile;
use hat_runtime::baseline::{generate_cloud, generate_sd, SmallModel, TokenCloud};
use hat_runtime::package::DEVICE_DIR;
use hat_runtime::{Chunking, CloudOptions, DeviceRuntime, DeviceSession, DraftChoice, Drafter, GenerateOptions, Generation, Overlap};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::bench_report::{self, Run};
use crate::common::{read_token, LinkArg};
use crate::placement::spawn_cloud_process;

/// Benchmark HAT against its baselines: the same prompts, the same emulated links, modes interleaved.
///
/// Modes:
///   cloud        the device sends token ids, the cloud runs the whole model and streams ids back
///                (EXPOSES TOKENS; for comparison only)
///   ushape       U-shaped split inference: one round trip per token, prompt in one piece
///   sd           speculative decoding: the device's small model drafts token ids, the cloud's whole
///                model verifies them (EXPOSES TOKENS; for comparison only)
///   hat-nochunk  HAT (drafting, hidden states only) with the prompt in one piece
///   hat          HAT with the prompt chunk size chosen by `auto` (needs `hat profile` first)
///   hat@N        HAT with a fixed chunk size of N positions (for sweeping)
///   hat-adapter  HAT drafting with the paper's adapter instead of the feature draft head (chunks as
///                `hat`, or one piece without a profile)
///   hat-chain    `hat-nochunk` with a plain chain of drafts, no leaves (--draft-leaves 0)
///
/// `hat`, `hat-nochunk` and `hat@N` draft with the package's feature draft head when it has one made
/// for it (else the adapter); --draft-threshold overrides the head's confidence threshold, and
/// --draft-leaves and --leaf-threshold set its leaves.
///
/// For every link, every prompt runs in every mode before the next prompt starts, and the mode order
/// rotates from prompt to prompt, so machine noise hits all modes alike. Greedy decoding; every mode's
/// tokens are compared with the `cloud` (or else `ushape`) tokens of the same prompt. The cloud and
/// sd baselines need a cloud that serves the unsplit model: `--spawn-cloud` starts one (its own
/// process on its own cores), or start yours with `hat serve cloud --token-baselines DIR/device`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The directory `hat split --out` wrote.
    #[arg(long)]
    artifacts: PathBuf,
    /// host:port of `hat serve cloud`.
    #[arg(long, required_unless_present = "spawn_cloud", conflicts_with = "spawn_cloud")]
    cloud: Option<String>,
    /// Start the cloud from DIR/cloud as its own `hat serve cloud` process on its own CPUs, with this
    /// process (the device) pinned to the others, so the two never compete for a core.
    #[arg(long)]
    spawn_cloud: bool,
    #[command(flatten)]
    spawn: crate::placement::SpawnArgs,
    /// Prompt file: JSON lines with `text`, and optional `name` and `kind` (short, long, ...). Each text
    /// is one user turn in the model's chat template, or plain text when the model has none.
    /// The project ships profiles/bench-prompts.jsonl.
    #[arg(long)]
    prompts: PathBuf,
    /// Modes to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "cloud,ushape,sd,hat-nochunk,hat")]
    modes: Vec<BenchMode>,
    /// An emulated link, MBPS,RTT_MS[,JITTER_MS]; repeat for several.
    #[arg(long = "link", required = true, value_name = "MBPS,RTT_MS[,JITTER_MS]")]
    links: Vec<LinkArg>,
    /// New tokens per prompt (fewer when the model ends its reply).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Draft length of sd and hat modes (the most drafts per round, for the feature head).
    #[arg(long, default_value_t = 4)]
    draft_len: usize,
    /// Confidence threshold of the feature draft head (default: the head's own).
    #[arg(long)]
    draft_threshold: Option<f32>,
    /// Leaves per round at most in the feature head's modes (see `hat generate --help`).
    #[arg(long, default_value_t = hat_runtime::draft_head::DEFAULT_LEAVES)]
    draft_leaves: usize,
    /// The estimate a leaf must reach to be verified.
    #[arg(long, default_value_t = hat_runtime::draft_head::DEFAULT_LEAF_THRESHOLD)]
    leaf_threshold: f32,
    /// Runs of every prompt per mode and link.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Only prompts of these kinds (comma-separated), e.g. `long`.
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// Write every run and the summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw TTFT and TBT per mode and link into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// File holding the cloud's shared secret.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: crate::common::ClientTlsArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    Cloud,
    Ushape,
    Sd,
    HatNoChunk,
    Hat,
    HatFixed(usize),
    HatAdapter,
    /// `hat` with the draft head's prompt lookup off.
    HatNoLookup,
    /// `hat` drafting while verifying (`--overlap`).
    HatOverlap,
    /// `hat-nochunk` with a plain chain of drafts: no leaves (`--draft-leaves 0`).
    HatChain,
}

impl FromStr for BenchMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "cloud" => BenchMode::Cloud,
            "ushape" => BenchMode::Ushape,
            "sd" => BenchMode::Sd,
            "hat-nochunk" => BenchMode::HatNoChunk,
            "hat" => BenchMode::Hat,
            "hat-adapter" => BenchMode::HatAdapter,
            "hat-nolookup" => BenchMode::HatNoLookup,
            "hat-overlap" => BenchMode::HatOverlap,
            "hat-chain" => BenchMode::HatChain,
            other => match other.strip_prefix("hat@").map(str::parse::<usize>) {
                Some(Ok(n)) if n > 0 => BenchMode::HatFixed(n),
                _ => {
                    return Err(format!(
                        "unknown mode `{other}`: use cloud, ushape, sd, hat-nochunk, hat, hat@N, hat-adapter, hat-nolookup, hat-overlap or hat-chain"
                    ))
                }
            },
        })
    }
}

impl BenchMode {
    pub fn name(&self) -> String {
        match self {
            BenchMode::Cloud => "cloud".into(),
            BenchMode::Ushape => "ushape".into(),
            BenchMode::Sd => "sd".into(),
            BenchMode::HatNoChunk => "hat-nochunk".into(),
            BenchMode::Hat => "hat".into(),
            BenchMode::HatFixed(n) => format!("hat@{n}"),
            BenchMode::HatAdapter => "hat-adapter".into(),
            BenchMode::HatNoLookup => "hat-nolookup".into(),
            BenchMode::HatOverlap => "hat-overlap".into(),
            BenchMode::HatChain => "hat-chain".into(),
        }
    }

    pub fn exposes_tokens(&self) -> bool {
        matches!(self, BenchMode::Cloud | BenchMode::Sd)
    }
}

#[derive(Debug, Deserialize)]
struct PromptLine {
    name: Option<String>,
    kind: Option<String>,
    text: String,
}

#[derive(Debug)]
pub struct BenchPrompt {
    pub name: String,
    pub kind: String,
    pub ids: Vec<u32>,
}

fn read_prompts(args: &BenchArgs, device: &DeviceRuntime) -> Result<Vec<BenchPrompt>> {
    let text = std::fs::read_to_string(&args.prompts).with_context(|| format!("cannot read --prompts {}", args.prompts.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let p: PromptLine = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: expected a JSON object with \"text\"", args.prompts.display(), i + 1))?;
        let ids = device.prompt_ids(&p.text, device.has_chat_template())?;
        let kind = p.kind.unwrap_or_else(|| if ids.len() < 64 { "short".into() } else { "long".into() });
        if args.kinds.is_empty() || args.kinds.contains(&kind) {
            out.push(BenchPrompt { name: p.name.unwrap_or_else(|| format!("line{}", i + 1)), kind, ids });
        }
    }
    if out.is_empty() {
        bail!("{} has no prompts{}", args.prompts.display(), if args.kinds.is_empty() { "" } else { " of the chosen --kinds" });
    }
    Ok(out)
}

/// One mode's connection for one link.
enum Runner {
    Split(Box<DeviceSession>, hat_runtime::Mode),
    Cloud(TokenCloud),
    Sd(TokenCloud, Box<SmallModel>),
}

impl Runner {
    fn open(
        mode: BenchMode,
        device: &DeviceRuntime,
        opts: CloudOptions,
        table: &Option<Arc<hat_profiles::ChunkTable>>,
        k: usize,
    ) -> Result<Self> {
        let fp = &device.package.manifest.fingerprint;
        let ctx = device.package.config.max_position_embeddings;
        let adapter = mode == BenchMode::HatAdapter;
        let mode_lookup = mode != BenchMode::HatNoLookup;
        let overlap = if mode == BenchMode::HatOverlap { Overlap::WhileWaiting } else { Overlap::Off };
        let chain = mode == BenchMode::HatChain;
        let split = |chunking: Chunking, mode| -> Result<Runner> {
            let drafter = if matches!(mode, hat_runtime::Mode::Hat { .. }) && adapter {
                Drafter::new(device.adapter().clone())
            } else {
                let drafter = device.new_drafter().with_lookup(mode_lookup).with_overlap(overlap);
                if chain {
                    drafter.with_leaves(0, 0.0)
                } else {
                    drafter
                }
            };
            let mut s = device.connect_with(opts.clone(), drafter)?;
            s.set_chunking(chunking);
            // Probe the link now, so it is not timed inside the first prompt.
            s.link()?;
            Ok(Runner::Split(Box::new(s), mode))
        };
        Ok(match mode {
            BenchMode::Cloud => Runner::Cloud(TokenCloud::connect(&opts, fp, ctx)?),
            BenchMode::Sd => {
                Runner::Sd(TokenCloud::connect(&opts, fp, ctx)?, Box::new(SmallModel::new(&device.package, device.adapter().clone())))
            }
            BenchMode::Ushape => split(Chunking::Whole, hat_runtime::Mode::UShape)?,
            BenchMode::HatNoChunk | BenchMode::HatChain => split(Chunking::Whole, hat_runtime::Mode::Hat { draft_len: k })?,
            BenchMode::HatFixed(n) => split(Chunking::Fixed(n), hat_runtime::Mode::Hat { draft_len: k })?,
            BenchMode::Hat => {
                let table = table.clone().context("mode hat needs DIR/device/profile.json: run `hat profile --artifacts DIR` first")?;
                split(Chunking::Auto(table), hat_runtime::Mode::Hat { draft_len: k })?
            }
            BenchMode::HatAdapter | BenchMode::HatNoLookup | BenchMode::HatOverlap => {
                let chunking = table.clone().map_or(Chunking::Whole, |t| Chunking::Auto(t));
                split(chunking, hat_runtime::Mode::Hat { draft_len: k })?
            }
        })
    }

    /// One generation, and the prefill chunk size it used.
    fn run(&mut self, prompt: &[u32], opts: &GenerateOptions, k: usize) -> Result<(Generation, Option<usize>)> {
        Ok(match self {
            Runner::Split(s, mode) => {
                let g = s.generate(prompt, opts, *mode, |_| {})?;
                (g, s.last_chunk())
            }
            Runner::Cloud(c) => (generate_cloud(c, prompt, opts, |_| {})?, None),
            Runner::Sd(c, small) => (generate_sd(c, small, prompt, opts, k, |_| {})?, None),
        })
    }
}

pub fn run(args: BenchArgs, quiet: bool) -> Result<()> {
    args.spawn.check(args.spawn_cloud, "--spawn-cloud")?;
    if args.max_tokens == 0 || args.repeat == 0 || args.draft_len == 0 {
        bail!("--max-tokens, --repeat and --draft-len must be at least 1");
    }
    if args.plot.as_ref().is_some_and(|p| p.extension().and_then(|e| e.to_str()) != Some("svg")) {
        bail!("--plot writes SVG: give it a .svg path (SVG renders in any browser and on GitHub, with no fonts needed here)");
    }
    let mut modes = args.modes.clone();
    modes.dedup();
    // Before any compute starts threads: the spawned cloud takes its cores, this process the rest.
    let server = if args.spawn_cloud {
        Some(spawn_cloud_process(&args.artifacts, modes.iter().any(BenchMode::exposes_tokens), &args.spawn)?)
    } else {
        None
    };
    let placement = match &server {
        Some(s) => s.placement.clone(),
        None => format!("cloud at {} (not placed by hat bench)", args.cloud.as_deref().unwrap_or("?")),
    };
    if !quiet {
        eprintln!("placement: {placement}");
    }
    let device = DeviceRuntime::open(&args.artifacts.join(DEVICE_DIR))?
        .with_draft_choice(DraftChoice::Auto, args.draft_threshold)
        .with_leaves(args.draft_leaves, args.leaf_threshold);
    if !quiet {
        if let Some(note) = device.draft_note() {
            eprintln!("note: {note}");
        }
    }
    let prompts = read_prompts(&args, &device)?;
    let table = Profile::load_if_present(&device.package.dir, &device.package.manifest.fingerprint)?.map(|p| Arc::new(p.table));
    let addr = match (&server, &args.cloud) {
        (Some(s), _) => s.addr.clone(),
        (None, Some(a)) => a.clone(),
        (None, None) => bail!("pass --cloud HOST:PORT or --spawn-cloud"),
    };
    let token = args.auth_token_file.as_deref().map(read_token).transpose().context("--auth-token-file")?;
    let tls = args.tls.client_tls()?;
    let opts = GenerateOptions { max_tokens: args.max_tokens, eos: device.eos_ids(), ..Default::default() };

    let total = (args.links.len() * prompts.len() * args.repeat * modes.len()) as u64;
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(total) };
    bar.set_style(ProgressStyle::with_template("{msg:40} [{bar:30}] {pos}/{len} runs, {elapsed}").expect("template").progress_chars("=> "));
    let mut runs = Vec::new();
    for link in &args.links {
        let mut cloud = CloudOptions::new(addr.clone());
        cloud.link = Some(link.0);
        cloud.auth_token = token.clone();
        cloud.tls = tls.clone();
        cloud.insecure_auth = args.tls.insecure_auth;
        bar.set_message(format!("{}: connecting", link.label()));
        let mut runners = Vec::new();
        for &m in &modes {
            let mut r = Runner::open(m, &device, cloud.clone(), &table, args.draft_len).with_context(|| format!("mode {}", m.name()))?;
            // Warm-up, not recorded: first-call allocations and caches.
            r.run(&prompts[0].ids, &GenerateOptions { max_tokens: 2, ..opts.clone() }, args.draft_len)?;
            runners.push((m, r));
        }
        for rep in 0..args.repeat {
            for (pi, p) in prompts.iter().enumerate() {
                let n = runners.len();
                let mut these = Vec::new();
                for j in 0..n {
                    let (mode, runner) = &mut runners[(pi + rep + j) % n];
                    bar.set_message(format!("{}: {} {}", link.label(), mode.name(), p.name));
                    let (g, chunk) =
                        runner.run(&p.ids, &opts, args.draft_len).with_context(|| format!("mode {} on prompt {}", mode.name(), p.name))?;
                    these.push(Run::new(&link.label(), *mode, p, &g, chunk));
                    bar.inc(1);
                }
                bench_report::mark_matches(&mut these);
                runs.extend(these);
            }
        }
    }
    bar.finish_and_clear();
    drop(server);

    let report =
        bench_report::Report::new(&args.links.iter().map(LinkArg::label).collect::<Vec<_>>(), &modes, runs, args.max_tokens, placement);
    print!("{}", report.render());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report.svg()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!("hat@96".parse::<BenchMode>(), Ok(BenchMode::HatFixed(96)));
        assert_eq!("hat-nochunk".parse::<BenchMode>(), Ok(BenchMode::HatNoChunk));
        assert!("hat@0".parse::<BenchMode>().is_err());
        assert!("fast".parse::<BenchMode>().expect_err("refused").contains("unknown mode"));
        assert!(BenchMode::Sd.exposes_tokens() && !BenchMode::Hat.exposes_tokens());
    }
}
