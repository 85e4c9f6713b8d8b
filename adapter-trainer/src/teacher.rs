//! Teacher targets, computed once and cached on disk so later epochs (and `--resume`) never rerun
//! the middle submodel: for every position of every training sequence, the input submodel's state
//! (the adapter's input), the middle submodel's output (the regression target), and the full
//! model's next-token distribution, kept as its top-k tokens (the distillation target).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hat_runtime::{CloudPackage, DevicePackage};
use sha2::{Digest, Sha256};

use crate::error::{Result, TrainError};

#[derive(Debug)]
pub struct TeacherSet {
    /// # Shapes
    /// (positions, hidden) f32
    pub x: Tensor,
    /// # Shapes
    /// (positions, hidden) f32
    pub y: Tensor,
    /// # Shapes
    /// (positions, top_k) u32
    pub top_ids: Tensor,
    /// Renormalised over the top k.
    ///
    /// # Shapes
    /// (positions, top_k) f32
    pub top_p: Tensor,
    /// Sequence `i` covers rows `offsets[i]..offsets[i + 1]`.
    pub offsets: Vec<usize>,
    /// The output submodel's final states (what the LM head reads), for the feature draft head.
    ///
    /// # Shapes
    /// (positions, hidden) f32
    pub top: Option<Tensor>,
    /// The token at every position.
    pub tokens: Vec<u32>,
}

/// Identifies a teacher set: the model split, the sequences and k.
pub fn teacher_key(fingerprint: &str, sequences: &[Vec<u32>], top_k: usize) -> String {
    teacher_key_for(fingerprint, sequences, top_k, false)
}

/// [`teacher_key`], told whether the set also holds the output submodel's states.
pub fn teacher_key_for(fingerprint: &str, sequences: &[Vec<u32>], top_k: usize, with_top: bool) -> String {
    let mut h = Sha256::new();
    if with_top {
        h.update(b"top");
    }
    h.update(fingerprint.as_bytes());
    h.update((top_k as u64).to_le_bytes());
    for s in sequences {
        h.update((s.len() as u64).to_le_bytes());
        for t in s {
            h.update(t.to_le_bytes());
        }
    }
    hex::encode(h.finalize())[..16].to_string()
}

impl TeacherSet {
    /// Runs input, middle and output submodels over every sequence (on the CPU packages); with
    /// `with_top` it also keeps the output submodel's final states.
    pub fn compute(
        device: &DevicePackage,
        cloud: &CloudPackage,
        sequences: &[Vec<u32>],
        top_k: usize,
        with_top: bool,
        bar: &indicatif::ProgressBar,
    ) -> Result<Self> {
        let (mut xs, mut ys, mut ids, mut ps, mut tops) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut offsets = vec![0];
        for seq in sequences {
            let t = Tensor::new(seq.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let x = device.input.forward_layers(&device.input.embed(&t)?, 0, &mut device.input.new_cache())?;
            let y = cloud.middle.forward_layers(&x, 0, &mut cloud.middle.new_cache())?;
            let h = device.output.forward_layers(&y, 0, &mut device.output.new_cache())?;
            let logits = device.output.head(&h)?.squeeze(0)?;
            let (order, top) = top_k_probs(&logits, top_k)?;
            if with_top {
                tops.push(h.squeeze(0)?);
            }
            xs.push(x.squeeze(0)?);
            ys.push(y.squeeze(0)?);
            ids.push(order);
            ps.push(top);
            offsets.push(offsets[offsets.len() - 1] + seq.len());
            bar.inc(1);
        }
        // Rounded as the cache stores them, so a fresh run and a resumed one train on equal values.
        let round = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(storage_dtype(&t)?)?.to_dtype(DType::F32)?) };
        Ok(Self {
            x: round(Tensor::cat(&xs, 0)?)?,
            y: round(Tensor::cat(&ys, 0)?)?,
            top_ids: Tensor::cat(&ids, 0)?,
            top_p: Tensor::cat(&ps, 0)?,
            offsets,
            top: if with_top { Some(round(Tensor::cat(&tops, 0)?)?) } else { None },
            tokens: sequences.concat(),
        })
    }

    /// The sets' sequences one after another, as one set.
    ///
    /// Joined one field at a time, each set's part of a field freed as soon as it is copied: the
    /// peak is the sets plus one joined field, not twice the sets. (Joining all at once, 9300
    /// sequences, 1.8M positions, were killed at 24 GB; joined this way they peaked at 17.2 GB.)
    pub fn concat(mut sets: Vec<TeacherSet>) -> Result<Self> {
        if sets.len() == 1 {
            return Ok(sets.remove(0));
        }
        let with_top = sets.iter().filter(|s| s.top.is_some()).count();
        if sets.is_empty() || (with_top != 0 && with_top != sets.len()) {
            return Err(TrainError::BadInput("teacher sets to join must be some, and all with or all without top states".into()));
        }
        let mut offsets = vec![0];
        for set in &sets {
            let base = offsets[offsets.len() - 1];
            offsets.extend(set.offsets[1..].iter().map(|o| base + o));
        }
        let tokens = sets.iter().flat_map(|s| s.tokens.iter().copied()).collect();
        let (mut xs, mut ys, mut ids, mut ps, mut tops) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in sets {
            xs.push(s.x);
            ys.push(s.y);
            ids.push(s.top_ids);
            ps.push(s.top_p);
            tops.extend(s.top);
        }
        // Each `join` consumes its parts, so they are dropped before the next field is joined.
        let join = |parts: Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::cat(&parts, 0)?) };
        let top = if tops.is_empty() { None } else { Some(join(tops)?) };
        Ok(Self { x: join(xs)?, y: join(ys)?, top_ids: join(ids)?, top_p: join(ps)?, top, tokens, offsets })
    }

    pub fn num_sequences(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn num_positions(&self) -> usize {
        self.offsets[self.offsets.len() - 1]
    }

    /// Rows `start..start + len` of sequence `i`: (x, y, top_ids, top_p).
    pub fn window(&self, i: usize, start: usize, len: usize) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let s = self.offsets[i] + start;
        Ok((self.x.narrow(0, s, len)?, self.y.narrow(0, s, len)?, self.top_ids.narrow(0, s, len)?, self.top_p.narrow(0, s, len)?))
    }

    pub fn sequence_len(&self, i: usize) -> usize {
        self.offsets[i + 1] - self.offsets[i]
    }

    /// States in 16 bits (half the disk; the targets need no more precision; see [`storage_dtype`]),
    /// written then renamed.
    pub fn save(&self, path: &Path) -> Result<()> {
        let offsets = Tensor::new(self.offsets.iter().map(|o| *o as u32).collect::<Vec<_>>().as_slice(), &Device::Cpu)?;
        let mut m: HashMap<String, Tensor> = HashMap::new();
        m.insert("x".into(), self.x.to_dtype(storage_dtype(&self.x)?)?);
        m.insert("y".into(), self.y.to_dtype(storage_dtype(&self.y)?)?);
        m.insert("top_ids".into(), self.top_ids.clone());
        m.insert("top_p".into(), self.top_p.clone());
        m.insert("offsets".into(), offsets);
        m.insert("tokens".into(), Tensor::new(self.tokens.as_slice(), &Device::Cpu)?);
        if let Some(top) = &self.top {
            m.insert("top".into(), top.to_dtype(storage_dtype(top)?)?);
        }
        let tmp = path.with_extension("partial");
        candle_core::safetensors::save(&m, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|e| TrainError::io(format!("cannot write {}", path.display()), e))
    }

    pub fn load(path: &Path) -> Result<Self> {
        let mut m = candle_core::safetensors::load(path, &Device::Cpu)?;
        let mut take = |k: &str| m.remove(k).ok_or_else(|| TrainError::Checkpoint(format!("{}: no `{k}`", path.display())));
        let x = take("x")?.to_dtype(DType::F32)?;
        let y = take("y")?.to_dtype(DType::F32)?;
        let top_ids = take("top_ids")?;
        let top_p = take("top_p")?;
        let offsets = take("offsets")?.to_vec1::<u32>()?.into_iter().map(|o| o as usize).collect();
        // Sets cached before the draft head existed have no tokens; the adapter does not need them.
        let tokens = m.remove("tokens").map(|t| t.to_vec1::<u32>()).transpose()?.unwrap_or_default();
        let top = m.remove("top").map(|t| t.to_dtype(DType::F32)).transpose()?;
        Ok(Self { x, y, top_ids, top_p, offsets, top, tokens })
    }
}

/// f16 for states that fit its range, bf16 for those that do not: Gemma 3's residual stream passes
/// f16's largest value (65504), and f16 would store infinities there, which made training's first
/// gradient NaN. bf16 rounding of a value past 65504 stays past it, so a saved set reloads into the
/// same type.
fn storage_dtype(t: &Tensor) -> Result<DType> {
    let max = t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(if max < 65504.0 { DType::F16 } else { DType::BF16 })
}

/// The `k` most likely tokens of each row and their probabilities, renormalised over the k, found by
/// selection rather than a full sort of the vocabulary.
///
/// # Shapes
/// logits: (rows, vocab) -> (rows, k) u32, (rows, k) f32
pub fn top_k_probs(logits: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let (mut ids, mut ps) = (Vec::with_capacity(rows.len() * k), Vec::with_capacity(rows.len() * k));
    for row in &rows {
        let k = k.min(row.len());
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        let desc = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
        if k < order.len() {
            order.select_nth_unstable_by(k, desc);
        }
        order.truncate(k);
        order.sort_by(desc);
        let m = row[order[0] as usize];
        let e: Vec<f32> = order.iter().map(|&i| (row[i as usize] - m).exp()).collect();
        let z: f32 = e.iter().sum();
        ids.extend_from_slice(&order);
        ps.extend(e.iter().map(|v| v / z));
    }
    let n = rows.len();
    Ok((Tensor::from_vec(ids, (n, k), &Device::Cpu)?, Tensor::from_vec(ps, (n, k), &Device::Cpu)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// States within f16's range stay f16; one past it makes the whole tensor bf16, which reloads
    /// finite and as bf16 again.
    #[test]
    fn states_past_f16_are_stored_in_bf16() -> Result<()> {
        let small = Tensor::new(&[1.5f32, -300.0, 65000.0], &Device::Cpu)?;
        assert_eq!(storage_dtype(&small)?, DType::F16);
        let big = Tensor::new(&[1.5f32, -300.0, 70000.0, 65504.0], &Device::Cpu)?;
        assert_eq!(storage_dtype(&big)?, DType::BF16);
        let stored = big.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        assert!(stored.to_vec1::<f32>()?.iter().all(|v| v.is_finite()));
        assert_eq!(storage_dtype(&stored)?, DType::BF16);
        assert!(big.to_dtype(DType::F16)?.to_dtype(DType::F32)?.to_vec1::<f32>()?[2].is_infinite(), "f16 would store infinity");
        Ok(())
    }
}
