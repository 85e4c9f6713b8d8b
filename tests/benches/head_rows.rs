//! What the device's full LM head costs a verification round: one row, four rows in one call, and
//! four rows in four calls; and the output submodel on four rows beside them. Medians of
//! interleaved repetitions.
//!
//! `HAT_ARTIFACTS=$PWD/artifacts RAYON_NUM_THREADS=1 cargo bench -p hat-tests --bench head_rows`
//! (a `hat split` directory; env: HAT_BENCH_REPS, default 40).

use std::time::Instant;

use candle_core::{Device, Tensor};
use hat_runtime::DevicePackage;
use hat_tests::median;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn main() {
    // As `hat` does: the allocator keeps freed buffers.
    hat_model::cpu::keep_freed_memory();
    let reps: usize = std::env::var("HAT_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let dir = std::path::PathBuf::from(std::env::var("HAT_ARTIFACTS").unwrap_or_else(|_| "artifacts".into()));
    let p = DevicePackage::open(&dir.join("device"), &Device::Cpu).expect("device package");
    let x = Tensor::randn(0f32, 1.0, (1, 4, p.config.hidden_size), &Device::Cpu).expect("rows");
    let row = |i: usize| x.narrow(1, i, 1).expect("row");
    let mut t: [Vec<f64>; 4] = Default::default();
    for _ in 0..reps {
        let s = Instant::now();
        p.output.head(&row(0)).expect("head");
        t[0].push(ms(s));
        let s = Instant::now();
        p.output.head(&x).expect("head");
        t[1].push(ms(s));
        let s = Instant::now();
        for i in 0..4 {
            p.output.head(&row(i)).expect("head");
        }
        t[2].push(ms(s));
        let mut cache = p.output.new_cache();
        let s = Instant::now();
        p.output.forward_layers(&x, 0, &mut cache).expect("output layers");
        t[3].push(ms(s));
    }
    let [a, b, c, d] = t.map(median);
    println!("LM head ({} rows): 1 row {a:.2} ms, 4 rows in one call {b:.2} ms, 4 rows in 4 calls {c:.2} ms", p.config.vocab_size);
    println!("output submodel on 4 rows: {d:.2} ms");
}
