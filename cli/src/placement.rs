//! Where benchmark compute runs. In the field the cloud is another machine; on one machine, `hat bench
//! --spawn-cloud` and `hat profile` start the cloud as its own process pinned to its own cores and pin
//! themselves (the device) to the rest, so the two sides never compete for a core.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// The CPUs this process was allowed to run on before it pinned itself (read once, so a command
/// that starts several cloud processes in turn, like `hat loadtest`, splits the same CPUs each time).
pub fn allowed_cpus() -> Result<Vec<usize>> {
    static FIRST: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    if let Some(cpus) = FIRST.get() {
        return Ok(cpus.clone());
    }
    let set = sched_getaffinity(Pid::from_raw(0)).context("cannot read this process's CPU affinity")?;
    Ok(FIRST.get_or_init(|| (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect()).clone())
}

/// Pins this process (the calling thread and every thread it starts later) to `cpus`, and sizes
/// candle's thread pool to match. Call before any compute starts threads.
pub fn pin_self(cpus: &[usize]) -> Result<()> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).with_context(|| format!("CPU {c} does not exist"))?;
    }
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("cannot pin to CPUs {}", list(cpus)))?;
    // candle and rayon size their pools from this; threads beyond the pinned cores would only queue.
    std::env::set_var("RAYON_NUM_THREADS", cpus.len().to_string());
    Ok(())
}

/// `1,2,3` for the `--cpus` argument.
pub fn list(cpus: &[usize]) -> String {
    cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

/// A `--cpus` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpus(pub Vec<usize>);

impl std::str::FromStr for Cpus {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_cpus(s).map(Cpus)
    }
}

/// Parses `--cpus 0,2-3`.
pub fn parse_cpus(s: &str) -> std::result::Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("`{part}` is not a CPU number or range (e.g. 0,2-3)");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err("no CPUs given".into());
    }
    Ok(out)
}

/// How the allowed CPUs are shared out: the cloud gets the last `cloud_cores` (default half, at
/// least one), the device the rest. `None` when there is a single CPU.
pub fn split_cores(cloud_cores: Option<usize>) -> Result<Option<(Vec<usize>, Vec<usize>)>> {
    let cpus = allowed_cpus()?;
    if cpus.len() < 2 {
        return Ok(None);
    }
    let n = cloud_cores.unwrap_or(cpus.len() / 2);
    if n == 0 || n >= cpus.len() {
        bail!("--cloud-cores {n}: this machine has {} CPUs and the device needs at least one", cpus.len());
    }
    let (device, cloud) = cpus.split_at(cpus.len() - n);
    Ok(Some((device.to_vec(), cloud.to_vec())))
}

/// How `hat bench --spawn-cloud`, `hat profile` and `hat loadtest --spawn-cloud` start the cloud.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SpawnArgs {
    /// When hat starts the cloud: CPUs given to the cloud process (default: half of them).
    #[arg(long)]
    pub cloud_cores: Option<usize>,
    /// When hat starts the cloud: where it computes (its `--device`: cpu, cuda or cuda:N).
    #[arg(long, value_name = "DEVICE")]
    pub cloud_device: Option<hat_runtime::ComputeDevice>,
    /// When hat starts the cloud: its compute dtype (its `--dtype`: f32, bf16 or f16).
    #[arg(long, value_name = "DTYPE", value_parser = hat_runtime::gpu::parse_dtype)]
    pub cloud_dtype: Option<candle_core::DType>,
}

impl SpawnArgs {
    /// Refuses these options where hat does not start the cloud (`how` says what would).
    pub fn check(&self, spawns: bool, how: &str) -> Result<()> {
        if !spawns && (self.cloud_cores.is_some() || self.cloud_device.is_some() || self.cloud_dtype.is_some()) {
            bail!("--cloud-cores, --cloud-device and --cloud-dtype apply only when hat starts the cloud ({how})");
        }
        Ok(())
    }
}

/// A `hat serve cloud` child process; killed when dropped.
#[derive(Debug)]
pub struct CloudProcess {
    child: Child,
    pub addr: String,
    /// How device and cloud share the CPUs, for reports.
    pub placement: String,
}

impl CloudProcess {
    /// CPU seconds the process has used so far (user and system; /proc counts in USER_HZ, which is
    /// 100 on Linux whatever the kernel's tick).
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.child.id())
    }

    /// The process's peak resident memory so far (Linux `VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
        Some(kb * 1024)
    }
}

impl Drop for CloudProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `hat serve cloud` on a free loopback port in its own process on its own cores, and pins
/// this process (the device) to the others. With one CPU both share it, and the placement says so.
pub fn spawn_cloud_process(artifacts: &Path, token_baselines: bool, spawn: &SpawnArgs) -> Result<CloudProcess> {
    let mut extra = Vec::new();
    if token_baselines {
        extra.push("--token-baselines".to_string());
        extra.push(artifacts.join(hat_runtime::package::DEVICE_DIR).to_string_lossy().into_owned());
    }
    spawn_cloud_process_with(artifacts, &extra, spawn)
}

/// [`spawn_cloud_process`] with more `hat serve cloud` arguments.
pub fn spawn_cloud_process_with(artifacts: &Path, extra: &[String], spawn: &SpawnArgs) -> Result<CloudProcess> {
    let exe = std::env::current_exe().context("cannot find the hat executable")?;
    let mut cmd = Command::new(exe);
    cmd.args(["--quiet", "serve", "cloud", "--listen", "127.0.0.1:0", "--package"]).arg(artifacts.join(hat_runtime::package::CLOUD_DIR));
    cmd.args(extra);
    if let Some(device) = spawn.cloud_device {
        cmd.args(["--device".to_string(), device.to_string()]);
    }
    if let Some(dtype) = spawn.cloud_dtype {
        cmd.args(["--dtype", dtype.as_str()]);
    }
    let placement = match split_cores(spawn.cloud_cores)? {
        Some((device, cloud)) => {
            cmd.args(["--cpus", &list(&cloud)]);
            pin_self(&device)?;
            format!(
                "device on CPUs {} ({} threads), cloud process on CPUs {} ({} threads)",
                list(&device),
                device.len(),
                list(&cloud),
                cloud.len()
            )
        }
        None => "device and cloud process share the only CPU".to_string(),
    };
    let placement = match (spawn.cloud_device, spawn.cloud_dtype) {
        (None, None) => placement,
        (device, dtype) => format!(
            "{placement}; the cloud computes on {}{}",
            device.unwrap_or_default(),
            dtype.map(|d| format!(" in {}", d.as_str())).unwrap_or_default()
        ),
    };
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().context("cannot start `hat serve cloud`")?;
    let stdout = child.stdout.take().context("no stdout from `hat serve cloud`")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(std::result::Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(addr) = rx.recv_timeout(Duration::from_millis(100)) {
            return Ok(CloudProcess { child, addr, placement });
        }
        if let Some(status) = child.try_wait()? {
            bail!("`hat serve cloud` exited before listening ({status})");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("`hat serve cloud` did not start listening within 120 s");
        }
    }
}

/// The CPU time (user and system, all threads) process `pid` has used so far, from Linux's
/// `/proc/PID/stat`; `None` elsewhere.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name, which may itself hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's CPU time reads and grows with work; a process that does not exist has none.
    #[test]
    fn cpu_seconds_reads_a_process() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).expect("this process's stat");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut x = 0u64;
        // Spins until the reading has grown by 0.05 s (a few clock ticks), however busy the CPUs.
        while cpu_seconds(pid).expect("this process's stat") < before + 0.05 {
            assert!(Instant::now() < deadline, "20 s of spinning did not show in the CPU time");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        assert_eq!(cpu_seconds(u32::MAX), None);
    }

    #[test]
    fn cpu_lists_parse_and_bad_ones_say_why() {
        assert_eq!(parse_cpus("0,2-4"), Ok(vec![0, 2, 3, 4]));
        assert_eq!(parse_cpus("1"), Ok(vec![1]));
        assert!(parse_cpus("4-2").expect_err("reversed").contains("4-2"));
        assert!(parse_cpus("x").expect_err("word").contains("`x`"));
        assert!(parse_cpus("").is_err());
    }
}
