//! The split virtqueue, device side (virtio 1.2 §2.7).
//!
//! A split queue is three guest-memory areas the driver lays out:
//!
//! | area | size (bytes) | align | layout (little endian) |
//! |---|---|---|---|
//! | descriptor table | `16 * size` | 16 | `{addr: u64, len: u32, flags: u16, next: u16}` per entry |
//! | available ring | `6 + 2 * size` | 2 | `flags, idx, ring[size], used_event` (all `u16`) |
//! | used ring | `6 + 8 * size` | 4 | `flags: u16, idx: u16, ring[size]: {id: u32, len: u32}, avail_event: u16` |
//!
//! The driver owns the descriptor table and the available ring, the device
//! owns the used ring. Everything the driver wrote is hostile: indexes are
//! re-read from memory on every use, each descriptor is copied once and only
//! the copy is validated and used (no time-of-check/time-of-use), every chain
//! is walked with a bound, every buffer is checked to be RAM (writable RAM
//! for device-writable buffers) before the chain is handed out. A malformed
//! ring makes the queue *broken* ([`SplitQueue::error`]): every later ring
//! operation returns the same error without touching memory until
//! [`SplitQueue::reset`]; the transport then sets `DEVICE_NEEDS_RESET`.
//!
//! # Ring caches
//!
//! As QEMU's `virtio_init_region_cache`: when the queue is enabled (or
//! loaded), each ring is resolved once through the device's flat view to one
//! contiguous span of one RAM block ([`RamSpan`]); ring accesses then go
//! straight to the span. The cache remembers the view it was built from (a
//! [`Weak`] pointer) and the ring geometry; any operation that finds a
//! different view in its [`GuestMemory`] (a memory commit happened) or
//! different `size`/`desc`/`avail`/`used` fields rebuilds it (counted by
//! [`SplitQueue::cache_builds`]) and breaks the queue with
//! [`QueueError::RingNotRam`] if a ring is no longer RAM. Data buffers and
//! indirect tables are not rings: they go through normal lookups.
//!
//! # Ordering
//!
//! The guest runs on other CPUs while the device works, so the accesses are
//! fenced as the spec's memory-barrier rules ask (QEMU: `smp_rmb`,
//! `smp_wmb`, `smp_mb`): an acquire fence after reading `avail.idx` and
//! before reading ring entries and descriptors; a release fence between a
//! used element and the `used.idx` that publishes it; a full fence between
//! publishing `used.idx` and reading the driver's suppression fields, and
//! after writing `avail_event` / `used.flags`.
//!
//! # Notifications with `VIRTIO_RING_F_EVENT_IDX`
//!
//! [`SplitQueue::pop`] does not write `avail_event` (it only reads guest
//! memory). A device that has drained the ring must call
//! [`SplitQueue::enable_notification`] and then check
//! [`SplitQueue::has_available`] again, else the driver may stop notifying.

use crate::guest_mem::{GuestMemory, RamSpan};
use crate::memory::FlatView;
use alloc::rc::{Rc, Weak};
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

/// The buffer continues in the descriptor named by `next`.
pub const DESC_F_NEXT: u16 = 1;
/// The buffer is device-writable (otherwise device-readable).
pub const DESC_F_WRITE: u16 = 2;
/// The buffer is an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = 4;
/// `used.flags`: the device does not want notifications (no EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;
/// `avail.flags`: the driver does not want interrupts (no EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// An indirect table may hold this many entries even when the queue is
/// smaller (QEMU's `VIRTQUEUE_MAX_SIZE`: Linux builds tables with as many
/// entries as a request has segments, which can exceed a small ring).
pub const INDIRECT_MIN_BOUND: u16 = 1024;

/// Why a queue cannot be used; the transport sets NEEDS_RESET on any of
/// these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// Queue size 0, not a power of two, or larger than the device's maximum.
    BadSize { size: u16 },
    /// A ring not aligned as virtio 1.x requires (descriptors 16, available
    /// ring 2, used ring 4).
    Misaligned { what: &'static str, gpa: u64 },
    /// A ring is not one contiguous piece of RAM of the device's address
    /// space (writable RAM for the used ring).
    RingNotRam {
        what: &'static str,
        gpa: u64,
        len: u64,
    },
    /// `avail.idx` is more than `size` entries ahead of the device.
    AvailIndex { idx: u16, last: u16, size: u16 },
    /// An available-ring entry names no descriptor.
    HeadOutOfRange { head: u16, size: u16 },
    /// A `next` index past the table (`size`: entries of the descriptor
    /// table or of the indirect table).
    DescOutOfRange { index: u16, size: u16 },
    /// A chain longer than its table (a loop).
    ChainLoop { head: u16 },
    /// A buffer (or indirect table) not in RAM, or a device-writable buffer
    /// not in writable RAM.
    BufferNotRam { gpa: u64, len: u32 },
    /// The chain's total length does not fit in `u32`, or a buffer wraps
    /// past the end of the address space.
    LengthOverflow { head: u16 },
    /// A malformed indirect descriptor.
    Indirect { head: u16, why: &'static str },
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable { head: u16 },
    /// The queue is not enabled.
    NotReady,
    /// A device read more of the chain's readable part than it has
    /// (`need` = offset + length of the read, `have` = readable bytes).
    ChainTooShort { head: u16, need: u64, have: u64 },
    /// A chain that is valid as a chain but not as a request of the device
    /// type (e.g. a block request without header or status byte).
    BadRequest { head: u16, why: &'static str },
}

impl core::fmt::Display for QueueError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Self::BadSize { size } => write!(
                f,
                "virtqueue size {size} is not a power of two between 1 and the device maximum"
            ),
            Self::Misaligned { what, gpa } => write!(f, "virtqueue {what} at {gpa:#x} is misaligned"),
            Self::RingNotRam { what, gpa, len } => write!(
                f,
                "virtqueue {what} at {gpa:#x}+{len:#x} is not one contiguous (writable) RAM range"
            ),
            Self::AvailIndex { idx, last, size } => write!(
                f,
                "virtqueue avail.idx {idx} is more than {size} ahead of the device's index {last}"
            ),
            Self::HeadOutOfRange { head, size } => write!(
                f,
                "virtqueue available head {head} is past the descriptor table ({size} entries)"
            ),
            Self::DescOutOfRange { index, size } => write!(
                f,
                "virtqueue descriptor next index {index} is past its table ({size} entries)"
            ),
            Self::ChainLoop { head } => write!(
                f,
                "virtqueue chain at head {head} is longer than its table (loop)"
            ),
            Self::BufferNotRam { gpa, len } => write!(
                f,
                "virtqueue buffer at {gpa:#x}+{len:#x} is not RAM (or not writable RAM)"
            ),
            Self::LengthOverflow { head } => write!(
                f,
                "virtqueue chain at head {head}: total length over 4 GiB or a buffer wraps past 2^64"
            ),
            Self::Indirect { head, why } => {
                write!(f, "virtqueue chain at head {head}: bad indirect descriptor: {why}")
            }
            Self::ReadableAfterWritable { head } => write!(
                f,
                "virtqueue chain at head {head}: device-readable descriptor after a device-writable one"
            ),
            Self::NotReady => write!(f, "virtqueue is not enabled"),
            Self::ChainTooShort { head, need, have } => write!(
                f,
                "virtqueue chain at head {head}: {need} readable bytes needed, {have} available"
            ),
            Self::BadRequest { head, why } => write!(f, "request at head {head}: {why}"),
        }
    }
}

/// A validated descriptor chain: its head (for [`SplitQueue::push`]) and its
/// buffers `(gpa, len)` in chain order, device-readable ones first.
/// Zero-length descriptors are validated but not listed. Every listed buffer
/// was RAM (writable RAM for `writable`) when the chain was popped; the
/// accessors still go through normal checked lookups, since the memory map
/// may have changed since.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<(u64, u32)>,
    pub writable: Vec<(u64, u32)>,
}

fn total(bufs: &[(u64, u32)]) -> u64 {
    bufs.iter().map(|&(_, l)| u64::from(l)).sum()
}

impl Chain {
    /// Bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        total(&self.readable)
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        total(&self.writable)
    }

    /// Copies up to `max` readable bytes (all of them, in order, if there are
    /// no more than `max`). Allocates at most `max` bytes.
    pub fn read_all(&self, mem: &GuestMemory, max: usize) -> Result<Vec<u8>, QueueError> {
        let n = self.readable_len().min(max as u64) as usize;
        let mut v = vec![0; n];
        self.read_at(mem, 0, &mut v)?;
        Ok(v)
    }

    /// Reads `buf.len()` bytes starting at byte `offset` of the readable
    /// part; [`QueueError::ChainTooShort`] (nothing read) if the readable
    /// part ends before.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), QueueError> {
        let have = self.readable_len();
        let need = offset.saturating_add(buf.len() as u64);
        if need > have {
            return Err(QueueError::ChainTooShort {
                head: self.head,
                need,
                have,
            });
        }
        let mut skip = offset;
        let mut done = 0usize;
        for &(gpa, len) in &self.readable {
            if done == buf.len() {
                break;
            }
            let len64 = u64::from(len);
            if skip >= len64 {
                skip -= len64;
                continue;
            }
            let n = ((len64 - skip) as usize).min(buf.len() - done);
            mem.read(gpa + skip, &mut buf[done..done + n])
                .map_err(|_| QueueError::BufferNotRam { gpa, len })?;
            done += n;
            skip = 0;
        }
        Ok(())
    }

    /// Writes `data` at byte `offset` of the writable part; returns the bytes
    /// written (it stops at the end of the writable part).
    pub fn write_at(
        &self,
        mem: &mut GuestMemory,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, QueueError> {
        let mut skip = offset;
        let mut done = 0usize;
        for &(gpa, len) in &self.writable {
            if done == data.len() {
                break;
            }
            let len64 = u64::from(len);
            if skip >= len64 {
                skip -= len64;
                continue;
            }
            let n = ((len64 - skip) as usize).min(data.len() - done);
            mem.write(gpa + skip, &data[done..done + n])
                .map_err(|_| QueueError::BufferNotRam { gpa, len })?;
            done += n;
            skip = 0;
        }
        // At most the writable length, which fits in u32 (checked at pop).
        Ok(done as u32)
    }
}

/// Migratable state of a queue (everything needed to resume).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub msix_vector: u16,
    pub last_avail: u16,
    pub used_idx: u16,
    pub signalled_used: u16,
    pub signalled_valid: bool,
}

/// Where the rings are (the transport's registers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

/// Rings resolved for one geometry in one view.
#[derive(Clone, Copy, Debug)]
struct Rings {
    geo: Geometry,
    desc: RamSpan,
    avail: RamSpan,
    used: RamSpan,
}

#[derive(Clone)]
struct RingCache {
    view: Weak<FlatView>,
    rings: Rings,
}

const DESC_TABLE: &str = "descriptor table";
const AVAIL_RING: &str = "available ring";
const USED_RING: &str = "used ring";

/// One descriptor, copied out of guest memory.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl Desc {
    fn parse(b: &[u8; 16]) -> Self {
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = *b;
        Self {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }
}

/// The chain being collected.
struct Builder {
    chain: Chain,
    total: u64,
    seen_writable: bool,
}

impl Builder {
    /// Validates one (non-indirect) descriptor and records its buffer.
    fn add(&mut self, mem: &GuestMemory, d: &Desc) -> Result<(), QueueError> {
        let head = self.chain.head;
        let write = d.flags & DESC_F_WRITE != 0;
        if write {
            self.seen_writable = true;
        } else if self.seen_writable {
            return Err(QueueError::ReadableAfterWritable { head });
        }
        if d.addr.checked_add(u64::from(d.len)).is_none() {
            return Err(QueueError::LengthOverflow { head });
        }
        self.total += u64::from(d.len);
        if self.total > u64::from(u32::MAX) {
            return Err(QueueError::LengthOverflow { head });
        }
        if d.len == 0 {
            return Ok(());
        }
        mem.check(d.addr, u64::from(d.len), write)
            .map_err(|_| QueueError::BufferNotRam {
                gpa: d.addr,
                len: d.len,
            })?;
        let list = if write {
            &mut self.chain.writable
        } else {
            &mut self.chain.readable
        };
        list.push((d.addr, d.len));
        Ok(())
    }
}

/// `vring_need_event`: whether moving the used index from `old` to `new`
/// passed `event` (all modulo 2^16).
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A split virtqueue, device side.
///
/// The public fields are the transport's registers (queue_size,
/// queue_enable, queue_desc/driver/device, queue_msix_vector); the
/// transport may write them freely, they are validated when used.
#[derive(Clone)]
pub struct SplitQueue {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub msix_vector: u16,
    last_avail: u16,
    used_idx: u16,
    signalled_used: u16,
    signalled_valid: bool,
    event_idx: bool,
    indirect: bool,
    cache: Option<RingCache>,
    broken: Option<QueueError>,
    cache_builds: u64,
}

impl SplitQueue {
    /// A queue of at most `max_size` entries: size = `max_size`, not ready,
    /// no MSI-X vector.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
            msix_vector: super::VIRTIO_MSI_NO_VECTOR,
            last_avail: 0,
            used_idx: 0,
            signalled_used: 0,
            signalled_valid: false,
            event_idx: false,
            indirect: false,
            cache: None,
            broken: None,
            cache_builds: 0,
        }
    }

    /// Back to the [`SplitQueue::new`] state (keeps `max_size`; features
    /// are cleared; the [`SplitQueue::cache_builds`] counter keeps counting).
    pub fn reset(&mut self) {
        let builds = self.cache_builds;
        *self = Self::new(self.max_size);
        self.cache_builds = builds;
    }

    /// Negotiated features (event_idx, indirect), set by the transport at
    /// FEATURES_OK / DRIVER_OK (and after a migration load).
    pub fn set_features(&mut self, event_idx: bool, indirect: bool) {
        self.event_idx = event_idx;
        self.indirect = indirect;
    }

    /// The error that broke the queue, if any (cleared by reset / load).
    pub fn error(&self) -> Option<QueueError> {
        self.broken
    }

    /// How many times the ring cache was (re)built (successfully or not).
    pub fn cache_builds(&self) -> u64 {
        self.cache_builds
    }

    fn geometry(&self) -> Geometry {
        Geometry {
            size: self.size,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
        }
    }

    /// Validates a geometry and resolves its rings in `mem`'s view.
    fn build(&mut self, geo: Geometry, mem: &GuestMemory) -> Result<RingCache, QueueError> {
        if geo.size == 0 || !geo.size.is_power_of_two() || geo.size > self.max_size {
            return Err(QueueError::BadSize { size: geo.size });
        }
        for (what, gpa, align) in [
            (DESC_TABLE, geo.desc, 16),
            (AVAIL_RING, geo.avail, 2),
            (USED_RING, geo.used, 4),
        ] {
            if !gpa.is_multiple_of(align) {
                return Err(QueueError::Misaligned { what, gpa });
            }
        }
        self.cache_builds += 1;
        let n = u64::from(geo.size);
        let resolve = |what, gpa, len, write| {
            mem.resolve(gpa, len, write)
                .map_err(|_| QueueError::RingNotRam { what, gpa, len })
        };
        let rings = Rings {
            geo,
            desc: resolve(DESC_TABLE, geo.desc, 16 * n, false)?,
            avail: resolve(AVAIL_RING, geo.avail, 6 + 2 * n, false)?,
            used: resolve(USED_RING, geo.used, 6 + 8 * n, true)?,
        };
        Ok(RingCache {
            view: Rc::downgrade(mem.view()),
            rings,
        })
    }

    /// The rings for a ring operation: fails if broken or not ready,
    /// rebuilds the cache if the view or the geometry changed (a failed
    /// rebuild breaks the queue).
    fn rings(&mut self, mem: &GuestMemory) -> Result<Rings, QueueError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        if !self.ready {
            return Err(QueueError::NotReady);
        }
        let geo = self.geometry();
        if let Some(c) = &self.cache {
            if c.rings.geo == geo && core::ptr::eq(c.view.as_ptr(), Rc::as_ptr(mem.view())) {
                return Ok(c.rings);
            }
        }
        self.cache = None;
        match self.build(geo, mem) {
            Ok(c) => {
                let r = c.rings;
                self.cache = Some(c);
                Ok(r)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Marks the queue broken with `e`.
    fn fail(&mut self, e: QueueError) -> QueueError {
        self.broken = Some(e);
        e
    }

    /// Driver wrote queue_enable=1: validates size, alignment and that the
    /// rings are RAM of `mem` (the device's bus-master address space), builds
    /// the ring cache, sets ready. On error nothing changes.
    pub fn enable(&mut self, mem: &GuestMemory) -> Result<(), QueueError> {
        let c = self.build(self.geometry(), mem)?;
        self.cache = Some(c);
        self.ready = true;
        Ok(())
    }

    /// The next available chain, or `None` when the ring is empty. Validates
    /// everything of the chain. An error breaks the queue (further
    /// operations return it without touching memory until reset).
    pub fn pop(&mut self, mem: &GuestMemory) -> Result<Option<Chain>, QueueError> {
        let r = self.rings(mem)?;
        match self.pop_inner(&r, mem) {
            Err(e) => Err(self.fail(e)),
            ok => ok,
        }
    }

    /// Entries the driver made available and the device has not popped.
    fn avail_count(&self, r: &Rings, mem: &GuestMemory) -> Result<u16, QueueError> {
        let idx = ring_u16(mem, &r.avail, 2, AVAIL_RING)?;
        let n = idx.wrapping_sub(self.last_avail);
        if n > r.geo.size {
            return Err(QueueError::AvailIndex {
                idx,
                last: self.last_avail,
                size: r.geo.size,
            });
        }
        // Ring entries and descriptors are read after the index.
        fence(Ordering::Acquire);
        Ok(n)
    }

    fn pop_inner(&mut self, r: &Rings, mem: &GuestMemory) -> Result<Option<Chain>, QueueError> {
        if self.avail_count(r, mem)? == 0 {
            return Ok(None);
        }
        let size = r.geo.size;
        let slot = self.last_avail & (size - 1);
        let head = ring_u16(mem, &r.avail, 4 + 2 * u64::from(slot), AVAIL_RING)?;
        if head >= size {
            return Err(QueueError::HeadOutOfRange { head, size });
        }
        let mut b = Builder {
            chain: Chain {
                head,
                ..Chain::default()
            },
            total: 0,
            seen_writable: false,
        };
        let mut index = head;
        let mut count = 0u32;
        loop {
            count += 1;
            if count > u32::from(size) {
                return Err(QueueError::ChainLoop { head });
            }
            let mut raw = [0u8; 16];
            mem.read_span(&r.desc, 16 * u64::from(index), &mut raw)
                .map_err(|_| ring_err(&r.desc, DESC_TABLE))?;
            let d = Desc::parse(&raw);
            if d.flags & DESC_F_INDIRECT != 0 {
                self.walk_indirect(mem, &mut b, &d, size)?;
                break;
            }
            b.add(mem, &d)?;
            if d.flags & DESC_F_NEXT == 0 {
                break;
            }
            if d.next >= size {
                return Err(QueueError::DescOutOfRange {
                    index: d.next,
                    size,
                });
            }
            index = d.next;
        }
        self.last_avail = self.last_avail.wrapping_add(1);
        Ok(Some(b.chain))
    }

    /// Walks the indirect table `d` refers to (the last descriptor of a
    /// chain; its WRITE flag is ignored, §2.7.5.3.2).
    fn walk_indirect(
        &self,
        mem: &GuestMemory,
        b: &mut Builder,
        d: &Desc,
        size: u16,
    ) -> Result<(), QueueError> {
        let head = b.chain.head;
        let bad = |why| Err(QueueError::Indirect { head, why });
        if !self.indirect {
            return bad("VIRTIO_RING_F_INDIRECT_DESC not negotiated");
        }
        if d.flags & DESC_F_NEXT != 0 {
            return bad("INDIRECT together with NEXT");
        }
        if d.len == 0 || !d.len.is_multiple_of(16) {
            return bad("table length not a positive multiple of 16");
        }
        let bound = size.max(INDIRECT_MIN_BOUND);
        if d.len / 16 > u32::from(bound) {
            return bad("table longer than max(queue size, 1024) entries");
        }
        let entries = (d.len / 16) as u16;
        // The whole table is copied once, then only the copy is used.
        let mut table = vec![0u8; d.len as usize];
        mem.read(d.addr, &mut table)
            .map_err(|_| QueueError::BufferNotRam {
                gpa: d.addr,
                len: d.len,
            })?;
        let mut index = 0u16;
        let mut count = 0u32;
        loop {
            count += 1;
            if count > u32::from(entries) {
                return Err(QueueError::ChainLoop { head });
            }
            let at = 16 * usize::from(index);
            let raw: &[u8; 16] = table
                .get(at..at + 16)
                .and_then(|s| s.try_into().ok())
                .ok_or(QueueError::DescOutOfRange {
                    index,
                    size: entries,
                })?;
            let e = Desc::parse(raw);
            if e.flags & DESC_F_INDIRECT != 0 {
                return bad("indirect descriptor inside an indirect table");
            }
            b.add(mem, &e)?;
            if e.flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            if e.next >= entries {
                return Err(QueueError::DescOutOfRange {
                    index: e.next,
                    size: entries,
                });
            }
            index = e.next;
        }
    }

    /// Puts `(head, written)` into the used ring, then publishes `used.idx`.
    /// `head` must be a popped chain's head ([`QueueError::HeadOutOfRange`]
    /// otherwise, which does not break the queue).
    pub fn push(
        &mut self,
        mem: &mut GuestMemory,
        head: u16,
        written: u32,
    ) -> Result<(), QueueError> {
        let r = self.rings(mem)?;
        let size = r.geo.size;
        if head >= size {
            return Err(QueueError::HeadOutOfRange { head, size });
        }
        let slot = self.used_idx & (size - 1);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&written.to_le_bytes());
        let next = self.used_idx.wrapping_add(1);
        let res = mem
            .write_span(&r.used, 4 + 8 * u64::from(slot), &elem)
            .and_then(|()| {
                // The element is visible before the index that publishes it.
                fence(Ordering::Release);
                mem.write_span(&r.used, 2, &next.to_le_bytes())
            });
        if res.is_err() {
            return Err(self.fail(ring_err(&r.used, USED_RING)));
        }
        self.used_idx = next;
        Ok(())
    }

    /// Whether the driver wants an interrupt for what was pushed since the
    /// previous call (false when nothing was pushed since). With EVENT_IDX:
    /// `vring_need_event(used_event, used_idx, previous used_idx)`, and true
    /// the first time after reset; otherwise: `avail.flags` has no
    /// `AVAIL_F_NO_INTERRUPT`. As QEMU and vhost, every call (true or
    /// false) moves the "previous" index.
    pub fn should_notify(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        let r = self.rings(mem)?;
        let (old, valid, new) = (self.signalled_used, self.signalled_valid, self.used_idx);
        if valid && old == new {
            return Ok(false);
        }
        // Our used.idx store is ordered before reading the driver's fields.
        fence(Ordering::SeqCst);
        let size = u64::from(r.geo.size);
        let res = if self.event_idx {
            ring_u16(mem, &r.avail, 4 + 2 * size, AVAIL_RING)
                .map(|event| !valid || need_event(event, new, old))
        } else {
            ring_u16(mem, &r.avail, 0, AVAIL_RING).map(|f| f & AVAIL_F_NO_INTERRUPT == 0)
        };
        match res {
            Ok(v) => {
                self.signalled_used = new;
                self.signalled_valid = true;
                Ok(v)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Asks the driver to notify for the next buffer it makes available.
    /// With EVENT_IDX: writes `avail_event` = the device's next index;
    /// without it: clears `USED_F_NO_NOTIFY`. The driver may have added
    /// buffers meanwhile: call [`SplitQueue::has_available`] afterwards.
    pub fn enable_notification(&mut self, mem: &mut GuestMemory) -> Result<(), QueueError> {
        if self.event_idx {
            let v = self.last_avail;
            self.write_used_u16(mem, UsedField::AvailEvent, v)
        } else {
            self.write_used_u16(mem, UsedField::Flags, 0)
        }
    }

    /// Asks the driver not to notify (without EVENT_IDX: sets
    /// `USED_F_NO_NOTIFY`; with it, nothing is written, as QEMU: the driver
    /// notifies at most once more after `avail_event`).
    pub fn disable_notification(&mut self, mem: &mut GuestMemory) -> Result<(), QueueError> {
        if self.event_idx {
            self.rings(mem).map(|_| ())
        } else {
            self.write_used_u16(mem, UsedField::Flags, USED_F_NO_NOTIFY)
        }
    }

    fn write_used_u16(
        &mut self,
        mem: &mut GuestMemory,
        field: UsedField,
        v: u16,
    ) -> Result<(), QueueError> {
        let r = self.rings(mem)?;
        let off = match field {
            UsedField::Flags => 0,
            UsedField::AvailEvent => 4 + 8 * u64::from(r.geo.size),
        };
        if mem.write_span(&r.used, off, &v.to_le_bytes()).is_err() {
            return Err(self.fail(ring_err(&r.used, USED_RING)));
        }
        // Visible before the device re-reads avail.idx.
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Whether there are available buffers not yet popped.
    pub fn has_available(&mut self, mem: &GuestMemory) -> Result<bool, QueueError> {
        let r = self.rings(mem)?;
        match self.avail_count(&r, mem) {
            Ok(n) => Ok(n != 0),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// The migratable state.
    pub fn state(&self) -> QueueState {
        QueueState {
            size: self.size,
            ready: self.ready,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
            msix_vector: self.msix_vector,
            last_avail: self.last_avail,
            used_idx: self.used_idx,
            signalled_used: self.signalled_used,
            signalled_valid: self.signalled_valid,
        }
    }

    /// Takes a saved state without reading memory (a migration load, where
    /// the memory map is complete only later); [`SplitQueue::post_load`]
    /// then checks the rings and builds the cache.
    pub fn restore(&mut self, s: &QueueState) {
        self.size = s.size;
        self.ready = s.ready;
        self.desc = s.desc;
        self.avail = s.avail;
        self.used = s.used;
        self.msix_vector = s.msix_vector;
        self.last_avail = s.last_avail;
        self.used_idx = s.used_idx;
        self.signalled_used = s.signalled_used;
        self.signalled_valid = s.signalled_valid;
        self.cache = None;
        self.broken = None;
    }

    /// After [`SplitQueue::restore`]: a ready queue's rings are checked in
    /// `mem` (the device's address space as the loaded state maps it) and
    /// resolved into the ring cache.
    pub fn post_load(&mut self, mem: &GuestMemory) -> Result<(), QueueError> {
        if self.ready {
            self.cache = Some(self.build(self.geometry(), mem)?);
        }
        Ok(())
    }

    /// Replaces the state (migration load). A ready queue is validated and
    /// its ring cache built against `mem` (errors as [`SplitQueue::enable`]);
    /// a queue that is not ready keeps whatever register values it had. On
    /// error nothing changed. Features are not part of the state: the
    /// transport calls [`SplitQueue::set_features`]. Clears a broken state
    /// (a still-malformed ring is found again by the next operation).
    pub fn load_state(&mut self, s: &QueueState, mem: &GuestMemory) -> Result<(), QueueError> {
        let cache = if s.ready {
            let geo = Geometry {
                size: s.size,
                desc: s.desc,
                avail: s.avail,
                used: s.used,
            };
            Some(self.build(geo, mem)?)
        } else {
            None
        };
        self.restore(s);
        self.cache = cache;
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum UsedField {
    Flags,
    AvailEvent,
}

/// A ring access that failed although the span was validated (cannot
/// happen unless the span is wrong): reported as the ring not being RAM.
fn ring_err(s: &RamSpan, what: &'static str) -> QueueError {
    QueueError::RingNotRam {
        what,
        gpa: s.gpa,
        len: s.len,
    }
}

fn ring_u16(
    mem: &GuestMemory,
    s: &RamSpan,
    off: u64,
    what: &'static str,
) -> Result<u16, QueueError> {
    let mut b = [0u8; 2];
    mem.read_span(s, off, &mut b)
        .map_err(|_| ring_err(s, what))?;
    Ok(u16::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::HostPhysAddr;
    use crate::ept_listener::RamBlock;
    use crate::memory::{AddressSpaceId, MemorySystem, MmioHandle, RamBacking, RegionId};
    use crate::phys::PhysAccess;
    use proptest::prelude::*;

    /// Guest layout: RAM, then ROM right after it (so a buffer can straddle
    /// the two), an MMIO page, and 4 GiB of RAM high up whose host memory
    /// is never backed (for length-overflow cases; it reads as zeroes).
    const RAM: u64 = 0x1_0000;
    const RAM_SIZE: u64 = 0x1_0000;
    const ROM: u64 = RAM + RAM_SIZE;
    const ROM_SIZE: u64 = 0x1000;
    const MMIO: u64 = 0x3_0000;
    const BIG: u64 = 1 << 32;
    const BIG_SIZE: u64 = 1 << 32;
    /// Where the test driver puts its rings, data and indirect tables.
    const RING: u64 = RAM + 0x1000;
    const DATA: u64 = RAM + 0x8000;
    const TABLES: u64 = RAM + 0x4000;

    /// Host memory: a `Vec`; bytes past it read as zero and ignore writes.
    struct SparsePhys(Vec<u8>);

    impl PhysAccess for SparsePhys {
        fn read(&self, addr: HostPhysAddr, buf: &mut [u8]) {
            let a = addr.as_u64() as usize;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.0.get(a + i).copied().unwrap_or(0);
            }
        }
        fn write(&mut self, addr: HostPhysAddr, data: &[u8]) {
            let a = addr.as_u64() as usize;
            for (i, &b) in data.iter().enumerate() {
                if let Some(x) = self.0.get_mut(a + i) {
                    *x = b;
                }
            }
        }
    }

    struct Sys {
        mem: MemorySystem,
        space: AddressSpaceId,
        sys: RegionId,
        ram: RegionId,
        overlay: RegionId,
        phys: SparsePhys,
        blocks: Vec<RamBlock>,
    }

    impl Sys {
        fn new() -> Self {
            let mut mem = MemorySystem::new();
            let sys = mem.create_container("sys", 1 << 40).unwrap();
            let backing = |block| RamBacking { block, offset: 0 };
            let ram = mem.create_ram("ram", RAM_SIZE.into(), backing(0)).unwrap();
            let rom = mem.create_rom("rom", ROM_SIZE.into(), backing(1)).unwrap();
            let io = mem.create_mmio("io", 0x1000, MmioHandle(0)).unwrap();
            let overlay = mem
                .create_ram("overlay", RAM_SIZE.into(), backing(2))
                .unwrap();
            let big = mem.create_ram("big", BIG_SIZE.into(), backing(3)).unwrap();
            mem.add_subregion(sys, RAM, ram).unwrap();
            mem.add_subregion(sys, ROM, rom).unwrap();
            mem.add_subregion(sys, MMIO, io).unwrap();
            mem.add_subregion(sys, BIG, big).unwrap();
            let space = mem.create_address_space("memory", sys).unwrap();
            let block = |hpa, size| RamBlock {
                hpa: HostPhysAddr::new(hpa),
                size,
            };
            let blocks = vec![
                block(0x1_0000, RAM_SIZE),
                block(0x3_0000, ROM_SIZE),
                block(0x4_0000, RAM_SIZE),
                block(0x10_0000, BIG_SIZE),
            ];
            Self {
                mem,
                space,
                sys,
                ram,
                overlay,
                phys: SparsePhys(vec![0; 0x10_0000]),
                blocks,
            }
        }

        fn gm(&mut self) -> GuestMemory<'_> {
            let view = self.mem.flat_view(self.space).unwrap();
            GuestMemory::new(view, &self.blocks, &mut self.phys)
        }
    }

    fn w16(g: &mut GuestMemory, gpa: u64, v: u16) {
        g.write(gpa, &v.to_le_bytes()).unwrap();
    }

    fn r16(g: &GuestMemory, gpa: u64) -> u16 {
        g.read_obj::<u16>(gpa).unwrap()
    }

    fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..].copy_from_slice(&next.to_le_bytes());
        b
    }

    /// A minimal driver: lays out the rings, writes descriptors, makes
    /// chains available and reads what the device used.
    struct Driver {
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        next_desc: u16,
        avail_idx: u16,
    }

    impl Driver {
        /// Rings for `size` entries at `base`, zeroed.
        fn new(g: &mut GuestMemory, size: u16, base: u64) -> Self {
            let n = u64::from(size);
            let avail = base + 16 * n;
            let used = (avail + 6 + 2 * n + 3) & !3;
            g.write(base, &vec![0; (used + 6 + 8 * n - base) as usize])
                .unwrap();
            Self {
                size,
                desc: base,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        fn configure(&self, q: &mut SplitQueue) {
            q.size = self.size;
            q.desc = self.desc;
            q.avail = self.avail;
            q.used = self.used;
        }

        fn write_desc(
            &self,
            g: &mut GuestMemory,
            i: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            g.write(
                self.desc + 16 * u64::from(i),
                &desc_bytes(addr, len, flags, next),
            )
            .unwrap();
        }

        fn set_avail_idx(&mut self, g: &mut GuestMemory, v: u16) {
            self.avail_idx = v;
            w16(g, self.avail + 2, v);
        }

        /// Puts `head` in the next available slot and publishes it.
        fn publish(&mut self, g: &mut GuestMemory, head: u16) {
            let slot = u64::from(self.avail_idx % self.size);
            w16(g, self.avail + 4 + 2 * slot, head);
            self.set_avail_idx(g, self.avail_idx.wrapping_add(1));
        }

        /// A direct chain of `(addr, len, device-writable)` buffers in
        /// consecutive descriptors; returns its head.
        fn chain(&mut self, g: &mut GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (k, &(addr, len, write)) in bufs.iter().enumerate() {
                let i = (head + k as u16) % self.size;
                let last = k + 1 == bufs.len();
                let flags =
                    if write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
                self.write_desc(g, i, addr, len, flags, (i + 1) % self.size);
            }
            self.next_desc = (head + bufs.len() as u16) % self.size;
            self.publish(g, head);
            head
        }

        /// One descriptor referring to an indirect table at `table` that
        /// holds the buffers; returns its head.
        fn indirect(&mut self, g: &mut GuestMemory, table: u64, bufs: &[(u64, u32, bool)]) -> u16 {
            for (k, &(addr, len, write)) in bufs.iter().enumerate() {
                let last = k + 1 == bufs.len();
                let flags =
                    if write { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
                g.write(
                    table + 16 * k as u64,
                    &desc_bytes(addr, len, flags, k as u16 + 1),
                )
                .unwrap();
            }
            let head = self.next_desc;
            self.write_desc(g, head, table, 16 * bufs.len() as u32, DESC_F_INDIRECT, 0);
            self.next_desc = (head + 1) % self.size;
            self.publish(g, head);
            head
        }

        fn used_idx(&self, g: &GuestMemory) -> u16 {
            r16(g, self.used + 2)
        }

        fn used_flags(&self, g: &GuestMemory) -> u16 {
            r16(g, self.used)
        }

        fn used_elem(&self, g: &GuestMemory, i: u16) -> (u32, u32) {
            let at = self.used + 4 + 8 * u64::from(i % self.size);
            (g.read_obj(at).unwrap(), g.read_obj(at + 4).unwrap())
        }

        fn avail_event(&self, g: &GuestMemory) -> u16 {
            r16(g, self.used + 4 + 8 * u64::from(self.size))
        }

        fn set_used_event(&self, g: &mut GuestMemory, v: u16) {
            w16(g, self.avail + 4 + 2 * u64::from(self.size), v);
        }

        fn set_avail_flags(&self, g: &mut GuestMemory, v: u16) {
            w16(g, self.avail, v);
        }
    }

    /// An enabled queue of 8 entries at RING with the given features.
    fn queue(g: &mut GuestMemory, event_idx: bool, indirect: bool) -> (SplitQueue, Driver) {
        let d = Driver::new(g, 8, RING);
        let mut q = SplitQueue::new(8);
        q.set_features(event_idx, indirect);
        d.configure(&mut q);
        q.enable(g).unwrap();
        (q, d)
    }

    #[test]
    fn a_chain_is_read_written_and_used() {
        let mut s = Sys::new();
        let mut g = s.gm();
        let (mut q, mut d) = queue(&mut g, false, false);
        assert!(!q.has_available(&g).unwrap());
        assert_eq!(q.pop(&g), Ok(None));
        g.write(DATA, b"hello ").unwrap();
        g.write(DATA + 0x100, b"world").unwrap();
        let head = d.chain(
            &mut g,
            &[
                (DATA, 6, false),
                (DATA + 0x100, 5, false),
                (DATA + 0x200, 3, true),
                (DATA + 0x300, 4, true),
            ],
        );
        assert!(q.has_available(&g).unwrap());
        let c = q.pop(&g).unwrap().unwrap();
        assert_eq!(
            c,
            Chain {
                head,
                readable: vec![(DATA, 6), (DATA + 0x100, 5)],
                writable: vec![(DATA + 0x200, 3), (DATA + 0x300, 4)],
            }
        );
        assert_eq!((c.readable_len(), c.writable_len()), (11, 7));
        assert_eq!(c.read_all(&g, 100).unwrap(), b"hello world");
        assert_eq!(c.read_all(&g, 4).unwrap(), b"hell");
        let mut b = [0; 4];
        c.read_at(&g, 4, &mut b).unwrap();
        assert_eq!(&b, b"o wo", "a read across two buffers");
        assert_eq!(
            c.read_at(&g, 8, &mut b),
            Err(QueueError::ChainTooShort {
                head,
                need: 12,
                have: 11
            })
        );
        assert_eq!(
            c.read_at(&g, u64::MAX, &mut b),
            Err(QueueError::ChainTooShort {
                head,
                need: u64::MAX,
                have: 11
            })
        );
        // Writes cross buffers and stop at the end of the writable part.
        assert_eq!(c.write_at(&mut g, 1, b"ABCDEFGHIJ").unwrap(), 6);
        let mut w = [0; 8];
        g.read(DATA + 0x200, &mut w[..3]).unwrap();
        g.read(DATA + 0x300, &mut w[3..7]).unwrap();
        assert_eq!(&w[..7], b"\0ABCDEF");
        assert_eq!(c.write_at(&mut g, 7, b"x").unwrap(), 0);
        assert_eq!(c.write_at(&mut g, 2, b"").unwrap(), 0);
        assert_eq!(q.pop(&g), Ok(None));
        assert!(!q.has_available(&g).unwrap());

        q.push(&mut g, head, 7).unwrap();
        assert_eq!(d.used_idx(&g), 1);
        assert_eq!(d.used_elem(&g, 0), (u32::from(head), 7));
        assert!(q.should_notify(&g).unwrap());
        assert!(!q.should_notify(&g).unwrap(), "nothing pushed since");
        assert_eq!(
            q.push(&mut g, 8, 0),
            Err(QueueError::HeadOutOfRange { head: 8, size: 8 })
        );
        assert_eq!(
            q.error(),
            None,
            "a device's bad push does not break the queue"
        );

        // Descriptors are reused around the table; the rings wrap.
        for round in 0..20u32 {
            let h = d.chain(&mut g, &[(DATA, 2, false), (DATA + 0x10, 1, true)]);
            let c = q.pop(&g).unwrap().unwrap();
            assert_eq!(c.head, h);
            assert_eq!(c.readable, vec![(DATA, 2)]);
            q.push(&mut g, h, round).unwrap();
            assert_eq!(
                d.used_elem(&g, d.used_idx(&g).wrapping_sub(1)),
                (u32::from(h), round)
            );
        }
        assert_eq!(d.used_idx(&g), 21);
        assert_eq!(q.state().last_avail, 21);
    }

    #[test]
    fn ring_accesses_use_the_cache_not_the_flat_view() {
        let mut s = Sys::new();
        let mut g = s.gm();
        let (mut q, mut d) = queue(&mut g, true, false);
        let head = d.chain(
            &mut g,
            &[(DATA, 1, false), (DATA + 8, 1, true), (DATA + 16, 1, true)],
        );
        let before = g.lookups();
        assert!(q.has_available(&g).unwrap());
        assert_eq!(g.lookups(), before);
        q.pop(&g).unwrap().unwrap();
        assert_eq!(
            g.lookups(),
            before + 3,
            "one lookup per buffer, none for the rings"
        );
        q.push(&mut g, head, 1).unwrap();
        q.should_notify(&g).unwrap();
        q.enable_notification(&mut g).unwrap();
        q.disable_notification(&mut g).unwrap();
        assert!(!q.has_available(&g).unwrap());
        assert_eq!(g.lookups(), before + 3);
        assert_eq!(q.cache_builds(), 1);
    }

    #[test]
    fn chains_of_the_full_table_size_are_accepted_and_one_more_is_a_loop() {
        let mut s = Sys::new();
        let mut g = s.gm();
        let (mut q, mut d) = queue(&mut g, false, false);
        let bufs: Vec<_> = (0..8).map(|i| (DATA + i, 1, i >= 5)).collect();
        d.chain(&mut g, &bufs);
        let c = q.pop(&g).unwrap().unwrap();
        assert_eq!((c.readable.len(), c.writable.len()), (5, 3));
        // 0 -> 1 -> ... -> 7 -> 0: a loop through the whole table.
        let head = d.chain(&mut g, &bufs);
        d.write_desc(&mut g, 7, DATA, 1, DESC_F_NEXT | DESC_F_WRITE, 0);
        assert_eq!(q.pop(&g), Err(QueueError::ChainLoop { head }));
    }

    #[test]
    fn indirect_tables_are_walked_after_direct_descriptors() {
        let mut s = Sys::new();
        let mut g = s.gm();
        let (mut q, mut d) = queue(&mut g, false, true);
        g.write(DATA, b"abcdef").unwrap();
        let head = d.indirect(
            &mut g,
            TABLES,
            &[
                (DATA, 2, false),
                (DATA + 2, 4, false),
                (DATA + 0x100, 8, true),
            ],
        );
        let c = q.pop(&g).unwrap().unwrap();
        assert_eq!(c.head, head);
        assert_eq!(c.readable, vec![(DATA, 2), (DATA + 2, 4)]);
        assert_eq!(c.writable, vec![(DATA + 0x100, 8)]);
        assert_eq!(c.read_all(&g, 64).unwrap(), b"abcdef");

        // Table entries linked out of order: 0 -> 2 -> 1. A direct readable
        // descriptor first, then the indirect one (with a WRITE flag that
        // must be ignored).
        let t = TABLES + 0x100;
        g.write(t, &desc_bytes(DATA + 1, 1, DESC_F_NEXT, 2))
            .unwrap();
        g.write(t + 16, &desc_bytes(DATA + 3, 3, DESC_F_WRITE, 0))
            .unwrap();
        g.write(
            t + 32,
            &desc_bytes(DATA + 2, 2, DESC_F_NEXT | DESC_F_WRITE, 1),
        )
        .unwrap();
        let h = d.next_desc;
        d.write_desc(&mut g, h, DATA + 0x40, 5, DESC_F_NEXT, h + 1);
        d.write_desc(&mut g, h + 1, t, 48, DESC_F_INDIRECT | DESC_F_WRITE, 0);
        d.publish(&mut g, h);
        let c = q.pop(&g).unwrap().unwrap();
        assert_eq!(c.readable, vec![(DATA + 0x40, 5), (DATA + 1, 1)]);
        assert_eq!(c.writable, vec![(DATA + 2, 2), (DATA + 3, 3)]);
        // The table was copied once: changing it now changes nothing.
        assert_eq!(q.pop(&g), Ok(None));
    }

    /// Sets up a queue (8 entries; features), lets `f` write the driver's
    /// side, pops, and checks that the error sticks: a second pop returns it
    /// without any memory access, and ring operations all fail.
    fn pop_error(
        event_idx: bool,
        indirect: bool,
        f: impl FnOnce(&mut GuestMemory, &mut Driver),
    ) -> QueueError {
        let mut s = Sys::new();
        let mut g = s.gm();
        let (mut q, mut d) = queue(&mut g, event_idx, indirect);
        f(&mut g, &mut d);
        let e = q.pop(&g).unwrap_err();
        assert_eq!(q.error(), Some(e));
        let before = g.lookups();
        assert_eq!(q.pop(&g), Err(e));
        assert_eq!(q.has_available(&g), Err(e));
        assert_eq!(q.push(&mut g, 0, 0), Err(e));
        assert_eq!(q.should_notify(&g), Err(e));
        assert_eq!(q.enable_notification(&mut g), Err(e));
        assert_eq!(g.lookups(), before);
        assert_eq!(d.used_idx(&g), 0, "nothing was used");
        // Reset and re-enable make it usable again.
        q.reset();
        assert_eq!(q.pop(&g), Err(QueueError::NotReady));
        q.set_features(event_idx, indirect);
        let d2 = Driver::new(&mut g, 8, RING + 0x800);
        d2.configure(&mut q);
        q.enable(&g).unwrap();
        assert_eq!(q.pop(&g), Ok(None));
        e
    }

    #[test]
    fn malformed_rings_break_the_queue() {
        use QueueError::*;
        let e = pop_error(false, false, |g, d| d.set_avail_idx(g, 9));
        assert_eq!(
            e,
            AvailIndex {
                idx: 9,
                last: 0,
                size: 8
            }
        );
        let e = pop_error(false, false, |g, d| d.set_avail_idx(g, 0xFFFF));
        assert_eq!(
            e,
            AvailIndex {
                idx: 0xFFFF,
                last: 0,
                size: 8
            }
        );
        let e = pop_error(false, false, |g, d| d.publish(g, 8));
        assert_eq!(e, HeadOutOfRange { head: 8, size: 8 });
        let e = pop_error(false, false, |g, d| {
            d.write_desc(g, 3, DATA, 4, DESC_F_NEXT, 8);
            d.publish(g, 3);
        });
        assert_eq!(e, DescOutOfRange { index: 8, size: 8 });
        let e = pop_error(false, false, |g, d| {
            d.write_desc(g, 2, DATA, 4, DESC_F_NEXT, 5);
            d.write_desc(g, 5, DATA, 4, DESC_F_NEXT, 2);
            d.publish(g, 2);
        });
        assert_eq!(e, ChainLoop { head: 2 });
    }

    #[test]
    fn buffers_must_be_ram_and_writable_ones_writable_ram() {
        use QueueError::*;
        let bad = |bufs: &'static [(u64, u32, bool)]| {
            pop_error(false, false, |g, d| {
                d.chain(g, bufs);
            })
        };
        assert_eq!(bad(&[(MMIO, 4, false)]), BufferNotRam { gpa: MMIO, len: 4 });
        assert_eq!(
            bad(&[(DATA, 4, false), (ROM, 4, true)]),
            BufferNotRam { gpa: ROM, len: 4 }
        );
        assert_eq!(
            bad(&[(ROM - 2, 4, true)]),
            BufferNotRam {
                gpa: ROM - 2,
                len: 4
            },
            "straddles RAM and ROM"
        );
        assert_eq!(
            bad(&[(ROM + ROM_SIZE - 2, 4, false)]),
            BufferNotRam {
                gpa: ROM + ROM_SIZE - 2,
                len: 4
            }
        );
        assert_eq!(bad(&[(u64::MAX - 1, 4, false)]), LengthOverflow { head: 0 });
        assert_eq!(
            bad(&[(BIG, 0x8000_0000, false), (BIG, 0x8000_0000, true)]),
            LengthOverflow { head: 0 }
        );
        assert_eq!(
            bad(&[(DATA, 4, true), (DATA, 4, false)]),
            ReadableAfterWritable { head: 0 }
        );
        assert_eq!(
            bad(&[(DATA, 4, true), (DATA, 0, false)]),
            ReadableAfterWritable { head: 0 },
            "order is checked for empty descriptors too"
        );

        // Readable buffers may be ROM (or straddle RAM and ROM); a chain of
        // exactly 4 GiB - 1 is fine; empty descriptors are not listed.
        let mut s = Sys::new();
        let mut g = s.gm();
        let (mut q, mut d) = queue(&mut g, false, false);
        d.chain(
            &mut g,
            &[(ROM - 2, 4, false), (MMIO, 0, false), (DATA, 0, true)],
        );
        let c = q.pop(&g).unwrap().unwrap();
        assert_eq!((c.readable, c.writable), (vec![(ROM - 2, 4)], vec![]));
        d.chain(&mut g, &[(BIG, 0xFFFF_FFF0, false), (BIG, 0xF, true)]);
        let c = q.pop(&g).unwrap().unwrap();
        assert_eq!(c.readable_len() + c.writable_len(), u64::from(u32::MAX));
    }

    #[test]
    fn malformed_indirect_descriptors_break_the_queue() {
        use QueueError::*;
        let why = |e: QueueError| match e {
            Indirect { head: 0, why } => why,
            e => panic!("not an indirect error: {e:?}"),
        };
        // Without the feature.
        let e = pop_error(false, false, |g, d| {
            d.indirect(g, TABLES, &[(DATA, 4, false)]);
        });
        assert!(why(e).contains("not negotiated"));
        let with_desc = |addr, len, flags| {
            pop_error(false, true, move |g, d| {
                g.write(TABLES, &desc_bytes(DATA, 4, 0, 0)).unwrap();
                d.write_desc(g, 0, addr, len, flags, 1);
                d.publish(g, 0);
            })
        };
        assert!(why(with_desc(TABLES, 16, DESC_F_INDIRECT | DESC_F_NEXT)).contains("NEXT"));
        assert!(why(with_desc(TABLES, 0, DESC_F_INDIRECT)).contains("multiple of 16"));
        assert!(why(with_desc(TABLES, 17, DESC_F_INDIRECT)).contains("multiple of 16"));
        assert!(why(with_desc(TABLES, 16 * 1025, DESC_F_INDIRECT)).contains("longer"));
        assert_eq!(
            with_desc(MMIO, 32, DESC_F_INDIRECT),
            BufferNotRam { gpa: MMIO, len: 32 }
        );
        // 1024 entries are allowed on an 8-entry ring (zeroed entries: one
        // empty readable buffer).
        let mut s = Sys::new();
        let mut g = s.gm();
        let (mut q, mut d) = queue(&mut g, false, true);
        g.write(TABLES, &[0; 16 * 1024]).unwrap();
        d.write_desc(&mut g, 0, TABLES, 16 * 1024, DESC_F_INDIRECT, 0);
        d.publish(&mut g, 0);
        assert_eq!(q.pop(&g).unwrap().unwrap(), Chain::default());

        let e = pop_error(false, true, |g, d| {
            d.indirect(g, TABLES, &[(DATA, 4, false), (TABLES, 16, false)]);
            // The second entry refers to a table itself.
            g.write(TABLES + 16, &desc_bytes(TABLES, 16, DESC_F_INDIRECT, 0))
                .unwrap();
        });
        assert!(why(e).contains("inside an indirect table"));
        let e = pop_error(false, true, |g, d| {
            d.indirect(g, TABLES, &[(DATA, 4, false), (DATA, 4, false)]);
            g.write(TABLES, &desc_bytes(DATA, 4, DESC_F_NEXT, 2))
                .unwrap();
        });
        assert_eq!(e, DescOutOfRange { index: 2, size: 2 });
        // The bad index comes at the last entry the walk may visit.
        let e = pop_error(false, true, |g, d| {
            d.indirect(g, TABLES, &[(DATA, 4, false), (DATA, 4, false)]);
            g.write(TABLES + 16, &desc_bytes(DATA, 4, DESC_F_NEXT, 2))
                .unwrap();
        });
        assert_eq!(e, DescOutOfRange { index: 2, size: 2 });
        let e = pop_error(false, true, |g, d| {
            d.indirect(g, TABLES, &[(DATA, 4, false), (DATA, 4, false)]);
            g.write(TABLES + 16, &desc_bytes(DATA, 4, DESC_F_NEXT, 0))
                .unwrap();
        });
        assert_eq!(e, ChainLoop { head: 0 });
        let e = pop_error(false, true, |g, d| {
            d.indirect(g, TABLES, &[(DATA, 4, true), (DATA, 4, false)]);
        });
        assert_eq!(e, ReadableAfterWritable { head: 0 });
        let e = pop_error(false, true, |g, d| {
            // A writable direct descriptor, then a table with a readable one.
            g.write(TABLES, &desc_bytes(DATA, 4, 0, 0)).unwrap();
            d.write_desc(g, 0, DATA, 4, DESC_F_WRITE | DESC_F_NEXT, 1);
            d.write_desc(g, 1, TABLES, 16, DESC_F_INDIRECT, 0);
            d.publish(g, 0);
        });
        assert_eq!(e, ReadableAfterWritable { head: 0 });
        let e = pop_error(false, true, |g, d| {
            d.indirect(g, TABLES, &[(DATA, 4, false), (MMIO, 8, false)]);
        });
        assert_eq!(e, BufferNotRam { gpa: MMIO, len: 8 });
    }

    #[test]
    fn enable_validates_size_alignment_and_ring_memory() {
        use QueueError::*;
        let mut s = Sys::new();
        let mut g = s.gm();
        let d = Driver::new(&mut g, 8, RING);
        let try_enable = |g: &GuestMemory, f: &dyn Fn(&mut SplitQueue)| {
            let mut q = SplitQueue::new(8);
            d.configure(&mut q);
            f(&mut q);
            let r = q.enable(g);
            assert_eq!(q.ready, r.is_ok());
            // A failed enable leaves the queue not ready (and not broken).
            let popped = q.pop(g);
            if r.is_ok() {
                assert_eq!(popped, Ok(None));
            } else {
                assert_eq!(popped, Err(NotReady));
                assert_eq!(q.error(), None);
            }
            r
        };
        assert_eq!(try_enable(&g, &|_| {}), Ok(()));
        assert_eq!(try_enable(&g, &|q| q.size = 4), Ok(()));
        assert_eq!(try_enable(&g, &|q| q.size = 0), Err(BadSize { size: 0 }));
        assert_eq!(try_enable(&g, &|q| q.size = 6), Err(BadSize { size: 6 }));
        assert_eq!(try_enable(&g, &|q| q.size = 16), Err(BadSize { size: 16 }));
        assert_eq!(
            try_enable(&g, &|q| q.desc += 8),
            Err(Misaligned {
                what: DESC_TABLE,
                gpa: RING + 8
            })
        );
        assert_eq!(
            try_enable(&g, &|q| q.avail += 1),
            Err(Misaligned {
                what: AVAIL_RING,
                gpa: d.avail + 1
            })
        );
        assert_eq!(
            try_enable(&g, &|q| q.used += 2),
            Err(Misaligned {
                what: USED_RING,
                gpa: d.used + 2
            })
        );
        assert_eq!(
            try_enable(&g, &|q| q.desc = MMIO),
            Err(RingNotRam {
                what: DESC_TABLE,
                gpa: MMIO,
                len: 128
            })
        );
        // The used ring must be writable; the driver's rings may be ROM.
        assert_eq!(
            try_enable(&g, &|q| q.used = ROM),
            Err(RingNotRam {
                what: USED_RING,
                gpa: ROM,
                len: 70
            })
        );
        assert_eq!(try_enable(&g, &|q| q.avail = ROM), Ok(()));
        // RAM then ROM is two blocks: not one contiguous span.
        assert_eq!(
            try_enable(&g, &|q| q.avail = ROM - 4),
            Err(RingNotRam {
                what: AVAIL_RING,
                gpa: ROM - 4,
                len: 22
            })
        );
        assert_eq!(
            try_enable(&g, &|q| q.used = u64::MAX - 3),
            Err(RingNotRam {
                what: USED_RING,
                gpa: u64::MAX - 3,
                len: 70
            })
        );
    }

    #[test]
    fn not_ready_queues_refuse_everything_without_breaking() {
        let mut s = Sys::new();
        let mut g = s.gm();
        let d = Driver::new(&mut g, 8, RING);
        let mut q = SplitQueue::new(8);
        assert_eq!((q.size, q.msix_vector, q.ready), (8, 0xFFFF, false));
        d.configure(&mut q);
        assert_eq!(q.pop(&g), Err(QueueError::NotReady));
        assert_eq!(q.push(&mut g, 0, 0), Err(QueueError::NotReady));
        assert_eq!(q.should_notify(&g), Err(QueueError::NotReady));
        assert_eq!(q.has_available(&g), Err(QueueError::NotReady));
        assert_eq!(q.enable_notification(&mut g), Err(QueueError::NotReady));
        assert_eq!(q.error(), None);
        assert_eq!(q.cache_builds(), 0);
        q.enable(&g).unwrap();
        assert_eq!(q.pop(&g), Ok(None));
        // A transport that sets `ready` itself gets a cache built on use.
        let mut q2 = SplitQueue::new(8);
        d.configure(&mut q2);
        q2.ready = true;
        assert_eq!(q2.pop(&g), Ok(None));
        assert_eq!(q2.cache_builds(), 1);
    }

    #[test]
    fn need_event_matches_the_interval_definition() {
        // The driver wants an interrupt when the entry at `event` was
        // written, i.e. event is one of old, old+1, ..., new-1 (mod 2^16).
        let naive = |event: u16, new: u16, old: u16| {
            let n = new.wrapping_sub(old);
            (0..n).any(|k| old.wrapping_add(k) == event)
        };
        for &(event, new, old) in &[
            (0u16, 1u16, 0u16),
            (0, 0, 0),
            (5, 5, 3),
            (4, 5, 3),
            (3, 5, 3),
            (2, 5, 3),
            (0xFFFF, 0, 0xFFFE),
            (0xFFFF, 1, 0xFFFF),
            (0, 1, 0xFFFF),
            (1, 1, 0xFFFF),
            (0xFFFE, 0, 0xFFFF),
        ] {
            assert_eq!(
                need_event(event, new, old),
                naive(event, new, old),
                "{event} {new} {old}"
            );
        }
        assert!(need_event(0xFFFF, 0, 0xFFFE));
        assert!(!need_event(0xFFFE, 0, 0xFFFF));
    }

    proptest! {
        #[test]
        fn need_event_matches_the_interval_definition_everywhere(event: u16, old: u16, n in 0u16..300) {
            let new = old.wrapping_add(n);
            let naive = (0..n).any(|k| old.wrapping_add(k) == event);
            prop_assert_eq!(need_event(event, new, old), naive);
        }
    }

    #[test]
    fn event_idx_suppresses_interrupts_until_used_event_is_passed() {
        let mut s = Sys::new();
        let mut g = s.gm();
        let (mut q, mut d) = queue(&mut g, true, false);
        let mut heads = Vec::new();
        for _ in 0..8 {
            heads.push(d.chain(&mut g, &[(DATA, 4, true)]));
        }
        for _ in 0..8 {
            q.pop(&g).unwrap().unwrap();
        }
        // avail.flags is ignored with EVENT_IDX.
        d.set_avail_flags(&mut g, AVAIL_F_NO_INTERRUPT);
        d.set_used_event(&mut g, 0x100);
        q.push(&mut g, heads[0], 4).unwrap();
        assert!(q.should_notify(&g).unwrap(), "first time after reset");
        d.set_used_event(&mut g, 2);
        q.push(&mut g, heads[1], 4).unwrap(); // used idx 2
        assert!(!q.should_notify(&g).unwrap());
        q.push(&mut g, heads[2], 4).unwrap(); // entry 2 written: idx 3
        assert!(q.should_notify(&g).unwrap());
        assert!(!q.should_notify(&g).unwrap());
        q.push(&mut g, heads[3], 4).unwrap(); // idx 4: 2 already passed
        assert!(!q.should_notify(&g).unwrap());
        d.set_used_event(&mut g, 5);
        for h in &heads[4..7] {
            q.push(&mut g, *h, 4).unwrap(); // idx 7, passing 5 in the batch
        }
        assert!(q.should_notify(&g).unwrap());
        let st = q.state();
        assert_eq!(
            (st.used_idx, st.signalled_used, st.signalled_valid),
            (7, 7, true)
        );

        // enable_notification publishes the next index as avail_event.
        q.enable_notification(&mut g).unwrap();
        assert_eq!(d.avail_event(&g), 8);
        assert_eq!(d.used_flags(&g), 0, "used.flags untouched with EVENT_IDX");
        q.disable_notification(&mut g).unwrap();
        assert_eq!(d.used_flags(&g), 0);
    }

    #[test]
    fn event_idx_wraps_at_2_16() {
        let mut s = Sys::new();
        let mut g = s.gm();
        let (mut q, mut d) = queue(&mut g, true, false);
        let mut st = q.state();
        st.last_avail = 0xFFFE;
        st.used_idx = 0xFFFE;
        st.signalled_used = 0xFFFE;
        st.signalled_valid = true;
        q.load_state(&st, &g).unwrap();
        d.set_avail_idx(&mut g, 0xFFFE);
        let heads: Vec<u16> = (0..3)
            .map(|_| d.chain(&mut g, &[(DATA, 1, true)]))
            .collect();
        assert_eq!(r16(&g, d.avail + 2), 1, "avail.idx wrapped");
        for &h in &heads {
            assert_eq!(q.pop(&g).unwrap().unwrap().head, h);
        }
        assert_eq!(q.pop(&g), Ok(None));
        q.enable_notification(&mut g).unwrap();
        assert_eq!(d.avail_event(&g), 1);
        d.set_used_event(&mut g, 0xFFFF);
        q.push(&mut g, heads[0], 1).unwrap(); // idx 0xFFFF
        assert!(!q.should_notify(&g).unwrap());
        q.push(&mut g, heads[1], 1).unwrap(); // entry 0xFFFF written: idx 0
        assert!(q.should_notify(&g).unwrap());
        d.set_used_event(&mut g, 0xFFFF);
        q.push(&mut g, heads[2], 1).unwrap(); // idx 1
        assert!(!q.should_notify(&g).unwrap());
        assert_eq!(d.used_idx(&g), 1);
        assert_eq!(d.used_elem(&g, 0xFFFE), (u32::from(heads[0]), 1));
        assert_eq!(d.used_elem(&g, 0xFFFF), (u32::from(heads[1]), 1));
        assert_eq!(d.used_elem(&g, 0), (u32::from(heads[2]), 1));
    }

    #[test]
    fn without_event_idx_the_flags_decide() {
        let mut s = Sys::new();
        let mut g = s.gm();
        let (mut q, mut d) = queue(&mut g, false, false);
        for _ in 0..3 {
            d.chain(&mut g, &[(DATA, 4, true)]);
            q.pop(&g).unwrap().unwrap();
        }
        d.set_used_event(&mut g, 0); // ignored without EVENT_IDX
        d.set_avail_flags(&mut g, AVAIL_F_NO_INTERRUPT);
        q.push(&mut g, 0, 0).unwrap();
        assert!(!q.should_notify(&g).unwrap());
        d.set_avail_flags(&mut g, 0);
        assert!(!q.should_notify(&g).unwrap(), "nothing new since");
        q.push(&mut g, 1, 0).unwrap();
        assert!(q.should_notify(&g).unwrap());
        q.push(&mut g, 2, 0).unwrap();
        assert!(q.should_notify(&g).unwrap());

        q.disable_notification(&mut g).unwrap();
        assert_eq!(d.used_flags(&g), USED_F_NO_NOTIFY);
        q.enable_notification(&mut g).unwrap();
        assert_eq!(d.used_flags(&g), 0);
        assert_eq!(
            d.avail_event(&g),
            0,
            "avail_event untouched without EVENT_IDX"
        );
    }

    #[test]
    fn the_cache_follows_view_and_register_changes() {
        let mut s = Sys::new();
        let (mut q, mut d) = {
            let mut g = s.gm();
            let (q, mut d) = queue(&mut g, false, false);
            d.chain(&mut g, &[(DATA, 4, false)]);
            (q, d)
        };
        {
            let g = s.gm();
            assert!(q.has_available(&g).unwrap());
            assert!(q.has_available(&g).unwrap());
        }
        assert_eq!(q.cache_builds(), 1, "same view: no rebuild");

        // An unrelated change makes a new view: rebuilt, still working.
        let hole = s.mem.create_mmio("hole", 0x1000, MmioHandle(1)).unwrap();
        s.mem.add_subregion(s.sys, 0x5_0000, hole).unwrap();
        assert!(q.has_available(&s.gm()).unwrap());
        assert_eq!(q.cache_builds(), 2);

        // Other RAM (zeroed) over the rings: the rebuilt cache reads it.
        s.mem
            .add_subregion_overlap(s.sys, RAM, s.overlay, 1)
            .unwrap();
        assert!(!q.has_available(&s.gm()).unwrap());
        assert_eq!(q.cache_builds(), 3);
        s.mem.del_subregion(s.sys, s.overlay).unwrap();
        assert!(q.has_available(&s.gm()).unwrap());
        assert_eq!(q.cache_builds(), 4);

        // The driver moved a ring while the queue runs (the transport wrote
        // the register): rebuilt and validated for the new geometry.
        q.size = 4;
        {
            let mut g = s.gm();
            let c = q.pop(&g).unwrap().unwrap();
            assert_eq!(c.readable, vec![(DATA, 4)]);
            assert_eq!(q.cache_builds(), 5);
            q.push(&mut g, c.head, 0).unwrap();
            // With size 4 the used ring is read with the new geometry.
            assert_eq!(d.used_idx(&g), 1);
            q.size = 3;
            assert_eq!(q.pop(&g), Err(QueueError::BadSize { size: 3 }));
        }
        q.reset();
        {
            let g = s.gm();
            d.configure(&mut q);
            q.enable(&g).unwrap();
        }
        // The RAM under the rings goes away: RingNotRam, counted, sticky.
        let builds = q.cache_builds();
        s.mem.del_subregion(s.sys, s.ram).unwrap();
        {
            let g = s.gm();
            let e = QueueError::RingNotRam {
                what: DESC_TABLE,
                gpa: RING,
                len: 128,
            };
            assert_eq!(q.has_available(&g), Err(e));
            assert_eq!(q.cache_builds(), builds + 1);
            assert_eq!(q.pop(&g), Err(e));
            assert_eq!(q.cache_builds(), builds + 1);
        }
        s.mem.add_subregion(s.sys, RAM, s.ram).unwrap();
        let mut g = s.gm();
        assert!(q.has_available(&g).is_err(), "broken until reset");
        q.reset();
        d = Driver::new(&mut g, 8, RING);
        d.configure(&mut q);
        q.enable(&g).unwrap();
        assert!(!q.has_available(&g).unwrap());
    }

    #[test]
    fn state_round_trips_and_a_failed_load_changes_nothing() {
        let mut s = Sys::new();
        let mut g = s.gm();
        let (mut a, mut d) = queue(&mut g, true, true);
        a.msix_vector = 3;
        let heads: Vec<u16> = (0..3)
            .map(|i| d.chain(&mut g, &[(DATA + i, 1, false), (DATA + 0x100, 2, true)]))
            .collect();
        a.pop(&g).unwrap().unwrap();
        a.pop(&g).unwrap().unwrap();
        a.push(&mut g, heads[0], 2).unwrap();
        assert!(a.should_notify(&g).unwrap());
        let st = a.state();
        assert_eq!(
            st,
            QueueState {
                size: 8,
                ready: true,
                desc: d.desc,
                avail: d.avail,
                used: d.used,
                msix_vector: 3,
                last_avail: 2,
                used_idx: 1,
                signalled_used: 1,
                signalled_valid: true,
            }
        );
        let mut b = SplitQueue::new(8);
        b.set_features(true, true);
        b.load_state(&st, &g).unwrap();
        assert_eq!(b.state(), st);
        assert_eq!(b.cache_builds(), 1);
        let cb = b.pop(&g).unwrap().unwrap();
        assert_eq!(Some(cb.clone()), a.pop(&g).unwrap());
        assert_eq!(cb.head, heads[2]);
        b.push(&mut g, heads[1], 2).unwrap();
        assert_eq!(d.used_idx(&g), 2);
        assert_eq!(d.used_elem(&g, 1), (u32::from(heads[1]), 2));

        // Failed loads change nothing.
        let before = b.state();
        let builds = b.cache_builds();
        for (bad, err) in [
            (
                QueueState { size: 16, ..st },
                QueueError::BadSize { size: 16 },
            ),
            (
                QueueState { used: ROM, ..st },
                QueueError::RingNotRam {
                    what: USED_RING,
                    gpa: ROM,
                    len: 70,
                },
            ),
            (
                QueueState { desc: 8, ..st },
                QueueError::Misaligned {
                    what: DESC_TABLE,
                    gpa: 8,
                },
            ),
        ] {
            assert_eq!(b.load_state(&bad, &g), Err(err));
            assert_eq!(b.state(), before);
        }
        assert_eq!(
            b.cache_builds(),
            builds + 1,
            "only the RingNotRam load resolved rings"
        );
        assert!(!b.has_available(&g).unwrap(), "still working");

        // A queue that is not ready keeps whatever registers it had.
        let idle = QueueState {
            size: 3,
            desc: 0x123,
            ..QueueState::default()
        };
        b.load_state(&idle, &g).unwrap();
        assert_eq!(b.state(), idle);
        assert_eq!(b.pop(&g), Err(QueueError::NotReady));

        // Loading clears a broken queue; a still-bad ring is found again.
        d.set_avail_idx(&mut g, 100);
        let e = a.pop(&g).unwrap_err();
        assert!(matches!(e, QueueError::AvailIndex { idx: 100, .. }));
        let sa = a.state();
        a.load_state(&sa, &g).unwrap();
        assert_eq!(a.error(), None);
        assert_eq!(a.pop(&g), Err(e));
        a.reset();
        assert_eq!(a.state(), SplitQueue::new(8).state());
    }

    // ---- property test against a reference model ----

    /// Reference model of the guest's memory: an image of RAM+ROM, the BIG
    /// RAM (reads as zeroes), nothing else.
    struct Model<'a> {
        img: &'a [u8],
        size: u16,
        desc: u64,
        avail: u64,
        indirect: bool,
    }

    fn in_range(a: u64, len: u64, start: u64, end: u64) -> bool {
        a >= start && a.checked_add(len).is_some_and(|e| e <= end)
    }

    impl Model<'_> {
        fn readable(&self, a: u64, len: u64) -> bool {
            in_range(a, len, RAM, ROM + ROM_SIZE) || in_range(a, len, BIG, BIG + BIG_SIZE)
        }

        fn writable(&self, a: u64, len: u64) -> bool {
            in_range(a, len, RAM, RAM + RAM_SIZE) || in_range(a, len, BIG, BIG + BIG_SIZE)
        }

        fn bytes(&self, a: u64, len: u64) -> Option<Vec<u8>> {
            if in_range(a, len, RAM, ROM + ROM_SIZE) {
                let o = (a - RAM) as usize;
                Some(self.img[o..o + len as usize].to_vec())
            } else if in_range(a, len, BIG, BIG + BIG_SIZE) {
                Some(vec![0; len as usize])
            } else {
                None
            }
        }

        fn u16_at(&self, a: u64) -> u16 {
            let b = self.bytes(a, 2).unwrap();
            u16::from_le_bytes([b[0], b[1]])
        }

        fn desc_at(&self, table: &[u8], i: u16) -> (u64, u32, u16, u16) {
            let b = &table[16 * i as usize..16 * i as usize + 16];
            (
                u64::from_le_bytes(b[..8].try_into().unwrap()),
                u32::from_le_bytes(b[8..12].try_into().unwrap()),
                u16::from_le_bytes(b[12..14].try_into().unwrap()),
                u16::from_le_bytes(b[14..].try_into().unwrap()),
            )
        }

        /// The chain the device should get for entry `last` of the ring.
        fn pop(&self, last: u16) -> Result<Option<Chain>, QueueError> {
            use QueueError::*;
            let idx = self.u16_at(self.avail + 2);
            let pending = idx.wrapping_sub(last);
            if pending > self.size {
                return Err(AvailIndex {
                    idx,
                    last,
                    size: self.size,
                });
            }
            if pending == 0 {
                return Ok(None);
            }
            let head = self.u16_at(self.avail + 4 + 2 * u64::from(last % self.size));
            if head >= self.size {
                return Err(HeadOutOfRange {
                    head,
                    size: self.size,
                });
            }
            let main = self.bytes(self.desc, 16 * u64::from(self.size)).unwrap();
            let mut chain = Chain {
                head,
                ..Chain::default()
            };
            let mut sum = 0u64;
            let mut writing = false;
            let mut buffer = |(a, l, f, _): (u64, u32, u16, u16)| -> Result<(), QueueError> {
                let w = f & DESC_F_WRITE != 0;
                if !w && writing {
                    return Err(ReadableAfterWritable { head });
                }
                writing |= w;
                if u128::from(a) + u128::from(l) > u128::from(u64::MAX) {
                    return Err(LengthOverflow { head });
                }
                sum += u64::from(l);
                if sum >= 1 << 32 {
                    return Err(LengthOverflow { head });
                }
                if l > 0 {
                    let ok = if w {
                        self.writable(a, l.into())
                    } else {
                        self.readable(a, l.into())
                    };
                    if !ok {
                        return Err(BufferNotRam { gpa: a, len: l });
                    }
                    if w {
                        &mut chain.writable
                    } else {
                        &mut chain.readable
                    }
                    .push((a, l));
                }
                Ok(())
            };
            // The main table, then at most one indirect table.
            let mut table = main;
            let mut n = self.size;
            let mut i = head;
            let mut steps = 0;
            let mut in_indirect = false;
            loop {
                steps += 1;
                if steps > n {
                    return Err(ChainLoop { head });
                }
                let d = self.desc_at(&table, i);
                let (a, l, f, next) = d;
                if f & DESC_F_INDIRECT != 0 {
                    let why = if in_indirect {
                        "inside an indirect table"
                    } else if !self.indirect {
                        "not negotiated"
                    } else if f & DESC_F_NEXT != 0 {
                        "NEXT"
                    } else if l == 0 || !l.is_multiple_of(16) {
                        "multiple of 16"
                    } else if l / 16 > u32::from(self.size.max(1024)) {
                        "longer"
                    } else {
                        ""
                    };
                    if !why.is_empty() {
                        return Err(Indirect { head, why });
                    }
                    table = self
                        .bytes(a, l.into())
                        .ok_or(BufferNotRam { gpa: a, len: l })?;
                    n = (l / 16) as u16;
                    i = 0;
                    steps = 0;
                    in_indirect = true;
                    continue;
                }
                buffer(d)?;
                if f & DESC_F_NEXT == 0 {
                    break;
                }
                if next >= n {
                    return Err(DescOutOfRange {
                        index: next,
                        size: n,
                    });
                }
                i = next;
            }
            Ok(Some(chain))
        }
    }

    /// Maps the model's reason words onto the implementation's sentences.
    fn same_error(model: &QueueError, got: &QueueError) -> bool {
        match (model, got) {
            (
                QueueError::Indirect { head: h1, why: w1 },
                QueueError::Indirect { head: h2, why: w2 },
            ) => h1 == h2 && w2.contains(w1),
            _ => model == got,
        }
    }

    fn addr_strategy() -> impl Strategy<Value = u64> {
        prop_oneof![
            14 => (0..RAM_SIZE - 0x400).prop_map(|o| RAM + o),
            1 => (RAM_SIZE - 0x400..RAM_SIZE).prop_map(|o| RAM + o),
            1 => (0..ROM_SIZE + 0x40).prop_map(|o| ROM + o),
            1 => (0u64..0x2000).prop_map(|o| MMIO - 0x1000 + o),
            3 => (0u64..64).prop_map(|k| TABLES + 16 * k),
            1 => (0u64..0x100).prop_map(|o| BIG + o),
            1 => (0u64..0x100).prop_map(|o| u64::MAX - o),
            1 => any::<u64>(),
        ]
    }

    fn len_strategy() -> impl Strategy<Value = u32> {
        prop_oneof![
            6 => 0u32..0x300,
            3 => (0u32..12).prop_map(|n| n * 16),
            1 => (0u32..16).prop_map(|n| u32::MAX - n),
            1 => (0u32..16).prop_map(|n| 0x8000_0000 - n),
            1 => any::<u32>(),
        ]
    }

    /// Descriptors for a table of `n` entries: mostly well-formed-looking,
    /// some arbitrary bytes.
    fn desc_strategy(n: u16) -> impl Strategy<Value = [u8; 16]> {
        let flags = prop_oneof![
            6 => 0u16..4,
            2 => 0u16..8,
            1 => any::<u16>(),
        ];
        let next = prop_oneof![8 => 0..n, 1 => any::<u16>()];
        prop_oneof![
            1 => any::<[u8; 16]>(),
            8 => (addr_strategy(), len_strategy(), flags, next)
                .prop_map(|(a, l, f, x)| desc_bytes(a, l, f, x)),
        ]
    }

    /// A ring of `size` entries: its descriptors, the indirect-table area,
    /// the available-ring heads and how far avail.idx is ahead.
    #[allow(clippy::type_complexity)]
    fn ring_strategy() -> impl Strategy<Value = (u16, Vec<[u8; 16]>, Vec<[u8; 16]>, Vec<u16>, u16)>
    {
        (0u32..5).prop_flat_map(|lg| {
            let size = 1u16 << lg;
            (
                Just(size),
                proptest::collection::vec(desc_strategy(size), usize::from(size)),
                proptest::collection::vec(desc_strategy(8), 64),
                proptest::collection::vec(
                    prop_oneof![8 => 0..size, 1 => any::<u16>()],
                    usize::from(size),
                ),
                prop_oneof![8 => 0..=size, 1 => size + 1..size + 3, 1 => any::<u16>()],
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(600))]
        /// Arbitrary descriptor tables, available rings, indexes and
        /// indirect tables: popping never panics, stops within `size` pops,
        /// returns exactly what the reference model says, and every chain
        /// satisfies the invariants.
        #[test]
        fn pop_is_safe_on_arbitrary_rings(
            (size, descs, tables, heads, ahead) in ring_strategy(),
            last_avail in any::<u16>(),
            event_idx: bool,
            indirect: bool,
        ) {
            let mut s = Sys::new();
            let mut g = s.gm();
            let d = Driver::new(&mut g, size, RING);
            for (i, b) in descs.iter().enumerate() {
                g.write(d.desc + 16 * i as u64, b).unwrap();
            }
            for (i, b) in tables.iter().enumerate() {
                g.write(TABLES + 16 * i as u64, b).unwrap();
            }
            for (i, h) in heads.iter().enumerate() {
                w16(&mut g, d.avail + 4 + 2 * i as u64, *h);
            }
            w16(&mut g, d.avail + 2, last_avail.wrapping_add(ahead));
            let mut q = SplitQueue::new(16);
            q.set_features(event_idx, indirect);
            let mut st = q.state();
            st.size = size;
            st.ready = true;
            st.desc = d.desc;
            st.avail = d.avail;
            st.used = d.used;
            st.last_avail = last_avail;
            st.used_idx = last_avail;
            q.load_state(&st, &g).unwrap();

            let mut img = vec![0; (RAM_SIZE + ROM_SIZE) as usize];
            g.read(RAM, &mut img).unwrap();
            let model = Model { img: &img, size, desc: d.desc, avail: d.avail, indirect };
            let mut last = last_avail;
            let mut pops = 0u32;
            loop {
                let want = model.pop(last);
                let avail = q.has_available(&g);
                let got = q.pop(&g);
                match (&want, &got) {
                    (Ok(w), Ok(c)) => prop_assert_eq!(w, c),
                    (Err(w), Err(e)) => prop_assert!(same_error(w, e), "model {:?}, got {:?}", w, e),
                    _ => prop_assert!(false, "model {:?}, got {:?}", want, got),
                }
                match got {
                    Ok(None) => {
                        prop_assert_eq!(avail, Ok(false));
                        break;
                    }
                    Err(e) => {
                        prop_assert_eq!(q.error(), Some(e));
                        prop_assert_eq!(q.pop(&g), Err(e));
                        break;
                    }
                    Ok(Some(c)) => {
                        prop_assert_eq!(avail, Ok(true));
                        pops += 1;
                        prop_assert!(pops <= u32::from(size));
                        prop_assert!(c.head < size);
                        let n = c.readable.len() + c.writable.len();
                        prop_assert!(n <= usize::from(size) + usize::from(size.max(1024)));
                        prop_assert!(c.readable_len() + c.writable_len() <= u64::from(u32::MAX));
                        for &(a, l) in &c.readable {
                            prop_assert!(l > 0 && model.readable(a, l.into()));
                            prop_assert!(g.check(a, l.into(), false).is_ok());
                        }
                        for &(a, l) in &c.writable {
                            prop_assert!(l > 0 && model.writable(a, l.into()));
                            prop_assert!(g.check(a, l.into(), true).is_ok());
                        }
                        q.push(&mut g, c.head, 0).unwrap();
                        last = last.wrapping_add(1);
                    }
                }
            }
            prop_assert_eq!(q.state().used_idx, last_avail.wrapping_add(pops as u16));
        }
    }
}
