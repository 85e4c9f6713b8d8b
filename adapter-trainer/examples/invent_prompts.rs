//! Prompts the model invents itself, for more draft-head training data (after Magpie, Xu et al.
//! 2024): the full split model is given its chat template up to where a user's turn begins and
//! samples the user's message. Only complete, one-line messages of 3 to 80 words are kept, once
//! each, and none that is a held-out prompt (written or invented), one of the shipped training
//! prompts or a line of an EXCLUDE file (an earlier run's prompts, so a second run with another
//! seed adds only new ones).
//!
//! With `--openings FILE`, each message starts with the first one to three words of a line of FILE
//! (the written training prompts: "Write a short", "Explain why", "Give me") and the model writes
//! the rest. Left alone, this model mostly asks "I'm considering ..., can you ..." questions; the
//! openings steer it towards the tasks people write (poems, code, explanations, lists) without
//! showing it a held-out prompt. With openings, a message on a held-out prompt's subject
//! (`data::near_held_out`) is dropped too, so a held-out topic does not come back in other words
//! (without, the filter stays off, so the earlier sets' commands still give their files).
//!
//! `cargo run --release -p hat-adapter-trainer --example invent_prompts -- [--openings FILE] ARTIFACTS_DIR N OUT [SEED [EXCLUDE...]]`
//!
//! The same package, N, seed, openings and exclusions give the same file.

use std::collections::HashSet;
use std::path::Path;

use candle_core::Device;
use hat_adapter_trainer::data::{held_out_prompts, near_held_out, prompt_lines};
use hat_adapter_trainer::distill::distill;
use hat_runtime::chat::render_user_prompt;
use hat_runtime::package::{CloudPackage, DevicePackage};
use hat_runtime::sampling::SamplingOptions;

const SENTINEL: &str = "@@HAT-USER-TURN@@";

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let openings: Vec<String> = match args.iter().position(|a| a == "--openings") {
        Some(i) if i + 1 < args.len() => {
            let file = args.remove(i + 1);
            args.remove(i);
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
            prompt_lines(&text)
        }
        Some(_) => {
            eprintln!("--openings needs a file");
            std::process::exit(2);
        }
        None => Vec::new(),
    };
    let (Some(dir), Some(n), Some(out)) = (args.first(), args.get(1).and_then(|n| n.parse::<usize>().ok()), args.get(2)) else {
        eprintln!("usage: invent_prompts [--openings FILE] ARTIFACTS_DIR N OUT [SEED [EXCLUDE...]]");
        std::process::exit(2);
    };
    let seed: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
    let dev = Device::Cpu;
    let device = DevicePackage::open(&Path::new(dir).join("device"), &dev).expect("device package");
    let cloud = CloudPackage::open(&Path::new(dir).join("cloud"), &dev).expect("cloud package");
    let info = device.manifest.tokenizer.as_ref().expect("tokenizer");
    let template = info.chat_template.as_deref().expect("inventing prompts needs a chat template");
    let bos = info.bos_token.as_ref().map(|t| t.content.as_str());
    let eos = info.eos_tokens.first().map(|t| t.content.as_str());
    let rendered = render_user_prompt(template, SENTINEL, bos, eos).expect("chat template");
    let prefix = &rendered[..rendered.find(SENTINEL).expect("the template keeps the user's text")];
    let ids = device.tokenizer.encode(prefix, false).expect("tokenizer").get_ids().to_vec();
    let eos_ids = device.eos_ids();

    let mut known: HashSet<String> = held_out_prompts();
    known.extend(prompt_lines(hat_adapter_trainer::feature_run::HEAD_PROMPTS));
    for file in args.iter().skip(4) {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
        known.extend(prompt_lines(&text));
    }
    let sampling = SamplingOptions { temperature: 0.8, top_p: Some(0.95), seed };
    let mut kept: Vec<String> = Vec::new();
    let bar = indicatif::ProgressBar::new(n as u64);
    let mut round = 0u64;
    let mut dropped = 0usize;
    while kept.len() < n && round < 64 {
        // Each call draws from its own seeded stream, so more rounds give new messages.
        let want = (n - kept.len()) * 3 / 2 + 16;
        let s = SamplingOptions { seed: sampling.seed.wrapping_add(round.wrapping_mul(7_919)), ..sampling };
        let starts: Vec<String> = (0..want).map(|i| opening(&openings, s.seed, i as u64)).collect();
        let prompts: Vec<Vec<u32>> = starts
            .iter()
            .map(|start| device.tokenizer.encode(format!("{prefix}{start}"), false).expect("tokenizer").get_ids().to_vec())
            .collect();
        let answers = distill(&device, &cloud, &prompts, 96, 32, s, &indicatif::ProgressBar::hidden()).expect("generation");
        for (a, start) in answers.into_iter().zip(&starts) {
            // The answer's own prompt ends with the opening's tokens; the message is what follows the template.
            let new = &a.tokens[ids.len()..];
            let Some((last, body)) = new.split_last() else { continue };
            if !eos_ids.contains(last) || a.tokens[..ids.len()] != ids[..] {
                continue;
            }
            let text = device.tokenizer.decode(body, true).expect("decode");
            let text = text.trim();
            let words = text.split_whitespace().count();
            if text.contains('\n') || !(3..=80).contains(&words) || text.contains(SENTINEL) || !text.starts_with(start.as_str()) {
                continue;
            }
            if !openings.is_empty() && near_held_out(text) {
                dropped += 1;
                continue;
            }
            if known.insert(text.to_string()) && kept.len() < n {
                kept.push(text.to_string());
                bar.inc(1);
            }
        }
        round += 1;
    }
    bar.finish_and_clear();
    std::fs::write(out, kept.join("\n") + "\n").expect("write the prompts");
    eprintln!("{} prompts in {} rounds -> {out} ({dropped} dropped as too near a held-out prompt)", kept.len(), round);
}

/// The opening of message `i`: the first one to three words of one of the openings' lines (never the
/// whole line), or nothing without openings. A fixed hash of (seed, i), so a run repeats exactly.
fn opening(openings: &[String], seed: u64, i: u64) -> String {
    if openings.is_empty() {
        return String::new();
    }
    let h = splitmix(seed ^ splitmix(i));
    let line: Vec<&str> = openings[(h % openings.len() as u64) as usize].split_whitespace().collect();
    let words = (1 + (h >> 32) % 3) as usize;
    line[..words.min(line.len().saturating_sub(1)).max(1)].join(" ")
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
