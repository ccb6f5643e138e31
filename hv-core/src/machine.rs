//! A PC-like machine built on the memory API: the memory and I/O address
//! spaces of one VM, its RAM and firmware blocks, and its devices, with the
//! dispatch of port and MMIO accesses by region.
//!
//! The memory map follows QEMU's `pc` machine: one RAM block shown as
//! `ram-below-4g` at 0 (up to `lowmem`) and `ram-above-4g` at 4 GiB, the
//! firmware ROM `pc.bios` at the top of 4 GiB with its last 128 KiB aliased
//! read-only as `isa-bios` at 0xE0000, and a `pci` container of lower
//! priority for device BARs. Port I/O goes through the `io` address space.
//! Every change goes through the memory API, so listeners (EPT) see it.
//!
//! The PCI bus (optional, [`Machine::add_pci_host`]) is q35-like: the host
//! bridge at 00.0 with CF8/CFC and an ECAM window; the machine routes
//! configuration accesses to the functions' [`PciConfig`]s, maps their BARs
//! and gives each function a bus-master address space for its DMA.

mod load;
pub use load::{CommitMode, DeviceSection, LoadError, LoadPhases, LoadStats};

use crate::devices::{
    all_ones, handle_parts, region_handle, Device, DeviceCtx, DeviceId, IrqOut, MemoryRequest,
    RegionIndex, StateError,
};
use crate::ept_listener::RamBlock;
use crate::guest_mem::GuestMemory;
use crate::irq::Nanos;
use crate::memory::{
    AddressSpaceId, MemoryError, MemorySystem, MmioHandle, RamBacking, RangeTarget, RegionId,
    WriteNotifier,
};
use crate::pci::host::{self, PciHostBridge};
use crate::pci::{PciConfig, PCI_NUM_BARS};
use crate::phys::PhysAccess;
use crate::platform::Platform;
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

/// RAM block index of guest RAM.
pub const RAM_BLOCK: u32 = 0;
/// RAM block index of the firmware ROM.
pub const BIOS_BLOCK: u32 = 1;
/// Size of the firmware ROM.
pub const BIOS_SIZE: u64 = 128 * 1024;
/// Where the test device's region starts.
pub const TEST_DEVICE_BASE: u64 = 0xFEB0_0000;
/// Where the test device's RAM window alias appears (when enabled).
pub const TEST_WINDOW_BASE: u64 = 0xC000_0000;
/// Size of that window; it shows RAM from offset 0 of the RAM block.
pub const TEST_WINDOW_SIZE: u64 = 2 << 20;

/// Where the PCI Express ECAM window (q35's MMCONFIG) starts.
pub const ECAM_BASE: u64 = 0xB000_0000;
/// Its size: 256 buses of 32 devices of 8 functions of 4 KiB.
pub const ECAM_SIZE: u64 = 256 << 20;

/// What a machine is built from.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    pub ram_bytes: u64,
    /// RAM shown below 4 GiB (QEMU's `max-ram-below-4g`); the rest appears
    /// at 4 GiB.
    pub lowmem: u64,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            ram_bytes: 32 << 20,
            lowmem: 3 << 30,
        }
    }
}

/// The regions of the PC map.
#[derive(Clone, Copy, Debug)]
pub struct PcRegions {
    pub system: RegionId,
    pub ram: RegionId,
    pub ram_below_4g: RegionId,
    pub ram_above_4g: Option<RegionId>,
    pub bios: RegionId,
    pub isa_bios: RegionId,
    pub pci: RegionId,
    pub io: RegionId,
}

/// Why a machine could not be built or changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MachineError {
    Memory(MemoryError),
    /// A configuration value is unusable.
    Config(&'static str),
}

impl From<MemoryError> for MachineError {
    fn from(e: MemoryError) -> Self {
        Self::Memory(e)
    }
}

impl core::fmt::Display for MachineError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Memory(e) => write!(f, "memory map: {e}"),
            Self::Config(why) => write!(f, "bad machine configuration: {why}"),
        }
    }
}

/// Where a guest-physical access lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemTarget {
    /// A device: handle, offset in its region, bytes left in the range.
    Device {
        handle: MmioHandle,
        offset: u64,
        left: u64,
    },
    /// RAM or ROM of a block.
    Ram {
        block: u32,
        offset: u64,
        readonly: bool,
        left: u64,
    },
    /// Nothing.
    Unmapped,
}

/// Counters of the machine's dispatch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineStats {
    pub pio_accesses: u64,
    pub mmio_accesses: u64,
    /// Port accesses that hit no device.
    pub unclaimed_pio: u64,
    /// Memory-map changes requested by devices (each one transaction).
    pub remaps: u64,
    /// Writes consumed by a write notifier instead of the device.
    pub notifier_hits: u64,
    /// Interrupt-line changes and MSIs raised by devices.
    pub irq_lines: u64,
    pub msis: u64,
    /// Frames through the VM's switch, and frames no NIC took.
    pub frames_switched: u64,
    pub frames_dropped: u64,
}

/// Report lines kept between two [`Machine::take_reports`] (a guest that
/// makes errors in a loop cannot grow them without bound).
pub const MAX_REPORTS: usize = 64;

struct DeviceSlot {
    id: DeviceId,
    dev: Box<dyn Device>,
    /// The device's regions, by region index.
    regions: Vec<RegionId>,
    /// For a PCI function: its place on the bus and what is mapped.
    pci: Option<PciFunction>,
}

/// The machine's side of a PCI function: its bus-master address space and
/// the BAR addresses mapped now (recomputed against the config space by
/// [`Machine::pci_update_mappings`]).
#[derive(Clone, Copy, Debug)]
struct PciFunction {
    devfn: u8,
    /// The bus-master address space, rooted at a container
    /// ("bus master container").
    space: AddressSpaceId,
    /// The alias of the system root in that container, enabled by
    /// `COMMAND.MASTER`.
    bus_master: RegionId,
    /// Address each BAR (by register) is mapped at, `None` if unmapped.
    mapped: [Option<u64>; PCI_NUM_BARS as usize],
    /// Whether `bus_master` is enabled.
    master: bool,
}

/// A planned BAR change: register, region, container, old and new address.
type BarChange = (u8, RegionId, RegionId, Option<u64>, Option<u64>);

/// What a device callback left behind, applied by the machine afterwards.
#[derive(Default)]
struct Effects {
    irq: IrqOut,
    requests: Vec<MemoryRequest>,
    exit: Option<u32>,
}

/// A write notifier's owner: the device and the token it registered.
#[derive(Clone, Copy, Debug)]
struct NotifierOwner {
    device: u32,
    token: u64,
}

/// One VM's machine.
pub struct Machine {
    pub mem: MemorySystem,
    pub memory: AddressSpaceId,
    pub io_space: AddressSpaceId,
    pub regions: PcRegions,
    /// Sizes of the RAM blocks, by index.
    pub blocks: Vec<u64>,
    /// Host memory of the RAM blocks (empty until [`Machine::attach_ram`]).
    ram: Vec<RamBlock>,
    phys: Box<dyn PhysAccess>,
    devices: Vec<DeviceSlot>,
    notifiers: Vec<NotifierOwner>,
    /// Virtual time, set by the VM before each dispatch.
    pub now: Nanos,
    /// The guest's TSC at `now`.
    pub guest_tsc: u64,
    /// An exit status a device asked for, taken by [`Machine::take_exit`].
    exit: Option<u32>,
    /// Report lines of devices, taken by [`Machine::take_reports`].
    reports: Vec<(DeviceId, String)>,
    /// Guest RAM written by Tern itself (device DMA, emulation) while a
    /// migration logs dirty pages.
    dma_dirty: Option<core::cell::RefCell<crate::dirty::DirtyBitmap>>,
    /// The device index of the interrupt controllers and timers.
    platform: Option<u32>,
    /// The device index of the PCI host bridge.
    pci_host: Option<u32>,
    /// Functions of bus 0: devfn -> device index.
    pci_functions: BTreeMap<u8, u32>,
    pub stats: MachineStats,
    /// The clock a device load times its sections with (the VM's TSC);
    /// without one, [`Machine::section_ticks`] stays zero.
    pub load_clock: Option<fn() -> u64>,
    /// Ticks of the last [`Machine::load_devices`] per section, in section
    /// order: the device's own load, its mappings and its post-load hook
    /// (the commit they share is not in any of them).
    pub section_ticks: Vec<u64>,
}

/// Host memory that is not there: every read gives zeroes, writes vanish.
/// A machine uses it until the VM attaches its RAM.
struct NoPhys;

impl PhysAccess for NoPhys {
    fn read(&self, _addr: crate::addr::HostPhysAddr, buf: &mut [u8]) {
        buf.fill(0);
    }
    fn write(&mut self, _addr: crate::addr::HostPhysAddr, _data: &[u8]) {}
}

/// Why a device's saved state was not loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadDeviceError {
    NoSuchDevice,
    State(StateError),
    Machine(MachineError),
}

impl Machine {
    /// Builds the PC memory and I/O maps (no devices yet).
    pub fn new_pc(cfg: &MachineConfig) -> Result<Self, MachineError> {
        if cfg.ram_bytes == 0 || !cfg.ram_bytes.is_multiple_of(4096) {
            return Err(MachineError::Config(
                "RAM size must be a non-zero multiple of 4 KiB",
            ));
        }
        if cfg.lowmem == 0 || cfg.lowmem > 0xE000_0000 || !cfg.lowmem.is_multiple_of(4096) {
            return Err(MachineError::Config(
                "lowmem must be a page multiple in (0, 3.5 GiB]",
            ));
        }
        let mut mem = MemorySystem::new();
        let system = mem.create_container("system", 1 << 64)?;
        let ram = mem.create_ram(
            "pc.ram",
            cfg.ram_bytes.into(),
            RamBacking {
                block: RAM_BLOCK,
                offset: 0,
            },
        )?;
        let below = cfg.ram_bytes.min(cfg.lowmem);
        let ram_below_4g = mem.create_alias("ram-below-4g", below.into(), ram, 0)?;
        mem.add_subregion(system, 0, ram_below_4g)?;
        let ram_above_4g = if cfg.ram_bytes > below {
            let a = mem.create_alias("ram-above-4g", (cfg.ram_bytes - below).into(), ram, below)?;
            mem.add_subregion(system, 1 << 32, a)?;
            Some(a)
        } else {
            None
        };
        let pci = mem.create_container("pci", 1 << 64)?;
        mem.add_subregion_overlap(system, 0, pci, -1)?;
        let bios = mem.create_rom(
            "pc.bios",
            BIOS_SIZE.into(),
            RamBacking {
                block: BIOS_BLOCK,
                offset: 0,
            },
        )?;
        mem.add_subregion_overlap(pci, (1 << 32) - BIOS_SIZE, bios, 0)?;
        let isa_bios = mem.create_alias("isa-bios", BIOS_SIZE.into(), bios, 0)?;
        mem.set_readonly(isa_bios, true)?;
        mem.add_subregion_overlap(system, 0x10_0000 - BIOS_SIZE, isa_bios, 1)?;
        let io = mem.create_container("io", 0x1_0000)?;
        let memory = mem.create_address_space("memory", system)?;
        let io_space = mem.create_address_space("I/O", io)?;
        Ok(Self {
            mem,
            memory,
            io_space,
            regions: PcRegions {
                system,
                ram,
                ram_below_4g,
                ram_above_4g,
                bios,
                isa_bios,
                pci,
                io,
            },
            blocks: alloc::vec![cfg.ram_bytes, BIOS_SIZE],
            ram: Vec::new(),
            phys: Box::new(NoPhys),
            devices: Vec::new(),
            notifiers: Vec::new(),
            now: 0,
            guest_tsc: 0,
            exit: None,
            reports: Vec::new(),
            dma_dirty: None,
            platform: None,
            pci_host: None,
            pci_functions: BTreeMap::new(),
            stats: MachineStats::default(),
            load_clock: None,
            section_ticks: Vec::new(),
        })
    }

    /// Gives the machine its RAM blocks' host memory (index = block).
    pub fn attach_ram(&mut self, ram: Vec<RamBlock>, phys: Box<dyn PhysAccess>) {
        self.ram = ram;
        self.phys = phys;
    }

    /// The VM's RAM blocks in host memory.
    pub fn ram_blocks(&self) -> &[RamBlock] {
        &self.ram
    }

    /// Guest memory as the memory space's current view shows it.
    pub fn guest_memory(&mut self) -> Result<GuestMemory<'_>, MachineError> {
        let view = self.mem.flat_view(self.memory)?;
        Ok(GuestMemory::new(view, &self.ram, &mut *self.phys)
            .with_dirty_log(self.dma_dirty.as_ref()))
    }

    /// Adds a device with its identity; regions are added with
    /// [`Machine::add_device_region`]. Returns the device index.
    pub fn add_device(&mut self, idstr: &str, dev: Box<dyn Device>) -> u32 {
        let instance = self.devices.iter().filter(|s| s.id.idstr == idstr).count() as u32;
        self.devices.push(DeviceSlot {
            id: DeviceId {
                idstr: idstr.into(),
                instance,
            },
            dev,
            regions: Vec::new(),
            pci: None,
        });
        self.devices.len() as u32 - 1
    }

    /// Creates an MMIO region of `len` bytes for device `device` (not yet
    /// mapped); its region index is the number of regions the device had.
    pub fn add_device_region(
        &mut self,
        device: u32,
        name: &str,
        len: u64,
    ) -> Result<RegionId, MachineError> {
        self.new_device_region(device, |mem, index| {
            mem.create_mmio(name, len.into(), region_handle(device, index))
        })
    }

    /// Creates a container of `len` bytes for device `device` (not yet
    /// mapped), e.g. a BAR whose parts are separate MMIO regions: it gets a
    /// region index like [`Machine::add_device_region`] but is never
    /// dispatched itself; the caller adds subregions with
    /// `m.mem.add_subregion`.
    pub fn add_device_container(
        &mut self,
        device: u32,
        name: &str,
        len: u64,
    ) -> Result<RegionId, MachineError> {
        self.new_device_region(device, |mem, _| mem.create_container(name, len.into()))
    }

    fn new_device_region(
        &mut self,
        device: u32,
        create: impl FnOnce(&mut MemorySystem, RegionIndex) -> Result<RegionId, MemoryError>,
    ) -> Result<RegionId, MachineError> {
        let slot = self
            .devices
            .get_mut(device as usize)
            .ok_or(MachineError::Config("no such device"))?;
        let index = RegionIndex::try_from(slot.regions.len())
            .map_err(|_| MachineError::Config("a device has at most 256 regions"))?;
        let r = create(&mut self.mem, index)?;
        slot.regions.push(r);
        Ok(r)
    }

    /// Maps a device at `port` in the I/O space.
    pub fn map_pio(
        &mut self,
        name: &str,
        port: u16,
        len: u16,
        dev: Box<dyn Device>,
    ) -> Result<RegionId, MachineError> {
        let d = self.add_device(name, dev);
        let r = self.add_device_region(d, name, len.into())?;
        self.mem.add_subregion(self.regions.io, port.into(), r)?;
        Ok(r)
    }

    /// Maps a device at `addr` in `container` of the memory space.
    pub fn map_mmio(
        &mut self,
        name: &str,
        container: RegionId,
        addr: u64,
        len: u64,
        dev: Box<dyn Device>,
    ) -> Result<RegionId, MachineError> {
        let d = self.add_device(name, dev);
        let r = self.add_device_region(d, name, len)?;
        self.mem.add_subregion(container, addr, r)?;
        Ok(r)
    }

    /// Adds a write notifier on one of a device's regions; a matching write
    /// reaches the device's [`Device::notify`] with `token` instead of its
    /// `write`.
    pub fn add_write_notifier(
        &mut self,
        region: RegionId,
        addr: u64,
        size: u64,
        data: Option<u64>,
        token: u64,
    ) -> Result<(), MachineError> {
        let device =
            self.devices
                .iter()
                .position(|s| s.regions.contains(&region))
                .ok_or(MachineError::Config("the region belongs to no device"))? as u32;
        self.notifiers.push(NotifierOwner { device, token });
        let n = WriteNotifier {
            addr,
            size,
            data,
            token: self.notifiers.len() as u64 - 1,
        };
        self.mem.add_write_notifier(region, n)?;
        Ok(())
    }

    /// The device registered under `idstr` (instance 0), downcast to `T`.
    pub fn device<T: 'static>(&mut self, idstr: &str) -> Option<&mut T> {
        self.devices
            .iter_mut()
            .find(|s| s.id.idstr == idstr)?
            .dev
            .as_any()
            .downcast_mut::<T>()
    }

    /// The identities of every device, in creation order.
    pub fn device_ids(&self) -> impl Iterator<Item = &DeviceId> {
        self.devices.iter().map(|s| &s.id)
    }

    fn target(&mut self, space: AddressSpaceId, addr: u64) -> Result<MemTarget, MachineError> {
        let Some(l) = self.mem.lookup(space, addr)? else {
            return Ok(MemTarget::Unmapped);
        };
        let left = (l.range.end() - addr as u128).min(u64::MAX as u128) as u64;
        Ok(match l.range.target {
            RangeTarget::Mmio(handle) => MemTarget::Device {
                handle,
                offset: l.offset,
                left,
            },
            RangeTarget::RomDevice { ops, .. } if !l.range.romd_mode => MemTarget::Device {
                handle: ops,
                offset: l.offset,
                left,
            },
            RangeTarget::Ram(b)
            | RangeTarget::RamDevice(b)
            | RangeTarget::RomDevice { backing: b, .. } => MemTarget::Ram {
                block: b.block,
                offset: b.offset + l.offset,
                readonly: l.readonly || matches!(l.range.target, RangeTarget::RomDevice { .. }),
                left,
            },
            RangeTarget::Reservation => MemTarget::Unmapped,
        })
    }

    /// Where a guest-physical address lands in the current memory map.
    pub fn memory_target(&mut self, gpa: u64) -> Result<MemTarget, MachineError> {
        self.target(self.memory, gpa)
    }

    /// Runs `f` on device `index` with a context, then applies what it left:
    /// memory requests (one transaction), interrupts, an exit request.
    /// A PCI function's memory is its bus-master address space (so all its
    /// DMA depends on `COMMAND.MASTER`); other devices see the memory space.
    fn with_device<R>(
        &mut self,
        index: u32,
        f: impl FnOnce(&mut dyn Device, &mut DeviceCtx) -> R,
    ) -> Result<Option<R>, MachineError> {
        let Some(slot) = self.devices.get(index as usize) else {
            return Ok(None);
        };
        let space = slot.pci.as_ref().map_or(self.memory, |p| p.space);
        let view = self.mem.flat_view(space)?;
        let Some(slot) = self.devices.get_mut(index as usize) else {
            return Ok(None);
        };
        let mut fx = Effects::default();
        let r = {
            let mem = GuestMemory::new(view, &self.ram, &mut *self.phys)
                .with_dirty_log(self.dma_dirty.as_ref());
            let mut ctx = DeviceCtx::new(
                self.now,
                mem,
                &slot.regions,
                &mut fx.irq,
                &mut fx.requests,
                &mut fx.exit,
            );
            f(&mut *slot.dev, &mut ctx)
        };
        self.apply_effects(index, fx)?;
        Ok(Some(r))
    }

    /// As [`Machine::with_device`], for a device that is not (yet) in its
    /// slot `index` (a duplicate being loaded): it gets the slot's regions
    /// and address space.
    fn with_detached<R>(
        &mut self,
        index: u32,
        dev: &mut Box<dyn Device>,
        f: impl FnOnce(&mut dyn Device, &mut DeviceCtx) -> R,
    ) -> Result<R, MachineError> {
        let slot = self
            .devices
            .get(index as usize)
            .ok_or(MachineError::Config("no such device"))?;
        let space = slot.pci.as_ref().map_or(self.memory, |p| p.space);
        let view = self.mem.flat_view(space)?;
        let slot = &self.devices[index as usize];
        let mut fx = Effects::default();
        let r = {
            let mem = GuestMemory::new(view, &self.ram, &mut *self.phys)
                .with_dirty_log(self.dma_dirty.as_ref());
            let mut ctx = DeviceCtx::new(
                self.now,
                mem,
                &slot.regions,
                &mut fx.irq,
                &mut fx.requests,
                &mut fx.exit,
            );
            f(&mut **dev, &mut ctx)
        };
        self.apply_effects(index, fx)?;
        Ok(r)
    }

    fn apply_effects(&mut self, index: u32, mut fx: Effects) -> Result<(), MachineError> {
        if let Some(s) = fx.exit {
            self.exit.get_or_insert(s);
        }
        let frames = core::mem::take(&mut fx.irq.frames);
        for line in core::mem::take(&mut fx.irq.reports) {
            if let Some(slot) = self.devices.get(index as usize) {
                if self.reports.len() < MAX_REPORTS {
                    self.reports.push((slot.id.clone(), line));
                }
            }
        }
        self.route_irqs(fx.irq);
        self.switch(index, frames)?;
        if !fx.requests.is_empty() {
            self.apply(&fx.requests)?;
        }
        Ok(())
    }

    /// The VM's switch: each frame goes to the NIC whose MAC is its
    /// destination (the sender too, for its own MAC), a broadcast or
    /// multicast frame to every other NIC, on the same queue pair.
    fn switch(&mut self, from: u32, frames: Vec<(u16, Vec<u8>)>) -> Result<(), MachineError> {
        for (pair, frame) in frames {
            self.stats.frames_switched += 1;
            let Some(dst) = frame.get(0..6) else {
                self.stats.frames_dropped += 1;
                continue;
            };
            let group = dst[0] & 1 != 0;
            let targets: Vec<u32> = (0..self.devices.len() as u32)
                .filter(|&i| match self.devices[i as usize].dev.mac() {
                    Some(_) if group => i != from,
                    Some(mac) => mac == dst,
                    None => false,
                })
                .collect();
            if targets.is_empty() {
                self.stats.frames_dropped += 1;
            }
            for t in targets {
                let took = self.with_device(t, |d, ctx| d.receive_frame(ctx, pair, &frame))?;
                if took != Some(true) {
                    self.stats.frames_dropped += 1;
                }
            }
        }
        Ok(())
    }

    /// Starts or stops logging the guest RAM Tern writes itself (device
    /// DMA, emulated instructions), as the EPT logs the guest's own writes.
    pub fn log_dma(&mut self, on: bool) -> Result<(), MachineError> {
        self.dma_dirty = if on {
            let b = crate::dirty::DirtyBitmap::new(&self.blocks)
                .map_err(|_| MachineError::Config("dirty bitmap"))?;
            Some(core::cell::RefCell::new(b))
        } else {
            None
        };
        Ok(())
    }

    /// The pages Tern wrote since the last call (and clears them).
    pub fn take_dma_dirty(&mut self) -> Option<crate::dirty::DirtyBitmap> {
        self.dma_dirty.as_ref().map(|d| d.borrow_mut().take())
    }

    /// Report lines devices wrote since the last call, with their identity.
    pub fn take_reports(&mut self) -> Vec<(DeviceId, String)> {
        core::mem::take(&mut self.reports)
    }

    /// Every device's I/O counters (devices without counters are left out).
    pub fn device_counters(&self) -> Vec<(DeviceId, Vec<(&'static str, u64)>)> {
        self.devices
            .iter()
            .map(|s| (s.id.clone(), s.dev.counters()))
            .filter(|(_, c)| !c.is_empty())
            .collect()
    }

    /// Interrupt lines and MSIs go to the platform's controllers.
    fn route_irqs(&mut self, irq: IrqOut) {
        self.stats.irq_lines += irq.lines.len() as u64;
        self.stats.msis += irq.msis.len() as u64;
        if let Some(p) = self.platform_mut() {
            crate::platform::route(p, &irq.lines, &irq.msis);
        }
    }

    /// Adds the PC's interrupt controllers and timers (PIC, PIT, port 0x61,
    /// RTC in the I/O space; I/O APIC and local APIC pages in memory).
    pub fn add_platform(&mut self, tsc_hz: u64, unix_secs: u64) -> Result<(), MachineError> {
        if self.platform.is_some() {
            return Err(MachineError::Config("the platform exists already"));
        }
        let p = Platform::new(tsc_hz, unix_secs);
        let d = self.add_device("platform", Box::new(p));
        for (name, addr, len, io) in crate::platform::REGIONS {
            let r = self.add_device_region(d, name, len)?;
            if io {
                self.mem.add_subregion(self.regions.io, addr, r)?;
            } else {
                // Above RAM and PCI, as QEMU's apic-msi (priority 0x1000).
                self.mem
                    .add_subregion_overlap(self.regions.system, addr, r, 0x1000)?;
            }
        }
        self.platform = Some(d);
        Ok(())
    }

    /// Adds QEMU's pc-testdev (ports 0xE0, 0xE4, 0xE8, 0x2000 and 64 KiB of
    /// iomem at 0xFF000000), which kvm-unit-tests uses.
    pub fn add_pc_testdev(&mut self) -> Result<(), MachineError> {
        use crate::devices::pc_testdev::{PcTestdev, IOMEM_BASE, IOMEM_LEN, PORTS};
        let d = self.add_device("pc-testdev", Box::new(PcTestdev::default()));
        for (name, port, len) in PORTS {
            let r = self.add_device_region(d, name, len)?;
            self.mem.add_subregion(self.regions.io, port.into(), r)?;
        }
        let r = self.add_device_region(d, "pc-testdev-iomem", IOMEM_LEN)?;
        self.mem.add_subregion(self.regions.system, IOMEM_BASE, r)?;
        Ok(())
    }

    /// The interrupt controllers and timers, if the machine has them.
    pub fn platform_mut(&mut self) -> Option<&mut Platform> {
        let d = self.platform?;
        self.devices
            .get_mut(d as usize)?
            .dev
            .as_any()
            .downcast_mut::<Platform>()
    }

    /// Sets the virtual time and the guest TSC, then lets every timer
    /// (platform and devices) catch up; what they raise is routed.
    pub fn advance(&mut self, now: Nanos, guest_tsc: u64) -> Result<(), MachineError> {
        self.now = now;
        self.guest_tsc = guest_tsc;
        if let Some(p) = self.platform_mut() {
            p.advance(now, guest_tsc);
        }
        for i in 0..self.devices.len() as u32 {
            if Some(i) == self.platform {
                continue;
            }
            let due = self.devices[i as usize]
                .dev
                .next_event(now)
                .is_some_and(|t| t <= now);
            if due {
                self.with_device(i, |d, ctx| d.poll(ctx))?;
            }
        }
        Ok(())
    }

    /// The earliest time a timer (platform or device) needs
    /// [`Machine::advance`].
    pub fn next_event(&mut self) -> Option<Nanos> {
        let now = self.now;
        let dev = self
            .devices
            .iter()
            .filter_map(|s| s.dev.next_event(now))
            .min();
        let plat = self.platform_mut().and_then(|p| p.next_event(now));
        [dev, plat].into_iter().flatten().min()
    }

    /// The exit status a device asked for since the last call.
    pub fn take_exit(&mut self) -> Option<u32> {
        self.exit.take()
    }

    /// A device read through its handle.
    pub fn device_read(
        &mut self,
        h: MmioHandle,
        offset: u64,
        size: u8,
    ) -> Result<u64, MachineError> {
        let (dev, region) = handle_parts(h);
        if Some(dev) == self.pci_host {
            return self.pci_host_read(region, offset, size);
        }
        let v = self.with_device(dev, |d, ctx| d.read(ctx, region, offset, size))?;
        Ok(v.map_or(all_ones(size), |v| v & all_ones(size)))
    }

    /// A device write through its handle; memory-map requests are applied
    /// here, all in one transaction. Returns an exit status if the device
    /// asks the VM to stop.
    pub fn device_write(
        &mut self,
        h: MmioHandle,
        offset: u64,
        size: u8,
        value: u64,
    ) -> Result<Option<u32>, MachineError> {
        let (dev, region) = handle_parts(h);
        let value = value & all_ones(size);
        if Some(dev) == self.pci_host {
            self.pci_host_write(region, offset, size, value)?;
            return Ok(self.take_exit());
        }
        self.with_device(dev, |d, ctx| d.write(ctx, region, offset, size, value))?;
        Ok(self.take_exit())
    }

    /// Applies memory requests in one transaction; a failing request
    /// abandons the transaction so that nothing is half-applied.
    pub fn apply(&mut self, reqs: &[MemoryRequest]) -> Result<(), MachineError> {
        self.mem.begin();
        for r in reqs {
            let res = match *r {
                MemoryRequest::Move { region, addr } => self.mem.set_address(region, addr),
                MemoryRequest::Enable { region, on } => self.mem.set_enabled(region, on),
            };
            if let Err(e) = res {
                self.mem.abandon()?;
                return Err(e.into());
            }
        }
        self.mem.commit()?;
        self.stats.remaps += 1;
        Ok(())
    }

    /// The write-notifier fast path: if a write of `size` bytes of `value`
    /// at `gpa` matches a notifier of the memory space, the owning device's
    /// `notify` runs instead of its `write` (QEMU's ioeventfd) and the
    /// device's token is returned.
    pub fn notify_write(
        &mut self,
        gpa: u64,
        size: u8,
        value: u64,
    ) -> Result<Option<u64>, MachineError> {
        let Some(n) = self
            .mem
            .find_write_notifier(self.memory, gpa, size.into(), value)?
        else {
            return Ok(None);
        };
        let Some(owner) = self.notifiers.get(n.token as usize).copied() else {
            return Ok(None);
        };
        self.stats.notifier_hits += 1;
        self.with_device(owner.device, |d, ctx| d.notify(ctx, owner.token))?;
        Ok(Some(owner.token))
    }

    /// A guest `in`: the device's value, or all ones if none is there.
    pub fn pio_read(&mut self, port: u16, size: u8) -> Result<u64, MachineError> {
        self.stats.pio_accesses += 1;
        match self.target(self.io_space, port.into())? {
            MemTarget::Device {
                handle,
                offset,
                left,
            } if left >= u64::from(size) => self.device_read(handle, offset, size),
            _ => {
                self.stats.unclaimed_pio += 1;
                Ok(all_ones(size))
            }
        }
    }

    /// A guest `out`; returns an exit status if a device stops the VM.
    pub fn pio_write(
        &mut self,
        port: u16,
        size: u8,
        value: u64,
    ) -> Result<Option<u32>, MachineError> {
        self.stats.pio_accesses += 1;
        match self.target(self.io_space, port.into())? {
            MemTarget::Device {
                handle,
                offset,
                left,
            } if left >= u64::from(size) => self.device_write(handle, offset, size, value),
            _ => {
                self.stats.unclaimed_pio += 1;
                Ok(None)
            }
        }
    }

    /// Saves every device with state: (identity, version, bytes).
    pub fn save_devices(&self) -> Vec<(DeviceId, u32, Vec<u8>)> {
        self.devices
            .iter()
            .filter(|s| s.dev.state_version() != 0)
            .map(|s| {
                let mut out = Vec::new();
                s.dev.save(&mut out);
                (s.id.clone(), s.dev.state_version(), out)
            })
            .collect()
    }

    /// As [`Machine::save_devices`], with each state's description where
    /// the device has one (devices described with `vmstate!`).
    pub fn save_devices_described(
        &self,
    ) -> Vec<(DeviceId, u32, Vec<u8>, Option<crate::vmstate::StructDesc>)> {
        self.devices
            .iter()
            .filter(|s| s.dev.state_version() != 0)
            .map(|s| match s.dev.save_described() {
                Some((bytes, desc)) => (s.id.clone(), s.dev.state_version(), bytes, Some(desc)),
                None => {
                    let mut out = Vec::new();
                    s.dev.save(&mut out);
                    (s.id.clone(), s.dev.state_version(), out, None)
                }
            })
            .collect()
    }

    /// Loads one device's state by identity.
    pub fn load_device(
        &mut self,
        id: &DeviceId,
        version: u32,
        data: &[u8],
    ) -> Result<(), LoadDeviceError> {
        let index = self
            .devices
            .iter()
            .position(|s| &s.id == id)
            .ok_or(LoadDeviceError::NoSuchDevice)? as u32;
        match self.with_device(index, |d, ctx| d.load(ctx, version, data)) {
            Ok(Some(r)) => r.map_err(LoadDeviceError::State)?,
            Ok(None) => return Err(LoadDeviceError::NoSuchDevice),
            Err(e) => return Err(LoadDeviceError::Machine(e)),
        }
        // A PCI function's BARs and bus mastering follow its loaded config,
        // then the device may read the address space that results.
        if self.devices[index as usize].pci.is_some() {
            self.pci_update_mappings(index)
                .map_err(LoadDeviceError::Machine)?;
        }
        match self.with_device(index, |d, ctx| d.post_load(ctx)) {
            Ok(Some(r)) => r.map_err(LoadDeviceError::State),
            Ok(None) => Err(LoadDeviceError::NoSuchDevice),
            Err(e) => Err(LoadDeviceError::Machine(e)),
        }
    }

    // ------------------------------------------------------------------
    // PCI
    // ------------------------------------------------------------------

    /// Adds the PCI host bridge (q35's MCH, 8086:29c0, class host bridge) as
    /// function 00.0 of bus 0, with configuration mechanism #1 (the 32-bit
    /// address latch at port 0xCF8, the data window at 0xCFC..0xD00) and the
    /// ECAM window at [`ECAM_BASE`] in the memory space (priority 0, below
    /// the APIC pages; RAM below 4 GiB must end before it, as q35 keeps it).
    /// Only bus 0 has functions: other buses and empty slots read all ones
    /// and drop writes.
    pub fn add_pci_host(&mut self) -> Result<(), MachineError> {
        if self.pci_host.is_some() {
            return Err(MachineError::Config("the PCI host bridge exists already"));
        }
        let below = self.mem.region(self.regions.ram_below_4g)?.size;
        if below > u128::from(ECAM_BASE) {
            return Err(MachineError::Config(
                "RAM below 4 GiB overlaps the ECAM window",
            ));
        }
        let func = self.new_pci_function(0, "mch")?;
        let d = self.add_device("0000:00:00.0/mch", Box::new(PciHostBridge::new()));
        let addr = self.add_device_region(d, "pci-conf-idx", 4)?;
        let data = self.add_device_region(d, "pci-conf-data", 4)?;
        let ecam = self.add_device_region(d, "pcie-mmcfg-mmio", ECAM_SIZE)?;
        self.mem.begin();
        let io = self.regions.io;
        let r = self
            .mem
            .add_subregion(io, host::CONFIG_ADDRESS_PORT.into(), addr)
            .and_then(|_| {
                self.mem
                    .add_subregion(io, host::CONFIG_DATA_PORT.into(), data)
            })
            .and_then(|_| self.mem.add_subregion(self.regions.system, ECAM_BASE, ecam));
        if let Err(e) = r {
            self.mem.abandon()?;
            return Err(e.into());
        }
        self.mem.commit()?;
        self.devices[d as usize].pci = Some(func);
        self.pci_functions.insert(0, d);
        self.pci_host = Some(d);
        Ok(())
    }

    /// Adds a PCI function at `devfn` of bus 0 (the device's
    /// [`Device::pci`] must be `Some`); returns its device index. The
    /// function gets its bus-master address space, named `idstr` (QEMU: the
    /// device's name): a container "bus master container" holding an alias
    /// "bus master" of the system root, disabled until the guest sets
    /// `COMMAND.MASTER`. The device then adds its BAR regions
    /// ([`Machine::add_device_region`], [`Machine::add_device_container`])
    /// under the region indices its BARs name.
    pub fn add_pci_device(
        &mut self,
        idstr: &str,
        devfn: u8,
        mut dev: Box<dyn Device>,
    ) -> Result<u32, MachineError> {
        if self.pci_host.is_none() {
            return Err(MachineError::Config("no PCI host bridge"));
        }
        if self.pci_functions.contains_key(&devfn) {
            return Err(MachineError::Config("the PCI device/function is taken"));
        }
        if dev.pci().is_none() {
            return Err(MachineError::Config("the device is not a PCI function"));
        }
        let func = self.new_pci_function(devfn, idstr)?;
        let d = self.add_device(idstr, dev);
        self.devices[d as usize].pci = Some(func);
        self.pci_functions.insert(devfn, d);
        Ok(d)
    }

    /// A function's bus-master address space (QEMU `do_pci_register_device`).
    fn new_pci_function(&mut self, devfn: u8, name: &str) -> Result<PciFunction, MachineError> {
        if self.mem.transaction_depth() > 0 {
            return Err(MachineError::Memory(MemoryError::InTransaction));
        }
        self.mem.begin();
        let r = (|| {
            let container = self.mem.create_container("bus master container", 1 << 64)?;
            let alias = self
                .mem
                .create_alias("bus master", 1 << 64, self.regions.system, 0)?;
            self.mem.set_enabled(alias, false)?;
            self.mem.add_subregion(container, 0, alias)?;
            Ok((container, alias))
        })();
        let (container, bus_master) = match r {
            Ok(r) => r,
            Err(e) => {
                self.mem.abandon()?;
                return Err(MachineError::Memory(e));
            }
        };
        self.mem.commit()?;
        let space = match self.mem.create_address_space(name, container) {
            Ok(s) => s,
            Err(e) => {
                let _ = self.mem.destroy_region(container);
                return Err(e.into());
            }
        };
        Ok(PciFunction {
            devfn,
            space,
            bus_master,
            mapped: [None; PCI_NUM_BARS as usize],
            master: false,
        })
    }

    /// The device index of the PCI host bridge, if there is one.
    pub fn pci_host(&self) -> Option<u32> {
        self.pci_host
    }

    /// The functions of bus 0: (devfn, device index), by devfn.
    pub fn pci_devices(&self) -> impl Iterator<Item = (u8, u32)> + '_ {
        self.pci_functions.iter().map(|(&f, &d)| (f, d))
    }

    /// The bus-master (DMA) address space of a PCI function.
    pub fn dma_space(&self, device: u32) -> Option<AddressSpaceId> {
        Some(self.devices.get(device as usize)?.pci.as_ref()?.space)
    }

    /// The devfn of a PCI function.
    pub fn pci_devfn(&self, device: u32) -> Option<u8> {
        Some(self.devices.get(device as usize)?.pci.as_ref()?.devfn)
    }

    /// Brings the memory map in line with a function's config space (QEMU
    /// `pci_update_mappings` plus the bus-master enable): every BAR whose
    /// [`PciConfig::bar_address`] differs from what is mapped is unmapped
    /// and/or mapped (priority 1 in the `pci` container for memory BARs, in
    /// `io` for I/O BARs), and the bus-master alias follows
    /// `COMMAND.MASTER`. All changes of one call are one memory transaction,
    /// abandoned whole if one fails; none if nothing changed. Returns whether
    /// anything changed.
    pub fn pci_update_mappings(&mut self, device: u32) -> Result<bool, MachineError> {
        let slot = self
            .devices
            .get_mut(device as usize)
            .ok_or(MachineError::Config("no such device"))?;
        let func = slot
            .pci
            .as_ref()
            .ok_or(MachineError::Config("not a PCI function"))?;
        let (mapped, alias, master_now) = (func.mapped, func.bus_master, func.master);
        let cfg: &mut PciConfig = slot
            .dev
            .pci()
            .ok_or(MachineError::Config("not a PCI function"))?;
        let master = cfg.bus_master();
        let mut changes: Vec<BarChange> = Vec::new();
        for (bar, info) in cfg.bars() {
            let new = cfg.bar_address(bar);
            let old = mapped.get(usize::from(bar)).copied().flatten();
            if new == old {
                continue;
            }
            let region =
                *slot
                    .regions
                    .get(usize::from(info.region))
                    .ok_or(MachineError::Config(
                        "a BAR names a region the device does not have",
                    ))?;
            let container = if info.kind.is_io() {
                self.regions.io
            } else {
                self.regions.pci
            };
            changes.push((bar, region, container, old, new));
        }
        if changes.is_empty() && master == master_now {
            return Ok(false);
        }
        self.mem.begin();
        let mut r = Ok(());
        for &(_, region, container, old, new) in &changes {
            if old.is_some() {
                r = r.and_then(|_| self.mem.del_subregion(container, region));
            }
            if let Some(addr) = new {
                r = r.and_then(|_| self.mem.add_subregion_overlap(container, addr, region, 1));
            }
        }
        if master != master_now {
            r = r.and_then(|_| self.mem.set_enabled(alias, master));
        }
        if let Err(e) = r {
            self.mem.abandon()?;
            return Err(e.into());
        }
        self.mem.commit()?;
        if let Some(p) = self.devices[device as usize].pci.as_mut() {
            for &(bar, _, _, _, new) in &changes {
                p.mapped[usize::from(bar)] = new;
            }
            p.master = master;
        }
        Ok(true)
    }

    /// A configuration read of bus `bus`, function `devfn`: all ones for
    /// other buses and empty slots.
    pub fn pci_config_read(&mut self, bus: u8, devfn: u8, offset: u16, size: u8) -> u32 {
        let ones = all_ones(size.min(4)) as u32;
        if bus != 0 {
            return ones;
        }
        let Some(&d) = self.pci_functions.get(&devfn) else {
            return ones;
        };
        self.devices
            .get_mut(d as usize)
            .and_then(|s| s.dev.pci())
            .map_or(ones, |c| c.read(offset, size))
    }

    /// A configuration write to bus `bus`, function `devfn` (dropped for
    /// other buses and empty slots): [`PciConfig::write`],
    /// [`PciConfig::after_write`], the device's
    /// [`Device::pci_config_written`], then [`Machine::pci_update_mappings`]
    /// — all memory changes in one transaction (one commit), abandoned whole
    /// if one fails.
    pub fn pci_config_write(
        &mut self,
        bus: u8,
        devfn: u8,
        offset: u16,
        size: u8,
        value: u32,
    ) -> Result<(), MachineError> {
        if bus != 0 {
            return Ok(());
        }
        let Some(&d) = self.pci_functions.get(&devfn) else {
            return Ok(());
        };
        self.mem.begin();
        let r = self
            .with_device(d, |dev, ctx| {
                if let Some(cfg) = dev.pci() {
                    cfg.write(offset, size, value);
                    cfg.after_write(ctx, offset, size);
                }
                dev.pci_config_written(ctx, offset, size);
            })
            .and_then(|_| self.pci_update_mappings(d));
        match r {
            Ok(_) => {
                self.mem.commit()?;
                Ok(())
            }
            Err(e) => {
                self.mem.abandon()?;
                Err(e)
            }
        }
    }

    fn host_bridge(&mut self) -> Option<&mut PciHostBridge> {
        let d = self.pci_host?;
        self.devices
            .get_mut(d as usize)?
            .dev
            .as_any()
            .downcast_mut::<PciHostBridge>()
    }

    /// An access to the host bridge's regions (latch, data window, ECAM).
    fn pci_host_read(
        &mut self,
        region: RegionIndex,
        offset: u64,
        size: u8,
    ) -> Result<u64, MachineError> {
        let ones = all_ones(size);
        Ok(match region {
            host::REGION_CONFIG_ADDRESS => self
                .host_bridge()
                .map_or(ones, |h| h.address_read(offset, size)),
            host::REGION_CONFIG_DATA => {
                match self.host_bridge().and_then(|h| h.data_target(offset)) {
                    Some(a) => self.pci_config_read(a.bus, a.devfn, a.offset, size).into(),
                    None => ones,
                }
            }
            // An 8-byte ECAM access is two 4-byte ones (QEMU's maximum).
            host::REGION_ECAM if size == 8 => {
                let lo = self.ecam_read(offset, 4);
                let hi = self.ecam_read(offset.wrapping_add(4), 4);
                lo | (hi << 32)
            }
            host::REGION_ECAM => self.ecam_read(offset, size),
            _ => ones,
        })
    }

    fn ecam_read(&mut self, offset: u64, size: u8) -> u64 {
        if offset >= ECAM_SIZE {
            return all_ones(size);
        }
        let a = host::ecam_decode(offset);
        self.pci_config_read(a.bus, a.devfn, a.offset, size).into()
    }

    fn pci_host_write(
        &mut self,
        region: RegionIndex,
        offset: u64,
        size: u8,
        value: u64,
    ) -> Result<(), MachineError> {
        match region {
            host::REGION_CONFIG_ADDRESS => {
                if let Some(h) = self.host_bridge() {
                    h.address_write(offset, size, value);
                }
                Ok(())
            }
            host::REGION_CONFIG_DATA => {
                match self.host_bridge().and_then(|h| h.data_target(offset)) {
                    Some(a) => self.pci_config_write(a.bus, a.devfn, a.offset, size, value as u32),
                    None => Ok(()),
                }
            }
            host::REGION_ECAM if size == 8 => {
                self.ecam_write(offset, 4, value as u32)?;
                self.ecam_write(offset.wrapping_add(4), 4, (value >> 32) as u32)
            }
            host::REGION_ECAM => self.ecam_write(offset, size, value as u32),
            _ => Ok(()),
        }
    }

    fn ecam_write(&mut self, offset: u64, size: u8, value: u32) -> Result<(), MachineError> {
        if offset >= ECAM_SIZE {
            return Ok(());
        }
        let a = host::ecam_decode(offset);
        self.pci_config_write(a.bus, a.devfn, a.offset, size, value)
    }

    /// `info mtree` (tree, with disabled regions) and `info mtree -f`.
    pub fn mtree(&mut self) -> Result<(String, String), MachineError> {
        let tree = crate::memory::mtree::format_tree(&self.mem, true)?;
        let flat = crate::memory::mtree::format_flat(&mut self.mem)?;
        Ok((tree, flat))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::debug_exit::DebugExit;
    use crate::devices::test_device::{TestDevice, TEST_DEVICE_ID};
    use crate::devices::uart::Uart16550;

    /// A PC with the UART and debug-exit.
    pub(crate) fn pc(ram: u64, lowmem: u64) -> Machine {
        let mut m = Machine::new_pc(&MachineConfig {
            ram_bytes: ram,
            lowmem,
        })
        .unwrap();
        m.map_pio("serial", 0x3F8, 8, Box::new(Uart16550::new()))
            .unwrap();
        m.map_pio("debug-exit", 0xF4, 4, Box::new(DebugExit))
            .unwrap();
        m
    }

    #[test]
    fn ram_splits_around_4g_and_firmware_is_read_only() {
        let mut m = pc(64 << 20, 16 << 20);
        assert_eq!(
            m.memory_target(0x1000).unwrap(),
            MemTarget::Ram {
                block: 0,
                offset: 0x1000,
                readonly: false,
                left: 0xE0000 - 0x1000
            }
        );
        assert_eq!(
            m.memory_target(0x10_0000).unwrap(),
            MemTarget::Ram {
                block: 0,
                offset: 0x10_0000,
                readonly: false,
                left: (15 << 20)
            }
        );
        assert_eq!(
            m.memory_target((1 << 32) + 5).unwrap(),
            MemTarget::Ram {
                block: 0,
                offset: (16 << 20) + 5,
                readonly: false,
                left: (48 << 20) - 5
            }
        );
        assert_eq!(m.memory_target(16 << 20).unwrap(), MemTarget::Unmapped);
        assert_eq!(
            m.memory_target(0xFFFF_FFF0).unwrap(),
            MemTarget::Ram {
                block: 1,
                offset: BIOS_SIZE - 16,
                readonly: true,
                left: 16
            }
        );
        assert_eq!(
            m.memory_target(0xF_FFF0).unwrap(),
            MemTarget::Ram {
                block: 1,
                offset: BIOS_SIZE - 16,
                readonly: true,
                left: 16
            }
        );
        assert_eq!(m.memory_target(1 << 40).unwrap(), MemTarget::Unmapped);
        let (tree, flat) = m.mtree().unwrap();
        assert!(
            tree.contains("alias ram-above-4g @pc.ram 0000000001000000-0000000003ffffff"),
            "{tree}"
        );
        assert!(
            flat.contains("00000000000e0000-00000000000fffff (prio 0, rom): pc.bios"),
            "{flat}"
        );
    }

    #[test]
    fn port_io_goes_through_the_io_space() {
        let mut m = pc(32 << 20, 3 << 30);
        assert_eq!(m.pio_write(0x3F8, 1, u64::from(b'x')).unwrap(), None);
        assert_eq!(m.device::<Uart16550>("serial").unwrap().take_output(), b"x");
        assert_eq!(m.pio_write(0xF4, 4, 3).unwrap(), Some(3));
        assert_eq!(m.pio_read(0x80, 1).unwrap(), 0xff);
        assert_eq!(m.pio_read(0x3FD, 1).unwrap() & 0x60, 0x60);
        assert_eq!(m.stats.unclaimed_pio, 1);
    }

    #[test]
    fn device_remap_is_one_transaction() {
        let mut m = pc(32 << 20, 3 << 30);
        let window = m
            .mem
            .create_alias(
                "tern-test-window",
                TEST_WINDOW_SIZE.into(),
                m.regions.ram,
                0,
            )
            .unwrap();
        m.mem.set_enabled(window, false).unwrap();
        let sys = m.regions.system;
        m.mem.add_subregion(sys, TEST_WINDOW_BASE, window).unwrap();
        let pci = m.regions.pci;
        let r = m
            .map_mmio(
                "tern-test",
                pci,
                TEST_DEVICE_BASE,
                0x1000,
                Box::new(TestDevice::default()),
            )
            .unwrap();
        let _ = r;
        let dev = m.device::<TestDevice>("tern-test").unwrap();
        dev.window = Some(window);
        let MemTarget::Device { handle, .. } = m.memory_target(TEST_DEVICE_BASE).unwrap() else {
            panic!("no device")
        };
        assert_eq!(m.device_read(handle, 0, 4).unwrap(), TEST_DEVICE_ID);
        let commits = m.mem.stats().commits;
        m.device_write(handle, 8, 8, 0xFEB4_0000 | 1).unwrap();
        assert_eq!(
            m.mem.stats().commits,
            commits + 1,
            "one commit for both changes"
        );
        assert_eq!(
            m.memory_target(TEST_DEVICE_BASE).unwrap(),
            MemTarget::Unmapped
        );
        assert!(matches!(
            m.memory_target(0xFEB4_0000).unwrap(),
            MemTarget::Device { .. }
        ));
        assert!(matches!(
            m.memory_target(TEST_WINDOW_BASE + 8).unwrap(),
            MemTarget::Ram {
                block: 0,
                offset: 8,
                ..
            }
        ));
        assert_eq!(m.stats.remaps, 1);
    }

    #[test]
    fn write_notifiers_take_matching_writes() {
        let mut m = pc(32 << 20, 3 << 30);
        let pci = m.regions.pci;
        let r = m
            .map_mmio(
                "tern-test",
                pci,
                TEST_DEVICE_BASE,
                0x1000,
                Box::new(TestDevice::default()),
            )
            .unwrap();
        m.add_write_notifier(r, 0x20, 4, None, 7).unwrap();
        assert_eq!(
            m.notify_write(TEST_DEVICE_BASE + 0x20, 4, 1).unwrap(),
            Some(7)
        );
        assert_eq!(
            m.notify_write(TEST_DEVICE_BASE + 0x20, 2, 1).unwrap(),
            None,
            "size must match"
        );
        assert_eq!(m.notify_write(TEST_DEVICE_BASE + 0x24, 4, 1).unwrap(), None);
        // The notifier moves with its region.
        m.apply(&[MemoryRequest::Move {
            region: r,
            addr: 0xFEC0_0000,
        }])
        .unwrap();
        assert_eq!(m.notify_write(TEST_DEVICE_BASE + 0x20, 4, 1).unwrap(), None);
        assert_eq!(m.notify_write(0xFEC0_0020, 4, 9).unwrap(), Some(7));
        assert_eq!(m.stats.notifier_hits, 2);
        assert_eq!(
            m.device::<TestDevice>("tern-test").unwrap().notified,
            2,
            "each hit reached the device's notify, not its write"
        );
        assert_eq!(m.device::<TestDevice>("tern-test").unwrap().writes, 0);
    }

    #[test]
    fn device_state_saved_and_loaded_by_identity() {
        let mut m = pc(32 << 20, 3 << 30);
        m.map_pio("serial", 0x2F8, 8, Box::new(Uart16550::new()))
            .unwrap();
        let ids: Vec<_> = m.device_ids().cloned().collect();
        assert_eq!(
            ids.iter()
                .map(|d| (d.idstr.as_str(), d.instance))
                .collect::<Vec<_>>(),
            [("serial", 0), ("debug-exit", 0), ("serial", 1)]
        );
        m.pio_write(0x3FF, 1, 0x42).unwrap();
        let saved = m.save_devices();
        assert_eq!(saved.len(), 2, "debug-exit has no state");
        let mut n = pc(32 << 20, 3 << 30);
        n.map_pio("serial", 0x2F8, 8, Box::new(Uart16550::new()))
            .unwrap();
        for (id, version, bytes) in &saved {
            n.load_device(id, *version, bytes).unwrap();
        }
        assert_eq!(n.pio_read(0x3FF, 1).unwrap(), 0x42);
        let (id, _, bytes) = &saved[0];
        assert!(matches!(
            n.load_device(id, 9, bytes),
            Err(LoadDeviceError::State(StateError::Version { got: 9, .. }))
        ));
        let missing = DeviceId {
            idstr: "serial".into(),
            instance: 5,
        };
        assert_eq!(
            n.load_device(&missing, 1, bytes),
            Err(LoadDeviceError::NoSuchDevice)
        );
    }

    #[test]
    fn bad_configs_are_errors() {
        assert!(Machine::new_pc(&MachineConfig {
            ram_bytes: 0,
            lowmem: 1 << 30
        })
        .is_err());
        assert!(Machine::new_pc(&MachineConfig {
            ram_bytes: 1 << 20,
            lowmem: 0xF000_0000
        })
        .is_err());
    }
}
