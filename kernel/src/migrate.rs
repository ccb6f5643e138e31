//! Live migration through a QEMU-format stream, to a VM in this Tern or to
//! a disk another Tern boots from.
//!
//! The guest asks (hypercall MIGRATE). Tern turns on dirty logging for
//! guest RAM (4 KiB EPT leaves, dirty flags harvested into a per-block
//! bitmap) and, while the guest keeps running, sends dirty pages a chunk
//! at a time before VM entries (pre-copy). When few pages are left, or
//! after an iteration cap, the vCPU stops: the last dirty pages (`END`),
//! every device's state (`FULL` sections), Tern's `tern-vm` section, the
//! vCPU (`cpu`), EOF and the description close the stream.
//!
//! Two transports ([`Transport`]):
//! - `local`: the target is a VM built in this Tern from the same
//!   configuration. Pages go straight into its RAM (the stream carries the
//!   RAM setup and end); its disks are the source's (shared storage). The
//!   target loads the stream and runs; the source is dropped.
//! - `disk`: the whole stream, pages included, goes to an ATA disk
//!   ([`crate::ata`]) that the emulator backs with a host file. Each RAM
//!   disk travels as a RAM block of its own (`<idstr>.disk`), sent with the
//!   vCPU stopped. Another Tern boots with that stream as the VM's module
//!   (`incoming` on its line) and loads it ([`load_into`]).
//!
//! Any error before the switch leaves the source running.

use crate::ata::{AtaDisk, DiskChannel};
use crate::mem::HostMem;
use crate::vm::{Vm, VmError};
use alloc::boxed::Box;
use alloc::format;
use alloc::rc::Rc;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::RefCell;
use hv_core::addr::HostPhysAddr;
use hv_core::dirty::DirtyBitmap;
use hv_core::machine::CommitMode;
use hv_core::phys::PhysAccess;
use hv_core::vcpu::VcpuWire;
use hv_core::virtio::blk::VirtioBlk;
use hv_core::virtio::pci::VirtioPci;
use hv_core::vmstate::Json;
use migration::channel::{ChannelError, ChannelWrite, MemChannel};
use migration::incoming::{self, Loaded, RamTarget, TernVmWire};
use migration::writer::{RamSection, StreamWriter};

/// Names of the RAM blocks in the stream, by block index (QEMU's).
pub const BLOCK_NAMES: [&str; 2] = ["pc.ram", "pc.bios"];
/// Pages sent per VM entry during pre-copy.
const CHUNK: u64 = 256;
/// Dirty pages always small enough to send with the vCPU stopped.
const CONVERGED: u64 = 64;
/// The downtime pre-copy aims at when none is given (`migrate.downtime=`).
pub const DEFAULT_DOWNTIME_MS: u64 = 300;
/// Pre-copy passes over the dirty set before the vCPU is stopped anyway.
const MAX_ITERATIONS: u32 = 8;
/// Section ids: RAM, then devices from 1, the VM and the vCPU after them.
const RAM_ID: u32 = 0;
const PAGE: u64 = 4096;

/// Where the stream goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A VM of this Tern (`migrate=local`).
    Local,
    /// The secondary ATA master, for another Tern (`migrate=disk`).
    Disk,
}

/// How a VM migrates and loads migrated state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigrateConfig {
    /// Where an outgoing migration goes (`None`: the guest's MIGRATE is
    /// refused).
    pub transport: Option<Transport>,
    /// How device state is loaded (`migrate.commit=`).
    pub mode: CommitMode,
    /// Send RAM while the guest runs (otherwise stop and copy).
    pub precopy: bool,
    /// The downtime to aim at (`migrate.downtime=MS`): pre-copy stops the
    /// vCPU once the dirty pages left take no longer to send at the rate
    /// the channel showed so far.
    pub downtime_ms: u64,
}

/// The byte channel of an outgoing stream.
enum Chan {
    Mem(MemChannel),
    Disk(DiskChannel),
}

impl ChannelWrite for Chan {
    fn write_all(&mut self, data: &[u8]) -> Result<(), ChannelError> {
        match self {
            Self::Mem(c) => c.write_all(data),
            Self::Disk(c) => c.write_all(data),
        }
    }
}

/// A RAM disk of a VM as a RAM block of the stream.
struct DiskBlock {
    name: String,
    disk: Rc<RefCell<Vec<u8>>>,
    /// The block's length: the disk's, rounded up to whole pages.
    len: u64,
}

/// The RAM disks of a VM's virtio-blk devices, in device order: (idstr,
/// disk).
pub fn blk_disks(vm: &mut Vm) -> Vec<(String, Rc<RefCell<Vec<u8>>>)> {
    type Blk = VirtioPci<VirtioBlk>;
    let ids: Vec<String> = vm
        .machine()
        .device_ids()
        .filter(|id| id.idstr.ends_with("/virtio-blk"))
        .map(|id| id.idstr.clone())
        .collect();
    ids.into_iter()
        .filter_map(|idstr| {
            let disk = vm.machine().device::<Blk>(&idstr)?.backend.disk();
            Some((idstr, disk))
        })
        .collect()
}

/// The RAM disks of a VM as RAM blocks of the stream.
fn disk_blocks(vm: &mut Vm) -> Vec<DiskBlock> {
    blk_disks(vm)
        .into_iter()
        .map(|(idstr, disk)| {
            let len = (disk.borrow().len() as u64).next_multiple_of(PAGE);
            DiskBlock {
                name: format!("{idstr}.disk"),
                disk,
                len,
            }
        })
        .collect()
}

/// A migration in progress on the source.
pub struct Outgoing {
    /// The local target; `None` when the stream goes to a disk.
    pub target: Option<Box<Vm>>,
    writer: Option<StreamWriter<Chan>>,
    bitmap: DirtyBitmap,
    /// RAM disks sent as blocks (disk transport).
    disks: Vec<DiskBlock>,
    pub iterations: u32,
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// Host TSC when the migration started.
    pub started: u64,
    pub precopy: bool,
    /// Bytes sent while the guest ran and the TSC ticks sending them took
    /// (the channel's measured rate).
    sent_bytes: u64,
    send_ticks: u64,
    /// The downtime limit in TSC ticks.
    limit_ticks: u64,
}

/// Checkpoints of a migration, as QEMU names them (host TSC).
#[derive(Clone, Debug, Default)]
pub struct Checkpoints(pub Vec<(&'static str, u64)>);

impl Checkpoints {
    fn json(&self) -> String {
        let mut cp = String::new();
        let t0 = self.0.first().map_or(0, |c| c.1);
        for (i, (n, t)) in self.0.iter().enumerate() {
            cp.push_str(&format!(
                "{}\"{n}\":{}",
                if i == 0 { "" } else { "," },
                t.wrapping_sub(t0)
            ));
        }
        cp
    }
}

/// The source's side of a migration.
pub struct SourceReport {
    pub transport: Transport,
    pub mode: CommitMode,
    pub precopy: bool,
    pub iterations: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub stream_bytes: u64,
    /// vCPU stopped to the stream complete (to the target running, locally).
    pub downtime_tsc: u64,
    pub total_tsc: u64,
    pub checkpoints: Checkpoints,
    pub tsc_hz: u64,
    /// The channel's rate measured during pre-copy (bytes per second) and
    /// the downtime limit (ms).
    pub rate: u64,
    pub downtime_limit_ms: u64,
}

/// A target's load of a stream.
pub struct TargetReport {
    pub loaded: Loaded,
    pub stream_bytes: usize,
    pub ept_updates: u64,
    pub invepts: u64,
    pub checkpoints: Checkpoints,
    pub tsc_hz: u64,
}

fn us(ticks: u64, hz: u64) -> u64 {
    (u128::from(ticks) * 1_000_000 / u128::from(hz.max(1))) as u64
}

impl SourceReport {
    /// Prints what the source did, and one line of JSON.
    pub fn print(&self, name: &str) {
        let how = if self.precopy {
            "pre-copy"
        } else {
            "stop and copy"
        };
        let to = match self.transport {
            Transport::Local => "local",
            Transport::Disk => "to disk",
        };
        crate::println!(
            "[{name}] migration ({}, {how}, {to}): {} pages + {} zero pages in {} pre-copy iterations, stream {} bytes; downtime {} ticks ({} us, limit {} ms at {} KB/s measured); total {} us",
            self.mode.name(),
            self.pages,
            self.zero_pages,
            self.iterations,
            self.stream_bytes,
            self.downtime_tsc,
            us(self.downtime_tsc, self.tsc_hz),
            self.downtime_limit_ms,
            self.rate / 1000,
            us(self.total_tsc, self.tsc_hz)
        );
        crate::println!(
            "[{name}] migration source json: {{\"transport\":\"{}\",\"mode\":\"{}\",\"precopy\":{},\"iterations\":{},\"pages\":{},\"zero_pages\":{},\"stream_bytes\":{},\"downtime_ticks\":{},\"total_ticks\":{},\"checkpoints\":{{{}}}}}",
            match self.transport {
                Transport::Local => "local",
                Transport::Disk => "disk",
            },
            self.mode.name(),
            self.precopy,
            self.iterations,
            self.pages,
            self.zero_pages,
            self.stream_bytes,
            self.downtime_tsc,
            self.total_tsc,
            self.checkpoints.json()
        );
    }
}

impl TargetReport {
    /// Prints the load's counters, and one line of JSON.
    pub fn print(&self, name: &str) {
        let l = &self.loaded.stats;
        let t = self.loaded.load_ticks;
        crate::println!(
            "[{name}] migration load ({}): {} device sections in {} ticks ({} us), {} RAM pages ({} zero) from a stream of {} bytes read and checked in {} ticks",
            l.mode.name(),
            self.loaded.sections,
            t,
            us(t, self.tsc_hz),
            self.loaded.pages,
            self.loaded.zero_pages,
            self.stream_bytes,
            self.loaded.parse_ticks
        );
        crate::println!(
            "[{name}] migration load: {} renders ({} on demand), {} commits, {} listener commits, {} forced commits, {} EPT updates, {} INVEPTs",
            l.renders, l.on_demand_renders, l.commits, l.listener_commits, l.forced_commits, self.ept_updates, self.invepts
        );
        // Per section: its own load, mappings and post-load (the commit they
        // share is only in the total).
        crate::println!("[{name}] migration load per section (ticks):");
        for (idstr, t) in &self.loaded.section_ticks {
            crate::println!("[{name}]   {t:>10}  {idstr}");
        }
        let per: Vec<String> = self
            .loaded
            .section_ticks
            .iter()
            .map(|(i, t)| format!("\"{i}\":{t}"))
            .collect();
        crate::println!(
            "[{name}] migration load json: {{\"mode\":\"{}\",\"sections\":{},\"load_ticks\":{},\"parse_ticks\":{},\"pages\":{},\"renders\":{},\"listener_commits\":{},\"forced_commits\":{},\"ept_updates\":{},\"invepts\":{},\"section_ticks\":{{{}}},\"checkpoints\":{{{}}}}}",
            l.mode.name(),
            self.loaded.sections,
            t,
            self.loaded.parse_ticks,
            self.loaded.pages,
            l.renders,
            l.listener_commits,
            l.forced_commits,
            self.ept_updates,
            self.invepts,
            per.join(","),
            self.checkpoints.json()
        );
    }
}

fn err(e: impl core::fmt::Display) -> String {
    e.to_string()
}

/// A description of a device section Tern writes as its own layout: one
/// buffer (so tools that walk sections by description can still step over
/// it).
fn buffer_desc(idstr: &str, version: u32, len: usize) -> Json {
    Json::Object(alloc::vec![
        ("vmsd_name".into(), Json::Str(idstr.into())),
        ("version".into(), Json::Int(version.into())),
        (
            "fields".into(),
            Json::Array(alloc::vec![Json::Object(alloc::vec![
                ("name".into(), Json::Str("state".into())),
                ("type".into(), Json::Str("buffer".into())),
                ("size".into(), Json::Int(len as i128)),
            ])]),
        ),
    ])
}

impl Outgoing {
    /// Starts a migration of `vm` to `target` (local) or, without one, to
    /// the disk: RAM logging turns on, every page is dirty.
    pub fn start(
        vm: &mut Vm,
        target: Option<Vm>,
        precopy: bool,
        limit_ticks: u64,
    ) -> Result<Self, String> {
        let bitmap = {
            let ept = vm.ept_listener();
            let mut b = ept.dirty_bitmap().map_err(|e| format!("{e:?}"))?;
            b.set_all();
            b
        };
        let (chan, disks) = match target {
            Some(_) => (Chan::Mem(MemChannel::new()), Vec::new()),
            None => {
                let disk = AtaDisk::probe(crate::ata::SECONDARY)
                    .map_err(|e| format!("migration disk: {e}"))?;
                (Chan::Disk(DiskChannel::new(disk)), disk_blocks(vm))
            }
        };
        let mut writer = StreamWriter::new(chan, "pc").map_err(err)?;
        let mut blocks: Vec<(&str, u64)> = vm
            .block_sizes()
            .iter()
            .zip(BLOCK_NAMES)
            .map(|(&s, n)| (n, s))
            .collect();
        blocks.extend(disks.iter().map(|d| (d.name.as_str(), d.len)));
        writer.ram_setup(RAM_ID, &blocks).map_err(err)?;
        if let Some(t) = &target {
            if t.block_sizes() != vm.block_sizes() {
                return Err("the target's RAM blocks differ from the source's".into());
            }
        }
        // Last: nothing above can fail with logging left on, and if turning
        // it on fails part-way it is turned off again.
        if let Err(e) = vm.set_ram_logging(true) {
            vm.end_logging_after_failure();
            return Err(e);
        }
        Ok(Self {
            target: target.map(Box::new),
            writer: Some(writer),
            bitmap,
            disks,
            iterations: 0,
            pages_sent: 0,
            zero_pages: 0,
            started: crate::cpu::rdtsc(),
            precopy,
            sent_bytes: 0,
            send_ticks: 0,
            limit_ticks,
        })
    }

    /// Whether `pages` dirty pages (and, on a stream, the RAM disks sent
    /// with the vCPU stopped) can go within the downtime limit at the rate
    /// measured so far.
    fn fits(&self, pages: u64) -> bool {
        if pages <= CONVERGED {
            return true;
        }
        if self.sent_bytes == 0 {
            return false;
        }
        // Bytes left: a whole page each (a page record on a stream: its
        // header too; zero pages are smaller, so this errs long), plus the
        // disks on a stream.
        let left = match self.target {
            Some(_) => u128::from(pages) * u128::from(PAGE),
            None => {
                u128::from(pages) * u128::from(PAGE + 8)
                    + self.disks.iter().map(|d| u128::from(d.len)).sum::<u128>()
            }
        };
        // left / (sent_bytes / send_ticks) <= limit_ticks
        left * u128::from(self.send_ticks)
            <= u128::from(self.limit_ticks) * u128::from(self.sent_bytes)
    }

    /// The rate measured so far, in bytes per second at `tsc_hz`.
    pub fn rate(&self, tsc_hz: u64) -> u64 {
        if self.send_ticks == 0 {
            return 0;
        }
        (u128::from(self.sent_bytes) * u128::from(tsc_hz) / u128::from(self.send_ticks)) as u64
    }

    fn writer(&mut self) -> Result<&mut StreamWriter<Chan>, String> {
        self.writer.as_mut().ok_or_else(|| "stream closed".into())
    }

    /// One step of pre-copy (before a VM entry): sends up to [`CHUNK`]
    /// dirty pages; when the dirty set is spent, harvests the EPT's dirty
    /// flags. Returns true when it is time to stop the vCPU.
    pub fn step(&mut self, vm: &mut Vm) -> Result<bool, String> {
        if self.bitmap.is_clean() {
            self.iterations += 1;
            let n = self.sync(vm)?;
            if self.fits(n) || self.iterations >= MAX_ITERATIONS {
                return Ok(true);
            }
        }
        let t0 = crate::cpu::rdtsc();
        let pages_before = self.pages_sent + self.zero_pages;
        let stream = self.target.is_none();
        let pos_before = self.writer()?.position();
        if stream {
            self.writer()?.ram_begin(RamSection::Part).map_err(err)?;
        }
        self.send(vm, CHUNK)?;
        if stream {
            self.writer()?.ram_finish().map_err(err)?;
        }
        self.send_ticks += crate::cpu::rdtsc().wrapping_sub(t0);
        // The rate is of what the channel carried: the stream's bytes, or
        // for a local target the pages copied.
        self.sent_bytes += if stream {
            self.writer()?.position().saturating_sub(pos_before)
        } else {
            (self.pages_sent + self.zero_pages - pages_before) * PAGE
        };
        Ok(false)
    }

    /// Harvests what was written since the last sync: the guest's writes
    /// (EPT dirty flags) and Tern's own (device DMA, emulation). Returns
    /// the pages now dirty.
    fn sync(&mut self, vm: &mut Vm) -> Result<u64, String> {
        vm.ept_listener()
            .sync_dirty(&mut self.bitmap)
            .map_err(|e| format!("dirty log: {e:?}"))?;
        if let Some(dma) = vm.machine().take_dma_dirty() {
            self.bitmap
                .merge(&dma)
                .map_err(|e| format!("dirty log: {e:?}"))?;
        }
        Ok(self.bitmap.count())
    }

    fn count(&mut self, page: &[u8]) {
        if page.iter().all(|&b| b == 0) {
            self.zero_pages += 1;
        } else {
            self.pages_sent += 1;
        }
    }

    /// Sends up to `max` dirty pages: into the local target's RAM, or as
    /// page records into the open RAM section of the stream.
    fn send(&mut self, vm: &mut Vm, max: u64) -> Result<(), String> {
        let pages: Vec<(u32, u64)> = self.bitmap.iter().take(max as usize).collect();
        let mut buf = alloc::vec![0u8; PAGE as usize];
        for (block, page) in pages {
            let _ = self.bitmap.clear(block, page);
            let (Some(&(hpa, size)), Some(&name)) = (
                vm.blocks().get(block as usize),
                BLOCK_NAMES.get(block as usize),
            ) else {
                continue;
            };
            let off = page * PAGE;
            if off >= size {
                continue;
            }
            // SAFETY: `off` is below `size` (checked above) and both are
            // page multiples (blocks are rounded up to pages when they are
            // allocated), so the page lies inside the source VM's RAM block
            // `block`, which it owns while this migration holds the VM.
            unsafe { HostMem::new() }.read(HostPhysAddr::new(hpa.as_u64() + off), &mut buf);
            self.count(&buf);
            match self.target.as_deref() {
                Some(t) => {
                    let Some(&(dst, _)) = t.blocks().get(block as usize) else {
                        continue;
                    };
                    // SAFETY: the target's blocks have the source's sizes
                    // (checked in `start`), so the page lies inside the
                    // target's block `block`, owned by the target, which
                    // does not run yet.
                    unsafe { HostMem::new() }.write(HostPhysAddr::new(dst.as_u64() + off), &buf);
                }
                None => self.writer()?.ram_page(name, off, &buf).map_err(err)?,
            }
        }
        Ok(())
    }

    /// Sends every page of every RAM disk (the vCPU is stopped).
    fn send_disks(&mut self) -> Result<(), String> {
        let mut buf = alloc::vec![0u8; PAGE as usize];
        for i in 0..self.disks.len() {
            let (name, disk, len) = {
                let d = &self.disks[i];
                (d.name.clone(), d.disk.clone(), d.len)
            };
            let mut off = 0;
            while off < len {
                buf.fill(0);
                {
                    let data = disk.borrow();
                    let from = (off as usize).min(data.len());
                    let to = (off as usize + buf.len()).min(data.len());
                    buf[..to - from].copy_from_slice(&data[from..to]);
                }
                self.count(&buf);
                self.writer()?.ram_page(&name, off, &buf).map_err(err)?;
                off += PAGE;
            }
        }
        Ok(())
    }

    /// The vCPU is stopped: the rest of RAM (and the disks), the devices,
    /// the VM and the vCPU close the stream. Returns the stream (local) or
    /// an empty vector once it is on the disk, and its length.
    pub fn finish(
        &mut self,
        vm: &mut Vm,
        state: &hv_core::vcpu::VcpuState,
        checkpoints: &mut Checkpoints,
    ) -> Result<(Vec<u8>, u64), String> {
        self.sync(vm)?;
        if self.target.is_some() {
            while !self.bitmap.is_clean() {
                self.send(vm, CHUNK)?;
            }
            self.writer()?.ram_begin(RamSection::End).map_err(err)?;
        } else {
            self.writer()?.ram_begin(RamSection::End).map_err(err)?;
            while !self.bitmap.is_clean() {
                self.send(vm, CHUNK)?;
            }
            self.send_disks()?;
        }
        self.writer()?.ram_finish().map_err(err)?;
        vm.set_ram_logging(false)?;
        checkpoints
            .0
            .push(("src-iterable-saved", crate::cpu::rdtsc()));
        let generation = vm
            .generation
            .checked_add(1)
            .ok_or("the migration generation is at its limit")?;
        let w = self.writer.as_mut().ok_or("stream closed")?;
        let mut id = RAM_ID + 1;
        for (dev, version, body, desc) in vm.machine().save_devices_described() {
            let desc = match desc {
                Some(d) => d.to_json(),
                None => buffer_desc(&dev.idstr, version, body.len()),
            };
            w.device_raw(id, &dev.idstr, dev.instance, version, &body, Some(desc))
                .map_err(err)?;
            id += 1;
        }
        w.device(id, "tern-vm", 0, &mut TernVmWire { generation })
            .map_err(err)?;
        w.device(id + 1, "cpu", 0, &mut VcpuWire::of(state))
            .map_err(err)?;
        checkpoints
            .0
            .push(("src-non-iterable-saved", crate::cpu::rdtsc()));
        let w = self.writer.take().ok_or("stream closed")?;
        match w.finish(true).map_err(err)? {
            Chan::Mem(m) => {
                let bytes = m.into_bytes();
                let n = bytes.len() as u64;
                Ok((bytes, n))
            }
            Chan::Disk(d) => {
                let n = d.close().map_err(|e| format!("migration disk: {e}"))?;
                Ok((Vec::new(), n))
            }
        }
    }
}

/// A VM's RAM blocks (and, for a stream from another Tern, its RAM disks)
/// as the loader's [`RamTarget`].
struct VmRam {
    blocks: Vec<(HostPhysAddr, u64)>,
    disks: Vec<DiskBlock>,
}

impl RamTarget for VmRam {
    fn blocks(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .blocks
            .iter()
            .zip(BLOCK_NAMES)
            .map(|(&(_, s), n)| (n.to_string(), s))
            .collect();
        v.extend(self.disks.iter().map(|d| (d.name.clone(), d.len)));
        v
    }

    fn write(&mut self, block: usize, offset: u64, data: &[u8]) {
        if let Some(&(hpa, size)) = self.blocks.get(block) {
            // The loader checked this against `blocks()`; checked again here
            // because a wrong range would write host memory of others.
            if offset
                .checked_add(data.len() as u64)
                .is_none_or(|end| end > size)
            {
                return;
            }
            // SAFETY: `offset + data.len()` lies inside this block (checked
            // just above), which is host memory of the target VM, which
            // does not run yet.
            unsafe { HostMem::new() }.write(HostPhysAddr::new(hpa.as_u64() + offset), data);
        } else if let Some(d) = self.disks.get(block - self.blocks.len()) {
            // The block is the disk rounded up to pages: bytes past the
            // disk's end are dropped.
            let mut disk = d.disk.borrow_mut();
            let from = (offset as usize).min(disk.len());
            let to = (offset as usize + data.len()).min(disk.len());
            disk[from..to].copy_from_slice(&data[..to - from]);
        }
    }
}

/// Loads a whole stream into a freshly built `target`: RAM (and, with
/// `disks`, its RAM disks), every device in one transaction, the vCPU and
/// the generation. Nothing of the target runs before; on error the caller
/// drops it.
pub fn load_into(
    target: &mut Vm,
    stream: &[u8],
    mode: CommitMode,
    disks: bool,
) -> Result<(Loaded, u64, u64), String> {
    let mut ram = VmRam {
        blocks: target.blocks().to_vec(),
        disks: if disks {
            disk_blocks(target)
        } else {
            Vec::new()
        },
    };
    let before = target.ept_listener().counters;
    // The full check (with the MSR rules of this CPU) runs again when the
    // vCPU takes the state; this one refuses a bad state before RAM and
    // devices are touched.
    let check = |s: &hv_core::vcpu::VcpuState| {
        s.check(crate::cpu::mxcsr_mask(), 0)
            .map_err(|e| e.to_string())
    };
    let loaded = incoming::load(
        target.machine(),
        &mut ram,
        stream,
        mode,
        &check,
        crate::cpu::rdtsc,
    )
    .map_err(|e| e.to_string())?;
    if let Some(e) = target.ept_listener().take_error() {
        return Err(format!("EPT after the load: {e:?}"));
    }
    let after = target.ept_listener().counters;
    target.restore_vcpu(&loaded.vcpu)?;
    target.generation = loaded.vm.generation;
    Ok((
        loaded,
        after.updates - before.updates,
        after.invepts - before.invepts,
    ))
}

/// Errors of building a target.
pub fn target_error(e: VmError) -> String {
    format!("target: {e}")
}
