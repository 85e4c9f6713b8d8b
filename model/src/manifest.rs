//! `hat.json`, the manifest of a device or cloud package. Both sides carry the architecture, the split
//! and a fingerprint of the whole split model, so a runtime can refuse to pair packages that do not
//! belong together.

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::HfConfig;
use crate::error::{ModelError, Result};

pub const MANIFEST_FILE: &str = "hat.json";
pub const FORMAT_NAME: &str = "hat-package";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Device,
    Cloud,
}

/// Where the model is cut: layers `0..input_layers` on the device, the last `output_layers` on the
/// device, everything between on the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitSpec {
    pub num_layers: usize,
    pub input_layers: usize,
    pub output_layers: usize,
}

impl SplitSpec {
    /// Checks the split leaves at least one layer in each submodel.
    pub fn new(num_layers: usize, input_layers: usize, output_layers: usize) -> std::result::Result<Self, String> {
        if input_layers == 0 || output_layers == 0 {
            return Err(format!("--input-layers and --output-layers must each be at least 1 (got {input_layers} and {output_layers})"));
        }
        if input_layers + output_layers >= num_layers {
            return Err(format!(
                "--input-layers {input_layers} + --output-layers {output_layers} must be less than the model's \
                 {num_layers} layers, so that the cloud keeps at least one (max sum: {})",
                num_layers.saturating_sub(1)
            ));
        }
        Ok(Self { num_layers, input_layers, output_layers })
    }

    pub fn input_range(&self) -> Range<usize> {
        0..self.input_layers
    }

    pub fn middle_range(&self) -> Range<usize> {
        self.input_layers..self.num_layers - self.output_layers
    }

    pub fn output_range(&self) -> Range<usize> {
        self.num_layers - self.output_layers..self.num_layers
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the package directory.
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    /// Original decoder-layer indices held by the shard, `[start, end)`.
    pub layers: [usize; 2],
    pub tensors: usize,
    /// GGUF shards only: the ggml types of its matrices, `+`-joined (`q8_0`, or `q4_1+q6_k` when a
    /// GGUF source's types were kept). The loader refuses a shard whose matrices say otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<String>,
}

/// Tokenizer facts the device needs; the cloud never receives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    pub file: String,
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default)]
    pub bos_token: Option<SpecialToken>,
    #[serde(default)]
    pub eos_tokens: Vec<SpecialToken>,
    #[serde(default)]
    pub pad_token: Option<SpecialToken>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialToken {
    pub id: u32,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub role: Role,
    /// sha256 over config, split, dtype and every shard's hash, in both packages of a split.
    pub fingerprint: String,
    /// What the user passed to `hat split`, for people reading the manifest.
    pub source: String,
    pub dtype: String,
    /// How this side's matrices are stored when not dense `dtype`: `q8_0`, `q4_0` or `keep`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<String>,
    /// The fingerprint the f32 split of the same weights has (absent when this is that split). Draft
    /// heads and adapters are trained on f32 features and match on it, so one trained head serves every
    /// storage type of its split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_fingerprint: Option<String>,
    pub config: HfConfig,
    pub split: SplitSpec,
    pub shards: Vec<ShardInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerInfo>,
    /// Device only: the middle layer the initial adapter (`adapter-init.safetensors`) copies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_init_layer: Option<usize>,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text =
            std::fs::read_to_string(&path).map_err(|e| ModelError::io(format!("cannot read package manifest {}", path.display()), e))?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| ModelError::InvalidManifest { path: path.clone(), reason: e.to_string() })?;
        if manifest.format != FORMAT_NAME {
            return Err(ModelError::InvalidManifest { path, reason: format!("format is `{}`, not `{FORMAT_NAME}`", manifest.format) });
        }
        if manifest.format_version != FORMAT_VERSION {
            return Err(ModelError::InvalidManifest {
                path,
                reason: format!(
                    "format version {} is not supported by this hat (expects {FORMAT_VERSION}); re-run `hat split`",
                    manifest.format_version
                ),
            });
        }
        Ok(manifest)
    }

    /// See [`Manifest::base_fingerprint`].
    pub fn weights_fingerprint(&self) -> &str {
        self.base_fingerprint.as_deref().unwrap_or(&self.fingerprint)
    }

    /// The shard holding submodel `stem` (`input`, `middle`, `output`), dense or quantized.
    pub fn shard(&self, stem: &str) -> Option<&ShardInfo> {
        self.shards.iter().find(|s| s.file.strip_suffix(".safetensors").or_else(|| s.file.strip_suffix(".gguf")) == Some(stem))
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| ModelError::Json { context: "serialising manifest".into(), source: e })
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST_FILE);
        std::fs::write(&path, self.to_json()? + "\n").map_err(|e| ModelError::io(format!("cannot write {}", path.display()), e))
    }
}

/// The fingerprint both manifests of one split share. It changes with the weights (through the shard
/// hashes), the architecture, the cut points and the dtype.
pub fn fingerprint(config: &HfConfig, split: &SplitSpec, dtype: &str, shard_hashes: &[(&str, &str)]) -> String {
    let mut shards: Vec<_> = shard_hashes.to_vec();
    shards.sort();
    let canonical = serde_json::json!({
        "format_version": FORMAT_VERSION,
        "config": config,
        "split": split,
        "dtype": dtype,
        "shards": shards,
    });
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

/// Streams a file through sha256.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| ModelError::io(format!("cannot open {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| ModelError::io(format!("cannot read {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_ranges_partition_the_layers() {
        let s = SplitSpec::new(30, 2, 2).expect("valid split");
        assert_eq!(s.input_range(), 0..2);
        assert_eq!(s.middle_range(), 2..28);
        assert_eq!(s.output_range(), 28..30);
        assert!(SplitSpec::new(30, 15, 15).is_err(), "middle must keep a layer");
        assert!(SplitSpec::new(30, 0, 2).is_err());
        assert!(SplitSpec::new(4, 2, 1).is_ok());
    }
}
