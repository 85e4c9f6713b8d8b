//! Cuts a loaded model into the device package (input + output submodels, tokenizer) and the cloud
//! package (middle submodel). Everything is written into a temporary sibling of `--out` and renamed
//! into place at the end, so a failure never leaves a half-written package.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use hat_model::manifest::{fingerprint, sha256_file, Manifest, Role, ShardInfo, SplitSpec, FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE};
use hat_model::weights::{ggml_name, unfit};
use hat_model::{names, Quant};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::error::{Result, SplitError};
use crate::source::LoadedModel;

pub const DEVICE_DIR: &str = "device";
pub const CLOUD_DIR: &str = "cloud";
pub const INPUT_SHARD: &str = "input.safetensors";
pub const MIDDLE_SHARD: &str = "middle.safetensors";
pub const OUTPUT_SHARD: &str = "output.safetensors";
/// What a quantized shard's GGUF metadata says it is.
pub const GGUF_SHARD_ARCH: &str = "hat-shard";
/// The device's initial adapter: a copy of one middle layer, under its original tensor names.
pub const ADAPTER_INIT_SHARD: &str = "adapter-init.safetensors";

/// The middle layer the initial adapter copies when `--adapter-init-layer` is not given: the last
/// one. Its output is what the output submodel reads, and on SmolLM2-135M (split 2/2) it drafts best
/// of all middle layers (see `cargo bench -p hat-tests --bench adapter_init`).
pub fn default_adapter_layer(split: &SplitSpec) -> usize {
    split.middle_range().end - 1
}

#[derive(Debug, Clone)]
pub struct SplitOptions {
    pub input_layers: usize,
    pub output_layers: usize,
    pub dtype: DType,
    pub out: PathBuf,
    pub progress: bool,
    /// Middle layer copied into the device package as the initial adapter (default:
    /// [`default_adapter_layer`]).
    pub adapter_init_layer: Option<usize>,
    /// How the device's (input, output) and the cloud's (middle) matrices are stored. `F32`/`F16`
    /// write dense safetensors shards (`F16` overrides `dtype` for that side).
    pub device_quant: Quant,
    pub cloud_quant: Quant,
}

impl SplitOptions {
    /// f32, no progress bar, the default adapter layer.
    pub fn new(input_layers: usize, output_layers: usize, out: impl Into<PathBuf>) -> Self {
        Self {
            input_layers,
            output_layers,
            dtype: DType::F32,
            out: out.into(),
            progress: false,
            adapter_init_layer: None,
            device_quant: Quant::F32,
            cloud_quant: Quant::F32,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SplitReport {
    pub fingerprint: String,
    pub split: SplitSpec,
    pub device_dir: PathBuf,
    pub cloud_dir: PathBuf,
    /// (file, bytes) of each shard written.
    pub shards: Vec<(String, u64)>,
    pub elapsed: Duration,
}

pub fn dtype_name(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => Err(SplitError::BadInput(format!("dtype {other:?} is not supported (f32, f16, bf16)"))),
    }
}

pub fn progress_bar(enabled: bool, len: u64, message: &'static str) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{msg:30} [{bar:30}] {pos}/{len} {elapsed}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(message);
    bar
}

/// Which shard a tensor belongs to: every tensor lands in exactly one.
fn shard_of(name: &str, split: &SplitSpec) -> Option<&'static str> {
    if name == names::EMBED_TOKENS {
        return Some(INPUT_SHARD);
    }
    if name == names::FINAL_NORM || name == names::LM_HEAD {
        return Some(OUTPUT_SHARD);
    }
    let layer = names::layer_index(name)?;
    [(split.input_range(), INPUT_SHARD), (split.middle_range(), MIDDLE_SHARD), (split.output_range(), OUTPUT_SHARD)]
        .into_iter()
        .find(|(range, _)| range.contains(&layer))
        .map(|(_, shard)| shard)
}

/// Groups tensor names by shard; fails if a tensor fits none.
pub fn partition(names: impl IntoIterator<Item = String>, split: &SplitSpec) -> Result<HashMap<&'static str, Vec<String>>> {
    let mut groups: HashMap<&'static str, Vec<String>> = HashMap::new();
    for name in names {
        let shard = shard_of(&name, split).ok_or_else(|| SplitError::BadInput(format!("tensor `{name}` belongs to no submodel")))?;
        groups.entry(shard).or_default().push(name);
    }
    for list in groups.values_mut() {
        list.sort();
    }
    Ok(groups)
}

pub fn split_model(model: &LoadedModel, opts: &SplitOptions) -> Result<SplitReport> {
    let start = Instant::now();
    let split = SplitSpec::new(model.config.num_layers, opts.input_layers, opts.output_layers).map_err(SplitError::BadSplit)?;
    let dtype = dtype_name(opts.dtype)?;
    let adapter_layer = opts.adapter_init_layer.unwrap_or_else(|| default_adapter_layer(&split));
    if !split.middle_range().contains(&adapter_layer) {
        return Err(SplitError::BadInput(format!(
            "--adapter-init-layer {adapter_layer} is not a middle layer; choose one of {}..={}",
            split.middle_range().start,
            split.middle_range().end - 1
        )));
    }
    let existing = existing_package(&opts.out)?;
    if let Some(old) = &existing {
        // Refuse early when the cut or the architecture already differ; the weights are compared
        // through the fingerprint once the new shards are hashed.
        if old.split != split || old.config != model.hf_config {
            return Err(SplitError::OutHoldsOtherModel {
                out: opts.out.clone(),
                existing: old.fingerprint.clone(),
                existing_source: old.source.clone(),
            });
        }
    }

    let parent = absolute_parent(&opts.out)?;
    std::fs::create_dir_all(&parent).map_err(|e| SplitError::io(format!("cannot create {}", parent.display()), e))?;
    let staging = tempfile::Builder::new()
        .prefix(".hat-split-")
        .tempdir_in(&parent)
        .map_err(|e| SplitError::io(format!("cannot create a staging directory in {}", parent.display()), e))?;
    let device_dir = staging.path().join(DEVICE_DIR);
    let cloud_dir = staging.path().join(CLOUD_DIR);
    for d in [&device_dir, &cloud_dir] {
        std::fs::create_dir_all(d).map_err(|e| SplitError::io(format!("cannot create {}", d.display()), e))?;
    }

    let groups = partition(model.tensors.keys().cloned(), &split)?;
    let layout: [(&str, &Path, Range<usize>, Quant); 3] = [
        ("input", &device_dir, split.input_range(), opts.device_quant),
        ("middle", &cloud_dir, split.middle_range(), opts.cloud_quant),
        ("output", &device_dir, split.output_range(), opts.device_quant),
    ];
    if (opts.device_quant == Quant::Keep || opts.cloud_quant == Quant::Keep) && model.quantized.is_none() {
        return Err(SplitError::BadInput(format!("`keep` keeps a GGUF source's own types, but {} is not a GGUF", model.source)));
    }
    let bar = progress_bar(opts.progress, model.tensors.len() as u64, "writing shards");
    let mut shards = Vec::new();
    // The f32 shards' hashes, when the shards written are not those: the base fingerprint.
    let mut f32_hashes: Vec<(String, String)> = Vec::new();
    let dense_f32 = opts.dtype == DType::F32 && opts.device_quant == Quant::F32 && opts.cloud_quant == Quant::F32;
    for (stem, dir, layers, quant) in layout {
        let safetensors_file = format!("{stem}.safetensors");
        let names = groups.get(safetensors_file.as_str()).cloned().unwrap_or_default();
        if !dense_f32 {
            f32_hashes.push((safetensors_file.clone(), f32_shard_hash(model, &names)?));
        }
        let (file, kinds) = if quant.is_quantized() {
            let file = format!("{stem}.gguf");
            let kinds = write_gguf_shard(model, &names, quant, &dir.join(&file), &bar)?;
            (file, Some(kinds))
        } else {
            let dtype = if quant == Quant::F16 { DType::F16 } else { opts.dtype };
            let dtype_label = dtype_name(dtype)?;
            let mut converted: HashMap<String, Tensor> = HashMap::with_capacity(names.len());
            for name in &names {
                let t = model.tensors[name]
                    .to_dtype(dtype)
                    .map_err(|e| SplitError::candle(format!("converting `{name}` to {dtype_label}"), e))?;
                converted.insert(name.clone(), t);
                bar.inc(1);
            }
            let path = dir.join(&safetensors_file);
            candle_core::safetensors::save(&converted, &path).map_err(|e| SplitError::candle(format!("writing {}", path.display()), e))?;
            (safetensors_file, None)
        };
        let path = dir.join(&file);
        let bytes = std::fs::metadata(&path).map_err(|e| SplitError::io(format!("cannot stat {}", path.display()), e))?.len();
        shards.push(ShardInfo {
            file,
            sha256: sha256_file(&path)?,
            bytes,
            layers: [layers.start, layers.end],
            tensors: names.len(),
            quant: kinds,
        });
    }
    bar.finish_and_clear();

    // The fingerprint covers what device and cloud must agree on; the adapter is the device's own
    // business, so it is hashed for integrity but kept out of the fingerprint.
    let hashes: Vec<(&str, &str)> = shards.iter().map(|s| (s.file.as_str(), s.sha256.as_str())).collect();
    let fp = fingerprint(&model.hf_config, &split, dtype, &hashes);
    let base_fp = (!dense_f32).then(|| {
        let hashes: Vec<(&str, &str)> = f32_hashes.iter().map(|(f, h)| (f.as_str(), h.as_str())).collect();
        fingerprint(&model.hf_config, &split, "f32", &hashes)
    });
    let device_files = [shards[0].file.clone(), shards[2].file.clone(), ADAPTER_INIT_SHARD.to_string()];
    let cloud_files = [shards[1].file.clone()];
    shards.push(write_adapter_init(model, &split, adapter_layer, opts.dtype, &device_dir)?);
    let quant_label = |q: Quant| q.is_quantized().then(|| q.name().to_string());
    let manifest = |role: Role, files: &[String], quant: Quant| Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        role,
        fingerprint: fp.clone(),
        source: model.source.clone(),
        dtype: if quant == Quant::F16 { "f16".into() } else { dtype.into() },
        quant: quant_label(quant),
        base_fingerprint: base_fp.clone(),
        config: model.hf_config.clone(),
        split,
        shards: shards.iter().filter(|s| files.contains(&s.file)).cloned().collect(),
        tokenizer: (role == Role::Device).then(|| model.tokenizer.clone()),
        adapter_init_layer: (role == Role::Device).then_some(adapter_layer),
    };
    let tokenizer_path = device_dir.join(&model.tokenizer.file);
    std::fs::write(&tokenizer_path, &model.tokenizer_json)
        .map_err(|e| SplitError::io(format!("cannot write {}", tokenizer_path.display()), e))?;
    manifest(Role::Device, &device_files, opts.device_quant).write(&device_dir)?;
    manifest(Role::Cloud, &cloud_files, opts.cloud_quant).write(&cloud_dir)?;

    if let Some(old) = existing {
        // The same weights in another storage type (or dtype) are the same model: replace them.
        if old.weights_fingerprint() != base_fp.as_deref().unwrap_or(&fp) {
            return Err(SplitError::OutHoldsOtherModel { out: opts.out.clone(), existing: old.fingerprint, existing_source: old.source });
        }
    }
    // Same model (or an empty directory): replace it.
    if opts.out.exists() {
        std::fs::remove_dir_all(&opts.out).map_err(|e| SplitError::io(format!("cannot replace {}", opts.out.display()), e))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, &opts.out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staged);
        SplitError::io(format!("cannot move the package into {}", opts.out.display()), e)
    })?;
    Ok(SplitReport {
        fingerprint: fp,
        split,
        device_dir: opts.out.join(DEVICE_DIR),
        cloud_dir: opts.out.join(CLOUD_DIR),
        shards: shards.iter().map(|s| (s.file.clone(), s.bytes)).collect(),
        elapsed: start.elapsed(),
    })
}

/// sha256 of the f32 safetensors shard these tensors would make (the bytes `hat split` writes for
/// f32), computed in memory.
fn f32_shard_hash(model: &LoadedModel, names: &[String]) -> Result<String> {
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let t = model.tensors[name].to_dtype(DType::F32).map_err(|e| SplitError::candle(format!("converting `{name}` to f32"), e))?;
        tensors.push((name.clone(), t));
    }
    let bytes = safetensors::serialize(tensors, None).map_err(|e| SplitError::BadInput(format!("serialising f32 tensors: {e}")))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// Writes a GGUF shard: matrices quantized to `quant` (or kept in the source GGUF's types), vectors
/// in f32. Returns the `+`-joined ggml types of its matrices, as the manifest records them. A matrix
/// whose rows do not fit the type's blocks is refused, naming it.
fn write_gguf_shard(model: &LoadedModel, names: &[String], quant: Quant, path: &Path, bar: &ProgressBar) -> Result<String> {
    let mut tensors: Vec<(String, Arc<QTensor>)> = Vec::with_capacity(names.len());
    let mut kinds = BTreeSet::new();
    for name in names {
        let t = &model.tensors[name];
        let q = if t.rank() < 2 {
            Arc::new(
                QTensor::quantize(&t.to_dtype(DType::F32).map_err(|e| SplitError::candle(name.clone(), e))?, GgmlDType::F32)
                    .map_err(|e| SplitError::candle(name.clone(), e))?,
            )
        } else if quant == Quant::Keep {
            let kept = model
                .quantized
                .as_ref()
                .and_then(|q| q.get(name))
                .ok_or_else(|| SplitError::BadInput(format!("`keep`: the source has no quantized `{name}`")))?;
            kept.clone()
        } else {
            let ggml = quant.ggml().unwrap_or(GgmlDType::Q8_0);
            if let Some(why) = unfit(ggml, t.dims()) {
                return Err(SplitError::BadInput(format!(
                    "cannot store `{name}` {:?} as {}: {why}; choose q8_0 or q4_0",
                    t.dims(),
                    quant.name()
                )));
            }
            let f = t.to_dtype(DType::F32).map_err(|e| SplitError::candle(name.clone(), e))?;
            Arc::new(QTensor::quantize(&f, ggml).map_err(|e| SplitError::candle(format!("quantizing `{name}` to {}", quant.name()), e))?)
        };
        if t.rank() >= 2 {
            kinds.insert(ggml_name(q.dtype()));
        }
        tensors.push((name.clone(), q));
        bar.inc(1);
    }
    let arch = gguf_file::Value::String(GGUF_SHARD_ARCH.into());
    let label = gguf_file::Value::String(quant.name().into());
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q.as_ref())).collect();
    let file = std::fs::File::create(path).map_err(|e| SplitError::io(format!("cannot create {}", path.display()), e))?;
    let mut w = std::io::BufWriter::new(file);
    gguf_file::write(&mut w, &[("general.architecture", &arch), ("hat.quant", &label)], &refs)
        .map_err(|e| SplitError::candle(format!("writing {}", path.display()), e))?;
    use std::io::Write;
    w.flush().map_err(|e| SplitError::io(format!("cannot write {}", path.display()), e))?;
    Ok(kinds.into_iter().collect::<Vec<_>>().join("+"))
}

/// Copies middle layer `layer` into the device package, keeping its tensor names.
fn write_adapter_init(model: &LoadedModel, split: &SplitSpec, layer: usize, dtype: DType, device_dir: &Path) -> Result<ShardInfo> {
    debug_assert!(split.middle_range().contains(&layer));
    let mut tensors = HashMap::new();
    for (name, t) in &model.tensors {
        if names::layer_index(name) == Some(layer) {
            let t = t.to_dtype(dtype).map_err(|e| SplitError::candle(format!("converting `{name}`"), e))?;
            tensors.insert(name.clone(), t);
        }
    }
    let path = device_dir.join(ADAPTER_INIT_SHARD);
    candle_core::safetensors::save(&tensors, &path).map_err(|e| SplitError::candle(format!("writing {}", path.display()), e))?;
    let bytes = std::fs::metadata(&path).map_err(|e| SplitError::io(format!("cannot stat {}", path.display()), e))?.len();
    Ok(ShardInfo {
        file: ADAPTER_INIT_SHARD.into(),
        sha256: sha256_file(&path)?,
        bytes,
        layers: [layer, layer + 1],
        tensors: tensors.len(),
        quant: None,
    })
}

/// What `--out` holds now: nothing (or an empty directory), a hat split, or something else (refused).
fn existing_package(out: &Path) -> Result<Option<Manifest>> {
    if !out.exists() {
        return Ok(None);
    }
    if !out.is_dir() {
        return Err(SplitError::OutNotPackage(out.to_path_buf()));
    }
    let mut entries = std::fs::read_dir(out).map_err(|e| SplitError::io(format!("cannot list {}", out.display()), e))?;
    if entries.next().is_none() {
        return Ok(None);
    }
    for side in [DEVICE_DIR, CLOUD_DIR] {
        let dir = out.join(side);
        if dir.join(MANIFEST_FILE).is_file() {
            return Manifest::read(&dir).map(Some).map_err(|_| SplitError::OutNotPackage(out.to_path_buf()));
        }
    }
    Err(SplitError::OutNotPackage(out.to_path_buf()))
}

fn absolute_parent(out: &Path) -> Result<PathBuf> {
    let abs = if out.is_absolute() {
        out.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| SplitError::io("cannot read the current directory", e))?.join(out)
    };
    Ok(abs.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/")))
}
