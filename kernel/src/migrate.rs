//! Live migration within one Tern, through a QEMU-format stream.
//!
//! The guest asks (hypercall MIGRATE). Tern builds the target VM from the
//! same configuration, turns on dirty logging for guest RAM (4 KiB EPT
//! leaves, dirty flags harvested into a per-block bitmap) and, while the
//! guest keeps running, sends dirty pages as RAM `PART` sections a chunk at
//! a time before VM entries (pre-copy). When few pages are left, or after an
//! iteration cap, the vCPU stops: the last dirty pages (`END`), every
//! device's state (`FULL` sections), the vCPU (`cpu`), EOF and the
//! description close the stream. The target reads the whole stream, writes
//! RAM, loads every device in one memory transaction, restores the vCPU and
//! runs; the source is dropped. Any error leaves the source running.

use crate::mem::HostMem;
use crate::vm::{Vm, VmError};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use hv_core::addr::HostPhysAddr;
use hv_core::dirty::DirtyBitmap;
use hv_core::machine::{CommitMode, DeviceSection, LoadStats};
use hv_core::phys::PhysAccess;
use hv_core::vcpu::VcpuWire;
use hv_core::vmstate::Json;
use migration::channel::MemChannel;
use migration::reader::{read_self_described, PageKind};
use migration::writer::{RamSection, StreamWriter};

/// Names of the RAM blocks in the stream, by block index (QEMU's).
pub const BLOCK_NAMES: [&str; 2] = ["pc.ram", "pc.bios"];
/// Pages sent per VM entry during pre-copy.
const CHUNK: u64 = 256;
/// Dirty pages small enough to send with the vCPU stopped.
const CONVERGED: u64 = 64;
/// Pre-copy passes over the dirty set before the vCPU is stopped anyway.
const MAX_ITERATIONS: u32 = 8;
/// Section ids: RAM, then devices from 1, the vCPU after them.
const RAM_ID: u32 = 0;

/// How a migration goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrateConfig {
    pub mode: CommitMode,
    /// Send RAM while the guest runs (otherwise stop and copy).
    pub precopy: bool,
}

/// A migration in progress on the source.
pub struct Outgoing {
    pub target: Box<Vm>,
    writer: Option<StreamWriter<MemChannel>>,
    bitmap: DirtyBitmap,
    pub iterations: u32,
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// Host TSC when the migration started.
    pub started: u64,
    pub precopy: bool,
}

/// Checkpoints of a migration, as QEMU names them (host TSC).
#[derive(Clone, Debug, Default)]
pub struct Checkpoints(pub Vec<(&'static str, u64)>);

/// What a migration did and cost.
pub struct MigrationReport {
    pub mode: CommitMode,
    pub precopy: bool,
    pub iterations: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub stream_bytes: usize,
    pub sections: usize,
    pub load: LoadStats,
    pub ept_updates: u64,
    pub invepts: u64,
    pub load_tsc: u64,
    pub downtime_tsc: u64,
    pub total_tsc: u64,
    pub checkpoints: Checkpoints,
    pub tsc_hz: u64,
}

impl MigrationReport {
    fn us(&self, ticks: u64) -> u64 {
        (u128::from(ticks) * 1_000_000 / u128::from(self.tsc_hz.max(1))) as u64
    }

    /// Prints the report, and one line of JSON.
    pub fn print(&self, name: &str) {
        let l = &self.load;
        crate::println!(
            "[{name}] migration ({}, {}): {} pages + {} zero pages in {} pre-copy iterations, stream {} bytes; {} device sections loaded in {} ticks ({} us); downtime {} ticks ({} us); total {} us",
            self.mode.name(),
            if self.precopy { "pre-copy" } else { "stop and copy" },
            self.pages, self.zero_pages, self.iterations, self.stream_bytes, self.sections,
            self.load_tsc, self.us(self.load_tsc), self.downtime_tsc, self.us(self.downtime_tsc),
            self.us(self.total_tsc)
        );
        crate::println!(
            "[{name}] migration load: {} renders ({} on demand), {} commits, {} listener commits, {} forced commits, {} EPT updates, {} INVEPTs",
            l.renders, l.on_demand_renders, l.commits, l.listener_commits, l.forced_commits, self.ept_updates, self.invepts
        );
        let mut cp = String::new();
        let t0 = self.checkpoints.0.first().map_or(0, |c| c.1);
        for (i, (n, t)) in self.checkpoints.0.iter().enumerate() {
            cp.push_str(&format!(
                "{}\"{n}\":{}",
                if i == 0 { "" } else { "," },
                t - t0
            ));
        }
        crate::println!(
            "[{name}] migration json: {{\"mode\":\"{}\",\"precopy\":{},\"iterations\":{},\"pages\":{},\"sections\":{},\"load_ticks\":{},\"downtime_ticks\":{},\"renders\":{},\"listener_commits\":{},\"forced_commits\":{},\"ept_updates\":{},\"invepts\":{},\"checkpoints\":{{{cp}}}}}",
            self.mode.name(), self.precopy, self.iterations, self.pages, self.sections, self.load_tsc,
            self.downtime_tsc, l.renders, l.listener_commits, l.forced_commits, self.ept_updates, self.invepts
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
    /// Starts a migration of `vm`: the target is built, RAM logging turns
    /// on, every page is dirty.
    pub fn start(vm: &mut Vm, target: Vm, precopy: bool) -> Result<Self, String> {
        let bitmap = {
            let ept = vm.ept_listener();
            let mut b = ept.dirty_bitmap().map_err(|e| format!("{e:?}"))?;
            b.set_all();
            b
        };
        let mut writer = StreamWriter::new(MemChannel::new(), "pc").map_err(err)?;
        let blocks: Vec<(&str, u64)> = vm
            .block_sizes()
            .iter()
            .zip(BLOCK_NAMES)
            .map(|(&s, n)| (n, s))
            .collect();
        writer.ram_setup(RAM_ID, &blocks).map_err(err)?;
        if target.block_sizes() != vm.block_sizes() {
            return Err("the target's RAM blocks differ from the source's".into());
        }
        // Last: nothing above can fail with logging left on.
        vm.set_ram_logging(true)?;
        Ok(Self {
            target: Box::new(target),
            writer: Some(writer),
            bitmap,
            iterations: 0,
            pages_sent: 0,
            zero_pages: 0,
            started: crate::cpu::rdtsc(),
            precopy,
        })
    }

    /// One step of pre-copy (before a VM entry): sends up to [`CHUNK`]
    /// dirty pages; when the dirty set is spent, harvests the EPT's dirty
    /// flags. Returns true when it is time to stop the vCPU.
    pub fn step(&mut self, vm: &mut Vm) -> Result<bool, String> {
        if self.bitmap.is_clean() {
            self.iterations += 1;
            let n = self.sync(vm)?;
            if n <= CONVERGED || self.iterations >= MAX_ITERATIONS {
                return Ok(true);
            }
        }
        self.send(vm, RamSection::Part, CHUNK)?;
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

    /// Sends up to `max` dirty pages. In this Tern the channel to the
    /// target is memory: pages go straight into the target's RAM blocks
    /// (the stream carries the RAM setup and end, the devices and the
    /// vCPU). The `END` section is written with the last pages.
    fn send(&mut self, vm: &mut Vm, kind: RamSection, max: u64) -> Result<(), String> {
        let pages: Vec<(u32, u64)> = self.bitmap.iter().take(max as usize).collect();
        let mut buf = alloc::vec![0u8; 4096];
        for (block, page) in pages {
            let _ = self.bitmap.clear(block, page);
            let (Some(&(hpa, size)), Some(&(dst, _))) = (
                vm.blocks().get(block as usize),
                self.target.blocks().get(block as usize),
            ) else {
                continue;
            };
            let off = page * 4096;
            if off >= size {
                continue;
            }
            // SAFETY: `off` is inside the source VM's RAM block `block`
            // (checked above), and the target's block has the same layout.
            let mut host = unsafe { HostMem::new() };
            host.read(HostPhysAddr::new(hpa.as_u64() + off), &mut buf);
            if buf.iter().all(|&b| b == 0) {
                self.zero_pages += 1;
            } else {
                self.pages_sent += 1;
            }
            host.write(HostPhysAddr::new(dst.as_u64() + off), &buf);
        }
        if kind == RamSection::End {
            let w = self.writer.as_mut().ok_or("stream closed")?;
            w.ram_begin(kind).map_err(err)?;
            w.ram_finish().map_err(err)?;
        }
        Ok(())
    }

    /// The vCPU is stopped: the rest of RAM, the devices and the vCPU
    /// close the stream. Returns the stream.
    pub fn finish(
        &mut self,
        vm: &mut Vm,
        state: &hv_core::vcpu::VcpuState,
        checkpoints: &mut Checkpoints,
    ) -> Result<Vec<u8>, String> {
        self.sync(vm)?;
        while !self.bitmap.is_clean() {
            self.send(vm, RamSection::Part, CHUNK)?;
        }
        self.send(vm, RamSection::End, 0)?;
        vm.set_ram_logging(false)?;
        checkpoints
            .0
            .push(("src-iterable-saved", crate::cpu::rdtsc()));
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
        w.device(id, "cpu", 0, &mut VcpuWire::of(state))
            .map_err(err)?;
        checkpoints
            .0
            .push(("src-non-iterable-saved", crate::cpu::rdtsc()));
        let w = self.writer.take().ok_or("stream closed")?;
        Ok(w.finish(true).map_err(err)?.into_bytes())
    }
}

/// Loads a whole stream into a freshly built target (RAM, then every device
/// in one transaction, then the vCPU). Nothing of the target runs before;
/// on error the target is dropped by the caller.
pub fn load(
    target: &mut Vm,
    stream: &[u8],
    mode: CommitMode,
) -> Result<(LoadStats, u64, usize), String> {
    let parsed = read_self_described(stream).map_err(|e| format!("stream: {e}"))?;
    let sizes = target.block_sizes();
    for (i, &(name, len)) in parsed.ram_blocks.iter().enumerate() {
        if BLOCK_NAMES.get(i) != Some(&name) || sizes.get(i) != Some(&len) {
            return Err(format!(
                "RAM block {name} of {len:#x} bytes does not match this VM"
            ));
        }
    }
    if parsed.ram_blocks.len() != sizes.len() {
        return Err("the stream's RAM blocks do not match this VM".into());
    }
    // RAM: every page record, checked against its block.
    let blocks = target.blocks().to_vec();
    let mut page = alloc::vec![0u8; 4096];
    for p in &parsed.pages {
        let b = BLOCK_NAMES
            .iter()
            .position(|&n| n == p.block)
            .ok_or_else(|| format!("page at offset {:#x}: unknown block {}", p.offset, p.block))?;
        let &(hpa, size) = blocks
            .get(b)
            .ok_or_else(|| format!("page at offset {:#x}: no block {}", p.offset, p.block))?;
        if p.addr % 4096 != 0 || p.addr.checked_add(4096).is_none_or(|e| e > size) {
            return Err(format!(
                "page at offset {:#x}: {:#x} is outside {}",
                p.offset, p.addr, p.block
            ));
        }
        let data: &[u8] = match p.kind {
            PageKind::Zero(b) => {
                page.fill(b);
                &page
            }
            PageKind::Normal(d) if d.len() == 4096 => d,
            PageKind::Normal(_) => {
                return Err(format!("page at offset {:#x}: not 4 KiB", p.offset))
            }
        };
        // SAFETY: `p.addr` + 4 KiB lies inside the target's RAM block `b`
        // (checked above), which the target VM owns and does not run yet.
        unsafe { HostMem::new() }.write(HostPhysAddr::new(hpa.as_u64() + p.addr), data);
    }
    // Devices and the vCPU.
    let mut cpu = None;
    let mut owned: Vec<(hv_core::devices::DeviceId, u32, &[u8])> = Vec::new();
    for (info, body) in parsed.devices() {
        if info.idstr == "cpu" {
            if cpu.is_some() {
                return Err("two cpu sections".into());
            }
            let w: VcpuWire = hv_core::vmstate::load(body, info.version)
                .map_err(|e| format!("cpu section: {e}"))?;
            cpu = Some(w.state().map_err(|e| format!("cpu section: {e}"))?);
            continue;
        }
        owned.push((
            hv_core::devices::DeviceId {
                idstr: info.idstr.into(),
                instance: info.instance,
            },
            info.version,
            body,
        ));
    }
    let cpu = cpu.ok_or("the stream has no cpu section")?;
    let sections: Vec<DeviceSection> = owned
        .iter()
        .map(|(id, version, data)| DeviceSection {
            id,
            version: *version,
            data,
        })
        .collect();
    let ept_before = target.ept_listener().counters;
    let t0 = crate::cpu::rdtsc();
    let stats = target
        .machine()
        .load_devices(&sections, mode, true)
        .map_err(|e| format!("device state: {e}"))?;
    let t1 = crate::cpu::rdtsc();
    if let Some(e) = target.ept_listener().take_error() {
        return Err(format!("EPT after the load: {e:?}"));
    }
    let _ = ept_before;
    target.restore_vcpu(&cpu)?;
    Ok((stats, t1 - t0, sections.len()))
}

/// Errors of building a target.
pub fn target_error(e: VmError) -> String {
    format!("target: {e}")
}
