//! Held-out accept_len of a package's draft head with 0 to 4 leaves a round (`Draft::leaves`): the
//! first PROMPTS held-out prompts (never trained on; default 24 of 32), TOKENS new tokens (default
//! 48), at most 4 drafts, the head's own threshold, greedy, in process (`evaluate_drafter`, as
//! `hat train-adapter` reports it), and the share of rounds whose first draft was accepted.
//! FILE, one prompt a line, replaces the held-out set: prompts of another kind that were never
//! trained on either, such as a fresh invented set.
//!
//! `cargo run --release -p hat-adapter-trainer --example heldout_leaves -- ARTIFACTS_DIR [PROMPTS [TOKENS [FILE]]]`

use candle_core::Device;
use hat_runtime::{
    draft::Drafter,
    draft_head::FeatureHead,
    package::{CloudPackage, DevicePackage},
};
use std::path::Path;
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: usize| args.get(i).map_or(Some(default), |a| a.parse().ok());
    let (Some(dir), Some(count), Some(tokens)) = (args.first(), number(1, 24), number(2, 48)) else {
        eprintln!("usage: heldout_leaves ARTIFACTS_DIR [PROMPTS [TOKENS [FILE]]]");
        std::process::exit(2);
    };
    let dev = Device::Cpu;
    let device = DevicePackage::open(&Path::new(&dir).join("device"), &dev).expect("device package");
    let cloud = CloudPackage::open(&Path::new(&dir).join("cloud"), &dev).expect("cloud package");
    let text = match args.get(3) {
        Some(file) => std::fs::read_to_string(file).unwrap_or_else(|e| {
            eprintln!("cannot read {file}: {e}");
            std::process::exit(2);
        }),
        None => hat_adapter_trainer::data::HELDOUT_PROMPTS.to_string(),
    };
    let held: Vec<String> = hat_adapter_trainer::data::prompt_lines(&text).into_iter().take(count).collect();
    let prompts: Vec<Vec<u32>> = held.iter().map(|p| hat_adapter_trainer::data::chat_prompt(&device, p).expect("prompt")).collect();
    for (max, thr) in [(0usize, 0f32), (1, 0.15), (2, 0.1), (4, 0.0)] {
        let head = FeatureHead::load(&device.dir.join(hat_runtime::draft_head::DRAFT_HEAD_FILE), &device, &dev).expect("draft head");
        let d = Drafter::feature(head, None).with_leaves(max, thr);
        let t = std::time::Instant::now();
        let r = hat_adapter_trainer::eval::evaluate_drafter(&device, &cloud, d, &prompts, tokens, 4).expect("evaluation");
        println!(
            "leaves {max} at {thr}: accept_len {:.3}, first draft accepted in {:.3} of rounds ({} tokens, {} rounds, {:.2} drafts/round) {:.0}s",
            r.accept_len,
            r.top1,
            r.tokens,
            r.rounds,
            r.drafted as f64 / r.rounds as f64,
            t.elapsed().as_secs_f64()
        );
    }
}
