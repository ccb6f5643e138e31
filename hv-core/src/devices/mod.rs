//! Device models and the interface between them and their VM.
//!
//! A device is plain state plus register semantics. A VM's
//! [`Machine`](crate::machine::Machine) maps its regions into the memory or
//! port address space and dispatches each access by region: the memory API
//! carries an [`MmioHandle`] that names (device, region of that device), so a
//! device may own several regions (BARs, MSI-X tables, notify areas).
//!
//! Every callback gets a [`DeviceCtx`]: the current virtual time, guest
//! memory (the current flat view and the VM's RAM), interrupt lines and MSI
//! messages to raise, memory-map changes to request (applied by the machine
//! in one transaction after the callback), and a way to stop the VM. Devices
//! never call each other or the machine directly, so each is testable alone.
//!
//! Each device has a stable identity ([`DeviceId`], QEMU's idstr and
//! instance id) and save/load hooks with a state version, which the
//! migration stream uses; `load` runs with a context too, so memory-map
//! changes a loaded state implies go into the caller's transaction.
//!
//! Guests control every value written here, so no input may panic.

pub mod debug_exit;
pub mod fw_cfg;
pub mod pc_testdev;
pub mod test_device;
pub mod uart;

use crate::guest_mem::GuestMemory;
use crate::irq::{ApicMessage, LineLevel, Nanos};
use crate::memory::{MmioHandle, RegionId};
use crate::pci::PciConfig;
use alloc::string::String;
use alloc::vec::Vec;

/// A change of the VM's memory map that a device asks for (as PAM or BAR
/// registers do). All requests of one callback are applied in one memory
/// transaction, abandoned whole if one fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryRequest {
    /// Move a region to a new address in its container.
    Move { region: RegionId, addr: u64 },
    /// Enable or disable a region.
    Enable { region: RegionId, on: bool },
}

/// A device's stable identity, as QEMU names vmstate sections: an idstr
/// (e.g. `serial`, `0000:00:03.0/virtio-net`) and an instance id that tells
/// apart devices of the same idstr.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceId {
    pub idstr: String,
    pub instance: u32,
}

/// Which of its regions a device is accessed through (its index in the
/// order the device's regions were registered).
pub type RegionIndex = u8;

/// Encodes (device, region) into the memory API's opaque handle: the device
/// index in bits 31:8, the region index in bits 7:0.
pub const fn region_handle(device: u32, region: RegionIndex) -> MmioHandle {
    MmioHandle((device << 8) | region as u32)
}

/// Decodes a handle made by [`region_handle`].
pub const fn handle_parts(h: MmioHandle) -> (u32, RegionIndex) {
    (h.0 >> 8, h.0 as u8)
}

/// Why a saved state could not be loaded. The device is left as it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateError {
    /// The stream's version is newer than the device knows, or older than
    /// it still accepts.
    Version { got: u32, min: u32, max: u32 },
    /// The bytes end early or have trailing data.
    Length { expected: usize, got: usize },
    /// A field has a value the device cannot take.
    Invalid(&'static str),
    /// The vmstate decoder refused the bytes (field path and offset).
    Decode(String),
}

impl From<crate::vmstate::VmStateError> for StateError {
    fn from(e: crate::vmstate::VmStateError) -> Self {
        use crate::vmstate::ErrorKind;
        match e.kind {
            ErrorKind::VersionTooNew { got, max, .. } => Self::Version { got, min: 0, max },
            ErrorKind::VersionTooOld { got, min, .. } => Self::Version {
                got,
                min,
                max: u32::MAX,
            },
            _ => Self::Decode(alloc::format!("{e}")),
        }
    }
}

impl core::fmt::Display for StateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Version { got, min, max } => {
                write!(f, "state version {got} (accepted: {min}..={max})")
            }
            Self::Length { expected, got } => {
                write!(f, "state of {got} bytes, expected {expected}")
            }
            Self::Invalid(what) => write!(f, "invalid state: {what}"),
            Self::Decode(e) => write!(f, "{e}"),
        }
    }
}

/// What one callback sends out of the device: interrupt lines and
/// messages (routed to the PIC, I/O APIC and local APICs), network frames
/// (to the VM's switch) and report lines (printed with the device's name),
/// all handled by the machine when the callback returns.
#[derive(Clone, Debug, Default)]
pub struct IrqOut {
    /// (GSI, level) in the order they were set.
    pub lines: Vec<(u8, LineLevel)>,
    /// MSI messages.
    pub msis: Vec<ApicMessage>,
    /// Frames sent: (queue pair, frame).
    pub frames: Vec<(u16, Vec<u8>)>,
    /// Lines for the VM's log.
    pub reports: Vec<String>,
}

/// What a device callback may use and ask for.
pub struct DeviceCtx<'a> {
    /// Virtual time of the VM.
    pub now: Nanos,
    /// Guest memory through the current view.
    pub mem: GuestMemory<'a>,
    /// The device's own regions, by [`RegionIndex`].
    pub regions: &'a [RegionId],
    irq: &'a mut IrqOut,
    requests: &'a mut Vec<MemoryRequest>,
    exit: &'a mut Option<u32>,
}

impl<'a> DeviceCtx<'a> {
    /// A context; the machine builds one per callback.
    pub fn new(
        now: Nanos,
        mem: GuestMemory<'a>,
        regions: &'a [RegionId],
        irq: &'a mut IrqOut,
        requests: &'a mut Vec<MemoryRequest>,
        exit: &'a mut Option<u32>,
    ) -> Self {
        Self {
            now,
            mem,
            regions,
            irq,
            requests,
            exit,
        }
    }

    /// Sets the level of an interrupt line (a GSI; ISA IRQs 0-15 also reach
    /// the PIC).
    pub fn set_irq(&mut self, gsi: u8, level: LineLevel) {
        self.irq.lines.push((gsi, level));
    }

    /// Sends an MSI.
    pub fn msi(&mut self, msg: ApicMessage) {
        self.irq.msis.push(msg);
    }

    /// Sends a network frame out through the VM's switch, from queue pair
    /// `pair`.
    pub fn send_frame(&mut self, pair: u16, frame: &[u8]) {
        self.irq.frames.push((pair, frame.to_vec()));
    }

    /// One line for the VM's log (the machine prefixes the device's name);
    /// devices use it for guest errors, once per error state.
    pub fn report(&mut self, line: String) {
        self.irq.reports.push(line);
    }

    /// Asks for a change of the memory map.
    pub fn request(&mut self, r: MemoryRequest) {
        self.requests.push(r);
    }

    /// The region registered at `index`, if there is one.
    pub fn region(&self, index: RegionIndex) -> Option<RegionId> {
        self.regions.get(usize::from(index)).copied()
    }

    /// Stops the VM with this exit status once the callback returns.
    pub fn exit(&mut self, status: u32) {
        *self.exit = Some(status);
    }
}

/// A device model. Offsets are relative to the region; sizes are 1, 2, 4 or
/// 8 bytes, and an access never crosses the end of the region (the machine
/// checks).
pub trait Device {
    /// Reads `size` bytes at `offset` of region `region`.
    fn read(&mut self, ctx: &mut DeviceCtx, region: RegionIndex, offset: u64, size: u8) -> u64;
    /// Writes `size` bytes at `offset` of region `region`.
    fn write(
        &mut self,
        ctx: &mut DeviceCtx,
        region: RegionIndex,
        offset: u64,
        size: u8,
        value: u64,
    );
    /// A write matched one of the device's write notifiers (registered with
    /// `token`); the write itself did not reach `write`.
    fn notify(&mut self, _ctx: &mut DeviceCtx, _token: u64) {}
    /// When the device next needs [`Device::poll`] (a timer), if ever.
    fn next_event(&self, _now: Nanos) -> Option<Nanos> {
        None
    }
    /// Lets time-driven state advance to `ctx.now`.
    fn poll(&mut self, _ctx: &mut DeviceCtx) {}
    /// Version of the state [`Device::save`] writes (QEMU's `version_id`);
    /// 0 for a device without migratable state.
    fn state_version(&self) -> u32 {
        0
    }
    /// Appends the device's state: by default the body of
    /// [`Device::save_described`] (devices described with `vmstate!`
    /// implement only that).
    fn save(&self, out: &mut Vec<u8>) {
        if let Some((bytes, _)) = self.save_described() {
            out.extend_from_slice(&bytes);
        }
    }
    /// Replaces the device's state with a saved one of `version`; on error
    /// nothing changed. Memory-map changes go through `ctx`.
    fn load(&mut self, _ctx: &mut DeviceCtx, version: u32, data: &[u8]) -> Result<(), StateError> {
        match (version, data.len()) {
            (0, 0) => Ok(()),
            (0, n) => Err(StateError::Length {
                expected: 0,
                got: n,
            }),
            (v, _) => Err(StateError::Version {
                got: v,
                min: 0,
                max: 0,
            }),
        }
    }
    /// The PCI function's config space, for devices that are PCI functions
    /// (added with `Machine::add_pci_device`).
    fn pci(&mut self) -> Option<&mut PciConfig> {
        None
    }
    /// After the machine applied a config write (`PciConfig::write` +
    /// `PciConfig::after_write`), the device reacts (device-specific bits).
    /// The machine then recomputes the BAR mappings; memory requests made
    /// here go into the same transaction.
    fn pci_config_written(&mut self, _ctx: &mut DeviceCtx, _offset: u16, _size: u8) {}
    /// The state as `save` writes it, with its description (QEMU's
    /// vmdesc), for devices described with `vmstate!`.
    fn save_described(&self) -> Option<(Vec<u8>, crate::vmstate::StructDesc)> {
        None
    }
    /// Runs after a migration load, once every device's state is in and
    /// the memory map follows it (BARs, bus mastering): the device may now
    /// read the address space (ring caches, tables). An error fails the
    /// whole load.
    fn post_load(&mut self, _ctx: &mut DeviceCtx) -> Result<(), StateError> {
        Ok(())
    }
    /// A copy of the device to load a state into, so that a load that fails
    /// half-way leaves the original untouched. Devices with state
    /// (`state_version` != 0) must provide it.
    fn duplicate(&self) -> Option<alloc::boxed::Box<dyn Device>> {
        None
    }
    /// A network frame from the VM's switch for queue pair `pair`; whether
    /// the device took it (network devices only).
    fn receive_frame(&mut self, _ctx: &mut DeviceCtx, _pair: u16, _frame: &[u8]) -> bool {
        false
    }
    /// The MAC address the switch delivers to (network devices only).
    fn mac(&self) -> Option<[u8; 6]> {
        None
    }
    /// I/O counters for the VM's report: (name, value).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Downcast support for the VM that owns the device.
    fn as_any(&mut self) -> &mut dyn core::any::Any;
}

/// All ones of an access size (what a read of nothing returns).
pub const fn all_ones(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// `size` bytes of `bytes` from `offset`, as a little-endian register
/// read sees them; bytes past the end read as zero.
pub fn read_le(bytes: &[u8], offset: u64, size: u8) -> u64 {
    (0..u64::from(size.min(8))).fold(0, |v, i| {
        let b = offset
            .checked_add(i)
            .and_then(|j| bytes.get(usize::try_from(j).ok()?))
            .copied()
            .unwrap_or(0);
        v | (u64::from(b) << (8 * i))
    })
}

/// Stores the low `size` bytes of `value` little-endian into `bytes` from
/// `offset`; bytes past the end are dropped.
pub fn write_le(bytes: &mut [u8], offset: u64, size: u8, value: u64) {
    for i in 0..u64::from(size.min(8)) {
        let slot = offset
            .checked_add(i)
            .and_then(|j| usize::try_from(j).ok())
            .and_then(|j| bytes.get_mut(j));
        if let Some(b) = slot {
            *b = (value >> (8 * i)) as u8;
        }
    }
}

/// Little-endian state encoding for the save/load hooks: a cursor that
/// refuses to read past the end.
pub struct StateReader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> StateReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data, at: 0 }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or(StateError::Length {
            expected: self.at.saturating_add(n),
            got: self.data.len(),
        })?;
        let b = &self.data[self.at..end];
        self.at = end;
        Ok(b)
    }

    pub fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, StateError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, StateError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Everything not read yet (the reader is then at the end).
    pub fn rest(&mut self) -> &'a [u8] {
        let r = &self.data[self.at..];
        self.at = self.data.len();
        r
    }

    pub fn u64(&mut self) -> Result<u64, StateError> {
        let mut v = [0; 8];
        v.copy_from_slice(self.bytes(8)?);
        Ok(u64::from_le_bytes(v))
    }

    /// Fails unless every byte was consumed.
    pub fn finish(self) -> Result<(), StateError> {
        if self.at == self.data.len() {
            Ok(())
        } else {
            Err(StateError::Length {
                expected: self.at,
                got: self.data.len(),
            })
        }
    }
}

#[cfg(test)]
pub mod testing {
    //! A machine-free harness for device tests: a context over a small
    //! guest memory with no RAM mapped.
    use super::*;
    use crate::memory::{FlatView, MemorySystem};
    use crate::phys::mock::MockPhys;
    use alloc::rc::Rc;

    /// Owns what a [`DeviceCtx`] borrows.
    pub struct Harness {
        pub phys: MockPhys,
        pub view: Rc<FlatView>,
        pub irq: IrqOut,
        pub requests: Vec<MemoryRequest>,
        pub exit: Option<u32>,
        pub regions: Vec<RegionId>,
        pub now: Nanos,
    }

    impl Default for Harness {
        fn default() -> Self {
            Self::new()
        }
    }

    impl Harness {
        pub fn new() -> Self {
            let mut mem = MemorySystem::new();
            let root = mem.create_container("sys", 1 << 32).unwrap();
            let space = mem.create_address_space("memory", root).unwrap();
            Self {
                phys: MockPhys::new(2 << 20),
                view: mem.flat_view(space).unwrap(),
                irq: IrqOut::default(),
                requests: Vec::new(),
                exit: None,
                regions: Vec::new(),
                now: 0,
            }
        }

        /// Runs `f` with a context.
        pub fn with<R>(&mut self, f: impl FnOnce(&mut DeviceCtx) -> R) -> R {
            let mem = GuestMemory::new(self.view.clone(), &[], &mut self.phys);
            let mut ctx = DeviceCtx::new(
                self.now,
                mem,
                &self.regions,
                &mut self.irq,
                &mut self.requests,
                &mut self.exit,
            );
            f(&mut ctx)
        }

        pub fn read(&mut self, d: &mut dyn Device, region: u8, off: u64, size: u8) -> u64 {
            self.with(|c| d.read(c, region, off, size))
        }

        pub fn write(&mut self, d: &mut dyn Device, region: u8, off: u64, size: u8, v: u64) {
            self.with(|c| d.write(c, region, off, size, v))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_carry_device_and_region() {
        let h = region_handle(0x1234, 7);
        assert_eq!(handle_parts(h), (0x1234, 7));
        assert_ne!(region_handle(1, 0), region_handle(0, 1));
    }

    #[test]
    fn state_reader_refuses_short_and_long_input() {
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
        let mut r = StateReader::new(&data);
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.u16().unwrap(), 0x0302);
        assert_eq!(r.u64().unwrap(), 0x0B0A_0908_0706_0504);
        assert!(r.u8().is_err());
        r.finish().unwrap();
        let mut r = StateReader::new(&data);
        r.u64().unwrap();
        assert_eq!(
            r.finish(),
            Err(StateError::Length {
                expected: 8,
                got: 11
            })
        );
    }
}
