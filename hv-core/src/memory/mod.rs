//! Memory API: region trees, flat views, listeners, transactions (see DESIGN.md).
//!
//! The model follows QEMU's memory API (`system/memory.c`) closely:
//!
//! * [`MemorySystem`] owns an arena of regions addressed by generational
//!   [`RegionId`] handles. Regions form trees (container → subregions);
//!   aliases point into other trees.
//! * An [`AddressSpace`](AddressSpaceId) names a root region. Its
//!   [`FlatView`] is the rendering of that tree into disjoint, sorted,
//!   simplified ranges (QEMU's `render_memory_region` + `flatview_simplify`).
//! * [`MemoryListener`]s registered on an address space are told about the
//!   difference between the old and the new flat view on every committed
//!   change (QEMU's `address_space_update_topology_pass`).
//! * Mutations can be batched in (nested) transactions, read mid-transaction
//!   without involving listeners, and abandoned.
//! * [`mtree`] prints and parses QEMU's `info mtree` text formats.
//!
//! ```
//! use hv_core::memory::{MemorySystem, MmioHandle, RamBacking};
//!
//! let mut mem = MemorySystem::new();
//! let system = mem.create_container("system", 1 << 64)?;
//! let space = mem.create_address_space("memory", system)?;
//! let ram = mem.create_ram("pc.ram", 0x800_0000, RamBacking { block: 0, offset: 0 })?;
//! let below = mem.create_alias("ram-below-4g", 0x800_0000, ram, 0)?;
//! mem.add_subregion(system, 0, below)?;
//! let bar = mem.create_mmio("bar0", 0x1000, MmioHandle(3))?;
//! mem.begin();
//! mem.add_subregion_overlap(system, 0xfebf_0000, bar, 1)?;
//! // Reads inside the transaction see the new tree; listeners run at commit.
//! let t = mem.translate(space, 0xfebf_0010)?.unwrap();
//! assert_eq!((t.region, t.offset), (bar, 0x10));
//! mem.commit()?;
//! assert_eq!(mem.flat_view(space)?.ranges().len(), 2);
//! # Ok::<(), hv_core::memory::MemoryError>(())
//! ```

mod listener;
mod model;
pub mod mtree;
mod render;
mod space;
mod system;
mod txn;

pub use listener::{ListenerCtx, ListenerId, MemoryListener};
pub use model::SlowHit;
pub use render::{FlatRange, FlatView, RangeTarget};
pub use system::{
    AddressSpaceId, AsNotifier, Lookup, MemorySystem, ReadPolicy, RegionInfo, Stats, Translation,
    WriteNotifier,
};

use alloc::string::String;
use core::fmt;

/// Largest region size: 2^64 bytes (the whole 64-bit space).
pub const MAX_SIZE: u128 = 1u128 << 64;

/// Generational handle of a region in a [`MemorySystem`] arena.
///
/// A handle becomes stale when its region is destroyed (or when the
/// transaction that created it is abandoned); stale handles are rejected with
/// [`MemoryError::StaleRegion`].
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct RegionId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl RegionId {
    /// Slot index (for diagnostics).
    pub fn index(self) -> u32 {
        self.index
    }
    /// Generation of the slot when this handle was issued.
    pub fn generation(self) -> u32 {
        self.generation
    }
}

/// Host backing of a RAM-like region: an opaque host block (e.g. a frame
/// allocation the kernel knows how to map) and an offset into it.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct RamBacking {
    pub block: u32,
    pub offset: u64,
}

/// Opaque MMIO dispatch handle; the kernel maps it to a device model.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct MmioHandle(pub u32);

/// What a region is.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub enum RegionKind {
    /// Pure container: renders only its subregions (QEMU `memory_region_init`).
    Container,
    /// Guest RAM.
    Ram(RamBacking),
    /// Read-only RAM (QEMU `memory_region_init_rom`: RAM with `readonly` set).
    Rom(RamBacking),
    /// RAM that is really device memory (QEMU `ram_device`, type `ramd`).
    RamDevice(RamBacking),
    /// ROM device: reads from RAM while in romd mode, MMIO otherwise.
    RomDevice {
        backing: RamBacking,
        ops: MmioHandle,
    },
    /// MMIO / port I/O dispatched through `ops`.
    Mmio(MmioHandle),
    /// Alias of `target`, starting at `offset` in the target.
    Alias { target: RegionId, offset: u64 },
    /// Reservation: terminates lookups with no backing (unassigned).
    Reservation,
}

impl RegionKind {
    /// Whether the region renders itself (QEMU's `mr->terminates`).
    pub fn terminates(&self) -> bool {
        !matches!(self, RegionKind::Container | RegionKind::Alias { .. })
    }
    /// RAM-backed kinds (`mr->ram` in QEMU).
    pub fn ram_backing(&self) -> Option<RamBacking> {
        match *self {
            RegionKind::Ram(b) | RegionKind::Rom(b) | RegionKind::RamDevice(b) => Some(b),
            _ => None,
        }
    }
}

/// Errors of the memory API. No operation panics on bad input.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum MemoryError {
    /// The region handle is stale (destroyed region or abandoned creation).
    StaleRegion(RegionId),
    /// The address-space handle is stale.
    StaleAddressSpace(AddressSpaceId),
    /// No such listener.
    UnknownListener(ListenerId),
    /// The region already has a container.
    AlreadyMapped(RegionId),
    /// `child` is not a subregion of `parent`.
    NotASubregion { parent: RegionId, child: RegionId },
    /// Aliases cannot have subregions.
    SubregionOfAlias(RegionId),
    /// The operation would create a cycle (tree or alias).
    Cycle,
    /// The operation requires another kind of region.
    WrongKind(RegionId),
    /// The region is still referenced (alias target, address-space root).
    InUse(RegionId),
    /// Size larger than 2^64.
    InvalidSize(u128),
    /// commit/abandon without begin.
    NoTransaction,
    /// The operation is not allowed inside a transaction.
    InTransaction,
    /// No such write notifier on the region.
    NoSuchNotifier,
    /// Text (mtree) parse error.
    Parse { line: usize, msg: String },
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryError::Parse { line, msg } => write!(f, "line {line}: {msg}"),
            other => write!(f, "{other:?}"),
        }
    }
}
