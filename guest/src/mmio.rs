//! MMIO accesses in each instruction form the hypervisor must emulate,
//! written as explicit instructions so the compiler cannot pick others.
//! Leaf module: the guest's raw memory accesses are here.

use core::arch::asm;

/// Which form to use for a store.
#[derive(Clone, Copy)]
pub enum Store {
    Imm8,
    Imm16,
    Imm32,
    /// `mov qword [p], imm32` (sign-extended).
    Imm64,
    Reg8(u8),
    Reg16(u16),
    Reg32(u32),
    Reg64(u64),
    /// `mov byte [p], ah` with AH = the value.
    HighByte(u8),
}

/// Stores at `p` with the given form. Immediates: 0xA5, 0xBEEF,
/// 0xDEADBEEF, -2.
pub fn store(p: u64, s: Store) {
    // SAFETY: `p` is an MMIO or RAM address identity mapped by the guest's
    // page tables; each instruction below writes only there.
    unsafe {
        match s {
            Store::Imm8 => asm!("mov byte ptr [{p}], 0xA5", p = in(reg) p, options(nostack)),
            Store::Imm16 => asm!("mov word ptr [{p}], 0xBEEF", p = in(reg) p, options(nostack)),
            Store::Imm32 => {
                asm!("mov dword ptr [{p}], 0xDEADBEEF", p = in(reg) p, options(nostack))
            }
            Store::Imm64 => asm!("mov qword ptr [{p}], -2", p = in(reg) p, options(nostack)),
            Store::Reg8(v) => {
                asm!("mov byte ptr [{p}], {v}", p = in(reg) p, v = in(reg_byte) v, options(nostack))
            }
            Store::Reg16(v) => {
                asm!("mov word ptr [{p}], {v:x}", p = in(reg) p, v = in(reg) v, options(nostack))
            }
            Store::Reg32(v) => {
                asm!("mov dword ptr [{p}], {v:e}", p = in(reg) p, v = in(reg) v, options(nostack))
            }
            Store::Reg64(v) => {
                asm!("mov qword ptr [{p}], {v}", p = in(reg) p, v = in(reg) v, options(nostack))
            }
            Store::HighByte(v) => {
                asm!("mov byte ptr [{p}], ah", p = in(reg) p, in("rax") u64::from(v) << 8, options(nostack))
            }
        }
    }
}

/// Which form to use for a load; the destination starts as `preset`.
#[derive(Clone, Copy)]
pub enum Load {
    /// `mov al, [p]`
    Plain8,
    /// `mov ax, [p]`
    Plain16,
    /// `mov eax, [p]`
    Plain32,
    /// `mov rax, [p]`
    Plain64,
    /// `movzx eax, byte [p]`
    Zx8,
    /// `movzx eax, word [p]`
    Zx16,
    /// `movsx rax, byte [p]`
    Sx8,
    /// `movsx rax, word [p]`
    Sx16,
    /// `movsxd rax, dword [p]`
    Sx32,
}

/// Loads from `p` into RAX (which holds `preset` before) and returns RAX.
pub fn load(p: u64, l: Load, preset: u64) -> u64 {
    let mut rax = preset;
    // SAFETY: each instruction below reads `p`, identity mapped, and writes
    // only RAX.
    unsafe {
        match l {
            Load::Plain8 => {
                asm!("mov al, byte ptr [{p}]", p = in(reg) p, inout("rax") rax, options(nostack))
            }
            Load::Plain16 => {
                asm!("mov ax, word ptr [{p}]", p = in(reg) p, inout("rax") rax, options(nostack))
            }
            Load::Plain32 => {
                asm!("mov eax, dword ptr [{p}]", p = in(reg) p, inout("rax") rax, options(nostack))
            }
            Load::Plain64 => {
                asm!("mov rax, qword ptr [{p}]", p = in(reg) p, inout("rax") rax, options(nostack))
            }
            Load::Zx8 => {
                asm!("movzx eax, byte ptr [{p}]", p = in(reg) p, inout("rax") rax, options(nostack))
            }
            Load::Zx16 => {
                asm!("movzx eax, word ptr [{p}]", p = in(reg) p, inout("rax") rax, options(nostack))
            }
            Load::Sx8 => {
                asm!("movsx rax, byte ptr [{p}]", p = in(reg) p, inout("rax") rax, options(nostack))
            }
            Load::Sx16 => {
                asm!("movsx rax, word ptr [{p}]", p = in(reg) p, inout("rax") rax, options(nostack))
            }
            Load::Sx32 => {
                asm!("movsxd rax, dword ptr [{p}]", p = in(reg) p, inout("rax") rax, options(nostack))
            }
        }
    }
    rax
}

/// `add dword [p], 1`: a read-modify-write Tern does not emulate.
pub fn cmpxchg(p: u64) {
    // SAFETY: as for `store`; the scenario expects the VM to be stopped.
    unsafe {
        asm!("cmpxchg dword ptr [{p}], {v:e}", p = in(reg) p, v = in(reg) 1u32,
             inout("eax") 0u32 => _, options(nostack))
    }
}

/// `rep stosd` of `n` dwords of `v` at `p`, then `rep movsb` of `n * 4`
/// bytes from `p` to `dst`.
pub fn string_copy(p: u64, v: u32, n: usize, dst: &mut [u8]) {
    assert!(dst.len() >= n * 4);
    // SAFETY: STOS writes n dwords at `p` (identity-mapped MMIO), MOVS
    // reads them back into `dst`, which is long enough.
    unsafe {
        asm!("cld", "rep stosd", inout("rdi") p => _, inout("rcx") n => _, in("eax") v, options(nostack));
        asm!("rep movsb", inout("rsi") p => _, inout("rdi") dst.as_mut_ptr() => _, inout("rcx") n * 4 => _, options(nostack));
    }
}

/// A read-modify-write instruction on a dword at `p`.
#[derive(Clone, Copy)]
pub enum Rmw {
    Add(u32),
    Or(u32),
    And(u32),
    Xor(u32),
    Sub(u32),
    /// `bts dword [p], n`.
    Bts(u8),
    /// `xchg [p], reg`: the old value comes back.
    Xchg(u32),
    /// `inc dword [p]`.
    Inc,
    /// `neg dword [p]`.
    Neg,
}

/// Runs `r` on the dword at `p`; returns (the register result, RFLAGS
/// after the instruction).
pub fn rmw(p: u64, r: Rmw) -> (u64, u64) {
    let flags: u64;
    let mut out: u64 = 0;
    // SAFETY: `p` is identity mapped; each instruction reads and writes
    // only the dword at `p` (and the register operand).
    unsafe {
        match r {
            Rmw::Add(v) => {
                asm!("add dword ptr [{p}], {v:e}", "pushfq", "pop {f}", p = in(reg) p, v = in(reg) v, f = out(reg) flags)
            }
            Rmw::Or(v) => {
                asm!("or dword ptr [{p}], {v:e}", "pushfq", "pop {f}", p = in(reg) p, v = in(reg) v, f = out(reg) flags)
            }
            Rmw::And(v) => {
                asm!("and dword ptr [{p}], {v:e}", "pushfq", "pop {f}", p = in(reg) p, v = in(reg) v, f = out(reg) flags)
            }
            Rmw::Xor(v) => {
                asm!("xor dword ptr [{p}], {v:e}", "pushfq", "pop {f}", p = in(reg) p, v = in(reg) v, f = out(reg) flags)
            }
            Rmw::Sub(v) => {
                asm!("sub dword ptr [{p}], {v:e}", "pushfq", "pop {f}", p = in(reg) p, v = in(reg) v, f = out(reg) flags)
            }
            Rmw::Bts(n) => {
                asm!("bts dword ptr [{p}], {n:e}", "pushfq", "pop {f}", p = in(reg) p, n = in(reg) u32::from(n), f = out(reg) flags)
            }
            Rmw::Xchg(v) => {
                out = v.into();
                asm!("xchg dword ptr [{p}], {v:e}", "pushfq", "pop {f}", p = in(reg) p, v = inout(reg) out, f = out(reg) flags)
            }
            Rmw::Inc => {
                asm!("inc dword ptr [{p}]", "pushfq", "pop {f}", p = in(reg) p, f = out(reg) flags)
            }
            Rmw::Neg => {
                asm!("neg dword ptr [{p}]", "pushfq", "pop {f}", p = in(reg) p, f = out(reg) flags)
            }
        }
    }
    (out, flags)
}
