//! The verifier: given the draft and the full model's logits at each drafted position, decide how
//! many drafts to keep and which token follows them. Greedy keeps the longest prefix that matches the
//! argmax; sampling uses the speculative rejection rule (Leviathan et al. 2023), so every emitted
//! token follows the model's own distribution.
//!
//! The logits come one row at a time, on demand, and both rules stop at the first rejected draft:
//! the rows after it are never asked for. The caller decides how rows are made; HAT's decoding
//! computes all of a round's rows in one LM head call, which on the CPU costs about what one row
//! does (the head is bound by reading its weights).

use crate::error::Result;
use crate::sampling::{argmax, Sampler};

/// The outcome of one verification round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Tokens kept: a prefix of the drafts, plus the accepted leaf when there is one.
    pub accepted: usize,
    /// The model's token after the kept drafts (the correction, or the bonus when all were kept).
    pub next: u32,
    /// The accepted leaf (an index into the draft's leaves), the last of the kept tokens.
    pub leaf: Option<usize>,
}

/// Greedy verification. `target(j)` gives the full model's logits after the last accepted token and
/// drafts `..j`, for j in `0..=drafts.len()`; it is called in order and only up to the first
/// rejection, then once more for a kept leaf. With leaves (see `Draft::leaves`), row
/// drafts.len() + 1 + i is leaf i's: where the model's token after the kept drafts is not the
/// chain's next draft but a leaf's at that depth, the leaf is kept and the token after it comes from
/// the leaf's row. Every kept token is the model's own greedy choice, so the output is the same
/// with or without leaves.
pub fn verify_greedy(drafts: &[u32], leaves: &[(usize, u32)], mut target: impl FnMut(usize) -> Result<Vec<f32>>) -> Result<Verdict> {
    let n = drafts.len();
    for j in 0..=n {
        let t = argmax(&target(j)?);
        if drafts.get(j) == Some(&t) {
            continue;
        }
        if let Some(i) = leaves.iter().position(|&(depth, token)| depth == j + 1 && token == t) {
            return Ok(Verdict { accepted: j + 1, next: argmax(&target(n + 1 + i)?), leaf: Some(i) });
        }
        return Ok(Verdict { accepted: j, next: t, leaf: None });
    }
    unreachable!("the loop returns at row {n} at the latest")
}

/// Speculative sampling. `q[j]` is the distribution draft `j` was drawn from; the target rows (as in
/// [`verify_greedy`]) are turned into distributions with the sampler's own temperature and top-p.
/// Draft `j` is kept with probability min(1, p/q); on the first rejection the token is drawn from
/// norm(max(0, p - q)).
pub fn verify_sampled(
    drafts: &[u32],
    q: &[Vec<f32>],
    mut target: impl FnMut(usize) -> Result<Vec<f32>>,
    sampler: &mut Sampler,
) -> Result<Verdict> {
    debug_assert_eq!(q.len(), drafts.len());
    for (j, d) in drafts.iter().enumerate() {
        let p = sampler.distribution(&target(j)?);
        let (pd, qd) = (p[*d as usize], q[j][*d as usize]);
        if qd > 0.0 && sampler.uniform() < (pd / qd).min(1.0) {
            continue;
        }
        let residual: Vec<f32> = p.iter().zip(&q[j]).map(|(a, b)| (a - b).max(0.0)).collect();
        let next = if residual.iter().sum::<f32>() > 0.0 { sampler.draw(&residual) } else { sampler.draw(&p) };
        return Ok(Verdict { accepted: j, next, leaf: None });
    }
    let p = sampler.distribution(&target(drafts.len())?);
    Ok(Verdict { accepted: drafts.len(), next: sampler.draw(&p), leaf: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::SamplingOptions;

    /// Rows whose argmax is `ids[j]`, handed out in order; `asked` counts the rows the verifier read.
    fn rows<'a>(ids: &'a [usize], asked: &'a mut Vec<usize>) -> impl FnMut(usize) -> Result<Vec<f32>> + 'a {
        move |j| {
            assert_eq!(j, asked.len(), "rows are asked for in order");
            asked.push(j);
            Ok((0..5).map(|v| if v == ids[j] { 1.0 } else { 0.0 }).collect())
        }
    }

    #[test]
    fn greedy_keeps_the_matching_prefix_and_reads_no_row_after_a_rejection() {
        let mut asked = Vec::new();
        assert_eq!(
            verify_greedy(&[1, 2, 3], &[], rows(&[1, 2, 3, 4], &mut asked)).expect("verdict"),
            Verdict { accepted: 3, next: 4, leaf: None }
        );
        assert_eq!(asked.len(), 4);
        let mut asked = Vec::new();
        assert_eq!(
            verify_greedy(&[1, 2, 3], &[], rows(&[1, 0, 3, 4], &mut asked)).expect("verdict"),
            Verdict { accepted: 1, next: 0, leaf: None }
        );
        assert_eq!(asked.len(), 2, "rows 2 and 3 are never computed");
        let mut asked = Vec::new();
        assert_eq!(verify_greedy(&[1], &[], rows(&[2, 4], &mut asked)).expect("verdict"), Verdict { accepted: 0, next: 2, leaf: None });
        assert_eq!(asked.len(), 1);
        let mut asked = Vec::new();
        assert_eq!(verify_greedy(&[], &[], rows(&[3], &mut asked)).expect("verdict"), Verdict { accepted: 0, next: 3, leaf: None });
        assert_eq!(asked.len(), 1);
    }

    /// A leaf whose token the model chooses where the chain's draft is wrong is kept, and the token
    /// after it comes from its own row; a leaf past the chain's end extends it.
    #[test]
    fn greedy_keeps_the_leaf_the_model_chooses() {
        let one_hot =
            |ids: Vec<usize>| move |j: usize| -> Result<Vec<f32>> { Ok((0..6).map(|v| if v == ids[j] { 1.0 } else { 0.0 }).collect()) };
        // Chain [1, 2, 3]; rows 0..=3 are the chain's, rows 4 and 5 the leaves'.
        let leaves = [(2, 4), (2, 5)];
        let v = verify_greedy(&[1, 2, 3], &leaves, one_hot(vec![1, 5, 0, 0, 0, 3])).expect("verdict");
        assert_eq!(v, Verdict { accepted: 2, next: 3, leaf: Some(1) }, "draft 2 is wrong, the second leaf beside it right");
        let v = verify_greedy(&[1, 2, 3], &leaves, one_hot(vec![1, 0, 0, 0, 0, 3])).expect("verdict");
        assert_eq!(v, Verdict { accepted: 1, next: 0, leaf: None }, "no leaf has the model's token");
        let v = verify_greedy(&[1, 2], &[(3, 4)], one_hot(vec![1, 2, 4, 5])).expect("verdict");
        assert_eq!(v, Verdict { accepted: 3, next: 5, leaf: Some(0) }, "a leaf one past the chain");
        let v = verify_greedy(&[1, 2], &[(1, 2)], one_hot(vec![1, 2, 3, 0])).expect("verdict");
        assert_eq!(v, Verdict { accepted: 2, next: 3, leaf: None }, "the chain right, its leaf unused");
    }

    /// The first emitted token must follow p whatever the draft distribution q is.
    #[test]
    fn rejection_sampling_reproduces_the_target_distribution() {
        let logits: Vec<f32> = vec![0.1, 1.3, -0.4, 0.9, 0.0, 2.0];
        let mut s = Sampler::new(SamplingOptions { temperature: 0.8, top_p: None, seed: 11 });
        let p = s.distribution(&logits);
        // A draft model that disagrees with the target: it favours token 0 and knows nothing of 5.
        let q: Vec<f32> = vec![0.5, 0.1, 0.2, 0.1, 0.1, 0.0];
        let n = 40_000;
        let mut counts = vec![0usize; p.len()];
        for _ in 0..n {
            let d = s.draw(&q);
            let v = verify_sampled(&[d], std::slice::from_ref(&q), |_| Ok(logits.clone()), &mut s).expect("verdict");
            let first = if v.accepted == 1 { d } else { v.next };
            counts[first as usize] += 1;
        }
        let tv: f32 = counts.iter().zip(&p).map(|(c, p)| (*c as f32 / n as f32 - p).abs()).sum::<f32>() / 2.0;
        assert!(tv < 0.01, "total variation {tv}, counts {counts:?}, p {p:?}");
    }
}
