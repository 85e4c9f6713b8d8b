//! Where the cloud's middle submodel (and training) computes: `--device cpu|cuda[:N]`, in which
//! dtype (`--dtype`), and opening a GPU.
//!
//! A `cuda` build made by `scripts/build-cuda.sh` links against small filter libraries in place of
//! CUDA's (they hand every symbol over to the machine's real library when the loader finds one), so
//! it starts on any machine. [`open`] first checks that the real libraries are there, then starts the
//! driver and runs one kernel. Every failure on that road is one line that says what is missing and
//! what to do; nothing has started half-way when it is returned.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Result, RuntimeError};

/// What `--device` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    #[default]
    Cpu,
    /// A GPU by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for ComputeDevice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("`{s}`: expected cpu, cuda or cuda:N (a GPU's number, from 0)")),
            },
        }
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Whether this build has CUDA compiled in.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// The dtype `--dtype` names: f32, bf16 or f16, by candle's names for them (`DType::as_str` gives
/// them back).
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.parse::<DType>() {
        Ok(d @ (DType::F32 | DType::BF16 | DType::F16)) => Ok(d),
        _ => Err(format!("`{s}`: expected f32, bf16 or f16")),
    }
}

/// Opens `device`: the CPU, or a GPU after loading the CUDA libraries and running one kernel on it
/// (a driver too old for this build's kernels refuses them here, not in a device's first request).
pub fn open(device: ComputeDevice) -> Result<Device> {
    match device {
        ComputeDevice::Cpu => Ok(Device::Cpu),
        ComputeDevice::Cuda(n) => cuda::open(n).map_err(RuntimeError::Gpu),
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    pub fn open(_: usize) -> Result<candle_core::Device, String> {
        Err("--device cuda needs a hat built with CUDA: build one with scripts/build-cuda.sh (no CUDA toolkit needed), \
             or use --device cpu"
            .into())
    }
}

#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod cuda {
    use std::sync::OnceLock;

    use candle_core::cuda_backend::cudarc::driver::result as driver;
    use candle_core::{DType, Device, Tensor};
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};

    /// The libraries candle's CUDA backend calls into, in load order (cuBLAS needs cuBLASLt), with
    /// the names they go by. The runtime library is linked into `hat` statically.
    const LIBRARIES: &[(&str, &[&str])] = &[
        ("the CUDA driver", &["libcuda.so.1", "libcuda.so"]),
        ("NVRTC (CUDA 13)", &["libnvrtc.so.13", "libnvrtc.so"]),
        ("cuBLASLt (CUDA 13)", &["libcublasLt.so.13", "libcublasLt.so"]),
        ("cuBLAS (CUDA 13)", &["libcublas.so.13", "libcublas.so"]),
        ("cuRAND (CUDA 13)", &["libcurand.so.10", "libcurand.so"]),
    ];

    fn load_libraries() -> Result<(), String> {
        for (what, names) in LIBRARIES {
            // SAFETY: these are NVIDIA's own libraries; their initialisers have no preconditions.
            // Where the loader found them at start-up (as the filters' targets) this only takes a
            // reference; where it did not, `hat`'s CUDA symbols are the filters' own, so refuse.
            let lib = names.iter().find_map(|name| unsafe { Library::open(Some(*name), RTLD_NOW | RTLD_GLOBAL) }.ok());
            match lib {
                // Loaded for the life of the process: candle calls into them until exit.
                Some(lib) => std::mem::forget(lib),
                None if names[0] == "libcuda.so.1" => {
                    return Err("no CUDA driver here: libcuda.so.1 was not found. On a GPU machine, put the driver's directory \
                                on LD_LIBRARY_PATH (e.g. /usr/local/nvidia/lib64); otherwise use --device cpu"
                        .into())
                }
                None => {
                    return Err(format!(
                        "the CUDA library {} ({what}) was not found: put the directory holding CUDA 13's libraries on \
                         LD_LIBRARY_PATH (pip's nvidia/cu13/lib, as PyTorch installs it, or the toolkit's lib64)",
                        names[0]
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn open(ordinal: usize) -> Result<Device, String> {
        static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
        LOADED.get_or_init(load_libraries).clone()?;
        driver::init().map_err(|e| format!("the CUDA driver did not start ({e}): is a GPU present and its driver loaded?"))?;
        let count = driver::device::get_count().map_err(|e| format!("cannot count the GPUs: {e}"))?.max(0) as usize;
        if count == 0 {
            return Err("the CUDA driver sees no GPU on this machine: use --device cpu".into());
        }
        if ordinal >= count {
            let range = if count == 1 { "cuda:0".to_string() } else { format!("cuda:0 to cuda:{}", count - 1) };
            return Err(format!("cuda:{ordinal} asked for, but this machine has {count} GPU(s): {range}"));
        }
        let device = Device::new_cuda(ordinal).map_err(|e| format!("cannot open cuda:{ordinal}: {e}"))?;
        let probe = Tensor::ones(8, DType::F32, &device).and_then(|t| (t * 2.0)?.sum_all()?.to_scalar::<f32>());
        match probe {
            Ok(v) if v == 16.0 => Ok(device),
            Ok(v) => Err(format!("cuda:{ordinal} computed 2 x 8 ones as {v}: the GPU or its driver is broken")),
            Err(e) if e.to_string().contains("PTX") => Err(format!(
                "the GPU driver is too old for this build's kernels (CUDA 13.0): update the driver to the 580 series \
                 or newer ({e})"
            )),
            Err(e) => Err(format!("cuda:{ordinal} cannot run a kernel: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_print_back() {
        for (s, d) in [("cpu", ComputeDevice::Cpu), ("cuda", ComputeDevice::Cuda(0)), ("cuda:3", ComputeDevice::Cuda(3))] {
            assert_eq!(s.parse::<ComputeDevice>(), Ok(d));
        }
        assert_eq!(ComputeDevice::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA", "metal"] {
            let e = bad.parse::<ComputeDevice>().expect_err(bad);
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert_eq!(parse_dtype("bf16"), Ok(DType::BF16));
        assert!(parse_dtype("f64").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_cpu_build_refuses_cuda_in_one_line() {
        let e = open(ComputeDevice::Cuda(0)).expect_err("cpu build").to_string();
        assert!(e.contains("scripts/build-cuda.sh") && !e.contains('\n'), "{e}");
        assert!(open(ComputeDevice::Cpu).expect("cpu").is_cpu());
    }
}
