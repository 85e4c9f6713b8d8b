//! `hat train-adapter` on a tiny random Llama (autograd against finite differences, a falling loss,
//! resume after an interruption, bad input) and on the real default model (held-out acceptance
//! rises).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use hat_adapter_trainer::adapter::TrainableAdapter;
use hat_adapter_trainer::teacher::TeacherSet;
use hat_adapter_trainer::train::window_loss;
use hat_adapter_trainer::{run, DeviceChoice, LossConfig, TrainAdapterOptions, TrainError};
use hat_runtime::{CloudPackage, DevicePackage};
use hat_tests::{tiny_artifacts, TinyLlama};

fn tiny(dir: &Path) -> PathBuf {
    tiny_artifacts(dir, &TinyLlama::default(), 1, 1)
}

fn words(n: usize, seed: usize) -> String {
    (0..n).map(|i| format!("w{}", 3 + (i * 7 + seed * 13 + i * i) % 60)).collect::<Vec<_>>().join(" ")
}

/// A plain-text data file of `docs` documents.
fn data_file(dir: &Path, docs: usize) -> PathBuf {
    let p = dir.join("data.txt");
    let text: Vec<String> = (0..docs).map(|d| words(40, d)).collect();
    std::fs::write(&p, text.join("\n\n")).expect("data");
    p
}

fn quick(art: &Path, data: &Path, steps: usize) -> TrainAdapterOptions {
    let mut o = TrainAdapterOptions::new(art.parent().expect("parent"));
    o.artifacts = art.to_path_buf();
    o.data = vec![data.to_path_buf()];
    o.steps = Some(steps);
    o.device = DeviceChoice::Cpu;
    o.batch = 2;
    o.seq_len = 16;
    o.eval_prompts = 2;
    o.eval_tokens = 6;
    o.checkpoint_every = 2;
    o.progress = false;
    o.optimizer.lr = 3e-3;
    o.optimizer.warmup_steps = 2;
    o.loss = LossConfig { kl_weight: 1.0 };
    o
}

/// Every gradient that autograd gives for a sample of weights matches a central finite difference.
#[test]
fn autograd_matches_finite_differences_on_a_tiny_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let art = tiny(tmp.path());
    let device = DevicePackage::open(&art.join("device"), &Device::Cpu).expect("device");
    let cloud = CloudPackage::open(&art.join("cloud"), &Device::Cpu).expect("cloud");
    let seq: Vec<u32> = (0..12).map(|i| 3 + (i * 5) % 60).collect();
    let teacher = TeacherSet::compute(&device, &cloud, &[seq], 8, false, &indicatif::ProgressBar::hidden()).expect("teacher");
    let bias = Tensor::zeros(device.config.hidden_size, candle_core::DType::F32, &Device::Cpu).expect("bias");
    let adapter =
        TrainableAdapter::from_init(&art.join("device/adapter-init.safetensors"), &device.config, 1, &bias, &Device::Cpu).expect("adapter");
    let (x, y, ids, p) = teacher.window(0, 0, 12).expect("window");
    let cfg = LossConfig { kl_weight: 0.5 };
    let loss = |a: &TrainableAdapter| window_loss(a, &device.output, &x, &y, &ids, &p, &cfg).expect("loss").0;
    let grads = loss(&adapter).backward().expect("backward");

    let mut checked = 0;
    for (name, var) in adapter.vars() {
        let g = grads.get(var.as_tensor()).expect("a gradient for every weight").flatten_all().expect("flat").to_vec1::<f32>().expect("g");
        let w = var.as_tensor().flatten_all().expect("flat").to_vec1::<f32>().expect("w");
        // Probe the entry with the largest gradient and one fixed entry.
        let biggest = (0..g.len()).max_by(|a, b| g[*a].abs().total_cmp(&g[*b].abs())).expect("nonempty");
        for i in [biggest, g.len() / 3] {
            let eps = 1e-2f32;
            let at = |v: f32| {
                let mut w2 = w.clone();
                w2[i] = v;
                var.set(&Tensor::from_vec(w2, var.shape(), &Device::Cpu).expect("t")).expect("set");
                loss(&adapter).to_scalar::<f32>().expect("scalar") as f64
            };
            let numeric = (at(w[i] + eps) - at(w[i] - eps)) / (2.0 * eps as f64);
            var.set(&Tensor::from_vec(w.clone(), var.shape(), &Device::Cpu).expect("t")).expect("restore");
            let analytic = g[i] as f64;
            let tol = 2e-3 + 0.03 * analytic.abs().max(numeric.abs());
            assert!((numeric - analytic).abs() <= tol, "{name}[{i}]: autograd {analytic:.6}, finite difference {numeric:.6}");
            checked += 1;
        }
    }
    assert!(checked >= 20, "checked {checked} entries");
}

#[test]
fn training_lowers_the_loss_and_writes_adapter_and_report() {
    let tmp = tempfile::tempdir().expect("tmp");
    let art = tiny(tmp.path());
    let data = data_file(tmp.path(), 12);
    let report = run(&quick(&art, &data, 40)).expect("train");
    let curve = &report.loss_curve;
    assert_eq!(curve.len(), 40);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&curve[..8]), mean(&curve[32..]));
    assert!(last < 0.85 * first, "mean loss of the first 8 steps {first:.4}, of the last 8 {last:.4}");
    assert!(art.join("device/adapter.safetensors").is_file());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(art.join("device/adapter-report.json")).expect("report")).expect("json");
    assert!(json["before"]["accept_len"].as_f64().is_some() && json["after"]["accept_len"].as_f64().is_some());
    // The runtime picks the trained adapter up.
    let d = hat_runtime::DeviceRuntime::open(&art.join("device")).expect("device runtime");
    assert!(matches!(d.adapter().origin, hat_runtime::AdapterOrigin::Trained(_)), "{}", d.adapter().origin);
}

/// An interrupted run resumed with --resume ends where an uninterrupted run ends, step for step.
#[test]
fn resume_after_an_interruption_continues_from_the_saved_step() {
    let tmp = tempfile::tempdir().expect("tmp");
    let a = tiny(&tmp.path().join("a"));
    let b = tiny(&tmp.path().join("b"));
    let data = data_file(tmp.path(), 6);
    run(&quick(&a, &data, 8)).expect("uninterrupted");

    let mut cut = quick(&b, &data, 8);
    cut.stop_after = Some(3);
    match run(&cut) {
        Err(TrainError::Interrupted { step: 3, total: 8 }) => {}
        other => panic!("expected an interruption at step 3, got {other:?}"),
    }
    assert!(!b.join("device/adapter.safetensors").exists(), "no adapter until training finishes");
    let mut resume = quick(&b, &data, 8);
    resume.resume = true;
    let report = run(&resume).expect("resumed");
    assert_eq!(report.steps, 8);
    let wa = candle_core::safetensors::load(a.join("device/adapter.safetensors"), &Device::Cpu).expect("a");
    let wb = candle_core::safetensors::load(b.join("device/adapter.safetensors"), &Device::Cpu).expect("b");
    assert_eq!(wa.len(), wb.len());
    for (name, t) in &wa {
        assert_eq!(hat_tests::max_abs_diff(t, &wb[name]), 0.0, "{name} differs after resuming");
    }
}

#[test]
fn bad_input_is_refused_and_the_previous_adapter_is_untouched() {
    let tmp = tempfile::tempdir().expect("tmp");
    let art = tiny(tmp.path());
    let previous = art.join("device/adapter.safetensors");
    std::fs::write(&previous, b"previous adapter").expect("write");
    let err = |o: &TrainAdapterOptions| run(o).expect_err("refused").to_string();

    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n \n").expect("write");
    assert!(err(&quick(&art, &empty, 2)).contains("empty"));
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"w5 w6\"}\n{\"text\": 5}\n").expect("write");
    assert!(err(&quick(&art, &bad, 2)).contains("line 2"));
    let long = tmp.path().join("long.txt");
    std::fs::write(&long, words(300, 1)).expect("write");
    let mut o = quick(&art, &long, 2);
    o.self_distill = Some(1);
    assert!(err(&o).contains("longer than the model's context"));
    if !hat_adapter_trainer::CUDA_BUILT {
        let mut o = quick(&art, &data_file(tmp.path(), 2), 2);
        o.device = DeviceChoice::Cuda;
        assert!(err(&o).contains("scripts/build-cuda.sh"));
    }
    assert_eq!(std::fs::read(&previous).expect("read"), b"previous adapter");
}

/// Copies the default split's device package (the trainer writes there) and links its cloud package.
fn default_copy(dir: &Path) -> PathBuf {
    let src = hat_tests::default_artifacts();
    let art = dir.join("artifacts");
    std::fs::create_dir_all(art.join("device")).expect("mkdir");
    for entry in std::fs::read_dir(src.join("device")).expect("ls") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            std::fs::copy(entry.path(), art.join("device").join(entry.file_name())).expect("copy");
        }
    }
    std::os::unix::fs::symlink(src.join("cloud"), art.join("cloud")).expect("symlink");
    art
}

/// A CPU run that fits in CI time: self-distilled data, a short training, and a held-out acceptance
/// length at draft length 4 clearly above the initial adapter's.
#[test]
fn training_raises_heldout_acceptance_on_the_default_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let art = default_copy(tmp.path());
    let mut o = TrainAdapterOptions::new(&art);
    o.self_distill = Some(16);
    o.distill_tokens = 64;
    o.steps = Some(80);
    o.device = DeviceChoice::Cpu;
    o.seq_len = 96;
    o.optimizer.lr = 1e-3;
    o.loss = LossConfig { kl_weight: 1.0 };
    o.eval_prompts = 6;
    o.eval_tokens = 32;
    o.progress = false;
    let r = run(&o).expect("train");
    eprintln!(
        "default model: accept_len {:.3} -> {:.3}, top-1 {:.3} -> {:.3}, {} train tokens in {:.0} s, loss {:.3} -> {:.3}",
        r.before.accept_len,
        r.after.accept_len,
        r.before.top1,
        r.after.top1,
        r.train_tokens,
        r.train_seconds,
        r.loss_curve[0],
        r.loss_curve[r.loss_curve.len() - 1]
    );
    assert!(r.after.accept_len >= r.before.accept_len + 0.1, "accept_len {:.3} -> {:.3}", r.before.accept_len, r.after.accept_len);
    assert!(r.after.top1 > r.before.top1);
}
