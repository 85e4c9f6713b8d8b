//! Where a submodel's weights come from, and the projections they become. A shard is either dense
//! (safetensors, every tensor in one float dtype) or quantized (GGUF written by `hat split`: the
//! matrices in a ggml block type, vectors in f32). Matrices of a quantized shard run through candle's
//! quantized matmuls; everything else is dense.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use crate::error::{ModelError, Result};
use crate::q8::PackedQ8;

/// Quantized matrices by full tensor name.
pub type QuantMap = HashMap<String, Arc<QTensor>>;

/// A `VarBuilder` for the dense tensors, and the quantized matrices of a quantized shard.
#[derive(Clone)]
pub struct Weights<'a> {
    vb: VarBuilder<'a>,
    quant: Option<Arc<QuantMap>>,
}

impl std::fmt::Debug for Weights<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights").field("prefix", &self.vb.prefix()).field("quantized", &self.quant.as_ref().map(|q| q.len())).finish()
    }
}

impl<'a> From<VarBuilder<'a>> for Weights<'a> {
    fn from(vb: VarBuilder<'a>) -> Self {
        Self { vb, quant: None }
    }
}

impl<'a> Weights<'a> {
    /// Dense tensors from `vb`, plus the quantized matrices in `quant` (looked up by full name).
    pub fn mixed(vb: VarBuilder<'a>, quant: QuantMap) -> Self {
        Self { vb, quant: Some(Arc::new(quant)) }
    }

    pub fn pp(&self, s: impl ToString) -> Self {
        Self { vb: self.vb.pp(s), quant: self.quant.clone() }
    }

    pub fn vb(&self) -> &VarBuilder<'a> {
        &self.vb
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    fn quantized(&self, name: &str) -> Option<Arc<QTensor>> {
        let full = match self.vb.prefix() {
            p if p.is_empty() => name.to_string(),
            p => format!("{p}.{name}"),
        };
        self.quant.as_ref()?.get(&full).cloned()
    }

    /// A `(out, in)` projection named `name` (its weight `name.weight`, its bias `name.bias`).
    pub fn proj(&self, in_dim: usize, out_dim: usize, bias: bool, name: &str) -> Result<Proj> {
        let vb = self.vb.pp(name);
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        match self.pp(name).quantized("weight") {
            Some(q) => {
                let dims = q.shape().dims().to_vec();
                if dims != [out_dim, in_dim] {
                    return Err(ModelError::ShapeMismatch {
                        name: format!("{}.weight", vb.prefix()),
                        actual: dims,
                        expected: vec![out_dim, in_dim],
                    });
                }
                Proj::quantized(q, bias, tiled_q8_0_wanted(name))
            }
            None => Ok(Proj::Dense(Linear::new(vb.get((out_dim, in_dim), "weight")?, bias))),
        }
    }

    /// A `(vocab, hidden)` embedding; a quantized one is expanded to the dense dtype once, here.
    pub fn embedding(&self, vocab: usize, hidden: usize, name: &str) -> Result<Embedding> {
        let table = match self.pp(name).quantized("weight") {
            Some(q) => q.dequantize(self.device())?.to_dtype(self.dtype())?,
            None => self.vb.pp(name).get((vocab, hidden), "weight")?,
        };
        if table.dims() != [vocab, hidden] {
            return Err(ModelError::ShapeMismatch {
                name: format!("{name}.weight"),
                actual: table.dims().to_vec(),
                expected: vec![vocab, hidden],
            });
        }
        Ok(Embedding::new(table, hidden))
    }
}

/// A linear projection, dense or quantized.
#[derive(Debug, Clone)]
pub enum Proj {
    Dense(Linear),
    /// `pad`: zero columns appended to the matrix (and to each input row) so candle's tiled kernels
    /// take it; see [`pad_for_tiles`].
    Quant {
        w: QMatMul,
        bias: Option<Tensor>,
        pad: usize,
        /// The matrix repacked for hat's own q8_0 kernel ([`crate::q8`]), which then runs it.
        packed: Option<Arc<PackedQ8>>,
    },
}

/// `y` plus a projection's bias, if it has one.
fn with_bias(y: Tensor, bias: &Option<Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// The block of values candle's tiled x86 kernels need a row length to be a multiple of.
const TILE_K: usize = 256;

/// Whether this CPU runs candle's tiled q8_0 kernels (they need 8-bit dot-product instructions:
/// AVX512-VNNI or AVX-VNNI), mirroring candle's own dispatch.
fn q8_0_tiles() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::env::var("MISTRALRS_FORCE_AVX2").as_deref() == Ok("1") {
            return false;
        }
        (std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vnni"))
            || (std::arch::is_x86_feature_detected!("avxvnni") && std::arch::is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where candle's kernels run a q8_0 matrix (hat's own kernel, [`crate::q8`], needs AVX512-VNNI;
/// `HAT_Q8_KERNEL=candle` asks for candle's), whether [`pad_for_tiles`] applies to projection
/// `name`: by default to every matrix (`HAT_Q8_TILED=head` pads the LM head only,
/// `HAT_Q8_TILED=0` none). Padded, a batch of k + 1
/// verification rows costs about 1.6x one row instead of 5x, on the device and in the cloud, and
/// local decode runs at llama.cpp's speed. On the README's own prompt ("What is the capital of
/// France?") the padded package answers "The capital of France is Paris." as f32 does, where the
/// unpadded one (and `keep`) drift into a list of French words; over all benchmark prompts the
/// replies part from f32's after 9-19 tokens whichever way (`scripts/quant-quality.py`).
fn tiled_q8_0_wanted(name: &str) -> bool {
    match std::env::var("HAT_Q8_TILED").as_deref() {
        Ok("0") => false,
        Ok("head") => name == "lm_head",
        _ => true,
    }
}

/// A q8_0 matrix whose rows are not a whole number of 256-value tiles runs in candle's generic
/// kernel, one matrix-vector product per input row: on SmolLM2 (576-wide rows) about 3x slower than
/// the tiled VNNI kernel at one row and 5-8x slower at a prefill chunk. Appending zero blocks to
/// every row (and zeros to every input row) lets the tiled kernel take it; the zeros add nothing to
/// any dot product, and the tiled kernel, like the generic one, gives a row the same result at any
/// batch size. But it rounds each input row to 8 bits with one scale per 256 values instead of per
/// 32, and SmolLM2's few huge hidden dimensions then cost the others their precision: with every
/// matrix padded, greedy replies over the benchmark prompts follow f32's for 8.8 tokens on average,
/// against 12-19 otherwise (`scripts/quant-quality.py`), a metric that one early near-tie decides;
/// see `tiled_q8_0_wanted` for which matrices are padded.
/// Returns the matrix to run and the number of zero columns added.
pub fn pad_for_tiles(q: Arc<QTensor>) -> Result<(Arc<QTensor>, usize)> {
    let Ok((n, k)) = q.shape().dims2() else { return Ok((q, 0)) };
    if q.dtype() != GgmlDType::Q8_0 || k % TILE_K == 0 || !q.device().is_cpu() || !q8_0_tiles() {
        return Ok((q, 0));
    }
    let padded = k.next_multiple_of(TILE_K);
    let (block, bytes) = (GgmlDType::Q8_0.block_size(), GgmlDType::Q8_0.type_size());
    let (row, new_row) = (k / block * bytes, padded / block * bytes);
    let data = q.data()?;
    let mut out = vec![0u8; n * new_row];
    for (dst, src) in out.chunks_exact_mut(new_row).zip(data.chunks_exact(row)) {
        dst[..row].copy_from_slice(src);
    }
    let storage = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Owned(out), &q.device(), GgmlDType::Q8_0)?;
    Ok((Arc::new(QTensor::new(storage, (n, padded))?), padded - k))
}

impl Proj {
    /// A quantized `(out, in)` matrix: in hat's own q8_0 kernel where it runs (see [`crate::q8`]),
    /// else in candle's, padded for its tiled kernel when `pad` (see [`pad_for_tiles`]).
    pub fn quantized(q: Arc<QTensor>, bias: Option<Tensor>, pad: bool) -> Result<Proj> {
        if let Some(packed) = PackedQ8::pack(&q)? {
            return Ok(Proj::Quant { w: QMatMul::from_arc(q)?, bias, pad: 0, packed: Some(packed) });
        }
        let (q, pad) = if pad { pad_for_tiles(q)? } else { (q, 0) };
        Ok(Proj::Quant { w: QMatMul::from_arc(q)?, bias, pad, packed: None })
    }

    /// A quantized matrix runs in hat's q8_0 kernel ([`crate::q8`]) or candle's quantized kernels at
    /// every batch size: both quantize each input row on its own and give a row the same result
    /// alone or in a batch, which keeps `hat`, chunked prefill and `--mode local` token for token
    /// equal. (Switching to an f32 matmul for large batches would break that: rows would then differ
    /// by batch size.)
    ///
    /// # Shapes
    /// x: (..., in) -> (..., out)
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => Ok(l.forward(x)?),
            Proj::Quant { w, bias, pad, packed } => {
                let y = match packed {
                    Some(p) => p.forward(x)?,
                    None => {
                        let x = if *pad > 0 { x.pad_with_zeros(candle_core::D::Minus1, 0, *pad)? } else { x.contiguous()? };
                        if self.quant_type() == Some(GgmlDType::Q6K) && x.elem_count() == x.dim(candle_core::D::Minus1)? {
                            // candle runs q6_k in a tiled kernel for two rows or more and in another
                            // kernel for one, and the two round differently; one row goes in twice so
                            // that it gets the bits it gets in a batch (a verification round or a
                            // prefill chunk).
                            let rows = x.dims().len() - 1;
                            w.forward(&Tensor::cat(&[&x, &x], rows.saturating_sub(1))?)?.narrow(rows.saturating_sub(1), 0, 1)?
                        } else {
                            w.forward(&x)?
                        }
                    }
                };
                with_bias(y, bias)
            }
        }
    }

    /// Each projection of the same input, as [`Proj::forward`] gives it. Where all of them run in
    /// hat's q8_0 kernel, the input is converted and rounded to 8 bits once for all (the query, key
    /// and value projections share it, as do the MLP's gate and up), which [`PackedQ8::forward`]
    /// did once a matrix.
    ///
    /// # Shapes
    /// x: (..., in) -> one (..., out) per projection
    pub fn forward_shared<const N: usize>(projs: [&Proj; N], x: &Tensor) -> Result<[Tensor; N]> {
        let packed: Vec<(&PackedQ8, &Option<Tensor>)> = projs
            .iter()
            .filter_map(|p| match p {
                Proj::Quant { packed: Some(w), bias, .. } => Some((w.as_ref(), bias)),
                _ => None,
            })
            .collect();
        let ys = if packed.len() == N {
            let mats: Vec<&PackedQ8> = packed.iter().map(|(w, _)| *w).collect();
            PackedQ8::forward_many(&mats, x)?
                .into_iter()
                .zip(&packed)
                .map(|(y, (_, bias))| with_bias(y, bias))
                .collect::<Result<Vec<_>>>()?
        } else {
            projs.iter().map(|p| p.forward(x)).collect::<Result<Vec<_>>>()?
        };
        Ok(ys.try_into().unwrap_or_else(|_| unreachable!("one result per projection")))
    }

    /// The weight as a dense f32 matrix (a copy when quantized).
    ///
    /// # Shapes
    /// -> (out, in)
    pub fn weight(&self) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => Ok(l.weight().clone()),
            Proj::Quant { w, pad, .. } => {
                let full = quant_weight(w)?;
                let k = full.dim(1)? - pad;
                Ok(full.narrow(1, 0, k)?.contiguous()?)
            }
        }
    }

    /// The ggml block type the matrix runs in, `None` when dense.
    pub fn quant_type(&self) -> Option<GgmlDType> {
        match self {
            Proj::Quant { w: QMatMul::QTensor(q), .. } => Some(q.dtype()),
            _ => None,
        }
    }
}

fn quant_weight(w: &QMatMul) -> Result<Tensor> {
    match w {
        QMatMul::QTensor(q) => Ok(q.dequantize(&q.device())?),
        QMatMul::Tensor(t) | QMatMul::TensorF16(t) => Ok(t.to_dtype(DType::F32)?),
    }
}

/// A storage type a split can write a side's matrices in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quant {
    /// Dense shard in f32.
    F32,
    /// Dense shard in f16 (computed in f32 on the CPU).
    F16,
    /// GGUF shard, matrices in 8-bit blocks of 32 (one scale each).
    Q8_0,
    /// GGUF shard, matrices in 4-bit blocks of 32 (one scale each).
    Q4_0,
    /// GGUF shard, matrices in 4-bit k-quant super-blocks of 256 (rows must be a multiple of 256).
    Q4K,
    /// GGUF shard, matrices in the source GGUF's own block types.
    Keep,
}

impl Quant {
    pub const NAMES: &'static str = "q8_0, q4_0, q4_k, f16, f32, keep";

    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Quant::F32),
            "f16" => Ok(Quant::F16),
            "q8_0" | "q8" => Ok(Quant::Q8_0),
            "q4_0" | "q4" => Ok(Quant::Q4_0),
            "q4_k" | "q4k" => Ok(Quant::Q4K),
            "keep" => Ok(Quant::Keep),
            other => Err(format!("unknown quantization `{other}` (choose one of {})", Self::NAMES)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::Q8_0 => "q8_0",
            Quant::Q4_0 => "q4_0",
            Quant::Q4K => "q4_k",
            Quant::Keep => "keep",
        }
    }

    /// The ggml type matrices are written in; `None` for dense shards and for `keep`.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            Quant::Q8_0 => Some(GgmlDType::Q8_0),
            Quant::Q4_0 => Some(GgmlDType::Q4_0),
            Quant::Q4K => Some(GgmlDType::Q4K),
            _ => None,
        }
    }

    /// Whether the side's shards are GGUF.
    pub fn is_quantized(self) -> bool {
        matches!(self, Quant::Q8_0 | Quant::Q4_0 | Quant::Q4K | Quant::Keep)
    }
}

/// The ggml types hat can run (candle has CPU kernels for each), by their GGUF names.
pub fn ggml_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// Why a matrix of `dims` cannot be stored in `t`, if it cannot: ggml blocks run along a row, so the
/// row length must be a whole number of blocks.
pub fn unfit(t: GgmlDType, dims: &[usize]) -> Option<String> {
    let block = t.block_size();
    let row = *dims.last()?;
    (row % block != 0).then(|| format!("{} packs rows in blocks of {block} values, but these rows hold {row}", ggml_name(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block type a package may hold gives a row the same bits alone and in a batch (candle's
    /// q6_k kernels do not, and `Proj` works around them).
    #[test]
    fn a_row_is_the_same_alone_and_in_a_batch_in_every_type() -> Result<()> {
        let dev = Device::Cpu;
        let types = [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K, GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0];
        for ty in types {
            for k in [640, 1024, 2048] {
                if k % ty.block_size() != 0 {
                    continue;
                }
                let w = Tensor::randn(0f32, 1.0, (64, k), &dev)?;
                let q = Arc::new(QTensor::quantize(&w, ty)?);
                // candle's kernels, and whatever `quantized` picks (hat's q8_0 kernel where it runs).
                let candle = Proj::Quant { w: QMatMul::from_arc(q.clone())?, bias: None, pad: 0, packed: None };
                for proj in [candle, Proj::quantized(q, None, false)?] {
                    let x = Tensor::randn(0f32, 1.0, (1, 5, k), &dev)?;
                    let all = proj.forward(&x)?;
                    for i in 0..5 {
                        let one = proj.forward(&x.narrow(1, i, 1)?)?;
                        let diff = (one - all.narrow(1, i, 1)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                        assert_eq!(diff, 0.0, "{ty:?}, rows of {k}: row {i}");
                    }
                    assert_eq!(proj.forward(&x.narrow(1, 0, 1)?.squeeze(0)?)?.dims(), &[1, 64], "a 2-d row keeps its shape");
                }
            }
        }
        Ok(())
    }

    /// Padding keeps the weights, keeps a row's result independent of its batch, and computes what
    /// the unpadded matrix computes up to the kernels' different 8-bit rounding of the input.
    #[test]
    fn padded_q8_0_keeps_weights_and_rows() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (64, 576), &dev)?;
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0)?);
        let plain = Proj::Quant { w: QMatMul::from_arc(q.clone())?, bias: None, pad: 0, packed: None };
        let (p, pad) = pad_for_tiles(q)?;
        let padded = Proj::Quant { w: QMatMul::from_arc(p)?, bias: None, pad, packed: None };
        if pad == 0 {
            return Ok(()); // this CPU has no tiled kernel: nothing is padded
        }
        assert_eq!(pad, 192);
        let diff = (plain.weight()? - padded.weight()?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0, "the padded matrix holds the same blocks");
        let x = Tensor::randn(0f32, 1.0, (1, 5, 576), &dev)?;
        let batch = padded.forward(&x)?;
        for r in 0..5 {
            let alone = padded.forward(&x.narrow(1, r, 1)?)?;
            assert_eq!((alone - batch.narrow(1, r, 1)?)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0, "row {r}");
        }
        let want = plain.forward(&x)?;
        let rel = ((batch - &want)?.sqr()?.mean_all()?.sqrt()? / want.sqr()?.mean_all()?.sqrt()?)?.to_scalar::<f32>()?;
        assert!(rel < 0.02, "relative difference {rel}");
        Ok(())
    }
}
