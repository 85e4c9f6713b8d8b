//! What `hat bench` reports: every run, a summary per link, mode and prompt kind, and the hat/ushape
//! ratios measured side by side in the same run.

use std::collections::BTreeSet;

use hat_runtime::{Generation, RoundTime};
use serde::Serialize;

use crate::bench_cmd::{BenchMode, BenchPrompt};
use crate::plot::{render_svg, BarGroup, Panel};

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub link: String,
    pub mode: String,
    pub exposes_tokens: bool,
    pub prompt: String,
    pub kind: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub ttft_ms: f64,
    pub tbt_ms: f64,
    /// Time between consecutive tokens as the caller got them.
    pub gaps_ms: Vec<f64>,
    pub rounds: usize,
    pub accept_len: f64,
    /// Drafting while verifying: rounds drafted during the round before, and those kept.
    pub speculated: usize,
    pub prepared: usize,
    /// Leaves verified and kept (see `Draft::leaves`).
    pub leaves: usize,
    pub leaves_kept: usize,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub prefill_bytes_up: u64,
    pub prefill_bytes_down: u64,
    /// Prefill chunk size (None: one piece).
    pub chunk: Option<usize>,
    /// Same tokens as the reference mode (cloud, else ushape) on this prompt; None without one.
    pub matches_reference: Option<bool>,
    pub tokens: Vec<u32>,
    /// HAT modes: a decode round's mean time in its four parts.
    pub round_ms: Option<RoundMs>,
}

/// A speculative decode round's mean time in its four parts (see [`RoundTime`]), in ms.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct RoundMs {
    pub draft: f64,
    pub wait: f64,
    pub verify: f64,
    pub commit: f64,
}

impl RoundMs {
    /// The mean per round of a generation's summed round times.
    pub fn per_round(t: RoundTime, rounds: usize) -> Self {
        let mean = |d: std::time::Duration| ms(d) / rounds.max(1) as f64;
        RoundMs { draft: mean(t.draft), wait: mean(t.wait), verify: mean(t.verify), commit: mean(t.commit) }
    }

    /// The mean per round over all of `runs`' rounds; None when no run has a breakdown or a round.
    fn mean_over(runs: &[&Run]) -> Option<RoundMs> {
        let timed: Vec<(&RoundMs, f64)> = runs.iter().filter_map(|r| r.round_ms.as_ref().map(|t| (t, r.rounds as f64))).collect();
        let rounds: f64 = timed.iter().map(|(_, n)| n).sum();
        if rounds == 0.0 {
            return None;
        }
        let mean = |f: fn(&RoundMs) -> f64| timed.iter().map(|(t, n)| f(t) * n).sum::<f64>() / rounds;
        Some(RoundMs { draft: mean(|t| t.draft), wait: mean(|t| t.wait), verify: mean(|t| t.verify), commit: mean(|t| t.commit) })
    }

    pub fn total(&self) -> f64 {
        self.draft + self.wait + self.verify + self.commit
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Run {
    pub fn new(link: &str, mode: BenchMode, p: &BenchPrompt, g: &Generation, chunk: Option<usize>) -> Self {
        Run {
            link: link.to_string(),
            mode: mode.name(),
            exposes_tokens: mode.exposes_tokens(),
            prompt: p.name.clone(),
            kind: p.kind.clone(),
            prompt_tokens: g.prompt_tokens,
            new_tokens: g.tokens.len(),
            ttft_ms: ms(g.ttft),
            tbt_ms: ms(g.tbt),
            gaps_ms: g.gaps.iter().map(|d| ms(*d)).collect(),
            rounds: g.rounds,
            accept_len: g.accept_len(),
            speculated: g.speculated,
            prepared: g.prepared,
            leaves: g.leaves,
            leaves_kept: g.leaves_accepted,
            bytes_up: g.traffic.bytes_up,
            bytes_down: g.traffic.bytes_down,
            prefill_bytes_up: g.prefill_traffic.bytes_up,
            prefill_bytes_down: g.prefill_traffic.bytes_down,
            chunk,
            matches_reference: None,
            tokens: g.tokens.clone(),
            round_ms: g.round_time.map(|t| RoundMs::per_round(t, g.rounds)),
        }
    }
}

/// Compares the runs of one prompt with the reference mode's tokens.
pub fn mark_matches(runs: &mut [Run]) {
    let reference = ["cloud", "ushape"].iter().find_map(|m| runs.iter().find(|r| r.mode == *m)).map(|r| r.tokens.clone());
    if let Some(t) = reference {
        runs.iter_mut().for_each(|r| r.matches_reference = Some(r.tokens == t));
    }
}

/// Mean, median and 99th percentile (nearest rank).
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Stats {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
}

impl Stats {
    pub fn of(mut xs: Vec<f64>) -> Self {
        if xs.is_empty() {
            return Stats { mean: f64::NAN, p50: f64::NAN, p99: f64::NAN };
        }
        xs.sort_by(f64::total_cmp);
        let rank = |q: f64| xs[((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1];
        Stats { mean: xs.iter().sum::<f64>() / xs.len() as f64, p50: rank(0.5), p99: rank(0.99) }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub link: String,
    pub mode: String,
    pub kind: String,
    pub exposes_tokens: bool,
    pub runs: usize,
    pub ttft_ms: Stats,
    /// Mean: decode time over decoded tokens, across runs; p50/p99: over every inter-token gap.
    pub tbt_ms: Stats,
    pub accept_len: f64,
    /// Of the rounds, those whose drafts were made while the round before was verified.
    pub prepared_rounds: f64,
    /// Leaves verified per round, and the share of rounds a kept leaf lengthened.
    pub leaves_per_round: f64,
    pub leaf_kept_rounds: f64,
    pub decode_tok_s: f64,
    /// Decode traffic per decoded token (the prompt's round excluded), and the prompt's round.
    pub bytes_up_per_token: f64,
    pub bytes_down_per_token: f64,
    pub prefill_kb_up: f64,
    pub prefill_kb_down: f64,
    pub matches_reference: String,
    pub chunks: Vec<Option<usize>>,
    /// HAT modes: a decode round's mean time in its four parts.
    pub round_ms: Option<RoundMs>,
}

fn summarise(runs: &[&Run]) -> Option<Summary> {
    let first = runs.first()?;
    let decoded: usize = runs.iter().map(|r| r.new_tokens.saturating_sub(1)).sum();
    let decode_ms: f64 = runs.iter().map(|r| r.tbt_ms * r.new_tokens.saturating_sub(1) as f64).sum();
    let rounds: usize = runs.iter().map(|r| r.rounds).sum();
    let per_tok = |f: &dyn Fn(&Run) -> f64| runs.iter().map(|r| f(r)).sum::<f64>() / decoded.max(1) as f64;
    let tbt_mean = decode_ms / decoded.max(1) as f64;
    let mut tbt = Stats::of(runs.iter().flat_map(|r| r.gaps_ms.iter().copied()).collect());
    tbt.mean = tbt_mean;
    let matched = runs.iter().filter(|r| r.matches_reference == Some(true)).count();
    let compared = runs.iter().filter(|r| r.matches_reference.is_some()).count();
    let chunks: BTreeSet<Option<usize>> = runs.iter().map(|r| r.chunk).collect();
    Some(Summary {
        link: first.link.clone(),
        mode: first.mode.clone(),
        kind: first.kind.clone(),
        exposes_tokens: first.exposes_tokens,
        runs: runs.len(),
        ttft_ms: Stats::of(runs.iter().map(|r| r.ttft_ms).collect()),
        tbt_ms: tbt,
        accept_len: decoded as f64 / rounds.max(1) as f64,
        prepared_rounds: runs.iter().map(|r| r.prepared).sum::<usize>() as f64 / rounds.max(1) as f64,
        leaves_per_round: runs.iter().map(|r| r.leaves).sum::<usize>() as f64 / rounds.max(1) as f64,
        leaf_kept_rounds: runs.iter().map(|r| r.leaves_kept).sum::<usize>() as f64 / rounds.max(1) as f64,
        decode_tok_s: if tbt_mean > 0.0 { 1e3 / tbt_mean } else { 0.0 },
        bytes_up_per_token: per_tok(&|r| (r.bytes_up - r.prefill_bytes_up) as f64),
        bytes_down_per_token: per_tok(&|r| (r.bytes_down - r.prefill_bytes_down) as f64),
        prefill_kb_up: runs.iter().map(|r| r.prefill_bytes_up as f64).sum::<f64>() / runs.len() as f64 / 1e3,
        prefill_kb_down: runs.iter().map(|r| r.prefill_bytes_down as f64).sum::<f64>() / runs.len() as f64 / 1e3,
        matches_reference: if compared == 0 { "-".into() } else { format!("{matched}/{compared}") },
        chunks: chunks.into_iter().collect(),
        round_ms: RoundMs::mean_over(runs),
    })
}

/// hat / ushape, measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub link: String,
    pub kind: String,
    pub ttft: f64,
    pub tbt: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub max_tokens: usize,
    /// Where device and cloud computed (which CPUs, which process).
    pub placement: String,
    pub summaries: Vec<Summary>,
    pub hat_over_ushape: Vec<Ratio>,
    pub runs: Vec<Run>,
}

impl Report {
    pub fn new(links: &[String], modes: &[BenchMode], runs: Vec<Run>, max_tokens: usize, placement: String) -> Self {
        let kinds: Vec<String> = runs.iter().map(|r| r.kind.clone()).collect::<BTreeSet<_>>().into_iter().rev().collect();
        let mut summaries = Vec::new();
        let mut ratios = Vec::new();
        for link in links {
            for kind in &kinds {
                for m in modes {
                    let these: Vec<&Run> = runs.iter().filter(|r| &r.link == link && &r.kind == kind && r.mode == m.name()).collect();
                    summaries.extend(summarise(&these));
                }
                let find = |mode: &str| summaries.iter().find(|s: &&Summary| &s.link == link && &s.kind == kind && s.mode == mode);
                if let (Some(h), Some(u)) = (find("hat"), find("ushape")) {
                    ratios.push(Ratio {
                        link: link.clone(),
                        kind: kind.clone(),
                        ttft: h.ttft_ms.mean / u.ttft_ms.mean,
                        tbt: h.tbt_ms.mean / u.tbt_ms.mean,
                    });
                }
            }
        }
        Report { max_tokens, placement, summaries, hat_over_ushape: ratios, runs }
    }

    /// The summary as a Markdown table, then the ratios.
    pub fn render(&self) -> String {
        let mut out = format!("placement: {}\n\n", self.placement);
        out += &String::from(
            "| link | prompts | mode | TTFT ms mean / p50 / p99 | TBT ms mean / p50 / p99 | tok/s | accept_len | B/token up / down | prefill kB up | chunk | same tokens |\n\
             |---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for s in &self.summaries {
            let chunk: Vec<String> = s.chunks.iter().map(|c| c.map_or("-".into(), |c| c.to_string())).collect();
            out += &format!(
                "| {} | {} ({}) | {}{} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {:.1} | {:.2} | {:.0} / {:.0} | {:.0} | {} | {} |\n",
                s.link,
                s.kind,
                s.runs,
                s.mode,
                if s.exposes_tokens { " (exposes tokens)" } else { "" },
                s.ttft_ms.mean,
                s.ttft_ms.p50,
                s.ttft_ms.p99,
                s.tbt_ms.mean,
                s.tbt_ms.p50,
                s.tbt_ms.p99,
                s.decode_tok_s,
                s.accept_len,
                s.bytes_up_per_token,
                s.bytes_down_per_token,
                s.prefill_kb_up,
                chunk.join(","),
                s.matches_reference
            );
        }
        let timed: Vec<(&Summary, RoundMs)> = self.summaries.iter().filter_map(|s| s.round_ms.map(|t| (s, t))).collect();
        if !timed.is_empty() {
            out += "\n| link | prompts | mode | round ms | draft | wait (link + cloud) | verify | commit |\n|---|---|---|---|---|---|---|---|\n";
            for (s, t) in timed {
                out += &format!(
                    "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
                    s.link,
                    s.kind,
                    s.mode,
                    t.total(),
                    t.draft,
                    t.wait,
                    t.verify,
                    t.commit
                );
            }
        }
        if !self.hat_over_ushape.is_empty() {
            out += "\n| link | prompts | TTFT hat/ushape | TBT hat/ushape |\n|---|---|---|---|\n";
            for r in &self.hat_over_ushape {
                out += &format!("| {} | {} | {:.2} | {:.2} |\n", r.link, r.kind, r.ttft, r.tbt);
            }
        }
        out
    }

    /// TTFT and TBT (means) per mode and link, one panel per metric and prompt kind.
    pub fn svg(&self) -> String {
        let kinds: Vec<String> = self.summaries.iter().map(|s| s.kind.clone()).collect::<BTreeSet<_>>().into_iter().rev().collect();
        let links: Vec<String> = self.summaries.iter().fold(Vec::new(), |mut v, s| {
            if !v.contains(&s.link) {
                v.push(s.link.clone());
            }
            v
        });
        let mut panels = Vec::new();
        for (metric, pick) in [("TTFT", (|s: &Summary| s.ttft_ms.mean) as fn(&Summary) -> f64), ("TBT", |s: &Summary| s.tbt_ms.mean)] {
            for kind in &kinds {
                let groups = links
                    .iter()
                    .map(|l| BarGroup {
                        label: l.clone(),
                        bars: self
                            .summaries
                            .iter()
                            .filter(|s| &s.link == l && &s.kind == kind)
                            .map(|s| (s.mode.clone(), pick(s)))
                            .collect(),
                    })
                    .collect();
                panels.push(Panel { title: format!("{metric}, {kind} prompts (mean)"), unit: "ms".into(), groups });
            }
        }
        render_svg(&format!("hat bench: {} new tokens per prompt, lower is better", self.max_tokens), &panels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let s = Stats::of((1..=100).map(f64::from).collect());
        assert_eq!((s.mean, s.p50, s.p99), (50.5, 50.0, 99.0));
        assert!(Stats::of(vec![]).mean.is_nan());
    }

    /// A summary's round time is the mean over all its runs' rounds, not the mean of the runs' means.
    #[test]
    fn round_time_is_weighted_by_rounds() {
        let millis = std::time::Duration::from_millis;
        let run = |rounds: usize, t: RoundTime| Run {
            link: "l".into(),
            mode: "hat".into(),
            exposes_tokens: false,
            prompt: "p".into(),
            kind: "short".into(),
            prompt_tokens: 3,
            new_tokens: rounds + 1,
            ttft_ms: 1.0,
            tbt_ms: 1.0,
            gaps_ms: vec![],
            rounds,
            accept_len: 1.0,
            speculated: 0,
            prepared: 0,
            leaves: 0,
            leaves_kept: 0,
            bytes_up: 0,
            bytes_down: 0,
            prefill_bytes_up: 0,
            prefill_bytes_down: 0,
            chunk: None,
            matches_reference: None,
            tokens: vec![],
            round_ms: Some(RoundMs::per_round(t, rounds)),
        };
        // 1 round of 10 ms drafting, 3 rounds of 2 ms each (6 ms): 16 ms over 4 rounds.
        let a = run(1, RoundTime { draft: millis(10), wait: millis(40), ..Default::default() });
        let b = run(3, RoundTime { draft: millis(6), wait: millis(120), verify: millis(3), commit: millis(0) });
        let m = RoundMs::mean_over(&[&a, &b]).expect("timed");
        assert_eq!(m, RoundMs { draft: 4.0, wait: 40.0, verify: 0.75, commit: 0.0 });
        assert_eq!(m.total(), 44.75);
        let mut untimed = a.clone();
        untimed.round_ms = None;
        assert_eq!(RoundMs::mean_over(&[&untimed]), None);
    }
}
