//! The cloud's batched verification engine: one task collects the sessions' forward requests and
//! runs them through the middle submodel together.
//!
//! Design. Each device connection sends one forward at a time and waits for its reply, so the
//! engine sees at most one request per session. When a request arrives and the engine is idle, it
//! takes every request already queued, and while other sessions are open it waits up to `window`
//! for theirs (a lone session never waits). The batch is ragged, not padded: the sessions' new rows
//! are stacked into one (1, rows, hidden) tensor, every projection, norm and MLP runs once over all
//! rows, and rotary positions, the KV cache and attention stay per session
//! (`Submodel::forward_layers_batch`). Every one of those operations works row by row (quantized
//! matmuls quantize each input row alone; attention is `attend_rows`), so a session's output is
//! the one it would get alone, bit for bit, whatever the batch, at any cached length and after
//! any rollback (each session's cache is truncated to its message's start first). While a batch
//! runs, new requests queue and form the next one. On a GPU (or in a dtype other than f32) the
//! batch's sessions run one after another: a GPU's matmuls are not row by row, so stacking sessions
//! there would change their bits. The caches travel with the requests: the engine
//! owns a session's cache while its forward is in flight and hands it back with the reply.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use hat_model::{KvCache, Submodel};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::CloudMetrics;

/// How the engine forms batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchConfig {
    /// How long a request waits for other sessions' requests to join its batch.
    pub window: Duration,
    /// Rows in one batch at most (a long prompt chunk fills a batch alone).
    pub max_rows: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { window: Duration::from_millis(2), max_rows: 512 }
    }
}

/// One session's forward: new rows at `start`, and the session's cache.
struct Job {
    states: Tensor,
    start: usize,
    /// The round's row depths when it has leaves (see `Submodel::forward_layers_tree`).
    depths: Option<Vec<usize>>,
    cache: KvCache,
    reply: oneshot::Sender<Done>,
}

/// A forward's result, with the cache handed back.
pub(crate) struct Done {
    pub result: std::result::Result<Tensor, String>,
    pub cache: KvCache,
    /// Compute time of the whole batch this forward ran in.
    pub compute: Duration,
}

/// The handle sessions send their forwards through.
#[derive(Clone)]
pub(crate) struct Engine {
    jobs: mpsc::UnboundedSender<Job>,
}

impl Engine {
    /// Starts the engine's task on the current tokio runtime. `open_sessions` counts the sessions
    /// that could send a request: a batch waits for them only while there are more than it holds.
    pub fn start(middle: Arc<Submodel>, cfg: BatchConfig, open_sessions: Arc<AtomicUsize>, metrics: Arc<CloudMetrics>) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(middle, cfg, open_sessions, metrics, rx));
        Self { jobs }
    }

    /// Runs one session's forward in the next batch. `None` when the engine is gone (it panicked);
    /// the cache is then lost with it.
    pub async fn forward(&self, states: Tensor, start: usize, depths: Option<Vec<usize>>, cache: KvCache) -> Option<Done> {
        let (reply, done) = oneshot::channel();
        self.jobs.send(Job { states, start, depths, cache, reply }).ok()?;
        done.await.ok()
    }
}

fn rows(j: &Job) -> usize {
    j.states.dim(1).unwrap_or(0)
}

async fn run(
    middle: Arc<Submodel>,
    cfg: BatchConfig,
    open_sessions: Arc<AtomicUsize>,
    metrics: Arc<CloudMetrics>,
    mut rx: mpsc::UnboundedReceiver<Job>,
) {
    while let Some(first) = rx.recv().await {
        let mut total = rows(&first);
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + cfg.window;
        loop {
            while total < cfg.max_rows {
                match rx.try_recv() {
                    Ok(j) => {
                        total += rows(&j);
                        batch.push(j);
                    }
                    Err(_) => break,
                }
            }
            if total >= cfg.max_rows || batch.len() >= open_sessions.load(Ordering::Relaxed) {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(j)) => {
                    total += rows(&j);
                    batch.push(j);
                }
                _ => break,
            }
        }
        metrics.batch_sessions.observe(batch.len() as f64);
        metrics.batch_rows.observe(total as f64);
        let middle = middle.clone();
        // A panic inside loses this batch's caches: its sessions get an error and start over.
        let _ = tokio::task::spawn_blocking(move || forward_batch(&middle, batch)).await;
    }
}

/// Runs a batch and replies to each of its sessions.
fn forward_batch(middle: &Submodel, batch: Vec<Job>) {
    let t0 = Instant::now();
    let mut inputs = Vec::with_capacity(batch.len());
    let mut shapes = Vec::with_capacity(batch.len());
    let mut caches = Vec::with_capacity(batch.len());
    let mut replies = Vec::with_capacity(batch.len());
    for j in batch {
        inputs.push((j.states, j.start));
        shapes.push(j.depths);
        caches.push(j.cache);
        replies.push(j.reply);
    }
    let depths: Vec<Option<&[usize]>> = shapes.iter().map(Option::as_deref).collect();
    let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
    let results: Vec<std::result::Result<Tensor, String>> = match middle.forward_layers_batch(&inputs, &depths, &mut refs) {
        Ok(outs) => outs.into_iter().map(Ok).collect(),
        // A failure of the batch as a whole: each session alone, so one bad request cannot fail the others.
        Err(_) => inputs
            .iter()
            .zip(&depths)
            .zip(caches.iter_mut())
            .map(|(((h, start), t), c)| {
                let out = middle.forward_layers_tree(h, *start, *t, c).map_err(|e| e.to_string());
                if out.is_err() {
                    // A half-applied forward leaves layers at different lengths: start the cache over.
                    c.truncate(0);
                }
                out
            })
            .collect(),
    };
    let compute = t0.elapsed();
    for ((result, cache), reply) in results.into_iter().zip(caches).zip(replies) {
        let _ = reply.send(Done { result, cache, compute });
    }
}
