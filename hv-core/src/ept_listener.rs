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
//!
//! # Dirty logging
//!
//! A mapped range whose dirty-log mask ([`FlatRange::dirty_log_mask`], set
//! with [`MemorySystem::set_dirty_log_mask`](crate::memory::MemorySystem::set_dirty_log_mask)
//! on the terminal RAM region) is non-zero is *logged*: it is mapped with
//! 4 KiB leaves only, so that the CPU records writes per 4 KiB page
//! (as KVM splits large pages of a slot with `KVM_MEM_LOG_DIRTY_PAGES`).
//! `log_start` remaps a range that was mapped large, `log_stop` (mask back to
//! 0) remaps it with the largest pages again, `region_add` of a logged range
//! maps it 4 KiB from the start.
//!
//! How writes are detected ([`DirtyLogMode`]):
//! * with EPT A/D (`accessed_dirty`), the CPU sets the leaf's dirty flag;
//! * without it, writable logged ranges are mapped read-only and the kernel
//!   hands each write fault to [`EptListener::log_write_fault`], which makes
//!   that 4 KiB page writable; a writable page of a logged range is a dirty
//!   page.
//!
//! [`EptListener::sync_dirty`] reports the dirty pages as (RAM block, page)
//! in a [`DirtyBitmap`], re-arms them (clears the dirty flags, or
//! write-protects again) and issues one INVEPT if it re-armed anything.
//!
//! Logging records writes from the moment a range is logged; the pages'
//! contents before that are the caller's: as QEMU sets the whole migration
//! bitmap of every RAM block when migration starts (`ram_list_init_bitmaps`),
//! the caller starts from [`DirtyBitmap::set_all`]. That covers RAM that is
//! hidden or unmapped when logging starts and RAM mapped later, whatever
//! the topology does meanwhile. Dirty flags of a logged range that is
//! unmapped, stops logging or is dropped by a rebuild are collected into the
//! listener's pending bitmap first, so no write is lost; the next
//! `sync_dirty` hands them out.

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::dirty::{DirtyBitmap, DirtyError};
use crate::ept::{
    Ept, EptError, EptPerm, EptStats, HarvestFlag, InveptFlush, Leaf, PageLimit, PageSizes, MAX_GPA,
};
use crate::frames::FrameAllocator;
use crate::memory::{FlatRange, ListenerCtx, MemoryListener, RamBacking, RangeTarget};
use crate::phys::PhysAccess;
use alloc::collections::BTreeMap;
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

/// How writes to logged ranges are detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// The CPU sets EPT dirty flags (EPTP bit 6).
    AccessedDirty,
    /// Logged RAM is mapped read-only; write faults go to
    /// [`EptListener::log_write_fault`].
    WriteProtect,
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
    /// The dirty log could not be kept (bitmap allocation), or a bitmap of
    /// other RAM blocks was passed to [`EptListener::sync_dirty`].
    DirtyLog(DirtyError),
}

impl core::fmt::Display for EptListenerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadBacking { gpa, block } => {
                write!(
                    f,
                    "range at GPA {gpa:#x} names RAM block {block}, which does not back it"
                )
            }
            Self::Misaligned { gpa } => write!(
                f,
                "range at GPA {gpa:#x}: guest and host addresses differ by a non-page amount"
            ),
            Self::Ept(e) => write!(f, "{e}"),
            Self::Invept => write!(f, "INVEPT failed"),
            Self::NoView => write!(f, "the committed view could not be read"),
            Self::DirtyLog(e) => write!(f, "the dirty log could not be kept: {e:?}"),
        }
    }
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
    /// `sync_dirty` calls.
    pub dirty_syncs: u64,
    /// Pages `sync_dirty` reported (sum of its results).
    pub dirty_pages: u64,
    /// Leaf dirty flags (or, write-protecting, write permissions) found
    /// and cleared: by syncs, and before a logged range is unmapped or stops
    /// logging.
    pub dirty_harvested: u64,
    /// Large leaves split to map logged ranges with 4 KiB pages.
    pub log_splits: u64,
    /// Ranges whose logging started / stopped (`log_start`/`log_stop`, and
    /// region_add of a logged range).
    pub log_starts: u64,
    pub log_stops: u64,
    /// Write faults resolved by [`EptListener::log_write_fault`].
    pub log_write_faults: u64,
}

/// A logged range: its mapped (whole-page) part and where that lies in its
/// RAM block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Logged {
    gpa: u64,
    end: u64,
    block: u32,
    /// Block offset of `gpa`.
    offset: u64,
    /// The range allows writes (RAM, not ROM/read-only alias/romd).
    writable: bool,
    /// The tree maps it as logged. A range logged in Rebuild mode is mapped
    /// large (and writable) in the old tree until the commit's rebuild:
    /// its flags there are not the log's.
    armed: bool,
}

/// The pages of a range's mapping.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    gpa: u64,
    hpa: u64,
    size: u64,
    perm: EptPerm,
    block: u32,
    /// Block offset of `gpa`.
    offset: u64,
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
    /// Logged ranges by the start of their flat range (flat ranges are
    /// disjoint, and region_del / log_stop name the range region_add /
    /// log_start did).
    logged: BTreeMap<u64, Logged>,
    /// Dirty pages harvested outside `sync_dirty`, not yet handed out.
    /// Created with the first logged range.
    pending: Option<DirtyBitmap>,
    /// The INVEPT owed for changes since the last one, with the tables
    /// they unlinked (freed only after it).
    owed: Option<InveptFlush>,
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
            logged: BTreeMap::new(),
            pending: None,
            owed: None,
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
            splits: now.splits + self.retired.splits,
        }
    }

    /// Whether the EPT records accessed/dirty flags (for the dirty log).
    pub fn dirty_tracking(&self) -> bool {
        self.accessed_dirty
    }

    /// How writes to logged ranges are detected.
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        if self.accessed_dirty {
            DirtyLogMode::AccessedDirty
        } else {
            DirtyLogMode::WriteProtect
        }
    }

    /// Adds a change's token to what the next INVEPT covers. A token of
    /// another tree (after a rebuild) first flushes what is owed.
    fn absorb(&mut self, t: InveptFlush) {
        let t = match self.owed.as_mut() {
            None => t,
            Some(owed) => match owed.merge(t) {
                Ok(()) => return,
                Err(t) => {
                    self.flush_owed();
                    t
                }
            },
        };
        self.owed = Some(t);
    }

    /// Issues the INVEPT that is owed, if any, then frees the tables it
    /// covers; `false` (and the error recorded) if the CPU refused, in
    /// which case those tables are never freed.
    fn flush_owed(&mut self) -> bool {
        let Some(t) = self.owed.take() else {
            return true;
        };
        let needed = t.is_needed();
        let r = t.flush(&mut self.host, self.accessed_dirty);
        self.counters.invepts += u64::from(needed);
        if r.is_err() {
            self.fail(EptListenerError::Invept);
            return false;
        }
        true
    }

    /// Executes a token's INVEPT (with whatever else is owed), then frees
    /// the tables it covers.
    pub fn flush(&mut self, t: InveptFlush) -> Result<(), EptListenerError> {
        self.absorb(t);
        if self.flush_owed() {
            Ok(())
        } else {
            Err(EptListenerError::Invept)
        }
    }

    /// Tears a whole tree down: invalidates it, then frees its tables.
    fn retire(&mut self, old: Ept) {
        let (flush, stats) = old.destroy(&self.host);
        self.absorb(flush);
        self.flush_owed();
        self.retired.entries_written += stats.entries_written;
        self.retired.tables_allocated += stats.tables_allocated;
        self.retired.tables_freed += stats.tables_freed;
        self.retired.splits += stats.splits;
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

    /// Dirty leaf pages overlapping a range, clearing their flags, and the
    /// token of the INVEPT that must follow (give it to
    /// [`flush`](Self::flush)). Results are whole leaves: a 2 MiB leaf that
    /// overlaps the range is reported and cleared whole. (Independent of
    /// the dirty log; a logged range's flags taken here are not seen by
    /// `sync_dirty`.) `None` without an EPT.
    pub fn take_dirty(&mut self, gpa: u64, size: u64) -> Option<(Vec<(u64, u64)>, InveptFlush)> {
        let ept = self.ept.as_mut()?;
        Some(ept.take_dirty(&mut self.host, GuestPhysAddr::new(gpa), size))
    }

    // ------------------------------------------------------------------
    // Dirty log
    // ------------------------------------------------------------------

    fn block_sizes(&self) -> Vec<u64> {
        self.blocks.iter().map(|b| b.size).collect()
    }

    /// A clean bitmap of this VM's RAM blocks, for [`sync_dirty`](Self::sync_dirty).
    pub fn dirty_bitmap(&self) -> Result<DirtyBitmap, DirtyError> {
        DirtyBitmap::new(&self.block_sizes())
    }

    /// The logged ranges, as the guest-physical pages they map
    /// `[start, end)`, in address order.
    pub fn logged_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.logged.values().map(|l| (l.gpa, l.end))
    }

    /// Pages the next `sync_dirty` reports without reading the EPT: dirty
    /// pages of logged ranges that were unmapped, stopped logging or were
    /// rebuilt since the last sync.
    pub fn pending_dirty(&self) -> u64 {
        self.pending.as_ref().map_or(0, DirtyBitmap::count)
    }

    /// Moves the dirty pages of every logged range into `out` (bits are
    /// only set, never cleared there) and re-arms them: dirty flags cleared
    /// (or write permission taken back), then **one** INVEPT if anything was
    /// re-armed, none otherwise. Returns how many distinct (block, page)
    /// pages were found dirty.
    ///
    /// Call it with the vCPU out of guest mode, then copy the reported pages:
    /// a write after the sync is reported by the next one. `out` must have
    /// this VM's blocks ([`dirty_bitmap`](Self::dirty_bitmap)); otherwise
    /// nothing is read or cleared. If INVEPT fails, the pages are still in
    /// `out` but the error is returned: later writes may go unseen, so
    /// migration must stop.
    pub fn sync_dirty(&mut self, out: &mut DirtyBitmap) -> Result<u64, EptListenerError> {
        if !out.fits(&self.block_sizes()) {
            return Err(EptListenerError::DirtyLog(DirtyError::ShapeMismatch));
        }
        self.counters.dirty_syncs += 1;
        let mut rearmed = 0;
        let mut from = 0;
        while let Some((&key, &l)) = self.logged.range(from..).next() {
            rearmed += self.harvest(&l);
            // Keys are guest addresses below 2^48.
            from = key + 1;
        }
        let mut result = Ok(());
        if rearmed > 0 && !self.flush_owed() {
            result = Err(EptListenerError::Invept);
        }
        let Some(pending) = self.pending.as_mut() else {
            return result.map(|()| 0);
        };
        let n = pending.count();
        out.merge(pending).map_err(EptListenerError::DirtyLog)?;
        pending.clear_all();
        self.counters.dirty_pages += n;
        result.map(|()| n)
    }

    /// A write fault at `gpa` (an EPT violation for a write). In
    /// write-protect mode, if `gpa` is in a logged range that allows writes,
    /// its 4 KiB page becomes writable and is dirty until the next sync:
    /// returns `true` and the guest instruction is simply retried. `false`
    /// for every other fault (MMIO, ROM, A/D mode): handle it as before.
    pub fn log_write_fault(&mut self, gpa: u64) -> bool {
        if self.accessed_dirty {
            return false;
        }
        let Some((_, l)) = self.logged.range(..=gpa).next_back() else {
            return false;
        };
        if !(l.writable && l.gpa <= gpa && gpa < l.end) {
            return false;
        }
        let Some(ept) = self.ept.as_mut() else {
            return false;
        };
        match ept.make_writable(&mut self.host, GuestPhysAddr::new(page_down(gpa))) {
            Some(_) => {
                self.counters.log_write_faults += 1;
                true
            }
            None => false,
        }
    }

    /// The pending bitmap, created on first use.
    fn pending(&mut self) -> Option<&mut DirtyBitmap> {
        if self.pending.is_none() {
            match DirtyBitmap::new(&self.block_sizes()) {
                Ok(p) => self.pending = Some(p),
                Err(e) => {
                    self.fail(EptListenerError::DirtyLog(e));
                    return None;
                }
            }
        }
        self.pending.as_mut()
    }

    /// Collects the dirty pages of a logged range into the pending bitmap
    /// and re-arms them; returns how many leaves were re-armed (their
    /// INVEPT is owed: the next flush covers it).
    fn harvest(&mut self, l: &Logged) -> u64 {
        let flag = if !l.armed {
            return 0;
        } else if self.accessed_dirty {
            HarvestFlag::Dirty
        } else if l.writable {
            HarvestFlag::Writable
        } else {
            return 0;
        };
        let (Some(ept), Some(pending)) = (self.ept.as_mut(), self.pending.as_mut()) else {
            return 0;
        };
        let mut bad = None;
        let (n, flush) = ept.take_leaf_flag(
            &mut self.host,
            l.gpa,
            l.end - l.gpa,
            flag,
            &mut |g, size| {
                // Leaves of a logged range are 4 KiB, but clip anyway.
                let (s, e) = (g.max(l.gpa), g.saturating_add(size).min(l.end));
                if s < e {
                    if let Err(err) = pending.set_range(l.block, l.offset + (s - l.gpa), e - s) {
                        bad = Some(err);
                    }
                }
            },
        );
        self.absorb(flush);
        if let Some(e) = bad {
            self.fail(EptListenerError::DirtyLog(e));
        }
        self.counters.dirty_harvested += n;
        n
    }

    /// Starts tracking a logged range, mapped 4 KiB already (`armed`) or by
    /// the commit's rebuild.
    fn track(&mut self, key: u64, m: &Mapping, armed: bool) {
        if self.pending().is_none() {
            // Recorded: the VM must stop, its writes cannot be logged.
            return;
        }
        self.counters.log_starts += 1;
        self.logged.insert(
            key,
            Logged {
                gpa: m.gpa,
                end: m.gpa + m.size,
                block: m.block,
                offset: m.offset,
                writable: m.perm == EptPerm::ReadWriteExecute,
                armed,
            },
        );
    }

    // ------------------------------------------------------------------
    // Mapping
    // ------------------------------------------------------------------

    fn fail(&mut self, e: EptListenerError) {
        self.error.get_or_insert(e);
    }

    /// The guest range, host address and permission a flat range maps to,
    /// or `None` for ranges that stay unmapped.
    fn mapping(&mut self, r: &FlatRange) -> Option<Mapping> {
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
        Some(Mapping {
            gpa: start,
            hpa: hpa + (start - r.start),
            size: stop - start,
            perm,
            block: backing.block,
            // off + size fits the block (checked above), so this fits u64.
            offset: off as u64 + (start - r.start),
        })
    }

    /// [`mapping`](Self::mapping) without recording errors or counting
    /// partial pages again (they were when the range was added).
    fn quiet_mapping(&mut self, r: &FlatRange) -> Option<Mapping> {
        let (error, partial) = (self.error, self.counters.partial_pages);
        let m = self.mapping(r);
        self.error = error;
        self.counters.partial_pages = partial;
        m
    }

    /// Writes a mapping into the EPT: 4 KiB leaves if `logged` (read-only in
    /// write-protect mode), else the largest pages. `true` if it was written.
    fn ept_map(&mut self, m: &Mapping, logged: bool) -> bool {
        let (limit, perm) = if logged {
            let perm = if self.accessed_dirty {
                m.perm
            } else {
                EptPerm::ReadExecute
            };
            (PageLimit::Only4K, perm)
        } else {
            (PageLimit::Largest, m.perm)
        };
        let Some(ept) = self.ept.as_mut() else {
            return false;
        };
        let splits = ept.stats.splits;
        let r = ept.map_with(
            &mut self.host,
            GuestPhysAddr::new(m.gpa),
            HostPhysAddr::new(m.hpa),
            m.size,
            perm,
            limit,
        );
        if logged {
            self.counters.log_splits += ept.stats.splits - splits;
        }
        match r {
            Ok(flush) => {
                self.absorb(flush);
                self.changed = true;
                true
            }
            Err(p) => {
                // What was changed before the error still needs its INVEPT.
                self.changed |= p.flush.is_needed();
                self.absorb(p.flush);
                self.fail(EptListenerError::Ept(p.error));
                false
            }
        }
    }

    fn map_range(&mut self, r: &FlatRange) -> Option<Mapping> {
        let m = self.mapping(r)?;
        if self.ept_map(&m, r.dirty_log_mask != 0) {
            self.counters.maps += 1;
        }
        Some(m)
    }

    fn unmap_range(&mut self, r: &FlatRange) {
        // Recompute exactly what region_add mapped (errors were reported
        // then, so they are not reported twice).
        let saved = self.error;
        let m = self.mapping(r);
        self.error = saved;
        let Some(m) = m else { return };
        let Some(ept) = self.ept.as_mut() else { return };
        match ept.unmap(&mut self.host, GuestPhysAddr::new(m.gpa), m.size) {
            Ok(flush) => {
                self.absorb(flush);
                self.changed = true;
                self.counters.unmaps += 1;
            }
            Err(p) => {
                self.changed |= p.flush.is_needed();
                self.absorb(p.flush);
                self.fail(EptListenerError::Ept(p.error));
            }
        }
    }

    fn rebuild(&mut self, cx: &ListenerCtx<'_>) {
        // Dirty flags of ranges logged in the old tree: collect them before
        // it goes (the retire below is the INVEPT).
        let mut from = 0;
        while let Some((&key, &l)) = self.logged.range(from..).next() {
            self.harvest(&l);
            from = key + 1;
        }
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
        for l in self.logged.values_mut() {
            l.armed = true;
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

    /// Gives every table back (after invalidating the tree).
    pub fn destroy(mut self) -> H {
        if let Some(e) = self.ept.take() {
            self.retire(e);
        }
        self.host
    }
}

impl<H: EptHost> MemoryListener for EptListener<H> {
    fn begin(&mut self, _cx: &ListenerCtx<'_>) {
        self.changed = false;
    }

    fn region_add(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        let m = match self.mode {
            EptMode::Incremental => self.map_range(r),
            EptMode::Rebuild => {
                self.changed = true;
                self.quiet_mapping(r)
            }
        };
        if let Some(m) = m {
            if r.dirty_log_mask != 0 {
                self.track(r.start, &m, self.mode == EptMode::Incremental);
            }
        }
    }

    fn region_del(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        if let Some(l) = self.logged.remove(&r.start) {
            // The commit's INVEPT covers the re-armed leaves.
            self.harvest(&l);
        }
        match self.mode {
            EptMode::Incremental => self.unmap_range(r),
            EptMode::Rebuild => self.changed = true,
        }
    }

    fn log_start(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange, _old: u8, new: u8) {
        if new == 0 || self.logged.contains_key(&r.start) {
            // Already logged: registration replays region_add (which
            // started it) and log_start; or another client joined.
            return;
        }
        let Some(m) = self.quiet_mapping(r) else {
            return;
        };
        match self.mode {
            EptMode::Incremental => {
                self.ept_map(&m, true);
            }
            EptMode::Rebuild => self.changed = true,
        }
        self.track(r.start, &m, self.mode == EptMode::Incremental);
    }

    fn log_stop(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange, _old: u8, new: u8) {
        if new != 0 {
            return;
        }
        let Some(l) = self.logged.remove(&r.start) else {
            return;
        };
        self.harvest(&l);
        self.counters.log_stops += 1;
        match self.mode {
            EptMode::Incremental => {
                if let Some(m) = self.quiet_mapping(r) {
                    self.ept_map(&m, false);
                }
            }
            EptMode::Rebuild => self.changed = true,
        }
    }

    fn commit(&mut self, cx: &ListenerCtx<'_>) {
        if self.mode == EptMode::Rebuild && self.changed {
            self.rebuild(cx);
        }
        if self.changed {
            self.counters.updates += 1;
        }
        // One INVEPT for everything the commit changed or re-armed.
        self.flush_owed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::LOG_MIGRATION;
    use crate::ept::EptFlags;
    use crate::memory::{AddressSpaceId, MemorySystem, MmioHandle, RegionId};
    use crate::phys::mock::MockPhys;
    use alloc::rc::Rc;
    use core::cell::RefCell;

    /// The host: memory for tables, INVEPT, and the CPU's cache of
    /// translations that allow writes (`(leaf gpa, leaf size)`), emptied by
    /// INVEPT. A write through a cached translation touches no EPT entry,
    /// as on a real CPU, so a missing INVEPT loses writes in these tests.
    struct Host {
        mem: MockPhys,
        invepts: u64,
        tlb: Vec<(u64, u64)>,
        /// Table frames freed when each INVEPT ran.
        freed_at_invept: Vec<u64>,
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
            self.tlb.clear();
            self.freed_at_invept.push(self.mem.freed);
            true
        }
    }

    const ALL: PageSizes = PageSizes {
        two_mib: true,
        one_gib: true,
    };
    const RAM: u64 = 1 << 30;

    fn listener(mode: EptMode) -> Rc<RefCell<EptListener<Host>>> {
        listener_for(&[RAM], true, mode, 24 << 20)
    }

    /// Host address of block `i` (1 GiB aligned; the EPT never dereferences
    /// it).
    fn block_hpa(i: usize) -> u64 {
        (i as u64 + 1) << 32
    }

    /// A listener over blocks of `sizes`, with or without EPT A/D, with
    /// `mem` bytes of host memory for tables.
    fn listener_for(
        sizes: &[u64],
        accessed_dirty: bool,
        mode: EptMode,
        mem: u64,
    ) -> Rc<RefCell<EptListener<Host>>> {
        let host = Host {
            mem: MockPhys::new(mem),
            invepts: 0,
            tlb: Vec::new(),
            freed_at_invept: Vec::new(),
        };
        let blocks = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| RamBlock {
                hpa: HostPhysAddr::new(block_hpa(i)),
                size,
            })
            .collect();
        Rc::new(RefCell::new(
            EptListener::new(host, ALL, blocks, accessed_dirty, mode).unwrap(),
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
        pc_sized(RAM, 768 << 20)
    }

    /// [`pc`] with `ram` bytes of RAM, `low` of them below 4 GiB.
    fn pc_sized(ram_size: u64, low: u64) -> Pc {
        let mut mem = MemorySystem::new();
        let root = mem.create_container("system", 1 << 64).unwrap();
        let ram = mem
            .create_ram(
                "pc.ram",
                ram_size.into(),
                RamBacking {
                    block: 0,
                    offset: 0,
                },
            )
            .unwrap();
        let below = mem
            .create_alias("ram-below-4g", low.into(), ram, 0)
            .unwrap();
        let high = mem
            .create_alias("ram-above-4g", (ram_size - low).into(), ram, low)
            .unwrap();
        mem.add_subregion(root, 0, below).unwrap();
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
    fn tables_a_commit_unlinks_are_freed_after_its_invept() {
        let mut pc = pc();
        let inc = listener(EptMode::Incremental);
        pc.mem.add_listener(pc.space, 0, inc.clone()).unwrap();
        // A small RAM region far from the rest needs tables of its own.
        let ram = pc
            .mem
            .create_ram(
                "far",
                0x3000,
                RamBacking {
                    block: 0,
                    offset: 0x20_0000,
                },
            )
            .unwrap();
        pc.mem.add_subregion(pc.root, 0x80_0000_0000, ram).unwrap();
        let before = inc.borrow().host().mem.freed;
        pc.mem.del_subregion(pc.root, ram).unwrap();
        let l = inc.borrow();
        let host = l.host();
        // PDPT, PD and PT of the far range went, after the INVEPT.
        assert_eq!(host.mem.freed, before + 3);
        assert_eq!(host.freed_at_invept.last(), Some(&before));
        assert!(l.owed.is_none());
        drop(l);
        let invepts = inc.borrow().host().invepts;
        inc.borrow_mut().release();
        let l = inc.borrow();
        assert_eq!(l.host().invepts, invepts + 1, "teardown invalidates first");
        assert_eq!(l.host().freed_at_invept.last(), Some(&(before + 3)));
        assert_eq!(l.host().mem.outstanding(), 0);
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
    /// largest page that alignment allows inside its range, or in 4 KiB
    /// pages if the range is logged; the logged ranges are the view's.
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
        let mut logged = Vec::new();
        for r in view.ranges() {
            let RangeTarget::Ram(b) = r.target else {
                continue;
            };
            let hpa0 = block + b.offset + r.offset_in_region;
            let end = (r.start as u128 + r.size) as u64;
            let (g, e) = (r.start.div_ceil(4096) * 4096, end / 4096 * 4096);
            if g < e {
                push(&mut want, (g, e, hpa0 + (g - r.start), !r.readonly));
                if r.dirty_log_mask != 0 {
                    logged.push((g, e));
                }
            }
            ranges.push((r.start, end, hpa0, r.dirty_log_mask != 0));
        }
        let got_logged: Vec<(u64, u64)> = l.logged_ranges().collect();
        if got_logged != logged {
            return Err(alloc::format!(
                "logged ranges {got_logged:x?}, the view logs {logged:x?}"
            ));
        }
        let mut got = Vec::new();
        for leaf in l.leaves() {
            push(
                &mut got,
                (leaf.gpa, leaf.gpa + leaf.size, leaf.hpa, leaf.writable),
            );
            let &(start, end, hpa0, logged) = ranges
                .iter()
                .find(|(s, e, _, _)| *s <= leaf.gpa && leaf.gpa < *e)
                .ok_or(alloc::format!("leaf {leaf:?} outside any RAM range"))?;
            let largest = [1u64 << 30, 2 << 20, 4096]
                .into_iter()
                .filter(|&sz| !logged || sz == 4096)
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
        /// exactly the leaves a rebuilt one does. RAM windows are aliases of
        /// the block's region or RAM regions of their own, and dirty logging
        /// is switched on and off on them and on the whole RAM.
        #[test]
        fn incremental_equals_rebuild(ops in proptest::collection::vec((0u8..6, 0u64..64, 0u64..16, proptest::bool::ANY), 1..30)) {
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
                        let r = if op == 0 && b % 2 == 0 {
                            pc.mem.create_alias("win", size.into(), pc.ram, a * 0x10_0000).unwrap()
                        } else if op == 0 {
                            let backing = RamBacking { block: 0, offset: a * 0x10_0000 };
                            let r = pc.mem.create_ram("ramwin", size.into(), backing).unwrap();
                            if a % 2 == 0 {
                                // Logged before it is mapped.
                                pc.mem.set_dirty_log_mask(r, LOG_MIGRATION).unwrap();
                            }
                            r
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
                    4 if !added.is_empty() => {
                        let r = added[(a as usize) % added.len()];
                        pc.mem.set_address(r, b * 0x30_0000).unwrap();
                    }
                    5 => {
                        // Toggle logging of a window or, for an alias or an
                        // MMIO hole (whose mask the view ignores), the RAM.
                        let r = added.get((a as usize) % added.len().max(1)).copied();
                        let r = match r {
                            Some(r) if pc.mem.region(r).unwrap().name == "ramwin" => r,
                            _ => pc.ram,
                        };
                        let on = pc.mem.region(r).unwrap().dirty_log_mask != 0;
                        pc.mem.set_dirty_log_mask(r, if on { 0 } else { LOG_MIGRATION }).unwrap();
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

    // ------------------------------------------------------------------
    // Dirty logging
    // ------------------------------------------------------------------

    /// Plays the CPU writing `gpa`: through a cached translation the write
    /// touches no entry; otherwise the leaf must be present and writable
    /// (else an EPT violation: `false`), gets A and D if A/D is on, and is
    /// cached.
    fn cpu_write(l: &mut EptListener<Host>, gpa: u64) -> bool {
        if l.host.tlb.iter().any(|&(s, n)| s <= gpa && gpa - s < n) {
            return true;
        }
        let Some((e, size)) = l.ept.as_ref().and_then(|t| t.leaf_entry(&l.host, gpa)) else {
            return false;
        };
        let v = l.host.read_u64(e);
        if v & EptFlags::WRITE.bits() == 0 {
            return false;
        }
        if l.accessed_dirty {
            l.host
                .write_u64(e, v | (EptFlags::ACCESSED | EptFlags::DIRTY).bits());
        }
        l.host.tlb.push((gpa & !(size - 1), size));
        true
    }

    /// A guest write as the VM runs it: a write fault goes to
    /// `log_write_fault` and the instruction is retried.
    fn guest_write(l: &Rc<RefCell<EptListener<Host>>>, gpa: u64) {
        let mut l = l.borrow_mut();
        if !cpu_write(&mut l, gpa) {
            assert!(
                l.log_write_fault(gpa),
                "unexpected EPT violation at {gpa:#x}"
            );
            assert!(cpu_write(&mut l, gpa), "write at {gpa:#x} faults again");
        }
    }

    fn sync(l: &Rc<RefCell<EptListener<Host>>>) -> (u64, Vec<(u32, u64)>) {
        let mut l = l.borrow_mut();
        let mut bm = l.dirty_bitmap().unwrap();
        let n = l.sync_dirty(&mut bm).unwrap();
        (n, bm.iter().collect())
    }

    fn invepts(l: &Rc<RefCell<EptListener<Host>>>) -> u64 {
        let l = l.borrow();
        assert_eq!(l.counters.invepts, l.host.invepts);
        l.host.invepts
    }

    /// RAM regions `(gpa, block, offset, size)` in one address space.
    fn ram_map(ranges: &[(u64, u32, u64, u64)]) -> (MemorySystem, Vec<RegionId>, AddressSpaceId) {
        let mut mem = MemorySystem::new();
        let root = mem.create_container("system", 1 << 64).unwrap();
        let mut regions = Vec::new();
        for &(gpa, block, offset, size) in ranges {
            let r = mem
                .create_ram("ram", size.into(), RamBacking { block, offset })
                .unwrap();
            mem.add_subregion(root, gpa, r).unwrap();
            regions.push(r);
        }
        let space = mem.create_address_space("memory", root).unwrap();
        (mem, regions, space)
    }

    fn in_range(l: &Leaf, start: u64, end: u64) -> bool {
        start <= l.gpa && l.gpa < end
    }

    #[test]
    fn logging_splits_exactly_the_logged_range_and_stopping_restores_it() {
        const G: u64 = 1 << 30;
        const M2: u64 = 2 << 20;
        let l = listener_for(&[2 * G, 64 << 20], true, EptMode::Incremental, 32 << 20);
        let (mut mem, regs, space) = ram_map(&[(0, 0, 0, 2 * G), (4 * G, 1, 0, 64 << 20)]);
        mem.add_listener(space, 0, l.clone()).unwrap();
        let before = l.borrow().leaves();
        let sizes: Vec<u64> = before.iter().map(|x| x.size).collect();
        assert_eq!(sizes, [[G; 2].as_slice(), &[M2; 32]].concat());
        let frames = l.borrow().host.mem.outstanding();
        let inv = invepts(&l);

        // Log the 2 MiB-mapped region: its 32 leaves split, the 1 GiB ones stay.
        mem.set_dirty_log_mask(regs[1], LOG_MIGRATION).unwrap();
        let after = l.borrow().leaves();
        let (inside, outside): (Vec<Leaf>, Vec<Leaf>) = after
            .iter()
            .partition(|x| in_range(x, 4 * G, 4 * G + (64 << 20)));
        assert_eq!(inside.len(), 16384);
        assert!(inside
            .iter()
            .enumerate()
            .all(|(i, x)| x.size == 4096 && x.hpa == block_hpa(1) + i as u64 * 4096 && x.writable));
        let outside_before: Vec<Leaf> = before.iter().filter(|x| x.gpa < 4 * G).copied().collect();
        assert_eq!(
            outside, outside_before,
            "other ranges keep their large pages"
        );
        assert_eq!(l.borrow().counters.log_splits, 32);
        assert_eq!(invepts(&l), inv + 1, "one INVEPT for the commit");

        // Log the 1 GiB-mapped region: 2 GiB leaves and then 1024 2 MiB ones split.
        mem.set_dirty_log_mask(regs[0], LOG_MIGRATION).unwrap();
        let all = l.borrow().leaves();
        assert_eq!(all.len() as u64, (2 * G + (64 << 20)) / 4096);
        assert!(all.iter().all(|x| x.size == 4096));
        assert_eq!(l.borrow().counters.log_splits, 32 + 2 + 1024);

        // Stop logging the small region: its 2 MiB pages come back.
        mem.set_dirty_log_mask(regs[1], 0).unwrap();
        let leaves = l.borrow().leaves();
        let small: Vec<Leaf> = leaves.iter().filter(|x| x.gpa >= 4 * G).copied().collect();
        let small_before: Vec<Leaf> = before.iter().filter(|x| x.gpa >= 4 * G).copied().collect();
        assert_eq!(small, small_before);
        assert!(leaves
            .iter()
            .filter(|x| x.gpa < 4 * G)
            .all(|x| x.size == 4096));

        mem.set_dirty_log_mask(regs[0], 0).unwrap();
        assert_eq!(l.borrow().leaves(), before);
        assert_eq!(
            l.borrow().host.mem.outstanding(),
            frames,
            "split tables given back"
        );
        let c = l.borrow().counters;
        assert_eq!((c.log_starts, c.log_stops), (2, 2));
        assert_eq!(l.borrow_mut().take_error(), None);
    }

    #[test]
    fn sync_reports_written_pages_by_block_once_with_one_invept() {
        let mut pc = pc();
        let l = listener(EptMode::Incremental);
        pc.mem.add_listener(pc.space, 0, l.clone()).unwrap();
        // Written before logging: the caller's full bitmap covers it, the
        // log does not report it.
        guest_write(&l, 0x7000);
        pc.mem.set_dirty_log_mask(pc.ram, LOG_MIGRATION).unwrap();
        let inv = invepts(&l);
        assert_eq!(sync(&l), (0, vec![]));
        assert_eq!(invepts(&l), inv, "nothing re-armed, no INVEPT");

        guest_write(&l, 0x5000);
        guest_write(&l, 0x5008);
        guest_write(&l, (768 << 20) - 0x1000);
        // ram-above-4g is the block from 768 MiB on.
        guest_write(&l, (1 << 32) + 0x3123);
        assert_eq!(
            sync(&l),
            (3, vec![(0, 5), (0, 0x2FFFF), (0, (768 << 8) + 3)])
        );
        assert_eq!(invepts(&l), inv + 1, "one INVEPT for the whole sync");
        assert_eq!(l.borrow().counters.dirty_harvested, 3);
        assert!(
            l.borrow().leaves().iter().all(|x| !x.dirty),
            "flags cleared"
        );

        assert_eq!(sync(&l), (0, vec![]), "a second sync finds nothing");
        assert_eq!(invepts(&l), inv + 1);

        // The INVEPT dropped the cached translation: the next write sets the
        // flag again and is reported.
        guest_write(&l, 0x5000);
        assert_eq!(sync(&l), (1, vec![(0, 5)]));
        assert_eq!(invepts(&l), inv + 2);
        let c = l.borrow().counters;
        assert_eq!((c.dirty_syncs, c.dirty_pages), (4, 4));
    }

    #[test]
    fn aliases_report_block_offsets_and_a_page_seen_twice_counts_once() {
        let l = listener_for(&[RAM, 16 << 20], true, EptMode::Incremental, 24 << 20);
        let mut pc = pc();
        let ram1 = pc
            .mem
            .create_ram(
                "ram1",
                16 << 20,
                RamBacking {
                    block: 1,
                    offset: 0,
                },
            )
            .unwrap();
        let win = pc.mem.create_alias("win", 4 << 20, ram1, 1 << 20).unwrap();
        let win2 = pc.mem.create_alias("win2", 8 << 20, ram1, 0).unwrap();
        pc.mem.add_subregion(pc.root, 0x2_0000_0000, win).unwrap();
        pc.mem.add_subregion(pc.root, 0x3_0000_0000, win2).unwrap();
        pc.mem.add_listener(pc.space, 0, l.clone()).unwrap();
        pc.mem.set_dirty_log_mask(pc.ram, LOG_MIGRATION).unwrap();
        pc.mem.set_dirty_log_mask(ram1, LOG_MIGRATION).unwrap();
        assert_eq!(l.borrow().counters.log_starts, 4);

        guest_write(&l, 0x2_0000_5000); // block 1 offset 1 MiB + 0x5000
        guest_write(&l, 0x3_0010_5000); // the same block page via win2
        guest_write(&l, 0x1_0000_0000); // block 0 at 768 MiB
        guest_write(&l, 0x3_0000_1000); // block 1 page 1
        let inv = invepts(&l);
        assert_eq!(sync(&l), (3, vec![(0, 768 << 8), (1, 1), (1, 0x105)]));
        assert_eq!(l.borrow().counters.dirty_harvested, 4, "four leaves");
        assert_eq!(invepts(&l), inv + 1);
    }

    #[test]
    fn stopping_keeps_dirty_pages_for_the_next_sync() {
        let mut pc = pc();
        let l = listener(EptMode::Incremental);
        pc.mem.add_listener(pc.space, 0, l.clone()).unwrap();
        let before = l.borrow().leaves();
        let frames = l.borrow().host.mem.outstanding();
        pc.mem.set_dirty_log_mask(pc.ram, LOG_MIGRATION).unwrap();
        guest_write(&l, 0x20_0000);
        guest_write(&l, (1 << 32) + 0x1000);
        pc.mem.set_dirty_log_mask(pc.ram, 0).unwrap();
        assert_eq!(l.borrow().leaves().len(), before.len());
        assert!(l.borrow().leaves().iter().zip(&before).all(|(a, b)| (
            a.gpa, a.hpa, a.size, a.writable
        ) == (
            b.gpa, b.hpa, b.size, b.writable
        )));
        assert_eq!(l.borrow().host.mem.outstanding(), frames);
        assert_eq!(l.borrow().pending_dirty(), 2);
        assert_eq!(l.borrow().logged_ranges().count(), 0);
        // Not logged any more: not reported.
        guest_write(&l, 0x40_0000);
        assert_eq!(sync(&l), (2, vec![(0, 0x200), (0, (768 << 8) + 1)]));
        assert_eq!(sync(&l), (0, vec![]));
    }

    #[test]
    fn ram_mapped_while_logging_is_4k_and_unmapping_loses_no_write() {
        let mut pc = pc();
        let l = listener(EptMode::Incremental);
        let hole = pc.mem.create_mmio("hole", 0x3000, MmioHandle(9)).unwrap();
        pc.mem
            .add_subregion_overlap(pc.root, 0x100_0000, hole, 2)
            .unwrap();
        pc.mem.add_listener(pc.space, 0, l.clone()).unwrap();
        pc.mem.set_dirty_log_mask(pc.ram, LOG_MIGRATION).unwrap();
        assert_eq!(
            l.borrow().counters.log_starts,
            3,
            "below and above the hole, above 4 GiB"
        );

        // Written in [hole end, 768 MiB), which the next commit unmaps and
        // maps again (merged with the hole's pages).
        guest_write(&l, 0x200_0000);
        pc.mem.del_subregion(pc.root, hole).unwrap();
        assert_eq!(l.borrow().pending_dirty(), 1, "harvested before the unmap");
        assert_eq!(l.borrow().translate(0x100_1000).map(|t| t.2), Some(4096));
        assert!(l.borrow().leaves().iter().all(|x| x.size == 4096));
        assert_eq!(
            l.borrow().logged_ranges().collect::<Vec<_>>(),
            [(0, 768 << 20), (1 << 32, (1 << 32) + (256 << 20))]
        );
        guest_write(&l, 0x100_1000);
        assert_eq!(sync(&l), (2, vec![(0, 0x1001), (0, 0x2000)]));

        // A window of the logged RAM appears: 4 KiB pages, block offsets.
        let win = pc.mem.create_alias("win", 2 << 20, pc.ram, 0).unwrap();
        pc.mem.add_subregion(pc.root, 0x8000_0000, win).unwrap();
        assert!(l
            .borrow()
            .leaves()
            .iter()
            .filter(|x| in_range(x, 0x8000_0000, 0x8020_0000))
            .all(|x| x.size == 4096));
        // A RAM region logged before it is mapped.
        let extra = pc
            .mem
            .create_ram(
                "extra",
                0x10000,
                RamBacking {
                    block: 0,
                    offset: 0x10_0000,
                },
            )
            .unwrap();
        pc.mem.set_dirty_log_mask(extra, LOG_MIGRATION).unwrap();
        pc.mem.add_subregion(pc.root, 0x9000_0000, extra).unwrap();
        assert_eq!(l.borrow().translate(0x9000_2000).map(|t| t.2), Some(4096));
        guest_write(&l, 0x8000_7000);
        guest_write(&l, 0x9000_2000);
        assert_eq!(sync(&l), (2, vec![(0, 7), (0, 0x102)]));
        assert_eq!(l.borrow_mut().take_error(), None);
    }

    #[test]
    fn write_protection_logs_without_accessed_dirty_flags() {
        let mut pc = pc();
        let l = listener_for(&[RAM], false, EptMode::Incremental, 24 << 20);
        assert_eq!(l.borrow().dirty_log_mode(), DirtyLogMode::WriteProtect);
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
        pc.mem.add_listener(pc.space, 0, l.clone()).unwrap();
        // Unlogged RAM is written without faults.
        assert!(cpu_write(&mut l.borrow_mut(), 0x5000));
        assert!(
            !l.borrow_mut().log_write_fault(0x5000),
            "nothing to resolve"
        );

        pc.mem.set_dirty_log_mask(pc.ram, LOG_MIGRATION).unwrap();
        let leaves = l.borrow().leaves();
        let ram: Vec<&Leaf> = leaves
            .iter()
            .filter(|x| x.gpa < 0xFFFE_0000 || x.gpa >= 1 << 32)
            .collect();
        assert!(ram.iter().all(|x| x.size == 4096 && !x.writable));
        assert!(
            !cpu_write(&mut l.borrow_mut(), 0x5000),
            "logged RAM is write-protected"
        );

        guest_write(&l, 0x5000);
        guest_write(&l, 0x5010);
        assert_eq!(
            l.borrow().counters.log_write_faults,
            1,
            "one fault per page"
        );
        // ROM and MMIO faults are not the log's.
        assert!(!l.borrow_mut().log_write_fault(0xFFFE_0000));
        assert!(!l.borrow_mut().log_write_fault(0xFEB0_0000));

        let inv = invepts(&l);
        assert_eq!(sync(&l), (1, vec![(0, 5)]));
        assert_eq!(invepts(&l), inv + 1);
        assert_eq!(
            l.borrow().translate(0x5000).map(|t| t.1),
            Some(false),
            "protected again"
        );
        guest_write(&l, 0x5000);
        assert_eq!(
            l.borrow().counters.log_write_faults,
            2,
            "faults again after the sync"
        );
        assert_eq!(sync(&l), (1, vec![(0, 5)]));
        assert_eq!(sync(&l), (0, vec![]));
        assert_eq!(invepts(&l), inv + 2);

        pc.mem.set_dirty_log_mask(pc.ram, 0).unwrap();
        assert!(l
            .borrow()
            .leaves()
            .iter()
            .filter(|x| x.gpa < 0xFFFE_0000)
            .all(|x| x.size == 2 << 20 && x.writable));
    }

    #[test]
    fn a_bitmap_of_other_blocks_is_refused_and_nothing_is_lost() {
        let mut pc = pc();
        let l = listener(EptMode::Incremental);
        pc.mem.add_listener(pc.space, 0, l.clone()).unwrap();
        pc.mem.set_dirty_log_mask(pc.ram, LOG_MIGRATION).unwrap();
        guest_write(&l, 0x3000);
        let inv = invepts(&l);
        let mut wrong = DirtyBitmap::new(&[RAM / 2]).unwrap();
        assert_eq!(
            l.borrow_mut().sync_dirty(&mut wrong),
            Err(EptListenerError::DirtyLog(DirtyError::ShapeMismatch))
        );
        assert_eq!((wrong.count(), invepts(&l)), (0, inv));
        assert_eq!(sync(&l), (1, vec![(0, 3)]));
    }

    #[test]
    fn registration_replay_and_removal_with_logging_on() {
        let mut pc = pc();
        pc.mem.set_dirty_log_mask(pc.ram, LOG_MIGRATION).unwrap();
        let l = listener(EptMode::Incremental);
        let id = pc.mem.add_listener(pc.space, 0, l.clone()).unwrap();
        // region_add starts logging; the replayed log_start changes nothing.
        assert_eq!(l.borrow().counters.log_starts, 2);
        assert_eq!(
            l.borrow().counters.log_splits,
            0,
            "mapped 4 KiB from the start"
        );
        assert!(l.borrow().leaves().iter().all(|x| x.size == 4096));
        guest_write(&l, 0x1000);
        pc.mem.remove_listener(id).unwrap();
        assert_eq!(l.borrow().host.mem.outstanding(), 1);
        assert_eq!(l.borrow().pending_dirty(), 1);
        assert_eq!(sync(&l), (1, vec![(0, 1)]));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Random guest writes, syncs, MMIO holes moving over logged RAM and
        /// logging switched off and on: every sync reports exactly the block
        /// pages written through logged ranges since the previous sync, with
        /// and without A/D flags, incremental or rebuilt.
        #[test]
        fn syncs_report_exactly_the_pages_written(
            ad in proptest::bool::ANY,
            rebuild in proptest::bool::ANY,
            ops in proptest::collection::vec((0u8..12, 0u64..4096), 1..80),
        ) {
            const LOW: u64 = 6 << 20;
            const SIZE: u64 = 8 << 20;
            let mode = if rebuild { EptMode::Rebuild } else { EptMode::Incremental };
            let l = listener_for(&[SIZE], ad, mode, 8 << 20);
            let mut pc = pc_sized(SIZE, LOW);
            let hole = pc.mem.create_mmio("hole", 0x3000, MmioHandle(9)).unwrap();
            pc.mem.add_subregion_overlap(pc.root, 0x10_0000, hole, 2).unwrap();
            pc.mem.add_listener(pc.space, 0, l.clone()).unwrap();
            pc.mem.set_dirty_log_mask(pc.ram, LOG_MIGRATION).unwrap();
            let mut logging = true;
            let mut model = std::collections::BTreeSet::new();
            for (op, x) in ops {
                match op {
                    0..=6 => {
                        // A page below 4 GiB or above it.
                        let page = x % (SIZE / 4096);
                        let gpa = if page * 4096 < LOW { page * 4096 } else { (1 << 32) + page * 4096 - LOW };
                        if l.borrow().translate(gpa).is_none() {
                            continue; // under the hole
                        }
                        guest_write(&l, gpa + (x % 4096));
                        if logging {
                            model.insert((0u32, page));
                        }
                    }
                    7 | 8 => {
                        let (inv, harvested) = (invepts(&l), l.borrow().counters.dirty_harvested);
                        let (n, got) = sync(&l);
                        let want: Vec<(u32, u64)> = core::mem::take(&mut model).into_iter().collect();
                        proptest::prop_assert_eq!(&got, &want);
                        proptest::prop_assert_eq!(n, want.len() as u64);
                        let rearmed = l.borrow().counters.dirty_harvested > harvested;
                        proptest::prop_assert_eq!(invepts(&l), inv + u64::from(rearmed));
                    }
                    9 | 10 => {
                        pc.mem.set_address(hole, (x % (LOW / 4096 - 3)) * 4096).unwrap();
                    }
                    _ => {
                        logging = !logging;
                        let mask = if logging { LOG_MIGRATION } else { 0 };
                        pc.mem.set_dirty_log_mask(pc.ram, mask).unwrap();
                    }
                }
                proptest::prop_assert_eq!(l.borrow_mut().take_error(), None);
            }
            let (_, got) = sync(&l);
            proptest::prop_assert_eq!(got, model.into_iter().collect::<Vec<_>>());
        }
    }
}
