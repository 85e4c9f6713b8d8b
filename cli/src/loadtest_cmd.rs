//! `hat loadtest`: many device sessions (the real device code, one thread each) against one cloud,
//! at several concurrency levels: aggregate tokens/s, TBT and TTFT percentiles, errors, and the
//! cloud's peak memory. With `--spawn-cloud` each level gets a fresh cloud process on its own cores,
//! and `--compare-batching` runs every level against a batching and a non-batching cloud in one run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hat_runtime::{CloudOptions, DeviceRuntime, GenerateOptions, Mode};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::bench_report::Stats;
use crate::common::{read_token, ClientTlsArgs};
use crate::placement::spawn_cloud_process_with;
use crate::plot::{render_svg, BarGroup, Panel};

/// Drive many device sessions against one cloud and measure what it holds.
///
/// Every session is a real device session (input and output submodels, drafting in --mode hat) on
/// its own thread, generating replies to the shipped benchmark prompts back to back for --duration
/// seconds per level; replies in flight at the end are cancelled. Loopback clouds only make sense
/// for the numbers to mean the cloud's capacity; the device threads share this machine's CPUs.
#[derive(Args, Debug)]
pub struct LoadtestArgs {
    /// The split output: DIR/device runs the sessions, DIR/cloud is served with --spawn-cloud.
    #[arg(long)]
    artifacts: PathBuf,
    /// host:port of a running `hat serve cloud`.
    #[arg(long, required_unless_present = "spawn_cloud", conflicts_with = "spawn_cloud")]
    cloud: Option<String>,
    /// Start a fresh `hat serve cloud` process for every level, on its own CPUs (its peak memory is
    /// then measured too).
    #[arg(long)]
    spawn_cloud: bool,
    #[command(flatten)]
    spawn: crate::placement::SpawnArgs,
    /// With --spawn-cloud: run every level twice, against a batching cloud and one started with
    /// --no-batching.
    #[arg(long, requires = "spawn_cloud")]
    compare_batching: bool,
    /// With --spawn-cloud: the cloud's --max-context (positions per session).
    #[arg(long, requires = "spawn_cloud", default_value_t = 1024)]
    max_context: usize,
    /// With --spawn-cloud: the batching cloud's --batch-window-ms.
    #[arg(long, requires = "spawn_cloud", default_value_t = 2.0)]
    batch_window_ms: f64,
    /// With --spawn-cloud: the cloud's --kv-budget-mb.
    #[arg(long, requires = "spawn_cloud")]
    kv_budget_mb: Option<f64>,
    /// Concurrency levels: sessions at once, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    sessions: Vec<usize>,
    /// How the sessions decode.
    #[arg(long, value_enum, default_value_t = LoadMode::Ushape)]
    mode: LoadMode,
    /// Seconds each level is measured (after every session has connected).
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// New tokens per reply.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// File holding the cloud's shared secret.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an SVG chart of throughput and TBT per level.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum LoadMode {
    Ushape,
    Hat,
}

/// The results of one level.
#[derive(Debug, Clone, Serialize)]
struct Level {
    sessions: usize,
    /// Whether the cloud batched (`None`: a cloud this run did not start).
    batching: Option<bool>,
    seconds: f64,
    tokens: usize,
    tokens_per_s: f64,
    replies: usize,
    errors: usize,
    /// First error, for the report.
    error: Option<String>,
    tbt_ms: Stats,
    ttft_ms: Stats,
    /// The cloud process's peak resident memory (VmHWM), when this run started it.
    cloud_peak_mb: Option<f64>,
    /// The cloud process's CPU time over the window per token the sessions received: the cloud's
    /// cost per token, whether or not the device side is what limits throughput.
    cloud_cpu_ms_per_token: Option<f64>,
    /// This process's CPU time over the window per token: the device sessions' cost per token
    /// (input and output layers, the LM head, sampling, the link), which with the cloud's says
    /// which side's CPUs limit throughput.
    device_cpu_ms_per_token: Option<f64>,
}

/// What the session threads record.
#[derive(Default)]
struct Tally {
    tokens: usize,
    replies: usize,
    errors: usize,
    error: Option<String>,
    gaps_ms: Vec<f64>,
    ttft_ms: Vec<f64>,
    cloud_cpu: Option<f64>,
    device_cpu: Option<f64>,
}

const PROMPTS: &str = include_str!("../../profiles/bench-prompts.jsonl");

fn prompts(device: &DeviceRuntime) -> Result<Vec<Vec<u32>>> {
    #[derive(serde::Deserialize)]
    struct Line {
        text: String,
        kind: Option<String>,
    }
    let mut out = Vec::new();
    for line in PROMPTS.lines().filter(|l| !l.trim().is_empty()) {
        let l: Line = serde_json::from_str(line).context("the shipped benchmark prompts")?;
        if l.kind.as_deref() != Some("long") {
            out.push(device.prompt_ids(&l.text, device.has_chat_template())?);
        }
    }
    Ok(out)
}

/// One level: `n` sessions for `window`, against `addr`.
/// `cloud_cpu` reads the cloud's CPU seconds, when known; its use over the window goes in the tally.
fn run_level(
    device: &DeviceRuntime,
    opts: &CloudOptions,
    prompts: &[Vec<u32>],
    (n, mode, window, max_tokens): (usize, Mode, Duration, usize),
    cloud_cpu: &dyn Fn() -> Option<f64>,
) -> Tally {
    let tally = Mutex::new(Tally::default());
    let ready = Barrier::new(n + 1);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Mutex::new(None::<Instant>);
    std::thread::scope(|scope| {
        for i in 0..n {
            let (tally, ready, stop, start) = (&tally, &ready, stop.clone(), &start);
            scope.spawn(move || {
                let session = device.connect(opts.clone());
                // Twice, with the main thread: every session is connected, then the window's start is set.
                ready.wait();
                ready.wait();
                let mut session = match session {
                    Ok(s) => s,
                    Err(e) => {
                        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                        t.errors += 1;
                        t.error.get_or_insert(e.to_string());
                        return;
                    }
                };
                let Some(t0) = *start.lock().unwrap_or_else(|p| p.into_inner()) else { return };
                let end = t0 + window;
                let gen = GenerateOptions { max_tokens, cancel: Some(stop.clone()), ..Default::default() };
                let mut k = i;
                while !stop.load(Ordering::Relaxed) {
                    let (mut last, mut first, mut count, mut gaps) = (Instant::now(), None, 0usize, Vec::new());
                    let submitted = last;
                    let got = session.generate(&prompts[k % prompts.len()], &gen, mode, |_| {
                        let now = Instant::now();
                        if now <= end {
                            count += 1;
                            match first {
                                None => first = Some(now - submitted),
                                Some(_) => gaps.push((now - last).as_secs_f64() * 1e3),
                            }
                        }
                        last = now;
                    });
                    k += 1;
                    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
                    t.tokens += count;
                    t.gaps_ms.extend(gaps);
                    match got {
                        Ok(g) if !g.cancelled => {
                            t.replies += 1;
                            if let Some(f) = first {
                                t.ttft_ms.push(f.as_secs_f64() * 1e3);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            t.errors += 1;
                            t.error.get_or_insert(e.to_string());
                            return;
                        }
                    }
                }
            });
        }
        ready.wait();
        let own = || crate::placement::cpu_seconds(std::process::id());
        let (cpu0, own0) = (cloud_cpu(), own());
        *start.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        ready.wait();
        std::thread::sleep(window);
        let (cpu1, own1) = (cloud_cpu(), own());
        stop.store(true, Ordering::Relaxed);
        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
        t.cloud_cpu = cpu0.zip(cpu1).map(|(a, b)| b - a);
        t.device_cpu = own0.zip(own1).map(|(a, b)| b - a);
    });
    tally.into_inner().unwrap_or_else(|p| p.into_inner())
}

pub fn run(args: LoadtestArgs, quiet: bool) -> Result<()> {
    args.spawn.check(args.spawn_cloud, "--spawn-cloud")?;
    if args.sessions.is_empty() || args.sessions.contains(&0) {
        bail!("--sessions takes concurrency levels of at least 1, e.g. 1,4,16,64");
    }
    if let Some(&n) = args.sessions.iter().find(|&&n| n > 1024) {
        bail!("--sessions {n}: at most 1024 sessions per level (each is a thread with its own caches)");
    }
    if !(args.duration.is_finite() && args.duration > 0.0 && args.duration <= 3600.0) {
        bail!("--duration must be between 0 and 3600 seconds");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if args.spawn_cloud {
        // Pinned before the device package opens: candle sizes its matmul pool once, at first use,
        // and a pool sized for both CPUs spins a worker on the device's one (it cost the device
        // sessions about half their throughput).
        if let Some((device, _)) = crate::placement::split_cores(args.spawn.cloud_cores)? {
            crate::placement::pin_self(&device)?;
        }
    }
    let device = DeviceRuntime::open(&args.artifacts.join(hat_runtime::package::DEVICE_DIR))?;
    let prompts = prompts(&device)?;
    let mode = match args.mode {
        LoadMode::Ushape => Mode::UShape,
        LoadMode::Hat => Mode::Hat { draft_len: 4 },
    };
    let token = args.auth_token_file.as_deref().map(read_token).transpose().context("--auth-token-file")?;
    let tls = args.tls.client_tls()?;
    let window = Duration::from_secs_f64(args.duration);
    let variants: Vec<Option<bool>> = match (args.spawn_cloud, args.compare_batching) {
        (false, _) => vec![None],
        (true, false) => vec![Some(true)],
        (true, true) => vec![Some(true), Some(false)],
    };
    let runs = (variants.len() * args.sessions.len()) as u64;
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(runs) };
    bar.set_style(
        ProgressStyle::with_template("{msg:42} [{bar:30}] {pos}/{len} levels, {elapsed}").expect("template").progress_chars("=> "),
    );
    let mut levels = Vec::new();
    let mut placement = String::from("a running cloud");
    for &n in &args.sessions {
        for &batching in &variants {
            let label = match batching {
                Some(true) => "batched",
                Some(false) => "unbatched",
                None => "cloud",
            };
            bar.set_message(format!("{n} sessions, {label}"));
            let spawned = match batching {
                Some(b) => {
                    let mut extra =
                        vec!["--max-sessions".to_string(), n.max(16).to_string(), "--max-context".into(), args.max_context.to_string()];
                    if b {
                        extra.extend(["--batch-window-ms".to_string(), args.batch_window_ms.to_string()]);
                    } else {
                        extra.push("--no-batching".into());
                    }
                    if let Some(mb) = args.kv_budget_mb {
                        extra.extend(["--kv-budget-mb".to_string(), mb.to_string()]);
                    }
                    let p = spawn_cloud_process_with(&args.artifacts, &extra, &args.spawn)?;
                    placement = p.placement.clone();
                    Some(p)
                }
                None => None,
            };
            let addr = match (&spawned, &args.cloud) {
                (Some(p), _) => p.addr.clone(),
                (None, Some(a)) => a.clone(),
                (None, None) => bail!("pass --cloud HOST:PORT or --spawn-cloud"),
            };
            let mut opts = CloudOptions::new(addr);
            opts.auth_token = token.clone();
            opts.tls = tls.clone();
            opts.insecure_auth = args.tls.insecure_auth;
            opts.check_transport()?;
            let cpu = || spawned.as_ref().and_then(|p| p.cpu_seconds());
            let t = run_level(&device, &opts, &prompts, (n, mode, window, args.max_tokens), &cpu);
            let cloud_peak_mb = spawned.as_ref().and_then(|p| p.peak_rss_bytes()).map(|b| b as f64 / 1e6);
            drop(spawned);
            levels.push(Level {
                sessions: n,
                batching,
                seconds: window.as_secs_f64(),
                tokens: t.tokens,
                tokens_per_s: t.tokens as f64 / window.as_secs_f64(),
                replies: t.replies,
                errors: t.errors,
                error: t.error,
                tbt_ms: Stats::of(t.gaps_ms),
                ttft_ms: Stats::of(t.ttft_ms),
                cloud_peak_mb,
                cloud_cpu_ms_per_token: t.cloud_cpu.filter(|_| t.tokens > 0).map(|s| s * 1e3 / t.tokens as f64),
                device_cpu_ms_per_token: t.device_cpu.filter(|_| t.tokens > 0).map(|s| s * 1e3 / t.tokens as f64),
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let mode_name = format!("{:?}", args.mode).to_lowercase();
    print!("{}", render(&levels, &mode_name, &placement));
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "mode": mode_name,
            "max_tokens": args.max_tokens,
            "placement": placement,
            "levels": levels,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, svg(&levels, &mode_name)).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn variant(l: &Level) -> &'static str {
    match l.batching {
        Some(true) => "batched",
        Some(false) => "unbatched",
        None => "cloud",
    }
}

fn render(levels: &[Level], mode: &str, placement: &str) -> String {
    let mut s = format!("hat loadtest, {mode}, {placement}\n\n");
    s += "| sessions | cloud | tokens/s | cloud CPU ms/token | device CPU ms/token | TBT ms p50 / p99 | TTFT ms p50 / p99 | replies | errors | cloud peak MB |\n";
    s += "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    let ms = |m: Option<f64>| m.map_or("-".to_string(), |m| format!("{m:.2}"));
    for l in levels {
        s += &format!(
            "| {} | {} | {:.1} | {} | {} | {:.1} / {:.1} | {:.0} / {:.0} | {} | {} | {} |\n",
            l.sessions,
            variant(l),
            l.tokens_per_s,
            ms(l.cloud_cpu_ms_per_token),
            ms(l.device_cpu_ms_per_token),
            l.tbt_ms.p50,
            l.tbt_ms.p99,
            l.ttft_ms.p50,
            l.ttft_ms.p99,
            l.replies,
            l.errors,
            l.cloud_peak_mb.map_or("-".to_string(), |m| format!("{m:.0}"))
        );
    }
    if let Some(e) = levels.iter().find_map(|l| l.error.as_deref()) {
        s += &format!("\nfirst error: {e}\n");
    }
    // Batched over unbatched, where both ran.
    let ratios: Vec<String> = levels
        .iter()
        .filter(|l| l.batching == Some(true))
        .filter_map(|b| {
            let u = levels.iter().find(|u| u.sessions == b.sessions && u.batching == Some(false))?;
            let cpu = match (u.cloud_cpu_ms_per_token, b.cloud_cpu_ms_per_token) {
                (Some(u), Some(b)) => format!(" (cloud CPU per token {:.2}x less)", u / b),
                _ => String::new(),
            };
            Some(format!("{} sessions {:.2}x{cpu}", b.sessions, b.tokens_per_s / u.tokens_per_s))
        })
        .collect();
    if !ratios.is_empty() {
        s += &format!("\nbatched / unbatched throughput: {}\n", ratios.join(", "));
    }
    s
}

fn svg(levels: &[Level], mode: &str) -> String {
    let mut sessions: Vec<usize> = levels.iter().map(|l| l.sessions).collect();
    sessions.dedup();
    let panel = |title: &str, unit: &str, value: fn(&Level) -> f64| Panel {
        title: title.into(),
        unit: unit.into(),
        groups: sessions
            .iter()
            .map(|&n| BarGroup {
                label: format!("{n} sessions"),
                bars: levels.iter().filter(|l| l.sessions == n).map(|l| (variant(l).to_string(), value(l))).collect(),
            })
            .collect(),
    };
    render_svg(
        &format!("hat loadtest ({mode})"),
        &[
            panel("Aggregate throughput", "tokens/s", |l| l.tokens_per_s),
            panel("Cloud CPU per token", "ms", |l| l.cloud_cpu_ms_per_token.unwrap_or(f64::NAN)),
            panel("Device sessions' CPU per token", "ms", |l| l.device_cpu_ms_per_token.unwrap_or(f64::NAN)),
            panel("Time between tokens, p50", "ms", |l| l.tbt_ms.p50),
        ],
    )
}
