//! The architecture-neutral side of a vCPU: what the vCPU hands up to its
//! VM after handling the exits it owns, what the VM answers, and why a VM
//! stops. The loop applies an [`ExitAction`] in one place.

use crate::ept_listener::EptListenerError;
use crate::exits::ExitError;
use crate::machine::MachineError;
use crate::vmx::exit::Access;
use crate::vmx::VmxFail;

/// An exit the vCPU could not finish by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// Port I/O; for a write, `value` holds the data.
    Io {
        port: u16,
        size: u8,
        access: Access,
        value: u32,
    },
    /// An access EPT did not map.
    Mmio {
        gpa: u64,
        access: Access,
        qualification: u64,
        linear: u64,
    },
    /// VMCALL: number in RAX, arguments in RBX, RCX, RDX; `cpl` is the
    /// guest's privilege level.
    Hypercall { nr: u64, args: [u64; 3], cpl: u8 },
    /// String or REP port I/O (`ins`/`outs`), decoded from the exit.
    StringIo(crate::emulate::StringIo),
    /// RDMSR (`write: None`) or WRMSR of an MSR the VM owns (the local
    /// APIC's); the VM completes it or answers [`ExitAction::InjectGp`].
    Msr { msr: u32, write: Option<u64> },
    /// MOV to/from CR8 (the local APIC's TPR[7:4]); `gpr` is the register.
    Cr8 { write: Option<u8>, gpr: u8 },
    /// MOV to CR0 that turns on PAE paging (checked otherwise): the VM
    /// reads the four PDPTEs at `cr3` and completes it, or answers
    /// [`ExitAction::InjectGp`] for a reserved bit in a present PDPTE.
    PaePdptes { cr3: u64, cr0: u64 },
    /// HLT.
    Halt { interrupts_enabled: bool },
    /// Triple fault.
    Shutdown,
}

/// What the vCPU loop does after an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Skip the exiting instruction and enter again; for an I/O read or a
    /// hypercall, `Some(value)` goes to RAX (low `size` bytes for I/O).
    Advance(Option<u64>),
    /// Enter again without moving RIP (an exception was injected, a timer
    /// expired).
    Retry,
    /// Inject #GP(0) and enter again without moving RIP.
    InjectGp,
    /// Stop the VM.
    Stop(StopReason),
}

/// Why a VM stopped. Each stop keeps its cause: the failed VMX
/// instruction with its VMCS field and VM-instruction error, the
/// memory-map or EPT error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked to stop with this status (isa-debug-exit, hypercall).
    Exited(u32),
    /// HLT with interrupts disabled: the vCPU can never run again.
    Halted,
    /// HLT with interrupts enabled, but no timer is armed and no device
    /// can raise an interrupt: the vCPU would sleep forever.
    HaltedForever,
    /// Triple fault.
    TripleFault,
    /// An access to guest-physical memory mapped to nothing.
    UnmappedAccess { gpa: u64, access: Access },
    /// String or REP port I/O (not emulated).
    UnsupportedIo { port: u16 },
    /// An exit reason Tern does not handle.
    UnhandledExit { reason: u16 },
    /// VM entry failed (exit reason with bit 31 set).
    EntryFailure { reason: u16, qualification: u64 },
    /// A VMX instruction failed while running the VM (a VM entry that
    /// fails its control or host-state checks is a failed VMLAUNCH or
    /// VMRESUME).
    Vmx(VmxFail),
    /// The VM's memory map could not be changed (a device's remap, a
    /// timer-driven change).
    MemoryMap(MachineError),
    /// A port access failed in the memory or device layer.
    PortIo { port: u16, error: ExitError },
    /// The EPT could not follow the memory map (or INVEPT failed): the
    /// guest's view of memory is no longer the map's.
    Ept(EptListenerError),
    /// The VM has no vCPU (a migration failed after taking it).
    NoVcpu,
    /// EPT misconfiguration: a Tern bug, reported as such.
    EptMisconfig { gpa: u64 },
    /// The VM used up its time budget (preemption-timer slices).
    TimeBudget,
    /// A write to ROM, with ROM writes configured to stop the VM.
    RomWrite { gpa: u64 },
    /// An MMIO access Tern cannot emulate (reported in detail before).
    EmulationFailed { gpa: u64 },
    /// An EPT violation while the CPU was delivering an interrupt or
    /// exception (e.g. the guest's IDT or stack is not RAM).
    DuringEventDelivery { gpa: u64 },
    /// The vCPU stopped for a migration (the VM continues elsewhere).
    Migrating,
    /// A migration failed and its dirty logging could not be turned off:
    /// the VM's memory map is no longer trusted, so it does not run on.
    MigrationCleanupFailed,
    /// The VM's whole state went out in a migration stream: it continues
    /// wherever the stream is loaded (status 0, as a completed migration).
    MigratedOut,
}

impl StopReason {
    /// The status this stop contributes to Tern's exit status: the guest's
    /// own status (0..=119; larger ones become 119), 120 for any stop that
    /// Tern imposed.
    pub fn status(&self) -> u8 {
        match self {
            Self::Exited(s) => (*s).min(119) as u8,
            Self::MigratedOut => 0,
            _ => 120,
        }
    }

    /// Whether the guest chose to stop (as opposed to being stopped).
    pub fn is_guest_exit(&self) -> bool {
        matches!(self, Self::Exited(_) | Self::Migrating | Self::MigratedOut)
    }
}

impl core::fmt::Display for StopReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Migrating => write!(f, "stopped for migration"),
            Self::MigrationCleanupFailed => write!(
                f,
                "a failed migration could not turn dirty logging off; the memory map is not trusted"
            ),
            Self::MigratedOut => write!(f, "migrated out (the stream holds the VM)"),
            Self::Exited(s) => write!(f, "guest exited with status {s}"),
            Self::Halted => write!(f, "guest halted with interrupts disabled"),
            Self::HaltedForever => write!(
                f,
                "guest halted with interrupts enabled, but no timer or device can wake it"
            ),
            Self::TripleFault => write!(f, "guest triple fault"),
            Self::UnmappedAccess { gpa, access } => {
                write!(f, "guest {} at unmapped GPA {gpa:#x}", access.name())
            }
            Self::UnsupportedIo { port } => {
                write!(f, "string/REP port I/O at port {port:#x} is not emulated")
            }
            Self::UnhandledExit { reason } => write!(f, "unhandled VM exit reason {reason}"),
            Self::EntryFailure {
                reason,
                qualification,
            } => {
                write!(
                    f,
                    "VM entry failed: reason {reason}, qualification {qualification:#x}"
                )
            }
            Self::Vmx(e) => write!(f, "{e}"),
            Self::MemoryMap(e) => write!(f, "{e}"),
            Self::PortIo { port, error } => write!(f, "port {port:#x}: {error}"),
            Self::Ept(e) => write!(f, "EPT could not follow the memory map: {e}"),
            Self::NoVcpu => write!(f, "the VM has no vCPU"),
            Self::EptMisconfig { gpa } => {
                write!(f, "EPT misconfiguration at GPA {gpa:#x} (Tern bug)")
            }
            Self::TimeBudget => write!(f, "time budget used up"),
            Self::DuringEventDelivery { gpa } => {
                write!(f, "EPT violation at GPA {gpa:#x} while delivering an event")
            }
            Self::RomWrite { gpa } => write!(f, "guest write to ROM at GPA {gpa:#x}"),
            Self::EmulationFailed { gpa } => {
                write!(f, "MMIO access at GPA {gpa:#x} could not be emulated")
            }
        }
    }
}

/// Reads the PAE PDPTEs at `cr3` (bits 31:5 of CR3 locate them) and
/// checks them: a present entry with a reserved bit (2:1, 8:5, or any bit
/// at or above `phys_bits`, SDM 4.4.1) is a #GP of the MOV to CR0.
pub fn check_pdptes(raw: [u64; 4], phys_bits: u8) -> Option<[u64; 4]> {
    let high = u64::MAX
        .checked_shl(u32::from(phys_bits.min(63)))
        .unwrap_or(0);
    let reserved = 0b1_1110_0110 | high;
    raw.iter()
        .all(|&e| e & 1 == 0 || e & reserved == 0)
        .then_some(raw)
}

/// A segment register as VMX keeps it (access rights in the VMCS format,
/// bit 16 = unusable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    pub access: u32,
}

/// A descriptor-table register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescTable {
    pub base: u64,
    pub limit: u32,
}

/// Everything of a vCPU a migration carries: what the guest can see and
/// what is in flight (an event being delivered, interruptibility), so that
/// the guest resumes on the target exactly where it stopped. The guest's
/// TSC travels as its value at the stop: the target offsets its own TSC to
/// continue from it, so the guest's clock does not jump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15 (the SDM's order).
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    /// CR0 and CR4 as the guest sees them (read shadows).
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// ES, CS, SS, DS, FS, GS, LDTR, TR.
    pub segments: [Segment; 8],
    pub gdtr: DescTable,
    pub idtr: DescTable,
    /// DR0-DR3, DR6, DR7.
    pub dr: [u64; 6],
    pub debugctl: u64,
    pub pat: u64,
    pub sysenter: [u64; 3],
    /// STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE (`msr::SWITCHED`).
    pub syscall_msrs: [u64; 5],
    /// The soft MSRs the guest wrote (`msr::SoftMsrs`).
    pub soft_msrs: alloc::vec::Vec<(u32, u64)>,
    pub tsc: u64,
    pub tsc_adjust: u64,
    /// The PAE PDPTEs (loaded by VMX when CR0.PG and CR4.PAE without
    /// long mode).
    pub pdptes: [u64; 4],
    pub interruptibility: u32,
    pub activity: u32,
    pub pending_debug: u64,
    /// An event whose delivery an exit interrupted, to inject again:
    /// (interruption information, error code, instruction length).
    pub pending_event: Option<(u32, u32, u32)>,
    /// The x87/SSE state (FXSAVE image).
    pub fxsave: alloc::vec::Vec<u8>,
}

crate::vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct SegmentWire as "segment", version 1, minimum 1 {
        pub selector: u16,
        pub base: u64,
        pub limit: u32,
        pub access: u32,
    }
}

crate::vmstate! {
    #[derive(Clone, Debug, PartialEq)]
    pub struct MsrWire as "msr", version 1, minimum 1 {
        pub index: u32,
        pub value: u64,
    }
}

crate::vmstate! {
    /// The vCPU's migration section (`cpu`, instance 0).
    #[derive(Clone, Debug, PartialEq)]
    pub struct VcpuWire as "cpu", version 1, minimum 1 {
        pub gprs: [u64; 16],
        pub rip: u64,
        pub rflags: u64,
        pub cr0: u64,
        pub cr2: u64,
        pub cr3: u64,
        pub cr4: u64,
        pub efer: u64,
        pub nsegments: u8,
        pub segments: alloc::vec::Vec<SegmentWire> [count = nsegments, max = 8],
        pub gdt_base: u64,
        pub gdt_limit: u32,
        pub idt_base: u64,
        pub idt_limit: u32,
        pub dr: [u64; 6],
        pub debugctl: u64,
        pub pat: u64,
        pub sysenter: [u64; 3],
        pub syscall_msrs: [u64; 5],
        pub nmsrs: u16,
        pub msrs: alloc::vec::Vec<MsrWire> [count = nmsrs, max = 256],
        pub tsc: u64,
        pub tsc_adjust: u64,
        pub pdptes: [u64; 4],
        pub interruptibility: u32,
        pub activity: u32,
        pub pending_debug: u64,
        pub event_pending: bool,
        pub event_info: u32,
        pub event_error: u32,
        pub event_len: u32,
        pub fxsave: [u8; 512] [buffer],
    }
}

impl VcpuWire {
    pub fn of(s: &VcpuState) -> Self {
        let mut fx = [0u8; 512];
        let n = s.fxsave.len().min(512);
        fx[..n].copy_from_slice(&s.fxsave[..n]);
        let (event_pending, (event_info, event_error, event_len)) = match s.pending_event {
            Some(e) => (true, e),
            None => (false, (0, 0, 0)),
        };
        Self {
            gprs: s.gprs,
            rip: s.rip,
            rflags: s.rflags,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            nsegments: 8,
            segments: s
                .segments
                .iter()
                .map(|g| SegmentWire {
                    selector: g.selector,
                    base: g.base,
                    limit: g.limit,
                    access: g.access,
                })
                .collect(),
            gdt_base: s.gdtr.base,
            gdt_limit: s.gdtr.limit,
            idt_base: s.idtr.base,
            idt_limit: s.idtr.limit,
            dr: s.dr,
            debugctl: s.debugctl,
            pat: s.pat,
            sysenter: s.sysenter,
            syscall_msrs: s.syscall_msrs,
            nmsrs: s.soft_msrs.len().min(256) as u16,
            msrs: s
                .soft_msrs
                .iter()
                .take(256)
                .map(|&(index, value)| MsrWire { index, value })
                .collect(),
            tsc: s.tsc,
            tsc_adjust: s.tsc_adjust,
            pdptes: s.pdptes,
            interruptibility: s.interruptibility,
            activity: s.activity,
            pending_debug: s.pending_debug,
            event_pending,
            event_info,
            event_error,
            event_len,
            fxsave: fx,
        }
    }

    /// The state (its values are checked by `VcpuState::check` and the
    /// kernel before use).
    pub fn state(&self) -> Result<VcpuState, &'static str> {
        let mut segments = [Segment::default(); 8];
        if self.segments.len() != 8 {
            return Err("a vCPU has 8 segment registers");
        }
        for (d, w) in segments.iter_mut().zip(&self.segments) {
            *d = Segment {
                selector: w.selector,
                base: w.base,
                limit: w.limit,
                access: w.access,
            };
        }
        Ok(VcpuState {
            gprs: self.gprs,
            rip: self.rip,
            rflags: self.rflags,
            cr0: self.cr0,
            cr2: self.cr2,
            cr3: self.cr3,
            cr4: self.cr4,
            efer: self.efer,
            segments,
            gdtr: DescTable {
                base: self.gdt_base,
                limit: self.gdt_limit,
            },
            idtr: DescTable {
                base: self.idt_base,
                limit: self.idt_limit,
            },
            dr: self.dr,
            debugctl: self.debugctl,
            pat: self.pat,
            sysenter: self.sysenter,
            syscall_msrs: self.syscall_msrs,
            soft_msrs: self.msrs.iter().map(|m| (m.index, m.value)).collect(),
            tsc: self.tsc,
            tsc_adjust: self.tsc_adjust,
            pdptes: self.pdptes,
            interruptibility: self.interruptibility,
            activity: self.activity,
            pending_debug: self.pending_debug,
            pending_event: self.event_pending.then_some((
                self.event_info,
                self.event_error,
                self.event_len,
            )),
            fxsave: self.fxsave.to_vec(),
        })
    }
}

fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

impl VcpuState {
    /// Checks what the hypervisor itself would load into real registers
    /// before the guest runs (an incoming state is untrusted): values that
    /// would make Tern's own WRMSR, FXRSTOR or MOV DR fault, and control
    /// bits Tern never lets a guest set. The rest (segments, RFLAGS, event
    /// fields) is checked by the CPU at VM entry, which fails cleanly.
    /// `mxcsr_mask` is the host's (FXSAVE byte 28).
    pub fn check(&self, mxcsr_mask: u32, cr4_hidden: u64) -> Result<(), &'static str> {
        if self.fxsave.len() != 512 {
            return Err("FXSAVE image is not 512 bytes");
        }
        let mxcsr = u32::from_le_bytes([
            self.fxsave[24],
            self.fxsave[25],
            self.fxsave[26],
            self.fxsave[27],
        ]);
        if mxcsr & !mxcsr_mask != 0 {
            return Err("MXCSR has reserved bits set");
        }
        let [_star, lstar, cstar, sfmask, kgs] = self.syscall_msrs;
        if !canonical(lstar) || !canonical(cstar) || !canonical(kgs) {
            return Err("LSTAR, CSTAR or KERNEL_GS_BASE is not canonical");
        }
        if sfmask >> 32 != 0 {
            return Err("SFMASK has reserved bits set");
        }
        if self.dr[..4].iter().any(|&d| !canonical(d)) {
            return Err("DR0-DR3 not canonical");
        }
        if self.dr[4] >> 32 != 0 || self.dr[5] >> 32 != 0 {
            return Err("DR6 or DR7 has bits 63:32 set");
        }
        if self.cr0 >> 32 != 0 || (self.cr0 & (1 << 29) != 0 && self.cr0 & (1 << 30) == 0) {
            return Err("CR0 has reserved bits or NW without CD");
        }
        if self.cr4 & cr4_hidden != 0 {
            return Err("CR4 has a bit Tern does not offer");
        }
        const EFER_OK: u64 = 1 | (1 << 8) | (1 << 10) | (1 << 11);
        if self.efer & !EFER_OK != 0 {
            return Err("EFER has bits Tern does not offer");
        }
        if self.activity > 1 {
            return Err("activity state other than active or HLT");
        }
        // What the guest's own WRMSR may set (LBR and BTF only).
        if self.debugctl & !0b11 != 0 {
            return Err("DEBUGCTL has bits a guest cannot set");
        }
        let pat_ok = (0..8).all(|i| matches!((self.pat >> (8 * i)) & 0xFF, 0 | 1 | 4 | 5 | 6 | 7));
        if !pat_ok {
            return Err("PAT holds a reserved memory type");
        }
        Ok(())
    }
}

/// Hypercall numbers (VMCALL with the number in RAX). Results in RAX;
/// unknown numbers return `u64::MAX`.
pub mod hypercall {
    /// Returns [`PING_REPLY`] in RAX.
    pub const PING: u64 = 0;
    /// Stops the VM with the status in RBX.
    pub const EXIT: u64 = 1;
    /// Prints the VM's memory map (`info mtree`) on Tern's console.
    pub const DUMP_MEMORY_MAP: u64 = 2;
    /// Returns the number of EPT leaf pages in `[RBX, RBX + RCX)` that the
    /// guest dirtied since the last call, and clears their dirty flags.
    pub const DIRTY_LOG: u64 = 3;
    /// Asks Tern to migrate the VM (a VM started with `migrate=`): 0 when
    /// the migration starts, 1 when it cannot (not configured, or one is
    /// under way). The guest keeps running while RAM is sent.
    pub const MIGRATE: u64 = 4;
    /// Returns how many migrations brought the VM where it runs (0 on the
    /// VM Tern started).
    pub const MIGRATION_GENERATION: u64 = 5;
    /// "TERN" in ASCII.
    pub const PING_REPLY: u64 = 0x5445_524E;
}

#[cfg(test)]
mod tests {
    #[test]
    fn vcpu_state_round_trips_through_its_section() {
        let mut s = super::VcpuState {
            fxsave: alloc::vec![7; 512],
            soft_msrs: alloc::vec![(0x1B, 0xFEE0_0900), (0x277, 6)],
            pending_event: Some((0x8000_0030, 0, 0)),
            rip: 0x1234,
            ..Default::default()
        };
        s.segments[1].selector = 0x8;
        let bytes = crate::vmstate::save(&mut super::VcpuWire::of(&s)).unwrap();
        let w: super::VcpuWire = crate::vmstate::load(&bytes, 1).unwrap();
        assert_eq!(w.state().unwrap(), s);
        assert!(crate::vmstate::load::<super::VcpuWire>(&bytes[..bytes.len() - 1], 1).is_err());
    }

    #[test]
    fn incoming_vcpu_state_is_checked_before_it_reaches_registers() {
        let mut ok = super::VcpuState {
            fxsave: alloc::vec![0; 512],
            pat: 0x0007_0406_0007_0406,
            dr: [0, 0, 0, 0, 0xFFFF_0FF0, 0x400],
            cr0: 0x8000_0011,
            efer: 0x500,
            ..Default::default()
        };
        ok.fxsave[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        assert_eq!(ok.check(0xFFBF, 0), Ok(()));
        let bad: [fn(&mut super::VcpuState); 11] = [
            |s| s.debugctl = 1 << 6,
            |s| s.pat = 2,
            |s| s.fxsave.truncate(100),
            |s| s.fxsave[26] = 1,
            |s| s.syscall_msrs[1] = 0x8000_0000_0000_0000,
            |s| s.syscall_msrs[3] = 1 << 40,
            |s| s.dr[5] = 1 << 33,
            |s| s.dr[0] = 0x0001_0000_0000_0000,
            |s| s.cr0 = 1 << 29,
            |s| s.efer |= 1 << 15,
            |s| s.activity = 3,
        ];
        for (i, f) in bad.iter().enumerate() {
            let mut s = ok.clone();
            f(&mut s);
            assert!(s.check(0xFFBF, 0).is_err(), "case {i}");
        }
        let mut s = ok.clone();
        s.cr4 = 1 << 12;
        assert!(s.check(0xFFBF, 1 << 12).is_err());
    }

    use super::*;

    #[test]
    fn pdptes_with_reserved_bits_are_refused() {
        let ok = [0x1000 | 1, 0x2000 | 1, 0, 0x8000_0000_0000_0006];
        assert_eq!(
            check_pdptes(ok, 36),
            Some(ok),
            "not-present entries are not checked"
        );
        assert_eq!(
            check_pdptes([0x1000 | 1 | 0x20, 0, 0, 0], 36),
            None,
            "bit 5"
        );
        assert_eq!(
            check_pdptes([(1 << 36) | 1, 0, 0, 0], 36),
            None,
            "above MAXPHYADDR"
        );
        assert_eq!(
            check_pdptes([(1 << 36) | 1, 0, 0, 0], 40),
            Some([(1 << 36) | 1, 0, 0, 0])
        );
    }

    #[test]
    fn stop_status_separates_guest_and_tern() {
        assert_eq!(StopReason::Exited(0).status(), 0);
        assert_eq!(StopReason::Exited(3).status(), 3);
        assert_eq!(StopReason::Exited(4000).status(), 119);
        assert_eq!(StopReason::TripleFault.status(), 120);
        let s = format!(
            "{}",
            StopReason::UnmappedAccess {
                gpa: 0xdead_0000,
                access: Access::Write
            }
        );
        assert!(s.contains("0xdead0000") && s.contains("write"), "{s}");
    }
}
