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
