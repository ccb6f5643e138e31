//! Applying a whole incoming stream to a freshly built target: RAM pages
//! into the target's blocks, every device section into the machine in one
//! memory transaction ([`Machine::load_devices`]), and the vCPU and Tern's
//! own `tern-vm` section handed back to the caller, who owns the vCPU.
//!
//! Order, and what a refusal leaves behind:
//! 1. The stream is read whole and checked (magic, sections, footers,
//!    EOF, description); the RAM block list must equal the target's; every
//!    page must lie inside its block; the `cpu` section must decode and
//!    pass the caller's check (the kernel's is what restoring it on its
//!    CPU requires); `tern-vm` must decode. Nothing is written before all
//!    of this passed.
//! 2. RAM is written (the device post-load hooks read it: ring caches).
//! 3. Devices load all or nothing. If they refuse, RAM of the target was
//!    written but the target never runs: the caller drops it.
//!
//! The kernel uses this for a local target and for a stream that came from
//! another Tern as a boot module; host tests drive the same code.

use crate::error::StreamError;
use crate::reader::{read_self_described, PageKind};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use hv_core::devices::DeviceId;
use hv_core::machine::{CommitMode, DeviceSection, LoadError, LoadStats, Machine};
use hv_core::vcpu::{VcpuState, VcpuWire};

hv_core::vmstate! {
    /// Tern's own section: what the VM (not a device) carries across.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct TernVmWire as "tern-vm", version 1, minimum 1 {
        /// How many migrations brought the VM where it is now.
        pub generation: u64,
    }
}

/// Where the target's RAM blocks live. Block `i` of the stream's block list
/// is block `i` here, with the same name and length.
pub trait RamTarget {
    /// Name and length in bytes of each block, in stream order.
    fn blocks(&self) -> Vec<(String, u64)>;
    /// Writes one page; `offset + data.len()` lies inside block `block`
    /// (the loader checked it against [`RamTarget::blocks`]).
    fn write(&mut self, block: usize, offset: u64, data: &[u8]);
}

/// What a successful load produced.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub stats: LoadStats,
    /// Device sections loaded.
    pub sections: usize,
    pub vcpu: VcpuState,
    pub vm: TernVmWire,
    /// Clock ticks the device load took (the caller's clock).
    pub load_ticks: u64,
    /// Clock ticks reading and checking the whole stream took (before
    /// anything was applied).
    pub parse_ticks: u64,
    /// Each device section (idstr) with its own ticks: its load, mappings
    /// and post-load hook (the shared commit is in `load_ticks` only).
    pub section_ticks: Vec<(String, u64)>,
    /// RAM pages written, and how many of them were zero pages.
    pub pages: u64,
    pub zero_pages: u64,
}

/// Why a load was refused; each names where.
#[derive(Clone, Debug, PartialEq)]
pub enum IncomingError {
    /// The stream itself (with its byte offset and section).
    Stream(StreamError),
    /// The RAM block list does not describe this target.
    Blocks(String),
    /// A page record at this byte offset of the stream.
    Page { offset: usize, what: String },
    /// A section of the VM (`cpu`, `tern-vm`): missing, doubled or bad.
    Vm { idstr: String, what: String },
    /// The devices refused their state (nothing of them changed).
    Devices(LoadError),
}

impl fmt::Display for IncomingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stream(e) => write!(f, "stream: {e}"),
            Self::Blocks(m) => write!(f, "RAM blocks: {m}"),
            Self::Page { offset, what } => write!(f, "page at offset {offset:#x}: {what}"),
            Self::Vm { idstr, what } => write!(f, "section {idstr}: {what}"),
            Self::Devices(e) => write!(f, "device state: {e}"),
        }
    }
}

impl From<StreamError> for IncomingError {
    fn from(e: StreamError) -> Self {
        Self::Stream(e)
    }
}

const PAGE: u64 = 4096;

/// Loads `stream` into `machine` and `ram` (see the module docs for the
/// order). `check_vcpu` vets the vCPU state before anything is written;
/// `clock` times the device load.
pub fn load(
    machine: &mut Machine,
    ram: &mut dyn RamTarget,
    stream: &[u8],
    mode: CommitMode,
    check_vcpu: &dyn Fn(&VcpuState) -> Result<(), String>,
    clock: fn() -> u64,
) -> Result<Loaded, IncomingError> {
    let p0 = clock();
    let parsed = read_self_described(stream)?;
    let parse_ticks = clock().wrapping_sub(p0);
    let blocks = ram.blocks();
    if parsed.ram_blocks.len() != blocks.len()
        || parsed
            .ram_blocks
            .iter()
            .zip(&blocks)
            .any(|(&(n, l), (name, len))| n != name || l != *len)
    {
        let have: Vec<String> = blocks
            .iter()
            .map(|(n, l)| format!("{n} ({l:#x})"))
            .collect();
        let got: Vec<String> = parsed
            .ram_blocks
            .iter()
            .map(|(n, l)| format!("{n} ({l:#x})"))
            .collect();
        return Err(IncomingError::Blocks(format!(
            "the stream has [{}], this VM [{}]",
            got.join(", "),
            have.join(", ")
        )));
    }
    // Every page checked before any is written.
    let mut plan: Vec<(usize, u64, PageKind)> = Vec::with_capacity(parsed.pages.len());
    for p in &parsed.pages {
        let b = blocks
            .iter()
            .position(|(n, _)| n == p.block)
            .ok_or_else(|| IncomingError::Page {
                offset: p.offset,
                what: format!("unknown block {}", p.block),
            })?;
        let len = blocks[b].1;
        if p.addr % PAGE != 0 || p.addr.checked_add(PAGE).is_none_or(|e| e > len) {
            return Err(IncomingError::Page {
                offset: p.offset,
                what: format!("{:#x} is outside {} ({len:#x} bytes)", p.addr, p.block),
            });
        }
        if let PageKind::Normal(d) = p.kind {
            if d.len() as u64 != PAGE {
                return Err(IncomingError::Page {
                    offset: p.offset,
                    what: format!("{} bytes, not one page", d.len()),
                });
            }
        }
        plan.push((b, p.addr, p.kind));
    }
    let vm_err = |idstr: &str, what: String| IncomingError::Vm {
        idstr: idstr.into(),
        what,
    };
    let mut vcpu = None;
    let mut vm = None;
    let mut owned: Vec<(DeviceId, u32, &[u8])> = Vec::new();
    for (info, body) in parsed.devices() {
        match info.idstr {
            "cpu" => {
                if vcpu.is_some() || info.instance != 0 {
                    return Err(vm_err("cpu", "more than one".into()));
                }
                let w: VcpuWire = hv_core::vmstate::load(body, info.version)
                    .map_err(|e| vm_err("cpu", format!("{e}")))?;
                let state = w.state().map_err(|e| vm_err("cpu", e.into()))?;
                check_vcpu(&state).map_err(|e| vm_err("cpu", e))?;
                vcpu = Some(state);
            }
            "tern-vm" => {
                if vm.is_some() || info.instance != 0 {
                    return Err(vm_err("tern-vm", "more than one".into()));
                }
                let w: TernVmWire = hv_core::vmstate::load(body, info.version)
                    .map_err(|e| vm_err("tern-vm", format!("{e}")))?;
                if w.generation == u64::MAX {
                    return Err(vm_err("tern-vm", "generation at its limit".into()));
                }
                vm = Some(w);
            }
            _ => owned.push((
                DeviceId {
                    idstr: info.idstr.into(),
                    instance: info.instance,
                },
                info.version,
                body,
            )),
        }
    }
    let vcpu = vcpu.ok_or_else(|| vm_err("cpu", "missing".into()))?;
    let vm = vm.ok_or_else(|| vm_err("tern-vm", "missing".into()))?;

    let (mut pages, mut zero_pages) = (0, 0);
    let mut fill = alloc::vec![0u8; PAGE as usize];
    for (b, addr, kind) in plan {
        match kind {
            PageKind::Zero(v) => {
                fill.fill(v);
                ram.write(b, addr, &fill);
                zero_pages += 1;
            }
            PageKind::Normal(d) => ram.write(b, addr, d),
        }
        pages += 1;
    }
    let sections: Vec<DeviceSection> = owned
        .iter()
        .map(|(id, version, data)| DeviceSection {
            id,
            version: *version,
            data,
        })
        .collect();
    let clock_before = machine.load_clock.replace(clock);
    let t0 = clock();
    let r = machine.load_devices(&sections, mode, true);
    let load_ticks = clock().wrapping_sub(t0);
    machine.load_clock = clock_before;
    let stats = r.map_err(IncomingError::Devices)?;
    let section_ticks = owned
        .iter()
        .map(|(id, ..)| id.idstr.clone())
        .zip(machine.section_ticks.iter().copied())
        .collect();
    Ok(Loaded {
        stats,
        sections: sections.len(),
        vcpu,
        vm,
        load_ticks,
        parse_ticks,
        section_ticks,
        pages,
        zero_pages,
    })
}
