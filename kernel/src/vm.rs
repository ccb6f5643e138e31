//! A VM: its guest RAM, EPT, devices and vCPU, and the VM's half of the
//! exit dispatch (port I/O, unmapped accesses, hypercalls, halts).

use crate::mem::{Frames, HostMem};
use crate::vmx::vcpu::{StartState, Vcpu, VcpuError};
use crate::vmx::{instr, Vmx};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use hv_core::addr::{GuestPhysAddr, HostPhysAddr};
use hv_core::devices::debug_exit::DebugExit;
use hv_core::devices::uart::Uart16550;
use hv_core::devices::{PioBus, PioOutcome};
use hv_core::ept::{Ept, EptPerm, EptStats, PageSizes};
use hv_core::frames::FrameAllocator;
use hv_core::guest_mem::{GuestRam, RamChunk};
use hv_core::loader::{self, LoadError, MULTIBOOT_BOOTLOADER_MAGIC};
use hv_core::vcpu::{hypercall, ExitAction, StopReason, VcpuExit};
use hv_core::vmx::exit::Access;

/// Why a VM could not be created.
#[derive(Debug)]
pub enum VmError {
    OutOfMemory(&'static str),
    Load(LoadError),
    Ept(hv_core::ept::EptError),
    Vcpu(VcpuError),
    Vmx(instr::VmxFail),
}

impl core::fmt::Display for VmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::OutOfMemory(what) => write!(f, "out of host memory for {what}"),
            Self::Load(e) => write!(f, "cannot load the guest image: {e}"),
            Self::Ept(e) => write!(f, "EPT: {e:?}"),
            Self::Vcpu(e) => write!(f, "vCPU: {e}"),
            Self::Vmx(e) => write!(f, "{e}"),
        }
    }
}

/// How a VM is configured.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub name: String,
    pub ram_bytes: u64,
    /// Guest command line (multiboot).
    pub cmdline: String,
    /// Preemption-timer slices before the VM is stopped (0: unlimited).
    pub budget: u64,
}

/// A virtual machine.
pub struct Vm {
    pub name: String,
    ram: GuestRam,
    ram_hpa: HostPhysAddr,
    ram_bytes: u64,
    ept: Option<Ept>,
    pio: PioBus,
    vcpu: Option<Vcpu>,
    console_line: Vec<u8>,
}

/// What a VM did, for the exit summary.
pub struct VmReport {
    pub stop: StopReason,
    pub exits: crate::vmx::vcpu::ExitCounters,
    pub ept: EptStats,
    pub unclaimed_io: u64,
}

impl Vm {
    /// Builds a VM from a multiboot guest image.
    pub fn create(vmx: &Vmx, vpid: u16, image: &[u8], cfg: &VmConfig) -> Result<Self, VmError> {
        let mut host = HostMem;
        let ram_bytes = cfg.ram_bytes.div_ceil(2 << 20) * (2 << 20);
        let ram_hpa = Frames
            .alloc_contiguous(ram_bytes, 2 << 20)
            .ok_or(VmError::OutOfMemory("guest RAM"))?;
        let mut vm = Self {
            name: cfg.name.clone(),
            ram: GuestRam::new(),
            ram_hpa,
            ram_bytes,
            ept: None,
            pio: PioBus::default(),
            vcpu: None,
            console_line: Vec::new(),
        };
        // From here on, `vm` owns what it holds: dropping it on an error
        // gives everything back (see `Drop`).
        let chunk = RamChunk {
            gpa: GuestPhysAddr::new(0),
            hpa: ram_hpa,
            size: ram_bytes,
        };
        vm.ram
            .add(chunk)
            .map_err(|_| VmError::OutOfMemory("RAM map"))?;
        let sizes = PageSizes {
            two_mib: vmx.caps.ept_2m_pages(),
            one_gib: vmx.caps.ept_1g_pages(),
        };
        let mut ept = Ept::new(&mut host, sizes).map_err(VmError::Ept)?;
        let mapped = ept.map(
            &mut host,
            chunk.gpa,
            chunk.hpa,
            chunk.size,
            EptPerm::ReadWriteExecute,
        );
        let eptp = ept.eptp(vmx.caps.ept_ad_bits());
        vm.ept = Some(ept);
        let hv_core::ept::InveptRequired = mapped.map_err(VmError::Ept)?;
        // Register the devices before anything can run.
        // A fresh bus cannot have conflicts; the error case is unreachable
        // but still not a panic.
        let _ = vm
            .pio
            .register(0x3F8, 8, "com1", Box::new(Uart16550::new()));
        let _ = vm.pio.register(0xF4, 4, "debug-exit", Box::new(DebugExit));
        let loaded = loader::load_multiboot(image, &cfg.cmdline, &vm.ram, &mut host)
            .map_err(VmError::Load)?;
        log::info!(
            "[{}] loaded image {:#x}-{:#x}, entry {:#x}, {} MiB RAM",
            vm.name,
            loaded.image.0,
            loaded.image.1,
            loaded.entry,
            ram_bytes >> 20
        );
        let start = StartState {
            rip: loaded.entry.into(),
            rax: MULTIBOOT_BOOTLOADER_MAGIC.into(),
            rbx: loaded.info.into(),
        };
        let mut vcpu = Vcpu::new(vmx, vpid, eptp, start).map_err(VmError::Vcpu)?;
        vcpu.budget = cfg.budget;
        vm.vcpu = Some(vcpu);
        instr::invept_single(eptp).map_err(VmError::Vmx)?;
        Ok(vm)
    }

    /// Runs the VM until it stops.
    pub fn run(&mut self) -> VmReport {
        let Some(mut vcpu) = self.vcpu.take() else {
            return VmReport {
                stop: StopReason::VmxInstructionFailed,
                exits: Default::default(),
                ept: EptStats::default(),
                unclaimed_io: 0,
            };
        };
        let stop = vcpu.run(|exit, vcpu| self.handle(exit, vcpu));
        self.flush_console(true);
        if !stop.is_guest_exit() {
            crate::println!("[{}] VM stopped: {stop}", self.name);
            vcpu.dump(&self.name);
        }
        let report = VmReport {
            stop,
            exits: vcpu.exits.clone(),
            ept: self.ept.as_ref().map(|e| e.stats).unwrap_or_default(),
            unclaimed_io: self.pio.unclaimed,
        };
        self.vcpu = Some(vcpu);
        report
    }

    /// Level two of the exit dispatch.
    fn handle(&mut self, exit: VcpuExit, vcpu: &mut Vcpu) -> ExitAction {
        match exit {
            VcpuExit::Io {
                port,
                size,
                access: Access::Write,
                value,
            } => {
                let out = self.pio.write(port, size, value);
                if port == 0x3F8 {
                    self.flush_console(false);
                }
                match out {
                    PioOutcome::Done => ExitAction::Advance(None),
                    PioOutcome::Exit(status) => ExitAction::Stop(StopReason::Exited(status)),
                }
            }
            VcpuExit::Io {
                port,
                size,
                access: Access::Read,
                ..
            } => {
                let v = u64::from(self.pio.read(port, size));
                let rax = vcpu.regs.rax;
                let merged = match size {
                    1 => (rax & !0xff) | v,
                    2 => (rax & !0xffff) | v,
                    _ => v, // a 32-bit destination zero-extends
                };
                ExitAction::Advance(Some(merged))
            }
            VcpuExit::Mmio { gpa, access, .. } => {
                ExitAction::Stop(StopReason::UnmappedAccess { gpa, access })
            }
            VcpuExit::Hypercall { nr, args } => match nr {
                hypercall::PING => ExitAction::Advance(Some(hypercall::PING_REPLY)),
                hypercall::EXIT => ExitAction::Stop(StopReason::Exited(args[0] as u32)),
                _ => ExitAction::Advance(Some(u64::MAX)),
            },
            VcpuExit::Halt { .. } => ExitAction::Stop(StopReason::Halted),
            VcpuExit::Shutdown => ExitAction::Stop(StopReason::TripleFault),
        }
    }

    /// Prints the guest's complete console lines, prefixed by the VM name.
    fn flush_console(&mut self, all: bool) {
        if let Some(u) = self.pio.device::<Uart16550>("com1") {
            self.console_line.extend(u.take_output());
        }
        while let Some(i) = self.console_line.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.console_line.drain(..=i).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]);
            crate::println!("[{}] {}", self.name, text.trim_end_matches('\r'));
        }
        if all && !self.console_line.is_empty() {
            let text = String::from_utf8_lossy(&self.console_line);
            crate::println!("[{}] {}", self.name, text);
            self.console_line.clear();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(v) = self.vcpu.take() {
            v.destroy();
        }
        if let Some(e) = self.ept.take() {
            e.destroy(&mut HostMem);
        }
        Frames.free_contiguous(self.ram_hpa, self.ram_bytes);
    }
}
