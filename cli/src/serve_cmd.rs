use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hat_runtime::baseline::WholeModel;
use hat_runtime::package::default_device;
use hat_runtime::{BatchConfig, CloudPackage, CloudServer, DevicePackage, ServerConfig, ServerTls};

use crate::common::read_token;

/// Run one side of a split model as a server.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(subcommand)]
    side: Side,
}

#[derive(Subcommand, Debug)]
enum Side {
    Cloud(CloudArgs),
    Device(crate::serve_device::DeviceArgs),
}

/// Serve the middle submodel to devices over TCP.
///
/// Each device connection gets its own session and KV cache. Only hidden states arrive here: the
/// cloud package has no embedding, no LM head and no tokenizer. One line per session goes to stderr.
#[derive(Args, Debug)]
struct CloudArgs {
    /// The cloud package (`hat split --out DIR` wrote DIR/cloud).
    #[arg(long)]
    package: PathBuf,
    /// Address to listen on, host:port (port 0 picks a free one and prints it).
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// File holding a shared secret devices must present (whitespace around it is ignored).
    #[arg(long)]
    auth_token_file: Option<PathBuf>,
    /// Sessions served at once; more are refused as busy and the devices retry.
    #[arg(long, default_value_t = 16)]
    max_sessions: usize,
    /// Positions one session may hold (default: the model's context). Bounds memory per session.
    #[arg(long)]
    max_context: Option<usize>,
    /// Megabytes all sessions' KV caches may take together. A session reserves its context's
    /// worth when it opens (see the startup line for MB per session); one that would pass the
    /// budget is refused as busy, and the device retries. Default: no budget.
    #[arg(long, value_name = "MB")]
    kv_budget_mb: Option<f64>,
    /// How long a forward waits for other sessions' forwards to join its batch (milliseconds). A
    /// lone session never waits. Batched rows give each session exactly its solo output.
    #[arg(long, default_value_t = 2.0, value_name = "MS")]
    batch_window_ms: f64,
    /// Rows in one batched forward at most.
    #[arg(long, default_value_t = 512, value_name = "ROWS")]
    max_batch_rows: usize,
    /// Run each session's forward alone (on its own thread), as before batching existed.
    #[arg(long)]
    no_batching: bool,
    /// Also load the device package at this path and serve the unsplit model for `hat bench`'s
    /// `cloud` and `sd` baselines. Those send token ids to the cloud: for benchmarks only.
    #[arg(long, value_name = "DEVICE_DIR")]
    token_baselines: Option<PathBuf>,
    /// Run only on these CPUs (e.g. `1` or `2-3`), with one compute thread per CPU. `hat bench
    /// --spawn-cloud` uses it to keep the cloud off the device's cores.
    #[arg(long, value_name = "LIST")]
    cpus: Option<crate::placement::Cpus>,
    /// Serve in TLS with this certificate chain (PEM). Without it the wire is plain TCP, which is
    /// only private on loopback or inside a trusted network.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require every device to present a certificate signed by this CA (mutual TLS; PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Where the middle submodel and its KV caches live: cpu, or a GPU as cuda or cuda:N (needs a
    /// CUDA build, see scripts/build-cuda.sh). States cross the wire as before; they move to the GPU
    /// once per forward and back once per reply.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    device: hat_runtime::ComputeDevice,
    /// The middle's compute dtype: f32, bf16 or f16. Default: f32 on the CPU; on a GPU bf16 for a
    /// dense package. A quantized package computes in f32 everywhere (its matrices keep their types).
    #[arg(long, value_parser = hat_runtime::gpu::parse_dtype)]
    dtype: Option<candle_core::DType>,
    /// Serve Prometheus metrics at http://ADDR/metrics (sessions open, positions computed, forward
    /// time, bytes in and out, errors by class). Port 0 picks a free one and prints it.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
}

pub fn run(args: ServeArgs, quiet: bool) -> Result<()> {
    let args = match args.side {
        Side::Cloud(args) => args,
        Side::Device(args) => return crate::serve_device::run(args, quiet),
    };
    if let Some(cpus) = &args.cpus {
        crate::placement::pin_self(&cpus.0)?;
    }
    if args.max_sessions == 0 {
        anyhow::bail!("--max-sessions must be at least 1");
    }
    if !(args.batch_window_ms.is_finite() && (0.0..=1000.0).contains(&args.batch_window_ms)) {
        anyhow::bail!("--batch-window-ms must be between 0 and 1000");
    }
    if args.max_batch_rows == 0 {
        anyhow::bail!("--max-batch-rows must be at least 1");
    }
    if args.kv_budget_mb.is_some_and(|mb| !(mb.is_finite() && mb > 0.0)) {
        anyhow::bail!("--kv-budget-mb must be a number of megabytes above 0");
    }
    let auth_token = args.auth_token_file.as_deref().map(read_token).transpose().context("--auth-token-file")?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(ServerTls::from_pem_files(cert, key, args.client_ca.as_deref())?),
        _ => None,
    };
    let compute = hat_runtime::gpu::open(args.device)?;
    let package = CloudPackage::open_with(&args.package, &compute, args.dtype)?;
    if !compute.is_cpu() {
        // One forward before listening: a package the GPU cannot run fails here, not in a session.
        let stored = package.manifest.shard("middle").and_then(|m| m.quant.clone()).unwrap_or_else(|| package.manifest.dtype.clone());
        let dtype = package.middle.dtype().as_str();
        warm_up(&package).with_context(|| {
            format!("the middle submodel ({stored} matrices, computing in {dtype}) does not run on {}; try --device cpu", args.device)
        })?;
    }
    let baselines = match &args.token_baselines {
        Some(dir) => {
            let device = DevicePackage::open(dir, &default_device())?;
            Some(Arc::new(WholeModel::new(&device, &package)?))
        }
        None => None,
    };
    let cfg = ServerConfig {
        max_sessions: args.max_sessions,
        max_context: args.max_context.unwrap_or(usize::MAX),
        auth_token,
        log: !quiet,
        baselines,
        tls,
        batch: (!args.no_batching)
            .then(|| BatchConfig { window: std::time::Duration::from_secs_f64(args.batch_window_ms / 1e3), max_rows: args.max_batch_rows }),
        kv_budget: args.kv_budget_mb.map(|mb| (mb * 1e6) as usize),
        ..ServerConfig::default()
    };
    let plain = cfg.tls.is_none();
    let server = CloudServer::start(&package, cfg, &args.listen)?;
    if plain && !server.local_addr().ip().is_loopback() {
        // Shown even with --quiet, as llama.cpp's RPC server does.
        eprintln!(
            "warning: serving {} without TLS: hidden states (from which the prompt's tokens can be recovered, see `hat audit`) \
             and auth tokens cross the network in the clear; pass --tls-cert and --tls-key",
            server.local_addr()
        );
    }
    if let Some(listen) = &args.metrics_listen {
        let addr = crate::serve_device::serve_metrics(listen, server.metrics())?;
        println!("metrics on {addr}");
    }
    if !quiet {
        let m = &package.middle;
        eprintln!("middle submodel on {} in {}", args.device, m.dtype().as_str());
    }
    println!("listening on {}", server.local_addr());
    server.run_until_ctrl_c()?;
    Ok(())
}

/// Runs the middle once on two rows at position 0 with a throwaway cache.
fn warm_up(package: &CloudPackage) -> Result<()> {
    let m = &package.middle;
    let states = candle_core::Tensor::zeros((1, 2, m.config().hidden_size), candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let out = m.forward_layers(&states, 0, &mut m.new_cache())?;
    let finite = out.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite());
    anyhow::ensure!(finite, "its output on zeros is not finite");
    Ok(())
}
