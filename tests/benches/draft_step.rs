//! What one draft costs on the device, side by side with what one U-shaped token costs there, on the
//! default model split 2/2 with its shipped draft head, at a context of 200 positions:
//! - U-shaped token: the input submodel on one token, then the output submodel and the full LM head;
//! - feature head draft step: one head layer on (its own output, next token's embedding) and the
//!   draft LM head over its vocabulary;
//! - adapter draft step (the paper's): input submodel, adapter, output submodel and full LM head.
//!
//! Medians of interleaved repetitions.
//!
//! `cargo bench -p hat-tests --bench draft_step` (env: HAT_BENCH_REPS, default 200; HAT_BENCH_ARTIFACTS,
//! a `hat split` directory to measure instead of the f32 test split, such as a q8_0 one, whose head
//! then runs in q8_0 too; HAT_BENCH_HEAD, a head file made for that split to measure instead of the
//! shipped one, such as one of more layers).

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use hat_runtime::draft_head::install_shipped_head;
use hat_runtime::{Adapter, DevicePackage, FeatureHead};
use hat_tests::default_artifacts;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // As `hat` does: the allocator keeps freed buffers.
    hat_model::cpu::keep_freed_memory();
    let reps: usize = std::env::var("HAT_BENCH_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let dir = match std::env::var_os("HAT_BENCH_ARTIFACTS") {
        Some(d) => std::path::PathBuf::from(d).join("device"),
        None => default_artifacts().join("device"),
    };
    let dev = Device::Cpu;
    // The package's own head is left alone when another is measured.
    let other = std::env::var_os("HAT_BENCH_HEAD");
    if other.is_none() {
        install_shipped_head(&dir).expect("install").expect("a head ships for the default split");
    }
    let package = DevicePackage::open(&dir, &dev).expect("device package");
    let head = match other {
        Some(path) => FeatureHead::load(std::path::Path::new(&path), &package, &dev).expect("HAT_BENCH_HEAD"),
        None => FeatureHead::load_from_package(&package, &dev).expect("head").expect("head present"),
    };
    let adapter = Adapter::load(&package, &dev).expect("adapter");
    let context = 200;
    let d = package.config.hidden_size;
    let ids: Vec<u32> = (0..context as u32).map(|i| 100 + i * 7).collect();
    let t = Tensor::new(ids.as_slice(), &dev).expect("ids").unsqueeze(0).expect("batch");
    let x = package.input.embed(&t).expect("embed");
    let (mut in_cache, mut out_cache, mut a_cache, mut h_cache) =
        (package.input.new_cache(), package.output.new_cache(), adapter.new_cache(), head.new_cache());
    let low = package.input.forward_layers(&x, 0, &mut in_cache).expect("input");
    package.output.forward_layers(&low, 0, &mut out_cache).expect("output");
    adapter.forward(&low, 0, &mut a_cache).expect("adapter");
    let g = Tensor::randn(0f32, 1.0, (1, context, d), &dev).expect("features");
    head.step(&g, &ids, 0, &mut h_cache).expect("head prefill");
    let one = Tensor::new(&[[4242u32]], &dev).expect("token");
    let h1 = Tensor::randn(0f32, 1.0, (1, 1, d), &dev).expect("state");

    let (mut ushape, mut feature, mut adapter_step) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let s = Instant::now();
        let l = package.input.forward_layers(&package.input.embed(&one).expect("embed"), context, &mut in_cache).expect("input");
        let o = package.output.forward_layers(&l, context, &mut out_cache).expect("output");
        package.output.head(&o).expect("head").to_vec3::<f32>().expect("logits");
        ushape.push(s.elapsed());

        let s = Instant::now();
        let h = head.step(&h1, &[4242], context, &mut h_cache).expect("step");
        head.logits(&h).expect("draft logits");
        feature.push(s.elapsed());

        let s = Instant::now();
        let l = package.input.forward_layers(&package.input.embed(&one).expect("embed"), context, &mut in_cache).expect("input");
        let a = adapter.forward(&l, context, &mut a_cache).expect("adapter");
        let o = package.output.forward_layers(&a, context, &mut out_cache).expect("output");
        package.output.head(&o).expect("head").to_vec3::<f32>().expect("logits");
        adapter_step.push(s.elapsed());
    }
    let (u, f, a) = (median(ushape), median(feature), median(adapter_step));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("device time, median of {reps}, context {context}, draft vocabulary {}:", head.vocab().len());
    println!("  U-shaped token (input + output submodels + LM head): {:.2} ms", ms(u));
    println!("  feature head draft step (head layer + draft head):   {:.2} ms ({:.2}x a U-shaped token)", ms(f), ms(f) / ms(u));
    println!("  adapter draft step (input + adapter + output + head): {:.2} ms ({:.2}x a U-shaped token)", ms(a), ms(a) / ms(u));
}
