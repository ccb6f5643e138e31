//! EPT kept by the listener: incremental update versus rebuild from the
//! flat view, for one memory-map change (an MMIO hole moving across RAM,
//! as a BAR reprogramming does) on a 1 GiB guest. Run with
//! `cargo xtask bench`; criterion prints both times, their ratio is the
//! figure of interest.

use criterion::{criterion_group, criterion_main, Criterion};
use hv_core::addr::HostPhysAddr;
use hv_core::ept::PageSizes;
use hv_core::ept_listener::{EptHost, EptListener, EptMode, RamBlock};
use hv_core::frames::{FrameAllocator, FreeRanges};
use hv_core::memory::{MemorySystem, MmioHandle, RamBacking};
use hv_core::phys::PhysAccess;
use std::cell::RefCell;
use std::rc::Rc;

/// Host memory for EPT tables: a plain buffer and a free list.
struct BenchHost {
    mem: Vec<u8>,
    free: FreeRanges,
}

impl BenchHost {
    fn new(size: u64) -> Self {
        let mut free = FreeRanges::new();
        free.insert(4096, size).expect("fresh range set");
        Self {
            mem: vec![0; size as usize],
            free,
        }
    }
}

impl PhysAccess for BenchHost {
    fn read(&self, a: HostPhysAddr, buf: &mut [u8]) {
        let a = a.as_u64() as usize;
        buf.copy_from_slice(&self.mem[a..a + buf.len()]);
    }
    fn write(&mut self, a: HostPhysAddr, data: &[u8]) {
        let a = a.as_u64() as usize;
        self.mem[a..a + data.len()].copy_from_slice(data);
    }
}

impl FrameAllocator for BenchHost {
    fn alloc_contiguous(&mut self, size: u64, align: u64) -> Option<HostPhysAddr> {
        let a = self.free.take(size, align)?;
        self.mem[a as usize..(a + size) as usize].fill(0);
        Some(HostPhysAddr::new(a))
    }
    fn free_contiguous(&mut self, a: HostPhysAddr, size: u64) {
        let _ = self.free.insert(a.as_u64(), a.as_u64() + size);
    }
}

impl EptHost for BenchHost {
    fn invept(&mut self, _eptp: u64) -> bool {
        true
    }
}

fn bench_ept(c: &mut Criterion) {
    let mut g = c.benchmark_group("ept_one_change_1g_guest");
    for mode in [EptMode::Incremental, EptMode::Rebuild] {
        let mut mem = MemorySystem::new();
        let root = mem.create_container("system", 1 << 64).unwrap();
        let ram = mem
            .create_ram(
                "pc.ram",
                1 << 30,
                RamBacking {
                    block: 0,
                    offset: 0,
                },
            )
            .unwrap();
        mem.add_subregion(root, 0, ram).unwrap();
        // Some MMIO holes so the view is not trivial.
        for i in 0..64u64 {
            let h = mem.create_mmio("bar", 0x1000, MmioHandle(1)).unwrap();
            mem.add_subregion_overlap(root, 0x2000_0000 + i * 0x40_0000, h, 1)
                .unwrap();
        }
        let hole = mem.create_mmio("moving", 0x1000, MmioHandle(2)).unwrap();
        mem.add_subregion_overlap(root, 0, hole, 2).unwrap();
        let space = mem.create_address_space("memory", root).unwrap();
        let blocks = vec![RamBlock {
            hpa: HostPhysAddr::new(1 << 32),
            size: 1 << 30,
        }];
        let sizes = PageSizes {
            two_mib: true,
            one_gib: true,
        };
        let l = EptListener::new(BenchHost::new(16 << 20), sizes, blocks, true, mode).unwrap();
        mem.add_listener(space, 0, Rc::new(RefCell::new(l)))
            .unwrap();
        let mut i = 0u64;
        g.bench_function(format!("{mode:?}"), |b| {
            b.iter(|| {
                i += 1;
                mem.set_address(hole, (i % 256) * 0x20_0000).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_ept);
criterion_main!(benches);
