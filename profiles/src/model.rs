//! The pipeline model of chunked prefill, and the chunk-size table built from it.
//!
//! It replays the schedule `SplitPipeline::prefill` runs, with measured stage times:
//! 1. the device runs the input submodel on chunk 0, 1, ... and submits each as soon as it is ready;
//! 2. each chunk is serialised on the uplink (one frame after another), travels half the RTT, waits
//!    for the cloud to finish the chunk before it, runs the middle, is serialised on the downlink and
//!    travels back;
//! 3. after its last input chunk (and, in HAT mode, the adapter's prefill over the whole prompt) the
//!    device runs the output submodel on each returned chunk in order, then the LM head once.
//!
//! The first token comes when the last output chunk and the head are done: that is the predicted TTFT.

use hat_runtime::generate::prefill_chunks;
use serde::{Deserialize, Serialize};

/// Measured milliseconds of one stage per chunk, over chunk sizes and context offsets (positions
/// already cached when the chunk runs, which makes attention dearer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageCurve {
    /// Chunk sizes, ascending.
    pub sizes: Vec<usize>,
    /// Context offsets, ascending.
    pub offsets: Vec<usize>,
    /// `ms[o][s]`: milliseconds for chunk size `sizes[s]` at offset `offsets[o]`.
    pub ms: Vec<Vec<f64>>,
}

/// Linear interpolation through `(xs, ys)`, extended along the end segments; never negative.
fn interp(xs: &[f64], ys: &[f64], x: f64) -> f64 {
    match xs.len() {
        0 => 0.0,
        1 => ys[0].max(0.0),
        n => {
            let i = xs.iter().position(|&v| v >= x).unwrap_or(n - 1).clamp(1, n - 1);
            let (x0, x1, y0, y1) = (xs[i - 1], xs[i], ys[i - 1], ys[i]);
            let t = if x1 > x0 { (x - x0) / (x1 - x0) } else { 0.0 };
            (y0 + t * (y1 - y0)).max(0.0)
        }
    }
}

impl StageCurve {
    /// Milliseconds for a chunk of `size` positions at `offset`, interpolated (and extrapolated
    /// along the outermost measurements).
    pub fn ms(&self, size: usize, offset: usize) -> f64 {
        let xs: Vec<f64> = self.sizes.iter().map(|&s| s as f64).collect();
        let per_offset: Vec<f64> = self.ms.iter().map(|row| interp(&xs, row, size as f64)).collect();
        let os: Vec<f64> = self.offsets.iter().map(|&o| o as f64).collect();
        interp(&os, &per_offset, offset as f64)
    }
}

/// Everything the model needs besides the link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageCosts {
    /// Device: input submodel plus encoding the chunk for the wire.
    pub device_input: StageCurve,
    /// Device: decoding a returned chunk plus the output submodel.
    pub device_output: StageCurve,
    /// Device: the draft adapter's prefill (HAT mode only), run once over the whole prompt.
    pub device_adapter: StageCurve,
    /// Device: the LM head on the last position.
    pub head_ms: f64,
    /// Cloud: the middle submodel, as the cloud server itself timed it.
    pub cloud_middle: StageCurve,
    /// Wire bytes of a hidden-state message: `message_bytes + rows * row_bytes`.
    pub row_bytes: usize,
    pub message_bytes: usize,
}

/// A link for the model: round-trip time and throughput each way.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkParams {
    pub rtt_ms: f64,
    pub up_mbps: f64,
    pub down_mbps: f64,
}

impl LinkParams {
    fn up_ms(&self, bytes: usize) -> f64 {
        bytes as f64 * 8.0 / (self.up_mbps * 1e3)
    }

    fn down_ms(&self, bytes: usize) -> f64 {
        bytes as f64 * 8.0 / (self.down_mbps * 1e3)
    }
}

/// Predicted time to first token, in milliseconds, of a prompt of `prompt_len` positions sent in
/// chunks of `chunk` (`None`: one piece). `adapter`: HAT mode, which also prefills the draft adapter.
pub fn predict_ttft_ms(costs: &StageCosts, link: &LinkParams, prompt_len: usize, chunk: Option<usize>, adapter: bool) -> f64 {
    let parts = prefill_chunks(prompt_len, chunk);
    let mut device = 0.0;
    let (mut uplink, mut cloud, mut downlink) = (0.0_f64, 0.0_f64, 0.0_f64);
    let mut back = Vec::with_capacity(parts.len());
    for &(start, len) in &parts {
        device += costs.device_input.ms(len, start);
        let bytes = costs.message_bytes + len * costs.row_bytes;
        uplink = uplink.max(device) + link.up_ms(bytes);
        cloud = cloud.max(uplink + link.rtt_ms / 2.0) + costs.cloud_middle.ms(len, start);
        downlink = downlink.max(cloud) + link.down_ms(bytes);
        back.push(downlink + link.rtt_ms / 2.0);
    }
    if adapter {
        device += costs.device_adapter.ms(prompt_len, 0);
    }
    for (&(start, len), &arrives) in parts.iter().zip(&back) {
        device = device.max(arrives) + costs.device_output.ms(len, start);
    }
    device + costs.head_ms
}

/// Chunk sizes the table considers for a prompt of `n` positions (the whole prompt is always one).
pub fn candidate_chunks(n: usize) -> Vec<usize> {
    const SIZES: [usize; 20] = [8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024, 1536, 2048, 3072];
    SIZES.iter().copied().filter(|&c| c < n).collect()
}

/// The best chunk size for a prompt length and link, and its predicted TTFT; `None` means one piece.
pub fn best_chunk(costs: &StageCosts, link: &LinkParams, prompt_len: usize, adapter: bool) -> (Option<usize>, f64) {
    let mut best = (None, predict_ttft_ms(costs, link, prompt_len, None, adapter));
    for c in candidate_chunks(prompt_len) {
        let t = predict_ttft_ms(costs, link, prompt_len, Some(c), adapter);
        // Prefer fewer, larger messages unless smaller ones are clearly (1 %) faster.
        if t < best.1 * 0.99 {
            best = (Some(c), t);
        }
    }
    best
}

/// The chunk-size table: the best chunk per prompt-length bucket and bandwidth bucket, at the RTT the
/// profile measured (RTT adds about the same to every choice once chunks are pipelined).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkTable {
    pub prompt_buckets: Vec<usize>,
    pub mbps_buckets: Vec<f64>,
    pub rtt_ms: f64,
    /// `chunk[p][b]`: chunk size for prompt bucket `p` and bandwidth bucket `b`; 0 = one piece.
    pub chunk: Vec<Vec<usize>>,
    /// Predicted TTFT with that chunk, and with the prompt in one piece (ms).
    pub predicted_ms: Vec<Vec<f64>>,
    pub whole_ms: Vec<Vec<f64>>,
}

pub const PROMPT_BUCKETS: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
pub const MBPS_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// Index of the bucket nearest to `x` on a log scale.
fn nearest_log(buckets: impl Iterator<Item = f64>, x: f64) -> usize {
    let lx = x.max(1e-9).ln();
    let mut best = (0, f64::INFINITY);
    for (i, b) in buckets.enumerate() {
        let d = (b.ln() - lx).abs();
        if d < best.1 {
            best = (i, d);
        }
    }
    best.0
}

impl ChunkTable {
    /// Fills the table from the model; `max_prompt` caps the prompt buckets at the context.
    pub fn build(costs: &StageCosts, rtt_ms: f64, max_prompt: usize, adapter: bool) -> Self {
        let prompt_buckets: Vec<usize> = PROMPT_BUCKETS.iter().copied().filter(|&p| p < max_prompt).collect();
        let mbps_buckets = MBPS_BUCKETS.to_vec();
        let (mut chunk, mut predicted_ms, mut whole_ms) = (Vec::new(), Vec::new(), Vec::new());
        for &p in &prompt_buckets {
            let (mut c_row, mut t_row, mut w_row) = (Vec::new(), Vec::new(), Vec::new());
            for &mbps in &mbps_buckets {
                let link = LinkParams { rtt_ms, up_mbps: mbps, down_mbps: mbps };
                let (c, t) = best_chunk(costs, &link, p, adapter);
                c_row.push(c.unwrap_or(0));
                t_row.push(t);
                w_row.push(predict_ttft_ms(costs, &link, p, None, adapter));
            }
            chunk.push(c_row);
            predicted_ms.push(t_row);
            whole_ms.push(w_row);
        }
        Self { prompt_buckets, mbps_buckets, rtt_ms, chunk, predicted_ms, whole_ms }
    }

    /// The chunk size for a prompt of `prompt_len` on a link of `mbps` (nearest buckets on a log
    /// scale); `None` means one piece.
    pub fn lookup(&self, prompt_len: usize, mbps: f64) -> Option<usize> {
        if self.prompt_buckets.is_empty() {
            return None;
        }
        let p = nearest_log(self.prompt_buckets.iter().map(|&b| b as f64), prompt_len as f64);
        let b = nearest_log(self.mbps_buckets.iter().copied(), mbps);
        let c = self.chunk[p][b];
        (c > 0 && c < prompt_len).then_some(c)
    }

    /// The table as text: one row per prompt bucket, one column per bandwidth bucket; "-" is one piece.
    pub fn render(&self) -> String {
        let mut out = format!("chunk size by prompt length (rows) and bandwidth in Mbps (columns), RTT {:.1} ms\n", self.rtt_ms);
        out.push_str(&format!("{:>8}", "prompt"));
        self.mbps_buckets.iter().for_each(|m| out.push_str(&format!("{m:>7}")));
        out.push('\n');
        for (p, row) in self.prompt_buckets.iter().zip(&self.chunk) {
            out.push_str(&format!("{p:>8}"));
            row.iter().for_each(|&c| out.push_str(&if c == 0 { format!("{:>7}", "-") } else { format!("{c:>7}") }));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stage times linear in chunk size with a fixed cost per call.
    fn curve(fixed: f64, per_pos: f64) -> StageCurve {
        let sizes = vec![8, 64, 512];
        StageCurve { ms: vec![sizes.iter().map(|&s| fixed + per_pos * s as f64).collect()], sizes, offsets: vec![0] }
    }

    fn costs() -> StageCosts {
        StageCosts {
            device_input: curve(1.0, 0.05),
            device_output: curve(1.0, 0.05),
            device_adapter: curve(0.5, 0.02),
            head_ms: 5.0,
            cloud_middle: curve(2.0, 0.2),
            row_bytes: 1152,
            message_bytes: 24,
        }
    }

    #[test]
    fn interpolation_follows_and_extends_the_measurements() {
        let c = curve(1.0, 0.05);
        assert!((c.ms(64, 0) - 4.2).abs() < 1e-9);
        assert!((c.ms(36, 0) - (1.0 + 0.05 * 36.0)).abs() < 1e-9, "between points");
        assert!((c.ms(1024, 0) - (1.0 + 0.05 * 1024.0)).abs() < 1e-9, "beyond the last point");
        let two = StageCurve { sizes: vec![8, 64], offsets: vec![0, 1000], ms: vec![vec![1.0, 2.0], vec![3.0, 4.0]] };
        assert!((two.ms(8, 500) - 2.0).abs() < 1e-9, "between offsets");
    }

    #[test]
    fn one_chunk_is_the_stages_in_series() {
        let (c, link) = (costs(), LinkParams { rtt_ms: 40.0, up_mbps: 10.0, down_mbps: 10.0 });
        let n = 100;
        let bytes = 24 + n * 1152;
        let want =
            c.device_input.ms(n, 0) + 2.0 * bytes as f64 * 8.0 / 1e4 + 40.0 + c.cloud_middle.ms(n, 0) + c.device_output.ms(n, 0) + 5.0;
        assert!((predict_ttft_ms(&c, &link, n, None, false) - want).abs() < 1e-9);
    }

    #[test]
    fn chunking_overlaps_a_slow_link_and_costs_on_a_fast_one() {
        let c = costs();
        let slow = LinkParams { rtt_ms: 80.0, up_mbps: 10.0, down_mbps: 10.0 };
        let whole = predict_ttft_ms(&c, &slow, 1024, None, true);
        let (chunk, best) = best_chunk(&c, &slow, 1024, true);
        assert!(chunk.is_some() && best < 0.75 * whole, "slow link: {chunk:?} {best} vs {whole}");
        // Infinitely fast link and free device: only per-call cloud overhead is left, so one piece wins.
        let zero = StageCurve { sizes: vec![8, 512], offsets: vec![0], ms: vec![vec![0.0, 0.0]] };
        let cloud_only = StageCosts { device_input: zero.clone(), device_output: zero.clone(), device_adapter: zero, head_ms: 0.0, ..c };
        let fast = LinkParams { rtt_ms: 1.0, up_mbps: 1e9, down_mbps: 1e9 };
        assert_eq!(best_chunk(&cloud_only, &fast, 1024, true).0, None);
    }

    #[test]
    fn table_lookup_picks_nearest_buckets() {
        let t = ChunkTable::build(&costs(), 40.0, 8192, true);
        assert_eq!(t.prompt_buckets.len(), PROMPT_BUCKETS.len());
        let b10 = MBPS_BUCKETS.iter().position(|&m| m == 10.0).expect("10 Mbps bucket");
        let p1024 = PROMPT_BUCKETS.iter().position(|&p| p == 1024).expect("1024 bucket");
        let c = t.chunk[p1024][b10];
        assert_eq!(t.lookup(1100, 11.0), (c > 0).then_some(c));
        assert!(t.predicted_ms[p1024][b10] <= t.whole_ms[p1024][b10]);
        assert_eq!(t.lookup(6, 11.0), None, "no chunk is smaller than a 6-position prompt: one piece");
        assert!(t.render().lines().count() == PROMPT_BUCKETS.len() + 2);
    }
}
