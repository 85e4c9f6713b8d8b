//! Drafting with the feature head ([`crate::draft_head::FeatureHead`]): the head's own cache kept
//! in step with verified positions, adaptive draft length, prompt lookup, leaves beside the drafts
//! and drafting while verifying.

use candle_core::Tensor;

use crate::draft_head::FeatureHead;
use crate::error::{Result, RuntimeError};
use hat_model::KvCache;

/// Top-1 index and its softmax probability.
pub fn top1(logits: &[f32]) -> (usize, f32) {
    let best = crate::sampling::argmax(logits) as usize;
    let m = logits[best];
    let z: f32 = logits.iter().map(|l| (l - m).exp()).sum();
    (best, 1.0 / z)
}

/// The second-best index and its softmax probability (`None` for fewer than two logits).
pub fn second(logits: &[f32]) -> Option<(usize, f32)> {
    let best = crate::sampling::argmax(logits) as usize;
    let (i, &l) = logits.iter().enumerate().filter(|&(i, _)| i != best).max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))?;
    let m = logits[best];
    let z: f32 = logits.iter().map(|x| (x - m).exp()).sum();
    Some((i, (l - m).exp() / z))
}

/// Leaves a round drafts at most unless told otherwise (`--draft-leaves`).
pub const DEFAULT_LEAVES: usize = 1;
/// The estimate a leaf must reach to be verified (`--leaf-threshold`).
pub const DEFAULT_LEAF_THRESHOLD: f32 = 0.15;

/// Confidence threshold used when neither the head file nor the caller sets one.
pub const FALLBACK_THRESHOLD: f32 = 0.0;

/// Drafts with a [`FeatureHead`] and keeps its cache in step with verified positions.
///
/// Entry q of the head's cache holds (feature of position q, token at q + 1) and predicts the token
/// at q + 2. Verified positions enter with their true fused features; a draft's own entries use the
/// head's output and are dropped after the round, when the accepted positions re-enter with the
/// features the cloud returned.
#[derive(Debug)]
pub struct FeatureDrafter {
    head: FeatureHead,
    cache: KvCache,
    threshold: f32,
    /// The prompt's input states, kept from the prefill until the prompt's round is back.
    prompt_low: Option<Tensor>,
    /// Fused true features of positions `cache.len()..` not yet entered into the head.
    pending: Option<Tensor>,
    /// The tokens after each pending position, less the newest (the next `last`).
    pending_next: Vec<u32>,
    /// The sequence so far (the prompt and accepted tokens), for prompt lookup: positions `0..pos`
    /// between rounds, and `0..=pos` (with the round's `last`) while a round is in flight.
    history: Vec<u32>,
    /// Draft by prompt lookup too (see [`lookup`]).
    lookup: bool,
    /// The head's output at its cache's newest entry (the next token's prediction), while one is
    /// valid: after the pending positions entered or a draft step, until a commit cuts the cache.
    tip: Option<Tensor>,
    /// Drafting while verifying (see [`FeatureDrafter::speculate`]).
    overlap: Overlap,
    /// Sequence position of the head cache's entry 0: only the prompt's last [`PROMPT_WINDOW`]
    /// positions enter the head. RoPE sees only position differences, so the shift changes nothing
    /// else.
    offset: usize,
    /// Leaves per round at most, and the estimate one must reach (see `Draft::leaves`).
    max_leaves: usize,
    leaf_threshold: f32,
    /// This generation verifies leaves: greedy, a pipeline that runs them, no drafting while
    /// verifying (a speculated round reuses the input cache's slots the leaves sit in).
    leaves_allowed: bool,
    /// Rows the next round may hold at most: the positions left in the generation's budget, which
    /// never reaches past the context (every row takes a cache slot).
    room: usize,
}

/// Prompt positions the head takes in (the last ones). The head was trained on 128-position
/// windows; taking in a 1300-token prompt whole cost about 0.5 s of device time before the first
/// draft, for no measured gain.
pub const PROMPT_WINDOW: usize = 256;

impl FeatureDrafter {
    /// `threshold` overrides the head's own default confidence threshold.
    pub fn new(head: FeatureHead, threshold: Option<f32>) -> Self {
        let threshold = threshold.unwrap_or(head.meta.threshold);
        Self {
            cache: head.new_cache(),
            head,
            threshold,
            prompt_low: None,
            pending: None,
            pending_next: Vec::new(),
            history: Vec::new(),
            lookup: true,
            tip: None,
            overlap: Overlap::default(),
            offset: 0,
            max_leaves: DEFAULT_LEAVES,
            leaf_threshold: DEFAULT_LEAF_THRESHOLD,
            leaves_allowed: false,
            room: usize::MAX,
        }
    }

    /// Rows the next round may hold at most (see [`FeatureDrafter::draft`]'s leaves).
    pub fn set_room(&mut self, rows: usize) {
        self.room = rows;
    }

    /// Up to `max` leaves per round, kept when their estimate reaches `threshold`.
    pub fn set_leaves(&mut self, max: usize, threshold: f32) {
        (self.max_leaves, self.leaf_threshold) = (max, threshold);
    }

    pub fn leaves(&self) -> (usize, f32) {
        (self.max_leaves, self.leaf_threshold)
    }

    /// Whether this generation may verify leaves (set per generation by the decoder).
    pub fn allow_leaves(&mut self, on: bool) {
        self.leaves_allowed = on;
    }

    /// Turns prompt lookup on or off (on by default).
    pub fn set_lookup(&mut self, on: bool) {
        self.lookup = on;
    }

    pub fn lookup(&self) -> bool {
        self.lookup
    }

    pub fn set_overlap(&mut self, overlap: Overlap) {
        self.overlap = overlap;
    }

    pub fn overlap(&self) -> Overlap {
        self.overlap
    }

    pub fn head(&self) -> &FeatureHead {
        &self.head
    }

    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// # Shapes
    /// input_states: (1, prompt, hidden)
    pub fn prefill(&mut self, input_states: &Tensor) -> Result<()> {
        self.prompt_low = Some(input_states.clone());
        Ok(())
    }

    /// # Shapes
    /// high, top: (1, prompt, hidden)
    pub fn prefilled(&mut self, prompt: &[u32], high: &Tensor, top: &Tensor) -> Result<()> {
        let low = self.prompt_low.take().ok_or_else(|| RuntimeError::BadInput("draft head: prompt states missing".into()))?;
        self.cache.truncate(0);
        self.tip = None;
        let n = prompt.len();
        self.offset = n.saturating_sub(PROMPT_WINDOW);
        let rows = n - self.offset;
        let window = |t: &Tensor| t.narrow(1, self.offset, rows);
        self.pending = Some(self.head.fuse(&window(&low)?, &window(high)?, &window(top)?)?);
        self.pending_next = prompt[self.offset + 1..].to_vec();
        self.history = prompt.to_vec();
        Ok(())
    }

    /// Proposes up to `k` tokens after `last` (at position `pos`): the pending verified positions
    /// enter the head with their true features, then the head drafts (see [`FeatureDrafter::draft`]).
    pub fn propose<M: crate::middle::Middle>(
        &mut self,
        pipeline: &mut crate::generate::SplitPipeline<M>,
        last: u32,
        pos: usize,
        k: usize,
        sampler: &mut crate::sampling::Sampler,
    ) -> Result<crate::draft::Draft> {
        self.pending_next.push(last);
        self.enter_pending(pos)?;
        self.history.push(last);
        let history = std::mem::take(&mut self.history);
        let drafted = self.draft(&history, pos, k, sampler, &mut || false);
        self.history = history;
        let (tokens, q, leaves) = drafted?.expect("drafting without a stop never stops");
        with_states(pipeline, last, tokens, q, leaves, pos)
    }

    /// The head's newest output, which predicts the next token.
    fn tip(&self) -> Result<Tensor> {
        self.tip.clone().ok_or_else(|| RuntimeError::BadInput("draft head: nothing entered to draft from".into()))
    }

    /// Enters the pending verified positions with their true features. `pending_next` holds the
    /// token after each, the newest being the one at `pos`; the head's newest output then predicts
    /// the token at `pos + 1`.
    fn enter_pending(&mut self, pos: usize) -> Result<()> {
        let start = self.cache.len();
        let g = self.pending.take().ok_or_else(|| RuntimeError::BadInput("draft head: no verified features to draft from".into()))?;
        let next = std::mem::take(&mut self.pending_next);
        if self.offset + start + next.len() != pos || g.dim(1)? != next.len() {
            return Err(RuntimeError::BadInput(format!(
                "draft head out of step: cache {start} + {} pending positions, drafting at {pos}",
                next.len()
            )));
        }
        let h = self.head.step(&g, &next, start, &mut self.cache)?;
        self.tip = Some(h.narrow(1, h.dim(1)? - 1, 1)?);
        Ok(())
    }

    /// Drafts up to `k` tokens after the one at `pos`, from the head's newest output (which
    /// predicts the token at `pos + 1`); `history` is the sequence up to and including `pos`, for
    /// prompt lookup. Every kept head token but the last that stopped the loop enters the head's
    /// cache as a draft entry. `None` when `stop` asked to give up between steps.
    fn draft(
        &mut self,
        history: &[u32],
        pos: usize,
        k: usize,
        sampler: &mut crate::sampling::Sampler,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Option<Drafted>> {
        let mut h = self.tip()?;
        let copied = if self.lookup && k > 0 { lookup(history, k) } else { Vec::new() };
        let (mut tokens, mut q) = (Vec::with_capacity(k), Vec::new());
        // Leaf candidates (estimate, depth, token): the estimate is the head's probability of the
        // token times its probabilities of the chain before it.
        let leafy = self.leaves_allowed && self.max_leaves > 0 && sampler.is_greedy() && self.overlap == Overlap::Off;
        let mut candidates: Vec<(f32, usize, u32)> = Vec::new();
        let mut path = 1f32;
        for j in 0..k {
            let logits = self.head.logits(&h)?;
            let (token, confidence) = if sampler.is_greedy() {
                let (i, p) = top1(&logits);
                (self.head.vocab()[i], p)
            } else {
                let dist = sampler.distribution(&self.head.full_logits(&logits));
                let p = dist.iter().copied().fold(0.0, f32::max);
                let t = sampler.draw(&dist);
                q.push(dist);
                (t, p)
            };
            let runner_up = || second(&logits).map(|(i, p)| (self.head.vocab()[i], p));
            // Prompt lookup takes over where the head has nothing to say, or agrees with the
            // copied text's first token: the rest of the copy follows. Lookup tokens are
            // deterministic given the prefix, so their q is one-hot; when the head is unsure the
            // first one is too (whatever the head drew), and when it is sure and drew the copy's
            // first token, that token keeps the head's q.
            let sure = confidence >= self.threshold;
            if j == 0 && !copied.is_empty() && (!sure || token == copied[0]) {
                let keep = usize::from(sure);
                q.truncate(keep);
                if !sampler.is_greedy() {
                    for &t in &copied[keep..] {
                        q.push(one_hot(self.head.full_vocab, t));
                    }
                }
                // The head's best token other than the copy's is the leaf beside it.
                let alt = if token != copied[0] { Some((token, confidence)) } else { runner_up() };
                if let (true, Some((t, p))) = (leafy, alt) {
                    candidates.push((p, 1, t));
                }
                tokens = copied;
                break;
            }
            if leafy {
                // Where the chain goes on, its runner-up; where it stops, the token it stops at.
                let alt = if sure { runner_up() } else { Some((token, confidence)) };
                if let Some((t, p)) = alt {
                    candidates.push((path * p, j + 1, t));
                }
            }
            if !sure {
                q.truncate(tokens.len());
                break;
            }
            tokens.push(token);
            path *= confidence;
            if j + 1 < k {
                if stop() {
                    return Ok(None);
                }
                h = self.head.step(&h, &[token], pos + j - self.offset, &mut self.cache)?;
                self.tip = Some(h.clone());
            }
        }
        // A leaf sits on the chain: beside one of its drafts, or one past its end.
        candidates.retain(|c| c.0 >= self.leaf_threshold && c.1 <= tokens.len() + 1);
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
        // The round's rows (last, drafts, leaves) each take a cache slot: near the end of the
        // budget, and so of the context, leaves give way.
        candidates.truncate(self.max_leaves.min(self.room.saturating_sub(1 + tokens.len())));
        let leaves = candidates.into_iter().map(|(_, depth, t)| (depth, t)).collect();
        Ok(Some((tokens, q, leaves)))
    }

    /// Drafting while verifying: while `draft` (proposed at `pos`) is with the cloud, drafts the
    /// round after it on the assumption that the cloud accepts every draft and that its own next
    /// token is the head's guess. The in-flight drafts enter the head as draft entries (as they
    /// would if the round were longer), the head guesses the token after them, and from that guess
    /// drafts up to `k` more and runs the input submodel on them. The result is kept only when the
    /// verdict matches ([`FeatureDrafter::adopt`]); any draft is verified in full, so a kept
    /// speculation changes no token. `None` when overlap is off, or when `reply_ready` says the
    /// reply is back before the work is done (with [`Overlap::WhileWaiting`]): a speculation never
    /// holds up a round by more than one head step.
    pub fn speculate<M: crate::middle::Middle>(
        &mut self,
        pipeline: &mut crate::generate::SplitPipeline<M>,
        draft: &crate::draft::Draft,
        pos: usize,
        k: usize,
        sampler: &mut crate::sampling::Sampler,
    ) -> Result<Option<Speculation>> {
        if self.overlap == Overlap::Off {
            return Ok(None);
        }
        let overlap = self.overlap;
        let stop = |p: &mut crate::generate::SplitPipeline<M>| overlap == Overlap::WhileWaiting && p.middle().reply_ready();
        // The round in flight is itself a kept speculation: its verified predecessor's features
        // are still pending, and enter now, while there is time.
        if self.pending.is_some() {
            self.enter_pending(pos)?;
        }
        let n = draft.tokens.len();
        // Draft entries already in the head: entry q holds the token at q + 1.
        let mut entered = (self.offset + self.cache.len()).saturating_sub(pos);
        while entered < n {
            if stop(pipeline) {
                return Ok(None);
            }
            let h = self.tip()?;
            self.tip = Some(self.head.step(&h, &[draft.tokens[entered]], pos + entered - self.offset, &mut self.cache)?);
            entered += 1;
        }
        // The guess follows the drafting rule: the head's top token, or prompt lookup's where the
        // head is unsure.
        let h = self.tip()?;
        let (i, p) = top1(&self.head.logits(&h)?);
        let mut history = self.history.clone();
        history.extend_from_slice(&draft.tokens);
        let copied = if self.lookup && p < self.threshold { lookup(&history, 1) } else { Vec::new() };
        let guess = copied.first().copied().unwrap_or(self.head.vocab()[i]);
        if stop(pipeline) {
            return Ok(None);
        }
        let next_pos = pos + n + 1;
        self.tip = Some(self.head.step(&h, &[guess], next_pos - 1 - self.offset, &mut self.cache)?);
        history.push(guess);
        let Some((tokens, q, leaves)) = self.draft(&history, next_pos, k, sampler, &mut || stop(pipeline))? else {
            return Ok(None);
        };
        if stop(pipeline) {
            return Ok(None);
        }
        Ok(Some(Speculation { expects: n, guess, draft: with_states(pipeline, guess, tokens, q, leaves, next_pos)? }))
    }

    /// A speculation's assumption held (the round accepted all its drafts and the cloud's next
    /// token is the guess): its draft becomes the next round's, with the guess as that round's
    /// `last`. Called after [`FeatureDrafter::commit`] of the round it followed; the verified
    /// positions stay pending and enter with the next round's.
    pub fn adopt(&mut self, spec: &Speculation) {
        self.pending_next.push(spec.guess);
        self.history.push(spec.guess);
    }

    /// Drops the draft's own entries and queues the accepted positions' true features, after any
    /// still pending from the round before (a kept speculation's predecessor).
    pub fn commit(&mut self, round: &crate::draft::Verified) -> Result<()> {
        self.cache.truncate(round.pos - self.offset);
        self.tip = None;
        let fused = self.head.fuse(&round.low, &round.high, &round.top)?;
        let accepted = round.accepted;
        match self.pending.take() {
            Some(earlier) => {
                self.pending = Some(Tensor::cat(&[&earlier, &fused], 1)?);
                self.pending_next.extend_from_slice(accepted);
            }
            None => {
                self.pending = Some(fused);
                self.pending_next = accepted.to_vec();
            }
        }
        self.history.extend_from_slice(accepted);
        Ok(())
    }
}

/// Draft tokens, when sampling the distribution each was drawn from, and the leaves (see
/// `Draft::leaves`).
type Drafted = (Vec<u32>, Vec<Vec<f32>>, Vec<(usize, u32)>);

/// A round drafted while the one before it was being verified ([`FeatureDrafter::speculate`]).
#[derive(Debug)]
pub struct Speculation {
    /// Drafts the round in flight must have accepted in full...
    pub expects: usize,
    /// ...and the token the cloud must have chosen after them: this round's `last`.
    pub guess: u32,
    pub draft: crate::draft::Draft,
}

/// When the device drafts the next round while the cloud verifies this one.
///
/// Off by default, by measurement: with the shipped head only about 4 % of speculations hold
/// (every draft accepted and the cloud's next token guessed), and a kept round's drafts, made from
/// the head's own outputs instead of the features the cloud returns, are accepted less often. On
/// the benchmark prompts (50 Mbps / 40 ms and 10 Mbps / 80 ms) it left TBT unchanged on short
/// prompts and 3-6 % worse on long ones. It pays once drafts are accepted whole far more often.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlap {
    /// Never: each round drafts after the one before is verified.
    #[default]
    Off,
    /// While the reply is not back yet: the device stops speculating as soon as it is, so drafting
    /// while verifying never holds a round up by more than one head step (`--overlap`).
    WhileWaiting,
    /// Finish every speculation even when the reply is back (tests, and an in-process middle,
    /// whose reply is always back).
    Always,
}

/// A draft of `tokens` and `leaves` after `last` (at `pos`), with the input submodel's states of
/// [last, tokens..., leaves...] that the cloud verifies.
fn with_states<M: crate::middle::Middle>(
    pipeline: &mut crate::generate::SplitPipeline<M>,
    last: u32,
    tokens: Vec<u32>,
    q: Vec<Vec<f32>>,
    leaves: Vec<(usize, u32)>,
    pos: usize,
) -> Result<crate::draft::Draft> {
    let ids: Vec<u32> = std::iter::once(last).chain(tokens.iter().copied()).chain(leaves.iter().map(|l| l.1)).collect();
    let states = pipeline.input_states_tree(&ids, pos, crate::draft::depths(tokens.len(), &leaves).as_deref())?;
    Ok(crate::draft::Draft { tokens, q, leaves, states })
}

fn one_hot(n: usize, t: u32) -> Vec<f32> {
    let mut v = vec![0.0; n];
    v[t as usize] = 1.0;
    v
}

/// Longest n-gram the lookup matches on; it tries shorter ones down to [`LOOKUP_MIN_N`].
pub const LOOKUP_MAX_N: usize = 4;
pub const LOOKUP_MIN_N: usize = 2;

/// Prompt lookup: the tokens (up to `k`) that followed the latest earlier occurrence of the
/// sequence's last n tokens, for the longest n from [`LOOKUP_MAX_N`] down to [`LOOKUP_MIN_N`] that
/// occurs. Replies that quote their prompt (summaries, answers about a document, edits) or repeat
/// themselves draft whole spans this way, at no model cost.
pub fn lookup(seq: &[u32], k: usize) -> Vec<u32> {
    for n in (LOOKUP_MIN_N..=LOOKUP_MAX_N).rev() {
        if seq.len() <= n {
            continue;
        }
        let tail = &seq[seq.len() - n..];
        if let Some(i) = (0..seq.len() - n).rev().find(|&i| &seq[i..i + n] == tail) {
            let from = i + n;
            return seq[from..(from + k).min(seq.len())].to_vec();
        }
    }
    Vec::new()
}

#[cfg(test)]
mod lookup_tests {
    use super::lookup;

    #[test]
    fn lookup_copies_what_followed_the_latest_longest_match() {
        // ... 7 8 9 | 1 2 ... | 7 8 9 -> what followed the last earlier "7 8 9".
        let seq = [7, 8, 9, 1, 2, 3, 5, 7, 8, 9, 4, 6, 0, 7, 8, 9];
        assert_eq!(lookup(&seq, 3), vec![4, 6, 0]);
        assert_eq!(lookup(&seq, 10), vec![4, 6, 0, 7, 8, 9]);
        // No 2-gram repeats: nothing.
        assert!(lookup(&[1, 2, 3, 4, 2], 4).is_empty());
        assert!(lookup(&[5], 4).is_empty());
        // A 2-gram matches when no longer one does.
        assert_eq!(lookup(&[3, 4, 5, 6, 4, 5], 2), vec![6, 4]);
    }
}
