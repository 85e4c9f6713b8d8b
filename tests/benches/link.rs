//! U-shaped against HAT decoding over an emulated WAN, side by side in one run, on the default model
//! (split 2/2) with the cloud in this process on loopback. Runs are interleaved so machine noise
//! hits every configuration alike. Reports TBT, TTFT, tokens per round trip, and bytes per decoded
//! token in each direction (the prompt's round is subtracted: a run with one new token measures it).
//!
//! `cargo bench -p hat-tests --bench link` (env: HAT_LINK_MBPS=50, HAT_LINK_RTT_MS=40,
//! HAT_BENCH_TOKENS=48, HAT_BENCH_ROUNDS=3, HAT_DRAFT_LEN=4; HAT_ARTIFACTS=DIR to use a split of your
//! own, for example one with a trained adapter).

use std::time::Duration;

use candle_core::Device;
use hat_runtime::link::LinkEmulation;
use hat_runtime::{CloudOptions, CloudPackage, CloudServer, DeviceRuntime, GenerateOptions, Mode, ServerConfig, WireDType, WireFormat};
use hat_tests::{default_artifacts, median, PROMPTS};

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Config {
    name: String,
    mode: Mode,
    wire: WireFormat,
}

fn main() {
    let mbps: f64 = env("HAT_LINK_MBPS", 50.0);
    let rtt_ms: f64 = env("HAT_LINK_RTT_MS", 40.0);
    let tokens: usize = env("HAT_BENCH_TOKENS", 48);
    let rounds: usize = env("HAT_BENCH_ROUNDS", 3);
    let k: usize = env("HAT_DRAFT_LEN", 4);
    let own = std::env::var("HAT_ARTIFACTS").ok().map(std::path::PathBuf::from);
    let dir = own.as_deref().unwrap_or_else(|| default_artifacts());
    let device = DeviceRuntime::open(&dir.join("device")).expect("device");
    let cloud = CloudPackage::open(&dir.join("cloud"), &Device::Cpu).expect("cloud");
    let server = CloudServer::start(&cloud, ServerConfig { log: false, ..Default::default() }, "127.0.0.1:0").expect("server");
    let link = LinkEmulation::new(mbps, Duration::from_secs_f64(rtt_ms / 1e3));
    println!(
        "link {mbps} Mbps / {rtt_ms} ms RTT, {tokens} new tokens, {} prompts x {rounds} rounds, adapter: {}",
        PROMPTS.len(),
        device.adapter().origin
    );

    let wire = |dtype, zstd| WireFormat { dtype, zstd };
    let configs = [
        Config { name: "ushape f16".into(), mode: Mode::UShape, wire: wire(WireDType::F16, false) },
        Config { name: "ushape f16+zstd".into(), mode: Mode::UShape, wire: wire(WireDType::F16, true) },
        Config { name: "ushape f32".into(), mode: Mode::UShape, wire: wire(WireDType::F32, false) },
        Config { name: format!("hat k={k} f16"), mode: Mode::Hat { draft_len: k }, wire: wire(WireDType::F16, false) },
        Config { name: format!("hat k={k} f16+zstd"), mode: Mode::Hat { draft_len: k }, wire: wire(WireDType::F16, true) },
    ];
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| device.prompt_ids(p, false).expect("encode")).collect();
    let opts = GenerateOptions { max_tokens: tokens, ..Default::default() };
    let one = GenerateOptions { max_tokens: 1, ..Default::default() };

    // Per config: TBT and TTFT samples (ms), rounds, decode tokens, decode bytes up and down.
    let mut tbt = vec![Vec::new(); configs.len()];
    let mut ttft = vec![Vec::new(); configs.len()];
    let mut totals = vec![(0usize, 0usize, 0u64, 0u64); configs.len()];
    for _ in 0..rounds {
        for (c, cfg) in configs.iter().enumerate() {
            let mut o = CloudOptions::new(server.local_addr().to_string());
            o.wire = cfg.wire;
            o.link = Some(link);
            let mut session = device.connect(o).expect("connect");
            for p in &prompts {
                let prefill = session.generate(p, &one, cfg.mode, |_| {}).expect("prefill");
                let g = session.generate(p, &opts, cfg.mode, |_| {}).expect("generate");
                tbt[c].push(g.tbt.as_secs_f64() * 1e3);
                ttft[c].push(g.ttft.as_secs_f64() * 1e3);
                let t = &mut totals[c];
                t.0 += g.rounds;
                t.1 += g.tokens.len() - 1;
                t.2 += g.traffic.bytes_up - prefill.traffic.bytes_up;
                t.3 += g.traffic.bytes_down - prefill.traffic.bytes_down;
            }
        }
    }
    println!("| config | TBT ms (median) | TTFT ms (median) | tokens per round trip | bytes up / token | bytes down / token |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (c, cfg) in configs.iter().enumerate() {
        let (r, n, up, down) = totals[c];
        println!(
            "| {} | {:.1} | {:.1} | {:.3} | {:.0} | {:.0} |",
            cfg.name,
            median(tbt[c].clone()),
            median(ttft[c].clone()),
            n as f64 / r as f64,
            up as f64 / n as f64,
            down as f64 / n as f64
        );
    }
    let (u, h) = (median(tbt[0].clone()), median(tbt[3].clone()));
    println!("TBT hat/ushape (f16): {:.2}", h / u);
}
