//! VMCS fields typed by group and width (SDM Vol. 3D, Appendix B), over
//! the `x86` crate's encodings.
//!
//! Each field is a constant of a type that says its width and whether it
//! can be written: `Field16`/`Field32`/`Field64`/`FieldNat` take `u16`,
//! `u32`, `u64` and `u64` (natural width on a 64-bit host); the read-only
//! data fields (VM-exit information) are `RoField32`/`RoField64`/
//! `RoFieldNat`, which have no write, and the interruption-information
//! words are `EventField`/`RoEventField` over [`InterruptionInfo`]. So
//! writing a read-only field or a `u64` into a 16-bit field does not
//! compile. Every constant checks its encoding's width and group bits when
//! it is defined (a mistyped field is a compile-time error), and only this
//! module can define fields.

use hv_core::vmx::field::{FieldEncoding, FieldGroup, FieldWidth};
use hv_core::vmx::InterruptionInfo;

mod sealed {
    pub trait Sealed {}
}

/// A VMCS field that VMREAD can read.
pub trait Field: sealed::Sealed + Copy {
    /// What the field holds.
    type Value: Copy;
    fn encoding(self) -> FieldEncoding;
    /// The field's value from VMREAD's 64-bit result (upper bits of a
    /// narrower field read as zero).
    fn from_raw(raw: u64) -> Self::Value;
}

/// A VMCS field that VMWRITE can write: not read-only data.
pub trait WritableField: Field {
    fn to_raw(value: Self::Value) -> u64;
}

/// Checks an encoding against the type a field is given; evaluated at
/// compile time for every field constant.
const fn checked(encoding: u32, width: FieldWidth, read_only: bool) -> u32 {
    let e = FieldEncoding(encoding);
    assert!(e.is_well_formed() && !e.is_high_half());
    assert!(e.width() as u8 == width as u8);
    assert!(matches!(e.group(), FieldGroup::ReadOnly) == read_only);
    encoding
}

macro_rules! field_type {
    ($(#[$doc:meta])* $name:ident, $value:ty, $width:ident, $ro:literal,
     |$raw:ident| $from:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name(u32);

        impl $name {
            const fn new(encoding: u32) -> Self {
                Self(checked(encoding, FieldWidth::$width, $ro))
            }
        }

        impl sealed::Sealed for $name {}

        impl Field for $name {
            type Value = $value;
            fn encoding(self) -> FieldEncoding {
                FieldEncoding(self.0)
            }
            fn from_raw($raw: u64) -> $value {
                $from
            }
        }
    };
}

macro_rules! writable {
    ($name:ident, |$v:ident| $to:expr) => {
        impl WritableField for $name {
            fn to_raw($v: Self::Value) -> u64 {
                $to
            }
        }
    };
}

field_type!(
    /// A 16-bit control, guest-state or host-state field.
    Field16, u16, Bits16, false, |raw| raw as u16
);
field_type!(
    /// A 32-bit control, guest-state or host-state field.
    Field32, u32, Bits32, false, |raw| raw as u32
);
field_type!(
    /// A 64-bit control, guest-state or host-state field (full access).
    Field64, u64, Bits64, false, |raw| raw
);
field_type!(
    /// A natural-width control, guest-state or host-state field.
    FieldNat, u64, Natural, false, |raw| raw
);
field_type!(
    /// A 32-bit control field holding an interruption-information word.
    EventField, InterruptionInfo, Bits32, false, |raw| InterruptionInfo::from_bits(raw as u32)
);
field_type!(
    /// A 32-bit read-only data field.
    RoField32, u32, Bits32, true, |raw| raw as u32
);
field_type!(
    /// A 64-bit read-only data field.
    RoField64, u64, Bits64, true, |raw| raw
);
field_type!(
    /// A natural-width read-only data field.
    RoFieldNat, u64, Natural, true, |raw| raw
);
field_type!(
    /// A read-only interruption-information word (IDT vectoring, VM-exit
    /// interruption information).
    RoEventField, InterruptionInfo, Bits32, true, |raw| InterruptionInfo::from_bits(raw as u32)
);

writable!(Field16, |v| v.into());
writable!(Field32, |v| v.into());
writable!(Field64, |v| v);
writable!(FieldNat, |v| v);
writable!(EventField, |v| v.bits().into());

/// Appendix B.1.1, B.2.1, B.3.1, B.4.1: VM-execution, VM-exit and VM-entry
/// control fields.
pub mod control {
    use super::*;
    use x86::vmx::vmcs::control as c;

    pub const VPID: Field16 = Field16::new(c::VPID);

    pub const IO_BITMAP_A_ADDR: Field64 = Field64::new(c::IO_BITMAP_A_ADDR_FULL);
    pub const IO_BITMAP_B_ADDR: Field64 = Field64::new(c::IO_BITMAP_B_ADDR_FULL);
    pub const MSR_BITMAPS_ADDR: Field64 = Field64::new(c::MSR_BITMAPS_ADDR_FULL);
    pub const TSC_OFFSET: Field64 = Field64::new(c::TSC_OFFSET_FULL);
    pub const EPTP: Field64 = Field64::new(c::EPTP_FULL);

    pub const PINBASED_EXEC_CONTROLS: Field32 = Field32::new(c::PINBASED_EXEC_CONTROLS);
    pub const PRIMARY_PROCBASED_EXEC_CONTROLS: Field32 =
        Field32::new(c::PRIMARY_PROCBASED_EXEC_CONTROLS);
    pub const SECONDARY_PROCBASED_EXEC_CONTROLS: Field32 =
        Field32::new(c::SECONDARY_PROCBASED_EXEC_CONTROLS);
    pub const EXCEPTION_BITMAP: Field32 = Field32::new(c::EXCEPTION_BITMAP);
    pub const CR3_TARGET_COUNT: Field32 = Field32::new(c::CR3_TARGET_COUNT);
    pub const VMEXIT_CONTROLS: Field32 = Field32::new(c::VMEXIT_CONTROLS);
    pub const VMEXIT_MSR_STORE_COUNT: Field32 = Field32::new(c::VMEXIT_MSR_STORE_COUNT);
    pub const VMEXIT_MSR_LOAD_COUNT: Field32 = Field32::new(c::VMEXIT_MSR_LOAD_COUNT);
    pub const VMENTRY_CONTROLS: Field32 = Field32::new(c::VMENTRY_CONTROLS);
    pub const VMENTRY_MSR_LOAD_COUNT: Field32 = Field32::new(c::VMENTRY_MSR_LOAD_COUNT);
    pub const VMENTRY_INTERRUPTION_INFO: EventField =
        EventField::new(c::VMENTRY_INTERRUPTION_INFO_FIELD);
    pub const VMENTRY_EXCEPTION_ERR_CODE: Field32 = Field32::new(c::VMENTRY_EXCEPTION_ERR_CODE);
    pub const VMENTRY_INSTRUCTION_LEN: Field32 = Field32::new(c::VMENTRY_INSTRUCTION_LEN);

    pub const CR0_GUEST_HOST_MASK: FieldNat = FieldNat::new(c::CR0_GUEST_HOST_MASK);
    pub const CR4_GUEST_HOST_MASK: FieldNat = FieldNat::new(c::CR4_GUEST_HOST_MASK);
    pub const CR0_READ_SHADOW: FieldNat = FieldNat::new(c::CR0_READ_SHADOW);
    pub const CR4_READ_SHADOW: FieldNat = FieldNat::new(c::CR4_READ_SHADOW);
}

/// Appendix B.1.2, B.2.3, B.3.3, B.4.3: guest-state fields.
pub mod guest {
    use super::*;
    use x86::vmx::vmcs::guest as g;

    /// The fields of one segment register.
    #[derive(Clone, Copy, Debug)]
    pub struct SegmentFields {
        pub selector: Field16,
        pub base: FieldNat,
        pub limit: Field32,
        pub access_rights: Field32,
    }

    const fn seg(selector: u32, base: u32, limit: u32, ar: u32) -> SegmentFields {
        SegmentFields {
            selector: Field16::new(selector),
            base: FieldNat::new(base),
            limit: Field32::new(limit),
            access_rights: Field32::new(ar),
        }
    }

    pub const ES: SegmentFields = seg(g::ES_SELECTOR, g::ES_BASE, g::ES_LIMIT, g::ES_ACCESS_RIGHTS);
    pub const CS: SegmentFields = seg(g::CS_SELECTOR, g::CS_BASE, g::CS_LIMIT, g::CS_ACCESS_RIGHTS);
    pub const SS: SegmentFields = seg(g::SS_SELECTOR, g::SS_BASE, g::SS_LIMIT, g::SS_ACCESS_RIGHTS);
    pub const DS: SegmentFields = seg(g::DS_SELECTOR, g::DS_BASE, g::DS_LIMIT, g::DS_ACCESS_RIGHTS);
    pub const FS: SegmentFields = seg(g::FS_SELECTOR, g::FS_BASE, g::FS_LIMIT, g::FS_ACCESS_RIGHTS);
    pub const GS: SegmentFields = seg(g::GS_SELECTOR, g::GS_BASE, g::GS_LIMIT, g::GS_ACCESS_RIGHTS);
    pub const LDTR: SegmentFields = seg(
        g::LDTR_SELECTOR,
        g::LDTR_BASE,
        g::LDTR_LIMIT,
        g::LDTR_ACCESS_RIGHTS,
    );
    pub const TR: SegmentFields = seg(g::TR_SELECTOR, g::TR_BASE, g::TR_LIMIT, g::TR_ACCESS_RIGHTS);
    /// ES, CS, SS, DS, FS, GS, LDTR, TR (the order of `VcpuState::segments`).
    pub const SEGMENTS: [SegmentFields; 8] = [ES, CS, SS, DS, FS, GS, LDTR, TR];

    pub const LINK_PTR: Field64 = Field64::new(g::LINK_PTR_FULL);
    pub const IA32_DEBUGCTL: Field64 = Field64::new(g::IA32_DEBUGCTL_FULL);
    pub const IA32_PAT: Field64 = Field64::new(g::IA32_PAT_FULL);
    pub const IA32_EFER: Field64 = Field64::new(g::IA32_EFER_FULL);
    pub const PDPTES: [Field64; 4] = [
        Field64::new(g::PDPTE0_FULL),
        Field64::new(g::PDPTE1_FULL),
        Field64::new(g::PDPTE2_FULL),
        Field64::new(g::PDPTE3_FULL),
    ];

    pub const GDTR_LIMIT: Field32 = Field32::new(g::GDTR_LIMIT);
    pub const IDTR_LIMIT: Field32 = Field32::new(g::IDTR_LIMIT);
    pub const INTERRUPTIBILITY_STATE: Field32 = Field32::new(g::INTERRUPTIBILITY_STATE);
    pub const ACTIVITY_STATE: Field32 = Field32::new(g::ACTIVITY_STATE);
    pub const IA32_SYSENTER_CS: Field32 = Field32::new(g::IA32_SYSENTER_CS);
    pub const VMX_PREEMPTION_TIMER_VALUE: Field32 = Field32::new(g::VMX_PREEMPTION_TIMER_VALUE);

    pub const CR0: FieldNat = FieldNat::new(g::CR0);
    pub const CR3: FieldNat = FieldNat::new(g::CR3);
    pub const CR4: FieldNat = FieldNat::new(g::CR4);
    pub const GDTR_BASE: FieldNat = FieldNat::new(g::GDTR_BASE);
    pub const IDTR_BASE: FieldNat = FieldNat::new(g::IDTR_BASE);
    pub const DR7: FieldNat = FieldNat::new(g::DR7);
    pub const RSP: FieldNat = FieldNat::new(g::RSP);
    pub const RIP: FieldNat = FieldNat::new(g::RIP);
    pub const RFLAGS: FieldNat = FieldNat::new(g::RFLAGS);
    pub const PENDING_DBG_EXCEPTIONS: FieldNat = FieldNat::new(g::PENDING_DBG_EXCEPTIONS);
    pub const IA32_SYSENTER_ESP: FieldNat = FieldNat::new(g::IA32_SYSENTER_ESP);
    pub const IA32_SYSENTER_EIP: FieldNat = FieldNat::new(g::IA32_SYSENTER_EIP);
}

/// Appendix B.1.3, B.2.4, B.3.4, B.4.4: host-state fields.
pub mod host {
    use super::*;
    use x86::vmx::vmcs::host as h;

    pub const ES_SELECTOR: Field16 = Field16::new(h::ES_SELECTOR);
    pub const CS_SELECTOR: Field16 = Field16::new(h::CS_SELECTOR);
    pub const SS_SELECTOR: Field16 = Field16::new(h::SS_SELECTOR);
    pub const DS_SELECTOR: Field16 = Field16::new(h::DS_SELECTOR);
    pub const FS_SELECTOR: Field16 = Field16::new(h::FS_SELECTOR);
    pub const GS_SELECTOR: Field16 = Field16::new(h::GS_SELECTOR);
    pub const TR_SELECTOR: Field16 = Field16::new(h::TR_SELECTOR);

    pub const IA32_PAT: Field64 = Field64::new(h::IA32_PAT_FULL);
    pub const IA32_EFER: Field64 = Field64::new(h::IA32_EFER_FULL);

    pub const IA32_SYSENTER_CS: Field32 = Field32::new(h::IA32_SYSENTER_CS);

    pub const CR0: FieldNat = FieldNat::new(h::CR0);
    pub const CR3: FieldNat = FieldNat::new(h::CR3);
    pub const CR4: FieldNat = FieldNat::new(h::CR4);
    pub const FS_BASE: FieldNat = FieldNat::new(h::FS_BASE);
    pub const GS_BASE: FieldNat = FieldNat::new(h::GS_BASE);
    pub const TR_BASE: FieldNat = FieldNat::new(h::TR_BASE);
    pub const GDTR_BASE: FieldNat = FieldNat::new(h::GDTR_BASE);
    pub const IDTR_BASE: FieldNat = FieldNat::new(h::IDTR_BASE);
    pub const IA32_SYSENTER_ESP: FieldNat = FieldNat::new(h::IA32_SYSENTER_ESP);
    pub const IA32_SYSENTER_EIP: FieldNat = FieldNat::new(h::IA32_SYSENTER_EIP);
    /// Written by the entry code itself (`instr::enter`), which is why it
    /// has no constant of a field type: the encodings go to the assembly.
    pub const RSP_ENCODING: u32 = checked(h::RSP, FieldWidth::Natural, false);
    pub const RIP_ENCODING: u32 = checked(h::RIP, FieldWidth::Natural, false);
}

/// Appendix B.2.2, B.3.2, B.4.2: read-only data fields (VM-exit
/// information). None of them can be written.
pub mod exit_info {
    use super::*;
    use x86::vmx::vmcs::ro;

    pub const GUEST_PHYSICAL_ADDR: RoField64 = RoField64::new(ro::GUEST_PHYSICAL_ADDR_FULL);

    pub const VM_INSTRUCTION_ERROR: RoField32 = RoField32::new(ro::VM_INSTRUCTION_ERROR);
    pub const EXIT_REASON: RoField32 = RoField32::new(ro::EXIT_REASON);
    pub const VMEXIT_INTERRUPTION_INFO: RoEventField =
        RoEventField::new(ro::VMEXIT_INTERRUPTION_INFO);
    pub const IDT_VECTORING_INFO: RoEventField = RoEventField::new(ro::IDT_VECTORING_INFO);
    pub const IDT_VECTORING_ERR_CODE: RoField32 = RoField32::new(ro::IDT_VECTORING_ERR_CODE);
    pub const VMEXIT_INSTRUCTION_LEN: RoField32 = RoField32::new(ro::VMEXIT_INSTRUCTION_LEN);
    pub const VMEXIT_INSTRUCTION_INFO: RoField32 = RoField32::new(ro::VMEXIT_INSTRUCTION_INFO);

    pub const EXIT_QUALIFICATION: RoFieldNat = RoFieldNat::new(ro::EXIT_QUALIFICATION);
    pub const GUEST_LINEAR_ADDR: RoFieldNat = RoFieldNat::new(ro::GUEST_LINEAR_ADDR);
}
