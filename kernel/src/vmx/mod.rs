//! VMX operation on this CPU: feature detection, VMXON, and the vCPU.

pub mod instr;
pub mod vcpu;
pub mod vmcs;

use crate::cpu;
use crate::mem::Frames;
use hv_core::frames::FrameAllocator;
use hv_core::vmx::caps::{msr, FeatureControl, MissingFeature};
use hv_core::vmx::VmxCaps;
use instr::VmxFail;
use x86_64::registers::control::{Cr0, Cr0Flags, Cr4, Cr4Flags};

/// Why VMX could not be turned on.
#[derive(Debug)]
pub enum VmxError {
    Missing(MissingFeature),
    OutOfMemory,
    Instruction(VmxFail),
}

impl core::fmt::Display for VmxError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Missing(m) => write!(f, "this CPU has no {m}"),
            Self::OutOfMemory => write!(f, "no memory for the VMXON region"),
            Self::Instruction(e) => write!(f, "{e}"),
        }
    }
}

/// VMX root operation on this CPU, with what the CPU can do.
#[derive(Debug)]
pub struct Vmx {
    pub caps: VmxCaps,
}

/// Reads a capability MSR. RDMSR of a missing MSR faults, so this is only
/// safe because `VmxCaps::read` asks in the dependency order of SDM
/// Appendix A (TRUE controls after IA32_VMX_BASIC bit 55, the secondary
/// controls after the primary allow them, EPT/VPID after those allow them).
fn read_cap(m: u32) -> Option<u64> {
    Some(cpu::rdmsr(m))
}

/// Detects VMX and its features, fixes CR0/CR4 and executes VMXON.
pub fn enable() -> Result<Vmx, VmxError> {
    let vmx = x86::cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|f| f.has_vmx());
    if !vmx {
        return Err(VmxError::Missing(MissingFeature::Vmx));
    }
    let fc = FeatureControl::from_bits_retain(cpu::rdmsr(msr::IA32_FEATURE_CONTROL));
    if !fc.contains(FeatureControl::LOCKED) {
        let on = fc | FeatureControl::LOCKED | FeatureControl::VMX_OUTSIDE_SMX;
        // SAFETY: the MSR is unlocked, so WRMSR to it cannot fault; enabling
        // VMX outside SMX and locking only allows VMXON, which changes
        // nothing until Tern executes it below.
        unsafe { cpu::wrmsr(msr::IA32_FEATURE_CONTROL, on.bits()) };
    } else if !fc.contains(FeatureControl::VMX_OUTSIDE_SMX) {
        return Err(VmxError::Missing(MissingFeature::DisabledByFirmware));
    }
    let caps = VmxCaps::read(read_cap).map_err(VmxError::Missing)?;
    cpu::enable_fxsr();
    log::debug!("VMX caps: {caps:x?}");

    // SAFETY: forcing CR0/CR4 into the VMX fixed bits (NE, and VMXE) keeps
    // paging and protection as they are; the fixed-1 bits are architectural
    // requirements for VMX operation.
    unsafe {
        let cr0 = caps.fix_cr0(Cr0::read_raw(), false);
        Cr0::write_raw(cr0);
        let cr4 = caps.fix_cr4(Cr4::read_raw() | Cr4Flags::VIRTUAL_MACHINE_EXTENSIONS.bits());
        Cr4::write_raw(cr4);
    }
    debug_assert!(Cr0::read().contains(Cr0Flags::NUMERIC_ERROR));
    let region = Frames.alloc_frame().ok_or(VmxError::OutOfMemory)?;
    // SAFETY: a fresh zeroed frame owned by this module; the first dword is
    // the revision identifier.
    unsafe { crate::mem::phys_ptr::<u32>(region).write_volatile(caps.revision_id()) };
    // SAFETY: CR0/CR4 satisfy the fixed bits, VMXE is set, and the region
    // is ours, 4 KiB aligned, with the revision id.
    unsafe { instr::vmxon(region.as_u64()) }.map_err(VmxError::Instruction)?;
    // The VMXON region stays allocated while the CPU is in VMX operation,
    // which is until Tern stops.
    Ok(Vmx { caps })
}
