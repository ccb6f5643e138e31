//! A small virtio 1.x driver over the modern PCI transport, split
//! virtqueues only, written from the virtio 1.x specification (sections
//! 2.1 status, 2.2 features, 2.7 split virtqueues, 3.1 initialisation,
//! 4.1 virtio over PCI): what firmware and a minimal OS driver do, with
//! every read-back checked.
//!
//! Discovery: the vendor capabilities (cfg_type 1 common, 2 notify with
//! its multiplier, 3 ISR, 4 device config) name a BAR and a range; the
//! MSI-X capability names the table and PBA. Nothing is assumed about
//! offsets inside the BARs.
//!
//! Interrupts: every MSI-X entry of device `d` (in enumeration order) is
//! IDT vector `0x40 + d`; the config vector is entry 0 and queue `q` uses
//! entry `q + 1`. The local APIC timer runs as a watchdog (vector 0x3F,
//! every 10 ms) so that every wait is bounded by time even when no device
//! interrupt comes.
//!
//! Queues: at most 64 entries; one 4 KiB page per queue holds the
//! descriptor table (0x000), the driver area (0x400), the device area
//! (0x500) and eight indirect tables of 16 descriptors (0x800). Features
//! RING_EVENT_IDX and RING_INDIRECT_DESC are always negotiated: the driver
//! keeps `used_event` equal to the entries it has consumed (so every
//! completion interrupts) and notifies only when `avail_event` asks for it.
//!
//! Memory: a bump allocator of zeroed 4 KiB pages from the first free RAM
//! after the guest image (at least 4 MiB), inside a usable range of the
//! multiboot memory map.
//!
//! Scenario `virtio` (cmdline `expect=net:NxP,blk:MxQ [bar64=high]`):
//! enumerates and assigns BARs ([`crate::pci`]), brings every virtio
//! device up, runs the block test ([`crate::virtio_blk`]) and the network
//! test ([`crate::virtio_net`]) and prints one summary line per device.

use crate::hw;
use crate::idt;
use crate::io;
use crate::pci::{self, Bus, Function, MsiX};
use boot::{BootInfo, MemoryKind};
use core::fmt;

macro_rules! say {
    ($($t:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::io::Serial, $($t)*);
    }};
}

macro_rules! bail {
    ($what:expr, $($t:tt)*) => {{
        $crate::virtio::say!("guest: {}: {}", $what, format_args!($($t)*));
        return Err($what);
    }};
}
pub(crate) use {bail, say};

pub type R<T = ()> = Result<T, &'static str>;

pub const VENDOR: u16 = 0x1AF4;
pub const DEVICE_NET: u16 = 0x1041;
pub const DEVICE_BLK: u16 = 0x1042;

pub const F_VERSION_1: u64 = 1 << 32;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_INDIRECT: u64 = 1 << 28;
pub const NET_F_MAC: u64 = 1 << 5;
pub const NET_F_CTRL_VQ: u64 = 1 << 17;
pub const NET_F_MQ: u64 = 1 << 22;
pub const BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const BLK_F_FLUSH: u64 = 1 << 9;
pub const BLK_F_MQ: u64 = 1 << 12;

pub const S_ACK: u8 = 1;
pub const S_DRIVER: u8 = 2;
pub const S_DRIVER_OK: u8 = 4;
pub const S_FEATURES_OK: u8 = 8;
pub const S_NEEDS_RESET: u8 = 0x40;
pub const S_FAILED: u8 = 0x80;
/// The status of a device that is up.
pub const S_UP: u8 = S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK;

// virtio_pci_common_cfg (4.1.4.3).
const C_DFSELECT: u64 = 0x00;
const C_DF: u64 = 0x04;
const C_GFSELECT: u64 = 0x08;
const C_GF: u64 = 0x0C;
const C_MSIX: u64 = 0x10;
const C_NUMQ: u64 = 0x12;
const C_STATUS: u64 = 0x14;
const C_GENERATION: u64 = 0x15;
const C_QSELECT: u64 = 0x16;
const C_QSIZE: u64 = 0x18;
const C_QMSIX: u64 = 0x1A;
const C_QENABLE: u64 = 0x1C;
const C_QNOTIFYOFF: u64 = 0x1E;
const C_QDESC: u64 = 0x20;
const C_QDRIVER: u64 = 0x28;
const C_QDEVICE: u64 = 0x30;
const COMMON_LEN: u32 = 0x38;
pub const NO_VECTOR: u16 = 0xFFFF;

pub const D_NEXT: u16 = 1;
pub const D_WRITE: u16 = 2;
pub const D_INDIRECT: u16 = 4;

pub const MAX_QSIZE: u16 = 64;
pub const MAX_DEVS: usize = 32;
pub const MAX_VQS: usize = 512;
pub const VECTOR_BASE: u8 = 0x40;
pub const PAGE: u64 = 4096;

/// Ring page layout.
pub const DESC_OFF: u64 = 0x000;
pub const AVAIL_OFF: u64 = 0x400;
pub const USED_OFF: u64 = 0x500;
pub const IND_OFF: u64 = 0x800;
pub const IND_TABLES: u8 = 8;
pub const IND_LEN: usize = 16;
const IND_BYTES: u64 = IND_LEN as u64 * 16;

/// Watchdog tick: vector and period (10 ms at the 1 GHz APIC clock).
pub const TICK_VEC: u8 = 0x3F;
const TICK_COUNT: u32 = 10_000_000;
/// A wait gives up after this many ticks without progress (3 s).
pub const TIMEOUT_TICKS: u64 = 300;
/// And after this many HLTs in any case (if the timer were dead).
const MAX_HALTS: u32 = 200_000;

const APIC: u64 = 0xFEE0_0000;

pub fn apic_read(reg: u64) -> u32 {
    hw::rd32(APIC + reg)
}

pub fn apic_write(reg: u64, v: u32) {
    hw::wr32(APIC + reg, v);
}

/// Waits (STI; HLT) until `done()`, giving up after [`TIMEOUT_TICKS`]
/// watchdog ticks. Returns `done()`.
pub fn wait_for(done: impl Fn() -> bool) -> bool {
    let t0 = idt::count(TICK_VEC);
    idt::wait(MAX_HALTS, || {
        done() || idt::count(TICK_VEC).wrapping_sub(t0) > TIMEOUT_TICKS
    });
    done()
}

/// Watchdog ticks so far.
pub fn ticks() -> u64 {
    idt::count(TICK_VEC)
}

/// The bump allocator of zeroed pages.
pub struct Pages {
    next: u64,
    end: u64,
    start: u64,
}

impl Pages {
    /// Starts after the guest image, the boot information and the modules
    /// (and at 4 MiB at least), inside one usable range of the memory map.
    pub fn new(info: &BootInfo) -> R<Pages> {
        let mut start = hw::image_end().max(4 << 20);
        start = start.max(info.info_range.0.saturating_add(info.info_range.1));
        for m in info.modules.iter() {
            start = start.max(m.end);
        }
        let start = start.next_multiple_of(PAGE);
        let Some(r) = info.memory.iter().find(|r| {
            r.kind == MemoryKind::Usable
                && r.start <= start
                && start < r.start.saturating_add(r.len)
        }) else {
            bail!(
                "no RAM for the page allocator",
                "{start:#x} is in no usable range of the memory map"
            );
        };
        let end = (r.start.saturating_add(r.len)).min(hw::MAPPED_END) / PAGE * PAGE;
        say!(
            "guest: page allocator: [{start:#x}, {end:#x}) ({} KiB)",
            (end - start) / 1024
        );
        Ok(Pages {
            next: start,
            end,
            start,
        })
    }

    /// `n` contiguous zeroed pages.
    pub fn alloc(&mut self, n: u64) -> R<u64> {
        let at = self.next;
        let Some(end) = n
            .checked_mul(PAGE)
            .and_then(|b| at.checked_add(b))
            .filter(|&e| e <= self.end)
        else {
            bail!(
                "out of guest memory",
                "{n} pages wanted at {at:#x}, the range ends at {:#x}",
                self.end
            );
        };
        hw::fill(at, end - at, 0);
        self.next = end;
        Ok(at)
    }

    /// Bytes handed out so far.
    pub fn used(&self) -> u64 {
        self.next - self.start
    }
}

/// One buffer of a request: address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl Seg {
    pub fn ro(addr: u64, len: u32) -> Seg {
        Seg {
            addr,
            len,
            write: false,
        }
    }

    pub fn wo(addr: u64, len: u32) -> Seg {
        Seg {
            addr,
            len,
            write: true,
        }
    }
}

/// One used entry: the head, the length the device wrote and the address
/// of the request's first buffer.
#[derive(Clone, Copy)]
pub struct Used {
    pub id: u16,
    pub len: u32,
    pub addr: u64,
}

/// `vring_need_event` (2.7.10): has `new` passed `event` since `old`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One split virtqueue, driver side.
#[derive(Clone, Copy, Default)]
pub struct Vq {
    pub index: u16,
    pub size: u16,
    /// The ring page and the addresses given to the device (normally
    /// inside the ring page).
    pub ring: u64,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub ind: u64,
    pub notify: u64,
    /// Pages for the queue's buffers and how many.
    pub data: u64,
    pub data_pages: u64,
    /// 2 KiB buffer slots in `data` that are free (bit per slot).
    pub slots_free: u64,
    /// avail.idx including entries not yet published.
    next_avail: u16,
    /// avail.idx as last written.
    published: u16,
    /// Used entries consumed.
    pub used_seen: u16,
    free: u64,
    heads: u64,
    ind_free: u8,
    pub notifies: u32,
    pub completions: u32,
    /// Whether the last publish notified the device.
    pub last_notified: bool,
}

fn mask_of(n: u16) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

impl Vq {
    pub const ZERO: Vq = Vq {
        index: 0,
        size: 0,
        ring: 0,
        desc: 0,
        avail: 0,
        used: 0,
        ind: 0,
        notify: 0,
        data: 0,
        data_pages: 0,
        slots_free: 0,
        next_avail: 0,
        published: 0,
        used_seen: 0,
        free: 0,
        heads: 0,
        ind_free: 0,
        notifies: 0,
        completions: 0,
        last_notified: false,
    };

    /// Zeroes the ring page and resets the driver's state; the default
    /// layout inside the page.
    fn init(&mut self, index: u16, size: u16) {
        hw::fill(self.ring, PAGE, 0);
        self.index = index;
        self.size = size;
        self.desc = self.ring + DESC_OFF;
        self.avail = self.ring + AVAIL_OFF;
        self.used = self.ring + USED_OFF;
        self.ind = self.ring + IND_OFF;
        self.next_avail = 0;
        self.published = 0;
        self.used_seen = 0;
        self.free = mask_of(size);
        self.heads = 0;
        self.ind_free = 0xFF;
        self.notifies = 0;
        self.completions = 0;
        self.last_notified = false;
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn write_desc(table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = table + 16 * u64::from(i);
        hw::wr64(d, addr);
        hw::wr32(d + 8, len);
        hw::wr16(d + 12, flags);
        hw::wr16(d + 14, next);
    }

    pub fn used_idx(&self) -> u16 {
        hw::rd16(self.used + 2)
    }

    pub fn avail_event(&self) -> u16 {
        hw::rd16(self.used + 4 + 8 * u64::from(self.size))
    }

    fn set_used_event(&self, v: u16) {
        hw::wr16(self.avail + 4 + 2 * u64::from(self.size), v);
    }

    /// A used entry is waiting.
    pub fn pending(&self) -> bool {
        self.used_idx() != self.used_seen
    }

    pub fn in_flight(&self) -> u32 {
        self.heads.count_ones()
    }

    /// Avail index as published.
    pub fn published(&self) -> u16 {
        self.published
    }

    fn take_desc(&mut self) -> R<u16> {
        if self.free == 0 {
            bail!("no free descriptor", "queue {}", self.index);
        }
        let i = self.free.trailing_zeros() as u16;
        self.free &= !(1 << i);
        Ok(i)
    }

    /// Adds a request (not yet published): a chain of direct descriptors,
    /// or one descriptor pointing to an indirect table.
    pub fn add(&mut self, segs: &[Seg], indirect: bool) -> R<u16> {
        if segs.is_empty() || segs.len() > IND_LEN {
            bail!("bad request shape", "{} buffers", segs.len());
        }
        let flags = |s: &Seg, last: bool| {
            (if s.write { D_WRITE } else { 0 }) | (if last { 0 } else { D_NEXT })
        };
        let head;
        if indirect {
            if self.ind_free == 0 {
                bail!("no free indirect table", "queue {}", self.index);
            }
            let t = self.ind_free.trailing_zeros() as u8;
            let table = self.ind + IND_BYTES * u64::from(t);
            for (i, s) in segs.iter().enumerate() {
                let last = i + 1 == segs.len();
                let next = if last { 0 } else { i as u16 + 1 };
                Self::write_desc(table, i as u16, s.addr, s.len, flags(s, last), next);
            }
            head = self.take_desc()?;
            self.ind_free &= !(1 << t);
            Self::write_desc(
                self.desc,
                head,
                table,
                16 * segs.len() as u32,
                D_INDIRECT,
                0,
            );
        } else {
            if (segs.len() as u32) > self.free.count_ones() {
                bail!(
                    "not enough free descriptors",
                    "queue {}: {} wanted, {} free",
                    self.index,
                    segs.len(),
                    self.free.count_ones()
                );
            }
            let mut ids = [0u16; IND_LEN];
            for id in ids.iter_mut().take(segs.len()) {
                *id = self.take_desc()?;
            }
            for (i, s) in segs.iter().enumerate() {
                let last = i + 1 == segs.len();
                let next = if last { 0 } else { ids[i + 1] };
                Self::write_desc(self.desc, ids[i], s.addr, s.len, flags(s, last), next);
            }
            head = ids[0];
        }
        self.heads |= 1 << head;
        let slot = u64::from(self.next_avail % self.size);
        hw::wr16(self.avail + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(head)
    }

    /// Publishes what was added; true if `avail_event` asks for a
    /// notification.
    pub fn publish(&mut self) -> bool {
        let (old, new) = (self.published, self.next_avail);
        hw::wmb();
        hw::wr16(self.avail + 2, new);
        self.published = new;
        hw::mb();
        need_event(self.avail_event(), new, old)
    }

    /// Publishes and notifies the device if it asked for it.
    pub fn kick(&mut self) {
        self.last_notified = self.publish();
        if self.last_notified {
            self.notify_now();
        }
    }

    /// Publishes `idx` as avail.idx whatever was added, without reading
    /// the device area (which may be anywhere in the hostile cases).
    pub fn publish_raw(&mut self, idx: u16) {
        hw::wmb();
        hw::wr16(self.avail + 2, idx);
        self.published = idx;
        hw::mb();
    }

    /// Writes the queue index to the queue's notify address.
    pub fn notify_now(&mut self) {
        hw::wr16(self.notify, self.index);
        self.notifies += 1;
    }

    /// Takes the next used entry, if any, and frees its descriptors. A
    /// used index that runs ahead of the requests in flight, or an id that
    /// is not the head of one, is an error.
    pub fn pop(&mut self) -> R<Option<Used>> {
        let idx = self.used_idx();
        if idx == self.used_seen {
            return Ok(None);
        }
        let ahead = idx.wrapping_sub(self.used_seen);
        if u32::from(ahead) > self.in_flight() {
            bail!(
                "used index ahead of the requests in flight",
                "queue {}: used idx {idx}, consumed {}, in flight {}",
                self.index,
                self.used_seen,
                self.in_flight()
            );
        }
        hw::rmb();
        let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
        let (id, len) = (hw::rd32(e), hw::rd32(e + 4));
        if id >= u32::from(self.size) || self.heads & (1 << id) == 0 {
            bail!(
                "used id is not a request in flight",
                "queue {}: used entry {} has id {id} (len {len}), heads in flight {:#x}",
                self.index,
                self.used_seen,
                self.heads
            );
        }
        let id = id as u16;
        let mut addr = hw::rd64(self.desc + 16 * u64::from(id));
        let mut i = id;
        let mut steps = 0;
        loop {
            let d = self.desc + 16 * u64::from(i);
            let (flags, next) = (hw::rd16(d + 12), hw::rd16(d + 14));
            if flags & D_INDIRECT != 0 {
                let table = hw::rd64(d);
                let t = table.wrapping_sub(self.ind) / IND_BYTES;
                if t >= u64::from(IND_TABLES) || table < self.ind {
                    bail!(
                        "descriptor table changed under the driver",
                        "queue {}",
                        self.index
                    );
                }
                self.ind_free |= 1 << t;
                addr = hw::rd64(table);
            }
            if self.free & (1 << i) != 0 {
                bail!(
                    "descriptor table changed under the driver",
                    "queue {}",
                    self.index
                );
            }
            self.free |= 1 << i;
            if flags & D_NEXT == 0 {
                break;
            }
            i = next;
            steps += 1;
            if i >= self.size || steps >= self.size {
                bail!(
                    "descriptor table changed under the driver",
                    "queue {}",
                    self.index
                );
            }
        }
        self.heads &= !(1 << id);
        self.used_seen = self.used_seen.wrapping_add(1);
        self.set_used_event(self.used_seen);
        hw::mb();
        self.completions += 1;
        Ok(Some(Used { id, len, addr }))
    }

    /// A free 2 KiB buffer slot of the queue's data pages.
    pub fn take_slot(&mut self) -> R<u64> {
        if self.slots_free == 0 {
            bail!("no free buffer", "queue {}", self.index);
        }
        let s = self.slots_free.trailing_zeros();
        self.slots_free &= !(1 << s);
        Ok(self.data + 2048 * u64::from(s))
    }

    /// Gives back the slot holding `addr`.
    pub fn put_slot(&mut self, addr: u64) -> R {
        let s = addr.wrapping_sub(self.data) / 2048;
        if addr < self.data || s >= self.data_pages * 2 || s >= 64 {
            bail!(
                "buffer address not a slot",
                "queue {}: {addr:#x}",
                self.index
            );
        }
        self.slots_free |= 1 << s;
        Ok(())
    }
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub enum Kind {
    #[default]
    Net,
    Blk,
}

/// One virtio device.
#[derive(Clone, Copy, Default)]
pub struct Dev {
    pub kind: Kind,
    /// Index among the devices of its kind.
    pub nth: usize,
    pub func: Function,
    pub vector: u8,
    pub msix: MsiX,
    pub common: u64,
    pub isr: u64,
    pub cfg: u64,
    pub cfg_len: u32,
    pub notify: u64,
    pub notify_len: u32,
    pub notify_mult: u32,
    pub features: u64,
    pub nq: u16,
    /// First queue in [`Virtio::vqs`].
    pub q0: usize,
    pub mac: [u8; 6],
    pub pairs: u16,
    pub capacity: u64,
    pub blk_size: u32,
    /// Vector count when the tests started.
    pub irq0: u64,
    pub tx: u32,
    pub rx: u32,
    pub writes: u32,
    pub reads: u32,
    pub requests: u32,
}

/// `net0`, `blk3`.
pub struct Name(Kind, usize);

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = if self.0 == Kind::Net { "net" } else { "blk" };
        write!(f, "{k}{}", self.1)
    }
}

impl Dev {
    pub const ZERO: Dev = Dev {
        kind: Kind::Net,
        nth: 0,
        func: Function::ZERO,
        vector: 0,
        msix: MsiX::ZERO,
        common: 0,
        isr: 0,
        cfg: 0,
        cfg_len: 0,
        notify: 0,
        notify_len: 0,
        notify_mult: 0,
        features: 0,
        nq: 0,
        q0: 0,
        mac: [0; 6],
        pairs: 0,
        capacity: 0,
        blk_size: 0,
        irq0: 0,
        tx: 0,
        rx: 0,
        writes: 0,
        reads: 0,
        requests: 0,
    };

    pub fn name(&self) -> Name {
        Name(self.kind, self.nth)
    }

    fn r8(&self, off: u64) -> u8 {
        hw::rd8(self.common + off)
    }
    fn r16(&self, off: u64) -> u16 {
        hw::rd16(self.common + off)
    }
    fn r32(&self, off: u64) -> u32 {
        hw::rd32(self.common + off)
    }
    fn w8(&self, off: u64, v: u8) {
        hw::wr8(self.common + off, v)
    }
    fn w16(&self, off: u64, v: u16) {
        hw::wr16(self.common + off, v)
    }
    fn w32(&self, off: u64, v: u32) {
        hw::wr32(self.common + off, v)
    }
    /// 64-bit fields as two 32-bit halves, low first (4.1.3.1).
    fn w64(&self, off: u64, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }
    fn r64(&self, off: u64) -> u64 {
        u64::from(self.r32(off)) | u64::from(self.r32(off + 4)) << 32
    }

    pub fn status(&self) -> u8 {
        self.r8(C_STATUS)
    }

    pub fn set_status(&self, s: u8) {
        self.w8(C_STATUS, s)
    }

    pub fn generation(&self) -> u8 {
        self.r8(C_GENERATION)
    }

    /// Reads (and so clears) the ISR status byte.
    pub fn isr(&self) -> u8 {
        hw::rd8(self.isr)
    }

    pub fn irqs(&self) -> u64 {
        idt::count(self.vector)
    }

    /// Writes 0 to the status and waits for it to read 0 (3.1.1, 4.1.4.3.2).
    pub fn reset(&self) -> R {
        self.set_status(0);
        for _ in 0..10_000 {
            if self.status() == 0 {
                return Ok(());
            }
        }
        bail!(
            "device reset does not complete",
            "{}: status still {:#04x}",
            self.name(),
            self.status()
        );
    }

    fn device_features(&self) -> u64 {
        self.w32(C_DFSELECT, 0);
        let lo = self.r32(C_DF);
        self.w32(C_DFSELECT, 1);
        let hi = self.r32(C_DF);
        u64::from(hi) << 32 | u64::from(lo)
    }

    fn driver_features(&self, f: u64) {
        self.w32(C_GFSELECT, 0);
        self.w32(C_GF, f as u32);
        self.w32(C_GFSELECT, 1);
        self.w32(C_GF, (f >> 32) as u32);
    }

    fn cfg_check(&self, off: u64, size: u64) -> R {
        if off + size > u64::from(self.cfg_len) {
            bail!(
                "device config too short",
                "{}: field at {off:#x} ({size} bytes), config is {:#x} bytes",
                self.name(),
                self.cfg_len
            );
        }
        Ok(())
    }

    pub fn cfg8(&self, off: u64) -> R<u8> {
        self.cfg_check(off, 1)?;
        Ok(hw::rd8(self.cfg + off))
    }

    pub fn cfg16(&self, off: u64) -> R<u16> {
        self.cfg_check(off, 2)?;
        Ok(hw::rd16(self.cfg + off))
    }

    pub fn cfg32(&self, off: u64) -> R<u32> {
        self.cfg_check(off, 4)?;
        Ok(hw::rd32(self.cfg + off))
    }

    /// Reads config fields with `read` until the generation is the same
    /// before and after (2.5.1).
    fn cfg_stable<T>(&self, read: impl Fn(&Dev) -> R<T>) -> R<T> {
        for _ in 0..16 {
            let g = self.generation();
            let v = read(self)?;
            if self.generation() == g {
                return Ok(v);
            }
        }
        bail!("config generation keeps changing", "{}", self.name());
    }
}

/// A different address for one part of one queue at set-up (for the
/// hostile cases).
#[derive(Clone, Copy)]
pub struct Override {
    pub queue: u16,
    pub desc: Option<u64>,
    pub device: Option<u64>,
}

/// The driver's state: devices, queues, memory.
pub struct Virtio {
    pub devs: [Dev; MAX_DEVS],
    pub ndev: usize,
    pub vqs: [Vq; MAX_VQS],
    pub nvq: usize,
    pub mem: Pages,
}

/// What `expect=` asks for: (count, queues or pairs per device).
#[derive(Clone, Copy, Default)]
pub struct Expect {
    pub net: (usize, u16),
    pub blk: (usize, u16),
}

/// Parses `net:NxP,blk:MxQ` (either part optional).
pub fn parse_expect(s: &str) -> R<Expect> {
    let mut e = Expect::default();
    let (mut seen_net, mut seen_blk) = (false, false);
    for part in s.split(',') {
        let parsed = part.split_once(':').and_then(|(k, v)| {
            let (n, q) = v.split_once('x')?;
            Some((k, n.parse::<usize>().ok()?, q.parse::<u16>().ok()?))
        });
        match parsed {
            Some(("net", n, p)) if !seen_net => {
                seen_net = true;
                e.net = (n, p);
            }
            Some(("blk", n, q)) if !seen_blk => {
                seen_blk = true;
                e.blk = (n, q);
            }
            _ => bail!(
                "bad expect= option",
                "{part:?} in {s:?} (want net:NxP,blk:MxQ)"
            ),
        }
    }
    Ok(e)
}

fn required(kind: Kind) -> u64 {
    let common = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT;
    match kind {
        Kind::Net => common | NET_F_MAC | NET_F_CTRL_VQ | NET_F_MQ,
        Kind::Blk => common | BLK_F_FLUSH | BLK_F_BLK_SIZE,
    }
}

/// Taken when offered: without BLK_F_MQ a block device has one queue.
fn optional(kind: Kind) -> u64 {
    match kind {
        Kind::Net => 0,
        Kind::Blk => BLK_F_MQ,
    }
}

/// A virtio structure found through a vendor capability.
#[derive(Clone, Copy, Default)]
struct Cap {
    found: bool,
    bar: u8,
    offset: u32,
    len: u32,
    addr: u64,
    mult: u32,
}

/// The driver's state lives in a static: at about 70 KiB it would crowd
/// the 256 KiB boot stack. One scenario runs per boot, so it is taken once.
static STATE: hw::TakeOnce<Virtio> = hw::TakeOnce::new(Virtio {
    devs: [Dev::ZERO; MAX_DEVS],
    ndev: 0,
    vqs: [Vq::ZERO; MAX_VQS],
    nvq: 0,
    mem: Pages {
        next: 0,
        end: 0,
        start: 0,
    },
});

impl Virtio {
    /// The driver's state, empty, with `mem` as its allocator (once per
    /// boot).
    pub fn take(mem: Pages) -> R<&'static mut Virtio> {
        let Some(v) = STATE.take() else {
            bail!("driver state taken twice", "one virtio scenario per boot");
        };
        v.mem = mem;
        Ok(v)
    }

    pub fn devs(&self) -> &[Dev] {
        &self.devs[..self.ndev]
    }

    pub fn vq(&mut self, d: usize, q: u16) -> &mut Vq {
        let i = self.devs[d].q0 + usize::from(q);
        &mut self.vqs[i]
    }

    pub fn vq_ref(&self, d: usize, q: u16) -> &Vq {
        &self.vqs[self.devs[d].q0 + usize::from(q)]
    }

    /// The queue's data pages, allocated on first use (`pages` of them,
    /// two 2 KiB buffer slots each).
    pub fn vq_data(&mut self, d: usize, q: u16, pages: u64) -> R<u64> {
        let i = self.devs[d].q0 + usize::from(q);
        if self.vqs[i].data == 0 {
            self.vqs[i].data = self.mem.alloc(pages)?;
            self.vqs[i].data_pages = pages;
            self.vqs[i].slots_free = mask_of((pages * 2).min(64) as u16);
        } else if self.vqs[i].data_pages < pages {
            bail!(
                "queue buffers too small",
                "{} queue {q}: {} pages, {pages} wanted",
                self.devs[d].name(),
                self.vqs[i].data_pages
            );
        }
        Ok(self.vqs[i].data)
    }

    /// Waits for the next completion on queue `q` of device `d`: the used
    /// index must move and the device's vector must have fired since
    /// `irq0`. Returns the used entry.
    pub fn wait_used(&mut self, d: usize, q: u16, irq0: u64, what: &str) -> R<Used> {
        let dev = self.devs[d];
        let vq = *self.vq_ref(d, q);
        let ok = wait_for(|| vq.pending() && dev.irqs() > irq0);
        if !ok {
            if vq.pending() {
                bail!(
                    "completion without an interrupt",
                    "{} queue {q} {what}: used idx {} but vector {:#x} still at {irq0}",
                    dev.name(),
                    vq.used_idx(),
                    dev.vector
                );
            }
            bail!(
                "request timed out",
                "{} queue {q} {what}: used idx {} (consumed {}), avail idx {}, avail_event {}, notified {}, status {:#04x}, vector {:#x} count {} (was {irq0})",
                dev.name(),
                vq.used_idx(),
                vq.used_seen,
                vq.published(),
                vq.avail_event(),
                vq.last_notified,
                dev.status(),
                dev.vector,
                dev.irqs()
            );
        }
        match self.vq(d, q).pop()? {
            Some(u) => Ok(u),
            None => bail!("used entry vanished", "{} queue {q}", dev.name()),
        }
    }

    /// Finds the virtio structures of device `d` and sets up MSI-X.
    fn discover(&mut self, d: usize) -> R {
        let mut dev = self.devs[d];
        let f = dev.func;
        let mut caps = [Cap::default(); 5];
        pci::for_each_cap(f.bdf, |id, at| {
            if id != pci::CAP_VENDOR {
                return Ok(());
            }
            let cap_len = pci::read8(f.bdf, at + 2);
            let ty = pci::read8(f.bdf, at + 3);
            if !(1..=4).contains(&ty) || caps[usize::from(ty)].found {
                return Ok(());
            }
            let min_len = if ty == 2 { 20 } else { 16 };
            if cap_len < min_len {
                bail!(
                    "virtio capability too short",
                    "{} cfg_type {ty} at {at:#x}: cap_len {cap_len}",
                    f.bdf
                );
            }
            let bar = pci::read8(f.bdf, at + 4);
            let offset = pci::read32(f.bdf, at + 8);
            let len = pci::read32(f.bdf, at + 12);
            let Some(b) = f.bars.get(usize::from(bar)).filter(|b| b.is_mem()) else {
                bail!(
                    "virtio capability names no memory BAR",
                    "{} cfg_type {ty}: BAR{bar}",
                    f.bdf
                );
            };
            if u64::from(offset) + u64::from(len) > b.size {
                bail!(
                    "virtio structure outside its BAR",
                    "{} cfg_type {ty}: BAR{bar}+{offset:#x}, {len:#x} bytes, BAR is {:#x}",
                    f.bdf,
                    b.size
                );
            }
            let mult = if ty == 2 {
                pci::read32(f.bdf, at + 16)
            } else {
                0
            };
            caps[usize::from(ty)] = Cap {
                found: true,
                bar,
                offset,
                len,
                addr: b.addr + u64::from(offset),
                mult,
            };
            Ok(())
        })?;
        let names = ["", "common", "notify", "ISR", "device"];
        for ty in 1..=4 {
            if !caps[ty].found {
                bail!(
                    "virtio capability missing",
                    "{}: no {} structure",
                    f.bdf,
                    names[ty]
                );
            }
        }
        let [_, common, notify, isr, cfg] = caps;
        let mult = notify.mult;
        if mult != 0 && (mult % 2 != 0 || !mult.is_power_of_two()) {
            bail!("bad notify_off_multiplier", "{}: {mult}", f.bdf);
        }
        if common.len < COMMON_LEN || common.addr % 4 != 0 {
            bail!(
                "bad common config structure",
                "{}: at {:#x}, {:#x} bytes",
                f.bdf,
                common.addr,
                common.len
            );
        }
        if isr.len < 1 || notify.len < 2 || notify.addr % 2 != 0 || cfg.addr % 4 != 0 {
            bail!(
                "bad virtio structure",
                "{}: ISR {:#x}+{:#x}, notify {:#x}+{:#x}, device {:#x}",
                f.bdf,
                isr.addr,
                isr.len,
                notify.addr,
                notify.len,
                cfg.addr
            );
        }
        dev.common = common.addr;
        dev.isr = isr.addr;
        dev.cfg = cfg.addr;
        dev.cfg_len = cfg.len;
        dev.notify = notify.addr;
        dev.notify_len = notify.len;
        dev.notify_mult = mult;
        dev.msix = pci::msix_setup(&f, dev.vector)?;
        let m = dev.msix;
        say!(
            "guest: virtio {} at {}: vector {:#x}, MSI-X {} entries (table BAR{}+{:#x}, PBA BAR{}+{:#x}), common BAR{}+{:#x}, notify BAR{}+{:#x} x{mult}, ISR BAR{}+{:#x}, device BAR{}+{:#x} ({:#x} bytes)",
            dev.name(),
            f.bdf,
            dev.vector,
            m.entries,
            m.table_bar,
            m.table_off,
            m.pba_bar,
            m.pba_off,
            common.bar,
            common.offset,
            notify.bar,
            notify.offset,
            isr.bar,
            isr.offset,
            cfg.bar,
            cfg.offset,
            cfg.len
        );
        self.devs[d] = dev;
        Ok(())
    }

    /// The full initialisation of 3.1.1: reset, ACKNOWLEDGE, DRIVER,
    /// features, FEATURES_OK, config, every queue, DRIVER_OK. With an
    /// override, a device that sets NEEDS_RESET while a queue is set up
    /// stops the sequence: the result is then `false`.
    pub fn bring_up(&mut self, d: usize, over: Option<Override>) -> R<bool> {
        let mut dev = self.devs[d];
        let name = dev.name();
        dev.reset()?;
        dev.set_status(S_ACK);
        dev.set_status(S_ACK | S_DRIVER);
        let offered = dev.device_features();
        let want = required(dev.kind);
        if offered & want != want {
            dev.set_status(S_ACK | S_DRIVER | S_FAILED);
            bail!(
                "device lacks features",
                "{name}: offers {offered:#x}, missing {:#x}",
                want & !offered
            );
        }
        let want = want | (offered & optional(dev.kind));
        dev.driver_features(want);
        dev.set_status(S_ACK | S_DRIVER | S_FEATURES_OK);
        let st = dev.status();
        if st & S_FEATURES_OK == 0 {
            bail!(
                "device refused the features",
                "{name}: wrote {want:#x}, status {st:#04x}"
            );
        }
        dev.features = want;
        let nq = match dev.kind {
            Kind::Net => {
                let (mac, pairs) = dev.cfg_stable(|v| {
                    let mut mac = [0u8; 6];
                    for (i, b) in mac.iter_mut().enumerate() {
                        *b = v.cfg8(i as u64)?;
                    }
                    Ok((mac, v.cfg16(8)?))
                })?;
                if pairs == 0 || pairs > 0x8000 {
                    bail!("bad max_virtqueue_pairs", "{name}: {pairs}");
                }
                dev.mac = mac;
                dev.pairs = pairs;
                2 * pairs + 1
            }
            Kind::Blk => {
                let mq = want & BLK_F_MQ != 0;
                let (cap, bs, nq) = dev.cfg_stable(|v| {
                    let cap = u64::from(v.cfg32(0)?) | u64::from(v.cfg32(4)?) << 32;
                    let nq = if mq { v.cfg16(34)? } else { 1 };
                    Ok((cap, v.cfg32(20)?, nq))
                })?;
                if nq == 0 {
                    bail!("bad num_queues", "{name}: 0");
                }
                dev.capacity = cap;
                dev.blk_size = bs;
                nq
            }
        };
        let common_nq = dev.r16(C_NUMQ);
        if common_nq != nq {
            bail!(
                "queue count mismatch",
                "{name}: common config num_queues {common_nq}, device config implies {nq}"
            );
        }
        if u32::from(nq) + 1 > u32::from(dev.msix.entries) {
            bail!(
                "too few MSI-X entries",
                "{name}: {} entries for {nq} queues and the config vector",
                dev.msix.entries
            );
        }
        if dev.nq == 0 {
            if self.nvq + usize::from(nq) > MAX_VQS {
                bail!("too many queues", "more than {MAX_VQS} in all");
            }
            dev.q0 = self.nvq;
            dev.nq = nq;
            self.nvq += usize::from(nq);
        } else if dev.nq != nq {
            bail!(
                "queue count changed across a reset",
                "{name}: {} then {nq}",
                dev.nq
            );
        }
        self.devs[d] = dev;
        dev.w16(C_MSIX, 0);
        let v = dev.r16(C_MSIX);
        if v != 0 {
            bail!("config vector refused", "{name}: wrote 0, read {v:#x}");
        }
        for q in 0..nq {
            let o = over.filter(|o| o.queue == q);
            self.setup_queue(d, q, o)?;
            if over.is_some() && dev.status() & S_NEEDS_RESET != 0 {
                return Ok(false);
            }
        }
        dev.set_status(S_UP);
        let st = dev.status();
        if over.is_some() && st & S_NEEDS_RESET != 0 {
            return Ok(false);
        }
        if st != S_UP {
            bail!("device not up after DRIVER_OK", "{name}: status {st:#04x}");
        }
        Ok(true)
    }

    fn setup_queue(&mut self, d: usize, q: u16, over: Option<Override>) -> R {
        let dev = self.devs[d];
        let name = dev.name();
        dev.w16(C_QSELECT, q);
        let sel = dev.r16(C_QSELECT);
        if sel != q {
            bail!("queue_select not kept", "{name}: wrote {q}, read {sel}");
        }
        let max = dev.r16(C_QSIZE);
        if max == 0 {
            bail!("queue not available", "{name} queue {q}: queue_size 0");
        }
        let en = dev.r16(C_QENABLE);
        if en != 0 {
            bail!(
                "queue enabled before set-up",
                "{name} queue {q}: queue_enable {en}"
            );
        }
        let size = (1u16 << (15 - max.leading_zeros())).min(MAX_QSIZE);
        dev.w16(C_QSIZE, size);
        let got = dev.r16(C_QSIZE);
        if got != size {
            bail!(
                "queue_size not kept",
                "{name} queue {q}: max {max}, wrote {size}, read {got}"
            );
        }
        let i = dev.q0 + usize::from(q);
        if self.vqs[i].ring == 0 {
            self.vqs[i].ring = self.mem.alloc(1)?;
        }
        let vq = &mut self.vqs[i];
        vq.init(q, size);
        if let Some(o) = over {
            vq.desc = o.desc.unwrap_or(vq.desc);
            vq.used = o.device.unwrap_or(vq.used);
        }
        for (off, a) in [
            (C_QDESC, vq.desc),
            (C_QDRIVER, vq.avail),
            (C_QDEVICE, vq.used),
        ] {
            dev.w64(off, a);
            let got = dev.r64(off);
            if got != a {
                bail!(
                    "queue address not kept",
                    "{name} queue {q}: register {off:#x} wrote {a:#x}, read {got:#x}"
                );
            }
        }
        dev.w16(C_QMSIX, q + 1);
        let v = dev.r16(C_QMSIX);
        if v != q + 1 {
            bail!(
                "queue vector refused",
                "{name} queue {q}: wrote {}, read {v:#x}{}",
                q + 1,
                if v == NO_VECTOR { " (NO_VECTOR)" } else { "" }
            );
        }
        let off = dev.r16(C_QNOTIFYOFF);
        let at = u64::from(off) * u64::from(dev.notify_mult);
        if at + 2 > u64::from(dev.notify_len) {
            bail!(
                "queue notify address outside the notify structure",
                "{name} queue {q}: queue_notify_off {off} x {} > {:#x} bytes",
                dev.notify_mult,
                dev.notify_len
            );
        }
        vq.notify = dev.notify + at;
        dev.w16(C_QENABLE, 1);
        let en = dev.r16(C_QENABLE);
        if en != 1 && !(over.is_some() && dev.status() & S_NEEDS_RESET != 0) {
            bail!("queue_enable not kept", "{name} queue {q}: read {en}");
        }
        Ok(())
    }

    /// A block request on queue `q`, waited for: the header, `len` bytes
    /// at `buf` (none when `len` is 0; device-writable for IN and GET_ID),
    /// the status byte. Checks the used length; returns the status.
    pub fn blk_request(&mut self, d: usize, q: u16, req: BlkReq, indirect: bool) -> R<u8> {
        let BlkReq {
            ty,
            sector,
            buf,
            len,
        } = req;
        let data = self.vq_data(d, q, 1)?;
        let (hdr, status) = (data, data + 0x10);
        hw::wr32(hdr, ty);
        hw::wr32(hdr + 4, 0);
        hw::wr64(hdr + 8, sector);
        hw::wr8(status, 0xFF);
        let writes = ty == BLK_T_IN || ty == BLK_T_GET_ID;
        let mut segs = [Seg::ro(hdr, 16); 3];
        let mut n = 1;
        if len > 0 {
            segs[n] = Seg {
                addr: buf,
                len,
                write: writes,
            };
            n += 1;
        }
        segs[n] = Seg::wo(status, 1);
        n += 1;
        let irq0 = self.devs[d].irqs();
        let vq = self.vq(d, q);
        vq.add(&segs[..n], indirect)?;
        vq.kick();
        let u = self.wait_used(d, q, irq0, blk_type_name(ty))?;
        self.devs[d].requests += 1;
        let want = if writes { len + 1 } else { 1 };
        let st = hw::rd8(status);
        if u.len != want {
            bail!(
                "wrong used length",
                "{} queue {q} {} sector {sector}: used len {}, want {want} (id {}, status {st:#x})",
                self.devs[d].name(),
                blk_type_name(ty),
                u.len,
                u.id
            );
        }
        Ok(st)
    }
}

/// A block request: type, first sector, data buffer and its length.
#[derive(Clone, Copy)]
pub struct BlkReq {
    pub ty: u32,
    pub sector: u64,
    pub buf: u64,
    pub len: u32,
}

pub const BLK_T_IN: u32 = 0;
pub const BLK_T_OUT: u32 = 1;
pub const BLK_T_FLUSH: u32 = 4;
pub const BLK_T_GET_ID: u32 = 8;

pub fn blk_type_name(ty: u32) -> &'static str {
    match ty {
        BLK_T_IN => "IN",
        BLK_T_OUT => "OUT",
        BLK_T_FLUSH => "FLUSH",
        BLK_T_GET_ID => "GET_ID",
        _ => "?",
    }
}

/// Enumeration, BAR assignment, interrupts, and every virtio device
/// brought up; the counts checked against `expect`.
pub fn setup(drv: &mut Virtio, info: &BootInfo, expect: Expect, bar64_high: bool) -> R {
    let mut bus = Bus::scan()?;
    let host = bus
        .functions()
        .iter()
        .find(|f| f.bdf == pci::Bdf::default())
        .copied();
    match host {
        Some(h) if h.vendor == 0x8086 && h.device == 0x29C0 && h.class[..2] == [6, 0] => {}
        Some(h) => bail!(
            "unexpected host bridge",
            "00:00.0 is {:04x}:{:04x} class {:02x}:{:02x}",
            h.vendor,
            h.device,
            h.class[0],
            h.class[1]
        ),
        None => bail!("no host bridge", "nothing at 00:00.0"),
    }
    let count = |id| {
        bus.functions()
            .iter()
            .filter(|f| f.vendor == VENDOR && f.device == id)
            .count()
    };
    let (nets, blks) = (count(DEVICE_NET), count(DEVICE_BLK));
    say!(
        "guest: pci: {} functions, {nets} virtio-net, {blks} virtio-blk",
        bus.functions().len()
    );
    if nets != expect.net.0 || blks != expect.blk.0 {
        bail!(
            "device count differs from expect=",
            "found net:{nets} blk:{blks}, expected net:{} blk:{}",
            expect.net.0,
            expect.blk.0
        );
    }
    bus.size_bars()?;
    bus.assign_bars(info, bar64_high)?;

    idt::init();
    io::outb(0x21, 0xFF);
    io::outb(0xA1, 0xFF);
    apic_write(0x80, 0);
    apic_write(0xF0, 0x1FF);
    apic_write(0x3E0, 0xB);
    apic_write(0x320, u32::from(TICK_VEC) | 1 << 17);
    apic_write(0x380, TICK_COUNT);

    let (mut kn, mut kb) = (0, 0);
    for f in bus.functions() {
        let kind = match (f.vendor, f.device) {
            (VENDOR, DEVICE_NET) => Kind::Net,
            (VENDOR, DEVICE_BLK) => Kind::Blk,
            _ => continue,
        };
        let d = drv.ndev;
        if d >= MAX_DEVS {
            bail!("too many virtio devices", "more than {MAX_DEVS}");
        }
        let nth = if kind == Kind::Net { &mut kn } else { &mut kb };
        drv.devs[d] = Dev {
            kind,
            nth: *nth,
            func: *f,
            vector: VECTOR_BASE + d as u8,
            ..Dev::default()
        };
        *nth += 1;
        drv.ndev += 1;
        // Legacy INTx off: the driver uses MSI-X only.
        let cmd = pci::read16(f.bdf, 0x04);
        pci::write16(f.bdf, 0x04, cmd | pci::CMD_INTX_OFF);
        drv.discover(d)?;
        drv.bring_up(d, None)?;
        let dev = drv.devs[d];
        let name = dev.name();
        let size = drv.vqs[dev.q0].size;
        match kind {
            Kind::Net => {
                let m = dev.mac;
                say!(
                    "guest: virtio {name} up: features {:#x}, {} queues of {size}, MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, {} pairs",
                    dev.features,
                    dev.nq,
                    m[0],
                    m[1],
                    m[2],
                    m[3],
                    m[4],
                    m[5],
                    dev.pairs
                );
                if dev.pairs != expect.net.1 {
                    bail!(
                        "queue pairs differ from expect=",
                        "{name}: {} pairs, expected {}",
                        dev.pairs,
                        expect.net.1
                    );
                }
            }
            Kind::Blk => {
                say!(
                    "guest: virtio {name} up: features {:#x}, {} queues of {size}, {} sectors, blk_size {}",
                    dev.features,
                    dev.nq,
                    dev.capacity,
                    dev.blk_size
                );
                if dev.nq != expect.blk.1 {
                    bail!(
                        "queues differ from expect=",
                        "{name}: {} queues, expected {}",
                        dev.nq,
                        expect.blk.1
                    );
                }
            }
        }
    }
    for i in 0..drv.ndev {
        drv.devs[i].irq0 = drv.devs[i].irqs();
    }
    say!(
        "guest: {} virtio devices up, {} queues, {} KiB of guest memory in use",
        drv.ndev,
        drv.nvq,
        drv.mem.used() / 1024
    );
    Ok(())
}

/// Every device still up (no NEEDS_RESET, no FAILED), its MSI-X table
/// as programmed and nothing pending in its PBA.
pub fn check_all_up(drv: &Virtio) -> R {
    for dev in drv.devs() {
        let st = dev.status();
        if st != S_UP {
            bail!("device not up", "{}: status {st:#04x}", dev.name());
        }
        let m = dev.msix;
        for i in 0..u64::from(m.entries) {
            let e = m.table + 16 * i;
            let got = [hw::rd32(e), hw::rd32(e + 8), hw::rd32(e + 12)];
            if got != [pci::MSI_ADDR, dev.vector.into(), 0] {
                bail!(
                    "MSI-X entry changed",
                    "{} entry {i}: address, data, control {got:#x?}",
                    dev.name()
                );
            }
        }
        for w in 0..u64::from(m.entries).div_ceil(32) {
            let p = hw::rd32(m.pba + 4 * w);
            if p != 0 {
                bail!(
                    "MSI-X interrupt left pending",
                    "{}: PBA dword {w} = {p:#x}",
                    dev.name()
                );
            }
        }
    }
    Ok(())
}

/// Scenario `virtio`.
pub fn scenario(info: &BootInfo) -> R {
    let Some(e) = info.option("expect") else {
        bail!(
            "expect= missing",
            "say what the machine has: expect=net:NxP,blk:MxQ"
        );
    };
    let expect = parse_expect(e)?;
    let bar64_high = match info.option("bar64") {
        None | Some("low") => false,
        Some("high") => true,
        Some(o) => bail!("bad bar64= option", "{o:?} (low or high)"),
    };
    let drv = Virtio::take(Pages::new(info)?)?;
    setup(drv, info, expect, bar64_high)?;
    crate::virtio_blk::run(drv)?;
    crate::virtio_net::run(drv)?;
    check_all_up(drv)?;
    let (mut frames, mut reqs, mut irqs) = (0u64, 0u64, 0u64);
    for dev in drv.devs() {
        let n = dev.irqs() - dev.irq0;
        irqs += n;
        match dev.kind {
            Kind::Net => {
                frames += u64::from(dev.rx);
                say!(
                    "guest: {} pairs={} tx={} rx={} irqs={n}",
                    dev.name(),
                    dev.pairs,
                    dev.tx,
                    dev.rx
                );
            }
            Kind::Blk => {
                reqs += u64::from(dev.requests);
                say!(
                    "guest: {} queues={} writes={} reads={} irqs={n}",
                    dev.name(),
                    dev.nq,
                    dev.writes,
                    dev.reads
                );
            }
        }
    }
    say!(
        "guest: virtio total: net={} blk={} frames={frames} blk_requests={reqs} irqs={irqs}",
        expect.net.0,
        expect.blk.0
    );
    apic_write(0x380, 0);
    Ok(())
}
