//! Tern's test guest: a multiboot (v1) kernel that runs the scenario named
//! by `scenario=` on its command line, prints through its 16550 UART and
//! reports through isa-debug-exit (port 0xF4: 0 = pass, 1 = fail).
//!
//! Scenarios check what they can see and fail when it is wrong, so each of
//! them can fail:
//! - `hello`: the multiboot hand-off (magic, memory map, command line).
//! - `cpuid`: the hypervisor bit and leaf 0x40000000 set, VMX hidden.
//! - `hypercall`: VMCALL ping answers "TERN".
//! - `unmapped`: writes to a guest-physical address with no memory; Tern
//!   must stop the VM, so getting past the write is a failure.
//! - `compute`: a long loop whose result is checked against a closed form;
//!   long enough for several preemption-timer slices.
//! - `halt`: HLT with interrupts off; Tern must stop the VM.
//! - `badmsr`: reads EFER (must show long mode active), then an MSR Tern
//!   refuses: the injected #GP finds no IDT and the guest triple-faults,
//!   which Tern must report.
//! - `mmio`: every MMIO instruction form and size against the test
//!   device's scratch registers, results checked bit for bit.
//! - `rom`: the firmware ROM reads the same through both of its addresses,
//!   and writes to it change nothing.
//! - `highram`: RAM below and above 4 GiB (run with `ram=64 lowmem=32`),
//!   the multiboot memory map shows both.
//! - `remap`: the test device moves itself and enables a RAM window alias
//!   in one register write; data written through one alias reads back
//!   through the other.
//! - `notify`: writes to the test device's notify register are taken by
//!   Tern's write-notifier fast path and never reach the device.
//! - `dirty`: EPT dirty logging: pages written between two `DIRTY_LOG`
//!   hypercalls are exactly the ones reported.
//! - `spinio`: polls a port forever (one VM exit per iteration); only
//!   Tern's time budget can end it.
//! - `badmmio`: `cmpxchg` on MMIO, which Tern does not emulate; Tern must
//!   stop the VM.
//! - `apictimer`: the local APIC timer in one-shot, periodic and
//!   TSC-deadline modes, each waking a halted vCPU.
//! - `pit`: PIT interrupts through the 8259 PIC and through the I/O APIC;
//!   the port 0x61 calibration gate.
//! - `selfipi`: a fixed IPI and an NMI to self through the ICR; x2APIC mode
//!   and its self-IPI MSR.
//! - `fwcfg`: fw_cfg's signature, CPU count and RAM size (port, `rep insb`
//!   and DMA).
//! - `msrs`: the MSR table (SWAPGS with KERNEL_GS_BASE, LSTAR, MTRRs,
//!   constants, refused MSRs raising #GP, TSC and TSC_ADJUST).
//! - `rmw`: read-modify-write and string instructions on MMIO, with flags.
//! - `debugregs`: DR0 and DR7 survive exits.
//! - `hcflood`: memory-map hypercalls forever; only the time budget ends it.
//! - `ring3`: hypercalls from user mode (ping, memory map, exit) must fail
//!   and do nothing.
//! - `eipwrap`: CPUID at EIP 0xFFFFFFFE in 32-bit code; EIP must wrap.
//! - `cr`: CR0 and CR8 writes the SDM refuses raise #GP; CR8 is the TPR.
//! - `fuzz`: random MSR, CPUID and port accesses (`seed=`); the VM must
//!   still be running.
//! - `plant` then `clean` (two VMs): the first writes x87/SSE/MXCSR, debug
//!   registers and the SYSCALL/GS MSRs; the second must see reset values.
//! - `ctrlchars`: prints an ESC sequence, a bare CR and a BEL; Tern must
//!   show them escaped.
//! - `sleep`: HLT with interrupts enabled and nothing armed; Tern must stop
//!   the VM and say that nothing can wake it.
//! - `virtio` (`expect=net:NxP,blk:MxQ [bar64=high]`): PCI enumeration
//!   and BAR assignment as firmware does it, then every virtio-pci device
//!   brought up (MSI-X, every queue); block writes and reads on every
//!   queue, frames between NICs on every queue pair; counts checked
//!   against `expect=`.
//! - `virtio-hostile`: bad descriptors, addresses and indices on blk0;
//!   the device must ask for a reset and recover, the others keep working.
//! - `migrate`: pages incremented round after round across a migration
//!   Tern performs when asked (hypercall MIGRATE); checked on the target,
//!   with virtio I/O before and after when `expect=` is given.
//! - `fail`: reports failure (proves that a failing guest fails the run).
#![no_std]
#![no_main]

mod hostile;
mod hw;
mod idt;
mod io;
mod migrate;
mod mmio;
mod pci;
mod platform;
mod virtio;
mod virtio_blk;
mod virtio_net;

use mmio::{Load, Store};

use boot::{BootInfo, BootProtocol};
use core::fmt::Write;

boot::multiboot1_header!();

macro_rules! say {
    ($($t:tt)*) => { let _ = writeln!(io::Serial, $($t)*); };
}

#[no_mangle]
extern "C" fn tern_entry64(protocol: u32, info_addr: u32) -> ! {
    let info = match BootProtocol::from_trampoline(protocol) {
        Some(BootProtocol::Multiboot1) => {
            BootInfo::from_multiboot1(&boot::BootIdentityMap, info_addr.into())
        }
        _ => {
            say!("guest: not started by a multiboot loader (protocol {protocol})");
            io::exit(1)
        }
    };
    let info = match info {
        Ok(i) => i,
        Err(e) => {
            say!("guest: bad multiboot information: {e}");
            io::exit(1)
        }
    };
    let scenario = info.option("scenario").unwrap_or("hello");
    say!("guest: scenario {scenario}");
    let result = match scenario {
        "hello" => hello(&info),
        "cpuid" => cpuid(),
        "hypercall" => hypercall(),
        "unmapped" => unmapped(),
        "compute" => compute(&info),
        "fail" => Err("asked to fail"),
        "virtio" => virtio::scenario(&info),
        "virtio-hostile" => hostile::scenario(&info),
        "migrate" => migrate::scenario(&info),
        "halt" => {
            say!("guest: halting with interrupts disabled");
            io::halt();
            Err("HLT returned")
        }
        "badmsr" => badmsr(),
        "mmio" => mmio_forms(),
        "rom" => rom(),
        "highram" => highram(&info),
        "remap" => remap(),
        "notify" => notify(),
        "spinio" => {
            say!("guest: polling a port forever");
            io::spin_on_port()
        }
        "dirty" => dirty(),
        "badmmio" => {
            say!("guest: cmpxchg on MMIO");
            mmio::cmpxchg(TEST_BASE + 0x100);
            Err("cmpxchg on MMIO returned")
        }
        "apictimer" => platform::apic_timer(),
        "pit" => platform::pit_interrupts(),
        "selfipi" => platform::self_ipi(),
        "fwcfg" => platform::fw_cfg(
            info.option("expect_ram_kib")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        ),
        "msrs" => platform::msrs(),
        "rmw" => platform::rmw(TEST_BASE),
        "debugregs" => platform::debug_regs(),
        "hcflood" => platform::hypercall_flood(),
        "cr" => platform::control_registers(),
        "ring3" => platform::ring3_hypercalls(),
        "eipwrap" => platform::eip_wrap(),
        "fuzz" => platform::fuzz(
            info.option("seed")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0x5EED),
        ),
        "plant" => platform::plant(),
        "clean" => platform::clean(),
        "ctrlchars" => {
            say!("guest: \x1b[2J\rtern: exit status 0\x07 end");
            Ok(())
        }
        "sleep" => {
            say!("guest: halting with interrupts enabled and no timer armed");
            platform::sleep_forever();
            Err("HLT returned")
        }
        other => {
            say!("guest: unknown scenario {other}");
            Err("unknown scenario")
        }
    };
    match result {
        Ok(()) => {
            say!("guest: PASS {scenario}");
            io::exit(0)
        }
        Err(why) => {
            say!("guest: FAIL {scenario}: {why}");
            io::exit(1)
        }
    }
}

fn hello(info: &BootInfo) -> Result<(), &'static str> {
    say!(
        "hello from the guest; command line {:?}",
        info.cmdline.as_str()
    );
    if info.memory.is_empty() {
        return Err("no memory map");
    }
    let total: u64 = info.memory.iter().map(|r| r.len).sum();
    say!(
        "guest: {} memory ranges, {} KiB",
        info.memory.len(),
        total / 1024
    );
    let want_kib: u64 = info
        .option("expect_ram_kib")
        .and_then(|v| v.parse().ok())
        .ok_or("expect_ram_kib missing")?;
    // The map stops low memory at 640 KiB, so it covers RAM less 384 KiB.
    if total / 1024 != want_kib - 384 {
        return Err("memory map does not match the configured RAM");
    }
    Ok(())
}

fn cpuid() -> Result<(), &'static str> {
    let [_, _, ecx, _] = io::cpuid(1);
    if ecx & (1 << 31) == 0 {
        return Err("hypervisor bit clear");
    }
    if ecx & (1 << 5) != 0 {
        return Err("VMX visible to the guest");
    }
    let [max, b, c, d] = io::cpuid(0x4000_0000);
    let mut sig = [0u8; 12];
    sig[0..4].copy_from_slice(&b.to_le_bytes());
    sig[4..8].copy_from_slice(&c.to_le_bytes());
    sig[8..12].copy_from_slice(&d.to_le_bytes());
    say!(
        "guest: hypervisor leaf max {max:#x} signature {:?}",
        core::str::from_utf8(&sig).unwrap_or("?")
    );
    if &sig != b"TernTernTern" {
        return Err("wrong hypervisor signature");
    }
    Ok(())
}

fn hypercall() -> Result<(), &'static str> {
    let r = io::vmcall(0, 0);
    say!("guest: ping -> {r:#x}");
    if r != 0x5445_524E {
        return Err("ping did not answer TERN");
    }
    if io::vmcall(0xdead, 0) != u64::MAX {
        return Err("unknown hypercall did not return -1");
    }
    Ok(())
}

fn unmapped() -> Result<(), &'static str> {
    let gpa = 0xC000_0000u64;
    say!("guest: writing to unmapped GPA {gpa:#x}");
    io::write_phys_u32(gpa, 0x1234_5678);
    Err("the write to unmapped memory returned")
}

fn badmsr() -> Result<(), &'static str> {
    let efer = io::rdmsr(0xC000_0080);
    say!("guest: EFER = {efer:#x}");
    if efer & 0x500 != 0x500 {
        return Err("EFER does not show LME and LMA");
    }
    say!("guest: reading MSR 0xc0de");
    let v = io::rdmsr(0xC0DE);
    say!("guest: MSR 0xc0de = {v:#x}");
    Err("reading a refused MSR returned")
}

const TEST_BASE: u64 = 0xFEB0_0000;
const TEST_ID: u64 = 0x5445_524E;

fn check(what: &'static str, got: u64, want: u64) -> Result<(), &'static str> {
    if got == want {
        Ok(())
    } else {
        say!("guest: {what}: got {got:#x}, want {want:#x}");
        Err(what)
    }
}

fn mmio_forms() -> Result<(), &'static str> {
    let s = TEST_BASE + 0x100;
    let pre = 0x1111_1111_1111_1111;
    check(
        "ID register",
        mmio::load(TEST_BASE, Load::Plain32, pre),
        TEST_ID,
    )?;
    mmio::store(s, Store::Reg64(0x1122_3344_5566_7788));
    check(
        "mov r64 store/load",
        mmio::load(s, Load::Plain64, pre),
        0x1122_3344_5566_7788,
    )?;
    check(
        "mov al keeps the rest",
        mmio::load(s + 1, Load::Plain8, pre),
        0x1111_1111_1111_1177,
    )?;
    mmio::store(s + 8, Store::Imm8);
    check(
        "mov byte imm",
        mmio::load(s + 8, Load::Plain8, pre),
        0x1111_1111_1111_11A5,
    )?;
    mmio::store(s + 10, Store::Imm16);
    check(
        "mov word imm",
        mmio::load(s + 10, Load::Plain16, pre),
        0x1111_1111_1111_BEEF,
    )?;
    mmio::store(s + 12, Store::Imm32);
    check(
        "mov dword imm, eax zero-extends",
        mmio::load(s + 12, Load::Plain32, pre),
        0xDEAD_BEEF,
    )?;
    mmio::store(s + 16, Store::Imm64);
    check(
        "mov qword imm32 sign-extends",
        mmio::load(s + 16, Load::Plain64, pre),
        0xFFFF_FFFF_FFFF_FFFE,
    )?;
    mmio::store(s + 24, Store::Reg8(0x80));
    check(
        "movsx byte",
        mmio::load(s + 24, Load::Sx8, pre),
        0xFFFF_FFFF_FFFF_FF80,
    )?;
    check("movzx byte", mmio::load(s + 24, Load::Zx8, pre), 0x80)?;
    mmio::store(s + 26, Store::Reg16(0x8001));
    check(
        "movsx word",
        mmio::load(s + 26, Load::Sx16, pre),
        0xFFFF_FFFF_FFFF_8001,
    )?;
    check("movzx word", mmio::load(s + 26, Load::Zx16, pre), 0x8001)?;
    mmio::store(s + 28, Store::Reg32(0x8000_0002));
    check(
        "movsxd",
        mmio::load(s + 28, Load::Sx32, pre),
        0xFFFF_FFFF_8000_0002,
    )?;
    mmio::store(s + 32, Store::HighByte(0x42));
    check("mov from ah", mmio::load(s + 32, Load::Zx8, pre), 0x42)?;
    check(
        "device counted the writes",
        mmio::load(TEST_BASE + 0x10, Load::Plain64, pre),
        9,
    )?;
    say!("guest: 23 MMIO accesses checked");
    Ok(())
}

const BIOS_SIZE: u64 = 128 * 1024;

fn bios_byte(i: u64) -> u8 {
    (i.wrapping_mul(7) ^ 0x5A) as u8
}

fn rom() -> Result<(), &'static str> {
    let (high, low) = ((1u64 << 32) - BIOS_SIZE, 0xE0000u64);
    let mut i = 0;
    while i < BIOS_SIZE {
        let want = u64::from(bios_byte(i));
        check(
            "ROM at the top of 4 GiB",
            mmio::load(high + i, Load::Zx8, 0),
            want,
        )?;
        check(
            "ROM through isa-bios",
            mmio::load(low + i, Load::Zx8, 0),
            want,
        )?;
        i += 997;
    }
    mmio::store(high + 0x100, Store::Imm32);
    mmio::store(low + 0x200, Store::Reg8(0));
    check(
        "ROM after a write",
        mmio::load(high + 0x100, Load::Zx8, 0),
        u64::from(bios_byte(0x100)),
    )?;
    check(
        "isa-bios after a write",
        mmio::load(low + 0x200, Load::Zx8, 0),
        u64::from(bios_byte(0x200)),
    )?;
    say!(
        "guest: ROM checked at {} offsets, writes dropped",
        BIOS_SIZE / 997 + 1
    );
    Ok(())
}

fn highram(info: &BootInfo) -> Result<(), &'static str> {
    let above = info
        .memory
        .iter()
        .find(|r| r.start == 1 << 32)
        .ok_or("no RAM at 4 GiB in the memory map")?;
    say!("guest: {} KiB of RAM at 4 GiB", above.len / 1024);
    let spots = [
        0x10_0000 + 0x7_0000u64,
        (16 << 20) - 8,
        1 << 32,
        (1 << 32) + (8 << 20) + 8,
        (1 << 32) + above.len - 8,
    ];
    for (n, &a) in spots.iter().enumerate() {
        mmio::store(
            a,
            Store::Reg64(0xC0DE_0000_0000_0000 | (n as u64) << 32 | a),
        );
    }
    for (n, &a) in spots.iter().enumerate() {
        check(
            "RAM pattern",
            mmio::load(a, Load::Plain64, 0),
            0xC0DE_0000_0000_0000 | (n as u64) << 32 | a,
        )?;
    }
    Ok(())
}

fn remap() -> Result<(), &'static str> {
    let new_base = 0xFEB4_0000u64;
    let window = 0xC000_0000u64;
    mmio::store(0x2000, Store::Reg64(0x5555_AAAA_1234_5678));
    say!("guest: moving the test device to {new_base:#x} and enabling the RAM window");
    mmio::store(TEST_BASE + 8, Store::Reg64(new_base | 1));
    check(
        "ID at the new base",
        mmio::load(new_base, Load::Plain32, 0),
        TEST_ID,
    )?;
    check(
        "RAM through the window",
        mmio::load(window + 0x2000, Load::Plain64, 0),
        0x5555_AAAA_1234_5678,
    )?;
    mmio::store(window + 0x3000, Store::Reg64(0x0F0F_0F0F));
    check(
        "window writes reach RAM",
        mmio::load(0x3000, Load::Plain64, 0),
        0x0F0F_0F0F,
    )?;
    io::vmcall(2, 0);
    mmio::store(new_base + 8, Store::Reg64(TEST_BASE | 2));
    check(
        "ID back at the old base",
        mmio::load(TEST_BASE, Load::Plain32, 0),
        TEST_ID,
    )?;
    Ok(())
}

fn notify() -> Result<(), &'static str> {
    for i in 0..3 {
        mmio::store(TEST_BASE + 0x20, Store::Reg32(i));
    }
    check(
        "device writes after notifies",
        mmio::load(TEST_BASE + 0x10, Load::Plain64, 0),
        0,
    )?;
    mmio::store(TEST_BASE + 0x100, Store::Imm8);
    check(
        "device writes after a scratch write",
        mmio::load(TEST_BASE + 0x10, Load::Plain64, 0),
        1,
    )?;
    say!("guest: 3 notifies sent");
    Ok(())
}

fn dirty() -> Result<(), &'static str> {
    let (from, len) = (4u64 << 20, 28u64 << 20);
    let first = io::vmcall2(3, from, len);
    say!("guest: {first} dirty pages before the test (cleared)");
    for a in [8u64 << 20, (8 << 20) + 4096, 12 << 20, (20 << 20) + 100] {
        mmio::store(a, Store::Reg64(a));
    }
    let n = io::vmcall2(3, from, len);
    say!("guest: {n} dirty pages after writing to three 2 MiB pages");
    check("dirty pages", n, 3)?;
    check("dirty pages after clearing", io::vmcall2(3, from, len), 0)?;
    Ok(())
}

fn compute(info: &BootInfo) -> Result<(), &'static str> {
    let n: u64 = info
        .option("n")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000_000);
    // Sum of i^2 mod 2^64 by iteration, against the closed form.
    let mut sum = 0u64;
    let mut i = 0u64;
    while i < n {
        sum = sum.wrapping_add(core::hint::black_box(i).wrapping_mul(i));
        i += 1;
    }
    let m = u128::from(n);
    let closed = ((m - 1) * m * (2 * m - 1) / 6) as u64;
    say!("guest: sum of squares below {n} = {sum}");
    if sum != closed {
        return Err("loop result differs from the closed form");
    }
    Ok(())
}

#[panic_handler]
fn panic(p: &core::panic::PanicInfo<'_>) -> ! {
    say!("guest: panic: {p}");
    io::exit(1)
}
