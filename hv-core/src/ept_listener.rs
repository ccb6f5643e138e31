//! EPT as a memory listener: each VM's guest-physical address space keeps
//! its EPT in step with the flat view.
//!
//! RAM, RAM-device and ROM-device (in romd mode) ranges are mapped to their
//! host blocks, read-only ones (ROM, read-only aliases, romd) as read +
//! execute; MMIO, reservations and holes stay not-present so that every
//! access exits. Changes arrive as `region_del`/`region_add` in one
//! begin/commit bracket; the commit issues exactly one INVEPT if anything
//! changed (never one per entry). [`EptMode::Rebuild`] instead rebuilds the
//! tree from the committed view at every commit; it exists to check the
//! incremental path and to measure it.

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::ept::{Ept, EptError, EptPerm, EptStats, Leaf, PageSizes, MAX_GPA};
use crate::frames::FrameAllocator;
use crate::memory::{FlatRange, ListenerCtx, MemoryListener, RamBacking, RangeTarget};
use crate::phys::PhysAccess;
use alloc::vec::Vec;

/// What the EPT listener needs from the host: memory for tables, and INVEPT.
pub trait EptHost: PhysAccess + FrameAllocator {
    /// Invalidates the cached translations of `eptp` (single context);
    /// `false` if the CPU refused.
    fn invept(&mut self, eptp: u64) -> bool;
}

/// A host block that `RamBacking::block` indexes: contiguous host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamBlock {
    pub hpa: HostPhysAddr,
    pub size: u64,
}

/// How the listener applies changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptMode {
    /// Apply each region_add / region_del (the default).
    Incremental,
    /// Throw the tree away and map the committed view at each commit.
    Rebuild,
}

/// Why a range could not be mapped. The VM must be stopped: its EPT no
/// longer matches its memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EptListenerError {
    /// A range names a RAM block that does not exist or is too small.
    BadBacking {
        gpa: u64,
        block: u32,
    },
    /// Guest and host addresses of a range differ by a non-page amount.
    Misaligned {
        gpa: u64,
    },
    Ept(EptError),
    /// INVEPT failed: stale translations may remain.
    Invept,
    /// The committed view could not be read for a rebuild.
    NoView,
}

/// Counters (exact; tests and benchmarks assert them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EptCounters {
    /// Commits that changed the EPT.
    pub updates: u64,
    /// INVEPT instructions requested.
    pub invepts: u64,
    /// Full rebuilds.
    pub rebuilds: u64,
    /// Ranges mapped / unmapped.
    pub maps: u64,
    pub unmaps: u64,
    /// RAM ranges with a partial page at either end (left unmapped).
    pub partial_pages: u64,
}

/// The EPT of one address space, kept by listening to it.
pub struct EptListener<H: EptHost> {
    ept: Option<Ept>,
    host: H,
    sizes: PageSizes,
    blocks: Vec<RamBlock>,
    accessed_dirty: bool,
    mode: EptMode,
    changed: bool,
    pub counters: EptCounters,
    error: Option<EptListenerError>,
    /// Table counters of trees thrown away by rebuilds.
    retired: EptStats,
}

fn page_down(a: u64) -> u64 {
    a & !(PAGE_SIZE - 1)
}

impl<H: EptHost> EptListener<H> {
    /// An empty EPT over `blocks`.
    pub fn new(
        mut host: H,
        sizes: PageSizes,
        blocks: Vec<RamBlock>,
        accessed_dirty: bool,
        mode: EptMode,
    ) -> Result<Self, EptError> {
        let ept = Ept::new(&mut host, sizes)?;
        Ok(Self {
            ept: Some(ept),
            host,
            sizes,
            blocks,
            accessed_dirty,
            mode,
            changed: false,
            counters: EptCounters::default(),
            error: None,
            retired: EptStats::default(),
        })
    }

    /// The EPT pointer for the VMCS (changes after a rebuild).
    pub fn eptp(&self) -> u64 {
        self.ept
            .as_ref()
            .map(|e| e.eptp(self.accessed_dirty))
            .unwrap_or(0)
    }

    /// Table counters of the EPT, including trees replaced by rebuilds.
    pub fn ept_stats(&self) -> EptStats {
        let now = self.ept.as_ref().map(|e| e.stats).unwrap_or_default();
        EptStats {
            entries_written: now.entries_written + self.retired.entries_written,
            tables_allocated: now.tables_allocated + self.retired.tables_allocated,
            tables_freed: now.tables_freed + self.retired.tables_freed,
        }
    }

    /// Whether the EPT records accessed/dirty flags (for the dirty log).
    pub fn dirty_tracking(&self) -> bool {
        self.accessed_dirty
    }

    fn invept(&mut self, eptp: u64) {
        self.counters.invepts += 1;
        if !self.host.invept(eptp) {
            self.fail(EptListenerError::Invept);
        }
    }

    /// Frees a whole tree after invalidating what the CPU may cache of it.
    fn retire(&mut self, old: Ept) {
        let eptp = old.eptp(self.accessed_dirty);
        self.invept(eptp);
        let stats = old.destroy(&mut self.host);
        self.retired.entries_written += stats.entries_written;
        self.retired.tables_allocated += stats.tables_allocated;
        self.retired.tables_freed += stats.tables_freed;
    }

    /// The first error since the last call, if any.
    pub fn take_error(&mut self) -> Option<EptListenerError> {
        self.error.take()
    }

    /// Every leaf mapping, in address order.
    pub fn leaves(&self) -> Vec<Leaf> {
        self.ept
            .as_ref()
            .map(|e| e.leaves(&self.host))
            .unwrap_or_default()
    }

    /// Translates a guest-physical address.
    pub fn translate(&self, gpa: u64) -> Option<(HostPhysAddr, bool, u64)> {
        self.ept
            .as_ref()?
            .translate(&self.host, GuestPhysAddr::new(gpa))
    }

    /// The host side (for tests and counters).
    pub fn host(&self) -> &H {
        &self.host
    }

    /// Dirty leaf pages overlapping a range, clearing their flags (then one
    /// INVEPT). Results are whole leaves: a 2 MiB leaf that overlaps the
    /// range is reported and cleared whole.
    pub fn take_dirty(&mut self, gpa: u64, size: u64) -> Vec<(u64, u64)> {
        let Some(ept) = self.ept.as_mut() else {
            return Vec::new();
        };
        let d = ept.take_dirty(&mut self.host, GuestPhysAddr::new(gpa), size);
        if !d.is_empty() {
            let eptp = ept.eptp(self.accessed_dirty);
            self.invept(eptp);
        }
        d
    }

    fn fail(&mut self, e: EptListenerError) {
        self.error.get_or_insert(e);
    }

    /// The guest range, host address and permission a flat range maps to,
    /// or `None` for ranges that stay unmapped.
    fn mapping(&mut self, r: &FlatRange) -> Option<(u64, u64, u64, EptPerm)> {
        let (backing, readonly): (RamBacking, bool) = match r.target {
            RangeTarget::Ram(b) | RangeTarget::RamDevice(b) => (b, r.readonly),
            RangeTarget::RomDevice { backing, .. } if r.romd_mode => (backing, true),
            _ => return None,
        };
        let end = r.start as u128 + r.size;
        let Some(block) = self.blocks.get(backing.block as usize).copied() else {
            self.fail(EptListenerError::BadBacking {
                gpa: r.start,
                block: backing.block,
            });
            return None;
        };
        let off = backing.offset as u128 + r.offset_in_region as u128;
        if off + r.size > block.size as u128 || end > MAX_GPA as u128 {
            self.fail(EptListenerError::BadBacking {
                gpa: r.start,
                block: backing.block,
            });
            return None;
        }
        let hpa = block.hpa.as_u64() + off as u64;
        if (hpa ^ r.start) & (PAGE_SIZE - 1) != 0 {
            self.fail(EptListenerError::Misaligned { gpa: r.start });
            return None;
        }
        // Only whole pages are mapped; partial pages at the ends keep
        // exiting.
        let start = r.start.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let stop = page_down(end as u64);
        if start != r.start || stop as u128 != end {
            self.counters.partial_pages += 1;
        }
        if stop <= start {
            return None;
        }
        let perm = if readonly {
            EptPerm::ReadExecute
        } else {
            EptPerm::ReadWriteExecute
        };
        Some((start, hpa + (start - r.start), stop - start, perm))
    }

    fn map_range(&mut self, r: &FlatRange) {
        let Some((gpa, hpa, size, perm)) = self.mapping(r) else {
            return;
        };
        let Some(ept) = self.ept.as_mut() else { return };
        match ept.map(
            &mut self.host,
            GuestPhysAddr::new(gpa),
            HostPhysAddr::new(hpa),
            size,
            perm,
        ) {
            Ok(crate::ept::InveptRequired) => {
                self.changed = true;
                self.counters.maps += 1;
            }
            Err(e) => self.fail(EptListenerError::Ept(e)),
        }
    }

    fn unmap_range(&mut self, r: &FlatRange) {
        // Recompute exactly what region_add mapped (errors were reported
        // then, so they are not reported twice).
        let saved = self.error;
        let m = self.mapping(r);
        self.error = saved;
        let Some((gpa, _, size, _)) = m else { return };
        let Some(ept) = self.ept.as_mut() else { return };
        match ept.unmap(&mut self.host, GuestPhysAddr::new(gpa), size) {
            Ok(crate::ept::InveptRequired) => {
                self.changed = true;
                self.counters.unmaps += 1;
            }
            Err(e) => self.fail(EptListenerError::Ept(e)),
        }
    }

    fn rebuild(&mut self, cx: &ListenerCtx<'_>) {
        if let Some(old) = self.ept.take() {
            self.retire(old);
        }
        match Ept::new(&mut self.host, self.sizes) {
            Ok(e) => self.ept = Some(e),
            Err(e) => {
                self.fail(EptListenerError::Ept(e));
                return;
            }
        }
        self.counters.rebuilds += 1;
        match cx.mem.committed_view(cx.space) {
            Ok(view) => {
                for r in &view.ranges {
                    self.map_range(r);
                }
            }
            Err(_) => self.fail(EptListenerError::NoView),
        }
        self.changed = true;
    }

    /// Gives every table back; the listener maps nothing afterwards (the VM
    /// is being torn down).
    pub fn release(&mut self) {
        if let Some(e) = self.ept.take() {
            self.retire(e);
        }
    }

    /// Gives every table back.
    pub fn destroy(mut self) -> H {
        if let Some(e) = self.ept.take() {
            e.destroy(&mut self.host);
        }
        self.host
    }
}

impl<H: EptHost> MemoryListener for EptListener<H> {
    fn begin(&mut self, _cx: &ListenerCtx<'_>) {
        self.changed = false;
    }

    fn region_add(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        match self.mode {
            EptMode::Incremental => self.map_range(r),
            EptMode::Rebuild => self.changed = true,
        }
    }

    fn region_del(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        match self.mode {
            EptMode::Incremental => self.unmap_range(r),
            EptMode::Rebuild => self.changed = true,
        }
    }

    fn commit(&mut self, cx: &ListenerCtx<'_>) {
        if self.mode == EptMode::Rebuild && self.changed {
            self.rebuild(cx);
        }
        if self.changed {
            self.counters.updates += 1;
            let eptp = self.eptp();
            self.invept(eptp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MemorySystem, MmioHandle};
    use crate::phys::mock::MockPhys;
    use alloc::rc::Rc;
    use core::cell::RefCell;

    struct Host {
        mem: MockPhys,
        invepts: u64,
    }
    impl PhysAccess for Host {
        fn read(&self, a: HostPhysAddr, b: &mut [u8]) {
            self.mem.read(a, b)
        }
        fn write(&mut self, a: HostPhysAddr, d: &[u8]) {
            self.mem.write(a, d)
        }
    }
    impl FrameAllocator for Host {
        fn alloc_contiguous(&mut self, s: u64, a: u64) -> Option<HostPhysAddr> {
            self.mem.alloc_contiguous(s, a)
        }
        fn free_contiguous(&mut self, a: HostPhysAddr, s: u64) {
            self.mem.free_contiguous(a, s)
        }
    }
    impl EptHost for Host {
        fn invept(&mut self, _eptp: u64) -> bool {
            self.invepts += 1;
            true
        }
    }

    const ALL: PageSizes = PageSizes {
        two_mib: true,
        one_gib: true,
    };
    const RAM: u64 = 1 << 30;

    fn listener(mode: EptMode) -> Rc<RefCell<EptListener<Host>>> {
        let host = Host {
            mem: MockPhys::new(24 << 20),
            invepts: 0,
        };
        // The block's host address is never dereferenced by the EPT.
        let blocks = alloc::vec![RamBlock {
            hpa: HostPhysAddr::new(0x1_0000_0000),
            size: RAM
        }];
        Rc::new(RefCell::new(
            EptListener::new(host, ALL, blocks, true, mode).unwrap(),
        ))
    }

    /// A PC-like map: RAM below 4 GiB (up to `low`) and above it as two
    /// aliases of one block, a ROM, and MMIO.
    struct Pc {
        mem: MemorySystem,
        root: crate::memory::RegionId,
        ram: crate::memory::RegionId,
        space: crate::memory::AddressSpaceId,
    }

    fn pc() -> Pc {
        let mut mem = MemorySystem::new();
        let root = mem.create_container("system", 1 << 64).unwrap();
        let ram = mem
            .create_ram(
                "pc.ram",
                RAM.into(),
                RamBacking {
                    block: 0,
                    offset: 0,
                },
            )
            .unwrap();
        let low = mem
            .create_alias("ram-below-4g", (768u128) << 20, ram, 0)
            .unwrap();
        let high = mem
            .create_alias("ram-above-4g", (256u128) << 20, ram, 768 << 20)
            .unwrap();
        mem.add_subregion(root, 0, low).unwrap();
        mem.add_subregion(root, 1 << 32, high).unwrap();
        let mmio = mem.create_mmio("dev", 0x1000, MmioHandle(1)).unwrap();
        mem.add_subregion_overlap(root, 0xFEB0_0000, mmio, 1)
            .unwrap();
        let space = mem.create_address_space("memory", root).unwrap();
        Pc {
            mem,
            root,
            ram,
            space,
        }
    }

    fn pages(leaves: &[Leaf]) -> Vec<(u64, u64, bool)> {
        let mut v = Vec::new();
        for l in leaves {
            v.push((l.gpa, l.hpa, l.writable));
            v.push((l.gpa + l.size - 1, l.hpa + l.size - 1, l.writable));
        }
        v
    }

    #[test]
    fn maps_ram_aliases_and_leaves_mmio_unmapped() {
        let mut pc = pc();
        let inc = listener(EptMode::Incremental);
        pc.mem.add_listener(pc.space, 0, inc.clone()).unwrap();
        let l = inc.borrow();
        assert_eq!(
            l.translate(0x1234_5678).map(|t| t.0),
            Some(HostPhysAddr::new(0x1_1234_5678))
        );
        assert_eq!(
            l.translate((1 << 32) + 5).map(|t| t.0),
            Some(HostPhysAddr::new(0x1_0000_0000 + (768 << 20) + 5))
        );
        assert_eq!(l.translate(0xFEB0_0000), None);
        assert_eq!(l.translate(768 << 20), None);
        // 768 MiB below 4 GiB from a 4 GiB-aligned block: 2 MiB pages.
        assert!(l.leaves().iter().all(|x| x.size == 2 << 20));
        assert_eq!(l.counters.invepts, 1);
    }

    #[test]
    fn one_invept_per_commit_and_rom_is_read_only() {
        let mut pc = pc();
        let inc = listener(EptMode::Incremental);
        pc.mem.add_listener(pc.space, 0, inc.clone()).unwrap();
        pc.mem.begin();
        let rom = pc
            .mem
            .create_rom(
                "bios",
                0x2_0000,
                RamBacking {
                    block: 0,
                    offset: 0x10_0000,
                },
            )
            .unwrap();
        pc.mem.add_subregion(pc.root, 0xFFFE_0000, rom).unwrap();
        for i in 0..10u64 {
            let m = pc.mem.create_mmio("hole", 0x1000, MmioHandle(2)).unwrap();
            pc.mem
                .add_subregion_overlap(pc.root, 0x100_0000 + i * 0x10_0000, m, 2)
                .unwrap();
        }
        pc.mem.commit().unwrap();
        let l = inc.borrow();
        assert_eq!(l.counters.invepts, 2, "registration and one commit");
        assert_eq!(l.host().invepts, 2);
        assert_eq!(l.translate(0xFFFE_1000).map(|t| t.1), Some(false));
        assert_eq!(l.translate(0x100_0000), None);
        assert_eq!(l.translate(0x100_1000).map(|t| t.2), Some(4096));
    }

    #[test]
    fn bad_backing_is_reported_not_mapped() {
        let mut pc = pc();
        let inc = listener(EptMode::Incremental);
        pc.mem.add_listener(pc.space, 0, inc.clone()).unwrap();
        let bad = pc
            .mem
            .create_ram(
                "bad",
                0x1000,
                RamBacking {
                    block: 7,
                    offset: 0,
                },
            )
            .unwrap();
        pc.mem
            .add_subregion_overlap(pc.root, 0xD000_0000, bad, 3)
            .unwrap();
        let mut l = inc.borrow_mut();
        assert_eq!(
            l.take_error(),
            Some(EptListenerError::BadBacking {
                gpa: 0xD000_0000,
                block: 7
            })
        );
        assert_eq!(l.translate(0xD000_0000), None);
        let _ = pc.ram;
    }

    /// The EPT must hold exactly the flat view's RAM/ROM pages, each in the
    /// largest page that alignment allows inside its range.
    fn check_against_view(
        mem: &mut MemorySystem,
        space: crate::memory::AddressSpaceId,
        l: &EptListener<Host>,
    ) -> Result<(), alloc::string::String> {
        // Runs of (gpa start, gpa end, hpa at start, writable), merged when
        // contiguous in both spaces.
        fn push(runs: &mut Vec<(u64, u64, u64, bool)>, run: (u64, u64, u64, bool)) {
            if let Some(last) = runs.last_mut() {
                if last.1 == run.0 && last.2 + (last.1 - last.0) == run.2 && last.3 == run.3 {
                    last.1 = run.1;
                    return;
                }
            }
            runs.push(run);
        }
        let view = mem.flat_view(space).unwrap();
        let block = 0x1_0000_0000u64;
        let mut want = Vec::new();
        let mut ranges = Vec::new();
        for r in view.ranges() {
            let RangeTarget::Ram(b) = r.target else {
                continue;
            };
            let hpa0 = block + b.offset + r.offset_in_region;
            let end = (r.start as u128 + r.size) as u64;
            let (g, e) = (r.start.div_ceil(4096) * 4096, end / 4096 * 4096);
            if g < e {
                push(&mut want, (g, e, hpa0 + (g - r.start), !r.readonly));
            }
            ranges.push((r.start, end, hpa0));
        }
        let mut got = Vec::new();
        for leaf in l.leaves() {
            push(
                &mut got,
                (leaf.gpa, leaf.gpa + leaf.size, leaf.hpa, leaf.writable),
            );
            let &(start, end, hpa0) = ranges
                .iter()
                .find(|(s, e, _)| *s <= leaf.gpa && leaf.gpa < *e)
                .ok_or(alloc::format!("leaf {leaf:?} outside any RAM range"))?;
            let largest = [1u64 << 30, 2 << 20, 4096]
                .into_iter()
                .find(|&sz| {
                    let base = leaf.gpa & !(sz - 1);
                    base >= start && base + sz <= end && (hpa0 + (base - start)).is_multiple_of(sz)
                })
                .unwrap_or(4096);
            if leaf.size != largest {
                return Err(alloc::format!(
                    "leaf {leaf:?} should be a {largest:#x} page"
                ));
            }
        }
        if got != want {
            return Err(alloc::format!(
                "EPT mappings differ from the flat view: {got:x?} vs {want:x?}"
            ));
        }
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// After every commit of random changes, the incremental EPT holds
        /// exactly the leaves a rebuilt one does.
        #[test]
        fn incremental_equals_rebuild(ops in proptest::collection::vec((0u8..5, 0u64..64, 0u64..16, proptest::bool::ANY), 1..30)) {
            let mut pc = pc();
            let inc = listener(EptMode::Incremental);
            let reb = listener(EptMode::Rebuild);
            pc.mem.add_listener(pc.space, 0, inc.clone()).unwrap();
            pc.mem.add_listener(pc.space, 1, reb.clone()).unwrap();
            let mut added = Vec::new();
            for (op, a, b, txn) in ops {
                if txn { pc.mem.begin(); }
                match op {
                    0 | 1 => {
                        // A RAM window of the block or an MMIO hole somewhere low.
                        let size = (b + 1) * 0x4_0000;
                        let r = if op == 0 {
                            pc.mem.create_alias("win", size.into(), pc.ram, a * 0x10_0000).unwrap()
                        } else {
                            pc.mem.create_mmio("hole", size.into(), MmioHandle(3)).unwrap()
                        };
                        pc.mem.add_subregion_overlap(pc.root, a * 0x20_0000 + b * 0x1000, r, (a % 3) as i32).unwrap();
                        added.push(r);
                    }
                    2 if !added.is_empty() => {
                        let r = added.remove((a as usize) % added.len());
                        pc.mem.del_subregion(pc.root, r).unwrap();
                    }
                    3 if !added.is_empty() => {
                        let r = added[(a as usize) % added.len()];
                        let en = pc.mem.region(r).unwrap().enabled;
                        pc.mem.set_enabled(r, !en).unwrap();
                    }
                    _ if !added.is_empty() => {
                        let r = added[(a as usize) % added.len()];
                        pc.mem.set_address(r, b * 0x30_0000).unwrap();
                    }
                    _ => {}
                }
                if txn { pc.mem.commit().unwrap(); }
                proptest::prop_assert_eq!(pages(&inc.borrow().leaves()), pages(&reb.borrow().leaves()));
                if pc.mem.transaction_depth() == 0 {
                    let r = check_against_view(&mut pc.mem, pc.space, &inc.borrow());
                    proptest::prop_assert!(r.is_ok(), "{}", r.unwrap_err());
                }
                proptest::prop_assert!(inc.borrow_mut().take_error().is_none());
            }
        }
    }

    #[test]
    fn no_frames_leak_over_ten_thousand_changes() {
        let mut pc = pc();
        let inc = listener(EptMode::Incremental);
        let id = pc.mem.add_listener(pc.space, 0, inc.clone()).unwrap();
        let baseline = inc.borrow().host().mem.outstanding();
        let hole = pc.mem.create_mmio("hole", 0x3000, MmioHandle(4)).unwrap();
        pc.mem.add_subregion_overlap(pc.root, 0, hole, 5).unwrap();
        for i in 0..10_000u64 {
            // Walk a 3-page hole across RAM: splits and re-merges large pages.
            pc.mem
                .set_address(hole, (i * 0x7000) % (700 << 20))
                .unwrap();
        }
        pc.mem.del_subregion(pc.root, hole).unwrap();
        assert_eq!(
            inc.borrow().host().mem.outstanding(),
            baseline,
            "same tables as before the changes"
        );
        pc.mem.remove_listener(id).unwrap();
        assert_eq!(
            inc.borrow().host().mem.outstanding(),
            1,
            "only the PML4 remains once every range is deleted"
        );
        assert_eq!(inc.borrow().counters.invepts, 10_003);
    }
}
