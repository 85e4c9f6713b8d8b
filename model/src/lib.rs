//! Model code shared by every stage of hat: the splitter writes packages with it, the runtime runs them.
//! One Llama-family implementation lives here, so the unsplit model and its three submodels are the
//! same code and differ only in which layers they hold.

pub mod attention;
pub mod config;
pub mod cpu;
pub mod error;
pub mod kv_cache;
pub mod layer;
pub mod manifest;
pub mod names;
pub mod q8;
pub mod rope;
pub mod submodel;
pub mod weights;

pub use config::{Activation, Config, Family, HfConfig};
pub use error::{ModelError, Result};
pub use kv_cache::{KvCache, LayerCache};
pub use manifest::{Manifest, Role, ShardInfo, SplitSpec};
pub use rope::{Rope, Ropes};
pub use submodel::{Submodel, SubmodelKind};
pub use weights::{Proj, Quant, Weights};
