//! Attention on the CPU one query row at a time, over exactly the keys that row may see, in a fixed
//! order. A row's result is then the same whatever batch it arrives in: a decode step (one row), a
//! verification round (the last token and its drafts) or a prefill chunk of any size. candle's batched
//! kernels sum a masked row of another length in another order, which differs in the last bits; on a
//! quantized package those bits can flip the 8-bit rounding of an activation and change a token, so
//! `hat` and chunked prefill would stop matching `--mode local`.
//!
//! The arithmetic is fixed and fused (see `kernels`). Against the separate multiplies and adds,
//! libm's `expf` and sequential sums of earlier releases, a verification round of 5 rows over 1300
//! cached positions takes 22.6 ms of the middle's time instead of 36.0 on one core
//! (`cargo bench -p hat-tests --bench middle_batch`).

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};

mod kernels;

use kernels::{dot, score_block, softmax, weigh_group, Rows};

/// Rows that go over the cache together (a verification round fits in one block; a prefill chunk
/// is split so that its blocks still spread over threads).
const ROW_BLOCK: usize = 8;
/// Scores (rows x heads x keys) below which a call runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 16;
/// Keys (and values) read per pass over a block's queries: 64 keys of 64 floats stay in L1.
const KEY_BLOCK: usize = 64;

/// One query row of one head, and the keys it sees.
struct Query<'a> {
    row: &'a [f32],
    /// The keys before its own.
    before: std::ops::Range<usize>,
    /// Its own key's slot.
    own: usize,
}

impl Query<'_> {
    /// The keys before its own that fall in `keys`, and where their scores sit among the query's
    /// scores; `None` when there are none.
    fn seen_in(&self, keys: &std::ops::Range<usize>) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
        let seen = self.before.start.max(keys.start)..self.before.end.min(keys.end);
        if seen.is_empty() {
            return None;
        }
        let at = seen.start - self.before.start..seen.end - self.before.start;
        Some((seen, at))
    }
}

/// Rows of block `r` of a round of `seq` rows.
fn row_block(r: usize, seq: usize) -> std::ops::Range<usize> {
    r * ROW_BLOCK..((r + 1) * ROW_BLOCK).min(seq)
}

/// `keys` in blocks of [`KEY_BLOCK`], in order.
fn key_blocks(keys: std::ops::Range<usize>) -> impl Iterator<Item = std::ops::Range<usize>> {
    keys.clone().step_by(KEY_BLOCK).map(move |b| b..(b + KEY_BLOCK).min(keys.end))
}

/// Which keys a query row sees, and how its scores are scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    /// Absolute position of the first key passed in (a sliding-window cache drops old keys).
    pub key_start: usize,
    /// A row at position p sees keys `p - window + 1..=p` (Hugging Face's and llama.cpp's convention);
    /// `None`: every earlier key.
    pub window: Option<usize>,
    /// Scores are `q . k * scale`.
    pub scale: f32,
}

impl Span {
    /// The absolute positions row `p` attends to.
    pub fn keys(&self, p: usize) -> std::ops::Range<usize> {
        let first = match self.window {
            Some(w) => (p + 1).saturating_sub(w),
            None => 0,
        };
        first..p + 1
    }
}

/// Causal attention of `seq` new positions starting at `pos`: query row i sees the keys
/// `span.keys(pos + i)`. Query head h reads key/value head `h / (heads / kv_heads)`.
///
/// # Shapes
/// q: (batch, heads, seq, head_dim), k and v: (batch, kv_heads, pos + seq - key_start, head_dim) -> (batch, heads, seq, head_dim)
pub fn attend_rows(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize, span: Span) -> Result<Tensor> {
    attend_tree(q, k, v, pos, span, None)
}

/// Checks a round's row depths for its `rows` rows (see [`attend_tree`]): one per row, and row i
/// sits at depth `depths[i] <= i` and sees rows `0..depths[i]`, which must be the chain (each at
/// its own depth).
pub fn check_depths(depths: &[usize], rows: usize) -> Result<()> {
    if depths.len() != rows {
        return Err(ModelError::InvalidConfig(format!("{} row depths for {rows} rows", depths.len())));
    }
    for (i, &d) in depths.iter().enumerate() {
        if d > i || depths[..d].iter().enumerate().any(|(j, &e)| e != j) {
            return Err(ModelError::InvalidConfig(format!("row {i} at depth {d} does not extend the chain of rows before it")));
        }
    }
    Ok(())
}

/// Whether row depths describe a plain chain (every row at its own depth).
pub fn is_chain(depths: &[usize]) -> bool {
    depths.iter().enumerate().all(|(i, &d)| d == i)
}

/// [`attend_rows`] for a round shaped as a chain with leaves: with `depths`, new row i sits at
/// position `pos + depths[i]` and sees the cached keys, the new rows `0..depths[i]` (a prefix of the
/// chain, see [`check_depths`]) and its own key, which the cache holds at slot `pos + i`. A chain
/// row (`depths[i] == i`) sees exactly what `attend_rows` shows it, and a leaf sees the keys a
/// chain row at its position would see, in the same order: either way a row's result has the bits
/// it would have in a plain chain. `None` is the plain chain.
///
/// # Shapes
/// as [`attend_rows`]
pub fn attend_tree(q: &Tensor, k: &Tensor, v: &Tensor, pos: usize, span: Span, depths: Option<&[usize]>) -> Result<Tensor> {
    if q.dtype() != DType::F32 || !q.device().is_cpu() {
        return Err(ModelError::InvalidConfig("row attention needs f32 on the CPU".into()));
    }
    let (b, heads, seq, d) = q.dims4()?;
    let (_, kv_heads, total, _) = k.dims4()?;
    if span.key_start + total != pos + seq || heads % kv_heads != 0 {
        return Err(ModelError::InvalidConfig(format!("attention over {total} keys from {} for {seq} rows at {pos}", span.key_start)));
    }
    if let Some(t) = depths {
        check_depths(t, seq)?;
    }
    let depth = |i: usize| depths.map_or(i, |t| t[i]);
    if let Some(first) = (0..seq).map(|i| span.keys(pos + depth(i)).start).find(|&f| f < span.key_start) {
        return Err(ModelError::InvalidConfig(format!("a row needs key {first}, but the cache starts at {}", span.key_start)));
    }
    let rep = heads / kv_heads;
    let q = q.contiguous()?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(kst), Storage::Cpu(vst)) = (&*qs, &*ks, &*vs) else {
        return Err(ModelError::InvalidConfig("row attention runs on the CPU only".into()));
    };
    // The cache's keys and values are read in place, through their strides (a narrowed view of the
    // cache buffer); only the last axis must be contiguous.
    let (kd, vd) = (&kst.as_slice::<f32>()?[kl.start_offset()..], &vst.as_slice::<f32>()?[vl.start_offset()..]);
    let qd = &qs.as_slice::<f32>()?[ql.start_offset()..];
    let (ks, vs) = (kl.stride(), vl.stride());
    if ks[3] != 1 || vs[3] != 1 {
        return Err(ModelError::InvalidConfig("keys and values must be contiguous along head_dim".into()));
    }
    let (scale, ks0) = (span.scale, span.key_start);
    // One task per batch entry, key/value head and block of rows: every query head that reads the
    // same keys, for every row of the block, goes over them together, a block of keys at a time
    // while it sits in L1, instead of each (head, row) streaming the whole cache again. Each score
    // and each output lane is still summed in its own fixed order (see `score_block` and
    // `weigh_block`), so a row's bits do not depend on its company.
    let blocks = seq.div_ceil(ROW_BLOCK);
    let tasks: Vec<(usize, usize, usize)> =
        (0..b).flat_map(|bi| (0..kv_heads).flat_map(move |kv| (0..blocks).map(move |r| (bi, kv, r)))).collect();
    let task = |&(bi, kv, r): &(usize, usize, usize)| {
        let keys = Rows { data: &kd[bi * ks[0] + kv * ks[1]..], first: ks0, stride: ks[2], d };
        let values = Rows { data: &vd[bi * vs[0] + kv * vs[1]..], first: ks0, stride: vs[2], d };
        let rows = row_block(r, seq);
        // Query (head h, row i), heads outer: the keys before it and its own key at slot pos + i.
        let queries: Vec<Query> = (kv * rep..(kv + 1) * rep)
            .flat_map(|h| rows.clone().map(move |i| (h, i)))
            .map(|(h, i)| {
                let seen = span.keys(pos + depth(i));
                Query { row: &qd[((bi * heads + h) * seq + i) * d..][..d], before: seen.start..seen.end - 1, own: pos + i }
            })
            .collect();
        // The query heads of one row read the same keys: they weigh the values together.
        let groups: Vec<Vec<usize>> = (0..rows.len()).map(|i| (0..rep).map(|h| h * rows.len() + i).collect()).collect();
        let first = queries.iter().map(|q| q.before.start).min().unwrap_or(0);
        let last = queries.iter().map(|q| q.before.end).max().unwrap_or(0);
        // The next key/value head's first keys, read by the next task.
        if kv + 1 < kv_heads && r + 1 == blocks {
            let next = Rows { data: &kd[bi * ks[0] + (kv + 1) * ks[1]..], ..keys };
            kernels::prefetch(&next, first..(first + KEY_BLOCK).min(last));
        }
        // A query's scores: the keys before its own in order, then its own.
        let mut scores: Vec<Vec<f32>> = queries.iter().map(|q| vec![0f32; q.before.len() + 1]).collect();
        for block in key_blocks(first..last) {
            kernels::prefetch(&values, block.clone());
            kernels::prefetch(&keys, block.end..(block.end + KEY_BLOCK).min(last));
            for (q, s) in queries.iter().zip(&mut scores) {
                if let Some((seen, at)) = q.seen_in(&block) {
                    score_block(&mut s[at], q.row, seen, &keys, scale);
                }
            }
        }
        let mut sums = Vec::with_capacity(queries.len());
        for (q, s) in queries.iter().zip(&mut scores) {
            *s.last_mut().expect("a query sees its own key") = dot(q.row, keys.row(q.own)) * scale;
            sums.push(softmax(s));
        }
        let mut out = vec![0f32; queries.len() * d];
        for block in key_blocks(first..last) {
            for group in &groups {
                if let Some((seen, at)) = queries[group[0]].seen_in(&block) {
                    let p: Vec<&[f32]> = group.iter().map(|&g| &scores[g][at.clone()]).collect();
                    weigh_group(&mut out, group, &p, &values, seen);
                }
            }
        }
        for group in &groups {
            let own = queries[group[0]].own;
            let p: Vec<&[f32]> = group.iter().map(|&g| &scores[g][scores[g].len() - 1..]).collect();
            weigh_group(&mut out, group, &p, &values, own..own + 1);
        }
        for (o, sum) in out.chunks_exact_mut(d).zip(sums) {
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|x| *x *= inv);
        }
        out
    };
    // Handing a few small tasks to rayon's pool costs a thread wake-up per call, tens of
    // microseconds, more than a decode round's attention in a layer: small calls run here.
    let work: usize = seq * heads * (pos + seq - ks0);
    let done: Vec<Vec<f32>> = if rayon::current_num_threads() > 1 && work > PARALLEL_WORK {
        tasks.par_iter().map(task).collect()
    } else {
        tasks.iter().map(task).collect()
    };
    let mut out = vec![0f32; b * heads * seq * d];
    for (&(bi, kv, r), done) in tasks.iter().zip(&done) {
        let rows = row_block(r, seq);
        for (n, h) in (kv * rep..(kv + 1) * rep).enumerate() {
            let src = &done[n * rows.len() * d..(n + 1) * rows.len() * d];
            out[((bi * heads + h) * seq + rows.start) * d..][..src.len()].copy_from_slice(src);
        }
    }
    Ok(Tensor::from_vec(out, (b, heads, seq, d), q.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The same row gives the same bits alone and inside a batch, and matches plain masked softmax
    /// attention to rounding.
    #[test]
    fn a_row_is_the_same_alone_and_in_a_batch() -> Result<()> {
        // Small, and past a block of rows and a block of keys with AVX-sized heads.
        for (d, pos, seq) in [(16, 11, 5), (64, 130, 19)] {
            same_alone_and_in_a_batch(d, pos, seq)?;
        }
        Ok(())
    }

    fn same_alone_and_in_a_batch(d: usize, pos: usize, seq: usize) -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv) = (6, 2);
        let q = Tensor::randn(0f32, 1.0, (1, heads, seq, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let span = Span { key_start: 0, window: None, scale: 1.0 / (d as f32).sqrt() };
        let batch = attend_rows(&q, &k, &v, pos, span)?;
        for i in 0..seq {
            let n = pos + i + 1;
            let alone = attend_rows(&q.narrow(2, i, 1)?, &k.narrow(2, 0, n)?, &v.narrow(2, 0, n)?, pos + i, span)?;
            let diff = (alone - batch.narrow(2, i, 1)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "row {i}");
        }
        // Reference: per head, softmax(q k^T / sqrt(d) + causal mask) v.
        let rep = heads / kv;
        for h in 0..heads {
            let qh = q.narrow(1, h, 1)?.squeeze(0)?.squeeze(0)?;
            let kh = k.narrow(1, h / rep, 1)?.squeeze(0)?.squeeze(0)?;
            let vh = v.narrow(1, h / rep, 1)?.squeeze(0)?.squeeze(0)?;
            let scores = (qh.matmul(&kh.t()?)? / (d as f64).sqrt())?;
            let mask: Vec<f32> =
                (0..seq).flat_map(|i| (0..pos + seq).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })).collect();
            let scores = scores.broadcast_add(&Tensor::from_vec(mask, (seq, pos + seq), &dev)?)?;
            let want = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&vh)?;
            let got = batch.narrow(1, h, 1)?.squeeze(0)?.squeeze(0)?;
            let diff = (want - got)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "head {h}: {diff}");
        }
        Ok(())
    }

    /// In a round shaped as a chain with leaves, every row gets the bits it gets in a plain chain
    /// that ends at it: a leaf sees the chain before its position and itself, nothing else.
    #[test]
    fn a_leaf_gets_the_bits_of_a_chain_ending_at_it() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv, d, pos) = (6, 2, 64, 13);
        // Rows 0..3 are the chain, row 3 is a leaf at depth 1, row 4 a leaf at depth 2.
        let depths = [0, 1, 2, 1, 2];
        let seq = depths.len();
        let q = Tensor::randn(0f32, 1.0, (1, heads, seq, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let span = Span { key_start: 0, window: None, scale: 0.125 };
        let tree = attend_tree(&q, &k, &v, pos, span, Some(&depths))?;
        for (i, &depth) in depths.iter().enumerate() {
            // The chain that ends at row i: rows 0..depth, then row i.
            let rows: Vec<usize> = (0..depth).chain([i]).collect();
            let pick = |t: &Tensor, n: usize| -> Result<Tensor> {
                let idx = Tensor::new(rows.iter().map(|&r| (n + r) as u32).collect::<Vec<_>>().as_slice(), &dev)?;
                let new = t.index_select(&idx, 2)?;
                Ok(if n == 0 { new } else { Tensor::cat(&[&t.narrow(2, 0, n)?, &new], 2)? })
            };
            let chain = attend_rows(&pick(&q, 0)?, &pick(&k, pos)?, &pick(&v, pos)?, pos, span)?;
            let diff = (chain.narrow(2, depth, 1)? - tree.narrow(2, i, 1)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "row {i}");
        }
        // A row that does not extend the chain is refused.
        assert!(attend_tree(&q, &k, &v, pos, span, Some(&[0, 1, 2, 3, 4][..4])).is_err());
        assert!(attend_tree(&q, &k, &v, pos, span, Some(&[0, 1, 1, 3, 2])).is_err());
        Ok(())
    }

    /// A sliding window sees the last `window` keys, and a cache that dropped the keys before the
    /// window gives the same bits as one that kept them.
    #[test]
    fn a_window_sees_the_last_keys_only() -> Result<()> {
        let dev = Device::Cpu;
        let (heads, kv, d, pos, seq, window) = (4, 2, 8, 9, 4, 5);
        let q = Tensor::randn(0f32, 1.0, (1, heads, seq, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, kv, pos + seq, d), &dev)?;
        let full = Span { key_start: 0, window: Some(window), scale: 0.3 };
        let all = attend_rows(&q, &k, &v, pos, full)?;
        // Keys before pos - window + 1 are never seen: drop them.
        let start = pos + 1 - window;
        let kept = (k.narrow(2, start, pos + seq - start)?, v.narrow(2, start, pos + seq - start)?);
        let dropped = attend_rows(&q, &kept.0, &kept.1, pos, Span { key_start: start, ..full })?;
        let diff = (&all - &dropped)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        // Row i equals plain attention over exactly its window.
        for i in 0..seq {
            let (p, first) = (pos + i, pos + i + 1 - window);
            let alone = attend_rows(
                &q.narrow(2, i, 1)?,
                &k.narrow(2, first, window)?,
                &v.narrow(2, first, window)?,
                p,
                Span { key_start: first, ..full },
            )?;
            let diff = (alone - all.narrow(2, i, 1)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "row {i}");
        }
        // A row whose window reaches before the cache is refused.
        assert!(attend_rows(
            &q,
            &kept.0.narrow(2, 1, pos + seq - start - 1)?,
            &kept.1.narrow(2, 1, pos + seq - start - 1)?,
            pos,
            Span { key_start: start + 1, ..full }
        )
        .is_err());
        Ok(())
    }
}
