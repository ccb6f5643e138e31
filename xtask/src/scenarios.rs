//! `cargo xtask test`: the host unit tests, then every bare-metal scenario,
//! each in a real emulator with a hard timeout. A scenario passes only if
//! Tern's exit status and console say what the scenario expects; on failure
//! the console is printed. Bochs (VMX) or QEMU missing is a failure, never a
//! skip.

use crate::build::{build_all, Images};
use crate::cli::{self, Parsed};
use crate::emu::{run_bochs, run_qemu, Emulator, GuestSpec, RunOutput};
use crate::migrate_run;
use std::ffi::OsString;
use std::process::Command;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Machine {
    Bochs,
    QemuTcg,
    /// Two Terns in Bochs: the first migrates its VM to a disk
    /// (`migrate=disk`), the second loads the stream and runs it on. The
    /// console is the source's, then the target's.
    BochsDiskMigration,
}

/// An extra check on a console log.
type Check = fn(&str) -> Result<(), String>;

struct Case {
    name: &'static str,
    machine: Machine,
    kernel_args: &'static str,
    guests: &'static [&'static str],
    status: u8,
    /// Lines (or parts of lines) the console must contain.
    expect: &'static [&'static str],
    /// Text the console must not contain.
    forbid: &'static [&'static str],
    /// An extra check on the console.
    check: Option<Check>,
}

/// Leaks a string into a `Case` field (a handful per run of xtask).
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Migration of the seed's three device shapes, locally and through a disk
/// to a second Tern, in each load mode: the guest's pages, disks and
/// virtio I/O are checked on the target, and the load's exact counters.
fn migration_grid() -> Vec<Case> {
    let shapes = [
        ("8x16-16x4", "net:8x16,blk:16x4", 256),
        ("8x1-16x1", "net:8x1,blk:16x1", 256),
        ("1x16-1x4", "net:1x16,blk:1x4", 512),
    ];
    let modes: [(&str, Check); 3] = [
        ("deferred", deferred_load_counters),
        ("eager", eager_load_counters),
        ("forced-read", forced_read_load_counters),
    ];
    let mut v = Vec::new();
    for (tag, shape, pages) in shapes {
        for (mode, check) in modes {
            for disk in [false, true] {
                let (vm, target, machine, transport) = if disk {
                    ("md", "md", Machine::BochsDiskMigration, "disk")
                } else {
                    ("ml", "ml'", Machine::Bochs, "local")
                };
                let how = if disk {
                    "pre-copy, to disk"
                } else {
                    "pre-copy, local"
                };
                let mut expect = vec![
                    leak(format!("[{vm}] migration ({mode}, {how}): ")),
                    leak(format!("[{target}] migration load ({mode}): ")),
                    leak(format!("[{target}] guest: migrated (1 of 1) after ")),
                    leak(format!(
                        "[{target}] guest: every disk still holds what was written before migration 1"
                    )),
                    leak(format!(
                        "[{target}] guest: virtio I/O on every queue after migration 1"
                    )),
                    leak(format!(
                        "[{target}] guest: {pages} pages follow the pattern after 1 migration(s)"
                    )),
                    leak(format!(
                        "[{target}] guest: the test device's RAM window is mapped after migration 1"
                    )),
                    leak(format!("[{target}] guest: PASS migrate")),
                ];
                if disk {
                    expect.push("[md] migrated to the disk: ");
                } else {
                    expect.push("[ml] resumed on ml'");
                }
                v.push(Case {
                    name: leak(format!("bochs-migrate-{transport}-{tag}-{mode}")),
                    machine,
                    kernel_args: leak(format!(
                        "{}migrate.commit={mode} devices={shape}",
                        if disk { "" } else { "migrate=local " }
                    )),
                    guests: Box::leak(Box::new([leak(format!(
                        "name={vm} scenario=migrate expect={shape} pages={pages}"
                    ))])),
                    status: 0,
                    expect: Box::leak(expect.into_boxed_slice()),
                    forbid: &["FAIL", "migration failed", "needs reset"],
                    check: Some(check),
                });
            }
        }
    }
    v
}

fn cases() -> Vec<Case> {
    let mut v = fixed_cases();
    v.extend(migration_grid());
    v
}

fn fixed_cases() -> Vec<Case> {
    vec![
        Case {
            name: "qemu-tcg-boot-no-vmx",
            machine: Machine::QemuTcg,
            kernel_args: "",
            guests: &["name=g scenario=hello"],
            status: 121,
            expect: &[
                "tern: booted via Pvh",
                "tern: cannot run VMs: this CPU has no VMX",
            ],
            forbid: &["[g] starting"],
            check: Some(one_line_no_vmx),
        },
        Case {
            name: "bochs-hello",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=hello scenario=hello expect_ram_kib=32768"],
            status: 0,
            expect: &[
                "tern: booted via Multiboot2",
                "[hello] guest: PASS hello",
                "host memory not returned: 0 bytes",
            ],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            // `break_vm_entry` sets a CR3-target count the CPU does not
            // support before the first entry: VMLAUNCH fails its control
            // checks, and the stop report names the instruction and its
            // VM-instruction error.
            name: "bochs-vmx-failure-named",
            machine: Machine::Bochs,
            kernel_args: "break_vm_entry",
            guests: &["name=broken scenario=hello"],
            status: 120,
            expect: &[
                "[broken] VM stopped: VMLAUNCH failed: VM-instruction error 7: VM entry with invalid control field(s)",
                "[broken] no VM exit yet: the guest never ran",
                "[broken] stopped: VMLAUNCH failed: VM-instruction error 7: VM entry with invalid control field(s) (status 120)",
                "[broken] host memory not returned: 0 bytes",
            ],
            forbid: &["PASS", "guest:"],
            check: None,
        },
        Case {
            name: "bochs-ram-size",
            machine: Machine::Bochs,
            kernel_args: "ram=64",
            guests: &["name=big scenario=hello expect_ram_kib=65536"],
            status: 0,
            expect: &["[big] guest: PASS hello", "64 MiB RAM"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-cpuid",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=cpuid scenario=cpuid"],
            status: 0,
            expect: &["[cpuid] guest: PASS cpuid", "signature \"TernTernTern\""],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-hypercall",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=hc scenario=hypercall"],
            status: 0,
            expect: &[
                "[hc] guest: ping -> 0x5445524e",
                "[hc] guest: PASS hypercall",
                "VMCALL 2",
            ],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-unmapped-write",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=wild scenario=unmapped"],
            status: 120,
            expect: &[
                "[wild] VM stopped: guest write at unmapped GPA 0xc0000000",
                "[wild] last exit: reason 48 (EPT violation)",
                "[wild] stopped: guest write at unmapped GPA 0xc0000000 (status 120)",
                "host memory not returned: 0 bytes",
            ],
            forbid: &["write to unmapped memory returned", "PASS", "hypervisor"],
            check: None,
        },
        Case {
            name: "bochs-compute-preemption",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=calc scenario=compute n=3000000"],
            status: 0,
            expect: &[
                "[calc] guest: sum of squares below 3000000 = ",
                "[calc] guest: PASS compute",
            ],
            forbid: &["FAIL"],
            check: Some(preempted_several_times),
        },
        Case {
            name: "bochs-time-budget",
            machine: Machine::Bochs,
            kernel_args: "budget=3",
            guests: &["name=slow scenario=compute n=100000000"],
            status: 120,
            expect: &[
                "[slow] VM stopped: time budget used up",
                "[slow] time budget: 3 of 3 slices used",
            ],
            forbid: &["PASS"],
            check: None,
        },
        Case {
            name: "bochs-time-budget-exiting-guest",
            machine: Machine::Bochs,
            kernel_args: "budget=3",
            guests: &["name=poll scenario=spinio"],
            status: 120,
            expect: &["[poll] guest: polling a port forever", "[poll] VM stopped: time budget used up", "[poll] time budget: 3 of 3 slices used"],
            forbid: &["PASS"],
            check: None,
        },
        Case {
            name: "bochs-guest-failure",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=bad scenario=fail"],
            status: 1,
            expect: &[
                "[bad] guest: FAIL fail: asked to fail",
                "[bad] stopped: guest exited with status 1 (status 1)",
            ],
            forbid: &["PASS"],
            check: None,
        },
        Case {
            name: "bochs-halt",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=sleepy scenario=halt"],
            status: 120,
            expect: &[
                "[sleepy] VM stopped: guest halted with interrupts disabled",
                "HLT 1",
            ],
            forbid: &["HLT returned"],
            check: None,
        },
        Case {
            name: "bochs-refused-msr",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=msr scenario=badmsr"],
            status: 120,
            expect: &[
                "[msr] guest: EFER = 0x500",
                "[msr] guest: reading MSR 0xc0de",
                "[msr] VM stopped: guest triple fault",
                "RDMSR 3",
            ],
            forbid: &["MSR 0xc0de ="],
            check: None,
        },
        Case {
            name: "qemu-tcg-hypervisor-exception",
            machine: Machine::QemuTcg,
            kernel_args: "selftest=ud2",
            guests: &["name=g scenario=hello"],
            status: 123,
            expect: &["tern: hypervisor exception 6 (invalid opcode)"],
            forbid: &["[g] starting"],
            check: None,
        },
        Case {
            name: "bochs-mmio-forms",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=mmio scenario=mmio"],
            status: 0,
            expect: &["[mmio] guest: 23 MMIO accesses checked", "[mmio] guest: PASS mmio", "23 MMIO exits", "EPT violation 23"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-rom",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=rom scenario=rom"],
            status: 0,
            expect: &["[rom] guest: PASS rom", "2 ROM writes dropped", "2 MMIO exits"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-rom-writes-stop",
            machine: Machine::Bochs,
            kernel_args: "rom_writes=stop",
            guests: &["name=rom scenario=rom"],
            status: 120,
            expect: &["[rom] VM stopped: guest write to ROM at GPA 0xfffe0100"],
            forbid: &["PASS"],
            check: None,
        },
        Case {
            name: "bochs-ram-above-4g",
            machine: Machine::Bochs,
            kernel_args: "ram=64 lowmem=32",
            guests: &["name=high scenario=highram"],
            status: 0,
            expect: &["[high] guest: 32768 KiB of RAM at 4 GiB", "[high] guest: PASS highram"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-remap",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=remap scenario=remap"],
            status: 0,
            expect: &[
                "[remap] guest: PASS remap",
                "  00000000c0000000-00000000c01fffff (prio 0, ram): pc.ram",
                "  00000000feb40000-00000000feb40fff (prio 0, i/o): tern-test",
                "2 device remaps",
                // Registration, then one update per layout write.
                "EPT: 3 updates, 3 INVEPTs, 0 rebuilds",
            ],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-remap-rebuild",
            machine: Machine::Bochs,
            kernel_args: "ept=rebuild",
            guests: &["name=remap scenario=remap"],
            status: 0,
            // Each rebuild invalidates the old tree before freeing it and the
            // new one after building it: two INVEPTs per update.
            expect: &["[remap] guest: PASS remap", "EPT: 3 updates, 6 INVEPTs, 3 rebuilds", "19 tables allocated, 13 freed"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-write-notifier",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=notify scenario=notify"],
            status: 0,
            expect: &["[notify] guest: PASS notify", "3 write-notifier hits"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-ept-dirty-log",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=dirty scenario=dirty"],
            status: 0,
            expect: &["[dirty] guest: 3 dirty pages after writing to three 2 MiB pages", "[dirty] guest: PASS dirty"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-mmio-unsupported",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=cx scenario=badmmio"],
            status: 120,
            expect: &[
                "[cx] cannot emulate the access at GPA 0xfeb00100",
                "Cmpxchg",
                "[cx] VM stopped: MMIO access at GPA 0xfeb00100 could not be emulated",
            ],
            forbid: &["cmpxchg on MMIO returned"],
            check: None,
        },
        Case {
            name: "bochs-mtree",
            machine: Machine::Bochs,
            kernel_args: "mtree",
            guests: &["name=map scenario=cpuid"],
            status: 0,
            expect: &[
                "address-space: memory",
                "    0000000000000000-ffffffffffffffff (prio -1, container): pci",
                "      00000000feb00000-00000000feb00fff (prio 0, i/o): tern-test",
                "    00000000c0000000-00000000c01fffff (prio 0, ram): alias tern-test-window @pc.ram 0000000000000000-00000000001fffff [disabled]",
                "  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios\n",
                "    00000000000e0000-00000000000fffff (prio 1, rom): alias isa-bios @pc.bios 0000000000000000-000000000001ffff",
                "  00000000000003f8-00000000000003ff (prio 0, i/o): serial",
            ],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-apic-timer",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=timer scenario=apictimer"],
            status: 0,
            expect: &[
                "[timer] guest: one-shot timer woke the halted vCPU",
                "[timer] guest: periodic timer: 5 interrupts",
                "[timer] guest: TSC-deadline timer woke the halted vCPU",
                "[timer] guest: PASS apictimer",
            ],
            forbid: &["FAIL"],
            check: Some(halted_and_woken),
        },
        Case {
            name: "bochs-pit-pic-ioapic",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=pit scenario=pit"],
            status: 0,
            expect: &[
                "[pit] guest: PIT -> PIC: 3 interrupts",
                "[pit] guest: PIT -> I/O APIC pin 2: 3 interrupts",
                "[pit] guest: PASS pit",
                "(3 through the PIC)",
            ],
            forbid: &["FAIL"],
            check: Some(halted_and_woken),
        },
        Case {
            name: "bochs-self-ipi-x2apic",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=ipi scenario=selfipi"],
            status: 0,
            expect: &["[ipi] guest: PASS selfipi"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-fw-cfg",
            machine: Machine::Bochs,
            kernel_args: "ram=48",
            guests: &["name=fw scenario=fwcfg expect_ram_kib=49152"],
            status: 0,
            expect: &["[fw] guest: fw_cfg: QEMU signature, 1 CPU, 49152 KiB, DMA works", "[fw] guest: PASS fwcfg"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-msr-table",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=msr scenario=msrs"],
            status: 0,
            expect: &["[msr] guest: PASS msrs"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-rmw-string-mmio",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=rmw scenario=rmw"],
            status: 0,
            expect: &["[rmw] guest: rep outsb reached the UART", "[rmw] guest: PASS rmw"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-debug-registers",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=dr scenario=debugregs"],
            status: 0,
            expect: &["[dr] guest: PASS debugregs"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-halt-forever",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=sleepy scenario=sleep"],
            status: 120,
            expect: &["[sleepy] VM stopped: guest halted with interrupts enabled, but no timer or device can wake it"],
            forbid: &["HLT returned"],
            check: None,
        },
        Case {
            name: "bochs-cpu-state-not-shared-between-vms",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=plant scenario=plant", "name=clean scenario=clean"],
            status: 0,
            expect: &[
                "[plant] guest: PASS plant",
                "[clean] guest: x87, SSE, MXCSR, debug registers and SYSCALL/GS MSRs are at reset values",
                "[clean] guest: PASS clean",
            ],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-malicious-elf-refused",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &[
                "@evil-zero-phentsize name=evil1",
                "@evil-overlapping name=evil2",
                "name=good scenario=hello expect_ram_kib=32768",
            ],
            status: 120,
            expect: &[
                "[evil1] cannot create the VM: cannot load the guest image: unsupported ELF: program header entries too small",
                "[evil2] cannot create the VM: cannot load the guest image: unsupported ELF: segments larger than guest RAM together",
                "[good] guest: PASS hello",
            ],
            forbid: &["FAIL"],
            check: Some(three_returned_memory),
        },
        Case {
            name: "bochs-incoming-stream-refused",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &[
                "@evil-stream-truncated name=bad1 incoming",
                "@evil-stream-foreign-blocks name=bad2 incoming",
                "name=good scenario=hello expect_ram_kib=32768",
            ],
            status: 120,
            expect: &[
                "[bad1] cannot create the VM: stream: at offset 0x",
                "[bad2] cannot create the VM: RAM blocks: the stream has [pc.ram (0x100000)], this VM [pc.ram (0x2000000), pc.bios (0x20000)]",
                "[good] guest: PASS hello",
            ],
            forbid: &["FAIL", "starting: name=bad"],
            check: Some(three_returned_memory),
        },
        Case {
            name: "bochs-hypercall-flood-budget",
            machine: Machine::Bochs,
            kernel_args: "budget=3",
            guests: &["name=flood scenario=hcflood"],
            status: 120,
            expect: &["[flood] guest: memory-map hypercalls forever", "[flood] VM stopped: time budget used up", "[flood] time budget: 3 of 3 slices used"],
            forbid: &["PASS"],
            check: None,
        },
        Case {
            name: "bochs-ring3-hypercalls-refused",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=user scenario=ring3"],
            status: 0,
            expect: &["[user] guest: hypercalls from ring 3 returned u64::MAX and did nothing", "[user] guest: PASS ring3"],
            forbid: &["FAIL", "memory map (info mtree)", "status 7"],
            check: None,
        },
        Case {
            name: "bochs-eip-wrap",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=wrap scenario=eipwrap"],
            status: 0,
            expect: &["[wrap] guest: CPUID at EIP 0xFFFFFFFE returned; EIP wrapped to 0", "[wrap] guest: PASS eipwrap"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-control-register-faults",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=cr scenario=cr"],
            status: 0,
            expect: &["[cr] guest: CR0 and CR8 writes the SDM refuses raised #GP", "[cr] guest: PASS cr"],
            forbid: &["FAIL"],
            check: None,
        },
        Case {
            name: "bochs-fuzz-then-next-vm",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=fuzz scenario=fuzz seed=12345", "name=after scenario=hello expect_ram_kib=32768"],
            status: 0,
            expect: &["; still running", "[fuzz] guest: PASS fuzz", "[after] guest: PASS hello"],
            forbid: &["FAIL", "hypervisor exception"],
            check: None,
        },
        Case {
            name: "bochs-console-control-chars",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &["name=cc scenario=ctrlchars"],
            status: 0,
            expect: &["[cc] guest: \\x1b[2J\\x0dtern: exit status 0\\x07 end", "[cc] guest: PASS ctrlchars"],
            forbid: &["\x1b", "\x07"],
            check: None,
        },
        Case {
            name: "bochs-two-vms",
            machine: Machine::Bochs,
            kernel_args: "",
            guests: &[
                "name=first scenario=cpuid",
                "name=second scenario=hello expect_ram_kib=32768",
            ],
            status: 0,
            expect: &["[first] guest: PASS cpuid", "[second] guest: PASS hello"],
            forbid: &["FAIL"],
            check: Some(both_returned_memory),
        },
        Case {
            name: "bochs-virtio-seed-8x16-16x4",
            machine: Machine::Bochs,
            kernel_args: "devices=net:8x16,blk:16x4",
            guests: &["name=seed1 scenario=virtio expect=net:8x16,blk:16x4"],
            status: 0,
            expect: &[
                "[seed1] guest: PASS virtio",
                "[seed1] 0000:00:08.0/virtio-net:",
                "[seed1] 0000:00:18.0/virtio-blk:",
                "host memory not returned: 0 bytes",
            ],
            forbid: &["FAIL", "needs reset"],
            check: Some(virtio_counters),
        },
        Case {
            name: "bochs-virtio-seed-8x1-16x1",
            machine: Machine::Bochs,
            kernel_args: "devices=net:8x1,blk:16x1",
            guests: &["name=seed2 scenario=virtio expect=net:8x1,blk:16x1"],
            status: 0,
            expect: &["[seed2] guest: PASS virtio"],
            forbid: &["FAIL", "needs reset"],
            check: Some(virtio_counters),
        },
        Case {
            name: "bochs-virtio-seed-1x16-1x4-high",
            machine: Machine::Bochs,
            kernel_args: "devices=net:1x16,blk:1x4 disk=64K",
            guests: &["name=seed3 scenario=virtio expect=net:1x16,blk:1x4 bar64=high"],
            status: 0,
            expect: &["[seed3] guest: PASS virtio", "0x1c0000000"],
            forbid: &["FAIL", "needs reset"],
            check: Some(virtio_counters),
        },
        Case {
            name: "bochs-migrate-local",
            machine: Machine::Bochs,
            kernel_args: "migrate=local",
            guests: &["name=mig scenario=migrate migrations=2"],
            status: 0,
            expect: &[
                "[mig'] guest: migrated (1 of 2) after ",
                "[mig''] guest: migrated (2 of 2) after ",
                "[mig] resumed on mig'",
                "[mig] resumed on mig''",
                "[mig''] guest: 2048 pages follow the pattern after 2 migration(s)",
                "[mig''] guest: PASS migrate",
                "[mig] host memory not returned: 0 bytes",
            ],
            forbid: &["FAIL", "migration failed"],
            check: None,
        },
        Case {
            name: "bochs-migrate-stop-and-copy",
            machine: Machine::Bochs,
            kernel_args: "migrate=local migrate.precopy=off",
            guests: &["name=sc scenario=migrate pages=1024"],
            status: 0,
            expect: &[
                "[sc] migration (deferred, stop and copy, local): ",
                "[sc'] guest: migrated (1 of 1) after 0 rounds",
                "[sc'] guest: PASS migrate",
                "[sc] host memory not returned: 0 bytes",
            ],
            forbid: &["FAIL", "migration failed"],
            check: None,
        },
        Case {
            name: "bochs-virtio-hostile",
            machine: Machine::Bochs,
            kernel_args: "devices=net:1x1,blk:2x1",
            guests: &["name=hostile scenario=virtio-hostile"],
            status: 0,
            expect: &[
                "[hostile] guest: PASS virtio-hostile",
                "[hostile] 0000:00:02.0/virtio-blk: needs reset: ",
            ],
            forbid: &["FAIL", "hypervisor fault"],
            check: None,
        },
    ]
}

/// Every virtio device reported I/O: on each device line printed at the
/// end of the VM, kicks and queue interrupts are above zero and errors are
/// zero.
fn virtio_counters(serial: &str) -> Result<(), String> {
    let lines: Vec<&str> = serial
        .lines()
        .filter(|l| l.contains("/virtio-") && l.contains(" kicks "))
        .collect();
    if lines.is_empty() {
        return Err("no per-device counters printed".into());
    }
    for l in lines {
        let counter = |name: &str| -> Result<u64, String> {
            let at = l
                .find(&format!(" {name} "))
                .ok_or_else(|| format!("no {name} in: {l}"))?;
            l[at + name.len() + 2..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("bad {name} in: {l}"))
        };
        if counter("kicks")? == 0 || counter("queue_irqs")? == 0 {
            return Err(format!("a device did no I/O: {l}"));
        }
        if counter("errors")? != 0 {
            return Err(format!("a device needed a reset: {l}"));
        }
    }
    Ok(())
}

/// The counters of the "migration load:" line: (listener commits, forced
/// commits, EPT updates, INVEPTs).
fn load_counters(serial: &str) -> Result<(u64, u64, u64, u64), String> {
    let line = serial
        .lines()
        .find(|l| l.contains("] migration load: "))
        .ok_or("no migration load line")?;
    let n = |what: &str| -> Result<u64, String> {
        let at = line
            .find(&format!(" {what}"))
            .ok_or_else(|| format!("no {what} in: {line}"))?;
        line[..at]
            .rsplit(' ')
            .next()
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| format!("bad {what} in: {line}"))
    };
    Ok((
        n("listener commits")?,
        n("forced commits")?,
        n("EPT updates")?,
        n("INVEPTs")?,
    ))
}

/// Deferred: the whole load reaches the EPT listener as one commit, no
/// read forces an early one, and EPT (the test device's RAM window comes
/// back with its state) is updated once with one INVEPT.
fn deferred_load_counters(serial: &str) -> Result<(), String> {
    match load_counters(serial)? {
        (1, 0, 1, 1) => Ok(()),
        c => Err(format!(
            "deferred load counters {c:?}, expected (1, 0, 1, 1)"
        )),
    }
}

/// Eager: every change commits on its own.
fn eager_load_counters(serial: &str) -> Result<(), String> {
    match load_counters(serial)? {
        (l, 0, _, _) if l > 1 => Ok(()),
        c => Err(format!(
            "eager load counters {c:?}: expected many listener commits"
        )),
    }
}

/// Forced-read: reads during the transaction force early commits.
fn forced_read_load_counters(serial: &str) -> Result<(), String> {
    match load_counters(serial)? {
        (l, f, _, _) if f > 0 && l > 1 => Ok(()),
        c => Err(format!(
            "forced-read counters {c:?}: expected forced commits"
        )),
    }
}

fn one_line_no_vmx(serial: &str) -> Result<(), String> {
    let n = serial.lines().filter(|l| l.contains("VMX")).count();
    if n == 1 {
        Ok(())
    } else {
        Err(format!(
            "the missing VMX should be reported in one line, found {n} lines naming VMX"
        ))
    }
}

fn preempted_several_times(serial: &str) -> Result<(), String> {
    let line = serial
        .lines()
        .find(|l| l.starts_with("[calc] exits:"))
        .ok_or("no exit counters for calc")?;
    let n: u64 = line
        .split(", ")
        .find_map(|p| p.strip_prefix("preemption timer "))
        .and_then(|n| n.trim().parse().ok())
        .ok_or("no preemption-timer exits counted")?;
    if n >= 2 {
        Ok(())
    } else {
        Err(format!("expected several preemption-timer exits, got {n}"))
    }
}

/// The VM halted at least once and was woken by delivered interrupts.
fn halted_and_woken(serial: &str) -> Result<(), String> {
    let line = serial
        .lines()
        .find(|l| l.contains("] interrupts: "))
        .ok_or("no interrupt summary")?;
    let num = |key: &str| -> Option<u64> {
        let i = line.find(key)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    let delivered = num(" delivered").ok_or("no delivered count")?;
    let waits = num(" HLT waits").ok_or("no HLT wait count")?;
    if delivered >= 3 && waits >= 1 {
        Ok(())
    } else {
        Err(format!("expected interrupts to wake a halted vCPU: {line}"))
    }
}

/// The two refused VMs and the good one give back all host memory.
fn three_returned_memory(serial: &str) -> Result<(), String> {
    let n = serial
        .lines()
        .filter(|l| l.ends_with("host memory not returned: 0 bytes"))
        .count();
    if n == 3 {
        Ok(())
    } else {
        Err(format!(
            "expected three VMs to give back all host memory, {n} did"
        ))
    }
}

fn both_returned_memory(serial: &str) -> Result<(), String> {
    let n = serial
        .lines()
        .filter(|l| l.ends_with("host memory not returned: 0 bytes"))
        .count();
    if n == 2 {
        Ok(())
    } else {
        Err(format!(
            "expected both VMs to give back all host memory, {n} did"
        ))
    }
}

fn judge(case: &Case, out: &RunOutput) -> Result<(), String> {
    if out.timed_out {
        return Err("hard timeout".into());
    }
    match out.tern_status {
        Some(s) if s == case.status => {}
        Some(s) => return Err(format!("Tern exit status {s}, expected {}", case.status)),
        None => return Err("Tern never printed its exit status".into()),
    }
    for e in case.expect {
        if !out.serial.contains(e) {
            return Err(format!("console lacks {e:?}"));
        }
    }
    for f in case.forbid {
        if out.serial.contains(f) {
            return Err(format!("console contains {f:?}"));
        }
    }
    if let Some(check) = case.check {
        check(&out.serial)?;
    }
    Ok(())
}

/// Multiboot ELF32 images that contradict the format, for the loader's
/// scenario: `zero-phentsize` (65,535 program headers of size 0: the same
/// 30 MiB segment again and again) and `overlapping` (two 30 MiB segments
/// at the same address, more than guest RAM together).
fn evil_image(kind: &str) -> Result<std::path::PathBuf, String> {
    if let Some(stream) = kind.strip_prefix("stream-") {
        return bad_stream(stream);
    }
    let mut f = vec![0u8; 0x200];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 1;
    f[5] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&3u16.to_le_bytes());
    f[24..28].copy_from_slice(&0x10_0000u32.to_le_bytes());
    f[28..32].copy_from_slice(&52u32.to_le_bytes());
    let (phentsize, phnum) = if kind == "zero-phentsize" {
        (0u16, 0xFFFFu16)
    } else {
        (32, 2)
    };
    f[42..44].copy_from_slice(&phentsize.to_le_bytes());
    f[44..46].copy_from_slice(&phnum.to_le_bytes());
    for ph in [52usize, 84] {
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
        f[ph + 4..ph + 8].copy_from_slice(&0x100u32.to_le_bytes());
        f[ph + 12..ph + 16].copy_from_slice(&0x10_0000u32.to_le_bytes());
        f[ph + 16..ph + 20].copy_from_slice(&0x100u32.to_le_bytes());
        f[ph + 20..ph + 24].copy_from_slice(&(30u32 << 20).to_le_bytes());
    }
    // The multiboot header (flags 0) at 0x100.
    let magic = 0x1BAD_B002u32;
    f[0x100..0x104].copy_from_slice(&magic.to_le_bytes());
    f[0x108..0x10c].copy_from_slice(&0u32.wrapping_sub(magic).to_le_bytes());
    let dir = crate::root().join("target/xtask");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join(format!("evil-{kind}.elf"));
    std::fs::write(&path, f).map_err(|e| e.to_string())?;
    Ok(path)
}

/// A migration stream another Tern could not have sent, for an `incoming`
/// VM: `truncated` (ends inside the RAM setup) or `foreign-blocks` (whole,
/// but for a machine with other RAM).
fn bad_stream(kind: &str) -> Result<std::path::PathBuf, String> {
    use migration::{MemChannel, RamSection, StreamWriter};
    let mut w = StreamWriter::new(MemChannel::new(), "pc").map_err(|e| e.to_string())?;
    w.ram_setup(0, &[("pc.ram", 1 << 20)])
        .map_err(|e| e.to_string())?;
    w.ram_begin(RamSection::End).map_err(|e| e.to_string())?;
    w.ram_page("pc.ram", 0x1000, &[0xAB; 4096])
        .map_err(|e| e.to_string())?;
    w.ram_finish().map_err(|e| e.to_string())?;
    let mut bytes = w.finish(true).map_err(|e| e.to_string())?.into_bytes();
    match kind {
        "truncated" => bytes.truncate(40),
        "foreign-blocks" => {}
        other => return Err(format!("no bad stream {other:?}")),
    }
    let dir = crate::root().join("target/xtask");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let path = dir.join(format!("bad-stream-{kind}.mig"));
    std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
    Ok(path)
}

fn run_case(case: &Case, images: &Images) -> Result<RunOutput, String> {
    let mut guests: Vec<GuestSpec> = Vec::new();
    for c in case.guests {
        // `@evil-KIND ARGS` runs a generated malformed image.
        let image = match c
            .strip_prefix('@')
            .and_then(|x| x.split_whitespace().next())
        {
            Some(kind) => evil_image(kind.trim_start_matches("evil-"))?,
            None => images.guest.clone(),
        };
        let cmdline = if c.starts_with('@') {
            c.split_once(' ').map_or("", |(_, rest)| rest).to_string()
        } else {
            (*c).to_string()
        };
        guests.push(GuestSpec { image, cmdline });
    }
    let timeout = Duration::from_secs(180);
    match case.machine {
        Machine::Bochs => run_bochs(case.name, images, case.kernel_args, &guests, timeout, false),
        Machine::BochsDiskMigration => {
            let [guest] = guests.as_slice() else {
                return Err("a disk migration runs one VM".into());
            };
            let half = |name| migrate_run::Half {
                name,
                images,
                emulator: Emulator::Bochs,
                kernel_args: case.kernel_args,
                timeout,
                echo: false,
            };
            let src_name = format!("{}-src", case.name);
            let dst_name = format!("{}-dst", case.name);
            let stream = crate::root()
                .join("target/xtask")
                .join(case.name)
                .with_extension("mig");
            if let Some(d) = stream.parent() {
                std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
            }
            let src = migrate_run::save(&half(&src_name), guest, &stream)?;
            let mut dst = migrate_run::load(&half(&dst_name), &guest.cmdline, &stream)?;
            dst.serial = format!("{}\n--- target ---\n{}", src.serial, dst.serial);
            dst.wall += src.wall;
            Ok(dst)
        }
        Machine::QemuTcg => run_qemu(
            case.name,
            images,
            case.kernel_args,
            &guests,
            false,
            timeout,
            false,
        ),
    }
}

/// `cargo xtask test --help`.
pub const USAGE: &str = "\
usage: cargo xtask test [--bare-metal-only] [NAME]

Runs the host unit tests, then every bare-metal scenario: Tern in Bochs (VMX) or
QEMU TCG (boot path, no-VMX report), each with a hard timeout. A scenario passes
only if Tern's exit status and console are what it expects; a failing one prints
Tern's console.

options:
  --bare-metal-only   skip the host unit tests
  NAME                run only the scenarios whose name contains NAME (an error
                      when none does)
  -h, --help          this text
";

/// The options of `test`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestOptions {
    pub bare_metal_only: bool,
    /// Only scenarios whose name contains this.
    pub filter: Option<String>,
}

/// Parses `cargo xtask test` arguments.
pub fn parse<I>(args: I) -> Result<Parsed<TestOptions>, String>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::Arg::{Long, Short, Value};
    const CMD: &str = "test";
    let mut o = TestOptions::default();
    let mut p = cli::parser(args);
    while let Some(arg) = p.next().map_err(|e| cli::error(CMD, e))? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help(USAGE)),
            Long("bare-metal-only") => o.bare_metal_only = true,
            Value(v) => {
                let name = cli::string(CMD, Ok(v))?;
                if let Some(first) = &o.filter {
                    return Err(cli::error(
                        CMD,
                        format!("one NAME only, not {first:?} and {name:?}"),
                    ));
                }
                o.filter = Some(name);
            }
            other => return Err(cli::error(CMD, other.unexpected())),
        }
    }
    Ok(Parsed::Run(o))
}

/// A filter must match at least one scenario.
fn check_filter(filter: Option<&str>) -> Result<(), String> {
    match filter {
        Some(f) if !cases().iter().any(|c| c.name.contains(f)) => {
            Err(format!("no scenario matches {f:?}"))
        }
        _ => Ok(()),
    }
}

/// `cargo xtask test`.
pub fn test_cmd(o: &TestOptions) -> Result<(), String> {
    let bare_only = o.bare_metal_only;
    let filter = o.filter.as_ref();
    // Before the host tests: a mistyped name fails at once.
    check_filter(filter.map(String::as_str))?;
    if !bare_only {
        println!("xtask: host unit tests");
        let ok = Command::new(env!("CARGO"))
            .current_dir(crate::root())
            .args([
                "test",
                "--workspace",
                "--exclude",
                "tern-kernel",
                "--exclude",
                "tern-guest",
            ])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return Err("host unit tests failed".into());
        }
    }
    let images = build_all()?;
    let (mut passed, mut failed) = (0, 0);
    for case in cases()
        .iter()
        .filter(|c| filter.is_none_or(|f| c.name.contains(f.as_str())))
    {
        let result = run_case(case, &images);
        match result.and_then(|out| {
            judge(case, &out)
                .map(|()| out.wall)
                .map_err(|e| format!("{e}\n--- console ---\n{}", out.serial))
        }) {
            Ok(wall) => {
                passed += 1;
                println!(
                    "scenario {} ... ok ({:.1} s)",
                    case.name,
                    wall.as_secs_f64()
                );
            }
            Err(e) => {
                failed += 1;
                println!("scenario {} ... FAILED: {e}", case.name);
            }
        }
    }
    println!("bare-metal: {passed} passed, {failed} failed");
    if failed > 0 {
        return Err(format!("{failed} bare-metal scenario(s) failed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{args, err, ok};

    #[test]
    fn test_help() {
        for a in [&["-h"][..], &["--help"], &["hello", "--help"]] {
            assert_eq!(parse(args(a)), Ok(Parsed::Help(USAGE)));
        }
        assert!(USAGE.contains("--bare-metal-only"));
    }

    #[test]
    fn test_each_option() {
        assert_eq!(ok(parse(args(&[]))), TestOptions::default());
        assert_eq!(
            ok(parse(args(&["ept", "--bare-metal-only"]))),
            TestOptions {
                bare_metal_only: true,
                filter: Some("ept".into())
            }
        );
    }

    #[test]
    fn test_bad_command_lines_are_errors() {
        assert_eq!(
            err(parse(args(&["--bare-metal"]))),
            "test: invalid option '--bare-metal' (see `cargo xtask test --help`)"
        );
        assert!(err(parse(args(&["a", "b"]))).contains("one NAME only"));
        assert!(err(parse(args(&["--bare-metal-only=yes"]))).contains("unexpected argument"));
    }

    #[test]
    fn test_name_matching_no_scenario_fails() {
        let e = check_filter(Some("no-such-scenario-name")).unwrap_err();
        assert_eq!(e, "no scenario matches \"no-such-scenario-name\"");
        assert_eq!(check_filter(None), Ok(()));
        let first = cases()[0].name;
        assert_eq!(check_filter(Some(first)), Ok(()));
        // A part of a name is enough.
        assert_eq!(check_filter(Some(&first[1..])), Ok(()));
    }
}
