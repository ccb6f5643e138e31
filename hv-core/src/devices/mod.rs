//! Device models. Each is plain state plus register semantics; a VM's
//! [`Machine`](crate::machine::Machine) maps them into its memory or port
//! address space as MMIO regions and dispatches accesses by region. Guests
//! control every value written here, so no input may panic.

pub mod debug_exit;
pub mod test_device;
pub mod uart;

use crate::memory::RegionId;
use alloc::vec::Vec;

/// A change of the VM's memory map that a device asks for (as PAM or BAR
/// registers do). All requests of one access are applied in one memory
/// transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryRequest {
    /// Move a region to a new address in its container.
    Move { region: RegionId, addr: u64 },
    /// Enable or disable a region.
    Enable { region: RegionId, on: bool },
}

/// What a device write asks of the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceOutcome {
    /// Nothing beyond the write itself.
    Done,
    /// Stop the VM with this exit status (isa-debug-exit).
    Exit(u32),
    /// Change the memory map.
    Memory(Vec<MemoryRequest>),
}

/// A device register block. Offsets are relative to the region; sizes are
/// 1, 2, 4 or 8 bytes.
pub trait Device {
    /// Reads `size` bytes at `offset`.
    fn read(&mut self, offset: u64, size: u8) -> u64;
    /// Writes `size` bytes at `offset`.
    fn write(&mut self, offset: u64, size: u8, value: u64) -> DeviceOutcome;
    /// Downcast support for the VM that owns the device.
    fn as_any(&mut self) -> &mut dyn core::any::Any;
}

/// All ones of an access size (what a read of nothing returns).
pub const fn all_ones(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}
