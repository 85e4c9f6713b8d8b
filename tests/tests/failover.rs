//! Scale-out on an existing balancer: two cloud replicas of the README's default package (the
//! default model split 2/2 in q8_0) behind HAProxy, configured from the shipped
//! `deploy/haproxy.cfg` with its hello health check, plus a third
//! replica serving another model that the check must keep out of the pool. Four devices generate
//! through the balancer; the replica holding sessions is killed mid-generation; its devices
//! reconnect through the balancer to the survivor, replay their logs, and every device ends with
//! exactly the tokens of `--mode local`. Needs the `haproxy` binary (`scripts/test.sh` installs it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use hat_model::Quant;
use hat_runtime::link::read_frame;
use hat_runtime::protocol::{frame, ClientMsg, ErrorCode, ServerMsg, PROTOCOL_VERSION};
use hat_runtime::{
    generate, CloudOptions, CloudPackage, CloudServer, DeviceRuntime, GenerateOptions, Generation, LocalPipeline, Mode, ServerConfig,
};
use hat_splitter::{load_model, split_model, ModelSource, SplitOptions};
use hat_tests::{contains, default_model_gguf, repo_root, tiny_artifacts, TinyLlama, PROMPTS};

const DEVICES: usize = 4;
const NEW_TOKENS: usize = 32;
/// Every device stops at this token until the replica is killed, so the kill lands mid-generation.
const PAUSE_AT: usize = 8;
/// Longest wait for any one step (generous: the machine may be shared); no step may hang the test.
const PATIENCE: Duration = Duration::from_secs(240);

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions { max_tokens: n, ..Default::default() }
}

fn serve(package: &CloudPackage) -> CloudServer {
    CloudServer::start(package, ServerConfig { log: false, ..Default::default() }, "127.0.0.1:0").expect("cloud replica")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// `deploy/haproxy-check.sh ARGS`'s stdout.
fn check_script(args: &[&str]) -> String {
    let out = Command::new("bash").arg(repo_root().join("deploy/haproxy-check.sh")).args(args).output().expect("run haproxy-check.sh");
    assert!(out.status.success(), "haproxy-check.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8")
}

/// The hex strings of the script's `tcp-check send-binary` and `tcp-check expect binary` lines.
fn check_lines(args: &[&str]) -> (String, String) {
    let out = check_script(args);
    let field = |prefix: &str| {
        out.lines().find_map(|l| l.trim().strip_prefix(prefix)).unwrap_or_else(|| panic!("no `{prefix}` line in:\n{out}")).to_string()
    };
    (field("tcp-check send-binary "), field("tcp-check expect binary "))
}

/// What HAProxy does with those lines: send the bytes and read the reply frame, length included.
fn probe(server: SocketAddr, send: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(server).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(&unhex(send)).expect("send hello");
    let body = read_frame(&mut s, 1 << 20).expect("a reply frame");
    frame(&body)
}

/// The script writes the very bytes hat's encoder does, and a cloud answers them as HAProxy expects:
/// a Welcome for the right package (with or without a token), an error for another package.
#[test]
fn check_script_speaks_the_protocol() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = tiny_artifacts(dir.path(), &TinyLlama::default(), 1, 1);
    let cloud = CloudPackage::open(&out.join("cloud"), &Device::Cpu).expect("cloud");
    let fingerprint = cloud.manifest.fingerprint.clone();
    let hidden = cloud.middle.config().hidden_size as u32;
    let pkg = out.to_str().expect("utf8 path");
    // The check leaves out the Welcome's last byte (whether the cloud verifies draft trees), so a
    // CPU and a GPU replica both pass.
    let welcome = hex(&frame(&ServerMsg::Welcome { version: PROTOCOL_VERSION, hidden, trees: true }.encode()));
    let welcome = welcome[..welcome.len() - 2].to_string();
    let hello = |token: Option<&str>| {
        hex(&frame(
            &ClientMsg::Hello { version: PROTOCOL_VERSION, fingerprint: fingerprint.clone(), auth_token: token.map(Into::into) }.encode(),
        ))
    };

    let (send, expect) = check_lines(&[pkg]);
    assert_eq!((&send, &expect), (&hello(None), &welcome), "the split directory");
    assert_eq!(check_lines(&[&format!("{pkg}/cloud")]), (send.clone(), expect.clone()), "its cloud half");
    let plain = serve(&cloud);
    assert!(contains(&probe(plain.local_addr(), &send), &unhex(&expect)), "a replica of this package passes");

    // As `hat` reads a token file: surrounding whitespace is dropped; bytes, not characters, counted.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "  s3cret-\u{e9}t\u{e9}\n").expect("token");
    let (send_token, expect_token) = check_lines(&["--auth-token-file", token_file.to_str().expect("utf8"), pkg]);
    assert_eq!((&send_token, &expect_token), (&hello(Some("s3cret-\u{e9}t\u{e9}")), &welcome), "with the token");
    let cfg = ServerConfig { log: false, auth_token: Some("s3cret-\u{e9}t\u{e9}".into()), ..Default::default() };
    let guarded = CloudServer::start(&cloud, cfg, "127.0.0.1:0").expect("cloud with a token");
    assert!(contains(&probe(guarded.local_addr(), &send_token), &unhex(&welcome)), "the token passes");
    assert!(!contains(&probe(guarded.local_addr(), &send), &unhex(&welcome)), "no Welcome without the token");

    // No secret in the config: version and fingerprint pass, then the token is missing.
    let (send_none, expect_unauth) = check_lines(&["--expect-unauthorized", pkg]);
    assert_eq!(send_none, hello(None));
    let unauthorized = ServerMsg::Error { code: ErrorCode::Unauthorized, message: String::new() }.encode();
    assert_eq!(expect_unauth, hex(&unauthorized[..3]));
    assert!(contains(&probe(guarded.local_addr(), &send_none), &unhex(&expect_unauth)), "unauthorized means the model matched");

    // A replica of another model fails every variant.
    let other_dir = tempfile::tempdir().expect("tmp");
    let other = tiny_artifacts(other_dir.path(), &TinyLlama { seed: 8, ..Default::default() }, 1, 1);
    let other = serve(&CloudPackage::open(&other.join("cloud"), &Device::Cpu).expect("other cloud"));
    for (send, expect) in [(&send, &expect), (&send_none, &expect_unauth)] {
        let reply = probe(other.local_addr(), send);
        assert!(!contains(&reply, &unhex(expect)), "another model's replica must fail the check");
        assert!(matches!(ServerMsg::decode(&reply[4..]), Ok(ServerMsg::Error { code: ErrorCode::Fingerprint, .. })));
    }

    // Filling a config replaces exactly the two check lines.
    let filled = check_script(&[pkg, repo_root().join("deploy/haproxy.cfg").to_str().expect("utf8")]);
    let shipped = std::fs::read_to_string(repo_root().join("deploy/haproxy.cfg")).expect("haproxy.cfg");
    let changed: Vec<_> = filled.lines().zip(shipped.lines()).filter(|(a, b)| a != b).map(|(a, _)| a.trim().to_string()).collect();
    assert_eq!(changed, [format!("tcp-check send-binary {send}"), format!("tcp-check expect binary {expect}")]);
    assert_eq!(filled.lines().count(), shipped.lines().count());
}

/// HAProxy as a child process, killed when dropped; its log is printed if the test failed.
struct Haproxy {
    child: Child,
    log: PathBuf,
    stats: PathBuf,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("haproxy log:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

impl Haproxy {
    fn start(binary: &Path, dir: &Path, cfg: &str) -> Self {
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        let log = dir.join("haproxy.log");
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary)
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .expect("start haproxy");
        Haproxy { child, log, stats: dir.join("admin.sock") }
    }

    /// (server, status, last check) of each replica, from the stats socket.
    fn replicas(&mut self) -> Option<Vec<(String, String, String)>> {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("haproxy exited ({status}):\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
        let mut s = UnixStream::connect(&self.stats).ok()?;
        s.write_all(b"show stat\n").ok()?;
        let mut csv = String::new();
        s.read_to_string(&mut csv).ok()?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (px, sv, status, check) = (col("pxname")?, col("svname")?, col("status")?, col("check_status")?);
        let rows = lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|r| r.len() > check && r[px] == "hat_cloud_replicas" && r[sv] != "BACKEND")
            .map(|r| (r[sv].to_string(), r[status].to_string(), r[check].to_string()))
            .collect();
        Some(rows)
    }

    /// Waits until every replica is in the wanted state (status and last check).
    fn wait_for(&mut self, want: &[(&str, &str, &str)]) {
        let deadline = Instant::now() + PATIENCE;
        let mut seen = None;
        while Instant::now() < deadline {
            if let Some(rows) = self.replicas() {
                if want.iter().all(|(name, status, check)| rows.iter().any(|r| r.0 == *name && r.1 == *status && r.2 == *check)) {
                    return;
                }
                seen = Some(rows);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("haproxy's replicas never reached {want:?}; last seen {seen:?}");
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn replace_once(text: &mut String, from: &str, to: &str) {
    assert_eq!(text.matches(from).count(), 1, "deploy/haproxy.cfg should hold `{from}` exactly once");
    *text = text.replacen(from, to, 1);
}

/// The README's default package: the default model split 2/2 in q8_0 (`hat split`'s defaults), whose
/// batched middle gives every session the bits it would get alone.
fn default_package(dir: &Path) -> PathBuf {
    let out = dir.join("artifacts");
    let model = load_model(&ModelSource::Gguf(default_model_gguf()), false).expect("load default model");
    let opts = SplitOptions { device_quant: Quant::Q8_0, cloud_quant: Quant::Q8_0, ..SplitOptions::new(2, 2, out.clone()) };
    split_model(&model, &opts).expect("split");
    out
}

/// The shipped config with `package`'s check filled in by the shipped script, moved to loopback:
/// frontend on `port`, these replicas, checks every 100 ms, the stats socket in `dir`.
fn config(package: &Path, dir: &Path, port: u16, replicas: &[(&str, SocketAddr)]) -> String {
    let shipped = repo_root().join("deploy/haproxy.cfg");
    let mut cfg = check_script(&[package.to_str().expect("utf8"), shipped.to_str().expect("utf8")]);
    // The shipped lines are already those of the README's default package.
    let stale = "deploy/haproxy.cfg's check is not the default package's hello: `deploy/haproxy-check.sh artifacts deploy/haproxy.cfg`";
    assert_eq!(cfg, std::fs::read_to_string(&shipped).expect("haproxy.cfg"), "{stale}");
    replace_once(&mut cfg, "bind :7070", &format!("bind 127.0.0.1:{port}"));
    replace_once(&mut cfg, "stats socket /run/haproxy/admin.sock", &format!("stats socket {}", dir.join("admin.sock").display()));
    replace_once(&mut cfg, " inter 2s ", " inter 100ms ");
    let servers: String = replicas.iter().map(|(name, addr)| format!("    server {name} {addr}\n")).collect();
    replace_once(&mut cfg, "    server cloud-1 10.0.0.11:7070\n    server cloud-2 10.0.0.12:7070\n", &servers);
    cfg
}

/// Holds every device at [`PAUSE_AT`] until the test has killed a replica.
#[derive(Default)]
struct Gate {
    state: Mutex<(usize, bool)>,
    changed: Condvar,
}

impl Gate {
    fn pause(&self) {
        let deadline = Instant::now() + PATIENCE;
        let mut g = self.state.lock().expect("gate");
        g.0 += 1;
        self.changed.notify_all();
        while !g.1 {
            let left = deadline.checked_duration_since(Instant::now()).expect("a device waited too long at the gate");
            g = self.changed.wait_timeout(g, left).expect("gate").0;
        }
    }

    fn wait_paused(&self, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        let mut g = self.state.lock().expect("gate");
        while g.0 < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                let reached = g.0;
                self.release_locked(&mut g);
                panic!("only {reached} of {n} devices reached token {PAUSE_AT}");
            };
            g = self.changed.wait_timeout(g, left).expect("gate").0;
        }
    }

    fn release_locked(&self, g: &mut (usize, bool)) {
        g.1 = true;
        self.changed.notify_all();
    }

    fn release(&self) {
        let mut g = self.state.lock().expect("gate");
        self.release_locked(&mut g);
    }
}

/// `haproxy` on PATH, or in the sbin folders a non-root PATH often lacks.
fn find_haproxy() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from);
    std::env::split_paths(&path).chain(sbin).map(|d| d.join("haproxy")).find(|f| f.is_file())
}

#[test]
fn replica_killed_mid_generation_behind_haproxy_devices_finish_identically() {
    let Some(haproxy) = find_haproxy() else {
        eprintln!("skipped: haproxy not installed; scripts/test.sh installs it");
        return;
    };
    let t0 = Instant::now();
    let package_dir = tempfile::tempdir().expect("tmp");
    let package = default_package(package_dir.path());
    let device = DeviceRuntime::open(&package.join("device")).expect("device");
    let cloud = CloudPackage::open(&package.join("cloud"), &Device::Cpu).expect("cloud");
    let prompts: Vec<Vec<u32>> = PROMPTS[..DEVICES].iter().map(|p| device.prompt_ids(p, false).expect("encode")).collect();
    let local: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut pipeline = LocalPipeline::new(&device.package, &cloud).expect("pipeline");
            generate(&mut pipeline, p, &greedy(NEW_TOKENS), |_| {}).expect("local").tokens
        })
        .collect();
    eprintln!("default package split and --mode local reference after {:.1} s", t0.elapsed().as_secs_f64());

    let mut replicas = [Some(serve(&cloud)), Some(serve(&cloud))];
    let other_dir = tempfile::tempdir().expect("tmp");
    let other = tiny_artifacts(other_dir.path(), &TinyLlama::default(), 1, 1);
    let wrong_model = serve(&CloudPackage::open(&other.join("cloud"), &Device::Cpu).expect("other cloud"));
    let addr = |i: usize| replicas[i].as_ref().expect("replica").local_addr();
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let cfg = config(&package, dir.path(), port, &[("cloud-1", addr(0)), ("cloud-2", addr(1)), ("wrong-model", wrong_model.local_addr())]);
    let mut balancer = Haproxy::start(&haproxy, dir.path(), &cfg);
    // The hello check lets the two replicas of this model in and keeps the other model out.
    balancer.wait_for(&[("cloud-1", "UP", "L7OK"), ("cloud-2", "UP", "L7OK"), ("wrong-model", "DOWN", "L7RSP")]);
    eprintln!("haproxy up with the hello check after {:.1} s", t0.elapsed().as_secs_f64());

    let gate = Gate::default();
    let (victim, open, gens) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..DEVICES)
            .map(|i| {
                let (device, prompt, gate) = (&device, &prompts[i], &gate);
                s.spawn(move || {
                    let mut opts = CloudOptions::new(format!("127.0.0.1:{port}"));
                    opts.retries = 10;
                    opts.backoff = Duration::from_millis(100);
                    opts.reply_timeout = Duration::from_secs(60);
                    let mode = if i % 2 == 0 { Mode::Hat { draft_len: 4 } } else { Mode::UShape };
                    let mut session = device.connect(opts).expect("connect through haproxy");
                    let mut n = 0;
                    let g = session.generate(prompt, &greedy(NEW_TOKENS), mode, |_| {
                        n += 1;
                        if n == PAUSE_AT {
                            gate.pause();
                        }
                    });
                    (mode, g.expect("generation survives the replica's death"))
                })
            })
            .collect();
        gate.wait_paused(DEVICES);
        let open: Vec<i64> = replicas.iter().map(|r| r.as_ref().expect("replica").metrics().sessions_open.get()).collect();
        let victim = if open[0] >= open[1] { 0 } else { 1 };
        replicas[victim].take().expect("victim").shutdown();
        gate.release();
        let gens: Vec<(Mode, Generation)> = handles.into_iter().map(|h| h.join().expect("device thread")).collect();
        (victim, open, gens)
    });

    assert_eq!(open.iter().sum::<i64>(), DEVICES as i64, "every device holds one session on a replica of its model: {open:?}");
    for (i, (mode, g)) in gens.iter().enumerate() {
        assert_eq!(g.tokens, local[i], "device {i} ({mode:?}): tokens differ from --mode local");
    }
    let reconnected = gens.iter().filter(|(_, g)| g.traffic.reconnects > 0).count();
    assert_eq!(reconnected as i64, open[victim], "exactly the devices of the killed replica reconnected: {open:?}");
    assert!(reconnected >= 1);
    let survivor = replicas[1 - victim].as_ref().expect("survivor").metrics();
    assert_eq!(survivor.sessions.get(), DEVICES as u64, "the killed replica's sessions were replayed on the survivor");
    let m = wrong_model.metrics();
    assert_eq!(m.sessions.get(), 0, "no device reached the other model's replica");
    assert!(m.errors.get_or_create(&vec![("code", "fingerprint".to_string())]).get() > 0, "the checks were refused there");
    eprintln!(
        "sessions per replica {open:?}, killed cloud-{}; {reconnected} device(s) reconnected and replayed; all {DEVICES} equal --mode local ({:.1} s)",
        victim + 1,
        t0.elapsed().as_secs_f64()
    );
}
