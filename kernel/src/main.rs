//! Tern: the bare-metal hypervisor binary.
//!
//! Owns the CPU: boot hand-off, console, physical memory, its own page
//! tables and descriptor tables, VMX operation, the vCPU loop and the wiring
//! of device models to VMs. Policy-free logic (memory API, VMCS control
//! computation, exit decoding, device models, guest loading) lives in
//! `hv-core`; this crate only adds what needs the real machine.
#![no_std]
#![no_main]

extern crate alloc;

mod cpu;
mod exit;
mod mem;
mod serial;

use boot::{BootInfo, BootProtocol};
use exit::Status;

boot::multiboot2_header!();
boot::pvh_note!();

/// Identity-mapped physical memory reader for boot information.
struct IdentityMap;

impl boot::PhysReader for IdentityMap {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        // The boot page tables map the first 4 GiB.
        let Some(end) = addr.checked_add(buf.len() as u64) else {
            return false;
        };
        if addr == 0 || end > 1 << 32 {
            return false;
        }
        // SAFETY: the range lies in the identity-mapped first 4 GiB and is
        // only read, byte by byte, into `buf`.
        unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    }
}

#[no_mangle]
extern "C" fn tern_entry64(protocol: u32, info_addr: u32) -> ! {
    serial::init(log::LevelFilter::Info, false);
    let info = match BootProtocol::from_trampoline(protocol) {
        Some(BootProtocol::Pvh) => BootInfo::from_pvh(&IdentityMap, info_addr.into()),
        // SAFETY: EBX of a multiboot2 entry is the loader's information
        // structure, inside the identity-mapped first 4 GiB.
        Some(BootProtocol::Multiboot2) => unsafe { BootInfo::from_multiboot2(info_addr.into()) },
        Some(BootProtocol::Multiboot1) => BootInfo::from_multiboot1(&IdentityMap, info_addr.into()),
        None => Err(boot::info::BootError::UnknownProtocol(protocol)),
    };
    let info = match info {
        Ok(i) => i,
        Err(e) => {
            println!("tern: cannot use the boot information: {e}");
            exit::exit(Status::BOOT_ERROR)
        }
    };
    match info.option("exit") {
        Some("qemu") => exit::set_method(exit::Method::Qemu),
        Some("bochs") => exit::set_method(exit::Method::Bochs),
        _ => exit::set_method(exit::Method::Halt),
    }
    let level = match info.option("log") {
        Some("debug") => log::LevelFilter::Debug,
        Some("trace") => log::LevelFilter::Trace,
        Some("warn") => log::LevelFilter::Warn,
        _ => log::LevelFilter::Info,
    };
    serial::init(level, info.option("e9").is_some());
    cpu::init_tables();
    if let Err(e) = mem::init(&info) {
        println!("tern: cannot set up memory: {e:?}");
        exit::exit(Status::BOOT_ERROR)
    }
    println!(
        "tern: booted via {:?}, command line {:?}",
        info.protocol.unwrap_or(BootProtocol::Pvh),
        info.cmdline.as_str()
    );
    for m in &info.memory {
        log::debug!(
            "memory {:#012x}-{:#012x} {:?}",
            m.start,
            m.start + m.len,
            m.kind
        );
    }
    println!("tern: {} MiB of host memory free", mem::free_bytes() >> 20);
    exit::exit(Status::OK)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("tern: hypervisor panic: {info}");
    exit::exit(Status::HYPERVISOR_FAULT)
}
