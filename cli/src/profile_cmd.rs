use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use hat_profiles::{measure, Profile, ProfileOptions};
use hat_runtime::package::DEVICE_DIR;
use hat_runtime::{CloudOptions, DeviceRuntime};

use crate::common::{read_token, LinkArg};
use crate::placement::spawn_cloud_process;

/// Measure the device, the cloud and the link, and write the prompt chunk-size table.
///
/// Times the input submodel, the output submodel, the draft adapter and the LM head on this device
/// over a range of chunk sizes and context offsets; the middle submodel through the cloud server
/// (the server reports its own compute time, so this is the real cloud's speed); and the link's RTT
/// and throughput with probes. A pipeline model of chunked prefill (input on chunk c+1 while chunk c
/// uploads and runs in the cloud while chunk c-1's output layers run) then predicts the time to first
/// token of each chunk size, and the best one per prompt-length and bandwidth bucket goes into
/// DIR/device/profile.json, which `--chunk-size auto` reads. Takes about a minute on a laptop CPU.
#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// The directory `hat split --out` wrote.
    #[arg(long)]
    artifacts: PathBuf,
    /// host:port of `hat serve cloud`; without it the cloud runs from DIR/cloud as its own process
    /// pinned to its own CPUs, and this process (the device) to the others.
    #[arg(long)]
    cloud: Option<String>,
    #[command(flatten)]
    spawn: crate::placement::SpawnArgs,
    /// Where to write the profile (default DIR/device/profile.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure over an emulated link, MBPS,RTT_MS[,JITTER_MS].
    #[arg(long, value_name = "MBPS,RTT_MS")]
    link: Option<LinkArg>,
    /// File holding the cloud's shared secret.
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    #[command(flatten)]
    tls: crate::common::ClientTlsArgs,
    /// Chunk sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = ProfileOptions::default().sizes)]
    sizes: Vec<usize>,
    /// Timed repetitions per point (the median is kept).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

pub fn run(args: ProfileArgs, quiet: bool) -> Result<()> {
    args.spawn.check(args.cloud.is_none(), "without --cloud")?;
    if args.sizes.is_empty() || args.sizes.contains(&0) {
        bail!("--sizes must list chunk sizes of at least 1");
    }
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    // Without --cloud, the cloud runs as its own process on its own cores (before any compute here
    // starts threads), as it would on its own machine.
    let spawned = match &args.cloud {
        Some(_) => None,
        None => Some(spawn_cloud_process(&args.artifacts, false, &args.spawn)?),
    };
    let device = DeviceRuntime::open(&args.artifacts.join(DEVICE_DIR))?;
    let mut sizes = args.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let opts = ProfileOptions { sizes, reps: args.reps, ..ProfileOptions::default() };
    let (server, addr, label) = match &args.cloud {
        Some(a) => (None, a.clone(), a.clone()),
        None => {
            let s = spawned.context("the cloud process")?;
            let (a, label) = (s.addr.clone(), format!("local process: {}", s.placement));
            (Some(s), a, label)
        }
    };
    let mut cloud = CloudOptions::new(addr);
    cloud.link = args.link.map(|l| l.0);
    cloud.tls = args.tls.client_tls()?;
    cloud.insecure_auth = args.tls.insecure_auth;
    if let Some(f) = &args.auth_token_file {
        cloud.auth_token = Some(read_token(f).context("--auth-token-file")?);
    }
    let profile = measure(&device, cloud, &label, &opts, |line| {
        if !quiet {
            eprintln!("profiling {line}");
        }
    })?;
    drop(server);
    let out = args.out.clone().unwrap_or_else(|| Profile::path(&device.package.dir));
    profile.save(&out)?;
    print_profile(&profile);
    if !quiet {
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

fn print_profile(p: &Profile) {
    let c = &p.costs;
    println!(
        "link: RTT {:.1} ms, {:.1} Mbps up, {:.1} Mbps down; cloud: {}; wire {} ({} B per position)",
        p.link.rtt_ms, p.link.up_mbps, p.link.down_mbps, p.cloud, p.wire, c.row_bytes
    );
    println!("{:>8} {:>12} {:>12} {:>12} {:>12}   (ms per chunk at offset 0)", "chunk", "dev input", "dev output", "adapter", "cloud mid");
    for (i, s) in c.device_input.sizes.iter().enumerate() {
        println!(
            "{s:>8} {:>12.2} {:>12.2} {:>12.2} {:>12.2}",
            c.device_input.ms[0][i], c.device_output.ms[0][i], c.device_adapter.ms[0][i], c.cloud_middle.ms[0][i]
        );
    }
    println!("LM head (one position): {:.2} ms", c.head_ms);
    print!("{}", p.table.render());
}
