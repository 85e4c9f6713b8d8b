//! `hat audit` on the real default model (SmolLM2-135M-Instruct), split 2/2 in q8_0 (the default
//! storage, and a quarter of f32's disk): the states the device uploads after two layers give most
//! tokens back to a learned attack, while the naive nearest-embedding attack finds almost nothing
//! (massive activations hide the token's direction). A weakened audit (a broken fit, scoring against
//! the wrong rows) fails here.

use hat_adapter_trainer::audit::{cached_audit, model_key, run, AuditOptions};
use hat_model::Quant;
use hat_splitter::{load_model, split_model, ModelSource, SplitOptions};
use hat_tests::default_model_gguf;

#[test]
fn learned_attacks_recover_most_tokens_at_two_layers_and_nearest_embedding_does_not() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = load_model(&ModelSource::Gguf(default_model_gguf()), false).expect("load default model");
    let out = dir.path().join("artifacts");
    let q8 = |input: usize, out: std::path::PathBuf| SplitOptions {
        device_quant: Quant::Q8_0,
        cloud_quant: Quant::Q8_0,
        ..SplitOptions::new(input, 2, out)
    };
    split_model(&model, &q8(2, out.clone())).expect("split 2/2");

    let cache = dir.path().join("cache");
    let mut opts = AuditOptions::new(&out);
    opts.depths = Some(vec![2]);
    // Half the default fit text keeps the test short; the best attack still recovers about 99%.
    opts.fit_tokens = 4000;
    opts.progress = false;
    opts.cache_dir = Some(cache.clone());
    let started = std::time::Instant::now();
    let report = run(&opts).expect("audit");
    eprintln!("audit of depth 2: {:.1} s", started.elapsed().as_secs_f64());
    let d = report.depth(2).expect("a row for depth 2");
    eprintln!("{}", serde_json::to_string(d).expect("json"));

    assert!(report.fit.tokens >= 4000 && report.heldout.tokens >= 400, "fit {} / held-out {}", report.fit.tokens, report.heldout.tokens);
    assert!(report.embedding_nearest.top1 > 0.95, "sanity: embeddings are their own nearest rows ({})", report.embedding_nearest.top1);
    assert!(d.best.top1 > 0.8, "the best attack recovers only {:.3} of held-out tokens at depth 2", d.best.top1);
    for (name, learned) in [("linear", d.linear.top1), ("mlp", d.mlp.top1)] {
        assert!(
            d.nearest.top1 < 0.1 && learned > d.nearest.top1 + 0.6,
            "{name} {learned:.3} is not far above nearest {:.3}",
            d.nearest.top1
        );
    }
    assert!(d.best.top10 >= d.best.top1 && d.device_ms_per_token > 0.0);

    // The audit is found for the same weights cut elsewhere: the key ignores the split.
    assert!(out.join("audit.json").is_file());
    let other = dir.path().join("other");
    split_model(&model, &q8(3, other.clone())).expect("split 3/2");
    assert_eq!(model_key(&other).expect("key"), report.model_key);
    let found = cached_audit(&other, &cache).expect("lookup").expect("the 2/2 audit, found from the 3/2 split");
    let row = found.depth(2).expect("its depth-2 row");
    assert!((row.best.top1 - d.best.top1).abs() < 1e-9 && row.best_attack == d.best_attack);
}
