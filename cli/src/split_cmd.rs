use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use hat_model::Quant;
use hat_splitter::{load_model, split_model, DType, ModelSource, SplitOptions};

/// Cut a model into a device package and a cloud package.
///
/// Writes OUT/device (hat.json, tokenizer.json, input and output shards, adapter-init.safetensors)
/// and OUT/cloud (hat.json, the middle shard). The cloud package holds no embedding, no LM head and
/// no tokenizer. Shards are GGUF (input.gguf, ...) when quantized, safetensors when f32 or f16.
#[derive(Args, Debug)]
pub struct SplitArgs {
    /// A Hugging Face model id (org/name; honours HF_HOME and HF_HUB_OFFLINE), a directory with
    /// config.json + *.safetensors + tokenizer.json, or a .gguf file.
    #[arg(long)]
    model: String,
    /// Decoder layers kept on the device before the cloud part (with the embedding).
    #[arg(long)]
    input_layers: usize,
    /// Decoder layers kept on the device after the cloud part (with the final norm and LM head).
    #[arg(long)]
    output_layers: usize,
    /// Storage dtype of dense tensors: norms and biases, and every tensor of an f32 side.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// How the device's matrices (input and output submodels, LM head) are stored and run:
    /// q8_0 | q4_0 | q4_k (candle's quantized matmuls), f16 | f32 (dense), or keep (a GGUF source's
    /// own types). q8_0 is the default: on SmolLM2-135M it keeps greedy output closest to f32 among
    /// the fast types (see README, "Quantized packages").
    #[arg(long, default_value = "q8_0", value_parser = Quant::parse)]
    device_quant: Quant,
    /// How the cloud's matrices (middle submodel) are stored and run; same choices.
    #[arg(long, default_value = "q8_0", value_parser = Quant::parse)]
    cloud_quant: Quant,
    /// Output directory; must be new, empty, or hold a split of this same model.
    #[arg(long)]
    out: PathBuf,
    /// Middle layer copied into the device package as the initial draft adapter (used by
    /// `hat generate --mode hat` until `hat train-adapter` writes a trained one). Default: the last
    /// middle layer, whose output is what the output submodel reads.
    #[arg(long)]
    adapter_init_layer: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

pub fn run(args: SplitArgs, quiet: bool) -> Result<()> {
    let source = ModelSource::parse(&args.model)?;
    let model = load_model(&source, !quiet).with_context(|| format!("cannot load model `{}`", args.model))?;
    let dtype = match args.dtype {
        DTypeArg::F32 => DType::F32,
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
    };
    let opts = SplitOptions {
        input_layers: args.input_layers,
        output_layers: args.output_layers,
        dtype,
        out: args.out.clone(),
        progress: !quiet,
        adapter_init_layer: args.adapter_init_layer,
        device_quant: args.device_quant,
        cloud_quant: args.cloud_quant,
    };
    let report = split_model(&model, &opts)?;
    let s = report.split;
    // A draft head the project trained for exactly this model and split ships in the binary.
    let head = hat_runtime::draft_head::install_shipped_head(&report.device_dir)?;
    if args.json {
        let out = serde_json::json!({
            "fingerprint": report.fingerprint,
            "device": report.device_dir,
            "cloud": report.cloud_dir,
            "layers": {"input": [0, s.input_layers], "middle": [s.middle_range().start, s.middle_range().end],
                        "output": [s.output_range().start, s.output_range().end]},
            "shards": report.shards.iter().map(|(f, b)| serde_json::json!({"file": f, "bytes": b})).collect::<Vec<_>>(),
            "seconds": report.elapsed.as_secs_f64(),
            "device_quant": args.device_quant.name(),
            "cloud_quant": args.cloud_quant.name(),
            "draft_head": head,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "device package: {} (layers 0..{} and {}..{})",
            report.device_dir.display(),
            s.input_layers,
            s.output_range().start,
            s.num_layers
        );
        println!("cloud package:  {} (layers {}..{})", report.cloud_dir.display(), s.middle_range().start, s.middle_range().end);
        for (f, b) in &report.shards {
            println!("  {f}: {:.1} MB", *b as f64 / 1e6);
        }
        println!("storage: device {}, cloud {}", args.device_quant.name(), args.cloud_quant.name());
        println!("fingerprint: {}", report.fingerprint);
        println!("split time (writing): {:.2} s", report.elapsed.as_secs_f64());
        match head {
            Some(name) => println!("draft head: the shipped head for {name} ({})", hat_runtime::draft_head::DRAFT_HEAD_FILE),
            None => println!(
                "draft head: none ships for this model and split; --mode hat drafts with the paper's untrained adapter \
                 until `hat train-adapter --draft-head feature` trains one"
            ),
        }
    }
    if !quiet {
        eprintln!("{}", crate::audit_cmd::privacy_line(&args.out, s.input_layers));
    }
    Ok(())
}
