//! virtio-blk (virtio 1.x 5.2) over a RAM disk, with multiple queues
//! (`VIRTIO_BLK_F_MQ`): IN, OUT, FLUSH and GET_ID requests.
//!
//! A request whose headers are missing (no 16-byte header, no status
//! byte) is a broken driver: the device needs a reset, as QEMU's
//! "virtio-blk missing headers". A request that is well formed but
//! impossible (past the end of the disk, not whole sectors, an unknown
//! type) gets an error status and the device carries on.

use super::pci::{BackendState, QueueIo, VirtioBackend};
use super::queue::{Chain, QueueError};
use crate::devices::{read_le, DeviceCtx, StateError};
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

pub const VIRTIO_ID_BLOCK: u16 = 2;
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_MQ: u32 = 12;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Length of a GET_ID answer.
pub const ID_LEN: usize = 20;
/// Largest data transfer of one request (QEMU's default `seg_max` times a
/// page is far below; this bounds what a request may make Tern copy).
pub const MAX_TRANSFER: u64 = 1 << 20;

/// Counters of one block device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub get_ids: u64,
    /// Requests answered with IOERR or UNSUPP.
    pub failed: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// A virtio-blk device. Its disk is shared storage: a copy of the device
/// (a migration target in the same Tern) uses the same disk, as QEMU's
/// migration expects the disk image on shared storage.
#[derive(Clone)]
pub struct VirtioBlk {
    disk: Rc<RefCell<Vec<u8>>>,
    queues: u16,
    id: [u8; ID_LEN],
    pub counters: BlkCounters,
}

impl VirtioBlk {
    /// A device with `queues` queues over `disk` (its length is rounded
    /// down to whole sectors), answering GET_ID with `serial`.
    pub fn new(queues: u16, mut disk: Vec<u8>, serial: &str) -> Self {
        let whole = disk.len() - disk.len() % SECTOR as usize;
        disk.truncate(whole);
        let mut id = [0u8; ID_LEN];
        for (d, s) in id.iter_mut().zip(serial.bytes()) {
            *d = s;
        }
        Self {
            disk: Rc::new(RefCell::new(disk)),
            queues: queues.max(1),
            id,
            counters: BlkCounters::default(),
        }
    }

    /// A zeroed disk of `sectors` sectors.
    pub fn zeroed(queues: u16, sectors: u64, serial: &str) -> Self {
        let bytes = usize::try_from(sectors.saturating_mul(SECTOR)).unwrap_or(0);
        Self::new(queues, vec![0; bytes], serial)
    }

    /// The disk (shared storage).
    pub fn disk(&self) -> Rc<RefCell<Vec<u8>>> {
        self.disk.clone()
    }

    /// Attaches the device to a disk (the source's, on a migration target).
    pub fn attach_disk(&mut self, disk: Rc<RefCell<Vec<u8>>>) {
        self.disk = disk;
    }

    fn capacity(&self) -> u64 {
        self.disk.borrow().len() as u64 / SECTOR
    }

    /// One request; returns the bytes written into the driver's buffers.
    fn request(&mut self, ctx: &mut DeviceCtx, chain: &Chain) -> Result<u32, QueueError> {
        let head = chain.head;
        let missing = QueueError::BadRequest {
            head,
            why: "virtio-blk request without header or status byte",
        };
        if chain.readable_len() < 16 || chain.writable_len() < 1 {
            return Err(missing);
        }
        let mut hdr = [0u8; 16];
        chain.read_at(&ctx.mem, 0, &mut hdr)?;
        let kind = read_le(&hdr, 0, 4) as u32;
        let sector = read_le(&hdr, 8, 8);
        // The status byte is the last writable byte; data is before it.
        let data_in = chain.writable_len() - 1;
        let data_out = chain.readable_len() - 16;
        let (status, written) = match kind {
            VIRTIO_BLK_T_IN => match self.range(sector, data_in) {
                Some((start, len)) => {
                    let disk = self.disk.borrow();
                    let n = chain.write_at(&mut ctx.mem, 0, &disk[start..start + len])?;
                    self.counters.reads += 1;
                    self.counters.bytes_read += u64::from(n);
                    (VIRTIO_BLK_S_OK, n)
                }
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_OUT => match self.range(sector, data_out) {
                Some((start, len)) => {
                    let mut disk = self.disk.borrow_mut();
                    chain.read_at(&ctx.mem, 16, &mut disk[start..start + len])?;
                    self.counters.writes += 1;
                    self.counters.bytes_written += len as u64;
                    (VIRTIO_BLK_S_OK, 0)
                }
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            VIRTIO_BLK_T_FLUSH => {
                self.counters.flushes += 1;
                (VIRTIO_BLK_S_OK, 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = (data_in as usize).min(ID_LEN);
                let id = self.id;
                let n = chain.write_at(&mut ctx.mem, 0, &id[..n])?;
                self.counters.get_ids += 1;
                (VIRTIO_BLK_S_OK, n)
            }
            _ => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        if status != VIRTIO_BLK_S_OK {
            self.counters.failed += 1;
        }
        chain.write_at(&mut ctx.mem, data_in, &[status])?;
        Ok(written + 1)
    }

    /// The disk bytes of a transfer of `len` bytes at `sector`, if it is
    /// whole sectors inside the disk and not too large.
    fn range(&self, sector: u64, len: u64) -> Option<(usize, usize)> {
        if !len.is_multiple_of(SECTOR) || len > MAX_TRANSFER {
            return None;
        }
        let end = sector.checked_add(len / SECTOR)?;
        if end > self.capacity() {
            return None;
        }
        Some((
            usize::try_from(sector * SECTOR).ok()?,
            usize::try_from(len).ok()?,
        ))
    }
}

crate::vmstate! {
    /// virtio-blk's own state: what must match on the target (the queue
    /// count and the disk's size in sectors).
    #[derive(Clone, Debug, PartialEq)]
    pub struct VirtioBlkWire as "virtio-pci/virtio-blk", version 1, minimum 1 {
        pub num_queues: u16,
        pub capacity: u64,
    }
}

impl VirtioBackend for VirtioBlk {
    fn device_id(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn class(&self) -> u32 {
        0x01_00_00
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
    }

    fn num_queues(&self) -> u16 {
        self.queues
    }

    fn config_read(&self, offset: u64, size: u8) -> u64 {
        let mut c = [0u8; 0x40];
        c[0..8].copy_from_slice(&self.capacity().to_le_bytes());
        c[12..16].copy_from_slice(&128u32.to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&self.queues.to_le_bytes());
        read_le(&c, offset, size)
    }

    fn reset(&mut self) {}

    fn process(&mut self, ctx: &mut DeviceCtx, io: &mut QueueIo, q: u16) -> Result<(), QueueError> {
        // At most one queue's worth of requests per kick, so a driver
        // that keeps refilling cannot hold the vCPU here forever.
        let limit = io
            .queues
            .get(usize::from(q))
            .map_or(0, |queue| u32::from(queue.size));
        for _ in 0..limit {
            let Some(queue) = io.queues.get_mut(usize::from(q)) else {
                return Ok(());
            };
            let Some(chain) = queue.pop(&ctx.mem)? else {
                break;
            };
            let written = self.request(ctx, &chain)?;
            io.complete(ctx, q, chain.head, written)?;
        }
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        alloc::vec![
            ("reads", c.reads),
            ("writes", c.writes),
            ("flushes", c.flushes),
            ("get_ids", c.get_ids),
            ("failed", c.failed),
        ]
    }

    /// The disk itself is not device state: it is migrated as a RAM-like
    /// block by the migration stream.
    fn save_state(&self) -> Option<BackendState> {
        Some(BackendState::Blk(VirtioBlkWire {
            num_queues: self.queues,
            capacity: self.disk.borrow().len() as u64 / SECTOR,
        }))
    }

    fn load_state(&mut self, s: Option<&BackendState>) -> Result<(), StateError> {
        let Some(BackendState::Blk(w)) = s else {
            return Err(StateError::Invalid("virtio-blk state missing"));
        };
        if w.num_queues != self.queues {
            return Err(StateError::Invalid("virtio-blk queue count"));
        }
        if w.capacity != self.disk.borrow().len() as u64 / SECTOR {
            return Err(StateError::Invalid("virtio-blk disk of another size"));
        }
        Ok(())
    }

    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}
