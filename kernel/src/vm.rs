//! A VM: a PC-like [`Machine`] (memory and I/O maps built with the memory
//! API, devices), its EPT kept by an [`EptListener`], its host memory, and
//! its vCPU; plus the VM's half of the exit dispatch (port I/O, MMIO and
//! unmapped accesses, hypercalls, halts).

use crate::mem::{Frames, HostMem};
use crate::migrate::{Checkpoints, MigrateConfig, Outgoing, SourceReport, TargetReport, Transport};
use crate::vmx::instr;
use crate::vmx::vcpu::{ExitCounters, StartState, Vcpu, VcpuError, VmHooks};
use crate::vmx::Vmx;
use alloc::boxed::Box;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use hv_core::addr::{GuestPhysAddr, HostPhysAddr};
use hv_core::devices::debug_exit::DebugExit;
use hv_core::devices::fw_cfg::FwCfg;
use hv_core::devices::test_device::TestDevice;
use hv_core::devices::uart::{escape_line, Uart16550};
use hv_core::emulate::{MmioExit, Regs, StringIo};
use hv_core::ept::{EptStats, PageSizes};
use hv_core::ept_listener::{EptCounters, EptHost, EptListener, EptMode, RamBlock};
pub use hv_core::exits::RomWrites;
use hv_core::exits::{self, ExitDone, ExitError, PortDone};
use hv_core::frames::FrameAllocator;
use hv_core::guest_mem::{GuestRam, RamChunk};
use hv_core::irq::Nanos;
use hv_core::loader::{self, LoadError, MULTIBOOT_BOOTLOADER_MAGIC};
use hv_core::machine::{
    Machine, MachineConfig, MachineError, BIOS_BLOCK, TEST_DEVICE_BASE, TEST_WINDOW_BASE,
    TEST_WINDOW_SIZE,
};
use hv_core::memory::RangeTarget;
use hv_core::phys::PhysAccess;
use hv_core::vcpu::VcpuState;
use hv_core::vcpu::{hypercall, ExitAction, StopReason, VcpuExit};
use hv_core::virtio::blk::VirtioBlk;
use hv_core::virtio::pci::VirtioPci;
use hv_core::virtio::spec::DeviceSpec;
use hv_core::vmx::exit::Access;

/// Why a VM could not be created.
#[derive(Debug)]
pub enum VmError {
    OutOfMemory(&'static str),
    Machine(MachineError),
    Load(LoadError),
    Ept(String),
    Vcpu(VcpuError),
}

impl core::fmt::Display for VmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfMemory(what) => write!(f, "out of host memory for {what}"),
            Self::Machine(e) => write!(f, "{e}"),
            Self::Load(e) => write!(f, "cannot load the guest image: {e}"),
            Self::Ept(e) => write!(f, "EPT: {e}"),
            Self::Vcpu(e) => write!(f, "vCPU: {e}"),
        }
    }
}

impl From<MachineError> for VmError {
    fn from(e: MachineError) -> Self {
        Self::Machine(e)
    }
}

/// How a VM is configured.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub name: String,
    pub machine: MachineConfig,
    /// Guest command line (multiboot).
    pub cmdline: String,
    /// Preemption-timer slices before the VM is stopped (0: unlimited).
    pub budget: u64,
    pub rom_writes: RomWrites,
    pub ept_mode: EptMode,
    /// Print the memory map when the VM stops.
    pub print_mtree: bool,
    /// The host TSC frequency (the VM's clock).
    pub tsc_hz: u64,
    /// Add QEMU's pc-testdev (kvm-unit-tests' test device).
    pub testdev: bool,
    /// Test mode (`break_vm_entry`): the first VM entry is made to fail
    /// (a control field the CPU refuses), to show the failure in the stop
    /// report.
    pub break_vm_entry: bool,
    /// The virtio devices on PCI (`devices=`).
    pub devices: DeviceSpec,
    /// Size of each RAM disk in sectors (`disk=`).
    pub disk_sectors: u64,
    /// Where the VM migrates when the guest asks (`migrate=local|disk`),
    /// with or without pre-copy (`migrate.precopy=`), and how migrated
    /// device state is loaded (`migrate.commit=`).
    pub migrate: MigrateConfig,
}

/// Seconds since 1970 that a VM's RTC reads when it starts (fixed, so runs
/// are repeatable): 2026-01-01 00:00:00 UTC.
const RTC_EPOCH: u64 = 1_767_225_600;

/// The kernel side of the EPT listener: tables in host frames, real INVEPT.
pub struct KernelEptHost {
    mem: HostMem,
}

impl KernelEptHost {
    fn new() -> Self {
        Self {
            // SAFETY: the EPT code holding this host reads and writes only
            // the table frames it allocated through it and has not freed
            // (they are freed only after the INVEPT that retires them).
            mem: unsafe { HostMem::new() },
        }
    }
}

impl PhysAccess for KernelEptHost {
    fn read(&self, addr: HostPhysAddr, buf: &mut [u8]) {
        self.mem.read(addr, buf)
    }
    fn write(&mut self, addr: HostPhysAddr, data: &[u8]) {
        self.mem.write(addr, data)
    }
}

impl FrameAllocator for KernelEptHost {
    fn alloc_contiguous(&mut self, size: u64, align: u64) -> Option<HostPhysAddr> {
        Frames.alloc_contiguous(size, align)
    }
    fn free_contiguous(&mut self, addr: HostPhysAddr, size: u64) {
        Frames.free_contiguous(addr, size)
    }
}

impl EptHost for KernelEptHost {
    fn invept(&mut self, eptp: u64) -> bool {
        match instr::invept_single(eptp) {
            Ok(()) => true,
            Err(e) => {
                log::error!("INVEPT {eptp:#x}: {e}");
                false
            }
        }
    }
}

/// A virtual machine.
pub struct Vm {
    pub name: String,
    machine: Machine,
    ept: Rc<RefCell<EptListener<KernelEptHost>>>,
    blocks: Vec<(HostPhysAddr, u64)>,
    vcpu: Option<Vcpu>,
    console_line: Vec<u8>,
    rom_writes: RomWrites,
    print_mtree: bool,
    pub mmio_exits: u64,
    pub rom_writes_dropped: u64,
    tsc_hz: u64,
    /// Host TSC when the VM was created: its virtual time 0.
    start_tsc: u64,
    /// Host TSC ticks a halted vCPU waited.
    pub halt_wait_tsc: u64,
    pub halts: u64,
    /// Time slices used and the budget (0: none), when the vCPU stopped.
    slices: (u64, u64),
    /// How the VM was configured (a migration target is built from it).
    cfg: VmConfig,
    /// The guest asked to be migrated; the vCPU stops before its next entry.
    migrate_requested: bool,
    /// The migration under way (pre-copy), and its checkpoints.
    outgoing: Option<Outgoing>,
    checkpoints: Checkpoints,
    /// How many migrations brought the VM here (hypercall
    /// MIGRATION_GENERATION).
    pub generation: u64,
    /// A failed migration left the memory map in doubt: the VM must not
    /// run on.
    poisoned: bool,
}

/// What a VM did, for the exit summary.
pub struct VmReport {
    pub stop: StopReason,
    pub exits: ExitCounters,
    pub ept: EptStats,
    pub ept_counters: EptCounters,
    pub unclaimed_io: u64,
    pub memory_commits: u64,
    pub remaps: u64,
    pub mmio_exits: u64,
    pub notifier_hits: u64,
    pub rom_writes_dropped: u64,
    pub irq: hv_core::platform::PlatformStats,
    pub halts: u64,
    /// Milliseconds a halted vCPU waited.
    pub halt_wait_ms: u64,
    /// Time slices used and the budget (0: none).
    pub slices: (u64, u64),
    /// Per-device I/O counters: (idstr, counters).
    pub devices: Vec<(String, Vec<(&'static str, u64)>)>,
}

/// Bytes of the firmware ROM: a pattern the guest can check through both
/// of its addresses.
pub fn bios_byte(i: u64) -> u8 {
    (i.wrapping_mul(7) ^ 0x5A) as u8
}

impl Vm {
    /// Builds a VM from a multiboot guest image.
    pub fn create(
        vmx: &Vmx,
        vpid: u16,
        image: &[u8],
        modules: &[loader::Module],
        cfg: &VmConfig,
    ) -> Result<Self, VmError> {
        Self::build(vmx, vpid, Some((image, modules)), cfg)
    }

    /// Builds a VM with its devices and RAM; with an image, loads it and
    /// sets the vCPU at its entry, without one (a migration target) leaves
    /// RAM zero and the vCPU to be restored.
    fn build(
        vmx: &Vmx,
        vpid: u16,
        image: Option<(&[u8], &[loader::Module])>,
        cfg: &VmConfig,
    ) -> Result<Self, VmError> {
        let modules = image.map_or(&[][..], |(_, m)| m);
        let mut machine = Machine::new_pc(&cfg.machine)?;
        machine.map_pio("serial", 0x3F8, 8, Box::new(Uart16550::new()))?;
        machine.map_pio("debug-exit", 0xF4, 4, Box::new(DebugExit))?;
        let pci = machine.regions.pci;
        let test = machine.map_mmio(
            "tern-test",
            pci,
            TEST_DEVICE_BASE,
            0x1000,
            Box::new(TestDevice::default()),
        )?;
        machine.add_platform(cfg.tsc_hz, RTC_EPOCH)?;
        if cfg.testdev {
            machine.add_pc_testdev()?;
        }
        machine.add_pci_host()?;
        // A boot module of this VM whose line has `disk` is the first
        // disk's contents.
        let image_for_disk = modules
            .iter()
            .find(|m| boot::info::option(m.cmdline, "disk").is_some())
            .map(|m| m.data);
        hv_core::virtio::spec::add_devices(
            &mut machine,
            &cfg.devices,
            cfg.disk_sectors,
            image_for_disk,
        )?;
        let ram_bytes = cfg.machine.ram_bytes;
        let fw = machine.add_device("fw_cfg", Box::new(FwCfg::new(1, ram_bytes)));
        let io = machine.regions.io;
        for (i, (port, len)) in [(0x510u16, 2u64), (0x514, 8)].into_iter().enumerate() {
            let r =
                machine.add_device_region(fw, if i == 0 { "fwcfg" } else { "fwcfg.dma" }, len)?;
            machine
                .mem
                .add_subregion(io, port.into(), r)
                .map_err(MachineError::from)?;
        }
        let ram = machine.regions.ram;
        let window = machine
            .mem
            .create_alias("tern-test-window", TEST_WINDOW_SIZE.into(), ram, 0)
            .map_err(MachineError::from)?;
        machine
            .mem
            .set_enabled(window, false)
            .map_err(MachineError::from)?;
        let system = machine.regions.system;
        machine
            .mem
            .add_subregion(system, TEST_WINDOW_BASE, window)
            .map_err(MachineError::from)?;
        // A notify register, as a virtio queue has: writes to it are taken
        // by the notifier fast path and reach the device's notify.
        machine.add_write_notifier(test, 0x20, 4, None, 1)?;
        if let Some(d) = machine.device::<TestDevice>("tern-test") {
            d.window = Some(window);
            d.layout = Some((TEST_DEVICE_BASE, false));
        }

        // Host memory for each block, 2 MiB aligned so EPT can use large
        // pages. From here on `vm` owns it (its Drop gives it back).
        let mut blocks = Vec::new();
        for &size in &machine.blocks {
            let size = size.div_ceil(4096) * 4096;
            match Frames.alloc_contiguous(size, 2 << 20) {
                Some(h) => blocks.push((h, size)),
                None => {
                    for (h, s) in blocks {
                        Frames.free_contiguous(h, s);
                    }
                    return Err(VmError::OutOfMemory("guest RAM"));
                }
            }
        }
        let sizes = PageSizes {
            two_mib: vmx.caps.ept_2m_pages(),
            one_gib: vmx.caps.ept_1g_pages(),
        };
        let ram_blocks: Vec<RamBlock> = blocks
            .iter()
            .map(|&(hpa, size)| RamBlock { hpa, size })
            .collect();
        // SAFETY: guest memory passes only addresses inside these RAM blocks
        // (every access is checked against its block), which this VM
        // allocated and frees only when it is dropped, after the machine.
        machine.attach_ram(ram_blocks.clone(), Box::new(unsafe { HostMem::new() }));
        let listener = EptListener::new(
            KernelEptHost::new(),
            sizes,
            ram_blocks,
            vmx.caps.ept_ad_bits(),
            cfg.ept_mode,
        );
        let listener = match listener {
            Ok(l) => Rc::new(RefCell::new(l)),
            Err(e) => {
                for (h, s) in blocks {
                    Frames.free_contiguous(h, s);
                }
                return Err(VmError::Ept(alloc::format!("{e:?}")));
            }
        };
        let mut vm = Self {
            name: cfg.name.clone(),
            machine,
            ept: listener.clone(),
            blocks,
            vcpu: None,
            console_line: Vec::new(),
            rom_writes: cfg.rom_writes,
            print_mtree: cfg.print_mtree,
            mmio_exits: 0,
            rom_writes_dropped: 0,
            tsc_hz: cfg.tsc_hz.max(1),
            start_tsc: crate::cpu::rdtsc(),
            halt_wait_tsc: 0,
            halts: 0,
            slices: (0, 0),
            cfg: cfg.clone(),
            migrate_requested: false,
            outgoing: None,
            checkpoints: Checkpoints::default(),
            generation: 0,
            poisoned: false,
        };
        let space = vm.machine.memory;
        vm.machine
            .mem
            .add_listener(space, 0, listener)
            .map_err(MachineError::from)?;
        if let Some(e) = vm.ept.borrow_mut().take_error() {
            return Err(VmError::Ept(alloc::format!("{e:?}")));
        }

        // Firmware contents, then the guest image through the RAM map.
        let (bios_hpa, bios_size) = vm.blocks[BIOS_BLOCK as usize];
        let rom: Vec<u8> = (0..bios_size).map(bios_byte).collect();
        // SAFETY: the firmware block is this VM's own RAM block and `rom`
        // is exactly its size.
        let mut host = unsafe { HostMem::new() };
        host.write(bios_hpa, &rom);
        let start = match image {
            Some((image, modules)) => {
                let ram_map = vm.guest_ram()?;
                let loaded =
                    loader::load_multiboot(image, &cfg.cmdline, modules, &ram_map, &mut host)
                        .map_err(VmError::Load)?;
                log::info!(
                    "[{}] loaded image {:#x}-{:#x}, entry {:#x}, {} MiB RAM",
                    vm.name,
                    loaded.image.0,
                    loaded.image.1,
                    loaded.entry,
                    cfg.machine.ram_bytes >> 20
                );
                StartState {
                    rip: loaded.entry.into(),
                    rax: MULTIBOOT_BOOTLOADER_MAGIC.into(),
                    rbx: loaded.info.into(),
                }
            }
            None => StartState {
                rip: 0,
                rax: 0,
                rbx: 0,
            },
        };
        let eptp = vm.ept.borrow().eptp();
        let mut vcpu = Vcpu::new(vmx, vpid, eptp, start).map_err(VmError::Vcpu)?;
        vcpu.budget = cfg.budget;
        if cfg.break_vm_entry {
            if let Err(e) = vcpu.break_vm_entry_for_test() {
                vcpu.destroy();
                return Err(VmError::Vcpu(e.into()));
            }
        }
        vm.vcpu = Some(vcpu);
        Ok(vm)
    }

    /// Guest RAM (writable RAM ranges of the current memory map).
    fn guest_ram(&mut self) -> Result<GuestRam, VmError> {
        let mut ram = GuestRam::new();
        let view = self
            .machine
            .mem
            .flat_view(self.machine.memory)
            .map_err(MachineError::from)?;
        for r in view.ranges() {
            if let (RangeTarget::Ram(b), false) = (r.target, r.readonly) {
                let &(hpa, _) = self
                    .blocks
                    .get(b.block as usize)
                    .ok_or(VmError::OutOfMemory("RAM block"))?;
                let size = r.size.min(u64::MAX as u128) as u64;
                let hpa = HostPhysAddr::new(hpa.as_u64() + b.offset + r.offset_in_region);
                let chunk = RamChunk {
                    gpa: GuestPhysAddr::new(r.start),
                    hpa,
                    size,
                };
                ram.add(chunk)
                    .map_err(|e| VmError::Load(LoadError::Memory(e)))?;
            }
        }
        Ok(ram)
    }

    /// Prints `info mtree` and `info mtree -f` of the VM.
    pub fn print_mtree(&mut self) {
        match self.machine.mtree() {
            Ok((tree, flat)) => {
                crate::println!("[{}] memory map (info mtree):", self.name);
                crate::print!("{tree}");
                crate::println!("[{}] flat views (info mtree -f):", self.name);
                crate::print!("{flat}");
            }
            Err(e) => crate::println!("[{}] cannot print the memory map: {e}", self.name),
        }
    }

    /// The VM's EPT listener.
    pub fn ept_listener(&self) -> core::cell::RefMut<'_, EptListener<KernelEptHost>> {
        self.ept.borrow_mut()
    }

    /// The VM's machine (devices, memory map).
    pub fn machine(&mut self) -> &mut Machine {
        &mut self.machine
    }

    /// Host memory of each RAM block: (address, size).
    pub fn blocks(&self) -> &[(HostPhysAddr, u64)] {
        &self.blocks
    }

    /// Sizes of the RAM blocks.
    pub fn block_sizes(&self) -> Vec<u64> {
        self.machine.blocks.clone()
    }

    /// Turns dirty logging of guest RAM on or off (the EPT maps it with
    /// 4 KiB pages while it is on).
    pub fn set_ram_logging(&mut self, on: bool) -> Result<(), String> {
        let ram = self.machine.regions.ram;
        let mask = if on { hv_core::dirty::LOG_MIGRATION } else { 0 };
        self.machine
            .mem
            .set_dirty_log_mask(ram, mask)
            .map_err(|e| alloc::format!("dirty logging: {e}"))?;
        if let Some(e) = self.ept.borrow_mut().take_error() {
            return Err(alloc::format!("EPT while changing dirty logging: {e:?}"));
        }
        self.machine
            .log_dma(on)
            .map_err(|e| alloc::format!("dirty logging: {e}"))
    }

    /// After a failed migration: dirty logging off, or, if that fails too,
    /// the VM is poisoned and stops before its next entry.
    pub fn end_logging_after_failure(&mut self) {
        if let Err(e) = self.set_ram_logging(false) {
            crate::println!(
                "[{}] dirty logging stays on after a failed migration: {e}",
                self.name
            );
            self.poisoned = true;
        }
    }

    /// The stopped vCPU's state.
    pub fn capture_vcpu(&self) -> Result<VcpuState, String> {
        let v = self.vcpu.as_ref().ok_or("no vCPU")?;
        v.capture().map_err(|e| alloc::format!("vCPU: {e}"))
    }

    /// Gives the vCPU a migrated state.
    pub fn restore_vcpu(&mut self, s: &VcpuState) -> Result<(), String> {
        let v = self.vcpu.as_mut().ok_or("no vCPU")?;
        v.restore(s).map_err(|e| alloc::format!("vCPU state: {e}"))
    }

    /// Points the stopped vCPU at the EPT's current root (a rebuild in
    /// `ept=rebuild` mode moves it).
    fn sync_eptp(&mut self) {
        let eptp = self.ept.borrow().eptp();
        if let Some(v) = self.vcpu.as_mut() {
            let _ = v.set_eptp(eptp);
        }
    }

    /// Whether this VM's migrations send RAM while it runs.
    pub fn precopy(&self) -> bool {
        self.cfg.migrate.precopy
    }

    /// Whether a migration of this VM is under way.
    pub fn migrating(&self) -> bool {
        self.outgoing.is_some()
    }

    /// Starts migrating this (stopped) VM: for a local migration builds the
    /// target from the same configuration (its disks are this VM's: shared
    /// storage); opens the stream with RAM logging on.
    pub fn begin_migration(&mut self, vmx: &Vmx, vpid: u16) -> Result<(), String> {
        if !self.ept.borrow().dirty_tracking() {
            // Logging without EPT A/D write-protects RAM, and the exit path
            // does not resolve those faults yet.
            return Err(
                "this CPU has no EPT accessed/dirty flags; live migration needs them".into(),
            );
        }
        let target = match self.cfg.migrate.transport {
            Some(Transport::Local) => {
                let mut target = Self::build(vmx, vpid, None, &self.cfg)
                    .map_err(crate::migrate::target_error)?;
                target.name = alloc::format!("{}'", self.name);
                for (idstr, disk) in crate::migrate::blk_disks(self) {
                    type Blk = VirtioPci<VirtioBlk>;
                    if let Some(t) = target.machine.device::<Blk>(&idstr) {
                        t.backend.attach_disk(disk);
                    }
                }
                Some(target)
            }
            Some(Transport::Disk) => None,
            None => return Err("this VM has no migration configured".into()),
        };
        let limit = u128::from(self.cfg.migrate.downtime_ms) * u128::from(self.tsc_hz) / 1000;
        let out = Outgoing::start(
            self,
            target,
            self.cfg.migrate.precopy,
            u64::try_from(limit).unwrap_or(u64::MAX),
        );
        self.sync_eptp();
        let out = out?;
        self.checkpoints = Checkpoints::default();
        self.outgoing = Some(out);
        Ok(())
    }

    /// Ends the migration with the vCPU stopped: the rest of the stream,
    /// then (local) the target loads it. On success a local target is
    /// returned ready to run (`None` when the stream went to the disk, and
    /// this VM is done); on error this VM carries on (logging off, stream
    /// dropped).
    pub fn finish_migration(
        &mut self,
    ) -> Result<(Option<Vm>, SourceReport, Option<TargetReport>), String> {
        let mut out = self.outgoing.take().ok_or("no migration under way")?;
        let mut cp = core::mem::take(&mut self.checkpoints);
        let stopped = crate::cpu::rdtsc();
        cp.0.push(("src-downtime-start", stopped));
        cp.0.push(("src-vm-stopped", stopped));
        // The guest's TSC and virtual time both stop here.
        let r = self
            .capture_vcpu()
            .and_then(|state| out.finish(self, &state, &mut cp));
        self.sync_eptp();
        let (stream, stream_bytes) = match r {
            Ok(s) => s,
            Err(e) => {
                self.end_logging_after_failure();
                self.sync_eptp();
                return Err(e);
            }
        };
        let mode = self.cfg.migrate.mode;
        let mut source = SourceReport {
            transport: if out.target.is_some() {
                Transport::Local
            } else {
                Transport::Disk
            },
            mode,
            precopy: out.precopy,
            iterations: out.iterations,
            pages: out.pages_sent,
            zero_pages: out.zero_pages,
            stream_bytes,
            downtime_tsc: 0,
            total_tsc: 0,
            checkpoints: Checkpoints::default(),
            tsc_hz: self.tsc_hz,
            rate: out.rate(self.tsc_hz),
            downtime_limit_ms: self.cfg.migrate.downtime_ms,
        };
        let Some(mut target) = out.target.take() else {
            // On the disk: this VM stops here, as QEMU's source after
            // `migrate` completes.
            let now = crate::cpu::rdtsc();
            cp.0.push(("src-downtime-end", now));
            source.downtime_tsc = now - stopped;
            source.total_tsc = now - out.started;
            source.checkpoints = cp;
            return Ok((None, source, None));
        };
        let (loaded, ept_updates, invepts) =
            crate::migrate::load_into(&mut target, &stream, mode, false)?;
        target.sync_eptp();
        cp.0.push(("dst-precopy-loadvm-completes", crate::cpu::rdtsc()));
        if let (Some(src), Some(dst)) = (self.vcpu.as_ref(), target.vcpu.as_mut()) {
            dst.budget = src.budget;
            dst.slices_used = src.slices_used;
        }
        // Virtual time stood still while the vCPU was stopped.
        let now = crate::cpu::rdtsc();
        target.start_tsc = self.start_tsc.wrapping_add(now.wrapping_sub(stopped));
        target.machine.now = self.machine.now;
        target.machine.guest_tsc = self.machine.guest_tsc;
        cp.0.push(("src-downtime-end", now));
        cp.0.push(("dst-vm-started", now));
        source.downtime_tsc = now - stopped;
        source.total_tsc = now - out.started;
        source.checkpoints = cp.clone();
        let report = TargetReport {
            loaded,
            stream_bytes: stream.len(),
            ept_updates,
            invepts,
            checkpoints: cp,
            tsc_hz: self.tsc_hz,
        };
        Ok((Some(*target), source, Some(report)))
    }

    /// Builds a VM from a migration stream another Tern wrote (a boot
    /// module with `incoming` on its line): RAM, disks, devices in one
    /// transaction, the vCPU. The VM's virtual time continues from the
    /// stream's.
    pub fn incoming(
        vmx: &Vmx,
        vpid: u16,
        stream: &[u8],
        cfg: &VmConfig,
    ) -> Result<(Self, TargetReport), String> {
        let t0 = crate::cpu::rdtsc();
        let mut vm = Self::build(vmx, vpid, None, cfg).map_err(crate::migrate::target_error)?;
        let (loaded, ept_updates, invepts) =
            crate::migrate::load_into(&mut vm, stream, cfg.migrate.mode, true)?;
        vm.sync_eptp();
        let mut cp = Checkpoints::default();
        cp.0.push(("dst-incoming-start", t0));
        cp.0.push(("dst-precopy-loadvm-completes", crate::cpu::rdtsc()));
        let (now, guest_tsc) = vm
            .machine
            .platform_mut()
            .map_or((0, 0), |p| (p.now, p.guest_tsc));
        let ticks = u64::try_from(u128::from(now) * u128::from(vm.tsc_hz) / 1_000_000_000)
            .map_err(|_| String::from("the stream's virtual time does not fit this host's TSC"))?;
        let start = crate::cpu::rdtsc();
        vm.start_tsc = start.wrapping_sub(ticks);
        vm.machine.now = now;
        vm.machine.guest_tsc = guest_tsc;
        cp.0.push(("dst-vm-started", start));
        let report = TargetReport {
            loaded,
            stream_bytes: stream.len(),
            ept_updates,
            invepts,
            checkpoints: cp,
            tsc_hz: vm.tsc_hz,
        };
        Ok((vm, report))
    }

    /// Runs the VM until it stops.
    pub fn run(&mut self) -> VmReport {
        let Some(mut vcpu) = self.vcpu.take() else {
            return self.report(StopReason::NoVcpu, ExitCounters::default());
        };
        let stop = vcpu.run(self);
        self.flush_console(true);
        if !stop.is_guest_exit() {
            crate::println!("[{}] VM stopped: {stop}", self.name);
            vcpu.dump(&self.name);
        }
        let exits = vcpu.exits.clone();
        self.slices = (vcpu.slices_used, vcpu.budget);
        self.vcpu = Some(vcpu);
        if self.print_mtree {
            self.print_mtree();
        }
        self.report(stop, exits)
    }

    fn report(&mut self, stop: StopReason, exits: ExitCounters) -> VmReport {
        let irq = self
            .machine
            .platform_mut()
            .map(|p| p.stats)
            .unwrap_or_default();
        let halt_wait_ms = (u128::from(self.halt_wait_tsc) * 1000 / u128::from(self.tsc_hz)) as u64;
        let ept = self.ept.borrow();
        VmReport {
            stop,
            exits,
            ept: ept.ept_stats(),
            ept_counters: ept.counters,
            unclaimed_io: self.machine.stats.unclaimed_pio,
            memory_commits: self.machine.mem.stats().commits,
            remaps: self.machine.stats.remaps,
            mmio_exits: self.mmio_exits,
            notifier_hits: self.machine.stats.notifier_hits,
            rom_writes_dropped: self.rom_writes_dropped,
            irq,
            halts: self.halts,
            halt_wait_ms,
            slices: self.slices,
            devices: self
                .machine
                .device_counters()
                .into_iter()
                .map(|(id, c)| (id.idstr, c))
                .collect(),
        }
    }

    /// Virtual time: nanoseconds since the VM was created.
    fn now(&self, tsc: u64) -> Nanos {
        let ticks = tsc.wrapping_sub(self.start_tsc);
        (u128::from(ticks) * 1_000_000_000 / u128::from(self.tsc_hz)) as u64
    }

    /// Host TSC ticks from `now` to `at`.
    fn ticks_until(&self, now: Nanos, at: Nanos) -> u64 {
        let ns = at.saturating_sub(now);
        let ticks = (u128::from(ns) * u128::from(self.tsc_hz)).div_ceil(1_000_000_000);
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// Lets the machine's timers catch up with the present.
    fn advance(&mut self, vcpu: &Vcpu) -> Result<Nanos, StopReason> {
        let now = self.now(crate::cpu::rdtsc());
        match self.machine.advance(now, vcpu.guest_tsc()) {
            Ok(()) => Ok(now),
            Err(e) => Err(StopReason::MemoryMap(e)),
        }
    }

    /// HLT with interrupts enabled: waits until an interrupt is pending
    /// (the injection happens before the next entry), charging the wait to
    /// the VM's budget.
    fn halt(&mut self, vcpu: &mut Vcpu, interrupts_enabled: bool) -> ExitAction {
        self.halts += 1;
        loop {
            let now = match self.advance(vcpu) {
                Ok(n) => n,
                Err(stop) => return ExitAction::Stop(stop),
            };
            // An NMI ends HLT unless NMIs are blocked (inside an NMI
            // handler); a maskable interrupt only with IF = 1.
            let nmi_ok = !vcpu.in_nmi_handler().unwrap_or(true);
            let wake = self.machine.platform_mut().is_some_and(|p| {
                (nmi_ok && p.lapic.nmi_pending()) || (interrupts_enabled && p.interrupt_pending())
            });
            if wake {
                return ExitAction::Advance(None);
            }
            if !interrupts_enabled {
                return ExitAction::Stop(StopReason::Halted);
            }
            let Some(next) = self.machine.next_event() else {
                return ExitAction::Stop(StopReason::HaltedForever);
            };
            let mut wait = self.ticks_until(now, next).max(1);
            if let Some(left) = vcpu.budget_left_tsc() {
                wait = wait.min(left.max(1));
            }
            let start = crate::cpu::rdtsc();
            while crate::cpu::rdtsc().wrapping_sub(start) < wait {
                core::hint::spin_loop();
            }
            let waited = crate::cpu::rdtsc().wrapping_sub(start);
            self.halt_wait_tsc += waited;
            if let Some(stop) = vcpu.charge_tsc(waited) {
                return ExitAction::Stop(stop);
            }
        }
    }

    /// RDMSR/WRMSR of a local-APIC MSR.
    fn lapic_msr(&mut self, vcpu: &mut Vcpu, msr: u32, write: Option<u64>) -> ExitAction {
        let tsc = vcpu.guest_tsc();
        let Some(p) = self.machine.platform_mut() else {
            return ExitAction::InjectGp;
        };
        match write {
            Some(v) => match p.msr_write(msr, v, tsc) {
                Ok(()) => ExitAction::Advance(None),
                Err(_) => ExitAction::InjectGp,
            },
            None => match p.msr_read(msr) {
                Ok(v) => {
                    vcpu.complete_rdmsr(v);
                    ExitAction::Advance(None)
                }
                Err(_) => ExitAction::InjectGp,
            },
        }
    }

    /// After a memory-map change: the EPT must have followed it.
    fn after_remap(&mut self, vcpu: &mut Vcpu) -> Option<StopReason> {
        let mut l = self.ept.borrow_mut();
        if let Some(e) = l.take_error() {
            return Some(StopReason::Ept(e));
        }
        vcpu.set_eptp(l.eptp()).err().map(StopReason::Vmx)
    }

    /// Level two of the exit dispatch.
    fn handle(&mut self, exit: VcpuExit, vcpu: &mut Vcpu) -> ExitAction {
        match exit {
            VcpuExit::Io {
                port, size, access, ..
            } => {
                let remaps = self.machine.stats.remaps;
                let write = access == Access::Write;
                let r = exits::port_io(&mut self.machine, port, size, write, vcpu.regs.rax);
                if write && port == 0x3F8 {
                    self.flush_console(false);
                }
                if self.machine.stats.remaps != remaps {
                    if let Some(stop) = self.after_remap(vcpu) {
                        return ExitAction::Stop(stop);
                    }
                }
                match r {
                    Ok(PortDone {
                        exit_status: Some(s),
                        ..
                    }) => ExitAction::Stop(StopReason::Exited(s)),
                    Ok(d) => ExitAction::Advance(Some(d.rax)),
                    Err(error) => ExitAction::Stop(StopReason::PortIo { port, error }),
                }
            }
            VcpuExit::Mmio {
                gpa,
                access,
                qualification,
                linear,
            } => self.mmio(vcpu, gpa, access, qualification, linear),
            VcpuExit::StringIo(io) => self.string_io(vcpu, &io),
            VcpuExit::Msr { msr, write } => self.lapic_msr(vcpu, msr, write),
            VcpuExit::Cr8 { write, gpr } => {
                let Some(p) = self.machine.platform_mut() else {
                    return ExitAction::InjectGp;
                };
                match write {
                    Some(v) => p.lapic.set_tpr(v << 4),
                    None => {
                        let v = u64::from(p.lapic.tpr() >> 4);
                        if let Err(e) = vcpu.set_gpr(gpr, v) {
                            return ExitAction::Stop(StopReason::Vmx(e));
                        }
                    }
                }
                ExitAction::Advance(None)
            }
            // From user mode (CPL > 0) every hypercall fails and does
            // nothing, as KVM answers them.
            VcpuExit::Hypercall { cpl, .. } if cpl != 0 => ExitAction::Advance(Some(u64::MAX)),
            VcpuExit::Hypercall { nr, args, .. } => match nr {
                hypercall::PING => ExitAction::Advance(Some(hypercall::PING_REPLY)),
                hypercall::MIGRATE => {
                    // Starts a migration; the guest learns that it moved
                    // from MIGRATION_GENERATION.
                    let ok = self.cfg.migrate.transport.is_some() && self.outgoing.is_none();
                    self.migrate_requested = ok;
                    ExitAction::Advance(Some(u64::from(!ok)))
                }
                hypercall::MIGRATION_GENERATION => ExitAction::Advance(Some(self.generation)),
                hypercall::EXIT => ExitAction::Stop(StopReason::Exited(args[0] as u32)),
                hypercall::DUMP_MEMORY_MAP => {
                    self.print_mtree();
                    ExitAction::Advance(Some(0))
                }
                // A migration owns the dirty flags while it runs.
                hypercall::DIRTY_LOG if self.outgoing.is_some() => {
                    ExitAction::Advance(Some(u64::MAX))
                }
                hypercall::DIRTY_LOG => {
                    let mut ept = self.ept.borrow_mut();
                    if !ept.dirty_tracking() {
                        // The CPU has no EPT dirty flags: no answer.
                        return ExitAction::Advance(Some(u64::MAX));
                    }
                    let Some((dirty, flush)) = ept.take_dirty(args[0], args[1]) else {
                        return ExitAction::Advance(Some(u64::MAX));
                    };
                    // The cleared flags count only after the INVEPT.
                    match ept.flush(flush) {
                        Ok(()) => ExitAction::Advance(Some(dirty.len() as u64)),
                        Err(e) => ExitAction::Stop(StopReason::Ept(e)),
                    }
                }
                _ => ExitAction::Advance(Some(u64::MAX)),
            },
            VcpuExit::PaePdptes { cr3, cr0 } => {
                let base = cr3 & 0xFFFF_FFE0;
                let raw = match self.machine.guest_memory() {
                    Ok(m) => m.read_obj::<[u64; 4]>(base).ok(),
                    Err(_) => None,
                };
                let phys_bits = (crate::cpu::cpuid(0x8000_0008, 0)[0] & 0xFF) as u8;
                match raw.and_then(|r| hv_core::vcpu::check_pdptes(r, phys_bits)) {
                    Some(p) => match vcpu.apply_cr0(cr0, Some(p)) {
                        Ok(()) => ExitAction::Advance(None),
                        Err(e) => ExitAction::Stop(StopReason::Vmx(e)),
                    },
                    None => ExitAction::InjectGp,
                }
            }
            VcpuExit::Halt { interrupts_enabled } => self.halt(vcpu, interrupts_enabled),
            VcpuExit::Shutdown => ExitAction::Stop(StopReason::TripleFault),
        }
    }

    /// After an emulated instruction: console, remaps, device exits.
    fn after_emulation(
        &mut self,
        vcpu: &mut Vcpu,
        gpa: u64,
        remaps: u64,
        r: Result<ExitDone, ExitError>,
        regs: &Regs,
    ) -> ExitAction {
        self.flush_console(false);
        if self.machine.stats.remaps != remaps {
            if let Some(stop) = self.after_remap(vcpu) {
                return ExitAction::Stop(stop);
            }
        }
        let done = match r {
            Ok(d) => d,
            Err(ExitError::Unmapped { gpa, access }) => {
                return ExitAction::Stop(StopReason::UnmappedAccess { gpa, access })
            }
            Err(ExitError::RomWrite { gpa }) => {
                return ExitAction::Stop(StopReason::RomWrite { gpa })
            }
            Err(e) => {
                crate::println!(
                    "[{}] cannot emulate the access at GPA {gpa:#x}: {e}",
                    self.name
                );
                return ExitAction::Stop(StopReason::EmulationFailed { gpa });
            }
        };
        self.rom_writes_dropped += done.rom_writes_dropped;
        if let Some(status) = done.exit_status {
            return ExitAction::Stop(StopReason::Exited(status));
        }
        match vcpu.set_emu_regs(regs) {
            Ok(()) => ExitAction::Retry,
            Err(e) => ExitAction::Stop(StopReason::Vmx(e)),
        }
    }

    /// An access EPT did not map: a device, a ROM write, or nothing.
    fn mmio(
        &mut self,
        vcpu: &mut Vcpu,
        gpa: u64,
        _access: Access,
        qualification: u64,
        linear: u64,
    ) -> ExitAction {
        self.mmio_exits += 1;
        let (mode, mut regs) = match (vcpu.cpu_mode(), vcpu.emu_regs()) {
            (Ok(m), Ok(r)) => (m, r),
            (Err(e), _) | (_, Err(e)) => return ExitAction::Stop(StopReason::Vmx(e)),
        };
        let exit = match MmioExit::from_ept_violation(qualification, gpa, linear) {
            Ok(e) => e,
            Err(e) => {
                crate::println!(
                    "[{}] cannot emulate the access at GPA {gpa:#x}: {e}",
                    self.name
                );
                return ExitAction::Stop(StopReason::EmulationFailed { gpa });
            }
        };
        let remaps = self.machine.stats.remaps;
        let r = exits::mmio(&mut self.machine, &mode, &mut regs, &exit, self.rom_writes);
        self.after_emulation(vcpu, gpa, remaps, r, &regs)
    }

    /// `ins`/`outs`, with or without `rep`.
    fn string_io(&mut self, vcpu: &mut Vcpu, io: &StringIo) -> ExitAction {
        let (mode, mut regs) = match (vcpu.cpu_mode(), vcpu.emu_regs()) {
            (Ok(m), Ok(r)) => (m, r),
            (Err(e), _) | (_, Err(e)) => return ExitAction::Stop(StopReason::Vmx(e)),
        };
        let remaps = self.machine.stats.remaps;
        let r = exits::string_io(&mut self.machine, &mode, &mut regs, io, self.rom_writes);
        self.after_emulation(vcpu, u64::from(io.port), remaps, r, &regs)
    }

    /// Prints the guest's complete console lines, prefixed by the VM name.
    fn flush_console(&mut self, all: bool) {
        if let Some(u) = self.machine.device::<Uart16550>("serial") {
            self.console_line.extend(u.take_output());
        }
        // A guest that never sends a newline still gets printed.
        let force = self.console_line.len() >= 4096;
        while let Some(i) = self.console_line.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.console_line.drain(..=i).collect();
            let text = escape_line(&line[..line.len() - 1]);
            crate::println!("[{}] {}", self.name, text);
        }
        if (all || force) && !self.console_line.is_empty() {
            let text = escape_line(&self.console_line);
            crate::println!("[{}] {}", self.name, text);
            self.console_line.clear();
        }
    }
}

impl VmHooks for Vm {
    fn handle(&mut self, exit: VcpuExit, vcpu: &mut Vcpu) -> ExitAction {
        Vm::handle(self, exit, vcpu)
    }

    /// Timers catch up; a pending NMI or interrupt is injected if the guest
    /// can take it, otherwise an interrupt window is requested.
    fn before_entry(&mut self, vcpu: &mut Vcpu) -> Result<Option<u64>, StopReason> {
        for (id, line) in self.machine.take_reports() {
            crate::println!("[{}] {}: {line}", self.name, id.idstr);
        }
        if self.poisoned {
            return Err(StopReason::MigrationCleanupFailed);
        }
        if core::mem::take(&mut self.migrate_requested) {
            return Err(StopReason::Migrating);
        }
        // Pre-copy: a chunk of dirty pages before each entry; the vCPU
        // stops when the rest is small or the iterations are spent.
        if let Some(mut out) = self.outgoing.take() {
            let r = out.step(self);
            self.outgoing = Some(out);
            match r {
                Ok(false) => {}
                Ok(true) => return Err(StopReason::Migrating),
                Err(e) => {
                    crate::println!("[{}] migration abandoned: {e}", self.name);
                    self.outgoing = None;
                    self.end_logging_after_failure();
                    // With `ept=rebuild` the change may have moved the root.
                    if let Some(stop) = self.after_remap(vcpu) {
                        return Err(stop);
                    }
                }
            }
        }
        let now = self.advance(vcpu)?;
        let fail = StopReason::Vmx;
        if let Some(p) = self.machine.platform_mut() {
            let mut queued = vcpu.event_queued().map_err(fail)?;
            if p.lapic.nmi_pending() {
                if !queued && !vcpu.nmi_blocked().map_err(fail)? {
                    p.lapic.take_nmi();
                    vcpu.inject_nmi().map_err(fail)?;
                    queued = true;
                } else {
                    // As soon as NMIs are unblocked (the handler's IRET,
                    // the end of a STI shadow).
                    vcpu.nmi_window(true).map_err(fail)?;
                }
            }
            if p.interrupt_pending() && !queued && vcpu.interrupts_open().map_err(fail)? {
                if let Some(v) = p.acknowledge() {
                    vcpu.inject_interrupt(v).map_err(fail)?;
                }
            }
            // Another interrupt waiting (behind the one just injected, a
            // queued event, IF = 0 or an STI shadow): exit as soon as the
            // guest can take it.
            vcpu.interrupt_window(p.interrupt_pending()).map_err(fail)?;
        }
        Ok(self.machine.next_event().map(|t| self.ticks_until(now, t)))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(v) = self.vcpu.take() {
            v.destroy();
        }
        self.ept.borrow_mut().release();
        for &(h, s) in &self.blocks {
            Frames.free_contiguous(h, s);
        }
    }
}
