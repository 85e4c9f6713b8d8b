use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hat_runtime::package::default_device;
use hat_runtime::{CloudPackage, CloudServer, ServerConfig};

/// Run one side of a split model as a server.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(subcommand)]
    side: Side,
}

#[derive(Subcommand, Debug)]
enum Side {
    Cloud(CloudArgs),
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
}

pub fn run(args: ServeArgs, quiet: bool) -> Result<()> {
    let Side::Cloud(args) = args.side;
    if args.max_sessions == 0 {
        anyhow::bail!("--max-sessions must be at least 1");
    }
    let auth_token = match &args.auth_token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f).with_context(|| format!("cannot read --auth-token-file {}", f.display()))?;
            let t = t.trim().to_string();
            if t.is_empty() {
                anyhow::bail!("--auth-token-file {} is empty", f.display());
            }
            Some(t)
        }
        None => None,
    };
    let package = CloudPackage::open(&args.package, &default_device())?;
    let cfg = ServerConfig {
        max_sessions: args.max_sessions,
        max_context: args.max_context.unwrap_or(usize::MAX),
        auth_token,
        log: !quiet,
        ..ServerConfig::default()
    };
    let server = CloudServer::start(&package, cfg, &args.listen)?;
    println!("listening on {}", server.local_addr());
    server.run_until_ctrl_c()?;
    Ok(())
}
