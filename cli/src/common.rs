//! Argument handling shared by several subcommands: secrets, emulated links, chunk sizes.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use hat_profiles::Profile;
use hat_runtime::{Chunking, ClientTls, CloudOptions, DeviceRuntime, DraftChoice, LinkEmulation, Overlap, WireDType, WireFormat};

/// Reads a shared secret from a file (whitespace around it is ignored).
pub fn read_token(path: &Path) -> Result<String> {
    let t = std::fs::read_to_string(path).with_context(|| format!("cannot read the auth token file {}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        bail!("the auth token file {} is empty", path.display());
    }
    Ok(t)
}

/// How the device reaches the cloud: `hat generate` and `hat serve device`.
#[derive(Args, Debug, Clone)]
pub struct CloudConnArgs {
    /// host:port of `hat serve cloud`.
    #[arg(long)]
    pub cloud: Option<String>,
    /// Number format of hidden states on the wire. f32 is bit-exact: greedy output equals
    /// `--mode local`. f16 and bf16 halve the traffic but round the states and can flip a near-tie.
    #[arg(long, value_enum, default_value_t = Wire::F32)]
    pub wire: Wire,
    /// Compress hidden states with zstd on the wire.
    #[arg(long)]
    pub zstd: bool,
    /// Emulate a link of this bandwidth (megabits per second, each direction) inside this process.
    #[arg(long)]
    pub link_mbps: Option<f64>,
    /// Emulate this round-trip time (milliseconds): each message is delayed by half of it.
    #[arg(long)]
    pub link_rtt_ms: Option<f64>,
    /// File holding the cloud's shared secret (see `hat serve cloud --auth-token-file`).
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// Reconnection attempts when the cloud connection drops.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// TLS from the device to the cloud.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// Connect in TLS, trusting the cloud certificates this CA signed (PEM file). Without it the
    /// link is plain TCP: anyone on the path can read the hidden states.
    #[arg(long, value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// This device's certificate chain (PEM), for a cloud that requires client certificates
    /// (`hat serve cloud --client-ca`). Needs --tls-key.
    #[arg(long, value_name = "PEM", requires = "tls_key", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the cloud's certificate must carry (default: the host part of --cloud). For a
    /// cloud reached through a tunnel or by IP under a DNS-named certificate.
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
    /// Send the auth token over plain TCP to a cloud that is not on this machine (refused
    /// otherwise: without TLS anyone on the path can read it).
    #[arg(long)]
    pub insecure_auth: bool,
}

impl ClientTlsArgs {
    /// The TLS settings, or `None` for plain TCP.
    pub fn client_tls(&self) -> Result<Option<ClientTls>> {
        let Some(ca) = &self.tls_ca else { return Ok(None) };
        let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        Ok(Some(ClientTls::from_pem_files(ca, identity, self.tls_server_name.clone())?))
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Wire {
    F32,
    F16,
    Bf16,
}

impl CloudConnArgs {
    pub fn check(&self) -> Result<()> {
        for (name, v) in [("--link-mbps", self.link_mbps), ("--link-rtt-ms", self.link_rtt_ms)] {
            if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
                bail!("{name} must be a finite number >= 0");
            }
        }
        if self.link_mbps == Some(0.0) {
            bail!("--link-mbps must be above 0");
        }
        Ok(())
    }

    /// Connection options for the cloud at `addr` (reads the auth token file).
    pub fn options(&self, addr: &str) -> Result<CloudOptions> {
        let mut opts = CloudOptions::new(addr);
        opts.wire = WireFormat {
            dtype: match self.wire {
                Wire::F32 => WireDType::F32,
                Wire::F16 => WireDType::F16,
                Wire::Bf16 => WireDType::Bf16,
            },
            zstd: self.zstd,
        };
        if self.link_mbps.is_some() || self.link_rtt_ms.is_some() {
            opts.link = Some(LinkEmulation::new(
                self.link_mbps.unwrap_or(f64::INFINITY),
                Duration::from_secs_f64(self.link_rtt_ms.unwrap_or(0.0) / 1e3),
            ));
        }
        if let Some(f) = &self.auth_token_file {
            opts.auth_token = Some(read_token(f).context("--auth-token-file")?);
        }
        opts.retries = self.retries;
        opts.tls = self.tls.client_tls()?;
        opts.insecure_auth = self.tls.insecure_auth;
        opts.check_transport()?;
        Ok(opts)
    }

    /// `f16`, `bf16+zstd`, ...
    pub fn wire_label(&self) -> String {
        format!("{:?}{}", self.wire, if self.zstd { "+zstd" } else { "" }).to_lowercase()
    }
}

/// The draft model and prompt chunking of HAT mode.
#[derive(Args, Debug, Clone)]
pub struct DraftArgs {
    /// Most tokens drafted per round in --mode hat (the feature head stops earlier when unsure).
    #[arg(long, default_value_t = 4)]
    pub draft_len: usize,
    /// The draft model of --mode hat: `feature` is the draft head in DIR/device/draft-head.safetensors
    /// (without a usable one, no drafting: U-shaped steps), `hat` the paper's adapter, `auto` the
    /// head when the package has one made for it, else the adapter.
    #[arg(long, value_enum, default_value_t = DraftArg::Auto)]
    pub draft_head: DraftArg,
    /// Confidence threshold of the feature head: drafting stops when its top-1 probability is
    /// below this (0 always drafts --draft-len tokens). Default: the one stored in the head.
    #[arg(long)]
    pub draft_threshold: Option<f32>,
    /// How --mode hat sends the prompt: `auto` picks a chunk size from DIR/device/profile.json
    /// (`hat profile`) and the link it measures, a number sends chunks of that many positions
    /// (pipelined), `off` sends it in one piece. Default: auto when a profile exists, else off.
    #[arg(long, value_name = "auto|off|N")]
    pub chunk_size: Option<ChunkArg>,
    /// Turn off the draft head's prompt lookup (drafting the tokens that followed the latest
    /// earlier occurrence of the last 2-4 tokens, when the head is unsure or agrees with it).
    #[arg(long)]
    pub no_prompt_lookup: bool,
    /// Draft while verifying: while a round is with the cloud, the draft head drafts the next one
    /// on the assumption that every draft is accepted, and that round goes out as soon as the
    /// verdict bears this out. Off by default: with the shipped head it gains nothing measurable
    /// (README, "The draft head").
    #[arg(long)]
    pub overlap: bool,
    /// Leaves per round at most (0: a plain chain of drafts). A leaf is the draft head's
    /// second choice beside one of its drafts (or its choice where it stopped drafting), verified
    /// in the same round as an extra row that sees only the drafts before it: where the model
    /// rejects a draft but picks the leaf, the round still gains the token. Greedy decoding only,
    /// and not with --overlap; the output is the same with or without.
    #[arg(long, default_value_t = hat_runtime::draft_head::DEFAULT_LEAVES)]
    pub draft_leaves: usize,
    /// A leaf is verified when the head's probability of it, times its probabilities of the
    /// drafts before it, reaches this.
    #[arg(long, default_value_t = hat_runtime::draft_head::DEFAULT_LEAF_THRESHOLD)]
    pub leaf_threshold: f32,
}

impl DraftArgs {
    /// The device runtime with these draft settings.
    pub fn apply(&self, device: DeviceRuntime) -> DeviceRuntime {
        device
            .with_draft_choice(self.draft_head.into(), self.draft_threshold)
            .with_lookup(!self.no_prompt_lookup)
            .with_overlap(if self.overlap { Overlap::WhileWaiting } else { Overlap::Off })
            .with_leaves(self.draft_leaves, self.leaf_threshold)
    }
}

/// `--draft-head`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum DraftArg {
    Auto,
    Feature,
    Hat,
}

impl From<DraftArg> for DraftChoice {
    fn from(a: DraftArg) -> Self {
        match a {
            DraftArg::Auto => DraftChoice::Auto,
            DraftArg::Feature => DraftChoice::Feature,
            DraftArg::Hat => DraftChoice::Hat,
        }
    }
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
