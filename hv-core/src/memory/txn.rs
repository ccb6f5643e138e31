//! Transactions: nesting, the undo log and abandon.

use super::render::Arena;
use super::system::*;
use super::{MemoryError, RegionId, RegionKind};
use alloc::boxed::Box;

/// One undo-log entry: enough to restore the exact previous state (list
/// positions, generations, attribute values).
pub(crate) enum Undo {
    Created(RegionId),
    Freed {
        index: u32,
        generation: u32,
        region: Box<Region>,
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

impl MemorySystem {
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

    pub(crate) fn apply_undo(&mut self, u: Undo) {
        // Undo entries are applied in reverse order, so the state they expect
        // is restored exactly; failures would be internal bugs and are ignored
        // rather than panicking.
        let depth = core::mem::replace(&mut self.depth, 0);
        // Undo does not record windows: re-render fully if anything flushes.
        self.full_render = true;
        self.windows.clear();
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
                self.notifier_count += region.notifiers.len();
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
                        self.notifier_count = self.notifier_count.saturating_sub(1);
                    }
                }
                self.mark(id, DIRTY_NOTIFY);
            }
            Undo::NotifierRemoved(id, pos, n) => {
                if let Ok(r) = self.reg_mut(id) {
                    let pos = pos.min(r.notifiers.len());
                    r.notifiers.insert(pos, n);
                    self.notifier_count += 1;
                }
                self.mark(id, DIRTY_NOTIFY);
            }
        }
        self.depth = depth;
    }
}
