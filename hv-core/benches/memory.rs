//! Memory API benchmarks:
//! * `render/N`: rendering a flat view of N regions (half RAM, half MMIO,
//!   with overlapping higher-priority regions and a container fallback);
//! * `commit/N`: one mutation + commit (re-render + listener diff) with N
//!   regions and an EPT-like listener;
//! * `mutations_1000/{each,one_txn}`: the same 1,000 mutations committed one
//!   by one vs in one transaction;
//! * `txn_reads/{force_commit,render_on_demand,render_on_demand_translate}`:
//!   a transaction of 100 mutations, each followed by a read (QEMU-like
//!   forced commit vs on-demand rendering for `lookup` vs tree walk for
//!   `translate`).
//! * `address_spaces/N`: creating N address spaces, each rooted at a
//!   container holding an alias of the system root (a PCI function's
//!   bus-master space), every other one enabled.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use hv_core::memory::{
    FlatRange, ListenerCtx, MemoryListener, MemorySystem, MmioHandle, RamBacking, ReadPolicy,
    RegionId,
};
use std::cell::RefCell;
use std::hint::black_box;
use std::rc::Rc;

/// A listener that does a small amount of work per event, like an EPT
/// mapper would.
#[derive(Default)]
struct Counting {
    mapped: u64,
}

impl MemoryListener for Counting {
    fn region_add(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        self.mapped += r.size as u64;
    }
    fn region_del(&mut self, _cx: &ListenerCtx<'_>, r: &FlatRange) {
        self.mapped -= r.size as u64;
    }
}

struct Machine {
    m: MemorySystem,
    root: RegionId,
    sp: hv_core::memory::AddressSpaceId,
    leaves: Vec<RegionId>,
}

/// `n` leaf regions of 4 KiB spread over the address space, every 8th one
/// overlapped by a higher-priority MMIO window; a low-priority background
/// "io"-like region fills the gaps.
fn machine(n: usize) -> Machine {
    let mut m = MemorySystem::new();
    let root = m.create_container("system", 1 << 64).unwrap();
    let sp = m.create_address_space("memory", root).unwrap();
    m.add_listener(sp, 0, Rc::new(RefCell::new(Counting::default())))
        .unwrap();
    m.begin();
    let bg = m.create_mmio("background", 1 << 48, MmioHandle(0)).unwrap();
    m.add_subregion_overlap(root, 0, bg, -1).unwrap();
    let mut leaves = Vec::with_capacity(n);
    for i in 0..n {
        let addr = i as u64 * 0x2000;
        let r = if i % 2 == 0 {
            m.create_ram(
                &format!("ram{i}"),
                0x1000,
                RamBacking {
                    block: i as u32,
                    offset: 0,
                },
            )
        } else {
            m.create_mmio(&format!("mmio{i}"), 0x1000, MmioHandle(i as u32))
        }
        .unwrap();
        m.add_subregion(root, addr, r).unwrap();
        leaves.push(r);
        if i % 8 == 0 {
            let w = m
                .create_mmio(&format!("win{i}"), 0x800, MmioHandle(1))
                .unwrap();
            m.add_subregion_overlap(root, addr + 0x400, w, 1).unwrap();
        }
    }
    m.commit().unwrap();
    Machine {
        m,
        root,
        sp,
        leaves,
    }
}

fn sizes() -> Vec<usize> {
    vec![10, 100, 1_000, 10_000, 100_000]
}

fn bench_render(c: &mut Criterion) {
    let mut g = c.benchmark_group("render");
    g.sample_size(10);
    for n in sizes() {
        let mach = machine(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(mach.m.render_region(mach.root).unwrap().ranges().len()))
        });
    }
    g.finish();
}

fn bench_commit(c: &mut Criterion) {
    let mut g = c.benchmark_group("commit");
    g.sample_size(10);
    for n in sizes() {
        let mut mach = machine(n);
        let r = mach.leaves[n / 2];
        let mut on = false;
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                on = !on;
                mach.m.set_readonly(r, on).unwrap();
            })
        });
        black_box(mach.m.flat_view(mach.sp).unwrap());
    }
    g.finish();
}

fn bench_txn(c: &mut Criterion) {
    let mut g = c.benchmark_group("mutations_1000");
    g.sample_size(10);
    let base = 1_000;
    for mode in ["each", "one_txn"] {
        let mut mach = machine(base);
        let mut flip = false;
        g.bench_function(mode, |b| {
            b.iter(|| {
                flip = !flip;
                if mode == "one_txn" {
                    mach.m.begin();
                }
                for i in 0..1_000 {
                    let r = mach.leaves[i % mach.leaves.len()];
                    mach.m.set_enabled(r, !flip).unwrap();
                }
                if mode == "one_txn" {
                    mach.m.commit().unwrap();
                }
            })
        });
    }
    g.finish();
}

fn bench_reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("txn_reads");
    g.sample_size(10);
    for (name, policy, translate) in [
        ("force_commit", ReadPolicy::ForceCommit, false),
        ("render_on_demand", ReadPolicy::RenderOnDemand, false),
        (
            "render_on_demand_translate",
            ReadPolicy::RenderOnDemand,
            true,
        ),
    ] {
        let mut mach = machine(1_000);
        mach.m.set_read_policy(policy);
        let mut flip = false;
        g.bench_function(name, |b| {
            b.iter(|| {
                flip = !flip;
                mach.m.begin();
                for i in 0..100 {
                    let r = mach.leaves[i * 7 % mach.leaves.len()];
                    mach.m.set_enabled(r, !flip).unwrap();
                    let addr = i as u64 * 0x2000;
                    if translate {
                        black_box(mach.m.translate(mach.sp, addr).unwrap());
                    } else {
                        black_box(mach.m.lookup(mach.sp, addr).unwrap());
                    }
                }
                mach.m.commit().unwrap();
            })
        });
        let s = mach.m.stats();
        eprintln!(
            "txn_reads/{name}: renders={} on_demand={} walks={} forced_commits={} listener_commits={}",
            s.renders, s.on_demand_renders, s.walk_lookups, s.forced_commits, s.listener_commits
        );
    }
    g.finish();
}

fn bench_address_spaces(c: &mut Criterion) {
    let mut g = c.benchmark_group("address_spaces");
    g.sample_size(10);
    for n in [100usize, 1_000, 10_000] {
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let mut m = machine(10).m;
                let root = m.address_space_root(m.address_spaces()[0]).unwrap();
                for i in 0..n {
                    let c = m.create_container("bus master container", 1 << 64).unwrap();
                    let a = m.create_alias("bus master", 1 << 64, root, 0).unwrap();
                    m.set_enabled(a, i % 2 == 0).unwrap();
                    m.add_subregion(c, 0, a).unwrap();
                    black_box(m.create_address_space("dev", c).unwrap());
                }
                m
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_render,
    bench_commit,
    bench_txn,
    bench_reads,
    bench_address_spaces
);
criterion_main!(benches);
