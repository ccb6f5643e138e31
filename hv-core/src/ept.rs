//! Extended page tables (SDM Vol. 3C, 29.3): a 4-level table tree over host
//! frames, mapping guest-physical ranges with the largest page size that
//! alignment allows.
//!
//! Changes return a [`#[must_use]`](InveptRequired) token: a changed EPT
//! needs an INVEPT (single context) before the next VM entry, never INVLPG.

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::frames::FrameAllocator;
use crate::phys::PhysAccess;
use bitflags::bitflags;

bitflags! {
    /// Bits of an EPT entry (SDM Tables 29-1 to 29-6).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct EptFlags: u64 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXECUTE = 1 << 2;
        /// Memory type write-back (bits 5:3 = 6), leaf entries only.
        const MEMTYPE_WB = 6 << 3;
        const IGNORE_PAT = 1 << 6;
        /// Leaf at PDPT (1 GiB) or PD (2 MiB) level.
        const LARGE = 1 << 7;
        const ACCESSED = 1 << 8;
        const DIRTY = 1 << 9;
    }
}

/// Access rights of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptPerm {
    /// RAM: read, write, execute.
    ReadWriteExecute,
    /// ROM: read and execute; writes exit.
    ReadExecute,
}

impl EptPerm {
    fn flags(self) -> EptFlags {
        match self {
            Self::ReadWriteExecute => EptFlags::READ | EptFlags::WRITE | EptFlags::EXECUTE,
            Self::ReadExecute => EptFlags::READ | EptFlags::EXECUTE,
        }
    }
}

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const RWX: u64 = 7;

/// A token saying the EPT changed and must be invalidated.
#[must_use = "a changed EPT needs INVEPT before the next VM entry"]
#[derive(Debug, PartialEq, Eq)]
pub struct InveptRequired;

/// Why a mapping could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptError {
    /// Address or size not 4 KiB aligned.
    Unaligned,
    /// Beyond the 48-bit guest-physical space.
    OutOfRange,
    /// No host frame for a table.
    OutOfFrames,
}

/// Counters of what the EPT did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EptStats {
    pub entries_written: u64,
    pub tables_allocated: u64,
    pub tables_freed: u64,
}

/// Which page sizes the CPU allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSizes {
    pub two_mib: bool,
    pub one_gib: bool,
}

/// An EPT tree rooted at one PML4 frame.
#[derive(Debug)]
pub struct Ept {
    root: HostPhysAddr,
    sizes: PageSizes,
    pub stats: EptStats,
}

fn entry_addr(table: HostPhysAddr, index: u64) -> HostPhysAddr {
    HostPhysAddr::new(table.as_u64() + index * 8)
}

fn index(gpa: u64, level: u32) -> u64 {
    (gpa >> (12 + 9 * level)) & 511
}

impl Ept {
    /// An empty tree (one zeroed PML4).
    pub fn new(host: &mut impl FrameAllocator, sizes: PageSizes) -> Result<Self, EptError> {
        let root = host.alloc_frame().ok_or(EptError::OutOfFrames)?;
        Ok(Self {
            root,
            sizes,
            stats: EptStats {
                tables_allocated: 1,
                ..Default::default()
            },
        })
    }

    /// The EPT pointer for the VMCS: root | WB (6) | walk length 4 - 1 (bits
    /// 5:3 = 3) | A/D enable (bit 6) if wanted.
    pub fn eptp(&self, accessed_dirty: bool) -> u64 {
        self.root.as_u64() | 6 | (3 << 3) | if accessed_dirty { 1 << 6 } else { 0 }
    }

    /// Maps `[gpa, gpa + size)` to `[hpa, hpa + size)`.
    pub fn map(
        &mut self,
        host: &mut (impl PhysAccess + FrameAllocator),
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        size: u64,
        perm: EptPerm,
    ) -> Result<InveptRequired, EptError> {
        let (g, h) = (gpa.as_u64(), hpa.as_u64());
        if !g.is_multiple_of(PAGE_SIZE)
            || !h.is_multiple_of(PAGE_SIZE)
            || !size.is_multiple_of(PAGE_SIZE)
        {
            return Err(EptError::Unaligned);
        }
        if g.checked_add(size).is_none_or(|e| e > 1 << 48) {
            return Err(EptError::OutOfRange);
        }
        let mut off = 0;
        while off < size {
            let (ga, ha, left) = (g + off, h + off, size - off);
            let level = [2u32, 1]
                .into_iter()
                .find(|&l| {
                    let page = 1u64 << (12 + 9 * l);
                    let ok = if l == 2 {
                        self.sizes.one_gib
                    } else {
                        self.sizes.two_mib
                    };
                    ok && ga % page == 0 && ha % page == 0 && left >= page
                })
                .unwrap_or(0);
            self.set_leaf(host, ga, ha, level, perm.flags())?;
            off += 1 << (12 + 9 * level);
        }
        Ok(InveptRequired)
    }

    fn set_leaf(
        &mut self,
        host: &mut (impl PhysAccess + FrameAllocator),
        gpa: u64,
        hpa: u64,
        level: u32,
        flags: EptFlags,
    ) -> Result<(), EptError> {
        let mut table = self.root;
        for l in (level + 1..=3).rev() {
            let e = entry_addr(table, index(gpa, l));
            let v = host.read_u64(e);
            if v & RWX != 0 && v & EptFlags::LARGE.bits() == 0 {
                table = HostPhysAddr::new(v & ADDR_MASK);
                continue;
            }
            // Empty, or a larger leaf that the new mapping splits: a fresh
            // table replaces it (the old large leaf is dropped; callers map
            // whole ranges, so nothing of it survives).
            let t = host.alloc_frame().ok_or(EptError::OutOfFrames)?;
            self.stats.tables_allocated += 1;
            host.write_u64(e, t.as_u64() | RWX);
            self.stats.entries_written += 1;
            table = t;
        }
        let mut leaf = hpa | (flags | EptFlags::MEMTYPE_WB).bits();
        if level > 0 {
            leaf |= EptFlags::LARGE.bits();
        }
        let e = entry_addr(table, index(gpa, level));
        let old = host.read_u64(e);
        if level > 0 && old & RWX != 0 && old & EptFlags::LARGE.bits() == 0 {
            self.free_table(host, HostPhysAddr::new(old & ADDR_MASK), level - 1);
        }
        host.write_u64(e, leaf);
        self.stats.entries_written += 1;
        Ok(())
    }

    /// Translates a guest-physical address: host address, writable, and the
    /// page size of the leaf.
    pub fn translate(
        &self,
        mem: &impl PhysAccess,
        gpa: GuestPhysAddr,
    ) -> Option<(HostPhysAddr, bool, u64)> {
        let g = gpa.as_u64();
        let mut table = self.root;
        for level in (0..=3).rev() {
            let v = mem.read_u64(entry_addr(table, index(g, level)));
            if v & RWX == 0 {
                return None;
            }
            if level == 0 || v & EptFlags::LARGE.bits() != 0 {
                let page = 1u64 << (12 + 9 * level);
                let base = v & ADDR_MASK & !(page - 1);
                return Some((HostPhysAddr::new(base + (g & (page - 1))), v & 2 != 0, page));
            }
            table = HostPhysAddr::new(v & ADDR_MASK);
        }
        None
    }

    fn free_table(
        &mut self,
        host: &mut (impl PhysAccess + FrameAllocator),
        t: HostPhysAddr,
        level: u32,
    ) {
        if level > 0 {
            for i in 0..512 {
                let v = host.read_u64(entry_addr(t, i));
                if v & RWX != 0 && v & EptFlags::LARGE.bits() == 0 {
                    self.free_table(host, HostPhysAddr::new(v & ADDR_MASK), level - 1);
                }
            }
        }
        host.free_frame(t);
        self.stats.tables_freed += 1;
    }

    /// Frees every table of the tree.
    pub fn destroy(mut self, host: &mut (impl PhysAccess + FrameAllocator)) -> EptStats {
        let root = self.root;
        self.free_table(host, root, 3);
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phys::mock::MockPhys;

    const ALL: PageSizes = PageSizes {
        two_mib: true,
        one_gib: true,
    };

    #[test]
    fn maps_with_largest_pages_and_translates() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        // 1 GiB + 2 MiB + 4 KiB, all aligned so each size is used once.
        let size = (1 << 30) + (2 << 20) + 4096;
        let InveptRequired = ept
            .map(
                &mut host,
                GuestPhysAddr::new(1 << 30),
                HostPhysAddr::new(1 << 30),
                size,
                EptPerm::ReadWriteExecute,
            )
            .unwrap();
        let t = |g: u64| ept.translate(&host, GuestPhysAddr::new(g));
        assert_eq!(
            t((1 << 30) + 0x1234),
            Some((HostPhysAddr::new((1 << 30) + 0x1234), true, 1 << 30))
        );
        assert_eq!(t((2 << 30) + 0x1f_0000).map(|x| x.2), Some(2 << 20));
        assert_eq!(t((2 << 30) + (2 << 20)).map(|x| x.2), Some(4096));
        assert_eq!(t((2 << 30) + (2 << 20) + 4096), None);
        assert_eq!(t(0), None);
        // PML4 + PDPT + PD + PT.
        assert_eq!(ept.stats.tables_allocated, 4);
    }

    #[test]
    fn rom_is_read_only_and_small_pages_without_large_support() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(
            &mut host,
            PageSizes {
                two_mib: false,
                one_gib: false,
            },
        )
        .unwrap();
        let _ = ept
            .map(
                &mut host,
                GuestPhysAddr::new(0),
                HostPhysAddr::new(0x20_0000),
                2 << 20,
                EptPerm::ReadExecute,
            )
            .unwrap();
        assert_eq!(
            ept.translate(&host, GuestPhysAddr::new(0x1000)),
            Some((HostPhysAddr::new(0x20_1000), false, 4096))
        );
    }

    #[test]
    fn destroy_frees_every_table() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        for i in 0..8u64 {
            let _ = ept
                .map(
                    &mut host,
                    GuestPhysAddr::new(i << 32),
                    HostPhysAddr::new(0),
                    3 * 4096,
                    EptPerm::ReadWriteExecute,
                )
                .unwrap();
        }
        assert!(host.outstanding() > 8);
        let stats = ept.destroy(&mut host);
        assert_eq!(host.outstanding(), 0);
        assert_eq!(stats.tables_allocated, stats.tables_freed);
    }

    #[test]
    fn bad_requests_are_errors() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        let rwx = EptPerm::ReadWriteExecute;
        assert_eq!(
            ept.map(
                &mut host,
                GuestPhysAddr::new(0x10),
                HostPhysAddr::new(0),
                4096,
                rwx
            ),
            Err(EptError::Unaligned)
        );
        assert_eq!(
            ept.map(
                &mut host,
                GuestPhysAddr::new(1 << 48),
                HostPhysAddr::new(0),
                4096,
                rwx
            ),
            Err(EptError::OutOfRange)
        );
    }
}
