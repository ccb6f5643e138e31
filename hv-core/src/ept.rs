//! Extended page tables (SDM Vol. 3C, 29.3): a 4-level table tree over host
//! frames, mapping guest-physical ranges with the largest page size that
//! alignment allows.
//!
//! Changes return a [`#[must_use]`](InveptFlush) token, modelled on the
//! `x86_64` crate's `MapperFlush`: a changed EPT needs an INVEPT (single
//! context) before the next VM entry, never INVLPG, and the tables a change
//! unlinked are only given back after that INVEPT (the CPU may still walk
//! them through its paging-structure caches until then). The token carries
//! those tables: [`InveptFlush::flush`] executes INVEPT and then frees them;
//! [`InveptFlush::ignore`] is the explicit way out for a tree no CPU has
//! used. A change that fails half-way returns the token of what it did
//! ([`PartialChange`]), and [`Ept::destroy`] returns every table in one.

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::ept_listener::EptHost;
use crate::frames::FrameAllocator;
use crate::phys::PhysAccess;
use alloc::vec::Vec;
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

/// A token saying the EPT rooted at `root` changed and must be
/// invalidated, with the table frames the change unlinked: they may only be
/// reused after the INVEPT. Consumed by [`flush`](Self::flush) or,
/// explicitly, [`ignore`](Self::ignore).
#[must_use = "a changed EPT needs INVEPT before the next VM entry, and its unlinked tables are freed only by flush()"]
#[derive(Debug, PartialEq, Eq)]
pub struct InveptFlush {
    root: HostPhysAddr,
    /// An entry was written (a cached translation may be stale).
    changed: bool,
    /// Table frames no longer reachable from `root`.
    retired: Vec<HostPhysAddr>,
}

/// INVEPT failed: the retired tables were not freed (the CPU may still use
/// them), and stale translations may remain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InveptFailed {
    /// Table frames kept (never reused) because of the failure.
    pub kept_tables: usize,
}

impl InveptFlush {
    fn new(root: HostPhysAddr) -> Self {
        Self {
            root,
            changed: false,
            retired: Vec::new(),
        }
    }

    /// The root of the tree to invalidate.
    pub fn root(&self) -> HostPhysAddr {
        self.root
    }

    /// Whether an INVEPT is owed: an entry changed or a table waits to be
    /// freed.
    pub fn is_needed(&self) -> bool {
        self.changed || !self.retired.is_empty()
    }

    /// Table frames waiting for the INVEPT.
    pub fn retired_tables(&self) -> usize {
        self.retired.len()
    }

    /// Adds `other`'s obligations to this token, so that one INVEPT covers
    /// both. Tokens of different trees are not merged: `other` comes back.
    pub fn merge(&mut self, other: Self) -> Result<(), Self> {
        if other.root != self.root {
            return Err(other);
        }
        self.changed |= other.changed;
        self.retired.extend(other.retired);
        Ok(())
    }

    /// Executes INVEPT (single context) for this tree if one is owed, and
    /// only then frees the retired tables. If INVEPT fails the tables are
    /// kept for good (a leak, never a reuse the CPU could still see).
    pub fn flush<H: EptHost>(self, host: &mut H, accessed_dirty: bool) -> Result<(), InveptFailed> {
        if !self.is_needed() {
            return Ok(());
        }
        if !host.invept(Ept::eptp_of(self.root, accessed_dirty)) {
            return Err(InveptFailed {
                kept_tables: self.retired.len(),
            });
        }
        for t in self.retired {
            host.free_frame(t);
        }
        Ok(())
    }

    /// Gives the retired tables back without INVEPT. Only for a tree that
    /// no CPU has used since the change (never in a VMCS that ran), where
    /// nothing can be cached.
    pub fn ignore(self, host: &mut impl FrameAllocator) {
        for t in self.retired {
            host.free_frame(t);
        }
    }
}

/// A change that failed part-way: the error, and the token of what was
/// already changed (still owed its INVEPT).
#[must_use = "the part of the change that was made still needs its INVEPT"]
#[derive(Debug, PartialEq, Eq)]
pub struct PartialChange {
    pub error: EptError,
    pub flush: InveptFlush,
}

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

impl core::fmt::Display for EptError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Unaligned => write!(f, "EPT mapping not 4 KiB aligned"),
            Self::OutOfRange => write!(f, "EPT mapping beyond the 48-bit guest-physical space"),
            Self::OutOfFrames => write!(f, "no host frame for an EPT table"),
        }
    }
}

/// Counters of what the EPT did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EptStats {
    pub entries_written: u64,
    pub tables_allocated: u64,
    pub tables_freed: u64,
    /// Large leaves replaced by a table of smaller leaves.
    pub splits: u64,
}

/// The largest leaf a mapping may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageLimit {
    /// The largest the alignment and the CPU allow.
    Largest,
    /// 4 KiB leaves only (dirty logging: one dirty flag per 4 KiB page).
    Only4K,
}

/// A leaf flag that [`Ept::take_leaf_flag`] reports and clears.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HarvestFlag {
    /// The dirty flag the CPU sets on writes (EPT A/D enabled).
    Dirty,
    /// Write permission (granted on a write fault when dirty pages are
    /// tracked by write protection).
    Writable,
}

impl HarvestFlag {
    fn bits(self) -> u64 {
        match self {
            Self::Dirty => EptFlags::DIRTY.bits(),
            Self::Writable => EptFlags::WRITE.bits(),
        }
    }
}

/// What `map_level` writes: `delta` is `hpa - gpa` (wrapping) for the whole
/// range, `max_level` the highest level that may hold a leaf.
#[derive(Clone, Copy)]
struct Fill {
    delta: u64,
    flags: EptFlags,
    max_level: u32,
}

/// One leaf mapping of the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub gpa: u64,
    pub hpa: u64,
    pub size: u64,
    pub writable: bool,
    pub dirty: bool,
}

/// The guest-physical space EPT can map (4-level walk: 48 bits).
pub const MAX_GPA: u64 = 1 << 48;

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
        Self::eptp_of(self.root, accessed_dirty)
    }

    fn eptp_of(root: HostPhysAddr, accessed_dirty: bool) -> u64 {
        root.as_u64() | 6 | (3 << 3) | if accessed_dirty { 1 << 6 } else { 0 }
    }

    fn check_range(gpa: u64, size: u64, hpa: u64) -> Result<(), EptError> {
        if !gpa.is_multiple_of(PAGE_SIZE)
            || !hpa.is_multiple_of(PAGE_SIZE)
            || !size.is_multiple_of(PAGE_SIZE)
        {
            return Err(EptError::Unaligned);
        }
        if gpa.checked_add(size).is_none_or(|e| e > MAX_GPA) {
            return Err(EptError::OutOfRange);
        }
        Ok(())
    }

    fn large_ok(&self, level: u32, max_level: u32) -> bool {
        if level > max_level {
            return false;
        }
        match level {
            0 => true,
            1 => self.sizes.two_mib,
            2 => self.sizes.one_gib,
            _ => false,
        }
    }

    /// Maps `[gpa, gpa + size)` to `[hpa, hpa + size)` with the largest
    /// pages that the alignment of both addresses allows. Whatever was mapped
    /// there before is replaced; larger leaves that only partly overlap are
    /// split so that the rest of their mapping survives.
    pub fn map(
        &mut self,
        host: &mut (impl PhysAccess + FrameAllocator),
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        size: u64,
        perm: EptPerm,
    ) -> Result<InveptFlush, PartialChange> {
        self.map_with(host, gpa, hpa, size, perm, PageLimit::Largest)
    }

    /// [`map`](Self::map) with leaves no larger than `limit` allows: with
    /// [`PageLimit::Only4K`] every page of the range gets its own leaf (large
    /// leaves there are split; the new leaves have clear A/D flags).
    pub fn map_with(
        &mut self,
        host: &mut (impl PhysAccess + FrameAllocator),
        gpa: GuestPhysAddr,
        hpa: HostPhysAddr,
        size: u64,
        perm: EptPerm,
        limit: PageLimit,
    ) -> Result<InveptFlush, PartialChange> {
        let (g, h) = (gpa.as_u64(), hpa.as_u64());
        let mut flush = InveptFlush::new(self.root);
        if let Err(error) = Self::check_range(g, size, h) {
            return Err(PartialChange { error, flush });
        }
        if size > 0 {
            let root = self.root;
            let fill = Fill {
                delta: h.wrapping_sub(g),
                flags: perm.flags(),
                max_level: match limit {
                    PageLimit::Largest => 2,
                    PageLimit::Only4K => 0,
                },
            };
            let written = self.stats.entries_written;
            let r = self.map_level(host, root, 3, 0, g, g + size, fill, &mut flush);
            flush.changed = self.stats.entries_written != written;
            if let Err(error) = r {
                return Err(PartialChange { error, flush });
            }
        }
        Ok(flush)
    }

    #[allow(clippy::too_many_arguments)]
    fn map_level(
        &mut self,
        host: &mut (impl PhysAccess + FrameAllocator),
        table: HostPhysAddr,
        level: u32,
        table_base: u64,
        start: u64,
        end: u64,
        fill: Fill,
        flush: &mut InveptFlush,
    ) -> Result<(), EptError> {
        let span = 1u64 << (12 + 9 * level);
        let first = (start - table_base) / span;
        let last = (end - 1 - table_base) / span;
        for i in first..=last {
            let e = entry_addr(table, i);
            let e_start = table_base + i * span;
            let (s, en) = (start.max(e_start), end.min(e_start + span));
            let old = host.read_u64(e);
            let old_is_table = level > 0 && old & RWX != 0 && old & EptFlags::LARGE.bits() == 0;
            let hpa = s.wrapping_add(fill.delta);
            if s == e_start
                && en - s == span
                && hpa.is_multiple_of(span)
                && self.large_ok(level, fill.max_level)
            {
                if old_is_table {
                    self.retire_table(host, HostPhysAddr::new(old & ADDR_MASK), level - 1, flush);
                }
                let large = if level > 0 {
                    EptFlags::LARGE
                } else {
                    EptFlags::empty()
                };
                host.write_u64(e, hpa | (fill.flags | EptFlags::MEMTYPE_WB | large).bits());
                self.stats.entries_written += 1;
                continue;
            }
            let child = if old_is_table {
                HostPhysAddr::new(old & ADDR_MASK)
            } else if old & RWX != 0 {
                self.split(host, e, old, level)?
            } else {
                let t = host.alloc_frame().ok_or(EptError::OutOfFrames)?;
                self.stats.tables_allocated += 1;
                host.write_u64(e, t.as_u64() | RWX);
                self.stats.entries_written += 1;
                t
            };
            self.map_level(host, child, level - 1, e_start, s, en, fill, flush)?;
        }
        Ok(())
    }

    /// Replaces the large leaf `v` at entry `e` (of a table at `level`) by a
    /// table of 512 leaves of the next size down with the same mapping.
    fn split(
        &mut self,
        host: &mut (impl PhysAccess + FrameAllocator),
        e: HostPhysAddr,
        v: u64,
        level: u32,
    ) -> Result<HostPhysAddr, EptError> {
        let t = host.alloc_frame().ok_or(EptError::OutOfFrames)?;
        self.stats.tables_allocated += 1;
        let child_span = 1u64 << (12 + 9 * (level - 1));
        let keep = v & !ADDR_MASK & !EptFlags::LARGE.bits();
        let large = if level - 1 > 0 {
            EptFlags::LARGE.bits()
        } else {
            0
        };
        let base = v & ADDR_MASK & !((child_span << 9) - 1);
        for j in 0..512 {
            host.write_u64(entry_addr(t, j), (base + j * child_span) | keep | large);
        }
        host.write_u64(e, t.as_u64() | RWX);
        self.stats.entries_written += 513;
        self.stats.splits += 1;
        Ok(t)
    }

    /// Removes every mapping in `[gpa, gpa + size)`, splitting larger leaves
    /// that only partly overlap and freeing tables that become empty.
    pub fn unmap(
        &mut self,
        host: &mut (impl PhysAccess + FrameAllocator),
        gpa: GuestPhysAddr,
        size: u64,
    ) -> Result<InveptFlush, PartialChange> {
        let g = gpa.as_u64();
        let mut flush = InveptFlush::new(self.root);
        if let Err(error) = Self::check_range(g, size, 0) {
            return Err(PartialChange { error, flush });
        }
        if size > 0 {
            let root = self.root;
            let written = self.stats.entries_written;
            let r = self.unmap_level(host, root, 3, 0, g, g + size, &mut flush);
            flush.changed = self.stats.entries_written != written;
            if let Err(error) = r {
                return Err(PartialChange { error, flush });
            }
        }
        Ok(flush)
    }

    /// Returns whether the table is empty afterwards.
    #[allow(clippy::too_many_arguments)]
    fn unmap_level(
        &mut self,
        host: &mut (impl PhysAccess + FrameAllocator),
        table: HostPhysAddr,
        level: u32,
        table_base: u64,
        start: u64,
        end: u64,
        flush: &mut InveptFlush,
    ) -> Result<bool, EptError> {
        let span = 1u64 << (12 + 9 * level);
        let first = (start - table_base) / span;
        let last = (end - 1 - table_base) / span;
        for i in first..=last {
            let e = entry_addr(table, i);
            let old = host.read_u64(e);
            if old & RWX == 0 {
                continue;
            }
            let e_start = table_base + i * span;
            let (s, en) = (start.max(e_start), end.min(e_start + span));
            let is_table = level > 0 && old & EptFlags::LARGE.bits() == 0;
            if s == e_start && en - s == span {
                if is_table {
                    self.retire_table(host, HostPhysAddr::new(old & ADDR_MASK), level - 1, flush);
                }
                host.write_u64(e, 0);
                self.stats.entries_written += 1;
                continue;
            }
            let child = if is_table {
                HostPhysAddr::new(old & ADDR_MASK)
            } else {
                self.split(host, e, old, level)?
            };
            if self.unmap_level(host, child, level - 1, e_start, s, en, flush)? {
                host.write_u64(e, 0);
                flush.retired.push(child);
                self.stats.tables_freed += 1;
                self.stats.entries_written += 1;
            }
        }
        Ok((0..512).all(|i| host.read_u64(entry_addr(table, i)) & RWX == 0))
    }

    /// Every leaf of the tree in address order: (GPA, HPA, size, writable).
    pub fn leaves(&self, mem: &impl PhysAccess) -> Vec<Leaf> {
        let mut out = Vec::new();
        self.leaves_in(mem, self.root, 3, 0, &mut out);
        out
    }

    fn leaves_in(
        &self,
        mem: &impl PhysAccess,
        table: HostPhysAddr,
        level: u32,
        base: u64,
        out: &mut Vec<Leaf>,
    ) {
        let span = 1u64 << (12 + 9 * level);
        for i in 0..512 {
            let v = mem.read_u64(entry_addr(table, i));
            if v & RWX == 0 {
                continue;
            }
            let gpa = base + i * span;
            if level == 0 || v & EptFlags::LARGE.bits() != 0 {
                out.push(Leaf {
                    gpa,
                    hpa: v & ADDR_MASK,
                    size: span,
                    writable: v & 2 != 0,
                    dirty: v & EptFlags::DIRTY.bits() != 0,
                });
            } else {
                self.leaves_in(mem, HostPhysAddr::new(v & ADDR_MASK), level - 1, gpa, out);
            }
        }
    }

    /// Guest-physical pages (of leaf size) in `[gpa, gpa + size)` whose EPT
    /// dirty flag is set, clearing the flags it reports. Needs EPT A/D
    /// enabled in the EPTP; the token's INVEPT must happen before relying
    /// on the cleared flags.
    pub fn take_dirty(
        &mut self,
        mem: &mut impl PhysAccess,
        gpa: GuestPhysAddr,
        size: u64,
    ) -> (Vec<(u64, u64)>, InveptFlush) {
        let mut out = Vec::new();
        let (_, flush) =
            self.take_leaf_flag(mem, gpa.as_u64(), size, HarvestFlag::Dirty, &mut |g, s| {
                out.push((g, s))
            });
        (out, flush)
    }

    /// Calls `found(leaf gpa, leaf size)` for every leaf overlapping
    /// `[gpa, gpa + size)` (clipped to the 48-bit space) that has `flag`,
    /// and clears the flag there, in address order. Returns the number of
    /// leaves and the token whose INVEPT must happen before relying on the
    /// cleared flags (the CPU may cache a translation with the flag set);
    /// it owes nothing when no flag was cleared.
    pub fn take_leaf_flag(
        &mut self,
        mem: &mut impl PhysAccess,
        gpa: u64,
        size: u64,
        flag: HarvestFlag,
        found: &mut impl FnMut(u64, u64),
    ) -> (u64, InveptFlush) {
        let mut flush = InveptFlush::new(self.root);
        let (start, end) = (gpa, gpa.saturating_add(size).min(MAX_GPA));
        if start >= end {
            return (0, flush);
        }
        let mut n = 0;
        let root = self.root;
        self.flag_in(mem, root, 3, 0, (start, end), flag.bits(), found, &mut n);
        flush.changed = n > 0;
        (n, flush)
    }

    /// `range` lies inside this table's span.
    #[allow(clippy::too_many_arguments)]
    fn flag_in(
        &mut self,
        mem: &mut impl PhysAccess,
        table: HostPhysAddr,
        level: u32,
        base: u64,
        range: (u64, u64),
        bit: u64,
        found: &mut impl FnMut(u64, u64),
        n: &mut u64,
    ) {
        let span = 1u64 << (12 + 9 * level);
        let (start, end) = range;
        for i in (start - base) / span..=(end - 1 - base) / span {
            let e = entry_addr(table, i);
            let v = mem.read_u64(e);
            if v & RWX == 0 {
                continue;
            }
            let e_start = base + i * span;
            if level == 0 || v & EptFlags::LARGE.bits() != 0 {
                if v & bit != 0 {
                    mem.write_u64(e, v & !bit);
                    self.stats.entries_written += 1;
                    *n += 1;
                    found(e_start, span);
                }
            } else {
                let sub = (start.max(e_start), end.min(e_start + span));
                let child = HostPhysAddr::new(v & ADDR_MASK);
                self.flag_in(mem, child, level - 1, e_start, sub, bit, found, n);
            }
        }
    }

    /// The entry of the leaf that maps `gpa`, its value and its size.
    fn walk(&self, mem: &impl PhysAccess, gpa: u64) -> Option<(HostPhysAddr, u64, u64)> {
        if gpa >= MAX_GPA {
            return None;
        }
        let mut table = self.root;
        for level in (0..=3).rev() {
            let e = entry_addr(table, index(gpa, level));
            let v = mem.read_u64(e);
            if v & RWX == 0 {
                return None;
            }
            if level == 0 || v & EptFlags::LARGE.bits() != 0 {
                return Some((e, v, 1u64 << (12 + 9 * level)));
            }
            table = HostPhysAddr::new(v & ADDR_MASK);
        }
        None
    }

    /// Grants write permission on the leaf that maps `gpa`: `None` if
    /// nothing maps it, else whether the leaf changed. Used after a write
    /// fault on a write-protected page; the EPT violation already
    /// invalidated what the CPU cached for that address (SDM Vol. 3C,
    /// "Operations that Invalidate Cached Mappings"), so no INVEPT is needed.
    pub fn make_writable(&mut self, mem: &mut impl PhysAccess, gpa: GuestPhysAddr) -> Option<bool> {
        let (e, v, _) = self.walk(mem, gpa.as_u64())?;
        if v & EptFlags::WRITE.bits() != 0 {
            return Some(false);
        }
        mem.write_u64(e, v | EptFlags::WRITE.bits());
        self.stats.entries_written += 1;
        Some(true)
    }

    /// The leaf entry that maps `gpa` and the leaf size (tests play the
    /// CPU with it).
    #[cfg(test)]
    pub(crate) fn leaf_entry(
        &self,
        mem: &impl PhysAccess,
        gpa: u64,
    ) -> Option<(HostPhysAddr, u64)> {
        self.walk(mem, gpa).map(|(e, _, size)| (e, size))
    }

    /// Translates a guest-physical address: host address, writable, and the
    /// page size of the leaf.
    pub fn translate(
        &self,
        mem: &impl PhysAccess,
        gpa: GuestPhysAddr,
    ) -> Option<(HostPhysAddr, bool, u64)> {
        let g = gpa.as_u64();
        let (_, v, page) = self.walk(mem, g)?;
        let base = v & ADDR_MASK & !(page - 1);
        Some((HostPhysAddr::new(base + (g & (page - 1))), v & 2 != 0, page))
    }

    /// Moves table `t` (at `level`) and every table below it into the
    /// token: they are freed after its INVEPT.
    fn retire_table(
        &mut self,
        mem: &impl PhysAccess,
        t: HostPhysAddr,
        level: u32,
        flush: &mut InveptFlush,
    ) {
        if level > 0 {
            for i in 0..512 {
                let v = mem.read_u64(entry_addr(t, i));
                if v & RWX != 0 && v & EptFlags::LARGE.bits() == 0 {
                    self.retire_table(mem, HostPhysAddr::new(v & ADDR_MASK), level - 1, flush);
                }
            }
        }
        flush.retired.push(t);
        flush.changed = true;
        self.stats.tables_freed += 1;
    }

    /// Tears the tree down: every table goes into the returned token, which
    /// frees them after invalidating the tree (`tables_freed` in the
    /// statistics counts them).
    pub fn destroy(mut self, mem: &impl PhysAccess) -> (InveptFlush, EptStats) {
        let root = self.root;
        let mut flush = InveptFlush::new(root);
        self.retire_table(mem, root, 3, &mut flush);
        (flush, self.stats)
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
        ept.map(
            &mut host,
            GuestPhysAddr::new(1 << 30),
            HostPhysAddr::new(1 << 30),
            size,
            EptPerm::ReadWriteExecute,
        )
        .unwrap()
        .flush(&mut host, false)
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
        ept.map(
            &mut host,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(0x20_0000),
            2 << 20,
            EptPerm::ReadExecute,
        )
        .unwrap()
        .flush(&mut host, false)
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
            ept.map(
                &mut host,
                GuestPhysAddr::new(i << 32),
                HostPhysAddr::new(0),
                3 * 4096,
                EptPerm::ReadWriteExecute,
            )
            .unwrap()
            .flush(&mut host, false)
            .unwrap();
        }
        let tables = host.outstanding();
        assert!(tables > 8);
        let (flush, stats) = ept.destroy(&host);
        assert_eq!(flush.retired_tables() as u64, tables);
        assert_eq!(host.outstanding(), tables, "nothing freed before INVEPT");
        let invepts = host.invepts.len();
        flush.flush(&mut host, false).unwrap();
        assert_eq!(host.invepts.len(), invepts + 1, "teardown invalidates");
        assert_eq!(host.outstanding(), 0);
        assert_eq!(stats.tables_allocated, stats.tables_freed);
    }

    /// 4 KiB pages in the first 2 MiB, then one 2 MiB leaf over them: the
    /// page table they used is unlinked by the second map.
    fn replace_small_pages(host: &mut MockPhys, ept: &mut Ept) -> InveptFlush {
        let rwx = EptPerm::ReadWriteExecute;
        ept.map_with(
            host,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(0),
            8 << 12,
            rwx,
            PageLimit::Only4K,
        )
        .unwrap()
        .flush(host, false)
        .unwrap();
        ept.map(
            host,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(0),
            2 << 20,
            rwx,
        )
        .unwrap()
    }

    #[test]
    fn unlinked_tables_are_freed_only_after_the_invept() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        let flush = replace_small_pages(&mut host, &mut ept);
        assert_eq!(flush.retired_tables(), 1, "the page table");
        assert_eq!(flush.root(), ept.root);
        let (outstanding, freed) = (host.outstanding(), host.freed);
        assert_eq!(outstanding, 4, "PML4, PDPT, PD and the unlinked PT");
        flush.flush(&mut host, false).unwrap();
        // The INVEPT saw nothing freed yet; the table went after it.
        assert_eq!(host.invepts.last(), Some(&freed));
        assert_eq!(host.outstanding(), outstanding - 1);
        // The same for a table emptied by unmap.
        ept.map_with(
            &mut host,
            GuestPhysAddr::new(1 << 30),
            HostPhysAddr::new(0),
            4096,
            EptPerm::ReadExecute,
            PageLimit::Only4K,
        )
        .unwrap()
        .flush(&mut host, false)
        .unwrap();
        let flush = ept
            .unmap(&mut host, GuestPhysAddr::new(1 << 30), 4096)
            .unwrap();
        assert_eq!(flush.retired_tables(), 2, "its PD and PT");
        let freed = host.freed;
        flush.flush(&mut host, false).unwrap();
        assert_eq!(host.invepts.last(), Some(&freed));
        assert_eq!(host.freed, freed + 2);
    }

    #[test]
    fn a_failed_invept_keeps_the_tables() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        let flush = replace_small_pages(&mut host, &mut ept);
        host.fail_invept = true;
        let outstanding = host.outstanding();
        assert_eq!(
            flush.flush(&mut host, false),
            Err(InveptFailed { kept_tables: 1 })
        );
        assert_eq!(host.outstanding(), outstanding, "never reused");
    }

    #[test]
    fn tokens_of_one_tree_merge_into_one_invept() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        let mut a = replace_small_pages(&mut host, &mut ept);
        let b = ept
            .unmap(&mut host, GuestPhysAddr::new(0), 2 << 20)
            .unwrap();
        a.merge(b).unwrap();
        let other = Ept::new(&mut host, ALL).unwrap();
        let (c, _) = other.destroy(&host);
        let c = a.merge(c).unwrap_err();
        let invepts = host.invepts.len();
        a.flush(&mut host, false).unwrap();
        c.flush(&mut host, false).unwrap();
        assert_eq!(host.invepts.len(), invepts + 2, "one per tree");
        assert_eq!(host.outstanding(), 1, "only the first tree's PML4 is left");
    }

    #[test]
    fn a_partially_failed_map_still_owes_its_invept() {
        // Room for the PML4, a PDPT and a PD: the page table cannot be
        // allocated, after the PDPT and PD were linked in.
        let mut host = MockPhys::new(0x10_0000 + 3 * 4096);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        let e = ept
            .map(
                &mut host,
                GuestPhysAddr::new(0),
                HostPhysAddr::new(0),
                4096,
                EptPerm::ReadWriteExecute,
            )
            .unwrap_err();
        assert_eq!(e.error, EptError::OutOfFrames);
        assert!(e.flush.is_needed());
        e.flush.flush(&mut host, false).unwrap();
        assert_eq!(host.invepts.len(), 1);
    }

    #[test]
    fn bad_requests_are_errors() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        let rwx = EptPerm::ReadWriteExecute;
        let e = ept
            .map(
                &mut host,
                GuestPhysAddr::new(0x10),
                HostPhysAddr::new(0),
                4096,
                rwx,
            )
            .unwrap_err();
        assert_eq!(e.error, EptError::Unaligned);
        assert!(!e.flush.is_needed(), "nothing was changed");
        e.flush.flush(&mut host, false).unwrap();
        let e = ept
            .map(
                &mut host,
                GuestPhysAddr::new(1 << 48),
                HostPhysAddr::new(0),
                4096,
                rwx,
            )
            .unwrap_err();
        assert_eq!(e.error, EptError::OutOfRange);
        e.flush.flush(&mut host, false).unwrap();
        assert!(host.invepts.is_empty(), "no INVEPT for no change");
    }

    #[test]
    fn split_keeps_the_rest_of_a_large_page() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        let rwx = EptPerm::ReadWriteExecute;
        ept.map(
            &mut host,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(0x4000_0000),
            1 << 30,
            rwx,
        )
        .unwrap()
        .flush(&mut host, false)
        .unwrap();
        ept.unmap(&mut host, GuestPhysAddr::new(0x20_1000), 0x1000)
            .unwrap()
            .flush(&mut host, false)
            .unwrap();
        let t = |g: u64| ept.translate(&host, GuestPhysAddr::new(g));
        assert_eq!(t(0x20_1000), None);
        assert_eq!(
            t(0x20_0000),
            Some((HostPhysAddr::new(0x4020_0000), true, 4096))
        );
        assert_eq!(
            t(0x20_2000),
            Some((HostPhysAddr::new(0x4020_2000), true, 4096))
        );
        assert_eq!(
            t(0x40_0000),
            Some((HostPhysAddr::new(0x4040_0000), true, 2 << 20))
        );
        assert_eq!(
            t(0x3fff_f000),
            Some((HostPhysAddr::new(0x7fff_f000), true, 2 << 20))
        );
        // Mapping the page back and the whole gigabyte again coalesces.
        ept.map(
            &mut host,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(0x4000_0000),
            1 << 30,
            rwx,
        )
        .unwrap()
        .flush(&mut host, false)
        .unwrap();
        assert_eq!(ept.leaves(&host).len(), 1);
        assert_eq!(
            host.outstanding(),
            2,
            "PML4 and the PDPT that holds the 1 GiB leaf"
        );
    }

    #[test]
    fn unmap_frees_empty_tables() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        ept.map(
            &mut host,
            GuestPhysAddr::new(0x1234_5000),
            HostPhysAddr::new(0x10_0000),
            0x3000,
            EptPerm::ReadExecute,
        )
        .unwrap()
        .flush(&mut host, false)
        .unwrap();
        assert_eq!(host.outstanding(), 4);
        ept.unmap(&mut host, GuestPhysAddr::new(0x1234_5000), 0x3000)
            .unwrap()
            .flush(&mut host, false)
            .unwrap();
        assert_eq!(host.outstanding(), 1, "only the PML4 is left");
        assert!(ept.leaves(&host).is_empty());
    }

    #[test]
    fn dirty_flags_are_reported_and_cleared() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        ept.map(
            &mut host,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(0),
            4 << 20,
            EptPerm::ReadWriteExecute,
        )
        .unwrap()
        .flush(&mut host, false)
        .unwrap();
        let (none, flush) = ept.take_dirty(&mut host, GuestPhysAddr::new(0), 4 << 20);
        assert!(none.is_empty());
        assert!(!flush.is_needed());
        flush.flush(&mut host, true).unwrap();
        // Play the CPU: set the dirty flag on the second 2 MiB leaf.
        let pdpt = HostPhysAddr::new(host.read_u64(ept.root) & ADDR_MASK);
        let pd = HostPhysAddr::new(host.read_u64(pdpt) & ADDR_MASK);
        let e = entry_addr(pd, 1);
        let v = host.read_u64(e);
        host.write_u64(e, v | EptFlags::DIRTY.bits());
        let (dirty, flush) = ept.take_dirty(&mut host, GuestPhysAddr::new(0), 4 << 20);
        assert_eq!(dirty, vec![(2 << 20, 2 << 20)]);
        assert!(flush.is_needed(), "a cleared flag owes an INVEPT");
        flush.flush(&mut host, true).unwrap();
        assert_eq!(host.invepts.len(), 2, "the map and the harvest");
        let (dirty, flush) = ept.take_dirty(&mut host, GuestPhysAddr::new(0), 4 << 20);
        assert!(dirty.is_empty());
        flush.flush(&mut host, true).unwrap();
    }

    #[test]
    fn only_4k_splits_large_leaves_and_largest_merges_them_back() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        let rwx = EptPerm::ReadWriteExecute;
        let g = |a| GuestPhysAddr::new(a);
        ept.map(&mut host, g(0), HostPhysAddr::new(1 << 30), 1 << 30, rwx)
            .unwrap()
            .flush(&mut host, false)
            .unwrap();
        let frames = host.outstanding();
        // 4 KiB pages for [2 MiB, 6 MiB): the 1 GiB leaf and two 2 MiB
        // leaves split, the rest of the gigabyte keeps 2 MiB pages.
        ept.map_with(
            &mut host,
            g(2 << 20),
            HostPhysAddr::new((1 << 30) + (2 << 20)),
            4 << 20,
            rwx,
            PageLimit::Only4K,
        )
        .unwrap()
        .flush(&mut host, false)
        .unwrap();
        assert_eq!(ept.stats.splits, 3);
        let leaves = ept.leaves(&host);
        assert_eq!(leaves.len(), 1024 + 510);
        for l in &leaves {
            let small = (2 << 20..6 << 20).contains(&l.gpa);
            assert_eq!(l.size, if small { 4096 } else { 2 << 20 }, "{l:x?}");
            assert_eq!(l.hpa, (1 << 30) + l.gpa);
        }
        ept.map(&mut host, g(0), HostPhysAddr::new(1 << 30), 1 << 30, rwx)
            .unwrap()
            .flush(&mut host, false)
            .unwrap();
        assert_eq!(ept.leaves(&host).len(), 1);
        assert_eq!(host.outstanding(), frames);
    }

    #[test]
    fn leaf_flags_are_taken_in_a_range_and_write_permission_granted() {
        let mut host = MockPhys::new(16 << 20);
        let mut ept = Ept::new(&mut host, ALL).unwrap();
        ept.map_with(
            &mut host,
            GuestPhysAddr::new(0),
            HostPhysAddr::new(0),
            64 << 12,
            EptPerm::ReadExecute,
            PageLimit::Only4K,
        )
        .unwrap()
        .flush(&mut host, false)
        .unwrap();
        assert_eq!(
            ept.make_writable(&mut host, GuestPhysAddr::new(5 << 12)),
            Some(true)
        );
        assert_eq!(
            ept.make_writable(&mut host, GuestPhysAddr::new(5 << 12)),
            Some(false)
        );
        assert_eq!(
            ept.make_writable(&mut host, GuestPhysAddr::new(9 << 12)),
            Some(true)
        );
        assert_eq!(
            ept.make_writable(&mut host, GuestPhysAddr::new(64 << 12)),
            None
        );
        assert_eq!(
            ept.translate(&host, GuestPhysAddr::new(5 << 12))
                .map(|t| t.1),
            Some(true)
        );
        // Only the range asked for.
        let mut found = Vec::new();
        let (n, flush) = ept.take_leaf_flag(
            &mut host,
            6 << 12,
            10 << 12,
            HarvestFlag::Writable,
            &mut |g, s| found.push((g, s)),
        );
        assert_eq!((n, found), (1, vec![(9 << 12, 4096)]));
        assert!(flush.is_needed());
        flush.flush(&mut host, false).unwrap();
        assert_eq!(
            ept.translate(&host, GuestPhysAddr::new(9 << 12))
                .map(|t| t.1),
            Some(false)
        );
        let mut found = Vec::new();
        let (n, flush) = ept.take_leaf_flag(
            &mut host,
            0,
            u64::MAX,
            HarvestFlag::Writable,
            &mut |g, s| found.push((g, s)),
        );
        assert_eq!((n, found), (1, vec![(5 << 12, 4096)]));
        flush.flush(&mut host, false).unwrap();
        let (n, flush) = ept.take_leaf_flag(
            &mut host,
            0,
            u64::MAX,
            HarvestFlag::Writable,
            &mut |_, _| (),
        );
        assert_eq!(n, 0);
        assert!(!flush.is_needed(), "nothing cleared, nothing owed");
        flush.flush(&mut host, false).unwrap();
        let (n, flush) =
            ept.take_leaf_flag(&mut host, MAX_GPA, 4096, HarvestFlag::Dirty, &mut |_, _| ());
        assert_eq!(n, 0);
        flush.flush(&mut host, false).unwrap();
        assert!(ept
            .leaves(&host)
            .iter()
            .all(|l| !l.writable && l.size == 4096));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Random maps and unmaps agree page for page with a model map, and
        /// unmapping everything gives every table back.
        #[test]
        fn map_unmap_matches_a_page_model(ops in proptest::collection::vec((0u64..1024, 1u64..600, 0u64..64, proptest::bool::ANY, proptest::bool::ANY), 1..40)) {
            let mut host = MockPhys::new(32 << 20);
            let mut ept = Ept::new(&mut host, ALL).unwrap();
            let mut model = std::collections::BTreeMap::new();
            for (page, pages, hpage, ro, is_map) in ops {
                // Guest pages in the first 4 GiB in 2 MiB-friendly strides.
                let gpa = page * 512 * 4096 / 8;
                let size = pages * 4096;
                if is_map {
                    let hpa = hpage * (2 << 20);
                    let perm = if ro { EptPerm::ReadExecute } else { EptPerm::ReadWriteExecute };
                    ept.map(&mut host, GuestPhysAddr::new(gpa), HostPhysAddr::new(hpa), size, perm).unwrap().flush(&mut host, false).unwrap();
                    for p in 0..pages {
                        model.insert(gpa + p * 4096, (hpa + p * 4096, !ro));
                    }
                } else {
                    ept.unmap(&mut host, GuestPhysAddr::new(gpa), size).unwrap().flush(&mut host, false).unwrap();
                    for p in 0..pages {
                        model.remove(&(gpa + p * 4096));
                    }
                }
            }
            let mut pages = std::collections::BTreeMap::new();
            for l in ept.leaves(&host) {
                for p in 0..l.size / 4096 {
                    pages.insert(l.gpa + p * 4096, (l.hpa + p * 4096, l.writable));
                }
            }
            proptest::prop_assert_eq!(&pages, &model);
            let all: Vec<u64> = model.keys().copied().collect();
            for g in all {
                ept.unmap(&mut host, GuestPhysAddr::new(g), 4096).unwrap().flush(&mut host, false).unwrap();
            }
            proptest::prop_assert_eq!(host.outstanding(), 1);
        }
    }
}
