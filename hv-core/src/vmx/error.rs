//! Failed VMX instructions: which instruction (and VMCS field), and the
//! VM-instruction error numbers (SDM Vol. 3C, 31.4, Table 31-1).

use super::field::FieldEncoding;

/// The VM-instruction error field after a VMfailValid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmInstructionError(pub u32);

impl VmInstructionError {
    /// What the SDM calls this error.
    pub const fn meaning(self) -> &'static str {
        match self.0 {
            1 => "VMCALL executed in VMX root operation",
            2 => "VMCLEAR with invalid physical address",
            3 => "VMCLEAR with VMXON pointer",
            4 => "VMLAUNCH with non-clear VMCS",
            5 => "VMRESUME with non-launched VMCS",
            6 => "VMRESUME after VMXOFF",
            7 => "VM entry with invalid control field(s)",
            8 => "VM entry with invalid host-state field(s)",
            9 => "VMPTRLD with invalid physical address",
            10 => "VMPTRLD with VMXON pointer",
            11 => "VMPTRLD with incorrect VMCS revision identifier",
            12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
            13 => "VMWRITE to read-only VMCS component",
            15 => "VMXON executed in VMX root operation",
            16 => "VM entry with invalid executive-VMCS pointer",
            17 => "VM entry with non-launched executive VMCS",
            18 => "VM entry with executive-VMCS pointer not VMXON pointer",
            19 => "VMCALL with non-clear VMCS",
            20 => "VMCALL with invalid VM-exit control fields",
            22 => "VMCALL with incorrect MSEG revision identifier",
            23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
            24 => "VMCALL with invalid SMM-monitor features",
            25 => "VM entry with invalid VM-execution control fields in executive VMCS",
            26 => "VM entry with events blocked by MOV SS",
            28 => "invalid operand to INVEPT/INVVPID",
            _ => "unknown VM-instruction error",
        }
    }
}

impl core::fmt::Display for VmInstructionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "VM-instruction error {}: {}", self.0, self.meaning())
    }
}

/// A VMX instruction Tern executes, with the field for VMREAD/VMWRITE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxInstruction {
    Vmxon,
    Vmclear,
    Vmptrld,
    Vmread(FieldEncoding),
    Vmwrite(FieldEncoding),
    Vmlaunch,
    Vmresume,
    Invept,
    Invvpid,
}

impl core::fmt::Display for VmxInstruction {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Vmxon => write!(f, "VMXON"),
            Self::Vmclear => write!(f, "VMCLEAR"),
            Self::Vmptrld => write!(f, "VMPTRLD"),
            Self::Vmread(field) => write!(f, "VMREAD of the {field}"),
            Self::Vmwrite(field) => write!(f, "VMWRITE to the {field}"),
            Self::Vmlaunch => write!(f, "VMLAUNCH"),
            Self::Vmresume => write!(f, "VMRESUME"),
            Self::Invept => write!(f, "INVEPT"),
            Self::Invvpid => write!(f, "INVVPID"),
        }
    }
}

/// How a VMX instruction failed (SDM Vol. 3C, 31.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxFailKind {
    /// VMfailInvalid: no current VMCS (or a bad VMXON pointer).
    Invalid,
    /// VMfailValid, with the VM-instruction error of the current VMCS.
    Valid(VmInstructionError),
    /// VMfailValid, but reading the VM-instruction error failed too: the
    /// cause is unknown (never reported as error 0).
    ErrorUnreadable,
}

/// A failed VMX instruction: which one (and which field), and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxFail {
    pub instruction: VmxInstruction,
    pub kind: VmxFailKind,
}

impl core::fmt::Display for VmxFail {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let i = self.instruction;
        match self.kind {
            VmxFailKind::Invalid => write!(f, "{i} failed (VMfailInvalid: no current VMCS)"),
            VmxFailKind::Valid(e) => write!(f, "{i} failed: {e}"),
            VmxFailKind::ErrorUnreadable => write!(
                f,
                "{i} failed (VMfailValid; the VM-instruction error could not be read)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn a_failure_names_instruction_field_and_error() {
        let f = VmxFail {
            instruction: VmxInstruction::Vmwrite(FieldEncoding(0x4400)),
            kind: VmxFailKind::Valid(VmInstructionError(13)),
        };
        assert_eq!(
            f.to_string(),
            "VMWRITE to the 32-bit read-only data field 0x4400 failed: \
             VM-instruction error 13: VMWRITE to read-only VMCS component"
        );
        let launch = VmxFail {
            instruction: VmxInstruction::Vmlaunch,
            kind: VmxFailKind::Valid(VmInstructionError(7)),
        };
        assert!(launch
            .to_string()
            .contains("VMLAUNCH failed: VM-instruction error 7: VM entry with invalid control"));
        let unknown = VmxFail {
            instruction: VmxInstruction::Vmresume,
            kind: VmxFailKind::ErrorUnreadable,
        };
        assert!(!unknown.to_string().contains("error 0"));
        assert!(unknown.to_string().contains("could not be read"));
    }
}
