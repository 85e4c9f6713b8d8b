use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {reason}")]
    BadData { path: PathBuf, reason: String },
    #[error("{0}")]
    BadInput(String),
    #[error(
        "--device cuda needs a hat built with CUDA support: rebuild with `cargo build --release --features cuda` \
         (needs the CUDA toolkit), or use --device cpu"
    )]
    NoCuda,
    #[error("no CUDA device is available: {0}")]
    CudaUnavailable(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}")]
    Checkpoint(String),
    #[error("interrupted at step {step} of {total}; the checkpoint is saved, run again with --resume to continue")]
    Interrupted { step: usize, total: usize },
    #[error(transparent)]
    Runtime(#[from] hat_runtime::RuntimeError),
    #[error(transparent)]
    Model(#[from] hat_model::ModelError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

impl TrainError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TrainError::Io { context: context.into(), source }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
