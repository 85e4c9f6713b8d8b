//! Argument handling shared by several subcommands: secrets, emulated links, chunk sizes.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use hat_profiles::Profile;
use hat_runtime::{Chunking, DeviceRuntime, LinkEmulation};

/// Reads a shared secret from a file (whitespace around it is ignored).
pub fn read_token(path: &Path) -> Result<String> {
    let t = std::fs::read_to_string(path).with_context(|| format!("cannot read the auth token file {}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("the auth token file {} is empty", path.display());
    }
    Ok(t)
}

/// An emulated link written `MBPS,RTT_MS[,JITTER_MS]`, e.g. `50,40` or `10,80,5`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkArg(pub LinkEmulation);

impl FromStr for LinkArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(',').map(str::trim).collect();
        if !(2..=3).contains(&parts.len()) {
            return Err(format!("`{s}`: write a link as MBPS,RTT_MS or MBPS,RTT_MS,JITTER_MS (e.g. 50,40)"));
        }
        let num = |p: &str, what: &str| -> std::result::Result<f64, String> {
            p.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| format!("`{s}`: {what} `{p}` is not a number >= 0"))
        };
        let mbps = num(parts[0], "bandwidth")?;
        if mbps == 0.0 {
            return Err(format!("`{s}`: the bandwidth must be above 0 Mbps"));
        }
        let rtt = Duration::from_secs_f64(num(parts[1], "RTT")? / 1e3);
        let jitter = match parts.get(2) {
            Some(p) => Duration::from_secs_f64(num(p, "jitter")? / 1e3),
            None => Duration::ZERO,
        };
        Ok(LinkArg(LinkEmulation { mbps, rtt, jitter }))
    }
}

impl LinkArg {
    pub fn label(&self) -> String {
        let l = &self.0;
        let mut s = format!("{} Mbps / {} ms", l.mbps, l.rtt.as_secs_f64() * 1e3);
        if !l.jitter.is_zero() {
            s += &format!(" ±{} ms", l.jitter.as_secs_f64() * 1e3);
        }
        s
    }
}

/// `--chunk-size`: `auto` (from the profile table and the measured link), `off` (one piece) or a
/// number of positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkArg {
    Auto,
    Off,
    Fixed(usize),
}

impl FromStr for ChunkArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(ChunkArg::Auto),
            "off" | "none" => Ok(ChunkArg::Off),
            n => match n.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!("`{s}`: use auto, off, or a chunk size of at least 1 position")),
                Ok(n) => Ok(ChunkArg::Fixed(n)),
            },
        }
    }
}

/// Resolves `--chunk-size`. With no flag, `auto` is used when the device package has a profile, and
/// the prompt goes in one piece (with a note) when it does not.
pub fn chunking(arg: Option<ChunkArg>, device: &DeviceRuntime, quiet: bool) -> Result<Chunking> {
    let fingerprint = &device.package.manifest.fingerprint;
    Ok(match arg {
        Some(ChunkArg::Off) => Chunking::Whole,
        Some(ChunkArg::Fixed(n)) => Chunking::Fixed(n),
        Some(ChunkArg::Auto) => Chunking::Auto(Arc::new(Profile::load(&device.package.dir, fingerprint)?.table)),
        None => match Profile::load_if_present(&device.package.dir, fingerprint)? {
            Some(p) => Chunking::Auto(Arc::new(p.table)),
            None => {
                if !quiet {
                    let path = Profile::path(&device.package.dir);
                    eprintln!("note: no {} yet, so the prompt goes in one piece (run `hat profile` for chunked prefill)", path.display());
                }
                Chunking::Whole
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_parse_and_bad_ones_say_why() {
        let l: LinkArg = "50,40".parse().expect("link");
        assert_eq!(l.0, LinkEmulation::new(50.0, Duration::from_millis(40)));
        let j: LinkArg = "10, 80, 5".parse().expect("link with jitter");
        assert_eq!(j.0.jitter, Duration::from_millis(5));
        assert_eq!(j.label(), "10 Mbps / 80 ms ±5 ms");
        assert!("50".parse::<LinkArg>().expect_err("refused").contains("MBPS,RTT_MS"));
        assert!("0,40".parse::<LinkArg>().expect_err("refused").contains("above 0"));
        assert!("x,40".parse::<LinkArg>().expect_err("refused").contains("not a number"));
    }

    #[test]
    fn chunk_sizes_parse() {
        assert_eq!("auto".parse::<ChunkArg>(), Ok(ChunkArg::Auto));
        assert_eq!("off".parse::<ChunkArg>(), Ok(ChunkArg::Off));
        assert_eq!("96".parse::<ChunkArg>(), Ok(ChunkArg::Fixed(96)));
        assert!("0".parse::<ChunkArg>().is_err());
        assert!("big".parse::<ChunkArg>().is_err());
    }
}
