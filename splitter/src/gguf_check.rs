//! A strict walk over a GGUF header before candle's reader sees the file. candle 0.11 trusts lengths
//! and counts it reads (a huge string length allocates, `general.alignment = 0` divides by zero), so
//! every length here is bounded by the bytes actually left in the file, and every tensor's data range
//! must lie inside it.

use std::io::{BufReader, Read};
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
const MAX_DIMS: u32 = 4;
const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub name: String,
    /// GGUF order: the first dimension is the innermost.
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct GgufLayout {
    pub version: u32,
    pub alignment: u64,
    pub data_offset: u64,
    pub tensors: Vec<TensorEntry>,
}

/// (elements per block, bytes per block) of the ggml types hat can dequantize.
fn block_layout(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),     // F32
        1 => (1, 2),     // F16
        2 => (32, 18),   // Q4_0
        3 => (32, 20),   // Q4_1
        6 => (32, 22),   // Q5_0
        7 => (32, 24),   // Q5_1
        8 => (32, 34),   // Q8_0
        9 => (32, 36),   // Q8_1
        10 => (256, 84), // Q2_K
        11 => (256, 110),
        12 => (256, 144),
        13 => (256, 176),
        14 => (256, 210),
        15 => (256, 292),
        30 => (1, 2), // BF16
        _ => return None,
    })
}

struct Walker<R> {
    r: R,
    pos: u64,
    len: u64,
}

impl<R: Read> Walker<R> {
    fn remaining(&self) -> u64 {
        self.len - self.pos
    }

    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, String> {
        if n > self.remaining() {
            return Err(format!("{what} needs {n} bytes at offset {} but the file ends at {} (truncated?)", self.pos, self.len));
        }
        let mut buf = vec![0u8; n as usize];
        self.r.read_exact(&mut buf).map_err(|e| format!("read failed at offset {}: {e}", self.pos))?;
        self.pos += n;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.bytes(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.u64(what)?;
        let b = self.bytes(n, what)?;
        String::from_utf8(b).map_err(|_| format!("{what} is not UTF-8"))
    }

    /// Skips one metadata value, returning it as a number when it is a scalar integer.
    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Option<u64>, String> {
        let scalar = |size: u64, w: &mut Self| -> Result<Option<u64>, String> {
            let b = w.bytes(size, what)?;
            let mut a = [0u8; 8];
            a[..b.len()].copy_from_slice(&b);
            Ok(Some(u64::from_le_bytes(a)))
        };
        match ty {
            0 | 1 | 7 => scalar(1, self),
            2 | 3 => scalar(2, self),
            4..=6 => scalar(4, self),
            10..=12 => scalar(8, self),
            8 => self.string(what).map(|_| None),
            9 => {
                if depth > 2 {
                    return Err(format!("{what}: arrays nested too deeply"));
                }
                let elem = self.u32(what)?;
                let count = self.u64(what)?;
                // Every element takes at least one byte, so a count past the file's end is corrupt.
                if count > self.remaining() {
                    return Err(format!("{what}: array of {count} elements cannot fit in the file"));
                }
                for _ in 0..count {
                    self.value(elem, what, depth + 1)?;
                }
                Ok(None)
            }
            other => Err(format!("{what}: unknown metadata value type {other}")),
        }
    }
}

/// Validates the header and tensor layout of a GGUF file.
pub fn check(path: &Path) -> Result<GgufLayout, String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut w = Walker { r: BufReader::new(file), pos: 0, len };
    if w.bytes(4, "magic")?.as_slice() != MAGIC {
        return Err("missing GGUF magic bytes".into());
    }
    let version = w.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported (2 or 3)"));
    }
    let tensor_count = w.u64("tensor count")?;
    let kv_count = w.u64("metadata count")?;
    if tensor_count > w.remaining() / 24 || kv_count > w.remaining() / 12 {
        return Err(format!("header claims {tensor_count} tensors and {kv_count} metadata entries, more than the file can hold"));
    }
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..kv_count {
        let key = w.string("metadata key")?;
        let ty = w.u32(&key)?;
        let v = w.value(ty, &key, 0)?;
        if key == "general.alignment" {
            alignment = match (ty, v) {
                (0..=5, Some(a)) => a,
                _ => return Err("general.alignment must be an integer".into()),
            };
            if alignment == 0 || !alignment.is_power_of_two() {
                return Err(format!("general.alignment = {alignment} must be a non-zero power of two"));
            }
        }
    }
    let mut tensors = Vec::with_capacity(tensor_count as usize);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..tensor_count {
        let name = w.string("tensor name")?;
        if !seen.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        let n_dims = w.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"));
        }
        let dims = (0..n_dims).map(|_| w.u64(&name)).collect::<Result<Vec<_>, _>>()?;
        let ggml_type = w.u32(&name)?;
        let offset = w.u64(&name)?;
        let (block, block_bytes) =
            block_layout(ggml_type).ok_or_else(|| format!("tensor `{name}` has unsupported ggml type {ggml_type}"))?;
        let elems = dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(|| format!("tensor `{name}` is too large"))?;
        if dims[0] % block != 0 {
            return Err(format!("tensor `{name}`: first dimension {} is not a multiple of the block size {block}", dims[0]));
        }
        let bytes = (elems / block).checked_mul(block_bytes).ok_or_else(|| format!("tensor `{name}` is too large"))?;
        if offset % alignment != 0 {
            return Err(format!("tensor `{name}` offset {offset} is not aligned to {alignment}"));
        }
        tensors.push(TensorEntry { name, dims, ggml_type, offset, bytes });
    }
    let data_offset = w.pos.div_ceil(alignment) * alignment;
    for t in &tensors {
        let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.bytes));
        if end.is_none_or(|e| e > len) {
            return Err(format!("tensor `{}` data ends past the end of the file ({} bytes): truncated?", t.name, len));
        }
    }
    Ok(GgufLayout { version, alignment, data_offset, tensors })
}
