//! The `hat` binary as a user meets it: one-line errors, non-zero exits, nothing half-written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hat_tests::TinyLlama;

fn hat(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hat"));
    cmd.args(args).arg("--quiet");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run hat")
}

fn split(model: &Path, out: &Path, input: usize, output: usize, envs: &[(&str, &str)]) -> Output {
    let (i, o) = (input.to_string(), output.to_string());
    hat(
        &[
            "split",
            "--model",
            model.to_str().expect("utf8"),
            "--input-layers",
            &i,
            "--output-layers",
            &o,
            "--out",
            out.to_str().expect("utf8"),
        ],
        envs,
    )
}

/// The tiny model written to `dir/src` and split 1/1 into `dir/art`, which it returns.
fn tiny_split(dir: &Path) -> PathBuf {
    let src = TinyLlama::default().write_dir(&dir.join("src"), 1);
    let art = dir.join("art");
    assert!(split(&src, &art, 1, 1, &[]).status.success());
    art
}

/// Asserts a failed run: non-zero exit, and one `error:` line naming `needle`.
fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure, got success");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "`{needle}` not in: {stderr}");
}

/// Nothing was left behind in `parent`: no output directory and no staging directory.
fn assert_nothing_written(parent: &Path, out: &Path) {
    assert!(!out.exists(), "{} was created", out.display());
    let leftovers: Vec<PathBuf> = std::fs::read_dir(parent)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".hat-split-")))
        .collect();
    assert!(leftovers.is_empty(), "staging directories left: {leftovers:?}");
}

#[test]
fn missing_path_is_a_one_line_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let out = tmp.path().join("out");
    let res = split(&tmp.path().join("no-such-model"), &out, 1, 1, &[]);
    assert_one_line_error(&res, "no-such-model: no such file or directory");
    assert_nothing_written(tmp.path(), &out);
}

#[test]
fn truncated_safetensors_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = TinyLlama::default().write_dir(&tmp.path().join("src"), 1);
    let weights = src.join("model.safetensors");
    let bytes = std::fs::read(&weights).expect("read");
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).expect("truncate");
    let out = tmp.path().join("out");
    let res = split(&src, &out, 1, 1, &[]);
    assert_one_line_error(&res, "is not a valid safetensors file");
    assert_nothing_written(tmp.path(), &out);
}

#[test]
fn unsupported_architecture_is_named() {
    let tmp = tempfile::tempdir().expect("tmp");
    let fx = TinyLlama::default();
    let src = fx.write_dir(&tmp.path().join("src"), 1);
    let mut cfg = fx.config_json();
    cfg["architectures"] = serde_json::json!(["PhiForCausalLM"]);
    cfg["model_type"] = serde_json::json!("phi");
    std::fs::write(src.join("config.json"), cfg.to_string()).expect("config");
    let out = tmp.path().join("out");
    let res = split(&src, &out, 1, 1, &[]);
    assert_one_line_error(&res, "unsupported architecture `phi`");
    assert_nothing_written(tmp.path(), &out);
}

#[test]
fn layer_counts_out_of_range_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = TinyLlama::default().write_dir(&tmp.path().join("src"), 1);
    let out = tmp.path().join("out");
    // 4 layers: 2 + 2 leaves the cloud nothing; 0 input layers leaves the device no embedding layer.
    assert_one_line_error(&split(&src, &out, 2, 2, &[]), "cloud keeps at least one");
    assert_one_line_error(&split(&src, &out, 0, 1, &[]), "at least 1");
    assert_one_line_error(&split(&src, &out, 9, 1, &[]), "must be less than the model's 4 layers");
    assert_nothing_written(tmp.path(), &out);
}

#[test]
fn out_holding_a_different_model_is_left_untouched() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = TinyLlama::default().write_dir(&tmp.path().join("src"), 1);
    let other = TinyLlama { seed: 1234, ..TinyLlama::default() }.write_dir(&tmp.path().join("other"), 1);
    let out = tmp.path().join("out");
    assert!(split(&src, &out, 1, 1, &[]).status.success());
    let before = std::fs::read_to_string(out.join("device/hat.json")).expect("manifest");
    // Same split again is fine (idempotent).
    assert!(split(&src, &out, 1, 1, &[]).status.success());
    // A different split, or different weights, is refused.
    assert_one_line_error(&split(&src, &out, 1, 2, &[]), "already holds a different model");
    assert_one_line_error(&split(&other, &out, 1, 1, &[]), "already holds a different model");
    assert_eq!(std::fs::read_to_string(out.join("device/hat.json")).expect("manifest"), before);
    // A directory that is not a package at all is refused too.
    let junk = tmp.path().join("junk");
    std::fs::create_dir_all(&junk).expect("mkdir");
    std::fs::write(junk.join("notes.txt"), "mine").expect("write");
    assert_one_line_error(&split(&src, &junk, 1, 1, &[]), "is not a hat package directory");
    assert!(junk.join("notes.txt").is_file());
}

#[test]
fn offline_hub_model_not_in_cache_is_a_clear_error() {
    let tmp = tempfile::tempdir().expect("tmp");
    let home = tmp.path().join("hf");
    let out = tmp.path().join("out");
    let res = hat(
        &["split", "--model", "some-org/not-cached", "--input-layers", "1", "--output-layers", "1", "--out", out.to_str().expect("utf8")],
        &[("HF_HOME", home.to_str().expect("utf8")), ("HF_HUB_OFFLINE", "1")],
    );
    assert_one_line_error(&res, "HF_HUB_OFFLINE is set");
    assert_nothing_written(tmp.path(), &out);
}

#[test]
fn generate_json_reports_tokens_and_timings() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = TinyLlama::default().write_dir(&tmp.path().join("src"), 1);
    let art = tmp.path().join("art");
    let out = split(&src, &art, 1, 1, &[]);
    assert!(out.status.success());
    // Only the default model's split 2/2 has a shipped head; others are told so.
    assert!(String::from_utf8_lossy(&out.stdout).contains("draft head: none ships for this model and split"));
    assert!(!art.join("device/draft-head.safetensors").exists());
    let res = hat(&["generate", "--artifacts", art.to_str().expect("utf8"), "--prompt", "w5 w9 w17", "--max-tokens", "6", "--json"], &[]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let v: serde_json::Value = serde_json::from_slice(&res.stdout).expect("one JSON object");
    assert_eq!(v["prompt_tokens"], 3);
    let tokens = v["tokens"].as_array().expect("tokens");
    assert!(!tokens.is_empty() && tokens.len() <= 6);
    assert!(v["text"].is_string());
    assert!(v["ttft_ms"].as_f64().expect("ttft") > 0.0);
    assert!(v["tbt_ms"].as_f64().is_some());

    let chat =
        hat(&["generate", "--artifacts", art.to_str().expect("utf8"), "--chat", "--prompt", "w5", "--max-tokens", "3", "--json"], &[]);
    assert!(chat.status.success(), "{}", String::from_utf8_lossy(&chat.stderr));
    let v: serde_json::Value = serde_json::from_slice(&chat.stdout).expect("json");
    // <|im_start|> user \n w5 <|im_end|> \n <|im_start|> assistant: the template's specials are whole tokens.
    assert!(v["prompt_tokens"].as_u64().expect("n") >= 4);

    let missing = hat(&["generate", "--artifacts", tmp.path().join("nope").to_str().expect("utf8"), "--prompt", "x"], &[]);
    assert_one_line_error(&missing, "no such package directory");
}

#[test]
fn help_explains_the_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_hat")).arg("--help").output().expect("run");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("split") && text.contains("generate"));
    let out = Command::new(env!("CARGO_BIN_EXE_hat")).args(["split", "--help"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--input-layers") && text.contains("HF_HUB_OFFLINE"), "{text}");
}

/// `hat serve cloud` in the background, `hat generate --mode ushape|hat --cloud` against it.
/// Starts `hat serve cloud` for `DIR/cloud` on a free loopback port with `extra` arguments; the child
/// and the address it printed.
fn serve_cloud(art: &str, extra: &[&str]) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut cloud = Command::new(env!("CARGO_BIN_EXE_hat"))
        .args(["serve", "cloud", "--package", &format!("{art}/cloud"), "--listen", "127.0.0.1:0"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn cloud");
    let mut line = String::new();
    BufReader::new(cloud.stdout.take().expect("stdout")).read_line(&mut line).expect("listening line");
    let addr = line.trim().strip_prefix("listening on ").expect("listening on ADDR").to_string();
    (cloud, addr)
}

#[test]
fn serve_cloud_and_generate_remotely_report_round_trips_and_bytes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let art = tiny_split(tmp.path());
    let art_s = art.to_str().expect("utf8");
    let token = tmp.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token");
    let (mut cloud, addr) = serve_cloud(art_s, &["--auth-token-file", token.to_str().expect("utf8")]);

    let local = hat(&["generate", "--artifacts", art_s, "--prompt", "w5 w9 w17", "--max-tokens", "8", "--json"], &[]);
    let local: serde_json::Value = serde_json::from_slice(&local.stdout).expect("json");
    for mode in ["ushape", "hat"] {
        let args =
            ["generate", "--artifacts", art_s, "--prompt", "w5 w9 w17", "--max-tokens", "8", "--json", "--mode", mode, "--cloud", &addr];
        let res = hat(&[&args[..], &["--auth-token-file", token.to_str().expect("utf8")]].concat(), &[]);
        assert!(res.status.success(), "{mode}: {}", String::from_utf8_lossy(&res.stderr));
        let v: serde_json::Value = serde_json::from_slice(&res.stdout).expect("json");
        assert_eq!(v["mode"], mode);
        assert_eq!(v["tokens"], local["tokens"], "{mode} equals --mode local");
        assert!(v["rounds"].as_u64().expect("rounds") >= 1);
        assert!(v["accept_len"].as_f64().expect("accept_len") >= 1.0);
        assert!(v["bytes_up"].as_u64().expect("up") > 0 && v["bytes_down"].as_u64().expect("down") > 0);
        if mode == "hat" {
            // No head ships for the tiny model: auto drafts with the adapter, and says which.
            assert!(v["draft_head"].as_str().expect("draft_head").starts_with("hat adapter"), "{}", v["draft_head"]);
            let feature = hat(&[&args[..], &["--draft-head", "feature", "--auth-token-file", token.to_str().expect("utf8")]].concat(), &[]);
            let f: serde_json::Value = serde_json::from_slice(&feature.stdout).expect("json");
            assert_eq!(f["tokens"], local["tokens"], "no head: U-shaped steps, same tokens");
            assert!(f["draft_head"].as_str().expect("draft_head").starts_with("none"), "{}", f["draft_head"]);
            assert_eq!(f["drafted"], 0);
        }
        // Without the token the cloud refuses, and the error says so in one line.
        let refused = hat(&args, &[]);
        assert_one_line_error(&refused, "auth token missing");
    }
    let no_cloud = hat(&["generate", "--artifacts", art_s, "--prompt", "x", "--mode", "hat"], &[]);
    assert_one_line_error(&no_cloud, "needs --cloud");
    cloud.kill().expect("kill cloud");
    let _ = cloud.wait();
    let gone = hat(&["generate", "--artifacts", art_s, "--prompt", "x", "--mode", "ushape", "--cloud", &addr, "--retries", "1"], &[]);
    assert_one_line_error(&gone, &format!("cannot reach the cloud at {addr}"));
}

/// Mutual TLS through the command line: the same tokens as `--mode local`, and a device without a
/// certificate, or with a bad key file, gets one line saying what to pass.
#[test]
fn serve_cloud_and_generate_over_mutual_tls() {
    let tmp = tempfile::tempdir().expect("tmp");
    let art = tiny_split(tmp.path());
    let art_s = art.to_str().expect("utf8");
    let pki = hat_tests::TestPki::generate(tmp.path(), "cli");
    let p = |p: &Path| p.to_str().expect("utf8").to_string();
    let (ca, cert, key) = (p(&pki.ca), p(&pki.client_cert), p(&pki.client_key));
    let (mut cloud, addr) = serve_cloud(art_s, &["--tls-cert", &p(&pki.server_cert), "--tls-key", &p(&pki.server_key), "--client-ca", &ca]);

    let base = ["generate", "--artifacts", art_s, "--prompt", "w5 w9 w17", "--max-tokens", "8", "--json"];
    let local: serde_json::Value = serde_json::from_slice(&hat(&base, &[]).stdout).expect("json");
    let remote = [&base[..], &["--mode", "hat", "--cloud", &addr, "--retries", "0", "--tls-ca", &ca]].concat();
    let ok = hat(&[&remote[..], &["--tls-cert", &cert, "--tls-key", &key]].concat(), &[]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).expect("json");
    assert_eq!(v["tokens"], local["tokens"], "over TLS, --mode hat equals --mode local");

    assert_one_line_error(&hat(&remote, &[]), "requires a client certificate: pass --tls-cert and --tls-key");
    let not_a_key = tmp.path().join("not-a-key.pem");
    std::fs::write(&not_a_key, "hello").expect("write");
    let not_a_key = p(&not_a_key);
    let bad = hat(&[&remote[..], &["--tls-cert", &cert, "--tls-key", &not_a_key]].concat(), &[]);
    assert_one_line_error(&bad, "not-a-key.pem: cannot read the private key");
    cloud.kill().expect("kill cloud");
    let _ = cloud.wait();
}

/// `hat profile` writes the table; `hat bench` runs every mode over two links with the cloud in
/// process, and HAT's tokens equal U-shaped's in every chunking.
#[test]
fn profile_then_bench_every_mode_on_the_tiny_model() {
    let tmp = tempfile::tempdir().expect("tmp");
    let art = tiny_split(tmp.path());
    let art_s = art.to_str().expect("utf8");
    let prompts = tmp.path().join("prompts.jsonl");
    let long: Vec<String> = (0..120).map(|i| format!("w{}", i % 50)).collect();
    std::fs::write(
        &prompts,
        format!(
            "{{\"name\":\"a\",\"kind\":\"short\",\"text\":\"w5 w9\"}}\n{{\"name\":\"b\",\"kind\":\"long\",\"text\":\"{}\"}}\n",
            long.join(" ")
        ),
    )
    .expect("prompts");
    let p_s = prompts.to_str().expect("utf8");
    let (json, svg) = (tmp.path().join("bench.json"), tmp.path().join("bench.svg"));
    let bench = |modes: &str, plot: &str| {
        let args =
            ["bench", "--artifacts", art_s, "--spawn-cloud", "--prompts", p_s, "--modes", modes, "--link", "100,1", "--link", "20,2,1"];
        hat(&[&args[..], &["--max-tokens", "5", "--json", json.to_str().expect("utf8"), "--plot", plot]].concat(), &[])
    };
    let svg_s = svg.to_str().expect("utf8");
    assert_one_line_error(&bench("ushape,hat", svg_s), "hat profile");

    let res = hat(&["profile", "--artifacts", art_s, "--sizes", "4,8,16", "--reps", "1"], &[]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(String::from_utf8_lossy(&res.stdout).contains("chunk size by prompt length"));
    let profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(art.join("device/profile.json")).expect("profile.json")).expect("json");
    assert!(profile["table"]["chunk"].as_array().is_some_and(|rows| !rows.is_empty()));
    assert!(profile["costs"]["cloud_middle"]["ms"][0][0].as_f64().is_some_and(|ms| ms > 0.0));

    let res = bench("cloud,ushape,sd,hat-nochunk,hat,hat@7,hat-adapter", svg_s);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("bench.json")).expect("json");
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2 * 2 * 7, "2 links x 2 prompts x 7 modes");
    assert_eq!(v["summaries"].as_array().expect("summaries").len(), 2 * 2 * 7);
    assert_eq!(v["hat_over_ushape"].as_array().expect("ratios").len(), 2 * 2);
    let tokens = |link: &str, prompt: &str, mode: &str| {
        runs.iter().find(|r| r["link"] == link && r["prompt"] == prompt && r["mode"] == mode).expect("run")["tokens"].clone()
    };
    for link in ["100 Mbps / 1 ms", "20 Mbps / 2 ms ±1 ms"] {
        for prompt in ["a", "b"] {
            for mode in ["hat-nochunk", "hat", "hat@7", "hat-adapter"] {
                assert_eq!(tokens(link, prompt, mode), tokens(link, prompt, "ushape"), "{link} {prompt} {mode}");
            }
        }
    }
    let chunked = runs.iter().find(|r| r["mode"] == "hat@7" && r["prompt"] == "b").expect("hat@7 run");
    assert_eq!(chunked["chunk"], 7);
    assert!(runs.iter().filter(|r| r["mode"] == "sd" || r["mode"] == "cloud").all(|r| r["exposes_tokens"] == true));
    let plot = std::fs::read_to_string(&svg).expect("svg");
    assert!(plot.contains("<svg") && plot.contains("hat-nochunk") && plot.contains("TTFT"));

    assert_one_line_error(&bench("ushape", "plot.png"), "SVG");
    let bad_link = hat(&["bench", "--artifacts", art_s, "--spawn-cloud", "--prompts", p_s, "--link", "50"], &[]);
    assert!(!bad_link.status.success() && String::from_utf8_lossy(&bad_link.stderr).contains("write a link as MBPS,RTT_MS"));
}

/// `hat loadtest` end to end on the tiny model: every level batched and unbatched runs without
/// an error, the JSON holds each level's tokens and both sides' CPU per token, the plot has its
/// panels, and bad levels are one-line errors.
#[test]
fn loadtest_reports_every_level_and_both_sides_cpu() {
    let tmp = tempfile::tempdir().expect("tmp");
    let art = tiny_split(tmp.path());
    let art_s = art.to_str().expect("utf8");
    let (json, svg) = (tmp.path().join("load.json"), tmp.path().join("load.svg"));
    let (json_s, svg_s) = (json.to_str().expect("utf8"), svg.to_str().expect("utf8"));
    let res = hat(
        &[
            "loadtest",
            "--artifacts",
            art_s,
            "--spawn-cloud",
            "--compare-batching",
            "--sessions",
            "1,3",
            "--duration",
            "1",
            "--max-tokens",
            "4",
            "--json",
            json_s,
            "--plot",
            svg_s,
        ],
        &[],
    );
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(String::from_utf8_lossy(&res.stdout).contains("device CPU ms/token"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("load.json")).expect("json");
    let levels = v["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 2 * 2, "2 levels, batched and unbatched");
    for l in levels {
        assert_eq!(l["errors"], 0, "{l}");
        assert!(l["tokens"].as_u64().expect("tokens") > 0, "{l}");
        for side in ["cloud_cpu_ms_per_token", "device_cpu_ms_per_token"] {
            assert!(l[side].as_f64().is_some_and(|ms| ms > 0.0), "{side}: {l}");
        }
    }
    let plot = std::fs::read_to_string(&svg).expect("svg");
    for panel in ["Aggregate throughput", "Cloud CPU per token", "Device sessions&apos; CPU per token", "Time between tokens"] {
        assert!(plot.contains(panel), "{panel} not in the plot");
    }
    assert_one_line_error(&hat(&["loadtest", "--artifacts", art_s, "--spawn-cloud", "--sessions", "0,4"], &[]), "--sessions");
    assert_one_line_error(&hat(&["loadtest", "--artifacts", art_s, "--spawn-cloud", "--duration", "0"], &[]), "--duration");
}

/// `--device` and `--dtype` of `hat serve cloud` (and `--cloud-device`/`--cloud-dtype` where hat
/// starts the cloud): bad values and impossible asks are refused in one line before anything
/// listens; a bf16 cloud, started by `hat bench`, gives `hat` exactly `ushape`'s tokens.
#[test]
fn cloud_device_and_dtype_are_checked_and_a_bf16_cloud_stays_exact() {
    let tmp = tempfile::tempdir().expect("tmp");
    let src = TinyLlama::default().write_dir(&tmp.path().join("src"), 1);
    let (q8, dense) = (tmp.path().join("q8"), tmp.path().join("dense"));
    assert!(split(&src, &q8, 1, 1, &[]).status.success());
    let cloud = q8.join("cloud");
    let serve = |extra: &[&str]| {
        hat(&[&["serve", "cloud", "--package", cloud.to_str().expect("utf8"), "--listen", "127.0.0.1:0"], extra].concat(), &[])
    };
    let bad = serve(&["--device", "gpu"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("expected cpu, cuda or cuda:N"));
    if !hat_runtime::gpu::CUDA_BUILT {
        let res = serve(&["--device", "cuda:1"]);
        assert_one_line_error(&res, "scripts/build-cuda.sh");
        assert!(res.stdout.is_empty(), "a refused cloud printed: {}", String::from_utf8_lossy(&res.stdout));
    }
    assert_one_line_error(&serve(&["--dtype", "bf16"]), "quantized (q8_0) and computes in f32");

    let args = ["--input-layers", "1", "--output-layers", "1", "--cloud-quant", "f32", "--out"];
    let res = hat(&[&["split", "--model", src.to_str().expect("utf8")][..], &args, &[dense.to_str().expect("utf8")]].concat(), &[]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"name\":\"a\",\"text\":\"w5 w9 w1\"}\n{\"name\":\"b\",\"text\":\"w7 w7 w2 w3\"}\n").expect("prompts");
    let json = tmp.path().join("bench.json");
    let bench = |extra: &[&str]| {
        let base = ["bench", "--artifacts", dense.to_str().expect("utf8"), "--prompts", prompts.to_str().expect("utf8")];
        hat(&[&base[..], &["--modes", "ushape,hat-nochunk", "--link", "100,1", "--max-tokens", "12"], extra].concat(), &[])
    };
    assert_one_line_error(&bench(&["--cloud", "127.0.0.1:9", "--cloud-device", "cuda"]), "apply only when hat starts the cloud");
    let res = bench(&["--spawn-cloud", "--cloud-dtype", "bf16", "--json", json.to_str().expect("utf8")]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("bench.json")).expect("json");
    assert!(v["placement"].as_str().is_some_and(|p| p.ends_with("the cloud computes on cpu in bf16")), "{}", v["placement"]);
    let runs = v["runs"].as_array().expect("runs");
    for prompt in ["a", "b"] {
        let tokens = |mode: &str| runs.iter().find(|r| r["prompt"] == prompt && r["mode"] == mode).expect("run")["tokens"].clone();
        assert_eq!(tokens("hat-nochunk"), tokens("ushape"), "prompt {prompt}: hat differs from ushape on the bf16 cloud");
        assert!(tokens("ushape").as_array().is_some_and(|t| t.len() == 12), "prompt {prompt}: {}", tokens("ushape"));
    }
}
