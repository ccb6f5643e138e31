//! An ATA disk written with PIO (LBA28), as the channel a migration stream
//! leaves the machine by: the emulator (Bochs `ata1-master`, QEMU
//! `-drive if=ide,index=2`) backs the disk with a host file, and xtask
//! reads the stream back out of it. Leaf module: the port I/O of the disk
//! is here and nowhere else.
//!
//! Layout on the disk: sector 0 holds a header ([`MAGIC`], the stream's
//! length in bytes, little-endian), the stream starts at sector 1. The
//! header is written last, so a disk whose header is missing or stale never
//! passes for a complete stream.

use alloc::vec::Vec;
use core::arch::asm;
use migration::channel::{ChannelError, ChannelWrite};
use x86_64::instructions::port::Port;

/// The header's first bytes.
pub const MAGIC: &[u8; 8] = b"TERNMIG1";
pub const SECTOR: usize = 512;
/// Sectors written per command (a PIO write takes at most 256).
const BATCH: usize = 128;
/// Status polls before a command is declared dead.
const POLLS: u32 = 10_000_000;

// Status register bits (ATA/ATAPI-6 7.15.6).
const BSY: u8 = 0x80;
const DF: u8 = 0x20;
const DRQ: u8 = 0x08;
const ERR: u8 = 0x01;
// Commands.
const IDENTIFY: u8 = 0xEC;
const WRITE_SECTORS: u8 = 0x30;
const FLUSH_CACHE: u8 = 0xE7;
/// Device/head: LBA addressing, master.
const LBA_MASTER: u8 = 0xE0;
/// Device control: interrupts off (nIEN).
const NIEN: u8 = 0x02;

/// The master disk of one ATA channel, driven by polling.
pub struct AtaDisk {
    base: u16,
    ctrl: u16,
    /// Addressable sectors (IDENTIFY words 60-61).
    pub sectors: u32,
}

/// The secondary channel's ports.
pub const SECONDARY: (u16, u16) = (0x170, 0x376);

impl AtaDisk {
    fn inb(&self, reg: u16) -> u8 {
        let mut p: Port<u8> = Port::new(self.base + reg);
        // SAFETY: the ports of this ATA channel belong to this driver
        // alone (no other code of Tern touches 0x170-0x177/0x376), and
        // reading a task-file register has no effect on memory.
        unsafe { p.read() }
    }

    fn outb(&self, reg: u16, v: u8) {
        let mut p: Port<u8> = Port::new(self.base + reg);
        // SAFETY: as in `inb`; writing a task-file register starts at most
        // a PIO command, which never touches host memory (no DMA is set up).
        unsafe { p.write(v) }
    }

    fn control(&self, v: u8) {
        let mut p: Port<u8> = Port::new(self.ctrl);
        // SAFETY: the channel's device-control register, owned as above.
        unsafe { p.write(v) }
    }

    /// Waits for BSY to clear; with `drq`, for DRQ too. Fails on ERR, DF
    /// or a timeout.
    fn wait(&self, drq: bool) -> Result<u8, &'static str> {
        for _ in 0..POLLS {
            let s = self.inb(7);
            if s == 0xFF {
                return Err("no disk (floating bus)");
            }
            if s & BSY != 0 {
                continue;
            }
            if s & (ERR | DF) != 0 {
                return Err("the disk reported an error");
            }
            if !drq || s & DRQ != 0 {
                return Ok(s);
            }
        }
        Err("the disk did not answer")
    }

    /// Finds the master disk of the channel at `(base, ctrl)`.
    pub fn probe((base, ctrl): (u16, u16)) -> Result<Self, &'static str> {
        let d = Self {
            base,
            ctrl,
            sectors: 0,
        };
        d.control(NIEN);
        d.outb(6, LBA_MASTER);
        for r in 2..=5 {
            d.outb(r, 0);
        }
        d.outb(7, IDENTIFY);
        let s = d.inb(7);
        if s == 0 || s == 0xFF {
            return Err("no disk on the secondary ATA channel");
        }
        d.wait(false)?;
        if d.inb(4) != 0 || d.inb(5) != 0 {
            return Err("the secondary master is not an ATA disk");
        }
        d.wait(true)?;
        let mut id = [0u16; 256];
        let mut data: Port<u16> = Port::new(base);
        for w in &mut id {
            // SAFETY: the channel's data register, owned as above; reading
            // it takes the next IDENTIFY word.
            *w = unsafe { data.read() };
        }
        let sectors = u32::from(id[60]) | (u32::from(id[61]) << 16);
        if sectors < 2 {
            return Err("the disk is too small");
        }
        Ok(Self { sectors, ..d })
    }

    /// Writes whole sectors from `lba` on.
    pub fn write(&mut self, lba: u32, data: &[u8]) -> Result<(), &'static str> {
        if !data.len().is_multiple_of(SECTOR) {
            return Err("not whole sectors");
        }
        let count = data.len() / SECTOR;
        let end = u64::from(lba) + count as u64;
        if end > u64::from(self.sectors).min(1 << 28) {
            return Err("past the end of the disk");
        }
        for (i, chunk) in data.chunks(BATCH * SECTOR).enumerate() {
            let at = lba + (i * BATCH) as u32;
            let n = chunk.len() / SECTOR;
            self.wait(false)?;
            self.outb(6, LBA_MASTER | ((at >> 24) as u8 & 0x0F));
            self.outb(2, n as u8); // 256 would be 0; BATCH is below
            self.outb(3, at as u8);
            self.outb(4, (at >> 8) as u8);
            self.outb(5, (at >> 16) as u8);
            self.outb(7, WRITE_SECTORS);
            for sector in chunk.chunks(SECTOR) {
                self.wait(true)?;
                // SAFETY: `sector` is 512 readable bytes (256 words) that
                // live across the instruction; REP OUTSW only reads them
                // and writes the data port this driver owns. DF is clear
                // in Tern (the ABI's direction flag), so RSI moves up.
                unsafe {
                    asm!("rep outsw",
                         in("dx") self.base,
                         inout("rsi") sector.as_ptr() => _,
                         inout("rcx") SECTOR / 2 => _,
                         options(nostack, preserves_flags, readonly));
                }
            }
            self.wait(false)?;
        }
        self.outb(7, FLUSH_CACHE);
        self.wait(false)?;
        Ok(())
    }
}

/// A stream channel onto an [`AtaDisk`]: bytes are buffered and written a
/// batch of sectors at a time from sector 1; [`DiskChannel::close`] writes
/// the last partial sector and then the header.
pub struct DiskChannel {
    disk: AtaDisk,
    buf: Vec<u8>,
    /// Next sector to write.
    lba: u32,
    len: u64,
}

impl DiskChannel {
    pub fn new(disk: AtaDisk) -> Self {
        Self {
            disk,
            buf: Vec::with_capacity(BATCH * SECTOR),
            lba: 1,
            len: 0,
        }
    }

    fn put(&mut self, whole: usize) -> Result<(), ChannelError> {
        let n = whole / SECTOR * SECTOR;
        if n == 0 {
            return Ok(());
        }
        self.disk
            .write(self.lba, &self.buf[..n])
            .map_err(|e| ChannelError::Io(e.into()))?;
        self.lba += (n / SECTOR) as u32;
        self.buf.drain(..n);
        Ok(())
    }

    /// Writes what is left and the header. Returns the stream's length.
    pub fn close(mut self) -> Result<u64, ChannelError> {
        let pad = self.buf.len().next_multiple_of(SECTOR);
        self.buf.resize(pad, 0);
        self.put(pad)?;
        let mut header = [0u8; SECTOR];
        header[..8].copy_from_slice(MAGIC);
        header[8..16].copy_from_slice(&self.len.to_le_bytes());
        self.disk
            .write(0, &header)
            .map_err(|e| ChannelError::Io(e.into()))?;
        Ok(self.len)
    }
}

impl ChannelWrite for DiskChannel {
    fn write_all(&mut self, data: &[u8]) -> Result<(), ChannelError> {
        let limit = (u64::from(self.disk.sectors).min(1 << 28) - 1) * SECTOR as u64;
        if self.len + data.len() as u64 > limit {
            return Err(ChannelError::Full {
                limit: limit as usize,
            });
        }
        self.len += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= BATCH * SECTOR {
            self.put(self.buf.len())?;
        }
        Ok(())
    }
}
