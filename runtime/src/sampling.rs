//! Next-token choice: greedy (argmax) when the temperature is 0, else seeded top-p sampling.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};

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

pub struct Sampler {
    inner: LogitsProcessor,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sampler")
    }
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Self {
        let sampling = if opts.temperature <= 0.0 {
            Sampling::ArgMax
        } else {
            match opts.top_p {
                Some(p) if p < 1.0 => Sampling::TopP { p, temperature: opts.temperature },
                _ => Sampling::All { temperature: opts.temperature },
            }
        };
        Self { inner: LogitsProcessor::from_sampling(opts.seed, sampling) }
    }

    /// # Shapes
    /// logits: (vocab,)
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        Ok(self.inner.sample(&logits.to_dtype(candle_core::DType::F32)?)?)
    }
}
