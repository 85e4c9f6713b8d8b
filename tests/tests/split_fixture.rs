//! Split invariants on a tiny random Llama: fast, and exact.

use std::collections::HashSet;
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use hat_model::manifest::{sha256_file, Manifest, Role};
use hat_model::{Submodel, SubmodelKind};
use hat_runtime::{CloudPackage, DevicePackage, LocalPipeline, RuntimeError, TokenModel, UnsplitModel};
use hat_splitter::{load_model, split_model, ModelSource, SplitError, SplitOptions};
use hat_tests::{max_abs_diff, TinyLlama};

fn opts(out: &Path, input: usize, output: usize) -> SplitOptions {
    SplitOptions::new(input, output, out)
}

fn split_fixture(src: &Path, out: &Path, input: usize, output: usize) -> Result<hat_splitter::SplitReport, SplitError> {
    let model = load_model(&ModelSource::parse(src.to_str().expect("utf8"))?, false)?;
    split_model(&model, &opts(out, input, output))
}

fn shard_names(path: &Path) -> HashSet<String> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("load shard").into_keys().collect()
}

#[test]
fn every_tensor_lands_in_exactly_one_shard() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fx = TinyLlama::default();
    let src = fx.write_dir(&tmp.path().join("src"), 1);
    let out = tmp.path().join("out");
    split_fixture(&src, &out, 1, 1).expect("split");

    let input = shard_names(&out.join("device/input.safetensors"));
    let middle = shard_names(&out.join("cloud/middle.safetensors"));
    let output = shard_names(&out.join("device/output.safetensors"));
    let mut expected: HashSet<String> = fx.tensors().into_keys().collect();
    expected.insert("lm_head.weight".into()); // tied: materialised in the output shard
    assert_eq!(input.len() + middle.len() + output.len(), expected.len(), "no tensor may be duplicated");
    let union: HashSet<String> = input.iter().chain(&middle).chain(&output).cloned().collect();
    assert_eq!(union, expected);
    assert!(input.contains("model.embed_tokens.weight") && input.contains("model.layers.0.mlp.up_proj.weight"));
    assert!(
        output.contains("lm_head.weight")
            && output.contains("model.norm.weight")
            && output.contains("model.layers.3.input_layernorm.weight")
    );
    assert!(middle.iter().all(|n| n.starts_with("model.layers.1.") || n.starts_with("model.layers.2.")), "{middle:?}");
}

#[test]
fn cloud_package_has_no_embedding_head_or_tokenizer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = TinyLlama::default().write_dir(&tmp.path().join("src"), 1);
    let out = tmp.path().join("out");
    split_fixture(&src, &out, 1, 2).expect("split");
    let middle = shard_names(&out.join("cloud/middle.safetensors"));
    assert!(!middle.iter().any(|n| n.contains("embed_tokens") || n.contains("lm_head")), "{middle:?}");
    let files: HashSet<String> =
        std::fs::read_dir(out.join("cloud")).expect("ls").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(files, HashSet::from(["hat.json".to_string(), "middle.safetensors".to_string()]));
    let cloud = Manifest::read(&out.join("cloud")).expect("manifest");
    assert_eq!(cloud.role, Role::Cloud);
    assert!(cloud.tokenizer.is_none());
    let raw = std::fs::read_to_string(out.join("cloud/hat.json")).expect("read");
    assert!(!raw.contains("chat_template") && !raw.contains("im_start"), "cloud manifest leaks tokenizer facts");
}

#[test]
fn manifests_round_trip_and_record_shard_hashes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = TinyLlama::default().write_dir(&tmp.path().join("src"), 1);
    let out = tmp.path().join("out");
    split_fixture(&src, &out, 2, 1).expect("split");
    for side in ["device", "cloud"] {
        let dir = out.join(side);
        let m = Manifest::read(&dir).expect("read");
        let again: Manifest = serde_json::from_str(&m.to_json().expect("json")).expect("parse");
        assert_eq!(m, again);
        for s in &m.shards {
            assert_eq!(sha256_file(&dir.join(&s.file)).expect("hash"), s.sha256);
        }
    }
    let device = Manifest::read(&out.join("device")).expect("device");
    let cloud = Manifest::read(&out.join("cloud")).expect("cloud");
    assert_eq!(device.fingerprint, cloud.fingerprint);
    assert_eq!((device.split.input_layers, device.split.output_layers), (2, 1));
    // Input, output, and the initial adapter: a copy of the last middle layer.
    assert_eq!(device.shards.iter().map(|s| s.layers).collect::<Vec<_>>(), vec![[0, 2], [3, 4], [2, 3]]);
    assert_eq!(device.adapter_init_layer, Some(2));
    let tok = device.tokenizer.expect("device manifest has tokenizer facts");
    assert!(tok.chat_template.is_some());
    assert_eq!(tok.eos_tokens.first().map(|t| t.id), Some(2));
}

#[test]
fn fingerprints_differ_across_splits_and_dtypes_and_repeat_for_the_same_split() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = TinyLlama::default().write_dir(&tmp.path().join("src"), 1);
    let a = split_fixture(&src, &tmp.path().join("a"), 1, 1).expect("a").fingerprint;
    let b = split_fixture(&src, &tmp.path().join("b"), 1, 2).expect("b").fingerprint;
    let a2 = split_fixture(&src, &tmp.path().join("a2"), 1, 1).expect("a2").fingerprint;
    let model = load_model(&ModelSource::Dir(src.clone()), false).expect("load");
    let mut f16 = opts(&tmp.path().join("c"), 1, 1);
    f16.dtype = DType::F16;
    let c = split_model(&model, &f16).expect("c").fingerprint;
    let other = TinyLlama { seed: 99, ..TinyLlama::default() }.write_dir(&tmp.path().join("src2"), 1);
    let d = split_fixture(&other, &tmp.path().join("d"), 1, 1).expect("d").fingerprint;
    assert_eq!(a, a2);
    assert_ne!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, d, "different weights, same architecture and split");
}

#[test]
fn runtime_refuses_packages_from_different_splits() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = TinyLlama::default().write_dir(&tmp.path().join("src"), 1);
    split_fixture(&src, &tmp.path().join("a"), 1, 1).expect("a");
    split_fixture(&src, &tmp.path().join("b"), 1, 2).expect("b");
    let dev = Device::Cpu;
    let device = DevicePackage::open(&tmp.path().join("a/device"), &dev).expect("device");
    let cloud = CloudPackage::open(&tmp.path().join("b/cloud"), &dev).expect("cloud");
    let err = LocalPipeline::new(&device, &cloud).expect_err("mismatch must be refused");
    assert!(matches!(err, RuntimeError::FingerprintMismatch { .. }), "{err}");
}

#[test]
fn damaged_shard_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = TinyLlama::default().write_dir(&tmp.path().join("src"), 1);
    let out = tmp.path().join("out");
    split_fixture(&src, &out, 1, 1).expect("split");
    let shard = out.join("cloud/middle.safetensors");
    let mut bytes = std::fs::read(&shard).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&shard, bytes).expect("write");
    let err = CloudPackage::open(&out.join("cloud"), &Device::Cpu).expect_err("damaged");
    assert!(err.to_string().contains("sha256"), "{err}");
}

#[test]
fn stitched_submodels_equal_the_unsplit_model_on_the_fixture() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fx = TinyLlama::default();
    let src = fx.write_dir(&tmp.path().join("src"), 3);
    let out = tmp.path().join("out");
    split_fixture(&src, &out, 1, 1).expect("split");
    let dev = Device::Cpu;
    let device = DevicePackage::open(&out.join("device"), &dev).expect("device");
    let cloud = CloudPackage::open(&out.join("cloud"), &dev).expect("cloud");
    let mut split = LocalPipeline::new(&device, &cloud).expect("pipeline");

    let model = load_model(&ModelSource::Dir(src), false).expect("load");
    let cfg = model.config.clone();
    let vb = VarBuilder::from_tensors(model.tensors, DType::F32, &dev);
    let mut full = UnsplitModel::new(Submodel::load(vb, &cfg, SubmodelKind::Full, 0..cfg.num_layers).expect("full"));

    let ids = [5u32, 9, 17, 3, 40, 41, 8];
    let a = split.logits_all(&ids, 0).expect("split logits");
    let b = full.logits_all(&ids, 0).expect("full logits");
    assert_eq!(a.dims(), &[ids.len(), fx.vocab]);
    assert!(max_abs_diff(&a, &b) <= 1e-6, "diff {}", max_abs_diff(&a, &b));
    // Incremental decoding at later positions agrees with the one-shot pass.
    let step = split.logits_last(&[12], ids.len()).expect("step");
    let mut all = ids.to_vec();
    all.push(12);
    let ref_last = full.logits_all(&all, 0).expect("ref").get(ids.len()).expect("row");
    assert!(max_abs_diff(&step, &ref_last) <= 1e-5, "diff {}", max_abs_diff(&step, &ref_last));
}
