//! Opening split packages: manifests are read, shards are checked against their recorded size and
//! sha256, and a device package is only paired with the cloud package of the same split.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use hat_model::manifest::{sha256_file, Manifest, Role, ShardInfo};
use hat_model::{Config, Submodel, SubmodelKind};

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

/// Loads one shard after checking it is the file the manifest describes.
fn load_shard(dir: &Path, manifest: &Manifest, file: &str, kind: SubmodelKind, device: &Device, dtype: DType) -> Result<Submodel> {
    let info: &ShardInfo = manifest
        .shards
        .iter()
        .find(|s| s.file == file)
        .ok_or_else(|| RuntimeError::DamagedShard { path: dir.join(file), reason: "not listed in hat.json".into() })?;
    let path = dir.join(file);
    let damaged = |reason: String| RuntimeError::DamagedShard { path: path.clone(), reason };
    let len = std::fs::metadata(&path).map_err(|e| damaged(e.to_string()))?.len();
    if len != info.bytes {
        return Err(damaged(format!("{len} bytes, the manifest says {}", info.bytes)));
    }
    let hash = sha256_file(&path)?;
    if hash != info.sha256 {
        return Err(damaged("sha256 does not match the manifest".into()));
    }
    let tensors = candle_core::safetensors::load(&path, device).map_err(|e| damaged(e.to_string()))?;
    let cfg = manifest.config.validate()?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    Ok(Submodel::load(vb, &cfg, kind, info.layers[0]..info.layers[1])?)
}

/// CPU matmuls are fastest in f32 whatever the package dtype; other devices run the stored dtype.
pub fn compute_dtype(manifest: &Manifest, device: &Device) -> DType {
    if device.is_cpu() {
        return DType::F32;
    }
    match manifest.dtype.as_str() {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    }
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
        let input = load_shard(dir, &manifest, "input.safetensors", SubmodelKind::Input, device, dtype)?;
        let output = load_shard(dir, &manifest, "output.safetensors", SubmodelKind::Output, device, dtype)?;
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
        let manifest = Self::read_manifest(dir)?;
        let dtype = compute_dtype(&manifest, device);
        let middle = load_shard(dir, &manifest, "middle.safetensors", SubmodelKind::Middle, device, dtype)?;
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
