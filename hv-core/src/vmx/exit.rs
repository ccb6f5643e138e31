//! VM exits decoded into typed values (SDM Vol. 3C, Appendix C for the
//! basic exit reasons, 28.2.1 for the exit qualifications). Handlers never
//! look at raw bits.

/// Basic exit reasons (SDM Appendix C). `Other` keeps the number of any
/// reason Tern does not name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    ExceptionOrNmi,
    ExternalInterrupt,
    TripleFault,
    InitSignal,
    Sipi,
    InterruptWindow,
    NmiWindow,
    TaskSwitch,
    Cpuid,
    Getsec,
    Hlt,
    Invd,
    Invlpg,
    Rdpmc,
    Rdtsc,
    Vmcall,
    /// Any other VMX instruction executed by the guest (VMCLEAR..VMXON,
    /// INVEPT, INVVPID, VMFUNC).
    VmxInstruction(u16),
    CrAccess,
    DrAccess,
    IoInstruction,
    Rdmsr,
    Wrmsr,
    EntryFailGuestState,
    EntryFailMsrLoading,
    Mwait,
    MonitorTrapFlag,
    Monitor,
    Pause,
    EntryFailMachineCheck,
    EptViolation,
    EptMisconfig,
    PreemptionTimer,
    Wbinvd,
    Xsetbv,
    Other(u16),
}

impl ExitReason {
    /// Decodes bits 15:0 of the exit-reason field.
    pub const fn from_basic(n: u16) -> Self {
        match n {
            0 => Self::ExceptionOrNmi,
            1 => Self::ExternalInterrupt,
            2 => Self::TripleFault,
            3 => Self::InitSignal,
            4 => Self::Sipi,
            7 => Self::InterruptWindow,
            8 => Self::NmiWindow,
            9 => Self::TaskSwitch,
            10 => Self::Cpuid,
            11 => Self::Getsec,
            12 => Self::Hlt,
            13 => Self::Invd,
            14 => Self::Invlpg,
            15 => Self::Rdpmc,
            16 => Self::Rdtsc,
            18 => Self::Vmcall,
            19..=27 | 50 | 53 | 59 => Self::VmxInstruction(n),
            28 => Self::CrAccess,
            29 => Self::DrAccess,
            30 => Self::IoInstruction,
            31 => Self::Rdmsr,
            32 => Self::Wrmsr,
            33 => Self::EntryFailGuestState,
            34 => Self::EntryFailMsrLoading,
            36 => Self::Mwait,
            37 => Self::MonitorTrapFlag,
            39 => Self::Monitor,
            40 => Self::Pause,
            41 => Self::EntryFailMachineCheck,
            48 => Self::EptViolation,
            49 => Self::EptMisconfig,
            52 => Self::PreemptionTimer,
            54 => Self::Wbinvd,
            55 => Self::Xsetbv,
            n => Self::Other(n),
        }
    }

    /// The basic exit-reason number.
    pub const fn number(self) -> u16 {
        match self {
            Self::ExceptionOrNmi => 0,
            Self::ExternalInterrupt => 1,
            Self::TripleFault => 2,
            Self::InitSignal => 3,
            Self::Sipi => 4,
            Self::InterruptWindow => 7,
            Self::NmiWindow => 8,
            Self::TaskSwitch => 9,
            Self::Cpuid => 10,
            Self::Getsec => 11,
            Self::Hlt => 12,
            Self::Invd => 13,
            Self::Invlpg => 14,
            Self::Rdpmc => 15,
            Self::Rdtsc => 16,
            Self::Vmcall => 18,
            Self::VmxInstruction(n) | Self::Other(n) => n,
            Self::CrAccess => 28,
            Self::DrAccess => 29,
            Self::IoInstruction => 30,
            Self::Rdmsr => 31,
            Self::Wrmsr => 32,
            Self::EntryFailGuestState => 33,
            Self::EntryFailMsrLoading => 34,
            Self::Mwait => 36,
            Self::MonitorTrapFlag => 37,
            Self::Monitor => 39,
            Self::Pause => 40,
            Self::EntryFailMachineCheck => 41,
            Self::EptViolation => 48,
            Self::EptMisconfig => 49,
            Self::PreemptionTimer => 52,
            Self::Wbinvd => 54,
            Self::Xsetbv => 55,
        }
    }

    /// A short name for reports and per-reason counters.
    pub const fn name(self) -> &'static str {
        match self {
            Self::ExceptionOrNmi => "exception/NMI",
            Self::ExternalInterrupt => "external interrupt",
            Self::TripleFault => "triple fault",
            Self::InitSignal => "INIT",
            Self::Sipi => "SIPI",
            Self::InterruptWindow => "interrupt window",
            Self::NmiWindow => "NMI window",
            Self::TaskSwitch => "task switch",
            Self::Cpuid => "CPUID",
            Self::Getsec => "GETSEC",
            Self::Hlt => "HLT",
            Self::Invd => "INVD",
            Self::Invlpg => "INVLPG",
            Self::Rdpmc => "RDPMC",
            Self::Rdtsc => "RDTSC",
            Self::Vmcall => "VMCALL",
            Self::VmxInstruction(_) => "VMX instruction",
            Self::CrAccess => "CR access",
            Self::DrAccess => "DR access",
            Self::IoInstruction => "I/O",
            Self::Rdmsr => "RDMSR",
            Self::Wrmsr => "WRMSR",
            Self::EntryFailGuestState => "entry failure (guest state)",
            Self::EntryFailMsrLoading => "entry failure (MSR loading)",
            Self::Mwait => "MWAIT",
            Self::MonitorTrapFlag => "monitor trap flag",
            Self::Monitor => "MONITOR",
            Self::Pause => "PAUSE",
            Self::EntryFailMachineCheck => "entry failure (machine check)",
            Self::EptViolation => "EPT violation",
            Self::EptMisconfig => "EPT misconfiguration",
            Self::PreemptionTimer => "preemption timer",
            Self::Wbinvd => "WBINVD",
            Self::Xsetbv => "XSETBV",
            Self::Other(_) => "other",
        }
    }
}

/// The raw exit information read from the VMCS on every exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmExitInfo {
    /// The full exit-reason field (bit 31: VM-entry failure).
    pub reason: u32,
    pub qualification: u64,
    pub instruction_len: u32,
    pub guest_rip: u64,
    pub guest_phys: u64,
    pub guest_linear: u64,
}

impl VmExitInfo {
    /// The decoded basic exit reason.
    pub const fn basic(&self) -> ExitReason {
        ExitReason::from_basic(self.reason as u16)
    }

    /// Whether the exit is a VM-entry failure (bit 31).
    pub const fn entry_failed(&self) -> bool {
        self.reason & (1 << 31) != 0
    }
}

/// Direction of an I/O or memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    /// Instruction fetch (EPT violations only).
    Fetch,
}

impl Access {
    /// "read", "write" or "fetch".
    pub const fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Fetch => "fetch",
        }
    }
}

/// Exit qualification of an I/O instruction (SDM Table 28-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoQualification {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    pub access: Access,
    pub string: bool,
    pub rep: bool,
}

impl IoQualification {
    /// Decodes the qualification; `None` for a reserved size encoding.
    pub const fn decode(q: u64) -> Option<Self> {
        let size = match q & 7 {
            0 => 1,
            1 => 2,
            3 => 4,
            _ => return None,
        };
        Some(Self {
            port: (q >> 16) as u16,
            size,
            access: if q & (1 << 3) != 0 {
                Access::Read
            } else {
                Access::Write
            },
            string: q & (1 << 4) != 0,
            rep: q & (1 << 5) != 0,
        })
    }
}

/// Exit qualification of a control-register access (SDM Table 28-3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrAccess {
    /// MOV to CRn from general-purpose register `gpr` (0 = RAX .. 15 = R15).
    MovTo { cr: u8, gpr: u8 },
    /// MOV from CRn to `gpr`.
    MovFrom { cr: u8, gpr: u8 },
    /// CLTS.
    Clts,
    /// LMSW with the 16-bit source value.
    Lmsw { value: u16 },
}

impl CrAccess {
    /// Decodes the qualification.
    pub const fn decode(q: u64) -> Self {
        let cr = (q & 0xf) as u8;
        let gpr = ((q >> 8) & 0xf) as u8;
        match (q >> 4) & 3 {
            0 => Self::MovTo { cr, gpr },
            1 => Self::MovFrom { cr, gpr },
            2 => Self::Clts,
            _ => Self::Lmsw {
                value: (q >> 16) as u16,
            },
        }
    }
}

/// Exit qualification of an EPT violation (SDM Table 28-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptViolation {
    pub read: bool,
    pub write: bool,
    pub fetch: bool,
    /// What the EPT entry allowed: readable, writable, executable.
    pub allowed: (bool, bool, bool),
    /// Whether the guest-linear address field is valid.
    pub linear_valid: bool,
}

impl EptViolation {
    /// Decodes the qualification.
    pub const fn decode(q: u64) -> Self {
        Self {
            read: q & 1 != 0,
            write: q & 2 != 0,
            fetch: q & 4 != 0,
            allowed: (q & 8 != 0, q & 16 != 0, q & 32 != 0),
            linear_valid: q & (1 << 7) != 0,
        }
    }

    /// The access that faulted.
    pub const fn access(&self) -> Access {
        if self.write {
            Access::Write
        } else if self.fetch {
            Access::Fetch
        } else {
            Access::Read
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_round_trip() {
        for n in 0..70u16 {
            assert_eq!(ExitReason::from_basic(n).number(), n);
        }
        assert_eq!(ExitReason::from_basic(30), ExitReason::IoInstruction);
        assert_eq!(ExitReason::from_basic(48), ExitReason::EptViolation);
    }

    #[test]
    fn io_qualification_decodes() {
        // `out 0xf4, eax`: size 4 (3), OUT (bit 3 clear), port 0xf4.
        let q = IoQualification::decode(3 | (0xf4 << 16)).unwrap();
        assert_eq!(
            q,
            IoQualification {
                port: 0xf4,
                size: 4,
                access: Access::Write,
                string: false,
                rep: false
            }
        );
        // `rep insb` from port 0x3f8.
        let q = IoQualification::decode(8 | 16 | 32 | (0x3f8 << 16)).unwrap();
        assert_eq!(
            (q.access, q.string, q.rep, q.size),
            (Access::Read, true, true, 1)
        );
        assert_eq!(IoQualification::decode(2), None);
    }

    #[test]
    fn cr_and_ept_qualifications_decode() {
        assert_eq!(CrAccess::decode(0x0304), CrAccess::MovTo { cr: 4, gpr: 3 });
        assert_eq!(
            CrAccess::decode(0x0010),
            CrAccess::MovFrom { cr: 0, gpr: 0 }
        );
        assert_eq!(
            CrAccess::decode(0x0031_0030),
            CrAccess::Lmsw { value: 0x31 }
        );
        let v = EptViolation::decode(0x82);
        assert!(v.write && !v.read && v.linear_valid);
        assert_eq!(v.access(), Access::Write);
        assert_eq!(EptViolation::decode(0x84).access(), Access::Fetch);
    }
}
