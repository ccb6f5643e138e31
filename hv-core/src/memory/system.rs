//! The region arena, address spaces, listeners and transactions.

use super::render::{self, Arena, FlatRange, FlatView};
use super::{MemoryError, RegionId, RegionKind, MAX_SIZE};
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

/// Dirty bit: the flat view of address spaces above the region may change.
const DIRTY_VIEW: u8 = 1;
/// Dirty bit: write notifiers of address spaces above the region may change.
const DIRTY_NOTIFY: u8 = 2;

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
    fn matches_access(&self, addr: u64, size: u64, data: u64) -> bool {
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
    dirty: u8,
}

struct Slot {
    generation: u32,
    max_generation: u32,
    region: Option<Region>,
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
    index: u32,
    generation: u32,
}

/// Handle of a registered listener.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ListenerId(u64);

/// What listeners get besides the event: read-only access to the memory
/// system (so a listener cannot mutate the tree while it is being told about
/// a change) and the address space the event is about.
pub struct ListenerCtx<'a> {
    pub mem: &'a MemorySystem,
    pub space: AddressSpaceId,
}

/// A memory listener (QEMU `MemoryListener`), registered per address space.
///
/// All callbacks have empty defaults. During callbacks the address space's
/// committed view ([`MemorySystem::committed_view`]) is already the new one.
pub trait MemoryListener {
    fn begin(&mut self, _cx: &ListenerCtx<'_>) {}
    fn commit(&mut self, _cx: &ListenerCtx<'_>) {}
    fn region_add(&mut self, _cx: &ListenerCtx<'_>, _range: &FlatRange) {}
    fn region_del(&mut self, _cx: &ListenerCtx<'_>, _range: &FlatRange) {}
    fn region_nop(&mut self, _cx: &ListenerCtx<'_>, _range: &FlatRange) {}
    fn log_start(&mut self, _cx: &ListenerCtx<'_>, _range: &FlatRange, _old: u8, _new: u8) {}
    fn log_stop(&mut self, _cx: &ListenerCtx<'_>, _range: &FlatRange, _old: u8, _new: u8) {}
    fn notifier_add(&mut self, _cx: &ListenerCtx<'_>, _n: &AsNotifier) {}
    fn notifier_del(&mut self, _cx: &ListenerCtx<'_>, _n: &AsNotifier) {}
}

struct ListenerEntry {
    id: ListenerId,
    priority: i32,
    listener: Rc<RefCell<dyn MemoryListener>>,
}

struct Space {
    name: String,
    root: RegionId,
    /// Committed state: what listeners have been told.
    view: Rc<FlatView>,
    notifiers: Rc<Vec<AsNotifier>>,
    listeners: Vec<ListenerEntry>,
}

struct SpaceSlot {
    generation: u32,
    space: Option<Space>,
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
enum Attr {
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

enum Undo {
    Created(RegionId),
    Freed {
        index: u32,
        generation: u32,
        region: alloc::boxed::Box<Region>,
    },
    Attached {
        parent: RegionId,
        child: RegionId,
        old_addr: u64,
        old_priority: i32,
    },
    Detached {
        parent: RegionId,
        child: RegionId,
        index: usize,
        addr: u64,
        priority: i32,
    },
    Attr(RegionId, Attr),
    NotifierAdded(RegionId, WriteNotifier),
    NotifierRemoved(RegionId, usize, WriteNotifier),
}

/// A memory system: one per VM (no global state).
pub struct MemorySystem {
    slots: Vec<Slot>,
    free: Vec<u32>,
    spaces: Vec<SpaceSlot>,
    next_listener: u64,
    depth: u32,
    /// Undo-log length at each open `begin`.
    markers: Vec<usize>,
    undo: Vec<Undo>,
    /// Regions carrying dirty bits (cleared at flush).
    marked: Vec<RegionId>,
    /// On-demand renders valid until the next mutation (by space index).
    cache: BTreeMap<u32, (Rc<FlatView>, Rc<Vec<AsNotifier>>)>,
    policy: ReadPolicy,
    /// A forced flush happened inside the current outermost transaction.
    forced_in_txn: bool,
    stats: Stats,
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
            next_listener: 1,
            depth: 0,
            markers: Vec::new(),
            undo: Vec::new(),
            marked: Vec::new(),
            cache: BTreeMap::new(),
            policy: ReadPolicy::default(),
            forced_in_txn: false,
            stats: Stats::default(),
        }
    }

    // ------------------------------------------------------------------
    // Arena access
    // ------------------------------------------------------------------

    fn reg_mut(&mut self, id: RegionId) -> Result<&mut Region, MemoryError> {
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

    fn free_region(&mut self, id: RegionId) -> Result<(), MemoryError> {
        let region = self.slots[id.index as usize]
            .region
            .take()
            .ok_or(MemoryError::StaleRegion(id))?;
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
    fn reaches(&self, from: RegionId, to: RegionId) -> Result<bool, MemoryError> {
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

    fn attach(
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

    fn detach(&mut self, parent: RegionId, child: RegionId) -> Result<(), MemoryError> {
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
        self.mark(id, DIRTY_VIEW | DIRTY_NOTIFY);
        self.finish_mutation();
        Ok(())
    }

    // ------------------------------------------------------------------
    // Attributes
    // ------------------------------------------------------------------

    fn set_attr(&mut self, id: RegionId, attr: Attr) -> Result<(), MemoryError> {
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
        }
        Ok(())
    }

    fn change(&mut self, id: RegionId, attr: Attr, same: bool) -> Result<(), MemoryError> {
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
    fn mark(&mut self, id: RegionId, bits: u8) {
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

    fn dirty_bits(&self, id: RegionId) -> u8 {
        self.get(id).map_or(0, |r| r.dirty)
    }

    fn clear_marks(&mut self) {
        for id in core::mem::take(&mut self.marked) {
            if let Ok(r) = self.reg_mut(id) {
                r.dirty = 0;
            }
        }
    }

    fn log(&mut self, u: Undo) {
        if self.depth > 0 {
            self.undo.push(u);
        }
    }

    fn finish_mutation(&mut self) {
        self.stats.mutations += 1;
        self.cache.clear();
        if self.depth == 0 {
            self.flush();
        }
    }

    // ------------------------------------------------------------------
    // Transactions
    // ------------------------------------------------------------------

    /// QEMU `memory_region_transaction_begin`.
    pub fn begin(&mut self) {
        if self.depth == 0 {
            self.forced_in_txn = false;
        }
        self.depth += 1;
        self.markers.push(self.undo.len());
    }

    /// QEMU `memory_region_transaction_commit`: the outermost commit renders
    /// each changed address space once and runs its listeners once.
    pub fn commit(&mut self) -> Result<(), MemoryError> {
        if self.depth == 0 {
            return Err(MemoryError::NoTransaction);
        }
        self.depth -= 1;
        self.markers.pop();
        if self.depth == 0 {
            self.undo.clear();
            self.flush();
        }
        Ok(())
    }

    /// Abandons the innermost transaction: every mutation since its `begin`
    /// is undone. If the outermost transaction is abandoned and nothing was
    /// force-committed meanwhile, listeners see nothing at all.
    pub fn abandon(&mut self) -> Result<(), MemoryError> {
        let marker = self.markers.pop().ok_or(MemoryError::NoTransaction)?;
        while self.undo.len() > marker {
            let u = self.undo.pop().expect("len > marker");
            self.apply_undo(u);
        }
        self.depth -= 1;
        self.stats.abandons += 1;
        self.cache.clear();
        if self.depth == 0 {
            self.undo.clear();
            if self.forced_in_txn {
                // Listeners saw intermediate state: bring them back.
                self.flush();
            } else {
                // The tree is exactly the committed tree again.
                self.clear_marks();
            }
        }
        Ok(())
    }

    fn apply_undo(&mut self, u: Undo) {
        // Undo entries are applied in reverse order, so the state they expect
        // is restored exactly; failures would be internal bugs and are ignored
        // rather than panicking.
        let depth = core::mem::replace(&mut self.depth, 0);
        match u {
            Undo::Created(id) => {
                if let Some(parent) = self.get(id).ok().and_then(|r| r.parent) {
                    let _ = self.detach(parent, id);
                }
                let _ = self.free_region(id);
            }
            Undo::Freed {
                index,
                generation,
                region,
            } => {
                if let Some(pos) = self.free.iter().rposition(|&i| i == index) {
                    self.free.remove(pos);
                }
                let id = RegionId { index, generation };
                let alias_target = match region.kind {
                    RegionKind::Alias { target, .. } => Some(target),
                    _ => None,
                };
                let slot = &mut self.slots[index as usize];
                slot.generation = generation;
                let mut region = *region;
                region.dirty = 0;
                slot.region = Some(region);
                if let Some(t) = alias_target {
                    if let Ok(t) = self.reg_mut(t) {
                        if !t.aliased_by.contains(&id) {
                            t.aliased_by.push(id);
                        }
                    }
                }
                // Fully marking the restored region keeps the marking
                // invariant for its restored edges.
                self.mark(id, DIRTY_VIEW | DIRTY_NOTIFY);
            }
            Undo::Attached {
                parent,
                child,
                old_addr,
                old_priority,
            } => {
                let _ = self.detach(parent, child);
                if let Ok(c) = self.reg_mut(child) {
                    c.addr = old_addr;
                    c.priority = old_priority;
                }
                self.mark(child, DIRTY_VIEW | DIRTY_NOTIFY);
            }
            Undo::Detached {
                parent,
                child,
                index,
                addr,
                priority,
            } => {
                if let Ok(c) = self.reg_mut(child) {
                    c.parent = Some(parent);
                    c.addr = addr;
                    c.priority = priority;
                }
                if let Ok(p) = self.reg_mut(parent) {
                    let index = index.min(p.subregions.len());
                    p.subregions.insert(index, child);
                }
                self.mark(parent, DIRTY_VIEW | DIRTY_NOTIFY);
            }
            Undo::Attr(id, attr) => {
                let _ = self.set_attr(id, attr);
                self.mark(id, DIRTY_VIEW | DIRTY_NOTIFY);
            }
            Undo::NotifierAdded(id, n) => {
                if let Ok(r) = self.reg_mut(id) {
                    if let Some(pos) = r.notifiers.iter().position(|o| *o == n) {
                        r.notifiers.remove(pos);
                    }
                }
                self.mark(id, DIRTY_NOTIFY);
            }
            Undo::NotifierRemoved(id, pos, n) => {
                if let Ok(r) = self.reg_mut(id) {
                    let pos = pos.min(r.notifiers.len());
                    r.notifiers.insert(pos, n);
                }
                self.mark(id, DIRTY_NOTIFY);
            }
        }
        self.depth = depth;
    }

    // ------------------------------------------------------------------
    // Address spaces
    // ------------------------------------------------------------------

    fn spaces_iter(&self) -> impl Iterator<Item = (AddressSpaceId, &Space)> {
        self.spaces.iter().enumerate().filter_map(|(i, s)| {
            s.space.as_ref().map(|sp| {
                (
                    AddressSpaceId {
                        index: i as u32,
                        generation: s.generation,
                    },
                    sp,
                )
            })
        })
    }

    fn space(&self, id: AddressSpaceId) -> Result<&Space, MemoryError> {
        self.spaces
            .get(id.index as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.space.as_ref())
            .ok_or(MemoryError::StaleAddressSpace(id))
    }

    fn space_mut(&mut self, id: AddressSpaceId) -> Result<&mut Space, MemoryError> {
        self.spaces
            .get_mut(id.index as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.space.as_mut())
            .ok_or(MemoryError::StaleAddressSpace(id))
    }

    /// All address spaces, in creation order.
    pub fn address_spaces(&self) -> Vec<AddressSpaceId> {
        self.spaces_iter().map(|(id, _)| id).collect()
    }

    pub fn address_space_name(&self, id: AddressSpaceId) -> Result<&str, MemoryError> {
        Ok(&self.space(id)?.name)
    }

    pub fn address_space_root(&self, id: AddressSpaceId) -> Result<RegionId, MemoryError> {
        Ok(self.space(id)?.root)
    }

    /// QEMU `address_space_init` (not inside a transaction).
    pub fn create_address_space(
        &mut self,
        name: &str,
        root: RegionId,
    ) -> Result<AddressSpaceId, MemoryError> {
        if self.depth > 0 {
            return Err(MemoryError::InTransaction);
        }
        self.get(root)?;
        // Share the view of an existing space with the same flat-view root.
        let mut shared = BTreeMap::new();
        for (_, sp) in self.spaces_iter() {
            shared
                .entry(sp.view.root)
                .or_insert_with(|| sp.view.clone());
        }
        let (view, notifiers) = self.build_state(root, &shared)?;
        let space = Space {
            name: name.into(),
            root,
            view,
            notifiers,
            listeners: Vec::new(),
        };
        let index = self.spaces.iter().position(|s| s.space.is_none());
        let id = match index {
            Some(i) => {
                let slot = &mut self.spaces[i];
                slot.generation = slot.generation.wrapping_add(1);
                slot.space = Some(space);
                AddressSpaceId {
                    index: i as u32,
                    generation: slot.generation,
                }
            }
            None => {
                self.spaces.push(SpaceSlot {
                    generation: 0,
                    space: Some(space),
                });
                AddressSpaceId {
                    index: (self.spaces.len() - 1) as u32,
                    generation: 0,
                }
            }
        };
        Ok(id)
    }

    /// QEMU `address_space_destroy`: listeners are unregistered (they get
    /// region_del for the whole view) and the space is removed.
    pub fn destroy_address_space(&mut self, id: AddressSpaceId) -> Result<(), MemoryError> {
        if self.depth > 0 {
            return Err(MemoryError::InTransaction);
        }
        let ids: Vec<ListenerId> = self.space(id)?.listeners.iter().map(|l| l.id).collect();
        for l in ids {
            self.remove_listener(l)?;
        }
        self.spaces[id.index as usize].space = None;
        self.cache.remove(&id.index);
        Ok(())
    }

    /// Renders the view of `root` (sharing with `shared` by flat-view root).
    fn build_state(
        &mut self,
        root: RegionId,
        shared: &BTreeMap<Option<RegionId>, Rc<FlatView>>,
    ) -> Result<(Rc<FlatView>, Rc<Vec<AsNotifier>>), MemoryError> {
        let physmr = render::flatview_root(self, root)?;
        let view = match shared.get(&physmr) {
            Some(v) => v.clone(),
            None => {
                self.stats.renders += 1;
                Rc::new(render::generate(self, physmr)?)
            }
        };
        let notifiers = Rc::new(self.notifiers_of(&view));
        Ok((view, notifiers))
    }

    /// QEMU `address_space_update_ioeventfds` (sorted, deduplicated).
    fn notifiers_of(&self, view: &FlatView) -> Vec<AsNotifier> {
        let mut out = Vec::new();
        for fr in &view.ranges {
            let Ok(r) = self.get(fr.region) else { continue };
            for n in &r.notifiers {
                // Shift the notifier into the address space.
                let start = fr.start as i128 - fr.offset_in_region as i128 + n.addr as i128;
                let end = start + n.size as i128;
                let (fs, fe) = (fr.start as i128, fr.end() as i128);
                // QEMU addrrange_intersects (a zero-size notifier counts when
                // its start is inside the range).
                let intersects = (start >= fs && start < fe) || (fs >= start && fs < end);
                if intersects && start >= 0 && start <= u64::MAX as i128 {
                    out.push(AsNotifier {
                        start: start as u64,
                        size: n.size,
                        data: n.data,
                        token: n.token,
                        region: fr.region,
                    });
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    // ------------------------------------------------------------------
    // Flush (topology update)
    // ------------------------------------------------------------------

    /// Renders every address space whose view may have changed, installs the
    /// new views and tells listeners. Runs at the outermost commit (or for a
    /// forced read).
    fn flush(&mut self) {
        if self.marked.is_empty() {
            return;
        }
        self.stats.commits += 1;
        // Views of clean spaces can be shared by flat-view root.
        let mut shared: BTreeMap<Option<RegionId>, Rc<FlatView>> = BTreeMap::new();
        let mut work: Vec<(AddressSpaceId, u8)> = Vec::new();
        for (id, sp) in self.spaces_iter() {
            let bits = self.dirty_bits(sp.root);
            if bits & DIRTY_VIEW == 0 {
                shared
                    .entry(sp.view.root)
                    .or_insert_with(|| sp.view.clone());
            }
            if bits != 0 {
                work.push((id, bits));
            }
        }
        let mut changes = Vec::new();
        for (id, bits) in work {
            let Ok(sp) = self.space(id) else { continue };
            let root = sp.root;
            let (old_view, old_notifiers) = (sp.view.clone(), sp.notifiers.clone());
            let (mut view, notifiers) = if bits & DIRTY_VIEW != 0 {
                let state = match self.cache.get(&id.index) {
                    Some(s) => Ok(s.clone()),
                    None => self.build_state(root, &shared),
                };
                match state {
                    Ok(s) => s,
                    Err(_) => continue,
                }
            } else {
                let n = Rc::new(self.notifiers_of(&old_view));
                (old_view.clone(), n)
            };
            let view_changed = *view != *old_view;
            if !view_changed {
                view = old_view.clone();
            }
            shared.entry(view.root).or_insert_with(|| view.clone());
            let notifiers_changed = *notifiers != *old_notifiers;
            if let Ok(sp) = self.space_mut(id) {
                sp.view = view;
                sp.notifiers = notifiers;
            }
            if view_changed || notifiers_changed {
                changes.push((id, old_view, old_notifiers, view_changed));
            }
        }
        self.clear_marks();
        self.cache.clear();
        let mut brackets = 0;
        for (id, old_view, old_notifiers, view_changed) in changes {
            brackets += self.notify(id, &old_view, &old_notifiers, view_changed);
        }
        self.stats.listener_commits += brackets;
    }

    /// Tells the listeners of `id` about the change from the old state to the
    /// installed one. Only `&self`: listeners cannot mutate the system.
    fn notify(
        &self,
        id: AddressSpaceId,
        old_view: &FlatView,
        old_notifiers: &[AsNotifier],
        view_changed: bool,
    ) -> u64 {
        let Ok(sp) = self.space(id) else { return 0 };
        if sp.listeners.is_empty() {
            return 0;
        }
        let cx = ListenerCtx {
            mem: self,
            space: id,
        };
        let fwd = || sp.listeners.iter();
        let rev = || sp.listeners.iter().rev();
        if view_changed {
            for l in fwd() {
                l.listener.borrow_mut().begin(&cx);
            }
            let new_view = &sp.view;
            // QEMU address_space_update_topology_pass, deletions then
            // additions.
            for adding in [false, true] {
                let (old, new) = (&old_view.ranges, &new_view.ranges);
                let (mut io, mut inew) = (0, 0);
                while io < old.len() || inew < new.len() {
                    let fo = old.get(io);
                    let fnew = new.get(inew);
                    match (fo, fnew) {
                        (Some(o), n)
                            if n.is_none_or(|n| {
                                o.start < n.start || (o.start == n.start && !o.same_mapping(n))
                            }) =>
                        {
                            if !adding {
                                for l in rev() {
                                    l.listener.borrow_mut().region_del(&cx, o);
                                }
                            }
                            io += 1;
                        }
                        (Some(o), Some(n)) if o.same_mapping(n) => {
                            if adding {
                                for l in fwd() {
                                    l.listener.borrow_mut().region_nop(&cx, n);
                                }
                                if n.dirty_log_mask & !o.dirty_log_mask != 0 {
                                    for l in fwd() {
                                        l.listener.borrow_mut().log_start(
                                            &cx,
                                            n,
                                            o.dirty_log_mask,
                                            n.dirty_log_mask,
                                        );
                                    }
                                }
                                if o.dirty_log_mask & !n.dirty_log_mask != 0 {
                                    for l in rev() {
                                        l.listener.borrow_mut().log_stop(
                                            &cx,
                                            n,
                                            o.dirty_log_mask,
                                            n.dirty_log_mask,
                                        );
                                    }
                                }
                            }
                            io += 1;
                            inew += 1;
                        }
                        (_, Some(n)) => {
                            if adding {
                                for l in fwd() {
                                    l.listener.borrow_mut().region_add(&cx, n);
                                }
                            }
                            inew += 1;
                        }
                        (_, None) => break,
                    }
                }
            }
        }
        // QEMU address_space_add_del_ioeventfds: del forward, add reverse.
        let (old, new) = (old_notifiers, &sp.notifiers[..]);
        let (mut io, mut inew) = (0, 0);
        while io < old.len() || inew < new.len() {
            if io < old.len() && (inew == new.len() || old[io] < new[inew]) {
                for l in fwd() {
                    l.listener.borrow_mut().notifier_del(&cx, &old[io]);
                }
                io += 1;
            } else if inew < new.len() && (io == old.len() || new[inew] < old[io]) {
                for l in rev() {
                    l.listener.borrow_mut().notifier_add(&cx, &new[inew]);
                }
                inew += 1;
            } else {
                io += 1;
                inew += 1;
            }
        }
        if view_changed {
            for l in fwd() {
                l.listener.borrow_mut().commit(&cx);
            }
            sp.listeners.len() as u64
        } else {
            0
        }
    }

    // ------------------------------------------------------------------
    // Listeners
    // ------------------------------------------------------------------

    /// QEMU `memory_listener_register`: the listener is inserted after all
    /// listeners of lower or equal priority and immediately replayed the
    /// committed view (begin, region_add/log_start per range, notifier_add
    /// per notifier, commit).
    pub fn add_listener(
        &mut self,
        space: AddressSpaceId,
        priority: i32,
        listener: Rc<RefCell<dyn MemoryListener>>,
    ) -> Result<ListenerId, MemoryError> {
        let id = ListenerId(self.next_listener);
        let sp = self.space_mut(space)?;
        let pos = sp
            .listeners
            .iter()
            .position(|l| priority < l.priority)
            .unwrap_or(sp.listeners.len());
        sp.listeners.insert(
            pos,
            ListenerEntry {
                id,
                priority,
                listener: listener.clone(),
            },
        );
        self.next_listener += 1;
        let sp = self.space(space)?;
        let cx = ListenerCtx { mem: self, space };
        let mut l = listener.borrow_mut();
        l.begin(&cx);
        for fr in &sp.view.ranges {
            l.region_add(&cx, fr);
            if fr.dirty_log_mask != 0 {
                l.log_start(&cx, fr, 0, fr.dirty_log_mask);
            }
        }
        for n in sp.notifiers.iter() {
            l.notifier_add(&cx, n);
        }
        l.commit(&cx);
        drop(l);
        self.stats.listener_commits += 1;
        Ok(id)
    }

    /// QEMU `memory_listener_unregister`: the listener is told to forget the
    /// committed view, then removed.
    pub fn remove_listener(&mut self, id: ListenerId) -> Result<(), MemoryError> {
        let found = self.spaces_iter().find_map(|(sid, sp)| {
            sp.listeners
                .iter()
                .position(|l| l.id == id)
                .map(|pos| (sid, pos))
        });
        let (space, pos) = found.ok_or(MemoryError::UnknownListener(id))?;
        let sp = self.space(space)?;
        let listener = sp.listeners[pos].listener.clone();
        let cx = ListenerCtx { mem: self, space };
        {
            let mut l = listener.borrow_mut();
            l.begin(&cx);
            for fr in &sp.view.ranges {
                if fr.dirty_log_mask != 0 {
                    l.log_stop(&cx, fr, fr.dirty_log_mask, 0);
                }
                l.region_del(&cx, fr);
            }
            for n in sp.notifiers.iter() {
                l.notifier_del(&cx, n);
            }
            l.commit(&cx);
        }
        self.stats.listener_commits += 1;
        self.space_mut(space)?.listeners.remove(pos);
        Ok(())
    }

    // ------------------------------------------------------------------
    // Reads
    // ------------------------------------------------------------------

    /// The committed view of `space`: what its listeners have been told.
    /// Outside transactions (and inside listener callbacks) this is the
    /// current view.
    pub fn committed_view(&self, space: AddressSpaceId) -> Result<Rc<FlatView>, MemoryError> {
        Ok(self.space(space)?.view.clone())
    }

    /// The view of `space` as the tree is now. Inside a transaction with
    /// pending mutations this renders on demand (cached until the next
    /// mutation) or, with [`ReadPolicy::ForceCommit`], commits to listeners
    /// first.
    pub fn flat_view(&mut self, space: AddressSpaceId) -> Result<Rc<FlatView>, MemoryError> {
        Ok(self.current_state(space)?.0)
    }

    fn current_state(
        &mut self,
        space: AddressSpaceId,
    ) -> Result<(Rc<FlatView>, Rc<Vec<AsNotifier>>), MemoryError> {
        let sp = self.space(space)?;
        let root = sp.root;
        let bits = self.dirty_bits(root);
        if bits == 0 {
            return Ok((sp.view.clone(), sp.notifiers.clone()));
        }
        match self.policy {
            ReadPolicy::ForceCommit => {
                self.stats.forced_commits += 1;
                self.forced_in_txn = true;
                self.flush();
                let sp = self.space(space)?;
                Ok((sp.view.clone(), sp.notifiers.clone()))
            }
            ReadPolicy::RenderOnDemand => {
                if let Some(s) = self.cache.get(&space.index) {
                    return Ok(s.clone());
                }
                let state = if bits & DIRTY_VIEW != 0 {
                    // Share with another cached space of the same root.
                    let physmr = render::flatview_root(self, root)?;
                    let mut shared = BTreeMap::new();
                    for (v, _) in self.cache.values() {
                        if v.root == physmr {
                            shared.insert(physmr, v.clone());
                        }
                    }
                    let before = self.stats.renders;
                    let s = self.build_state(root, &shared)?;
                    self.stats.on_demand_renders += self.stats.renders - before;
                    s
                } else {
                    let view = sp.view.clone();
                    let n = Rc::new(self.notifiers_of(&view));
                    (view, n)
                };
                self.cache.insert(space.index, state.clone());
                Ok(state)
            }
        }
    }

    /// Looks `addr` up in the current view of `space` (O(log n)).
    pub fn lookup(
        &mut self,
        space: AddressSpaceId,
        addr: u64,
    ) -> Result<Option<Lookup>, MemoryError> {
        let view = self.flat_view(space)?;
        Ok(view.lookup(addr).map(|fr| Lookup {
            region: fr.region,
            offset: fr.offset_in_region + (addr - fr.start),
            readonly: fr.readonly,
            range: *fr,
        }))
    }

    /// Address translation for dispatch (MMIO exits, guest-memory access by
    /// device models): terminal region, offset in it, read-only. Uses the
    /// committed view or a cached on-demand render when valid (binary
    /// search); inside a transaction with pending changes and no cached render
    /// it walks the tree for this one address instead of rendering the whole
    /// view (`ReadPolicy::RenderOnDemand`, counted in `Stats::walk_lookups`),
    /// or commits first (`ReadPolicy::ForceCommit`). The walk is the
    /// reference resolver the renderer is property-tested against.
    pub fn translate(
        &mut self,
        space: AddressSpaceId,
        addr: u64,
    ) -> Result<Option<Translation>, MemoryError> {
        let sp = self.space(space)?;
        let root = sp.root;
        let hit = |fr: &FlatRange| Translation {
            region: fr.region,
            offset: fr.offset_in_region + (addr - fr.start),
            readonly: fr.readonly,
        };
        if self.dirty_bits(root) & DIRTY_VIEW == 0 {
            return Ok(sp.view.lookup(addr).map(hit));
        }
        if let Some((v, _)) = self.cache.get(&space.index) {
            return Ok(v.lookup(addr).map(hit));
        }
        match self.policy {
            ReadPolicy::ForceCommit => Ok(self.lookup(space, addr)?.map(|l| Translation {
                region: l.region,
                offset: l.offset,
                readonly: l.readonly,
            })),
            ReadPolicy::RenderOnDemand => {
                self.stats.walk_lookups += 1;
                Ok(self.resolve_slow(root, addr)?.map(|h| Translation {
                    region: h.region,
                    offset: h.offset,
                    readonly: h.readonly,
                }))
            }
        }
    }

    /// Write-notifier fast path: the notifier of `space` that a write of
    /// `size` bytes of `data` at `addr` would signal (QEMU's
    /// `memory_region_ioeventfd_equal` semantics).
    pub fn find_write_notifier(
        &mut self,
        space: AddressSpaceId,
        addr: u64,
        size: u64,
        data: u64,
    ) -> Result<Option<AsNotifier>, MemoryError> {
        let (_, notifiers) = self.current_state(space)?;
        let first = notifiers.partition_point(|n| n.start < addr);
        Ok(notifiers[first..]
            .iter()
            .take_while(|n| n.start == addr)
            .find(|n| {
                WriteNotifier {
                    addr: n.start,
                    size: n.size,
                    data: n.data,
                    token: n.token,
                }
                .matches_access(addr, size, data)
            })
            .copied())
    }

    /// Committed write notifiers of `space`.
    pub fn committed_notifiers(
        &self,
        space: AddressSpaceId,
    ) -> Result<Rc<Vec<AsNotifier>>, MemoryError> {
        Ok(self.space(space)?.notifiers.clone())
    }

    /// QEMU `memory_region_get_flatview_root` for a region.
    pub fn flatview_root(&self, root: RegionId) -> Result<Option<RegionId>, MemoryError> {
        render::flatview_root(self, root)
    }

    /// Renders the tree under `root` now, without touching any state.
    pub fn render_region(&self, root: RegionId) -> Result<FlatView, MemoryError> {
        render::generate(self, render::flatview_root(self, root)?)
    }
}
