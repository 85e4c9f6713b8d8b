//! `hat serve device` with a real OpenAI client: the `openai` Python package, installed by this test
//! into a virtual environment under the target directory, streams from the device server backed by a
//! real `hat serve cloud` on the default model (split as the README's main job splits it). The
//! Python side (`openai_client.py`) makes the checks; this file starts the processes and computes
//! the references with `hat generate --mode local`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const HAT: &str = env!("CARGO_BIN_EXE_hat");
/// The `openai` package the test pins, so a new release cannot change what is checked.
const OPENAI: &str = "openai==3.57.0";
const MAX_TOKENS: usize = 24;

/// Kills its process when dropped, so a failed assertion leaves nothing running.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `hat ARGS` and reads its stdout lines up to and including `listening on ADDR`.
fn start(args: &[&str], stderr: &Path) -> (Proc, Vec<String>) {
    let child = Command::new(HAT)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr).expect("stderr file"))
        .spawn()
        .expect("spawn hat");
    let mut proc = Proc(child);
    let mut out = BufReader::new(proc.0.stdout.take().expect("stdout"));
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).expect("read stdout");
        assert!(n > 0, "hat {args:?} exited early: {}", std::fs::read_to_string(stderr).unwrap_or_default());
        let done = line.starts_with("listening on ");
        lines.push(line.trim().to_string());
        if done {
            return (proc, lines);
        }
    }
}

fn addr_after(lines: &[String], prefix: &str) -> String {
    lines.iter().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("no `{prefix}` line in {lines:?}")).to_string()
}

/// A virtual environment with the pinned `openai` package, made once per target directory.
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    let py = venv.join("bin/python");
    let ready = venv.join(".installed");
    if std::fs::read_to_string(&ready).ok().as_deref() != Some(OPENAI) {
        let made = Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv).status().expect("run python3 -m venv");
        assert!(made.success(), "python3 -m venv failed (the test needs Python 3 with venv)");
        let pip =
            Command::new(&py).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", OPENAI]).output().expect("run pip");
        assert!(pip.status.success(), "pip install {OPENAI} failed: {}", String::from_utf8_lossy(&pip.stderr));
        std::fs::write(&ready, OPENAI).expect("mark the venv");
    }
    py
}

fn local_reference(artifacts: &str, prompt: &str, chat: bool, n: usize) -> serde_json::Value {
    let n = n.to_string();
    let mut args =
        vec!["generate", "--artifacts", artifacts, "--mode", "local", "--prompt", prompt, "--max-tokens", &n, "--json", "--quiet"];
    if chat {
        args.push("--chat");
    }
    let out = Command::new(HAT).args(&args).output().expect("run hat generate");
    assert!(out.status.success(), "hat generate: {}", String::from_utf8_lossy(&out.stderr));
    let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["prompt"] = prompt.into();
    v
}

fn run_client(py: &Path, base: &str, model: &str, extra: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(py)
        .arg(&script)
        .args(["--base-url", base, "--key", "test-key", "--model", model])
        .args(extra)
        .output()
        .expect("run openai_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "openai_client.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn openai_python_client_streams_from_hat_serve_device() {
    let py = python();
    let tmp = tempfile::tempdir().expect("tmp");
    let art = tmp.path().join("artifacts");
    let art_s = art.to_str().expect("utf8");
    let gguf = hat_tests::default_model_gguf();
    let split = Command::new(HAT)
        .args(["split", "--quiet", "--model", gguf.to_str().expect("utf8"), "--input-layers", "2", "--output-layers", "2", "--out", art_s])
        .output()
        .expect("run hat split");
    assert!(split.status.success(), "split: {}", String::from_utf8_lossy(&split.stderr));

    let prompts = [
        "What is the capital of France?",
        "Name three primary colors.",
        "How many legs does a spider have?",
        "Write a haiku about the sea.",
        "What is 12 times 12?",
        "Give me a synonym for happy.",
        "Why is the sky blue?",
        "Translate 'good morning' into Spanish.",
    ];
    let chat: Vec<_> = prompts.iter().map(|p| local_reference(art_s, p, true, MAX_TOKENS)).collect();
    // With f16 on the wire this prompt takes the other side of a near-tie ("New York" for
    // "Barcelona"); the default wire, f32, is bit-exact.
    let plain = local_reference(art_s, "The three largest cities in Europe are", false, MAX_TOKENS);
    let refs = tmp.path().join("refs.json");
    std::fs::write(&refs, serde_json::json!({ "chat": chat, "plain": plain, "max_tokens": MAX_TOKENS }).to_string()).expect("refs");

    let cloud_log = tmp.path().join("cloud.log");
    let cloud_pkg = format!("{art_s}/cloud");
    let (cloud, cloud_lines) =
        start(&["serve", "cloud", "--package", &cloud_pkg, "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"], &cloud_log);
    let cloud_addr = addr_after(&cloud_lines, "listening on ");
    let metrics = format!("http://{}/metrics", addr_after(&cloud_lines, "metrics on "));

    let key = tmp.path().join("key");
    std::fs::write(&key, "test-key\n").expect("key");
    let device_log = tmp.path().join("device.log");
    let (_device, device_lines) = start(
        &[
            "serve",
            "device",
            "--artifacts",
            art_s,
            "--cloud",
            &cloud_addr,
            "--listen",
            "127.0.0.1:0",
            "--api-key-file",
            key.to_str().expect("utf8"),
            "--max-concurrent",
            "8",
            "--retries",
            "4",
            "--model-name",
            "smollm2",
        ],
        &device_log,
    );
    let base = format!("http://{}/v1", addr_after(&device_lines, "listening on "));
    run_client(&py, &base, "smollm2", &["--refs", refs.to_str().expect("utf8"), "--cloud-metrics", &metrics]);

    let log = std::fs::read_to_string(&cloud_log).expect("cloud log");
    assert!(log.contains("closed by device"), "the cloud logs sessions the device closed:\n{log}");
    let device = std::fs::read_to_string(&device_log).expect("device log");
    assert!(device.contains("client went away: cloud session closed"), "the device logs the disconnect:\n{device}");

    // The cloud crashes mid-reply and comes back on the same address: the device reconnects,
    // replays, and the client gets the reply it would have got, none the wiser.
    let long_prompt = "Write a story about a dragon who learns to bake bread.";
    let want = local_reference(art_s, long_prompt, true, LONG_TOKENS);
    let device_addr = addr_after(&device_lines, "listening on ");
    let request = std::thread::spawn(move || chat_over_http(&device_addr, long_prompt, LONG_TOKENS));
    std::thread::sleep(std::time::Duration::from_millis(800));
    drop(cloud);
    let (cloud, _) = start(&["serve", "cloud", "--package", &cloud_pkg, "--listen", &cloud_addr], &cloud_log);
    let reply = request.join().expect("request thread");
    assert_eq!(reply["choices"][0]["message"]["content"], want["text"], "the reply survives a cloud crash unchanged");
    assert!(reply["timings"]["reconnects"].as_u64().expect("reconnects") >= 1, "the cloud crashed mid-reply: {}", reply["timings"]);

    drop(cloud);
    run_client(&py, &base, "smollm2", &["--phase", "cloud-down"]);
}

/// Tokens of the reply the cloud crash interrupts: long enough to be mid-reply at the crash.
const LONG_TOKENS: usize = 160;

/// One non-streamed greedy chat request over plain HTTP/1.1.
fn chat_over_http(addr: &str, prompt: &str, max_tokens: usize) -> serde_json::Value {
    use std::io::{Read, Write};
    let body = serde_json::json!({
        "model": "smollm2", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens
    })
    .to_string();
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the device server");
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer test-key\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut raw = String::new();
    conn.read_to_string(&mut raw).expect("read the reply");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    serde_json::from_str(body).expect("json body")
}
