//! Behavioural tests of the memory API: overlap semantics, errors, listeners,
//! transactions, read policies, abandon, write notifiers.

use hv_core::memory::{
    AsNotifier, FlatRange, ListenerCtx, MemoryError, MemoryListener, MemorySystem, MmioHandle,
    RamBacking, ReadPolicy, RegionId, WriteNotifier,
};
use std::cell::RefCell;
use std::rc::Rc;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Ev {
    Begin,
    Commit,
    Add(u64, u128, u64),
    Del(u64, u128, u64),
    Nop(u64, u128, u64),
    LogStart(u64, u8, u8),
    LogStop(u64, u8, u8),
    NAdd(u64, u64, Option<u64>),
    NDel(u64, u64, Option<u64>),
}

#[derive(Default)]
struct Rec {
    tag: &'static str,
    log: Rc<RefCell<Vec<(&'static str, Ev)>>>,
    /// Snapshot of the committed view seen from inside `commit`.
    seen_at_commit: Vec<(u64, u128)>,
}

impl Rec {
    fn push(&self, e: Ev) {
        self.log.borrow_mut().push((self.tag, e));
    }
}

impl MemoryListener for Rec {
    fn begin(&mut self, _cx: &ListenerCtx<'_>) {
        self.push(Ev::Begin);
    }
    fn commit(&mut self, cx: &ListenerCtx<'_>) {
        self.push(Ev::Commit);
        let v = cx.mem.committed_view(cx.space).unwrap();
        self.seen_at_commit = v.ranges().iter().map(|r| (r.start, r.size)).collect();
    }
    fn region_add(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        self.push(Ev::Add(r.start, r.size, r.offset_in_region));
    }
    fn region_del(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        self.push(Ev::Del(r.start, r.size, r.offset_in_region));
    }
    fn region_nop(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        self.push(Ev::Nop(r.start, r.size, r.offset_in_region));
    }
    fn log_start(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange, o: u8, n: u8) {
        self.push(Ev::LogStart(r.start, o, n));
    }
    fn log_stop(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange, o: u8, n: u8) {
        self.push(Ev::LogStop(r.start, o, n));
    }
    fn notifier_add(&mut self, _cx: &ListenerCtx<'_>, n: &AsNotifier) {
        self.push(Ev::NAdd(n.start, n.size, n.data));
    }
    fn notifier_del(&mut self, _cx: &ListenerCtx<'_>, n: &AsNotifier) {
        self.push(Ev::NDel(n.start, n.size, n.data));
    }
}

fn ram(block: u32) -> RamBacking {
    RamBacking { block, offset: 0 }
}

/// (start, size, region name, offset, readonly) of the current view.
fn view(
    m: &mut MemorySystem,
    sp: hv_core::memory::AddressSpaceId,
) -> Vec<(u64, u128, String, u64, bool)> {
    let v = m.flat_view(sp).unwrap();
    v.ranges()
        .iter()
        .map(|r| {
            (
                r.start,
                r.size,
                m.region_name(r.region).unwrap().to_string(),
                r.offset_in_region,
                r.readonly,
            )
        })
        .collect()
}

fn system() -> (MemorySystem, RegionId, hv_core::memory::AddressSpaceId) {
    let mut m = MemorySystem::new();
    let root = m.create_container("root", 1 << 32).unwrap();
    let sp = m.create_address_space("mem", root).unwrap();
    (m, root, sp)
}

#[test]
fn priorities_and_equal_priority_last_added_wins() {
    let (mut m, root, sp) = system();
    let a = m.create_ram("a", 0x3000, ram(1)).unwrap();
    let b = m.create_ram("b", 0x1000, ram(2)).unwrap();
    let c = m.create_ram("c", 0x1000, ram(3)).unwrap();
    m.add_subregion(root, 0x1000, a).unwrap();
    m.add_subregion(root, 0x2000, b).unwrap(); // same priority, added later: wins
    m.add_subregion_overlap(root, 0x3000, c, -1).unwrap(); // lower priority: hidden
    assert_eq!(
        view(&mut m, sp),
        vec![
            (0x1000, 0x1000, "a".into(), 0, false),
            (0x2000, 0x1000, "b".into(), 0, false),
            (0x3000, 0x1000, "a".into(), 0x2000, false),
        ]
    );
    // Moving `a` re-adds it: now it is the last added and covers b.
    m.set_address(a, 0x1000).unwrap(); // unchanged: no-op
    m.set_address(a, 0x1800).unwrap();
    assert_eq!(
        view(&mut m, sp),
        vec![(0x1800, 0x3000, "a".into(), 0, false),]
    );
}

#[test]
fn holes_show_lower_siblings_and_terminal_containers_fall_back() {
    let (mut m, root, sp) = system();
    let low = m.create_ram("low", 0x4000, ram(1)).unwrap();
    let hi = m.create_container("hi", 0x4000).unwrap();
    let dev = m.create_mmio("dev", 0x1000, MmioHandle(7)).unwrap();
    m.add_subregion(hi, 0x1000, dev).unwrap();
    m.add_subregion_overlap(root, 0, low, 0).unwrap();
    m.add_subregion_overlap(root, 0, hi, 5).unwrap();
    assert_eq!(
        view(&mut m, sp),
        vec![
            (0, 0x1000, "low".into(), 0, false),
            (0x1000, 0x1000, "dev".into(), 0, false),
            (0x2000, 0x2000, "low".into(), 0x2000, false),
        ]
    );
    // An MMIO region with subregions renders itself around them.
    let io = m.create_mmio("io", 0x100, MmioHandle(1)).unwrap();
    let port = m.create_mmio("port", 0x10, MmioHandle(2)).unwrap();
    m.add_subregion(io, 0x20, port).unwrap();
    let ioroot = m.create_container("ioroot", 0x100).unwrap();
    m.add_subregion(ioroot, 0, io).unwrap();
    let ios = m.create_address_space("io", ioroot).unwrap();
    assert_eq!(
        view(&mut m, ios),
        vec![
            (0, 0x20, "io".into(), 0, false),
            (0x20, 0x10, "port".into(), 0, false),
            (0x30, 0xd0, "io".into(), 0x30, false),
        ]
    );
}

#[test]
fn aliases_offsets_readonly_and_lookup() {
    let (mut m, root, sp) = system();
    let backing = m.create_ram("ram", 0x10000, ram(1)).unwrap();
    let a1 = m.create_alias("lo", 0x2000, backing, 0x4000).unwrap();
    let a2 = m.create_alias("lo-of-lo", 0x1000, a1, 0x1000).unwrap();
    m.set_readonly(a2, true).unwrap();
    m.add_subregion(root, 0x10000, a1).unwrap();
    m.add_subregion(root, 0x20000, a2).unwrap();
    assert_eq!(
        view(&mut m, sp),
        vec![
            (0x10000, 0x2000, "ram".into(), 0x4000, false),
            (0x20000, 0x1000, "ram".into(), 0x5000, true),
        ]
    );
    let l = m.lookup(sp, 0x20010).unwrap().unwrap();
    assert_eq!((l.region, l.offset, l.readonly), (backing, 0x5010, true));
    assert!(m.lookup(sp, 0x30000).unwrap().is_none());
    // A RAM range carries its backing for the EPT listener.
    match l.range.target {
        hv_core::memory::RangeTarget::Ram(b) => assert_eq!(b, ram(1)),
        other => panic!("{other:?}"),
    }
    m.set_alias_offset(a1, 0x8000).unwrap();
    assert_eq!(view(&mut m, sp)[0].3, 0x8000);
}

#[test]
fn bad_input_is_an_error() {
    let (mut m, root, _sp) = system();
    let r = m.create_ram("r", 0x1000, ram(1)).unwrap();
    let al = m.create_alias("al", 0x1000, r, 0).unwrap();
    assert_eq!(
        m.add_subregion(al, 0, r),
        Err(MemoryError::SubregionOfAlias(al))
    );
    m.add_subregion(root, 0, r).unwrap();
    assert_eq!(
        m.add_subregion(root, 0, r),
        Err(MemoryError::AlreadyMapped(r))
    );
    assert_eq!(
        m.create_container("huge", (1 << 64) + 1),
        Err(MemoryError::InvalidSize((1 << 64) + 1))
    );
    // Alias cycle: a container containing an alias of itself.
    let c = m.create_container("c", 0x1000).unwrap();
    let ac = m.create_alias("ac", 0x1000, c, 0).unwrap();
    assert_eq!(m.add_subregion(c, 0, ac), Err(MemoryError::Cycle));
    // Tree cycle.
    let d = m.create_container("d", 0x1000).unwrap();
    m.add_subregion(c, 0, d).unwrap();
    assert_eq!(m.add_subregion(d, 0, c), Err(MemoryError::Cycle));
    let e = m.create_container("e", 0x1000).unwrap();
    assert_eq!(m.add_subregion(e, 0, e), Err(MemoryError::Cycle));
    // In use: alias target and address-space root.
    assert_eq!(m.destroy_region(r), Err(MemoryError::InUse(r)));
    assert_eq!(m.destroy_region(root), Err(MemoryError::InUse(root)));
    assert_eq!(
        m.del_subregion(c, r),
        Err(MemoryError::NotASubregion {
            parent: c,
            child: r
        })
    );
    assert_eq!(m.set_romd(r, false), Err(MemoryError::WrongKind(r)));
    assert_eq!(m.commit(), Err(MemoryError::NoTransaction));
    assert_eq!(m.abandon(), Err(MemoryError::NoTransaction));
    // Stale handles after destroy; slot reuse gets a new generation.
    m.destroy_region(al).unwrap();
    assert_eq!(m.destroy_region(c), Err(MemoryError::InUse(c))); // ac targets c
    m.destroy_region(ac).unwrap();
    m.destroy_region(c).unwrap(); // frees c and d
    assert_eq!(m.set_enabled(d, false), Err(MemoryError::StaleRegion(d)));
    assert_eq!(m.region(ac).map(|_| ()), Err(MemoryError::StaleRegion(ac)));
    let n = m.create_container("n", 1).unwrap();
    assert!(n != c && n != d && n != ac);
    assert!(m.contains(n) && !m.contains(c));
    m.destroy_region(r).unwrap(); // no longer aliased: ok, detached from root
    assert!(m.subregions(root).unwrap().is_empty());
}

#[test]
fn listener_replay_order_and_priorities() {
    let (mut m, root, sp) = system();
    let a = m.create_ram("a", 0x1000, ram(1)).unwrap();
    let b = m.create_ram("b", 0x1000, ram(2)).unwrap();
    m.add_subregion(root, 0, a).unwrap();
    m.add_subregion(root, 0x2000, b).unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    let hi = Rc::new(RefCell::new(Rec {
        tag: "hi",
        log: log.clone(),
        ..Rec::default()
    }));
    let lo = Rc::new(RefCell::new(Rec {
        tag: "lo",
        log: log.clone(),
        ..Rec::default()
    }));
    m.add_listener(sp, 10, hi.clone()).unwrap();
    m.add_listener(sp, 1, lo.clone()).unwrap();
    assert_eq!(
        log.borrow()
            .iter()
            .filter(|(t, _)| *t == "hi")
            .map(|(_, e)| e.clone())
            .collect::<Vec<_>>(),
        vec![
            Ev::Begin,
            Ev::Add(0, 0x1000, 0),
            Ev::Add(0x2000, 0x1000, 0),
            Ev::Commit
        ]
    );
    log.borrow_mut().clear();
    // Replace `a` by `c` and change b's dirty logging, in one transaction.
    let c = m.create_ram("c", 0x1000, ram(3)).unwrap();
    m.begin();
    m.del_subregion(root, a).unwrap();
    m.add_subregion(root, 0x1000, c).unwrap();
    m.set_dirty_log_mask(b, 1).unwrap();
    m.commit().unwrap();
    let got: Vec<(&str, Ev)> = log.borrow().clone();
    assert_eq!(
        got,
        vec![
            ("lo", Ev::Begin),
            ("hi", Ev::Begin),
            // deletions: reverse priority order
            ("hi", Ev::Del(0, 0x1000, 0)),
            ("lo", Ev::Del(0, 0x1000, 0)),
            // additions and nops: forward
            ("lo", Ev::Add(0x1000, 0x1000, 0)),
            ("hi", Ev::Add(0x1000, 0x1000, 0)),
            ("lo", Ev::Nop(0x2000, 0x1000, 0)),
            ("hi", Ev::Nop(0x2000, 0x1000, 0)),
            ("lo", Ev::LogStart(0x2000, 0, 1)),
            ("hi", Ev::LogStart(0x2000, 0, 1)),
            ("lo", Ev::Commit),
            ("hi", Ev::Commit),
        ]
    );
    // The listener saw the new view from inside commit.
    assert_eq!(
        hi.borrow().seen_at_commit,
        vec![(0x1000, 0x1000), (0x2000, 0x1000)]
    );
    log.borrow_mut().clear();
    m.set_dirty_log_mask(b, 0).unwrap();
    assert!(log.borrow().contains(&("hi", Ev::LogStop(0x2000, 1, 0))));
    // Unregistering removes everything from that listener.
    log.borrow_mut().clear();
    let id = m
        .add_listener(
            sp,
            0,
            Rc::new(RefCell::new(Rec {
                tag: "x",
                log: log.clone(),
                ..Rec::default()
            })),
        )
        .unwrap();
    m.remove_listener(id).unwrap();
    let x: Vec<Ev> = log
        .borrow()
        .iter()
        .filter(|(t, _)| *t == "x")
        .map(|(_, e)| e.clone())
        .collect();
    assert_eq!(x.iter().filter(|e| matches!(e, Ev::Add(..))).count(), 2);
    assert_eq!(x.iter().filter(|e| matches!(e, Ev::Del(..))).count(), 2);
    assert!(m.remove_listener(id).is_err());
}

#[test]
fn transaction_renders_once_and_invisible_mutations_do_not_render() {
    let (mut m, root, sp) = system();
    let log = Rc::new(RefCell::new(Vec::new()));
    m.add_listener(
        sp,
        0,
        Rc::new(RefCell::new(Rec {
            tag: "l",
            log: log.clone(),
            ..Rec::default()
        })),
    )
    .unwrap();
    log.borrow_mut().clear();
    let regions: Vec<RegionId> = (0..10)
        .map(|i| m.create_ram(&format!("r{i}"), 0x1000, ram(i)).unwrap())
        .collect();
    let s0 = m.stats();
    m.begin();
    for (i, &r) in regions.iter().enumerate() {
        m.add_subregion(root, i as u64 * 0x1000, r).unwrap();
    }
    m.begin(); // nested
    m.set_readonly(regions[0], true).unwrap();
    m.commit().unwrap();
    assert_eq!(
        m.stats().renders,
        s0.renders,
        "nothing rendered before the outer commit"
    );
    m.commit().unwrap();
    let s1 = m.stats();
    assert_eq!(s1.renders - s0.renders, 1);
    assert_eq!(s1.listener_commits - s0.listener_commits, 1);
    assert_eq!(
        log.borrow().iter().filter(|(_, e)| *e == Ev::Begin).count(),
        1
    );
    // Only region 0 is readonly, so it cannot merge with region 1.
    assert_eq!(m.flat_view(sp).unwrap().ranges().len(), 10);
    // Mutating a disabled region (or an unmapped one) renders nothing.
    let hidden = m.create_container("hidden", 0x1000).unwrap();
    m.set_enabled(hidden, false).unwrap();
    let s2 = m.stats();
    m.set_readonly(hidden, true).unwrap();
    let spare = m.create_ram("spare", 0x1000, ram(99)).unwrap();
    m.add_subregion(hidden, 0, spare).unwrap();
    m.set_dirty_log_mask(spare, 3).unwrap();
    assert_eq!(m.stats().renders, s2.renders);
    assert_eq!(m.stats().mutations - s2.mutations, 4);
}

#[test]
fn reads_mid_transaction_render_on_demand_or_force_commit() {
    for policy in [ReadPolicy::RenderOnDemand, ReadPolicy::ForceCommit] {
        let (mut m, root, sp) = system();
        m.set_read_policy(policy);
        let log = Rc::new(RefCell::new(Vec::new()));
        m.add_listener(
            sp,
            0,
            Rc::new(RefCell::new(Rec {
                tag: "l",
                log: log.clone(),
                ..Rec::default()
            })),
        )
        .unwrap();
        log.borrow_mut().clear();
        let a = m.create_ram("a", 0x1000, ram(1)).unwrap();
        let b = m.create_ram("b", 0x1000, ram(2)).unwrap();
        let s0 = m.stats();
        m.begin();
        m.add_subregion(root, 0, a).unwrap();
        // The read sees the mutation; translate walks instead of rendering.
        let r0 = m.stats().renders;
        assert_eq!(
            m.translate(sp, 0x10).unwrap().map(|t| (t.region, t.offset)),
            Some((a, 0x10))
        );
        if policy == ReadPolicy::RenderOnDemand {
            assert_eq!(m.stats().renders, r0);
            assert_eq!(m.stats().walk_lookups, 1);
        }
        assert_eq!(m.lookup(sp, 0x10).unwrap().unwrap().region, a);
        assert_eq!(m.lookup(sp, 0x10).unwrap().unwrap().region, a); // cached
        m.add_subregion(root, 0x1000, b).unwrap();
        assert_eq!(m.lookup(sp, 0x1010).unwrap().unwrap().region, b);
        let mid = log.borrow().len();
        m.commit().unwrap();
        let s1 = m.stats();
        let begins = log.borrow().iter().filter(|(_, e)| *e == Ev::Begin).count();
        match policy {
            ReadPolicy::RenderOnDemand => {
                assert_eq!(mid, 0, "no listener call before the outer commit");
                assert_eq!(begins, 1);
                assert_eq!(s1.forced_commits - s0.forced_commits, 0);
                assert_eq!(s1.on_demand_renders - s0.on_demand_renders, 2);
                // The second on-demand render is reused by the commit.
                assert_eq!(s1.renders - s0.renders, 2);
            }
            ReadPolicy::ForceCommit => {
                assert!(mid > 0, "ForceCommit tells listeners early");
                assert_eq!(begins, 2);
                assert_eq!(s1.forced_commits - s0.forced_commits, 2);
            }
        }
        // Either way the listener ends up with the same final picture.
        let adds: Vec<Ev> = log
            .borrow()
            .iter()
            .map(|(_, e)| e.clone())
            .filter(|e| matches!(e, Ev::Add(..)))
            .collect();
        assert!(adds.contains(&Ev::Add(0x1000, 0x1000, 0)));
    }
}

#[test]
fn abandon_undoes_everything_and_listeners_see_nothing() {
    let (mut m, root, sp) = system();
    let keep = m.create_ram("keep", 0x2000, ram(1)).unwrap();
    let gone = m.create_container("gone", 0x1000).unwrap();
    let leaf = m.create_mmio("leaf", 0x100, MmioHandle(1)).unwrap();
    m.add_subregion(gone, 0, leaf).unwrap();
    m.add_subregion(root, 0, keep).unwrap();
    m.add_subregion_overlap(root, 0x1000, gone, 1).unwrap();
    let before = view(&mut m, sp);
    let tree_before = hv_core::memory::mtree::format_tree(&m, true).unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    m.add_listener(
        sp,
        0,
        Rc::new(RefCell::new(Rec {
            tag: "l",
            log: log.clone(),
            ..Rec::default()
        })),
    )
    .unwrap();
    log.borrow_mut().clear();
    let s0 = m.stats();

    m.begin();
    let fresh = m.create_ram("fresh", 0x1000, ram(2)).unwrap();
    m.add_subregion_overlap(root, 0x4000, fresh, 3).unwrap();
    m.set_readonly(keep, true).unwrap();
    m.destroy_region(gone).unwrap();
    m.set_address(keep, 0x8000).unwrap();
    m.add_write_notifier(
        leaf,
        WriteNotifier {
            addr: 0,
            size: 4,
            data: None,
            token: 1,
        },
    )
    .ok();
    assert_ne!(view(&mut m, sp), before); // mid-transaction read sees the changes
    m.abandon().unwrap();

    assert!(log.borrow().is_empty(), "{:?}", log.borrow());
    assert_eq!(view(&mut m, sp), before);
    assert_eq!(
        hv_core::memory::mtree::format_tree(&m, true).unwrap(),
        tree_before
    );
    assert!(!m.contains(fresh));
    assert!(m.contains(gone) && m.contains(leaf));
    assert_eq!(m.stats().listener_commits, s0.listener_commits);
    // Handles issued inside the abandoned transaction stay stale after reuse.
    let again = m.create_ram("again", 0x1000, ram(3)).unwrap();
    assert_ne!(again, fresh);
    assert!(!m.contains(fresh));

    // Nested: abandoning the inner level keeps the outer mutations.
    m.begin();
    m.set_enabled(gone, false).unwrap();
    m.begin();
    m.set_enabled(keep, false).unwrap();
    m.abandon().unwrap();
    m.commit().unwrap();
    assert!(!m.region(gone).unwrap().enabled);
    assert!(m.region(keep).unwrap().enabled);
    assert_eq!(
        log.borrow().iter().filter(|(_, e)| *e == Ev::Begin).count(),
        1
    );
}

#[test]
fn abandon_after_forced_commit_restores_listeners() {
    let (mut m, root, sp) = system();
    m.set_read_policy(ReadPolicy::ForceCommit);
    let a = m.create_ram("a", 0x1000, ram(1)).unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    m.add_listener(
        sp,
        0,
        Rc::new(RefCell::new(Rec {
            tag: "l",
            log: log.clone(),
            ..Rec::default()
        })),
    )
    .unwrap();
    log.borrow_mut().clear();
    m.begin();
    m.add_subregion(root, 0, a).unwrap();
    assert!(m.lookup(sp, 0).unwrap().is_some());
    m.abandon().unwrap();
    let evs: Vec<Ev> = log.borrow().iter().map(|(_, e)| e.clone()).collect();
    assert!(evs.contains(&Ev::Add(0, 0x1000, 0)) && evs.contains(&Ev::Del(0, 0x1000, 0)));
    assert!(m.committed_view(sp).unwrap().ranges().is_empty());
}

#[test]
fn listeners_cannot_mutate_during_commit() {
    // The kernel may keep the system in a RefCell; a listener that tries to
    // mutate through it during a commit gets an error, not recursion.
    struct Sneaky {
        mem: Rc<RefCell<MemorySystem>>,
        errors: usize,
    }
    impl MemoryListener for Sneaky {
        fn region_add(&mut self, _cx: &ListenerCtx<'_>, _r: &FlatRange) {
            match self.mem.try_borrow_mut() {
                Ok(mut m) => {
                    let _ = m.create_container("evil", 1);
                }
                Err(_) => self.errors += 1,
            }
        }
    }
    let mem = Rc::new(RefCell::new(MemorySystem::new()));
    let (root, sp) = {
        let mut m = mem.borrow_mut();
        let root = m.create_container("root", 0x10000).unwrap();
        (root, m.create_address_space("as", root).unwrap())
    };
    let sneaky = Rc::new(RefCell::new(Sneaky {
        mem: mem.clone(),
        errors: 0,
    }));
    mem.borrow_mut()
        .add_listener(sp, 0, sneaky.clone())
        .unwrap();
    let r = mem.borrow_mut().create_ram("r", 0x1000, ram(1)).unwrap();
    mem.borrow_mut().add_subregion(root, 0, r).unwrap();
    assert_eq!(sneaky.borrow().errors, 1);
    assert_eq!(mem.borrow().region_count(), 2);
}

#[test]
fn write_notifiers_are_diffed_and_found() {
    let (mut m, root, sp) = system();
    let dev = m.create_mmio("dev", 0x1000, MmioHandle(1)).unwrap();
    m.add_subregion(root, 0x10000, dev).unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    m.add_listener(
        sp,
        0,
        Rc::new(RefCell::new(Rec {
            tag: "l",
            log: log.clone(),
            ..Rec::default()
        })),
    )
    .unwrap();
    log.borrow_mut().clear();
    let n = WriteNotifier {
        addr: 0x40,
        size: 2,
        data: Some(7),
        token: 42,
    };
    m.add_write_notifier(dev, n).unwrap();
    assert_eq!(
        log.borrow().clone(),
        vec![("l", Ev::NAdd(0x10040, 2, Some(7)))]
    );
    assert_eq!(
        m.find_write_notifier(sp, 0x10040, 2, 7)
            .unwrap()
            .map(|n| n.token),
        Some(42)
    );
    assert_eq!(m.find_write_notifier(sp, 0x10040, 2, 8).unwrap(), None);
    assert_eq!(m.find_write_notifier(sp, 0x10040, 4, 7).unwrap(), None);
    assert_eq!(
        m.find_write_notifier(sp, 0x10040, 0, 0)
            .unwrap()
            .map(|n| n.token),
        Some(42)
    );
    log.borrow_mut().clear();
    m.set_address(dev, 0x20000).unwrap();
    let evs: Vec<Ev> = log.borrow().iter().map(|(_, e)| e.clone()).collect();
    assert!(evs.contains(&Ev::NDel(0x10040, 2, Some(7))));
    assert!(evs.contains(&Ev::NAdd(0x20040, 2, Some(7))));
    assert_eq!(m.find_write_notifier(sp, 0x10040, 2, 7).unwrap(), None);
    assert!(m.find_write_notifier(sp, 0x20040, 2, 7).unwrap().is_some());
    // A covering region hides the notifier.
    let cover = m.create_ram("cover", 0x1000, ram(1)).unwrap();
    m.add_subregion_overlap(root, 0x20000, cover, 1).unwrap();
    assert!(m.find_write_notifier(sp, 0x20040, 2, 7).unwrap().is_none());
    m.del_write_notifier(dev, n).unwrap();
    assert_eq!(
        m.del_write_notifier(dev, n),
        Err(MemoryError::NoSuchNotifier)
    );
    assert_eq!(
        m.add_write_notifier(cover, n),
        Err(MemoryError::WrongKind(cover))
    );
}

#[test]
fn address_spaces_with_the_same_root_share_a_view() {
    let (mut m, root, sp) = system();
    let r = m.create_ram("r", 0x1000, ram(1)).unwrap();
    m.add_subregion(root, 0, r).unwrap();
    let other = m.create_address_space("other", root).unwrap();
    // An alias of the whole root also shares (QEMU flatview root).
    let whole = m.create_alias("whole", 1 << 32, root, 0).unwrap();
    let third = m.create_address_space("third", whole).unwrap();
    let (v1, v2, v3) = (
        m.flat_view(sp).unwrap(),
        m.flat_view(other).unwrap(),
        m.flat_view(third).unwrap(),
    );
    assert!(Rc::ptr_eq(&v1, &v2) && Rc::ptr_eq(&v1, &v3));
    let s0 = m.stats();
    m.set_readonly(r, true).unwrap();
    assert_eq!(
        m.stats().renders - s0.renders,
        1,
        "one render for three spaces"
    );
    let (v1, v3) = (m.flat_view(sp).unwrap(), m.flat_view(third).unwrap());
    assert!(Rc::ptr_eq(&v1, &v3));
    assert!(v1.ranges()[0].readonly);
    // Destroying an address space is allowed, not during a transaction.
    m.begin();
    assert_eq!(
        m.destroy_address_space(other),
        Err(MemoryError::InTransaction)
    );
    m.commit().unwrap();
    m.destroy_address_space(other).unwrap();
    assert!(m.flat_view(other).is_err());
}

/// The shape the kernel will use: an EPT-like listener mapping RAM pages on
/// region_add/region_del, MMIO dispatch through lookup, and an incoming
/// migration that loads device state in one transaction, abandoned on error.
#[test]
fn ept_listener_and_migration_transaction() {
    use hv_core::memory::RangeTarget;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Ept {
        pages: BTreeMap<u64, (u32, u64, bool)>,
        brackets: usize,
    }
    impl MemoryListener for Ept {
        fn commit(&mut self, _cx: &ListenerCtx<'_>) {
            self.brackets += 1;
        }
        fn region_add(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
            if let RangeTarget::Ram(b) = r.target {
                for p in (0..r.size as u64).step_by(0x1000) {
                    let host = b.offset + r.offset_in_region + p;
                    self.pages
                        .insert((r.start + p) >> 12, (b.block, host, r.readonly));
                }
            }
        }
        fn region_del(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
            if let RangeTarget::Ram(_) = r.target {
                for p in (0..r.size as u64).step_by(0x1000) {
                    self.pages.remove(&((r.start + p) >> 12));
                }
            }
        }
    }

    let mut m = MemorySystem::new();
    let system = m.create_container("system", 1 << 64).unwrap();
    let sp = m.create_address_space("memory", system).unwrap();
    let ram = m
        .create_ram(
            "pc.ram",
            0x10_0000,
            RamBacking {
                block: 0,
                offset: 0,
            },
        )
        .unwrap();
    let below = m.create_alias("ram-below-4g", 0x10_0000, ram, 0).unwrap();
    m.add_subregion(system, 0, below).unwrap();
    let bios = m
        .create_rom(
            "pc.bios",
            0x4000,
            RamBacking {
                block: 1,
                offset: 0,
            },
        )
        .unwrap();
    m.add_subregion(system, 0xffff_c000, bios).unwrap();
    let pci = m.create_container("pci", 1 << 32).unwrap();
    m.add_subregion_overlap(system, 0, pci, -1).unwrap();
    let bar = m.create_mmio("bar0", 0x1000, MmioHandle(5)).unwrap();
    m.add_subregion_overlap(pci, 0xfeb0_0000, bar, 1).unwrap();
    let shadow = m.create_alias("shadow", 0x1000, ram, 0xf_0000).unwrap();
    m.set_readonly(shadow, true).unwrap();
    m.add_subregion_overlap(system, 0xf_0000, shadow, 1)
        .unwrap();

    let ept = Rc::new(RefCell::new(Ept::default()));
    m.add_listener(sp, 0, ept.clone()).unwrap();
    let check = |m: &mut MemorySystem, ept: &Ept| {
        let view = m.flat_view(sp).unwrap();
        let ram_pages: u64 = view
            .ranges()
            .iter()
            .filter(|r| matches!(r.target, RangeTarget::Ram(_)))
            .map(|r| (r.size as u64).div_ceil(0x1000))
            .sum();
        assert_eq!(ept.pages.len() as u64, ram_pages);
        for (&gfn, &(block, host, ro)) in &ept.pages {
            let l = m.lookup(sp, gfn << 12).unwrap().unwrap();
            assert_eq!(l.readonly, ro);
            match l.range.target {
                RangeTarget::Ram(b) => assert_eq!((b.block, b.offset + l.offset), (block, host)),
                other => panic!("{other:?}"),
            }
        }
    };
    check(&mut m, &ept.borrow());
    assert_eq!(ept.borrow().pages.len(), 0x100 + 4);
    assert!(
        ept.borrow().pages[&0xf0].2,
        "shadowed BIOS page is read-only"
    );
    // MMIO dispatch: the BAR is found with its handle and offset.
    let l = m.lookup(sp, 0xfeb0_0010).unwrap().unwrap();
    assert_eq!(
        (l.region, l.offset, l.range.target),
        (bar, 0x10, RangeTarget::Mmio(MmioHandle(5)))
    );

    // Incoming migration, first attempt fails half-way: abandon.
    let before = ept.borrow().pages.clone();
    let brackets = ept.borrow().brackets;
    m.begin();
    m.set_address(bar, 0xfeb1_0000).unwrap();
    m.set_enabled(shadow, false).unwrap();
    m.set_size(ram, 0x20_0000).unwrap();
    m.set_size(below, 0x20_0000).unwrap();
    // A device load reads guest memory mid-transaction: sees the new layout.
    assert!(m.lookup(sp, 0x18_0000).unwrap().is_some());
    m.abandon().unwrap(); // load error
    assert_eq!(ept.borrow().pages, before);
    assert_eq!(ept.borrow().brackets, brackets);
    assert!(m.lookup(sp, 0x18_0000).unwrap().is_none());
    // Second attempt succeeds: one bracket for all loads.
    m.begin();
    m.set_address(bar, 0xfeb1_0000).unwrap();
    m.set_enabled(shadow, false).unwrap();
    m.set_size(ram, 0x20_0000).unwrap();
    m.set_size(below, 0x20_0000).unwrap();
    m.commit().unwrap();
    assert_eq!(ept.borrow().brackets, brackets + 1);
    assert_eq!(ept.borrow().pages.len(), 0x200 + 4);
    assert!(!ept.borrow().pages[&0xf0].2);
    check(&mut m, &ept.borrow());
}

#[test]
fn rom_device_romd_and_reservation_types() {
    use hv_core::memory::{mtree, RangeTarget};
    let (mut m, root, sp) = system();
    let flash = m
        .create_rom_device("flash", 0x1000, ram(4), MmioHandle(9))
        .unwrap();
    let hole = m.create_reservation("hole", 0x1000).unwrap();
    let vram = m.create_ram_device("vram", 0x1000, ram(5)).unwrap();
    m.add_subregion(root, 0, flash).unwrap();
    m.add_subregion(root, 0x1000, hole).unwrap();
    m.add_subregion(root, 0x2000, vram).unwrap();
    let flat = mtree::format_flat(&mut m).unwrap();
    assert!(flat.contains("(prio 0, romd): flash"), "{flat}");
    assert!(flat.contains("(prio 0, i/o): hole"), "{flat}");
    assert!(flat.contains("(prio 0, ramd): vram"), "{flat}");
    let v1 = m.flat_view(sp).unwrap();
    assert!(v1.ranges()[0].romd_mode);
    m.set_romd(flash, false).unwrap();
    let v2 = m.flat_view(sp).unwrap();
    assert!(!v2.ranges()[0].romd_mode);
    assert!(mtree::format_flat(&mut m)
        .unwrap()
        .contains("(prio 0, i/o): flash"));
    assert_eq!(v2.ranges()[1].target, RangeTarget::Reservation);
    // Types survive a print/parse round trip (romd off prints as i/o).
    let text = mtree::format_tree(&m, true).unwrap();
    let p = mtree::parse_tree(&text).unwrap();
    assert_eq!(mtree::format_tree(&p.mem, true).unwrap(), text);
}

#[test]
fn partial_renders_follow_aliases_and_match_full_renders() {
    let (mut m, root, sp) = system();
    let target = m.create_container("target", 0x8000).unwrap();
    let child = m.create_ram("child", 0x1000, ram(1)).unwrap();
    m.add_subregion(target, 0x3000, child).unwrap();
    let window = m.create_alias("window", 0x2000, target, 0x2000).unwrap();
    m.add_subregion(root, 0x10000, window).unwrap();
    let filler = m.create_ram("filler", 0x10000, ram(2)).unwrap();
    m.add_subregion_overlap(root, 0x20000, filler, -1).unwrap();
    let s0 = m.stats();
    m.set_readonly(child, true).unwrap();
    let s1 = m.stats();
    assert_eq!(
        s1.partial_renders - s0.partial_renders,
        1,
        "re-rendered only the window"
    );
    let v = m.flat_view(sp).unwrap();
    assert_eq!(v.ranges(), m.render_region(root).unwrap().ranges());
    let l = m.lookup(sp, 0x11000).unwrap().unwrap();
    assert_eq!((l.region, l.offset, l.readonly), (child, 0, true));
    // Moving the target's child out of the alias window and back.
    m.set_address(child, 0x6000).unwrap();
    assert!(m.lookup(sp, 0x11000).unwrap().is_none());
    m.set_address(child, 0x2800).unwrap();
    assert_eq!(m.lookup(sp, 0x10800).unwrap().unwrap().region, child);
    assert_eq!(
        m.flat_view(sp).unwrap().ranges(),
        m.render_region(root).unwrap().ranges()
    );
    // Resizing the alias and changing its offset.
    m.set_size(window, 0x4000).unwrap();
    m.set_alias_offset(window, 0x1000).unwrap();
    assert_eq!(m.lookup(sp, 0x11800).unwrap().unwrap().region, child);
    assert_eq!(
        m.flat_view(sp).unwrap().ranges(),
        m.render_region(root).unwrap().ranges()
    );
    assert!(m.stats().partial_renders > s1.partial_renders);
}

/// Address-space creation finds a view to share through an index of flat-view
/// roots (not a scan of every space): 2,000 spaces over 8 distinct flat-view
/// roots render 8 views, every space shares the view of its root, the index
/// follows roots that change at a commit and slots that are reused.
#[test]
fn many_address_spaces_share_views_by_flat_view_root() {
    let mut m = MemorySystem::new();
    // Eight containers with different contents (two children each, so each
    // container is its own flat-view root).
    let mut roots = Vec::new();
    for k in 0..8u32 {
        let c = m.create_container(&format!("c{k}"), 1 << 32).unwrap();
        let a = m
            .create_mmio(&format!("a{k}"), 0x1000, MmioHandle(k))
            .unwrap();
        let b = m.create_ram(&format!("b{k}"), 0x1000, ram(k)).unwrap();
        m.add_subregion(c, u64::from(k) * 0x1000, a).unwrap();
        m.add_subregion(c, 0x10_0000, b).unwrap();
        roots.push((c, b));
    }
    // Whole-container aliases: skipped by the flat-view root, so spaces with
    // these roots share the container's view.
    let aliases: Vec<RegionId> = roots
        .iter()
        .enumerate()
        .map(|(k, &(c, _))| m.create_alias(&format!("al{k}"), 1 << 32, c, 0).unwrap())
        .collect();
    let renders = m.stats().renders;
    let mut spaces = Vec::new();
    for i in 0..2_000usize {
        let k = i % 8;
        let root = if i % 3 == 0 { aliases[k] } else { roots[k].0 };
        let id = m.create_address_space(&format!("as{i}"), root).unwrap();
        spaces.push((k, id));
    }
    assert_eq!(
        m.stats().renders - renders,
        8,
        "one render per flat-view root"
    );
    let firsts: Vec<_> = (0..8)
        .map(|k| m.committed_view(spaces[k].1).unwrap())
        .collect();
    for &(k, id) in &spaces {
        let v = m.committed_view(id).unwrap();
        for (j, f) in firsts.iter().enumerate() {
            assert_eq!(Rc::ptr_eq(&v, f), j == k, "space {id:?} root {k} vs {j}");
        }
    }
    // Root 1 changes at a commit so that its flat-view root becomes `b1`
    // (its only child, moved to 0 and grown to the container's size): the
    // spaces of root 1 now carry a view rooted at `b1`.
    let (c1, b1) = roots[1];
    m.begin();
    let subs = m.subregions(c1).unwrap();
    for s in subs {
        m.del_subregion(c1, s).unwrap();
    }
    m.set_size(b1, 1 << 32).unwrap();
    m.add_subregion(c1, 0, b1).unwrap();
    m.commit().unwrap();
    assert_eq!(m.flatview_root(c1).unwrap(), Some(b1));
    let v1 = m.committed_view(spaces[1].1).unwrap();
    // A new space rooted directly at `b1` shares the changed view.
    let renders = m.stats().renders;
    let direct = m.create_address_space("direct-b1", b1).unwrap();
    assert_eq!(
        m.stats().renders,
        renders,
        "found through the updated index"
    );
    assert!(Rc::ptr_eq(&m.committed_view(direct).unwrap(), &v1));
    // Destroy every space of root 2 and create one again: the index forgets
    // them (a new render) and the lowest free slot is reused.
    for &(k, id) in &spaces {
        if k == 2 {
            m.destroy_address_space(id).unwrap();
        }
    }
    let renders = m.stats().renders;
    let again = m.create_address_space("again", roots[2].0).unwrap();
    assert_eq!(m.stats().renders, renders + 1);
    assert_eq!(m.address_spaces().iter().position(|&s| s == again), Some(2));
    let again2 = m.create_address_space("again2", aliases[2]).unwrap();
    assert!(Rc::ptr_eq(
        &m.committed_view(again).unwrap(),
        &m.committed_view(again2).unwrap()
    ));
}
