//! Loading every device's state at once (the non-iterable part of an
//! incoming migration) inside **one** memory transaction.
//!
//! The load is all or nothing: each state goes into a duplicate of its
//! device ([`Device::duplicate`]); only when every state is in, the memory
//! map follows it (PCI BARs, bus mastering, device-owned regions) and every
//! post-load hook (ring caches, tables) accepted the result, the duplicates
//! replace the devices and the transaction commits: each changed address
//! space is rendered once and each listener (EPT) runs once. On any error
//! the transaction is abandoned and the original devices stay: no device,
//! region or listener saw anything.
//!
//! Three commit modes, as the seed compares them:
//! - [`CommitMode::Deferred`]: one transaction; reads inside it (post-load
//!   hooks) see the pending tree rendered on demand, without any listener
//!   commit.
//! - [`CommitMode::ForcedRead`]: one transaction, but every read inside it
//!   first commits the pending changes to the listeners (the seed series'
//!   behaviour, forced early commits).
//! - [`CommitMode::Eager`]: no outer transaction; every change commits at
//!   once (QEMU before the seed). A failure then restores the old devices
//!   and maps them back, change by change.

use super::{Machine, MachineError, PciFunction};
use crate::devices::{Device, DeviceId, StateError};
use crate::memory::{ReadPolicy, Stats};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// How memory-map changes of a load reach the listeners.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CommitMode {
    #[default]
    Deferred,
    Eager,
    ForcedRead,
}

impl CommitMode {
    /// `deferred`, `eager` or `forced-read` (the `migrate.commit=` values).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "deferred" => Some(Self::Deferred),
            "eager" => Some(Self::Eager),
            "forced-read" => Some(Self::ForcedRead),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Deferred => "deferred",
            Self::Eager => "eager",
            Self::ForcedRead => "forced-read",
        }
    }
}

/// One device's saved state in a load.
#[derive(Clone, Copy, Debug)]
pub struct DeviceSection<'a> {
    pub id: &'a DeviceId,
    pub version: u32,
    pub data: &'a [u8],
}

/// Why a load failed; nothing was changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// A section names a device the machine does not have.
    NoSuchDevice { section: usize, id: DeviceId },
    /// Two sections name the same device.
    Duplicate { section: usize, id: DeviceId },
    /// A device with state got no section.
    Missing { id: DeviceId },
    /// A device cannot be loaded without risking a half-applied state.
    NotDuplicable { id: DeviceId },
    /// The device refused its state.
    State {
        section: usize,
        id: DeviceId,
        error: StateError,
    },
    /// The device refused its state once the memory map followed it.
    PostLoad { id: DeviceId, error: StateError },
    /// The memory map could not follow the loaded state.
    Machine {
        id: Option<DeviceId>,
        error: MachineError,
    },
}

impl From<MachineError> for LoadError {
    fn from(error: MachineError) -> Self {
        Self::Machine { id: None, error }
    }
}

impl core::fmt::Display for LoadError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoSuchDevice { section, id } => write!(
                f,
                "section {section}: no device {} (instance {})",
                id.idstr, id.instance
            ),
            Self::Duplicate { section, id } => {
                write!(f, "section {section}: {} loaded twice", id.idstr)
            }
            Self::Missing { id } => write!(f, "no state for device {}", id.idstr),
            Self::NotDuplicable { id } => {
                write!(f, "device {} cannot be loaded all or nothing", id.idstr)
            }
            Self::State { section, id, error } => {
                write!(f, "section {section} ({}): {error}", id.idstr)
            }
            Self::PostLoad { id, error } => write!(f, "{} after load: {error}", id.idstr),
            Self::Machine {
                id: Some(id),
                error,
            } => write!(f, "{}: {error}", id.idstr),
            Self::Machine { id: None, error } => write!(f, "{error}"),
        }
    }
}

/// What one load cost the memory API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadStats {
    pub mode: CommitMode,
    pub sections: usize,
    /// Flat-view renders (on-demand renders included).
    pub renders: u64,
    pub on_demand_renders: u64,
    /// Topology updates and begin/commit brackets delivered to listeners.
    pub commits: u64,
    pub listener_commits: u64,
    /// Commits forced by reads inside the transaction.
    pub forced_commits: u64,
    /// Memory-map mutations.
    pub mutations: u64,
}

impl LoadStats {
    fn between(mode: CommitMode, sections: usize, a: Stats, b: Stats) -> Self {
        Self {
            mode,
            sections,
            renders: b.renders - a.renders,
            on_demand_renders: b.on_demand_renders - a.on_demand_renders,
            commits: b.commits - a.commits,
            listener_commits: b.listener_commits - a.listener_commits,
            forced_commits: b.forced_commits - a.forced_commits,
            mutations: b.mutations - a.mutations,
        }
    }
}

/// Where a load's time went, in ticks of the caller's clock
/// ([`Machine::load_devices_clocked`]). In eager mode `map` includes the
/// commits (each mapping change commits at once) and `commit` is 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadPhases {
    /// Matching sections to devices.
    pub check: u64,
    /// Duplicating each device before its state goes in.
    pub duplicate: u64,
    /// Decoding and checking each state into its duplicate (vmstate).
    pub decode: u64,
    /// The memory map following the loaded PCI state (BARs, bus master).
    pub map: u64,
    /// Post-load hooks (virtio ring caches), with the renders their reads
    /// cause.
    pub post_load: u64,
    /// The final commit: renders and listener (EPT) updates.
    pub commit: u64,
}

/// A clock and the phases measured with it (no clock: nothing measured).
struct Timer {
    clock: Option<fn() -> u64>,
    phases: LoadPhases,
}

impl Timer {
    fn now(&self) -> u64 {
        self.clock.map_or(0, |c| c())
    }

    /// Adds the time since `t0` to the phase `pick` selects.
    fn add(&mut self, t0: u64, pick: fn(&mut LoadPhases) -> &mut u64) {
        let dt = self.now().wrapping_sub(t0);
        let p = pick(&mut self.phases);
        *p = p.wrapping_add(dt);
    }
}

/// The originals a load replaced, kept until it is known to have worked.
struct Undo {
    /// (device index, original device, its PCI record before the load).
    replaced: Vec<(u32, Box<dyn Device>, Option<PciFunction>)>,
}

impl Machine {
    /// Runs `f` inside one memory transaction: committed when `f` returns
    /// `Ok`, abandoned on `Err` (no begin/commit pair can stay open).
    pub fn in_transaction<T, E: From<MachineError>>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, E>,
    ) -> Result<T, E> {
        self.mem.begin();
        match f(self) {
            Ok(v) => {
                self.mem.commit().map_err(MachineError::from)?;
                Ok(v)
            }
            Err(e) => {
                self.mem.abandon().map_err(MachineError::from)?;
                Err(e)
            }
        }
    }

    /// Loads every device state of `sections` all or nothing, in `mode`.
    /// With `complete`, every device with state must have a section.
    pub fn load_devices(
        &mut self,
        sections: &[DeviceSection],
        mode: CommitMode,
        complete: bool,
    ) -> Result<LoadStats, LoadError> {
        let mut timer = Timer {
            clock: None,
            phases: LoadPhases::default(),
        };
        self.load_devices_timed(sections, mode, complete, &mut timer)
    }

    /// As [`Machine::load_devices`], measuring each phase with `clock`
    /// (benchmarks: where the time of a load goes).
    pub fn load_devices_clocked(
        &mut self,
        sections: &[DeviceSection],
        mode: CommitMode,
        complete: bool,
        clock: fn() -> u64,
    ) -> Result<(LoadStats, LoadPhases), LoadError> {
        let mut timer = Timer {
            clock: Some(clock),
            phases: LoadPhases::default(),
        };
        let stats = self.load_devices_timed(sections, mode, complete, &mut timer)?;
        Ok((stats, timer.phases))
    }

    fn load_devices_timed(
        &mut self,
        sections: &[DeviceSection],
        mode: CommitMode,
        complete: bool,
        timer: &mut Timer,
    ) -> Result<LoadStats, LoadError> {
        let t0 = timer.now();
        let targets = self.check_sections(sections, complete)?;
        self.section_ticks = alloc::vec![0; sections.len()];
        timer.add(t0, |p| &mut p.check);
        let before = self.mem.stats();
        let policy = self.mem.read_policy();
        let r = match mode {
            CommitMode::Deferred | CommitMode::ForcedRead => {
                self.mem.set_read_policy(if mode == CommitMode::ForcedRead {
                    ReadPolicy::ForceCommit
                } else {
                    ReadPolicy::RenderOnDemand
                });
                let mut t_commit = 0;
                let r = self.in_transaction(|m| {
                    let undo = m.load_staged(sections, &targets, timer)?;
                    let r = match m.follow_loaded(&undo, mode, timer) {
                        Ok(()) => Ok(()),
                        Err(e) => {
                            m.put_back(undo, false);
                            Err(e)
                        }
                    };
                    t_commit = timer.now();
                    r
                });
                timer.add(t_commit, |p| &mut p.commit);
                self.mem.set_read_policy(policy);
                r
            }
            CommitMode::Eager => {
                let undo = self.load_staged(sections, &targets, timer)?;
                match self.follow_loaded(&undo, mode, timer) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        self.put_back(undo, true);
                        Err(e)
                    }
                }
            }
        };
        r?;
        Ok(LoadStats::between(
            mode,
            sections.len(),
            before,
            self.mem.stats(),
        ))
    }

    /// The device index of each section; duplicates, unknown devices and
    /// (with `complete`) devices left without state are errors.
    fn check_sections(
        &self,
        sections: &[DeviceSection],
        complete: bool,
    ) -> Result<Vec<u32>, LoadError> {
        let mut seen = alloc::vec![false; self.devices.len()];
        let mut out = Vec::with_capacity(sections.len());
        for (i, s) in sections.iter().enumerate() {
            let d = self
                .devices
                .iter()
                .position(|slot| &slot.id == s.id)
                .ok_or_else(|| LoadError::NoSuchDevice {
                    section: i,
                    id: s.id.clone(),
                })?;
            if core::mem::replace(&mut seen[d], true) {
                return Err(LoadError::Duplicate {
                    section: i,
                    id: s.id.clone(),
                });
            }
            out.push(d as u32);
        }
        if complete {
            if let Some(slot) = self
                .devices
                .iter()
                .zip(&seen)
                .find(|(slot, seen)| !**seen && slot.dev.state_version() != 0)
                .map(|(slot, _)| slot)
            {
                return Err(LoadError::Missing {
                    id: slot.id.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Loads each state into a duplicate of its device, then swaps the
    /// duplicates in; the originals come back in the [`Undo`].
    fn load_staged(
        &mut self,
        sections: &[DeviceSection],
        targets: &[u32],
        timer: &mut Timer,
    ) -> Result<Undo, LoadError> {
        let mut staged: Vec<(u32, Box<dyn Device>)> = Vec::with_capacity(sections.len());
        for (i, (s, &d)) in sections.iter().zip(targets).enumerate() {
            let ts = self.tick();
            let r = self.stage_one(i, s, d, &mut staged, timer);
            self.charge(i, ts);
            if let Err(e) = r {
                // Without an outer transaction (eager), the memory changes
                // the staged states asked for are committed already: the
                // originals, still in place, ask for theirs again.
                if self.mem.transaction_depth() == 0 {
                    for &(d, _) in staged.iter().rev() {
                        self.reassert(d);
                    }
                }
                return Err(e);
            }
        }
        let mut undo = Undo {
            replaced: Vec::with_capacity(staged.len()),
        };
        for (d, dup) in staged {
            let slot = &mut self.devices[d as usize];
            let old = core::mem::replace(&mut slot.dev, dup);
            undo.replaced.push((d, old, slot.pci));
        }
        Ok(undo)
    }

    /// Loads section `i` into a duplicate of device `d`.
    fn stage_one(
        &mut self,
        i: usize,
        s: &DeviceSection,
        d: u32,
        staged: &mut Vec<(u32, Box<dyn Device>)>,
        timer: &mut Timer,
    ) -> Result<(), LoadError> {
        let t0 = timer.now();
        let slot = &self.devices[d as usize];
        let mut dup = slot
            .dev
            .duplicate()
            .ok_or_else(|| LoadError::NotDuplicable {
                id: slot.id.clone(),
            })?;
        let t1 = timer.now();
        timer.add(t0, |p| &mut p.duplicate);
        let r = self
            .with_detached(d, &mut dup, |dev, ctx| dev.load(ctx, s.version, s.data))
            .map_err(|error| LoadError::Machine {
                id: Some(s.id.clone()),
                error,
            })?;
        timer.add(t1, |p| &mut p.decode);
        r.map_err(|error| LoadError::State {
            section: i,
            id: s.id.clone(),
            error,
        })?;
        staged.push((d, dup));
        Ok(())
    }

    /// Device `d` (the one in its slot) reloads its own state, which asks
    /// again for the regions it owns, and its BARs are mapped as its
    /// config says. It loaded before, so this does not fail; if it did,
    /// the map would stay as the failed load left it and the caller
    /// reports the load's error.
    fn reassert(&mut self, d: u32) {
        let slot = &self.devices[d as usize];
        let version = slot.dev.state_version();
        let mut bytes = Vec::new();
        slot.dev.save(&mut bytes);
        let _ = self.with_device(d, |dev, ctx| dev.load(ctx, version, &bytes));
        if self.devices[d as usize].pci.is_some() {
            let _ = self.pci_update_mappings(d);
        }
    }

    /// The memory map follows the loaded state (PCI mappings), and each
    /// device's post-load hook runs with the view that results.
    ///
    /// Eager and forced-read go device by device, in section order, as
    /// QEMU's load does (a device's mappings, then its post-load reads):
    /// each read then sees a tree that changed since the last one. Deferred
    /// first applies every device's mappings, then runs every post-load, so
    /// the reads share one on-demand render of the pending tree.
    fn follow_loaded(
        &mut self,
        undo: &Undo,
        mode: CommitMode,
        timer: &mut Timer,
    ) -> Result<(), LoadError> {
        let interleave = mode != CommitMode::Deferred;
        for (i, &(d, _, pci)) in undo.replaced.iter().enumerate() {
            let ts = self.tick();
            if pci.is_some() {
                let t0 = timer.now();
                let id = self.devices[d as usize].id.clone();
                self.pci_update_mappings(d)
                    .map_err(|error| LoadError::Machine {
                        id: Some(id),
                        error,
                    })?;
                timer.add(t0, |p| &mut p.map);
            }
            let t0 = timer.now();
            if interleave {
                self.post_load_one(d)?;
            }
            self.charge(i, ts);
            if !interleave && i + 1 == undo.replaced.len() {
                for (j, &(d, _, _)) in undo.replaced.iter().enumerate() {
                    let ts = self.tick();
                    self.post_load_one(d)?;
                    self.charge(j, ts);
                }
            }
            timer.add(t0, |p| &mut p.post_load);
        }
        Ok(())
    }

    fn tick(&self) -> u64 {
        self.load_clock.map_or(0, |c| c())
    }

    /// Adds the ticks since `t0` to section `i`.
    fn charge(&mut self, i: usize, t0: u64) {
        let now = self.tick();
        if let Some(t) = self.section_ticks.get_mut(i) {
            *t = t.saturating_add(now.wrapping_sub(t0));
        }
    }

    /// Runs device `d`'s post-load hook.
    fn post_load_one(&mut self, d: u32) -> Result<(), LoadError> {
        {
            let id = self.devices[d as usize].id.clone();
            let r = self
                .with_device(d, |dev, ctx| dev.post_load(ctx))
                .map_err(|error| LoadError::Machine {
                    id: Some(id.clone()),
                    error,
                })?;
            if let Some(Err(error)) = r {
                return Err(LoadError::PostLoad { id, error });
            }
        }
        Ok(())
    }

    /// Puts the original devices back after a failed load. Inside an
    /// abandoned transaction the tree goes back by itself, so the PCI
    /// records are restored too; with eager commits the tree already
    /// changed, so the mappings are recomputed from the originals.
    fn put_back(&mut self, undo: Undo, remap: bool) {
        for (d, old, pci) in undo.replaced.into_iter().rev() {
            let slot = &mut self.devices[d as usize];
            slot.dev = old;
            if !remap {
                slot.pci = pci;
                continue;
            }
            self.reassert(d);
        }
    }
}
