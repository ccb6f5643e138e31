//! Property tests: random trees and random mutation sequences (inside and
//! outside transactions, with abandon) checked against
//! * the slow reference resolver (`resolve_slow`, a per-address tree walk),
//! * structural invariants of flat views (sorted, disjoint, simplified),
//! * a model map rebuilt purely from the listener event stream,
//! * snapshots taken at `begin` (abandon restores them exactly).

use hv_core::memory::{
    mtree, AddressSpaceId, AsNotifier, FlatRange, ListenerCtx, MemoryListener, MemorySystem,
    MmioHandle, RamBacking, ReadPolicy, RegionId, RegionKind, WriteNotifier,
};
use proptest::prelude::*;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

const SPACE: u64 = 0x1_0000;

#[derive(Clone, Debug)]
enum Op {
    Create {
        kind: u8,
        size: u64,
        target: usize,
        offset: u64,
    },
    Attach {
        parent: usize,
        child: usize,
        addr: u64,
        prio: i32,
    },
    Detach {
        child: usize,
    },
    Enable {
        r: usize,
        on: bool,
    },
    Readonly {
        r: usize,
        on: bool,
    },
    Move {
        r: usize,
        addr: u64,
    },
    AliasOffset {
        r: usize,
        offset: u64,
    },
    Resize {
        r: usize,
        size: u64,
    },
    Destroy {
        r: usize,
    },
    Begin,
    Commit,
    Abandon,
    Read {
        addr: u64,
    },
    Notify {
        r: usize,
        addr: u64,
        size: u64,
        data: Option<u64>,
        add: bool,
    },
    /// Creates an address space rooted at a random region, or destroys one.
    Space {
        r: usize,
        create: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..6, 1u64..0x4000, any::<usize>(), 0u64..0x2000)
            .prop_map(|(kind, size, target, offset)| Op::Create { kind, size, target, offset }),
        10 => (any::<usize>(), any::<usize>(), 0u64..SPACE, -2i32..3)
            .prop_map(|(parent, child, addr, prio)| Op::Attach { parent, child, addr: addr & !0xff, prio }),
        1 => any::<usize>().prop_map(|child| Op::Detach { child }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(r, on)| Op::Enable { r, on }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(r, on)| Op::Readonly { r, on }),
        1 => (any::<usize>(), 0u64..SPACE).prop_map(|(r, addr)| Op::Move { r, addr: addr & !0xff }),
        1 => (any::<usize>(), 0u64..0x2000).prop_map(|(r, offset)| Op::AliasOffset { r, offset }),
        1 => (any::<usize>(), 1u64..0x4000).prop_map(|(r, size)| Op::Resize { r, size }),
        1 => any::<usize>().prop_map(|r| Op::Destroy { r }),
        1 => Just(Op::Begin),
        1 => Just(Op::Commit),
        1 => Just(Op::Abandon),
        1 => (0u64..SPACE).prop_map(|addr| Op::Read { addr }),
        2 => (any::<usize>(), 0u64..0x2000, 0u64..5, prop::option::of(0u64..3), any::<bool>())
            .prop_map(|(r, addr, size, data, add)| Op::Notify { r, addr, size, data, add }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(r, create)| Op::Space { r, create }),
    ]
}

/// A listener that keeps a map of what it has been told and checks that the
/// event stream is consistent (no double add, deletes match adds, begin/commit
/// bracket every change).
#[derive(Default)]
struct MapListener {
    map: BTreeMap<u64, FlatRange>,
    notifiers: std::collections::BTreeSet<AsNotifier>,
    in_bracket: bool,
    errors: Vec<String>,
}

impl MemoryListener for MapListener {
    fn begin(&mut self, _cx: &ListenerCtx<'_>) {
        if self.in_bracket {
            self.errors.push("nested begin".into());
        }
        self.in_bracket = true;
    }
    fn commit(&mut self, _cx: &ListenerCtx<'_>) {
        if !self.in_bracket {
            self.errors.push("commit without begin".into());
        }
        self.in_bracket = false;
    }
    fn region_add(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        if !self.in_bracket {
            self.errors.push("add outside bracket".into());
        }
        let end = r.end();
        if self
            .map
            .values()
            .any(|o| (o.start as u128) < end && o.end() > r.start as u128)
        {
            self.errors.push(format!("add overlaps: {r:?}"));
        }
        self.map.insert(r.start, *r);
    }
    fn region_del(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        match self.map.remove(&r.start) {
            Some(o) if o.same_mapping(r) => {}
            other => self
                .errors
                .push(format!("del of unknown range {r:?}, had {other:?}")),
        }
    }
    fn notifier_add(&mut self, _cx: &ListenerCtx<'_>, n: &AsNotifier) {
        if !self.notifiers.insert(*n) {
            self.errors.push(format!("double notifier add {n:?}"));
        }
    }
    fn notifier_del(&mut self, _cx: &ListenerCtx<'_>, n: &AsNotifier) {
        if !self.notifiers.remove(n) {
            self.errors.push(format!("del of unknown notifier {n:?}"));
        }
    }
    fn region_nop(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        match self.map.get_mut(&r.start) {
            Some(o) if o.same_mapping(r) => *o = *r,
            other => self
                .errors
                .push(format!("nop of unknown range {r:?}, had {other:?}")),
        }
    }
}

struct World {
    m: MemorySystem,
    root: RegionId,
    sp: AddressSpaceId,
    ids: Vec<RegionId>,
    listener: Rc<RefCell<MapListener>>,
    snapshots: Vec<(String, usize, Vec<FlatRange>)>,
    /// Independent record of insertion order: (priority, sequence) of each
    /// attached region, as the test saw it happen.
    seq: BTreeMap<RegionId, (i32, u64)>,
    seq_stack: Vec<BTreeMap<RegionId, (i32, u64)>>,
    counter: u64,
    /// Further address spaces and their roots (views shared by flat-view
    /// root, re-rendered only when marked).
    extra: Vec<(AddressSpaceId, RegionId)>,
}

fn pick(ids: &[RegionId], i: usize) -> Option<RegionId> {
    (!ids.is_empty()).then(|| ids[i % ids.len()])
}

impl World {
    fn new(policy: ReadPolicy) -> World {
        let mut m = MemorySystem::new();
        m.set_read_policy(policy);
        let root = m.create_container("root", SPACE as u128).unwrap();
        let sp = m.create_address_space("as", root).unwrap();
        let listener = Rc::new(RefCell::new(MapListener::default()));
        m.add_listener(sp, 0, listener.clone()).unwrap();
        World {
            m,
            root,
            sp,
            ids: vec![root],
            listener,
            snapshots: Vec::new(),
            seq: BTreeMap::new(),
            seq_stack: Vec::new(),
            counter: 0,
            extra: Vec::new(),
        }
    }

    fn snapshot(&mut self) -> (String, usize, Vec<FlatRange>) {
        let tree = mtree::format_tree(&self.m, true).unwrap();
        let view = self.m.render_region(self.root).unwrap().ranges().to_vec();
        (tree, self.m.region_count(), view)
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let ids = self.ids.clone();
        let m = &mut self.m;
        // Errors are legitimate outcomes of random input; panics are not.
        match *op {
            Op::Create {
                kind,
                size,
                target,
                offset,
            } => {
                let k = match kind {
                    0 => RegionKind::Container,
                    1 | 2 => RegionKind::Ram(RamBacking {
                        block: ids.len() as u32,
                        offset: 0,
                    }),
                    3 => RegionKind::Mmio(MmioHandle(ids.len() as u32)),
                    4 => RegionKind::Rom(RamBacking {
                        block: ids.len() as u32,
                        offset: 0,
                    }),
                    _ => match pick(&ids, target) {
                        Some(t) => RegionKind::Alias { target: t, offset },
                        None => RegionKind::Container,
                    },
                };
                if let Ok(id) = m.create_region(&format!("r{}", ids.len()), size as u128, k) {
                    self.ids.push(id);
                }
            }
            Op::Attach {
                parent,
                child,
                addr,
                prio,
            } => {
                // Bias towards visible trees: half the time into the root,
                // and the child is one of the most recently created regions.
                let p = if parent % 2 == 0 {
                    Some(self.root)
                } else {
                    pick(&ids, parent / 2)
                };
                let c = ids[ids.len() - 1 - child % ids.len().min(4)];
                if let Some(p) = p.filter(|_| c != self.root) {
                    if m.add_subregion_overlap(p, addr, c, prio).is_ok() {
                        self.counter += 1;
                        self.seq.insert(c, (prio, self.counter));
                    }
                }
            }
            Op::Detach { child } => {
                if let Some(c) = pick(&ids, child) {
                    if let Ok(Some(p)) = m.region(c).map(|i| i.parent) {
                        m.del_subregion(p, c)
                            .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
                    }
                }
            }
            Op::Enable { r, on } => {
                // Disabling the root hides everything; do it rarely.
                let r =
                    pick(&ids, r).filter(|&r| on || r != self.root || ids.len().is_multiple_of(8));
                let _ = r.map(|r| m.set_enabled(r, on));
            }
            Op::Readonly { r, on } => {
                let _ = pick(&ids, r).map(|r| m.set_readonly(r, on));
            }
            Op::Move { r, addr } => {
                if let Some(r) = pick(&ids, r) {
                    let before = m.region(r).map(|i| (i.parent, i.addr));
                    if m.set_address(r, addr).is_ok() {
                        if let Ok((Some(_), old)) = before {
                            if old != addr {
                                // QEMU re-adds a moved region: newest of its priority.
                                self.counter += 1;
                                let prio = self.seq.get(&r).map_or(0, |s| s.0);
                                self.seq.insert(r, (prio, self.counter));
                            }
                        }
                    }
                }
            }
            Op::AliasOffset { r, offset } => {
                let _ = pick(&ids, r).map(|r| m.set_alias_offset(r, offset));
            }
            Op::Resize { r, size } => {
                if let Some(r) = pick(&ids, r).filter(|&r| r != self.root) {
                    let _ = m.set_size(r, size as u128);
                }
            }
            Op::Destroy { r } => {
                let _ = pick(&ids, r).map(|r| m.destroy_region(r));
            }
            Op::Begin => {
                let snap = self.snapshot();
                self.snapshots.push(snap);
                self.seq_stack.push(self.seq.clone());
                self.m.begin();
            }
            Op::Commit => {
                if self.m.commit().is_ok() {
                    self.snapshots.pop();
                    self.seq_stack.pop();
                }
            }
            Op::Abandon => {
                if self.m.abandon().is_ok() {
                    self.seq = self.seq_stack.pop().unwrap();
                    let before = self.snapshots.pop().unwrap();
                    let after = self.snapshot();
                    prop_assert_eq!(&before.0, &after.0, "abandon must restore the tree");
                    prop_assert_eq!(before.1, after.1, "abandon must restore the arena");
                    prop_assert_eq!(&before.2, &after.2, "abandon must restore the view");
                }
            }
            Op::Notify {
                r,
                addr,
                size,
                data,
                add,
            } => {
                if let Some(r) = pick(&ids, r) {
                    let n = WriteNotifier {
                        addr,
                        size,
                        data,
                        token: r.index() as u64,
                    };
                    let _ = if add {
                        self.m.add_write_notifier(r, n)
                    } else {
                        self.m.del_write_notifier(r, n)
                    };
                }
            }
            Op::Space { r, create } => {
                if create {
                    if let Some(root) = pick(&ids, r) {
                        if let Ok(sp) = self.m.create_address_space("extra", root) {
                            self.extra.push((sp, root));
                        }
                    }
                } else if !self.extra.is_empty() {
                    let i = r % self.extra.len();
                    if self.m.destroy_address_space(self.extra[i].0).is_ok() {
                        self.extra.remove(i);
                    }
                }
            }
            Op::Read { addr } => {
                // On-demand views equal a full render of the tree as it is now.
                let now = self.m.flat_view(self.sp).unwrap();
                let full = self.m.render_region(self.root).unwrap();
                prop_assert_eq!(now.ranges(), full.ranges());
                for &(sp, root) in &self.extra {
                    let now = self.m.flat_view(sp).unwrap();
                    let full = self.m.render_region(root).unwrap();
                    prop_assert_eq!(now.ranges(), full.ranges(), "extra space");
                }
                // Reads mid-transaction see the tree as it is now.
                let t = self.m.translate(self.sp, addr).unwrap();
                let want = self.m.resolve_slow(self.root, addr).unwrap();
                prop_assert_eq!(
                    t.map(|t| (t.region, t.offset, t.readonly)),
                    want.map(|h| (h.region, h.offset, h.readonly))
                );
                let got = self.m.lookup(self.sp, addr).unwrap();
                let want = self.m.resolve_slow(self.root, addr).unwrap();
                prop_assert_eq!(
                    got.map(|l| (l.region, l.offset, l.readonly)),
                    want.map(|h| (h.region, h.offset, h.readonly))
                );
            }
        }
        Ok(())
    }

    /// Subregion lists are ordered as QEMU orders them: priority descending,
    /// most recently added first (checked against the test's own record).
    fn check_order(&self) -> Result<(), TestCaseError> {
        for id in self.m.regions() {
            let subs = self.m.subregions(id).unwrap();
            let keys: Vec<(i32, u64)> = subs.iter().map(|s| self.seq[s]).collect();
            for w in keys.windows(2) {
                prop_assert!(w[0] > w[1], "subregion order of {:?}: {:?}", id, keys);
            }
        }
        Ok(())
    }

    /// The current view against the model resolver and the invariants.
    fn check_view(&mut self) -> Result<(), TestCaseError> {
        self.check_order()?;
        let view = self.m.flat_view(self.sp).unwrap();
        let r = view.ranges();
        for w in r.windows(2) {
            prop_assert!(w[0].end() <= w[1].start as u128, "sorted and disjoint");
            let mergeable = w[0].end() == w[1].start as u128
                && w[0].region == w[1].region
                && w[0].offset_in_region as u128 + w[0].size == w[1].offset_in_region as u128
                && w[0].readonly == w[1].readonly
                && w[0].romd_mode == w[1].romd_mode
                && w[0].dirty_log_mask == w[1].dirty_log_mask;
            prop_assert!(!mergeable, "simplified: {:?} {:?}", w[0], w[1]);
        }
        let mut points: Vec<u64> = (0..SPACE).step_by(0x80).collect();
        for fr in r {
            points.push(fr.start);
            points.push((fr.end() - 1) as u64);
            points.push(fr.end() as u64);
        }
        for &a in &points {
            let got = view
                .lookup(a)
                .map(|fr| (fr.region, fr.offset_in_region + (a - fr.start), fr.readonly));
            let want = self
                .m
                .resolve_slow(self.root, a)
                .unwrap()
                .map(|h| (h.region, h.offset, h.readonly));
            prop_assert_eq!(got, want, "address {:#x}", a);
        }
        Ok(())
    }

    /// Outside transactions the listener's map equals the committed view.
    fn check_listener(&mut self) -> Result<(), TestCaseError> {
        let l = self.listener.borrow();
        prop_assert!(l.errors.is_empty(), "{:?}", l.errors);
        let committed = self.m.committed_view(self.sp).unwrap();
        // Incremental (windowed) renders must equal a full render exactly.
        let full = self.m.render_region(self.root).unwrap();
        prop_assert_eq!(committed.ranges(), full.ranges());
        let mine: Vec<FlatRange> = l.map.values().copied().collect();
        prop_assert_eq!(&mine[..], committed.ranges());
        for &(sp, root) in &self.extra {
            let committed = self.m.committed_view(sp).unwrap();
            let full = self.m.render_region(root).unwrap();
            prop_assert_eq!(committed.ranges(), full.ranges(), "extra space");
        }
        let notifiers = self.m.committed_notifiers(self.sp).unwrap();
        let mine: Vec<AsNotifier> = l.notifiers.iter().copied().collect();
        prop_assert_eq!(&mine[..], &notifiers[..]);
        Ok(())
    }

    /// Each committed notifier lies (at least partly) on a piece of its
    /// region at the right offset, and the fast path finds a match for it.
    fn check_notifiers(&mut self) -> Result<(), TestCaseError> {
        let notifiers = self.m.committed_notifiers(self.sp).unwrap();
        let view = self.m.committed_view(self.sp).unwrap();
        for n in notifiers.iter() {
            let info = self.m.region(n.region).unwrap();
            let on_region = view.ranges().iter().any(|fr| {
                fr.region == n.region
                    && info.notifiers.iter().any(|wn| {
                        let s = fr.start as i128 - fr.offset_in_region as i128 + wn.addr as i128;
                        s == n.start as i128
                            && wn.size == n.size
                            && wn.data == n.data
                            && (s + wn.size.max(1) as i128) > fr.start as i128
                            && s < fr.end() as i128
                    })
            });
            prop_assert!(on_region, "notifier {:?} not on its region", n);
            let hit = self
                .m
                .find_write_notifier(self.sp, n.start, n.size, n.data.unwrap_or(0))
                .unwrap();
            prop_assert!(
                hit.is_some_and(|h| h.start == n.start),
                "fast path misses {:?}",
                n
            );
        }
        // Completeness: every notifier of a region, shifted onto each flat
        // range of that region it intersects, is in the committed list.
        for fr in view.ranges() {
            let info = self.m.region(fr.region).unwrap();
            for wn in &info.notifiers {
                let s = fr.start as i128 - fr.offset_in_region as i128 + wn.addr as i128;
                let e = s + wn.size as i128;
                let (fs, fe) = (fr.start as i128, fr.end() as i128);
                let hits = (s >= fs && s < fe) || (fs >= s && fs < e);
                if hits && s >= 0 {
                    let want = AsNotifier {
                        start: s as u64,
                        size: wn.size,
                        data: wn.data,
                        token: wn.token,
                        region: fr.region,
                    };
                    prop_assert!(notifiers.contains(&want), "missing notifier {:?}", want);
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_match_the_model(ops in prop::collection::vec(op(), 1..120), force in any::<bool>()) {
        let policy = if force { ReadPolicy::ForceCommit } else { ReadPolicy::RenderOnDemand };
        let mut w = World::new(policy);
        for op in &ops {
            w.apply(op)?;
            if w.m.transaction_depth() == 0 {
                w.check_listener()?;
            }
        }
        w.check_view()?;
        while w.m.transaction_depth() > 0 {
            w.m.commit().unwrap();
        }
        w.check_view()?;
        w.check_listener()?;
        w.check_notifiers()?;
        // A late listener is replayed exactly the committed view.
        let late = Rc::new(RefCell::new(MapListener::default()));
        w.m.add_listener(w.sp, 5, late.clone()).unwrap();
        let committed = w.m.committed_view(w.sp).unwrap();
        prop_assert_eq!(&late.borrow().map.values().copied().collect::<Vec<_>>()[..], committed.ranges());
        let notifiers = w.m.committed_notifiers(w.sp).unwrap();
        prop_assert_eq!(&late.borrow().notifiers.iter().copied().collect::<Vec<_>>()[..], &notifiers[..]);
    }

    #[test]
    fn transactions_notify_once_and_abandon_is_silent(ops in prop::collection::vec(op(), 1..40)) {
        // One address space: "at most one render" below counts its renders.
        let ops: Vec<Op> = ops.into_iter().filter(|o| !matches!(o, Op::Space { .. })).collect();
        let mut w = World::new(ReadPolicy::RenderOnDemand);
        // Build something first, outside transactions.
        for op in ops.iter().filter(|o| !matches!(o, Op::Begin | Op::Commit | Op::Abandon)) {
            w.apply(op)?;
        }
        w.check_listener()?;
        let s0 = w.m.stats();
        let before = w.snapshot();
        w.apply(&Op::Begin)?;
        for op in ops.iter().filter(|o| !matches!(o, Op::Begin | Op::Commit | Op::Abandon)) {
            w.apply(op)?;
        }
        prop_assert_eq!(w.m.transaction_depth(), 1);
        w.apply(&Op::Abandon)?;
        prop_assert_eq!(w.m.stats().listener_commits, s0.listener_commits, "abandon reaches no listener");
        prop_assert_eq!(w.snapshot().0, before.0);
        w.check_listener()?;
        // The same mutations committed in one transaction: at most one
        // bracket and at most one render.
        let s1 = w.m.stats();
        w.apply(&Op::Begin)?;
        for op in ops.iter().filter(|o| !matches!(o, Op::Begin | Op::Commit | Op::Abandon | Op::Read { .. })) {
            w.apply(op)?;
        }
        w.apply(&Op::Commit)?;
        let s2 = w.m.stats();
        prop_assert!(s2.listener_commits - s1.listener_commits <= 1);
        prop_assert!(s2.renders - s1.renders <= 1);
        w.check_view()?;
        w.check_listener()?;
    }
}

fn tree_line() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("address-space: a".to_string()),
        Just("memory-region: r".to_string()),
        Just(String::new()),
        Just("  0000000000000000-000000000000ffff (prio 0, container): r".to_string()),
        Just("    0000000000001000-0000000000001fff (prio -1, ram): x [disabled]".to_string()),
        Just("    0000000000000000-0000000000000fff (prio 2, rom): alias y @r 0000000000000010-000000000000100f".to_string()),
        Just("      0000000000000000-0000000000000fff (prio 0, i/o): alias z @nowhere 0-f".to_string()),
        "[ -~]{0,40}",
        ("[ ]{0,6}", "[0-9a-f]{1,17}", "-", "[0-9a-f]{1,17}", " \\(prio -?[0-9]{1,3}, (ram|rom|i/o|container|romd|ramd|bogus)\\): ", "[a-z@ ]{0,12}")
            .prop_map(|(a, b, c, d, e, f)| format!("{a}{b}{c}{d}{e}{f}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Parsers return errors, never panic, on arbitrary input.
    #[test]
    fn parsers_never_panic(lines in prop::collection::vec(tree_line(), 0..12)) {
        let text = lines.join("\n");
        if let Ok(mut p) = mtree::parse_tree(&text) {
            let _ = mtree::format_flat(&mut p.mem);
            let _ = mtree::format_tree(&p.mem, true);
        }
        let _ = mtree::parse_flat(&text);
    }

    /// Printing a random tree, parsing it and printing again is a fixed
    /// point (the format loses the relative order of overlapping
    /// equal-priority siblings and read-only on non-RAM regions, so the first
    /// print is compared with the second, not the trees).
    #[test]
    fn tree_text_roundtrip(ops in prop::collection::vec(op(), 1..80)) {
        let mut w = World::new(ReadPolicy::RenderOnDemand);
        for op in ops.iter().filter(|o| !matches!(o, Op::Begin | Op::Commit | Op::Abandon)) {
            w.apply(op)?;
        }
        let t1 = mtree::format_tree(&w.m, true).unwrap();
        let p = mtree::parse_tree(&t1).map_err(|e| TestCaseError::fail(format!("{e}\n{t1}")))?;
        let t2 = mtree::format_tree(&p.mem, true).unwrap();
        prop_assert_eq!(&t1, &t2);
        // And the reparsed system renders like its own printout says.
        let mut p2 = mtree::parse_tree(&t2).unwrap();
        let mut p1 = p;
        prop_assert_eq!(mtree::format_flat(&mut p1.mem).unwrap(), mtree::format_flat(&mut p2.mem).unwrap());
    }
}
