//! Instruction fetch: up to 15 bytes at CS.base + RIP, one page at a time.

use super::walk::{translate, GuestPhysRead, WalkError};
use super::{AccessKind, Bitness, CpuMode};
use core::fmt;

/// The longest x86 instruction, in bytes.
pub const MAX_INSN_LEN: usize = 15;

/// Up to 15 instruction bytes, as fetched (or as decoded, once trimmed to
/// the instruction length).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct InsnBytes {
    buf: [u8; MAX_INSN_LEN],
    len: u8,
}

impl InsnBytes {
    /// Bytes from a slice (at most 15 are kept).
    pub fn new(bytes: &[u8]) -> Self {
        let mut s = Self::default();
        let n = bytes.len().min(MAX_INSN_LEN);
        s.buf[..n].copy_from_slice(&bytes[..n]);
        s.len = n as u8;
        s
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..usize::from(self.len).min(MAX_INSN_LEN)]
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first `n` bytes.
    pub(super) fn truncated(&self, n: usize) -> Self {
        Self::new(&self.as_slice()[..n.min(self.len())])
    }
}

impl fmt::Display for InsnBytes {
    /// Space-separated hex bytes, e.g. `8b 47 10`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.as_slice().iter().enumerate() {
            if i != 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for InsnBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{self}]")
    }
}

/// Why the fetch stopped before 15 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchFault {
    /// The page holding `linear` does not translate.
    Walk { linear: u64, error: WalkError },
    /// `linear` translates to `gpa`, which is not readable guest RAM (for
    /// example MMIO, or beyond the end of RAM).
    Unreadable { linear: u64, gpa: u64 },
}

impl fmt::Display for FetchFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Walk { linear, error } => write!(f, "linear {linear:#x}: {error}"),
            Self::Unreadable { linear, gpa } => {
                write!(f, "linear {linear:#x} -> {gpa:#x} is not guest RAM")
            }
        }
    }
}

/// The bytes at CS:RIP and, if fewer than 15, why the fetch stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fetched {
    pub bytes: InsnBytes,
    pub stop: Option<FetchFault>,
}

/// Linear address of the instruction byte at `rip + i`: CS.base is ignored
/// in 64-bit mode; otherwise the offset wraps at the segment's operand width
/// (IP or EIP) and the linear address at 4 GiB.
fn linear_at(mode: &CpuMode, rip: u64, i: u64) -> u64 {
    match mode.bitness() {
        Bitness::B64 => rip.wrapping_add(i),
        Bitness::B32 => mode.cs_base.wrapping_add(rip.wrapping_add(i) & 0xffff_ffff) & 0xffff_ffff,
        Bitness::B16 => mode.cs_base.wrapping_add(rip.wrapping_add(i) & 0xffff) & 0xffff_ffff,
    }
}

/// Fetches up to 15 instruction bytes at CS.base + RIP, translating each
/// page separately. Stops early at the first byte that cannot be fetched;
/// that is only an error for the caller if the decoder needs the missing
/// bytes.
pub fn fetch<M: GuestPhysRead + ?Sized>(mode: &CpuMode, mem: &M, rip: u64) -> Fetched {
    let mut buf = [0u8; MAX_INSN_LEN];
    let mut got = 0usize;
    let mut stop = None;
    while got < MAX_INSN_LEN {
        let linear = linear_at(mode, rip, got as u64);
        // Bytes left in this page; also stop the run where the offset wraps
        // (16/32-bit), so every run is contiguous in linear space.
        let mut n = (0x1000 - (linear & 0xfff)).min((MAX_INSN_LEN - got) as u64) as usize;
        for k in 1..n {
            if linear_at(mode, rip, (got + k) as u64) != linear.wrapping_add(k as u64) {
                n = k;
                break;
            }
        }
        let gpa = match translate(mode, mem, linear, AccessKind::Fetch) {
            Ok(gpa) => gpa,
            Err(error) => {
                stop = Some(FetchFault::Walk { linear, error });
                break;
            }
        };
        if mem.read_phys(gpa, &mut buf[got..got + n]).is_err() {
            stop = Some(FetchFault::Unreadable { linear, gpa });
            break;
        }
        got += n;
    }
    Fetched {
        bytes: InsnBytes::new(&buf[..got]),
        stop,
    }
}
