//! Address spaces, the flush (topology update) and reads.

use super::listener::ListenerId;
use super::render::{self, Arena, FlatRange, FlatView};
use super::system::*;
use super::{MemoryError, RegionId, MAX_SIZE};
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::vec::Vec;

impl MemorySystem {
    // ------------------------------------------------------------------
    // Address spaces
    // ------------------------------------------------------------------

    pub(crate) fn spaces_iter(&self) -> impl Iterator<Item = (AddressSpaceId, &Space)> {
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

    pub(crate) fn space(&self, id: AddressSpaceId) -> Result<&Space, MemoryError> {
        self.spaces
            .get(id.index as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.space.as_ref())
            .ok_or(MemoryError::StaleAddressSpace(id))
    }

    pub(crate) fn space_mut(&mut self, id: AddressSpaceId) -> Result<&mut Space, MemoryError> {
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
        // Share the view of an existing space with the same flat-view root:
        // the index names the first such space directly (the committed views
        // are current, since no transaction is open).
        let physmr = render::flatview_root(self, root)?;
        let shared = self.clean_view_of(physmr);
        let (view, notifiers) = self.build_state(root, shared, None)?;
        let view_root = view.root;
        let space = Space {
            name: name.into(),
            root,
            view,
            notifiers,
            listeners: Vec::new(),
        };
        let id = match self.free_spaces.pop_first() {
            Some(i) => {
                let slot = &mut self.spaces[i as usize];
                slot.generation = slot.generation.wrapping_add(1);
                slot.space = Some(space);
                AddressSpaceId {
                    index: i,
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
        self.view_roots.insert((view_root, id.index));
        self.space_roots.insert((root, id.index));
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
        if let Some(sp) = self.spaces[id.index as usize].space.take() {
            self.view_roots.remove(&(sp.view.root, id.index));
            self.space_roots.remove(&(sp.root, id.index));
        }
        self.free_spaces.insert(id.index);
        self.cache.remove(&id.index);
        Ok(())
    }

    /// The committed view of a space whose root carries no `VIEW` mark and
    /// whose view has the flat-view root `physmr` (the lowest such space):
    /// a view that is current and can be shared. O(log n) plus the marked
    /// spaces of that root skipped.
    pub(crate) fn clean_view_of(&self, physmr: Option<RegionId>) -> Option<Rc<FlatView>> {
        self.view_roots
            .range((physmr, 0)..=(physmr, u32::MAX))
            .filter_map(|&(_, i)| self.spaces.get(i as usize)?.space.as_ref())
            .find(|sp| self.dirty_bits(sp.root) & DIRTY_VIEW == 0)
            .map(|sp| sp.view.clone())
    }

    /// Renders the view of `root`, or takes `shared` if it has the same
    /// flat-view root. `base`: a previous view of this space and the window
    /// sequence number it includes (windows recorded after it are
    /// re-rendered).
    pub(crate) fn build_state(
        &mut self,
        root: RegionId,
        shared: Option<Rc<FlatView>>,
        base: Option<(&FlatView, u64)>,
    ) -> Result<(Rc<FlatView>, Rc<Vec<AsNotifier>>), MemoryError> {
        let physmr = render::flatview_root(self, root)?;
        let view = match shared.filter(|v| v.root == physmr) {
            Some(v) => v,
            None => {
                self.stats.renders += 1;
                let since = base.map_or(0, |b| b.1);
                let base = base.map(|b| b.0);
                let partial = match (physmr, base, self.windows_of(physmr, since)) {
                    (Some(p), Some(old), Some(w)) => render::regenerate(self, p, old, &w)?,
                    _ => None,
                };
                match partial {
                    Some(v) => {
                        self.stats.partial_renders += 1;
                        Rc::new(v)
                    }
                    None => Rc::new(render::generate(self, physmr)?),
                }
            }
        };
        let notifiers = Rc::new(self.notifiers_of(&view));
        Ok((view, notifiers))
    }

    /// The windows recorded for `physmr` since the last flush, absolute,
    /// sorted and coalesced; `None` if a full render is needed.
    pub(crate) fn windows_of(
        &self,
        physmr: Option<RegionId>,
        since: u64,
    ) -> Option<Vec<(i128, i128)>> {
        let p = physmr?;
        if self.full_render {
            return None;
        }
        let addr = self.get(p).ok()?.addr as i128;
        let mut w: Vec<(i128, i128)> = self
            .windows
            .get(&p)?
            .iter()
            .filter(|w| w.2 > since)
            .map(|&(s, e, _)| ((s + addr).max(0), (e + addr).min(MAX_SIZE as i128)))
            .filter(|&(s, e)| s < e)
            .collect();
        w.sort_unstable();
        let mut out: Vec<(i128, i128)> = Vec::with_capacity(w.len());
        for (s, e) in w {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        // No window at all since the committed view although the space is
        // marked: be conservative and render everything.
        if out.is_empty() && since == 0 {
            return None;
        }
        (out.len() <= 64).then_some(out)
    }

    /// QEMU `address_space_update_ioeventfds` (sorted, deduplicated).
    pub(crate) fn notifiers_of(&self, view: &FlatView) -> Vec<AsNotifier> {
        let mut out = Vec::new();
        if self.notifier_count == 0 {
            return out;
        }
        for fr in &view.ranges {
            // Write notifiers can only be registered on MMIO regions.
            if !matches!(fr.target, render::RangeTarget::Mmio(_)) {
                continue;
            }
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
    pub(crate) fn flush(&mut self) {
        if self.marked.is_empty() {
            return;
        }
        self.stats.commits += 1;
        // Views of clean spaces can be shared by flat-view root (looked up
        // once per root, through the index), then views rendered here.
        let mut clean: BTreeMap<Option<RegionId>, Option<Rc<FlatView>>> = BTreeMap::new();
        let mut fresh: BTreeMap<Option<RegionId>, Rc<FlatView>> = BTreeMap::new();
        // The spaces to look at: those whose root is marked, in slot order.
        let mut work: Vec<(AddressSpaceId, u8)> = Vec::new();
        for &r in &self.marked {
            let bits = self.dirty_bits(r);
            if bits == 0 {
                continue;
            }
            for &(_, i) in self.space_roots.range((r, 0)..=(r, u32::MAX)) {
                if let Some(slot) = self.spaces.get(i as usize) {
                    let id = AddressSpaceId {
                        index: i,
                        generation: slot.generation,
                    };
                    work.push((id, bits));
                }
            }
        }
        work.sort_unstable();
        work.dedup();
        let mut changes = Vec::new();
        for (id, bits) in work {
            let Ok(sp) = self.space(id) else { continue };
            let root = sp.root;
            let (old_view, old_notifiers) = (sp.view.clone(), sp.notifiers.clone());
            let (mut view, notifiers) = if bits & DIRTY_VIEW != 0 {
                let state = match self.cache.get(&id.index) {
                    Some(s) => Ok(s.clone()),
                    None => {
                        let (since, base) = match self.last_on_demand.get(&id.index) {
                            Some((q, v)) => (*q, v.clone()),
                            None => (0, old_view.clone()),
                        };
                        let shared = render::flatview_root(self, root).ok().and_then(|p| {
                            let c = clean
                                .entry(p)
                                .or_insert_with(|| self.clean_view_of(p))
                                .clone();
                            c.or_else(|| fresh.get(&p).cloned())
                        });
                        self.build_state(root, shared, Some((&base, since)))
                    }
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
            fresh.entry(view.root).or_insert_with(|| view.clone());
            let notifiers_changed = *notifiers != *old_notifiers;
            let new_root = view.root;
            if let Ok(sp) = self.space_mut(id) {
                let old_root = sp.view.root;
                sp.view = view;
                sp.notifiers = notifiers;
                if old_root != new_root {
                    self.view_roots.remove(&(old_root, id.index));
                    self.view_roots.insert((new_root, id.index));
                }
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

    pub(crate) fn current_state(
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
                    let shared = self
                        .cache
                        .values()
                        .find(|(v, _)| v.root == physmr)
                        .map(|(v, _)| v.clone());
                    let before = self.stats.renders;
                    // Start from this transaction's last on-demand render of
                    // the space if there is one, else from the committed view.
                    let (since, base) = match self.last_on_demand.get(&space.index) {
                        Some((q, v)) => (*q, v.clone()),
                        None => (0, sp.view.clone()),
                    };
                    let s = self.build_state(root, shared, Some((&base, since)))?;
                    self.stats.on_demand_renders += self.stats.renders - before;
                    self.last_on_demand
                        .insert(space.index, (self.stats.mutations, s.0.clone()));
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
