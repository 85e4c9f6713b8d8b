//! The middle submodel as the device sees it: something that takes input-submodel hidden states at a
//! start position and gives back middle-submodel hidden states. It runs in this process
//! ([`LocalMiddle`], for `--mode local` and tests) or in the cloud ([`crate::remote::RemoteMiddle`]).
//! Messages can be submitted before earlier ones are collected, so transfer overlaps device compute.

use std::collections::VecDeque;

use candle_core::Tensor;
use hat_model::{KvCache, Submodel};

use crate::error::{Result, RuntimeError};

/// Bytes that crossed the network, framing included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub reconnects: u32,
}

impl Traffic {
    pub fn since(&self, earlier: &Traffic) -> Traffic {
        Traffic {
            bytes_up: self.bytes_up - earlier.bytes_up,
            bytes_down: self.bytes_down - earlier.bytes_down,
            reconnects: self.reconnects - earlier.reconnects,
        }
    }
}

/// A round's shape beyond a plain chain (see `hat_model::attention::attend_tree`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    /// Row i sits at depth `depths[i]` and sees rows `0..depths[i]` and itself; `None`: a chain.
    pub depths: Option<Vec<usize>>,
    /// The round before left an accepted leaf at this cache slot: it takes position `start - 1`
    /// before this round runs.
    pub keep: Option<usize>,
}

impl Shape {
    pub fn is_chain(&self) -> bool {
        self.keep.is_none() && self.depths.as_deref().is_none_or(hat_model::attention::is_chain)
    }
}

pub trait Middle {
    /// Queues hidden states for positions `start..start + rows`. The middle first drops any cached
    /// state at or after `start`, which is how rejected drafts are rolled back.
    ///
    /// # Shapes
    /// states: (1, rows, hidden)
    fn submit(&mut self, start: usize, states: &Tensor) -> Result<()>;

    /// The middle's output for the oldest submitted message not yet collected.
    ///
    /// # Shapes
    /// -> (1, rows, hidden)
    fn collect(&mut self) -> Result<Tensor>;

    /// Positions one session may hold.
    fn max_context(&self) -> usize;

    /// Whether the oldest uncollected reply is back, so that [`Middle::collect`] would not wait.
    /// Never blocks. The device drafts the next round only while this is false.
    fn reply_ready(&mut self) -> bool {
        true
    }

    fn traffic(&self) -> Traffic {
        Traffic::default()
    }

    /// [`Middle::submit`] for a round shaped by `shape`. Only where [`Middle::runs_trees`] says so.
    ///
    /// # Shapes
    /// states: (1, rows, hidden)
    fn submit_tree(&mut self, start: usize, states: &Tensor, shape: &Shape) -> Result<()> {
        if shape.is_chain() {
            return self.submit(start, states);
        }
        Err(RuntimeError::BadInput("this middle does not verify rounds with leaves".into()))
    }

    /// Whether [`Middle::submit_tree`] takes rounds with leaves.
    fn runs_trees(&self) -> bool {
        false
    }

    /// One round trip.
    fn forward(&mut self, start: usize, states: &Tensor) -> Result<Tensor> {
        self.submit(start, states)?;
        self.collect()
    }
}

/// The middle submodel in this process.
#[derive(Debug, Clone)]
pub struct LocalMiddle {
    middle: Submodel,
    cache: KvCache,
    done: VecDeque<Tensor>,
}

impl LocalMiddle {
    pub fn new(middle: Submodel) -> Self {
        Self { cache: middle.new_cache(), middle, done: VecDeque::new() }
    }
}

impl Middle for LocalMiddle {
    fn submit(&mut self, start: usize, states: &Tensor) -> Result<()> {
        let out = self.middle.forward_layers(states, start, &mut self.cache)?;
        self.done.push_back(out);
        Ok(())
    }

    fn collect(&mut self) -> Result<Tensor> {
        self.done.pop_front().ok_or_else(|| RuntimeError::BadInput("collect() without a submitted message".into()))
    }

    fn max_context(&self) -> usize {
        self.middle.config().max_position_embeddings
    }

    fn submit_tree(&mut self, start: usize, states: &Tensor, shape: &Shape) -> Result<()> {
        if let Some(slot) = shape.keep {
            self.cache.promote(slot, start.checked_sub(1).ok_or_else(|| RuntimeError::BadInput("a kept leaf at position 0".into()))?)?;
        }
        let out = self.middle.forward_layers_tree(states, start, shape.depths.as_deref(), &mut self.cache)?;
        self.done.push_back(out);
        Ok(())
    }

    fn runs_trees(&self) -> bool {
        self.middle.runs_trees()
    }
}
