use std::path::PathBuf;

use hat_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("{0}: no such file or directory")]
    MissingPath(PathBuf),
    #[error("{path} is not a valid {kind} file: {reason}")]
    Corrupt { path: PathBuf, kind: &'static str, reason: String },
    #[error("{0}")]
    BadInput(String),
    #[error("invalid split: {0}")]
    BadSplit(String),
    #[error(
        "{out} already holds a different model (fingerprint {existing}, from `{existing_source}`); \
         pass a new --out or delete that directory"
    )]
    OutHoldsOtherModel { out: PathBuf, existing: String, existing_source: String },
    #[error("{0} exists and is not a hat package directory; pass a new or empty --out")]
    OutNotPackage(PathBuf),
    #[error(
        "model `{model}` is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: \
         unset HF_HUB_OFFLINE to download it, or run `hat split --model <dir>` with a local copy"
    )]
    HubOffline { model: String, cache: PathBuf },
    #[error("cannot fetch `{file}` of `{model}` from the Hugging Face hub: {reason}")]
    Hub { model: String, file: String, reason: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{context}: {source}")]
    Candle { context: String, source: candle_core::Error },
}

pub type Result<T> = std::result::Result<T, SplitError>;

impl SplitError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SplitError::Io { context: context.into(), source }
    }
    pub fn candle(context: impl Into<String>, source: candle_core::Error) -> Self {
        SplitError::Candle { context: context.into(), source }
    }
}
