//! The VM's half of MMIO and string-I/O exits, independent of VMX: given
//! the decoded exit and the guest registers, find what the address is,
//! apply the ROM policy, run the instruction through the emulator against
//! the machine (RAM, ROM, devices, write notifiers first, the region-end
//! check) and leave the registers as the instruction leaves them. The
//! kernel keeps only the VMCS reads and writes around it.
//!
//! Each access the emulator makes is one [`PhysBus`] call on a
//! [`MachineBus`]; guest page walks read through the same machine's
//! current view. Exits happen outside memory transactions, so the view
//! is the committed one; device writes may still change the map, and
//! later accesses of the same instruction see the new map.

use crate::emulate::{
    self, BusError, CpuMode, EmulateError, Executed, GuestPhysRead, MmioExit, PhysBus, PortBus,
    Regs, StringIo,
};
use crate::machine::{Machine, MachineError, MemTarget};
use crate::vmx::exit::Access;
use core::cell::RefCell;

/// What guest writes to ROM do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RomWrites {
    /// Dropped, as on real hardware (the default).
    Drop,
    /// The VM is stopped with a report.
    Stop,
}

/// Why an MMIO or string-I/O exit could not be completed; the VM stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitError {
    /// The address maps to nothing.
    Unmapped { gpa: u64, access: Access },
    /// A write to ROM with [`RomWrites::Stop`].
    RomWrite { gpa: u64 },
    /// RAM in a page EPT could not map whole (a range that starts or ends
    /// inside a page): not emulated.
    PartialPage { gpa: u64 },
    /// The access crosses the end of its device region.
    CrossesRegion { gpa: u64, size: u8 },
    /// The instruction could not be emulated.
    Emulate(EmulateError),
    /// The memory map failed.
    Machine(MachineError),
}

impl core::fmt::Display for ExitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Unmapped { gpa, access } => {
                write!(f, "guest {} at unmapped GPA {gpa:#x}", access.name())
            }
            Self::RomWrite { gpa } => write!(f, "guest write to ROM at GPA {gpa:#x}"),
            Self::PartialPage { gpa } => write!(
                f,
                "GPA {gpa:#x} is RAM in a partial page, which Tern does not emulate"
            ),
            Self::CrossesRegion { gpa, size } => write!(
                f,
                "a {size}-byte access at GPA {gpa:#x} crosses the end of its region"
            ),
            Self::Emulate(e) => write!(f, "cannot emulate the access: {e}"),
            Self::Machine(e) => write!(f, "memory map error: {e}"),
        }
    }
}

/// What a completed exit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitDone {
    pub executed: Executed,
    /// ROM writes dropped.
    pub rom_writes_dropped: u64,
    /// Writes taken by write notifiers.
    pub notified: u64,
    /// A device asked the VM to stop with this status.
    pub exit_status: Option<u32>,
}

/// The machine as the emulator's bus for one exit.
pub struct MachineBus<'m> {
    m: &'m mut Machine,
    rom_writes: RomWrites,
    done: ExitDone,
    /// The first error that is not a plain bus failure.
    error: Option<ExitError>,
}

impl<'m> MachineBus<'m> {
    fn new(m: &'m mut Machine, rom_writes: RomWrites, mnemonic: emulate::Mnemonic) -> Self {
        Self {
            m,
            rom_writes,
            done: ExitDone {
                executed: Executed {
                    mnemonic,
                    mem_accesses: 0,
                    port_accesses: 0,
                    iterations: 0,
                    rip_advanced: false,
                },
                rom_writes_dropped: 0,
                notified: 0,
                exit_status: None,
            },
            error: None,
        }
    }

    fn fail(&mut self, e: ExitError, gpa: u64, reason: &'static str) -> BusError {
        self.error.get_or_insert(e);
        BusError { gpa, reason }
    }

    fn machine_err(&mut self, e: MachineError, gpa: u64) -> BusError {
        self.fail(ExitError::Machine(e), gpa, "memory map error")
    }

    fn note_exit(&mut self, s: Option<u32>) {
        if let Some(s) = s {
            self.done.exit_status.get_or_insert(s);
        }
    }

    fn ram(&mut self, gpa: u64, size: u8, write: Option<u64>) -> Result<u64, BusError> {
        let n = usize::from(size.min(8));
        let mut mem = match self.m.guest_memory() {
            Ok(g) => g,
            Err(e) => return Err(self.machine_err(e, gpa)),
        };
        let mut b = [0u8; 8];
        let r = match write {
            Some(v) => {
                b = v.to_le_bytes();
                mem.write(gpa, &b[..n])
            }
            None => mem.read(gpa, &mut b[..n]),
        };
        r.map_err(|_| BusError {
            gpa,
            reason: "guest memory access failed",
        })?;
        Ok(u64::from_le_bytes(b))
    }

    fn access(&mut self, gpa: u64, size: u8, write: Option<u64>) -> Result<u64, BusError> {
        let target = match self.m.memory_target(gpa) {
            Ok(t) => t,
            Err(e) => return Err(self.machine_err(e, gpa)),
        };
        match target {
            MemTarget::Unmapped => {
                let access = if write.is_some() {
                    Access::Write
                } else {
                    Access::Read
                };
                Err(self.fail(ExitError::Unmapped { gpa, access }, gpa, "unmapped"))
            }
            MemTarget::Ram { readonly: true, .. } if write.is_some() => {
                if self.rom_writes == RomWrites::Stop {
                    return Err(self.fail(ExitError::RomWrite { gpa }, gpa, "ROM write"));
                }
                self.done.rom_writes_dropped += 1;
                Ok(0)
            }
            MemTarget::Ram { .. } => self.ram(gpa, size, write),
            MemTarget::Device {
                handle,
                offset,
                left,
            } => {
                if let Some(v) = write {
                    match self.m.notify_write(gpa, size, v) {
                        Ok(Some(_)) => {
                            self.done.notified += 1;
                            let s = self.m.take_exit();
                            self.note_exit(s);
                            return Ok(0);
                        }
                        Ok(None) => {}
                        Err(e) => return Err(self.machine_err(e, gpa)),
                    }
                }
                if u64::from(size) > left {
                    return Err(self.fail(
                        ExitError::CrossesRegion { gpa, size },
                        gpa,
                        "crosses the end of its region",
                    ));
                }
                match write {
                    Some(v) => match self.m.device_write(handle, offset, size, v) {
                        Ok(s) => {
                            self.note_exit(s);
                            Ok(0)
                        }
                        Err(e) => Err(self.machine_err(e, gpa)),
                    },
                    None => match self.m.device_read(handle, offset, size) {
                        Ok(v) => {
                            let s = self.m.take_exit();
                            self.note_exit(s);
                            Ok(v)
                        }
                        Err(e) => Err(self.machine_err(e, gpa)),
                    },
                }
            }
        }
    }
}

/// Shares one [`MachineBus`] between the page walk (`&self`) and the data
/// accesses (`&mut`); the emulator never overlaps the two.
struct Shared<'m>(RefCell<MachineBus<'m>>);

impl GuestPhysRead for Shared<'_> {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ()> {
        let mut b = self.0.borrow_mut();
        let mem = b.m.guest_memory().map_err(|_| ())?;
        mem.read(gpa, buf).map_err(|_| ())
    }
}

impl PhysBus for &Shared<'_> {
    fn read(&mut self, gpa: u64, size: u8) -> Result<u64, BusError> {
        self.0.borrow_mut().access(gpa, size, None)
    }
    fn write(&mut self, gpa: u64, size: u8, value: u64) -> Result<(), BusError> {
        self.0
            .borrow_mut()
            .access(gpa, size, Some(value))
            .map(|_| ())
    }
}

impl PortBus for &Shared<'_> {
    fn read(&mut self, port: u16, size: u8) -> u64 {
        let mut b = self.0.borrow_mut();
        match b.m.pio_read(port, size) {
            Ok(v) => v,
            Err(e) => {
                b.error.get_or_insert(ExitError::Machine(e));
                crate::devices::all_ones(size)
            }
        }
    }
    fn write(&mut self, port: u16, size: u8, value: u64) -> Result<(), BusError> {
        let mut b = self.0.borrow_mut();
        match b.m.pio_write(port, size, value) {
            Ok(s) => {
                b.note_exit(s);
                Ok(())
            }
            Err(e) => Err(b.machine_err(e, port.into())),
        }
    }
}

fn finish(bus: Shared, r: Result<Executed, EmulateError>) -> Result<ExitDone, ExitError> {
    let b = bus.0.into_inner();
    match (r, b.error) {
        // A bus failure the bus explained (unmapped, ROM, region end).
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(ExitError::Emulate(e)),
        (Ok(executed), None) => Ok(ExitDone { executed, ..b.done }),
        (Ok(_), Some(e)) => Err(e),
    }
}

/// What a plain `in`/`out` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortDone {
    /// RAX after the instruction: an `in` merges the value into its low
    /// bytes (`in al`/`in ax` keep the rest, `in eax` zero-extends).
    pub rax: u64,
    /// A device asked the VM to stop with this status.
    pub exit_status: Option<u32>,
}

/// A plain (not string) `in` or `out` of `size` bytes; for `out`, the value
/// is RAX's low bytes.
pub fn port_io(
    m: &mut Machine,
    port: u16,
    size: u8,
    write: bool,
    rax: u64,
) -> Result<PortDone, ExitError> {
    let mask = crate::devices::all_ones(size.min(4));
    if write {
        let exit_status = m
            .pio_write(port, size, rax & mask)
            .map_err(ExitError::Machine)?;
        return Ok(PortDone { rax, exit_status });
    }
    let v = m.pio_read(port, size).map_err(ExitError::Machine)? & mask;
    let rax = match size {
        1 | 2 => (rax & !mask) | v,
        _ => v,
    };
    let exit_status = m.take_exit();
    Ok(PortDone { rax, exit_status })
}

/// An EPT violation on `exit.gpa`: checks the target, then emulates the
/// instruction at `regs.rip` against the machine.
pub fn mmio(
    m: &mut Machine,
    mode: &CpuMode,
    regs: &mut Regs,
    exit: &MmioExit,
    rom_writes: RomWrites,
) -> Result<ExitDone, ExitError> {
    let gpa = exit.gpa;
    let write = exit.kind == emulate::AccessKind::Write;
    let access = if write { Access::Write } else { Access::Read };
    match m.memory_target(gpa).map_err(ExitError::Machine)? {
        MemTarget::Unmapped => return Err(ExitError::Unmapped { gpa, access }),
        MemTarget::Ram { readonly: true, .. } if write && rom_writes == RomWrites::Stop => {
            return Err(ExitError::RomWrite { gpa })
        }
        // Readable RAM or writable RAM that faulted: EPT maps it unless the
        // page is only partly RAM.
        MemTarget::Ram { readonly, .. } if !(readonly && write) => {
            return Err(ExitError::PartialPage { gpa })
        }
        _ => {}
    }
    let bus = Shared(RefCell::new(MachineBus::new(
        m,
        rom_writes,
        emulate::Mnemonic::INVALID,
    )));
    let r = emulate::execute(mode, &bus, &mut &bus, regs, exit);
    finish(bus, r)
}

/// A string or REP `ins`/`outs`.
pub fn string_io(
    m: &mut Machine,
    mode: &CpuMode,
    regs: &mut Regs,
    io: &StringIo,
    rom_writes: RomWrites,
) -> Result<ExitDone, ExitError> {
    let bus = Shared(RefCell::new(MachineBus::new(
        m,
        rom_writes,
        emulate::Mnemonic::INVALID,
    )));
    let r = emulate::string_io(mode, &bus, &mut &bus, &mut &bus, regs, io);
    finish(bus, r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::HostPhysAddr;
    use crate::devices::test_device::TestDevice;
    use crate::devices::uart::Uart16550;
    use crate::ept_listener::RamBlock;
    use crate::machine::{BIOS_SIZE, TEST_DEVICE_BASE};
    use crate::phys::mock::MockPhys;

    const RAM: u64 = 4 << 20;
    const CODE: u64 = 0x1000;

    /// A PC with RAM in a mock host memory, the test device, a UART and
    /// debug-exit; `code` at guest 0x1000.
    fn machine(code: &[u8]) -> Machine {
        let mut m = crate::machine::tests::pc(RAM, 3 << 30);
        let pci = m.regions.pci;
        let r = m
            .map_mmio(
                "tern-test",
                pci,
                TEST_DEVICE_BASE,
                0x1000,
                Box::new(TestDevice::default()),
            )
            .unwrap();
        m.add_write_notifier(r, 0x20, 4, None, 5).unwrap();
        let phys = MockPhys::new(8 << 20);
        let blocks = vec![
            RamBlock {
                hpa: HostPhysAddr::new(0x10_0000),
                size: RAM,
            },
            RamBlock {
                hpa: HostPhysAddr::new(0x60_0000),
                size: BIOS_SIZE,
            },
        ];
        m.attach_ram(blocks, Box::new(phys));
        m.guest_memory().unwrap().write(CODE, code).unwrap();
        m
    }

    /// 32-bit protected mode, paging off.
    fn mode() -> CpuMode {
        CpuMode {
            cr0: 0x11,
            cs_db: true,
            ..CpuMode::default()
        }
    }

    fn regs(rax: u64) -> Regs {
        let mut r = Regs {
            rip: CODE,
            rflags: 2,
            ..Regs::default()
        };
        r.gpr[Regs::RAX] = rax;
        r
    }

    fn write_exit(gpa: u64) -> MmioExit {
        MmioExit {
            gpa,
            kind: emulate::AccessKind::Write,
            linear: None,
        }
    }

    fn scratch(m: &mut Machine, off: u64) -> u64 {
        let MemTarget::Device { handle, .. } = m.memory_target(TEST_DEVICE_BASE).unwrap() else {
            panic!("no test device")
        };
        m.device_read(handle, 0x100 + off, 4).unwrap()
    }

    #[test]
    fn read_modify_write_reaches_the_device_with_flags() {
        // add dword [eax], 1
        let mut m = machine(&[0x83, 0x00, 0x01]);
        let p = TEST_DEVICE_BASE + 0x100;
        let MemTarget::Device { handle, .. } = m.memory_target(p).unwrap() else {
            panic!()
        };
        m.device_write(handle, 0x100, 4, 0xFFFF_FFFF).unwrap();
        let mut r = regs(p);
        let done = mmio(&mut m, &mode(), &mut r, &write_exit(p), RomWrites::Drop).unwrap();
        assert_eq!(scratch(&mut m, 0), 0);
        assert_eq!(r.rip, CODE + 3);
        // 0xFFFFFFFF + 1: CF, PF, AF, ZF set (bits 0, 2, 4, 6).
        assert_eq!(r.rflags & 0x8D5, 0x55);
        assert_eq!(done.executed.mem_accesses, 2, "one read, one write");
    }

    #[test]
    fn rep_stos_writes_every_element_to_the_device() {
        // rep stosb
        let mut m = machine(&[0xF3, 0xAA]);
        let p = TEST_DEVICE_BASE + 0x110;
        let mut r = regs(0x5A);
        r.gpr[Regs::RDI] = p;
        r.gpr[Regs::RCX] = 4;
        let done = mmio(&mut m, &mode(), &mut r, &write_exit(p), RomWrites::Drop).unwrap();
        assert_eq!(scratch(&mut m, 0x10), 0x5A5A_5A5A);
        assert_eq!((r.gpr[Regs::RCX], r.gpr[Regs::RDI]), (0, p + 4));
        assert!(done.executed.rip_advanced);
        assert_eq!(done.executed.mem_accesses, 4);
    }

    #[test]
    fn rom_writes_follow_the_policy_and_unmapped_is_an_error() {
        // mov [eax], eax
        let code = [0x89, 0x00];
        let rom = 0xFFFE_0100;
        let mut m = machine(&code);
        let mut r = regs(rom);
        let done = mmio(&mut m, &mode(), &mut r, &write_exit(rom), RomWrites::Drop).unwrap();
        assert_eq!(done.rom_writes_dropped, 1);
        assert_eq!(r.rip, CODE + 2);
        let mut r = regs(rom);
        assert_eq!(
            mmio(&mut m, &mode(), &mut r, &write_exit(rom), RomWrites::Stop),
            Err(ExitError::RomWrite { gpa: rom })
        );
        assert_eq!(r.rip, CODE, "nothing applied");
        let mut r = regs(0xC000_0000);
        assert_eq!(
            mmio(
                &mut m,
                &mode(),
                &mut r,
                &write_exit(0xC000_0000),
                RomWrites::Drop
            ),
            Err(ExitError::Unmapped {
                gpa: 0xC000_0000,
                access: Access::Write
            })
        );
    }

    #[test]
    fn notifier_hits_reach_notify_not_write() {
        let mut m = machine(&[0x89, 0x00]);
        let p = TEST_DEVICE_BASE + 0x20;
        let mut r = regs(p);
        let done = mmio(&mut m, &mode(), &mut r, &write_exit(p), RomWrites::Drop).unwrap();
        assert_eq!(done.notified, 1);
        let d = m.device::<TestDevice>("tern-test").unwrap();
        assert_eq!((d.notified, d.writes), (1, 0));
    }

    #[test]
    fn port_reads_merge_into_rax_and_writes_reach_devices() {
        let mut m = machine(&[]);
        // Scratch register of the UART.
        port_io(&mut m, 0x3FF, 1, true, 0xAB).unwrap();
        let r = port_io(&mut m, 0x3FF, 1, false, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(r.rax, 0x1122_3344_5566_77AB, "in al keeps the rest");
        let r = port_io(&mut m, 0x80, 2, false, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(r.rax, 0x1122_3344_5566_FFFF, "nothing there: all ones");
        let r = port_io(&mut m, 0x80, 4, false, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(r.rax, 0xFFFF_FFFF, "in eax zero-extends");
        let r = port_io(&mut m, 0xF4, 4, true, 0xDEAD_0000_0000_0003).unwrap();
        assert_eq!(r.exit_status, Some(3));
    }

    #[test]
    fn string_port_io_and_device_exits() {
        let mut m = machine(&[0xF3, 0x6E]); // rep outsb
        m.guest_memory().unwrap().write(0x2000, b"hi").unwrap();
        let mut r = regs(0);
        r.gpr[Regs::RSI] = 0x2000;
        r.gpr[Regs::RCX] = 2;
        let io = StringIo {
            port: 0x3F8,
            size: 1,
            input: false,
            rep: true,
            addr_size: 4,
            seg: 3,
            insn_len: 2,
        };
        string_io(&mut m, &mode(), &mut r, &io, RomWrites::Drop).unwrap();
        assert_eq!(
            m.device::<Uart16550>("serial").unwrap().take_output(),
            b"hi"
        );
        assert_eq!(r.rip, CODE + 2);
        // outsd to isa-debug-exit: the device's exit status comes back.
        m.guest_memory()
            .unwrap()
            .write(0x2000, &7u32.to_le_bytes())
            .unwrap();
        let mut r = regs(0);
        r.gpr[Regs::RSI] = 0x2000;
        let io = StringIo {
            port: 0xF4,
            size: 4,
            rep: false,
            insn_len: 1,
            ..io
        };
        let done = string_io(&mut m, &mode(), &mut r, &io, RomWrites::Drop).unwrap();
        assert_eq!(done.exit_status, Some(7));
    }
}
