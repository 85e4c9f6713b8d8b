use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture `{0}`: hat supports the model types llama, mistral, qwen2, qwen3 and gemma3 (gemma3_text)")]
    UnsupportedArchitecture(String),
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("tensor `{name}` is missing from {source_desc}")]
    MissingTensor { name: String, source_desc: String },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch { name: String, actual: Vec<usize>, expected: Vec<usize> },
    #[error("invalid manifest {path}: {reason}")]
    InvalidManifest { path: PathBuf, reason: String },
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{context}: {source}")]
    Json { context: String, source: serde_json::Error },
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ModelError::Io { context: context.into(), source }
    }
}
