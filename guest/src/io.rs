//! The guest's hardware access: ports, CPUID, VMCALL, physical memory.
//! Leaf module: the guest's `unsafe` is here.

use core::arch::asm;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port output has no memory effect; the guest owns its ports.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) }
}

pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) }
    v
}

/// Reads port 0x80 forever: a guest that exits all the time and never
/// finishes (the hypervisor's time budget must still stop it).
pub fn spin_on_port() -> ! {
    loop {
        core::hint::black_box(inb(0x80));
    }
}

/// COM1, polled.
pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            while inb(0x3FD) & 0x20 == 0 {}
            outb(0x3F8, b);
        }
        Ok(())
    }
}

/// Reports `status` through isa-debug-exit; stops in HLT if that returns.
pub fn exit(status: u32) -> ! {
    // SAFETY: port output has no memory effect.
    unsafe { asm!("out dx, eax", in("dx") 0xF4u16, in("eax") status, options(nomem, nostack)) }
    loop {
        // SAFETY: HLT only stops the CPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// CPUID leaf `leaf`, subleaf 0.
pub fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// VMCALL with the number in RAX and one argument in RBX; returns RAX.
pub fn vmcall(nr: u64, arg: u64) -> u64 {
    let r: u64;
    // SAFETY: VMCALL traps to the hypervisor. RBX cannot be an asm operand
    // (LLVM reserves it), so the argument is swapped in and out around it.
    unsafe {
        asm!("xchg rbx, {a}", "vmcall", "xchg rbx, {a}", a = inout(reg) arg => _, inout("rax") nr => r,
             options(nostack))
    }
    r
}

/// VMCALL with the number in RAX and arguments in RBX and RCX.
pub fn vmcall2(nr: u64, a: u64, b: u64) -> u64 {
    let r: u64;
    // SAFETY: as for `vmcall`; RCX is a plain operand.
    unsafe {
        asm!("xchg rbx, {a}", "vmcall", "xchg rbx, {a}", a = inout(reg) a => _, inout("rax") nr => r,
             in("rcx") b, options(nostack))
    }
    r
}

/// Writes a dword to a physical address.
pub fn write_phys_u32(addr: u64, v: u32) {
    // SAFETY: the address is in the identity-mapped first 4 GiB; the
    // scenario that calls this expects the hypervisor to stop it.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// HLT with interrupts disabled.
pub fn halt() {
    // SAFETY: stops the CPU until an interrupt that cannot come; the
    // scenario expects the hypervisor to end the VM here.
    unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
}

/// RDMSR.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an MSR; a refused one raises #GP, which the scenario
    // expects to end the VM.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a word to a port.
pub fn outw(port: u16, v: u16) {
    // SAFETY: port output has no memory effect.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack)) }
}

/// Writes a dword to a port.
pub fn outl(port: u16, v: u32) {
    // SAFETY: port output has no memory effect.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) }
}

/// Reads a dword from a physical (identity-mapped) address.
pub fn read_phys_u32(addr: u64) -> u32 {
    // SAFETY: the address is in the identity-mapped first 4 GiB (device
    // registers or RAM the scenario owns).
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// `rep insb` of `buf.len()` bytes from `port`.
pub fn rep_insb(port: u16, buf: &mut [u8]) {
    // SAFETY: INS writes exactly `buf.len()` bytes at `buf`.
    unsafe {
        asm!("rep insb", in("dx") port, inout("rdi") buf.as_mut_ptr() => _,
             inout("rcx") buf.len() => _, options(nostack))
    }
}

/// `rep outsb` of `data` to `port`.
pub fn rep_outsb(port: u16, data: &[u8]) {
    // SAFETY: OUTS reads exactly `data.len()` bytes at `data`.
    unsafe {
        asm!("rep outsb", in("dx") port, inout("rsi") data.as_ptr() => _,
             inout("rcx") data.len() => _, options(readonly, nostack))
    }
}
