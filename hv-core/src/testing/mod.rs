//! Support for host tests and benchmarks (every `cargo test`, and the
//! `testing` feature for other crates' tests and benches; never in the
//! kernel): a guest driver for virtio-pci functions ([`driver`]), machines
//! set up as a guest's drivers leave them, and an in-memory EPT host whose
//! frame allocator counts what it hands out.
//!
//! Everything here panics on what it does not expect: it is test code and
//! never sees guest input.

pub mod driver;

use crate::addr::HostPhysAddr;
use crate::devices::test_device::TestDevice;
use crate::ept::PageSizes;
use crate::ept_listener::{EptHost, EptListener, EptMode, RamBlock};
use crate::frames::FrameAllocator;
use crate::machine::{
    Machine, MachineConfig, MachineError, BIOS_SIZE, TEST_DEVICE_BASE, TEST_WINDOW_BASE,
    TEST_WINDOW_SIZE,
};
use crate::phys::mock::MockPhys;
use crate::phys::PhysAccess;
use crate::virtio::blk::VirtioBlk;
use crate::virtio::pci::{add_virtio_pci, VirtioPci, MAX_QUEUES};
use crate::virtio::spec::{add_devices, DeviceSpec};
use crate::virtio::{blk, net};
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use driver::{Drv, RING_BYTES};

/// Host memory for EPT tables: a flat buffer with a counting frame
/// allocator ([`MockPhys`]), and a count of INVEPTs.
pub struct MemHost {
    pub mem: MockPhys,
    pub invepts: u64,
}

impl MemHost {
    /// `size` bytes of table memory (frames from 1 MiB up).
    pub fn new(size: u64) -> Self {
        Self {
            mem: MockPhys::new(size),
            invepts: 0,
        }
    }
}

impl PhysAccess for MemHost {
    fn read(&self, a: HostPhysAddr, b: &mut [u8]) {
        self.mem.read(a, b)
    }
    fn write(&mut self, a: HostPhysAddr, d: &[u8]) {
        self.mem.write(a, d)
    }
}

impl FrameAllocator for MemHost {
    fn alloc_contiguous(&mut self, s: u64, a: u64) -> Option<HostPhysAddr> {
        self.mem.alloc_contiguous(s, a)
    }
    fn free_contiguous(&mut self, a: HostPhysAddr, s: u64) {
        self.mem.free_contiguous(a, s)
    }
}

impl EptHost for MemHost {
    fn invept(&mut self, _eptp: u64) -> bool {
        self.invepts += 1;
        true
    }
}

/// The EPT listener over a [`MemHost`], as the tests and benches share it.
pub type MemEpt = Rc<RefCell<EptListener<MemHost>>>;

/// Where guest RAM starts in the host memory of [`attach_mock_ram`].
pub const RAM_HPA: u64 = 0x10_0000;
/// Where the driver's rings start in guest RAM (the first MiB is left to
/// firmware and the guest's own use).
pub const RINGS_GPA: u64 = 0x10_0000;
/// Sectors of each RAM disk of the bench machines.
pub const DISK_SECTORS: u64 = 16;

/// A PC machine of `ram` bytes with the platform (interrupt controllers,
/// timers) and the PCI host bridge, no devices, no host RAM yet.
pub fn pc_machine(ram: u64) -> Result<Machine, MachineError> {
    let mut m = Machine::new_pc(&MachineConfig {
        ram_bytes: ram,
        lowmem: 3 << 30,
    })?;
    m.add_platform(1_000_000_000, 0)?;
    m.add_pci_host()?;
    Ok(m)
}

/// Gives `m` host memory for its RAM and firmware blocks: one flat buffer,
/// RAM at [`RAM_HPA`], the firmware after it.
pub fn attach_mock_ram(m: &mut Machine) {
    let ram = m.blocks[0];
    let blocks = vec![
        RamBlock {
            hpa: HostPhysAddr::new(RAM_HPA),
            size: ram,
        },
        RamBlock {
            hpa: HostPhysAddr::new(RAM_HPA + ram),
            size: BIOS_SIZE,
        },
    ];
    m.attach_ram(blocks, Box::new(MockPhys::new(RAM_HPA + ram + BIOS_SIZE)));
}

/// Adds Tern's test device at `TEST_DEVICE_BASE` with its RAM window
/// (an alias of the first 2 MiB of RAM at `TEST_WINDOW_BASE`, disabled), as
/// the kernel's VM has it: the one device whose load changes what the EPT
/// maps.
pub fn add_test_device(m: &mut Machine) {
    let pci = m.regions.pci;
    m.map_mmio(
        "tern-test",
        pci,
        TEST_DEVICE_BASE,
        0x1000,
        Box::new(TestDevice::default()),
    )
    .unwrap();
    let ram = m.regions.ram;
    let w = m
        .mem
        .create_alias("tern-test-window", TEST_WINDOW_SIZE.into(), ram, 0)
        .unwrap();
    m.mem.set_enabled(w, false).unwrap();
    let system = m.regions.system;
    m.mem.add_subregion(system, TEST_WINDOW_BASE, w).unwrap();
    let t = m.device::<TestDevice>("tern-test").unwrap();
    t.window = Some(w);
    t.layout = Some((TEST_DEVICE_BASE, false));
}

/// Where [`set_up_as_driver`] moves the test device.
pub const TEST_DEVICE_MOVED: u64 = 0xFEA0_0000;

/// The machine of a device shape (`net:8x16,blk:16x4`) with `ram` bytes of
/// RAM attached, before any driver touched it.
pub fn machine_of(spec: &DeviceSpec, ram: u64) -> Result<Machine, MachineError> {
    let mut m = pc_machine(ram)?;
    add_devices(&mut m, spec, DISK_SECTORS, None)?;
    add_test_device(&mut m);
    attach_mock_ram(&mut m);
    Ok(m)
}

/// A machine of `functions` virtio-blk functions of `queues` queues each,
/// eight functions per slot from slot 1 (up to 248), with `ram` bytes of
/// RAM attached: more functions than one function per slot allows, for
/// the scaling benchmarks.
pub fn machine_of_functions(
    functions: u16,
    queues: u16,
    ram: u64,
) -> Result<Machine, MachineError> {
    if functions > 31 * 8 || queues == 0 || queues > MAX_QUEUES {
        return Err(MachineError::Config("1-248 functions of 1-127 queues"));
    }
    let mut m = pc_machine(ram)?;
    for k in 0..functions {
        let devfn = (8 + k) as u8;
        let disk = vec![0u8; (DISK_SECTORS * blk::SECTOR) as usize];
        let dev = VirtioBlk::new(queues, disk, &format!("tern-blk-{k}"));
        let id = format!("0000:00:{:02x}.{}/virtio-blk", devfn >> 3, devfn & 7);
        add_virtio_pci(&mut m, &id, devfn, dev)?;
    }
    add_test_device(&mut m);
    attach_mock_ram(&mut m);
    Ok(m)
}

/// Sets `m` up as a guest's drivers leave it: every PCI function but the
/// host bridge, in bus order, gets BAR 4 at [`driver::bar4`]`(i)` and BAR 1
/// after it, memory decoding and bus mastering on, MSI-X enabled with a
/// vector per queue, every feature the device offers accepted, and every
/// queue enabled with its rings in RAM (from [`RINGS_GPA`], one
/// [`RING_BYTES`] block per queue), then DRIVER_OK. The test device (if
/// there is one) moves to [`TEST_DEVICE_MOVED`] and turns its RAM window
/// on, so a load of this state changes the EPT too.
pub fn set_up_as_driver(m: &mut Machine) -> Vec<Drv> {
    let fns: Vec<u8> = m
        .pci_devices()
        .map(|(devfn, _)| devfn)
        .filter(|&d| d != 0)
        .collect();
    let ram = m.blocks[0];
    let mut next = RINGS_GPA;
    let mut out = Vec::with_capacity(fns.len());
    for (i, devfn) in fns.into_iter().enumerate() {
        let mut rings = |_q: u64| {
            let r = next;
            next += RING_BYTES;
            assert!(next <= ram, "the rings do not fit in guest RAM");
            r
        };
        out.push(Drv::init_at(m, i as u64, devfn, None, true, &mut rings));
    }
    if m.device::<TestDevice>("tern-test").is_some() {
        driver::mmio_write(m, TEST_DEVICE_BASE + 8, 8, TEST_DEVICE_MOVED | 1);
    }
    out
}

/// Registers an EPT listener over a fresh [`MemHost`] on `m`'s memory
/// space (2 MiB and 1 GiB pages, accessed/dirty flags, incremental
/// updates); it maps the current view at once.
pub fn attach_ept(m: &mut Machine) -> MemEpt {
    attach_ept_with(m, MemHost::new(8 << 20))
}

/// As [`attach_ept`] with the table memory `host` (benchmarks allocate it
/// outside the timed part).
pub fn attach_ept_with(m: &mut Machine, host: MemHost) -> MemEpt {
    let sizes = PageSizes {
        two_mib: true,
        one_gib: true,
    };
    let ept = EptListener::new(
        host,
        sizes,
        m.ram_blocks().to_vec(),
        true,
        EptMode::Incremental,
    )
    .expect("EPT root");
    let ept = Rc::new(RefCell::new(ept));
    let space = m.memory;
    m.mem
        .add_listener(space, 0, ept.clone())
        .expect("the memory space exists");
    ept
}

/// What the driver set-up left in one virtio function, read back from the
/// device model and the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunctionState {
    pub devfn: u8,
    pub status: u8,
    pub queues: usize,
    pub queues_ready: usize,
    pub msix_enabled: bool,
    pub bus_master: bool,
    /// BAR 4's common configuration and BAR 1's MSI-X table answer at
    /// the addresses the driver gave them.
    pub bars_mapped: bool,
}

/// Reads back every virtio function's state (see [`FunctionState`]).
pub fn function_states(m: &mut Machine) -> Vec<FunctionState> {
    use crate::machine::MemTarget;
    let fns: Vec<(u8, u32)> = m.pci_devices().filter(|&(d, _)| d != 0).collect();
    let ids: Vec<_> = m.device_ids().cloned().collect();
    let mut out = Vec::new();
    for (i, (devfn, d)) in fns.into_iter().enumerate() {
        let idstr = ids[d as usize].idstr.clone();
        let (status, queues, ready, msix, master) = if idstr.ends_with("virtio-net") {
            let v = m.device::<VirtioPci<net::VirtioNet>>(&idstr).unwrap();
            read_back(v)
        } else {
            let v = m.device::<VirtioPci<VirtioBlk>>(&idstr).unwrap();
            read_back(v)
        };
        let b4 = driver::bar4(i as u64);
        let mapped = |m: &mut Machine, a: u64| {
            matches!(m.memory_target(a).unwrap(), MemTarget::Device { .. })
        };
        let bars_mapped = mapped(m, b4) && mapped(m, b4 + 0x8000);
        out.push(FunctionState {
            devfn,
            status,
            queues,
            queues_ready: ready,
            msix_enabled: msix,
            bus_master: master,
            bars_mapped,
        });
    }
    out
}

fn read_back<B: crate::virtio::pci::VirtioBackend>(
    v: &mut VirtioPci<B>,
) -> (u8, usize, usize, bool, bool) {
    let q = v.queues();
    let ready = q.iter().filter(|q| q.state().ready).count();
    let n = q.len();
    let cfg = v.pci_config();
    (v.status(), n, ready, cfg.msix_enabled(), cfg.bus_master())
}

#[cfg(test)]
mod tests;
