//! The cloud middle's cost of a verification round by rows and context length, on a split package:
//! the whole forward and the row attention alone, side by side in one run.
//!
//! `HAT_ARTIFACTS=$PWD/artifacts RAYON_NUM_THREADS=1 cargo bench -p hat-tests --bench middle_rows`
//! (env: HAT_BENCH_ROUNDS).

use std::time::Instant;

use candle_core::{Device, Tensor};
use hat_model::attention::{attend_rows, Span};
use hat_runtime::CloudPackage;
use hat_tests::median;

fn main() {
    // As `hat` does: the allocator keeps freed buffers.
    hat_model::cpu::keep_freed_memory();
    let rounds: usize = std::env::var("HAT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    let dir = std::path::PathBuf::from(std::env::var("HAT_ARTIFACTS").unwrap_or_else(|_| "artifacts".into()));
    let cloud = CloudPackage::open(&dir.join("cloud"), &Device::Cpu).expect("cloud package");
    let m = &cloud.middle;
    let cfg = m.config().clone();
    let (d, heads, kv, hd) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let layers = m.layer_range().len();
    println!("middle: {layers} layers, d {d}, {heads} heads ({kv} kv), head_dim {hd}; medians of {rounds}");
    for ctx in [100usize, 400, 1300] {
        let mut cache = m.new_cache();
        let pre = Tensor::randn(0f32, 1.0, (1, ctx, d), &Device::Cpu).expect("prompt states");
        m.forward_layers(&pre, 0, &mut cache).expect("prefill");
        let mut base = 0.0;
        for rows in 1..=5usize {
            let x = Tensor::randn(0f32, 1.0, (1, rows, d), &Device::Cpu).expect("rows");
            let q = Tensor::randn(0f32, 1.0, (1, heads, rows, hd), &Device::Cpu).expect("queries");
            let k = Tensor::randn(0f32, 1.0, (1, kv, ctx + rows, hd), &Device::Cpu).expect("keys");
            let span = Span { key_start: 0, window: None, scale: 0.125 };
            let (mut fw, mut at) = (vec![], vec![]);
            for _ in 0..rounds {
                let t = Instant::now();
                m.forward_layers(&x, ctx, &mut cache).expect("forward");
                fw.push(t.elapsed().as_secs_f64() * 1e3);
                cache.truncate(ctx);
                let t = Instant::now();
                for _ in 0..layers {
                    attend_rows(&q, &k, &k, ctx, span).expect("attention");
                }
                at.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let (f, a) = (median(fw), median(at));
            if rows == 1 {
                base = f;
            }
            println!("  context {ctx:5} rows {rows}: forward {f:6.2} ms (+{:5.2} over 1 row), attention alone {a:6.2} ms", f - base);
        }
    }
}
