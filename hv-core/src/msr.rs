//! The guest MSR policy, in one table: every MSR a guest may read or write,
//! where its value lives and what a write may change. Anything not in the
//! table is refused with #GP (and the vCPU logs the number once).
//!
//! Every MSR access exits (the MSR bitmap is all ones); the vCPU looks the
//! number up here and acts on the [`MsrRule`]:
//!
//! | MSR | rule |
//! |---|---|
//! | TSC (0x10) | [`MsrRule::Tsc`]: reads the guest TSC; a write moves the TSC offset |
//! | TSC_ADJUST (0x3B) | [`MsrRule::TscAdjust`]: kept per vCPU; a write moves the TSC by the difference |
//! | APIC_BASE (0x1B), TSC_DEADLINE (0x6E0), x2APIC (0x800-0x8FF) | [`MsrRule::Lapic`]: the VM's local APIC model |
//! | FEATURE_CONTROL (0x3A) | read-only 1: locked, VMX off |
//! | SPEC_CTRL (0x48) | soft, IBRS/STIBP/SSBD bits; only where the CPU has it |
//! | PRED_CMD (0x49) | write-only, IBPB: accepted, no effect (the VM switch does not share predictors with another guest mid-run) |
//! | BIOS_SIGN_ID (0x8B), PLATFORM_ID (0x17) | read 0, writes ignored |
//! | MTRRCAP (0xFE) | read-only: 8 variable ranges, fixed ranges, WC |
//! | MTRR variable (0x200-0x20F), fixed (0x250, 0x258-0x259, 0x268-0x26F), DEF_TYPE (0x2FF) | soft: stored and read back, no effect (EPT maps guest RAM write-back) |
//! | SYSENTER_CS/ESP/EIP (0x174-0x176), DEBUGCTL (0x1D9), PAT (0x277), EFER, FS_BASE, GS_BASE | [`MsrRule::Vmcs`]: guest-state fields, loaded and saved by VM entry and exit |
//! | STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE (0xC0000081-84, 0xC0000102) | [`MsrRule::Switched`]: the guest's values are in the real MSRs while it runs (SYSCALL and SWAPGS use them without exiting); the vCPU saves them when it stops |
//! | MISC_ENABLE (0x1A0) | soft: fast strings, BTS and PEBS unavailable (bits 7, 11, 12 read-only, the rest stored) |
//! | MCG_CAP (0x179), MCG_STATUS (0x17A) | read 0 (no banks), writes of 0 only |

/// Where a guest-visible MSR lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrRule {
    /// The guest TSC.
    Tsc,
    /// IA32_TSC_ADJUST.
    TscAdjust,
    /// The local APIC model of the VM.
    Lapic,
    /// A VMCS guest-state field.
    Vmcs(VmcsMsr),
    /// The real MSR holds the guest's value while it runs.
    Switched,
    /// Kept by the vCPU: `reset` value, the bits a write may change;
    /// `ignore_writes` drops writes (of any value) silently.
    Soft {
        reset: u64,
        writable: u64,
        ignore_writes: bool,
    },
    /// A constant; writes of the same value are accepted, others #GP.
    Const(u64),
    /// Write-only, accepted without effect; reads #GP.
    WriteOnly,
    /// #GP.
    Refused,
}

/// MSRs held in the VMCS guest-state area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmcsMsr {
    SysenterCs,
    SysenterEsp,
    SysenterEip,
    DebugCtl,
    Pat,
    Efer,
    FsBase,
    GsBase,
}

pub const IA32_TSC: u32 = 0x10;
pub const IA32_PLATFORM_ID: u32 = 0x17;
pub const IA32_APIC_BASE: u32 = 0x1B;
pub const IA32_FEATURE_CONTROL: u32 = 0x3A;
pub const IA32_TSC_ADJUST: u32 = 0x3B;
pub const IA32_SPEC_CTRL: u32 = 0x48;
pub const IA32_PRED_CMD: u32 = 0x49;
pub const IA32_BIOS_SIGN_ID: u32 = 0x8B;
pub const IA32_MTRRCAP: u32 = 0xFE;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_MCG_CAP: u32 = 0x179;
pub const IA32_MCG_STATUS: u32 = 0x17A;
pub const IA32_MISC_ENABLE: u32 = 0x1A0;
pub const IA32_DEBUGCTL: u32 = 0x1D9;
pub const IA32_PAT: u32 = 0x277;
pub const IA32_MTRR_DEF_TYPE: u32 = 0x2FF;
pub const IA32_TSC_DEADLINE: u32 = 0x6E0;
pub const IA32_EFER: u32 = 0xC000_0080;
pub const IA32_STAR: u32 = 0xC000_0081;
pub const IA32_LSTAR: u32 = 0xC000_0082;
pub const IA32_CSTAR: u32 = 0xC000_0083;
pub const IA32_FMASK: u32 = 0xC000_0084;
pub const IA32_FS_BASE: u32 = 0xC000_0100;
pub const IA32_GS_BASE: u32 = 0xC000_0101;
pub const IA32_KERNEL_GS_BASE: u32 = 0xC000_0102;

/// The MSRs whose real registers carry the guest's values while it runs.
pub const SWITCHED: [u32; 5] = [
    IA32_STAR,
    IA32_LSTAR,
    IA32_CSTAR,
    IA32_FMASK,
    IA32_KERNEL_GS_BASE,
];

/// What the host CPU has that the policy depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostMsrFeatures {
    /// CPUID.(EAX=7,ECX=0):EDX[26] (IBRS/IBPB).
    pub spec_ctrl: bool,
}

/// The rule for `msr`.
pub const fn rule(msr: u32, host: HostMsrFeatures) -> MsrRule {
    use MsrRule::*;
    const fn soft(reset: u64, writable: u64) -> MsrRule {
        MsrRule::Soft {
            reset,
            writable,
            ignore_writes: false,
        }
    }
    match msr {
        IA32_TSC => Tsc,
        IA32_TSC_ADJUST => TscAdjust,
        IA32_APIC_BASE | IA32_TSC_DEADLINE | 0x800..=0x8FF => Lapic,
        IA32_FEATURE_CONTROL => Const(1),
        IA32_SPEC_CTRL if host.spec_ctrl => soft(0, 0b111),
        IA32_PRED_CMD if host.spec_ctrl => WriteOnly,
        IA32_BIOS_SIGN_ID | IA32_PLATFORM_ID => Soft {
            reset: 0,
            writable: 0,
            ignore_writes: true,
        },
        // VCNT = 8, FIX, WC.
        IA32_MTRRCAP => Const(0x508),
        // PhysBase: type in 7:0, base in 51:12; PhysMask: valid bit 11.
        0x200..=0x20F if msr.is_multiple_of(2) => soft(0, 0x000F_FFFF_FFFF_F0FF),
        0x200..=0x20F => soft(0, 0x000F_FFFF_FFFF_F800),
        0x250 | 0x258 | 0x259 | 0x268..=0x26F => soft(0, u64::MAX),
        IA32_MTRR_DEF_TYPE => soft(0, 0xCFF),
        IA32_SYSENTER_CS => Vmcs(VmcsMsr::SysenterCs),
        IA32_SYSENTER_ESP => Vmcs(VmcsMsr::SysenterEsp),
        IA32_SYSENTER_EIP => Vmcs(VmcsMsr::SysenterEip),
        IA32_DEBUGCTL => Vmcs(VmcsMsr::DebugCtl),
        IA32_PAT => Vmcs(VmcsMsr::Pat),
        IA32_EFER => Vmcs(VmcsMsr::Efer),
        IA32_FS_BASE => Vmcs(VmcsMsr::FsBase),
        IA32_GS_BASE => Vmcs(VmcsMsr::GsBase),
        IA32_STAR | IA32_LSTAR | IA32_CSTAR | IA32_FMASK | IA32_KERNEL_GS_BASE => Switched,
        // Fast strings (0), BTS unavailable (11), PEBS unavailable (12);
        // the rest is storage, as KVM keeps it (bits 7, 11, 12 read-only).
        IA32_MISC_ENABLE => soft(0x1801, !0x1880),
        IA32_MCG_CAP | IA32_MCG_STATUS => Const(0),
        _ => Refused,
    }
}

/// Whether `v` is a canonical 48-bit address.
pub const fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

/// Soft MSR storage of one vCPU: the values written so far (others read
/// their reset value).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SoftMsrs {
    values: alloc::collections::BTreeMap<u32, u64>,
}

/// Why a soft MSR access failed (#GP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrFault;

impl SoftMsrs {
    /// The values the guest wrote, by MSR number (migration saves these).
    pub fn entries(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.values.iter().map(|(&k, &v)| (k, v))
    }

    /// Soft MSRs with these values (a migration load): every MSR must be a
    /// soft one of the policy and the value must pass its writable mask,
    /// otherwise `Err(msr)`.
    pub fn from_entries(
        entries: &[(u32, u64)],
        rule: impl Fn(u32) -> MsrRule,
    ) -> Result<Self, u32> {
        let mut m = Self::default();
        for &(msr, v) in entries {
            match rule(msr) {
                r @ MsrRule::Soft { .. } => {
                    // A value is valid if writing it over the reset value
                    // is accepted (the same check a guest WRMSR gets).
                    let mut probe = Self::default();
                    probe.write(msr, r, v).map_err(|_| msr)?;
                    m.values.extend(probe.values);
                }
                _ => return Err(msr),
            }
        }
        Ok(m)
    }

    /// Reads a soft or constant MSR.
    pub fn read(&self, msr: u32, rule: MsrRule) -> Result<u64, MsrFault> {
        match rule {
            MsrRule::Soft { reset, .. } => Ok(self.values.get(&msr).copied().unwrap_or(reset)),
            MsrRule::Const(v) => Ok(v),
            _ => Err(MsrFault),
        }
    }

    /// Writes a soft or constant MSR: bits outside the writable mask must
    /// keep their current value.
    pub fn write(&mut self, msr: u32, rule: MsrRule, v: u64) -> Result<(), MsrFault> {
        match rule {
            MsrRule::Soft {
                ignore_writes: true,
                ..
            }
            | MsrRule::WriteOnly => Ok(()),
            MsrRule::Soft { writable, .. } => {
                let cur = self.read(msr, rule)?;
                if (v ^ cur) & !writable != 0 {
                    return Err(MsrFault);
                }
                self.values.insert(msr, v);
                Ok(())
            }
            MsrRule::Const(c) if c == v => Ok(()),
            _ => Err(MsrFault),
        }
    }

    /// Every value written so far (for saving the vCPU).
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.values.iter().map(|(&k, &v)| (k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostMsrFeatures = HostMsrFeatures { spec_ctrl: false };

    #[test]
    fn table_routes_each_kind() {
        assert_eq!(rule(0x10, HOST), MsrRule::Tsc);
        assert_eq!(rule(0x830, HOST), MsrRule::Lapic);
        assert_eq!(rule(0x6E0, HOST), MsrRule::Lapic);
        assert_eq!(rule(IA32_KERNEL_GS_BASE, HOST), MsrRule::Switched);
        assert_eq!(rule(IA32_EFER, HOST), MsrRule::Vmcs(VmcsMsr::Efer));
        assert_eq!(rule(IA32_SPEC_CTRL, HOST), MsrRule::Refused);
        assert!(matches!(
            rule(IA32_SPEC_CTRL, HostMsrFeatures { spec_ctrl: true }),
            MsrRule::Soft { .. }
        ));
        assert_eq!(rule(0xC0DE, HOST), MsrRule::Refused);
        assert_eq!(rule(0x8FF, HOST), MsrRule::Lapic);
        assert_eq!(rule(0x900, HOST), MsrRule::Refused);
    }

    #[test]
    fn soft_msrs_keep_read_only_bits() {
        let mut s = SoftMsrs::default();
        let misc = rule(IA32_MISC_ENABLE, HOST);
        assert_eq!(s.read(IA32_MISC_ENABLE, misc), Ok(0x1801));
        assert_eq!(s.write(IA32_MISC_ENABLE, misc, 0x1801), Ok(()));
        assert_eq!(
            s.write(IA32_MISC_ENABLE, misc, 0x1001),
            Err(MsrFault),
            "BTS bit is read-only"
        );
        assert_eq!(s.write(IA32_MISC_ENABLE, misc, 0x4_00C5_1809), Ok(()));
        assert_eq!(s.read(IA32_MISC_ENABLE, misc), Ok(0x4_00C5_1809));
        let def = rule(IA32_MTRR_DEF_TYPE, HOST);
        assert_eq!(s.write(IA32_MTRR_DEF_TYPE, def, 0xC06), Ok(()));
        assert_eq!(s.read(IA32_MTRR_DEF_TYPE, def), Ok(0xC06));
        assert_eq!(s.write(IA32_MTRR_DEF_TYPE, def, 0x1000), Err(MsrFault));
        // PhysMask: bits 10:0 are reserved.
        let mask = rule(0x201, HOST);
        assert_eq!(s.write(0x201, mask, 0x800), Ok(()));
        assert_eq!(s.write(0x201, mask, 0x801), Err(MsrFault));
        let fc = rule(IA32_FEATURE_CONTROL, HOST);
        assert_eq!(s.read(IA32_FEATURE_CONTROL, fc), Ok(1));
        assert_eq!(s.write(IA32_FEATURE_CONTROL, fc, 5), Err(MsrFault));
        let sig = rule(IA32_BIOS_SIGN_ID, HOST);
        assert_eq!(s.write(IA32_BIOS_SIGN_ID, sig, 0x1234), Ok(()));
        assert_eq!(s.read(IA32_BIOS_SIGN_ID, sig), Ok(0));
        assert_eq!(s.iter().count(), 3);
    }
}
