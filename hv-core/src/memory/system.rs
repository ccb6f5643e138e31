//! The region arena: regions, tree structure, attributes, write notifiers and
//! dirty marking. Address spaces, listeners and transactions are in
//! `space.rs`, `listener.rs` and `txn.rs`.

use super::listener::ListenerEntry;
use super::render::{Arena, FlatRange, FlatView};
use super::txn::Undo;
use super::{MemoryError, RegionId, RegionKind, MAX_SIZE};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;

/// Dirty bit: the flat view of address spaces above the region may change.
pub(crate) const DIRTY_VIEW: u8 = 1;
/// Dirty bit: write notifiers of address spaces above the region may change.
pub(crate) const DIRTY_NOTIFY: u8 = 2;

/// A write notifier (QEMU ioeventfd) registered on an MMIO region: a write of
/// `size` bytes (0 = any size) at `addr` (offset in the region), optionally
/// only with value `data`, signals `token` instead of dispatching.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct WriteNotifier {
    pub addr: u64,
    pub size: u64,
    pub data: Option<u64>,
    pub token: u64,
}

impl WriteNotifier {
    /// QEMU `memory_region_ioeventfd_equal` between a registered notifier and
    /// an access (`token` is not compared for accesses).
    pub(crate) fn matches_access(&self, addr: u64, size: u64, data: u64) -> bool {
        self.addr == addr
            && (self.size == 0
                || size == 0
                || (self.size == size && self.data.is_none_or(|d| d == data)))
    }
}

/// A write notifier as seen in an address space (addresses absolute).
/// Ordered as QEMU `memory_region_ioeventfd_before`.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct AsNotifier {
    pub start: u64,
    pub size: u64,
    pub data: Option<u64>,
    pub token: u64,
    pub region: RegionId,
}

#[derive(Clone, Debug)]
pub(crate) struct Region {
    pub(crate) name: String,
    pub(crate) size: u128,
    pub(crate) kind: RegionKind,
    pub(crate) parent: Option<RegionId>,
    pub(crate) addr: u64,
    pub(crate) priority: i32,
    pub(crate) enabled: bool,
    pub(crate) readonly: bool,
    pub(crate) romd_mode: bool,
    pub(crate) nonvolatile: bool,
    pub(crate) unmergeable: bool,
    pub(crate) dirty_log_mask: u8,
    /// QEMU's `subregions` list (priority descending, later-added first among
    /// equal priority) stored *reversed*, so that the common case (adding a
    /// region of the highest priority so far, e.g. all priority 0) is a push.
    /// Iterate with `.iter().rev()` for render order.
    pub(crate) subregions: Vec<RegionId>,
    /// Aliases whose target is this region.
    pub(crate) aliased_by: Vec<RegionId>,
    pub(crate) notifiers: Vec<WriteNotifier>,
    pub(crate) dirty: u8,
}

pub(crate) struct Slot {
    pub(crate) generation: u32,
    pub(crate) max_generation: u32,
    pub(crate) region: Option<Region>,
}

/// Public snapshot of a region's attributes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct RegionInfo {
    pub name: String,
    pub size: u128,
    pub kind: RegionKind,
    pub parent: Option<RegionId>,
    pub addr: u64,
    pub priority: i32,
    pub enabled: bool,
    pub readonly: bool,
    pub romd_mode: bool,
    pub nonvolatile: bool,
    pub unmergeable: bool,
    pub dirty_log_mask: u8,
    pub subregions: Vec<RegionId>,
    pub notifiers: Vec<WriteNotifier>,
}

/// Handle of an address space.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct AddressSpaceId {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

pub(crate) struct Space {
    pub(crate) name: String,
    pub(crate) root: RegionId,
    /// Committed state: what listeners have been told.
    pub(crate) view: Rc<FlatView>,
    pub(crate) notifiers: Rc<Vec<AsNotifier>>,
    pub(crate) listeners: Vec<ListenerEntry>,
}

pub(crate) struct SpaceSlot {
    pub(crate) generation: u32,
    pub(crate) space: Option<Space>,
}

/// How reads (flat view, lookup) behave inside a transaction with pending
/// mutations.
#[derive(Copy, Clone, PartialEq, Eq, Debug, Default)]
pub enum ReadPolicy {
    /// Render the current tree on demand (cached until the next mutation);
    /// listeners still run once at the outermost commit.
    #[default]
    RenderOnDemand,
    /// QEMU-like: commit pending changes to listeners before the read
    /// (counted in [`Stats::forced_commits`]).
    ForceCommit,
}

/// Counters.
#[derive(Copy, Clone, PartialEq, Eq, Debug, Default)]
pub struct Stats {
    /// Successful mutating calls.
    pub mutations: u64,
    /// Flat-view renders (including on-demand renders).
    pub renders: u64,
    /// Renders done for reads inside a transaction.
    pub on_demand_renders: u64,
    /// Topology updates (flushes of pending changes).
    pub commits: u64,
    /// begin/commit brackets delivered to listeners.
    pub listener_commits: u64,
    /// Flushes forced by a read inside a transaction (ForceCommit policy).
    pub forced_commits: u64,
    /// Abandoned transactions (any nesting level).
    pub abandons: u64,
    /// `translate` calls answered by a tree walk inside a transaction.
    pub walk_lookups: u64,
    /// Renders (counted in `renders` too) that only re-rendered the windows
    /// touched since the previous view and spliced them in.
    pub partial_renders: u64,
}

/// Result of [`MemorySystem::translate`].
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub struct Translation {
    pub region: RegionId,
    pub offset: u64,
    pub readonly: bool,
}

/// Result of an address lookup.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub struct Lookup {
    pub region: RegionId,
    pub offset: u64,
    pub readonly: bool,
    pub range: FlatRange,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Attr {
    Enabled(bool),
    Readonly(bool),
    Romd(bool),
    Nonvolatile(bool),
    Unmergeable(bool),
    DirtyLog(u8),
    Size(u128),
    AliasOffset(u64),
    Addr(u64),
}

/// A memory system: one per VM (no global state).
pub struct MemorySystem {
    pub(crate) slots: Vec<Slot>,
    pub(crate) free: Vec<u32>,
    pub(crate) spaces: Vec<SpaceSlot>,
    /// Free slots of `spaces` (the lowest is reused first).
    pub(crate) free_spaces: BTreeSet<u32>,
    /// Every live space as (flat-view root of its committed view, slot
    /// index): a new space finds a view to share in O(log n) instead of
    /// scanning every space. Kept in step with `Space::view`.
    pub(crate) view_roots: BTreeSet<(Option<RegionId>, u32)>,
    /// Every live space as (root, slot index): a flush finds the spaces of
    /// the marked regions without scanning every space.
    pub(crate) space_roots: BTreeSet<(RegionId, u32)>,
    pub(crate) next_listener: u64,
    pub(crate) depth: u32,
    /// Undo-log length at each open `begin`.
    pub(crate) markers: Vec<usize>,
    pub(crate) undo: Vec<Undo>,
    /// Regions carrying dirty bits (cleared at flush).
    pub(crate) marked: Vec<RegionId>,
    /// On-demand renders valid until the next mutation (by space index).
    pub(crate) cache: BTreeMap<u32, (Rc<FlatView>, Rc<Vec<AsNotifier>>)>,
    pub(crate) policy: ReadPolicy,
    /// Windows that may have changed since the last flush, per region, in
    /// that region's coordinates (see `record_footprint`).
    /// Each entry is `(start, end, seq)`: `seq` is the mutation counter when
    /// it was recorded, so an on-demand render can start from the previous
    /// on-demand render and take only newer windows.
    pub(crate) windows: BTreeMap<RegionId, Vec<(i128, i128, u64)>>,
    /// Last on-demand render per space in the current transaction, with the
    /// window sequence number it includes.
    pub(crate) last_on_demand: BTreeMap<u32, (u64, Rc<FlatView>)>,
    /// Windows are incomplete: the next flush renders everything.
    pub(crate) full_render: bool,
    /// Number of write notifiers on live regions (0: skip notifier scans).
    pub(crate) notifier_count: usize,
    /// A forced flush happened inside the current outermost transaction.
    pub(crate) forced_in_txn: bool,
    pub(crate) stats: Stats,
}

impl Arena for MemorySystem {
    fn get(&self, id: RegionId) -> Result<&Region, MemoryError> {
        self.slots
            .get(id.index as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.region.as_ref())
            .ok_or(MemoryError::StaleRegion(id))
    }
}

impl Default for MemorySystem {
    fn default() -> Self {
        Self::new()
    }
}

impl MemorySystem {
    pub fn new() -> Self {
        MemorySystem {
            slots: Vec::new(),
            free: Vec::new(),
            spaces: Vec::new(),
            free_spaces: BTreeSet::new(),
            view_roots: BTreeSet::new(),
            space_roots: BTreeSet::new(),
            next_listener: 1,
            depth: 0,
            markers: Vec::new(),
            undo: Vec::new(),
            marked: Vec::new(),
            cache: BTreeMap::new(),
            policy: ReadPolicy::default(),
            windows: BTreeMap::new(),
            last_on_demand: BTreeMap::new(),
            full_render: false,
            notifier_count: 0,
            forced_in_txn: false,
            stats: Stats::default(),
        }
    }

    // ------------------------------------------------------------------
    // Arena access
    // ------------------------------------------------------------------

    pub(crate) fn reg_mut(&mut self, id: RegionId) -> Result<&mut Region, MemoryError> {
        self.slots
            .get_mut(id.index as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.region.as_mut())
            .ok_or(MemoryError::StaleRegion(id))
    }

    /// Whether `id` names a live region.
    pub fn contains(&self, id: RegionId) -> bool {
        self.get(id).is_ok()
    }

    /// Attributes of a region.
    pub fn region(&self, id: RegionId) -> Result<RegionInfo, MemoryError> {
        let r = self.get(id)?;
        Ok(RegionInfo {
            name: r.name.clone(),
            size: r.size,
            kind: r.kind,
            parent: r.parent,
            addr: r.addr,
            priority: r.priority,
            enabled: r.enabled,
            readonly: r.readonly,
            romd_mode: r.romd_mode,
            nonvolatile: r.nonvolatile,
            unmergeable: r.unmergeable,
            dirty_log_mask: r.dirty_log_mask,
            subregions: r.subregions.iter().rev().copied().collect(),
            notifiers: r.notifiers.clone(),
        })
    }

    /// Name of a region.
    pub fn region_name(&self, id: RegionId) -> Result<&str, MemoryError> {
        Ok(&self.get(id)?.name)
    }

    /// Subregions in priority (render) order.
    pub fn subregions(&self, id: RegionId) -> Result<Vec<RegionId>, MemoryError> {
        Ok(self.get(id)?.subregions.iter().rev().copied().collect())
    }

    /// Number of live regions.
    pub fn region_count(&self) -> usize {
        self.slots.iter().filter(|s| s.region.is_some()).count()
    }

    /// All live regions, in slot order.
    pub fn regions(&self) -> impl Iterator<Item = RegionId> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.region.as_ref().map(|_| RegionId {
                index: i as u32,
                generation: s.generation,
            })
        })
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn read_policy(&self) -> ReadPolicy {
        self.policy
    }

    pub fn set_read_policy(&mut self, policy: ReadPolicy) {
        self.policy = policy;
    }

    /// Current transaction nesting depth.
    pub fn transaction_depth(&self) -> u32 {
        self.depth
    }

    // ------------------------------------------------------------------
    // Region creation and destruction
    // ------------------------------------------------------------------

    /// Creates an unattached region of any kind. Aliases must name a live
    /// target. ROM regions start read-only.
    pub fn create_region(
        &mut self,
        name: &str,
        size: u128,
        kind: RegionKind,
    ) -> Result<RegionId, MemoryError> {
        if size > MAX_SIZE {
            return Err(MemoryError::InvalidSize(size));
        }
        if let RegionKind::Alias { target, .. } = kind {
            self.get(target)?;
        }
        let region = Region {
            name: name.into(),
            size,
            kind,
            parent: None,
            addr: 0,
            priority: 0,
            enabled: true,
            readonly: matches!(kind, RegionKind::Rom(_)),
            romd_mode: true,
            nonvolatile: false,
            unmergeable: false,
            dirty_log_mask: 0,
            subregions: Vec::new(),
            aliased_by: Vec::new(),
            notifiers: Vec::new(),
            dirty: 0,
        };
        let id = if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.region = Some(region);
            RegionId {
                index,
                generation: slot.generation,
            }
        } else {
            let index = u32::try_from(self.slots.len()).map_err(|_| MemoryError::InvalidSize(0))?;
            self.slots.push(Slot {
                generation: 0,
                max_generation: 0,
                region: Some(region),
            });
            RegionId {
                index,
                generation: 0,
            }
        };
        if let RegionKind::Alias { target, .. } = kind {
            let t = self.reg_mut(target)?;
            t.aliased_by.push(id);
            let bits = t.dirty;
            if bits != 0 {
                self.mark(id, bits);
            }
        }
        self.log(Undo::Created(id));
        self.finish_mutation();
        Ok(id)
    }

    pub fn create_container(&mut self, name: &str, size: u128) -> Result<RegionId, MemoryError> {
        self.create_region(name, size, RegionKind::Container)
    }

    pub fn create_ram(
        &mut self,
        name: &str,
        size: u128,
        backing: super::RamBacking,
    ) -> Result<RegionId, MemoryError> {
        self.create_region(name, size, RegionKind::Ram(backing))
    }

    pub fn create_rom(
        &mut self,
        name: &str,
        size: u128,
        backing: super::RamBacking,
    ) -> Result<RegionId, MemoryError> {
        self.create_region(name, size, RegionKind::Rom(backing))
    }

    pub fn create_mmio(
        &mut self,
        name: &str,
        size: u128,
        ops: super::MmioHandle,
    ) -> Result<RegionId, MemoryError> {
        self.create_region(name, size, RegionKind::Mmio(ops))
    }

    pub fn create_ram_device(
        &mut self,
        name: &str,
        size: u128,
        backing: super::RamBacking,
    ) -> Result<RegionId, MemoryError> {
        self.create_region(name, size, RegionKind::RamDevice(backing))
    }

    /// ROM device, initially in romd mode (reads from `backing`).
    pub fn create_rom_device(
        &mut self,
        name: &str,
        size: u128,
        backing: super::RamBacking,
        ops: super::MmioHandle,
    ) -> Result<RegionId, MemoryError> {
        self.create_region(name, size, RegionKind::RomDevice { backing, ops })
    }

    /// QEMU `memory_region_init_reservation`: terminates lookups, unassigned.
    pub fn create_reservation(&mut self, name: &str, size: u128) -> Result<RegionId, MemoryError> {
        self.create_region(name, size, RegionKind::Reservation)
    }

    pub fn create_alias(
        &mut self,
        name: &str,
        size: u128,
        target: RegionId,
        offset: u64,
    ) -> Result<RegionId, MemoryError> {
        self.create_region(name, size, RegionKind::Alias { target, offset })
    }

    /// Destroys a region and its whole subtree (detaching it first). Fails
    /// with `InUse` if a region of the subtree is an address-space root or
    /// the target of an alias outside the subtree.
    pub fn destroy_region(&mut self, id: RegionId) -> Result<(), MemoryError> {
        self.get(id)?;
        let mut subtree = Vec::new();
        let mut stack = alloc::vec![id];
        while let Some(r) = stack.pop() {
            subtree.push(r);
            stack.extend(self.get(r)?.subregions.iter().copied());
        }
        let set: alloc::collections::BTreeSet<RegionId> = subtree.iter().copied().collect();
        for &r in &subtree {
            if self.spaces_iter().any(|(_, s)| s.root == r) {
                return Err(MemoryError::InUse(r));
            }
            if self.get(r)?.aliased_by.iter().any(|a| !set.contains(a)) {
                return Err(MemoryError::InUse(r));
            }
        }
        if let Some(parent) = self.get(id)?.parent {
            self.detach(parent, id)?;
        }
        for &r in &subtree {
            self.free_region(r)?;
        }
        self.finish_mutation();
        Ok(())
    }

    pub(crate) fn free_region(&mut self, id: RegionId) -> Result<(), MemoryError> {
        let region = self.slots[id.index as usize]
            .region
            .take()
            .ok_or(MemoryError::StaleRegion(id))?;
        self.notifier_count = self.notifier_count.saturating_sub(region.notifiers.len());
        if let RegionKind::Alias { target, .. } = region.kind {
            if let Ok(t) = self.reg_mut(target) {
                t.aliased_by.retain(|&a| a != id);
            }
        }
        let slot = &mut self.slots[id.index as usize];
        slot.max_generation = slot.max_generation.wrapping_add(1);
        slot.generation = slot.max_generation;
        self.free.push(id.index);
        self.log(Undo::Freed {
            index: id.index,
            generation: id.generation,
            region: alloc::boxed::Box::new(region),
        });
        Ok(())
    }

    // ------------------------------------------------------------------
    // Tree structure
    // ------------------------------------------------------------------

    /// QEMU `memory_region_add_subregion` (priority 0).
    pub fn add_subregion(
        &mut self,
        parent: RegionId,
        addr: u64,
        child: RegionId,
    ) -> Result<(), MemoryError> {
        self.add_subregion_overlap(parent, addr, child, 0)
    }

    /// QEMU `memory_region_add_subregion_overlap`.
    pub fn add_subregion_overlap(
        &mut self,
        parent: RegionId,
        addr: u64,
        child: RegionId,
        priority: i32,
    ) -> Result<(), MemoryError> {
        let p = self.get(parent)?;
        if matches!(p.kind, RegionKind::Alias { .. }) {
            return Err(MemoryError::SubregionOfAlias(parent));
        }
        let c = self.get(child)?;
        if c.parent.is_some() {
            return Err(MemoryError::AlreadyMapped(child));
        }
        if self.reaches(child, parent)? {
            return Err(MemoryError::Cycle);
        }
        self.attach(parent, child, addr, priority)?;
        self.finish_mutation();
        Ok(())
    }

    /// QEMU `memory_region_del_subregion`.
    pub fn del_subregion(&mut self, parent: RegionId, child: RegionId) -> Result<(), MemoryError> {
        self.get(parent)?;
        if self.get(child)?.parent != Some(parent) {
            return Err(MemoryError::NotASubregion { parent, child });
        }
        self.detach(parent, child)?;
        self.finish_mutation();
        Ok(())
    }

    /// Whether `to` is reachable from `from` through subregion and alias edges.
    pub(crate) fn reaches(&self, from: RegionId, to: RegionId) -> Result<bool, MemoryError> {
        let mut stack = alloc::vec![from];
        let mut seen = alloc::collections::BTreeSet::new();
        while let Some(r) = stack.pop() {
            if r == to {
                return Ok(true);
            }
            if !seen.insert(r) {
                continue;
            }
            let reg = self.get(r)?;
            stack.extend(reg.subregions.iter().copied());
            if let RegionKind::Alias { target, .. } = reg.kind {
                stack.push(target);
            }
        }
        Ok(false)
    }

    pub(crate) fn attach(
        &mut self,
        parent: RegionId,
        child: RegionId,
        addr: u64,
        priority: i32,
    ) -> Result<(), MemoryError> {
        let c = self.reg_mut(child)?;
        c.parent = Some(parent);
        let old_addr = core::mem::replace(&mut c.addr, addr);
        let old_priority = core::mem::replace(&mut c.priority, priority);
        let child_enabled = c.enabled;
        let slots = &self.slots;
        let prio_of = |id: RegionId| {
            slots[id.index as usize]
                .region
                .as_ref()
                .map_or(i32::MIN, |r| r.priority)
        };
        let p = self.get(parent)?;
        // QEMU: insert before the first subregion with priority <= ours; in
        // the reversed storage that is after the last one with priority <=
        // ours (the storage is sorted by ascending priority).
        let pos = p.subregions.partition_point(|&o| prio_of(o) <= priority);
        let parent_enabled = p.enabled;
        self.reg_mut(parent)?.subregions.insert(pos, child);
        self.log(Undo::Attached {
            parent,
            child,
            old_addr,
            old_priority,
        });
        if parent_enabled && child_enabled {
            self.mark(parent, DIRTY_VIEW | DIRTY_NOTIFY);
            self.record_footprint(child);
        }
        // Keep the marking invariant (a marked region's containers and
        // aliases carry its bits) across the new edge.
        let child_bits = self.dirty_bits(child);
        if child_bits != 0 {
            self.mark(parent, child_bits);
        }
        if old_addr != addr {
            // The child's own position changed: an address space rooted at
            // the child (QEMU renders the root at its address) changes too.
            self.mark(child, DIRTY_VIEW | DIRTY_NOTIFY);
        }
        Ok(())
    }

    pub(crate) fn detach(&mut self, parent: RegionId, child: RegionId) -> Result<(), MemoryError> {
        if self.get(child)?.enabled && self.get(parent)?.enabled {
            // What the child covered can change.
            self.record_footprint(child);
        }
        let c = self.reg_mut(child)?;
        c.parent = None;
        let (addr, priority, child_enabled) = (c.addr, c.priority, c.enabled);
        let p = self.reg_mut(parent)?;
        let index = p
            .subregions
            .iter()
            .rposition(|&o| o == child)
            .ok_or(MemoryError::NotASubregion { parent, child })?;
        p.subregions.remove(index);
        let parent_enabled = p.enabled;
        self.log(Undo::Detached {
            parent,
            child,
            index,
            addr,
            priority,
        });
        if parent_enabled && child_enabled {
            self.mark(parent, DIRTY_VIEW | DIRTY_NOTIFY);
        }
        Ok(())
    }

    /// Sets address and priority of an unattached region (used by the mtree
    /// parser for section roots; QEMU keeps both on detached regions).
    pub(crate) fn set_detached_position(
        &mut self,
        id: RegionId,
        addr: u64,
        priority: i32,
    ) -> Result<(), MemoryError> {
        let r = self.reg_mut(id)?;
        if r.parent.is_some() {
            return Err(MemoryError::AlreadyMapped(id));
        }
        r.addr = addr;
        r.priority = priority;
        self.full_render = true;
        self.mark(id, DIRTY_VIEW | DIRTY_NOTIFY);
        self.finish_mutation();
        Ok(())
    }

    // ------------------------------------------------------------------
    // Attributes
    // ------------------------------------------------------------------

    pub(crate) fn set_attr(&mut self, id: RegionId, attr: Attr) -> Result<(), MemoryError> {
        let was_enabled = self.get(id)?.enabled;
        if matches!(attr, Attr::Size(_) | Attr::Addr(_)) && was_enabled {
            // Geometry changes: the old footprint can change too.
            self.record_footprint(id);
        }
        let r = self.reg_mut(id)?;
        let old = match attr {
            Attr::Enabled(v) => Attr::Enabled(core::mem::replace(&mut r.enabled, v)),
            Attr::Readonly(v) => Attr::Readonly(core::mem::replace(&mut r.readonly, v)),
            Attr::Romd(v) => Attr::Romd(core::mem::replace(&mut r.romd_mode, v)),
            Attr::Nonvolatile(v) => Attr::Nonvolatile(core::mem::replace(&mut r.nonvolatile, v)),
            Attr::Unmergeable(v) => Attr::Unmergeable(core::mem::replace(&mut r.unmergeable, v)),
            Attr::DirtyLog(v) => Attr::DirtyLog(core::mem::replace(&mut r.dirty_log_mask, v)),
            Attr::Size(v) => Attr::Size(core::mem::replace(&mut r.size, v)),
            Attr::Addr(v) => Attr::Addr(core::mem::replace(&mut r.addr, v)),
            Attr::AliasOffset(v) => match &mut r.kind {
                RegionKind::Alias { offset, .. } => {
                    Attr::AliasOffset(core::mem::replace(offset, v))
                }
                _ => return Err(MemoryError::WrongKind(id)),
            },
        };
        // QEMU: `update_pending |= mr->enabled`, except set_enabled and
        // set_size which always mark an update pending.
        let visible = matches!(attr, Attr::Enabled(_) | Attr::Size(_)) || r.enabled;
        self.log(Undo::Attr(id, old));
        if visible {
            self.mark(id, DIRTY_VIEW | DIRTY_NOTIFY);
            self.record_footprint(id);
        }
        Ok(())
    }

    /// Records the window of `id` (`[0, size)` in its own coordinates) in
    /// the coordinates of every region above it (containers, aliases of it
    /// and theirs), so that a flush can re-render only those windows of a
    /// view (see `render::regenerate`). Falls back to full renders when the
    /// walk gets large.
    pub(crate) fn record_footprint(&mut self, id: RegionId) {
        if self.full_render {
            return;
        }
        let Ok(r) = self.get(id) else { return };
        let mut stack = alloc::vec![(id, 0i128, r.size as i128)];
        let mut budget = 256;
        while let Some((x, s, e)) = stack.pop() {
            if s >= e {
                continue;
            }
            budget -= 1;
            if budget == 0 {
                self.full_render = true;
                self.windows.clear();
                return;
            }
            let Ok(reg) = self.get(x) else { continue };
            let mut next = Vec::new();
            if let Some(p) = reg.parent {
                if let Ok(pr) = self.get(p) {
                    let a = reg.addr as i128;
                    next.push((p, (s + a).max(0), (e + a).min(pr.size as i128)));
                }
            }
            for &al in &reg.aliased_by {
                if let Ok(ar) = self.get(al) {
                    if let RegionKind::Alias { offset, .. } = ar.kind {
                        let o = offset as i128;
                        next.push((al, (s - o).max(0), (e - o).min(ar.size as i128)));
                    }
                }
            }
            // The number this mutation will have once counted.
            let seq = self.stats.mutations + 1;
            let list = self.windows.entry(x).or_default();
            list.push((s, e, seq));
            if list.len() > 128 && !coalesce(list) {
                // Too scattered to be worth it: render everything.
                self.full_render = true;
                self.windows.clear();
                return;
            }
            stack.extend(next);
        }
    }

    pub(crate) fn change(
        &mut self,
        id: RegionId,
        attr: Attr,
        same: bool,
    ) -> Result<(), MemoryError> {
        self.get(id)?;
        if same {
            return Ok(());
        }
        self.set_attr(id, attr)?;
        self.finish_mutation();
        Ok(())
    }

    pub fn set_enabled(&mut self, id: RegionId, v: bool) -> Result<(), MemoryError> {
        let same = self.get(id)?.enabled == v;
        self.change(id, Attr::Enabled(v), same)
    }

    pub fn set_readonly(&mut self, id: RegionId, v: bool) -> Result<(), MemoryError> {
        let same = self.get(id)?.readonly == v;
        self.change(id, Attr::Readonly(v), same)
    }

    /// ROM-device mode (QEMU `memory_region_rom_device_set_romd`).
    pub fn set_romd(&mut self, id: RegionId, v: bool) -> Result<(), MemoryError> {
        let r = self.get(id)?;
        if !matches!(r.kind, RegionKind::RomDevice { .. }) {
            return Err(MemoryError::WrongKind(id));
        }
        let same = r.romd_mode == v;
        self.change(id, Attr::Romd(v), same)
    }

    pub fn set_nonvolatile(&mut self, id: RegionId, v: bool) -> Result<(), MemoryError> {
        let same = self.get(id)?.nonvolatile == v;
        self.change(id, Attr::Nonvolatile(v), same)
    }

    pub fn set_unmergeable(&mut self, id: RegionId, v: bool) -> Result<(), MemoryError> {
        let same = self.get(id)?.unmergeable == v;
        self.change(id, Attr::Unmergeable(v), same)
    }

    /// Dirty-logging client mask of the region.
    pub fn set_dirty_log_mask(&mut self, id: RegionId, mask: u8) -> Result<(), MemoryError> {
        let same = self.get(id)?.dirty_log_mask == mask;
        self.change(id, Attr::DirtyLog(mask), same)
    }

    pub fn set_size(&mut self, id: RegionId, size: u128) -> Result<(), MemoryError> {
        if size > MAX_SIZE {
            return Err(MemoryError::InvalidSize(size));
        }
        let same = self.get(id)?.size == size;
        self.change(id, Attr::Size(size), same)
    }

    pub fn set_alias_offset(&mut self, id: RegionId, offset: u64) -> Result<(), MemoryError> {
        match self.get(id)?.kind {
            RegionKind::Alias { offset: o, .. } => {
                self.change(id, Attr::AliasOffset(offset), o == offset)
            }
            _ => Err(MemoryError::WrongKind(id)),
        }
    }

    /// QEMU `memory_region_set_address`: a mapped region is removed and
    /// re-added, so it becomes the most recently added of its priority.
    pub fn set_address(&mut self, id: RegionId, addr: u64) -> Result<(), MemoryError> {
        let r = self.get(id)?;
        if r.addr == addr {
            return Ok(());
        }
        match r.parent {
            Some(parent) => {
                let prio = r.priority;
                self.detach(parent, id)?;
                self.attach(parent, id, addr, prio)?;
            }
            None => self.set_attr(id, Attr::Addr(addr))?,
        }
        self.finish_mutation();
        Ok(())
    }

    // ------------------------------------------------------------------
    // Write notifiers
    // ------------------------------------------------------------------

    /// QEMU `memory_region_add_eventfd` (MMIO regions only).
    pub fn add_write_notifier(
        &mut self,
        id: RegionId,
        n: WriteNotifier,
    ) -> Result<(), MemoryError> {
        let r = self.reg_mut(id)?;
        if !matches!(r.kind, RegionKind::Mmio(_)) {
            return Err(MemoryError::WrongKind(id));
        }
        let pos = r.notifiers.partition_point(|o| *o <= n);
        r.notifiers.insert(pos, n);
        let enabled = r.enabled;
        self.notifier_count += 1;
        self.log(Undo::NotifierAdded(id, n));
        if enabled {
            self.mark(id, DIRTY_NOTIFY);
        }
        self.finish_mutation();
        Ok(())
    }

    /// QEMU `memory_region_del_eventfd`.
    pub fn del_write_notifier(
        &mut self,
        id: RegionId,
        n: WriteNotifier,
    ) -> Result<(), MemoryError> {
        let r = self.reg_mut(id)?;
        let pos = r
            .notifiers
            .iter()
            .position(|o| *o == n)
            .ok_or(MemoryError::NoSuchNotifier)?;
        r.notifiers.remove(pos);
        let enabled = r.enabled;
        self.notifier_count = self.notifier_count.saturating_sub(1);
        self.log(Undo::NotifierRemoved(id, pos, n));
        if enabled {
            self.mark(id, DIRTY_NOTIFY);
        }
        self.finish_mutation();
        Ok(())
    }

    // ------------------------------------------------------------------
    // Dirty tracking
    // ------------------------------------------------------------------

    /// Marks `id` and everything that can see it (containers above it,
    /// aliases of it and their containers) with `bits`.
    pub(crate) fn mark(&mut self, id: RegionId, bits: u8) {
        let mut stack = alloc::vec![id];
        while let Some(r) = stack.pop() {
            let Ok(reg) = self.reg_mut(r) else { continue };
            if reg.dirty & bits == bits {
                continue;
            }
            if reg.dirty == 0 {
                self.marked.push(r);
            }
            let reg = self.reg_mut(r).expect("checked above");
            reg.dirty |= bits;
            stack.extend(reg.parent);
            stack.extend(reg.aliased_by.iter().copied());
        }
    }

    pub(crate) fn dirty_bits(&self, id: RegionId) -> u8 {
        self.get(id).map_or(0, |r| r.dirty)
    }

    pub(crate) fn clear_marks(&mut self) {
        self.windows.clear();
        self.last_on_demand.clear();
        self.full_render = false;
        for id in core::mem::take(&mut self.marked) {
            if let Ok(r) = self.reg_mut(id) {
                r.dirty = 0;
            }
        }
    }

    pub(crate) fn log(&mut self, u: Undo) {
        if self.depth > 0 {
            self.undo.push(u);
        }
    }

    pub(crate) fn finish_mutation(&mut self) {
        self.stats.mutations += 1;
        self.cache.clear();
        if self.depth == 0 {
            self.flush();
        }
    }
}

/// Sorts and merges overlapping or touching windows in place (keeping the
/// newest sequence number); returns whether the list got short enough.
fn coalesce(list: &mut Vec<(i128, i128, u64)>) -> bool {
    list.sort_unstable();
    let mut out: Vec<(i128, i128, u64)> = Vec::with_capacity(list.len());
    for &(s, e, q) in list.iter() {
        match out.last_mut() {
            Some(last) if s <= last.1 => {
                last.1 = last.1.max(e);
                last.2 = last.2.max(q);
            }
            _ => out.push((s, e, q)),
        }
    }
    *list = out;
    list.len() <= 64
}
