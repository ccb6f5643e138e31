//! PCI functions: configuration space, BARs, capabilities and MSI-X.
//!
//! A device that is a PCI function owns a [`PciConfig`] and hands it to the
//! machine through [`Device::pci`](crate::devices::Device::pci). The machine
//! routes configuration accesses (the host bridge's CF8/CFC ports and its
//! ECAM window, `machine.rs`) to it: [`PciConfig::write`] applies the
//! guest-writable and write-1-to-clear masks exactly as QEMU's
//! `pci_default_write_config`, [`PciConfig::after_write`] reacts to MSI-X
//! enable/mask changes (`msix_write_config`), and the machine then maps,
//! moves or unmaps the BARs ([`PciConfig::bar_address`], QEMU's
//! `pci_bar_address`) and switches the function's bus-master address space,
//! all in one memory transaction.
//!
//! The configuration space is 4 KiB (PCI Express size); a conventional
//! function simply leaves the extended space (0x100..0x1000) at zero. The
//! device-specific part of the 256-byte space (0x40..0x100) is
//! guest-writable, as QEMU's `pci_init_wmask` makes it, except capability
//! bytes, which are read-only unless the device sets masks
//! ([`PciConfig::set_wmask_u8`] and friends).
//!
//! MSI-X tables and pending-bit arrays live here too; the device maps them
//! in one of its BAR regions and forwards the accesses
//! ([`PciConfig::msix_table_read`], [`PciConfig::msix_table_write`],
//! [`PciConfig::msix_pba_read`]).
//!
//! Guests control every value written here, so nothing may panic: offsets
//! are checked, bytes outside the space read as all ones and writes to them
//! are dropped.

pub mod host;
mod msix;
#[cfg(test)]
mod tests;

use crate::devices::{RegionIndex, StateError};
use alloc::vec;
use alloc::vec::Vec;

// ---------------------------------------------------------------------------
// Type-0 header (PCI Local Bus 3.0, 6.1; Linux `pci_regs.h` names)
// ---------------------------------------------------------------------------

pub const PCI_VENDOR_ID: u16 = 0x00;
pub const PCI_DEVICE_ID: u16 = 0x02;
pub const PCI_COMMAND: u16 = 0x04;
pub const PCI_STATUS: u16 = 0x06;
pub const PCI_REVISION_ID: u16 = 0x08;
/// Programming interface (class code bits 7:0).
pub const PCI_CLASS_PROG: u16 = 0x09;
/// Sub-class (low byte) and base class (high byte).
pub const PCI_CLASS_DEVICE: u16 = 0x0a;
pub const PCI_CACHE_LINE_SIZE: u16 = 0x0c;
pub const PCI_LATENCY_TIMER: u16 = 0x0d;
pub const PCI_HEADER_TYPE: u16 = 0x0e;
pub const PCI_BIST: u16 = 0x0f;
/// BAR 0; BAR n is at `PCI_BASE_ADDRESS_0 + 4 * n`.
pub const PCI_BASE_ADDRESS_0: u16 = 0x10;
pub const PCI_CARDBUS_CIS: u16 = 0x28;
pub const PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
pub const PCI_SUBSYSTEM_ID: u16 = 0x2e;
pub const PCI_ROM_ADDRESS: u16 = 0x30;
/// Offset of the first capability (valid when `PCI_STATUS_CAP_LIST` is set).
pub const PCI_CAPABILITY_LIST: u16 = 0x34;
pub const PCI_INTERRUPT_LINE: u16 = 0x3c;
/// INTx pin (1 = INTA#, 0 = none).
pub const PCI_INTERRUPT_PIN: u16 = 0x3d;
pub const PCI_MIN_GNT: u16 = 0x3e;
pub const PCI_MAX_LAT: u16 = 0x3f;
/// End of the standard header; capabilities go after it.
pub const PCI_CONFIG_HEADER_SIZE: u16 = 0x40;
/// Size of a conventional function's configuration space.
pub const PCI_CONFIG_SPACE_SIZE: u16 = 0x100;
/// Size of a PCI Express function's configuration space (what
/// [`PciConfig`] holds).
pub const PCIE_CONFIG_SPACE_SIZE: u16 = 0x1000;
/// BARs of a type-0 header.
pub const PCI_NUM_BARS: u8 = 6;
pub const PCI_HEADER_TYPE_NORMAL: u8 = 0;

// COMMAND bits.
pub const PCI_COMMAND_IO: u16 = 0x1;
pub const PCI_COMMAND_MEMORY: u16 = 0x2;
pub const PCI_COMMAND_MASTER: u16 = 0x4;
pub const PCI_COMMAND_SERR: u16 = 0x100;
pub const PCI_COMMAND_INTX_DISABLE: u16 = 0x400;

// STATUS bits.
pub const PCI_STATUS_INTERRUPT: u16 = 0x08;
pub const PCI_STATUS_CAP_LIST: u16 = 0x10;
pub const PCI_STATUS_PARITY: u16 = 0x100;
pub const PCI_STATUS_SIG_TARGET_ABORT: u16 = 0x800;
pub const PCI_STATUS_REC_TARGET_ABORT: u16 = 0x1000;
pub const PCI_STATUS_REC_MASTER_ABORT: u16 = 0x2000;
pub const PCI_STATUS_SIG_SYSTEM_ERROR: u16 = 0x4000;
pub const PCI_STATUS_DETECTED_PARITY: u16 = 0x8000;

// BAR low bits.
pub const PCI_BASE_ADDRESS_SPACE_IO: u32 = 0x1;
pub const PCI_BASE_ADDRESS_MEM_TYPE_64: u32 = 0x4;
pub const PCI_BASE_ADDRESS_MEM_PREFETCH: u32 = 0x8;

// Capabilities.
/// Offset of the capability ID in a capability.
pub const PCI_CAP_LIST_ID: u8 = 0;
/// Offset of the next-capability pointer in a capability.
pub const PCI_CAP_LIST_NEXT: u8 = 1;
pub const PCI_CAP_ID_VNDR: u8 = 0x09;
pub const PCI_CAP_ID_MSIX: u8 = 0x11;

// MSI-X capability (PCI Local Bus 3.0, 6.8.2) and table entries.
/// Message control (16 bits) in the MSI-X capability.
pub const PCI_MSIX_FLAGS: u8 = 2;
/// Table size - 1.
pub const PCI_MSIX_FLAGS_QSIZE: u16 = 0x07ff;
pub const PCI_MSIX_FLAGS_MASKALL: u16 = 0x4000;
pub const PCI_MSIX_FLAGS_ENABLE: u16 = 0x8000;
/// Table offset | BIR (32 bits).
pub const PCI_MSIX_TABLE: u8 = 4;
/// PBA offset | BIR (32 bits).
pub const PCI_MSIX_PBA: u8 = 8;
pub const PCI_MSIX_BIR_MASK: u32 = 0x7;
pub const PCI_MSIX_CAP_LEN: u8 = 12;
pub const PCI_MSIX_ENTRY_SIZE: u64 = 16;
pub const PCI_MSIX_ENTRY_LOWER_ADDR: u64 = 0;
pub const PCI_MSIX_ENTRY_UPPER_ADDR: u64 = 4;
pub const PCI_MSIX_ENTRY_DATA: u64 = 8;
pub const PCI_MSIX_ENTRY_VECTOR_CTRL: u64 = 12;
pub const PCI_MSIX_ENTRY_CTRL_MASKBIT: u32 = 0x1;
/// Largest MSI-X table.
pub const PCI_MSIX_MAX_VECTORS: u16 = 2048;

/// Where a bus/device/function sits: `devfn` = device << 3 | function.
pub const fn devfn(device: u8, function: u8) -> u8 {
    (device << 3) | (function & 7)
}

/// What kind of address a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32 {
        prefetch: bool,
    },
    /// Takes two BAR registers (`bar` and `bar + 1`).
    Mem64 {
        prefetch: bool,
    },
}

impl BarKind {
    /// The BAR register's read-only low bits.
    pub const fn flags(self) -> u32 {
        match self {
            Self::Io => PCI_BASE_ADDRESS_SPACE_IO,
            Self::Mem32 { prefetch } => {
                if prefetch {
                    PCI_BASE_ADDRESS_MEM_PREFETCH
                } else {
                    0
                }
            }
            Self::Mem64 { prefetch } => {
                PCI_BASE_ADDRESS_MEM_TYPE_64
                    | if prefetch {
                        PCI_BASE_ADDRESS_MEM_PREFETCH
                    } else {
                        0
                    }
            }
        }
    }

    pub const fn is_io(self) -> bool {
        matches!(self, Self::Io)
    }
}

/// A declared BAR: its kind, size and the device region it maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    pub kind: BarKind,
    pub size: u64,
    /// The device's region (by index) that the machine maps at the BAR's
    /// address.
    pub region: RegionIndex,
}

/// Identity of a function (the read-only header fields).
#[derive(Clone, Copy, Debug)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
    /// 24-bit class code: class << 16 | subclass << 8 | programming interface.
    pub class: u32,
    pub revision: u8,
}

/// Why a function could not be set up as asked. These are errors of the
/// device model's setup, never of guest input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciError {
    /// No such BAR register (or no room for the upper half of a 64-bit BAR).
    NoSuchBar(u8),
    /// The BAR register (or one of the pair) is already declared.
    BarInUse(u8),
    /// A BAR size must be a power of two, at least 16 bytes for memory and 4
    /// for I/O, at most 2 GiB for 32-bit memory, 64 KiB for I/O and 2^63 for
    /// 64-bit memory.
    BadBarSize(u64),
    /// A capability is at least 2 bytes (ID and next pointer) and fits in
    /// the 192 bytes after the header.
    BadCapabilityLength(u8),
    /// No free room left for a capability in 0x40..0x100.
    NoCapabilitySpace,
    /// MSI-X was set up already.
    MsixPresent,
    /// Bad MSI-X layout: vector count, BAR, offsets or overlap.
    BadMsix(&'static str),
}

impl core::fmt::Display for PciError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoSuchBar(b) => write!(f, "no BAR register {b}"),
            Self::BarInUse(b) => write!(f, "BAR {b} is declared already"),
            Self::BadBarSize(s) => write!(f, "bad BAR size {s:#x}"),
            Self::BadCapabilityLength(l) => write!(f, "bad capability length {l}"),
            Self::NoCapabilitySpace => write!(f, "no room left for a capability"),
            Self::MsixPresent => write!(f, "MSI-X is set up already"),
            Self::BadMsix(why) => write!(f, "bad MSI-X layout: {why}"),
        }
    }
}

/// MSI-X state: the capability's place, the vector table and the pending
/// bits.
#[derive(Clone, Debug)]
struct Msix {
    cap: u8,
    vectors: u16,
    /// `vectors` entries of 16 bytes (address low, high, data, control).
    table: Vec<u8>,
    /// One bit per vector, in 64-bit words (QEMU's size).
    pba: Vec<u8>,
    /// Whether the function was masked (disabled or mask-all) at the last
    /// [`PciConfig::after_write`]: the state a config write changes from.
    function_masked: bool,
}

/// One function's configuration space with QEMU's masks: `wmask` (bits the
/// guest may write), `w1cmask` (bits a guest 1 clears) and `cmask` (bytes
/// an incoming migration must agree on).
#[derive(Clone)]
pub struct PciConfig {
    config: Vec<u8>,
    wmask: Vec<u8>,
    w1cmask: Vec<u8>,
    cmask: Vec<u8>,
    /// Bytes of the 256-byte space taken by capabilities.
    used: [bool; PCI_CONFIG_SPACE_SIZE as usize],
    bars: [Option<BarInfo>; PCI_NUM_BARS as usize],
    msix: Option<Msix>,
}

/// The configuration-space offset of BAR register `bar`.
const fn bar_offset(bar: u8) -> u16 {
    PCI_BASE_ADDRESS_0 + 4 * bar as u16
}

impl PciConfig {
    /// A type-0 function with these identities; command 0, no BARs, no
    /// capabilities.
    pub fn new(ids: PciIds) -> Self {
        let size = usize::from(PCIE_CONFIG_SPACE_SIZE);
        let mut c = Self {
            config: vec![0; size],
            wmask: vec![0; size],
            w1cmask: vec![0; size],
            cmask: vec![0; size],
            used: [false; PCI_CONFIG_SPACE_SIZE as usize],
            bars: [None; PCI_NUM_BARS as usize],
            msix: None,
        };
        c.set_u16(PCI_VENDOR_ID, ids.vendor);
        c.set_u16(PCI_DEVICE_ID, ids.device);
        c.set_u32(
            PCI_REVISION_ID,
            ((ids.class & 0xFF_FFFF) << 8) | u32::from(ids.revision),
        );
        c.set_u8(PCI_HEADER_TYPE, PCI_HEADER_TYPE_NORMAL);
        c.set_u16(PCI_SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        c.set_u16(PCI_SUBSYSTEM_ID, ids.subsystem);
        // QEMU pci_init_cmask.
        put(&mut c.cmask, PCI_VENDOR_ID, 2, 0xFFFF);
        put(&mut c.cmask, PCI_DEVICE_ID, 2, 0xFFFF);
        put(&mut c.cmask, PCI_STATUS, 1, PCI_STATUS_CAP_LIST.into());
        put(&mut c.cmask, PCI_REVISION_ID, 4, 0xFFFF_FFFF);
        put(&mut c.cmask, PCI_HEADER_TYPE, 1, 0xFF);
        put(&mut c.cmask, PCI_CAPABILITY_LIST, 1, 0xFF);
        // QEMU pci_init_wmask (with the SERR enable its default gives).
        put(&mut c.wmask, PCI_CACHE_LINE_SIZE, 1, 0xFF);
        put(&mut c.wmask, PCI_INTERRUPT_LINE, 1, 0xFF);
        let cmd = PCI_COMMAND_IO
            | PCI_COMMAND_MEMORY
            | PCI_COMMAND_MASTER
            | PCI_COMMAND_SERR
            | PCI_COMMAND_INTX_DISABLE;
        put(&mut c.wmask, PCI_COMMAND, 2, cmd.into());
        let dev_specific = usize::from(PCI_CONFIG_HEADER_SIZE)..usize::from(PCI_CONFIG_SPACE_SIZE);
        c.wmask[dev_specific].fill(0xFF);
        // QEMU pci_init_w1cmask.
        let w1c = PCI_STATUS_PARITY
            | PCI_STATUS_SIG_TARGET_ABORT
            | PCI_STATUS_REC_TARGET_ABORT
            | PCI_STATUS_REC_MASTER_ABORT
            | PCI_STATUS_SIG_SYSTEM_ERROR
            | PCI_STATUS_DETECTED_PARITY;
        put(&mut c.w1cmask, PCI_STATUS, 2, w1c.into());
        c.used[..usize::from(PCI_CONFIG_HEADER_SIZE)].fill(true);
        c
    }

    // -----------------------------------------------------------------
    // Device setup: plain access, no masks
    // -----------------------------------------------------------------

    pub fn get_u8(&self, off: u16) -> u8 {
        get(&self.config, off, 1) as u8
    }
    pub fn get_u16(&self, off: u16) -> u16 {
        get(&self.config, off, 2) as u16
    }
    pub fn get_u32(&self, off: u16) -> u32 {
        get(&self.config, off, 4)
    }
    pub fn set_u8(&mut self, off: u16, v: u8) {
        put(&mut self.config, off, 1, v.into());
    }
    pub fn set_u16(&mut self, off: u16, v: u16) {
        put(&mut self.config, off, 2, v.into());
    }
    pub fn set_u32(&mut self, off: u16, v: u32) {
        put(&mut self.config, off, 4, v);
    }
    /// Makes bits guest-writable (1 = writable) for a device-specific
    /// register, e.g. inside a vendor capability.
    pub fn set_wmask_u8(&mut self, off: u16, mask: u8) {
        put(&mut self.wmask, off, 1, mask.into());
    }
    pub fn set_wmask_u16(&mut self, off: u16, mask: u16) {
        put(&mut self.wmask, off, 2, mask.into());
    }
    pub fn set_wmask_u32(&mut self, off: u16, mask: u32) {
        put(&mut self.wmask, off, 4, mask);
    }

    // -----------------------------------------------------------------
    // Guest access
    // -----------------------------------------------------------------

    /// A configuration read of `size` (1, 2 or 4) bytes at `off`; bytes at
    /// or past 4 KiB read as all ones.
    pub fn read(&self, off: u16, size: u8) -> u32 {
        (0..u16::from(size.min(4))).fold(0, |v, i| {
            let b = off
                .checked_add(i)
                .and_then(|a| self.config.get(usize::from(a)))
                .copied()
                .unwrap_or(0xFF);
            v | (u32::from(b) << (8 * i))
        })
    }

    /// A configuration write, as QEMU's `pci_default_write_config`: each
    /// byte takes the written bits its `wmask` allows, then the written ones
    /// clear its `w1cmask` bits. Bytes at or past 4 KiB are dropped. The
    /// caller follows with [`PciConfig::after_write`] and the BAR update.
    pub fn write(&mut self, off: u16, size: u8, value: u32) {
        for i in 0..u16::from(size.min(4)) {
            let Some(a) = off.checked_add(i).map(usize::from) else {
                break;
            };
            let (Some(&wm), Some(&w1c)) = (self.wmask.get(a), self.w1cmask.get(a)) else {
                break;
            };
            let v = (value >> (8 * i)) as u8;
            let b = &mut self.config[a];
            *b = (*b & !wm) | (v & wm);
            *b &= !(v & w1c);
        }
    }

    pub fn command(&self) -> u16 {
        self.get_u16(PCI_COMMAND)
    }

    /// Whether the function may master the bus (DMA, MSI writes).
    pub fn bus_master(&self) -> bool {
        self.command() & PCI_COMMAND_MASTER != 0
    }

    // -----------------------------------------------------------------
    // BARs
    // -----------------------------------------------------------------

    /// Declares BAR `bar` (QEMU `pci_register_bar`): its register holds the
    /// kind's flags, the bits below `size` are read-only (so writing all
    /// ones reads back `!(size - 1) | flags`), a 64-bit BAR also takes
    /// register `bar + 1` for the upper half.
    pub fn declare_bar(
        &mut self,
        bar: u8,
        kind: BarKind,
        size: u64,
        region: RegionIndex,
    ) -> Result<(), PciError> {
        let wide = matches!(kind, BarKind::Mem64 { .. });
        let last = if wide { bar.checked_add(1) } else { Some(bar) };
        let last = last
            .filter(|&l| l < PCI_NUM_BARS)
            .ok_or(PciError::NoSuchBar(bar))?;
        for b in bar..=last {
            if self.bar_slot_taken(b) {
                return Err(PciError::BarInUse(b));
            }
        }
        let (min, max) = match kind {
            BarKind::Io => (4, 1 << 16),
            BarKind::Mem32 { .. } => (16, 1 << 31),
            BarKind::Mem64 { .. } => (16, 1 << 63),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciError::BadBarSize(size));
        }
        let off = bar_offset(bar);
        let wmask = !(size - 1);
        self.set_u32(off, kind.flags());
        put(&mut self.wmask, off, 4, wmask as u32);
        put(&mut self.cmask, off, 4, u32::MAX);
        if wide {
            self.set_u32(off + 4, 0);
            put(&mut self.wmask, off + 4, 4, (wmask >> 32) as u32);
            put(&mut self.cmask, off + 4, 4, u32::MAX);
        }
        self.bars[usize::from(bar)] = Some(BarInfo { kind, size, region });
        Ok(())
    }

    /// Whether register `b` belongs to a declared BAR (itself or the upper
    /// half of the 64-bit BAR below it).
    fn bar_slot_taken(&self, b: u8) -> bool {
        let own = self.bars.get(usize::from(b)).is_some_and(|x| x.is_some());
        let upper = b
            .checked_sub(1)
            .and_then(|l| self.bars.get(usize::from(l)).copied().flatten())
            .is_some_and(|i| matches!(i.kind, BarKind::Mem64 { .. }));
        own || upper
    }

    /// The BAR declared at register `bar` (the lower register of a 64-bit
    /// one).
    pub fn bar(&self, bar: u8) -> Option<BarInfo> {
        self.bars.get(usize::from(bar)).copied().flatten()
    }

    /// Every declared BAR, by register.
    pub fn bars(&self) -> impl Iterator<Item = (u8, BarInfo)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i as u8, b)))
    }

    /// Where BAR `bar` is mapped now (QEMU `pci_bar_address`), or `None`
    /// when unmapped: the BAR is not declared, its decoder (COMMAND I/O or
    /// memory) is off, its address is 0, the range wraps or ends at the last
    /// byte of the address space, a 32-bit memory BAR ends at or above
    /// 0xFFFF_FFFF (QEMU's work-around), or an I/O BAR ends above 0xFFFF
    /// (the PC's port space; QEMU lets it reach 4 GiB, where nothing
    /// decodes it).
    pub fn bar_address(&self, bar: u8) -> Option<u64> {
        let info = self.bar(bar)?;
        let cmd = self.command();
        let off = bar_offset(bar);
        let mask = !(info.size - 1);
        let (addr, limit) = match info.kind {
            BarKind::Io => {
                if cmd & PCI_COMMAND_IO == 0 {
                    return None;
                }
                (u64::from(self.get_u32(off)) & mask, 0xFFFF)
            }
            BarKind::Mem32 { .. } => {
                if cmd & PCI_COMMAND_MEMORY == 0 {
                    return None;
                }
                (u64::from(self.get_u32(off)) & mask, 0xFFFF_FFFE)
            }
            BarKind::Mem64 { .. } => {
                if cmd & PCI_COMMAND_MEMORY == 0 {
                    return None;
                }
                let lo = u64::from(self.get_u32(off));
                let hi = u64::from(self.get_u32(off + 4));
                ((hi << 32 | lo) & mask, u64::MAX - 1)
            }
        };
        let last = addr.checked_add(info.size - 1)?;
        (addr != 0 && last <= limit).then_some(addr)
    }

    // -----------------------------------------------------------------
    // Capabilities
    // -----------------------------------------------------------------

    /// Adds a capability of `len` bytes (QEMU `pci_add_capability` with
    /// automatic placement): the first free dword-aligned room after the
    /// header, linked at the head of the list, `STATUS.CAP_LIST` set. Its
    /// bytes are read-only for the guest (the device sets masks for
    /// writable fields) and must match on migration. Returns its offset.
    pub fn add_capability(&mut self, id: u8, len: u8) -> Result<u8, PciError> {
        let room = PCI_CONFIG_SPACE_SIZE - PCI_CONFIG_HEADER_SIZE;
        if len < 2 || u16::from(len) > room {
            return Err(PciError::BadCapabilityLength(len));
        }
        let n = usize::from(len);
        let start = (usize::from(PCI_CONFIG_HEADER_SIZE)..usize::from(PCI_CONFIG_SPACE_SIZE))
            .step_by(4)
            .find(|&s| {
                self.used
                    .get(s..s + n)
                    .is_some_and(|r| r.iter().all(|u| !u))
            })
            .ok_or(PciError::NoCapabilitySpace)?;
        let off = start as u8;
        let next = self.get_u8(PCI_CAPABILITY_LIST);
        self.set_u8(start as u16, id);
        self.set_u8(start as u16 + 1, next);
        self.set_u8(PCI_CAPABILITY_LIST, off);
        let status = self.get_u16(PCI_STATUS) | PCI_STATUS_CAP_LIST;
        self.set_u16(PCI_STATUS, status);
        let end = (start + n).next_multiple_of(4).min(self.used.len());
        self.used[start..end].fill(true);
        self.wmask[start..start + n].fill(0);
        self.w1cmask[start..start + n].fill(0);
        self.cmask[start..start + n].fill(0xFF);
        Ok(off)
    }

    /// The offset of the first capability with this ID, walking the list as
    /// a driver does (at most 48 steps, so a looping list ends).
    pub fn find_capability(&self, id: u8) -> Option<u8> {
        self.capabilities().find(|&(_, i)| i == id).map(|(o, _)| o)
    }

    /// The capability list as a driver walks it: (offset, ID).
    pub fn capabilities(&self) -> impl Iterator<Item = (u8, u8)> + '_ {
        let first = if self.get_u16(PCI_STATUS) & PCI_STATUS_CAP_LIST != 0 {
            self.get_u8(PCI_CAPABILITY_LIST) & !3
        } else {
            0
        };
        let mut at = first;
        (0..48).map_while(move |_| {
            if at < PCI_CONFIG_HEADER_SIZE as u8 {
                return None;
            }
            let here = at;
            at = self.get_u8(u16::from(here) + 1) & !3;
            Some((here, self.get_u8(here.into())))
        })
    }

    // -----------------------------------------------------------------
    // Migration
    // -----------------------------------------------------------------

    /// Bytes [`PciConfig::save`] writes: the 4 KiB space, then the MSI-X
    /// table and pending bits if the function has MSI-X.
    pub fn state_len(&self) -> usize {
        self.config.len()
            + self
                .msix
                .as_ref()
                .map_or(0, |m| m.table.len() + m.pba.len())
    }

    /// Bytes of the MSI-X table and of the PBA in [`PciConfig::save`]'s
    /// output (0, 0 without MSI-X).
    pub fn msix_state_lens(&self) -> (usize, usize) {
        self.msix
            .as_ref()
            .map_or((0, 0), |m| (m.table.len(), m.pba.len()))
    }

    /// Appends the configuration space, the MSI-X table and the PBA.
    pub fn save(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.config);
        if let Some(m) = &self.msix {
            out.extend_from_slice(&m.table);
            out.extend_from_slice(&m.pba);
        }
    }

    /// Replaces the state with a saved one. Refused (nothing changed) if
    /// the length is not [`PciConfig::state_len`], if a byte the device
    /// fixed (ids, class, header type, BAR flags and sizes, capability
    /// layout: QEMU's `cmask`, minus guest-writable bits) differs, or if
    /// pending bits are set past the last vector. The caller recomputes the
    /// mappings (the machine does after a device load).
    pub fn load(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        if bytes.len() != self.state_len() {
            return Err(StateError::Length {
                expected: self.state_len(),
                got: bytes.len(),
            });
        }
        let (config, rest) = bytes.split_at(self.config.len());
        for (i, (&new, &old)) in config.iter().zip(&self.config).enumerate() {
            if (new ^ old) & self.cmask[i] & !self.wmask[i] & !self.w1cmask[i] != 0 {
                return Err(StateError::Invalid(
                    "PCI configuration differs in a read-only field",
                ));
            }
        }
        if let Some(m) = &self.msix {
            let pba = &rest[m.table.len()..];
            let stray = pba.iter().enumerate().any(|(i, &b)| {
                (0..8).any(|bit| b & (1 << bit) != 0 && i * 8 + bit >= usize::from(m.vectors))
            });
            if stray {
                return Err(StateError::Invalid(
                    "MSI-X pending bit past the last vector",
                ));
            }
        }
        self.config.copy_from_slice(config);
        let masked = self.msix_function_masked_now();
        if let Some(m) = &mut self.msix {
            let (table, pba) = rest.split_at(m.table.len());
            m.table.copy_from_slice(table);
            m.pba.copy_from_slice(pba);
            m.function_masked = masked;
        }
        Ok(())
    }
}

/// `size` bytes little-endian at `off` of `bytes`; missing bytes read 0.
fn get(bytes: &[u8], off: u16, size: u16) -> u32 {
    (0..size).fold(0, |v, i| {
        let b = off
            .checked_add(i)
            .and_then(|a| bytes.get(usize::from(a)))
            .copied()
            .unwrap_or(0);
        v | (u32::from(b) << (8 * i))
    })
}

/// Stores `size` bytes of `v` little-endian at `off`; bytes past the end
/// are dropped.
fn put(bytes: &mut [u8], off: u16, size: u16, v: u32) {
    for i in 0..size {
        if let Some(b) = off
            .checked_add(i)
            .and_then(|a| bytes.get_mut(usize::from(a)))
        {
            *b = (v >> (8 * i)) as u8;
        }
    }
}
