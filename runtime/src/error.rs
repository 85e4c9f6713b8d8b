use std::path::PathBuf;

use hat_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0}: no such package directory (run `hat split` first)")]
    MissingPackage(PathBuf),
    #[error("{path}: expected a {expected} package, found a {found} package")]
    WrongRole { path: PathBuf, expected: &'static str, found: &'static str },
    #[error(
        "the device package ({device}) and the cloud package ({cloud}) come from different models or splits \
         (fingerprints {device_fp} and {cloud_fp}); use the two halves of one `hat split` output"
    )]
    FingerprintMismatch { device: PathBuf, cloud: PathBuf, device_fp: String, cloud_fp: String },
    #[error("{path} is damaged: {reason}; re-run `hat split`")]
    DamagedShard { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("the prompt has {prompt} tokens and {max_new} more were asked for, past the model's context of {context}")]
    ContextOverflow { prompt: usize, max_new: usize, context: usize },
    #[error("{0}")]
    BadInput(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("the cloud at {addr} refused ({code}): {message}")]
    CloudRefused { addr: String, code: String, message: String },
    #[error(
        "cannot reach the cloud at {addr} after {attempts} attempts (last error: {last}); check that \
         `hat serve cloud` runs there and that the address and port are right"
    )]
    CloudUnreachable { addr: String, attempts: u32, last: String },
    #[error("TLS with the cloud at {addr} failed {reason}")]
    Tls { addr: String, reason: String },
    #[error("the cloud at {addr} broke the protocol: {reason}")]
    CloudProtocol { addr: String, reason: String },
    #[error("{0}")]
    Adapter(String),
    /// `--device cuda` could not be honoured (see `gpu::open`).
    #[error("{0}")]
    Gpu(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, RuntimeError>;
