//! isa-debug-exit (QEMU's convention): a write of `value` stops the VM with
//! status `value`.

use super::{Device, DeviceOutcome};

/// The debug-exit port device.
#[derive(Clone, Copy, Debug, Default)]
pub struct DebugExit;

impl Device for DebugExit {
    fn read(&mut self, _offset: u64, _size: u8) -> u64 {
        0
    }
    fn write(&mut self, _offset: u64, _size: u8, value: u64) -> DeviceOutcome {
        DeviceOutcome::Exit(value as u32)
    }
    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}
