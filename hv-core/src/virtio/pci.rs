//! The virtio 1.x PCI transport ("modern" virtio-pci), generic over the
//! device type behind it ([`VirtioBackend`]: virtio-blk, virtio-net).
//!
//! Layout, as QEMU's `virtio-pci` lays it out:
//! - BAR 4, 64-bit prefetchable memory, 16 KiB, container `virtio-pci`:
//!   common configuration at 0x0000, ISR at 0x1000, device configuration at
//!   0x2000, notify area at 0x3000 (queue `q` at `q * 4`), each described by
//!   a vendor capability.
//! - BAR 1, 32-bit memory, 4 KiB: the MSI-X table at 0 and the PBA at
//!   0x800. Vector 0..n: the driver picks which one each queue and the
//!   configuration-change interrupt use.
//!
//! A queue notification is a write notifier on the notify area (the memory
//! API's ioeventfd, one per queue), so a kick reaches [`Device::notify`]
//! without going through register dispatch.
//!
//! Everything the driver writes, and everything in its rings, is untrusted:
//! a bad value never panics; a bad ring or descriptor puts the device into
//! NEEDS_RESET with a configuration interrupt and one report line, and only
//! a reset (status 0) brings it back.

use super::queue::{QueueError, QueueState, SplitQueue};
use super::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::devices::{all_ones, read_le, write_le, Device, DeviceCtx, RegionIndex, StateError};
use crate::machine::{Machine, MachineError};
use crate::pci::{BarKind, PciConfig, PciIds, PCI_CAP_ID_VNDR as CAP_ID_VNDR};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Device status bits (virtio 1.x 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// "No MSI-X vector" (VIRTIO_MSI_NO_VECTOR).
pub const NO_VECTOR: u16 = 0xFFFF;

/// Vendor capability types (virtio 1.x 4.1.4).
pub const CAP_COMMON: u8 = 1;
pub const CAP_NOTIFY: u8 = 2;
pub const CAP_ISR: u8 = 3;
pub const CAP_DEVICE: u8 = 4;

/// Offsets of the structures in BAR 4.
pub const COMMON_OFFSET: u32 = 0x0000;
pub const ISR_OFFSET: u32 = 0x1000;
pub const DEVICE_OFFSET: u32 = 0x2000;
pub const NOTIFY_OFFSET: u32 = 0x3000;
/// Size of each structure's region.
pub const STRUCT_SIZE: u32 = 0x1000;
/// Size of BAR 4.
pub const MODERN_BAR_SIZE: u64 = 0x4000;
/// Bytes between two queues' notify addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// Size of BAR 1 (MSI-X).
pub const MSIX_BAR_SIZE: u64 = 0x1000;
/// Where the PBA starts in BAR 1.
pub const MSIX_PBA_OFFSET: u32 = 0x800;
/// The BARs used.
pub const MSIX_BAR: u8 = 1;
pub const MODERN_BAR: u8 = 4;
/// The most queues a device may have (each needs an MSI-X vector and a
/// notify slot; the table holds 128 entries below the PBA).
pub const MAX_QUEUES: u16 = 127;

/// Region indexes of a virtio-pci device, in creation order.
pub mod regions {
    use crate::devices::RegionIndex;
    pub const MODERN: RegionIndex = 0;
    pub const COMMON: RegionIndex = 1;
    pub const ISR: RegionIndex = 2;
    pub const DEVICE: RegionIndex = 3;
    pub const NOTIFY: RegionIndex = 4;
    pub const MSIX: RegionIndex = 5;
    pub const MSIX_TABLE: RegionIndex = 6;
    pub const MSIX_PBA: RegionIndex = 7;
}

/// Common configuration registers (virtio 1.x 4.1.4.3).
mod common {
    pub const DFSELECT: u64 = 0x00;
    pub const DF: u64 = 0x04;
    pub const GFSELECT: u64 = 0x08;
    pub const GF: u64 = 0x0C;
    pub const MSIX: u64 = 0x10;
    pub const NUMQ: u64 = 0x12;
    pub const STATUS: u64 = 0x14;
    pub const CFGGEN: u64 = 0x15;
    pub const Q_SELECT: u64 = 0x16;
    pub const Q_SIZE: u64 = 0x18;
    pub const Q_MSIX: u64 = 0x1A;
    pub const Q_ENABLE: u64 = 0x1C;
    pub const Q_NOFF: u64 = 0x1E;
    pub const Q_DESCLO: u64 = 0x20;
    pub const Q_AVAILLO: u64 = 0x28;
    pub const Q_USEDLO: u64 = 0x30;
    /// Size of the register block.
    pub const LEN: usize = 0x38;
}

/// What the transport gives a backend for one piece of work.
pub struct QueueIo<'q> {
    /// The device's queues (all of them: a backend may complete on another
    /// queue than the one kicked, as virtio-net's receive path does).
    pub queues: &'q mut [SplitQueue],
    /// Queues that got used entries; the transport interrupts for them.
    pub used: Vec<u16>,
    /// Features the driver accepted.
    pub features: u64,
}

impl QueueIo<'_> {
    /// Completes `head` on queue `q` with `written` bytes.
    pub fn complete(
        &mut self,
        ctx: &mut DeviceCtx,
        q: u16,
        head: u16,
        written: u32,
    ) -> Result<(), QueueError> {
        let queue = self
            .queues
            .get_mut(usize::from(q))
            .ok_or(QueueError::NotReady)?;
        queue.push(&mut ctx.mem, head, written)?;
        if !self.used.contains(&q) {
            self.used.push(q);
        }
        Ok(())
    }
}

/// A device type behind the transport.
pub trait VirtioBackend {
    /// The virtio device id (1 net, 2 block).
    fn device_id(&self) -> u16;
    /// The PCI class code (24 bits).
    fn class(&self) -> u32;
    /// Device-type feature bits offered (the transport adds VERSION_1,
    /// EVENT_IDX and INDIRECT_DESC).
    fn features(&self) -> u64;
    /// Number of queues.
    fn num_queues(&self) -> u16;
    /// Largest size of each queue.
    fn queue_max_size(&self) -> u16 {
        256
    }
    /// Reads the device configuration structure.
    fn config_read(&self, offset: u64, size: u8) -> u64;
    /// Writes the device configuration structure.
    fn config_write(&mut self, _offset: u64, _size: u8, _value: u64) {}
    /// The driver set DRIVER_OK with `features`.
    fn activate(&mut self, _features: u64) {}
    /// Back to the state after reset.
    fn reset(&mut self);
    /// Queue `q` was kicked: consume what the driver made available.
    fn process(&mut self, ctx: &mut DeviceCtx, io: &mut QueueIo, q: u16) -> Result<(), QueueError>;
    /// A frame arrives from the VM's switch for queue pair `pair`
    /// (network devices only); returns whether the device took it.
    fn receive(
        &mut self,
        _ctx: &mut DeviceCtx,
        _io: &mut QueueIo,
        _pair: u16,
        _frame: &[u8],
    ) -> Result<bool, QueueError> {
        Ok(false)
    }
    /// The MAC address (network devices only).
    fn mac(&self) -> Option<[u8; 6]> {
        None
    }
    /// I/O counters for reports: (name, value).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// The device type's own migration state (a subsection of the
    /// transport's section).
    fn save_state(&self) -> Option<BackendState> {
        None
    }
    /// Takes a loaded state: refused (nothing changed) if it is not this
    /// device type's or does not fit this device.
    fn load_state(&mut self, s: Option<&BackendState>) -> Result<(), StateError> {
        match s {
            None => Ok(()),
            Some(_) => Err(StateError::Invalid("state of another virtio device type")),
        }
    }
    /// Downcast support.
    fn as_any(&mut self) -> &mut dyn core::any::Any;
}

/// The state of a device type behind the transport, as the transport's
/// subsection for that type.
#[derive(Clone, Debug, PartialEq)]
pub enum BackendState {
    Net(crate::virtio::net::VirtioNetWire),
    Blk(crate::virtio::blk::VirtioBlkWire),
}

/// Counters of one virtio device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioStats {
    /// Queue kicks (notifier hits and notify-register writes).
    pub kicks: u64,
    /// MSI-X messages sent (or pended) for queues.
    pub queue_irqs: u64,
    /// Configuration-change interrupts.
    pub config_irqs: u64,
    /// Times the device entered NEEDS_RESET.
    pub errors: u64,
    /// Resets by the driver.
    pub resets: u64,
}

/// A virtio device on PCI.
#[derive(Clone)]
pub struct VirtioPci<B: VirtioBackend> {
    pci: PciConfig,
    pub backend: B,
    queues: Vec<SplitQueue>,
    status: u8,
    dfselect: u32,
    gfselect: u32,
    driver_features: u64,
    queue_select: u16,
    config_vector: u16,
    isr: u8,
    generation: u8,
    /// Why the device is in NEEDS_RESET, if it is.
    pub error: Option<QueueError>,
    pub stats: VirtioStats,
}

impl<B: VirtioBackend> VirtioPci<B> {
    /// A device with its PCI identity and capabilities; regions are made
    /// by [`add_virtio_pci`].
    pub fn new(backend: B) -> Result<Self, MachineError> {
        let nq = backend.num_queues();
        if nq == 0 || nq > MAX_QUEUES {
            return Err(MachineError::Config("a virtio device has 1 to 127 queues"));
        }
        let id = backend.device_id();
        let mut pci = PciConfig::new(PciIds {
            vendor: 0x1AF4,
            device: 0x1040 + id,
            subsystem_vendor: 0x1AF4,
            subsystem: 0x1100,
            class: backend.class(),
            revision: 1,
        });
        let e = |_| MachineError::Config("virtio-pci configuration space");
        pci.declare_bar(
            MSIX_BAR,
            BarKind::Mem32 { prefetch: false },
            MSIX_BAR_SIZE,
            regions::MSIX,
        )
        .map_err(e)?;
        pci.declare_bar(
            MODERN_BAR,
            BarKind::Mem64 { prefetch: true },
            MODERN_BAR_SIZE,
            regions::MODERN,
        )
        .map_err(e)?;
        pci.msix_init(nq + 1, MSIX_BAR, 0, MSIX_BAR, MSIX_PBA_OFFSET)
            .map_err(e)?;
        let caps = [
            (CAP_COMMON, COMMON_OFFSET, common::LEN as u32),
            (CAP_ISR, ISR_OFFSET, 1),
            (CAP_DEVICE, DEVICE_OFFSET, STRUCT_SIZE),
            (CAP_NOTIFY, NOTIFY_OFFSET, u32::from(nq) * NOTIFY_MULTIPLIER),
        ];
        for (cfg_type, offset, length) in caps {
            let len = if cfg_type == CAP_NOTIFY { 20 } else { 16 };
            let at = pci.add_capability(CAP_ID_VNDR, len).map_err(e)?;
            let at = u16::from(at);
            pci.set_u8(at + 2, len);
            pci.set_u8(at + 3, cfg_type);
            pci.set_u8(at + 4, MODERN_BAR);
            pci.set_u32(at + 8, offset);
            pci.set_u32(at + 12, length);
            if cfg_type == CAP_NOTIFY {
                pci.set_u32(at + 16, NOTIFY_MULTIPLIER);
            }
        }
        let max = backend.queue_max_size();
        Ok(Self {
            pci,
            backend,
            queues: (0..nq).map(|_| SplitQueue::new(max)).collect(),
            status: 0,
            dfselect: 0,
            gfselect: 0,
            driver_features: 0,
            queue_select: 0,
            config_vector: NO_VECTOR,
            isr: 0,
            generation: 0,
            error: None,
            stats: VirtioStats::default(),
        })
    }

    /// Features offered to the driver.
    pub fn device_features(&self) -> u64 {
        self.backend.features()
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The queues (for reports and tests).
    pub fn queues(&self) -> &[SplitQueue] {
        &self.queues
    }

    /// The PCI configuration space.
    pub fn pci_config(&self) -> &PciConfig {
        &self.pci
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.dfselect = 0;
        self.gfselect = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.config_vector = NO_VECTOR;
        self.isr = 0;
        self.error = None;
        self.backend.reset();
        self.stats.resets += 1;
    }

    /// The device stops processing until reset: NEEDS_RESET, a
    /// configuration interrupt and one report line (virtio_error).
    fn fail(&mut self, ctx: &mut DeviceCtx, e: QueueError) {
        if self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        self.stats.errors += 1;
        self.error = Some(e);
        self.status |= STATUS_NEEDS_RESET;
        ctx.report(format!("needs reset: {e}"));
        self.config_interrupt(ctx);
    }

    fn config_interrupt(&mut self, ctx: &mut DeviceCtx) {
        self.isr |= 2;
        self.stats.config_irqs += 1;
        if self.config_vector != NO_VECTOR {
            self.pci.msix_notify(ctx, self.config_vector);
        }
    }

    fn working(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0
    }

    /// Interrupts for every queue that got used entries, as the driver
    /// asked (EVENT_IDX or the NO_INTERRUPT flag).
    fn signal(&mut self, ctx: &mut DeviceCtx, used: &[u16]) -> Result<(), QueueError> {
        for &q in used {
            let Some(queue) = self.queues.get_mut(usize::from(q)) else {
                continue;
            };
            if queue.should_notify(&ctx.mem)? {
                self.isr |= 1;
                self.stats.queue_irqs += 1;
                let v = queue.msix_vector;
                if v != NO_VECTOR {
                    self.pci.msix_notify(ctx, v);
                }
            }
        }
        Ok(())
    }

    /// Runs backend work with the queues, then interrupts; a queue error
    /// puts the device into NEEDS_RESET.
    fn run<R: Default>(
        &mut self,
        ctx: &mut DeviceCtx,
        f: impl FnOnce(&mut B, &mut DeviceCtx, &mut QueueIo) -> Result<R, QueueError>,
    ) -> R {
        if !self.working() {
            return R::default();
        }
        let mut io = QueueIo {
            queues: &mut self.queues,
            used: Vec::new(),
            features: self.driver_features,
        };
        let r = f(&mut self.backend, ctx, &mut io);
        let used = core::mem::take(&mut io.used);
        let signalled = self.signal(ctx, &used);
        match r.and_then(|r| signalled.map(|()| r)) {
            Ok(r) => r,
            Err(e) => {
                self.fail(ctx, e);
                R::default()
            }
        }
    }

    fn kick(&mut self, ctx: &mut DeviceCtx, q: u16) {
        self.stats.kicks += 1;
        self.service(ctx, q);
    }

    /// Processes queue `q` if it is ready.
    fn service(&mut self, ctx: &mut DeviceCtx, q: u16) {
        if usize::from(q) >= self.queues.len() {
            return;
        }
        if !self.queues[usize::from(q)].ready {
            return;
        }
        self.run(ctx, |b, ctx, io| {
            // With EVENT_IDX the driver kicks again only after the device
            // published how far it has read (avail_event); buffers added
            // meanwhile are taken now. Bounded: the guest is not running.
            for _ in 0..2 {
                b.process(ctx, io, q)?;
                let Some(queue) = io.queues.get_mut(usize::from(q)) else {
                    break;
                };
                queue.enable_notification(&mut ctx.mem)?;
                if !queue.has_available(&ctx.mem)? {
                    break;
                }
            }
            Ok(())
        });
    }

    /// A frame from the VM's switch for queue pair `pair`; whether it was
    /// taken.
    pub fn receive(&mut self, ctx: &mut DeviceCtx, pair: u16, frame: &[u8]) -> bool {
        self.run(ctx, |b, ctx, io| b.receive(ctx, io, pair, frame))
    }

    fn common_image(&self) -> [u8; common::LEN] {
        let mut b = [0u8; common::LEN];
        let features = self.device_features();
        let df = match self.dfselect {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        let gf = match self.gfselect {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        let mut put = |at: u64, v: u64, size: u8| write_le(&mut b, at, size, v);
        put(common::DFSELECT, self.dfselect.into(), 4);
        put(common::DF, df.into(), 4);
        put(common::GFSELECT, self.gfselect.into(), 4);
        put(common::GF, gf.into(), 4);
        put(common::MSIX, self.config_vector.into(), 2);
        put(common::NUMQ, self.queues.len() as u64, 2);
        put(common::STATUS, self.status.into(), 1);
        put(common::CFGGEN, self.generation.into(), 1);
        put(common::Q_SELECT, self.queue_select.into(), 2);
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            put(common::Q_SIZE, q.size.into(), 2);
            put(common::Q_MSIX, q.msix_vector.into(), 2);
            put(common::Q_ENABLE, q.ready.into(), 2);
            // Queue q's notify address is q * NOTIFY_MULTIPLIER.
            put(common::Q_NOFF, self.queue_select.into(), 2);
            put(common::Q_DESCLO, q.desc, 8);
            put(common::Q_AVAILLO, q.avail, 8);
            put(common::Q_USEDLO, q.used, 8);
        }
        b
    }

    fn common_write(&mut self, ctx: &mut DeviceCtx, offset: u64, size: u8, value: u64) {
        let old = self.common_image();
        let mut new = old;
        write_le(&mut new, offset, size, value);
        let end = offset.saturating_add(u64::from(size));
        let touched = |at: u64, len: u64| offset < at + len && at < end;
        let field = |at: u64, len: u64| read_le(&new, at, len as u8);
        let vectors = self.pci.msix_vectors();
        let vector = |v: u64| {
            let v = v as u16;
            if v < vectors {
                v
            } else {
                NO_VECTOR
            }
        };
        if touched(common::DFSELECT, 4) {
            self.dfselect = field(common::DFSELECT, 4) as u32;
        }
        if touched(common::GFSELECT, 4) {
            self.gfselect = field(common::GFSELECT, 4) as u32;
        }
        if touched(common::GF, 4) && self.status & STATUS_FEATURES_OK == 0 {
            let v = field(common::GF, 4);
            match self.gfselect {
                0 => self.driver_features = (self.driver_features & !0xFFFF_FFFF) | v,
                1 => self.driver_features = (self.driver_features & 0xFFFF_FFFF) | v << 32,
                _ => {}
            }
        }
        if touched(common::MSIX, 2) {
            self.config_vector = vector(field(common::MSIX, 2));
        }
        if touched(common::Q_SELECT, 2) {
            self.queue_select = field(common::Q_SELECT, 2) as u16;
        }
        let qs = usize::from(self.queue_select);
        if let Some(q) = self.queues.get_mut(qs) {
            if touched(common::Q_MSIX, 2) {
                q.msix_vector = vector(field(common::Q_MSIX, 2));
            }
            // Ring setup is frozen once the queue is enabled (virtio 1.x
            // 4.1.4.3.2: the driver must not change it).
            if !q.ready {
                if touched(common::Q_SIZE, 2) {
                    q.size = field(common::Q_SIZE, 2) as u16;
                }
                if touched(common::Q_DESCLO, 8) {
                    q.desc = field(common::Q_DESCLO, 8);
                }
                if touched(common::Q_AVAILLO, 8) {
                    q.avail = field(common::Q_AVAILLO, 8);
                }
                if touched(common::Q_USEDLO, 8) {
                    q.used = field(common::Q_USEDLO, 8);
                }
            }
        }
        if touched(common::Q_ENABLE, 2) && field(common::Q_ENABLE, 2) & 1 != 0 {
            let features = self.driver_features;
            if let Some(q) = self.queues.get_mut(qs) {
                if !q.ready {
                    q.set_features(
                        features & 1 << VIRTIO_RING_F_EVENT_IDX != 0,
                        features & 1 << VIRTIO_RING_F_INDIRECT_DESC != 0,
                    );
                    if let Err(e) = q.enable(&ctx.mem) {
                        self.fail(ctx, e);
                    }
                }
            }
        }
        if touched(common::STATUS, 1) {
            self.write_status(ctx, field(common::STATUS, 1) as u8);
        }
    }

    fn write_status(&mut self, ctx: &mut DeviceCtx, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        // Only a reset clears status bits (virtio 1.x 2.1.1: the driver
        // never clears a bit it set).
        let mut v = v | self.status;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // Only a subset of what was offered, and always VERSION_1.
            let ok = self.driver_features & !self.device_features() == 0
                && self.driver_features & 1 << VIRTIO_F_VERSION_1 != 0;
            if !ok {
                v &= !STATUS_FEATURES_OK;
            }
        }
        let was_ok = self.status & STATUS_DRIVER_OK != 0;
        self.status = v;
        if v & STATUS_DRIVER_OK != 0 && !was_ok {
            if v & STATUS_FEATURES_OK == 0 {
                self.fail(ctx, QueueError::NotReady);
                return;
            }
            self.backend.activate(self.driver_features);
            // Buffers made available before DRIVER_OK are processed now.
            for q in 0..self.queues.len() as u16 {
                if self.queues[usize::from(q)].ready {
                    self.service(ctx, q);
                }
            }
        }
    }

    /// The migration state, described once (vmstate).
    fn wire(&self) -> VirtioPciWire {
        let mut pci = Vec::new();
        self.pci.save(&mut pci);
        let (table_len, pba_len) = self.pci.msix_state_lens();
        let config_len = pci.len() - table_len - pba_len;
        let msix_pba = pci.split_off(config_len + table_len);
        let msix_table = pci.split_off(config_len);
        let (net, blk) = match self.backend.save_state() {
            Some(BackendState::Net(w)) => (Some(w), None),
            Some(BackendState::Blk(w)) => (None, Some(w)),
            None => (None, None),
        };
        let queues: Vec<QueueWire> = self
            .queues
            .iter()
            .map(|q| {
                let s = q.state();
                QueueWire {
                    size: s.size,
                    ready: s.ready,
                    desc: s.desc,
                    avail: s.avail,
                    used: s.used,
                    msix_vector: s.msix_vector,
                    last_avail: s.last_avail,
                    used_idx: s.used_idx,
                    signalled_used: s.signalled_used,
                    signalled_valid: s.signalled_valid,
                }
            })
            .collect();
        VirtioPciWire {
            config_len: pci.len() as u32,
            config: pci,
            msix_table_len: msix_table.len() as u32,
            msix_table,
            msix_pba_len: msix_pba.len() as u32,
            msix_pba,
            status: self.status,
            dfselect: self.dfselect,
            gfselect: self.gfselect,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            config_vector: self.config_vector,
            isr: self.isr,
            generation: self.generation,
            num_queues: queues.len() as u16,
            queues,
            net,
            blk,
        }
    }
}

crate::vmstate! {
    /// One virtqueue's migration state.
    #[derive(Clone, Debug, PartialEq)]
    pub struct QueueWire as "virtqueue", version 1, minimum 1 {
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
}

crate::vmstate! {
    /// A virtio-pci device's migration section: the PCI function (its
    /// config space, and the MSI-X table and PBA as QEMU's `msix` state
    /// sends them: raw entries and pending bits), the transport registers,
    /// every queue, and the device type's own state as a subsection.
    #[derive(Clone, Debug, PartialEq)]
    pub struct VirtioPciWire as "virtio-pci", version 3, minimum 3 {
        pub config_len: u32,
        pub config: Vec<u8> [len = config_len, max = 4096],
        pub msix_table_len: u32,
        pub msix_table: Vec<u8> [len = msix_table_len, max = 32768],
        pub msix_pba_len: u32,
        pub msix_pba: Vec<u8> [len = msix_pba_len, max = 256],
        pub status: u8,
        pub dfselect: u32,
        pub gfselect: u32,
        pub driver_features: u64,
        pub queue_select: u16,
        pub config_vector: u16,
        pub isr: u8,
        pub generation: u8,
        pub num_queues: u16,
        pub queues: Vec<QueueWire> [count = num_queues, max = 127],
    }
    subsections {
        pub net: Option<crate::virtio::net::VirtioNetWire>,
        pub blk: Option<crate::virtio::blk::VirtioBlkWire>,
    }
}

impl<B: VirtioBackend + Clone + 'static> Device for VirtioPci<B> {
    fn read(&mut self, _ctx: &mut DeviceCtx, region: RegionIndex, offset: u64, size: u8) -> u64 {
        match region {
            regions::COMMON => read_le(&self.common_image(), offset, size),
            regions::ISR => {
                // Reading the ISR clears it (virtio 1.x 4.1.4.5).
                let v = if offset == 0 { u64::from(self.isr) } else { 0 };
                if offset == 0 {
                    self.isr = 0;
                }
                v
            }
            regions::DEVICE => self.backend.config_read(offset, size),
            regions::MSIX_TABLE => self.pci.msix_table_read(offset, size),
            regions::MSIX_PBA => self.pci.msix_pba_read(offset, size),
            regions::NOTIFY => 0,
            _ => all_ones(size),
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
            regions::COMMON => self.common_write(ctx, offset, size, value),
            regions::DEVICE => {
                self.backend.config_write(offset, size, value);
            }
            regions::MSIX_TABLE => self.pci.msix_table_write(ctx, offset, size, value),
            // A kick that did not go through the notifier (e.g. another
            // size): the queue is the slot written.
            regions::NOTIFY if offset.is_multiple_of(u64::from(NOTIFY_MULTIPLIER)) => {
                if let Ok(q) = u16::try_from(offset / u64::from(NOTIFY_MULTIPLIER)) {
                    self.kick(ctx, q);
                }
            }
            _ => {}
        }
    }

    fn notify(&mut self, ctx: &mut DeviceCtx, token: u64) {
        if let Ok(q) = u16::try_from(token) {
            self.kick(ctx, q);
        }
    }

    fn pci(&mut self) -> Option<&mut PciConfig> {
        Some(&mut self.pci)
    }

    fn receive_frame(&mut self, ctx: &mut DeviceCtx, pair: u16, frame: &[u8]) -> bool {
        self.receive(ctx, pair, frame)
    }

    fn mac(&self) -> Option<[u8; 6]> {
        self.backend.mac()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        let mut c = alloc::vec![
            ("kicks", s.kicks),
            ("queue_irqs", s.queue_irqs),
            ("config_irqs", s.config_irqs),
            ("errors", s.errors),
            ("resets", s.resets),
        ];
        c.extend(self.backend.counters());
        c
    }

    fn state_version(&self) -> u32 {
        <VirtioPciWire as crate::vmstate::VmState>::VERSION
    }

    fn save_described(&self) -> Option<(Vec<u8>, crate::vmstate::StructDesc)> {
        crate::vmstate::save_described(&mut self.wire()).ok()
    }

    fn load(&mut self, _ctx: &mut DeviceCtx, version: u32, data: &[u8]) -> Result<(), StateError> {
        let w: VirtioPciWire = crate::vmstate::load(data, version)?;
        if usize::from(w.num_queues) != self.queues.len() {
            return Err(StateError::Invalid("number of virtio queues"));
        }
        let (status, dfselect, gfselect, driver_features) =
            (w.status, w.dfselect, w.gfselect, w.driver_features);
        let (queue_select, config_vector, isr, generation) =
            (w.queue_select, w.config_vector, w.isr, w.generation);
        // What a driver could not have negotiated is refused.
        if status & STATUS_FEATURES_OK != 0
            && (driver_features & !self.device_features() != 0
                || driver_features & 1 << VIRTIO_F_VERSION_1 == 0)
        {
            return Err(StateError::Invalid(
                "negotiated features the device does not offer",
            ));
        }
        if status & STATUS_DRIVER_OK != 0 && status & STATUS_FEATURES_OK == 0 {
            return Err(StateError::Invalid("DRIVER_OK without FEATURES_OK"));
        }
        let states: Vec<QueueState> = w
            .queues
            .iter()
            .map(|q| QueueState {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                msix_vector: q.msix_vector,
                last_avail: q.last_avail,
                used_idx: q.used_idx,
                signalled_used: q.signalled_used,
                signalled_valid: q.signalled_valid,
            })
            .collect();
        let mut pci_bytes = w.config.clone();
        pci_bytes.extend_from_slice(&w.msix_table);
        pci_bytes.extend_from_slice(&w.msix_pba);
        if (w.msix_table.len(), w.msix_pba.len()) != self.pci.msix_state_lens() {
            return Err(StateError::Invalid("MSI-X table or PBA of another size"));
        }
        // Everything is checked on copies first, then swapped in whole;
        // the backend goes last, as it applies its state when it is valid.
        let backend_state = match (w.net, w.blk) {
            (Some(n), None) => Some(BackendState::Net(n)),
            (None, Some(b)) => Some(BackendState::Blk(b)),
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(StateError::Invalid("state of two virtio device types"))
            }
        };
        let mut pci = self.pci.clone();
        pci.load(&pci_bytes)?;
        let mut queues: Vec<SplitQueue> = self.queues.clone();
        let event_idx = driver_features & 1 << VIRTIO_RING_F_EVENT_IDX != 0;
        let indirect = driver_features & 1 << VIRTIO_RING_F_INDIRECT_DESC != 0;
        // The rings are checked in `post_load`, once the memory map follows
        // the loaded state (BARs, bus mastering).
        for (q, s) in queues.iter_mut().zip(&states) {
            q.set_features(event_idx, indirect);
            q.restore(s);
        }
        self.backend.load_state(backend_state.as_ref())?;
        self.pci = pci;
        self.queues = queues;
        self.status = status;
        self.dfselect = dfselect;
        self.gfselect = gfselect;
        self.driver_features = driver_features;
        self.queue_select = queue_select;
        self.config_vector = config_vector;
        self.isr = isr;
        self.generation = generation;
        self.error = None;
        Ok(())
    }

    fn post_load(&mut self, ctx: &mut DeviceCtx) -> Result<(), StateError> {
        for q in &mut self.queues {
            q.post_load(&ctx.mem).map_err(|e| {
                ctx.report(format!("loaded queue unusable: {e}"));
                StateError::Invalid(
                    "virtio queue rings are not in RAM of the device's address space",
                )
            })?;
        }
        Ok(())
    }

    fn duplicate(&self) -> Option<Box<dyn Device>> {
        Some(Box::new(self.clone()))
    }

    fn as_any(&mut self) -> &mut dyn core::any::Any {
        self
    }
}

/// Adds a virtio-pci device to the machine at `devfn` with the regions of
/// the layout above and one write notifier per queue; returns its device
/// index.
pub fn add_virtio_pci<B: VirtioBackend + Clone + 'static>(
    m: &mut Machine,
    idstr: &str,
    devfn: u8,
    backend: B,
) -> Result<u32, MachineError> {
    let dev = VirtioPci::new(backend)?;
    let nq = dev.queues.len() as u64;
    let d = m.add_pci_device(idstr, devfn, Box::new(dev))?;
    let name = |what: &str| -> String { format!("virtio-pci-{what}") };
    let modern = m.add_device_container(d, "virtio-pci", MODERN_BAR_SIZE)?;
    let mut subs = Vec::new();
    for (what, offset, len) in [
        ("common", COMMON_OFFSET, STRUCT_SIZE),
        ("isr", ISR_OFFSET, STRUCT_SIZE),
        ("device", DEVICE_OFFSET, STRUCT_SIZE),
        ("notify", NOTIFY_OFFSET, STRUCT_SIZE),
    ] {
        let r = m.add_device_region(d, &name(what), u64::from(len))?;
        m.mem.add_subregion(modern, u64::from(offset), r)?;
        subs.push(r);
    }
    let msix = m.add_device_container(d, "msix", MSIX_BAR_SIZE)?;
    let table = m.add_device_region(d, "msix-table", u64::from(MSIX_PBA_OFFSET))?;
    m.mem.add_subregion(msix, 0, table)?;
    let pba = m.add_device_region(d, "msix-pba", MSIX_BAR_SIZE - u64::from(MSIX_PBA_OFFSET))?;
    m.mem.add_subregion(msix, u64::from(MSIX_PBA_OFFSET), pba)?;
    let notify = subs[3];
    for q in 0..nq {
        m.add_write_notifier(notify, q * u64::from(NOTIFY_MULTIPLIER), 0, None, q)?;
    }
    Ok(d)
}
