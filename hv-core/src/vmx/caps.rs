//! VMX capabilities (SDM Vol. 3D, Appendix A) and control computation.

use bitflags::bitflags;

/// MSR numbers of the VMX capability MSRs (SDM Appendix A).
pub mod msr {
    pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
    pub const IA32_VMX_BASIC: u32 = 0x480;
    pub const IA32_VMX_PINBASED_CTLS: u32 = 0x481;
    pub const IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
    pub const IA32_VMX_EXIT_CTLS: u32 = 0x483;
    pub const IA32_VMX_ENTRY_CTLS: u32 = 0x484;
    pub const IA32_VMX_MISC: u32 = 0x485;
    pub const IA32_VMX_CR0_FIXED0: u32 = 0x486;
    pub const IA32_VMX_CR0_FIXED1: u32 = 0x487;
    pub const IA32_VMX_CR4_FIXED0: u32 = 0x488;
    pub const IA32_VMX_CR4_FIXED1: u32 = 0x489;
    pub const IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
    pub const IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
    pub const IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
    pub const IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
    pub const IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
    pub const IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
}

bitflags! {
    /// Pin-based VM-execution controls (SDM Table 25-5).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PinControls: u32 {
        const EXTERNAL_INTERRUPT_EXITING = 1 << 0;
        const NMI_EXITING = 1 << 3;
        const VIRTUAL_NMIS = 1 << 5;
        const PREEMPTION_TIMER = 1 << 6;
        const POSTED_INTERRUPTS = 1 << 7;
    }

    /// Primary processor-based VM-execution controls (SDM Table 25-6).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ProcControls: u32 {
        const INTERRUPT_WINDOW_EXITING = 1 << 2;
        const USE_TSC_OFFSETTING = 1 << 3;
        const HLT_EXITING = 1 << 7;
        const INVLPG_EXITING = 1 << 9;
        const MWAIT_EXITING = 1 << 10;
        const RDPMC_EXITING = 1 << 11;
        const RDTSC_EXITING = 1 << 12;
        const CR3_LOAD_EXITING = 1 << 15;
        const CR3_STORE_EXITING = 1 << 16;
        const CR8_LOAD_EXITING = 1 << 19;
        const CR8_STORE_EXITING = 1 << 20;
        const USE_TPR_SHADOW = 1 << 21;
        const NMI_WINDOW_EXITING = 1 << 22;
        const MOV_DR_EXITING = 1 << 23;
        const UNCONDITIONAL_IO_EXITING = 1 << 24;
        const USE_IO_BITMAPS = 1 << 25;
        const MONITOR_TRAP_FLAG = 1 << 27;
        const USE_MSR_BITMAPS = 1 << 28;
        const MONITOR_EXITING = 1 << 29;
        const PAUSE_EXITING = 1 << 30;
        const SECONDARY_CONTROLS = 1 << 31;
    }

    /// Secondary processor-based VM-execution controls (SDM Table 25-7).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Proc2Controls: u32 {
        const VIRTUALIZE_APIC_ACCESSES = 1 << 0;
        const ENABLE_EPT = 1 << 1;
        const DESCRIPTOR_TABLE_EXITING = 1 << 2;
        const ENABLE_RDTSCP = 1 << 3;
        const VIRTUALIZE_X2APIC = 1 << 4;
        const ENABLE_VPID = 1 << 5;
        const WBINVD_EXITING = 1 << 6;
        const UNRESTRICTED_GUEST = 1 << 7;
        const ENABLE_INVPCID = 1 << 12;
        const ENABLE_PML = 1 << 17;
        const ENABLE_XSAVES = 1 << 20;
    }

    /// VM-exit controls (SDM Table 25-13).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ExitControls: u32 {
        const SAVE_DEBUG_CONTROLS = 1 << 2;
        const HOST_ADDRESS_SPACE_SIZE = 1 << 9;
        const ACK_INTERRUPT_ON_EXIT = 1 << 15;
        const SAVE_PAT = 1 << 18;
        const LOAD_PAT = 1 << 19;
        const SAVE_EFER = 1 << 20;
        const LOAD_EFER = 1 << 21;
        const SAVE_PREEMPTION_TIMER = 1 << 22;
    }

    /// VM-entry controls (SDM Table 25-15).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct EntryControls: u32 {
        const LOAD_DEBUG_CONTROLS = 1 << 2;
        const IA32E_MODE_GUEST = 1 << 9;
        const LOAD_PAT = 1 << 14;
        const LOAD_EFER = 1 << 15;
    }
}

/// Which control word a [`ControlError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlKind {
    Pin,
    Proc,
    Proc2,
    Exit,
    Entry,
}

/// A wanted control bit the CPU cannot set, or a bit it forces that Tern
/// must not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlError {
    pub kind: ControlKind,
    /// Wanted bits the allowed-1 settings forbid.
    pub impossible: u32,
}

impl core::fmt::Display for ControlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:?} controls: this CPU cannot set bits {:#010x}",
            self.kind, self.impossible
        )
    }
}

/// One capability MSR split into allowed-0 (bits that must be 1) and
/// allowed-1 (bits that may be 1) settings (SDM A.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    pub must_be_one: u32,
    pub may_be_one: u32,
}

impl Allowed {
    /// Splits a capability MSR value.
    pub const fn from_msr(v: u64) -> Self {
        Self {
            must_be_one: v as u32,
            may_be_one: (v >> 32) as u32,
        }
    }

    /// `(wanted | allowed0) & allowed1`, or the wanted bits that are
    /// impossible.
    pub fn adjust(self, kind: ControlKind, wanted: u32) -> Result<u32, ControlError> {
        let impossible = wanted & !self.may_be_one;
        if impossible != 0 {
            return Err(ControlError { kind, impossible });
        }
        Ok((wanted | self.must_be_one) & self.may_be_one)
    }

    /// Whether every bit of `bits` may be set.
    pub const fn allows(self, bits: u32) -> bool {
        bits & !self.may_be_one == 0
    }
}

/// Everything Tern needs to know about the CPU's VMX, read from the
/// capability MSRs once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxCaps {
    pub basic: u64,
    pub pin: Allowed,
    pub proc: Allowed,
    pub proc2: Allowed,
    pub exit: Allowed,
    pub entry: Allowed,
    pub misc: u64,
    pub ept_vpid: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
}

bitflags! {
    /// IA32_FEATURE_CONTROL (SDM Vol. 4, Table 2-2).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct FeatureControl: u64 {
        /// Locked: the MSR cannot be written until reset.
        const LOCKED = 1 << 0;
        const VMX_INSIDE_SMX = 1 << 1;
        const VMX_OUTSIDE_SMX = 1 << 2;
        const _ = !0;
    }
}

/// A missing VMX feature Tern requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingFeature {
    Vmx,
    TrueControls,
    SecondaryControls,
    Ept,
    UnrestrictedGuest,
    Vpid,
    EptWalk4,
    EptWriteBack,
    Invept,
    PreemptionTimer,
    DisabledByFirmware,
}

impl core::fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Vmx => "VMX (CPUID.1:ECX.VMX[bit 5] is 0)",
            Self::TrueControls => "the TRUE VMX capability MSRs",
            Self::SecondaryControls => "secondary processor-based controls",
            Self::Ept => "EPT",
            Self::UnrestrictedGuest => "unrestricted guest",
            Self::Vpid => "VPID",
            Self::EptWalk4 => "4-level EPT page walks",
            Self::EptWriteBack => "write-back EPT paging structures",
            Self::Invept => "INVEPT (single-context)",
            Self::PreemptionTimer => "the VMX-preemption timer",
            Self::DisabledByFirmware => {
                "VMX enabled in IA32_FEATURE_CONTROL (locked off by firmware)"
            }
        })
    }
}

impl VmxCaps {
    /// Decodes the capability MSRs through `read`, which returns `None` for
    /// an MSR that does not exist. Uses the TRUE control MSRs (required).
    pub fn read(read: impl Fn(u32) -> Option<u64>) -> Result<Self, MissingFeature> {
        let basic = read(msr::IA32_VMX_BASIC).ok_or(MissingFeature::Vmx)?;
        if basic & (1 << 55) == 0 {
            return Err(MissingFeature::TrueControls);
        }
        let get = |m| read(m).ok_or(MissingFeature::Vmx);
        let proc = Allowed::from_msr(get(msr::IA32_VMX_TRUE_PROCBASED_CTLS)?);
        if !proc.allows(ProcControls::SECONDARY_CONTROLS.bits()) {
            return Err(MissingFeature::SecondaryControls);
        }
        let proc2 = Allowed::from_msr(get(msr::IA32_VMX_PROCBASED_CTLS2)?);
        let caps = Self {
            basic,
            pin: Allowed::from_msr(get(msr::IA32_VMX_TRUE_PINBASED_CTLS)?),
            proc,
            proc2,
            exit: Allowed::from_msr(get(msr::IA32_VMX_TRUE_EXIT_CTLS)?),
            entry: Allowed::from_msr(get(msr::IA32_VMX_TRUE_ENTRY_CTLS)?),
            misc: get(msr::IA32_VMX_MISC)?,
            // The EPT/VPID MSR exists only if EPT or VPID can be enabled.
            ept_vpid: if proc2.may_be_one
                & (Proc2Controls::ENABLE_EPT.bits() | Proc2Controls::ENABLE_VPID.bits())
                != 0
            {
                get(msr::IA32_VMX_EPT_VPID_CAP)?
            } else {
                0
            },
            cr0_fixed0: get(msr::IA32_VMX_CR0_FIXED0)?,
            cr0_fixed1: get(msr::IA32_VMX_CR0_FIXED1)?,
            cr4_fixed0: get(msr::IA32_VMX_CR4_FIXED0)?,
            cr4_fixed1: get(msr::IA32_VMX_CR4_FIXED1)?,
        };
        caps.check_required()?;
        Ok(caps)
    }

    fn check_required(&self) -> Result<(), MissingFeature> {
        let p2 = |f: Proc2Controls| self.proc2.allows(f.bits());
        if !p2(Proc2Controls::ENABLE_EPT) {
            return Err(MissingFeature::Ept);
        }
        if !p2(Proc2Controls::UNRESTRICTED_GUEST) {
            return Err(MissingFeature::UnrestrictedGuest);
        }
        if !p2(Proc2Controls::ENABLE_VPID) {
            return Err(MissingFeature::Vpid);
        }
        // EPT/VPID capability bits (SDM A.10): 6 = 4-level walk, 14 = WB,
        // 20 = INVEPT, 25 = single-context INVEPT.
        if self.ept_vpid & (1 << 6) == 0 {
            return Err(MissingFeature::EptWalk4);
        }
        if self.ept_vpid & (1 << 14) == 0 {
            return Err(MissingFeature::EptWriteBack);
        }
        if self.ept_vpid & (1 << 20) == 0 || self.ept_vpid & (1 << 25) == 0 {
            return Err(MissingFeature::Invept);
        }
        if !self.pin.allows(PinControls::PREEMPTION_TIMER.bits()) {
            return Err(MissingFeature::PreemptionTimer);
        }
        Ok(())
    }

    /// The VMCS revision identifier (bits 30:0 of IA32_VMX_BASIC).
    pub const fn revision_id(&self) -> u32 {
        (self.basic & 0x7fff_ffff) as u32
    }

    /// Whether EPT accessed/dirty flags exist (SDM A.10 bit 21).
    pub const fn ept_ad_bits(&self) -> bool {
        self.ept_vpid & (1 << 21) != 0
    }

    /// Whether EPT can map 2 MiB pages (bit 16).
    pub const fn ept_2m_pages(&self) -> bool {
        self.ept_vpid & (1 << 16) != 0
    }

    /// Whether EPT can map 1 GiB pages (bit 17).
    pub const fn ept_1g_pages(&self) -> bool {
        self.ept_vpid & (1 << 17) != 0
    }

    /// Whether single-context INVVPID exists (bits 32 and 41).
    pub const fn invvpid_single(&self) -> bool {
        self.ept_vpid & (1 << 32) != 0 && self.ept_vpid & (1 << 41) != 0
    }

    /// The VMX-preemption timer counts down once every 2^rate TSC ticks
    /// (IA32_VMX_MISC bits 4:0).
    pub const fn preemption_timer_rate(&self) -> u32 {
        (self.misc & 0x1f) as u32
    }

    /// How many CR3-target values the CPU supports (IA32_VMX_MISC bits
    /// 24:16); a larger CR3-target count fails VM entry.
    pub const fn cr3_targets(&self) -> u32 {
        ((self.misc >> 16) & 0x1ff) as u32
    }

    /// Forces a value into the CR0 fixed bits. With unrestricted guest, the
    /// guest may clear PE and PG, so `unrestricted` lifts those two.
    pub const fn fix_cr0(&self, cr0: u64, unrestricted: bool) -> u64 {
        let mut fixed0 = self.cr0_fixed0;
        if unrestricted {
            fixed0 &= !(1 | (1 << 31));
        }
        (cr0 | fixed0) & self.cr0_fixed1
    }

    /// Forces a value into the CR4 fixed bits.
    /// Which INVVPID flushes all of one VPID's translations: single-context
    /// (type 1, EPT_VPID_CAP bit 41) or all-context (type 2, bit 42);
    /// `None` without INVVPID (bit 32).
    pub const fn invvpid_type(&self) -> Option<u64> {
        if self.ept_vpid & (1 << 32) == 0 {
            None
        } else if self.ept_vpid & (1 << 41) != 0 {
            Some(1)
        } else if self.ept_vpid & (1 << 42) != 0 {
            Some(2)
        } else {
            None
        }
    }

    pub const fn fix_cr4(&self, cr4: u64) -> u64 {
        (cr4 | self.cr4_fixed0) & self.cr4_fixed1
    }
}

/// The five control words of a Tern VMCS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Controls {
    pub pin: u32,
    pub proc: u32,
    pub proc2: u32,
    pub exit: u32,
    pub entry: u32,
}

impl Controls {
    /// What Tern asks of every vCPU, adjusted to what `caps` allows: exits on
    /// external interrupts (acknowledged), NMIs, the preemption timer (its
    /// count saved at exit), HLT, MWAIT, MONITOR, CR8 accesses, every port
    /// and MSR (through the bitmaps); EPT, VPID and unrestricted guest; EFER
    /// and PAT switched on entry and exit; a 64-bit host.
    pub fn for_tern(caps: &VmxCaps) -> Result<Self, ControlError> {
        // Virtual NMIs: the CPU tracks the guest's NMI blocking (set by an
        // injected NMI, cleared by its IRET), and NMI-window exits exist.
        let pin = PinControls::EXTERNAL_INTERRUPT_EXITING
            | PinControls::NMI_EXITING
            | PinControls::VIRTUAL_NMIS
            | PinControls::PREEMPTION_TIMER;
        // MWAIT/MONITOR exit so a guest cannot put the physical CPU to
        // sleep; CR8 accesses exit so the guest never touches the real TPR.
        // RDPMC exits: the PMU is not offered, and the host's counters
        // must not be readable from a guest.
        let proc = ProcControls::HLT_EXITING
            | ProcControls::USE_TSC_OFFSETTING
            | ProcControls::RDPMC_EXITING
            | ProcControls::MWAIT_EXITING
            | ProcControls::MONITOR_EXITING
            | ProcControls::CR8_LOAD_EXITING
            | ProcControls::CR8_STORE_EXITING
            | ProcControls::USE_IO_BITMAPS
            | ProcControls::USE_MSR_BITMAPS
            | ProcControls::SECONDARY_CONTROLS;
        let proc2 = Proc2Controls::ENABLE_EPT
            | Proc2Controls::ENABLE_VPID
            | Proc2Controls::UNRESTRICTED_GUEST;
        // The remaining preemption-timer count is saved at every exit, so a
        // guest that exits often still uses up its slices; external
        // interrupts are acknowledged on exit so none stays pending.
        // The guest's DR7 and DEBUGCTL are saved at every exit and loaded at
        // every entry (an exit sets DR7 to 0x400: without the load, guest
        // breakpoints would be off whenever it runs).
        let exit = ExitControls::HOST_ADDRESS_SPACE_SIZE
            | ExitControls::SAVE_DEBUG_CONTROLS
            | ExitControls::ACK_INTERRUPT_ON_EXIT
            | ExitControls::SAVE_PREEMPTION_TIMER
            | ExitControls::SAVE_EFER
            | ExitControls::LOAD_EFER
            | ExitControls::SAVE_PAT
            | ExitControls::LOAD_PAT;
        let entry =
            EntryControls::LOAD_EFER | EntryControls::LOAD_PAT | EntryControls::LOAD_DEBUG_CONTROLS;
        Ok(Self {
            pin: caps.pin.adjust(ControlKind::Pin, pin.bits())?,
            proc: caps.proc.adjust(ControlKind::Proc, proc.bits())?,
            proc2: caps.proc2.adjust(ControlKind::Proc2, proc2.bits())?,
            exit: caps.exit.adjust(ControlKind::Exit, exit.bits())?,
            entry: caps.entry.adjust(ControlKind::Entry, entry.bits())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Capability MSRs as Bochs 2.7's corei7_skylake_x reports them, read
    /// by Tern inside Bochs (`cargo xtask run --emulator bochs log=debug`).
    fn skylake(m: u32) -> Option<u64> {
        Some(match m {
            msr::IA32_VMX_BASIC => 0x00d8_1000_0000_002b,
            msr::IA32_VMX_TRUE_PINBASED_CTLS | msr::IA32_VMX_PINBASED_CTLS => 0x0000_007f_0000_0016,
            msr::IA32_VMX_TRUE_PROCBASED_CTLS => 0xf7f9_fffe_0400_6172,
            msr::IA32_VMX_PROCBASED_CTLS2 => 0x0217_7fff_0000_0000,
            msr::IA32_VMX_TRUE_EXIT_CTLS => 0x007f_ffff_0003_6dfb,
            msr::IA32_VMX_TRUE_ENTRY_CTLS => 0x0000_ffff_0000_11fb,
            msr::IA32_VMX_MISC => 0x6004_01e0,
            msr::IA32_VMX_EPT_VPID_CAP => 0x0000_0f01_0633_4141,
            msr::IA32_VMX_CR0_FIXED0 => 0x8000_0021,
            msr::IA32_VMX_CR0_FIXED1 => 0xffff_ffff,
            msr::IA32_VMX_CR4_FIXED0 => 0x2000,
            msr::IA32_VMX_CR4_FIXED1 => 0x0037_27ff,
            _ => return None,
        })
    }

    #[test]
    fn skylake_caps_decode() {
        let c = VmxCaps::read(skylake).unwrap();
        assert_eq!(c.revision_id(), 0x2b);
        // EPT_VPID_CAP 0x00000f01_06334141: INVVPID with single context.
        assert_eq!(c.invvpid_type(), Some(1));
        assert!(c.ept_ad_bits() && c.ept_2m_pages() && c.ept_1g_pages());
        assert_eq!(c.preemption_timer_rate(), 0);
        assert_eq!(c.fix_cr0(0x11, true), 0x31);
        assert_eq!(c.fix_cr0(0x11, false), 0x8000_0031);
        assert_eq!(c.fix_cr4(0x20), 0x2020);
    }

    #[test]
    fn adjust_sets_forced_bits_and_rejects_impossible_ones() {
        let a = Allowed::from_msr(0x0000_007f_0000_0016);
        assert_eq!(a.adjust(ControlKind::Pin, 1 << 6).unwrap(), 0x56);
        let e = a.adjust(ControlKind::Pin, 1 << 7).unwrap_err();
        assert_eq!(
            e,
            ControlError {
                kind: ControlKind::Pin,
                impossible: 1 << 7
            }
        );
    }

    #[test]
    fn tern_controls_on_skylake() {
        let c = Controls::for_tern(&VmxCaps::read(skylake).unwrap()).unwrap();
        // Forced bits kept, CR3 load/store exiting off, wanted bits on.
        assert_eq!(c.pin, 0x16 | 0x1 | 0x8 | 0x20 | 0x40);
        assert_eq!(c.proc & (1 << 15 | 1 << 16), 0);
        // TSC offsetting on, MOV-DR exiting off; debug controls saved and
        // loaded.
        assert_eq!(c.proc & (1 << 3 | 1 << 11 | 1 << 23), 1 << 3 | 1 << 11);
        assert_eq!(c.entry & (1 << 2), 1 << 2);
        assert_eq!(c.exit & (1 << 2), 1 << 2);
        assert_eq!(
            c.proc & (1 << 10 | 1 << 29 | 1 << 19 | 1 << 20),
            1 << 10 | 1 << 29 | 1 << 19 | 1 << 20
        );
        assert_eq!(c.exit & (1 << 15 | 1 << 22), 1 << 15 | 1 << 22);
        assert_eq!(c.proc & 0x0400_6172, 0x0400_6172);
        assert!(
            c.proc & (1 << 7 | 1 << 25 | 1 << 28 | 1 << 31)
                == (1 << 7 | 1 << 25 | 1 << 28 | 1 << 31)
        );
        assert_eq!(c.proc2, 0x2 | 0x20 | 0x80);
        assert_eq!(c.entry & (1 << 9), 0, "starts outside IA-32e mode");
        let no_pat = |m| {
            if m == msr::IA32_VMX_TRUE_EXIT_CTLS {
                Some(0x0003_ffff_0003_6dfb)
            } else {
                skylake(m)
            }
        };
        let e = Controls::for_tern(&VmxCaps::read(no_pat).unwrap()).unwrap_err();
        assert_eq!(
            e,
            ControlError {
                kind: ControlKind::Exit,
                impossible: (1 << 18) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 22)
            }
        );
    }

    #[test]
    fn missing_features_are_named() {
        assert_eq!(VmxCaps::read(|_| None).unwrap_err(), MissingFeature::Vmx);
        let no_ept = |m| {
            if m == msr::IA32_VMX_PROCBASED_CTLS2 {
                Some(0)
            } else {
                skylake(m)
            }
        };
        assert_eq!(VmxCaps::read(no_ept).unwrap_err(), MissingFeature::Ept);
        let no_ug = |m| {
            if m == msr::IA32_VMX_PROCBASED_CTLS2 {
                Some(0x0217_7f7f_0000_0000)
            } else {
                skylake(m)
            }
        };
        assert_eq!(
            VmxCaps::read(no_ug).unwrap_err(),
            MissingFeature::UnrestrictedGuest
        );
    }
}
