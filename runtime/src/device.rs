//! The device side as a library: open the device package once, connect sessions to a cloud, and
//! stream the tokens of a reply. `hat generate` is a thin user of this API; so is
//! `examples/device_chat.rs`.
//!
//! ```no_run
//! use hat_runtime::device::{DeviceRuntime, Mode};
//! use hat_runtime::remote::CloudOptions;
//! use hat_runtime::GenerateOptions;
//! # fn main() -> hat_runtime::Result<()> {
//! let device = DeviceRuntime::open("artifacts/device".as_ref())?;
//! let mut session = device.connect(CloudOptions::new("127.0.0.1:7070"))?;
//! let prompt = device.prompt_ids("What is the capital of France?", true)?;
//! let opts = GenerateOptions { max_tokens: 64, eos: device.eos_ids(), ..Default::default() };
//! let reply = session.generate(&prompt, &opts, Mode::Hat { draft_len: 4 }, |t| print!("{t} "))?;
//! println!("\n{} tokens, {:.2} per round trip", reply.tokens.len(), reply.accept_len());
//! # Ok(()) }
//! ```

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;

use crate::draft::{Adapter, Drafter};
use crate::draft_head::{FeatureHead, Overlap, DRAFT_HEAD_FILE};
use crate::error::{Result, RuntimeError};
use crate::generate::{generate, GenerateOptions, Generation, SplitPipeline};
use crate::link::LinkEstimate;
use crate::package::{default_device, DevicePackage};
use crate::remote::{CloudOptions, RemoteMiddle};
use crate::speculative::generate_speculative;

/// How the device uses the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// U-shaped inference: one round trip per generated token.
    UShape,
    /// HAT: draft `draft_len` tokens on the device, verify them in one round trip.
    Hat { draft_len: usize },
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::UShape => "ushape",
            Mode::Hat { .. } => "hat",
        }
    }
}

/// Picks the prefill chunk size for a prompt on the link the device measured (`hat profile`'s table
/// implements it). `None` sends the prompt in one piece.
pub trait ChunkPolicy: std::fmt::Debug + Send + Sync {
    fn chunk(&self, prompt_len: usize, link: &LinkEstimate) -> Option<usize>;
}

/// How HAT mode sends the prompt to the cloud.
#[derive(Debug, Clone, Default)]
pub enum Chunking {
    /// In one piece.
    #[default]
    Whole,
    /// In pipelined chunks of this many positions.
    Fixed(usize),
    /// Chunk size from a policy and the measured link (probed once per session, then kept current).
    Auto(Arc<dyn ChunkPolicy>),
}

/// Which draft model HAT mode uses (`--draft-head`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DraftChoice {
    /// The feature head when the package has one that fits, else the adapter.
    #[default]
    Auto,
    /// The paper's adapter.
    Hat,
    /// The feature head; without a usable one, no drafting (U-shaped steps), never wrong drafts.
    Feature,
}

/// The device package, adapter and draft head, loaded once and shared by sessions.
#[derive(Debug)]
pub struct DeviceRuntime {
    pub package: DevicePackage,
    adapter: Adapter,
    head: Option<FeatureHead>,
    /// Why the package's head file was refused.
    head_problem: Option<String>,
    choice: DraftChoice,
    threshold: Option<f32>,
    lookup: bool,
    overlap: Overlap,
    /// Leaves per round at most, and the estimate a leaf must reach.
    leaves: (usize, f32),
    device: Device,
}

impl DeviceRuntime {
    /// Opens `dir` (a `hat split` device package) with its trained or initial adapter and its draft
    /// head, if it has one made for this split.
    pub fn open(dir: &Path) -> Result<Self> {
        let device = default_device();
        let package = DevicePackage::open(dir, &device)?;
        let adapter = Adapter::load(&package, &device)?;
        let (head, head_problem) = match FeatureHead::load_from_package(&package, &device) {
            Ok(h) => (h, None),
            Err(e) => (None, Some(e.to_string())),
        };
        Ok(Self {
            package,
            adapter,
            head,
            head_problem,
            choice: DraftChoice::Auto,
            threshold: None,
            lookup: true,
            overlap: Overlap::default(),
            leaves: (crate::draft_head::DEFAULT_LEAVES, crate::draft_head::DEFAULT_LEAF_THRESHOLD),
            device,
        })
    }

    /// Up to `max` leaves per round (0: a plain chain), each verified when the head's estimate
    /// reaches `threshold` (see `Draft::leaves`).
    pub fn with_leaves(mut self, max: usize, threshold: f32) -> Self {
        self.leaves = (max, threshold);
        self
    }

    /// Chooses the draft model, and overrides the head's confidence threshold (0 drafts every time).
    pub fn with_draft_choice(mut self, choice: DraftChoice, threshold: Option<f32>) -> Self {
        self.choice = choice;
        self.threshold = threshold;
        self
    }

    /// Turns the draft head's prompt lookup on or off (on by default).
    pub fn with_lookup(mut self, on: bool) -> Self {
        self.lookup = on;
        self
    }

    /// Sets when the draft head drafts the next round while the cloud verifies this one.
    pub fn with_overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// Replaces the draft head (tests, evaluation).
    pub fn with_head(mut self, head: FeatureHead) -> Self {
        self.head = Some(head);
        self.head_problem = None;
        self
    }

    pub fn head(&self) -> Option<&FeatureHead> {
        self.head.as_ref()
    }

    /// A fresh drafter for a session, as [`DraftChoice`] says.
    pub fn new_drafter(&self) -> Drafter {
        match (self.choice, &self.head) {
            (DraftChoice::Hat, _) => Drafter::new(self.adapter.clone()),
            (_, Some(h)) => Drafter::feature(h.clone(), self.threshold)
                .with_lookup(self.lookup)
                .with_overlap(self.overlap)
                .with_leaves(self.leaves.0, self.leaves.1),
            (DraftChoice::Auto, None) if self.head_problem.is_none() => Drafter::new(self.adapter.clone()),
            _ => Drafter::Off,
        }
    }

    /// A line for the user when the draft model is not the one they would expect.
    pub fn draft_note(&self) -> Option<String> {
        match (self.choice, &self.head, &self.head_problem) {
            (DraftChoice::Hat, _, _) | (_, Some(_), _) => None,
            (_, None, Some(why)) => Some(format!("draft head refused, drafting off (U-shaped steps): {why}")),
            (DraftChoice::Feature, None, None) => Some(format!(
                "{} has no {DRAFT_HEAD_FILE}: drafting off (U-shaped steps); train one with `hat train-adapter --draft-head feature`",
                self.package.dir.display()
            )),
            (DraftChoice::Auto, None, None) => Some(format!(
                "{} has no trained draft head for this model and split: drafting with the paper's adapter ({}); \
                 `hat train-adapter --draft-head feature` trains a head",
                self.package.dir.display(),
                self.adapter.origin
            )),
        }
    }

    /// Replaces the adapter (tests use the middle submodel itself as an oracle).
    pub fn with_adapter(mut self, adapter: Adapter) -> Self {
        self.adapter = adapter;
        self
    }

    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        crate::chat::prompt_ids(&self.package, text, chat)
    }

    /// Whether the package has a chat template (a base model such as Gemma 3 270M has none, and its
    /// benchmark prompts go in as plain text).
    pub fn has_chat_template(&self) -> bool {
        self.package.manifest.tokenizer.as_ref().is_some_and(|t| t.chat_template.is_some())
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.package.eos_ids()
    }

    /// Connects to `hat serve cloud` and opens a session (retrying per `opts`).
    pub fn connect(&self, opts: CloudOptions) -> Result<DeviceSession> {
        self.connect_with(opts, self.new_drafter())
    }

    /// [`DeviceRuntime::connect`] with a given draft model (benchmarks compare them).
    pub fn connect_with(&self, opts: CloudOptions, drafter: Drafter) -> Result<DeviceSession> {
        let cfg = &self.package.config;
        let middle =
            RemoteMiddle::connect(opts, &self.package.manifest.fingerprint, cfg.hidden_size, cfg.max_position_embeddings, &self.device)?;
        Ok(DeviceSession {
            pipeline: SplitPipeline::with_middle(self.package.input.clone(), self.package.output.clone(), middle),
            drafter,
            chunking: Chunking::Whole,
            last_chunk: None,
        })
    }
}

/// One connection to the cloud; replies are generated one after another on it.
#[derive(Debug)]
pub struct DeviceSession {
    pipeline: SplitPipeline<RemoteMiddle>,
    drafter: Drafter,
    chunking: Chunking,
    last_chunk: Option<usize>,
}

impl DeviceSession {
    /// The draft model this session uses.
    pub fn drafter(&self) -> &Drafter {
        &self.drafter
    }

    /// How HAT mode sends prompts from now on (U-shaped mode always sends them whole).
    pub fn set_chunking(&mut self, chunking: Chunking) {
        self.chunking = chunking;
    }

    /// The chunk size the last HAT generation used (`None`: the prompt went in one piece).
    pub fn last_chunk(&self) -> Option<usize> {
        self.last_chunk
    }

    /// The link as this session measured it, probing now if it has not yet.
    pub fn link(&mut self) -> Result<LinkEstimate> {
        match self.pipeline.middle().link_estimate() {
            Some(est) => Ok(est),
            None => self.pipeline.middle().measure_link(),
        }
    }

    /// The link as last measured, without probing.
    pub fn link_estimate(&mut self) -> Option<LinkEstimate> {
        self.pipeline.middle().link_estimate()
    }

    /// Reuses a link estimate another session measured (a server opens one session per request).
    pub fn set_link_estimate(&mut self, est: LinkEstimate) {
        self.pipeline.middle().set_link_estimate(est);
    }

    fn chunk_for(&mut self, prompt_len: usize) -> Result<Option<usize>> {
        let chunk = match self.chunking.clone() {
            Chunking::Whole => None,
            Chunking::Fixed(0) => return Err(RuntimeError::BadInput("the chunk size must be at least 1".into())),
            Chunking::Fixed(n) => Some(n),
            Chunking::Auto(policy) => {
                let link = self.link()?;
                policy.chunk(prompt_len, &link)
            }
        };
        Ok(chunk.filter(|&c| c < prompt_len))
    }

    /// Generates a reply to `prompt`, calling `on_token` as each token is final. In HAT mode the
    /// session's [`Chunking`] overrides `opts.prefill_chunk`.
    pub fn generate(&mut self, prompt: &[u32], opts: &GenerateOptions, mode: Mode, on_token: impl FnMut(u32)) -> Result<Generation> {
        match mode {
            Mode::UShape => generate(&mut self.pipeline, prompt, opts, on_token),
            Mode::Hat { draft_len: 0 } => Err(RuntimeError::BadInput("--draft-len must be at least 1".into())),
            Mode::Hat { draft_len } => {
                let chunk = self.chunk_for(prompt.len())?;
                self.last_chunk = chunk;
                let opts = GenerateOptions { prefill_chunk: chunk, ..opts.clone() };
                generate_speculative(&mut self.pipeline, &mut self.drafter, prompt, &opts, draft_len, on_token)
            }
        }
    }
}
