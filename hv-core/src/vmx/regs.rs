//! Register and VMCS-state bits that neither the `x86` nor the `x86_64`
//! crate names, as `bitflags` types (the kernel takes every other CR0, CR4,
//! EFER, RFLAGS and DR6 bit from `x86_64`).

use bitflags::bitflags;

bitflags! {
    /// CR4 bits missing from `x86_64::registers::control::Cr4Flags`
    /// (SDM Vol. 3A, 2.5).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Cr4Extra: u64 {
        /// 57-bit linear addresses (5-level paging).
        const LA57 = 1 << 12;
        /// User interrupts.
        const UINTR = 1 << 25;
        /// Linear-address masking for supervisor pointers.
        const LAM_SUP = 1 << 28;
        /// Flexible return and event delivery.
        const FRED = 1 << 32;
    }

    /// The guest interruptibility state (SDM Vol. 3C, 25.4.2, Table 25-3).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Interruptibility: u32 {
        const BLOCKING_BY_STI = 1 << 0;
        const BLOCKING_BY_MOV_SS = 1 << 1;
        const BLOCKING_BY_SMI = 1 << 2;
        const BLOCKING_BY_NMI = 1 << 3;
        const ENCLAVE_INTERRUPTION = 1 << 4;
    }

    /// Segment access rights in the VMCS format (SDM Vol. 3C, 25.4.1,
    /// Table 25-2).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct AccessRights: u32 {
        /// 64-bit code segment (CS only).
        const LONG_MODE = 1 << 13;
        /// Default operation size: 32 bits.
        const DEFAULT_BIG = 1 << 14;
        /// The segment is unusable.
        const UNUSABLE = 1 << 16;
        const _ = !0;
    }

    /// IA32_DEBUGCTL bits a guest may set (SDM Vol. 3B, 18.4.1).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DebugCtl: u64 {
        /// Last-branch record.
        const LBR = 1 << 0;
        /// Single-step on branches.
        const BTF = 1 << 1;
    }
}

impl AccessRights {
    /// The descriptor privilege level (bits 6:5); SS.DPL is the CPL.
    pub const fn dpl(self) -> u8 {
        ((self.bits() >> 5) & 3) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rights_decode_the_vmcs_format() {
        // A ring-3 64-bit code segment and a ring-0 32-bit data segment.
        let cs = AccessRights::from_bits_retain(0xA0FB);
        assert!(cs.contains(AccessRights::LONG_MODE));
        assert!(!cs.contains(AccessRights::DEFAULT_BIG));
        assert_eq!(cs.dpl(), 3);
        let ds = AccessRights::from_bits_retain(0xC093);
        assert!(ds.contains(AccessRights::DEFAULT_BIG));
        assert_eq!(ds.dpl(), 0);
    }
}
