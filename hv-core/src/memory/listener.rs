//! Memory listeners: the trait, registration and notification.

use super::render::{FlatRange, FlatView};
use super::system::*;
use super::MemoryError;
use alloc::rc::Rc;
use core::cell::RefCell;

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

pub(crate) struct ListenerEntry {
    pub(crate) id: ListenerId,
    pub(crate) priority: i32,
    pub(crate) listener: Rc<RefCell<dyn MemoryListener>>,
}

impl MemorySystem {
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

    /// Tells the listeners of `id` about the change from the old state to the
    /// installed one. Only `&self`: listeners cannot mutate the system.
    pub(crate) fn notify(
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
}
