//! The VMX instructions. Leaf module: every `unsafe` VMX instruction of the
//! kernel is here, each turned into a `Result` that carries the
//! VM-instruction error when there is one.

use super::vmcs::{exit_info, Field, WritableField};
use core::arch::{asm, global_asm};
use hv_core::vmx::VmInstructionError;
pub use hv_core::vmx::{VmxFail, VmxFailKind, VmxInstruction};

/// The failure of `instruction` from its flags: CF for VMfailInvalid, ZF
/// for VMfailValid (then the VM-instruction error is read).
fn failure(instruction: VmxInstruction, invalid: bool) -> VmxFail {
    let kind = if invalid {
        VmxFailKind::Invalid
    } else {
        match instruction_error() {
            Some(e) => VmxFailKind::Valid(e),
            None => VmxFailKind::ErrorUnreadable,
        }
    };
    VmxFail { instruction, kind }
}

fn status(instruction: VmxInstruction, r: x86::vmx::Result<()>) -> Result<(), VmxFail> {
    match r {
        Ok(()) => Ok(()),
        Err(x86::vmx::VmFail::VmFailInvalid) => Err(failure(instruction, true)),
        Err(x86::vmx::VmFail::VmFailValid) => Err(failure(instruction, false)),
    }
}

/// The VM-instruction error field of the current VMCS, or `None` if it
/// cannot be read (no current VMCS).
fn instruction_error() -> Option<VmInstructionError> {
    let field = exit_info::VM_INSTRUCTION_ERROR.encoding().0;
    // SAFETY: VMREAD of a read-only field changes nothing; without a
    // current VMCS it fails, which is returned as `None`.
    let raw = unsafe { x86::bits64::vmx::vmread(field) }.ok()?;
    Some(VmInstructionError(raw as u32))
}

/// VMXON with the region at `phys`.
///
/// # Safety
/// CR4.VMXE must be set, CR0/CR4 must satisfy the fixed bits, and `phys`
/// must be a 4 KiB frame owned by the caller holding the revision id.
pub unsafe fn vmxon(phys: u64) -> Result<(), VmxFail> {
    // SAFETY: by this function's contract CR0/CR4 are as VMXON needs and
    // the region is an owned frame, so VMXON changes no memory anyone else
    // uses.
    status(VmxInstruction::Vmxon, unsafe {
        x86::bits64::vmx::vmxon(phys)
    })
}

/// VMCLEAR of the VMCS at `phys`.
///
/// # Safety
/// `phys` must be a VMCS region owned by the caller; VMX must be on.
pub unsafe fn vmclear(phys: u64) -> Result<(), VmxFail> {
    // SAFETY: by this function's contract the region is an owned VMCS:
    // the CPU writes its cached state there and nowhere else.
    status(VmxInstruction::Vmclear, unsafe {
        x86::bits64::vmx::vmclear(phys)
    })
}

/// VMPTRLD of the VMCS at `phys`.
///
/// # Safety
/// As for [`vmclear`].
pub unsafe fn vmptrld(phys: u64) -> Result<(), VmxFail> {
    // SAFETY: by this function's contract the region is an owned VMCS,
    // which the CPU may use from now on.
    status(VmxInstruction::Vmptrld, unsafe {
        x86::bits64::vmx::vmptrld(phys)
    })
}

/// VMREAD of a field of the current VMCS.
pub fn vmread<F: Field>(field: F) -> Result<F::Value, VmxFail> {
    let enc = field.encoding();
    // SAFETY: VMREAD only reads the current VMCS; without one it fails,
    // which is returned.
    match unsafe { x86::bits64::vmx::vmread(enc.0) } {
        Ok(raw) => Ok(F::from_raw(raw)),
        Err(e) => Err(failure(
            VmxInstruction::Vmread(enc),
            matches!(e, x86::vmx::VmFail::VmFailInvalid),
        )),
    }
}

/// VMWRITE of a writable field of the current VMCS.
pub fn vmwrite<F: WritableField>(field: F, value: F::Value) -> Result<(), VmxFail> {
    let enc = field.encoding();
    // SAFETY: VMWRITE only changes the current VMCS, whose fields take
    // effect at the next VM entry, which checks them.
    status(VmxInstruction::Vmwrite(enc), unsafe {
        x86::bits64::vmx::vmwrite(enc.0, F::to_raw(value))
    })
}

/// INVEPT type 1: single-context invalidation (SDM Vol. 3C, 30.3.3.1).
const INVEPT_SINGLE_CONTEXT: u64 = 1;

/// INVEPT single-context for `eptp`.
pub fn invept_single(eptp: u64) -> Result<(), VmxFail> {
    let desc: [u64; 2] = [eptp, 0];
    let (cf, zf): (u8, u8);
    // SAFETY: INVEPT only invalidates cached translations; the descriptor
    // lives on the stack for the duration of the instruction.
    unsafe {
        asm!("invept {t}, [{d}]", "setc {cf}", "setz {zf}",
             t = in(reg) INVEPT_SINGLE_CONTEXT, d = in(reg) &desc, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack));
    }
    match (cf, zf) {
        (0, 0) => Ok(()),
        (1, _) => Err(failure(VmxInstruction::Invept, true)),
        _ => Err(failure(VmxInstruction::Invept, false)),
    }
}

/// INVVPID of type `kind` (1: single context, all of `vpid`'s guest TLB
/// entries; 2: all contexts).
pub fn invvpid(kind: u64, vpid: u16) -> Result<(), VmxFail> {
    let desc: [u64; 2] = [u64::from(vpid), 0];
    let (cf, zf): (u8, u8);
    // SAFETY: INVVPID only invalidates cached translations; the descriptor
    // lives on the stack for the duration of the instruction.
    unsafe {
        asm!("invvpid {t}, [{d}]", "setc {cf}", "setz {zf}",
             t = in(reg) kind, d = in(reg) &desc, cf = out(reg_byte) cf, zf = out(reg_byte) zf,
             options(nostack));
    }
    match (cf, zf) {
        (0, 0) => Ok(()),
        (1, _) => Err(failure(VmxInstruction::Invvpid, true)),
        _ => Err(failure(VmxInstruction::Invvpid, false)),
    }
}

/// The guest's general-purpose registers other than RSP (which is in the
/// VMCS), in the order the entry code saves them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestRegs {
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rbx: u64,
    pub rbp: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub cr2: u64,
}

const _: () = assert!(core::mem::offset_of!(GuestRegs, rdi) == 48);
const _: () = assert!(core::mem::offset_of!(GuestRegs, cr2) == 120);

/// How a VM entry ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryResult {
    /// The guest ran and exited.
    Exited,
    /// VMLAUNCH/VMRESUME failed.
    Failed(VmxFail),
}

// tern_vmx_run(regs: *mut GuestRegs, launched: u64) -> u64
// Returns 0 after a VM exit, 1 for VMfailInvalid, 2 for VMfailValid.
// Host callee-saved registers and the regs pointer are on the stack; HOST_RSP
// is set to that stack position so the exit path finds them.
global_asm!(
    ".global tern_vmx_run",
    "tern_vmx_run:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "mov rax, {host_rsp}",
    "vmwrite rax, rsp",
    "jbe 3f",
    "lea rax, [rip + tern_vmx_exit]",
    "mov rdx, {host_rip}",
    "vmwrite rdx, rax",
    "jbe 3f",
    "mov rax, [rdi + 120]",
    "mov cr2, rax",
    "test rsi, rsi",
    "mov rax, [rdi + 0]",
    "mov rcx, [rdi + 8]",
    "mov rdx, [rdi + 16]",
    "mov rbx, [rdi + 24]",
    "mov rbp, [rdi + 32]",
    "mov rsi, [rdi + 40]",
    "mov r8, [rdi + 56]",
    "mov r9, [rdi + 64]",
    "mov r10, [rdi + 72]",
    "mov r11, [rdi + 80]",
    "mov r12, [rdi + 88]",
    "mov r13, [rdi + 96]",
    "mov r14, [rdi + 104]",
    "mov r15, [rdi + 112]",
    "mov rdi, [rdi + 48]",
    "jnz 2f",
    "vmlaunch",
    "jmp 3f",
    "2:",
    "vmresume",
    "3:",
    // VMfail: CF=1 invalid, ZF=1 valid.
    "mov eax, 1",
    "jc 4f",
    "mov eax, 2",
    "4:",
    "add rsp, 8",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
    ".global tern_vmx_exit",
    "tern_vmx_exit:",
    "push rdi",
    "mov rdi, [rsp + 8]",
    "mov [rdi + 0], rax",
    "mov [rdi + 8], rcx",
    "mov [rdi + 16], rdx",
    "mov [rdi + 24], rbx",
    "mov [rdi + 32], rbp",
    "mov [rdi + 40], rsi",
    "mov [rdi + 56], r8",
    "mov [rdi + 64], r9",
    "mov [rdi + 72], r10",
    "mov [rdi + 80], r11",
    "mov [rdi + 88], r12",
    "mov [rdi + 96], r13",
    "mov [rdi + 104], r14",
    "mov [rdi + 112], r15",
    "pop rax",
    "mov [rdi + 48], rax",
    "mov rax, cr2",
    "mov [rdi + 120], rax",
    "add rsp, 8",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "xor eax, eax",
    "ret",
    host_rsp = const super::vmcs::host::RSP_ENCODING,
    host_rip = const super::vmcs::host::RIP_ENCODING,
);

extern "C" {
    fn tern_vmx_run(regs: *mut GuestRegs, launched: u64) -> u64;
}

/// Enters the guest with the current VMCS until the next VM exit.
///
/// # Safety
/// The current VMCS must hold a complete host state for this CPU (GDT, IDT,
/// TSS, CR3 of the running kernel) and a guest state that cannot touch host
/// memory outside what EPT maps.
pub unsafe fn enter(regs: &mut GuestRegs, launched: bool) -> EntryResult {
    let instruction = if launched {
        VmxInstruction::Vmresume
    } else {
        VmxInstruction::Vmlaunch
    };
    // SAFETY: by this function's contract the VMCS has a complete host
    // state and a guest confined by EPT; the assembly saves and restores every callee-saved
    // register and returns through the host RIP/RSP it wrote itself, so
    // Rust's state is as before the call.
    match unsafe { tern_vmx_run(regs, u64::from(launched)) } {
        0 => EntryResult::Exited,
        1 => EntryResult::Failed(failure(instruction, true)),
        _ => EntryResult::Failed(failure(instruction, false)),
    }
}
