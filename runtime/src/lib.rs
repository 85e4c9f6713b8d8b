//! The hat runtime: opens split packages, checks they belong together, serves the middle submodel
//! (`server`), and runs the device side against it (`device`), U-shaped or with speculative decoding.

pub mod baseline;
pub mod chat;
pub mod device;
pub mod draft;
pub mod draft_head;
pub mod engine;
pub mod error;
pub mod feature_drafter;
pub mod generate;
pub mod gpu;
pub mod link;
pub mod metrics;
pub mod middle;
pub mod package;
pub mod protocol;
pub mod remote;
pub mod sampling;
pub mod server;
pub mod speculative;
pub mod tls;
pub mod verify;

pub use device::{ChunkPolicy, Chunking, DeviceRuntime, DeviceSession, DraftChoice, Mode};
pub use draft::{Adapter, AdapterOrigin, Drafter};
pub use draft_head::{FeatureDrafter, FeatureHead, HeadMeta, Overlap};
pub use engine::BatchConfig;
pub use error::{Result, RuntimeError};
pub use generate::{generate, GenerateOptions, Generation, LocalPipeline, RoundTime, SplitPipeline, TokenModel, UnsplitModel};
pub use gpu::ComputeDevice;
pub use link::{LinkEmulation, LinkEstimate};
pub use middle::{LocalMiddle, Middle, Traffic};
pub use package::{CloudPackage, DevicePackage};
pub use protocol::{WireDType, WireFormat};
pub use remote::{CloudOptions, RemoteMiddle};
pub use sampling::{Sampler, SamplingOptions};
pub use server::{CloudServer, ServerConfig};
pub use speculative::generate_speculative;
pub use tls::{ClientTls, ServerTls};
