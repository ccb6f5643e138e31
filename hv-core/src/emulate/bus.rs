//! The buses [`execute`](super::execute) and [`string_io`](super::string_io)
//! perform accesses on, and what they report back.

use super::Mnemonic;
use core::fmt;

/// A failed bus access: the address and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusError {
    /// The guest-physical address of the access (the port number for a
    /// [`PortBus`] access).
    pub gpa: u64,
    pub reason: &'static str,
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}: {}", self.gpa, self.reason)
    }
}

/// Guest-physical memory as the instruction sees it: the implementer
/// dispatches each access to RAM, ROM or a device. `size` is 1, 2, 4 or 8
/// and the access never crosses a 4 KiB page; values are the low `size`
/// bytes, little-endian. The emulator never retries an access, so every
/// call is one access the guest made.
pub trait PhysBus {
    fn read(&mut self, gpa: u64, size: u8) -> Result<u64, BusError>;
    fn write(&mut self, gpa: u64, size: u8, value: u64) -> Result<(), BusError>;
}

/// I/O ports, for [`string_io`](super::string_io). `size` is 1, 2 or 4. A
/// read of a port without a device should return all ones, as on hardware.
/// A write error carries the port number in [`BusError::gpa`].
pub trait PortBus {
    fn read(&mut self, port: u16, size: u8) -> u64;
    fn write(&mut self, port: u16, size: u8, value: u64) -> Result<(), BusError>;
}

/// What one call of [`execute`](super::execute) or
/// [`string_io`](super::string_io) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Executed {
    pub mnemonic: Mnemonic,
    /// [`PhysBus`] reads and writes made.
    pub mem_accesses: u32,
    /// [`PortBus`] reads and writes made.
    pub port_accesses: u32,
    /// Iterations done: 1 for a non-string instruction, 0 for a `rep`
    /// string instruction with a zero count.
    pub iterations: u32,
    /// Whether the instruction completed (RIP advanced, RFLAGS.RF
    /// cleared). `false` only for a `rep` string instruction stopped early
    /// with its count not yet 0: RIP is left on it, so the guest runs it
    /// again (and may take an interrupt first).
    pub rip_advanced: bool,
}
