//! The guest's IDT: one stub per vector that counts the vector, skips the
//! faulting instruction for #GP and #UD (by `GP_SKIP` bytes, so a scenario
//! can probe a refused MSR or instruction), and ends the interrupt: PIC EOI for 0x20-0x2F,
//! local APIC EOI (xAPIC page) for 0x30 and up. Leaf module: the guest's
//! interrupt `unsafe` is here.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// Times each vector was taken.
#[no_mangle]
static TERN_VEC_COUNT: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

/// Bytes a #GP handler adds to RIP (0: return to the faulting instruction,
/// which would fault forever; the scenarios set it first).
#[no_mangle]
static TERN_GP_SKIP: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
.macro TERN_VEC v
.global tern_vec_\v
tern_vec_\v:
.if (\v == 8) || ((\v >= 10) && (\v <= 14)) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    add rsp, 8
.endif
    push rax
    lock inc qword ptr [rip + TERN_VEC_COUNT + 8 * \v]
.if (\v == 13) || (\v == 6)
    mov rax, qword ptr [rip + TERN_GP_SKIP]
    add qword ptr [rsp + 8], rax
.endif
.if (\v >= 0x20) && (\v < 0x30)
    mov al, 0x20
.if \v >= 0x28
    out 0xA0, al
.endif
    out 0x20, al
.endif
.if \v >= 0x30
    mov rax, 0xFEE000B0
    mov dword ptr [rax], 0
.endif
    pop rax
    iretq
.endm
.altmacro
.set i, 0
.rept 256
    TERN_VEC %i
    .set i, i + 1
.endr
.section .rodata
.balign 8
.global tern_vec_table
tern_vec_table:
.macro TERN_VEC_ADDR v
    .quad tern_vec_\v
.endm
.set i, 0
.rept 256
    TERN_VEC_ADDR %i
    .set i, i + 1
.endr
.noaltmacro
.text
"#
);

extern "C" {
    static tern_vec_table: [u64; 256];
}

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

static mut IDT: Idt = Idt([[0; 2]; 256]);

/// Fills the IDT with the stubs (64-bit interrupt gates on the current
/// code segment) and loads it.
pub fn init() {
    let cs: u16;
    // SAFETY: reading CS has no effect.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    // SAFETY: the guest is single-threaded and nothing else touches IDT;
    // the table is static, so it outlives its use by the CPU.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (v, e) in idt.0.iter_mut().enumerate() {
            let h = tern_vec_table[v];
            e[0] = (h & 0xFFFF) | (u64::from(cs) << 16) | (0x8E << 40) | ((h >> 16) & 0xFFFF) << 48;
            e[1] = h >> 32;
        }
        let ptr: [u16; 5] = {
            let base = idt as *const Idt as u64;
            [
                (core::mem::size_of::<Idt>() - 1) as u16,
                base as u16,
                (base >> 16) as u16,
                (base >> 32) as u16,
                (base >> 48) as u16,
            ]
        };
        asm!("lidt [{}]", in(reg) &ptr, options(readonly, nostack, preserves_flags));
    }
}

/// Times vector `v` was taken.
pub fn count(v: u8) -> u64 {
    TERN_VEC_COUNT[usize::from(v)].load(Ordering::SeqCst)
}

/// Sets the bytes a #GP handler skips.
pub fn set_gp_skip(n: u64) {
    TERN_GP_SKIP.store(n, Ordering::SeqCst);
}

/// `sti; hlt` until `done()` says so or `max` halts went by; then `cli`.
/// Returns the halts made.
pub fn wait(max: u32, done: impl Fn() -> bool) -> u32 {
    let mut n = 0;
    while !done() && n < max {
        // SAFETY: STI;HLT sleeps until an interrupt, whose stub returns
        // here; the STI shadow keeps the interrupt from coming before HLT.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) };
        n += 1;
    }
    n
}

/// Enables interrupts and spins for `ticks` TSC ticks (no HLT).
pub fn spin_with_interrupts(ticks: u64) {
    let start = rdtsc();
    // SAFETY: the IDT handles every vector.
    unsafe { asm!("sti", options(nomem, nostack)) };
    while rdtsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
    // SAFETY: as above.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// WRMSR; a refused one raises #GP, which the stub counts and skips when
/// `set_gp_skip(2)` was called.
pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: the scenarios write MSRs whose effect they check; a refused
    // write faults into the IDT's #GP stub.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack))
    }
}

/// RDMSR (see [`wrmsr`] for refused ones: the result is then 0).
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: as for `wrmsr`; EDX:EAX are zeroed first so a skipped read
    // returns 0.
    unsafe {
        asm!("xor eax, eax", "xor edx, edx", "rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}
