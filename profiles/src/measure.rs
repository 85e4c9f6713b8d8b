//! The measurements behind a profile: device stage times per chunk (input submodel with encoding,
//! decoding with output submodel, adapter, LM head), the middle's time per chunk as the cloud server
//! reports it, and the link from probes.

use std::time::{Duration, Instant};

use candle_core::Tensor;
use hat_model::KvCache;
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

/// One stage timed over sizes and offsets; `stage(size, offset)` returns one run's duration.
fn curve(opts: &ProfileOptions, offsets: &[usize], mut stage: impl FnMut(usize, usize) -> Result<Duration>) -> Result<StageCurve> {
    let mut rows = Vec::new();
    for &o in offsets {
        let mut row = Vec::new();
        for &s in &opts.sizes {
            row.push(time(opts.reps, || stage(s, o))?);
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
    let fill = |cache: &mut KvCache, o: usize, run: &dyn Fn(&Tensor, &mut KvCache) -> Result<()>| -> Result<()> {
        cache.truncate(0);
        if o > 0 {
            run(&rows(0, o)?, cache)?;
        }
        Ok(())
    };

    progress("device: input submodel");
    let mut cache = input.new_cache();
    let mut filled = usize::MAX;
    let device_input = curve(opts, &offsets, |s, o| {
        if filled != o {
            fill(&mut cache, o, &|x, c| Ok(input.forward_layers(&embed(x.dim(1)?, 0)?, 0, c).map(|_| ())?))?;
            filled = o;
        }
        let t0 = Instant::now();
        let h = input.forward_layers(&embed(s, o)?, o, &mut cache)?;
        HiddenFrame::encode(&h, o, opts.wire)?;
        Ok(t0.elapsed())
    })?;

    progress("device: output submodel");
    let mut cache = output.new_cache();
    let mut filled = usize::MAX;
    let device_output = curve(opts, &offsets, |s, o| {
        if filled != o {
            fill(&mut cache, o, &|x, c| Ok(output.forward_layers(x, 0, c).map(|_| ())?))?;
            filled = o;
        }
        let frame = HiddenFrame::encode(&rows(o, s)?, o, opts.wire)?;
        let t0 = Instant::now();
        let h = frame.decode(cfg.hidden_size, &dev).map_err(|e| hat_runtime::RuntimeError::BadInput(e.to_string()))?;
        output.forward_layers(&h, o, &mut cache)?;
        Ok(t0.elapsed())
    })?;

    progress("device: draft adapter");
    let mut cache = adapter.new_cache();
    let mut filled = usize::MAX;
    let device_adapter = curve(opts, &offsets, |s, o| {
        if filled != o {
            fill(&mut cache, o, &|x, c| Ok(adapter.forward(x, 0, c).map(|_| ())?))?;
            filled = o;
        }
        let x = rows(o, s)?;
        let t0 = Instant::now();
        adapter.forward(&x, o, &mut cache)?;
        Ok(t0.elapsed())
    })?;

    let last = rows(0, 1)?;
    let head_ms = time(opts.reps, || {
        let t0 = Instant::now();
        output.head(&last)?;
        Ok(t0.elapsed())
    })?;

    progress(&format!("cloud ({cloud_label}): middle submodel"));
    let mut filled = usize::MAX;
    let cloud_middle = curve(opts, &offsets, |s, o| {
        if filled != o {
            if o > 0 {
                middle.forward(0, &rows(0, o)?)?;
            }
            filled = o;
        }
        middle.forward(o, &rows(o, s)?)?;
        Ok(middle.last_compute())
    })?;

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
