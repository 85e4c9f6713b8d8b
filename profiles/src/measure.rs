//! The measurements behind a profile: device stage times per chunk (input submodel with encoding,
//! decoding with output submodel, adapter, LM head), the middle's time per chunk as the cloud server
//! reports it, and the link from probes.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use hat_runtime::protocol::{ClientMsg, HiddenFrame};
use hat_runtime::{CloudOptions, DeviceRuntime, Middle, RemoteMiddle, WireFormat};

use crate::model::{ChunkTable, LinkParams, StageCosts, StageCurve};
use crate::{Profile, Result, PROFILE_VERSION};

#[derive(Debug, Clone)]
pub struct ProfileOptions {
    /// Chunk sizes to time.
    pub sizes: Vec<usize>,
    /// Context offsets to time them at.
    pub offsets: Vec<usize>,
    /// Timed repetitions per point (the median is kept), after one warm-up.
    pub reps: usize,
    pub wire: WireFormat,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        Self { sizes: vec![8, 16, 32, 64, 128, 256, 512, 1024], offsets: vec![0, 1024], reps: 3, wire: WireFormat::default() }
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Token ids for timing, spread over the vocabulary: the values do not change the cost.
fn ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 1000) % vocab) as u32).collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median milliseconds of `run` over `reps` runs after a warm-up.
fn time(reps: usize, mut run: impl FnMut() -> Result<Duration>) -> Result<f64> {
    run()?;
    let mut xs = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        xs.push(ms(run()?));
    }
    Ok(median(xs))
}

/// One stage timed over sizes and offsets. For each offset `o > 0`, `fill(state, o)` first puts
/// positions `0..o` in the stage's cache; `stage(state, size, o)` then returns one run's duration
/// (each run rolls the cache back to `o` itself).
fn curve<S>(
    opts: &ProfileOptions,
    offsets: &[usize],
    state: &mut S,
    mut fill: impl FnMut(&mut S, usize) -> Result<()>,
    mut stage: impl FnMut(&mut S, usize, usize) -> Result<Duration>,
) -> Result<StageCurve> {
    let mut rows = Vec::new();
    for &o in offsets {
        if o > 0 {
            fill(state, o)?;
        }
        let mut row = Vec::new();
        for &s in &opts.sizes {
            row.push(time(opts.reps, || stage(state, s, o))?);
        }
        rows.push(row);
    }
    Ok(StageCurve { sizes: opts.sizes.clone(), offsets: offsets.to_vec(), ms: rows })
}

/// Wire bytes of a hidden-state message of `rows` rows (length prefix included).
fn message_bytes(rows: usize, hidden: usize, wire: WireFormat) -> Result<usize> {
    let t = Tensor::zeros((1, rows, hidden), candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let f = HiddenFrame::encode(&t, 0, wire)?;
    Ok(4 + ClientMsg::Forward(f).encode().len())
}

/// Measures `device` against the cloud at `cloud` and builds the profile. `progress` gets one line
/// per stage.
pub fn measure(
    device: &DeviceRuntime,
    cloud: CloudOptions,
    cloud_label: &str,
    opts: &ProfileOptions,
    mut progress: impl FnMut(&str),
) -> Result<Profile> {
    let pkg = &device.package;
    let cfg = &pkg.config;
    let dev = pkg.input.device().clone();
    let (input, output, adapter) = (&pkg.input, &pkg.output, device.adapter());
    let max_size = opts.sizes.iter().copied().max().unwrap_or(1);
    let mut middle = RemoteMiddle::connect(cloud.clone(), &pkg.manifest.fingerprint, cfg.hidden_size, cfg.max_position_embeddings, &dev)?;
    let context = middle.max_context().min(cfg.max_position_embeddings);
    let offsets: Vec<usize> = opts.offsets.iter().copied().filter(|&o| o + max_size <= context).collect();
    if offsets.is_empty() || opts.sizes.is_empty() {
        return Err(hat_runtime::RuntimeError::BadInput(format!("no profile point fits the context of {context} positions")).into());
    }

    progress("link: probing round-trip time and throughput");
    let est = middle.measure_link()?;
    let link = LinkParams::from(&est);

    // Input states for every position any measurement uses.
    let max_pos = offsets.iter().max().copied().unwrap_or(0) + max_size;
    let all_ids = ids(max_pos, cfg.vocab_size);
    let embed = |n: usize, from: usize| -> Result<Tensor> { Ok(input.embed(&Tensor::new(&all_ids[from..from + n], &dev)?.unsqueeze(0)?)?) };
    let states = {
        let mut cache = input.new_cache();
        input.forward_layers(&embed(max_pos, 0)?, 0, &mut cache)?
    };
    let rows = |from: usize, n: usize| -> Result<Tensor> { Ok(states.narrow(1, from, n)?) };

    progress("device: input submodel");
    let device_input = curve(
        opts,
        &offsets,
        &mut input.new_cache(),
        |c, o| Ok(input.forward_layers(&embed(o, 0)?, 0, c).map(|_| ())?),
        |c, s, o| {
            let t0 = Instant::now();
            let h = input.forward_layers(&embed(s, o)?, o, c)?;
            HiddenFrame::encode(&h, o, opts.wire)?;
            Ok(t0.elapsed())
        },
    )?;

    progress("device: output submodel");
    let device_output = curve(
        opts,
        &offsets,
        &mut output.new_cache(),
        |c, o| Ok(output.forward_layers(&rows(0, o)?, 0, c).map(|_| ())?),
        |c, s, o| {
            let frame = HiddenFrame::encode(&rows(o, s)?, o, opts.wire)?;
            let t0 = Instant::now();
            let h = frame.decode(cfg.hidden_size, &dev).map_err(|e| hat_runtime::RuntimeError::BadInput(e.to_string()))?;
            output.forward_layers(&h, o, c)?;
            Ok(t0.elapsed())
        },
    )?;

    progress("device: draft adapter");
    let device_adapter = curve(
        opts,
        &offsets,
        &mut adapter.new_cache(),
        |c, o| Ok(adapter.forward(&rows(0, o)?, 0, c).map(|_| ())?),
        |c, s, o| {
            let x = rows(o, s)?;
            let t0 = Instant::now();
            adapter.forward(&x, o, c)?;
            Ok(t0.elapsed())
        },
    )?;

    let last = rows(0, 1)?;
    let head_ms = time(opts.reps, || {
        let t0 = Instant::now();
        output.head(&last)?;
        Ok(t0.elapsed())
    })?;

    progress(&format!("cloud ({cloud_label}): middle submodel"));
    let cloud_middle = curve(
        opts,
        &offsets,
        &mut middle,
        |m, o| Ok(m.forward(0, &rows(0, o)?).map(|_| ())?),
        |m, s, o| {
            m.forward(o, &rows(o, s)?)?;
            Ok(m.last_compute())
        },
    )?;

    let one = message_bytes(1, cfg.hidden_size, opts.wire)?;
    let two = message_bytes(2, cfg.hidden_size, opts.wire)?;
    let costs = StageCosts {
        device_input,
        device_output,
        device_adapter,
        head_ms,
        cloud_middle,
        row_bytes: two - one,
        message_bytes: one - (two - one),
    };
    let table = ChunkTable::build(&costs, link.rtt_ms, context, true);
    Ok(Profile {
        version: PROFILE_VERSION,
        fingerprint: pkg.manifest.fingerprint.clone(),
        cloud: cloud_label.to_string(),
        wire: format!("{}{}", opts.wire.dtype.name(), if opts.wire.zstd { "+zstd" } else { "" }),
        link,
        costs,
        table,
    })
}
