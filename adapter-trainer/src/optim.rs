//! AdamW with its moments in the open, so a checkpoint can hold them and `--resume` continues the
//! same optimisation rather than restarting its statistics; plus warmup-then-cosine learning rates
//! and gradient clipping by global norm.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Gradients are scaled down when their global norm is above this.
    pub clip_norm: f64,
    pub warmup_steps: usize,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 3e-4, beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.01, clip_norm: 1.0, warmup_steps: 20 }
    }
}

/// Linear warmup to `lr`, then cosine decay to a tenth of it at `total`.
pub fn learning_rate(cfg: &AdamWConfig, step: usize, total: usize) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let t = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

#[derive(Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far.
    pub t: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = vars.iter().map(|(_, v)| v.as_tensor().zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self { cfg, vars, m, v, t: 0 })
    }

    /// Global L2 norm of the gradients of the optimised variables.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut sq = 0f64;
        for (_, var) in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        Ok(sq.sqrt())
    }

    /// One update at learning rate `lr`; returns the gradient norm before clipping.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        if !norm.is_finite() {
            return Err(TrainError::BadInput(format!("gradient norm is {norm}: training diverged; lower the learning rate")));
        }
        let scale = if norm > self.cfg.clip_norm { self.cfg.clip_norm / norm } else { 1.0 };
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let c1 = 1.0 - b1.powi(self.t as i32);
        let c2 = 1.0 - b2.powi(self.t as i32);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = (g * scale)?;
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + self.cfg.eps)?)?;
            let theta = var.as_tensor().detach();
            let theta = ((&theta * (1.0 - lr * self.cfg.weight_decay))? - (update * lr)?)?;
            var.set(&theta)?;
        }
        Ok(norm)
    }

    /// Moments under `m.{name}` and `v.{name}`, for a checkpoint.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].to_device(&candle_core::Device::Cpu)?);
            out.insert(format!("v.{name}"), self.v[i].to_device(&candle_core::Device::Cpu)?);
        }
        Ok(out)
    }

    /// Restores moments saved by [`AdamW::state`].
    pub fn restore(&mut self, state: &HashMap<String, Tensor>, t: usize) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let get = |k: String| state.get(&k).cloned().ok_or_else(|| TrainError::Checkpoint(format!("checkpoint has no `{k}`")));
            self.m[i] = get(format!("m.{name}"))?.to_device(var.device())?;
            self.v[i] = get(format!("v.{name}"))?.to_device(var.device())?;
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_a_tenth() {
        let cfg = AdamWConfig { lr: 1.0, warmup_steps: 10, ..Default::default() };
        assert!((learning_rate(&cfg, 0, 100) - 0.1).abs() < 1e-9);
        assert!((learning_rate(&cfg, 9, 100) - 1.0).abs() < 1e-9);
        assert!((learning_rate(&cfg, 10, 100) - 1.0).abs() < 1e-9);
        assert!((learning_rate(&cfg, 100, 100) - 0.1).abs() < 1e-9);
    }

    /// Minimising (w - 3)^2 from 0 gets close to 3.
    #[test]
    fn adamw_minimises_a_quadratic() -> Result<()> {
        let w = Var::new(&[0f32], &candle_core::Device::Cpu)?;
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.0, warmup_steps: 1, clip_norm: 100.0, ..Default::default() };
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg)?;
        for _ in 0..300 {
            let loss = (w.as_tensor() - 3.0)?.sqr()?.sum_all()?;
            opt.step(&loss.backward()?, 0.1)?;
        }
        let got = w.as_tensor().to_vec1::<f32>()?[0];
        assert!((got - 3.0).abs() < 0.05, "{got}");
        Ok(())
    }
}
