//! Next-token choice. Greedy takes the argmax (the first one on ties, in every mode, so split and
//! unsplit runs agree); sampling draws from softmax(logits / T), cut to the top-p nucleus. The same
//! [`Sampler::distribution`] feeds speculative verification, so accepted tokens follow exactly the
//! distribution plain sampling would use.

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self { temperature: 0.0, top_p: None, seed: 299_792_458 }
    }
}

impl SamplingOptions {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// Index of the largest value; the first one on ties.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if v.total_cmp(&values[best]).is_gt() {
            best = i;
        }
    }
    best as u32
}

/// # Shapes
/// logits: (vocab,) or (rows, vocab) -> rows of f32
pub fn logits_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    let l = logits.to_dtype(DType::F32)?;
    Ok(match l.rank() {
        1 => vec![l.to_vec1::<f32>()?],
        _ => l.to_vec2::<f32>()?,
    })
}

#[derive(Debug)]
pub struct Sampler {
    opts: SamplingOptions,
    rng: StdRng,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Self {
        Self { opts, rng: StdRng::seed_from_u64(opts.seed) }
    }

    pub fn is_greedy(&self) -> bool {
        self.opts.is_greedy()
    }

    /// The distribution a token is drawn from: softmax(logits / T), restricted to the smallest set
    /// of tokens whose mass reaches top-p, renormalised.
    pub fn distribution(&self, logits: &[f32]) -> Vec<f32> {
        let t = self.opts.temperature.max(1e-6) as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut p: Vec<f32> = logits.iter().map(|l| ((l - max) / t).exp()).collect();
        let sum: f32 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
        if let Some(top_p) = self.opts.top_p.filter(|v| *v < 1.0) {
            let mut order: Vec<usize> = (0..p.len()).collect();
            order.sort_unstable_by(|a, b| p[*b].total_cmp(&p[*a]));
            let mut mass = 0.0;
            let mut keep = order.len();
            for (n, i) in order.iter().enumerate() {
                mass += p[*i];
                if mass as f64 >= top_p {
                    keep = n + 1;
                    break;
                }
            }
            for i in &order[keep..] {
                p[*i] = 0.0;
            }
            let sum: f32 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= sum);
        }
        p
    }

    /// Draws an index from a distribution (weights need not sum to exactly 1).
    pub fn draw(&mut self, probs: &[f32]) -> u32 {
        let total: f32 = probs.iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return i as u32;
            }
            u -= p;
        }
        // Rounding left a sliver: the last token with any mass.
        probs.iter().rposition(|p| *p > 0.0).unwrap_or(0) as u32
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        self.rng.random::<f32>()
    }

    /// Greedy or sampled choice from one row of logits.
    pub fn choose(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            argmax(logits)
        } else {
            let p = self.distribution(logits);
            self.draw(&p)
        }
    }

    /// # Shapes
    /// logits: (vocab,)
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let rows = logits_rows(logits)?;
        Ok(self.choose(&rows[0]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[-1.0]), 0);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let s = Sampler::new(SamplingOptions { temperature: 1.0, top_p: Some(0.7), seed: 1 });
        let logits = [2.0f32.ln(), 1.0f32.ln(), 1.0f32.ln(), 0.0f32.ln().max(-50.0)];
        let p = s.distribution(&logits);
        // 0.5 + 0.25 >= 0.7: two tokens kept, renormalised.
        assert!((p[0] - 2.0 / 3.0).abs() < 1e-5 && (p[1] - 1.0 / 3.0).abs() < 1e-5, "{p:?}");
        assert_eq!(p[2], 0.0);
    }

    #[test]
    fn draws_follow_the_distribution() {
        let mut s = Sampler::new(SamplingOptions { temperature: 1.0, top_p: None, seed: 3 });
        let p = [0.1f32, 0.6, 0.3];
        let mut counts = [0usize; 3];
        let n = 20_000;
        for _ in 0..n {
            counts[s.draw(&p) as usize] += 1;
        }
        for (c, q) in counts.iter().zip(p) {
            assert!((*c as f32 / n as f32 - q).abs() < 0.015, "{counts:?}");
        }
    }
}
