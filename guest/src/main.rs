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
//! - `fail`: reports failure (proves that a failing guest fails the run).
#![no_std]
#![no_main]

mod io;

use boot::{BootInfo, BootProtocol};
use core::fmt::Write;

boot::multiboot1_header!();

/// Identity-mapped reader (the boot page tables map the first 4 GiB).
struct Identity;

impl boot::PhysReader for Identity {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        io::read_phys(addr, buf)
    }
}

macro_rules! say {
    ($($t:tt)*) => { let _ = writeln!(io::Serial, $($t)*); };
}

#[no_mangle]
extern "C" fn tern_entry64(protocol: u32, info_addr: u32) -> ! {
    let info = match BootProtocol::from_trampoline(protocol) {
        Some(BootProtocol::Multiboot1) => BootInfo::from_multiboot1(&Identity, info_addr.into()),
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
        "halt" => {
            say!("guest: halting with interrupts disabled");
            io::halt();
            Err("HLT returned")
        }
        "badmsr" => badmsr(),
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
