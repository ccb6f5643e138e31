//! Port I/O dispatch: devices registered on port ranges.

use alloc::boxed::Box;
use alloc::vec::Vec;

/// What a port write asks of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PioOutcome {
    /// Nothing beyond the write itself.
    Done,
    /// Stop the VM with this exit status (isa-debug-exit).
    Exit(u32),
}

/// A device on the port I/O bus. Offsets are relative to its base port.
pub trait PioDevice {
    /// Reads `size` (1, 2 or 4) bytes at `offset`.
    fn read(&mut self, offset: u16, size: u8) -> u32;
    /// Writes `size` bytes at `offset`.
    fn write(&mut self, offset: u16, size: u8, value: u32) -> PioOutcome;
    /// Downcast support for the VM that owns the device.
    fn as_any(&mut self) -> &mut dyn core::any::Any;
}

struct Slot {
    base: u16,
    len: u16,
    name: &'static str,
    dev: Box<dyn PioDevice>,
}

/// The port I/O bus of one VM.
#[derive(Default)]
pub struct PioBus {
    slots: Vec<Slot>,
    /// Accesses that hit no device (reads return all ones, writes vanish).
    pub unclaimed: u64,
}

/// Two devices claim the same port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortConflict {
    pub port: u16,
}

impl PioBus {
    /// Registers `dev` on `[base, base + len)`.
    pub fn register(
        &mut self,
        base: u16,
        len: u16,
        name: &'static str,
        dev: Box<dyn PioDevice>,
    ) -> Result<(), PortConflict> {
        let end = u32::from(base) + u32::from(len);
        if let Some(s) = self.slots.iter().find(|s| {
            u32::from(s.base) < end && u32::from(base) < u32::from(s.base) + u32::from(s.len)
        }) {
            return Err(PortConflict {
                port: s.base.max(base),
            });
        }
        self.slots.push(Slot {
            base,
            len,
            name,
            dev,
        });
        Ok(())
    }

    fn find(&mut self, port: u16) -> Option<&mut Slot> {
        self.slots
            .iter_mut()
            .find(|s| port >= s.base && u32::from(port) < u32::from(s.base) + u32::from(s.len))
    }

    /// A guest `in`: the device's value, or all ones if no device is there.
    pub fn read(&mut self, port: u16, size: u8) -> u32 {
        match self.find(port) {
            Some(s) => s.dev.read(port - s.base, size),
            None => {
                self.unclaimed += 1;
                match size {
                    1 => 0xff,
                    2 => 0xffff,
                    _ => u32::MAX,
                }
            }
        }
    }

    /// A guest `out`.
    pub fn write(&mut self, port: u16, size: u8, value: u32) -> PioOutcome {
        match self.find(port) {
            Some(s) => s.dev.write(port - s.base, size, value),
            None => {
                self.unclaimed += 1;
                PioOutcome::Done
            }
        }
    }

    /// The device registered under `name`, downcast to `T`.
    pub fn device<T: 'static>(&mut self, name: &str) -> Option<&mut T> {
        self.slots
            .iter_mut()
            .find(|s| s.name == name)?
            .dev
            .as_any()
            .downcast_mut::<T>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::debug_exit::DebugExit;
    use crate::devices::uart::Uart16550;

    #[test]
    fn dispatch_by_port_and_unclaimed_ports() {
        let mut bus = PioBus::default();
        bus.register(0x3f8, 8, "com1", Box::new(Uart16550::new()))
            .unwrap();
        bus.register(0xf4, 4, "debug-exit", Box::new(DebugExit))
            .unwrap();
        assert_eq!(
            bus.register(0x3fc, 2, "x", Box::new(DebugExit)),
            Err(PortConflict { port: 0x3fc })
        );
        assert_eq!(bus.write(0x3f8, 1, u32::from(b'h')), PioOutcome::Done);
        assert_eq!(bus.write(0xf4, 4, 7), PioOutcome::Exit(7));
        assert_eq!(bus.read(0x80, 1), 0xff);
        assert_eq!(bus.read(0x80, 2), 0xffff);
        assert_eq!(bus.unclaimed, 2);
        assert_eq!(bus.device::<Uart16550>("com1").unwrap().take_output(), b"h");
    }
}
