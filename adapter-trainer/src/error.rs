use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {reason}")]
    BadData { path: PathBuf, reason: String },
    #[error("{0}")]
    BadInput(String),
    /// `--device cuda` could not be honoured: a CPU build, or no usable GPU (`hat_runtime::gpu::open`).
    #[error("{0}")]
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
