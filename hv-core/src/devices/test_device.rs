//! `tern-test`: a device for proving the MMIO path and run-time remapping.
//!
//! Registers (offsets in its 4 KiB region):
//! - `0x000` ID (read-only, 32 bits): `0x5445524E` ("TERN").
//! - `0x008` LAYOUT (write): bits 63:12 the new base address of this
//!   region, bit 0 enables the RAM window alias, bit 1 disables it. Both
//!   changes are applied in one memory transaction, as a chipset's PAM or a
//!   PCI BAR write would.
//! - `0x010` WRITES (read-only): number of writes to the scratch area.
//! - `0x018` NOTIFIED (read-only): write-notifier hits delivered to it.
//! - `0x100..0x200` scratch: bytes that read back what was written, at any
//!   size and alignment inside the area, so every MMIO instruction form can
//!   be checked end to end.

use super::{all_ones, Device, DeviceCtx, MemoryRequest, RegionIndex, StateError};
use crate::memory::RegionId;

/// The test device.
#[derive(Clone, Debug)]
pub struct TestDevice {
    /// The RAM window alias it toggles.
    pub window: Option<RegionId>,
    scratch: [u8; 256],
    pub writes: u64,
    /// Write-notifier hits delivered to the device.
    pub notified: u64,
    /// The layout the guest set (base, window enabled), if it set one:
    /// memory-map state the device owns and migrates.
    pub layout: Option<(u64, bool)>,
}

impl TestDevice {
    /// Asks for the memory map of `layout` (the window's state too when
    /// `window` is set).
    fn request_layout(&self, ctx: &mut DeviceCtx, window: bool) {
        let Some((base, window_on)) = self.layout else {
            return;
        };
        if let Some(region) = ctx.region(0) {
            ctx.request(MemoryRequest::Move { region, addr: base });
        }
        match self.window {
            Some(region) if window => ctx.request(MemoryRequest::Enable {
                region,
                on: window_on,
            }),
            _ => {}
        }
    }
}

/// The ID register's value.
pub const TEST_DEVICE_ID: u64 = 0x5445_524E;

impl Default for TestDevice {
    fn default() -> Self {
        Self {
            window: None,
            scratch: [0; 256],
            writes: 0,
            notified: 0,
            layout: None,
        }
    }
}

crate::vmstate! {
    /// The test device's migration section, with the memory map it owns.
    #[derive(Clone, Debug, PartialEq)]
    pub struct TestWire as "tern-test", version 2, minimum 2 {
        pub scratch: [u8; 256] [buffer],
        pub writes: u64,
        pub has_layout: bool,
        pub base: u64,
        pub window: bool,
    }
}

impl TestDevice {
    fn wire(&self) -> TestWire {
        let (base, window) = self.layout.unwrap_or((0, false));
        TestWire {
            scratch: self.scratch,
            writes: self.writes,
            has_layout: self.layout.is_some(),
            base,
            window,
        }
    }
}

impl Device for TestDevice {
    fn read(&mut self, _ctx: &mut DeviceCtx, _r: RegionIndex, offset: u64, size: u8) -> u64 {
        match offset {
            0 => TEST_DEVICE_ID & all_ones(size),
            0x10 => self.writes & all_ones(size),
            0x18 => self.notified & all_ones(size),
            0x100..0x200 => {
                let o = (offset - 0x100) as usize;
                let mut v = 0u64;
                for i in (0..usize::from(size)).rev() {
                    v = (v << 8) | u64::from(self.scratch.get(o + i).copied().unwrap_or(0xff));
                }
                v
            }
            _ => all_ones(size),
        }
    }

    fn write(&mut self, ctx: &mut DeviceCtx, _r: RegionIndex, offset: u64, size: u8, value: u64) {
        match offset {
            0x8 => {
                let window_on = match value & 3 {
                    1 => true,
                    2 => false,
                    _ => self.layout.is_some_and(|(_, on)| on),
                };
                self.layout = Some((value & !0xfff, window_on));
                self.request_layout(ctx, value & 3 != 0);
            }
            0x100..0x200 => {
                let o = (offset - 0x100) as usize;
                for i in 0..usize::from(size) {
                    if let Some(b) = self.scratch.get_mut(o + i) {
                        *b = (value >> (8 * i)) as u8;
                    }
                }
                self.writes += 1;
            }
            _ => {}
        }
    }

    fn notify(&mut self, _ctx: &mut DeviceCtx, _token: u64) {
        self.notified += 1;
    }

    fn state_version(&self) -> u32 {
        <TestWire as crate::vmstate::VmState>::VERSION
    }

    fn save_described(&self) -> Option<(alloc::vec::Vec<u8>, crate::vmstate::StructDesc)> {
        crate::vmstate::save_described(&mut self.wire()).ok()
    }

    fn load(&mut self, ctx: &mut DeviceCtx, version: u32, data: &[u8]) -> Result<(), StateError> {
        let w: TestWire = crate::vmstate::load(data, version)?;
        if w.base & 0xfff != 0 {
            return Err(StateError::Invalid("unaligned base"));
        }
        self.scratch = w.scratch;
        self.writes = w.writes;
        self.layout = w.has_layout.then_some((w.base, w.window));
        self.request_layout(ctx, true);
        Ok(())
    }

    fn duplicate(&self) -> Option<alloc::boxed::Box<dyn Device>> {
        Some(alloc::boxed::Box::new(self.clone()))
    }

    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Harness;

    #[test]
    fn scratch_reads_back_at_any_size() {
        let mut h = Harness::new();
        let mut d = TestDevice::default();
        assert_eq!(h.read(&mut d, 0, 0, 4), TEST_DEVICE_ID);
        h.write(&mut d, 0, 0x100, 8, 0x1122_3344_5566_7788);
        assert_eq!(h.read(&mut d, 0, 0x100, 1), 0x88);
        assert_eq!(h.read(&mut d, 0, 0x101, 2), 0x6677);
        assert_eq!(h.read(&mut d, 0, 0x104, 4), 0x1122_3344);
        // Straddling the end of the area reads 0xff for the missing bytes.
        assert_eq!(h.read(&mut d, 0, 0x1ff, 2), 0xff00);
        assert_eq!(d.writes, 1);
        assert_eq!(h.read(&mut d, 0, 0x10, 8), 1);
    }

    #[test]
    fn layout_requests_both_changes() {
        let mut mem = crate::memory::MemorySystem::new();
        let region = mem
            .create_mmio("tern-test", 0x1000, crate::memory::MmioHandle(0))
            .unwrap();
        let window = mem.create_container("window", 0x1000).unwrap();
        let mut h = Harness::new();
        h.regions = alloc::vec![region];
        let mut d = TestDevice {
            window: Some(window),
            ..TestDevice::default()
        };
        h.write(&mut d, 0, 0x8, 8, 0xFEB1_0001);
        h.write(&mut d, 0, 0x8, 8, 0xFEB0_0002);
        // Without a window bit only the move is asked for.
        h.write(&mut d, 0, 0x8, 8, 0xFEB2_0000);
        assert_eq!(
            h.requests,
            alloc::vec![
                MemoryRequest::Move {
                    region,
                    addr: 0xFEB1_0000
                },
                MemoryRequest::Enable {
                    region: window,
                    on: true
                },
                MemoryRequest::Move {
                    region,
                    addr: 0xFEB0_0000
                },
                MemoryRequest::Enable {
                    region: window,
                    on: false
                },
                MemoryRequest::Move {
                    region,
                    addr: 0xFEB2_0000
                },
            ]
        );
    }
}
