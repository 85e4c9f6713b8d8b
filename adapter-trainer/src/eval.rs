//! Offline evaluation of a draft adapter: the full split model runs in this process (no network),
//! generates greedily after held-out prompts with speculative decoding at a fixed draft length, and
//! counts how many tokens each verification round yields.

use hat_runtime::{generate_speculative, Adapter, CloudPackage, DevicePackage, Drafter, GenerateOptions, LocalPipeline};
use serde::{Deserialize, Serialize};

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean tokens per verification round, the bonus token included.
    pub accept_len: f64,
    /// Share of rounds whose first draft matched the full model's token.
    pub top1: f64,
    pub draft_len: usize,
    pub rounds: usize,
    pub tokens: usize,
    /// Draft tokens proposed over all rounds (fewer than rounds x draft_len when drafting stops early).
    #[serde(default)]
    pub drafted: usize,
}

pub fn evaluate(
    device: &DevicePackage,
    cloud: &CloudPackage,
    adapter: Adapter,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    draft_len: usize,
) -> Result<EvalResult> {
    evaluate_drafter(device, cloud, Drafter::new(adapter), prompts, new_tokens, draft_len)
}

/// [`evaluate`] with any draft model.
pub fn evaluate_drafter(
    device: &DevicePackage,
    cloud: &CloudPackage,
    mut drafter: Drafter,
    prompts: &[Vec<u32>],
    new_tokens: usize,
    draft_len: usize,
) -> Result<EvalResult> {
    let opts = GenerateOptions { max_tokens: new_tokens, eos: device.eos_ids(), ..Default::default() };
    let (mut rounds, mut gained, mut first, mut drafted) = (0, 0, 0, 0);
    for p in prompts {
        let mut pipeline = LocalPipeline::new(device, cloud)?;
        let g = generate_speculative(&mut pipeline, &mut drafter, p, &opts, draft_len, |_| {})?;
        rounds += g.rounds;
        gained += g.tokens.len().saturating_sub(1);
        first += g.first_accepted;
        drafted += g.drafted;
    }
    let r = rounds.max(1) as f64;
    Ok(EvalResult { accept_len: gained as f64 / r, top1: first as f64 / r, draft_len, rounds, tokens: gained, drafted })
}
