//! `hat`: argument parsing and printing only; the work lives in the splitter and runtime crates.

mod audit_cmd;
mod bench_cmd;
mod bench_report;
mod common;
mod generate_cmd;
mod loadtest_cmd;
mod openai_req;
mod placement;
mod plot;
mod profile_cmd;
mod serve_cmd;
mod serve_device;
mod split_cmd;
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "hat",
    version,
    about = "Device-cloud collaborative LLM inference (HAT): split a Llama-family model so raw text never leaves the device",
    long_about = "hat cuts a Llama-family model into an input and an output submodel that stay on the device and a \
                  middle submodel that runs in the cloud. Only hidden states cross the network.\n\n\
                  Typical use:\n  hat split --model model.gguf --input-layers 2 --output-layers 2 --out artifacts\n  \
                  hat serve cloud --package artifacts/cloud --listen 127.0.0.1:7070\n  \
                  hat generate --artifacts artifacts --cloud 127.0.0.1:7070 --mode hat --chat --prompt \"What is the capital of France?\""
)]
struct Cli {
    /// Hide progress bars and status lines (results still go to stdout).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Split(split_cmd::SplitArgs),
    Generate(generate_cmd::GenerateArgs),
    Serve(serve_cmd::ServeArgs),
    TrainAdapter(train_cmd::TrainArgs),
    Profile(profile_cmd::ProfileArgs),
    Bench(bench_cmd::BenchArgs),
    Loadtest(loadtest_cmd::LoadtestArgs),
    Audit(audit_cmd::AuditArgs),
}

fn main() {
    let cli = Cli::parse();
    hat_model::cpu::keep_freed_memory();
    size_thread_pools();
    let result = match cli.command {
        Command::Split(args) => split_cmd::run(args, cli.quiet),
        Command::Generate(args) => generate_cmd::run(args, cli.quiet),
        Command::Serve(args) => serve_cmd::run(args, cli.quiet),
        Command::TrainAdapter(args) => train_cmd::run_cmd(args, cli.quiet),
        Command::Profile(args) => profile_cmd::run(args, cli.quiet),
        Command::Bench(args) => bench_cmd::run(args, cli.quiet),
        Command::Loadtest(args) => loadtest_cmd::run(args, cli.quiet),
        Command::Audit(args) => audit_cmd::run(args, cli.quiet),
    };
    if let Err(e) = result {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// Sizes candle's and rayon's thread pools to the CPUs this process may use, unless
/// `RAYON_NUM_THREADS` says otherwise. Left alone, candle counts the machine's physical cores and its
/// matmul workers spin at a barrier: under `taskset -c 0`, or a container's CPU quota, two workers
/// on one CPU made the cloud middle's forward 15x slower. `available_parallelism` counts the
/// affinity mask and the cgroup quota.
fn size_thread_pools() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        if let Ok(n) = std::thread::available_parallelism() {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
}

/// The whole cause chain on one line: what failed and why. A cause whose words its parent's message
/// already ends with (the `Io { context, source }` errors print their source) is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.ends_with(&text) {
            line = format!("{line}: {text}");
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_cause_its_parent_already_prints_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::from(hat_adapter_trainer::TrainError::io("cannot read x", io)).context("training");
        assert_eq!(one_line(&e), "training: cannot read x: no such file");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(one_line(&e), "outer: inner");
    }
}
