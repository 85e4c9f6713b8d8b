//! `hat profile`: measure the device, the cloud and the link, model chunked prefill as a pipeline,
//! and write the chunk-size table that `--chunk-size auto` reads (`DIR/device/profile.json`).

pub mod measure;
pub mod model;

use std::path::{Path, PathBuf};

use hat_runtime::{ChunkPolicy, LinkEstimate};
use serde::{Deserialize, Serialize};

pub use measure::{measure, ProfileOptions};
pub use model::{best_chunk, predict_ttft_ms, ChunkTable, LinkParams, StageCosts, StageCurve};

/// File name of the profile inside the device package.
pub const PROFILE_FILE: &str = "profile.json";
pub const PROFILE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("no profile at {0}: run `hat profile --artifacts DIR` first, or pass --chunk-size N")]
    Missing(PathBuf),
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path} was profiled for model {found}, but this device package is {expected}: run `hat profile` again")]
    WrongModel { path: PathBuf, found: String, expected: String },
    #[error(transparent)]
    Runtime(#[from] hat_runtime::RuntimeError),
    #[error(transparent)]
    Model(#[from] hat_model::ModelError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ProfileError>;

/// Raw measurements and the table built from them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    /// The split this was measured on.
    pub fingerprint: String,
    /// Where the cloud side was measured ("in-process" or host:port).
    pub cloud: String,
    /// Hidden-state encoding the measurements used.
    pub wire: String,
    /// The link as measured by probes.
    pub link: LinkParams,
    pub costs: StageCosts,
    /// Built for HAT mode (the draft adapter prefills too).
    pub table: ChunkTable,
}

impl Profile {
    pub fn path(device_dir: &Path) -> PathBuf {
        device_dir.join(PROFILE_FILE)
    }

    /// Reads the profile of a device package and checks it belongs to it.
    pub fn load(device_dir: &Path, fingerprint: &str) -> Result<Self> {
        let path = Self::path(device_dir);
        if !path.is_file() {
            return Err(ProfileError::Missing(path));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ProfileError::Unreadable { path: path.clone(), reason: e.to_string() })?;
        let p: Profile = serde_json::from_str(&text).map_err(|e| ProfileError::Unreadable { path: path.clone(), reason: e.to_string() })?;
        if p.version != PROFILE_VERSION {
            return Err(ProfileError::Unreadable {
                path,
                reason: format!("profile version {} (this hat reads {PROFILE_VERSION})", p.version),
            });
        }
        if p.fingerprint != fingerprint {
            return Err(ProfileError::WrongModel { path, found: p.fingerprint, expected: fingerprint.to_string() });
        }
        Ok(p)
    }

    /// Like [`Profile::load`], but a package that was never profiled gives `None`.
    pub fn load_if_present(device_dir: &Path, fingerprint: &str) -> Result<Option<Self>> {
        match Self::load(device_dir, fingerprint) {
            Ok(p) => Ok(Some(p)),
            Err(ProfileError::Missing(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `profile.json` (to a temporary name first, so a failure leaves the old one).
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| ProfileError::Unreadable { path: path.to_path_buf(), reason: e.to_string() };
        let text =
            serde_json::to_string_pretty(self).map_err(|e| ProfileError::Unreadable { path: path.to_path_buf(), reason: e.to_string() })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Predicted HAT-mode TTFT (ms) for a prompt, chunk size and link.
    pub fn predict_ms(&self, prompt_len: usize, chunk: Option<usize>, link: &LinkParams) -> f64 {
        predict_ttft_ms(&self.costs, link, prompt_len, chunk, true)
    }
}

impl ChunkPolicy for ChunkTable {
    fn chunk(&self, prompt_len: usize, link: &LinkEstimate) -> Option<usize> {
        self.lookup(prompt_len, link.mbps())
    }
}

impl From<&LinkEstimate> for LinkParams {
    fn from(e: &LinkEstimate) -> Self {
        LinkParams { rtt_ms: e.rtt.as_secs_f64() * 1e3, up_mbps: e.up_mbps, down_mbps: e.down_mbps }
    }
}
