//! A small virtio 1.x guest driver written from the spec: configuration
//! through CF8/CFC, BARs, MSI-X, rings in guest RAM, kicks through the
//! write notifiers. Host tests drive devices with it; the benchmarks use it
//! to leave a machine as a guest's drivers leave it.
//!
//! It panics on anything unexpected: it is test code, never guest input.

use crate::machine::{Machine, MemTarget};
use crate::virtio::VIRTIO_F_VERSION_1;
use alloc::vec;
use alloc::vec::Vec;

/// `VIRTIO_F_VERSION_1` as a feature mask.
pub const V1: u64 = 1 << VIRTIO_F_VERSION_1;
/// Size of every queue the driver sets up.
pub const QSIZE: u16 = 8;
/// Bytes of guest RAM one queue's rings take (descriptors at 0, the
/// available ring at 0x400, the used ring at 0x800).
pub const RING_BYTES: u64 = 0x1000;

/// Where the driver puts BAR 4 of device `i` (BAR 1 follows at +0x8000).
pub fn bar4(i: u64) -> u64 {
    0xE000_0000 + i * 0x1_0000
}

/// Ring memory of queue `q` of device `i` in the fixed layout of
/// [`Drv::init`] (64 queues per device from 1 MiB).
pub fn ring(i: u64, q: u64) -> u64 {
    0x10_0000 + i * 0x4_0000 + q * RING_BYTES
}

/// A configuration write through CF8/CFC to function `devfn` of bus 0.
pub fn cfg_write(m: &mut Machine, devfn: u8, off: u16, size: u8, v: u64) {
    let a = (1u32 << 31) | (u32::from(devfn) << 8) | u32::from(off & 0xFC);
    m.pio_write(0xCF8, 4, a.into()).unwrap();
    m.pio_write(0xCFC + (off & 3), size, v).unwrap();
}

/// A configuration read through CF8/CFC.
pub fn cfg_read(m: &mut Machine, devfn: u8, off: u16, size: u8) -> u64 {
    let a = (1u32 << 31) | (u32::from(devfn) << 8) | u32::from(off & 0xFC);
    m.pio_write(0xCF8, 4, a.into()).unwrap();
    m.pio_read(0xCFC + (off & 3), size).unwrap()
}

/// An MMIO write as the exit path does it: a kick goes through the
/// notifier fast path first.
pub fn mmio_write(m: &mut Machine, gpa: u64, size: u8, v: u64) {
    if m.notify_write(gpa, size, v).unwrap().is_some() {
        return;
    }
    let MemTarget::Device { handle, offset, .. } = m.memory_target(gpa).unwrap() else {
        panic!("nothing at {gpa:#x}")
    };
    m.device_write(handle, offset, size, v).unwrap();
}

/// An MMIO read.
pub fn mmio_read(m: &mut Machine, gpa: u64, size: u8) -> u64 {
    let MemTarget::Device { handle, offset, .. } = m.memory_target(gpa).unwrap() else {
        panic!("nothing at {gpa:#x}")
    };
    m.device_read(handle, offset, size).unwrap()
}

/// Writes guest RAM.
pub fn ram_write(m: &mut Machine, gpa: u64, data: &[u8]) {
    m.guest_memory().unwrap().write(gpa, data).unwrap();
}

/// Reads guest RAM.
pub fn ram_read(m: &mut Machine, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0; len];
    m.guest_memory().unwrap().read(gpa, &mut b).unwrap();
    b
}

/// Driver state of one device.
pub struct Drv {
    pub devfn: u8,
    /// Guest addresses of the common configuration, notify area and device
    /// configuration.
    pub common: u64,
    pub notify: u64,
    pub device: u64,
    /// Each queue's ring memory and the driver's available index.
    pub queues: Vec<(u64, u16)>,
}

impl Drv {
    /// Firmware and driver initialisation of the function in slot `slot`
    /// as device `i` of the fixed layout ([`bar4`], [`ring`]): BARs, MSI-X
    /// (vector 0x40 + i for every entry), `features`, every queue,
    /// DRIVER_OK.
    pub fn init(m: &mut Machine, i: u64, slot: u8, features: u64, master: bool) -> Drv {
        Self::init_at(m, i, slot << 3, Some(features), master, &mut |q| ring(i, q))
    }

    /// As [`Drv::init`] for function `devfn`, with queue `q`'s rings at
    /// `rings(q)` and the features `features`, or (`None`) every feature
    /// the device offers, as Linux accepts what it knows.
    pub fn init_at(
        m: &mut Machine,
        i: u64,
        devfn: u8,
        features: Option<u64>,
        master: bool,
        rings: &mut dyn FnMut(u64) -> u64,
    ) -> Drv {
        let b4 = bar4(i);
        cfg_write(m, devfn, 0x14, 4, b4 + 0x8000);
        cfg_write(m, devfn, 0x20, 4, b4 & 0xFFFF_FFFF);
        cfg_write(m, devfn, 0x24, 4, b4 >> 32);
        cfg_write(m, devfn, 0x04, 2, if master { 6 } else { 2 });
        // MSI-X capability: enable.
        let mut cap = cfg_read(m, devfn, 0x34, 1) as u16;
        while cfg_read(m, devfn, cap, 1) != 0x11 {
            cap = cfg_read(m, devfn, cap + 1, 1) as u16;
        }
        cfg_write(m, devfn, cap + 2, 2, 0x8000);
        let table = b4 + 0x8000;
        let common = b4;
        let nq = mmio_read(m, common + 0x12, 2) as u16;
        for e in 0..=u64::from(nq) {
            mmio_write(m, table + e * 16, 4, 0xFEE0_0000);
            mmio_write(m, table + e * 16 + 8, 4, 0x40 + i);
            mmio_write(m, table + e * 16 + 12, 4, 0);
        }
        mmio_write(m, common + 0x14, 1, 0);
        mmio_write(m, common + 0x14, 1, 1 | 2);
        let features = features.unwrap_or_else(|| {
            let mut f = 0;
            for sel in 0..2u64 {
                mmio_write(m, common, 4, sel);
                f |= mmio_read(m, common + 0x04, 4) << (32 * sel);
            }
            f
        });
        mmio_write(m, common + 0x08, 4, 0);
        mmio_write(m, common + 0x0C, 4, features & 0xFFFF_FFFF);
        mmio_write(m, common + 0x08, 4, 1);
        mmio_write(m, common + 0x0C, 4, features >> 32);
        mmio_write(m, common + 0x14, 1, 1 | 2 | 8);
        assert_eq!(mmio_read(m, common + 0x14, 1) & 8, 8, "FEATURES_OK");
        mmio_write(m, common + 0x10, 2, 0);
        let mut queues = Vec::new();
        for q in 0..u64::from(nq) {
            let r = rings(q);
            ram_write(m, r, &[0; RING_BYTES as usize]);
            mmio_write(m, common + 0x16, 2, q);
            mmio_write(m, common + 0x18, 2, QSIZE.into());
            mmio_write(m, common + 0x1A, 2, q + 1);
            mmio_write(m, common + 0x20, 4, r);
            mmio_write(m, common + 0x24, 4, 0);
            mmio_write(m, common + 0x28, 4, r + 0x400);
            mmio_write(m, common + 0x2C, 4, 0);
            mmio_write(m, common + 0x30, 4, r + 0x800);
            mmio_write(m, common + 0x34, 4, 0);
            mmio_write(m, common + 0x1C, 2, 1);
            queues.push((r, 0));
        }
        mmio_write(m, common + 0x14, 1, 1 | 2 | 8 | 4);
        Drv {
            devfn,
            common,
            notify: b4 + 0x3000,
            device: b4 + 0x2000,
            queues,
        }
    }

    /// Puts a chain of `(gpa, len, device-writable)` buffers on queue `q`
    /// and kicks it.
    pub fn submit(&mut self, m: &mut Machine, q: usize, bufs: &[(u64, u32, bool)]) {
        let (r, avail) = self.queues[q];
        let head = avail % QSIZE;
        // One chain at a time uses descriptors 0..n.
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            let last = k + 1 == bufs.len();
            let flags = u16::from(!last) | if w { 2 } else { 0 };
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&((k + 1) as u16).to_le_bytes());
            ram_write(m, r + (k as u64) * 16, &d);
        }
        ram_write(m, r + 0x400 + 4 + u64::from(head) * 2, &0u16.to_le_bytes());
        let avail = avail.wrapping_add(1);
        ram_write(m, r + 0x400 + 2, &avail.to_le_bytes());
        self.queues[q].1 = avail;
        mmio_write(m, self.notify + q as u64 * 4, 2, q as u64);
    }

    /// The used ring's index and its last element (id, len).
    pub fn used(&self, m: &mut Machine, q: usize) -> (u16, u32, u32) {
        let r = self.queues[q].0 + 0x800;
        let b = ram_read(m, r, 4 + 8 * usize::from(QSIZE));
        let idx = u16::from_le_bytes([b[2], b[3]]);
        let e = 4 + 8 * usize::from(idx.wrapping_sub(1) % QSIZE);
        let id = u32::from_le_bytes(b[e..e + 4].try_into().unwrap());
        let len = u32::from_le_bytes(b[e + 4..e + 8].try_into().unwrap());
        (idx, id, len)
    }

    /// The device status register.
    pub fn status(&self, m: &mut Machine) -> u8 {
        mmio_read(m, self.common + 0x14, 1) as u8
    }
}
