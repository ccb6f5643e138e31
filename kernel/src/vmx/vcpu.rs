//! One virtual CPU: its VMCS, the guest registers, the run loop and the
//! exits the vCPU owns (CPUID, control registers, MSRs, XSETBV, the
//! preemption timer, external interrupts). Everything else goes up to the
//! VM as a [`VcpuExit`]; the VM answers with an [`ExitAction`] that the loop
//! applies in one place.

use super::instr::{self, EntryResult, GuestRegs, VmxFail};
use super::vmcs::{control, exit_info, guest, host, Field, FieldNat, WritableField};
use super::Vmx;
use crate::cpu;
use crate::mem::Frames;
use alloc::vec::Vec;
use hv_core::addr::HostPhysAddr;
use hv_core::frames::FrameAllocator;
use hv_core::msr::{self, HostMsrFeatures, MsrRule, SoftMsrs, VmcsMsr};
use hv_core::vcpu::{DescTable, ExitAction, Segment, StopReason, VcpuExit, VcpuState};
use hv_core::vmx::caps::{Controls, EntryControls, ProcControls};
use hv_core::vmx::exit::{CrAccess, EptViolation, ExitReason, IoQualification, VmExitInfo};
use hv_core::vmx::regs::{AccessRights, Cr4Extra, DebugCtl, Interruptibility};
use hv_core::vmx::InterruptionInfo;
use hv_core::vmx::{ControlError, VmxCaps};
use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::debug::Dr6Flags;
use x86_64::registers::model_specific::EferFlags;
use x86_64::registers::rflags::RFlags;

/// Guest-physical state a vCPU starts in: 32-bit protected mode, paging off
/// (the multiboot entry state).
#[derive(Clone, Copy, Debug)]
pub struct StartState {
    pub rip: u64,
    pub rax: u64,
    pub rbx: u64,
}

/// Why a vCPU could not be created.
#[derive(Debug)]
pub enum VcpuError {
    Control(ControlError),
    Vmx(VmxFail),
    OutOfMemory,
}

impl From<VmxFail> for VcpuError {
    fn from(e: VmxFail) -> Self {
        Self::Vmx(e)
    }
}

impl core::fmt::Display for VcpuError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Control(e) => write!(f, "{e}"),
            Self::Vmx(e) => write!(f, "{e}"),
            Self::OutOfMemory => write!(f, "out of memory for VMCS or bitmaps"),
        }
    }
}

/// Counters of VM exits by basic reason.
#[derive(Clone, Debug)]
pub struct ExitCounters {
    pub by_reason: [u64; 128],
    /// Exits with a basic reason of 128 or more.
    pub other: u64,
}

impl Default for ExitCounters {
    fn default() -> Self {
        Self {
            by_reason: [0; 128],
            other: 0,
        }
    }
}

impl ExitCounters {
    /// Total exits.
    pub fn total(&self) -> u64 {
        self.by_reason.iter().sum::<u64>() + self.other
    }
}

/// CR4 bits of features CPUID hides: writes setting them get #GP, so the
/// guest cannot turn on what it was told is absent. PKE, CET, PKS, UINTR
/// and FRED are hidden because their state is not switched between VMs;
/// LA57 and LAM because the MMIO emulator's page walk and the canonical
/// checks of the MSR table are 4-level, 48-bit.
const CR4_HIDDEN: u64 = Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits()
    | Cr4Flags::SAFER_MODE_EXTENSIONS.bits()
    | Cr4Flags::OSXSAVE.bits()
    | Cr4Flags::PROTECTION_KEY_USER.bits()
    | Cr4Flags::CONTROL_FLOW_ENFORCEMENT.bits()
    | Cr4Flags::PROTECTION_KEY_SUPERVISOR.bits()
    | Cr4Extra::LA57.bits()
    | Cr4Extra::UINTR.bits()
    | Cr4Extra::LAM_SUP.bits()
    | Cr4Extra::FRED.bits();
const CR0_PG: u64 = Cr0Flags::PAGING.bits();
const CR0_PE: u64 = Cr0Flags::PROTECTED_MODE_ENABLE.bits();
const EFER_LME: u64 = EferFlags::LONG_MODE_ENABLE.bits();
const EFER_LMA: u64 = EferFlags::LONG_MODE_ACTIVE.bits();
/// DR6 and DR7 after reset (SDM Vol. 3B, 18.2.3, 18.2.4): the reserved
/// bits that read as one.
const DR6_RESET: u64 = 0xFFFF_0FF0;
const DR7_RESET: u64 = 0x400;
/// RFLAGS bit 1 is reserved and always one.
const RFLAGS_RESERVED_1: u64 = 1 << 1;
/// A guest's first PAT: the power-on value (SDM Vol. 3A, 13.12.4).
const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// A virtual CPU and its VMCS.
pub struct Vcpu {
    vmcs: HostPhysAddr,
    bitmaps: HostPhysAddr,
    caps: VmxCaps,
    launched: bool,
    pub regs: GuestRegs,
    pub exits: ExitCounters,
    /// VMX-preemption timer slice, in timer ticks.
    pub slice: u32,
    /// Slices the VM may use before it is stopped (0: unlimited).
    pub budget: u64,
    pub slices_used: u64,
    /// Preemption-timer units left in the current slice.
    slice_left: u64,
    /// Host TSC ticks already charged since the last exit (a halt's wait).
    charged_since_exit: u64,
    /// The last exit, for reports.
    pub last_exit: VmExitInfo,
    /// An event whose delivery an exit interrupted (IDT-vectoring
    /// information, error code, instruction length): injected again.
    reinject: Option<(InterruptionInfo, u32, u32)>,
    /// MSRs the vCPU keeps itself (see `hv_core::msr`).
    soft_msrs: SoftMsrs,
    /// The guest's values of the switched MSRs (`msr::SWITCHED` order).
    switched: [u64; 5],
    /// Guest TSC = host TSC + this (the VMCS TSC offset).
    pub tsc_offset: u64,
    tsc_adjust: u64,
    host_msr: HostMsrFeatures,
    /// MSR numbers whose refusal was already logged.
    refused_logged: Vec<u32>,
    /// The guest's DR0-DR3 and DR6 (in the real registers while it runs;
    /// DR7 is in the VMCS, saved and loaded by every exit and entry).
    debug_regs: [u64; 5],
    vpid: u16,
    /// The guest's x87/SSE state while it does not run.
    fpu: alloc::boxed::Box<cpu::FxArea>,
}

/// Why a migrated vCPU state was not taken (nothing changed).
#[derive(Debug)]
pub enum RestoreError {
    /// A soft MSR the policy does not have, or a value it refuses.
    Msr(u32),
    Invalid(&'static str),
    Vmx(VmxFail),
}

impl core::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Msr(m) => write!(f, "MSR {m:#x} cannot take the saved value"),
            Self::Invalid(why) => write!(f, "{why}"),
            Self::Vmx(e) => write!(f, "VMX: {e}"),
        }
    }
}

/// The VM's half of the exit dispatch and of event delivery.
pub trait VmHooks {
    /// An exit the vCPU handed up.
    fn handle(&mut self, exit: VcpuExit, vcpu: &mut Vcpu) -> ExitAction;
    /// Runs just before every VM entry: time-driven device state, event
    /// injection. Returns the host TSC ticks until the VM's next timer
    /// event (the preemption timer is armed no later than that), or a stop.
    fn before_entry(&mut self, vcpu: &mut Vcpu) -> Result<Option<u64>, StopReason>;
}

fn rw<F: WritableField>(field: F, value: F::Value) -> Result<(), VmxFail> {
    instr::vmwrite(field, value)
}

fn rd<F: Field>(field: F) -> Result<F::Value, VmxFail> {
    instr::vmread(field)
}

impl Vcpu {
    /// Creates a vCPU: allocates and fills its VMCS with controls computed
    /// from the capability MSRs, the host state of this CPU and the start
    /// state.
    pub fn new(vmx: &Vmx, vpid: u16, eptp: u64, start: StartState) -> Result<Self, VcpuError> {
        let caps = vmx.caps;
        let vmcs = Frames.alloc_frame().ok_or(VcpuError::OutOfMemory)?;
        // Three bitmaps: I/O A (ports 0-0x7fff), I/O B, and MSRs: all ones,
        // so every port and MSR access exits.
        let Some(bitmaps) = Frames.alloc_contiguous(3 * 4096, 4096) else {
            Frames.free_frame(vmcs);
            return Err(VcpuError::OutOfMemory);
        };
        // SAFETY: fresh frames owned by this vCPU from now on; identity mapped.
        unsafe {
            crate::mem::phys_ptr::<u32>(vmcs).write_volatile(caps.revision_id());
            core::ptr::write_bytes(crate::mem::phys_ptr::<u8>(bitmaps), 0xff, 3 * 4096);
        }
        let mut v = Self {
            vmcs,
            bitmaps,
            caps,
            launched: false,
            regs: GuestRegs {
                rax: start.rax,
                rbx: start.rbx,
                ..Default::default()
            },
            exits: ExitCounters::default(),
            slice: 1_000_000,
            budget: 0,
            slices_used: 0,
            slice_left: 0,
            charged_since_exit: 0,
            last_exit: VmExitInfo::default(),
            reinject: None,
            soft_msrs: SoftMsrs::default(),
            switched: [0; 5],
            tsc_offset: 0,
            tsc_adjust: 0,
            host_msr: HostMsrFeatures {
                spec_ctrl: cpu::cpuid(7, 0)[3] & (1 << 26) != 0,
            },
            refused_logged: Vec::new(),
            debug_regs: [0, 0, 0, 0, DR6_RESET],
            vpid,
            fpu: alloc::boxed::Box::new(cpu::FxArea::reset()),
        };
        match v.init(vpid, eptp, start) {
            Ok(()) => Ok(v),
            Err(e) => {
                v.destroy();
                Err(e)
            }
        }
    }

    fn init(&mut self, vpid: u16, eptp: u64, start: StartState) -> Result<(), VcpuError> {
        // SAFETY: the VMCS frame is ours and holds the revision id.
        unsafe {
            instr::vmclear(self.vmcs.as_u64())?;
            instr::vmptrld(self.vmcs.as_u64())?;
        }
        self.setup_controls(vpid, eptp)?;
        self.setup_host()?;
        self.setup_guest(start)
    }

    fn setup_controls(&mut self, vpid: u16, eptp: u64) -> Result<(), VcpuError> {
        let c = Controls::for_tern(&self.caps).map_err(VcpuError::Control)?;
        let (pin, proc, proc2, exit, entry) = (c.pin, c.proc, c.proc2, c.exit, c.entry);
        rw(control::PINBASED_EXEC_CONTROLS, pin)?;
        rw(control::PRIMARY_PROCBASED_EXEC_CONTROLS, proc)?;
        rw(control::SECONDARY_PROCBASED_EXEC_CONTROLS, proc2)?;
        rw(control::VMEXIT_CONTROLS, exit)?;
        rw(control::VMENTRY_CONTROLS, entry)?;
        rw(control::EXCEPTION_BITMAP, 0)?;
        rw(control::IO_BITMAP_A_ADDR, self.bitmaps.as_u64())?;
        rw(control::IO_BITMAP_B_ADDR, self.bitmaps.as_u64() + 4096)?;
        rw(control::MSR_BITMAPS_ADDR, self.bitmaps.as_u64() + 8192)?;
        rw(control::VPID, vpid)?;
        rw(control::EPTP, eptp)?;
        rw(control::CR3_TARGET_COUNT, 0)?;
        rw(control::TSC_OFFSET, 0)?;
        rw(control::VMEXIT_MSR_STORE_COUNT, 0)?;
        rw(control::VMEXIT_MSR_LOAD_COUNT, 0)?;
        rw(control::VMENTRY_MSR_LOAD_COUNT, 0)?;
        // CR0.NE and CR4.VMXE are forced on by VMX: the guest sees its own
        // values through the read shadows.
        rw(control::CR0_GUEST_HOST_MASK, Cr0Flags::NUMERIC_ERROR.bits())?;
        rw(control::CR4_GUEST_HOST_MASK, CR4_HIDDEN)?;
        Ok(())
    }

    fn setup_host(&mut self) -> Result<(), VcpuError> {
        use x86_64::instructions::tables::{sgdt, sidt};
        use x86_64::registers::control::{Cr0, Cr3, Cr4};
        let sel = cpu::selectors();
        rw(host::CR0, Cr0::read_raw())?;
        rw(host::CR3, Cr3::read_raw().0.start_address().as_u64())?;
        rw(host::CR4, Cr4::read_raw())?;
        rw(host::CS_SELECTOR, sel.code.0)?;
        for f in [host::SS_SELECTOR, host::DS_SELECTOR, host::ES_SELECTOR] {
            rw(f, sel.data.0)?;
        }
        rw(host::FS_SELECTOR, 0)?;
        rw(host::GS_SELECTOR, 0)?;
        rw(host::TR_SELECTOR, sel.tss.0)?;
        rw(host::FS_BASE, 0)?;
        rw(host::GS_BASE, 0)?;
        rw(host::TR_BASE, cpu::tss_base())?;
        rw(host::GDTR_BASE, sgdt().base.as_u64())?;
        rw(host::IDTR_BASE, sidt().base.as_u64())?;
        rw(host::IA32_SYSENTER_CS, 0)?;
        rw(host::IA32_SYSENTER_ESP, 0)?;
        rw(host::IA32_SYSENTER_EIP, 0)?;
        rw(host::IA32_EFER, cpu::rdmsr(msr::IA32_EFER))?;
        rw(host::IA32_PAT, cpu::rdmsr(x86::msr::IA32_PAT))?;
        Ok(())
    }

    fn setup_guest(&mut self, start: StartState) -> Result<(), VcpuError> {
        // Flat 32-bit code and data segments (access rights: SDM 25.4.1,
        // Table 25-2: present, S, type 0xB (code) or 3 (data), 4 KiB
        // granularity, D/B set).
        const CODE: u32 = 0xC09B;
        const DATA: u32 = 0xC093;
        let segs = [
            (guest::CS, 0x08, CODE),
            (guest::DS, 0x10, DATA),
            (guest::ES, 0x10, DATA),
            (guest::FS, 0x10, DATA),
            (guest::GS, 0x10, DATA),
            (guest::SS, 0x10, DATA),
        ];
        for (f, sel, ar) in segs {
            rw(f.selector, sel)?;
            rw(f.base, 0)?;
            rw(f.limit, 0xFFFF_FFFF)?;
            rw(f.access_rights, ar)?;
        }
        // A busy 32-bit TSS (type 0xB, present) and an unusable LDTR.
        rw(guest::TR.selector, 0)?;
        rw(guest::TR.base, 0)?;
        rw(guest::TR.limit, 0xFF)?;
        rw(guest::TR.access_rights, 0x8B)?;
        rw(guest::LDTR.selector, 0)?;
        rw(guest::LDTR.base, 0)?;
        rw(guest::LDTR.limit, 0)?;
        rw(guest::LDTR.access_rights, AccessRights::UNUSABLE.bits())?;
        rw(guest::GDTR_BASE, 0)?;
        rw(guest::GDTR_LIMIT, 0)?;
        rw(guest::IDTR_BASE, 0)?;
        rw(guest::IDTR_LIMIT, 0)?;
        let cr0 = (Cr0Flags::PROTECTED_MODE_ENABLE | Cr0Flags::EXTENSION_TYPE).bits();
        rw(guest::CR0, self.caps.fix_cr0(cr0, true))?;
        rw(control::CR0_READ_SHADOW, cr0)?;
        rw(guest::CR3, 0)?;
        rw(guest::CR4, self.caps.fix_cr4(0))?;
        rw(control::CR4_READ_SHADOW, 0)?;
        rw(guest::DR7, DR7_RESET)?;
        rw(guest::RSP, 0)?;
        rw(guest::RIP, start.rip)?;
        rw(guest::RFLAGS, RFLAGS_RESERVED_1)?;
        rw(guest::IA32_EFER, 0)?;
        rw(guest::IA32_PAT, PAT_RESET)?;
        rw(guest::IA32_DEBUGCTL, 0)?;
        rw(guest::IA32_SYSENTER_CS, 0)?;
        rw(guest::IA32_SYSENTER_ESP, 0)?;
        rw(guest::IA32_SYSENTER_EIP, 0)?;
        rw(guest::LINK_PTR, u64::MAX)?;
        rw(guest::INTERRUPTIBILITY_STATE, 0)?;
        rw(guest::ACTIVITY_STATE, 0)?;
        rw(guest::PENDING_DBG_EXCEPTIONS, 0)?;
        rw(control::VMENTRY_INTERRUPTION_INFO, InterruptionInfo::NONE)?;
        Ok(())
    }

    /// Test mode (`break_vm_entry`): sets a CR3-target count above what
    /// the CPU supports (IA32_VMX_MISC bits 24:16), so that the next
    /// VMLAUNCH fails its control checks (SDM 27.2.1.1) with VMfailValid.
    /// Shows that a failed VMX instruction reaches the stop report with
    /// its VM-instruction error.
    pub fn break_vm_entry_for_test(&mut self) -> Result<(), VmxFail> {
        // SAFETY: the VMCS is this vCPU's own, cleared at creation.
        unsafe { instr::vmptrld(self.vmcs.as_u64())? };
        rw(control::CR3_TARGET_COUNT, self.caps.cr3_targets() + 1)
    }

    /// Runs the vCPU until the VM stops. `vm` is the VM's half of the
    /// exit dispatch and of event delivery.
    pub fn run(&mut self, vm: &mut impl VmHooks) -> StopReason {
        // SAFETY: the VMCS is this vCPU's own, cleared at creation.
        if let Err(e) = unsafe { instr::vmptrld(self.vmcs.as_u64()) } {
            return StopReason::Vmx(e);
        }
        // The guest's CPU state that VMX does not switch (x87/SSE, DR0-3,
        // DR6, the SYSCALL/SWAPGS MSRs) is in the real registers while it
        // runs: loaded here, and when it stops saved and reset, so no other
        // VM (nor Tern) ever runs with it.
        self.load_switched_msrs();
        cpu::write_debug_regs(&self.debug_regs);
        cpu::fxrstor(&self.fpu);
        let stop = self.run_loop(vm);
        cpu::fxsave(&mut self.fpu);
        cpu::fxrstor(&cpu::FxArea::reset());
        self.save_switched_msrs();
        self.debug_regs = cpu::read_debug_regs();
        cpu::write_debug_regs(&[0, 0, 0, 0, DR6_RESET]);
        stop
    }

    fn run_loop(&mut self, vm: &mut impl VmHooks) -> StopReason {
        let rate = self.caps.preemption_timer_rate();
        if self.slice_left == 0 {
            self.slice_left = self.slice.into();
        }
        let mut exit_tsc: Option<u64> = None;
        loop {
            let until_event = match vm.before_entry(self) {
                Ok(t) => t,
                Err(stop) => return stop,
            };
            // Time Tern spent on the last exit is the VM's too: a guest
            // cannot escape its budget by exiting (hypercalls that print,
            // port floods).
            if let Some(t) = exit_tsc {
                let spent = cpu::rdtsc().wrapping_sub(t);
                let rest = spent.saturating_sub(core::mem::take(&mut self.charged_since_exit));
                if let Some(stop) = self.charge_tsc(rest) {
                    return stop;
                }
                self.charged_since_exit = 0;
            }
            // The timer fires at the end of the slice or at the VM's next
            // timer event, whichever is first.
            let mut armed = self.slice_left;
            if let Some(t) = until_event {
                armed = armed.min((t >> rate).max(1));
            }
            let timer = u32::try_from(armed).unwrap_or(u32::MAX);
            if let Err(e) = rw(guest::VMX_PREEMPTION_TIMER_VALUE, timer) {
                return StopReason::Vmx(e);
            }
            // SAFETY: the VMCS holds this CPU's host state and a guest whose
            // memory is confined by EPT.
            let entry = unsafe { instr::enter(&mut self.regs, self.launched) };
            exit_tsc = Some(cpu::rdtsc());
            match entry {
                EntryResult::Exited => self.launched = true,
                EntryResult::Failed(e) => return StopReason::Vmx(e),
            }
            let info = match self.read_exit() {
                Ok(i) => i,
                Err(e) => return StopReason::Vmx(e),
            };
            self.last_exit = info;
            let reason = info.basic();
            match self.exits.by_reason.get_mut(usize::from(reason.number())) {
                Some(c) => *c += 1,
                None => self.exits.other += 1,
            }
            let left = match rd(guest::VMX_PREEMPTION_TIMER_VALUE) {
                Ok(v) => u64::from(v).min(armed),
                Err(e) => return StopReason::Vmx(e),
            };
            if let Some(stop) = self.charge(armed - left) {
                return stop;
            }
            self.reinject = match self.read_vectoring() {
                Ok(r) => r,
                Err(e) => return StopReason::Vmx(e),
            };
            let action = if info.entry_failed() {
                ExitAction::Stop(StopReason::EntryFailure {
                    reason: reason.number(),
                    qualification: info.qualification,
                })
            } else {
                match self.handle_own(&info) {
                    Ok(Own::Done(a)) => a,
                    Ok(Own::Up(exit)) => vm.handle(exit, self),
                    Err(e) => ExitAction::Stop(StopReason::Vmx(e)),
                }
            };
            match self.apply(action, &info) {
                Ok(None) => {}
                Ok(Some(stop)) => return stop,
                Err(e) => return StopReason::Vmx(e),
            }
        }
    }

    /// Charges `units` of preemption-timer time (guest time, or host time
    /// spent for the VM) to the current slice; a finished slice counts
    /// against the budget. Returns a stop when the budget is used up.
    pub fn charge(&mut self, mut units: u64) -> Option<StopReason> {
        while units >= self.slice_left {
            units -= self.slice_left;
            self.slice_left = self.slice.into();
            self.slices_used += 1;
            if self.budget != 0 && self.slices_used >= self.budget {
                return Some(StopReason::TimeBudget);
            }
        }
        self.slice_left -= units;
        None
    }

    /// Charges host TSC ticks (e.g. a halted vCPU's wait) to the budget.
    pub fn charge_tsc(&mut self, ticks: u64) -> Option<StopReason> {
        self.charged_since_exit = self.charged_since_exit.saturating_add(ticks);
        self.charge(ticks >> self.caps.preemption_timer_rate())
    }

    /// The host TSC ticks left before the budget stops the VM.
    pub fn budget_left_tsc(&self) -> Option<u64> {
        if self.budget == 0 {
            return None;
        }
        let slices = self.budget.saturating_sub(self.slices_used + 1);
        let units = slices
            .saturating_mul(self.slice.into())
            .saturating_add(self.slice_left);
        let rate = self.caps.preemption_timer_rate();
        let ticks = units << rate;
        // Saturate when the shift loses bits (a huge budget).
        Some(if ticks >> rate == units {
            ticks
        } else {
            u64::MAX
        })
    }

    /// An event that was being delivered when the exit happened.
    fn read_vectoring(&self) -> Result<Option<(InterruptionInfo, u32, u32)>, VmxFail> {
        let v = rd(exit_info::IDT_VECTORING_INFO)?;
        if !v.is_valid() {
            return Ok(None);
        }
        let err = if v.has_error_code() {
            rd(exit_info::IDT_VECTORING_ERR_CODE)?
        } else {
            0
        };
        let len = rd(exit_info::VMEXIT_INSTRUCTION_LEN)?;
        Ok(Some((v, err, len)))
    }

    /// Whether an event is already set up for the next entry.
    pub fn event_queued(&self) -> Result<bool, VmxFail> {
        Ok(rd(control::VMENTRY_INTERRUPTION_INFO)?.is_valid())
    }

    /// Whether an external interrupt can be injected now: RFLAGS.IF set and
    /// no STI or MOV-SS blocking.
    pub fn interrupts_open(&self) -> Result<bool, VmxFail> {
        let iff = rd(guest::RFLAGS)? & RFlags::INTERRUPT_FLAG.bits() != 0;
        let blocking = Self::interruptibility()?
            .intersects(Interruptibility::BLOCKING_BY_STI | Interruptibility::BLOCKING_BY_MOV_SS);
        Ok(iff && !blocking)
    }

    /// Whether an NMI cannot be injected now: blocked by NMI, or in a STI
    /// or MOV-SS shadow (an entry may fail when an NMI is injected with
    /// STI blocking, SDM 27.3.1.5).
    pub fn nmi_blocked(&self) -> Result<bool, VmxFail> {
        Ok(Self::interruptibility()?.intersects(
            Interruptibility::BLOCKING_BY_STI
                | Interruptibility::BLOCKING_BY_MOV_SS
                | Interruptibility::BLOCKING_BY_NMI,
        ))
    }

    /// Whether the guest is inside an NMI handler (blocking by NMI): an NMI
    /// does not end HLT then.
    pub fn in_nmi_handler(&self) -> Result<bool, VmxFail> {
        Ok(Self::interruptibility()?.contains(Interruptibility::BLOCKING_BY_NMI))
    }

    fn interruptibility() -> Result<Interruptibility, VmxFail> {
        rd(guest::INTERRUPTIBILITY_STATE).map(Interruptibility::from_bits_retain)
    }

    /// Injects external interrupt `vector` at the next entry.
    pub fn inject_interrupt(&mut self, vector: u8) -> Result<(), VmxFail> {
        rw(
            control::VMENTRY_INTERRUPTION_INFO,
            InterruptionInfo::external(vector),
        )
    }

    /// Injects an NMI at the next entry.
    pub fn inject_nmi(&mut self) -> Result<(), VmxFail> {
        rw(control::VMENTRY_INTERRUPTION_INFO, InterruptionInfo::nmi())
    }

    /// Asks for an exit as soon as the guest can take an interrupt.
    pub fn interrupt_window(&mut self, on: bool) -> Result<(), VmxFail> {
        self.window(ProcControls::INTERRUPT_WINDOW_EXITING, on)
    }

    /// Asks for an exit as soon as NMIs are no longer blocked.
    pub fn nmi_window(&mut self, on: bool) -> Result<(), VmxFail> {
        self.window(ProcControls::NMI_WINDOW_EXITING, on)
    }

    fn window(&mut self, which: ProcControls, on: bool) -> Result<(), VmxFail> {
        let cur = ProcControls::from_bits_retain(rd(control::PRIMARY_PROCBASED_EXEC_CONTROLS)?);
        let mut new = cur;
        new.set(which, on);
        if new != cur {
            rw(control::PRIMARY_PROCBASED_EXEC_CONTROLS, new.bits())?;
        }
        Ok(())
    }

    /// The guest's TSC now.
    pub fn guest_tsc(&self) -> u64 {
        cpu::rdtsc().wrapping_add(self.tsc_offset)
    }

    /// Sets EDX:EAX for a completed RDMSR.
    pub fn complete_rdmsr(&mut self, v: u64) {
        self.regs.rax = v & 0xffff_ffff;
        self.regs.rdx = v >> 32;
    }

    /// The value of a WRMSR (EDX:EAX).
    pub fn wrmsr_value(&self) -> u64 {
        (self.regs.rdx << 32) | (self.regs.rax & 0xffff_ffff)
    }

    fn load_switched_msrs(&self) {
        for (m, v) in msr::SWITCHED.iter().zip(self.switched) {
            // SAFETY: these MSRs only matter to SYSCALL/SWAPGS, which Tern
            // never executes; values were checked when the guest wrote them.
            unsafe { cpu::wrmsr(*m, v) };
        }
    }

    /// Keeps the guest's values and leaves the real MSRs at zero, so the
    /// next VM cannot see them.
    fn save_switched_msrs(&mut self) {
        for (m, v) in msr::SWITCHED.iter().zip(self.switched.iter_mut()) {
            *v = cpu::rdmsr(*m);
            // SAFETY: as in `load_switched_msrs`; 0 is valid for each.
            unsafe { cpu::wrmsr(*m, 0) };
        }
    }

    fn read_exit(&self) -> Result<VmExitInfo, VmxFail> {
        Ok(VmExitInfo {
            reason: rd(exit_info::EXIT_REASON)?,
            qualification: rd(exit_info::EXIT_QUALIFICATION)?,
            instruction_len: rd(exit_info::VMEXIT_INSTRUCTION_LEN)?,
            guest_rip: rd(guest::RIP)?,
            guest_phys: rd(exit_info::GUEST_PHYSICAL_ADDR)?,
            guest_linear: rd(exit_info::GUEST_LINEAR_ADDR)?,
        })
    }

    fn apply(
        &mut self,
        action: ExitAction,
        info: &VmExitInfo,
    ) -> Result<Option<StopReason>, VmxFail> {
        match action {
            ExitAction::Advance(value) => {
                if let Some(v) = value {
                    self.regs.rax = v;
                }
                // RIP wraps with the code size: at 2^32 in 32-bit code, at
                // 2^16 in 16-bit code.
                let next = info.guest_rip.wrapping_add(info.instruction_len.into());
                let ar = AccessRights::from_bits_retain(rd(guest::CS.access_rights)?);
                let long = rd(guest::IA32_EFER)? & EFER_LMA != 0;
                let next = if long && ar.contains(AccessRights::LONG_MODE) {
                    next
                } else if ar.contains(AccessRights::DEFAULT_BIG) {
                    next & 0xFFFF_FFFF
                } else {
                    next & 0xFFFF
                };
                rw(guest::RIP, next)?;
                self.instruction_completed()?;
                Ok(None)
            }
            ExitAction::Retry => Ok(None),
            ExitAction::InjectGp => {
                self.inject_gp()?;
                Ok(None)
            }
            ExitAction::Stop(s) => return Ok(Some(s)),
        }
        .map(|r: Option<StopReason>| r)
        .and_then(|r| {
            // An event the exit interrupted is delivered again, before
            // anything new (SDM 27.2.4 / 29.3).
            if let Some((info, err, len)) = self.reinject.take() {
                rw(control::VMENTRY_INTERRUPTION_INFO, info.for_reinjection())?;
                rw(control::VMENTRY_EXCEPTION_ERR_CODE, err)?;
                rw(control::VMENTRY_INSTRUCTION_LEN, len)?;
            }
            Ok(r)
        })
    }

    /// Injects #GP(0) at the next entry.
    fn inject_gp(&mut self) -> Result<Own, VmxFail> {
        self.inject_fault(x86::irq::GENERAL_PROTECTION_FAULT_VECTOR, Some(0))
    }

    /// Injects fault `vector` at the next entry. Real mode (CR0.PE = 0)
    /// delivers exceptions without an error code, and asking for one there
    /// fails the VM entry (SDM 27.2.1.3). A fault leaves RFLAGS.RF set in
    /// the frame it pushes (SDM 6.5), as after a real fault, so a guest
    /// returning to a breakpointed instruction does not trap again.
    fn inject_fault(&mut self, vector: u8, error: Option<u32>) -> Result<Own, VmxFail> {
        let protected = rd(guest::CR0)? & CR0_PE != 0;
        let error = error.filter(|_| protected);
        rw(
            control::VMENTRY_INTERRUPTION_INFO,
            InterruptionInfo::exception(vector, error.is_some()),
        )?;
        rw(control::VMENTRY_EXCEPTION_ERR_CODE, error.unwrap_or(0))?;
        let rflags = rd(guest::RFLAGS)?;
        rw(guest::RFLAGS, rflags | RFlags::RESUME_FLAG.bits())?;
        Ok(Own::Done(ExitAction::Retry))
    }

    fn gpr(&self, n: u8) -> Result<u64, VmxFail> {
        let r = &self.regs;
        Ok(match n {
            0 => r.rax,
            1 => r.rcx,
            2 => r.rdx,
            3 => r.rbx,
            4 => rd(guest::RSP)?,
            5 => r.rbp,
            6 => r.rsi,
            7 => r.rdi,
            8 => r.r8,
            9 => r.r9,
            10 => r.r10,
            11 => r.r11,
            12 => r.r12,
            13 => r.r13,
            14 => r.r14,
            _ => r.r15,
        })
    }

    /// Sets general-purpose register `n` (x86 encoding order).
    pub fn set_gpr(&mut self, n: u8, v: u64) -> Result<(), VmxFail> {
        let r = &mut self.regs;
        match n {
            0 => r.rax = v,
            1 => r.rcx = v,
            2 => r.rdx = v,
            3 => r.rbx = v,
            4 => rw(guest::RSP, v)?,
            5 => r.rbp = v,
            6 => r.rsi = v,
            7 => r.rdi = v,
            8 => r.r8 = v,
            9 => r.r9 = v,
            10 => r.r10 = v,
            11 => r.r11 = v,
            12 => r.r12 = v,
            13 => r.r13 = v,
            14 => r.r14 = v,
            _ => r.r15 = v,
        }
        Ok(())
    }

    /// Level one of the exit dispatch: the exits the vCPU owns.
    fn handle_own(&mut self, info: &VmExitInfo) -> Result<Own, VmxFail> {
        let advance = Ok(Own::Done(ExitAction::Advance(None)));
        match info.basic() {
            ExitReason::Cpuid => {
                self.cpuid();
                advance
            }
            ExitReason::CrAccess => self.cr_access(CrAccess::decode(info.qualification)),
            ExitReason::Rdmsr => self.rdmsr(),
            ExitReason::Wrmsr => self.wrmsr(),
            ExitReason::Xsetbv => self.inject_gp(),
            // No PMU is offered (CPUID leaf 0xA is empty): #GP, as for a
            // counter that does not exist.
            ExitReason::Rdpmc => self.inject_gp(),
            // The slice or the VM's next timer event ended (accounted in
            // the loop); the VM polls its devices before the next entry.
            ExitReason::PreemptionTimer => Ok(Own::Done(ExitAction::Retry)),
            // The guest can take an interrupt now: the VM injects it.
            ExitReason::InterruptWindow => {
                self.interrupt_window(false)?;
                Ok(Own::Done(ExitAction::Retry))
            }
            ExitReason::NmiWindow => {
                self.nmi_window(false)?;
                Ok(Own::Done(ExitAction::Retry))
            }
            // Tern takes no interrupts: one that arrives while the guest runs
            // was acknowledged by the exit; it is ended and the guest
            // resumes. (NMIs exit as exception/NMI and are dropped.)
            ExitReason::ExternalInterrupt => {
                let info = rd(exit_info::VMEXIT_INTERRUPTION_INFO)?;
                if info.is_valid() {
                    cpu::end_of_interrupt(info.vector());
                }
                Ok(Own::Done(ExitAction::Retry))
            }
            ExitReason::ExceptionOrNmi => Ok(Own::Done(ExitAction::Retry)),
            // With MONITOR hidden in CPUID, these only come from a guest
            // that ignores it: they do nothing.
            ExitReason::Mwait | ExitReason::Monitor => Ok(Own::Done(ExitAction::Advance(None))),
            ExitReason::IoInstruction => {
                let Some(q) = IoQualification::decode(info.qualification) else {
                    return Ok(Own::Done(ExitAction::Stop(StopReason::UnhandledExit {
                        reason: 30,
                    })));
                };
                if q.string || q.rep {
                    let instr_info = rd(exit_info::VMEXIT_INSTRUCTION_INFO)?;
                    return Ok(
                        match hv_core::emulate::StringIo::from_exit(
                            info.qualification,
                            instr_info,
                            info.instruction_len,
                        ) {
                            Ok(io) => Own::Up(VcpuExit::StringIo(io)),
                            Err(_) => Own::Done(ExitAction::Stop(StopReason::UnsupportedIo {
                                port: q.port,
                            })),
                        },
                    );
                }
                let value = (self.regs.rax & (u64::MAX >> (64 - 8 * u32::from(q.size)))) as u32;
                Ok(Own::Up(VcpuExit::Io {
                    port: q.port,
                    size: q.size,
                    access: q.access,
                    value,
                }))
            }
            ExitReason::EptViolation => {
                // A fault while the CPU was delivering an event: emulating
                // the instruction at RIP would lose the event.
                if rd(exit_info::IDT_VECTORING_INFO)?.is_valid() {
                    return Ok(Own::Done(ExitAction::Stop(
                        StopReason::DuringEventDelivery {
                            gpa: info.guest_phys,
                        },
                    )));
                }
                let access = EptViolation::decode(info.qualification).access();
                Ok(Own::Up(VcpuExit::Mmio {
                    gpa: info.guest_phys,
                    access,
                    qualification: info.qualification,
                    linear: info.guest_linear,
                }))
            }
            ExitReason::EptMisconfig => Ok(Own::Done(ExitAction::Stop(StopReason::EptMisconfig {
                gpa: info.guest_phys,
            }))),
            ExitReason::Vmcall => {
                // CPL is SS.DPL (SDM 25.4.1).
                let cpl = AccessRights::from_bits_retain(rd(guest::SS.access_rights)?).dpl();
                let r = &self.regs;
                Ok(Own::Up(VcpuExit::Hypercall {
                    nr: r.rax,
                    args: [r.rbx, r.rcx, r.rdx],
                    cpl,
                }))
            }
            ExitReason::Hlt => {
                let rflags = rd(guest::RFLAGS)?;
                Ok(Own::Up(VcpuExit::Halt {
                    interrupts_enabled: rflags & RFlags::INTERRUPT_FLAG.bits() != 0,
                }))
            }
            ExitReason::TripleFault => Ok(Own::Up(VcpuExit::Shutdown)),
            other => Ok(Own::Done(ExitAction::Stop(StopReason::UnhandledExit {
                reason: other.number(),
            }))),
        }
    }

    fn cpuid(&mut self) {
        let (leaf, sub) = (self.regs.rax as u32, self.regs.rcx as u32);
        let mut r = match leaf {
            0x4000_0000 => {
                // Hypervisor leaf: max leaf and "TernTernTern".
                let sig = u32::from_le_bytes(*b"Tern");
                [0x4000_0001, sig, sig, sig]
            }
            0x4000_0001..=0x4000_00FF => [0; 4],
            _ => cpu::cpuid(leaf, sub),
        };
        match leaf {
            1 => {
                // ECX: hide DTES64 (2), MONITOR (3), DS-CPL (4), VMX (5),
                // SMX (6), EIST (7), TM2 (8), SDBG (11), PDCM (15), XSAVE
                // (26), OSXSAVE (27): Tern emulates none of them (and
                // refuses their MSRs); show x2APIC (21) and TSC deadline
                // (24), which the local APIC model emulates; set
                // "hypervisor present" (31).
                for bit in [2, 3, 4, 5, 6, 7, 8, 11, 15, 26, 27] {
                    r[2] &= !(1 << bit);
                }
                r[2] |= (1 << 21) | (1 << 24) | (1 << 31);
                // EDX: hide MCE (7), MCA (14), DS (21), ACPI thermal (22),
                // TM (29), PBE (31); show APIC (9) and MTRR (12).
                for bit in [7, 14, 21, 22, 29, 31] {
                    r[3] &= !(1 << bit);
                }
                r[3] |= (1 << 9) | (1 << 12);
                // EBX[31:24]: initial APIC ID 0; one logical processor.
                r[1] &= 0x0000_FFFF;
                r[1] |= 1 << 16;
            }
            // x2APIC topology: this vCPU is x2APIC ID 0.
            0xB | 0x1F => r[3] = 0,
            // Leaf 7: hide INVPCID (EBX 10) and WAITPKG (ECX 5), which need
            // controls Tern does not set, and every feature whose CR4 bit
            // the guest cannot set under VMX (CR4_FIXED1).
            7 => {
                r[1] &= !(1 << 10);
                r[2] &= !(1 << 5);
                // MPX (EBX 14) and Intel PT (EBX 25) have MSRs Tern
                // refuses; so do ARCH_CAPABILITIES (EDX 29), L1D_FLUSH
                // (EDX 28) and CORE_CAPABILITIES (EDX 30). PKU/OSPKE (ECX
                // 3, 4), CET (ECX 7, EDX 20) and PKS (ECX 31) have state
                // Tern does not switch between VMs.
                r[1] &= !((1 << 14) | (1 << 25));
                r[2] &= !((1 << 3) | (1 << 4) | (1 << 7) | (1 << 31));
                r[3] &= !((1 << 20) | (1 << 28) | (1 << 29) | (1 << 30));
                // LA57 (ECX 16), RDPID (ECX 22: needs the RDTSCP control)
                // and UINTR (EDX 5); subleaves 1 and up (FRED, LAM, ...)
                // are not offered.
                r[2] &= !((1 << 16) | (1 << 22));
                r[3] &= !(1 << 5);
                if sub == 0 {
                    r[0] = 0;
                } else {
                    r = [0; 4];
                }
                let cr4_ok = |bit: u32| self.caps.cr4_fixed1 & (1u64 << bit) != 0;
                // (register, CPUID bit, CR4 bit)
                for (reg, bit, cr4) in [
                    (1, 0, 16),  // FSGSBASE
                    (1, 7, 20),  // SMEP
                    (1, 20, 21), // SMAP
                    (2, 2, 11),  // UMIP
                    (2, 3, 22),  // PKU
                    (2, 7, 23),  // CET shadow stacks
                    (2, 16, 12), // LA57
                    (2, 31, 24), // PKS
                ] {
                    if !cr4_ok(cr4) {
                        r[reg] &= !(1 << bit);
                    }
                }
            }
            // Power management, PMU, XSAVE state and Intel PT: nothing is
            // offered.
            6 | 0xA | 0xD | 0x14 => r = [0; 4],
            // RDTSCP needs a control Tern does not set.
            0x8000_0001 => r[3] &= !(1 << 27),
            _ => {}
        }
        self.regs.rax = r[0].into();
        self.regs.rbx = r[1].into();
        self.regs.rcx = r[2].into();
        self.regs.rdx = r[3].into();
    }

    fn write_cr0(&mut self, value: u64) -> Result<Own, VmxFail> {
        // Only NE is shadowed; PG and the rest are the guest's real bits.
        let efer = rd(guest::IA32_EFER)?;
        // PG needs PE; long mode also needs CR4.PAE; bits 63:32 are
        // reserved; NW without CD is invalid; 64-bit code cannot turn
        // paging off (SDM, MOV to CR0).
        let pae = rd(guest::CR4)? & Cr4Flags::PHYSICAL_ADDRESS_EXTENSION.bits() != 0;
        let cs_l = AccessRights::from_bits_retain(rd(guest::CS.access_rights)?)
            .contains(AccessRights::LONG_MODE);
        const CR0_NW: u64 = Cr0Flags::NOT_WRITE_THROUGH.bits();
        const CR0_CD: u64 = Cr0Flags::CACHE_DISABLE.bits();
        let bad = (value & CR0_PG != 0 && (value & CR0_PE == 0 || (efer & EFER_LME != 0 && !pae)))
            || value >> 32 != 0
            || (value & CR0_NW != 0 && value & CR0_CD == 0)
            || (efer & EFER_LMA != 0 && cs_l && value & CR0_PG == 0);
        if bad {
            return self.inject_gp();
        }
        // A write that changes PG, CD or NW with PAE paging on (not
        // IA-32e) loads the four PDPTEs from guest memory, which the VM
        // reads; it finishes with `apply_cr0`.
        let old = rd(guest::CR0)?;
        let reload = (old ^ value) & (CR0_PG | CR0_NW | CR0_CD) != 0;
        if value & CR0_PG != 0 && pae && efer & EFER_LME == 0 && reload {
            let cr3 = rd(guest::CR3)?;
            return Ok(Own::Up(VcpuExit::PaePdptes { cr3, cr0: value }));
        }
        self.apply_cr0(value, None)?;
        Ok(Own::Done(ExitAction::Advance(None)))
    }

    /// Completes a checked MOV to CR0 (with the PDPTEs when it turns on PAE
    /// paging): EFER.LMA and the IA-32e entry control follow PG, and the
    /// guest's TLB is flushed when PG, PE or WP change, as the instruction
    /// does.
    pub fn apply_cr0(&mut self, value: u64, pdptes: Option<[u64; 4]>) -> Result<(), VmxFail> {
        let old = rd(guest::CR0)?;
        let mut efer = rd(guest::IA32_EFER)?;
        if let Some(p) = pdptes {
            for (f, v) in guest::PDPTES.into_iter().zip(p) {
                rw(f, v)?;
            }
        }
        let mut entry = rd(control::VMENTRY_CONTROLS)?;
        if value & CR0_PG != 0 && old & CR0_PG == 0 && efer & EFER_LME != 0 {
            efer |= EFER_LMA;
            entry |= EntryControls::IA32E_MODE_GUEST.bits();
        } else if value & CR0_PG == 0 && old & CR0_PG != 0 {
            efer &= !EFER_LMA;
            entry &= !EntryControls::IA32E_MODE_GUEST.bits();
        }
        rw(guest::IA32_EFER, efer)?;
        rw(control::VMENTRY_CONTROLS, entry)?;
        rw(control::CR0_READ_SHADOW, value)?;
        rw(guest::CR0, self.caps.fix_cr0(value, true))?;
        const CR0_WP: u64 = Cr0Flags::WRITE_PROTECT.bits();
        if (old ^ value) & (CR0_PG | CR0_WP | CR0_PE) != 0 {
            if let Some(kind) = self.caps.invvpid_type() {
                instr::invvpid(kind, self.vpid)?;
            }
        }
        Ok(())
    }

    /// MOV to CR4 (SDM: #GP for reserved bits, for hidden features, and for
    /// clearing PAE in IA-32e mode).
    fn write_cr4(&mut self, v: u64) -> Result<Own, VmxFail> {
        let long = rd(guest::IA32_EFER)? & EFER_LMA != 0;
        let vmxe = Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits();
        let pae = Cr4Flags::PHYSICAL_ADDRESS_EXTENSION.bits();
        let reserved = v & !(self.caps.cr4_fixed1 | vmxe) != 0;
        if v & CR4_HIDDEN != 0 || reserved || (long && v & pae == 0) {
            return self.inject_gp();
        }
        rw(control::CR4_READ_SHADOW, v)?;
        rw(guest::CR4, self.caps.fix_cr4(v))?;
        Ok(Own::Done(ExitAction::Advance(None)))
    }

    fn cr_access(&mut self, a: CrAccess) -> Result<Own, VmxFail> {
        match a {
            CrAccess::MovTo { cr: 0, gpr } => {
                let v = self.gpr(gpr)?;
                self.write_cr0(v)
            }
            // Only writes that change an owned bit (a feature CPUID hides)
            // exit.
            CrAccess::MovTo { cr: 4, gpr } => self.write_cr4(self.gpr(gpr)?),
            CrAccess::MovTo { cr: 3, gpr } => {
                rw(guest::CR3, self.gpr(gpr)?)?;
                Ok(Own::Done(ExitAction::Advance(None)))
            }
            CrAccess::MovFrom { cr: 3, gpr } => {
                let v = rd(guest::CR3)?;
                self.set_gpr(gpr, v)?;
                Ok(Own::Done(ExitAction::Advance(None)))
            }
            // CR8 is the local APIC's TPR[7:4]: the VM's APIC model has it.
            CrAccess::MovTo { cr: 8, gpr } => {
                let v = self.gpr(gpr)?;
                if v & !0xf != 0 {
                    return self.inject_gp();
                }
                Ok(Own::Up(VcpuExit::Cr8 {
                    write: Some(v as u8),
                    gpr,
                }))
            }
            CrAccess::MovFrom { cr: 8, gpr } => Ok(Own::Up(VcpuExit::Cr8 { write: None, gpr })),
            // CLTS and LMSW touch CR0 bits 3:0, none of them shadowed, so
            // they never exit; CR3 exits only on CPUs that force CR3
            // exiting (handled above).
            _ => Ok(Own::Done(ExitAction::Stop(StopReason::UnhandledExit {
                reason: 28,
            }))),
        }
    }

    fn refuse_msr(&mut self, m: u32, write: bool) -> Result<Own, VmxFail> {
        if !self.refused_logged.contains(&m) && self.refused_logged.len() < 64 {
            self.refused_logged.push(m);
            let what = if write { "WRMSR" } else { "RDMSR" };
            log::warn!("guest {what} {m:#x} refused (#GP)");
        }
        self.inject_gp()
    }

    /// The 64-bit or natural-width guest field of an MSR kept in the
    /// VMCS; `None` for IA32_SYSENTER_CS, a 32-bit field.
    fn vmcs_msr_field(m: VmcsMsr) -> Option<FieldNat64> {
        Some(match m {
            VmcsMsr::SysenterCs => return None,
            VmcsMsr::SysenterEsp => FieldNat64::Nat(guest::IA32_SYSENTER_ESP),
            VmcsMsr::SysenterEip => FieldNat64::Nat(guest::IA32_SYSENTER_EIP),
            VmcsMsr::DebugCtl => FieldNat64::Full(guest::IA32_DEBUGCTL),
            VmcsMsr::Pat => FieldNat64::Full(guest::IA32_PAT),
            VmcsMsr::Efer => FieldNat64::Full(guest::IA32_EFER),
            VmcsMsr::FsBase => FieldNat64::Nat(guest::FS.base),
            VmcsMsr::GsBase => FieldNat64::Nat(guest::GS.base),
        })
    }

    fn read_vmcs_msr(m: VmcsMsr) -> Result<u64, VmxFail> {
        match Self::vmcs_msr_field(m) {
            None => rd(guest::IA32_SYSENTER_CS).map(u64::from),
            Some(FieldNat64::Nat(f)) => rd(f),
            Some(FieldNat64::Full(f)) => rd(f),
        }
    }

    /// Writes an MSR kept in the VMCS (IA32_SYSENTER_CS keeps bits 31:0,
    /// as the MSR does).
    fn write_vmcs_msr(m: VmcsMsr, v: u64) -> Result<(), VmxFail> {
        match Self::vmcs_msr_field(m) {
            None => rw(guest::IA32_SYSENTER_CS, v as u32),
            Some(FieldNat64::Nat(f)) => rw(f, v),
            Some(FieldNat64::Full(f)) => rw(f, v),
        }
    }

    /// RDMSR through the policy table (`hv_core::msr`).
    fn rdmsr(&mut self) -> Result<Own, VmxFail> {
        let m = self.regs.rcx as u32;
        let rule = msr::rule(m, self.host_msr);
        let v = match rule {
            MsrRule::Tsc => self.guest_tsc(),
            MsrRule::TscAdjust => self.tsc_adjust,
            MsrRule::Lapic => {
                return Ok(Own::Up(VcpuExit::Msr {
                    msr: m,
                    write: None,
                }))
            }
            MsrRule::Vmcs(f) => Self::read_vmcs_msr(f)?,
            MsrRule::Switched => {
                // SWAPGS changes KERNEL_GS_BASE without an exit: the real
                // MSR holds the guest's current value.
                let i = msr::SWITCHED.iter().position(|&x| x == m).unwrap_or(0);
                self.switched[i] = cpu::rdmsr(m);
                self.switched[i]
            }
            MsrRule::Soft { .. } | MsrRule::Const(_) => match self.soft_msrs.read(m, rule) {
                Ok(v) => v,
                Err(_) => return self.refuse_msr(m, false),
            },
            MsrRule::WriteOnly | MsrRule::Refused => return self.refuse_msr(m, false),
        };
        self.complete_rdmsr(v);
        Ok(Own::Done(ExitAction::Advance(None)))
    }

    /// WRMSR through the policy table. What real hardware refuses with #GP
    /// is refused here too, so that no value reaches a VMCS field that
    /// would fail the next VM entry.
    fn wrmsr(&mut self) -> Result<Own, VmxFail> {
        let m = self.regs.rcx as u32;
        let v = self.wrmsr_value();
        let rule = msr::rule(m, self.host_msr);
        match rule {
            MsrRule::Tsc => {
                let old = self.guest_tsc();
                self.tsc_offset = v.wrapping_sub(cpu::rdtsc());
                self.tsc_adjust = self.tsc_adjust.wrapping_add(v.wrapping_sub(old));
                rw(control::TSC_OFFSET, self.tsc_offset)?;
            }
            MsrRule::TscAdjust => {
                self.tsc_offset = self
                    .tsc_offset
                    .wrapping_add(v.wrapping_sub(self.tsc_adjust));
                self.tsc_adjust = v;
                rw(control::TSC_OFFSET, self.tsc_offset)?;
            }
            MsrRule::Lapic => {
                return Ok(Own::Up(VcpuExit::Msr {
                    msr: m,
                    write: Some(v),
                }))
            }
            MsrRule::Vmcs(VmcsMsr::Efer) => {
                // SCE, LME, NXE may change; LMA follows CR0.PG, not WRMSR.
                const WRITABLE: u64 = EferFlags::SYSTEM_CALL_EXTENSIONS.bits()
                    | EFER_LME
                    | EferFlags::NO_EXECUTE_ENABLE.bits();
                if v & !(WRITABLE | EFER_LMA) != 0 {
                    return self.inject_gp();
                }
                let cur = rd(guest::IA32_EFER)?;
                // LME cannot change while paging is on.
                if (v ^ cur) & EFER_LME != 0 && rd(guest::CR0)? & CR0_PG != 0 {
                    return self.inject_gp();
                }
                rw(guest::IA32_EFER, (v & WRITABLE) | (cur & EFER_LMA))?;
            }
            MsrRule::Vmcs(f) => {
                let ok = match f {
                    VmcsMsr::SysenterCs => true,
                    // Each PAT entry must be a valid memory type.
                    VmcsMsr::Pat => v.to_le_bytes().iter().all(|&t| matches!(t, 0 | 1 | 4..=7)),
                    // LBR (0) and BTF (1) only; the rest is refused.
                    VmcsMsr::DebugCtl => DebugCtl::from_bits(v).is_some(),
                    _ => msr::canonical(v),
                };
                if !ok {
                    return self.inject_gp();
                }
                Self::write_vmcs_msr(f, v)?;
            }
            MsrRule::Switched => {
                // STAR takes any value; SFMASK has bits 63:32 reserved; the
                // others are addresses. A value the CPU would refuse must
                // never reach WRMSR here (a #GP in the host is fatal).
                let ok = match m {
                    msr::IA32_STAR => true,
                    msr::IA32_FMASK => v >> 32 == 0,
                    _ => msr::canonical(v),
                };
                if !ok {
                    return self.inject_gp();
                }
                let i = msr::SWITCHED.iter().position(|&x| x == m).unwrap_or(0);
                self.switched[i] = v;
                // SAFETY: checked like hardware checks it; only SYSCALL and
                // SWAPGS in the guest use these registers.
                unsafe { cpu::wrmsr(m, v) };
            }
            MsrRule::Soft { .. } | MsrRule::Const(_) | MsrRule::WriteOnly => {
                if self.soft_msrs.write(m, rule, v).is_err() {
                    return self.inject_gp();
                }
            }
            MsrRule::Refused => return self.refuse_msr(m, true),
        }
        Ok(Own::Done(ExitAction::Advance(None)))
    }

    /// The paging and code-size state the instruction emulator needs.
    pub fn cpu_mode(&self) -> Result<hv_core::emulate::CpuMode, VmxFail> {
        let ar = AccessRights::from_bits_retain(rd(guest::CS.access_rights)?);
        Ok(hv_core::emulate::CpuMode {
            cr0: rd(guest::CR0)?,
            cr3: rd(guest::CR3)?,
            cr4: rd(guest::CR4)?,
            efer: rd(guest::IA32_EFER)?,
            cs_base: rd(guest::CS.base)?,
            cs_l: ar.contains(AccessRights::LONG_MODE),
            cs_db: ar.contains(AccessRights::DEFAULT_BIG),
            seg_base: [
                rd(guest::ES.base)?,
                rd(guest::CS.base)?,
                rd(guest::SS.base)?,
                rd(guest::DS.base)?,
                rd(guest::FS.base)?,
                rd(guest::GS.base)?,
            ],
        })
    }

    /// The guest's registers in the emulator's layout.
    pub fn emu_regs(&self) -> Result<hv_core::emulate::Regs, VmxFail> {
        let mut gpr = [0u64; 16];
        for (i, g) in gpr.iter_mut().enumerate() {
            *g = self.gpr(i as u8)?;
        }
        Ok(hv_core::emulate::Regs {
            gpr,
            rip: rd(guest::RIP)?,
            rflags: rd(guest::RFLAGS)?,
        })
    }

    /// Writes back what the emulator changed.
    pub fn set_emu_regs(&mut self, r: &hv_core::emulate::Regs) -> Result<(), VmxFail> {
        for (i, v) in r.gpr.iter().enumerate() {
            self.set_gpr(i as u8, *v)?;
        }
        let moved = rd(guest::RIP)? != r.rip;
        rw(guest::RIP, r.rip)?;
        rw(guest::RFLAGS, r.rflags)?;
        // A `rep` iteration batch that left RIP on the instruction has not
        // completed it yet.
        if moved {
            self.instruction_completed()?;
        }
        Ok(())
    }

    /// After Tern completed an instruction for the guest (skipped or
    /// emulated): STI/MOV-SS blocking ends, and with RFLAGS.TF set the
    /// single-step #DB the instruction owes is injected (as KVM does).
    fn instruction_completed(&mut self) -> Result<(), VmxFail> {
        let intr = Self::interruptibility()?;
        let shadow = Interruptibility::BLOCKING_BY_STI | Interruptibility::BLOCKING_BY_MOV_SS;
        if intr.intersects(shadow) {
            rw(
                guest::INTERRUPTIBILITY_STATE,
                intr.difference(shadow).bits(),
            )?;
        }
        let tf = rd(guest::RFLAGS)? & RFlags::TRAP_FLAG.bits() != 0;
        let btf = DebugCtl::from_bits_retain(rd(guest::IA32_DEBUGCTL)?).contains(DebugCtl::BTF);
        if tf && !btf {
            // The single-step trap is delivered now, before any interrupt
            // that is waiting (which then gets an interrupt window), with
            // DR6.BS set as the CPU sets it (DR6 is the guest's while it
            // runs).
            let mut dr = cpu::read_debug_regs();
            dr[4] |= Dr6Flags::STEP.bits();
            cpu::write_debug_regs(&dr);
            rw(
                control::VMENTRY_INTERRUPTION_INFO,
                InterruptionInfo::exception(x86::irq::DEBUG_VECTOR, false),
            )?;
        }
        Ok(())
    }

    /// The vCPU's state for a migration (the vCPU is stopped: its FPU,
    /// debug and SYSCALL state are in this struct, not in the registers).
    pub fn capture(&self) -> Result<VcpuState, VmxFail> {
        // SAFETY: the VMCS is this vCPU's own and was launched or cleared.
        unsafe { instr::vmptrld(self.vmcs.as_u64())? };
        let r = &self.regs;
        let mut segments = [Segment::default(); 8];
        for (seg, f) in segments.iter_mut().zip(guest::SEGMENTS) {
            *seg = Segment {
                selector: rd(f.selector)?,
                base: rd(f.base)?,
                limit: rd(f.limit)?,
                access: rd(f.access_rights)?,
            };
        }
        let mut pdptes = [0; 4];
        for (p, f) in pdptes.iter_mut().zip(guest::PDPTES) {
            *p = rd(f)?;
        }
        let info = rd(control::VMENTRY_INTERRUPTION_INFO)?;
        let pending_event = if info.is_valid() {
            Some((
                info.bits(),
                rd(control::VMENTRY_EXCEPTION_ERR_CODE)?,
                rd(control::VMENTRY_INSTRUCTION_LEN)?,
            ))
        } else {
            None
        };
        let [d0, d1, d2, d3, d6] = self.debug_regs;
        Ok(VcpuState {
            gprs: [
                r.rax,
                r.rcx,
                r.rdx,
                r.rbx,
                rd(guest::RSP)?,
                r.rbp,
                r.rsi,
                r.rdi,
                r.r8,
                r.r9,
                r.r10,
                r.r11,
                r.r12,
                r.r13,
                r.r14,
                r.r15,
            ],
            rip: rd(guest::RIP)?,
            rflags: rd(guest::RFLAGS)?,
            cr0: Self::guest_view(
                guest::CR0,
                control::CR0_GUEST_HOST_MASK,
                control::CR0_READ_SHADOW,
            )?,
            cr2: r.cr2,
            cr3: rd(guest::CR3)?,
            cr4: Self::guest_view(
                guest::CR4,
                control::CR4_GUEST_HOST_MASK,
                control::CR4_READ_SHADOW,
            )?,
            efer: rd(guest::IA32_EFER)?,
            segments,
            gdtr: DescTable {
                base: rd(guest::GDTR_BASE)?,
                limit: rd(guest::GDTR_LIMIT)?,
            },
            idtr: DescTable {
                base: rd(guest::IDTR_BASE)?,
                limit: rd(guest::IDTR_LIMIT)?,
            },
            dr: [d0, d1, d2, d3, d6, rd(guest::DR7)?],
            debugctl: rd(guest::IA32_DEBUGCTL)?,
            pat: rd(guest::IA32_PAT)?,
            sysenter: [
                rd(guest::IA32_SYSENTER_CS)?.into(),
                rd(guest::IA32_SYSENTER_ESP)?,
                rd(guest::IA32_SYSENTER_EIP)?,
            ],
            syscall_msrs: self.switched,
            soft_msrs: self.soft_msrs.entries().collect(),
            tsc: self.guest_tsc(),
            tsc_adjust: self.tsc_adjust,
            pdptes,
            interruptibility: rd(guest::INTERRUPTIBILITY_STATE)?,
            activity: rd(guest::ACTIVITY_STATE)?,
            pending_debug: rd(guest::PENDING_DBG_EXCEPTIONS)?,
            pending_event,
            fxsave: self.fpu.0.to_vec(),
        })
    }

    /// A control register as the guest sees it: its own bits, and the read
    /// shadow's for the bits Tern owns (the guest/host mask).
    fn guest_view(real: FieldNat, mask: FieldNat, shadow: FieldNat) -> Result<u64, VmxFail> {
        let m = rd(mask)?;
        Ok((rd(real)? & !m) | (rd(shadow)? & m))
    }

    /// Takes a migrated state (checked first: nothing changes on error).
    /// The guest's TSC continues from the saved value.
    pub fn restore(&mut self, s: &VcpuState) -> Result<(), RestoreError> {
        let soft = SoftMsrs::from_entries(&s.soft_msrs, |m| msr::rule(m, self.host_msr))
            .map_err(RestoreError::Msr)?;
        s.check(cpu::mxcsr_mask(), CR4_HIDDEN)
            .map_err(RestoreError::Invalid)?;
        // SAFETY: the VMCS is this vCPU's own.
        unsafe { instr::vmptrld(self.vmcs.as_u64()).map_err(RestoreError::Vmx)? };
        self.write_state(s).map_err(RestoreError::Vmx)?;
        let g = &s.gprs;
        self.regs = GuestRegs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            cr2: s.cr2,
        };
        self.soft_msrs = soft;
        self.switched = s.syscall_msrs;
        self.debug_regs = [s.dr[0], s.dr[1], s.dr[2], s.dr[3], s.dr[4]];
        self.fpu.0.copy_from_slice(&s.fxsave);
        self.tsc_adjust = s.tsc_adjust;
        self.reinject = None;
        Ok(())
    }

    fn write_state(&mut self, s: &VcpuState) -> Result<(), VmxFail> {
        for (seg, f) in s.segments.iter().zip(guest::SEGMENTS) {
            rw(f.selector, seg.selector)?;
            rw(f.base, seg.base)?;
            rw(f.limit, seg.limit)?;
            rw(f.access_rights, seg.access)?;
        }
        for (p, f) in s.pdptes.iter().zip(guest::PDPTES) {
            rw(f, *p)?;
        }
        rw(guest::RSP, s.gprs[4])?;
        rw(guest::RIP, s.rip)?;
        rw(guest::RFLAGS, s.rflags)?;
        rw(guest::CR3, s.cr3)?;
        rw(control::CR4_READ_SHADOW, s.cr4)?;
        rw(guest::CR4, self.caps.fix_cr4(s.cr4))?;
        rw(control::CR0_READ_SHADOW, s.cr0)?;
        rw(guest::CR0, self.caps.fix_cr0(s.cr0, true))?;
        rw(guest::IA32_EFER, s.efer)?;
        let mut entry = rd(control::VMENTRY_CONTROLS)?;
        let ia32e = EntryControls::IA32E_MODE_GUEST.bits();
        if s.efer & EFER_LMA != 0 {
            entry |= ia32e;
        } else {
            entry &= !ia32e;
        }
        rw(control::VMENTRY_CONTROLS, entry)?;
        rw(guest::GDTR_BASE, s.gdtr.base)?;
        rw(guest::GDTR_LIMIT, s.gdtr.limit)?;
        rw(guest::IDTR_BASE, s.idtr.base)?;
        rw(guest::IDTR_LIMIT, s.idtr.limit)?;
        rw(guest::DR7, s.dr[5])?;
        rw(guest::IA32_DEBUGCTL, s.debugctl)?;
        rw(guest::IA32_PAT, s.pat)?;
        // The saved value came from this 32-bit field.
        rw(guest::IA32_SYSENTER_CS, s.sysenter[0] as u32)?;
        rw(guest::IA32_SYSENTER_ESP, s.sysenter[1])?;
        rw(guest::IA32_SYSENTER_EIP, s.sysenter[2])?;
        rw(guest::INTERRUPTIBILITY_STATE, s.interruptibility)?;
        rw(guest::ACTIVITY_STATE, s.activity)?;
        rw(guest::PENDING_DBG_EXCEPTIONS, s.pending_debug)?;
        match s.pending_event {
            Some((info, err, len)) => {
                rw(
                    control::VMENTRY_INTERRUPTION_INFO,
                    InterruptionInfo::from_bits(info),
                )?;
                rw(control::VMENTRY_EXCEPTION_ERR_CODE, err)?;
                rw(control::VMENTRY_INSTRUCTION_LEN, len)?;
            }
            None => rw(control::VMENTRY_INTERRUPTION_INFO, InterruptionInfo::NONE)?,
        }
        // The guest's TSC goes on from where it stopped.
        self.tsc_offset = s.tsc.wrapping_sub(cpu::rdtsc());
        rw(control::TSC_OFFSET, self.tsc_offset)?;
        if let Some(kind) = self.caps.invvpid_type() {
            instr::invvpid(kind, self.vpid)?;
        }
        Ok(())
    }

    /// Points the VMCS at a new EPT root (after a rebuild).
    pub fn set_eptp(&mut self, eptp: u64) -> Result<(), VmxFail> {
        rw(control::EPTP, eptp)
    }

    /// Prints the guest state for a stop report.
    pub fn dump(&self, name: &str) {
        // A field that cannot be read shows as "unreadable", not as a
        // made-up value.
        let h = |r: Result<u64, VmxFail>| Shown(r.ok());
        let r = &self.regs;
        let e = &self.last_exit;
        if self.exits.total() == 0 {
            crate::println!("[{name}] no VM exit yet: the guest never ran");
        } else {
            crate::println!(
                "[{name}] last exit: reason {} ({}) qualification {:#x} rip {:#x} gpa {:#x} gla {:#x}",
                e.basic().number(),
                e.basic().name(),
                e.qualification,
                e.guest_rip,
                e.guest_phys,
                e.guest_linear
            );
        }
        crate::println!(
            "[{name}] rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} (shadow {:#x}) cr3 {:#x} cr4 {:#x} efer {:#x} cs {:#x}",
            h(rd(guest::RIP)),
            h(rd(guest::RSP)),
            h(rd(guest::RFLAGS)),
            h(rd(guest::CR0)),
            h(rd(control::CR0_READ_SHADOW)),
            h(rd(guest::CR3)),
            h(rd(guest::CR4)),
            h(rd(guest::IA32_EFER)),
            h(rd(guest::CS.selector).map(u64::from))
        );
        crate::println!(
            "[{name}] rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}",
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp
        );
        crate::println!(
            "[{name}] r8 {:#x} r9 {:#x} r10 {:#x} r11 {:#x} r12 {:#x} r13 {:#x} r14 {:#x} r15 {:#x}",
            r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
        );
    }

    /// Gives the VMCS and bitmaps back.
    pub fn destroy(self) {
        // SAFETY: the VMCS is ours; clearing it before freeing the frame is
        // what the SDM requires.
        match unsafe { instr::vmclear(self.vmcs.as_u64()) } {
            Ok(()) => Frames.free_frame(self.vmcs),
            // The CPU may still write the VMCS back: the frame is kept.
            Err(e) => log::error!("VMCLEAR at teardown: {e}; keeping the VMCS frame"),
        }
        Frames.free_contiguous(self.bitmaps, 3 * 4096);
    }
}

/// A register value for a report, or "unreadable".
struct Shown(Option<u64>);

impl core::fmt::LowerHex for Shown {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(v) => core::fmt::LowerHex::fmt(&v, f),
            None => write!(f, "unreadable"),
        }
    }
}

/// A 64-bit or natural-width field (both hold a `u64`).
#[derive(Clone, Copy)]
enum FieldNat64 {
    Full(super::vmcs::Field64),
    Nat(super::vmcs::FieldNat),
}

/// The outcome of level one: finished here, or handed up to the VM.
enum Own {
    Done(ExitAction),
    Up(VcpuExit),
}
