//! The cloud middle's cost of one batched forward by sessions and rows per session, on a split
//! package: time per call and per row, medians, one thread unless RAYON_NUM_THREADS says otherwise.
//!
//! `HAT_ARTIFACTS=$PWD/artifacts RAYON_NUM_THREADS=1 cargo bench -p hat-tests --bench middle_batch`
//! (env: HAT_BENCH_ROUNDS, HAT_BENCH_CONTEXT, HAT_BENCH_CASES such as `1x1,16x5`: sessions x rows).

use std::time::Instant;

use candle_core::{Device, Tensor};
use hat_runtime::CloudPackage;
use hat_tests::median;

fn main() {
    // As `hat` does: the allocator keeps freed buffers.
    hat_model::cpu::keep_freed_memory();
    let rounds: usize = std::env::var("HAT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    let ctx: usize = std::env::var("HAT_BENCH_CONTEXT").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let dir = std::path::PathBuf::from(std::env::var("HAT_ARTIFACTS").unwrap_or_else(|_| "artifacts".into()));
    let cloud = CloudPackage::open(&dir.join("cloud"), &Device::Cpu).expect("cloud package");
    let m = &cloud.middle;
    let d = m.config().hidden_size;
    println!("middle: {} layers, context {ctx}; medians of {rounds}", m.layer_range().len());
    let cases = std::env::var("HAT_BENCH_CASES").unwrap_or_else(|_| "1x1,1x5,1x16,1x64,4x1,16x1,16x5,64x1".into());
    for case in cases.split(',') {
        let (sessions, rows) = case.split_once('x').expect("cases are SESSIONSxROWS");
        let (sessions, rows): (usize, usize) = (sessions.parse().expect("sessions"), rows.parse().expect("rows"));
        let mut caches: Vec<_> = (0..sessions)
            .map(|_| {
                let mut c = m.new_cache();
                let pre = Tensor::randn(0f32, 1.0, (1, ctx, d), &Device::Cpu).expect("prompt states");
                m.forward_layers(&pre, 0, &mut c).expect("prefill");
                c
            })
            .collect();
        let inputs: Vec<(Tensor, usize)> =
            (0..sessions).map(|_| (Tensor::randn(0f32, 1.0, (1, rows, d), &Device::Cpu).expect("rows"), ctx)).collect();
        let depths = vec![None; sessions];
        let mut ts = vec![];
        for _ in 0..rounds {
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            let t = Instant::now();
            m.forward_layers_batch(&inputs, &depths, &mut refs).expect("forward");
            ts.push(t.elapsed().as_secs_f64() * 1e3);
            for c in caches.iter_mut() {
                c.truncate(ctx);
            }
        }
        let t = median(ts);
        println!("  {sessions:3} sessions x {rows:2} rows: {t:7.2} ms, {:5.3} ms a row", t / (sessions * rows) as f64);
    }
}
