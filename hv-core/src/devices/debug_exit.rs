//! isa-debug-exit (QEMU's convention): a write of `value` stops the VM with
//! status `value`.

use super::pio::{PioDevice, PioOutcome};

/// The debug-exit port device.
#[derive(Clone, Copy, Debug, Default)]
pub struct DebugExit;

impl PioDevice for DebugExit {
    fn read(&mut self, _offset: u16, _size: u8) -> u32 {
        0
    }
    fn write(&mut self, _offset: u16, _size: u8, value: u32) -> PioOutcome {
        PioOutcome::Exit(value)
    }
    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}
