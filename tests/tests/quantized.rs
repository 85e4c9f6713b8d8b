//! Quantized packages. On the real default model split 2/2 in q8_0 (both sides): greedy `hat` (shipped
//! draft head, matched through the package's base fingerprint) and `ushape` over TCP equal
//! `--mode local` on the same package token for token, and chunked prefill equals unchunked at chunk
//! sizes that divide the prompt and sizes that do not, and drafting while verifying changes no token. `keep` keeps the GGUF's own blocks with Q/K rows
//! moved into hat's rope layout. Bad input: a type whose blocks do not fit the rows, a truncated
//! shard, and a shard whose type is not its manifest's get a one-line cause and leave nothing behind.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use hat_model::manifest::sha256_file;
use hat_model::{Manifest, Quant};
use hat_runtime::draft_head::install_shipped_head;
use hat_runtime::package::dense_shard_tensors;
use hat_runtime::protocol::{WireDType, WireFormat};
use hat_runtime::{
    generate, generate_speculative, CloudOptions, CloudPackage, CloudServer, DevicePackage, DeviceRuntime, GenerateOptions, LocalPipeline,
    Mode, Overlap, ServerConfig,
};
use hat_splitter::{load_model, split_model, ModelSource, SplitOptions};
use hat_tests::{default_artifacts, default_model_gguf, TinyLlama, PROMPTS};

const NEW_TOKENS: usize = 48;

fn split_default(dir: &Path, quant: Quant) -> PathBuf {
    let out = dir.join(quant.name());
    let model = load_model(&ModelSource::Gguf(default_model_gguf()), false).expect("load default model");
    let opts = SplitOptions { device_quant: quant, cloud_quant: quant, ..SplitOptions::new(2, 2, out.clone()) };
    split_model(&model, &opts).expect("split");
    out
}

struct Q8 {
    _dir: tempfile::TempDir,
    out: PathBuf,
    prompts: Vec<Vec<u32>>,
    local: Vec<Vec<u32>>,
}

fn q8() -> &'static Q8 {
    static Q: OnceLock<Q8> = OnceLock::new();
    Q.get_or_init(|| {
        let dir = hat_tests::fixture_dir();
        let out = split_default(dir.path(), Quant::Q8_0);
        install_shipped_head(&out.join("device"))
            .expect("install")
            .expect("the shipped head fits a q8_0 split through its base fingerprint");
        let device = DevicePackage::open(&out.join("device"), &Device::Cpu).expect("device");
        let cloud = CloudPackage::open(&out.join("cloud"), &Device::Cpu).expect("cloud");
        assert_eq!(device.output.quant_types(), vec![("q8_0", 15)], "2 layers of 7 matrices and the LM head");
        assert_eq!(cloud.middle.quant_types(), vec![("q8_0", 26 * 7)]);
        let runtime = DeviceRuntime::open(&out.join("device")).expect("runtime");
        let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| runtime.prompt_ids(p, true).expect("encode")).collect();
        let local = prompts
            .iter()
            .map(|p| {
                let mut pipeline = LocalPipeline::new(&device, &cloud).expect("pipeline");
                generate(&mut pipeline, p, &GenerateOptions { max_tokens: NEW_TOKENS, ..Default::default() }, |_| {}).expect("local").tokens
            })
            .collect();
        Q8 { _dir: dir, out, prompts, local }
    })
}

#[test]
fn q8_0_hat_and_ushape_equal_local_token_for_token() {
    let q = q8();
    let cloud = CloudPackage::open(&q.out.join("cloud"), &Device::Cpu).expect("cloud");
    let server = CloudServer::start(&cloud, ServerConfig { log: false, ..Default::default() }, "127.0.0.1:0").expect("cloud server");
    let device = DeviceRuntime::open(&q.out.join("device")).expect("device");
    assert!(device.head().is_some(), "the shipped head loads on the q8_0 package");
    let mut o = CloudOptions::new(server.local_addr().to_string());
    o.wire = WireFormat { dtype: WireDType::F32, zstd: false };
    let mut session = device.connect(o).expect("connect");
    assert_eq!(session.drafter().kind(), "feature");
    let opts = GenerateOptions { max_tokens: NEW_TOKENS, ..Default::default() };
    // Drafting while verifying as `--overlap` runs it: over TCP, speculating only while the reply is out.
    let overlapping = DeviceRuntime::open(&q.out.join("device")).expect("device").with_overlap(Overlap::WhileWaiting);
    let mut o = CloudOptions::new(server.local_addr().to_string());
    o.wire = WireFormat { dtype: WireDType::F32, zstd: false };
    let mut overlap_session = overlapping.connect(o).expect("connect");
    let (mut rounds, mut gained) = (0, 0);
    for (i, p) in q.prompts.iter().enumerate() {
        let hat = session.generate(p, &opts, Mode::Hat { draft_len: 4 }, |_| {}).expect("hat");
        assert_eq!(hat.tokens, q.local[i], "prompt {i}: hat differs from local on the q8_0 package");
        let over = overlap_session.generate(p, &opts, Mode::Hat { draft_len: 4 }, |_| {}).expect("hat --overlap");
        assert_eq!(over.tokens, q.local[i], "prompt {i}: hat --overlap differs from local on the q8_0 package");
        let ushape = session.generate(p, &opts, Mode::UShape, |_| {}).expect("ushape");
        assert_eq!(ushape.tokens, q.local[i], "prompt {i}: ushape differs from local on the q8_0 package");
        rounds += hat.rounds;
        gained += hat.tokens.len() - 1;
    }
    let a = gained as f64 / rounds as f64;
    eprintln!("q8_0: hat and ushape equal local; shipped head accept_len {a:.3}");
    assert!(a > 1.2, "the shipped head gains only {a:.3} tokens per round on q8_0 features");
}

/// Drafting while verifying changes no token. In process the middle's reply is back before the device
/// looks, so the overlap is forced (`Overlap::Always`): every round drafts the next one while it is
/// "verified", and the rounds whose assumption held go out as drafted then. A reply that repeats a
/// sentence makes the guesses right often enough that kept rounds are certain to occur.
#[test]
fn q8_0_drafting_while_verifying_changes_no_token() {
    let q = q8();
    let device = DevicePackage::open(&q.out.join("device"), &Device::Cpu).expect("device");
    let cloud = CloudPackage::open(&q.out.join("cloud"), &Device::Cpu).expect("cloud");
    let runtime = DeviceRuntime::open(&q.out.join("device")).expect("runtime").with_overlap(Overlap::Always);
    let opts = GenerateOptions { max_tokens: NEW_TOKENS, ..Default::default() };
    let repeat = runtime
        .prompt_ids("Write this sentence four times, one per line: The quick brown fox jumps over the lazy dog.", true)
        .expect("encode");
    let repeat_local = generate(&mut LocalPipeline::new(&device, &cloud).expect("pipeline"), &repeat, &opts, |_| {}).expect("local").tokens;
    let cases = q.prompts.iter().zip(&q.local).chain([(&repeat, &repeat_local)]);
    let (mut rounds, mut speculated, mut prepared) = (0, 0, 0);
    for (i, (prompt, local)) in cases.enumerate() {
        for k in [2, 4] {
            let mut pipeline = LocalPipeline::new(&device, &cloud).expect("pipeline");
            let mut drafter = runtime.new_drafter();
            let g = generate_speculative(&mut pipeline, &mut drafter, prompt, &opts, k, |_| {}).expect("hat");
            assert_eq!(&g.tokens, local, "prompt {i}, k={k}: drafting while verifying changed a token");
            (rounds, speculated, prepared) = (rounds + g.rounds, speculated + g.speculated, prepared + g.prepared);
        }
    }
    eprintln!("drafting while verifying: {speculated} of {rounds} rounds speculated, {prepared} kept; tokens equal local");
    assert!(speculated > 0 && prepared > 0, "no speculation was kept ({prepared} of {speculated}): the kept path went untested");
}

#[test]
fn q8_0_chunked_prefill_equals_unchunked() {
    let q = q8();
    let device = DevicePackage::open(&q.out.join("device"), &Device::Cpu).expect("device");
    let cloud = CloudPackage::open(&q.out.join("cloud"), &Device::Cpu).expect("cloud");
    let runtime = DeviceRuntime::open(&q.out.join("device")).expect("runtime");
    let prompt = hat_tests::long_prompt(&runtime, 100);
    let run = |chunk: Option<usize>| {
        let mut pipeline = LocalPipeline::new(&device, &cloud).expect("pipeline");
        let opts = GenerateOptions { max_tokens: 24, prefill_chunk: chunk, ..Default::default() };
        generate(&mut pipeline, &prompt, &opts, |_| {}).expect("generate").tokens
    };
    let whole = run(None);
    for chunk in [7, 32, 45] {
        assert_eq!(run(Some(chunk)), whole, "chunk {chunk}");
    }
}

/// `keep` stores the source's Q4_1 blocks as they are, with Q/K rows reordered as whole rows: they
/// dequantize to exactly the f32 split's weights.
#[test]
fn keep_holds_the_sources_blocks_in_hats_rope_layout() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = split_default(dir.path(), Quant::Keep);
    let manifest = Manifest::read(&out.join("device")).expect("manifest");
    assert_eq!(manifest.quant.as_deref(), Some("keep"));
    let reference = default_artifacts().join("device");
    assert_eq!(manifest.base_fingerprint.as_deref(), Some(Manifest::read(&reference).expect("f32 manifest").fingerprint.as_str()));
    let kept = dense_shard_tensors(&out.join("device"), &manifest, "input").expect("keep shard");
    let f32 = dense_shard_tensors(&reference, &Manifest::read(&reference).expect("manifest"), "input").expect("f32 shard");
    for name in ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"] {
        let diff = hat_tests::max_abs_diff(&kept[name], &f32[name]);
        assert_eq!(diff, 0.0, "{name}");
    }
}

fn tiny(dir: &Path) -> (hat_splitter::LoadedModel, PathBuf) {
    let src = TinyLlama::default().write_dir(&dir.join("model"), 1);
    (load_model(&ModelSource::Dir(src), false).expect("load"), dir.join("artifacts"))
}

#[test]
fn a_type_whose_blocks_do_not_fit_the_rows_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tmp");
    let (model, out) = tiny(dir.path());
    let opts = SplitOptions { device_quant: Quant::Q4K, ..SplitOptions::new(1, 1, out.clone()) };
    let err = split_model(&model, &opts).expect_err("q4_k on 32-wide rows").to_string();
    assert!(err.contains("q4_k packs rows in blocks of 256 values, but these rows hold 32"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    assert!(!out.exists(), "no partial package");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("model")], "no staging directory left behind");
    let keep = SplitOptions { cloud_quant: Quant::Keep, ..SplitOptions::new(1, 1, out.clone()) };
    let err = split_model(&model, &keep).expect_err("keep from safetensors").to_string();
    assert!(err.contains("is not a GGUF"), "{err}");
}

#[test]
fn a_truncated_or_mistyped_quantized_shard_is_refused_with_its_cause() {
    let dir = tempfile::tempdir().expect("tmp");
    let (model, _) = tiny(dir.path());
    let split = |name: &str, q: Quant| {
        let out = dir.path().join(name);
        split_model(&model, &SplitOptions { device_quant: q, cloud_quant: q, ..SplitOptions::new(1, 1, out.clone()) }).expect("split");
        out
    };
    let (q8, q4) = (split("q8", Quant::Q8_0), split("q4", Quant::Q4_0));
    assert!(DevicePackage::open(&q8.join("device"), &Device::Cpu).is_ok());

    // Truncated: the size check names the shard.
    let shard = q8.join("cloud/middle.gguf");
    let bytes = std::fs::read(&shard).expect("read");
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).expect("truncate");
    let err = CloudPackage::open(&q8.join("cloud"), &Device::Cpu).expect_err("truncated").to_string();
    assert!(err.contains("middle.gguf") && err.contains("the manifest says"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");

    // A q4_0 shard in place of the q8_0 one, with size and hash made to match: the types do not.
    let device = q8.join("device");
    std::fs::copy(q4.join("device/input.gguf"), device.join("input.gguf")).expect("swap");
    let mut m = Manifest::read(&device).expect("manifest");
    let info = m.shards.iter_mut().find(|s| s.file == "input.gguf").expect("input shard");
    info.sha256 = sha256_file(&device.join("input.gguf")).expect("hash");
    info.bytes = std::fs::metadata(device.join("input.gguf")).expect("stat").len();
    m.write(&device).expect("write manifest");
    let err = DevicePackage::open(&device, &Device::Cpu).expect_err("mistyped").to_string();
    assert!(err.contains("its matrices are q4_0, the manifest says q8_0"), "{err}");
}

/// Re-splitting the same weights in another storage type replaces the package; other weights are
/// still refused.
#[test]
fn resplitting_the_same_weights_in_another_type_replaces_the_package() {
    let dir = tempfile::tempdir().expect("tmp");
    let (model, out) = tiny(dir.path());
    split_model(&model, &SplitOptions::new(1, 1, out.clone())).expect("f32");
    let q8 = SplitOptions { device_quant: Quant::Q8_0, cloud_quant: Quant::Q8_0, ..SplitOptions::new(1, 1, out.clone()) };
    split_model(&model, &q8).expect("q8_0 over the f32 split of the same weights");
    assert_eq!(Manifest::read(&out.join("cloud")).expect("manifest").quant.as_deref(), Some("q8_0"));
    assert!(out.join("cloud/middle.gguf").is_file() && !out.join("cloud/middle.safetensors").exists());
    let other = TinyLlama { seed: 99, ..TinyLlama::default() }.write_dir(&dir.path().join("other"), 1);
    let other = load_model(&ModelSource::Dir(other), false).expect("load");
    let err = split_model(&other, &q8).expect_err("other weights").to_string();
    assert!(err.contains("already holds a different model"), "{err}");
}
