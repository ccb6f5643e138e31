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

mod ata;
mod cpu;
mod exit;
mod mem;
mod migrate;
mod serial;
mod vm;
mod vmx;

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use boot::{BootInfo, BootProtocol};
use exit::Status;

boot::multiboot2_header!();
boot::pvh_note!();

#[no_mangle]
extern "C" fn tern_entry64(protocol: u32, info_addr: u32) -> ! {
    serial::init(log::LevelFilter::Info, false);
    // Exceptions are reported from here on, also while parsing boot data.
    cpu::init_tables();
    let info = match BootProtocol::from_trampoline(protocol) {
        Some(BootProtocol::Pvh) => BootInfo::from_pvh(&boot::BootIdentityMap, info_addr.into()),
        // SAFETY: EBX of a multiboot2 entry is the loader's information
        // structure, inside the identity-mapped first 4 GiB.
        Some(BootProtocol::Multiboot2) => unsafe { BootInfo::from_multiboot2(info_addr.into()) },
        Some(BootProtocol::Multiboot1) => {
            BootInfo::from_multiboot1(&boot::BootIdentityMap, info_addr.into())
        }
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
    if info.option("selftest") == Some("ud2") {
        // Proves the exception path: the report and status 123.
        cpu::undefined_instruction();
    }
    if let Err(e) = mem::init(&info) {
        println!("tern: cannot set up memory: {e}");
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
    cpu::mask_legacy_pic();
    let vmx = match vmx::enable() {
        Ok(v) => v,
        Err(e) => {
            println!("tern: cannot run VMs: {e}");
            exit::exit(Status::NO_VMX)
        }
    };
    println!(
        "tern: VMX on (revision {:#x}, EPT A/D {}, 1 GiB pages {})",
        vmx.caps.revision_id(),
        vmx.caps.ept_ad_bits(),
        vmx.caps.ept_1g_pages()
    );
    if info.modules.is_empty() {
        println!("tern: no guest module was given");
        exit::exit(Status::BOOT_ERROR)
    }
    let status = run_vms(&vmx, &info);
    exit::exit(status)
}

/// Runs every boot module as a VM, one after the other; Tern's status is
/// the first non-zero VM status.
fn run_vms(vmx: &vmx::Vmx, info: &BootInfo) -> Status {
    let ram_mib: u64 = info
        .option("ram")
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let budget: u64 = info
        .option("budget")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let lowmem_mib: u64 = info
        .option("lowmem")
        .and_then(|v| v.parse().ok())
        .unwrap_or(2816);
    let tsc_hz = cpu::calibrate_tsc();
    println!("tern: TSC {} kHz", tsc_hz / 1000);
    let mut status = Status::OK;
    // A boot module with `module-for=NAME` on its line is not a VM: it is
    // a multiboot module of VM NAME (the rest of its line is its string).
    fn cmdline_of<'a>(info: &'a BootInfo, m: &'a boot::info::Module) -> &'a str {
        if m.cmdline.is_empty() {
            info.trailing_args()
        } else {
            m.cmdline.as_str()
        }
    }
    for (i, m) in info.modules.iter().enumerate() {
        let cmdline = cmdline_of(info, m);
        if boot::info::option(cmdline, "module-for").is_some() {
            continue;
        }
        // The VM's name: `name=`, else the image's file name (the first word
        // when it is a path, as test kernels' argv[0]), else vm<i>.
        let name = boot::info::option(cmdline, "name")
            .map(String::from)
            .or_else(|| {
                let first = cmdline.split_whitespace().next()?;
                let base = first.rsplit('/').next()?;
                (first.contains('/') || first.contains('.'))
                    .then(|| base.split('.').next().unwrap_or(base).into())
            })
            .unwrap_or_else(|| alloc::format!("vm{i}"));
        let module_lines: Vec<(&boot::info::Module, &str)> = info
            .modules
            .iter()
            .filter_map(|x| {
                let line = cmdline_of(info, x);
                (boot::info::option(line, "module-for") == Some(name.as_str())).then_some((x, line))
            })
            .collect();
        let mut modules = Vec::new();
        for (x, line) in &module_lines {
            match mem::module_bytes(x) {
                Some(data) => modules.push(hv_core::loader::Module {
                    data,
                    cmdline: line,
                }),
                None => println!("[{name}] a module has an empty or invalid range"),
            }
        }
        // The device set: the VM's own `devices=` or Tern's.
        let spec_text = boot::info::option(cmdline, "devices").or(info.option("devices"));
        let devices = match spec_text.map(hv_core::virtio::spec::DeviceSpec::parse) {
            None => Default::default(),
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                println!("[{name}] cannot create the VM: devices=: {e}");
                status = merge(status, Status::VM_STOPPED);
                continue;
            }
        };
        let disk = boot::info::option(cmdline, "disk").or(info.option("disk"));
        let disk_sectors = match disk.map(parse_size) {
            None => hv_core::virtio::spec::DEFAULT_DISK_SECTORS,
            Some(Some(bytes)) if bytes >= 512 => bytes / 512,
            Some(_) => {
                println!("[{name}] cannot create the VM: disk= takes a size such as 128K or 4M");
                status = merge(status, Status::VM_STOPPED);
                continue;
            }
        };
        let opt = |k: &str| boot::info::option(cmdline, k).or(info.option(k));
        let migrate = {
            let transport = match opt("migrate") {
                None => Some(None),
                Some("local") => Some(Some(migrate::Transport::Local)),
                Some("disk") => Some(Some(migrate::Transport::Disk)),
                Some(_) => None,
            };
            let mode = opt("migrate.commit").map_or(
                Some(Default::default()),
                hv_core::machine::CommitMode::parse,
            );
            let precopy = match opt("migrate.precopy") {
                None | Some("on") => Some(true),
                Some("off") => Some(false),
                Some(_) => None,
            };
            let downtime = opt("migrate.downtime")
                .map_or(Some(migrate::DEFAULT_DOWNTIME_MS), |v| {
                    v.parse::<u64>().ok().filter(|&ms| ms <= 3_600_000)
                });
            match (transport, mode, precopy, downtime) {
                (Some(transport), Some(mode), Some(precopy), Some(downtime_ms)) => {
                    migrate::MigrateConfig {
                        transport,
                        mode,
                        precopy,
                        downtime_ms,
                    }
                }
                _ => {
                    println!("[{name}] cannot create the VM: migrate= takes local or disk, migrate.commit= deferred, eager or forced-read, migrate.precopy= on or off, migrate.downtime= milliseconds");
                    status = merge(status, Status::VM_STOPPED);
                    continue;
                }
            }
        };
        let cfg = vm::VmConfig {
            name: name.clone(),
            machine: hv_core::machine::MachineConfig {
                ram_bytes: ram_mib << 20,
                lowmem: lowmem_mib << 20,
            },
            cmdline: cmdline.into(),
            budget,
            rom_writes: if info.option("rom_writes") == Some("stop") {
                vm::RomWrites::Stop
            } else {
                vm::RomWrites::Drop
            },
            ept_mode: if info.option("ept") == Some("rebuild") {
                hv_core::ept_listener::EptMode::Rebuild
            } else {
                hv_core::ept_listener::EptMode::Incremental
            },
            print_mtree: info.option("mtree").is_some(),
            tsc_hz,
            testdev: info.option("testdev").is_some(),
            break_vm_entry: info.option("break_vm_entry").is_some(),
            devices,
            disk_sectors,
            migrate,
        };
        let Some(image) = mem::module_bytes(m) else {
            println!("[{name}] module {i} has an empty or invalid range");
            status = merge(status, Status::VM_STOPPED);
            continue;
        };
        let before = mem::free_bytes();
        // VPID 0 is the host's; VM i gets i + 1.
        let vpid = u16::try_from(i + 1).unwrap_or(u16::MAX);
        // A module with `incoming` on its line is a migration stream
        // another Tern wrote: the VM is built from this Tern's configuration
        // and takes its RAM, disks, devices and vCPU from the stream.
        let created = if boot::info::option(cmdline, "incoming").is_some() {
            vm::Vm::incoming(vmx, vpid, image, &cfg).map(|(vm, r)| {
                r.print(&name);
                vm
            })
        } else {
            vm::Vm::create(vmx, vpid, image, &modules, &cfg).map_err(|e| e.to_string())
        };
        let report = match created {
            Ok(mut vm) => {
                println!("[{name}] starting: {cmdline}");
                let mut report = vm.run();
                // A migration the guest asks for: RAM is sent while the
                // guest runs (pre-copy), then the vCPU stops and the rest is
                // sent. A local target takes over with a VPID of its own
                // and the source is dropped; after a migration to the disk
                // the source stops.
                let mut generation = 0u16;
                while matches!(report.stop, hv_core::vcpu::StopReason::Migrating) {
                    if !vm.migrating() {
                        generation = generation.wrapping_add(1);
                        let target_vpid =
                            vpid.wrapping_add(generation.wrapping_mul(0x100)) | 0x4000;
                        if let Err(e) = vm.begin_migration(vmx, target_vpid) {
                            println!(
                                "[{name}] migration failed: {e}; the guest continues on the source"
                            );
                            report = vm.run();
                            continue;
                        }
                        if vm.precopy() {
                            report = vm.run();
                            continue;
                        }
                    }
                    match vm.finish_migration() {
                        Ok((Some(target), source, load)) => {
                            source.print(&name);
                            if let Some(l) = load {
                                l.print(&target.name);
                            }
                            println!("[{name}] resumed on {}", target.name);
                            vm = target;
                        }
                        Ok((None, source, _)) => {
                            source.print(&name);
                            println!(
                                "[{name}] migrated to the disk: {} bytes; the VM stops here",
                                source.stream_bytes
                            );
                            report.stop = hv_core::vcpu::StopReason::MigratedOut;
                            break;
                        }
                        Err(e) => {
                            println!(
                                "[{name}] migration failed: {e}; the guest continues on the source"
                            );
                        }
                    }
                    report = vm.run();
                }
                report
            }
            Err(e) => {
                println!("[{name}] cannot create the VM: {e}");
                let leaked = before.saturating_sub(mem::free_bytes());
                println!("[{name}] host memory not returned: {leaked} bytes");
                status = merge(status, Status::VM_STOPPED);
                continue;
            }
        };
        let leaked = before.saturating_sub(mem::free_bytes());
        println!(
            "[{name}] stopped: {} (status {})",
            report.stop,
            report.stop.status()
        );
        print!("[{name}] exits: {} total", report.exits.total());
        for (reason, n) in report
            .exits
            .by_reason
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
        {
            let r = hv_core::vmx::ExitReason::from_basic(reason as u16);
            print!(", {} {n}", r.name());
        }
        println!();
        println!(
            "[{name}] memory: {} commits, {} device remaps, {} MMIO exits, {} write-notifier hits, {} ROM writes dropped, {} unclaimed port accesses",
            report.memory_commits, report.remaps, report.mmio_exits, report.notifier_hits, report.rom_writes_dropped, report.unclaimed_io
        );
        println!(
            "[{name}] EPT: {} updates, {} INVEPTs, {} rebuilds, {} tables allocated, {} freed, {} entries written",
            report.ept_counters.updates,
            report.ept_counters.invepts,
            report.ept_counters.rebuilds,
            report.ept.tables_allocated,
            report.ept.tables_freed,
            report.ept.entries_written
        );
        println!(
            "[{name}] interrupts: {} delivered ({} through the PIC), {} PIT and {} RTC interrupts, {} APIC messages; {} HLT waits, {} ms halted",
            report.irq.delivered, report.irq.via_pic, report.irq.pit_irqs, report.irq.rtc_irqs, report.irq.apic_messages, report.halts, report.halt_wait_ms
        );
        for (id, counters) in &report.devices {
            print!("[{name}] {id}:");
            for (i, (what, n)) in counters.iter().enumerate() {
                print!("{} {what} {n}", if i == 0 { "" } else { "," });
            }
            println!();
        }
        if report.slices.1 != 0 {
            println!(
                "[{name}] time budget: {} of {} slices used",
                report.slices.0, report.slices.1
            );
        }
        println!("[{name}] host memory not returned: {leaked} bytes");
        status = merge(status, Status(report.stop.status()));
    }
    status
}

/// A size such as `4096`, `128K` or `4M`, in bytes.
fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

fn merge(a: Status, b: Status) -> Status {
    if a == Status::OK {
        b
    } else {
        a
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    serial::break_lock();
    println!("tern: hypervisor panic: {info}");
    exit::exit(Status::HYPERVISOR_FAULT)
}
