//! Batched self-distillation: the full split model answers many prompts, several at a time, greedily
//! or sampled (more answers per prompt: the draft head sees the model's distribution after tokens the
//! greedy text never takes). Prompts of equal token length share a batch, so no padding or mask is
//! needed; one decode step then costs about what one sequence's step costs on this CPU, because a
//! lone step is bound by reading the weights. Rows that have ended keep stepping until the batch ends
//! and are trimmed.

use candle_core::{Device, Tensor};
use hat_model::KvCache;
use hat_runtime::sampling::{logits_rows, Sampler, SamplingOptions};
use hat_runtime::{CloudPackage, DevicePackage};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// A prompt and the model's greedy answer, as one token sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distilled {
    pub prompt_len: usize,
    /// Prompt then answer (ending with the end-of-sequence token when the answer ended).
    pub tokens: Vec<u32>,
}

/// Answers every prompt with at most `max_new` tokens, `batch` prompts of equal length at a time:
/// greedily (the first on ties, as `hat generate` does) or drawn as `sampling` says, from one seeded
/// stream in the order of the batches, so a run is repeatable.
pub fn distill(
    device: &DevicePackage,
    cloud: &CloudPackage,
    prompts: &[Vec<u32>],
    max_new: usize,
    batch: usize,
    sampling: SamplingOptions,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<Distilled>> {
    let eos = device.eos_ids();
    let mut sampler = Sampler::new(sampling);
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut out: Vec<Option<Distilled>> = vec![None; prompts.len()];
    let mut group: Vec<usize> = Vec::new();
    let mut flush = |group: &mut Vec<usize>, out: &mut Vec<Option<Distilled>>| -> Result<()> {
        if group.is_empty() {
            return Ok(());
        }
        let rows: Vec<&[u32]> = group.iter().map(|&i| prompts[i].as_slice()).collect();
        let context = device.config.max_position_embeddings;
        let budget = max_new.min(context.saturating_sub(rows[0].len() + 1));
        for (answer, &i) in answer_batch(device, cloud, &rows, budget, &eos, &mut sampler)?.into_iter().zip(group.iter()) {
            out[i] = Some(Distilled { prompt_len: prompts[i].len(), tokens: [prompts[i].clone(), answer].concat() });
            bar.inc(1);
        }
        group.clear();
        Ok(())
    };
    for &i in &order {
        if group.first().is_some_and(|&g| prompts[g].len() != prompts[i].len()) || group.len() == batch.max(1) {
            flush(&mut group, &mut out)?;
        }
        group.push(i);
    }
    flush(&mut group, &mut out)?;
    Ok(out.into_iter().flatten().collect())
}

/// Answers of a batch of prompts of one length.
fn answer_batch(
    device: &DevicePackage,
    cloud: &CloudPackage,
    prompts: &[&[u32]],
    budget: usize,
    eos: &[u32],
    sampler: &mut Sampler,
) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let n = prompts[0].len();
    let flat: Vec<u32> = prompts.concat();
    let mut caches: [KvCache; 3] = [device.input.new_cache(), cloud.middle.new_cache(), device.output.new_cache()];
    let mut step = |ids: Tensor, pos: usize| -> Result<Vec<u32>> {
        let x = device.input.embed(&ids)?;
        let x = device.input.forward_layers(&x, pos, &mut caches[0])?;
        let x = cloud.middle.forward_layers(&x, pos, &mut caches[1])?;
        let x = device.output.forward_layers(&x, pos, &mut caches[2])?;
        let last = x.narrow(1, x.dim(1)? - 1, 1)?;
        let rows = logits_rows(&device.output.head(&last)?.squeeze(1)?)?;
        Ok(rows.iter().map(|r| sampler.choose(r)).collect())
    };
    let mut answers = vec![Vec::new(); b];
    let mut done = vec![false; b];
    if budget == 0 {
        return Ok(answers);
    }
    let mut next = step(Tensor::from_vec(flat, (b, n), &Device::Cpu)?, 0)?;
    for t in 0..budget {
        for (r, &tok) in next.iter().enumerate() {
            if !done[r] {
                answers[r].push(tok);
                done[r] = eos.contains(&tok);
            }
        }
        if t + 1 == budget || done.iter().all(|d| *d) {
            break;
        }
        next = step(Tensor::from_vec(next.clone(), (b, 1), &Device::Cpu)?, n + t)?;
    }
    Ok(answers)
}
