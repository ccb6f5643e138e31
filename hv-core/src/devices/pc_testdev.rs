//! QEMU's `pc-testdev`, the ISA device kvm-unit-tests expects beside the
//! PC (QEMU adds it with `-device pc-testdev`; Tern with the `testdev`
//! kernel argument). Its regions:
//!
//! 0. port 0xE0, 4 bytes: a 32-bit scratch register, accessed at any size
//!    and byte offset;
//! 1. port 0xE4, 4 bytes: "flush page" (QEMU re-protects a host page to
//!    force the guest's next access to fault; with EPT nothing is cached
//!    that a page flush would drop): writes are accepted, reads are 0;
//! 2. port 0xE8, 4 bytes: the same scratch register, byte by byte;
//! 3. port 0x2000, 24 bytes: interrupt lines: a write at offset *n* sets
//!    GSI *n* to `value != 0`;
//! 4. 0xFF000000, 64 KiB: "iomem", memory whose every access is an MMIO
//!    exit (it reads back what was written), for the emulator tests.

use super::{read_le, write_le, Device, DeviceCtx, RegionIndex, StateError};
use crate::irq::LineLevel;
use alloc::vec;
use alloc::vec::Vec;

/// Size of the iomem region.
pub const IOMEM_LEN: u64 = 0x1_0000;
/// Where the iomem region goes.
pub const IOMEM_BASE: u64 = 0xFF00_0000;
/// Port regions: (name, port, length), in region order 0-3.
pub const PORTS: [(&str, u16, u64); 4] = [
    ("pc-testdev-ioport", 0xE0, 4),
    ("pc-testdev-flush-page", 0xE4, 4),
    ("pc-testdev-ioport-byte", 0xE8, 4),
    ("pc-testdev-irq-line", 0x2000, 24),
];

/// The test device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PcTestdev {
    scratch: u32,
    iomem: Vec<u8>,
}

impl Default for PcTestdev {
    fn default() -> Self {
        Self {
            scratch: 0,
            iomem: vec![0; IOMEM_LEN as usize],
        }
    }
}

crate::vmstate! {
    /// pc-testdev's migration section.
    #[derive(Clone, Debug, PartialEq)]
    pub struct TestdevWire as "pc-testdev", version 2, minimum 2 {
        pub scratch: u32,
        pub iomem_len: u32,
        pub iomem: Vec<u8> [len = iomem_len, max = 65536],
    }
}

impl PcTestdev {
    fn wire(&self) -> TestdevWire {
        TestdevWire {
            scratch: self.scratch,
            iomem_len: self.iomem.len() as u32,
            iomem: self.iomem.clone(),
        }
    }
}

impl Device for PcTestdev {
    fn read(&mut self, _ctx: &mut DeviceCtx, region: RegionIndex, offset: u64, size: u8) -> u64 {
        match region {
            0 | 2 => read_le(&self.scratch.to_le_bytes(), offset, size),
            4 => read_le(&self.iomem, offset, size),
            _ => 0,
        }
    }

    fn write(
        &mut self,
        ctx: &mut DeviceCtx,
        region: RegionIndex,
        offset: u64,
        size: u8,
        value: u64,
    ) {
        match region {
            0 | 2 => {
                let mut b = self.scratch.to_le_bytes();
                write_le(&mut b, offset, size, value);
                self.scratch = u32::from_le_bytes(b);
            }
            3 if offset < 24 => {
                let level = if value != 0 {
                    LineLevel::High
                } else {
                    LineLevel::Low
                };
                ctx.set_irq(offset as u8, level);
            }
            4 => write_le(&mut self.iomem, offset, size, value),
            _ => {}
        }
    }

    fn state_version(&self) -> u32 {
        <TestdevWire as crate::vmstate::VmState>::VERSION
    }

    fn save_described(&self) -> Option<(Vec<u8>, crate::vmstate::StructDesc)> {
        crate::vmstate::save_described(&mut self.wire()).ok()
    }

    fn load(&mut self, _ctx: &mut DeviceCtx, version: u32, data: &[u8]) -> Result<(), StateError> {
        let w: TestdevWire = crate::vmstate::load(data, version)?;
        if w.iomem.len() != IOMEM_LEN as usize {
            return Err(StateError::Invalid("pc-testdev iomem size"));
        }
        (self.scratch, self.iomem) = (w.scratch, w.iomem);
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
    fn scratch_iomem_and_irq_lines() {
        let mut h = Harness::new();
        let mut d = PcTestdev::default();
        h.write(&mut d, 0, 0, 4, 0x1122_3344);
        assert_eq!(h.read(&mut d, 0, 1, 2), 0x2233);
        h.write(&mut d, 2, 3, 1, 0xAA);
        assert_eq!(
            h.read(&mut d, 0, 0, 4),
            0xAA22_3344,
            "0xE8 is the same register"
        );
        assert_eq!(h.read(&mut d, 0, 3, 4), 0xAA, "past the register reads 0");
        h.write(&mut d, 4, 0xFFFE, 4, 0xDDCC_BBAA);
        assert_eq!(h.read(&mut d, 4, 0xFFFE, 2), 0xBBAA);
        assert_eq!(h.read(&mut d, 4, 0xFFFE, 8), 0xBBAA, "clipped at the end");
        h.write(&mut d, 3, 11, 1, 1);
        h.write(&mut d, 3, 11, 1, 0);
        h.write(&mut d, 3, 24, 1, 1);
        assert_eq!(
            h.irq.lines,
            vec![(11, LineLevel::High), (11, LineLevel::Low)],
            "line 24 does not exist"
        );
        let mut saved = Vec::new();
        d.save(&mut saved);
        let mut e = PcTestdev::default();
        let ver = d.state_version();
        h.with(|c| e.load(c, ver, &saved)).unwrap();
        assert_eq!(e, d);
        assert!(h.with(|c| e.load(c, ver, &saved[1..])).is_err());
    }
}
