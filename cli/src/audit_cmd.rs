use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use hat_adapter_trainer::audit::{cache_dir, cached_audit, AuditOptions, AuditReport, DEFAULT_FIT_TOKENS};

use crate::plot::{render_svg, BarGroup, Panel};

/// Measure how much text the cloud could read back from the hidden states it receives.
///
/// HAT keeps raw text on the device, but the hidden states it uploads can be inverted. This command
/// plays the curious cloud operator: for each depth (the number of layers the device runs before
/// uploading, a split's --input-layers) it computes the states the cloud would see, fits attacks on
/// public text and counts how many held-out tokens they recover (top-1 and top-10 among the whole
/// vocabulary):
///
/// - nearest: cosine of the raw state with each row of the token embedding (nothing learned).
///
/// - linear: ridge regression from standardised states to the token's embedding (closed form).
///
/// - mlp: the ridge map plus a hidden layer beside it (Linear(d, 1024), GELU, Linear(1024, d)),
///   trained with a softmax over cosine similarities to the embedding rows.
///
/// The strongest attack is what counts. Each row also gives the device compute that depth costs per
/// token (one decode step with 64 cached positions, median, on this machine). The states come from
/// the package's own weights as stored (DIR/device's input layers, then DIR/cloud's middle layers).
///
/// Fit text defaults to the prompts shipped with hat (adapter-trainer/prompts/draft-head.txt and
/// self-distill.txt, built in), held-out text to adapter-trainer/prompts/heldout.txt; a fit line
/// that also appears in the held-out text is dropped. Writes DIR/audit.json and a copy in hat's
/// cache ($HAT_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/hat, under audits/), keyed by the stored
/// weights, so that `hat split` of the same model at any depth reports the audit's number.
#[derive(Args, Debug)]
pub struct AuditArgs {
    /// The directory `hat split --out` wrote; device/ and cloud/ are both needed (states after deeper
    /// splits pass through the middle submodel's layers).
    #[arg(long)]
    artifacts: PathBuf,
    /// Fit text: one sequence per line, tokenized as plain text. Default: hat's shipped prompts.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Held-out text the attacks are scored on: one sequence per line. Default: hat's held-out prompts.
    #[arg(long)]
    heldout: Option<PathBuf>,
    /// Depths to audit, comma-separated (e.g. 1,2,4,8). Default: 1, 2, 4, 8, 16 and the package's own
    /// --input-layers, up to the model's layers minus the package's output layers.
    #[arg(long, value_delimiter = ',')]
    input_layers: Option<Vec<usize>>,
    /// Tokens of fit text the attacks learn from (special tokens such as BOS are not counted).
    #[arg(long, default_value_t = DEFAULT_FIT_TOKENS)]
    fit_tokens: usize,
    /// Training epochs of the mlp attack.
    #[arg(long, default_value_t = hat_adapter_trainer::inversion::MlpConfig::default().epochs)]
    mlp_epochs: usize,
    /// Seed of the mlp attack (initialisation and batch order); runs with the same seed repeat.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the result as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also draw recovery and device time against depth as an SVG bar chart.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Experiment, not a mitigation hat ships: Gaussian noise of these multiples of each dimension's
    /// standard deviation on the states at the package's own depth; reports recovery and how often
    /// greedy output changes.
    #[arg(long, value_delimiter = ',', hide = true)]
    noise: Vec<f64>,
}

pub fn run(args: AuditArgs, quiet: bool) -> Result<()> {
    if args.plot.as_ref().is_some_and(|p| p.extension().and_then(|e| e.to_str()) != Some("svg")) {
        bail!("--plot writes SVG: give it a .svg path");
    }
    let mut opts = AuditOptions::new(&args.artifacts);
    opts.depths = args.input_layers;
    opts.fit_text = args.text;
    opts.heldout_text = args.heldout;
    opts.fit_tokens = args.fit_tokens;
    opts.mlp.epochs = args.mlp_epochs;
    opts.mlp.seed = args.seed;
    opts.noise = args.noise;
    opts.progress = !quiet;
    let report = hat_adapter_trainer::audit::run(&opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, &args.artifacts));
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, svg(&report)).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// The human table.
fn render(r: &AuditReport, artifacts: &Path) -> String {
    let mut out = format!(
        "hat audit: {} layers, this package uploads after {} ({}); fit {} tokens ({} lines), held-out {} tokens ({} lines)\n\n",
        r.split.num_layers, r.split.input_layers, r.storage, r.fit.tokens, r.fit.lines, r.heldout.tokens, r.heldout.lines
    );
    out += "| depth | nearest top1 / top10 | linear top1 / top10 | mlp top1 / top10 | best top1 / top10 | device ms/token |\n";
    out += "| --- | --- | --- | --- | --- | --- |\n";
    for d in &r.depths {
        let mark = if d.depth == r.split.input_layers { " (this split)" } else { "" };
        out += &format!(
            "| {}{mark} | {} / {} | {} / {} | {} / {} | **{}** / {} ({}) | {:.2} |\n",
            d.depth,
            pct(d.nearest.top1),
            pct(d.nearest.top10),
            pct(d.linear.top1),
            pct(d.linear.top10),
            pct(d.mlp.top1),
            pct(d.mlp.top10),
            pct(d.best.top1),
            pct(d.best.top10),
            d.best_attack,
            d.device_ms_per_token
        );
    }
    out +=
        &format!("\nsanity: nearest-embedding on the embeddings themselves (depth 0) recovers {} top-1\n", pct(r.embedding_nearest.top1));
    out += &format!("fit text: {}\nheld-out text: {}\n", r.fit.source, r.heldout.source);
    if !r.noise.is_empty() {
        out += &format!(
            "\nnoise on the uploaded states at depth {} (x each dimension's std; attacks refitted on noisy states):\n",
            r.split.input_layers
        );
        out += "| noise std | linear top1 | mlp top1 | best top1 | greedy next token changed |\n| --- | --- | --- | --- | --- |\n";
        for n in &r.noise {
            out += &format!(
                "| {} | {} | {} | {} | {} of {} positions |\n",
                n.noise_std,
                pct(n.linear.top1),
                pct(n.mlp.top1),
                pct(n.best_top1),
                pct(n.greedy_changed),
                n.positions
            );
        }
    }
    out += &format!("written: {} ({:.1} s)\n", artifacts.join(hat_adapter_trainer::audit::AUDIT_FILE).display(), r.seconds);
    out
}

fn svg(r: &AuditReport) -> String {
    let group = |d: &hat_adapter_trainer::audit::DepthAudit, bars: Vec<(&str, f64)>| BarGroup {
        label: format!("depth {}", d.depth),
        bars: bars.into_iter().map(|(m, v)| (m.to_string(), v)).collect(),
    };
    let panels = vec![
        Panel {
            title: "Best attack".into(),
            unit: "% of held-out tokens".into(),
            groups: r.depths.iter().map(|d| group(d, vec![("top-1", 100.0 * d.best.top1), ("top-10", 100.0 * d.best.top10)])).collect(),
        },
        Panel {
            title: "Top-1 per attack".into(),
            unit: "% of held-out tokens".into(),
            groups: r
                .depths
                .iter()
                .map(|d| {
                    group(d, vec![("nearest", 100.0 * d.nearest.top1), ("linear", 100.0 * d.linear.top1), ("mlp", 100.0 * d.mlp.top1)])
                })
                .collect(),
        },
        Panel {
            title: "Device compute per token".into(),
            unit: "ms".into(),
            groups: r.depths.iter().map(|d| group(d, vec![("device ms/token", d.device_ms_per_token)])).collect(),
        },
    ];
    render_svg(&format!("hat audit: held-out tokens the cloud recovers from the uploaded states ({} layers)", r.split.num_layers), &panels)
}

/// The line `hat split` prints about the depth it just cut at.
pub fn privacy_line(out: &Path, input_layers: usize) -> String {
    let Some(cache) = cache_dir() else {
        return "privacy: no cache directory (set HAT_CACHE_DIR or HOME) to look up an audit in".into();
    };
    match cached_audit(out, &cache) {
        Ok(Some(r)) => match r.depth(input_layers) {
            Some(d) => format!(
                "privacy: hat audit found {:.1}% of held-out tokens recoverable from the states this split uploads \
                 ({input_layers} input layers); see README \"Threat model\"",
                100.0 * d.best.top1
            ),
            None => format!(
                "privacy: the audit of this model has no row for {input_layers} input layers: run hat audit --artifacts {} \
                 --input-layers {input_layers}",
                out.display()
            ),
        },
        Ok(None) => format!("privacy: no audit for this model yet: run hat audit --artifacts {}", out.display()),
        Err(e) => format!("privacy: cannot look up an audit of this model ({e}); run hat audit --artifacts {}", out.display()),
    }
}
