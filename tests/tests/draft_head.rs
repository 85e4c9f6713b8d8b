//! The feature draft head. On a tiny random Llama: training's unrolled steps compute exactly what the
//! drafter's cache computes at inference (the off-by-one guard); sampling with the head still draws
//! the model's own distribution, with and without drafting while verifying; a head made for another split is refused and drafting falls back to
//! U-shaped steps. On the real default model with the shipped head: greedy `hat` over TCP equals
//! `--mode local` token for token at fixed and adaptive draft lengths; a head that never agrees
//! loses nothing; `hat split` installs the shipped head by fingerprint.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use hat_adapter_trainer::feature::{grow_layers, initial_tensors, TrainableHead};
use hat_adapter_trainer::teacher::TeacherSet;
use hat_adapter_trainer::{run_feature, DeviceChoice, TrainAdapterOptions, TrainError};
use hat_runtime::draft_head::{install_shipped_head, save_head, split_label, HeadMeta, DRAFT_HEAD_FILE, HEAD_FORMAT_VERSION, VOCAB_TENSOR};
use hat_runtime::protocol::{WireDType, WireFormat};
use hat_runtime::{
    generate, generate_speculative, CloudOptions, CloudPackage, CloudServer, DevicePackage, DeviceRuntime, DraftChoice, Drafter,
    FeatureHead, GenerateOptions, Generation, LocalMiddle, LocalPipeline, Middle, Mode, Overlap, Sampler, SamplingOptions, ServerConfig,
    SplitPipeline,
};
use hat_tests::{chi_square, default_artifacts, max_abs_diff, open_default, second_token_distribution, tiny_artifacts, TinyLlama, PROMPTS};

struct Tiny {
    _dir: tempfile::TempDir,
    device: DevicePackage,
    cloud: CloudPackage,
}

fn tiny(input: usize, output: usize) -> Tiny {
    let dir = tempfile::tempdir().expect("tmp");
    let out = tiny_artifacts(dir.path(), &TinyLlama::default(), input, output);
    let device = DevicePackage::open(&out.join("device"), &Device::Cpu).expect("device");
    let cloud = CloudPackage::open(&out.join("cloud"), &Device::Cpu).expect("cloud");
    Tiny { _dir: dir, device, cloud }
}

fn meta_for(device: &DevicePackage, threshold: f32) -> HeadMeta {
    HeadMeta {
        version: HEAD_FORMAT_VERSION,
        fingerprint: device.manifest.fingerprint.clone(),
        split: split_label(device),
        source: device.manifest.source.clone(),
        threshold,
        made_by: "test".into(),
    }
}

/// An untrained head over the whole tiny vocabulary.
fn untrained(t: &Tiny) -> TrainableHead {
    let vocab: Vec<u32> = (0..t.device.config.vocab_size as u32).collect();
    TrainableHead::new(initial_tensors(&t.device, 3).expect("init"), vocab, &t.device, &Device::Cpu).expect("head")
}

/// An untrained head of two decoder layers whose second is not silent: grown, then given the first
/// layer's output projections.
fn untrained_two_layers(t: &Tiny) -> TrainableHead {
    let mut tensors = initial_tensors(&t.device, 3).expect("init");
    grow_layers(&mut tensors, 2).expect("grow");
    for name in ["self_attn.o_proj.weight", "mlp.down_proj.weight"] {
        let w = tensors[&format!("model.layers.0.{name}")].clone();
        tensors.insert(format!("model.layers.1.{name}"), w);
    }
    let vocab: Vec<u32> = (0..t.device.config.vocab_size as u32).collect();
    TrainableHead::new(tensors, vocab, &t.device, &Device::Cpu).expect("head")
}

/// Step s of training's unrolled forward at entry r is the drafter's state after entering true
/// features up to position r - s and then s self-fed drafts: the same numbers, at every s and r, for
/// a head of one decoder layer and one of two.
#[test]
fn unrolled_training_steps_equal_the_drafters_cache() {
    let t = tiny(1, 1);
    for (layers, head) in [(1, untrained(&t)), (2, untrained_two_layers(&t))] {
        assert_eq!(head.layers(), layers);
        unrolled_steps_equal_the_drafters_cache(&t, &head);
    }
}

fn unrolled_steps_equal_the_drafters_cache(t: &Tiny, head: &TrainableHead) {
    let seq: Vec<u32> = vec![3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 38];
    let teacher =
        TeacherSet::compute(&t.device, &t.cloud, std::slice::from_ref(&seq), 4, true, &indicatif::ProgressBar::hidden()).expect("teacher");
    let top = teacher.top.as_ref().expect("top states");
    let n = seq.len();
    let m = n - 1;
    let steps = 3;
    let outs = head
        .unrolled(
            &teacher.x.narrow(0, 0, m).expect("tensor"),
            &teacher.y.narrow(0, 0, m).expect("tensor"),
            &top.narrow(0, 0, m).expect("tensor"),
            &seq[1..],
            steps,
        )
        .expect("unrolled");
    let runtime = head.to_runtime(&t.device, meta_for(&t.device, 0.0), "test".into()).expect("runtime head");
    let mut worst = 0f32;
    for start in 0..m - steps {
        let mut cache = runtime.new_cache();
        let rows = |x: &Tensor| x.narrow(0, 0, start + 1).expect("tensor").unsqueeze(0).expect("tensor");
        let g = runtime.fuse(&rows(&teacher.x), &rows(&teacher.y), &rows(top)).expect("fuse");
        let h = runtime.step(&g, &seq[1..start + 2], 0, &mut cache).expect("step");
        let mut h = h.narrow(1, start, 1).expect("tensor");
        worst = worst.max(max_abs_diff(&h, &outs[0].narrow(1, start, 1).expect("tensor")));
        for (s, out) in outs.iter().enumerate().skip(1) {
            let r = start + s;
            h = runtime.step(&h, &seq[r + 1..r + 2], r, &mut cache).expect("chain step");
            worst = worst.max(max_abs_diff(&h, &out.narrow(1, r, 1).expect("tensor")));
        }
    }
    eprintln!("{} layer(s): unrolled training vs drafter cache: max abs diff {worst:e}", head.layers());
    assert!(worst < 1e-4, "{} layer(s): training's unrolled steps and the drafter disagree by {worst}", head.layers());
}

/// A head grown by `--head-layers` drafts exactly as the head it grew from (its new layers add
/// nothing until trained), and a head cannot be shrunk.
#[test]
fn a_grown_head_drafts_as_the_head_it_grew_from() {
    let t = tiny(1, 1);
    let tensors = initial_tensors(&t.device, 3).expect("init");
    let mut grown = tensors.clone();
    grow_layers(&mut grown, 3).expect("grow");
    let vocab: Vec<u32> = (0..t.device.config.vocab_size as u32).collect();
    let runtime = |tensors| {
        let head = TrainableHead::new(tensors, vocab.clone(), &t.device, &Device::Cpu).expect("head");
        (head.layers(), head.to_runtime(&t.device, meta_for(&t.device, 0.0), "test".into()).expect("runtime head"))
    };
    let ((one, a), (three, b)) = (runtime(tensors), runtime(grown.clone()));
    assert_eq!((one, three), (1, 3));
    let seq: Vec<u32> = vec![3, 14, 15, 9, 26, 5, 35, 8];
    let teacher =
        TeacherSet::compute(&t.device, &t.cloud, std::slice::from_ref(&seq), 4, true, &indicatif::ProgressBar::hidden()).expect("teacher");
    let top = teacher.top.as_ref().expect("top states");
    let (mut ca, mut cb) = (a.new_cache(), b.new_cache());
    let rows = |x: &Tensor| x.narrow(0, 0, 4).expect("tensor").unsqueeze(0).expect("tensor");
    let g = a.fuse(&rows(&teacher.x), &rows(&teacher.y), &rows(top)).expect("fuse");
    let (mut ha, mut hb) = (a.step(&g, &seq[1..5], 0, &mut ca).expect("step"), b.step(&g, &seq[1..5], 0, &mut cb).expect("step"));
    for p in 4..seq.len() - 1 {
        ha = a.step(&ha.narrow(1, ha.dim(1).expect("dim") - 1, 1).expect("row"), &seq[p + 1..p + 2], p, &mut ca).expect("step");
        hb = b.step(&hb.narrow(1, hb.dim(1).expect("dim") - 1, 1).expect("row"), &seq[p + 1..p + 2], p, &mut cb).expect("step");
        assert_eq!(max_abs_diff(&ha, &hb), 0.0, "position {p}: the grown head's state differs");
        assert_eq!(a.logits(&ha).expect("logits"), b.logits(&hb).expect("logits"), "position {p}: the grown head's logits differ");
    }
    let err = grow_layers(&mut grown, 2).expect_err("a head cannot lose layers");
    assert!(err.to_string().contains("3 decoder layer"), "{err}");
}

/// With temperature, speculation with the head (q restricted to its vocabulary) keeps the model's own
/// distribution of the second generated token (chi-square over many seeds; see cloud_server.rs).
#[test]
fn sampling_with_the_head_draws_the_models_distribution() {
    let t = tiny(1, 1);
    // A head over half the vocabulary: some of the model's tokens can never be drafted.
    let vocab: Vec<u32> = (0..t.device.config.vocab_size as u32 / 2).collect();
    let trainable = TrainableHead::new(initial_tensors(&t.device, 5).expect("init"), vocab, &t.device, &Device::Cpu).expect("head");
    let head = trainable.to_runtime(&t.device, meta_for(&t.device, 0.0), "test".into()).expect("runtime head");
    let sampling = SamplingOptions { temperature: 0.7, top_p: None, seed: 0 };
    let prompt = [5u32, 17, 9, 30];
    let dist = Sampler::new(sampling);
    let vocab = t.device.config.vocab_size;
    let mut model = LocalPipeline::new(&t.device, &t.cloud).expect("pipeline");
    let (_, exact) = second_token_distribution(&mut model, &prompt, &dist);
    // Drafting while verifying draws the next round's drafts from the same sampler before the
    // verdict: the verdict's draws must still give the model's distribution.
    for overlap in [Overlap::Off, Overlap::Always] {
        let mut counts = vec![0usize; vocab];
        let (mut accepted, mut drafted, mut speculated) = (0, 0, 0);
        let mut drafter = Drafter::feature(head.clone(), Some(0.0)).with_overlap(overlap);
        for seed in 0..4000 {
            // Six tokens: the prompt's round, one round of three drafts, and a round after it
            // (where drafting while verifying speculates).
            let opts = GenerateOptions { max_tokens: 6, sampling: SamplingOptions { seed, ..sampling }, eos: vec![], ..Default::default() };
            let g = generate_speculative(&mut model, &mut drafter, &prompt, &opts, 3, |_| {}).expect("generate");
            counts[g.tokens[1] as usize] += 1;
            accepted += g.accepted;
            drafted += g.drafted;
            speculated += g.speculated;
        }
        assert!(accepted > 0 && accepted < drafted, "{overlap:?}: both branches ran: {accepted} of {drafted} drafts accepted");
        assert_eq!(speculated > 0, overlap == Overlap::Always, "{overlap:?}: {speculated} rounds speculated");
        let (stat, critical) = chi_square(&counts, &exact);
        eprintln!("{overlap:?}: chi-square {stat:.1} (critical ~{critical:.1}); {accepted}/{drafted} drafts accepted");
        assert!(stat < critical, "{overlap:?}: speculative samples with the head do not follow the model: {stat:.1} > {critical:.1}");
    }
}

/// Prompt lookup's drafts are deterministic (one-hot q). With a head that is never sure, every
/// first draft of a round comes from lookup (the prompt holds "17 x" for every token x, so any first
/// token continues a 2-gram seen before), and the rejection rule must still give the model's
/// distribution.
#[test]
fn sampling_with_prompt_lookup_draws_the_models_distribution() {
    let t = tiny(1, 1);
    let vocab: Vec<u32> = (0..t.device.config.vocab_size as u32).collect();
    let trainable = TrainableHead::new(initial_tensors(&t.device, 5).expect("init"), vocab, &t.device, &Device::Cpu).expect("head");
    let head = trainable.to_runtime(&t.device, meta_for(&t.device, 0.0), "test".into()).expect("runtime head");
    let sampling = SamplingOptions { temperature: 0.7, top_p: None, seed: 0 };
    let dist = Sampler::new(sampling);
    let mut model = LocalPipeline::new(&t.device, &t.cloud).expect("pipeline");
    let with_separator = |s: u32| -> Vec<u32> {
        let v = t.device.config.vocab_size as u32;
        (0..v).flat_map(|x| [s, x]).chain([s]).collect()
    };
    // Lookup always proposes the separator; make it a likely second token, so that both the accept
    // and the reject branch run often.
    let (_, first) = second_token_distribution(&mut model, &with_separator(17), &dist);
    let likely = (0..first.len()).max_by(|a, b| first[*a].total_cmp(&first[*b])).expect("a token") as u32;
    let prompt = with_separator(likely);
    let (_, exact) = second_token_distribution(&mut model, &prompt, &dist);
    let mut counts = vec![0usize; t.device.config.vocab_size];
    let (mut accepted, mut drafted) = (0, 0);
    // Threshold 2: the head is never sure, so only lookup drafts.
    let mut drafter = Drafter::feature(head, Some(2.0));
    for seed in 0..4000 {
        // Three tokens: the prompt's round gives the first, one round with one draft the rest.
        let opts = GenerateOptions { max_tokens: 3, sampling: SamplingOptions { seed, ..sampling }, eos: vec![], ..Default::default() };
        let g = generate_speculative(&mut model, &mut drafter, &prompt, &opts, 1, |_| {}).expect("generate");
        counts[g.tokens[1] as usize] += 1;
        accepted += g.accepted;
        drafted += g.drafted;
    }
    assert_eq!(drafted, 4000, "lookup drafted in the first round of every generation");
    assert!(accepted > 0 && accepted < drafted, "both branches ran: {accepted} of {drafted} drafts accepted");
    let (stat, critical) = chi_square(&counts, &exact);
    eprintln!("chi-square {stat:.1} (critical ~{critical:.1}); {accepted}/{drafted} lookup drafts accepted");
    assert!(stat < critical, "speculative samples with lookup drafts do not follow the model: {stat:.1} > {critical:.1}");
}

/// A head saved for one split is refused by a package of another, with both named; the device then
/// drafts nothing (U-shaped steps, same tokens) instead of drafting wrongly.
#[test]
fn a_head_for_another_split_is_refused_and_drafting_falls_back_to_none() {
    let a = tiny(1, 1);
    let b = tiny(2, 1);
    let trainable = untrained(&a);
    let path = b.device.dir.join(DRAFT_HEAD_FILE);
    save_head(&trainable.file_tensors(candle_core::DType::F16).expect("tensors"), &meta_for(&a.device, 0.0), &path).expect("save");
    let err = FeatureHead::load(&path, &b.device, &Device::Cpu).expect_err("refused");
    let msg = err.to_string();
    assert!(msg.contains("split 1/2/1") && msg.contains("split 2/1/1"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");

    let runtime = DeviceRuntime::open(&b.device.dir).expect("device runtime").with_draft_choice(DraftChoice::Feature, None);
    assert_eq!(runtime.new_drafter().kind(), "none");
    assert!(runtime.draft_note().expect("a note").contains("split 1/2/1"), "{:?}", runtime.draft_note());
    let prompt = [4u32, 8, 15, 16];
    let opts = GenerateOptions { max_tokens: 12, ..Default::default() };
    let mut pipeline = LocalPipeline::new(&b.device, &b.cloud).expect("pipeline");
    let want = generate(&mut pipeline, &prompt, &opts, |_| {}).expect("local").tokens;
    let mut pipeline = LocalPipeline::new(&b.device, &b.cloud).expect("pipeline");
    let g = generate_speculative(&mut pipeline, &mut runtime.new_drafter(), &prompt, &opts, 4, |_| {}).expect("hat");
    assert_eq!(g.tokens, want);
    assert_eq!((g.drafted, g.rounds), (0, want.len() - 1), "no drafts, one round per token");

    // A file that is not a head at all gets a one-line cause too.
    std::fs::write(&path, b"not safetensors").expect("write");
    let msg = FeatureHead::load(&path, &b.device, &Device::Cpu).expect_err("refused").to_string();
    assert!(msg.contains("not a hat draft head"), "{msg}");
}

/// A round's time is told in four parts that follow each other. With a middle that takes 20 ms to
/// answer, every round's wait holds those 20 ms; the parts of all rounds add up to less than the
/// whole call took; U-shaped generation, which has no rounds of drafts, reports none.
#[test]
fn round_time_holds_the_middles_time_in_the_wait() {
    struct Slow(LocalMiddle);
    impl Middle for Slow {
        fn submit(&mut self, start: usize, states: &Tensor) -> hat_runtime::Result<()> {
            self.0.submit(start, states)
        }
        fn collect(&mut self) -> hat_runtime::Result<Tensor> {
            std::thread::sleep(SLOW);
            self.0.collect()
        }
        fn max_context(&self) -> usize {
            self.0.max_context()
        }
    }
    const SLOW: Duration = Duration::from_millis(20);
    let t = tiny(1, 1);
    let head = untrained(&t).to_runtime(&t.device, meta_for(&t.device, 0.0), "test".into()).expect("runtime head");
    let slow = Slow(LocalMiddle::new(t.cloud.middle.clone()));
    let mut pipeline = SplitPipeline::with_middle(t.device.input.clone(), t.device.output.clone(), slow);
    let prompt = [4u32, 8, 15, 16];
    let opts = GenerateOptions { max_tokens: 10, ..Default::default() };
    let called = Instant::now();
    let g = generate_speculative(&mut pipeline, &mut Drafter::feature(head, Some(0.0)), &prompt, &opts, 3, |_| {}).expect("hat");
    let call = called.elapsed();
    let time = g.round_time.expect("a speculative generation tells its round time");
    assert!(g.rounds > 0 && g.drafted > 0, "{} rounds, {} drafts", g.rounds, g.drafted);
    assert!(time.wait >= SLOW * g.rounds as u32, "{time:?} over {} rounds", g.rounds);
    assert!(time.draft > Duration::ZERO && time.verify > Duration::ZERO && time.commit > Duration::ZERO, "{time:?}");
    let sum = time.draft + time.wait + time.verify + time.commit;
    // The prompt's round (one more 20 ms wait) is in the call and in none of the parts.
    assert!(sum + SLOW <= call, "parts {sum:?}, call {call:?}");

    let mut pipeline = LocalPipeline::new(&t.device, &t.cloud).expect("pipeline");
    assert_eq!(generate(&mut pipeline, &prompt, &opts, |_| {}).expect("local").round_time, None);
}

fn head_options(art: &std::path::Path, data: &std::path::Path, steps: usize) -> TrainAdapterOptions {
    let mut o = TrainAdapterOptions::new(art);
    o.data = vec![data.to_path_buf()];
    o.steps = Some(steps);
    o.device = DeviceChoice::Cpu;
    o.batch = 2;
    o.seq_len = 16;
    o.distill_tokens = 10;
    o.draft_vocab = 32;
    o.eval_prompts = 2;
    o.eval_tokens = 6;
    o.thresholds = vec![0.3];
    o.checkpoint_every = 2;
    o.progress = false;
    o.optimizer.lr = 3e-3;
    o.optimizer.warmup_steps = 2;
    o
}

/// `hat train-adapter --draft-head feature` on the tiny model: the data lines up (the alignment
/// check), the report says what it measured, and a run interrupted and resumed ends bit-identical
/// to an uninterrupted one, with no head file until training ends.
#[test]
fn head_training_reports_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let art_a = tiny_artifacts(&a, &TinyLlama::default(), 1, 1);
    let art_b = tiny_artifacts(&b, &TinyLlama::default(), 1, 1);
    let data = tmp.path().join("data.txt");
    let docs: Vec<String> =
        (0..6).map(|d| (0..12).map(|i| format!("w{}", 3 + (i * 7 + d * 13) % 60)).collect::<Vec<_>>().join(" ")).collect();
    std::fs::write(&data, docs.join("\n\n")).expect("data");

    let report = run_feature(&head_options(&art_a, &data, 8)).expect("uninterrupted");
    assert_eq!(report.steps, 8);
    assert!(report.alignment > 0.99, "teacher targets and tokens line up: {}", report.alignment);
    assert_eq!(report.before.teacher_forced_top1.len(), 3);
    assert_eq!(report.adaptive.len(), 1);
    assert!(report.after.fixed.rounds > 0);
    let head_a = art_a.join("device").join(DRAFT_HEAD_FILE);
    let runtime = DeviceRuntime::open(&art_a.join("device")).expect("runtime");
    assert_eq!(runtime.new_drafter().kind(), "feature", "the runtime picks the trained head up");

    let mut cut = head_options(&art_b, &data, 8);
    cut.stop_after = Some(3);
    match run_feature(&cut) {
        Err(TrainError::Interrupted { step: 3, total: 8 }) => {}
        other => panic!("expected an interruption at step 3, got {other:?}"),
    }
    let head_b = art_b.join("device").join(DRAFT_HEAD_FILE);
    assert!(!head_b.exists(), "no head until training finishes");
    let mut resume = head_options(&art_b, &data, 8);
    resume.resume = true;
    assert_eq!(run_feature(&resume).expect("resumed").steps, 8);
    let wa = candle_core::safetensors::load(&head_a, &Device::Cpu).expect("a");
    let wb = candle_core::safetensors::load(&head_b, &Device::Cpu).expect("b");
    assert_eq!(wa.len(), wb.len());
    for (name, t) in &wa {
        assert_eq!(
            max_abs_diff(
                &t.to_dtype(candle_core::DType::F32).expect("tensor"),
                &wb[name].to_dtype(candle_core::DType::F32).expect("tensor")
            ),
            0.0,
            "{name} differs after resuming"
        );
    }
}

/// Self-distillation's answers: greedy ones are `--mode local`'s tokens; sampled ones repeat for a
/// seed and leave the greedy path.
#[test]
fn distilled_answers_are_greedy_or_seeded_samples() {
    let t = tiny(1, 1);
    let prompts: Vec<Vec<u32>> = vec![vec![3, 14, 15], vec![9, 26, 5], vec![35, 8, 9, 7], vec![2, 7, 18, 28]];
    let bar = indicatif::ProgressBar::hidden();
    let answer = |sampling: SamplingOptions| {
        hat_adapter_trainer::distill::distill(&t.device, &t.cloud, &prompts, 10, 4, sampling, &bar).expect("distill")
    };
    let greedy = answer(SamplingOptions::default());
    for (d, p) in greedy.iter().zip(&prompts) {
        let mut pipeline = LocalPipeline::new(&t.device, &t.cloud).expect("pipeline");
        let local = generate(&mut pipeline, p, &GenerateOptions { max_tokens: 10, ..Default::default() }, |_| {}).expect("local");
        assert_eq!((d.prompt_len, &d.tokens[..p.len()]), (p.len(), p.as_slice()));
        assert_eq!(&d.tokens[p.len()..], local.tokens.as_slice(), "a greedy answer is local's");
    }
    let hot = SamplingOptions { temperature: 1.5, top_p: None, seed: 11 };
    let (a, b) = (answer(hot), answer(hot));
    assert_eq!(a, b, "one seed, one set of answers");
    assert_ne!(a, greedy, "sampled answers leave the greedy path");
    assert_ne!(a, answer(SamplingOptions { seed: 12, ..hot }), "another seed, other answers");
}

/// Teacher sets computed in parts and joined equal one set computed over all the sequences.
#[test]
fn teacher_sets_join_into_the_set_of_all_their_sequences() {
    let t = tiny(1, 1);
    let seqs: Vec<Vec<u32>> = vec![vec![3, 14, 15, 9], vec![26, 5, 35], vec![8, 9, 7, 9, 3], vec![2, 38]];
    let bar = indicatif::ProgressBar::hidden();
    let set = |s: &[Vec<u32>]| TeacherSet::compute(&t.device, &t.cloud, s, 4, true, &bar).expect("teacher");
    let whole = set(&seqs);
    let joined = TeacherSet::concat(vec![set(&seqs[..1]), set(&seqs[1..3]), set(&seqs[3..])]).expect("join");
    assert_eq!((&joined.offsets, &joined.tokens), (&whole.offsets, &whole.tokens));
    let top = |s: &TeacherSet| s.top.clone().expect("top states");
    for (a, b) in [(&joined.x, &whole.x), (&joined.y, &whole.y), (&joined.top_p, &whole.top_p), (&top(&joined), &top(&whole))] {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
    assert_eq!(joined.top_ids.to_vec2::<u32>().expect("ids"), whole.top_ids.to_vec2::<u32>().expect("ids"));
}

/// `--init-head` trains an existing head further: training starts from its weights and keeps its
/// draft vocabulary; sampled answers add sequences without
/// upsetting the alignment check; a head for another split is refused in one line naming both.
#[test]
fn training_continues_from_a_head_file_on_sampled_answers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let art = tiny_artifacts(&tmp.path().join("a"), &TinyLlama::default(), 1, 1);
    let data = tmp.path().join("data.txt");
    let docs: Vec<String> =
        (0..6).map(|d| (0..12).map(|i| format!("w{}", 3 + (i * 5 + d * 11) % 60)).collect::<Vec<_>>().join(" ")).collect();
    std::fs::write(&data, docs.join("\n\n")).expect("data");
    let first = run_feature(&head_options(&art, &data, 6)).expect("first run");
    let start = tmp.path().join("start.safetensors");
    std::fs::copy(art.join("device").join(DRAFT_HEAD_FILE), &start).expect("copy");
    let start_tensors = candle_core::safetensors::load(&start, &Device::Cpu).expect("head file");

    let mut more = head_options(&art, &data, 4);
    more.init_head = Some(start.clone());
    more.draft_vocab = 16;
    more.distill_samples = 2;
    more.distill_temperature = 1.0;
    let second = run_feature(&more).expect("continued");
    assert_eq!(second.sequences, 2 * first.sequences, "a greedy and a sampled answer per prompt");
    assert_eq!(second.answers_per_prompt, 2);
    assert_eq!(second.init_head.as_deref(), Some(start.as_path()));
    assert!(second.alignment > 0.99, "the greedy answers line up: {}", second.alignment);
    assert_eq!(second.draft_vocab, first.draft_vocab, "the start head's vocabulary, not a new --draft-vocab");
    let end = candle_core::safetensors::load(art.join("device").join(DRAFT_HEAD_FILE), &Device::Cpu).expect("new head");
    assert_eq!(end[VOCAB_TENSOR].to_vec1::<u32>().expect("vocab"), start_tensors[VOCAB_TENSOR].to_vec1::<u32>().expect("vocab"));

    let other = tiny_artifacts(&tmp.path().join("b"), &TinyLlama::default(), 2, 1);
    let mut wrong = head_options(&other, &data, 2);
    wrong.init_head = Some(start);
    let msg = run_feature(&wrong).expect_err("refused").to_string();
    assert!(msg.contains("split 1/2/1") && msg.contains("split 2/1/1"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

// ---- The real default model with the shipped head.

const NEW_TOKENS: usize = 64;

struct Real {
    device: DeviceRuntime,
    cloud: CloudPackage,
    prompts: Vec<Vec<u32>>,
    local: Vec<Vec<u32>>,
}

fn real() -> &'static Real {
    static REAL: OnceLock<Real> = OnceLock::new();
    REAL.get_or_init(|| {
        let dir = default_artifacts().join("device");
        let name = install_shipped_head(&dir).expect("install").expect("a head ships for the default model split 2/2");
        eprintln!("shipped head: {name}");
        let (device, cloud) = open_default();
        assert!(device.head().is_some(), "the shipped head loads");
        let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| device.prompt_ids(p, true).expect("encode")).collect();
        let local = prompts
            .iter()
            .map(|p| {
                let mut pipeline = LocalPipeline::new(&device.package, &cloud).expect("pipeline");
                generate(&mut pipeline, p, &GenerateOptions { max_tokens: NEW_TOKENS, ..Default::default() }, |_| {}).expect("local").tokens
            })
            .collect();
        Real { device, cloud, prompts, local }
    })
}

fn run_all(device: &DeviceRuntime, server: &CloudServer, k: usize) -> Vec<Generation> {
    run_first(device, server, k, PROMPTS.len())
}

/// [`run_all`] on the first `count` prompts: for variants of a setting every prompt has checked.
fn run_first(device: &DeviceRuntime, server: &CloudServer, k: usize, count: usize) -> Vec<Generation> {
    let mut o = CloudOptions::new(server.local_addr().to_string());
    o.wire = WireFormat { dtype: WireDType::F32, zstd: false };
    let mut session = device.connect(o).expect("connect");
    assert_eq!(session.drafter().kind(), "feature");
    let opts = GenerateOptions { max_tokens: NEW_TOKENS, ..Default::default() };
    real().prompts.iter().take(count).map(|p| session.generate(p, &opts, Mode::Hat { draft_len: k }, |_| {}).expect("generate")).collect()
}

fn assert_equal_local(label: &str, gens: &[Generation]) -> f64 {
    for (i, g) in gens.iter().enumerate() {
        assert_eq!(g.tokens, real().local[i], "{label}, prompt {i}: tokens differ from --mode local");
    }
    let rounds: usize = gens.iter().map(|g| g.rounds).sum();
    let gained: usize = gens.iter().map(|g| g.tokens.len() - 1).sum();
    let drafted: usize = gens.iter().map(|g| g.drafted).sum();
    let a = gained as f64 / rounds as f64;
    eprintln!("{label}: equal to local; accept_len {a:.3}, {:.2} drafts per round", drafted as f64 / rounds as f64);
    a
}

#[test]
fn shipped_head_greedy_equals_local_at_fixed_and_adaptive_draft_lengths() {
    let r = real();
    let server = CloudServer::start(&r.cloud, ServerConfig { log: false, ..Default::default() }, "127.0.0.1:0").expect("cloud");
    let dir = default_artifacts().join("device");
    let fixed = DeviceRuntime::open(&dir).expect("device").with_draft_choice(DraftChoice::Feature, Some(0.0));
    let a4 = assert_equal_local("feature head, k=4, no early stop", &run_all(&fixed, &server, 4));
    assert_equal_local("feature head, k=1", &run_first(&fixed, &server, 1, 4));
    let adaptive = DeviceRuntime::open(&dir).expect("device").with_draft_choice(DraftChoice::Feature, None);
    assert_equal_local("feature head, k=6, adaptive", &run_all(&adaptive, &server, 6));
    let strict = DeviceRuntime::open(&dir).expect("device").with_draft_choice(DraftChoice::Feature, Some(0.9));
    assert_equal_local("feature head, k=4, threshold 0.9", &run_first(&strict, &server, 4, 4));
    // Leaves: none, the default, and four a round whatever the head's estimate. Every kept leaf
    // moves its keys and values to its position in the device's caches and the cloud's.
    let chain = DeviceRuntime::open(&dir).expect("device").with_draft_choice(DraftChoice::Feature, None).with_leaves(0, 0.0);
    let plain = run_all(&chain, &server, 4);
    assert_equal_local("feature head, k=4, adaptive, no leaves", &plain);
    assert_eq!(plain.iter().map(|g| g.leaves).sum::<usize>(), 0);
    let many = DeviceRuntime::open(&dir).expect("device").with_draft_choice(DraftChoice::Feature, None).with_leaves(4, 0.0);
    let leafy = run_all(&many, &server, 4);
    assert_equal_local("feature head, k=4, adaptive, 4 leaves", &leafy);
    let (leaves, kept) = leafy.iter().fold((0, 0), |(l, k), g| (l + g.leaves, k + g.leaves_accepted));
    eprintln!("4 leaves a round: {kept} of {leaves} leaves kept");
    assert!(kept > 0, "no leaf was ever kept ({leaves} verified), so the path that keeps one went untested");
    // These prompts were not in the head's training prompts; the trained head must gain well over
    // the one token per round of U-shaped decoding.
    assert!(a4 > 1.2, "the shipped head gains only {a4:.3} tokens per round");
}

/// A cloud that grants only a few positions past the prompt: the budget ends at its context, and a
/// round's leaves give way there instead of asking for slots past it. The reply is local's, cut
/// at the context.
#[test]
fn leaves_give_way_at_the_end_of_the_context() {
    let r = real();
    let dir = default_artifacts().join("device");
    let device = DeviceRuntime::open(&dir).expect("device").with_draft_choice(DraftChoice::Feature, Some(0.0)).with_leaves(4, 0.0);
    for (i, p) in r.prompts.iter().take(4).enumerate() {
        for extra in [3, 6] {
            let cfg = ServerConfig { log: false, max_context: p.len() + extra, ..Default::default() };
            let server = CloudServer::start(&r.cloud, cfg, "127.0.0.1:0").expect("cloud");
            let mut o = CloudOptions::new(server.local_addr().to_string());
            o.wire = WireFormat { dtype: WireDType::F32, zstd: false };
            let mut session = device.connect(o).expect("connect");
            let opts = GenerateOptions { max_tokens: NEW_TOKENS, ..Default::default() };
            let g = session.generate(p, &opts, Mode::Hat { draft_len: 4 }, |_| {}).expect("generate up to the context");
            assert_eq!(g.tokens, r.local[i][..extra], "prompt {i}, {extra} positions left");
        }
    }
}

/// The worst case: a head whose only draft token the model never produces here. Every draft is
/// rejected and the output is still exact.
#[test]
fn a_head_that_never_agrees_loses_no_token() {
    let r = real();
    let dir = default_artifacts().join("device");
    let bytes = std::fs::read(dir.join(DRAFT_HEAD_FILE)).expect("head file");
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).expect("tensors");
    tensors.remove(VOCAB_TENSOR);
    let never =
        (0..r.device.package.config.vocab_size as u32).rev().find(|t| r.local.iter().all(|l| !l.contains(t))).expect("an unused id");
    let meta = r.device.head().expect("head").meta.clone();
    let head =
        FeatureHead::from_tensors(tensors, vec![never], meta, dir.join(DRAFT_HEAD_FILE), &r.device.package, &Device::Cpu).expect("head");
    let device = DeviceRuntime::open(&dir).expect("device").with_head(head).with_draft_choice(DraftChoice::Feature, Some(0.0));
    let server = CloudServer::start(&r.cloud, ServerConfig { log: false, ..Default::default() }, "127.0.0.1:0").expect("cloud");
    let gens = run_first(&device, &server, 4, 4);
    assert_equal_local("head that never agrees", &gens);
    let (accepted, drafted) = gens.iter().fold((0, 0), |(a, d), g| (a + g.accepted, d + g.drafted));
    assert_eq!(accepted, 0, "{accepted} of {drafted} drafts accepted");
    assert!(drafted > 0);
}
