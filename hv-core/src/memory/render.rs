//! Flat views: rendering a region tree into disjoint ranges.
//!
//! Semantics are QEMU's `render_memory_region`: regions are visited
//! depth-first, subregions in list order (priority descending, later-added
//! first among equal priority); the first range rendered at an address wins;
//! a terminating region fills the gaps left in its clip by what was rendered
//! before it (so it is rendered after its own subregions). QEMU inserts into a
//! sorted array with a linear scan per region (quadratic); we keep the pieces
//! in a `BTreeMap` keyed by start, which yields the same set of pieces.

use super::system::Region;
use super::{MemoryError, MmioHandle, RamBacking, RegionId, RegionKind, MAX_SIZE};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// What a flat range maps to (copied from the region at render time, so a
/// listener can unmap a range whose region has been destroyed since).
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub enum RangeTarget {
    /// RAM or ROM (ROM has `readonly` set on the range).
    Ram(RamBacking),
    /// RAM device memory.
    RamDevice(RamBacking),
    /// ROM device (see `romd_mode` on the range).
    RomDevice {
        backing: RamBacking,
        ops: MmioHandle,
    },
    /// MMIO.
    Mmio(MmioHandle),
    /// Reservation / unassigned.
    Reservation,
}

impl RangeTarget {
    pub(crate) fn of(kind: &RegionKind) -> RangeTarget {
        match *kind {
            RegionKind::Ram(b) | RegionKind::Rom(b) => RangeTarget::Ram(b),
            RegionKind::RamDevice(b) => RangeTarget::RamDevice(b),
            RegionKind::RomDevice { backing, ops } => RangeTarget::RomDevice { backing, ops },
            RegionKind::Mmio(h) => RangeTarget::Mmio(h),
            // Containers and aliases never terminate; reservations are unassigned.
            _ => RangeTarget::Reservation,
        }
    }
}

/// One range of a flat view (QEMU `FlatRange` / `MemoryRegionSection`).
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub struct FlatRange {
    /// Start address in the address space.
    pub start: u64,
    /// Size in bytes (up to 2^64).
    pub size: u128,
    /// Terminal region providing the range.
    pub region: RegionId,
    /// Offset of `start` within `region`.
    pub offset_in_region: u64,
    /// Read-only (region or any alias/container above it on the render path).
    pub readonly: bool,
    /// ROM-device mode of the region.
    pub romd_mode: bool,
    pub nonvolatile: bool,
    pub unmergeable: bool,
    pub dirty_log_mask: u8,
    /// Backing / dispatch of the region.
    pub target: RangeTarget,
}

impl FlatRange {
    /// Exclusive end (up to 2^64).
    pub fn end(&self) -> u128 {
        self.start as u128 + self.size
    }

    /// Whether `addr` is inside the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && (addr as u128) < self.end()
    }

    /// QEMU `flatrange_equal`: same range and attributes, ignoring the dirty
    /// log mask (a mask change is reported as nop + log_start/log_stop).
    pub fn same_mapping(&self, other: &FlatRange) -> bool {
        self.region == other.region
            && self.start == other.start
            && self.size == other.size
            && self.offset_in_region == other.offset_in_region
            && self.romd_mode == other.romd_mode
            && self.readonly == other.readonly
            && self.nonvolatile == other.nonvolatile
            && self.unmergeable == other.unmergeable
    }

    /// QEMU `can_merge`.
    fn can_merge(&self, next: &FlatRange) -> bool {
        self.end() == next.start as u128
            && self.region == next.region
            && self.offset_in_region as u128 + self.size == next.offset_in_region as u128
            && self.dirty_log_mask == next.dirty_log_mask
            && self.romd_mode == next.romd_mode
            && self.readonly == next.readonly
            && self.nonvolatile == next.nonvolatile
            && !self.unmergeable
            && !next.unmergeable
    }
}

/// A rendered, simplified view of a region tree.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct FlatView {
    pub(crate) root: Option<RegionId>,
    /// `addr` of the root at render time (the root's address offsets the
    /// whole view, as in QEMU).
    pub(crate) root_addr: u64,
    pub(crate) ranges: Vec<FlatRange>,
}

impl FlatView {
    /// Region the view was rendered from (QEMU's "Root memory region"), `None`
    /// for the empty view of a disabled/empty root.
    pub fn root(&self) -> Option<RegionId> {
        self.root
    }

    /// Sorted, disjoint ranges.
    pub fn ranges(&self) -> &[FlatRange] {
        &self.ranges
    }

    /// The range containing `addr`, by binary search.
    pub fn lookup(&self, addr: u64) -> Option<&FlatRange> {
        let i = self.ranges.partition_point(|r| r.end() <= addr as u128);
        self.ranges.get(i).filter(|r| r.contains(addr))
    }
}

/// Read-only access to the region arena used by the renderer.
pub(crate) trait Arena {
    fn get(&self, id: RegionId) -> Result<&Region, MemoryError>;
}

/// QEMU `memory_region_get_flatview_root`: skip down through a root that is a
/// whole-target alias or a container with a single covering enabled child so
/// that equivalent address spaces share one view.
pub(crate) fn flatview_root<A: Arena>(
    arena: &A,
    root: RegionId,
) -> Result<Option<RegionId>, MemoryError> {
    let mut id = root;
    // Each step descends, and the region graph is acyclic, so this ends.
    loop {
        let r = arena.get(id)?;
        if !r.enabled {
            return Ok(None);
        }
        match r.kind {
            RegionKind::Alias { target, offset } => {
                let t = arena.get(target)?;
                if offset == 0 && r.size >= t.size {
                    id = target;
                    continue;
                }
            }
            RegionKind::Container => {
                let mut found = 0;
                let mut next = None;
                for &c in &r.subregions {
                    let child = arena.get(c)?;
                    if child.enabled {
                        found += 1;
                        if found > 1 {
                            next = None;
                            break;
                        }
                        if child.addr == 0 && r.size >= child.size {
                            next = Some(c);
                        }
                    }
                }
                if found == 0 {
                    return Ok(None);
                }
                if let Some(n) = next {
                    id = n;
                    continue;
                }
            }
            _ => {}
        }
        return Ok(Some(id));
    }
}

struct Renderer<'a, A: Arena> {
    arena: &'a A,
    /// Pieces rendered so far: start -> (exclusive end, index in `pieces`).
    /// Keeping the 80-byte ranges out of the B-tree nodes makes inserts
    /// cheaper.
    map: BTreeMap<u64, (u128, u32)>,
    pieces: Vec<FlatRange>,
    gaps: Vec<(i128, i128)>,
}

#[derive(Copy, Clone)]
struct Inherit {
    readonly: bool,
    nonvolatile: bool,
    unmergeable: bool,
}

impl<A: Arena> Renderer<'_, A> {
    fn render(
        &mut self,
        id: RegionId,
        mut base: i128,
        clip: (i128, i128),
        mut inh: Inherit,
    ) -> Result<(), MemoryError> {
        let r = self.arena.get(id)?;
        if !r.enabled {
            return Ok(());
        }
        base += r.addr as i128;
        inh.readonly |= r.readonly;
        inh.nonvolatile |= r.nonvolatile;
        inh.unmergeable |= r.unmergeable;
        let start = base.max(clip.0);
        let end = (base + r.size as i128).min(clip.1);
        if end <= start {
            // Empty intersection: nothing of this region can be visible.
            return Ok(());
        }
        let clip = (start, end);
        if let RegionKind::Alias { target, offset } = r.kind {
            let t = self.arena.get(target)?;
            base -= t.addr as i128;
            base -= offset as i128;
            return self.render(target, base, clip, inh);
        }
        for &sub in r.subregions.iter().rev() {
            self.render(sub, base, clip, inh)?;
        }
        if !r.kind.terminates() {
            return Ok(());
        }
        self.fill_gaps(clip);
        let template = FlatRange {
            start: 0,
            size: 0,
            region: id,
            offset_in_region: 0,
            readonly: inh.readonly,
            romd_mode: r.romd_mode,
            nonvolatile: inh.nonvolatile,
            unmergeable: inh.unmergeable,
            dirty_log_mask: r.dirty_log_mask,
            target: RangeTarget::of(&r.kind),
        };
        for &(s, e) in &self.gaps {
            let fr = FlatRange {
                start: s as u64,
                size: (e - s) as u128,
                // clip lies within [base, base + size) and size <= 2^64.
                offset_in_region: (s - base) as u64,
                ..template
            };
            self.map
                .insert(s as u64, (fr.end(), self.pieces.len() as u32));
            self.pieces.push(fr);
        }
        Ok(())
    }

    /// Computes the uncovered parts of `clip` into `self.gaps`.
    fn fill_gaps(&mut self, clip: (i128, i128)) {
        self.gaps.clear();
        let (cs, ce) = clip;
        let mut cursor = cs;
        // The clip is inside [0, 2^64), so cs fits in u64.
        let cs64 = cs as u64;
        if let Some((_, &(end, _))) = self.map.range(..=cs64).next_back() {
            cursor = cursor.max(end as i128);
        }
        if cursor < ce {
            for (&start, &(end, _)) in self.map.range(cs64..) {
                let rs = start as i128;
                if rs >= ce {
                    break;
                }
                if rs > cursor {
                    self.gaps.push((cursor, rs));
                }
                cursor = cursor.max(end as i128);
                if cursor >= ce {
                    break;
                }
            }
        }
        if cursor < ce {
            self.gaps.push((cursor, ce));
        }
    }
}

/// QEMU `flatview_simplify`.
pub(crate) fn simplify(ranges: &mut Vec<FlatRange>) {
    if ranges.len() <= 1 {
        return;
    }
    let mut i = 0;
    for j in 1..ranges.len() {
        if ranges[i].can_merge(&ranges[j]) {
            let add = ranges[j].size;
            ranges[i].size += add;
        } else {
            i += 1;
            ranges[i] = ranges[j];
        }
    }
    ranges.truncate(i + 1);
}

const INHERIT_NONE: Inherit = Inherit {
    readonly: false,
    nonvolatile: false,
    unmergeable: false,
};

/// QEMU `generate_memory_topology` for `physmr` (already the flat-view root).
pub(crate) fn generate<A: Arena>(
    arena: &A,
    physmr: Option<RegionId>,
) -> Result<FlatView, MemoryError> {
    let mut ranges = Vec::new();
    let mut root_addr = 0;
    if let Some(root) = physmr {
        root_addr = arena.get(root)?.addr;
        let mut r = Renderer {
            arena,
            map: BTreeMap::new(),
            pieces: Vec::new(),
            gaps: Vec::new(),
        };
        r.render(root, 0, (0, MAX_SIZE as i128), INHERIT_NONE)?;
        ranges = r.map.values().map(|&(_, i)| r.pieces[i as usize]).collect();
        simplify(&mut ranges);
    }
    Ok(FlatView {
        root: physmr,
        root_addr,
        ranges,
    })
}

/// Incremental re-render: `old` is a simplified view of `physmr` and only
/// addresses inside `windows` (absolute, sorted, disjoint, non-empty) can
/// have changed since. Rendering is pointwise (what owns an address does not
/// depend on other addresses) and simplification merges maximal runs, so
/// re-rendering just the windows, splicing them into the old view (split at
/// the window edges) and simplifying again gives exactly the full render —
/// except next to `unmergeable` ranges, whose piece boundaries are not
/// pointwise; then this returns `None` and the caller renders everything.
pub(crate) fn regenerate<A: Arena>(
    arena: &A,
    physmr: RegionId,
    old: &FlatView,
    windows: &[(i128, i128)],
) -> Result<Option<FlatView>, MemoryError> {
    let root_addr = arena.get(physmr)?.addr;
    if old.root != Some(physmr) || old.root_addr != root_addr {
        return Ok(None);
    }
    let mut r = Renderer {
        arena,
        map: BTreeMap::new(),
        pieces: Vec::new(),
        gaps: Vec::new(),
    };
    for &w in windows {
        r.render(physmr, 0, w, INHERIT_NONE)?;
    }
    let at_edge = |s: i128, e: i128| {
        windows
            .iter()
            .any(|&(ws, we)| (s <= ws && ws <= e) || (s <= we && we <= e))
    };
    let new: Vec<FlatRange> = r.map.values().map(|&(_, i)| r.pieces[i as usize]).collect();
    if new
        .iter()
        .chain(old.ranges.iter())
        .any(|fr| fr.unmergeable && at_edge(fr.start as i128, fr.end() as i128))
    {
        return Ok(None);
    }
    let mut ranges = Vec::with_capacity(old.ranges.len() + new.len());
    for fr in &old.ranges {
        let (rs, re) = (fr.start as i128, fr.end() as i128);
        // Keep the parts of the old range outside every window. Windows
        // are sorted: start at the first one that ends after rs.
        let mut wi = windows.partition_point(|&(_, we)| we <= rs);
        let mut cursor = rs;
        while cursor < re {
            let (ws, we) = windows.get(wi).copied().unwrap_or((re, re));
            let keep_end = ws.min(re);
            if keep_end > cursor {
                ranges.push(FlatRange {
                    start: cursor as u64,
                    size: (keep_end - cursor) as u128,
                    offset_in_region: fr.offset_in_region + (cursor - rs) as u64,
                    ..*fr
                });
            }
            cursor = cursor.max(we);
            wi += 1;
        }
    }
    ranges.extend_from_slice(&new);
    // Two sorted runs: the stable sort merges them in linear time.
    ranges.sort_by_key(|fr| fr.start);
    simplify(&mut ranges);
    Ok(Some(FlatView {
        root: Some(physmr),
        root_addr,
        ranges,
    }))
}
