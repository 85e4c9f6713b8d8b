//! The hat runtime: opens split packages, checks they belong together, and runs generation over the
//! input, middle and output submodels.

pub mod chat;
pub mod error;
pub mod generate;
pub mod package;
pub mod sampling;

pub use error::{Result, RuntimeError};
pub use generate::{generate, GenerateOptions, Generation, LocalPipeline, TokenModel, UnsplitModel};
pub use package::{CloudPackage, DevicePackage};
pub use sampling::{Sampler, SamplingOptions};
