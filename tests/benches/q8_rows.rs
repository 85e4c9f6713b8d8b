//! hat's q8_0 kernel by input rows, on SmolLM2-135M's matrix shapes: time per call and multiply-adds
//! per second, one thread, medians.
//!
//! `RAYON_NUM_THREADS=1 cargo bench -p hat-tests --bench q8_rows` (env: HAT_BENCH_ROUNDS).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use hat_model::q8::PackedQ8;
use hat_tests::median;

fn main() {
    // As `hat` does: the allocator keeps freed buffers.
    hat_model::cpu::keep_freed_memory();
    let rounds: usize = std::env::var("HAT_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    if !hat_model::q8::available() {
        println!("this CPU has no AVX512-VNNI: hat's q8_0 kernel does not run here");
        return;
    }
    for (n, k) in [(576usize, 576usize), (1536, 576), (576, 1536)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).expect("weights");
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).expect("q8_0");
        let p = PackedQ8::pack(&q).expect("pack").expect("packs here");
        for m in [1usize, 5, 16, 64, 256] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).expect("input");
            let reps = (4096 / m).max(4);
            let mut ts = vec![];
            for _ in 0..rounds {
                let t = Instant::now();
                for _ in 0..reps {
                    p.forward(&x).expect("forward");
                }
                ts.push(t.elapsed().as_secs_f64() / reps as f64);
            }
            let t = median(ts);
            println!("{n:5}x{k:<5} rows {m:4}: {:8.1} us, {:6.1} GMAC/s", t * 1e6, (n * k * m) as f64 / t / 1e9);
        }
    }
}
