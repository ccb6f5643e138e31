//! Scenarios for the platform under the guest: interrupts and timers,
//! fw_cfg, the MSR table, read-modify-write and string MMIO, debug
//! registers. Each prints what it measured and fails on any difference.

use crate::idt;
use crate::io;
use crate::mmio::{self, Rmw};
use core::arch::asm;
use core::fmt::Write;

macro_rules! say {
    ($($t:tt)*) => { let _ = writeln!(io::Serial, $($t)*); };
}

type R = Result<(), &'static str>;

fn check(what: &'static str, got: u64, want: u64) -> R {
    if got == want {
        Ok(())
    } else {
        say!("guest: {what}: got {got:#x}, want {want:#x}");
        Err(what)
    }
}

const APIC: u64 = 0xFEE0_0000;
const IOAPIC: u64 = 0xFEC0_0000;

fn apic_write(reg: u64, v: u32) {
    io::write_phys_u32(APIC + reg, v);
}

fn apic_read(reg: u64) -> u32 {
    io::read_phys_u32(APIC + reg)
}

/// Software-enables the local APIC (SVR = 0x1FF) with TPR 0.
fn apic_on() {
    apic_write(0x80, 0);
    apic_write(0xF0, 0x1FF);
}

/// Masks every PIC line.
fn pic_mask_all() {
    io::outb(0x21, 0xFF);
    io::outb(0xA1, 0xFF);
}

/// PIT channel 0, mode 2 (rate generator), `count` clocks per interrupt.
fn pit_periodic(count: u16) {
    io::outb(0x43, 0b0011_0100);
    io::outb(0x40, count as u8);
    io::outb(0x40, (count >> 8) as u8);
}

/// The APIC timer waking a halted vCPU in each mode.
pub fn apic_timer() -> R {
    idt::init();
    pic_mask_all();
    apic_on();
    // One-shot: vector 0x30, divide by 1, 2 ms at the 1 GHz APIC clock.
    apic_write(0x3E0, 0xB);
    apic_write(0x320, 0x30);
    apic_write(0x380, 2_000_000);
    let halts = idt::wait(1000, || idt::count(0x30) >= 1);
    check("one-shot interrupts", idt::count(0x30), 1)?;
    check(
        "one-shot current count after expiry",
        apic_read(0x390).into(),
        0,
    )?;
    say!("guest: one-shot timer woke the halted vCPU after {halts} HLT");
    // Nothing more may come from a one-shot timer.
    idt::spin_with_interrupts(2_000_000);
    check("one-shot fired again", idt::count(0x30), 1)?;

    // Periodic: vector 0x31, divide by 2 (0x0), 1 ms periods.
    apic_write(0x3E0, 0x0);
    apic_write(0x320, 0x31 | (1 << 17));
    apic_write(0x380, 500_000);
    let halts = idt::wait(1000, || idt::count(0x31) >= 5);
    apic_write(0x380, 0);
    check("periodic interrupts", idt::count(0x31), 5)?;
    say!("guest: periodic timer: 5 interrupts in {halts} HLT");

    // TSC deadline: vector 0x32.
    apic_write(0x320, 0x32 | (2 << 17));
    let deadline = idt::rdtsc() + 1_000_000;
    idt::wrmsr(0x6E0, deadline);
    let halts = idt::wait(1000, || idt::count(0x32) >= 1);
    check("TSC-deadline interrupts", idt::count(0x32), 1)?;
    if idt::rdtsc() < deadline {
        return Err("TSC-deadline interrupt before the deadline");
    }
    check("deadline MSR cleared after firing", idt::rdmsr(0x6E0), 0)?;
    say!("guest: TSC-deadline timer woke the halted vCPU after {halts} HLT");
    Ok(())
}

/// The PIT through the 8259 PIC (vector 0x20) and through the I/O APIC
/// (pin 2, vector 0x33).
pub fn pit_interrupts() -> R {
    idt::init();
    // ICW1-4: edge, cascade, ICW4; bases 0x20/0x28; slave on IR2; 8086.
    for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01)] {
        io::outb(port, v);
    }
    for (port, v) in [(0xA0, 0x11), (0xA1, 0x28), (0xA1, 0x02), (0xA1, 0x01)] {
        io::outb(port, v);
    }
    io::outb(0xA1, 0xFF);
    io::outb(0x21, 0xFE); // IRQ 0 only
    pit_periodic(11_932); // 10 ms
    let halts = idt::wait(1000, || idt::count(0x20) >= 3);
    check("IRQ 0 through the PIC", idt::count(0x20), 3)?;
    say!("guest: PIT -> PIC: 3 interrupts in {halts} HLT");
    // OCW3: read ISR: nothing in service after the EOIs.
    io::outb(0x20, 0x0B);
    check("PIC ISR after EOI", io::inb(0x20).into(), 0)?;

    // The same PIT through the I/O APIC: PIC masked, APIC on, pin 2.
    pic_mask_all();
    apic_on();
    io::write_phys_u32(IOAPIC, 0x10 + 2 * 2);
    io::write_phys_u32(IOAPIC + 0x10, 0x33);
    io::write_phys_u32(IOAPIC, 0x10 + 2 * 2 + 1);
    io::write_phys_u32(IOAPIC + 0x10, 0);
    let halts = idt::wait(1000, || idt::count(0x33) >= 3);
    check("IRQ 0 through the I/O APIC", idt::count(0x33), 3)?;
    check("PIC vector while masked", idt::count(0x20), 3)?;
    say!("guest: PIT -> I/O APIC pin 2: 3 interrupts in {halts} HLT");
    io::write_phys_u32(IOAPIC, 0x01);
    check(
        "I/O APIC version",
        u64::from(io::read_phys_u32(IOAPIC + 0x10) & 0x00FF_00FF),
        0x0017_0020,
    )?;
    // Port 0x61: channel 2 gated on, mode 0, OUT rises after the count.
    io::outb(0x61, 0x01);
    io::outb(0x43, 0b1011_0000);
    io::outb(0x42, 0xFF);
    io::outb(0x42, 0x00);
    let mut polls = 0u64;
    while io::inb(0x61) & 0x20 == 0 {
        polls += 1;
        if polls > 10_000_000 {
            return Err("PIT channel 2 OUT never rose");
        }
    }
    say!("guest: PIT channel 2 OUT rose after {polls} polls of port 0x61");
    Ok(())
}

/// Self IPIs through the ICR: a fixed vector and an NMI.
pub fn self_ipi() -> R {
    idt::init();
    pic_mask_all();
    apic_on();
    apic_write(0x300, 0x40 | (1 << 18)); // self shorthand, fixed
    idt::spin_with_interrupts(10_000);
    check("self IPI", idt::count(0x40), 1)?;
    apic_write(0x300, (4 << 8) | (1 << 18)); // self shorthand, NMI
    idt::spin_with_interrupts(10_000);
    check("NMI to self", idt::count(2), 1)?;
    check("APIC base MSR", idt::rdmsr(0x1B) & 0xFFFF_F900, 0xFEE0_0900)?;
    // x2APIC: enabled through the base MSR, the ID and a self IPI by MSR.
    idt::wrmsr(0x1B, 0xFEE0_0C00);
    check("x2APIC ID", idt::rdmsr(0x802), 0)?;
    idt::wrmsr(0x83F, 0x41);
    idt::spin_with_interrupts(10_000);
    check("x2APIC self IPI", idt::count(0x41), 1)?;
    Ok(())
}

/// fw_cfg: signature, CPU count, RAM size through the data port (byte by
/// byte and with `rep insb`), and a DMA read.
pub fn fw_cfg(ram_kib: u64) -> R {
    let read = |key: u16, n: usize| -> u64 {
        io::outw(0x510, key);
        (0..n).fold(0, |v, i| v | (u64::from(io::inb(0x511)) << (8 * i)))
    };
    check(
        "signature",
        read(0, 4),
        u64::from(u32::from_le_bytes(*b"QEMU")),
    )?;
    check("CPU count", read(5, 2), 1)?;
    check("RAM size", read(3, 8), ram_kib * 1024)?;
    io::outw(0x510, 0);
    let mut sig = [0u8; 4];
    io::rep_insb(0x511, &mut sig);
    if &sig != b"QEMU" {
        return Err("rep insb of the signature");
    }
    // DMA: select the signature and read it into `buf`.
    #[repr(C, align(16))]
    struct Dma {
        control: u32,
        length: u32,
        address: u64,
        buf: [u8; 8],
    }
    let mut d = Dma {
        control: 0,
        length: 4u32.to_be(),
        address: 0,
        buf: [0; 8],
    };
    d.address = (core::ptr::addr_of!(d.buf) as u64).to_be();
    // Select key 0 (the signature, bits 31:16) and read.
    d.control = (0x08u32 | 0x02).to_be();
    let addr = core::ptr::addr_of_mut!(d) as u64;
    io::outl(0x514, 0);
    io::outl(0x518, (addr as u32).to_be());
    // SAFETY: the device wrote the descriptor and buffer; read them back
    // as the CPU sees memory now.
    let (control, buf) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!(d.control)),
            core::ptr::read_volatile(core::ptr::addr_of!(d.buf)),
        )
    };
    check("DMA control after the transfer", control.into(), 0)?;
    if &buf[..4] != b"QEMU" {
        return Err("DMA read of the signature");
    }
    say!("guest: fw_cfg: QEMU signature, 1 CPU, {ram_kib} KiB, DMA works");
    Ok(())
}

/// The MSR table: switched, soft, constant and refused MSRs, and the TSC.
pub fn msrs() -> R {
    idt::init();
    idt::set_gp_skip(2);
    // KERNEL_GS_BASE through WRMSR, then SWAPGS moves it into GS.base.
    idt::wrmsr(0xC000_0102, 0x1234_5000);
    idt::wrmsr(0xC000_0101, 0x7777_0000);
    // SAFETY: SWAPGS exchanges GS.base and KERNEL_GS_BASE; the guest uses
    // neither for anything else and swaps back below.
    unsafe { asm!("swapgs", options(nomem, nostack)) };
    check("GS base after SWAPGS", idt::rdmsr(0xC000_0101), 0x1234_5000)?;
    check(
        "KERNEL_GS_BASE after SWAPGS",
        idt::rdmsr(0xC000_0102),
        0x7777_0000,
    )?;
    // SAFETY: as above.
    unsafe { asm!("swapgs", options(nomem, nostack)) };
    idt::wrmsr(0xC000_0082, 0xFFFF_8000_0000_1000);
    check("LSTAR", idt::rdmsr(0xC000_0082), 0xFFFF_8000_0000_1000)?;
    idt::wrmsr(0x2FF, 0xC06);
    check("MTRR_DEF_TYPE", idt::rdmsr(0x2FF), 0xC06)?;
    check("MTRRCAP", idt::rdmsr(0xFE), 0x508)?;
    check("MISC_ENABLE", idt::rdmsr(0x1A0), 0x1801)?;
    check("FEATURE_CONTROL", idt::rdmsr(0x3A), 1)?;
    check("#GP so far", idt::count(13), 0)?;
    // Refused: #GP, counted and skipped by the stub.
    let _ = idt::rdmsr(0xC0DE);
    idt::wrmsr(0xC000_0082, 0x8000_0000_0000_0000); // not canonical
    idt::wrmsr(0xC000_0084, 1 << 32); // SFMASK bits 63:32 are reserved
    check("refused MSR accesses", idt::count(13), 3)?;
    // A TSC write moves the TSC and TSC_ADJUST by the same amount.
    let before = idt::rdtsc();
    idt::wrmsr(0x10, before + (1 << 40));
    let after = idt::rdtsc();
    if after < before + (1 << 40) || after > before + (1 << 40) + 10_000_000 {
        return Err("TSC after a TSC write");
    }
    let adjust = idt::rdmsr(0x3B);
    if !((1 << 40) - 10_000_000..=(1 << 40)).contains(&adjust) {
        say!("guest: TSC_ADJUST {adjust:#x}");
        return Err("TSC_ADJUST after a TSC write");
    }
    say!("guest: MSR table: switched, soft, constant, refused and TSC MSRs as expected");
    Ok(())
}

fn flags_of(f: u64) -> (bool, bool, bool) {
    (f & 1 != 0, f & (1 << 6) != 0, f & (1 << 7) != 0)
}

/// Read-modify-write and string instructions on MMIO (the test device's
/// scratch area), with the flags they leave.
pub fn rmw(test_base: u64) -> R {
    let p = test_base + 0x180;
    let set = |v: u32| mmio::store(p, mmio::Store::Reg32(v));
    let get = || mmio::load(p, mmio::Load::Plain32, 0);
    set(0xFFFF_FFFF);
    let (_, f) = mmio::rmw(p, Rmw::Add(1));
    check("add result", get(), 0)?;
    // CF, ZF set; SF clear.
    if flags_of(f) != (true, true, false) {
        return Err("add flags");
    }
    set(0x0F0F_0000);
    mmio::rmw(p, Rmw::Or(0x00F0_000F));
    check("or", get(), 0x0FFF_000F)?;
    mmio::rmw(p, Rmw::And(0xFF00_FFFF));
    check("and", get(), 0x0F00_000F)?;
    mmio::rmw(p, Rmw::Xor(0x0F00_0000));
    check("xor", get(), 0x0000_000F)?;
    let (_, f) = mmio::rmw(p, Rmw::Sub(0x10));
    check("sub", get(), 0xFFFF_FFFF)?;
    // Borrow: CF and SF set, ZF clear.
    if flags_of(f) != (true, false, true) {
        return Err("sub flags");
    }
    set(0x10);
    let (_, f) = mmio::rmw(p, Rmw::Bts(4));
    check("bts", get(), 0x10)?;
    if f & 1 == 0 {
        return Err("bts CF (bit was set)");
    }
    mmio::rmw(p, Rmw::Bts(0));
    check("bts bit 0", get(), 0x11)?;
    let (old, _) = mmio::rmw(p, Rmw::Xchg(0xCAFE));
    check("xchg old value", old, 0x11)?;
    check("xchg new value", get(), 0xCAFE)?;
    mmio::rmw(p, Rmw::Inc);
    check("inc", get(), 0xCAFF)?;
    let (_, f) = mmio::rmw(p, Rmw::Neg);
    check("neg", get(), 0xFFFF_3501)?;
    if f & 1 == 0 {
        return Err("neg CF");
    }
    // rep stosd on MMIO, rep movsb back into RAM.
    let mut buf = [0u8; 32];
    mmio::string_copy(test_base + 0x100, 0xA5A5_5A5A, 8, &mut buf);
    if buf.chunks(4).any(|c| c != 0xA5A5_5A5Au32.to_le_bytes()) {
        return Err("rep stosd / rep movsb through MMIO");
    }
    // rep outsb to the UART.
    io::rep_outsb(0x3F8, b"guest: rep outsb reached the UART\n");
    say!("guest: read-modify-write and string MMIO checked");
    Ok(())
}

fn dr7() -> u64 {
    let v: u64;
    // SAFETY: reading DR7 has no effect.
    unsafe { asm!("mov {}, dr7", out(reg) v, options(nomem, nostack)) };
    v
}

fn dr0() -> u64 {
    let v: u64;
    // SAFETY: reading DR0 has no effect.
    unsafe { asm!("mov {}, dr0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Debug registers written by the guest survive exits, and a data
/// breakpoint armed before them fires after them.
pub fn debug_regs() -> R {
    idt::init();
    let addr = 0x5000u64;
    let dr7_value = 0x0001_0402u64; // G0, write breakpoint, 1 byte
                                    // SAFETY: arms a data breakpoint on a page the guest never writes to
                                    // in this scenario; DR0/DR7 are the guest's own.
    unsafe {
        asm!("mov dr0, {}", in(reg) addr, options(nomem, nostack));
        asm!("mov dr7, {}", in(reg) dr7_value, options(nomem, nostack));
    }
    // Exits of several kinds.
    let _ = io::cpuid(0);
    let _ = io::vmcall(0, 0);
    let _ = io::inb(0x80);
    check("DR7 after exits", dr7(), dr7_value)?;
    check("DR0 after exits", dr0(), addr)?;
    check("#DB before the write", idt::count(1), 0)?;
    // SAFETY: 0x5000 is guest RAM the scenario owns; the write traps (#DB)
    // after it completes.
    unsafe { core::ptr::write_volatile(addr as *mut u8, 1) };
    check("#DB from the data breakpoint", idt::count(1), 1)?;
    // SAFETY: disarms the breakpoint.
    unsafe { asm!("mov dr7, {}", in(reg) 0x400u64, options(nomem, nostack)) };
    say!("guest: DR0 and DR7 kept across CPUID, VMCALL and I/O exits");
    Ok(())
}

/// `sti; hlt` with every interrupt source quiet.
pub fn sleep_forever() {
    idt::init();
    idt::wait(1, || false);
}

/// Turns on SSE for the guest (CR4.OSFXSR/OSXMMEXCPT, CR0.MP, not EM).
fn sse_on() {
    // SAFETY: changes only how the guest's own FPU/SSE instructions behave.
    unsafe {
        asm!(
            "mov {t}, cr4", "or {t}, 0x600", "mov cr4, {t}",
            "mov {t}, cr0", "and {t}, ~4", "or {t}, 2", "mov cr0, {t}",
            t = out(reg) _, options(nomem, nostack)
        )
    }
}

const PLANT_XMM: u64 = 0x1122_3344_5566_7788;
const PLANT_MXCSR: u32 = 0x7F80;

/// Writes guest-visible CPU state that VMX does not switch: x87, SSE and
/// MXCSR, DR0-3, the SYSCALL and swapgs MSRs. The next VM must see none of
/// it (scenario `clean`).
pub fn plant() -> R {
    sse_on();
    let mxcsr = PLANT_MXCSR;
    // SAFETY: loads the guest's own SSE/x87/debug registers.
    unsafe {
        asm!("movq xmm0, {v}", "movq xmm7, {v}", v = in(reg) PLANT_XMM, options(nomem, nostack));
        asm!("ldmxcsr [{m}]", m = in(reg) &mxcsr, options(nostack));
        asm!("fld1", "fld1", options(nomem, nostack));
        asm!("mov dr0, {v}", "mov dr3, {v}", v = in(reg) 0x1234_5000u64, options(nomem, nostack));
    }
    for m in [0xC000_0081u32, 0xC000_0082, 0xC000_0083, 0xC000_0102] {
        idt::wrmsr(m, 0xFFFF_8000_1234_0000);
    }
    idt::wrmsr(0xC000_0084, 0x4700);
    say!("guest: planted x87, SSE, MXCSR, DR0/DR3, STAR/LSTAR/CSTAR/SFMASK/KERNEL_GS_BASE");
    Ok(())
}

/// Checks that this VM starts with reset values where `plant` wrote.
pub fn clean() -> R {
    sse_on();
    let (xmm0, xmm7, dr0, dr3, dr6, dr7): (u64, u64, u64, u64, u64, u64);
    let mut mxcsr = 0u32;
    let (fsw, fcw): (u16, u16);
    let mut cw = 0u16;
    // SAFETY: reads the guest's own SSE/x87/debug registers.
    unsafe {
        asm!("movq {a}, xmm0", "movq {b}, xmm7", a = out(reg) xmm0, b = out(reg) xmm7, options(nomem, nostack));
        asm!("stmxcsr [{m}]", m = in(reg) &mut mxcsr, options(nostack));
        asm!("fnstsw ax", out("ax") fsw, options(nomem, nostack));
        asm!("fnstcw [{m}]", m = in(reg) &mut cw, options(nostack));
        fcw = cw;
        asm!("mov {}, dr0", out(reg) dr0, options(nomem, nostack));
        asm!("mov {}, dr3", out(reg) dr3, options(nomem, nostack));
        asm!("mov {}, dr6", out(reg) dr6, options(nomem, nostack));
        asm!("mov {}, dr7", out(reg) dr7, options(nomem, nostack));
    }
    check("XMM0", xmm0, 0)?;
    check("XMM7", xmm7, 0)?;
    check("MXCSR", mxcsr.into(), 0x1F80)?;
    check("x87 stack top (FSW 13:11)", ((fsw >> 11) & 7).into(), 0)?;
    check("x87 control word", fcw.into(), 0x37F)?;
    check("DR0", dr0, 0)?;
    check("DR3", dr3, 0)?;
    check("DR6", dr6 & 0xFFFF_FFFF, 0xFFFF_0FF0)?;
    check("DR7", dr7, 0x400)?;
    for m in [
        0xC000_0081u32,
        0xC000_0082,
        0xC000_0083,
        0xC000_0084,
        0xC000_0102,
    ] {
        if idt::rdmsr(m) != 0 {
            say!("guest: MSR {m:#x} = {:#x}", idt::rdmsr(m));
            return Err("an MSR kept the previous VM's value");
        }
    }
    say!("guest: x87, SSE, MXCSR, debug registers and SYSCALL/GS MSRs are at reset values");
    Ok(())
}

/// Memory-map hypercalls forever (each one prints the whole map): only the
/// time budget can end it, which proves Tern charges the VM for the time
/// it spends on its exits.
pub fn hypercall_flood() -> R {
    say!("guest: memory-map hypercalls forever");
    loop {
        io::vmcall(2, 0);
    }
}

/// CR writes Tern must refuse with #GP (SDM, MOV to CR0/CR8): each write
/// also flips CR0.NE, so that it exits to Tern instead of being checked by
/// the CPU.
pub fn control_registers() -> R {
    idt::init();
    let cr0: u64;
    // SAFETY: reads CR0.
    unsafe { asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack)) };
    let ne = 1u64 << 5;
    let nw = 1u64 << 29;
    let cd = 1u64 << 30;
    let try_cr0 = |v: u64| {
        // SAFETY: a faulting write is skipped by the #GP stub (3 bytes:
        // `mov cr0, rax` is 0F 22 C0); a write that succeeded would fail
        // the check that follows it.
        unsafe { asm!("mov cr0, rax", in("rax") v, options(nomem, nostack)) }
    };
    idt::set_gp_skip(3);
    try_cr0(((cr0 ^ ne) | nw) & !cd); // NW without CD
    check("#GP for NW without CD", idt::count(13), 1)?;
    try_cr0((cr0 ^ ne) | (1 << 32)); // a reserved bit
    check("#GP for CR0 bits 63:32", idt::count(13), 2)?;
    try_cr0((cr0 ^ ne) & !(1 << 31)); // paging off in 64-bit code
    check("#GP for clearing PG in 64-bit mode", idt::count(13), 3)?;
    // CR8 bits 63:4 are reserved (`mov cr8, rax` is 44 0F 22 C0).
    idt::set_gp_skip(4);
    // SAFETY: a faulting write is skipped by the #GP stub.
    unsafe { asm!("mov cr8, rax", in("rax") 0x10u64, options(nomem, nostack)) };
    check("#GP for CR8 reserved bits", idt::count(13), 4)?;
    let cr8: u64;
    // SAFETY: a valid TPR write, then read back.
    unsafe {
        asm!("mov cr8, rax", in("rax") 0x5u64, options(nomem, nostack));
        asm!("mov {}, cr8", out(reg) cr8, options(nomem, nostack));
    }
    check("CR8 reads back the TPR", cr8, 5)?;
    check(
        "TPR through the xAPIC page",
        u64::from(apic_read(0x80)),
        0x50,
    )?;
    // SAFETY: TPR back to 0.
    unsafe { asm!("mov cr8, rax", in("rax") 0u64, options(nomem, nostack)) };
    // XSETBV with XSAVE hidden: CR4.OSXSAVE cannot be set, so #UD.
    idt::set_gp_skip(3);
    let before = idt::count(6);
    // SAFETY: the #UD is counted and skipped by the stub (0F 01 D1).
    unsafe {
        asm!("xsetbv", in("ecx") 0u32, in("eax") 1u32, in("edx") 0u32, options(nomem, nostack))
    };
    check("#UD for XSETBV without OSXSAVE", idt::count(6) - before, 1)?;
    let (old_cr4, cr4): (u64, u64);
    // SAFETY: reads CR4; the write setting OSXSAVE faults and is skipped
    // (0F 22 E0), then CR4 is read again.
    unsafe {
        asm!("mov {}, cr4", out(reg) old_cr4, options(nomem, nostack));
        asm!("mov cr4, rax", in("rax") old_cr4 | (1 << 18), options(nomem, nostack));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack));
    }
    check("#GP for setting CR4.OSXSAVE", idt::count(13), 5)?;
    check("CR4.OSXSAVE after the refused write", cr4 & (1 << 18), 0)?;
    // RDPMC with CR4.PCE set: no PMU is offered, so #GP (0F 33).
    idt::set_gp_skip(2);
    // SAFETY: sets CR4.PCE (allowed), then RDPMC faults and is skipped.
    unsafe {
        asm!("mov cr4, {}", in(reg) cr4 | (1 << 8), options(nomem, nostack));
        asm!("rdpmc", in("ecx") 0u32, out("eax") _, out("edx") _, options(nomem, nostack));
    }
    check("#GP for RDPMC (no PMU)", idt::count(13), 6)?;
    say!("guest: CR0 and CR8 writes the SDM refuses raised #GP");
    Ok(())
}

/// Random MSR, CPUID and port accesses with interrupts off: the VM must
/// still be running afterwards (refused MSRs raise #GP, which the stub
/// skips).
pub fn fuzz(seed: u64) -> R {
    idt::init();
    idt::set_gp_skip(2);
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut msrs, mut leaves, mut ports) = (0u32, 0u32, 0u32);
    for _ in 0..1500 {
        let r = next();
        let base = [
            0u32,
            0x1B,
            0x170,
            0x200,
            0x800,
            0xC000_0080,
            0xC000_0100,
            0x4000_0000,
        ][(r % 8) as usize];
        let msr = base.wrapping_add(((r >> 8) % 0x100) as u32);
        // Leave paging (EFER) and the guest's own GS base alone: the
        // guest could not continue to report.
        if matches!(msr, 0xC000_0080 | 0xC000_0100 | 0xC000_0101) {
            continue;
        }
        if r & (1 << 40) != 0 {
            idt::wrmsr(msr, next());
        } else {
            let _ = idt::rdmsr(msr);
        }
        msrs += 1;
    }
    for _ in 0..500 {
        let r = next();
        let leaf = [0u32, 0x4000_0000, 0x8000_0000][(r % 3) as usize] + ((r >> 8) % 0x30) as u32;
        let _ = io::cpuid(leaf);
        leaves += 1;
    }
    for _ in 0..1500 {
        let r = next();
        let port = (r >> 16) as u16;
        // Not isa-debug-exit (it would end the VM) nor the console.
        if (0xF4..0xF8).contains(&port) || (0x3F8..0x400).contains(&port) {
            continue;
        }
        if r & 1 != 0 {
            io::outb(port, (r >> 32) as u8);
        } else {
            let _ = io::inb(port);
        }
        ports += 1;
    }
    say!(
        "guest: fuzz: {msrs} MSR, {leaves} CPUID and {ports} port accesses, {} #GP; still running",
        idt::count(13)
    );
    Ok(())
}

/// What the ring-3 code got back from its hypercalls.
static RING3_RESULT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);
static RING3_SAVED_RSP: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

#[repr(C, align(16))]
struct UserStack([u8; 4096]);
static mut USER_STACK: UserStack = UserStack([0; 4096]);

#[repr(C, align(8))]
struct Gdt([u64; 6]);
static GDT: Gdt = Gdt([
    0,
    0x00AF_9A00_0000_FFFF, // 0x08: kernel code, 64-bit
    0x00CF_9200_0000_FFFF, // 0x10: kernel data
    0x00CF_F200_0000_FFFF, // 0x18: user data (DPL 3)
    0x00AF_FA00_0000_FFFF, // 0x20: user code, 64-bit (DPL 3)
    0x00CF_9A30_0002_FFFF, // 0x28: 32-bit code, base 0x300002 (EIP wrap)
]);

fn gdt_ptr() -> [u16; 5] {
    let b = &GDT as *const Gdt as u64;
    [
        47,
        b as u16,
        (b >> 16) as u16,
        (b >> 32) as u16,
        (b >> 48) as u16,
    ]
}

/// Hypercalls from ring 3: ping, print the memory map and exit (status 7)
/// must all fail (`u64::MAX`) and do nothing; the ring-3 code then comes
/// back with SYSCALL.
pub fn ring3_hypercalls() -> R {
    // User access to the first GiB: the U/S bit in PML4[0], PDPT[0] and
    // the 512 PDEs of the boot page tables (identity map, 2 MiB pages).
    let cr3: u64;
    // SAFETY: reads CR3.
    unsafe { asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let base = cr3 & !0xFFF;
    for (table, entries) in [(base, 1u64), (base + 0x1000, 1), (base + 0x2000, 512)] {
        for i in 0..entries {
            let e = (table + 8 * i) as *mut u64;
            // SAFETY: the boot page tables are guest RAM identity mapped;
            // setting U/S only widens who may access the same pages.
            unsafe { e.write_volatile(e.read_volatile() | 4) };
        }
    }
    // SAFETY: reloading CR3 with its own value flushes the old entries.
    unsafe { asm!("mov cr3, {}", in(reg) cr3, options(nostack)) };
    let gdt_ptr: [u16; 5] = {
        let b = &GDT as *const Gdt as u64;
        [
            39,
            b as u16,
            (b >> 16) as u16,
            (b >> 32) as u16,
            (b >> 48) as u16,
        ]
    };
    let stack_top = core::ptr::addr_of_mut!(USER_STACK) as u64 + 4096;
    // SYSCALL: EFER.SCE, LSTAR = the return label, STAR[47:32] = 0x08
    // (CS 0x08, SS 0x10 on SYSCALL).
    idt::wrmsr(0xC000_0080, idt::rdmsr(0xC000_0080) | 1);
    idt::wrmsr(0xC000_0081, 0x08u64 << 32);
    // SAFETY: the new GDT keeps 0x08/0x10 as they were; IRETQ enters ring
    // 3 with interrupts off on a user stack; the ring-3 code only makes
    // hypercalls, stores their result and returns with SYSCALL to label
    // 3, which restores the saved kernel stack. RCX and R11 are clobbered
    // by SYSCALL; RBX (an argument of the hypercalls, reserved by LLVM)
    // is kept in R12.
    unsafe {
        asm!(
            "mov r12, rbx",
            "lgdt [{gdt}]",
            "lea rax, [rip + 3f]",
            "mov ecx, 0xC0000082",
            "mov rdx, rax",
            "shr rdx, 32",
            "wrmsr",
            "mov [rip + {saved}], rsp",
            "push 0x1b",
            "push {stack}",
            "push 0x2",
            "push 0x23",
            "lea rax, [rip + 2f]",
            "push rax",
            "iretq",
            "2:",
            "mov rax, 0",
            "vmcall",
            "mov rdi, rax",
            "mov rax, 2",
            "vmcall",
            "and rdi, rax",
            "mov rax, 1",
            "mov rbx, 7",
            "vmcall",
            "and rdi, rax",
            "mov [rip + {result}], rdi",
            "syscall",
            "3:",
            "mov rsp, [rip + {saved}]",
            "mov ax, 0x10",
            "mov ds, ax",
            "mov es, ax",
            "mov rbx, r12",
            gdt = in(reg) &gdt_ptr,
            stack = in(reg) stack_top,
            saved = sym RING3_SAVED_RSP,
            result = sym RING3_RESULT,
            out("rax") _, out("rcx") _, out("rdx") _, out("rdi") _, out("r11") _,
            out("r12") _,
        );
    }
    let r = RING3_RESULT.load(core::sync::atomic::Ordering::SeqCst);
    check("ring-3 hypercall results (ANDed)", r, u64::MAX)?;
    say!("guest: hypercalls from ring 3 returned u64::MAX and did nothing");
    Ok(())
}

/// CPUID at EIP 0xFFFFFFFE in 32-bit code: Tern skips the instruction and
/// EIP must wrap to 0 (a RIP of 2^32 would fail the next VM entry). The
/// code segment's base is 0x300002, so EIP 0xFFFFFFFE is linear 0x300000
/// (CPUID) and EIP 0 is linear 0x300002 (a far return to 64-bit code).
pub fn eip_wrap() -> R {
    let code = 0x30_0000 as *mut [u8; 3];
    // SAFETY: guest RAM at 3 MiB, unused by the image: CPUID; RETF.
    unsafe { code.write_volatile([0x0F, 0xA2, 0xCB]) };
    let gdt_ptr = gdt_ptr();
    // SAFETY: the new GDT keeps 0x08/0x10; LRETQ enters the 32-bit segment
    // 0x28 at EIP 0xFFFFFFFE, its RETF pops the 32-bit frame pushed first
    // (EIP of label 2, CS 0x08) and comes back here in 64-bit mode. RBX
    // (CPUID's output, reserved by LLVM) is kept in R12.
    unsafe {
        asm!(
            "mov r12, rbx",
            "lgdt [{gdt}]",
            "lea rax, [rip + 2f]",
            "mov rdx, 0x08",
            "shl rdx, 32",
            "or rax, rdx",
            "push rax",
            "push 0x28",
            "mov rax, 0xFFFFFFFE",
            "push rax",
            "retfq",
            "2:",
            "mov rbx, r12",
            gdt = in(reg) &gdt_ptr,
            out("rax") _, out("rcx") _, out("rdx") _, out("r12") _,
        );
    }
    say!("guest: CPUID at EIP 0xFFFFFFFE returned; EIP wrapped to 0");
    Ok(())
}
