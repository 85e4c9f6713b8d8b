//! HAT decoding: the device drafts with its small model, the middle submodel verifies every draft
//! in one round trip. One round, at position `pos` of the last accepted token:
//! 1. the [`Drafter`] proposes k tokens and returns the input states of [last, drafts...];
//! 2. the middle runs them from `pos` (rolling its cache back to `pos` first);
//! 3. the output submodel runs on the k+1 returned states, and the verifier keeps the longest
//!    acceptable prefix plus one token of the model's own; the LM head runs once, on all k+1 rows
//!    (see `SplitPipeline::head_rows`).
//!
//! With leaves (`Draft::leaves`, greedy), the round's rows are [last, drafts..., leaves...], each
//! leaf seeing only the drafts before it; where the model rejects a draft but picks the leaf beside
//! it, the leaf is kept, and its keys and values move to its position in every cache.
//!
//! Drafting while verifying: after submitting a round, and until its reply is back, the feature
//! head drafts the round after it on the assumption that every draft is accepted and the cloud's
//! own next token is the head's guess ([`Drafter::speculate`]). When the verdict bears that out,
//! the next round goes to the cloud at once, its drafting already done.
//!
//! The prompt's round overlaps the adapter's prefill with the cloud's work, and with
//! `GenerateOptions::prefill_chunk` the prompt is pipelined in chunks ([`SplitPipeline::prefill`]).

use std::time::Instant;

use crate::draft::{Draft, Drafter, Verified};
use crate::error::{Result, RuntimeError};
use crate::generate::{token_budget, DraftCounts, Emitter, GenerateOptions, Generation, RoundTime, SplitPipeline, TokenModel};
use crate::middle::Middle;
use crate::sampling::Sampler;
use crate::verify::{verify_greedy, verify_sampled};

/// Generates after `prompt` with drafts of up to `draft_len` tokens per round (the feature head stops
/// a draft early when its confidence drops; zero drafts is a U-shaped step).
pub fn generate_speculative<M: Middle>(
    pipeline: &mut SplitPipeline<M>,
    drafter: &mut Drafter,
    prompt: &[u32],
    opts: &GenerateOptions,
    draft_len: usize,
    on_token: impl FnMut(u32),
) -> Result<Generation> {
    let budget = token_budget(prompt, opts, pipeline.context_len())?;
    let mut sampler = Sampler::new(opts.sampling);
    let traffic_before = pipeline.traffic();
    let mut out = Emitter::new(budget, opts, on_token);
    let mut rounds = 0;
    let mut counts = DraftCounts::default();
    if budget == 0 {
        return Ok(out.finish(prompt.len(), 0, counts, pipeline.traffic().since(&traffic_before), None));
    }

    // Leaves need every part of the pipeline to run them, and greedy decoding.
    drafter.allow_leaves(pipeline.runs_trees() && sampler.is_greedy());
    let pre = pipeline.prefill(prompt, opts.prefill_chunk, |states| drafter.prefill(states))?;
    let prefill_traffic = pipeline.traffic().since(&traffic_before);
    let mut last = sampler.sample(&pre.logits)?;
    // `pos` is the position of `last`, the newest token no model has run on yet.
    let mut pos = prompt.len();
    let mut going = out.push(last);
    // The draft head takes in the prompt's features after the first token is out, not before it.
    drafter.prefilled(prompt, &pre.high, &pre.top)?;
    // A round drafted while the one before it was verified, whose assumption held.
    let mut prepared: Option<Draft> = None;
    let mut time = RoundTime::default();
    while going {
        let start = Instant::now();
        // Never draft past the budget: a round yields at most k + 1 tokens.
        let k = draft_len.min(out.remaining() - 1);
        drafter.set_room(out.remaining());
        let draft = match prepared.take() {
            Some(d) => d.truncated(k)?,
            None => drafter.propose(pipeline, last, pos, k, &mut sampler)?,
        };
        let sent = Instant::now();
        let depths = draft.depths();
        pipeline.submit_round(pos, &draft.states, depths.clone())?;
        // If every draft is accepted this round yields n + 1 tokens; the next one drafts after that.
        let after = out.remaining().saturating_sub(draft.tokens.len() + 1);
        let spec = if after > 0 { drafter.speculate(pipeline, &draft, pos, draft_len.min(after - 1), &mut sampler)? } else { None };
        let middle_states = pipeline.middle().collect()?;
        let back = Instant::now();
        let top = pipeline.output_states_tree(&middle_states, pos, depths.as_deref())?;
        // The full LM head runs once, on every row (every verdict reads row 0): reading the head's
        // weights is what costs, so one call's cost hardly grows with its rows.
        let mut logits = pipeline.head_rows(&top)?;
        let rows = logits.len();
        let target =
            |j: usize| logits.get_mut(j).map(std::mem::take).ok_or_else(|| RuntimeError::BadInput(format!("row {j} of {rows} verified")));
        let verdict = if sampler.is_greedy() {
            verify_greedy(&draft.tokens, &draft.leaves, target)?
        } else {
            verify_sampled(&draft.tokens, &draft.q, target, &mut sampler)?
        };
        let verified = Instant::now();
        rounds += 1;
        let n = draft.tokens.len();
        // The kept path: the chain's rows up to the kept drafts, then the accepted leaf's row.
        let chain = verdict.accepted - usize::from(verdict.leaf.is_some());
        let mut accepted = draft.tokens[..chain].to_vec();
        let mut path: Vec<u32> = (0..=chain as u32).collect();
        if let Some(i) = verdict.leaf {
            accepted.push(draft.leaves[i].1);
            path.push((n + 1 + i) as u32);
            pipeline.keep_leaf(pos + n + 1 + i, pos + verdict.accepted)?;
            counts.leaves_accepted += 1;
        }
        counts.drafted += n;
        counts.leaves += draft.leaves.len();
        counts.accepted += verdict.accepted;
        counts.first_accepted += usize::from(chain > 0);
        for t in accepted.iter().chain([&verdict.next]) {
            going = out.push(*t);
            if !going {
                break;
            }
        }
        let rows = |t: &candle_core::Tensor| -> Result<candle_core::Tensor> {
            Ok(t.index_select(&candle_core::Tensor::new(path.as_slice(), t.device())?, 1)?)
        };
        drafter.commit(&Verified { pos, accepted: &accepted, low: rows(&draft.states)?, high: rows(&middle_states)?, top: rows(&top)? })?;
        if let Some(spec) = spec {
            counts.speculated += 1;
            if going && verdict.leaf.is_none() && verdict.accepted == spec.expects && verdict.next == spec.guess {
                counts.prepared += 1;
                drafter.adopt(&spec);
                prepared = Some(spec.draft);
            }
        }
        pos += verdict.accepted + 1;
        last = verdict.next;
        time.draft += sent - start;
        time.wait += back - sent;
        time.verify += verified - back;
        time.commit += verified.elapsed();
    }
    let traffic = pipeline.traffic().since(&traffic_before);
    let mut generation = out.finish(prompt.len(), rounds, counts, traffic, Some(prefill_traffic));
    generation.round_time = Some(time);
    Ok(generation)
}
