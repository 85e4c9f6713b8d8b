//! Opening split packages: manifests are read, shards are checked against their recorded size and
//! sha256, and a device package is only paired with the cloud package of the same split.

use std::path::{Path, PathBuf};

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use hat_model::manifest::{sha256_file, Manifest, Role, ShardInfo};
use hat_model::weights::{ggml_name, QuantMap};
use hat_model::{Config, Submodel, SubmodelKind, Weights};

use crate::error::{Result, RuntimeError};

pub const DEVICE_DIR: &str = "device";
pub const CLOUD_DIR: &str = "cloud";

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Device => "device",
        Role::Cloud => "cloud",
    }
}

fn open_manifest(dir: &Path, expected: Role) -> Result<Manifest> {
    if !dir.is_dir() {
        return Err(RuntimeError::MissingPackage(dir.to_path_buf()));
    }
    let m = Manifest::read(dir)?;
    if m.role != expected {
        return Err(RuntimeError::WrongRole { path: dir.to_path_buf(), expected: role_name(expected), found: role_name(m.role) });
    }
    Ok(m)
}

/// The shard of submodel `stem` (`input`, `middle`, `output`) after checking it is the file the
/// manifest describes: its path and its manifest entry.
fn checked_shard<'m>(dir: &Path, manifest: &'m Manifest, stem: &str) -> Result<(PathBuf, &'m ShardInfo)> {
    let info = manifest
        .shard(stem)
        .ok_or_else(|| RuntimeError::DamagedShard { path: dir.join(format!("{stem}.*")), reason: "not listed in hat.json".into() })?;
    let path = dir.join(&info.file);
    let damaged = |reason: String| RuntimeError::DamagedShard { path: path.clone(), reason };
    let len = std::fs::metadata(&path).map_err(|e| damaged(e.to_string()))?.len();
    if len != info.bytes {
        return Err(damaged(format!("{len} bytes, the manifest says {}", info.bytes)));
    }
    let hash = sha256_file(&path)?;
    if hash != info.sha256 {
        return Err(damaged("sha256 does not match the manifest".into()));
    }
    Ok((path, info))
}

/// A checked shard's tensors: dense ones (safetensors, and the vectors of a GGUF shard, in f32) and
/// the quantized matrices of a GGUF shard, whose types must be the ones the manifest records.
/// `dequantize` expands those matrices into the dense map too (training needs gradients through them).
fn read_shard(path: &Path, info: &ShardInfo, device: &Device, dequantize: bool) -> Result<(HashMap<String, Tensor>, QuantMap)> {
    let damaged = |reason: String| RuntimeError::DamagedShard { path: path.to_path_buf(), reason };
    if !info.file.ends_with(".gguf") {
        let tensors = candle_core::safetensors::load(path, device).map_err(|e| damaged(e.to_string()))?;
        return Ok((tensors, QuantMap::new()));
    }
    let file = std::fs::File::open(path).map_err(|e| damaged(e.to_string()))?;
    let mut reader = std::io::BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| damaged(e.to_string()))?;
    let (mut dense, mut quant, mut types) = (HashMap::new(), QuantMap::new(), BTreeSet::new());
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let q = content.tensor(&mut reader, name, device).map_err(|e| damaged(format!("tensor `{name}`: {e}")))?;
        if q.rank() >= 2 {
            types.insert(ggml_name(q.dtype()));
        }
        match q.dtype() {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                dense.insert(name.clone(), q.dequantize(device)?);
            }
            _ => {
                if dequantize {
                    dense.insert(name.clone(), q.dequantize(device)?);
                } else {
                    quant.insert(name.clone(), Arc::new(q));
                }
            }
        }
    }
    let found = types.into_iter().collect::<Vec<_>>().join("+");
    let expected = info.quant.as_deref().unwrap_or("none (a dense shard)");
    if found != expected {
        return Err(damaged(format!("its matrices are {found}, the manifest says {expected}")));
    }
    Ok((dense, quant))
}

/// Loads one shard after checking it is the file the manifest describes.
fn load_shard(dir: &Path, manifest: &Manifest, stem: &str, kind: SubmodelKind, device: &Device, dtype: DType) -> Result<Submodel> {
    let (path, info) = checked_shard(dir, manifest, stem)?;
    let (dense, quant) = read_shard(&path, info, device, false)?;
    let cfg = manifest.config.validate()?;
    let vb = VarBuilder::from_tensors(dense, dtype, device);
    let weights = if quant.is_empty() { Weights::from(vb) } else { Weights::mixed(vb, quant) };
    Ok(Submodel::load_weights(&weights, &cfg, kind, info.layers[0]..info.layers[1])?)
}

/// Every tensor of the checked shard of submodel `stem`, dense f32 on the CPU (quantized matrices
/// expanded): what training starts from.
pub fn dense_shard_tensors(dir: &Path, manifest: &Manifest, stem: &str) -> Result<HashMap<String, Tensor>> {
    let (path, info) = checked_shard(dir, manifest, stem)?;
    let (dense, _) = read_shard(&path, info, &Device::Cpu, true)?;
    dense.into_iter().map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?))).collect()
}

/// CPU matmuls are fastest in f32 whatever the package dtype; other devices run the stored dtype.
pub fn compute_dtype(manifest: &Manifest, device: &Device) -> DType {
    if device.is_cpu() {
        return DType::F32;
    }
    crate::gpu::parse_dtype(&manifest.dtype).unwrap_or(DType::F32)
}

/// The device side: input and output submodels and the tokenizer.
#[derive(Debug)]
pub struct DevicePackage {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub config: Config,
    pub input: Submodel,
    pub output: Submodel,
    pub tokenizer: tokenizers::Tokenizer,
}

impl DevicePackage {
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        let manifest = open_manifest(dir, Role::Device)?;
        let dtype = compute_dtype(&manifest, device);
        let input = load_shard(dir, &manifest, "input", SubmodelKind::Input, device, dtype)?;
        let output = load_shard(dir, &manifest, "output", SubmodelKind::Output, device, dtype)?;
        let info =
            manifest.tokenizer.as_ref().ok_or_else(|| RuntimeError::Tokenizer(format!("{} has no tokenizer entry", dir.display())))?;
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join(&info.file))
            .map_err(|e| RuntimeError::Tokenizer(format!("{}: {e}", dir.join(&info.file).display())))?;
        let config = manifest.config.validate()?;
        Ok(Self { dir: dir.to_path_buf(), manifest, config, input, output, tokenizer })
    }

    /// Token ids that end a reply.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.manifest.tokenizer.as_ref().map(|t| t.eos_tokens.iter().map(|s| s.id).collect()).unwrap_or_default()
    }

    /// Refuses a cloud package from another model or split.
    pub fn check_pair(&self, cloud: &Manifest, cloud_dir: &Path) -> Result<()> {
        if self.manifest.fingerprint != cloud.fingerprint {
            return Err(RuntimeError::FingerprintMismatch {
                device: self.dir.clone(),
                cloud: cloud_dir.to_path_buf(),
                device_fp: self.manifest.fingerprint.clone(),
                cloud_fp: cloud.fingerprint.clone(),
            });
        }
        Ok(())
    }
}

/// The cloud side: the middle submodel only.
#[derive(Debug)]
pub struct CloudPackage {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub middle: Submodel,
}

impl CloudPackage {
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        Self::open_with(dir, device, None)
    }

    /// Opens the package with its middle submodel on `device`, computing in `dtype` (default: f32
    /// on the CPU; on a GPU bf16 for a dense package, or the package's stored f16/bf16). A quantized
    /// middle computes in f32 on every device, its matrices staying in their ggml types (candle's
    /// quantized matmuls take f32 rows), so another `dtype` is refused for it.
    pub fn open_with(dir: &Path, device: &Device, dtype: Option<DType>) -> Result<Self> {
        let manifest = Self::read_manifest(dir)?;
        let quant = manifest.shard("middle").and_then(|s| s.quant.clone());
        let dtype = match (dtype, &quant) {
            (Some(d), Some(q)) if d != DType::F32 => {
                return Err(RuntimeError::BadInput(format!(
                    "{}: the middle submodel is quantized ({q}) and computes in f32 on every device; --dtype {} is for a \
                     dense package (`hat split --cloud-quant f32` or f16)",
                    dir.display(),
                    d.as_str()
                )))
            }
            (Some(d), _) => d,
            (None, Some(_)) => DType::F32,
            (None, None) => match compute_dtype(&manifest, device) {
                DType::F32 if !device.is_cpu() => DType::BF16,
                d => d,
            },
        };
        let middle = load_shard(dir, &manifest, "middle", SubmodelKind::Middle, device, dtype)?;
        Ok(Self { dir: dir.to_path_buf(), manifest, middle })
    }

    pub fn read_manifest(dir: &Path) -> Result<Manifest> {
        open_manifest(dir, Role::Cloud)
    }
}

/// The device hat computes on: the CPU (GPU inference arrives with the `cuda` feature).
pub fn default_device() -> Device {
    Device::Cpu
}
