//! QEMU's firmware configuration interface (fw_cfg), I/O-port flavour, as
//! QEMU's `docs/specs/fw_cfg.rst` describes it: the way firmware and test
//! kernels learn the machine (signature, CPU count, RAM size, files).
//!
//! Region 0 is 2 bytes at port 0x510: a 16-bit selector at offset 0, the
//! data byte at offset 1 (each read returns the next byte of the selected
//! item; past its end, 0). Region 1 is the DMA address register at port
//! 0x514 (8 bytes, big-endian; writing the low half starts the transfer).
//! A DMA descriptor in guest memory is `{ control: be32, length: be32,
//! address: be64 }`; control bits: 0x01 error, 0x02 read, 0x04 skip,
//! 0x08 select (item in bits 31:16), 0x10 write. Writes are refused (the
//! error bit is set), as QEMU does for read-only items. A descriptor or
//! buffer outside guest RAM sets the error bit and changes nothing more.

use super::{Device, DeviceCtx, RegionIndex};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use zerocopy::byteorder::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Item keys (`include/standard-headers/linux/qemu_fw_cfg.h`).
pub mod key {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const UUID: u16 = 0x02;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NOGRAPHIC: u16 = 0x04;
    pub const NB_CPUS: u16 = 0x05;
    pub const MAX_CPUS: u16 = 0x0F;
    pub const FILE_DIR: u16 = 0x19;
    /// The first key handed to a file.
    pub const FILE_FIRST: u16 = 0x20;
    /// x86: the E820 table (`struct e820_entry` = addr, len: le64, type: le32).
    pub const E820_TABLE: u16 = 0x8003;
}

/// `ID` bits: the traditional interface and DMA.
const ID_TRADITIONAL: u32 = 1;
const ID_DMA: u32 = 2;

const CTL_ERROR: u32 = 0x01;
const CTL_READ: u32 = 0x02;
const CTL_SKIP: u32 = 0x04;
const CTL_SELECT: u32 = 0x08;
const CTL_WRITE: u32 = 0x10;

/// The longest file name (with its NUL).
pub const FILE_NAME_LEN: usize = 56;

/// A DMA descriptor as the guest lays it out.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
struct DmaAccess {
    control: U32,
    length: U32,
    address: U64,
}

/// The fw_cfg device.
#[derive(Clone, Debug, Default)]
pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    files: Vec<(String, u16)>,
    selector: u16,
    offset: usize,
    dma_high: u32,
    /// DMA transfers done and refused, for reports.
    pub dma_transfers: u64,
    pub dma_errors: u64,
}

/// Why an item or file could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwCfgError {
    NameTooLong,
    DuplicateFile,
    TooManyFiles,
}

impl FwCfg {
    /// An fw_cfg with the standard items of a machine with `cpus` vCPUs and
    /// `ram` bytes of RAM.
    pub fn new(cpus: u16, ram: u64) -> Self {
        let mut f = Self::default();
        f.set(key::SIGNATURE, b"QEMU".to_vec());
        f.set(key::ID, (ID_TRADITIONAL | ID_DMA).to_le_bytes().to_vec());
        f.set(key::UUID, alloc::vec![0; 16]);
        f.set(key::RAM_SIZE, ram.to_le_bytes().to_vec());
        f.set(key::NOGRAPHIC, 1u16.to_le_bytes().to_vec());
        f.set(key::NB_CPUS, cpus.to_le_bytes().to_vec());
        f.set(key::MAX_CPUS, cpus.to_le_bytes().to_vec());
        f.rebuild_dir();
        f
    }

    /// Sets an item's bytes.
    pub fn set(&mut self, key: u16, data: Vec<u8>) {
        self.items.insert(key, data);
    }

    /// Adds a named file; returns its key.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.len() >= FILE_NAME_LEN {
            return Err(FwCfgError::NameTooLong);
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::DuplicateFile);
        }
        let key = u16::try_from(self.files.len())
            .ok()
            .and_then(|n| key::FILE_FIRST.checked_add(n))
            .filter(|&k| k < 0x4000)
            .ok_or(FwCfgError::TooManyFiles)?;
        self.files.push((name.into(), key));
        self.set(key, data);
        self.rebuild_dir();
        Ok(key)
    }

    /// The file directory: a big-endian count, then per file its size
    /// (be32), key (be16), a reserved be16 and its NUL-padded name, sorted
    /// by name as QEMU sorts them.
    fn rebuild_dir(&mut self) {
        let mut files = self.files.clone();
        files.sort();
        let mut d = Vec::new();
        d.extend_from_slice(&(files.len() as u32).to_be_bytes());
        for (name, key) in &files {
            let size = self.items.get(key).map_or(0, Vec::len) as u32;
            d.extend_from_slice(&size.to_be_bytes());
            d.extend_from_slice(&key.to_be_bytes());
            d.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FILE_NAME_LEN];
            n[..name.len()].copy_from_slice(name.as_bytes());
            d.extend_from_slice(&n);
        }
        self.items.insert(key::FILE_DIR, d);
    }

    fn select(&mut self, key: u16) {
        self.selector = key;
        self.offset = 0;
    }

    fn next_byte(&mut self) -> u8 {
        let b = self
            .items
            .get(&self.selector)
            .and_then(|d| d.get(self.offset).copied())
            .unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        b
    }

    /// Runs the DMA descriptor at `addr`, in QEMU's order: select, then
    /// read, write (refused) or skip; a descriptor asking for none of them
    /// is a successful no-op. The length is the guest's (up to 4 GiB): the
    /// destination must be guest RAM as a whole before anything is copied,
    /// bytes past the item's end are zeroes, written a page at a time, so
    /// the work is bounded by guest RAM.
    fn dma(&mut self, ctx: &mut DeviceCtx, addr: u64) {
        let Ok(d) = ctx.mem.read_obj::<DmaAccess>(addr) else {
            self.dma_errors += 1;
            return;
        };
        let control = d.control.get();
        if control & CTL_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let len = u64::from(d.length.get());
        let ok = if control & CTL_READ != 0 {
            self.dma_read(ctx, d.address.get(), len)
        } else if control & CTL_WRITE != 0 {
            false
        } else {
            if control & CTL_SKIP != 0 {
                self.offset = self.offset.saturating_add(len as usize);
            }
            true
        };
        let status = if ok { 0 } else { CTL_ERROR };
        if ok {
            self.dma_transfers += 1;
        } else {
            self.dma_errors += 1;
        }
        // The device clears the control word (or leaves the error bit).
        let _ = ctx.mem.write(addr, &status.to_be_bytes());
    }

    fn dma_read(&mut self, ctx: &mut DeviceCtx, dst: u64, len: u64) -> bool {
        if !ctx.mem.is_writable(dst, len) {
            return false;
        }
        let item: &[u8] = self.items.get(&self.selector).map_or(&[], Vec::as_slice);
        let data = item.get(self.offset..).unwrap_or(&[]);
        let n = data.len().min(len as usize);
        if ctx.mem.write(dst, &data[..n]).is_err() {
            return false;
        }
        let zeroes = [0u8; 4096];
        let mut at = n as u64;
        while at < len {
            let k = (len - at).min(zeroes.len() as u64);
            if ctx.mem.write(dst + at, &zeroes[..k as usize]).is_err() {
                return false;
            }
            at += k;
        }
        self.offset = self.offset.saturating_add(len as usize);
        true
    }
}

impl Device for FwCfg {
    fn read(&mut self, _ctx: &mut DeviceCtx, region: RegionIndex, offset: u64, size: u8) -> u64 {
        match (region, offset) {
            // The data port; wider reads take consecutive bytes.
            (0, 1) => {
                let mut v = 0u64;
                for i in 0..u32::from(size.min(8)) {
                    v |= u64::from(self.next_byte()) << (8 * i);
                }
                v
            }
            // The DMA register reads "QEMU CFG" (its signature), in memory
            // order.
            (1, o) => super::read_le(b"QEMU CFG", o, size),
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
        match (region, offset, size) {
            (0, 0, 2) => self.select(value as u16),
            // Data writes are ignored (QEMU ignores them since 2.4).
            (0, _, _) => {}
            // The address is big-endian: the high half first, the low half
            // starts the transfer; a 64-bit write does both.
            (1, 0, 8) => self.dma(ctx, u64::from_be(value)),
            (1, 0, 4) => self.dma_high = u32::from_be(value as u32),
            (1, 4, 4) => {
                let addr = (u64::from(self.dma_high) << 32) | u64::from(u32::from_be(value as u32));
                self.dma_high = 0;
                self.dma(ctx, addr);
            }
            _ => {}
        }
    }

    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::testing::Harness;

    fn read_item(h: &mut Harness, f: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        h.write(f, 0, 0, 2, key.into());
        (0..n).map(|_| h.read(f, 0, 1, 1) as u8).collect()
    }

    #[test]
    fn standard_items_read_byte_by_byte() {
        let mut h = Harness::new();
        let mut f = FwCfg::new(1, 64 << 20);
        assert_eq!(read_item(&mut h, &mut f, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(
            read_item(&mut h, &mut f, key::NB_CPUS, 3),
            [1, 0, 0],
            "past the end reads 0"
        );
        let ram = read_item(&mut h, &mut f, key::RAM_SIZE, 8);
        assert_eq!(u64::from_le_bytes(ram.try_into().unwrap()), 64 << 20);
        assert_eq!(read_item(&mut h, &mut f, 0x1234, 2), [0, 0], "unknown key");
        // A 32-bit read takes four consecutive bytes.
        h.write(&mut f, 0, 0, 2, key::SIGNATURE.into());
        assert_eq!(
            h.read(&mut f, 0, 1, 4),
            u64::from(u32::from_le_bytes(*b"QEMU"))
        );
        assert_eq!(
            h.read(&mut f, 1, 4, 4),
            u64::from(u32::from_le_bytes(*b" CFG"))
        );
    }

    #[test]
    fn files_are_listed_sorted_with_big_endian_fields() {
        let mut h = Harness::new();
        let mut f = FwCfg::new(1, 1 << 20);
        let kb = f.add_file("opt/b", b"xyz".to_vec()).unwrap();
        let ka = f.add_file("etc/a", b"hello".to_vec()).unwrap();
        assert_eq!((kb, ka), (0x20, 0x21));
        assert_eq!(
            f.add_file("etc/a", Vec::new()),
            Err(FwCfgError::DuplicateFile)
        );
        assert_eq!(
            f.add_file(&"n".repeat(56), Vec::new()),
            Err(FwCfgError::NameTooLong)
        );
        let dir = read_item(&mut h, &mut f, key::FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        // First entry: etc/a, 5 bytes, key 0x21.
        assert_eq!(&dir[4..12], &[0, 0, 0, 5, 0, 0x21, 0, 0]);
        assert_eq!(&dir[12..18], b"etc/a\0");
        assert_eq!(&dir[68..76], &[0, 0, 0, 3, 0, 0x20, 0, 0]);
        assert_eq!(read_item(&mut h, &mut f, ka, 5), b"hello");
    }

    #[test]
    fn dma_reads_into_guest_ram_and_refuses_bad_descriptors() {
        use crate::ept_listener::RamBlock;
        use crate::memory::{MemorySystem, RamBacking};
        let mut mem = MemorySystem::new();
        let sys = mem.create_container("sys", 1 << 32).unwrap();
        let ram = mem
            .create_ram(
                "ram",
                0x10000u64.into(),
                RamBacking {
                    block: 0,
                    offset: 0,
                },
            )
            .unwrap();
        mem.add_subregion(sys, 0, ram).unwrap();
        let space = mem.create_address_space("memory", sys).unwrap();
        let mut h = Harness::new();
        h.view = mem.flat_view(space).unwrap();
        let blocks = [RamBlock {
            hpa: crate::addr::HostPhysAddr::new(0x10_0000),
            size: 0x10000,
        }];
        let mut f = FwCfg::new(2, 1 << 30);
        let run = |h: &mut Harness, f: &mut FwCfg, desc: DmaAccess| {
            let mut irq = Default::default();
            let mut req = Vec::new();
            let mut exit = None;
            let mut g = crate::guest_mem::GuestMemory::new(h.view.clone(), &blocks, &mut h.phys);
            g.write_obj(0x1000, &desc).unwrap();
            let mut ctx = DeviceCtx::new(0, g, &[], &mut irq, &mut req, &mut exit);
            f.write(&mut ctx, 1, 0, 4, u64::from(0u32.to_be()));
            f.write(&mut ctx, 1, 4, 4, u64::from(0x1000u32.to_be()));
            let mut out = [0u8; 8];
            ctx.mem.read(0x2000, &mut out).unwrap();
            (ctx.mem.read_obj::<U32>(0x1000).unwrap().get(), out)
        };
        let desc = |control: u32, length: u32, address: u64| DmaAccess {
            control: control.into(),
            length: length.into(),
            address: address.into(),
        };
        let sel = u32::from(key::SIGNATURE) << 16;
        let (status, out) = run(&mut h, &mut f, desc(sel | CTL_SELECT | CTL_READ, 4, 0x2000));
        assert_eq!(status, 0);
        assert_eq!(&out[..4], b"QEMU");
        // A buffer past the end of RAM: error bit, nothing written.
        let (status, _) = run(&mut h, &mut f, desc(sel | CTL_SELECT | CTL_READ, 4, 0xFFFE));
        assert_eq!(status, CTL_ERROR);
        // Writes are refused.
        let (status, _) = run(&mut h, &mut f, desc(CTL_WRITE, 4, 0x2000));
        assert_eq!(status, CTL_ERROR);
        // A 4 GiB read into 64 KiB of RAM is refused up front.
        let (status, _) = run(
            &mut h,
            &mut f,
            desc(sel | CTL_SELECT | CTL_READ, u32::MAX, 0x2000),
        );
        assert_eq!(status, CTL_ERROR);
        // Asking for nothing is a successful no-op.
        let (status, _) = run(&mut h, &mut f, desc(0, 4, 0x2000));
        assert_eq!(status, 0);
        // Past the end of the item, zeroes.
        let (status, out) = run(&mut h, &mut f, desc(sel | CTL_SELECT | CTL_READ, 8, 0x2000));
        assert_eq!(status, 0);
        assert_eq!(&out, b"QEMU\0\0\0\0");
        assert_eq!((f.dma_transfers, f.dma_errors), (3, 3));
    }
}
