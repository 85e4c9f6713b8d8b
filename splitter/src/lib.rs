//! `hat split`: reads a Llama-family model from the Hugging Face hub, a safetensors directory or a
//! GGUF file, and cuts it into a device package (input + output submodels, tokenizer) and a cloud
//! package (middle submodel only).

pub mod error;
pub mod gguf;
pub mod gguf_check;
pub mod gguf_tokenizer;
pub mod hf_dir;
pub mod hub;
pub mod package;
pub mod source;

pub use error::{Result, SplitError};
pub use package::{split_model, SplitOptions, SplitReport};
pub use source::{load_model, LoadedModel, ModelSource};

pub use candle_core::DType;
