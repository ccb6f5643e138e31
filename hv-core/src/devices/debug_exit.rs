//! isa-debug-exit (QEMU's convention): a write of `value` stops the VM with
//! status `value`.

use super::{Device, DeviceCtx, RegionIndex};

/// The debug-exit port device.
#[derive(Clone, Copy, Debug, Default)]
pub struct DebugExit;

impl Device for DebugExit {
    fn read(&mut self, _ctx: &mut DeviceCtx, _r: RegionIndex, _offset: u64, _size: u8) -> u64 {
        0
    }
    fn write(&mut self, ctx: &mut DeviceCtx, _r: RegionIndex, _offset: u64, _size: u8, value: u64) {
        ctx.exit(value as u32);
    }
    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}
